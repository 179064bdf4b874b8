"""Array jobs end to end: 3 parts as 3 separate `wds-encode --part K/3` processes into one output, on a
local folder and on a moto S3 server. Part 1 is SIGKILLed after its first commit and started again (as
a scheduler retries a lost task); part 2 is started twice at the same time (a retry racing its
original). Every sample comes out exactly once in every output form, and `status` reports the job
complete with its 3 parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import WDS_ENCODE, assert_exactly_once, write_dataset_config
from s3_support import s3_env
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace
from wds_encode.synth import write_tar_shards

# real processes racing, killed and restarted: part of `make test`, not of `make test-fast`
pytestmark = pytest.mark.slow

SAMPLE_SIZE = 16384
PARTS = 3


@pytest.fixture(scope="module")
def twelve_units(tmp_path_factory):
    folder = tmp_path_factory.mktemp("array")
    paths, samples = write_tar_shards(folder / "in", 12, 2, seed=21, name="arr", min_seconds=0.5, max_seconds=2.0)
    return folder / "in", paths, samples


def command(demo_model, dataset, out, part: int, *extra, parts: int = PARTS) -> list[str]:
    return [WDS_ENCODE, "--model-config", str(demo_model[0]), "--ckpt-path", str(demo_model[1]),
            "--dataset-config", str(dataset), "--output-path", str(out), "--sample-size", str(SAMPLE_SIZE),
            "--chunking", "split", "--batch-size", "2", "--num-workers", "1", "--no-progress",
            "--part", f"{part}/{parts}", "--lease-seconds", "20", *map(str, extra)]


def start(cmd, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def run_array_job(demo_model, dataset, out, committed, env=None) -> dict[str, tuple[int, str, str]]:
    """Parts 0, 1, 2 and a second part 2 at once; part 1 killed after its first commit, then rerun."""
    runs = {name: start(command(demo_model, dataset, out, part), env)
            for name, part in (("part0", 0), ("part1", 1), ("part2", 2), ("part2-again", 2))}
    deadline = time.time() + 300
    while committed(1) == 0:
        assert runs["part1"].poll() is None, runs["part1"].communicate()
        assert time.time() < deadline, "part 1 never committed a unit"
        time.sleep(0.05)
    os.killpg(runs["part1"].pid, signal.SIGKILL)   # its whole process group: the decode workers too
    runs["part1"].wait()
    runs["part1-retry"] = start(command(demo_model, dataset, out, 1), env)
    return {name: finish(p) for name, p in runs.items() if name != "part1"}


def check_job(results: dict, status: dict, samples) -> None:
    for name, (code, _out, err) in results.items():
        assert code == 0, f"{name}: {err}"
    raced = [err for name, (_c, _o, err) in results.items() if name.startswith("part2")]
    assert any("is being written by" in err for err in raced), "one of the two part 2 tasks waited for the other"
    assert status["state"] == "complete"
    assert status["units"]["done"] == status["units"]["total"] == 12
    assert status["samples"] == len(samples)
    parts = status["parts"]
    assert [p["part"] for p in parts] == ["0/3", "1/3", "2/3"]
    assert all(p["state"] == "complete" and p["units"]["done"] == p["units"]["total"] > 0 for p in parts)
    assert sum(p["units"]["total"] for p in parts) == 12


def part_records(records: list[dict], part: int) -> int:
    """How many of the records part `part` (of PARTS, one rank each: it writes as rank `part`) committed."""
    return sum(1 for r in records if r["part"] == f"{part}/{PARTS}" and r["rank"] == part)


def local_committed(out: Path):
    """Units part K has committed: a unit commits by creating `manifest/done/{unit}.json`."""
    return lambda part: part_records([json.loads(p.read_text()) for p in (out / "manifest").glob("done/**/*.json")],
                                     part)


def test_three_parts_local_one_killed_and_retried_one_started_twice(twelve_units, demo_model, tmp_path):
    folder, _paths, samples = twelve_units
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "arr", "path": str(folder)}], random_crop=False)
    out = tmp_path / "out"
    results = run_array_job(demo_model, dataset, out, local_committed(out))
    status = json.loads(subprocess.run([WDS_ENCODE, "status", str(out), "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    check_job(results, status, samples)
    assert_exactly_once(out, samples)                          # the folder layout and the latent shards
    records = RunManifest(LocalPlace(str(out))).records()
    assert len(records) == len({r["shard"] for r in records}) == 12
    assert len(list((out / "manifest").glob("done/**/*.json"))) == 12
    assert {r["rank"] % PARTS for r in records} == {0, 1, 2} and all(r["part"].endswith("/3") for r in records)
    assert (out / "filelist.txt").read_text().splitlines() == sorted(
        f"{r['rank']}/{i}.npy" for r in records for i in r["folder_ids"])
    assert not list((out / "manifest" / "writing").glob("*"))
    # a part's units are its own on every retry: the deal depends only on the listing
    plans = {json.loads(p.read_text())["part"]: json.loads(p.read_text())["units"]
             for p in (out / "manifest" / "parts").glob("*.json")}
    assert plans == {f"{k}/3": sum(1 for r in records if r["rank"] % 3 == k) for k in range(3)}


def test_three_parts_on_s3_one_killed_and_retried_one_started_twice(twelve_units, demo_model, tmp_path, s3):
    from test_s3 import mirror, owned_objects, s3_dataset_config
    _folder, paths, samples = twelve_units
    s3.make_bucket("audio")
    for path in paths:
        s3.put("audio", f"train/{path.name}", path.read_bytes())
    dataset = s3_dataset_config(tmp_path, "s3://audio/train/")
    s3.make_bucket("latents")
    out = "s3://latents/array/"

    def committed(part: int) -> int:
        records = [json.loads(s3.get("latents", key)) for key in s3.keys("latents", "array/manifest/done/")]
        return part_records(records, part)

    env = s3_env(s3.endpoint)
    results = run_array_job(demo_model, dataset, out, committed, env)
    status = json.loads(subprocess.run([WDS_ENCODE, "status", out, "--json"], capture_output=True, text=True,
                                       env=env, check=True).stdout)
    check_job(results, status, samples)
    local = tmp_path / "mirror"
    objects = mirror(s3, "latents", "array/", local)
    assert_exactly_once(local, samples)
    owned = owned_objects(local) | {k for k in objects if k.startswith("manifest/parts/")}
    assert set(objects) == owned, "nothing but what the records list (no orphan of the killed part)"
    assert s3.multipart_uploads("latents") == []


def test_parts_of_two_ranks_each_write_under_their_own_rank_ids(twelve_units, demo_model, tmp_path):
    folder, _paths, samples = twelve_units
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "arr", "path": str(folder)}], random_crop=False)
    out = tmp_path / "out"
    runs = [start(command(demo_model, dataset, out, part, "--devices", 2, parts=2)) for part in (0, 1)]
    for process in runs:
        code, _out, err = finish(process)
        assert code == 0, err
    assert_exactly_once(out, samples)
    records = RunManifest(LocalPlace(str(out))).records()
    assert len(records) == len({r["shard"] for r in records}) == 12
    # part K's ranks 0 and 1 write as K and K + 2
    assert {r["rank"]: r["part"] for r in records} == {0: "0/2", 2: "0/2", 1: "1/2", 3: "1/2"}
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
