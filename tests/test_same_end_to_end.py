"""Stable Audio 3's SAME models through the real `wds-encode` command: a tar shard dataset with `.txt`
captions and an audio folder with sidecar captions, both output forms, what SA3's training reads
(`prompt`, `silence.npy`, `filelist.txt`), every window equal to the model's encode of its file alone,
SAME's extra chunk frame marked as padding, verify / inspect / the loader on the result, and low
precision through the precision check. (The interrupted-run case: tests/test_sa3_outputs.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (golden_sa3, read_folder_layout, read_latent_shards, run_cli,
                      write_dataset_config, write_tar)
from sa3_support import committed_npys, filelist, read_like_pre_encoded_datasets, sa3_silence
from wds_encode.config import load_model_config
from wds_encode.loader import latent_loader
from wds_encode.models import load_autoencoder
from wds_encode.synth import encode_audio_bytes, folder_relpath, make_sample_set, write_audio_folder
from wds_encode.tools.verify import source_window

CODEC = Path(__file__).resolve().parent / "assets" / "same_codec"   # a SAME model that round-trips
ODD_SAMPLES = 1035     # pads to 33 frames of the shift model (ratio 32); SAME returns 34, as SA3 does


def shift_model() -> tuple[Path, Path]:
    folder = golden_sa3("same_tiny_shift")
    return folder / "model_config.json", folder / "model.safetensors"


def encode(model: tuple[Path, Path], dataset: Path, out: Path, *extra) -> None:
    result = run_cli("--model-config", model[0], "--ckpt-path", model[1], "--dataset-config", dataset,
                     "--output-path", out, "--num-workers", 1, "--devices", 1, "--no-progress", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def caption_tars(tmp_path_factory):
    """Two tar shards of FLAC at mixed rates and channels, each sample with a `KEY.txt` caption, plus a
    stereo 44.1 kHz file of exactly ODD_SAMPLES samples."""
    tmp = tmp_path_factory.mktemp("same-tars")
    sets = make_sample_set(6, seed=31, formats=("flac",), min_seconds=0.05, max_seconds=0.3)
    prompts = {}
    for s in range(2):
        members = []
        for sample, data, metadata in sets[3 * s:3 * s + 3]:
            members += [(f"{sample.key}.flac", data), (f"{sample.key}.json", json.dumps(metadata).encode()),
                        (f"{sample.key}.txt", f"a caption of {sample.key}\n".encode())]
            prompts[sample.key] = f"a caption of {sample.key}"
        if s == 1:
            odd = np.random.default_rng(3).uniform(-0.5, 0.5, (ODD_SAMPLES, 2)).astype(np.float32)
            members += [("odd.flac", encode_audio_bytes(odd, 44100, "flac")), ("odd.txt", b"odd length")]
            prompts["odd"] = "odd length"
        write_tar(tmp / "in" / f"caps-{s:06d}.tar", members)
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "caps", "path": str(tmp / "in")}],
                                   random_crop=False)
    return dataset, prompts


@pytest.fixture(scope="module")
def full_runs(caption_tars, tmp_path_factory):
    """The shift model in `--chunking full`, at batch size 4 and at batch size 1."""
    dataset, prompts = caption_tars
    tmp = tmp_path_factory.mktemp("same-full")
    encode(shift_model(), dataset, tmp / "b4", "--chunking", "full", "--batch-size", 4)
    encode(shift_model(), dataset, tmp / "b1", "--chunking", "full", "--batch-size", 1)
    return tmp / "b4", tmp / "b1", prompts


@pytest.fixture(scope="module")
def shift_autoencoder():
    config, ckpt = shift_model()
    return load_autoencoder(load_model_config(config), ckpt)


def test_every_window_is_the_models_encode_of_its_file_alone(full_runs, shift_autoencoder):
    batched, alone, _ = full_runs
    model = shift_autoencoder
    stored = read_folder_layout(batched)
    assert stored.keys() == read_folder_layout(alone).keys()
    for key, (latent, md) in stored.items():
        size = -(-md["valid_length"] // model.downsampling_ratio) * model.downsampling_ratio
        window, _ = source_window(md, 2, 44100, size)          # decoded and resampled as the run did
        expected = model.encode(window[None], mode="mean")[0].numpy()
        assert latent.shape == expected.shape == (8, model.latent_length(size)), key
        assert np.abs(latent - expected).max() < 1e-4, key
        other = read_folder_layout(alone)[key][0]
        assert np.abs(latent - other).max() <= 1e-5 * max(1.0, float(np.abs(other).max())), key


def test_the_odd_file_gets_sa3s_34_frames_and_a_mask_of_33_real_ones(full_runs):
    for out in full_runs[:2]:
        (latent, md), = [v for v in read_folder_layout(out).values() if v[1]["__key__"] == "odd"]
        assert md["valid_length"] == ODD_SAMPLES and latent.shape == (8, 34)
        assert md["latent_length"] == 34 and md["padding_mask"] == [1] * 33 + [0]
        assert md["valid_latent_length"] == 33


def test_both_output_forms_hold_the_captions_silence_and_filelist(full_runs, caption_tars, shift_autoencoder):
    out, _, prompts = full_runs
    folder, shards = read_folder_layout(out), read_latent_shards(out)
    assert folder.keys() == shards.keys() and len(folder) == len(prompts)
    for key, (latent, md) in folder.items():
        assert np.array_equal(latent, shards[key][0]) and md == shards[key][1]
        assert md["prompt"] == prompts[md["__key__"]]
    silence = np.load(out / "silence.npy")
    assert silence.ndim == 3 and silence.shape[:2] == (1, 8) and silence.dtype == np.float32
    samples = silence.shape[-1] * 32
    expected = shift_autoencoder.encode(torch.zeros(1, 2, samples), mode="mean").numpy()
    np.testing.assert_allclose(silence, expected, atol=1e-4, rtol=0)
    assert filelist(out) == sorted(committed_npys(out)) == sorted(str(p.relative_to(out)) for p in out.glob("0/*.npy"))
    infos = read_like_pre_encoded_datasets(out, latent_crop_length=40)   # crops the long, pads the short
    assert sorted(i["__key__"] for i in infos) == sorted(prompts)
    assert {i["__key__"]: i["prompt"] for i in infos} == prompts
    assert sa3_silence(str(out)).shape == silence.shape[1:]


def test_inspect_and_the_loader_read_it(full_runs):
    out = full_runs[0]
    result = run_cli("inspect", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    stored = read_folder_layout(out)
    frames = sum(latent.shape[-1] for latent, _ in stored.values())
    real = sum(sum(md["padding_mask"]) for _, md in stored.values())
    assert report["state"] == "complete" and not report["problems"]
    assert report["total"]["windows"] == len(stored) and report["latent"]["channels"] == 8
    assert (report["latent"]["frames"], report["latent"]["unpadded_frames"]) == (frames, real) and real < frames
    values = np.concatenate([latent[:, np.array(md["padding_mask"], bool)] for latent, md in stored.values()], 1)
    assert report["global"]["std"] == pytest.approx(float(values.std()), rel=1e-4)   # over the real frames only
    for form in ("shards", "folder"):
        seen = []
        for latents, metadata in latent_loader(str(out), 2, form=form, num_workers=0, shuffle=False):
            assert latents.shape[1] == 8
            seen += [md["__key__"] for md in metadata]
        assert sorted(seen) == sorted(md["__key__"] for _, md in read_folder_layout(out).values()), form


@pytest.fixture(scope="module")
def sidecar_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("same-folder")
    root = tmp / "audio"
    samples = write_audio_folder(root, 5, seed=8, formats=("flac", "wav"), min_seconds=0.4, max_seconds=1.2)
    prompts = {}
    for index, sample in enumerate(samples):
        rel = folder_relpath(sample, index)
        (root / rel).with_suffix(".txt").write_text(f"sidecar {index}", encoding="utf-8")
        prompts[str(rel.with_suffix(""))] = f"sidecar {index}"
    return write_dataset_config(tmp / "d.json", "audio_dir", [{"id": "dir", "path": str(root)}]), samples, prompts


@pytest.mark.parametrize("chunking", [("--chunking", "full"), ("--sample-size", 16384, "--chunking", "split")])
def test_a_round_tripping_same_model_passes_verify(sidecar_folder, tmp_path, chunking):
    dataset, samples, prompts = sidecar_folder
    out = tmp_path / "out"
    encode((CODEC / "model_config.json", CODEC / "model.safetensors"), dataset, out, "--batch-size", 3, *chunking)
    folder, shards = read_folder_layout(out), read_latent_shards(out)   # both fail on a duplicate
    assert folder.keys() == shards.keys()
    by_file = {}
    for _, md in folder.values():
        by_file.setdefault(md["__key__"], set()).add(md["prompt"])
    assert by_file == {key: {prompt} for key, prompt in prompts.items()} and len(samples) == len(prompts)
    assert (out / "silence.npy").is_file() and filelist(out) == sorted(committed_npys(out))
    result = run_cli("verify", out, "-n", 6)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = {md["latent_id"] for _, md in folder.values()}
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.split() and line.split()[0] in ids]
    assert len(rows) == min(6, len(folder))
    assert all(float(r[1]) > 10 for r in rows)            # decoded audio really is its source
    assert all(float(r[4]) < 1e-4 for r in rows)          # re-encoding reproduces the stored latents
    assert "OK: " in result.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_goes_through_the_precision_check(full_runs, caption_tars, tmp_path, precision):
    dataset, _ = caption_tars
    out = tmp_path / precision
    config, ckpt = shift_model()
    result = run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset, "--output-path",
                     out, "--num-workers", 1, "--devices", 1, "--no-progress", "--chunking", "full",
                     "--batch-size", 4, "--precision", precision)
    if result.returncode == 2:   # this CPU's kernels get these shapes wrong in low precision: refused
        assert f"--precision {precision} disagrees with fp32" in result.stderr
        assert not list(out.glob("[0-9]*/*.npy"))
        return
    assert result.returncode == 0, result.stdout + result.stderr
    check = json.loads((out / "details.json").read_text())["stats"]["precision_check"]
    assert check["precision"] == precision and check["relative_error"] < check["limit"]
    assert f"precision  {precision} agrees with fp32" in result.stdout
    reference = read_folder_layout(full_runs[0])
    for key, (latent, _) in read_folder_layout(out).items():
        ref = reference[key][0]
        assert np.linalg.norm(latent - ref) / np.linalg.norm(ref) < 0.05, key
