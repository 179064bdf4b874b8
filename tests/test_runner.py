"""runner.py in-process: out-of-memory batches split and the run goes on, --batch-size auto recorded."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_folder_layout, write_dataset_config
from wds_encode.cli import format_summary
from wds_encode.config import EncodeConfig
from wds_encode.pipeline.encoder import BatchEncoder
from wds_encode.runner import (PREFETCH_BYTES, SILENCE_KEY, prefetch_windows, run, shared_memory_free,
                               silence_samples, write_silence)

SAMPLE_SIZE = 8192


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 shards x 6 samples, one window each."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("runner")
    _, samples = write_tar_shards(folder / "in", 2, 6, seed=3, name="r", min_seconds=0.5, max_seconds=1.0)
    config = write_dataset_config(folder / "d.json", "wds", [{"id": "r", "path": str(folder / "in")}],
                                  random_crop=False)
    return config, samples


def encode_config(demo_model, dataset_config, out, **options) -> EncodeConfig:
    model_config, ckpt = demo_model
    return EncodeConfig(model_config=model_config, ckpt_path=ckpt, dataset_config=dataset_config,
                        output_path=str(out), sample_size=SAMPLE_SIZE, num_workers=0, progress=False,
                        devices="1", **options)


def inject_oom(monkeypatch, too_large):
    """Make BatchEncoder's forward pass raise the device's out-of-memory error when `too_large(keys)`."""
    forward = BatchEncoder._forward

    def patched(self, model, audio, keys, start, eager=False):
        if too_large(keys):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return forward(self, model, audio, keys, start, eager)
    monkeypatch.setattr(BatchEncoder, "_forward", patched)


def test_out_of_memory_batches_of_four_are_split_and_every_window_is_written(dataset, demo_model, tmp_path,
                                                                             monkeypatch):
    config, samples = dataset
    sizes = []
    windows = lambda keys: keys != [SILENCE_KEY]  # noqa: E731  (not silence.npy's one forward pass)
    inject_oom(monkeypatch, lambda keys: windows(keys) and (sizes.append(len(keys)) or len(keys) > 1))
    stats = run(encode_config(demo_model, config, tmp_path / "out", batch_size=4))
    assert stats.windows == len(samples) == 12 and stats.errors == 0
    # the first batch of 4 is halved twice (4 -> 2 -> 1); the size that fit is remembered, so every later
    # pass takes one window and nothing runs out of memory again
    assert stats.oom_splits == 2
    assert sizes[:2] == [4, 2] and set(sizes[2:]) == {1} and len(sizes) == 2 + 12
    assert sorted(md["__key__"] for _, md in read_folder_layout(tmp_path / "out").values()) == \
        sorted(s.key for s in samples)
    assert "2 batch splits after running out of device memory" in format_summary(stats)


def test_a_window_that_never_fits_becomes_an_error_record_and_the_run_goes_on(dataset, demo_model, tmp_path,
                                                                              monkeypatch):
    config, samples = dataset
    victim = samples[4].key
    inject_oom(monkeypatch, lambda keys: any(k.endswith("/" + victim) for k in keys))
    stats = run(encode_config(demo_model, config, tmp_path / "out", batch_size=4))
    assert stats.windows == 11 and stats.errors == 1 and stats.units_done == 2
    written = {md["__key__"] for _, md in read_folder_layout(tmp_path / "out").values()}
    assert written == {s.key for s in samples} - {victim}
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], e["level"]) for e in errors] == [(victim, "error")]
    assert "out of device memory even for this one window" in errors[0]["reason"]


def test_batch_size_auto_picks_a_power_of_two_and_records_it(dataset, demo_model, tmp_path):
    config, samples = dataset
    stats = run(encode_config(demo_model, config, tmp_path / "out", batch_size="auto"))
    assert stats.windows == len(samples)
    assert stats.batch_size >= 1 and stats.batch_size & (stats.batch_size - 1) == 0 and stats.batch_size <= 256
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    probe = details["stats"]["batch_probe"]
    assert probe["requested"] == "auto" and probe["chosen"] == stats.batch_size
    assert probe["host_memory_bytes"] > 0 and probe["bytes_per_window_estimate"] > 0
    assert details["args"]["batch_size"] == "auto" and details["ranks"][0]["batch_size"] == stats.batch_size
    assert f"batch size {stats.batch_size} (auto)" in format_summary(stats)


def test_a_cpu_run_uses_the_channels_last_layout_unless_told_not_to(dataset, demo_model, tmp_path):
    """The default on a CPU, said in the summary and details.json; --no-channels-last gives the same
    latents (within 1e-5) from the channels-first encoder."""
    config, samples = dataset
    fast = run(encode_config(demo_model, config, tmp_path / "fast", batch_size=4))
    plain = run(encode_config(demo_model, config, tmp_path / "plain", batch_size=4, channels_last=False))
    assert fast.channels_last is True and plain.channels_last is False
    assert "channels-last" in format_summary(fast) and "channels-last" not in format_summary(plain)
    details = json.loads((tmp_path / "fast" / "details.json").read_text())
    assert details["stats"]["channels_last"] is True
    by_key = {md["__key__"]: latent for latent, md in read_folder_layout(tmp_path / "plain").values()}
    fast_latents = read_folder_layout(tmp_path / "fast").values()
    assert len(fast_latents) == len(by_key) == len(samples)
    for latent, md in fast_latents:
        torch.testing.assert_close(torch.from_numpy(latent), torch.from_numpy(by_key[md["__key__"]]),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunking, autotune", [("split", True), ("full", False)])
def test_cudnn_autotuning_only_where_batch_shapes_repeat(dataset, demo_model, tmp_path, monkeypatch, chunking,
                                                         autotune):
    """With --chunking full nearly every batch has a new length: autotuning would benchmark each anew."""
    asked = []
    original = BatchEncoder.__init__

    def record(self, *args, **kwargs):
        asked.append(kwargs.get("autotune"))
        original(self, *args, **kwargs)
    monkeypatch.setattr(BatchEncoder, "__init__", record)
    config, samples = dataset
    options = {"max_seconds": 1.0} if chunking == "full" else {}
    stats = run(encode_config(demo_model, config, tmp_path / "out", batch_size=2, chunking=chunking, **options))
    assert asked == [autotune] and stats.windows >= len(samples)
    assert stats.autotune is False  # a CPU has no cuDNN to tune: what ran is recorded, not what was asked


def test_decode_workers_keep_a_bounded_number_of_bytes_ready():
    window = 2 * 1_323_000 * 4   # a 30 s stereo window at 44.1 kHz, float32: 10.6 MB
    assert prefetch_windows("crop", 8, window, 4, shm_free=64 << 30) == 8     # a batch's worth each
    # --batch-size auto chose 256: a batch's worth per worker would be 10.8 GB in /dev/shm; 1 GiB in all instead
    many = prefetch_windows("crop", 256, window, 4, shm_free=64 << 30)
    assert 4 * many * window <= PREFETCH_BYTES and many == PREFETCH_BYTES // (4 * window)
    # a container's 64 MB /dev/shm: the minimum of 2 (one in hand, one coming)
    assert prefetch_windows("split", 256, window, 4, shm_free=64 << 20) == 2
    assert prefetch_windows("full", 256, window, 4, shm_free=64 << 30) == 2
    assert shared_memory_free("/nonexistent/shm") > 1 << 60 and shared_memory_free("/dev/shm") >= 0


def test_batches_reach_the_device_through_a_small_ring_of_reused_buffers(dataset, demo_model, tmp_path,
                                                                        monkeypatch):
    """The CUDA path of the loop (collate into a ring buffer, held until the writer collects the
    batch), run on the CPU with the ring over plain memory: with 2 buffers for 6 batches the loop
    waits for the writer to give buffers back, and every window still comes out once."""
    from wds_encode.pipeline.pinned import PinnedRing
    rings = []
    original = BatchEncoder.__init__

    def with_ring(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.staging = PinnedRing(slots=2, pin=False)
        rings.append(self.staging)
    monkeypatch.setattr(BatchEncoder, "__init__", with_ring)
    config, samples = dataset
    stats = run(encode_config(demo_model, config, tmp_path / "out", batch_size=2))
    assert stats.windows == len(samples) and stats.batches == 6 and stats.errors == 0
    assert len(rings) == 1 and rings[0].in_use == 0  # every buffer given back
    assert sorted(md["__key__"] for _, md in read_folder_layout(tmp_path / "out").values()) == \
        sorted(s.key for s in samples)


def test_silence_length_is_the_sample_size_and_in_full_mode_at_most_the_longest_window():
    from types import SimpleNamespace

    def inputs(chunking, sample_size):
        return SimpleNamespace(config=SimpleNamespace(sample_size=sample_size), chunking=chunking,
                               downsampling_ratio=64)
    for chunking in ("crop", "random_crop", "split"):
        assert silence_samples(inputs(chunking, 8192), window_size=8192) == 8192  # as SA3's --sample_size
    assert silence_samples(inputs("full", 5000), window_size=64 * 1000) == 5056    # up to the ratio
    assert silence_samples(inputs("full", 1320960), window_size=4352) == 4352     # the --max-seconds window


@pytest.fixture(scope="module")
def demo_autoencoder(demo_model):
    from wds_encode.config import load_model_config
    from wds_encode.models import load_autoencoder
    return load_autoencoder(load_model_config(demo_model[0]), demo_model[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silence_npy_is_silence_encoded_as_the_run_encodes_and_a_rerun_keeps_it(place, demo_autoencoder,
                                                                                dtype):
    import io

    import numpy as np

    from wds_encode.pipeline.encoder import key_seed
    from wds_encode.pipeline.writers import npy_bytes
    model = demo_autoencoder
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    zeros = torch.zeros(1, model.in_channels, 4096)

    def silence():
        return np.load(io.BytesIO(place.read("silence.npy")), allow_pickle=False)
    assert write_silence(place, BatchEncoder(model, device=torch.device("cpu"), seed=7), 4096, dtype) is None
    found = silence()
    assert found.shape == (1, model.latent_dim, 4096 // model.downsampling_ratio) and found.dtype == np_dtype
    # the run's VAE sampling: noise seeded by (run seed, "silence"), as a window's by (seed, its key)
    pre = model.encode_pre_bottleneck(zeros)
    noise = torch.randn(model.bottleneck.noise_shape(pre),
                        generator=torch.Generator().manual_seed(key_seed(7, "silence")))
    expected = model.bottleneck.encode(pre, mode="sample", noise=noise).to(dtype).numpy()
    np.testing.assert_allclose(found.astype(np.float32), expected.astype(np.float32), atol=1e-6, rtol=0)
    assert np.abs(found - model.encode(zeros, mode="mean").to(dtype).numpy()).max() > 1e-3  # really sampled

    marker = np.full((1, model.latent_dim, 3), 5, np_dtype)  # of that form: an earlier run's, kept
    place.write("silence.npy", npy_bytes(marker))
    assert write_silence(place, BatchEncoder(model, device=torch.device("cpu"), seed=7), 4096, dtype) is None
    assert np.array_equal(silence(), marker)
    for other in (b"not an npy file", npy_bytes(marker[0]), npy_bytes(marker.astype(np.float64))):
        place.write("silence.npy", other)  # not a [1, C, T] array of the output's dtype: encoded again
        mean = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean")
        assert write_silence(place, mean, 4096, dtype) is None
        np.testing.assert_allclose(silence().astype(np.float32),
                                   model.encode(zeros, mode="mean").to(dtype).numpy().astype(np.float32),
                                   atol=1e-6)
    place.close()


def test_silence_that_cannot_be_encoded_is_not_written(tmp_path, demo_autoencoder, monkeypatch):
    from wds_encode.storage import LocalPlace
    encoder = BatchEncoder(demo_autoencoder, device=torch.device("cpu"))
    inject_oom(monkeypatch, lambda keys: True)
    place = LocalPlace(str(tmp_path / "out"))
    assert "out of device memory even for this one window" in write_silence(place, encoder, 4096, torch.float32)
    assert place.read("silence.npy") is None


def test_channels_last_is_the_cpu_default_only_for_encoders_with_convolutions(demo_model):
    from wds_encode.config import load_model_config
    from wds_encode.models import load_autoencoder
    from wds_encode.runner import use_channels_last
    from conftest import golden_sa3
    cpu = torch.device("cpu")
    demo = load_autoencoder(load_model_config(demo_model[0]), demo_model[1])
    same = load_autoencoder(json.loads((golden_sa3("same_tiny_shift") / "model_config.json").read_text()), None)
    assert use_channels_last(None, cpu, demo.encoder) is True
    assert use_channels_last(None, cpu, same.encoder) is False       # a transformer: nothing to lay out
    assert use_channels_last(True, cpu, same.encoder) is True        # asked for: as asked
    assert use_channels_last(None, torch.device("cuda"), demo.encoder) is False
