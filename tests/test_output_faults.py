"""A local output that cannot be written, or fills up mid-run: exit 2 before the model loads, or
one line and exit 1 with committed units intact, and a rerun that finishes exactly once.

Real file systems: a tmpfs of 3 MB (full disk) and a read-only tmpfs, mounted in a private user and
mount namespace (`unshare`), so the tests need no privileges beyond what unshare allows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import WDS_ENCODE, read_folder_layout, read_latent_shards, run_cli, write_dataset_config

pytestmark = pytest.mark.slow

SAMPLE_SIZE = 65536


def namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not namespaces_available(),
                                      reason="needs unshare with user+mount namespaces to mount a small tmpfs")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, demo_model):
    """17 samples in 5 shards; encoded, about 4.5 MB of output."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("faults")
    samples = []
    for i, n in enumerate([3, 5, 2, 4, 3]):
        _, s = write_tar_shards(folder / "in", 1, n, seed=10 + i, name=f"s{i}", min_seconds=1.0, max_seconds=3.0)
        samples += s
    config = write_dataset_config(folder / "d.json", "wds", [{"id": "set", "path": str(folder / "in")}],
                                  random_crop=False)
    return config, samples


def command(demo_model, dataset_config, out) -> str:
    config, ckpt = demo_model
    return " ".join(map(str, [WDS_ENCODE, "--model-config", config, "--ckpt-path", ckpt, "--dataset-config",
                              dataset_config, "--output-path", out, "--sample-size", SAMPLE_SIZE, "--chunking",
                              "split", "--no-progress", "--num-workers", 1, "--batch-size", 2]))


def in_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
                          capture_output=True, text=True, timeout=600)


@needs_namespaces
def test_a_full_disk_stops_with_one_line_and_a_rerun_after_freeing_space_is_exact(dataset, demo_model, tmp_path):
    config, samples = dataset
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    run = command(demo_model, config, mnt / "out")
    result = in_namespace(f"""
        set -u
        mount -t tmpfs -o size=3m tmpfs {mnt}
        {run} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc
        cp -r {mnt}/out {tmp_path}/after-full
        mount -o remount,size=16m {mnt}
        {run} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
        cp -r {mnt}/out {copy}
    """)
    assert result.returncode == 0, result.stderr
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first_err
    lines = first_err.strip().splitlines()
    assert len(lines) == 1 and "output full" in lines[0] and "No space left on device" in lines[0], first_err
    assert str(mnt / "out") in lines[0]
    committed = len(list((tmp_path / "after-full" / "manifest").glob("done/**/*.json")))
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert f"{5 - committed} encoded, {committed} already done" in (tmp_path / "second.out").read_text()

    folder, shards = read_folder_layout(copy), read_latent_shards(copy)
    assert sorted(folder) == sorted(shards)
    assert sorted({md["__key__"] for _, md in folder.values()}) == sorted(s.key for s in samples)
    assert not [p for p in copy.rglob("*") if p.is_file() and (p.name.endswith(".partial") or "writing" in p.parts)]
    records = [json.loads(p.read_text()) for p in (copy / "manifest").glob("done/**/*.json")]
    listed = {f"{r['rank']}/{i}.{ext}" for r in records for i in r["folder_ids"] for ext in ("npy", "json")}
    assert {str(p.relative_to(copy)) for p in copy.glob("[0-9]*/*")} == listed  # nothing half-written left


@needs_namespaces
def test_a_read_only_output_fails_before_the_model_loads(dataset, demo_model, tmp_path):
    config, _ = dataset
    mnt = tmp_path / "ro"
    mnt.mkdir()
    result = in_namespace(f"mount -t tmpfs -o ro,size=1m tmpfs {mnt} && {command(demo_model, config, mnt / 'out')}")
    assert result.returncode == 2, result.stderr
    assert f"--output-path {mnt / 'out'}" in result.stderr and "Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_output_path_under_a_file_fails_before_the_model_loads(dataset, demo_model, tmp_path):
    config, _ = dataset
    (tmp_path / "file.txt").write_text("x")
    model_config, ckpt = demo_model
    result = run_cli("--model-config", model_config, "--ckpt-path", ckpt, "--dataset-config", config,
                     "--output-path", tmp_path / "file.txt" / "out", "--sample-size", SAMPLE_SIZE)
    assert result.returncode == 2
    assert f"{tmp_path / 'file.txt'}, a folder above it, is a file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert Path(tmp_path / "file.txt").read_text() == "x"
