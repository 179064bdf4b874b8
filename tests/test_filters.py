"""--min-duration, --max-duration and --skip-silent through the real command: the files they skip are
not encoded, are counted as filtered in the summary and the unit records, and are listed in errors.jsonl
at level `rejected` with the reason; they are neither errors nor warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_folder_layout, read_latent_shards, run_cli, write_dataset_config, write_tar
from wds_encode.synth import encode_audio_bytes, synth_waveform

RATE = 44100


def chord(seconds: float, level: float = 1.0) -> np.ndarray:
    return synth_waveform("chord", seconds, RATE, 2, np.random.default_rng(3)) * level


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """short 0.3 s, mid 1 s, long 3 s, quiet (1 s at about -75 dBFS), silent (1 s of zeros)."""
    tmp = tmp_path_factory.mktemp("filters")
    clips = {"short": chord(0.3), "mid": chord(1.0), "long": chord(3.0), "quiet": chord(1.0, 10 ** (-70 / 20)),
             "silent": np.zeros((RATE, 2), np.float32)}
    write_tar(tmp / "in" / "f-000000.tar", [(f"{k}.wav", encode_audio_bytes(v, RATE, "wav")) for k, v in clips.items()])
    return write_dataset_config(tmp / "d.json", "wds", [{"id": "f", "path": str(tmp / "in")}])


def encode(demo_model, dataset, out, *extra):
    result = run_cli("--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
                     "--output-path", out, "--num-workers", 0, "--sample-size", 8192, "--no-progress", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def rejections(out) -> dict[str, str]:
    lines = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert all(line["level"] == "rejected" for line in lines), lines
    return {line["key"]: line["reason"] for line in lines}


def written(out) -> set[str]:
    keys = {md["key"] for _, md in read_folder_layout(out).values()}
    assert keys == {md["key"] for _, md in read_latent_shards(out).values()}
    return keys


def test_durations_outside_the_limits_are_skipped(demo_model, dataset, tmp_path):
    out = tmp_path / "out"
    result = encode(demo_model, dataset, out, "--min-duration", "0.5", "--max-duration", "2")
    assert written(out) == {"mid", "quiet", "silent"}
    reasons = rejections(out)
    assert reasons.keys() == {"short", "long"}
    assert reasons["short"] == "short.wav: 0.300 s long, under --min-duration 0.5 s"
    assert reasons["long"] == "long.wav: 3.000 s long, over --max-duration 2 s"
    assert "filtered 2 (files skipped by --min-duration, --max-duration or --skip-silent" in result.stdout
    assert "0 errors, 0 warnings" in result.stdout
    [record] = [json.loads(p.read_text()) for p in (out / "manifest" / "done").rglob("*.json")]
    assert record["filtered"] == 2 and record["errors"] == record["warnings"] == 0 and record["samples"] == 5


def test_files_whose_loudest_window_is_under_the_level_are_skipped(demo_model, dataset, tmp_path):
    out = tmp_path / "out"
    result = encode(demo_model, dataset, out, "--skip-silent", "-60", "--chunking", "split")
    windows = {name: -(-round(seconds * RATE) // 8192) for name, seconds in (("short", 0.3), ("mid", 1), ("long", 3))}
    assert written(out) == {f"{name}_{i:04d}" for name, n in windows.items() for i in range(n)}
    reasons = rejections(out)
    assert reasons.keys() == {"quiet", "silent"}
    assert reasons["silent"] == "silent.wav: silent: its loudest window is -inf dBFS, under --skip-silent -60 dBFS"
    level = float(reasons["quiet"].split("loudest window is ")[1].split(" dBFS")[0])
    quiet = chord(1.0, 10 ** (-70 / 20))
    assert abs(level - 10 * np.log10(np.mean(quiet ** 2))) < 1.5   # its windows' level, 16-bit rounding aside
    assert "filtered 2" in result.stdout


def test_limits_that_leave_no_file_are_refused(demo_model, dataset, tmp_path):
    result = run_cli("--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
                     "--output-path", tmp_path / "out", "--min-duration", "5", "--max-duration", "2")
    assert result.returncode == 2
    assert "--min-duration 5 is over --max-duration 2: every file would be skipped" in result.stderr
    assert "Traceback" not in result.stderr
