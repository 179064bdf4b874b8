"""preemption.py: a SIGTERM (what a scheduler sends before it preempts a machine) stops claiming, lets the
units in flight finish and commit, and exits 143; the rerun finishes exactly once. One process, and
`--devices 2` (torch's elastic agent forwards the signal to its ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from functools import partial

import pytest

from conftest import WDS_ENCODE, assert_exactly_once, run_cli, write_dataset_config
from torch.utils.data import DataLoader, IterableDataset

from wds_encode.job.preemption import GracefulStop, Preempted, decode_worker_init, start_decode_workers
from wds_encode.synth import write_tar_shards

# real processes racing, killed and restarted: part of `make test`, not of `make test-fast`
pytestmark = pytest.mark.slow

GRACE = 20


@pytest.fixture(scope="module")
def many_units(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    paths, samples = write_tar_shards(folder / "in", 14, 3, seed=4, name="pre", min_seconds=0.5, max_seconds=1.5)
    dataset = write_dataset_config(folder / "d.json", "wds", [{"id": "pre", "path": str(folder / "in")}],
                                   random_crop=False)
    return dataset, samples


def records(out) -> int:
    """Units committed: a unit commits by creating its record, `manifest/done/{unit}.json`."""
    return len(list((out / "manifest").glob("done/**/*.json")))


def args(demo_model, dataset, out, *extra):
    return ["--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
            "--output-path", out, "--sample-size", 16384, "--chunking", "split", "--batch-size", 2,
            "--num-workers", 2, "--grace-seconds", GRACE, "--no-progress", *extra]


def stop_after_first_commit(command, out) -> tuple[subprocess.CompletedProcess, int, float]:
    """Start `command`, SIGTERM it (its main process, as a scheduler does) once a unit is committed;
    returns (the result, records when the signal went, seconds from the signal to the exit)."""
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "manifest").is_dir() or records(out) == 0:
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "no unit was committed in time"
            time.sleep(0.05)
        before = records(out)
        signalled = time.time()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=GRACE + 60)
        took = time.time() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), before, took


@pytest.mark.parametrize("devices", ["1", "2"])
def test_sigterm_commits_the_units_in_flight_and_the_rerun_finishes_exactly_once(many_units, demo_model, tmp_path,
                                                                                 devices):
    dataset, samples = many_units
    out = tmp_path / "out"
    command = [WDS_ENCODE, *args(demo_model, dataset, out, "--devices", devices)]
    result, before, took = stop_after_first_commit(command, out)
    assert result.returncode == 143, result.stdout + result.stderr
    assert took < GRACE, f"{took:.1f} s from the signal to the exit"
    after = records(out)
    assert before < after < 14, (before, after)             # what was in flight was committed, not all
    assert "stopped by SIGTERM" in result.stderr and f"{after} of 14 done" in result.stderr, result.stderr
    # one stop line for the job (not one from rank 0 and another from the --devices parent), and the stopped
    # run's summary names its output and adds up, as a finished run's does
    assert result.stderr.count("stopped by SIGTERM") == 1, result.stderr
    summary = result.stdout.splitlines()
    assert f"  units      {after} encoded, 0 already done, 0 broken, {14 - after} left (of 14)" in summary, result.stdout
    assert summary[-1] == f"  output     {out}", result.stdout
    assert not list((out / "manifest" / "writing").glob("*")), "every rank closed its writing marker"
    status = json.loads(run_cli("status", out, "--json").stdout)
    assert status["units"]["done"] == after and status["units"]["remaining"] == 14 - after

    rerun = run_cli(*args(demo_model, dataset, out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{after} already done" in rerun.stdout
    assert_exactly_once(out, samples)


def test_past_the_grace_period_the_units_in_flight_are_discarded():
    """Unit level: a loop that does not finish within the grace period is interrupted, and says so."""
    asked = []
    with pytest.raises(Preempted, match="stopped by SIGTERM: the grace period ran out") as caught:
        with GracefulStop(asked.append, grace_seconds=0.3):
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 10
            while time.time() < deadline:   # the units in flight, never done
                time.sleep(0.01)
    assert caught.value.signum == 143 - 128 and asked == ["SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # the handlers are put back


def test_a_second_signal_stops_at_once():
    asked = []
    started = time.time()
    with pytest.raises(Preempted, match="a second signal came"):
        with GracefulStop(asked.append, grace_seconds=30):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert time.time() - started < 3 and asked == ["SIGINT"]


class _Numbers(IterableDataset):
    def __iter__(self):
        yield from range(3)


def _signalled_before_init(worker_id: int) -> None:
    """A worker_init_fn that gets a SIGTERM (from itself: not its parent, as from a scheduler signalling
    the process group) after torch's worker set its handlers and before ours runs: the window the
    signal blocking in `start_decode_workers` closes."""
    os.kill(os.getpid(), signal.SIGTERM)
    decode_worker_init(worker_id, parent_pid=os.getppid())


def test_a_stop_signal_reaching_a_decode_worker_as_it_starts_does_not_kill_it():
    loader = DataLoader(_Numbers(), batch_size=None, num_workers=1, worker_init_fn=_signalled_before_init)
    iterator = start_decode_workers(loader)
    assert list(iterator) == [0, 1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                  # this process: as it was
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # and not left blocked
    # the same worker started without the block dies of it: the test can fail
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(iter(loader))


class _SignalledAsItStarts(DataLoader):
    def __iter__(self):
        os.kill(os.getpid(), signal.SIGTERM)   # held back while the workers start...
        return super().__iter__()


def test_the_rank_takes_a_signal_that_came_while_its_workers_started():
    loader = _SignalledAsItStarts(_Numbers(), batch_size=None, num_workers=1,
                                  worker_init_fn=partial(decode_worker_init, parent_pid=os.getpid()))
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        iterator = start_decode_workers(loader)
        deadline = time.time() + 10
        while not got and time.time() < deadline:  # ...and handled once they are started
            time.sleep(0.01)
        assert got == [signal.SIGTERM] and list(iterator) == [0, 1, 2]
    finally:
        signal.signal(signal.SIGTERM, previous)


KILL_RANK_1_ONCE = '''
import os
import signal
from pathlib import Path

from wds_encode.pipeline import manifest

MARK = Path(os.environ["WDS_TEST_KILL_MARK"])
_write_record = manifest.RunManifest.write_record


def write_record(self, record):  # rank 1 dies at its first commit, once per test
    if os.environ.get("RANK") == "1" and not MARK.exists():
        MARK.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_record(self, record)


manifest.RunManifest.write_record = write_record
'''


def test_devices_restarts_a_killed_rank_with_max_restarts(many_units, demo_model, tmp_path):
    """--devices 2 --max-restarts 1: rank 1 is SIGKILLed once; torch's agent restarts the ranks, which
    resume from the committed units, and the job finishes exactly once with exit 0."""
    dataset, samples = many_units
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_RANK_1_ONCE)
    env = {**os.environ, "PYTHONPATH": str(inject), "WDS_TEST_KILL_MARK": str(tmp_path / "killed")}
    out = tmp_path / "out"
    result = subprocess.run(list(map(str, [WDS_ENCODE, *args(demo_model, dataset, out, "--devices", 2,
                                                             "--max-restarts", 1)])),
                            capture_output=True, text=True, timeout=600, env=env)
    assert (tmp_path / "killed").exists(), "rank 1 was never killed"
    assert result.returncode == 0, result.stdout + result.stderr
    assert_exactly_once(out, samples)
    # without restarts the same kill stops the job (committed units kept, exit non-zero)
    (tmp_path / "killed").unlink()
    again = subprocess.run(list(map(str, [WDS_ENCODE, *args(demo_model, dataset, tmp_path / "out2", "--devices", 2)])),
                           capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode != 0 and "rank 1" in again.stderr and "SIGKILL" in again.stderr, again.stderr
