"""`--chunking full --overlap N`: a file longer than --max-seconds comes out as ONE latent sequence, equal to
Stable Audio 3's chunked encode (`AudioAutoencoder.encode_audio(x, chunked=True, chunk_size, overlap)`, with
chunk_size the --max-seconds window in latent frames), for every model family, through the real command and
in both output forms; VAE noise and tokens too; a failing chunk makes its file one error record; every file
exactly once with 2 workers; --overlap 0 keeps the old independent windows and their run identity; an hour-long
file is encoded in the memory of one window."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import (GOLDEN_DIR, SEANET_SMALL, assert_exactly_once, golden_model, read_folder_layout,
                      read_latent_shards, write_dataset_config, write_tar)
from wds_encode.pipeline.audio import conform_channels, decode_audio, plan_chunks, resample
from wds_encode.cli import main
from wds_encode.config import load_model_config
from wds_encode.pipeline.encoder import BatchEncoder, key_seed
from wds_encode.models import build_autoencoder, demo_model_paths, load_autoencoder

SA3_GOLDEN = GOLDEN_DIR.parent / "golden-sa3"


def sa3_encode_audio(encode, audio, chunked=False, overlap=32, chunk_size=128, *, downsampling_ratio):
    """Stable Audio 3's `AudioAutoencoder.encode_audio`, re-stated line by line from
    github.com/Stability-AI/stable-audio-3, file stable_audio_3/models/autoencoders.py at commit 636f906
    (`self.encode` is `encode`, `self.downsampling_ratio` is `downsampling_ratio`). `audio` [B, C, N] is
    already padded to a multiple of the ratio (SA3's `preprocess_audio_for_encoder`)."""
    samples_per_latent = int(downsampling_ratio)
    if not chunked or audio.shape[-1] < chunk_size * samples_per_latent:
        return encode(audio)

    # chunk_size/overlap are in latent units; scale to samples for slicing.
    chunk_size_samples = chunk_size * samples_per_latent
    hop_samples = (chunk_size - overlap) * samples_per_latent
    total_samples = audio.shape[-1]

    # Anchor the final chunk to the signal end (may overlap more than `overlap`).
    chunk_starts = list(range(0, total_samples - chunk_size_samples + 1, hop_samples))
    if chunk_starts[-1] != total_samples - chunk_size_samples:
        chunk_starts.append(total_samples - chunk_size_samples)

    encoded_chunks = [encode(audio[..., s:s + chunk_size_samples]) for s in chunk_starts]

    total_latents = total_samples // samples_per_latent
    half_overlap_latents = overlap // 2
    output = audio.new_zeros(*encoded_chunks[0].shape[:-1], total_latents)
    num_chunks = len(chunk_starts)

    # Trim half the overlap off inner edges (edges facing a neighbour chunk).
    for i, (start_sample, chunk) in enumerate(zip(chunk_starts, encoded_chunks)):
        is_first = i == 0
        is_last = i == num_chunks - 1
        out_start = (total_latents - chunk_size) if is_last else (start_sample // samples_per_latent)
        left = 0 if is_first else half_overlap_latents
        right = chunk_size if is_last else chunk_size - half_overlap_latents
        output[..., out_start + left: out_start + right] = chunk[..., left:right]

    return output


def padded(audio: np.ndarray, ratio: int) -> torch.Tensor:
    """[C, n] -> [1, C, ceil(n / ratio) * ratio], zeros at the end (SA3's preprocess_audio_for_encoder)."""
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    return F.pad(x, (0, -x.shape[-1] % ratio))


def assert_close_to(found: np.ndarray, expected: torch.Tensor | np.ndarray) -> None:
    """Equal up to float32 rounding (another batch shape, the channels-last layout): relative to the
    latents' scale, so it holds on every CPU's kernels."""
    expected = np.asarray(expected, dtype=np.float32)
    assert found.shape == expected.shape
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def wav(audio: np.ndarray, rate: int) -> bytes:
    """[C, n] float32 as a float WAV: decoded back exactly."""
    buf = io.BytesIO()
    sf.write(buf, np.ascontiguousarray(audio.T), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def signal(channels: int, samples: int, seed: int) -> np.ndarray:
    """Music-like test audio: a few partials and a little noise, [C, n] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 8000.0
    tone = sum(0.5 ** k * np.sin(2 * np.pi * (110 + 70 * k) * (k + 1) * t + k) for k in range(5))
    return (0.2 * tone + 0.05 * rng.standard_normal((channels, samples))).astype(np.float32)


def cli_run(model: tuple[Path, Path], dataset: Path, out: Path, *args: str, exit_code: int = 0):
    config, ckpt = model
    result = CliRunner().invoke(main, [
        "run", "--model-config", str(config), "--ckpt-path", str(ckpt), "--dataset-config", str(dataset),
        "--output-path", str(out), "--no-progress", "--devices", "1", *map(str, args)])
    assert result.exit_code == exit_code, (result.output, result.stderr if result.stderr_bytes else "",
                                           result.exception)
    return result


def max_seconds_for(frames: int, model) -> float:
    """--max-seconds whose window is exactly `frames` latent frames (half a sample more: no float rounding down)."""
    return (frames * model.downsampling_ratio + 0.5) / model.sample_rate


# ----------------------------------------------------------------------------- the plan is SA3's


@pytest.mark.parametrize("frames", [20, 21, 29, 30, 31, 57, 100, 101, 257])
@pytest.mark.parametrize("chunk, overlap", [(10, 1), (10, 2), (10, 3), (10, 9), (16, 7), (20, 8), (20, 19)])
def test_chunk_placement_gives_what_sa3s_in_order_writes_give(frames, chunk, overlap):
    """Each chunk's latents here say which chunk and which frame of the file they are, so the sequence
    stitched from `plan_chunks` equals SA3's only if every frame comes from the chunk SA3 takes it from."""
    ratio = 4
    x = torch.arange(frames * ratio, dtype=torch.float64)[None, None]

    def encode(chunk_audio):   # frame j of a chunk starting at frame s: (s + j) * 1000 + s
        start = int(chunk_audio[0, 0, 0]) // ratio
        return (torch.arange(chunk_audio.shape[-1] // ratio, dtype=torch.float64) + start)[None, None] * 1000 + start
    expected = sa3_encode_audio(encode, x, chunked=True, overlap=overlap, chunk_size=chunk, downsampling_ratio=ratio)
    plan = plan_chunks(frames * ratio, chunk * ratio, overlap, ratio)
    stitched = torch.full((1, 1, frames), -1.0, dtype=torch.float64)
    for c in reversed(plan):   # in any order: each chunk keeps only the frames SA3 leaves to it
        lat = encode(x[..., c.offset:c.offset + chunk * ratio])
        stitched[..., c.dst_start:c.dst_start + c.length] = lat[..., c.src_start:c.src_start + c.length]
    assert torch.equal(stitched, expected)
    assert sum(c.length for c in plan) == frames and all(c.length >= 1 for c in plan)


# ----------------------------------------------------------------------------- every family, end to end

FAMILIES = {   # (chunk frames, overlap): odd overlaps too (SA3 lets the later chunk have the shared frame)
    "demo": (32, 8), "oobleck": (48, 13), "dac": (40, 10), "seanet": (20, 5)}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(model config, checkpoint) per family: the bundled demo model, stable-audio-tools' own oobleck and DAC
    checkpoints (golden), and a seeded SEANet (EnCodec) saved as a real checkpoint."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("seanet")
    torch.manual_seed(0)
    seanet = build_autoencoder(SEANET_SMALL)
    (folder / "model.json").write_text(json.dumps(SEANET_SMALL))
    save_file({k: v.contiguous() for k, v in seanet.state_dict().items()}, str(folder / "model.safetensors"))
    return {"demo": demo_model_paths(), "oobleck": golden_model("oobleck_snake_vae"),
            "dac": golden_model("dac_vae"), "seanet": (folder / "model.json", folder / "model.safetensors")}


def load(paths: tuple[Path, Path]):
    return load_autoencoder(load_model_config(paths[0]), paths[1]).eval()


def family_dataset(folder: Path, model, chunk: int) -> tuple[Path, dict[str, np.ndarray]]:
    """One shard: a file 6.4 chunks long (not a whole number of frames either), one of exactly one chunk
    after the ratio padding, and one shorter than a chunk; at the model's rate and channels, float WAV."""
    ratio, channels = model.downsampling_ratio, model.in_channels
    lengths = {"long": int(6.4 * chunk) * ratio + 5, "one": chunk * ratio - 3, "short": chunk * ratio // 2 + 1}
    files = {key: signal(channels, n, seed=i) for i, (key, n) in enumerate(lengths.items())}
    write_tar(folder / "in" / "fam-000.tar", [(f"{k}.wav", wav(a, model.sample_rate)) for k, a in files.items()])
    return write_dataset_config(folder / "d.json", "wds", [{"id": "fam", "path": str(folder / "in")}],
                                random_crop=False), files


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_long_file_is_one_latent_sequence_equal_to_sa3s_chunked_encode(family, family_models, tmp_path):
    chunk, overlap = FAMILIES[family]
    model = load(family_models[family])
    ratio = model.downsampling_ratio
    dataset, files = family_dataset(tmp_path, model, chunk)
    cli_run(family_models[family], dataset, tmp_path / "out", "--chunking", "full", "--overlap", overlap,
            "--max-seconds", max_seconds_for(chunk, model), "--batch-size", 3, "--latent-mode", "mean",
            "--num-workers", 0)
    found = read_folder_layout(tmp_path / "out")
    shards = read_latent_shards(tmp_path / "out")
    assert sorted(found) == sorted(shards) == ["fam/fam-000/long", "fam/fam-000/one", "fam/fam-000/short"]

    def mean(x):
        return model.encode(x, mode="mean")
    for key, audio in files.items():
        latent, md = found[f"fam/fam-000/{key}"]
        assert np.array_equal(shards[f"fam/fam-000/{key}"][0], latent) and shards[f"fam/fam-000/{key}"][1] == md
        x = padded(audio, ratio)
        expected = sa3_encode_audio(mean, x, chunked=True, overlap=overlap, chunk_size=chunk,
                                    downsampling_ratio=ratio)[0]
        assert_close_to(latent, expected)
        n, frames = audio.shape[-1], math.ceil(audio.shape[-1] / ratio)
        assert latent.shape == (model.latent_dim, frames)
        assert (md["key"], md["offset"], md["valid_length"], md["total_length"]) == (key, 0, n, n)
        assert (md["chunk_index"], md["num_chunks"], md["latent_length"]) == (0, 1, frames)
        assert md["padding_mask"] == [1] * frames
        if key == "short":   # shorter than one chunk: one pass, as SA3 (and as without --overlap)
            assert "overlap" not in md
            continue
        chunks = len(plan_chunks(n, chunk * ratio, overlap, ratio))
        assert (md["chunk_frames"], md["overlap"], md["encoded_chunks"]) == (chunk, overlap, chunks)
        assert chunks == (1 if key == "one" else math.ceil((frames - chunk) / (chunk - overlap)) + 1)
        if key == "long":   # the chunks matter: one pass over the whole file gives other latents
            whole = mean(x)[0]
            assert float((whole - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["run_identity"]["options"]["overlap"] == overlap
    assert details["stats"]["windows"] == 3 and details["stats"]["errors"] == 0
    # the padding line counts zeros encoded: the ratio rounding of the last chunk of each file, nothing else
    assert details["stats"]["padding_samples"] == sum(-a.shape[-1] % ratio for a in files.values())


def test_an_overlap_of_the_receptive_field_gives_the_one_pass_encode_of_the_whole_file(family_models, tmp_path):
    """No seams: with 16 frames of overlap (the demo encoder's receptive field) every kept frame has all its
    context, and the joined sequence is the whole file encoded in one pass; with 8 it is not."""
    model = load(family_models["demo"])
    dataset, files = family_dataset(tmp_path, model, 32)
    for overlap in (16, 8):
        cli_run(family_models["demo"], dataset, tmp_path / f"out{overlap}", "--chunking", "full", "--overlap", overlap,
                "--max-seconds", max_seconds_for(32, model), "--batch-size", 4, "--latent-mode", "mean")
        latent, md = read_folder_layout(tmp_path / f"out{overlap}")["fam/fam-000/long"]
        whole = model.encode(padded(files["long"], model.downsampling_ratio), mode="mean")[0]
        assert md["encoded_chunks"] > 5
        if overlap == 16:
            assert_close_to(latent, whole)
        else:
            assert float(np.abs(latent - whole.numpy()).max()) > 1e-3 * float(whole.abs().max())


def test_vae_noise_is_drawn_per_chunk_and_seeded_by_the_key(family_models, tmp_path):
    """--latent-mode sample: every chunk samples its own noise (seeded by key and chunk), as SA3's chunks
    each sample theirs; the stitched sequence is SA3's stitching of those samples, and a rerun repeats it."""
    chunk, overlap = FAMILIES["oobleck"]
    model = load(family_models["oobleck"])
    ratio = model.downsampling_ratio
    dataset, files = family_dataset(tmp_path, model, chunk)
    args = ("--chunking", "full", "--overlap", overlap, "--max-seconds", max_seconds_for(chunk, model),
            "--batch-size", 2, "--seed", 5, "--no-shards")
    cli_run(family_models["oobleck"], dataset, tmp_path / "a", *args)
    cli_run(family_models["oobleck"], dataset, tmp_path / "b", *args)
    a, b = read_folder_layout(tmp_path / "a"), read_folder_layout(tmp_path / "b")
    latent, md = a["fam/fam-000/long"]
    calls = []

    def sample(x):   # SA3 encodes the chunks in order: the i-th call is chunk i
        pre = model.encode_pre_bottleneck(x)
        key = f"{md['source_shard']}/{md['key']}@{len(calls)}"
        calls.append(key)
        noise = torch.randn(model.bottleneck.noise_shape(pre)[1:], generator=torch.Generator().manual_seed(
            key_seed(5, key)))[None]
        return model.bottleneck.encode(pre, mode="sample", noise=noise)
    expected = sa3_encode_audio(sample, padded(files["long"], ratio), chunked=True, overlap=overlap,
                                chunk_size=chunk, downsampling_ratio=ratio)[0]
    count = len(plan_chunks(files["long"].shape[-1], chunk * ratio, overlap, ratio))
    assert len(calls) == md["encoded_chunks"] == count
    assert len(calls) > 4
    assert_close_to(latent, expected)
    mean = sa3_encode_audio(lambda x: model.encode(x, mode="mean"), padded(files["long"], ratio), chunked=True,
                            overlap=overlap, chunk_size=chunk, downsampling_ratio=ratio)[0]
    assert float((expected - mean).abs().max()) > 1e-2   # the noise is there
    for key in a:
        assert np.array_equal(a[key][0], b[key][0])


def test_tokens_stitch_along_time(tmp_path):
    """--is-discrete: tokens [Q, T] of each chunk, stitched as SA3 stitches latents (exactly: one window per
    batch, channels-first, as the reference computes them)."""
    paths = golden_model("oobleck_rvq")
    model = load(paths)
    ratio, chunk, overlap = model.downsampling_ratio, 40, 12
    dataset, files = family_dataset(tmp_path, model, chunk)
    cli_run(paths, dataset, tmp_path / "out", "--chunking", "full", "--overlap", overlap, "--is-discrete",
            "--max-seconds", max_seconds_for(chunk, model), "--batch-size", 1, "--no-channels-last")
    found = read_folder_layout(tmp_path / "out")
    q = model.bottleneck.num_quantizers

    def tokens(x):
        return model.bottleneck.encode_tokens(model.encode_pre_bottleneck(x))
    for key, audio in files.items():
        found_tokens, md = found[f"fam/fam-000/{key}"]
        expected = sa3_encode_audio(tokens, padded(audio, ratio), chunked=True, overlap=overlap, chunk_size=chunk,
                                    downsampling_ratio=ratio)[0]
        assert np.issubdtype(found_tokens.dtype, np.integer) and md["latent_mode"] == "tokens"
        assert found_tokens.shape == (q, math.ceil(audio.shape[-1] / ratio))
        assert np.array_equal(found_tokens.astype(np.int64), expected.long().numpy())
    assert read_latent_shards(tmp_path / "out").keys() == found.keys()


# ----------------------------------------------------------------------------- failures, old behaviour, options


def test_a_chunk_with_non_finite_latents_makes_its_file_one_error_record(family_models, tmp_path):
    """A burst of huge (finite) samples in one chunk of the long file overflows the encoder there: the file
    is not written at all (no partial sequence), it is one error record, and the unit's other files are."""
    chunk, overlap = FAMILIES["demo"]
    model = load(family_models["demo"])
    ratio = model.downsampling_ratio
    dataset, files = family_dataset(tmp_path, model, chunk)
    files["long"][:, 3 * chunk * ratio:3 * chunk * ratio + 50] = 3e38
    write_tar(tmp_path / "in" / "fam-000.tar", [(f"{k}.wav", wav(a, model.sample_rate)) for k, a in files.items()])
    result = cli_run(family_models["demo"], dataset, tmp_path / "out", "--chunking", "full", "--overlap", overlap,
                     "--max-seconds", max_seconds_for(chunk, model), "--batch-size", 2)
    assert "1 errors" in result.output
    assert sorted(read_folder_layout(tmp_path / "out")) == ["fam/fam-000/one", "fam/fam-000/short"]
    assert sorted(read_latent_shards(tmp_path / "out")) == ["fam/fam-000/one", "fam/fam-000/short"]
    [error] = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == "long" and error["level"] == "error"
    assert "non-finite" in error["reason"] and "nothing is written for it" in error["reason"]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "manifest").glob("done/**/*.json")]
    assert record["windows"] == 2 and record["errors"] == 1


def test_a_chunk_out_of_memory_makes_its_file_one_error_record(family_models, tmp_path, monkeypatch):
    """The device runs out of memory on chunk 2 of the long file, even alone: the batch is halved down to
    that window, which becomes the file's one error; its other chunks (and the other files) encode."""
    chunk, overlap = FAMILIES["demo"]
    model = load(family_models["demo"])
    dataset, files = family_dataset(tmp_path, model, chunk)
    forward = BatchEncoder._forward

    def failing(self, model, audio, keys, start, eager=False):
        if any(key.endswith("/long@2") for key in keys):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(self, model, audio, keys, start, eager)
    monkeypatch.setattr(BatchEncoder, "_forward", failing)
    cli_run(family_models["demo"], dataset, tmp_path / "out", "--chunking", "full", "--overlap", overlap,
            "--max-seconds", max_seconds_for(chunk, model), "--batch-size", 4)
    assert sorted(read_folder_layout(tmp_path / "out")) == ["fam/fam-000/one", "fam/fam-000/short"]
    [error] = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == "long" and "out of device memory" in error["reason"]
    count = len(plan_chunks(files["long"].shape[-1], chunk * model.downsampling_ratio, overlap,
                            model.downsampling_ratio))
    assert f"chunk 3 of {count}" in error["reason"] and "nothing is written for it" in error["reason"]
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["stats"]["oom_splits"] >= 1 and details["stats"]["windows"] == 2


def test_a_file_that_breaks_after_its_first_chunks_went_on_is_one_error_and_not_written(family_models, tmp_path,
                                                                                         monkeypatch):
    """The reader passes a long file's chunks on before all are decoded (past HOLD_BYTES; here at once): when
    a later chunk cannot be decoded (NaN samples), the chunks already encoded are dropped with the file at
    its unit's commit, the reader's error record says so, and the unit's other files are written."""
    import wds_encode.pipeline.reader as reader_module
    monkeypatch.setattr(reader_module, "HOLD_BYTES", 0)
    chunk, overlap = FAMILIES["demo"]
    model = load(family_models["demo"])
    ratio = model.downsampling_ratio
    dataset, files = family_dataset(tmp_path, model, chunk)
    files["long"][:, 5 * chunk * ratio] = np.nan
    write_tar(tmp_path / "in" / "fam-000.tar", [(f"{k}.wav", wav(a, model.sample_rate)) for k, a in files.items()])
    cli_run(family_models["demo"], dataset, tmp_path / "out", "--chunking", "full", "--overlap", overlap,
            "--max-seconds", max_seconds_for(chunk, model), "--batch-size", 2)
    assert sorted(read_folder_layout(tmp_path / "out")) == ["fam/fam-000/one", "fam/fam-000/short"]
    assert sorted(read_latent_shards(tmp_path / "out")) == ["fam/fam-000/one", "fam/fam-000/short"]
    [error] = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == "long" and "non-finite" in error["reason"]
    assert "chunks were encoded: nothing is written for it" in error["reason"]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "manifest").glob("done/**/*.json")]
    assert record["windows"] == 2 and record["errors"] == 1


def test_the_reader_describes_a_chunked_file_once(tmp_path):
    """A chunked file's chunks carry one metadata (the whole file's), the custom metadata module sees it once,
    and the unit's end counts one window and the file's audio once; a rejected file is one rejection."""
    from wds_encode.pipeline.reader import Reader, ReaderOptions
    from wds_encode.pipeline.sources import Shard
    module = tmp_path / "md.py"
    module.write_text("CALLS = []\n"
                      "def get_custom_metadata(info, audio):\n"
                      "    CALLS.append(info['__key__'])\n"
                      "    if info['__key__'] == 'drop':\n        return {'__reject__': True}\n"
                      "    return {'calls': len(CALLS), 'seen_length': info['valid_length']}\n")
    path = write_tar(tmp_path / "s.tar", [("keep.wav", wav(signal(1, 16000, 1), 16000)),
                                          ("drop.wav", wav(signal(1, 16000, 2), 16000))])
    shard = Shard(url=str(path), dataset_id="ds", name="s", custom_metadata_module=str(module))
    options = ReaderOptions(sample_rate=16000, channels=1, sample_size=3200, chunking="full", length_multiple=32,
                            overlap=20)
    reader = Reader([shard], options)
    *items, end = list(reader.read_shard(shard))
    plan = plan_chunks(16000, 3200, 20, 32)
    assert [it.stitch for it in items] == plan and {it.key for it in items} == {"keep"}
    assert all(it.metadata == items[0].metadata for it in items)
    md = items[0].metadata
    assert (md["calls"], md["seen_length"], md["valid_length"], md["num_chunks"], md["encoded_chunks"]) == (
        1, 16000, 16000, 1, len(plan))
    assert (end.windows, end.rejected, end.audio_seconds) == (1, 1, 1.0)
    assert sum(it.audio_samples for it in items) == 16000
    assert sum(it.real_samples for it in items) == sum(c.valid for c in plan) > 16000
    assert [it.noise_key for it in items] == [f"ds/s/keep@{i}" for i in range(len(plan))]
    assert reader._custom_metadata(str(module)).__globals__["CALLS"] == ["keep", "drop"]


def test_overlap_0_keeps_independent_windows_and_the_run_identity(family_models, tmp_path):
    chunk, overlap = FAMILIES["demo"]
    model = load(family_models["demo"])
    ratio = model.downsampling_ratio
    dataset, files = family_dataset(tmp_path, model, chunk)
    seconds = max_seconds_for(chunk, model)
    common = ("--chunking", "full", "--max-seconds", seconds, "--latent-mode", "mean")
    cli_run(family_models["demo"], dataset, tmp_path / "out", *common, "--overlap", 0)
    found = read_folder_layout(tmp_path / "out")
    n = files["long"].shape[-1]
    long_windows = sorted((md["chunk_index"], key) for key, (_, md) in found.items() if md["__key__"] == "long")
    assert [k for _, k in long_windows] == [f"fam/fam-000/long_{i:04d}" for i in range(math.ceil(n / (chunk * ratio)))]
    x = padded(files["long"], ratio)
    for i, key in long_windows:   # independent windows: each one encoded alone, the last one short
        start = i * chunk * ratio
        assert_close_to(found[key][0], model.encode(x[..., start:start + chunk * ratio], mode="mean")[0])
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert "overlap" not in details["run_identity"]["options"]
    # the same identity as a run that never heard of --overlap: a rerun without it finds everything done
    again = cli_run(family_models["demo"], dataset, tmp_path / "out", *common)
    assert "nothing to do: the 1 unit was already done" in again.output
    # and --overlap is another output: refused without --overwrite
    refused = cli_run(family_models["demo"], dataset, tmp_path / "out", *common, "--overlap", overlap, exit_code=2)
    assert "overwrite" in refused.output + (refused.stderr if refused.stderr_bytes else "")


@pytest.mark.parametrize("args, message", [
    (("--chunking", "split", "--overlap", 8), "--overlap 8 works with --chunking full only"),
    (("--chunking", "full", "--overlap", 8, "--max-chunks", 3), "exclude each other"),
    (("--chunking", "full", "--overlap", 32, "--max-seconds", (32 * 64 + 0.5) / 44100),
     f"--overlap 32 must be smaller than the --max-seconds {(32 * 64 + 0.5) / 44100:g} chunk, 32 latent frames"),
])
def test_bad_overlap_options_are_refused_before_anything_is_written(args, message, tmp_path):
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "x", "path": str(tmp_path)}])
    write_tar(tmp_path / "x-000.tar", [("a.wav", wav(signal(2, 1000, 0), 44100))])
    result = cli_run(demo_model_paths(), dataset, tmp_path / "out", *args, exit_code=2)
    text = result.output + (result.stderr if result.stderr_bytes else "")
    assert message in text, text
    assert not (tmp_path / "out" / "details.json").exists()


# ----------------------------------------------------------------------------- many workers, real audio


def _source_audio(folder: Path, model) -> dict[str, torch.Tensor]:
    """Each lossless sample's audio as the model sees it: decoded whole, conformed and resampled."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                key, ext = member.name.split(".", 1)
                if ext in ("wav", "flac"):
                    audio, rate = decode_audio(t.extractfile(member).read(), ext)
                    out[key] = resample(conform_channels(audio, model.in_channels), rate, model.sample_rate)
    return out


def test_every_file_exactly_once_with_two_workers_and_each_long_one_in_one_piece(mixed_shards, tmp_path):
    folder, _, samples = mixed_shards
    paths = demo_model_paths()
    model = load(paths)
    ratio, chunk, overlap = model.downsampling_ratio, 400, 64   # --max-seconds 0.58: most files are chunked
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    cli_run(paths, dataset, tmp_path / "out", "--chunking", "full", "--overlap", overlap, "--latent-mode", "mean",
            "--max-seconds", max_seconds_for(chunk, model), "--batch-size", 4, "--bucket-buffer", 8,
            "--num-workers", 2)
    details = assert_exactly_once(tmp_path / "out", samples)   # one window per file, in both forms
    assert details["stats"]["units_done"] == 3 and details["stats"]["errors"] == 0
    found = read_folder_layout(tmp_path / "out")
    assert len(found) == len(samples)
    chunked = 0
    for latent, md in found.values():
        n = md["total_length"]
        assert md["valid_length"] == n and latent.shape[-1] == math.ceil(n / ratio) == md["latent_length"]
        chunked += "overlap" in md
    assert chunked > len(samples) // 2
    sources = _source_audio(folder, model)
    longest = sorted(sources, key=lambda k: -sources[k].shape[-1])[:3]   # the reference encodes on one core: a few
    for latent, md in found.values():
        n = md["total_length"]
        if md["__key__"] in longest:   # lossless: the reference is the whole file's SA3 chunked encode
            audio = sources[md["__key__"]]
            assert audio.shape[-1] == n and md["encoded_chunks"] > 3
            expected = sa3_encode_audio(lambda x: model.encode(x, mode="mean"), F.pad(audio[None], (0, -n % ratio)),
                                        chunked=True, overlap=overlap, chunk_size=chunk, downsampling_ratio=ratio)[0]
            # the reader resamples each chunk from its own stretch of the source: rounding of the resampler
            np.testing.assert_allclose(latent, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_verify_re_encodes_a_chunked_file_the_way_the_run_did(mixed_shards, tmp_path):
    """`wds-encode verify` re-encodes a file written with --overlap chunk by chunk, each chunk with its own
    key-seeded noise (--latent-mode sample), and joins them: the stored latents are reproduced."""
    folder, paths, _ = mixed_shards
    model_paths = demo_model_paths()
    model = load(model_paths)
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(paths[0])}],
                                   random_crop=False)
    cli_run(model_paths, dataset, tmp_path / "out", "--chunking", "full", "--overlap", 8, "--max-seconds",
            max_seconds_for(600, model), "--batch-size", 4)
    chunked = {md["key"] for _, md in read_folder_layout(tmp_path / "out").values() if "overlap" in md}
    assert len(chunked) > 8
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "out"), "-n", "12"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[1:13]]
    assert sum(row[5] in chunked for row in rows) > 3
    assert all(float(row[4]) < 1e-4 for row in rows)
    assert "OK: 12 windows match this model" in result.output


# ----------------------------------------------------------------------------- Stable Audio 3's own chunked encode


@pytest.mark.parametrize("name", ["same_tiny_shift", "same_tiny_two_stage", "same_tiny_window"])
def test_sa3_same_models_stitch_like_sa3s_own_chunked_encode(name, tmp_path):
    """SA3's `encode_audio(long_input, chunked=True, chunk_size, overlap)` as SA3 computed it
    (golden-sa3/*/chunked_latents.npy), through the command: within 1e-4."""
    folder = SA3_GOLDEN / name
    meta = json.loads((folder / "meta.json").read_text())
    paths = (folder / "model_config.json", folder / "model.safetensors")
    model = load(paths)
    long_input = np.load(folder / "long_input.npy")[0]   # [2, L] at the model's rate
    write_tar(tmp_path / "in" / "sa3-000.tar", [("long.wav", wav(long_input, model.sample_rate))])
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "sa3", "path": str(tmp_path / "in")}],
                                   random_crop=False)
    cli_run(paths, dataset, tmp_path / "out", "--chunking", "full", "--overlap", meta["overlap"],
            "--max-seconds", max_seconds_for(meta["chunk_size"], model), "--batch-size", 2, "--latent-mode", "mean")
    [(latent, md)] = read_folder_layout(tmp_path / "out").values()
    expected = np.load(folder / "chunked_latents.npy")[0]
    assert latent.shape == expected.shape and md["encoded_chunks"] > 1
    np.testing.assert_allclose(latent, expected, rtol=0, atol=1e-4)
    [(shard_latent, _)] = read_latent_shards(tmp_path / "out").values()
    assert np.array_equal(shard_latent, latent)


# ----------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_an_hour_long_file_is_one_sequence_encoded_in_the_memory_of_one_window(tmp_path):
    """--max-seconds 60 --overlap 16: the hour-long file is read, resampled and encoded a chunk at a time and
    only its latents accumulate: the peak RSS is about that of a 10-minute file (holding the audio: 1.2 GB
    more)."""
    from safetensors.torch import save_file
    from test_full_length import TINY_MODEL, _run_measuring_peak_rss
    torch.manual_seed(0)
    tiny = build_autoencoder(TINY_MODEL, with_decoder=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text(json.dumps(TINY_MODEL))
    save_file({f"autoencoder.{k}": v.contiguous() for k, v in tiny.state_dict().items()},
              str(tmp_path / "model" / "model.safetensors"))
    short_peak, _ = _run_measuring_peak_rss(tmp_path / "short", 10 * 60, ("--overlap", "16"))
    long_peak, found = _run_measuring_peak_rss(tmp_path / "long", 3600, ("--overlap", "16"))
    whole_file_mb = 3600 * 44100 * 2 * 4 / 2**20
    assert long_peak < short_peak + whole_file_mb / 4, (long_peak, short_peak)
    total = 3600 * 44100
    [(latent, md)] = [(lat, md) for lat, md in found.values() if md["__key__"] == "long"]
    assert latent.shape == (2, math.ceil(total / 64)) and md["valid_length"] == total
    chunk, frames = 60 * 44100 // 64, math.ceil(total / 64)
    assert md["encoded_chunks"] == len(plan_chunks(total, chunk * 64, 16, 64)) == 61   # 60 hops and the anchored one
    assert math.ceil((frames - chunk) / (chunk - 16)) + 1 == 61
    assert np.isfinite(latent).all() and np.abs(latent).max() > 0
    assert len(found) == 1 + 6
