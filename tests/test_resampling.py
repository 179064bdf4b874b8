"""--resample-on device: windows at another rate leave the workers at their source rate and are resampled
after the copy to the device, with the same kernel; the windows, and the latents, are those of resampling
in the workers up to float rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import read_folder_layout, read_latent_shards, run_cli, write_dataset_config, write_tar
from wds_encode.pipeline.reader import Reader, ReaderOptions, ShardEnd
from wds_encode.pipeline.resampling import device_batch
from wds_encode.pipeline.sources import Shard
from wds_encode.synth import encode_audio_bytes, synth_waveform

RATE = 44100
WRITER_FIELDS = {"latent_id"}   # names the writer that wrote the window: another run, another name
# (key, source rate, seconds, channels): other rates than the model's, at odd lengths, and one at its rate
FILES = [("a48", 48000, 1.37, 2), ("b22", 22050, 0.91, 1), ("c16", 16000, 2.3, 2), ("d44", 44100, 0.77, 2),
         ("e96", 96000, 0.4, 2)]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resampling")
    members = [(f"{key}.flac", encode_audio_bytes(synth_waveform("sweep", seconds, rate, channels,
                                                                 np.random.default_rng(i)), rate, "flac"))
               for i, (key, rate, seconds, channels) in enumerate(FILES)]
    path = write_tar(tmp / "in" / "r-000000.tar", members)
    return path


def windows(path, resample_here: bool, **options):
    unit = Shard(url=str(path), dataset_id="r", name="r-000000")
    items = list(Reader([unit], ReaderOptions(sample_rate=RATE, channels=2, resample_here=resample_here,
                                              **options)).read_shard(unit))
    assert isinstance(items[-1], ShardEnd) and not items[-1].errors
    return items[:-1]


@pytest.mark.parametrize("options", [dict(sample_size=8192, chunking="split"),
                                     dict(sample_size=32768, chunking="crop"),
                                     dict(sample_size=16384, chunking="full", length_multiple=64),
                                     dict(sample_size=16384, chunking="full", length_multiple=64, overlap=16)],
                         ids=["split", "crop", "full", "full-overlap"])
def test_a_device_batch_is_the_batch_of_windows_the_workers_would_make(shard, options):
    here, there = windows(shard, True, **options), windows(shard, False, **options)
    assert [i.key for i in here] == [i.key for i in there] and [i.metadata for i in here] == [i.metadata for i in there]
    assert any(i.resampling is not None for i in there) and all(i.resampling is None for i in here)
    assert any(i.audio.shape[-1] != i.size for i in there)   # source-rate segments, not windows
    by_size: dict[int, list[int]] = {}
    for index, item in enumerate(here):
        by_size.setdefault(item.size, []).append(index)
    for indices in by_size.values():
        expected = torch.stack([here[i].audio for i in indices])
        audio, masks, keys = device_batch([there[i] for i in indices], torch.device("cpu"), RATE)
        assert audio.shape == expected.shape and keys == [here[i].noise_key for i in indices]
        assert float((audio - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
        assert torch.equal(masks, torch.stack([here[i].padding_mask for i in indices]))


@pytest.mark.parametrize("extra", [("--chunking", "split"), ("--chunking", "full", "--max-seconds", "0.5",
                                                              "--overlap", "8")], ids=["split", "full-overlap"])
def test_the_command_writes_the_same_latents_with_either_placement(shard, demo_model, tmp_path, extra):
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "r", "path": str(shard.parent)}])
    outs = {}
    for place in ("workers", "device"):
        outs[place] = tmp_path / place
        result = run_cli("--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
                         "--output-path", outs[place], "--sample-size", 8192, "--latent-mode", "mean",
                         "--num-workers", 1, "--no-progress", "--resample-on", place, *extra)
        assert result.returncode == 0, result.stdout + result.stderr
    workers, device = read_folder_layout(outs["workers"]), read_folder_layout(outs["device"])
    assert len(workers) >= len(FILES)
    for place, out in outs.items():
        assert json.loads((out / "details.json").read_text())["stats"]["resample_on"] == place
    device_md = {md["key"]: md for _, md in device.values()}
    for _, md in workers.values():
        differ = {k for k in md.keys() | device_md[md["key"]].keys() if md.get(k) != device_md[md["key"]].get(k)}
        assert differ <= WRITER_FIELDS, (md["key"], differ)
    by_key = {md["key"]: latent for latent, md in device.values()}
    for latent, md in workers.values():
        other = by_key[md["key"]]
        assert latent.shape == other.shape
        assert np.abs(latent - other).max() <= 1e-4 * max(1.0, float(np.abs(latent).max())), md["key"]
    assert len(read_latent_shards(outs["device"])) == len(device)
