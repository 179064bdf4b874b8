"""Exactly once when attempts race (issue 27), as real processes: a retry beside a live holder in another
PID namespace with the same hostname, two tasks of one part whose lease writes are slow, a holder
paused (SIGSTOP) past its lease while a retry takes over, the same whole job started twice, a listing
raced by an input that grows. After each: every input sample in exactly one committed record, every
record's files there and holding that unit's windows (by content: the latents of a clean run),
filelist.txt equal to the committed windows, `status` complete, no open multipart upload. Rows 1-5 run
on a local output and on a moto S3 server; a store that ignores conditional writes is refused for
array parts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import WDS_ENCODE, assert_exactly_once, read_folder_layout, write_dataset_config
from s3_support import s3_env
from test_s3 import mirror
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace
from wds_encode.synth import write_tar_shards

# real processes racing, killed and restarted: part of `make test`, not of `make test-fast`
pytestmark = pytest.mark.slow

SAMPLE_SIZE = 16384
UNITS = 12

# Faults at named points, switched on per process by its environment (a sitecustomize on PYTHONPATH)
HOOKS = '''
import os, time
from wds_encode.pipeline import manifest, sources
from wds_encode.job import parts
from wds_encode import plan

def _seconds(name):
    return float(os.environ.get(name) or 0)

if _seconds("RACE_SLOW_COMMIT"):                  # every unit's commit waits (a slow or loaded store)
    _write_record = manifest.RunManifest.write_record
    def write_record(self, record):
        time.sleep(_seconds("RACE_SLOW_COMMIT"))
        return _write_record(self, record)
    manifest.RunManifest.write_record = write_record

if _seconds("RACE_SLOW_LEASE"):                   # a lease write arrives seconds after its read
    _claim = parts.Lease._claim
    def claim(self, released=False):
        data = _claim(self, released)
        time.sleep(_seconds("RACE_SLOW_LEASE"))
        return data
    parts.Lease._claim = claim

if os.environ.get("RACE_LISTED"):                 # the input is listed, then time passes before it is kept
    _list_shards = plan.list_shards
    def list_shards(*args, **kwargs):
        units = _list_shards(*args, **kwargs)
        open(os.environ["RACE_LISTED"], "w").close()
        while not os.path.exists(os.environ["RACE_PROCEED"]):
            time.sleep(0.05)
        return units
    plan.list_shards = list_shards
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_model):
    """12 units of 2 samples, their dataset config, and the latents of one clean run (by output key)."""
    folder = tmp_path_factory.mktemp("races")
    paths, samples = write_tar_shards(folder / "in", UNITS, 2, seed=27, name="race", min_seconds=0.5, max_seconds=1.5)
    dataset = write_dataset_config(folder / "d.json", "wds", [{"id": "race", "path": str(folder / "in")}],
                                   random_crop=False)
    hooks = folder / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOKS)
    clean = folder / "clean"
    result = subprocess.run(command(demo_model, dataset, clean), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reference = {key: latent for key, (latent, _md) in read_folder_layout(clean).items()}
    return {"dataset": dataset, "samples": samples, "reference": reference, "hooks": hooks, "folder": folder}


def command(demo_model, dataset, out, *extra) -> list[str]:
    return [WDS_ENCODE, "--model-config", str(demo_model[0]), "--ckpt-path", str(demo_model[1]),
            "--dataset-config", str(dataset), "--output-path", str(out), "--sample-size", str(SAMPLE_SIZE),
            "--chunking", "split", "--batch-size", "2", "--num-workers", "1", "--no-progress", *map(str, extra)]


class Output:
    """Where a race test writes: a local folder, or a prefix in a bucket of the moto server."""

    def __init__(self, kind: str, tmp_path: Path, request):
        self.kind, self.tmp_path = kind, tmp_path
        if kind == "local":
            self.url, self.env = str(tmp_path / "out"), {}
        else:
            self.s3 = request.getfixturevalue("s3")
            self.s3.make_bucket("races")
            self.url, self.env = "s3://races/out/", s3_env(self.s3.endpoint)

    def committed(self) -> int:
        if self.kind == "local":
            return len(list((Path(self.url) / "manifest" / "done").rglob("*.json")))
        return len(self.s3.keys("races", "out/manifest/done/"))

    def local(self) -> Path:
        """The output as a folder (a bucket's copied out), to read with plain numpy and json."""
        if self.kind == "local":
            return Path(self.url)
        copy = self.tmp_path / "mirror"
        shutil.rmtree(copy, ignore_errors=True)
        mirror(self.s3, "races", "out/", copy)
        return copy

    def open_uploads(self) -> list[str]:
        return [] if self.kind == "local" else self.s3.multipart_uploads("races")


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Output:
    return Output(request.param, tmp_path, request)


def start(cmd, corpus, prefix=(), env=None, **faults) -> subprocess.Popen:
    env = {**(env or os.environ), "PYTHONPATH": str(corpus["hooks"]), **{k: str(v) for k, v in faults.items()}}
    return subprocess.Popen([*prefix, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _out, err = process.communicate(timeout=timeout)
    return process.returncode, err


def committed(out: Path) -> int:
    return len(list((out / "manifest" / "done").rglob("*.json")))


def wait_for(condition, what: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process ended first: {process.communicate()}")
        assert time.time() < deadline, what
        time.sleep(0.05)


def check_output(where: Output, corpus, units: int = UNITS) -> list[dict]:
    """Exactly once, every record's files there and holding that unit's windows, the filelist exact,
    no leftover of a losing attempt, no open upload, status complete."""
    out = where.local()
    assert where.open_uploads() == []
    assert_exactly_once(out, corpus["samples"])        # folder layout == latent shards, every sample once
    records = RunManifest(LocalPlace(out)).records()
    assert len(records) == len({r["shard"] for r in records}) == units
    windows = {}
    for record in records:
        for latent_id in record["folder_ids"]:
            npy = out / str(record["rank"]) / f"{latent_id}.npy"
            md = json.loads(npy.with_suffix(".json").read_text())
            assert md["source_shard"] == record["shard"], f"{npy} holds {md['source_shard']}, its record {record['shard']}"
            windows[f"{md['source_shard']}/{md['key']}"] = np.load(npy)
        for tar in record["latent_shards"]:
            assert (out / tar).is_file(), f"{record['shard']}: {tar} is missing"
    for key, latent in windows.items():   # by content: the latents a clean run gives for that key
        reference = corpus["reference"][key]
        assert latent.shape == reference.shape
        assert np.abs(latent - reference).max() <= 1e-3 * max(1.0, float(np.abs(reference).max())), key
    named = sorted(f"{r['rank']}/{i}.npy" for r in records for i in r["folder_ids"])
    assert (out / "filelist.txt").read_text().splitlines() == named
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("[0-9]*/*.npy"))
    assert on_disk == named, "a losing attempt left windows behind"
    tars = sorted(str(p.relative_to(out)) for p in (out / "shards").rglob("*.tar"))
    assert tars == sorted(t for r in records for t in r["latent_shards"])
    status = json.loads(subprocess.run([WDS_ENCODE, "status", where.url, "--json"], capture_output=True, text=True,
                                       env=where.env or None, check=True).stdout)
    assert status["state"] == "complete" and status["units"]["done"] == status["units"]["total"] == units
    return records


def namespace(hostname: str) -> list[str]:
    """A new PID and UTS namespace with `hostname`, the command as its pid 1 (a Kubernetes pod)."""
    return ["unshare", "--pid", "--fork", "--uts", "--mount-proc", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"]


def test_a_retry_beside_a_live_holder_in_another_pid_namespace_with_the_same_hostname_waits(
        corpus, demo_model, output):
    """Row 1: a Kubernetes Indexed Job's replacement pod (same hostname, wds-encode as pid 1) starts while
    the old pod still runs: it must not take the lease of a live holder for a dead one."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and unshare (as on the test machines)")
    cmd = command(demo_model, corpus["dataset"], output.url, "--part", "0/1", "--lease-seconds", "30")
    original = start(cmd, corpus, namespace("job-0"), output.env, RACE_SLOW_COMMIT=0.4)
    wait_for(lambda: output.committed() >= 1, "the original committed a unit", process=original)
    replacement = start(cmd, corpus, namespace("job-0"), output.env)
    code, err = finish(replacement)
    assert code == 0, err
    assert "is being written by job-0" in err, "the replacement waited for the live original"
    code, err_original = finish(original)
    assert code == 0, err_original
    check_output(output, corpus)


def test_two_tasks_of_one_part_with_slow_lease_writes_do_the_work_once(corpus, demo_model, output):
    """Row 2: two tasks of one part start together and one's lease write takes seconds: one holds the
    part, the other waits, and the second part finishes the job."""
    cmd = command(demo_model, corpus["dataset"], output.url, "--part", "0/2", "--lease-seconds", "30")
    # (each commit takes 0.5 s, so whichever holds the part still holds it when the other looks again)
    first = start(cmd, corpus, env=output.env, RACE_SLOW_LEASE=1.5, RACE_SLOW_COMMIT=0.5)
    second = start(cmd, corpus, env=output.env, RACE_SLOW_COMMIT=0.5)
    results = [finish(first), finish(second)]
    assert all(code == 0 for code, _ in results), results
    assert sum("is being written by" in err for _, err in results) == 1, results
    code, err = finish(start(command(demo_model, corpus["dataset"], output.url, "--part", "1/2"), corpus,
                             env=output.env))
    assert code == 0, err
    records = check_output(output, corpus)
    assert len({r["writer"].split("-")[1] for r in records if r["part"] == "0/2"}) == 1, "part 0 by one generation"


def _holds_a_flock(pid: int) -> bool:
    """Whether process `pid` holds an flock (a local compare-and-rename's folder lock), by /proc/locks."""
    with open("/proc/locks") as f:   # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END"
        return any(fields[1:2] == ["FLOCK"] and fields[4:5] == [str(pid)] for fields in map(str.split, f))


def pause_outside_a_folder_lock(pid: int) -> None:
    """SIGSTOP the process group of `pid`, again until its lease renewal is not caught inside the folder
    lock of a local compare-and-rename (held, it would keep the retry waiting for as long as the pause)."""
    for _ in range(100):
        os.killpg(pid, signal.SIGSTOP)
        if not _holds_a_flock(pid):
            return
        os.killpg(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the holder always held its folder lock when paused")


def test_a_holder_paused_past_its_lease_stops_and_loses_nothing(corpus, demo_model, output):
    """Row 3: the holder is paused (SIGSTOP) past --lease-seconds, a retry takes over and finishes, then
    the holder resumes: it stops before writing or committing again, and deletes nothing the retry
    committed."""
    cmd = command(demo_model, corpus["dataset"], output.url, "--lease-seconds", "4")
    holder = start(cmd, corpus, env=output.env, RACE_SLOW_COMMIT=0.5)
    wait_for(lambda: output.committed() >= 2, "the holder committed units", process=holder)
    pause_outside_a_folder_lock(holder.pid)
    try:
        code, err = finish(start(cmd, corpus, env=output.env))
        assert code == 0, err
        assert "is being written by" in err
    finally:
        os.killpg(holder.pid, signal.SIGCONT)
    code, err = finish(holder)
    assert code == 1 and ("taken over" in err or "not renewed" in err), (code, err)
    assert "Traceback" not in err
    records = check_output(output, corpus)
    assert len({r["writer"].split("-")[1] for r in records}) == 2, "units of both generations"


def test_the_same_whole_job_started_twice_runs_once(corpus, demo_model, output):
    """Row 4: a requeue racing its original, or a user submitting twice: one runs, the other waits for it
    and then finds nothing left to do."""
    runs = [start(command(demo_model, corpus["dataset"], output.url), corpus, env=output.env, RACE_SLOW_COMMIT=0.2)
            for _ in range(2)]
    results = [finish(p) for p in runs]
    assert all(code == 0 for code, _ in results), results
    assert sum("is being written by" in err for _, err in results) == 1
    records = check_output(output, corpus)
    assert len({r["writer"] for r in records}) == 1, "one attempt encoded and committed everything"


def test_parts_deal_from_one_listing_while_the_input_grows(corpus, demo_model, output, tmp_path):
    """Row 5: part 0 lists the input, a shard lands, part 1 lists it with the new shard and keeps its listing
    first: part 0 deals from the kept listing too, so the new shard is some part's, and status is true."""
    source = tmp_path / "in"
    shutil.copytree(corpus["folder"] / "in", source)
    extra = sorted(source.glob("*.tar"))[-1]
    extra_bytes = extra.read_bytes()
    extra.unlink()
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "race", "path": str(source)}], random_crop=False)
    listed, proceed = tmp_path / "listed", tmp_path / "proceed"
    slow = start(command(demo_model, dataset, output.url, "--part", "0/2"), corpus, env=output.env,
                 RACE_LISTED=listed, RACE_PROCEED=proceed)
    wait_for(listed.exists, "part 0 listed the input", process=slow)   # 11 shards; not kept yet
    extra.write_bytes(extra_bytes)
    code, err = finish(start(command(demo_model, dataset, output.url, "--part", "1/2"), corpus, env=output.env))
    assert code == 0, err                           # it listed 12 and kept them
    proceed.touch()
    code, err = finish(slow)
    assert code == 0, err
    check_output(output, corpus)


def test_a_store_without_conditional_writes_refuses_parts_and_warns_a_whole_run(corpus, demo_model, s3, fault_proxy,
                                                                                   tmp_path):
    """A store that ignores If-None-Match (the proxy drops it: every write overwrites): array parts are
    refused with exit 2 and one line; a whole run works, with a warning, exactly once."""
    s3.make_bucket("races")
    fault_proxy.drop_headers = {"if-none-match", "if-match"}
    where = Output("local", tmp_path, None)
    where.kind, where.s3, where.url, where.env = "s3", s3, "s3://races/out/", s3_env(fault_proxy.endpoint)
    code, err = finish(start(command(demo_model, corpus["dataset"], where.url, "--part", "0/2"), corpus, env=where.env))
    assert code == 2 and err.count("\n") == 1 and "conditional writes" in err and "Traceback" not in err, err
    code, err = finish(start(command(demo_model, corpus["dataset"], where.url), corpus, env=where.env))
    assert code == 0, err
    assert "warning" in err and "conditional writes" in err
    check_output(where, corpus)


def test_past_the_grace_period_nothing_more_is_committed(corpus, demo_model, output):
    """Row 10: SIGTERM with --grace-seconds 3 while every commit takes 4 s (so even one unit open at the
    signal cannot commit in time, however few a loaded machine has in flight): the run stops by the
    deadline, says the open units were discarded, commits nothing after it, and the rerun comes out
    exactly once."""
    cmd = command(demo_model, corpus["dataset"], output.url, "--grace-seconds", "3")
    run = start(cmd, corpus, env=output.env, RACE_SLOW_COMMIT=4)
    wait_for(lambda: output.committed() >= 1, "a first commit", process=run)
    os.killpg(run.pid, signal.SIGTERM)
    signalled = time.time()
    code, err = finish(run)
    assert code == 143, err
    assert "grace period ran out" in err and "discarded" in err
    records = RunManifest(LocalPlace(output.local())).records()
    # a commit already in flight at the deadline may land; none starts after it
    assert all(r["finished_at"] <= signalled + 3 + 4 + 1 for r in records), [r["finished_at"] - signalled for r in records]
    code, err = finish(start(cmd, corpus, env=output.env))
    assert code == 0, err
    check_output(output, corpus)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def test_decode_workers_die_with_their_rank(corpus, demo_model, tmp_path):
    """A SIGKILL of the rank alone (the OOM killer picks one process) takes its decode workers with it."""
    where = Output("local", tmp_path, None)
    out = Path(where.url)
    run = start(command(demo_model, corpus["dataset"], out, "--num-workers", "2"), corpus, RACE_SLOW_COMMIT=1)
    wait_for(lambda: len(_children(run.pid)) >= 1 and committed(out) >= 1, "the rank and its workers run", process=run)
    workers = _children(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    wait_for(lambda: not any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
                             for w in workers), "the workers are gone", timeout=10)
    code, err = finish(start(command(demo_model, corpus["dataset"], out), corpus))
    assert code == 0, err
    check_output(where, corpus)
