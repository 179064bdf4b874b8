"""What Stable Audio 3's training reads, written by the real `wds-encode` command on real FLAC audio:
`prompt` from `.txt` captions (tar members, sidecar files of an audio folder) in both output forms,
`silence.npy` and `filelist.txt` at the output root; then read back as SA3's and stable-audio-tools'
`PreEncodedDataset` read a folder (restated below), after an interrupted run and its rerun."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import (WDS_ENCODE, assert_exactly_once, golden_sa3, read_folder_layout, read_latent_shards,
                      run_cli, write_dataset_config, write_tar)
from s3_support import s3_env
from sa3_support import filelist, read_like_pre_encoded_datasets, sa3_latent_filenames
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace
from wds_encode.synth import encode_audio_bytes, folder_relpath, make_sample_set, write_audio_folder

SAMPLE_SIZE = 4096     # 64 latent frames of the demo model (44.1 kHz stereo, ratio 64, 16 channels)


def records(out) -> list[dict]:
    """Every committed unit record (`manifest/done/{unit}.json`; a journal entry alone is no commit)."""
    return RunManifest(LocalPlace(str(out))).records()


def committed_npys(out) -> set[str]:
    """The folder-layout windows the unit records list: what is committed."""
    return {f"{r['rank']}/{i}.npy" for r in records(out) for i in r.get("folder_ids", ())}


# ------------------------------------------------------------------------------------------------ inputs

def caption_shards(folder, shards: int = 3, per_shard: int = 4):
    """Tar shards of FLAC + JSON (`text`) samples, most with a `KEY.txt` caption, plus one sample whose
    caption is not UTF-8. Returns (the shards' folder, good samples, expected prompt by key)."""
    sets = make_sample_set(shards * per_shard, seed=21, formats=("flac",), min_seconds=0.05, max_seconds=0.2)
    prompts, samples = {}, []
    for s in range(shards):
        members = []
        for sample, data, metadata in sets[s * per_shard:(s + 1) * per_shard]:
            i = len(samples)
            members += [(f"{sample.key}.flac", data), (f"{sample.key}.json", json.dumps(metadata).encode())]
            if i % 4 == 1:
                prompts[sample.key] = metadata["text"]     # no caption file: KEY.json's text, as before
            else:
                caption = f"caption {i}: Été, 日本語" if i % 4 == 2 else f"caption {i}"
                members.append((f"{sample.key}.txt", f"\n  {caption}  \n".encode()))
                prompts[sample.key] = caption              # the .txt wins over KEY.json's text
            samples.append(sample)
        if s == 0:
            members += [("bad-caption.flac", sets[0][1]), ("bad-caption.txt", "légende".encode("latin-1"))]
        write_tar(folder / f"caps-{s:06d}.tar", members)
    return folder, samples, prompts


@pytest.fixture(scope="module")
def tar_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sa3-tars")
    folder, samples, prompts = caption_shards(tmp / "in")
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "caps", "path": str(folder)}], random_crop=False)
    return dataset, samples, prompts


def encode(demo_model, dataset, out, *extra, env=None):
    config, ckpt = demo_model
    args = [WDS_ENCODE, "--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset,
            "--output-path", out, "--sample-size", SAMPLE_SIZE, "--no-progress", "--num-workers", 0, *extra]
    return run_cli(*args[1:], env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def tar_run(tar_inputs, demo_model, tmp_path_factory):
    dataset, samples, prompts = tar_inputs
    out = tmp_path_factory.mktemp("sa3-tar-run") / "out"
    result = encode(demo_model, dataset, out, "--batch-size", 4)
    assert result.returncode == 0, result.stderr
    return out, samples, prompts


@pytest.fixture(scope="module")
def folder_inputs(tmp_path_factory):
    """An audio folder (nested) of FLAC files, every other one with a sidecar caption, plus `quiet.flac`:
    exactly SAMPLE_SIZE samples of digital silence at the model's rate and channels."""
    tmp = tmp_path_factory.mktemp("sa3-folder")
    root = tmp / "audio"
    samples = write_audio_folder(root, 6, seed=5, formats=("flac",), min_seconds=0.05, max_seconds=0.2)
    prompts = {}
    for index, sample in enumerate(samples):
        rel = folder_relpath(sample, index)
        if index % 2 == 0:
            (root / rel).with_suffix(".txt").write_text(f" sidecar of {sample.key} \n", encoding="utf-8")
            prompts[str(rel.with_suffix(""))] = f"sidecar of {sample.key}"
        else:
            prompts[str(rel.with_suffix(""))] = None
    (root / "quiet.flac").write_bytes(encode_audio_bytes(np.zeros((SAMPLE_SIZE, 2), np.float32), 44100, "flac"))
    (root / "quiet.txt").write_text("silence")
    prompts["quiet"] = "silence"
    dataset = write_dataset_config(tmp / "d.json", "audio_dir", [{"id": "dir", "path": str(root)}])
    return dataset, prompts


@pytest.fixture(scope="module")
def folder_run(folder_inputs, demo_model, tmp_path_factory):
    dataset, prompts = folder_inputs
    out = tmp_path_factory.mktemp("sa3-folder-run") / "out"
    result = encode(demo_model, dataset, out, "--batch-size", 3, "--latent-mode", "mean", "--files-per-unit", 4)
    assert result.returncode == 0, result.stderr
    return out, prompts


@pytest.fixture(scope="module")
def demo_autoencoder(demo_model):
    from wds_encode.config import load_model_config
    from wds_encode.models import load_autoencoder
    return load_autoencoder(load_model_config(demo_model[0]), demo_model[1])


# ------------------------------------------------------------------------------------------------ tests

def test_txt_members_are_the_prompt_in_both_output_forms(tar_run):
    out, samples, prompts = tar_run
    assert_exactly_once(out, samples)  # folder and shards alike, the sample with a broken caption left out
    for form in (read_folder_layout(out), read_latent_shards(out)):
        assert {md["__key__"]: md["prompt"] for _, md in form.values()} == prompts
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["level"], e["shard"], e["key"]) for e in errors] == [("error", "caps/caps-000000", "bad-caption")]
    assert "caption bad-caption.txt is not valid UTF-8" in errors[0]["reason"]


def test_sidecar_txt_files_are_the_prompt_in_both_output_forms(folder_run):
    out, prompts = folder_run
    for form in (read_folder_layout(out), read_latent_shards(out)):
        assert {md["__key__"]: md.get("prompt") for _, md in form.values()} == prompts
    assert not (out / "errors.jsonl").exists() or not (out / "errors.jsonl").read_text()


def test_silence_npy_is_the_latents_of_sample_size_samples_of_silence(tar_run, folder_run, demo_autoencoder):
    from wds_encode.pipeline.encoder import key_seed
    model = demo_autoencoder
    zeros = torch.zeros(1, model.in_channels, SAMPLE_SIZE)
    shape = (1, model.latent_dim, SAMPLE_SIZE // model.downsampling_ratio)
    # --latent-mode mean: the latents of the run's own window of digital silence (quiet.flac), and the model's
    silence = np.load(folder_run[0] / "silence.npy")
    assert silence.shape == shape and silence.dtype == np.float32
    quiet = next(lat for lat, md in read_folder_layout(folder_run[0]).values() if md["__key__"] == "quiet")
    np.testing.assert_allclose(silence[0], quiet, atol=1e-5, rtol=0)
    np.testing.assert_allclose(silence, model.encode(zeros, mode="mean").numpy(), atol=1e-5, rtol=0)
    # --latent-mode sample (the default): sampled as the windows are, noise seeded by (seed 0, "silence")
    sampled = np.load(tar_run[0] / "silence.npy")
    pre = model.encode_pre_bottleneck(zeros)
    noise = torch.randn(model.bottleneck.noise_shape(pre), generator=torch.Generator().manual_seed(key_seed(0, "silence")))
    assert sampled.shape == shape and sampled.dtype == np.float32
    np.testing.assert_allclose(sampled, model.bottleneck.encode(pre, mode="sample", noise=noise).numpy(), atol=1e-5)
    assert np.abs(sampled - silence).max() > 1e-3


def test_full_mode_silence_is_at_most_the_longest_window_in_the_output_dtype(folder_inputs, demo_model, tmp_path):
    dataset, prompts = folder_inputs
    out = tmp_path / "out"
    # the default --sample-size (30 s) is longer than the --max-seconds window: silence takes the window's length
    result = encode(demo_model, dataset, out, "--chunking", "full", "--max-seconds", 0.1, "--latent-dtype",
                    "float16", "--batch-size", 2, "--sample-size", 1320960)
    assert result.returncode == 0, result.stderr
    silence = np.load(out / "silence.npy")
    assert silence.shape == (1, 16, int(0.1 * 44100) // 64) and silence.dtype == np.float16
    assert filelist(out) == sorted(committed_npys(out)) and len(filelist(out)) > len(prompts)  # some split
    assert {md["__key__"] for md in read_like_pre_encoded_datasets(out, latent_crop_length=90)} == set(prompts)


def test_filelist_lists_exactly_the_committed_windows(tar_run, folder_run):
    for out in (tar_run[0], folder_run[0]):
        on_disk = {str(p.relative_to(out)) for p in out.glob("[0-9]*/*.npy")}
        assert filelist(out) == sorted(committed_npys(out)) == sorted(on_disk)
        infos = read_like_pre_encoded_datasets(out)
        names = [info["latent_filename"] for info in infos]
        assert len(names) == len(set(names)) == len(on_disk)
        assert {os.path.relpath(n, out) for n in names} == on_disk
    # what they read is what the run wrote: captions included
    out, _, prompts = tar_run
    assert {info["__key__"]: info["prompt"] for info in read_like_pre_encoded_datasets(out)} == prompts


def test_status_inspect_and_verify_ignore_the_root_files(tar_run, demo_model):
    from wds_encode.tools import verify
    from wds_encode.config import load_model_config
    from wds_encode.tools.inspect import inspect_output
    from wds_encode.models import load_autoencoder
    from wds_encode.tools.status import output_status
    from wds_encode.storage import LocalPlace
    out = tar_run[0]
    place = LocalPlace(str(out))
    status = output_status(place)
    assert status["state"] == "complete" and status["windows"] == len(filelist(out))
    report = inspect_output(place).report
    assert report["state"] == "complete" and report["sampling"]["windows_read"] == len(filelist(out))
    assert not report["problems"] and report["latent"]["shape"] == [16, SAMPLE_SIZE // 64]
    assert verify.pick_windows(place, n=1000) == filelist(out)  # every window, and nothing else
    model = load_autoencoder(load_model_config(demo_model[0]), demo_model[1], with_decoder=True)
    checks = verify.verify_output(place, model, details=verify.load_details(place), n=3)
    assert len(checks) == 3 and not verify.verdict(checks)


KILL_AT_RECORD = '''
import os
import signal

from wds_encode.pipeline import manifest


def write_record(self, record):  # the unit's outputs are published: die before its record says so
    os.kill(os.getpid(), signal.SIGKILL)


manifest.RunManifest.write_record = write_record
'''


@pytest.mark.slow
@pytest.mark.parametrize("model", ["demo", "same_tiny_shift"])
def test_an_interrupted_run_and_its_rerun_are_read_exactly_once_through_the_filelist(tar_inputs, demo_model,
                                                                                      model, tmp_path):
    """With the bundled VAE, and with a Stable Audio 3 SAME model (what SA3's LoRA training reads)."""
    if model != "demo":
        demo_model = (golden_sa3(model) / "model_config.json", golden_sa3(model) / "model.safetensors")
    dataset, samples, prompts = tar_inputs
    out = tmp_path / "out"
    first = encode(demo_model, dataset, out, "--batch-size", 4, "--limit-batches", 1)  # one unit, committed
    assert first.returncode == 0, first.stderr
    assert len(records(out)) == 1 and filelist(out) == sorted(committed_npys(out))
    silence_written = (out / "silence.npy").stat().st_mtime_ns

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_AT_RECORD)
    killed = encode(demo_model, dataset, out, "--batch-size", 4,
                    env={**os.environ, "PYTHONPATH": str(inject)})
    assert killed.returncode != 0
    # the killed run published a unit's windows without its record: uncommitted files a scan would read...
    committed = committed_npys(out)
    on_disk = {str(p.relative_to(out)) for p in out.glob("[0-9]*/*.npy")}
    assert len(records(out)) == 1 and len(on_disk - committed) == 4
    scanned = {os.path.relpath(npy, out) for npy, _ in sa3_latent_filenames(str(out), filelist_path="/none")}
    assert scanned == on_disk
    # ...but the filelist names the committed windows only, for both readers
    infos = read_like_pre_encoded_datasets(out)
    assert sorted(os.path.relpath(i["latent_filename"], out) for i in infos) == sorted(committed)

    rerun = encode(demo_model, dataset, out, "--batch-size", 4)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 already done" in rerun.stdout
    assert_exactly_once(out, samples)
    infos = read_like_pre_encoded_datasets(out)
    names = [os.path.relpath(i["latent_filename"], out) for i in infos]
    assert len(names) == len(set(names)) and set(names) == committed_npys(out)          # no duplicate, none missing
    assert sorted(i["__key__"] for i in infos) == sorted(s.key for s in samples)        # every sample once
    assert {i["__key__"]: i["prompt"] for i in infos} == prompts
    assert (out / "silence.npy").stat().st_mtime_ns == silence_written  # kept, not encoded again


def test_an_s3_output_gets_silence_and_filelist_through_the_storage_layer(tar_inputs, demo_model, s3, tmp_path):
    dataset, samples, prompts = tar_inputs
    s3.make_bucket("latents")
    result = encode(demo_model, dataset, "s3://latents/sa3/", "--batch-size", 4, env=s3_env(s3.endpoint))
    assert result.returncode == 0, result.stderr
    local = tmp_path / "mirror"
    for key in s3.keys("latents", "sa3/"):
        path = local / key[len("sa3/"):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s3.get("latents", key))
    assert np.load(local / "silence.npy").shape == (1, 16, SAMPLE_SIZE // 64)
    assert filelist(local) == sorted(committed_npys(local))
    infos = read_like_pre_encoded_datasets(local)
    assert {i["__key__"]: i["prompt"] for i in infos} == prompts and len(infos) == len(samples)
