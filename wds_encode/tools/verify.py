"""`wds-encode verify`: decode a sample of written windows and compare them with their source.

Encoding with the wrong checkpoint, config or method silently gives garbage latents; a round trip
catches it before a week of training does. For N windows of an output folder (from its folder
layout, or from its latent shards when it was written with `--no-folder`) this reports:
- `snr_db`: SNR of decode(latents) against the source audio window (needs a decoder),
- `mel`: mean absolute log-mel distance between the two,
- `rank`: how many other sampled sources the decoded window is closer to (in log-mel distance)
  than to its own; 0 means it is closest to its own source. Waveform SNR depends on phase, which
  many codecs do not keep, so the default judgement uses this self-calibrating ranking: decoded
  audio that is not closer to its own source than to others is garbage, whatever the model,
- `reencode`: relative difference between the stored latents and the source window re-encoded
  now with the given model (same key-seeded noise), which is ~0 only for the very model, options
  and checkpoint that wrote them,
and whether the checkpoint is the one recorded in details.json.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..pipeline.audio import conform_channels, decode_audio, plan_chunks, resample
from ..pipeline.encoder import BatchEncoder, PRECISION_DTYPES
from ..pipeline.manifest import RunManifest, file_sha256
from ..pipeline.reader import noise_key
from ..storage import Place, S3Options, Storage
from ..pipeline.writers import folder_file_id

REENCODE_TOLERANCE = 1e-3   # relative L2; fp32 reruns agree to ~1e-6, low precision to ~1e-2 at worst
MIN_OWN_SOURCE_FRACTION = 0.5  # of windows whose decoding is closest to their own source


@dataclass
class WindowCheck:
    latent_id: str
    key: str
    snr_db: Optional[float]
    mel_distance: Optional[float]
    reencode_error: Optional[float]
    problem: Optional[str] = None
    rank: Optional[int] = None   # other sources closer to the decoded window than its own


def pick_windows(place: Place, n: int, seed: int = 0) -> list[str]:
    """N latent files (relative paths) of the folder layout, spread over the run (deterministic for a seed):
    the committed ones the unit records list (an interrupted run's leftovers are not the output), or every
    one found where there are no records."""
    committed = [f"{r['rank']}/{i}.npy" for r in RunManifest(place).records() for i in r.get("folder_ids", ())]
    files = sorted(committed or (rel for rel in place.list() if rel.endswith(".npy")
                                 and folder_file_id(rel) is not None))
    if not files:
        raise FileNotFoundError(f"{place.url}: no latent files (OUT/RANK/ID.npy) to verify")
    if len(files) <= n:
        return files
    rng = np.random.default_rng(seed)
    return sorted(files[i] for i in rng.choice(len(files), size=n, replace=False))


def stored_windows(place: Place, n: int, seed: int = 0) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(window id, stored latents, metadata) of N windows spread over the run (deterministic for a seed):
    the folder layout's (`pick_windows`), or, when units were written without it (`--no-folder`), the
    committed windows the records list, read from the units' latent shards (members `KEY.npy` + `KEY.json`)."""
    records = RunManifest(place).records()
    if not any(not r.get("folder_ids") and r.get("latent_shards") for r in records):
        for npy in pick_windows(place, n, seed):
            md = json.loads(place.read(npy[:-4] + ".json").decode("utf-8"))
            yield npy.rsplit("/", 1)[-1][:-4], np.load(io.BytesIO(place.read(npy)), allow_pickle=False), md
        return
    from .inspect import output_windows
    missing: list[str] = []
    problems: list[str] = []
    found = 0
    for latent, md, where in output_windows(place, records, max_windows=n, seed=seed, missing=missing,
                                            problems=problems):
        found += 1
        yield str(md.get("latent_id") or where), latent, md
    if not found:
        raise FileNotFoundError(f"{place.url}: no committed window to verify in the folder layout or the latent "
                                f"shards{' (' + problems[0] + ')' if problems else ''}")


def read_source(path: str, storage: Storage, options: Optional[S3Options] = None) -> tuple[bytes, str]:
    """Bytes and extension of the audio a window came from: a file, or `SHARD.tar#MEMBER` (local or s3://)."""
    url, _, member = path.rpartition("#")
    if url and url.endswith(".tar"):
        with storage.open_read(url, options) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.name == member:
                    data = tar.extractfile(info).read()
                    return data, member.rsplit(".", 1)[-1].lower()
        raise FileNotFoundError(f"member {member!r} not found in {url}")
    return storage.read_bytes(path, options), path.rsplit(".", 1)[-1].lower()


def dataset_s3_options(details: dict, dataset_id: Optional[str]) -> Optional[S3Options]:
    """The profile / endpoint / region the run used for a dataset's s3:// shards."""
    for entry in details.get("dataset_config", {}).get("datasets", ()):
        if entry.get("id") == dataset_id:
            return S3Options(profile=entry.get("profile"), endpoint_url=entry.get("endpoint_url"),
                             region=entry.get("region"))
    return None


def source_window(md: dict, channels: int, sample_rate: int, sample_size: int, storage: Optional[Storage] = None,
                  options: Optional[S3Options] = None) -> tuple[torch.Tensor, int]:
    """The window as the encoder saw it (zero-padded to sample_size) and its real length."""
    data, ext = read_source(md["path"], storage or Storage(), options)
    audio, rate = decode_audio(data, ext)
    audio = resample(conform_channels(audio, channels), rate, sample_rate)
    start, length = int(md["offset"]), int(md["valid_length"])
    window = torch.zeros(channels, sample_size)
    segment = audio[:, start:start + length]
    window[:, :segment.shape[1]] = segment
    return window, segment.shape[1]


def encoded_size(md: dict, chunking: Optional[str], sample_size: int, ratio: int) -> int:
    """How many samples the run encoded for a window (its audio, then zeros), as `plan_windows` sized it:
    --sample-size, or with `--chunking full` the window's own length rounded up to the downsampling ratio
    (a file written with --overlap: the whole file so rounded, which its chunks cover exactly). That
    rounding can exceed both --sample-size and the audio, so the window is sized by it, not cut from them."""
    valid = int(md["valid_length"])
    if chunking == "full":
        return -(-valid // ratio) * ratio
    return max(sample_size, valid)


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    noise = (reference - estimate).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-20) / noise)


def log_mel(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Log-mel spectrogram of the channel mix of [C, N] audio (zero-padded to the window)."""
    import torchaudio
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=1024, hop_length=256, n_mels=64)
    return torch.log10(mel(audio.mean(0)) + 1e-5)


def mel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute log-mel difference over the frames both have (`full` windows differ in length)."""
    frames = min(a.shape[-1], b.shape[-1])
    return float((a[..., :frames] - b[..., :frames]).abs().mean())


def _latents_for_decoder(model, stored: np.ndarray, md: dict) -> torch.Tensor:
    mode = md.get("latent_mode", "sample")
    latents = torch.from_numpy(np.asarray(stored)).unsqueeze(0)
    if mode == "tokens":
        return model.bottleneck.decode_tokens(latents.long())
    latents = latents.float()
    if mode == "params":
        latents = latents.chunk(2, dim=1)[0]  # the mean
    return latents


def _reencode(encoder: BatchEncoder, window: torch.Tensor, mask: torch.Tensor, md: dict) -> torch.Tensor:
    """The window's latents as the run computed them: in one pass, or for a file encoded in overlapping
    chunks (`chunk_frames`, `overlap` in its metadata; --overlap) chunk by chunk, each with its own noise,
    joined as the run joined them."""
    if not md.get("overlap"):
        return encoder.encode(window.unsqueeze(0), mask, [noise_key(md["source_shard"], md["key"])]).latents[0]
    ratio = encoder.model.downsampling_ratio
    size = int(md["chunk_frames"]) * ratio
    joined = None
    for chunk in plan_chunks(int(md["valid_length"]), size, int(md["overlap"]), ratio):
        piece = window[:, chunk.offset:chunk.offset + size].unsqueeze(0)
        real = (torch.arange(size) < chunk.valid).unsqueeze(0)
        latents = encoder.encode(piece, real, [noise_key(md["source_shard"], md["key"], chunk.index)]).latents[0]
        if joined is None:
            joined = latents.new_zeros((*latents.shape[:-1], chunk.frames))
        joined[..., chunk.dst_start:chunk.dst_start + chunk.length] = \
            latents[..., chunk.src_start:chunk.src_start + chunk.length]
    return joined


def verify_output(place: Place, model, *, details: dict, n: int = 8, seed: int = 0,
                  device: torch.device = torch.device("cpu"), storage: Optional[Storage] = None) -> list[WindowCheck]:
    """Check N windows of `place` against their sources with `model` (loaded with its decoder if any)."""
    storage = storage or Storage()
    args = details.get("args", {})
    sample_size = int(details["sample_size"])
    mode = args.get("latent_mode", "sample")
    precision = args.get("precision") or ("fp16" if args.get("model_half") else "fp32")
    is_discrete = bool(args.get("is_discrete"))
    encoder = BatchEncoder(model, device=device, precision=precision if precision in PRECISION_DTYPES else "fp32",
                           latent_mode=mode, is_discrete=is_discrete, seed=int(args.get("seed", 0)))
    checks: list[WindowCheck] = []
    mels: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for latent_id, stored, md in stored_windows(place, n, seed):
        check = WindowCheck(latent_id, md.get("key", md.get("__key__", "")), None, None, None)
        try:
            window, length = source_window(md, model.in_channels, model.sample_rate,
                                           encoded_size(md, args.get("chunking"), sample_size,
                                                        model.downsampling_ratio), storage,
                                           dataset_s3_options(details, md.get("dataset_id")))
        except Exception as exc:
            check.problem = f"source not readable: {exc}"
            checks.append(check)
            continue
        mask = torch.zeros(1, window.shape[-1], dtype=torch.bool)
        mask[0, :length] = True
        again = _reencode(encoder, window, mask, md)
        if again.shape != stored.shape:
            check.reencode_error = math.inf
            check.problem = f"latent shape {list(stored.shape)} but this model gives {list(again.shape)}"
        elif is_discrete:
            check.reencode_error = float((again.numpy() != stored).mean())
        else:
            ref = torch.from_numpy(stored.astype(np.float32))
            check.reencode_error = float((again - ref).norm() / ref.norm().clamp_min(1e-12))
        if model.decoder is not None and check.problem is None:
            with torch.inference_mode():
                decoded = model.decode(_latents_for_decoder(model, stored, md).to(device))[0].float().cpu()
            decoded = decoded[:, :window.shape[1]].clone()
            decoded[:, length:] = 0  # compare the real audio only
            check.snr_db = snr_db(window[:, :length], decoded[:, :length])
            mels.append((len(checks), log_mel(window, model.sample_rate), log_mel(decoded, model.sample_rate)))
        checks.append(check)
    _rank_against_other_sources(checks, mels)
    return checks


def _rank_against_other_sources(checks: list[WindowCheck], mels: list[tuple[int, torch.Tensor, torch.Tensor]]
                                ) -> None:
    """Fill `mel_distance` (to the own source) and `rank` (other sources closer than the own one)."""
    for i, _source, decoded in mels:
        own = None
        distances = []
        for j, source, _ in mels:
            d = mel_distance(decoded, source)
            if i == j:
                own = d
            else:
                distances.append(d)
        checks[i].mel_distance = own
        if distances:
            checks[i].rank = sum(d <= own for d in distances)


def checkpoint_matches(details: dict, ckpt_path: Path) -> Optional[bool]:
    recorded = details.get("run_identity", {}).get("checkpoint_sha256")
    if not recorded:
        return None
    return file_sha256(ckpt_path) == recorded


@dataclass
class Figures:
    """What `verdict` judges an output by, over the checked windows (None: nothing to take it from)."""
    windows: int
    broken: int                          # windows that could not be checked
    reencode: Optional[float]            # median relative difference (discrete: fraction of tokens that differ)
    own_source: Optional[tuple[int, int]]  # (decoded windows closest to their own source, ranked windows); >= 2
    mel: Optional[float]                 # median log-mel distance to the own source
    snr_db: Optional[float]              # median round-trip SNR
    negative_snr: int                    # windows whose round-trip SNR is below 0 dB


def figures(checks: list[WindowCheck]) -> Figures:
    def median(values):
        return float(np.median(values)) if values else None
    ranked = [c.rank for c in checks if c.rank is not None]
    snrs = [c.snr_db for c in checks if c.snr_db is not None]
    return Figures(windows=len(checks), broken=sum(1 for c in checks if c.problem),
                   reencode=median([c.reencode_error for c in checks if c.reencode_error is not None]),
                   own_source=(sum(r == 0 for r in ranked), len(ranked)) if len(ranked) >= 2 else None,
                   mel=median([c.mel_distance for c in checks if c.mel_distance is not None]),
                   snr_db=median(snrs), negative_snr=sum(1 for v in snrs if v < 0))


def verdict(checks: list[WindowCheck], min_snr_db: Optional[float] = None) -> list[str]:
    """Human-readable reasons to distrust the output; empty when it looks right."""
    reasons = []
    f = figures(checks)
    broken = [c for c in checks if c.problem]
    if broken:
        reasons.append(f"{len(broken)} windows could not be checked ({broken[0].problem})")
    if f.reencode is not None and f.reencode > REENCODE_TOLERANCE:
        reasons.append(f"re-encoding the sources gives different latents (median relative difference "
                       f"{f.reencode:.3g} > {REENCODE_TOLERANCE}): this is not the model, checkpoint or "
                       "options that wrote this output")
    if f.own_source is not None:
        closest, ranked = f.own_source
        own = closest / ranked
        if own < MIN_OWN_SOURCE_FRACTION:
            reasons.append(f"decoded windows are not recognisably their sources: only {own:.0%} are closer to their "
                           f"own source than to the other {ranked - 1} sampled ones (log-mel distance); "
                           "wrong checkpoint or config")
    if min_snr_db is not None and f.snr_db is not None and f.snr_db < min_snr_db:
        reasons.append(f"median round-trip SNR {f.snr_db:.1f} dB < --min-snr {min_snr_db} dB")
    return reasons


def format_figures(checks: list[WindowCheck], min_snr_db: Optional[float] = None) -> str:
    """The figures `verdict` judged by, each beside the limit it is held to, printed whatever the verdict."""
    f = figures(checks)
    lines = []
    if f.broken:
        lines.append(f"{'windows not checked':<28} {f.broken} of {f.windows}  (flagged when any)")
    lines.append(f"{'median re-encode difference':<28} "
                 + ("-" if f.reencode is None else f"{f.reencode:.3g}")
                 + f"  (flagged above {REENCODE_TOLERANCE:g}; ~0 only for the model and options that wrote it)")
    if f.own_source is None:
        lines.append(f"{'closest to own source':<28} -  (needs at least 2 decoded windows)")
    else:
        closest, ranked = f.own_source
        lines.append(f"{'closest to own source':<28} {closest} of {ranked} decoded windows ({closest / ranked:.0%})  "
                     f"(flagged below {MIN_OWN_SOURCE_FRACTION:.0%}; log-mel distance to every sampled source)")
    lines.append(f"{'median mel distance':<28} " + ("-" if f.mel is None else f"{f.mel:.3f}")
                 + "  (to the own source; judged only through the ranking above)")
    snr_limit = ("not judged; --min-snr DB flags a median below DB" if min_snr_db is None
                 else f"flagged below --min-snr {min_snr_db:g} dB")
    lines.append(f"{'median SNR':<28} " + ("-" if f.snr_db is None else f"{f.snr_db:.2f} dB") + f"  ({snr_limit})")
    return "\n".join(lines)


def negative_snr_note(checks: list[WindowCheck], min_snr_db: Optional[float] = None) -> Optional[str]:
    """One line on what a negative round-trip SNR means for an output `verdict` found right; None if none is."""
    f = figures(checks)
    if not f.negative_snr:
        return None
    judged = ("verify does not judge by SNR unless --min-snr is given" if min_snr_db is None
              else f"verify judges SNR only by its median, against --min-snr {min_snr_db:g} dB")
    return (f"note: {f.negative_snr} of {f.windows} windows have a negative SNR (the difference between the "
            f"decoded waveform and its source holds more energy than the source): this model's round trip is lossy "
            f"(a small model, or one that does not keep phase), and {judged}; the output is judged by re-encoding "
            f"reproducing the stored latents and by decoded windows being closest to their own source")


def format_checks(checks: list[WindowCheck]) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)
    lines = [f"{'window':<24} {'snr_db':>8} {'mel':>7} {'rank':>5} {'reencode':>9}  key"]
    for c in checks:
        lines.append(f"{c.latent_id:<24} {num(c.snr_db, '8.2f')} {num(c.mel_distance, '7.3f')} "
                     f"{num(c.rank, '5d')} {num(c.reencode_error, '9.2e')}  {c.key}"
                     + (f"  ({c.problem})" if c.problem else ""))
    return "\n".join(lines)


def load_details(place: Place) -> dict:
    details = RunManifest(place).load_details()
    if details is None:
        raise FileNotFoundError(f"{place.url}: no details.json; is this a wds-encode output folder?")
    return details
