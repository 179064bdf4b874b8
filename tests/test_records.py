"""records.py: the unit record's one definition, its outputs and its parsing."""

import json

from wds_encode.pipeline.records import output_files, parse_record, unit_record, window_paths

W = "r3-g2-a1b2c3"


def record(**kw):
    return unit_record(**{"shard": "ds/a", "url": "/in/a.tar", "rank": 3, "part": "", "worker": 0, "samples": 2,
                          "windows": 2, "rejected": 0, "filtered": 0, "audio_seconds": 1.5, "input_bytes": 10, "failed": False,
                          "folder_ids": [f"{W}-000001-0000", f"{W}-000000-0001"],
                          "latent_shards": [f"shards/ds/a.{W}-000.tar"], "problems": [], **kw})


def test_a_record_counts_its_problems_by_level():
    made = record(problems=[{"level": "error", "key": "x"}, {"level": "warning", "key": "y"}, {"level": "error"}])
    assert (made["errors"], made["warnings"]) == (2, 1)


def test_a_record_names_its_windows_and_tars_relative_to_the_output():
    made = record()
    assert made["folder_ids"] == [f"{W}-000000-0001", f"{W}-000001-0000"]       # sorted
    assert window_paths(made) == [f"3/{W}-000000-0001.npy", f"3/{W}-000001-0000.npy"]
    assert output_files(made) == [f"3/{W}-000000-0001.json", f"3/{W}-000000-0001.npy",
                                  f"3/{W}-000001-0000.json", f"3/{W}-000001-0000.npy", f"shards/ds/a.{W}-000.tar"]
    assert window_paths(record(folder_ids=[])) == [] and output_files(record(folder_ids=[], latent_shards=[])) == []


def test_parse_record_takes_records_only():
    made = record()
    assert parse_record(json.dumps(made).encode()) == made
    assert parse_record(b"{broken") is None and parse_record(None) is None
    assert parse_record(b'{"covers": {}}') is None and parse_record(b"[1]") is None and parse_record(b"\xff") is None
    older = {"shard": "ds/b", "rank": 0, "folder_ids": ["0000000010000"]}   # an older version's record
    assert window_paths(parse_record(json.dumps(older).encode())) == ["0/0000000010000.npy"]
