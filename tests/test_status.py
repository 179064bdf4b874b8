"""status.py: `wds-encode status OUT` reports what the run's own records say, while it runs and after."""

from __future__ import annotations

import json

from conftest import run_cli, write_dataset_config
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.tools.status import format_status, output_status
from wds_encode.storage import LocalPlace


def test_a_partial_then_complete_run(mixed_shards, demo_model, tmp_path):
    folder, _, samples = mixed_shards
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    config, ckpt = demo_model
    args = ["--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset, "--output-path",
            tmp_path / "out", "--sample-size", 8192, "--no-progress", "--num-workers", 0, "--batch-size", 4]
    assert run_cli(*args, "--limit-batches", 6).returncode == 0
    partial = json.loads(run_cli("status", tmp_path / "out", "--json").stdout)
    assert partial["state"].startswith("incomplete")
    assert partial["units"]["total"] == 3 and 1 <= partial["units"]["done"] < 3
    assert partial["units"]["remaining"] == 3 - partial["units"]["done"]

    assert run_cli(*args).returncode == 0
    result = run_cli("status", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "state      complete" in result.stdout and "3 done (0 broken), 0 remaining, of 3" in result.stdout
    status = json.loads(run_cli("status", tmp_path / "out", "--json").stdout)
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert status["samples"] == len(samples) == details["stats"]["samples"] + partial["samples"]
    assert status["windows"] == len(list((tmp_path / "out").glob("[0-9]*/*.npy")))
    assert status["errors"] == 0 and status["ranks_writing"] == []


def test_a_rank_writing_shows_and_an_empty_folder_is_not_an_output(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    manifest = RunManifest(place)
    manifest.write_details({"plan": {"units_total": 4}})
    manifest.write_record({"shard": "d/a", "samples": 2, "windows": 3, "audio_seconds": 7200.0, "errors": 1,
                           "warnings": 2, "failed": True})
    manifest.start_writing(3, first_batch=0)
    status = output_status(place)
    assert status["state"].startswith("writing") and status["ranks_writing"] == [3]
    assert status["units"] == {"total": 4, "done": 1, "failed": 1, "remaining": 3}
    assert status["audio_hours"] == 2.0 and status["errors"] == 1 and status["warnings"] == 2
    assert "writing    ranks 3" in format_status(status)
    result = run_cli("status", tmp_path / "nothing")
    assert result.returncode == 2 and "no details.json" in result.stderr
