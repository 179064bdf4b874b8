"""End to end, several ranks: torchrun, --devices, two simulated nodes, more ranks than units, a rank
killed mid-run, and dynamic claiming on skewed input. Real processes on the CPU, real shards."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import WDS_ENCODE, assert_exactly_once, write_dataset_config
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace

pytestmark = pytest.mark.slow

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SAMPLE_SIZE = 65536          # ~1.5 s at the demo model's 44.1 kHz: files of 1-3 s give 1-2 windows


def make_dataset(folder: Path, samples_per_shard: list[int], *, seed: int = 0, **synth):
    """One input shard per entry, of that many samples (so shards of unequal sizes); all samples."""
    from wds_encode.synth import write_tar_shards
    synth = {"min_seconds": 1.0, "max_seconds": 3.0, **synth}
    samples = []
    for i, n in enumerate(samples_per_shard):
        _, s = write_tar_shards(folder / "shards", 1, n, seed=seed + i, name=f"s{i}", **synth)
        samples += s
    dataset = write_dataset_config(folder / "dataset.json", "wds", [{"id": "set", "path": str(folder / "shards")}],
                                   random_crop=False)
    return dataset, samples


def encode_args(demo_model, dataset, out, *extra) -> list[str]:
    config, ckpt = demo_model
    return ["--model-config", str(config), "--ckpt-path", str(ckpt), "--dataset-config", str(dataset),
            "--output-path", str(out), "--sample-size", str(SAMPLE_SIZE), "--chunking", "split",
            "--no-progress", *map(str, extra)]


def wds_encode(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([WDS_ENCODE, "run", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


def torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def unequal(tmp_path_factory, demo_model):
    """7 shards of unequal sizes."""
    folder = tmp_path_factory.mktemp("unequal")
    return make_dataset(folder, [3, 8, 2, 5, 1, 6, 4])


def unit_records(out: Path) -> list[dict]:
    """Every committed unit record (`manifest/done/{unit}.json`, read as every reader reads them)."""
    return RunManifest(LocalPlace(str(out))).records()


def committed_count(out: Path) -> int:
    """Units committed so far: a unit commits by creating its record under `manifest/done/`."""
    return len(list((out / "manifest").glob("done/**/*.json")))


def check_two_rank_job(details: dict, out: Path) -> None:
    ranks = {r["rank"]: r for r in details["ranks"]}
    assert sorted(ranks) == [0, 1]
    assert all(r["units_done"] > 0 for r in ranks.values()), details["ranks"]  # both ranks did work
    assert sum(r["units_done"] for r in ranks.values()) == 7 == details["stats"]["units_done"]
    per_rank = details["stats"]["units_per_rank"]  # merged from every rank's result, in rank order
    assert per_rank == [ranks[0]["units_done"], ranks[1]["units_done"]] and sum(per_rank) == 7
    records = unit_records(out)
    assert len(records) == 7 and {r["rank"] for r in records} == {0, 1}
    assert all(r["worker"] in (0, 1) for r in records)  # which (rank, worker) claimed each unit
    assert sorted(int(p.name) for p in out.iterdir() if p.name.isdigit()) == [0, 1]  # per-rank folders
    # rank 0 wrote the filelist once every rank had finished: both ranks' windows, exactly
    assert (out / "filelist.txt").read_text().splitlines() == sorted(
        f"{r['rank']}/{i}.npy" for r in records for i in r["folder_ids"])
    assert (out / "silence.npy").is_file()


def test_torchrun_two_ranks_two_workers_each(unequal, demo_model, tmp_path):
    dataset, samples = unequal
    out = tmp_path / "out"
    result = torchrun("--nproc-per-node", 2, "-m", "wds_encode", "run",
                      *encode_args(demo_model, dataset, out, "--num-workers", 2, "--batch-size", 2))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wds-encode summary") == 1  # rank 0 speaks for the job
    assert "units encoded per rank" in result.stdout
    details = assert_exactly_once(out, samples)
    check_two_rank_job(details, out)
    assert details["launch"] == {"launcher": "torchrun", "world_size": 2, "num_nodes": 1, "device": "cpu"}


def test_devices_two_without_a_launcher(unequal, demo_model, tmp_path):
    dataset, samples = unequal
    out = tmp_path / "out"
    result = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 2, "--batch-size", 2,
                                     "--devices", 2))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wds-encode summary") == 1
    details = assert_exactly_once(out, samples)
    check_two_rank_job(details, out)


def test_two_nodes_on_one_machine(unequal, demo_model, tmp_path):
    dataset, samples = unequal

    def start_nodes(out, num_nodes):
        """scripts/torchrun_multinode.sh on each "node", as the README says; it passes --num-nodes NNODES."""
        env = {**os.environ, "PATH": f"{Path(TORCHRUN).parent}:{os.environ['PATH']}", "NNODES": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1",
               "OMP_NUM_THREADS": "1"}  # two "nodes" share this machine's cores
        extra = ["--num-nodes", num_nodes] if num_nodes != 2 else []  # the last --num-nodes wins
        return [subprocess.Popen(["bash", str(SCRIPTS / "torchrun_multinode.sh"),
                                  *encode_args(demo_model, dataset, out, "--num-workers", 1, *extra)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**env, "NODE_RANK": str(node)})
                for node in (0, 1)]

    nodes = start_nodes(tmp_path / "out", 2)
    outputs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][1] + outputs[1][1]
    details = assert_exactly_once(tmp_path / "out", samples)
    check_two_rank_job(details, tmp_path / "out")
    assert details["launch"]["num_nodes"] == 2

    nodes = start_nodes(tmp_path / "wrong", 3)
    outputs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] != [0, 0]
    assert "--num-nodes 3, but this job has 2 node(s)" in outputs[0][1]
    assert re.search(r"exitcode\s*:\s*2 ", outputs[0][1])  # the rank's own exit code, in torchrun's report
    assert not list((tmp_path / "wrong").glob("*/*.npy"))
    alone = wds_encode(*encode_args(demo_model, dataset, tmp_path / "alone", "--num-nodes", 3))
    assert alone.returncode == 2 and "--num-nodes 3, but this job has 1 node(s): started alone" in alone.stderr


def test_srun_step(unequal, demo_model, tmp_path):
    """Two tasks of an srun step, as SLURM starts them: rank, local rank and master from SLURM_* alone."""
    dataset, samples = unequal
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1",
                "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_NODEID": "0",
                "SLURM_JOB_NUM_NODES": "1", "MASTER_PORT": str(free_port())})
    args = encode_args(demo_model, dataset, out, "--num-workers", 1, "--num-nodes", 1)
    procs = [subprocess.Popen([WDS_ENCODE, "run", *args], env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1] + outputs[1][1]
    assert outputs[0][0].count("wds-encode summary") == 1 and outputs[1][0] == ""  # rank 1 stays quiet
    details = assert_exactly_once(out, samples)
    check_two_rank_job(details, out)
    assert details["launch"]["launcher"] == "slurm"


def test_more_ranks_than_units_finishes(tmp_path, demo_model):
    dataset, samples = make_dataset(tmp_path, [2, 3], seed=40)
    out = tmp_path / "out"
    result = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 2, "--devices", 3), timeout=180)
    assert result.returncode == 0, result.stderr
    details = assert_exactly_once(out, samples)
    assert len(details["ranks"]) == 3 and sum(r["units_done"] for r in details["ranks"]) == 2


def test_claiming_is_dynamic_on_skewed_input(tmp_path, demo_model):
    """One unit 10x the others: the rank that holds it encodes fewer units than the other."""
    dataset, samples = make_dataset(tmp_path, [30, 3, 3, 3, 3, 3, 3], seed=60, formats=("wav",), rates=(44100,),
                                    channels=(1,), min_seconds=2.0, max_seconds=2.0)
    sizes = sorted(p.stat().st_size for p in (tmp_path / "shards").glob("*.tar"))
    assert sizes[-1] > 9.5 * sizes[-2] and sizes[0] == sizes[-2]
    out = tmp_path / "out"
    result = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 1, "--devices", 2))
    assert result.returncode == 0, result.stderr
    details = assert_exactly_once(out, samples)
    records = unit_records(out)
    big_rank = next(r["rank"] for r in records if r["shard"] == "set/s0-000000")
    units = {r["rank"]: r["units_done"] for r in details["ranks"]}
    assert units[big_rank] < units[1 - big_rank], units


def _rank_process(marker: str, rank: int) -> int | None:
    """The pid of rank `rank`'s main process among the processes whose environment holds `marker`."""
    def environ(pid):
        try:
            return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return []

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        env = environ(entry.name)
        if marker.encode() in env and f"RANK={rank}".encode() in env:
            try:
                parent = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if not any(v.startswith(b"RANK=") for v in environ(parent)):  # not a DataLoader worker
                return int(entry.name)
    return None


def test_a_killed_rank_stops_the_job_and_a_rerun_finishes_exactly_once(tmp_path, demo_model):
    dataset, samples = make_dataset(tmp_path, [6] * 12, seed=80)
    out = tmp_path / "out"
    marker = f"WDS_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([WDS_ENCODE, "run", *encode_args(demo_model, dataset, out, "--num-workers", 1,
                                                              "--devices", 2, "--batch-size", 1)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not committed_count(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = _rank_process(marker, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "rank 1" in stderr and "SIGKILL" in stderr, stderr
    records = unit_records(out)
    assert len(records) == committed_count(out), "the reader finds every record the killed job created"
    assert 1 <= len(records) < 12, "the kill should land after the first unit and before the last"
    for record in records:  # what was committed before the kill is whole
        for latent_id in record["folder_ids"]:
            rank_dir = out / str(record["rank"])
            assert (rank_dir / f"{latent_id}.npy").is_file() and (rank_dir / f"{latent_id}.json").is_file()
        for tar in record["latent_shards"]:
            assert (out / tar).is_file()
    rerun = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 1, "--devices", 3))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(records)} already done" in rerun.stdout
    details = assert_exactly_once(out, samples)
    assert committed_count(out) == len(unit_records(out)) == 12
    assert len(details["ranks"]) == 3


def test_progress_is_one_display_for_the_whole_job(unequal, demo_model, tmp_path):
    dataset, _ = unequal
    args = [a for a in encode_args(demo_model, dataset, tmp_path / "out", "--num-workers", 1, "--devices", 2,
                                   "--progress-interval", 0.2) if a != "--no-progress"]
    result = wds_encode(*args)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("wds-encode: ") and "%" in line]
    assert lines and "100.0%" in lines[-1] and "units 7/7" in lines[-1] and "ETA 0:00:00" in lines[-1]
    percents = [float(line.split("%")[0].split()[-1]) for line in lines]
    assert percents == sorted(percents)  # one display, summed over ranks: it never goes back


@pytest.mark.parametrize("victim", [1, 0])
def test_without_a_launcher_to_stop_them_the_survivors_stop_on_their_own(tmp_path, demo_model, victim):
    """Ranks started with plain RANK / WORLD_SIZE / MASTER_* (as a script under srun without
    --kill-on-bad-exit would): rank 0 hosts the store. Killing rank 1 stops rank 0 at once (its process
    is gone from this host; a rank silent elsewhere is stopped by heartbeat: test_distributed); killing
    rank 0 takes the store with it, which stops rank 1."""
    dataset, samples = make_dataset(tmp_path, [6] * 12, seed=100)
    out = tmp_path / "out"
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    args = encode_args(demo_model, dataset, out, "--num-workers", 1, "--batch-size", 1, "--peer-timeout", 3)
    procs = [subprocess.Popen([WDS_ENCODE, "run", *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not committed_count(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = procs[1 - victim].communicate(timeout=60)
        assert time.monotonic() - killed_at < 30
    finally:
        for p in procs:
            p.kill()
            p.wait()
    survivor = procs[1 - victim]
    assert survivor.returncode == 1, stderr
    expected = "rank 1 exited before finishing (pid" if victim == 1 else "lost the job's store"
    assert f"rank {1 - victim}: stopped: {expected}" in stderr, stderr
    assert "Traceback" not in stderr
    rerun = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 1))
    assert rerun.returncode == 0, rerun.stderr
    assert_exactly_once(out, samples)


def test_the_launch_scripts_are_valid_and_use_real_options():
    help_text = subprocess.run([WDS_ENCODE, "run", "--help"], capture_output=True, text=True).stdout
    for script in ("slurm_encode.sbatch", "torchrun_multinode.sh"):
        path = SCRIPTS / script
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, script
        command = path.read_text().split("wds_encode run" if "torchrun" in script else "wds-encode run", 1)[1]
        options = re.findall(r"(?<![\w-])--[a-z][a-z-]+", command)
        if script == "slurm_encode.sbatch":  # srun >= 22.05 does not inherit sbatch's --cpus-per-task
            assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in path.read_text().split("wds-encode run")[0]
        assert options, script
        for option in options:
            assert option in help_text, f"{script}: {option} is not an option of wds-encode run"


def test_bad_samples_on_any_rank_count_in_the_job_summary_and_exit_code(tmp_path, demo_model):
    dataset, samples = make_dataset(tmp_path, [3, 4], seed=120)
    broken = tmp_path / "shards" / "s1-000000.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # cut mid-member: a broken unit
    result = wds_encode(*encode_args(demo_model, dataset, tmp_path / "out", "--devices", 2, "--num-workers", 1,
                                     "--strict"))
    assert result.returncode == 1
    assert "1 broken (of 2)" in result.stdout and "1 errors" in result.stdout
    assert result.stderr.count("bad samples (limit: 0 with --strict)") == 1
    assert "failed (exitcode" not in result.stderr  # the launcher's own report stays out of the way


def test_progress_on_a_terminal_is_one_redrawn_bar(unequal, demo_model, tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    dataset, _ = unequal
    args = [a for a in encode_args(demo_model, dataset, tmp_path / "out", "--num-workers", 1, "--devices", 2)
            if a != "--no-progress"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen([WDS_ENCODE, "run", *args], stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: every process that held it has exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    stdout, _ = proc.communicate(timeout=60)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, terminal
    assert "wds-encode summary" in stdout
    assert "encoding: 100%" in terminal and "units 7/7" in terminal and "\r" in terminal
    assert terminal.count("\n") == 1  # one bar redrawn in place for the job (not one per rank), ended once
    assert " real time | elapsed" not in terminal  # no log lines on a terminal
