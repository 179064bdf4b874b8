"""status.py: `wds-encode status OUT` reports what the run's own records say, while it runs and after."""

from __future__ import annotations

import json

from conftest import run_cli, write_dataset_config
from wds_encode.pipeline.manifest import RankLog, RunManifest
from wds_encode.pipeline.writers import new_writer_id
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
    record = {"shard": "d/a", "samples": 2, "windows": 3, "audio_seconds": 7200.0, "errors": 1, "warnings": 2,
              "failed": True}
    written = manifest.write_record(record)
    assert written == {"rank": 0, **record, "finished_at": written["finished_at"]}
    assert manifest.write_record({**record, "samples": 99}) is None     # committed already: not again
    manifest.start_writing(new_writer_id(3, 1), 3)
    status = output_status(place)
    assert status["state"].startswith("writing") and status["ranks_writing"] == [3]
    assert status["units"] == {"total": 4, "done": 1, "failed": 1, "remaining": 3}
    assert status["audio_hours"] == 2.0 and status["errors"] == 1 and status["warnings"] == 2
    assert "writing    ranks 3" in format_status(status)
    result = run_cli("status", tmp_path / "nothing")
    assert result.returncode == 2 and "no details.json" in result.stderr


def test_an_array_job_is_reported_whole_and_per_part(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    manifest = RunManifest(place)
    manifest.write_details({"plan": {"units_total": 6}, "parts": 3})
    for part, units in ((0, 2), (1, 2)):   # part 2 never started
        place.write(f"manifest/parts/part-{part}-of-3.json", json.dumps({"part": f"{part}/3", "units": units,
                                                                        "host": f"node{part}"}).encode())
    for rank, shard in ((0, "d/a"), (0, "d/b"), (1, "d/c"), (4, "d/d")):   # rank 4 is part 1's second rank
        assert manifest.write_record({"shard": shard, "rank": rank, "samples": 1, "windows": 1})["shard"] == shard
    RankLog(manifest, new_writer_id(4, 1), 4, part="1/3")       # part 1 is still writing
    status = output_status(place)
    assert status["units"]["done"] == 4 and status["state"].startswith("writing")
    assert status["parts"] == [
        {"part": "0/3", "units": {"total": 2, "done": 2}, "state": "complete", "host": "node0", "finished_at": None},
        {"part": "1/3", "units": {"total": 2, "done": 2}, "state": status["parts"][1]["state"], "host": "node1",
         "finished_at": None},
        {"part": "2/3", "units": {"total": None, "done": 0}, "state": "not started", "host": None, "finished_at": None}]
    assert status["parts"][1]["state"].startswith("writing")
    text = format_status(status)
    assert "part 0/3   2 of 2 units, complete" in text and "part 2/3   0 of ? units, not started" in text


def test_a_unit_committed_by_two_writers_counts_once_while_they_write_and_after(tmp_path):
    """A retry racing its original commits the same unit: the first record stands, the second commit is
    refused, and status counts the unit once, from the writers' journals while they write and from the
    index once they are done."""
    place = LocalPlace(str(tmp_path / "out"))
    manifest = RunManifest(place)
    manifest.write_details({"plan": {"units_total": 3}})
    first = RankLog(manifest, new_writer_id(0, 1), 0, index_every=3600)
    second = RankLog(manifest, new_writer_id(0, 2), 0, index_every=3600)
    assert first.commit({"shard": "d/a", "samples": 2, "windows": 2}) is True
    assert second.commit({"shard": "d/a", "samples": 5, "windows": 5}) is False
    assert second.commit({"shard": "d/b", "samples": 1, "windows": 1}) is True
    assert second.refused == 1
    status = output_status(place)
    assert status["state"].startswith("writing") and status["ranks_writing"] == [0, 0]
    assert status["units"] == {"total": 3, "done": 2, "failed": 0, "remaining": 1}
    assert status["samples"] == 3 and status["windows"] == 3
    assert manifest.read_record("d/a")["writer"] == first.writer
    first.close()
    second.close()
    status = output_status(place)
    assert status["ranks_writing"] == [] and status["state"].startswith("incomplete")
    assert status["units"]["done"] == 2 and status["samples"] == 3
