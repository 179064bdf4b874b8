"""The summary the real command prints (issue 28): a no-op rerun says there was nothing to do; a broken unit
counts only as broken and an empty tar is done with a warning, so the counts add up; the batches line says
how full batches really were, and `--chunking full` says why few windows per batch is slower; errors.jsonl is
always there, empty when nothing went wrong, and every reader of an output accepts it so."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_cli, write_dataset_config, write_tar
from wds_encode.cli import main
from wds_encode.loader import latent_loader
from wds_encode.synth import encode_audio_bytes, synth_waveform

RATE = 44100          # the demo model's rate: WAVs at it are not resampled, so window lengths are exact
RATIO = 64            # the demo model's downsampling ratio
SPLIT_SIZE = 16384
# (key, samples): three 4096-sample files share a length (one bucket), the others have lengths of their own
FULL_FILES = [("a", 4096), ("b", 1000), ("c", 4096), ("d", 2000), ("e", 4096), ("f", 5000)]
SPLIT_FILES = [("long", 40000), ("short", 20000)]   # 3 + 2 windows of SPLIT_SIZE


def wav_members(files, seed: int) -> list[tuple[str, bytes]]:
    """Real audio (tones, chords, sweeps) of exactly n samples per file, at the model's rate."""
    rng = np.random.default_rng(seed)
    kinds = ("tone", "chord", "sweep")
    return [(f"{key}.wav", encode_audio_bytes(synth_waveform(kinds[i % 3], n / RATE, RATE, 2, rng), RATE, "wav"))
            for i, (key, n) in enumerate(files)]


def encode(demo_model, dataset, out, *extra):
    config, ckpt = demo_model
    return run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset, "--output-path", out,
                   "--batch-size", 4, "--num-workers", 1, "--no-progress", *extra)


def summary_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return lines[lines.index("wds-encode summary"):]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, demo_model):
    """One good tar (5 windows), a valid tar with no members and a zero-byte tar; encoded, then run again."""
    tmp = tmp_path_factory.mktemp("summary")
    write_tar(tmp / "in" / "good.tar", wav_members(SPLIT_FILES, seed=1))
    with tarfile.open(tmp / "in" / "empty.tar", "w"):
        pass
    (tmp / "in" / "zero.tar").write_bytes(b"")
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "d", "path": str(tmp / "in")}], random_crop=False)
    out = tmp / "out"
    first = encode(demo_model, dataset, out, "--chunking", "split", "--sample-size", SPLIT_SIZE)
    stats = json.loads((out / "details.json").read_text())["stats"]   # the rerun writes its own
    errors_before = (out / "errors.jsonl").stat().st_mtime_ns
    rerun = encode(demo_model, dataset, out, "--chunking", "split", "--sample-size", SPLIT_SIZE, "--progress")
    return out, first, rerun, errors_before, stats


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, demo_model):
    """--chunking full over files of 4 lengths (three share one), no bad sample."""
    tmp = tmp_path_factory.mktemp("summary-full")
    write_tar(tmp / "in" / "full.tar", wav_members(FULL_FILES, seed=2))
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "f", "path": str(tmp / "in")}], random_crop=False)
    out = tmp / "out"
    return out, encode(demo_model, dataset, out, "--chunking", "full")


def test_a_broken_unit_counts_only_as_broken_and_an_empty_tar_is_done_with_a_warning(mixed_run):
    out, first, _, _, stats = mixed_run
    assert first.returncode == 0, first.stderr
    lines = summary_lines(first.stdout)
    assert "  units      2 encoded, 0 already done, 1 broken (of 3)" in lines, first.stdout
    assert "  samples    2  windows written 5  rejected 0" in lines
    assert "  problems   1 errors, 1 warnings  (see errors.jsonl)" in lines
    assert f"  output     {out}" == lines[-1]
    problems = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert problems == [
        {"level": "warning", "shard": "d/empty", "url": str(out.parent / "in" / "empty.tar"), "key": None,
         "reason": "shard d/empty holds no samples"},
        {"level": "error", "shard": "d/zero", "url": str(out.parent / "in" / "zero.tar"), "key": "",
         "reason": "tar read failed: ReadError: empty file"}]
    assert (stats["units_encoded"], stats["units_failed"], stats["units_skipped"], stats["units_left"]) == (2, 1, 0, 0)
    assert stats["units_encoded"] + stats["units_failed"] + stats["units_skipped"] == stats["units_total"] == 3
    empty = json.loads((out / "manifest" / "done" / "d" / "empty.json").read_text())
    assert (empty["samples"], empty["windows"], empty["failed"], empty["warnings"], empty["errors"]) == \
        (0, 0, False, 1, 0)


def test_a_no_op_rerun_says_there_was_nothing_to_do(mixed_run):
    out, _, rerun, errors_before, _ = mixed_run
    assert rerun.returncode == 0, rerun.stderr
    assert summary_lines(rerun.stdout) == [
        "wds-encode summary",
        "  nothing to do: all 3 units were already done (use --overwrite to encode again)",
        f"  output     {out}"]
    assert "real-time factor" not in rerun.stdout
    assert "real time" not in rerun.stderr and "0 B of 0 B" not in rerun.stderr   # no empty progress line either
    # errors.jsonl already says what the records say: left as it is, not written again
    assert (out / "errors.jsonl").stat().st_mtime_ns == errors_before and \
        len((out / "errors.jsonl").read_text().splitlines()) == 2


def test_the_batches_line_says_how_full_the_batches_were(mixed_run):
    _, first, _, _, _ = mixed_run
    # 5 windows of one length: a full batch of 4, then the last one
    assert "  batches    2, 2.50 windows per batch on average (batch size 4)" in summary_lines(first.stdout)
    assert "slower" not in first.stdout   # fixed windows fill their batches


def test_full_chunking_says_how_few_windows_its_batches_held_and_why(full_run):
    out, result = full_run
    assert result.returncode == 0, result.stderr
    lines = summary_lines(result.stdout)
    # lengths rounded up to the ratio: 4096 x3 share a batch; 1024, 2048 and 5056 are a batch each
    lengths = sorted(-(-n // RATIO) * RATIO for _, n in FULL_FILES)
    assert len(set(lengths)) == 4
    assert "  samples    6  windows written 6  rejected 0" in lines
    assert "  batches    4, 1.50 windows per batch on average (batch size 4)" in lines, result.stdout
    slower = lines.index("  batches    4, 1.50 windows per batch on average (batch size 4)") + 1
    assert lines[slower:slower + 4] == [
        "  slower     --chunking full batches only windows of one length: each distinct length is its",
        "             own batch, so these held few windows. Where exact per-file latents are not",
        "             needed, --chunking split (or crop) pads windows to one size, fills every",
        "             batch and runs faster"]
    stats = json.loads((out / "details.json").read_text())["stats"]
    assert (stats["batches"], stats["batched_windows"], stats["windows_per_batch"]) == (4, 6, 1.5)
    assert stats["chunking"] == "full"


def test_errors_jsonl_is_there_and_empty_without_errors_and_every_reader_accepts_it(full_run):
    out, result = full_run
    assert result.returncode == 0, result.stderr
    assert "  problems   0 errors, 0 warnings" in result.stdout.splitlines()
    assert (out / "errors.jsonl").is_file() and (out / "errors.jsonl").read_bytes() == b""
    runner = CliRunner()
    status = runner.invoke(main, ["status", str(out), "--json"])
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["units"]["done"] == 1 and report["errors"] == 0 and report["windows"] == 6
    inspected = runner.invoke(main, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["total"]["windows"] == 6
    for form in ("folder", "shards"):
        windows = [md for _, metadata in latent_loader(str(out), 1, form=form, num_workers=0, shuffle=False)
                   for md in metadata]
        assert sorted(md["__key__"] for md in windows) == sorted(key for key, _ in FULL_FILES), form
    # verify reads the output and checks its windows (exit 2 would be "cannot be checked"; its verdict on
    # how recognisable this tiny model's decoded windows are is not what is tested here)
    verified = runner.invoke(main, ["verify", str(out), "-n", "2", "--device", "cpu"])
    assert verified.exit_code in (0, 1) and "error:" not in verified.output, verified.output
    assert sum(line.startswith("r0-") for line in verified.stdout.splitlines()) == 2, verified.output
