"""models/pretrained.py and --pretrained-name: folders and the Hugging Face cache, no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_dataset_config
from wds_encode.models import ModelConfigError
from wds_encode.models.pretrained import hf_cache_dir, resolve_pretrained


def fake_hf_cache(root, repo_id, demo_model, revision="0123abcd", names=("model_config.json", "model.safetensors")):
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.copy(demo_model[0], snapshot / names[0])
    shutil.copy(demo_model[1], snapshot / names[1])
    return snapshot


def test_folder_and_vae_pair_preference(tmp_path, demo_model):
    shutil.copy(demo_model[0], tmp_path / "model_config.json")
    shutil.copy(demo_model[1], tmp_path / "model.safetensors")
    assert resolve_pretrained(str(tmp_path)) == (tmp_path / "model_config.json", tmp_path / "model.safetensors")
    shutil.copy(demo_model[0], tmp_path / "vae_config.json")
    shutil.copy(demo_model[1], tmp_path / "vae_model.ckpt")
    assert resolve_pretrained(str(tmp_path)) == (tmp_path / "vae_config.json", tmp_path / "vae_model.ckpt")


def test_hugging_face_cache_layout(tmp_path, demo_model, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hf_cache_dir() == tmp_path / "hub"
    snapshot = fake_hf_cache(tmp_path, "someone/tiny-vae", demo_model)
    fake_hf_cache(tmp_path / "other", "someone/tiny-vae", demo_model, revision="ffff")  # not the cache in use
    assert resolve_pretrained("someone/tiny-vae") == (snapshot / "model_config.json", snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other" / "hub"))
    assert resolve_pretrained("someone/tiny-vae")[0].parent.name == "ffff"


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelConfigError) as err:
        resolve_pretrained("stabilityai/not-here")
    msg = str(err.value)
    assert str(tmp_path / "hub") in msg and "models--stabilityai--not-here" in msg
    assert "huggingface-cli download stabilityai/not-here" in msg and "--allow-download" in msg


def test_command_with_pretrained_name(tmp_path, demo_model, mixed_shards):
    fake_hf_cache(tmp_path / "hf", "someone/tiny-vae", demo_model)
    folder, _, _ = mixed_shards
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    cmd = [str(Path(sys.executable).with_name("wds-encode")), "--pretrained-name", "someone/tiny-vae",
           "--dataset-config", str(dataset), "--output-path", str(tmp_path / "out"), "--sample-size", "4096",
           "--num-workers", "0", "--batch-size", "20", "--limit-batches", "1", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["args"]["pretrained_name"] == "someone/tiny-vae"
    missing = run_cli("--pretrained-name", str(tmp_path / "nothing"), "--dataset-config", dataset,
                      "--output-path", tmp_path / "o2")
    assert missing.returncode == 2 and "no model found" in missing.stderr
