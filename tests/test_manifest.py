"""manifest.py: run identity, refusal to mix runs, per-unit records, the error log."""

import json

import pytest

from wds_encode.manifest import IDENTITY_OPTIONS, ManifestError, RunManifest, run_identity

OPTIONS = {k: None for k in IDENTITY_OPTIONS} | {"sample_size": 1024, "latent_mode": "sample", "seed": 0}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "w.ckpt"
    path.write_bytes(b"weights-1")
    return path


def test_identity_changes_with_weights_config_and_options(tmp_path, ckpt):
    base = run_identity({"a": 1}, ckpt, OPTIONS, True)
    assert base == run_identity({"a": 1}, ckpt, dict(OPTIONS), True)
    assert base["hash"] != run_identity({"a": 2}, ckpt, OPTIONS, True)["hash"]
    assert base["hash"] != run_identity({"a": 1}, ckpt, {**OPTIONS, "sample_size": 2048}, True)["hash"]
    assert base["hash"] != run_identity({"a": 1}, ckpt, OPTIONS, False)["hash"]
    other = tmp_path / "w2.ckpt"
    other.write_bytes(b"weights-2")
    assert base["hash"] != run_identity({"a": 1}, other, OPTIONS, True)["hash"]


def test_resume_skips_done_units_and_refuses_another_model(tmp_path, ckpt):
    out = tmp_path / "out"
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(out)
    assert manifest.prepare(ident, overwrite=False) == set()
    manifest.write_details({"run_identity": ident})
    manifest.write_record({"shard": "ds/a", "samples": 3})
    manifest.write_record({"shard": "ds/b", "samples": 3})
    (out / "manifest" / "ds__c.json").write_text("{broken")
    assert RunManifest(out).prepare(ident, overwrite=False) == {"ds/a", "ds/b"}

    changed = run_identity({"a": 1}, ckpt, {**OPTIONS, "latent_mode": "mean"}, True)
    with pytest.raises(ManifestError, match="options.latent_mode"):
        RunManifest(out).prepare(changed, overwrite=False)
    assert RunManifest(out).prepare(changed, overwrite=True) == set()
    assert RunManifest(out).done_ids() == set()


def test_error_log_appends_json_lines(tmp_path):
    manifest = RunManifest(tmp_path)
    manifest.append_errors([{"level": "error", "key": "a"}])
    manifest.append_errors([])
    manifest.append_errors([{"level": "warning", "key": "b"}, {"level": "error", "key": "c"}])
    lines = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == ["a", "b", "c"]


def test_overwrite_removes_earlier_outputs_only(tmp_path, ckpt):
    out = tmp_path / "out"
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(out)
    manifest.prepare(ident, overwrite=False)
    manifest.write_details({"run_identity": ident})
    manifest.write_record({"shard": "ds/a"})
    manifest.append_errors([{"level": "error"}])
    (out / "0").mkdir()
    for name in ("0000000000000.npy", "0000000000000.json", "0000000010000.npy.partial", "notes.txt"):
        (out / "0" / name).write_text("x")
    (out / "shards" / "ds").mkdir(parents=True)
    (out / "shards" / "ds" / "a-000.tar").write_text("x")
    (out / "mine.txt").write_text("keep")
    assert RunManifest(out).prepare(ident, overwrite=True) == set()
    assert sorted(p.name for p in (out / "0").iterdir()) == ["notes.txt"]
    assert not (out / "shards").exists() and not (out / "errors.jsonl").exists()
    assert (out / "mine.txt").read_text() == "keep" and (out / "details.json").exists()


def test_an_interrupted_commit_is_rolled_back(tmp_path, ckpt):
    out = tmp_path / "out"
    ident = run_identity({"a": 1}, ckpt, OPTIONS, True)
    manifest = RunManifest(out)
    manifest.prepare(ident, overwrite=False)
    done_file, half_file, kept = out / "0" / "1.npy", out / "0" / "2.npy", out / "0" / "3.npy"
    done_file.parent.mkdir(parents=True)
    for f in (done_file, half_file, kept):
        f.write_text("x")
    finished = manifest.begin_commit("ds/done", [done_file])
    manifest.write_record({"shard": "ds/done"})  # died before removing the journal: the unit is done
    manifest.begin_commit("ds/half", [half_file, out / "shards" / "ds" / "half-000.tar"])  # died mid-commit
    assert finished.exists()
    assert RunManifest(out).prepare(ident, overwrite=False) == {"ds/done"}
    assert done_file.exists() and kept.exists() and not half_file.exists()
    assert not list((out / "manifest" / "commits").glob("*.json"))
