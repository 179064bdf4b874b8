"""`wds-encode inspect OUT|SHARD_URLS`: the numbers to know about an encoded output before training on it.

A latent diffusion model or an audio LM trained on the output needs its size (units, files,
windows, audio hours per dataset), its format (latent shape, dtype, mode, how much is padding),
what went wrong while encoding (errors grouped by reason), and the latent statistics its config
asks for: per-channel mean, std, min and max, and the scale factor (1 / std of all latent values,
Stable Diffusion's `scale_factor`). Discrete (`--is-discrete`) outputs get per-quantizer token
histograms, codebook usage and perplexity instead.

Every statistic is over the unpadded frames only (where the window's `padding_mask` is 1): the
zero-padded tail of a short window is the encoder's view of silence that is not in the data.
They are computed in one streaming pass in float64 (a per-window Chan/Welford merge), so memory
stays bounded whatever the output's size; the plot gets a seeded reservoir sample of frames.

An output (a folder or s3:// prefix) is read through its manifest: only the windows that unit
records list, so uncommitted leftovers never count; from the folder layout, or, for units written
without it (`--no-folder`), from the latent tars the records list. Latent shard tars can also be
inspected on their own (paths, URLs or brace patterns); then there are no unit or error counts to
report.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Optional

import numpy as np

from ..pipeline.records import UnitRecord
from .status import output_parts, read_output, record_totals, run_state
from ..storage import Place, Storage, StorageError

STATS_OVER = "unpadded frames (padding_mask == 1)"
RESERVOIR_FRAMES = 4096          # frames kept (all channels of each) for the plot's distributions
DURATION_RESERVOIR = 100_000     # file durations kept for the plot's histogram
READ_BATCH = 32                  # windows read per place.read_many call (parallel requests on S3)
MAX_REASON_GROUPS = 50           # distinct error reasons kept; the rest are counted as "(other reasons)"
REASON_LENGTH = 100


class InspectError(ValueError):
    """The windows cannot be summarised together (different latent formats)."""


@dataclass
class Inspection:
    """The report (what `--json` prints) and the bounded samples the plot draws."""

    report: dict
    frames: Optional[np.ndarray] = None      # [n, C] reservoir of unpadded frames (continuous outputs)
    token_counts: Optional[list[np.ndarray]] = None  # per quantizer, counts per token id (discrete outputs)
    durations: Optional[np.ndarray] = None   # seconds, a reservoir of file durations


# ---------------------------------------------------------------------------------------- streaming parts

class ChannelMoments:
    """Per-channel count, mean, sum of squared deviations (M2), min and max, merged window by window."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    def add(self, values: np.ndarray) -> None:
        """values [C, n]: n more frames of every channel (Chan et al.'s parallel merge, exact in float64)."""
        n = values.shape[1]
        if n == 0:
            return
        values = values.astype(np.float64, copy=False)
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total
        np.minimum(self.min, values.min(axis=1), out=self.min)
        np.maximum(self.max, values.max(axis=1), out=self.max)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count else np.full_like(self.m2, np.nan)

    def pooled(self) -> tuple[float, float]:
        """(mean, population variance) of every value of every channel together."""
        if not self.count:
            return math.nan, math.nan
        mean = float(self.mean.mean())  # equal counts per channel
        var = float((self.m2.sum() + self.count * ((self.mean - mean) ** 2).sum()) / (self.count * len(self.mean)))
        return mean, var


class Reservoir:
    """A uniform sample of at most `size` rows of everything added (algorithm R, seeded)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.rng = rng
        self.seen = 0
        self.rows: Optional[np.ndarray] = None
        self.filled = 0

    def add(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if self.rows is None:
            self.rows = np.empty((self.size, *rows.shape[1:]), dtype=np.float64)
        take = min(self.size - self.filled, len(rows))
        self.rows[self.filled:self.filled + take] = rows[:take]
        self.filled += take
        rest = rows[take:]
        if len(rest):
            index = self.seen + take + np.arange(len(rest))   # 0-based position of each row in the stream
            slots = (self.rng.random(len(rest)) * (index + 1)).astype(np.int64)
            keep = slots < self.size
            self.rows[slots[keep]] = rest[keep]
        self.seen += len(rows)

    def values(self) -> np.ndarray:
        return np.empty((0,)) if self.rows is None else self.rows[:self.filled].copy()


def reason_kind(reason: str) -> str:
    """An error reason without what varies per sample (member name, quoted keys, numbers), to group by."""
    text = re.sub(r"^[^\s:]+\.[A-Za-z0-9]{1,5}: ", "", str(reason))
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return text if len(text) <= REASON_LENGTH else text[:REASON_LENGTH - 1] + "…"


def group_problems(problems: Iterable[dict]) -> list[dict]:
    """Errors and warnings by (level, reason kind), most frequent first, each with one example."""
    groups: dict[tuple[str, str], dict] = {}
    for problem in problems:
        level = str(problem.get("level", "error"))
        kind = reason_kind(problem.get("reason", ""))
        if (level, kind) not in groups and len(groups) >= MAX_REASON_GROUPS:
            kind = "(other reasons)"
        group = groups.setdefault((level, kind), {
            "level": level, "reason": kind, "count": 0,
            "example": {k: problem.get(k) for k in ("shard", "key", "reason")}})
        group["count"] += 1
    return sorted(groups.values(), key=lambda g: (g["level"] != "error", -g["count"], g["reason"]))


# ---------------------------------------------------------------------------------------- accumulation

@dataclass
class _DatasetCounts:
    windows: int = 0
    files: int = 0
    audio_seconds: float = 0.0
    shards: set = field(default_factory=set)


class LatentSummary:
    """Everything inspect learns from the windows themselves, one window at a time."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.frames = Reservoir(RESERVOIR_FRAMES, rng)
        self.durations = Reservoir(DURATION_RESERVOIR, rng)
        self.windows = 0
        self.shapes: Counter = Counter()
        self.dtypes: Counter = Counter()
        self.mode: Optional[str] = None
        self.channels: Optional[int] = None
        self.total_frames = 0
        self.unpadded_frames = 0
        self.moments: Optional[ChannelMoments] = None        # continuous: values (params: the means)
        self.posterior_std: Optional[ChannelMoments] = None  # params: the std channels
        self.posterior_var_sum: Optional[np.ndarray] = None  # params: sum of std^2 per channel
        self.codebook_size: Optional[int] = None
        self.token_counts: Optional[list[np.ndarray]] = None
        self.duration_moments = ChannelMoments(1)
        self.nonfinite_windows = 0
        self.mask_problems = 0
        self.datasets: dict[str, _DatasetCounts] = {}

    def add(self, latent: np.ndarray, md: dict, source: str = "") -> None:
        mode = str(md.get("latent_mode", "sample"))
        if latent.ndim != 2:
            raise InspectError(f"{source}: latent of shape {list(latent.shape)}; expected [channels, frames]")
        channels = latent.shape[0]
        if self.mode is None:
            self.mode, self.channels = mode, channels
            self._start(mode, channels, md)
        elif (mode, channels) != (self.mode, self.channels):
            raise InspectError(f"{source}: latent_mode {mode!r} with {channels} channels, but earlier windows have "
                               f"{self.mode!r} with {self.channels}; inspect outputs of different runs separately")
        self.windows += 1
        self.shapes[tuple(latent.shape)] += 1
        self.dtypes[str(latent.dtype)] += 1
        frames = latent.shape[1]
        mask = self._mask(md, frames)
        self.total_frames += frames
        self.unpadded_frames += int(mask.sum())
        self._count_dataset(md, source)
        if mode == "tokens":
            self._add_tokens(latent[:, mask])
        else:
            self._add_values(latent[:, mask])

    def _start(self, mode: str, channels: int, md: dict) -> None:
        if mode == "tokens":
            self.codebook_size = int(md["codebook_size"]) if md.get("codebook_size") else None
            self.token_counts = [np.zeros(self.codebook_size or 0, np.int64) for _ in range(channels)]
        elif mode == "params":
            if channels % 2:
                raise InspectError(f"params latents need an even channel count (mean,std), got {channels}")
            self.moments = ChannelMoments(channels // 2)
            self.posterior_std = ChannelMoments(channels // 2)
            self.posterior_var_sum = np.zeros(channels // 2)
        else:
            self.moments = ChannelMoments(channels)

    def _mask(self, md: dict, frames: int) -> np.ndarray:
        mask = md.get("padding_mask")
        if mask is None or len(mask) != frames:
            self.mask_problems += 1
            return np.ones(frames, bool)
        return np.asarray(mask, dtype=bool)

    def _count_dataset(self, md: dict, source: str) -> None:
        counts = self.datasets.setdefault(str(md.get("dataset_id", "?")), _DatasetCounts())
        counts.windows += 1
        counts.shards.add(md.get("source_shard", source))
        rate = md.get("sample_rate")
        if rate and md.get("valid_length") is not None:
            counts.audio_seconds += float(md["valid_length"]) / float(rate)
        if int(md.get("chunk_index", 0)) == 0:  # a file's first window stands for the file
            counts.files += 1
            duration = md.get("duration")
            if duration is None and rate and md.get("total_length") is not None:
                duration = float(md["total_length"]) / float(rate)
            if duration is not None:
                value = np.array([[float(duration)]])
                self.duration_moments.add(value)
                self.durations.add(value[:, 0])

    def _add_values(self, values: np.ndarray) -> None:
        if not np.isfinite(values).all():
            self.nonfinite_windows += 1
            return
        if self.mode == "params":
            half = values.shape[0] // 2
            mean, std = values[:half], values[half:].astype(np.float64)
            self.moments.add(mean)
            self.posterior_std.add(std)
            self.posterior_var_sum += (std ** 2).sum(axis=1)
            self.frames.add(mean.T)
        else:
            self.moments.add(values)
            self.frames.add(values.T)

    def _add_tokens(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(np.int64, copy=False)
        for q, row in enumerate(tokens):
            counts = np.bincount(row, minlength=len(self.token_counts[q])) if row.size else None
            if counts is None:
                continue
            if len(counts) > len(self.token_counts[q]):
                self.token_counts[q] = np.pad(self.token_counts[q], (0, len(counts) - len(self.token_counts[q])))
            self.token_counts[q] += counts

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        shape = self.shapes.most_common(1)[0][0] if self.shapes else None
        out: dict = {
            "stats_over": STATS_OVER,
            "latent": {
                "mode": self.mode, "channels": self.channels,
                "shape": list(shape) if shape else None,
                "shapes": {"x".join(map(str, s)): n for s, n in self.shapes.most_common()},
                "dtype": self.dtypes.most_common(1)[0][0] if self.dtypes else None,
                "dtypes": dict(self.dtypes.most_common()),
                "frames": self.total_frames, "unpadded_frames": self.unpadded_frames,
                "padding_share": (1 - self.unpadded_frames / self.total_frames) if self.total_frames else None,
            },
            "durations": self._durations(),
        }
        if self.nonfinite_windows:
            out["nonfinite_windows"] = self.nonfinite_windows
        if self.mask_problems:
            out["windows_without_padding_mask"] = self.mask_problems
        if self.mode == "tokens":
            out["tokens"] = self._tokens()
        elif self.moments is not None:
            out["channels"], out["global"] = self._channels()
        return out

    def _durations(self) -> dict:
        m = self.duration_moments
        if not m.count:
            return {"files": 0}
        return {"files": m.count, "mean_seconds": float(m.mean[0]), "min_seconds": float(m.min[0]),
                "max_seconds": float(m.max[0])}

    def _channels(self) -> tuple[list[dict], dict]:
        m = self.moments
        std = np.sqrt(m.var)
        rows = [{"channel": c, "mean": _num(m.mean[c]), "std": _num(std[c]), "min": _num(m.min[c]),
                 "max": _num(m.max[c])} for c in range(len(m.mean))]
        mean, var = m.pooled()
        glob = {"mean": _num(mean), "min": _num(m.min.min()) if m.count else None,
                "max": _num(m.max.max()) if m.count else None, "values": m.count * len(m.mean)}
        if self.mode == "params":
            post_var = self.posterior_var_sum / m.count if m.count else np.full(len(m.mean), np.nan)
            for c, row in enumerate(rows):
                row["posterior_std_mean"] = _num(self.posterior_std.mean[c])
                row["sample_std"] = _num(math.sqrt(m.var[c] + post_var[c]))
            var = var + float(post_var.mean())
            glob["std_of"] = "samples (mean + std * noise): var of the means + mean of std^2, over all channels"
        else:
            glob["std_of"] = f"every value of every channel ({self.mode} latents)"
        glob["std"] = _num(math.sqrt(var)) if var == var else None
        glob["scale_factor"] = _num(1 / math.sqrt(var)) if var == var and var > 0 else None
        glob["pretransform_scale"] = glob["std"]  # stable-audio-tools divides latents by its pretransform's scale
        return rows, glob

    def _tokens(self) -> list[dict]:
        out = []
        for q, counts in enumerate(self.token_counts or []):
            total = int(counts.sum())
            size = self.codebook_size or len(counts)
            p = counts[counts > 0] / total if total else np.zeros(0)
            out.append({"quantizer": q, "codebook_size": size, "tokens": total, "used": int((counts > 0).sum()),
                        "usage": float((counts > 0).sum() / size) if size else None,
                        "perplexity": float(np.exp(-(p * np.log(p)).sum())) if total else None,
                        "counts": counts.tolist()})
        return out

    def dataset_rows(self) -> dict[str, dict]:
        return {name: {"units_seen": len(c.shards), "files": c.files, "windows": c.windows,
                       "audio_hours": c.audio_seconds / 3600} for name, c in sorted(self.datasets.items())}


def _num(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------- reading

def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise InspectError(f"{where}: not a readable .npy latent ({exc})") from None


def _load_json(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InspectError(f"{where}: not readable window metadata ({exc})") from None
    if not isinstance(value, dict):
        raise InspectError(f"{where}: window metadata is a {type(value).__name__}, not a JSON object")
    return value


def _open_object(place: Place, relative: str) -> BinaryIO:
    """A stream of one object of an output (a latent tar), read front to back; on S3 through the place's
    own client options."""
    storage = getattr(place, "storage", None) or Storage()
    return storage.open_read(place.child(relative), getattr(place, "options", None))


def tar_members(stream: BinaryIO, where: str, problems: list[str]) -> Iterator[tuple[str, bytes, bytes]]:
    """(key, npy bytes, json bytes) of every `KEY.json` + `KEY.npy` pair of a latent tar, in tar order.
    A damaged tar, and keys that lack one of the two, are appended to `problems`."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile() or "." not in info.name.rsplit("/", 1)[-1]:
                    continue
                key, ext = info.name.rsplit(".", 1)
                if ext not in ("json", "npy"):
                    continue
                parts = pending.setdefault(key, {})
                parts[ext] = tar.extractfile(info).read()
                if len(parts) == 2:
                    del pending[key]
                    yield key, parts["npy"], parts["json"]
    except tarfile.TarError as exc:
        problems.append(f"{where}: tar read failed ({exc}); the windows before it were counted")
    if pending:
        problems.append(f"{where}: {len(pending)} keys without both .json and .npy (first: {next(iter(pending))})")


def output_windows(place: Place, records: list[UnitRecord], *, max_windows: Optional[int], seed: int,
                   missing: list[str], problems: Optional[list[str]] = None
                   ) -> Iterator[tuple[np.ndarray, dict, str]]:
    """(latent, metadata, where) of the windows the records list, in unit order, or a seeded sample of
    them: from the folder layout where the unit wrote it (where: `RANK/ID.npy`), else from the unit's
    latent shards (a `--no-folder` run; where: `TAR#KEY`, the n-th window of a unit being the n-th
    member pair of its tars). Folder files a record lists but the place lacks are appended to
    `missing`; unreadable tars, and units whose tars hold fewer windows than their record, to `problems`."""
    problems = [] if problems is None else problems
    units = []  # (record, windows it lists)
    for record in sorted(records, key=lambda r: r["shard"]):
        ids = record.get("folder_ids") or ()
        count = len(ids) if ids else (int(record.get("windows", 0)) if record.get("latent_shards") else 0)
        if count:
            units.append((record, count))
    total = sum(count for _, count in units)
    picks = None
    if max_windows is not None and max_windows < total:
        picks = np.sort(np.random.default_rng(seed).choice(total, size=max_windows, replace=False))
    names: list[str] = []   # folder-layout windows waiting to be read together
    offset = 0
    for record, count in units:
        if picks is None:
            positions = range(count)
        else:
            positions = (picks[np.searchsorted(picks, offset):np.searchsorted(picks, offset + count)] - offset).tolist()
        offset += count
        if not len(positions):
            continue
        ids = record.get("folder_ids") or ()
        if ids:
            names.extend(f"{int(record['rank'])}/{ids[i]}" for i in positions)
            if len(names) >= READ_BATCH:
                yield from _folder_windows(place, names, missing)
                names = []
            continue
        yield from _folder_windows(place, names, missing)  # keep unit order
        names = []
        yield from _unit_shard_windows(place, record, set(positions), problems)
    yield from _folder_windows(place, names, missing)


def _folder_windows(place: Place, names: list[str], missing: list[str]) -> Iterator[tuple[np.ndarray, dict, str]]:
    for start in range(0, len(names), READ_BATCH):
        chunk = names[start:start + READ_BATCH]
        found = place.read_many([f"{n}.{ext}" for n in chunk for ext in ("json", "npy")])
        for name in chunk:
            md, npy = found.get(f"{name}.json"), found.get(f"{name}.npy")
            if md is None or npy is None:
                missing.append(f"{name}.{'json' if md is None else 'npy'}")
                continue
            yield (_load_npy(npy, place.child(f"{name}.npy")), _load_json(md, place.child(f"{name}.json")),
                   f"{name}.npy")


def _unit_shard_windows(place: Place, record: dict, wanted: set[int], problems: list[str]
                        ) -> Iterator[tuple[np.ndarray, dict, str]]:
    """The `wanted` windows (positions in the unit) of one unit, from its latent tars; stops reading
    once it has them all."""
    position, left = 0, len(wanted)
    for rel in record.get("latent_shards") or ():
        if not left:
            return
        where = place.child(rel)
        try:
            stream = _open_object(place, rel)
        except StorageError as exc:
            problems.append(f"{where}: listed by the record of {record['shard']} but not readable ({exc})")
            continue
        with stream:
            for key, npy, js in tar_members(stream, where, problems):
                if position in wanted:
                    left -= 1
                    yield _load_npy(npy, f"{where}#{key}.npy"), _load_json(js, f"{where}#{key}.json"), f"{rel}#{key}"
                position += 1
                if not left:
                    return
    if left:
        problems.append(f"{record['shard']}: its record lists {int(record.get('windows', 0))} windows, its latent "
                        f"shards hold {position}")


def shard_windows(storage: Storage, urls: list[str], problems: list[str]) -> Iterator[tuple[np.ndarray, dict, str]]:
    """(latent, metadata, tar URL) of every `KEY.json` + `KEY.npy` pair in the tars, in order."""
    for url in urls:
        with storage.open_read(url) as stream:
            for key, npy, js in tar_members(stream, url, problems):
                yield _load_npy(npy, f"{url}#{key}.npy"), _load_json(js, f"{url}#{key}.json"), url


def expand_shard_urls(specs: list[str], storage: Storage) -> list[str]:
    """Latent tar URLs for paths, s3:// URLs, brace patterns, globs or folders (as dataset paths are)."""
    from ..config import DatasetConfig, DatasetEntry
    from ..pipeline.sources import list_shards
    urls: list[str] = []
    for spec in specs:
        config = DatasetConfig(dataset_type="wds", datasets=[DatasetEntry(id="SHARD_URLS", path=spec)],
                               random_crop=False)
        urls.extend(shard.url for shard in list_shards(config, storage))
    return urls


def is_shard_spec(sources: list[str]) -> bool:
    """SHARD_URLS (tars, brace patterns, globs), not an output folder / prefix."""
    return len(sources) > 1 or any(s.endswith(".tar") or any(c in s for c in "{*?[") for s in sources)


# ---------------------------------------------------------------------------------------- the two inputs

def _accumulate(summary: LatentSummary, windows: Iterator[tuple[np.ndarray, dict, str]],
                limit: Optional[int] = None) -> None:
    for latent, md, source in windows:
        summary.add(latent, md, source)
        if limit is not None and summary.windows >= limit:
            break


def _inspection(summary: LatentSummary, report: dict) -> Inspection:
    report.update(summary.report())
    frames = summary.frames.values() if summary.mode not in (None, "tokens") else None
    return Inspection(report=report, frames=frames, token_counts=summary.token_counts,
                      durations=summary.durations.values())


def inspect_output(place: Place, *, max_windows: Optional[int] = None, seed: int = 0) -> Inspection:
    """Inspect an output folder or s3:// prefix: counts from its records, statistics from the windows
    they list (all of them, or a seeded random `max_windows` of them)."""
    manifest, details = read_output(place)
    found = manifest.read_records()   # the records and the writing markers, in one read
    records = found.records
    summary = LatentSummary(seed)
    missing: list[str] = []
    shard_problems: list[str] = []
    _accumulate(summary, output_windows(place, records, max_windows=max_windows, seed=seed, missing=missing,
                                        problems=shard_problems))
    by_dataset: dict[str, list[dict]] = {}
    for record in records:
        by_dataset.setdefault(record["shard"].split("/", 1)[0], []).append(record)
    read = summary.dataset_rows()
    datasets = {name: {**record_totals(recs), "windows_read": read.get(name, {}).get("windows", 0)}
                for name, recs in sorted(by_dataset.items())}
    total = record_totals(records)
    state = run_state(found.markers, details.get("plan", {}).get("units_total"), len(records),
                      output_parts(place, details, records, found.markers))   # an array job: the parts to run
    report = {
        "output": place.url, "manifest": True, "state": state,
        "datasets": datasets, "total": total,
        "sampling": _sampling(summary.windows, total["windows"], exact=max_windows is None or
                              max_windows >= total["windows"]),
        "errors_by_reason": group_problems(p for r in records for p in r.get("problems", ())),
        "problems": ([f"{len(missing)} files listed by unit records are missing (first: {place.child(missing[0])})"]
                     if missing else []) + shard_problems,
    }
    return _inspection(summary, report)


def inspect_shards(storage: Storage, specs: list[str], *, max_windows: Optional[int] = None,
                   seed: int = 0) -> Inspection:
    """Inspect latent shard tars on their own: counts come from the windows' metadata; without a
    manifest there are no unit, rejection or error counts."""
    urls = expand_shard_urls(specs, storage)
    summary = LatentSummary(seed)
    problems: list[str] = []
    _accumulate(summary, shard_windows(storage, urls, problems), limit=max_windows)
    limited = max_windows is not None and summary.windows >= max_windows
    report = {
        "shards": urls, "manifest": False,
        "note": "no manifest: unit, rejection and error counts are not known (inspect the output folder for them)",
        "datasets": summary.dataset_rows(),
        "total": {"tars": len(urls), "units_seen": sum(len(c.shards) for c in summary.datasets.values()),
                  "files": sum(c.files for c in summary.datasets.values()),
                  "windows": summary.windows,
                  "audio_hours": sum(c.audio_seconds for c in summary.datasets.values()) / 3600},
        "sampling": (_sampling(summary.windows, None, exact=False) if limited
                     else _sampling(summary.windows, summary.windows, exact=True)),
        "problems": problems,
    }
    return _inspection(summary, report)


def _sampling(read: int, total: Optional[int], *, exact: bool) -> dict:
    if exact:
        text = f"all {read} windows: exact statistics"
    elif total is None:
        text = f"the first {read} windows (--max-windows; the total is not known without reading every tar)"
    else:
        text = f"sampled {read} of {total} windows (--max-windows, seeded random choice)"
    return {"windows_read": read, "windows_total": total, "exact": exact, "text": text}


# ---------------------------------------------------------------------------------------- text

def format_inspection(report: dict) -> str:
    """The compact, aligned text `wds-encode inspect` prints."""
    lat = report["latent"]
    where = report.get("output") or ", ".join(report["shards"][:3]) + (" ..." if len(report["shards"]) > 3 else "")
    lines = [f"wds-encode inspect of {where}"]
    if report.get("state"):
        lines.append(f"  state      {report['state']}")
    if not report["manifest"]:
        lines.append(f"  note       {report['note']}")
    lines.append(f"  windows    {report['sampling']['text']}, over {STATS_OVER}")
    if lat["mode"] is not None:
        shapes = "" if len(lat["shapes"]) == 1 else f" (also {', '.join(list(lat['shapes'])[1:4])})"
        pad = f"{lat['padding_share']:.1%}" if lat["padding_share"] is not None else "-"
        lines.append(f"  latents    {lat['mode']}, {lat['dtype']} {lat['shape']}{shapes}; padding {pad} of "
                     f"{lat['frames']} frames")
    d = report["durations"]
    if d["files"]:
        lines.append(f"  durations  {d['files']} files read, {d['min_seconds']:.2f}-{d['max_seconds']:.2f} s, "
                     f"mean {d['mean_seconds']:.2f} s")
    if report["manifest"]:
        t = report["total"]
        lines.append(f"  problems   {t['errors']} errors, {t['warnings']} warnings")
    for problem in report["problems"]:
        lines.append(f"  warning    {problem}")
    for key, what in (("nonfinite_windows", "windows with NaN/Inf values, left out of the statistics"),
                      ("windows_without_padding_mask", "windows without a matching padding_mask: all frames "
                                                       "counted")):
        if report.get(key):
            lines.append(f"  warning    {report[key]} {what}")
    lines += ["", *_dataset_table(report)]
    if "channels" in report:
        lines += ["", *_channel_table(report)]
    if "tokens" in report:
        lines += ["", *_token_table(report["tokens"])]
    if report.get("errors_by_reason"):
        lines += ["", "  count  level    reason (example unit/key)"]
        for g in report["errors_by_reason"][:10]:
            ex = g["example"]
            lines.append(f"  {g['count']:>5}  {g['level']:<8}  {g['reason']}  ({ex['shard']}/{ex['key']})")
        if len(report["errors_by_reason"]) > 10:
            lines.append(f"  ... {len(report['errors_by_reason']) - 10} more reasons (--json lists them)")
    return "\n".join(lines)


def _dataset_table(report: dict) -> list[str]:
    if report["manifest"]:
        head = ("dataset", "units", "broken", "files", "windows", "rejected", "filtered", "audio h", "errors",
                "warnings")
        keys = ("units", "failed", "samples", "windows", "rejected", "filtered", "audio_hours", "errors", "warnings")
    else:
        head = ("dataset", "units seen", "files", "windows", "audio h")
        keys = ("units_seen", "files", "windows", "audio_hours")
    rows = [[name, *(_cell(row[k], k) for k in keys)] for name, row in report["datasets"].items()]
    if len(rows) > 1:
        rows.append(["all", *(_cell(report["total"].get(k, ""), k) for k in keys)])
    return _table(head, rows)


def _channel_table(report: dict) -> list[str]:
    params = report["latent"]["mode"] == "params"
    head = ("channel", "mean", "std", "min", "max") + (("post.std",) if params else ())
    rows = [[str(r["channel"]), *(_f(r[k]) for k in ("mean", "std", "min", "max")),
             *((_f(r["posterior_std_mean"]),) if params else ())] for r in report["channels"]]
    g = report["global"]
    rows.append(["all", _f(g["mean"]), _f(g["std"]), _f(g["min"]), _f(g["max"]), *(("",) if params else ())])
    lines = _table(head, rows)
    if params:
        lines.append("  (mean .. max: the posterior means; post.std: mean posterior std per channel)")
    scale = "-" if g["scale_factor"] is None else f"{g['scale_factor']:.6g}"
    lines.append(f"  scale_factor {scale} = 1 / std {_f(g['std']).strip()} of {g['std_of']}")
    if g["pretransform_scale"] is not None:
        lines.append(f"  stable-audio-tools divides latents by its pretransform's \"scale\": "
                     f"{g['pretransform_scale']:.6g} (the std)")
    return lines


def _token_table(tokens: list[dict]) -> list[str]:
    rows = [[str(t["quantizer"]), str(t["codebook_size"]), str(t["used"]),
             "-" if t["usage"] is None else f"{t['usage']:.1%}",
             "-" if t["perplexity"] is None else f"{t['perplexity']:.2f}", str(t["tokens"])] for t in tokens]
    return _table(("quantizer", "codebook", "used", "usage", "perplexity", "tokens"), rows)


def _table(head: tuple, rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = [f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]]
    return ["  " + "  ".join(f.format(str(x)) for f, x in zip(fmt, row)).rstrip() for row in [list(head), *rows]]


def _cell(value, key: str) -> str:
    if key == "audio_hours":
        return f"{value:.4f}"
    return str(value)


def _f(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"

