"""`--chunking full` end to end: every file encoded at its own length (latents of exactly
ceil(n / ratio) frames, tokens too), the same latents whether a window is encoded alone or batched
with others for oobleck, DAC and SEANet, every file exactly once with 2 workers, the padding
overhead in the summary, and memory bounded with an hour-long file in the mix."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import (SEANET_SMALL, assert_exactly_once, golden, golden_model, read_folder_layout,
                      read_latent_shards, write_dataset_config, write_tar)
from wds_encode.cli import format_summary
from wds_encode.config import EncodeConfig, load_model_config
from wds_encode.pipeline.encoder import BatchEncoder
from wds_encode.models import build_autoencoder, load_autoencoder
from wds_encode.runner import run

DEMO_RATIO = 64
AWKWARD = [1, DEMO_RATIO - 1, DEMO_RATIO, DEMO_RATIO + 1, 10007, 3 * 44100 + 17]   # 10007 is prime


def wav_bytes(samples: int, rate: int, channels: int = 2, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    audio = (0.2 * rng.standard_normal((samples, channels))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def encode(model, dataset: Path, out: Path, **options):
    model_config, ckpt = model
    options = {"num_workers": 0, "batch_size": 4, **options}
    return run(EncodeConfig(model_config=model_config, ckpt_path=ckpt, dataset_config=dataset, output_path=str(out),
                            chunking="full", progress=False, devices="1", **options))


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """One shard of WAVs at 44.1 kHz with awkward lengths, and one 48 kHz file (resampled)."""
    folder = tmp_path_factory.mktemp("awkward")
    members = {f"n{n}.wav": wav_bytes(n, 44100, seed=n) for n in AWKWARD}
    members["r10007.wav"] = wav_bytes(10007, 48000, seed=1)
    write_tar(folder / "in" / "odd-000.tar", list(members.items()))
    return write_dataset_config(folder / "d.json", "wds", [{"id": "odd", "path": str(folder / "in")}],
                                random_crop=False)


def test_latents_have_exactly_one_frame_per_started_ratio_of_samples(awkward, demo_model, tmp_path):
    stats = encode(demo_model, awkward, tmp_path / "out")
    found = read_folder_layout(tmp_path / "out")
    resampled = math.ceil(10007 * 44100 / 48000)
    expected = {**{f"n{n}": n for n in AWKWARD}, "r10007": resampled}
    assert {md["key"]: md["valid_length"] for _, md in found.values()} == expected
    for latent, md in found.values():
        n = md["valid_length"]
        frames = math.ceil(n / DEMO_RATIO)
        assert latent.shape == (16, frames) and md["latent_length"] == frames
        assert md["padding_mask"] == [1] * frames          # the partial last frame counts as audio
        assert md["num_chunks"] == 1 and md["total_length"] == n
        assert math.isclose(md["duration"], n / 44100)
    assert read_latent_shards(tmp_path / "out").keys() == found.keys()
    # the only zeros encoded are the rounding to the ratio
    padding = sum(math.ceil(n / DEMO_RATIO) * DEMO_RATIO - n for n in expected.values())
    assert stats.padding_samples == padding and stats.real_samples == sum(expected.values())
    assert f"padding    {100 * padding / sum(expected.values()):.2f}%" in format_summary(stats)


def test_tokens_have_the_files_exact_length_too(awkward, tmp_path):
    config, ckpt = golden_model("oobleck_rvq")
    model = load_autoencoder(load_model_config(config), ckpt)
    ratio, q = model.downsampling_ratio, model.bottleneck.num_quantizers
    encode((config, ckpt), awkward, tmp_path / "out", is_discrete=True)
    found = read_folder_layout(tmp_path / "out")
    assert len(found) == len(AWKWARD) + 1
    for tokens, md in found.values():
        assert np.issubdtype(tokens.dtype, np.integer)
        assert tokens.shape == (q, math.ceil(md["valid_length"] / ratio))


def test_crop_pads_where_full_does_not(awkward, demo_model, tmp_path):
    crop = run(EncodeConfig(model_config=demo_model[0], ckpt_path=demo_model[1], dataset_config=awkward,
                            output_path=str(tmp_path / "crop"), sample_size=8192, num_workers=0, progress=False,
                            devices="1"))
    full = encode(demo_model, awkward, tmp_path / "full")
    assert crop.padding_overhead > 1.0 > 0.01 > full.padding_overhead > 0
    assert "padding" in format_summary(crop)


# ----------------------------------------------------------------------------- batch composition

def family_model(family: str):
    if family == "seanet":
        torch.manual_seed(0)
        return build_autoencoder(SEANET_SMALL)
    d = golden({"oobleck": "oobleck_snake_vae", "dac": "dac_vae"}[family])
    return load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("family", ["oobleck", "dac", "seanet"])
def test_a_window_gives_the_same_latents_alone_or_batched(family, channels_last):
    """Full windows of one length, encoded one by one and as a batch of 4 (fp32): within 1e-6."""
    model = family_model(family)
    ratio = model.downsampling_ratio
    length = 37 * ratio
    gen = torch.Generator().manual_seed(7)
    audio = 0.2 * torch.randn(4, model.in_channels, length, generator=gen)
    valid = [length, length - 5, length - ratio + 1, length // 2]     # real samples; zeros after them
    for i, n in enumerate(valid):
        audio[i, :, n:] = 0
    masks = torch.stack([torch.arange(length) < n for n in valid])
    encoder = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean", channels_last=channels_last)
    keys = [f"k{i}" for i in range(4)]
    together = encoder.encode(audio, masks, keys).latents
    for i in range(4):
        alone = encoder.encode(audio[i:i + 1], masks[i:i + 1], keys[i:i + 1]).latents
        assert alone.shape[-1] == length // ratio
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6)
    assert together.abs().max() > 1e-3


def test_a_run_gives_the_same_latents_at_batch_size_1_and_4(mixed_shards, demo_model, tmp_path):
    folder, _, samples = mixed_shards
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    encode(demo_model, dataset, tmp_path / "one", batch_size=1, latent_mode="mean")
    encode(demo_model, dataset, tmp_path / "four", batch_size=4, latent_mode="mean", bucket_buffer=6)
    one, four = read_folder_layout(tmp_path / "one"), read_folder_layout(tmp_path / "four")
    assert one.keys() == four.keys()
    for key, (latent, _) in one.items():
        # float32 rounding of another batch shape: relative, so it holds on every CPU's kernels
        np.testing.assert_allclose(four[key][0], latent, rtol=1e-5, atol=1e-6)


def test_every_file_exactly_once_with_two_workers(mixed_shards, demo_model, tmp_path):
    folder, _, samples = mixed_shards
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    stats = encode(demo_model, dataset, tmp_path / "out", num_workers=2, max_seconds=1.0, bucket_buffer=8)
    assert stats.errors == 0 and stats.units_done == 3
    details = assert_exactly_once(tmp_path / "out", samples)
    assert details["run_identity"]["options"]["chunking"] == "full"
    assert details["run_identity"]["options"]["max_seconds"] == 1.0
    found = read_folder_layout(tmp_path / "out")
    split = [md for _, md in found.values() if md["num_chunks"] > 1]
    assert split, "files longer than --max-seconds are split"
    for _, md in found.values():
        longest = 44100 // DEMO_RATIO * DEMO_RATIO
        assert md["valid_length"] <= longest and md["latent_length"] == math.ceil(md["valid_length"] / DEMO_RATIO)
        if md["chunk_index"] < md["num_chunks"] - 1:
            assert md["valid_length"] == longest


# ----------------------------------------------------------------------------- memory

TINY_MODEL = {"model_type": "autoencoder", "sample_size": 65536, "sample_rate": 44100, "audio_channels": 2,
              "model": {"encoder": {"type": "oobleck", "config": {
                  "in_channels": 2, "channels": 2, "c_mults": [1], "strides": [64], "latent_dim": 4,
                  "use_snake": False}},
                  "decoder": {"type": "oobleck", "config": {
                      "out_channels": 2, "channels": 2, "c_mults": [1], "strides": [64], "latent_dim": 2,
                      "use_snake": False}},
                  "bottleneck": {"type": "vae"}, "latent_dim": 2, "downsampling_ratio": 64, "io_channels": 2}}


def _run_measuring_peak_rss(folder: Path, long_seconds: int, extra_args: tuple[str, ...] = ()
                            ) -> tuple[float, dict]:
    """wds-encode --chunking full in a fresh process on one shard: a `long_seconds` 8 kHz mono FLAC (the
    model resamples it to 44.1 kHz stereo) among 6 short WAVs. Returns (peak RSS in MB, windows)."""
    t = np.arange(long_seconds * 8000, dtype=np.float64)
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t / 8000)).astype(np.float32), 8000, format="FLAC",
             subtype="PCM_16")
    del t
    members = {"long.flac": buf.getvalue(), **{f"s{i}.wav": wav_bytes(4410 * (i + 1), 44100, seed=i)
                                                for i in range(6)}}
    write_tar(folder / "in" / "mem-000.tar", list(members.items()))
    dataset = write_dataset_config(folder / "d.json", "wds", [{"id": "mem", "path": str(folder / "in")}],
                                   random_crop=False)
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's from before exec);
    # --num-workers 0 keeps decoding in the same process, so it is the pipeline's peak
    probe = (
        "import re, sys\n"
        "from wds_encode.cli import main\n"
        "code = 0\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "status = open('/proc/self/status').read()\n"
        "print('PEAK_MB', int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) / 1024)\n"
        "sys.exit(code)\n")
    model = folder.parent / "model"
    result = subprocess.run(
        [sys.executable, "-c", probe, "--model-config", str(model / "model.json"), "--ckpt-path",
         str(model / "model.safetensors"), "--dataset-config", str(dataset), "--output-path", str(folder / "out"),
         "--chunking", "full", "--max-seconds", "60", "--batch-size", "2", "--bucket-buffer", "4",
         "--num-workers", "0", "--no-progress", *extra_args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.rsplit("PEAK_MB", 1)[1]), read_folder_layout(folder / "out")


@pytest.mark.slow
def test_memory_stays_bounded_with_an_hour_long_file_in_the_mix(tmp_path):
    """With --max-seconds 60 an hour-long file is read, resampled and encoded a minute at a time: the run's
    peak RSS is about that of a run with a 10-minute file: holding the file would take 1.2 GB more."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = build_autoencoder(TINY_MODEL, with_decoder=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text(json.dumps(TINY_MODEL))
    save_file({f"autoencoder.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model" / "model.safetensors"))
    short_peak, _ = _run_measuring_peak_rss(tmp_path / "short", 10 * 60)
    long_peak, found = _run_measuring_peak_rss(tmp_path / "long", 3600)
    whole_file_mb = 3600 * 44100 * 2 * 4 / 2**20
    # 6x the audio, about the same peak (it varies by ~100 MB run to run); holding the file would add 1.2 GB
    assert long_peak < short_peak + whole_file_mb / 4, (long_peak, short_peak)
    total, size = 3600 * 44100, 60 * 44100 // 64 * 64
    long_windows = sorted((md["chunk_index"], md["valid_length"]) for _, md in found.values()
                          if md["__key__"] == "long")
    assert len(long_windows) == math.ceil(total / size) == 61
    assert all(n == size for _, n in long_windows[:-1]) and sum(n for _, n in long_windows) == total
    assert len(found) == 61 + 6
