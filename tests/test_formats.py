"""The formats real corpora come in, through the real command: AAC in `.m4a`, in `.mp4` beside a video
stream, in `.mov` and as raw ADTS `.aac`, Opus in `.webm`, FLAC in `.mka`, WMA; all made by PyAV's own
encoders (`synth.encode_audio_bytes`), all in one tar with FLAC copies of the same clip to compare with.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import read_folder_layout, read_latent_shards, run_cli, write_dataset_config, write_tar
from wds_encode.pipeline.audio import conform_channels, decode_audio, resample
from wds_encode.synth import encode_audio_bytes, synth_waveform

RATE = 44100          # the demo model's rate
SECONDS = 1.5
AAC_PRIMING = 1024    # FFmpeg's AAC encoder primes every stream with one frame; MP4's edit list records it
WMA_FRAME = 2048      # FFmpeg's WMA decoder drops its first frame: nothing in ASF records that
# Where each clip's audio starts against the source (samples at its own rate), and its FLAC reference.
FORMATS = {
    "m4a": (0, "ref44"), "mp4": (0, "ref44"), "mov": (0, "ref44"), "mka": (0, "ref44"),
    "webm": (0, "ref48"), "aac": (AAC_PRIMING, "ref_aac"), "wma": (-WMA_FRAME, "ref_wma"),
}


def clip(rate: int) -> np.ndarray:
    """A stereo chord of SECONDS at `rate`, [N, 2]: the same music at 44.1 and 48 kHz."""
    return synth_waveform("chord", SECONDS, rate, 2, np.random.default_rng(7))


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory, demo_model):
    tmp = tmp_path_factory.mktemp("formats")
    at44, at48 = clip(RATE), clip(48000)
    members = [(f"clip_{ext}.{ext}", encode_audio_bytes(at48 if ext == "webm" else at44, 48000 if ext == "webm"
                                                        else RATE, ext)) for ext in FORMATS]
    primed = np.concatenate([np.zeros((AAC_PRIMING, 2), np.float32), at44])
    members += [("ref44.flac", encode_audio_bytes(at44, RATE, "flac")),
                ("ref48.flac", encode_audio_bytes(at48, 48000, "flac")),
                ("ref_aac.flac", encode_audio_bytes(primed, RATE, "flac")),
                ("ref_wma.flac", encode_audio_bytes(at44[WMA_FRAME:], RATE, "flac"))]
    write_tar(tmp / "in" / "formats-000000.tar", members)
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "fmt", "path": str(tmp / "in")}])
    out = tmp / "out"
    result = run_cli("--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
                     "--output-path", out, "--chunking", "full", "--latent-mode", "mean", "--num-workers", 1,
                     "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(members), out


def by_key(found: dict) -> dict:
    return {md["key"]: (latent, md) for latent, md in found.values()}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_format_is_encoded_in_both_output_forms(formats_run):
    _, out = formats_run
    folder, shards = by_key(read_folder_layout(out)), by_key(read_latent_shards(out))
    assert set(folder) == set(shards) == {f"clip_{ext}" for ext in FORMATS} | {"ref44", "ref48", "ref_aac", "ref_wma"}
    for key, (latent, md) in folder.items():
        assert np.array_equal(latent, shards[key][0]) and md == shards[key][1], key
    assert (out / "errors.jsonl").read_text() == ""


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_each_clip_has_its_source_length_within_the_codecs_recorded_priming(formats_run, ext):
    """MP4/MOV/M4A (edit list), WebM (Opus pre-skip), Matroska FLAC: exactly the source's length. Raw ADTS
    records no priming: its length is the source's plus the priming and the last frame's padding, and its
    windows say `decoder_delay_unknown`. WMA: the source's, less at most its first frame."""
    _, out = formats_run
    stored = by_key(read_folder_layout(out))
    md = stored[f"clip_{ext}"][1]
    reference = stored["ref48" if ext == "webm" else "ref44"][1]
    source = reference["total_length"]
    if ext == "aac":
        assert source + AAC_PRIMING <= md["total_length"] <= source + 2 * AAC_PRIMING
        assert md["decoder_delay_unknown"] is True
    elif ext == "wma":
        assert source - WMA_FRAME <= md["total_length"] < source
    else:
        assert md["total_length"] == source
    if ext != "aac":
        assert "decoder_delay_unknown" not in md
    assert md["source_sample_rate"] == (48000 if ext == "webm" else RATE) and md["source_channels"] == 2


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_each_clips_latents_are_close_to_the_flac_ones(formats_run, ext):
    """The bound comes from the codec's own error on this clip: the decoded audio's relative difference
    from the FLAC (measured: AAC at 192 kb/s 0.031, an SNR of 30 dB; Opus 0.005; WMA 0.006; FLAC in
    Matroska 0) sets how far its latents may be from the FLAC's: 4 times that, plus 0.01 for the frames
    at the edges, whose receptive field reaches into the zero padding (measured: 0.6 to 2.4 times, the
    encoder passes coding noise on roughly in proportion). A clip 1024 samples off gives 1.3."""
    members, out = formats_run
    start, ref_key = FORMATS[ext]
    stored = by_key(read_folder_layout(out))
    latent, md = stored[f"clip_{ext}"]
    ref_latent, _ = stored[ref_key]
    clip_audio, clip_rate = decode_audio(members[f"clip_{ext}.{ext}"], ext)
    ref_audio, ref_rate = decode_audio(members[f"{ref_key}.flac"], "flac")
    assert clip_rate == ref_rate
    frames = min(clip_audio.shape[1], ref_audio.shape[1])
    audio_error = relative_difference(clip_audio[:, :frames].numpy(), ref_audio[:, :frames].numpy())
    assert audio_error < 0.2, f"the decoded .{ext} is not the clip ({audio_error:.3f})"
    # the last frame of each sees the padding after a different length: compare the frames both cover fully
    common = min(latent.shape[-1], ref_latent.shape[-1]) - 1
    latent_error = relative_difference(latent[:, :common], ref_latent[:, :common])
    assert latent_error <= 4 * audio_error + 0.01, f".{ext}: latents {latent_error:.4f}, audio {audio_error:.4f}"
    shifted = relative_difference(latent[:, 16:common], ref_latent[:, :common - 16])   # 1024 samples off
    assert shifted > 4 * audio_error + 0.01, "the bound does not tell a misaligned clip"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_2000_short_aac_files_through_one_reader_keep_its_memory_flat(tmp_path):
    """Each file opens and closes its own demuxer and decoder: nothing of them may stay behind. A leak of
    one decoded frame a file would add 12 MB over the last 1,500 files, a leaked demuxer much more."""
    from wds_encode.pipeline.reader import Reader, ReaderOptions, WindowItem
    from wds_encode.pipeline.sources import Shard

    clips = [encode_audio_bytes(synth_waveform("pluck", 0.1, RATE, 2, np.random.default_rng(i)), RATE, "m4a")
             for i in range(20)]
    tar = write_tar(tmp_path / "aac-000000.tar", [(f"s{i:05d}.m4a", clips[i % 20]) for i in range(2000)])
    shard = Shard(url=str(tar), dataset_id="aac", name="aac-000000")
    reader = Reader([shard], ReaderOptions(sample_rate=RATE, channels=2, sample_size=4096))
    peaks, windows = {}, 0
    for item in reader.read_shard(shard):
        if isinstance(item, WindowItem):
            windows += 1
            if windows % 50 == 0:
                stage = "warm" if windows <= 500 else "last" if windows > 1500 else "middle"
                peaks[stage] = max(peaks.get(stage, 0.0), _rss_mb())
        else:
            assert not item.errors and item.windows == 2000
    assert windows == 2000
    assert peaks["last"] - peaks["warm"] < 8, peaks
