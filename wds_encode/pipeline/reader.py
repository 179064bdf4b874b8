"""Work unit -> windows: the DataLoader-worker stage.

Each worker claims work units one at a time from the job (`distributed.UnitClaims`: a counter in
the job's store, so every unit goes to exactly one worker of one rank), streams tar members
(webdataset's tar iterator over `storage.open_read`: a local file or an S3 object), groups them by
key, decodes each sample into windows (`audio.iter_windows`; a `KEY.txt` member or a sidecar `.txt`
caption becomes `prompt`) and yields `WindowItem`s. After the last window of a unit it yields a
`ShardEnd` carrying the unit's counts and error records, so the main process knows when a unit's
outputs are complete. Nothing here raises on bad data: every problem becomes an error record.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generator, Iterable, Iterator, Optional

import torch
import webdataset.tariterators as wds_tar
from torch.utils.data import IterableDataset, get_worker_info

from .audio import AUDIO_EXTENSIONS, AudioDecodeError, Resampling, Stitch, iter_windows
from .filters import REJECTED, FileFilters, FileFiltered, window_level
from .sources import CAPTION_SUFFIX, Shard, sidecar_caption
from ..storage import Storage

# A sample's windows are held until all of them decoded, so a file that fails half-way yields none;
# past this much audio (a long file split into many windows) they are passed on as they come instead.
HOLD_BYTES = 128 << 20
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
_WDS_META = re.compile(r"__[^/]*__($|/)")   # webdataset's metadata members (`__key__`...): not samples
TAR_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class ReaderOptions:
    """What the reader needs to know about the model and the windowing."""

    sample_rate: int
    channels: int
    sample_size: int
    chunking: str = "crop"          # crop | random_crop | split | full
    max_chunks: Optional[int] = None
    seed: int = 0
    length_multiple: int = 1        # full: windows are rounded up to this (the downsampling ratio)
    overlap: int = 0                # full: latent frames chunks of a long file share (0: independent windows)
    filters: FileFilters = FileFilters()   # files skipped before encoding (--min/--max-duration, --skip-silent)
    resample_here: bool = True      # False: windows at another rate go on at it, resampled on the device


@dataclass
class WindowItem:
    """One window ready for the encoder, with its JSON-native metadata."""

    audio: Optional[torch.Tensor]          # float32 [C, window size]; None once batched (`without_audio`)
    key: str                     # output key: sanitised source key (+ chunk suffix), unique per shard
    shard_id: str
    metadata: dict
    input_bytes: int = 0         # bytes of input this window accounts for (the sample's, on its first window)
    stitch: Optional[Stitch] = None  # a chunk of a chunk-encoded file (--overlap); `metadata` is the file's
    resampling: Optional[Resampling] = None  # `audio` is still at its source rate (resampled on the device)

    def without_audio(self) -> "WindowItem":
        """The same window with its samples let go: what is left after the batch went to the encoder."""
        return replace(self, audio=None)

    @property
    def size(self) -> int:
        """The window's length at the model's rate (what batches group by)."""
        return self.resampling.size if self.resampling is not None else int(self.audio.shape[-1])

    @property
    def padding_mask(self) -> torch.Tensor:
        """bool [window size], True on real audio: made where the batch is, not carried from the worker."""
        return torch.arange(self.size) < self.real_samples

    @property
    def real_samples(self) -> int:
        """Real (not padding) samples in this window's audio: the chunk's own for a chunk."""
        return self.stitch.valid if self.stitch is not None else int(self.metadata["valid_length"])

    @property
    def audio_samples(self) -> int:
        """Samples of the file this window accounts for (a file's windows or chunks add up to its length)."""
        return self.stitch.fresh if self.stitch is not None else int(self.metadata["valid_length"])

    @property
    def noise_key(self) -> str:
        """What seeds this window's VAE noise (`noise_key`)."""
        return noise_key(self.shard_id, self.key, None if self.stitch is None else self.stitch.index)


def noise_key(shard_id: str, key: str, chunk: Optional[int] = None) -> str:
    """What seeds a window's VAE noise: its unit and output key, and for a chunk of a chunk-encoded file
    (--overlap) the chunk's index too (each chunk draws its own noise, as SA3's chunks do)."""
    return f"{shard_id}/{key}" if chunk is None else f"{shard_id}/{key}@{chunk}"


@dataclass
class ShardEnd:
    """End-of-unit marker: every window of `shard` has been yielded before it."""

    shard: Shard
    samples: int = 0             # input samples (audio members) seen
    windows: int = 0             # windows yielded
    rejected: int = 0            # windows rejected by a custom metadata module
    filtered: int = 0            # files skipped by --min-duration, --max-duration or --skip-silent
    audio_seconds: float = 0.0   # seconds of real (unpadded) audio in the yielded windows
    errors: list[dict] = field(default_factory=list)
    failed: bool = False         # the unit could not be read to its end
    input_bytes: int = 0         # the unit's bytes not yet accounted for by its windows
    worker: int = 0              # the DataLoader worker that claimed the unit
    retries: int = 0             # S3 requests repeated while reading the unit (503 SlowDown, 5xx, resets)
    resumes: int = 0             # S3 streams that broke mid-body and were continued with a ranged GET


@dataclass
class RawSample:
    """The members of one input sample, before decoding."""

    key: str
    path: str                    # where it came from (url#member, or file path)
    audio_name: Optional[str]
    audio_bytes: Optional[bytes]
    metadata: dict
    errors: list[str] = field(default_factory=list)     # the sample is not encoded
    warnings: list[str] = field(default_factory=list)   # encoded, but reported
    extra: dict = field(default_factory=dict)
    size: int = 0                # bytes of its members (progress accounting)
    caption: Optional[str] = None  # a `KEY.txt` member or sidecar file: the window's `prompt`


def sanitize_key(key: str) -> tuple[str, Optional[str]]:
    """A key safe as a file or tar member name, and a warning when the original was unsafe.

    Directory separators become `__`; `.`/`..` parts and empty parts are dropped; anything not
    [A-Za-z0-9_-] (dots included: webdataset splits keys at the first dot) becomes `_`.
    """
    unsafe = ".." in key.split("/") or key.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in key)
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    safe = "__".join(_UNSAFE_KEY_CHARS.sub("_", p) for p in parts) or "sample"
    warning = f"unsafe key {key!r} written as {safe!r}" if unsafe else None
    return safe, warning


def error_record(shard_id: str, url: str, key: Optional[str], reason: str, *, level: str = "error") -> dict:
    """One line of errors.jsonl: what went wrong, where (unit, url, key), and whether it was skipped."""
    return {"level": level, "shard": shard_id, "url": url, "key": key, "reason": reason}


def _audio_rank(suffix: str) -> Optional[int]:
    """Where a member's suffix stands in AUDIO_EXTENSIONS' order (lower wins), None if it is not audio."""
    ext = suffix.rsplit(".", 1)[-1].lower()
    return AUDIO_EXTENSIONS.index(ext) if ext in AUDIO_EXTENSIONS else None


def _parse_json(data: bytes) -> dict:
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def decode_caption(data: bytes, name: str) -> str:
    """A caption file's text (UTF-8, a leading byte-order mark dropped), stripped of surrounding
    whitespace; ValueError naming the member or file when it is not UTF-8."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption {name} is not valid UTF-8 text ({exc})") from None


def _read_caption(sample: RawSample, data: bytes, name: str) -> None:
    """Set the sample's caption, or record why it cannot have one (the sample is then not encoded, as
    for unreadable JSON metadata: a window must not silently lose its caption)."""
    try:
        sample.caption = decode_caption(data, name)
    except ValueError as exc:
        sample.errors.append(str(exc))
        return
    if not sample.caption:
        sample.warnings.append(f"caption {name} is empty: the window's prompt is ''")


def _group_tar_members(shard: Shard, members: list[tuple[str, bytes]]) -> RawSample:
    key = wds_tar.base_plus_ext(members[0][0])[0]
    sample = RawSample(key=key, path=shard.url, audio_name=None, audio_bytes=None, metadata={},
                       size=sum(len(data) for _, data in members))
    audio: list[tuple[int, str, bytes]] = []
    for name, data in members:
        suffix = wds_tar.base_plus_ext(name)[1] or ""
        rank = _audio_rank(suffix)
        if rank is not None:
            audio.append((rank, name, data))
        elif suffix.lower() == "json":
            try:
                sample.metadata = _parse_json(data)
            except (ValueError, UnicodeDecodeError) as exc:
                sample.errors.append(f"invalid JSON metadata in {name}: {exc}")
        elif suffix.lower() == CAPTION_SUFFIX:  # KEY.txt: the caption, as SA3's pre_encode_dataset.py reads it
            _read_caption(sample, data, name)
    if audio:  # several: the first in AUDIO_EXTENSIONS' order (KEY.flac before KEY.m4a before KEY.mp4)
        audio.sort(key=lambda member: member[0])
        _, sample.audio_name, sample.audio_bytes = audio[0]
        sample.path = f"{shard.url}#{sample.audio_name}"
        for _, name, _ in audio[1:]:
            sample.warnings.append(f"audio member {name} ignored: {sample.audio_name} is read instead")
    return sample


def tar_members(fileobj: io.BufferedIOBase) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, in order, skipping webdataset's `__*__`
    metadata members, as webdataset's `tar_file_iterator` does, but through a 1 MB buffer: tarfile's own
    10 KB one cuts a 5 MB member into 500 reads and joins, as much CPU as decoding it when it is a WAV."""
    with tarfile.open(fileobj=fileobj, mode="r|*", bufsize=TAR_BUFFER_BYTES) as stream:
        for info in stream:
            if info.isreg() and not _WDS_META.match(info.name):
                yield info.name, stream.extractfile(info).read()
            stream.members = []   # a stream is read once: keep no TarInfo of members already read


def iter_tar_samples(shard: Shard, fileobj: io.BufferedIOBase, on_error: Callable[[str, str], None]
                     ) -> Iterator[RawSample]:
    """Stream a tar and group consecutive members by key.

    A broken tar (truncated, corrupt header) records one error, drops the sample that was being
    read when it broke, and raises `_ShardBroken`; the samples before it were already yielded.
    """
    current_key: Optional[str] = None
    members: list[tuple[str, bytes]] = []
    try:
        for name, data in tar_members(fileobj):
            prefix, _suffix = wds_tar.base_plus_ext(name)
            if prefix is None:
                on_error(name, f"member {name!r} has no extension; skipped")
                continue
            if current_key is not None and prefix != current_key:
                yield _group_tar_members(shard, members)
                members = []
            current_key = prefix
            members.append((name, data))
    except Exception as exc:  # truncated or corrupt tar: report, keep what was read before
        lost = f"; sample {current_key!r} not encoded (may be incomplete)" if members else ""
        on_error(current_key or "", f"tar read failed: {type(exc).__name__}: {exc}{lost}")
        raise _ShardBroken(str(exc)) from None
    if members:
        yield _group_tar_members(shard, members)


class _ShardBroken(Exception):
    """The unit's stream broke; samples before the break were processed."""


class Reader(IterableDataset):
    """Yields WindowItems and ShardEnds for the units this worker claims.

    `claims` yields indices into `shards` (`distributed.UnitClaims` in a job: it is iterated in
    each DataLoader worker, which claims its next unit only when it has finished the last one);
    without it, one reader reads every unit in order.
    """

    def __init__(self, shards: list[Shard], options: ReaderOptions, claims: Optional[Iterable[int]] = None,
                 storage: Optional[Storage] = None):
        super().__init__()
        self.shards = list(shards)
        self.options = options
        self.claims = claims
        self.storage = storage or Storage()  # each worker process makes its own S3 clients
        self._metadata_fns: dict[str, Callable] = {}

    def __iter__(self) -> Iterator[WindowItem | ShardEnd]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:  # a worker process: one thread (the encoder's threads are the main process's),
            torch.set_num_threads(1)  # and its own S3 clients and locks, never the parent's copies
            self.storage = Storage(self.storage.defaults)
        for index in (self.claims if self.claims is not None else range(len(self.shards))):
            for item in self.read_shard(self.shards[index]):
                if isinstance(item, ShardEnd):
                    item.worker = worker
                yield item

    # ------------------------------------------------------------------ one unit
    def read_shard(self, shard: Shard) -> Iterator[WindowItem | ShardEnd]:
        end = ShardEnd(shard=shard)
        used_keys: set[str] = set()

        def on_error(key: str, reason: str) -> None:
            end.errors.append(error_record(shard.shard_id, shard.url, key, reason))

        accounted = 0
        seen = 0   # samples (member groups) the unit held
        before = self.storage.counters()
        try:
            for raw in self._raw_samples(shard, on_error):
                seen += 1
                for item in self._windows_of(shard, raw, end, used_keys):
                    item.input_bytes, raw.size = raw.size, 0  # a sample's bytes count once, with its first window
                    accounted += item.input_bytes
                    yield item
        except _ShardBroken:
            end.failed = True
        except OSError as exc:
            end.failed = True
            on_error("", f"cannot read work unit: {exc}")
        if not seen and not end.failed and not end.errors:  # a valid tar with no members: done, but said
            end.errors.append(error_record(shard.shard_id, shard.url, None, f"shard {shard.shard_id} holds no samples",
                                           level="warning"))
        end.input_bytes = max(0, shard.size - accounted)  # headers, bad samples, rejected windows
        after = self.storage.counters()
        end.retries, end.resumes = after["retries"] - before["retries"], after["resumes"] - before["resumes"]
        yield end

    def _raw_samples(self, shard: Shard, on_error: Callable[[str, str], None]) -> Iterator[RawSample]:
        if not shard.is_tar:
            captions = set(shard.captions)  # sidecars found by the listing (sources.sidecar_caption)
            for rel in shard.files:
                path = os.path.join(shard.url, rel)
                key = os.path.splitext(rel)[0]
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as exc:
                    on_error(key, f"cannot read {path}: {exc}")
                    continue
                sample = RawSample(key=key, path=path, audio_name=rel, audio_bytes=data, metadata={},
                                   extra={"relpath": rel}, size=len(data))
                caption = sidecar_caption(rel)
                if caption in captions:
                    caption_path = os.path.join(shard.url, caption)
                    try:
                        with open(caption_path, "rb") as f:
                            _read_caption(sample, f.read(), caption_path)
                    except OSError as exc:
                        sample.errors.append(f"cannot read caption {caption_path}: {exc}")
                yield sample
            return
        with self.storage.open_read(shard.url, shard.s3) as f:
            yield from iter_tar_samples(shard, f, on_error)

    def _windows_of(self, shard: Shard, raw: RawSample, end: ShardEnd, used_keys: set[str]
                    ) -> Iterator[WindowItem]:
        def report(reason: str, level: str = "error") -> None:
            end.errors.append(error_record(shard.shard_id, raw.path, raw.key, reason, level=level))

        key, warning = sanitize_key(raw.key)
        for problem in ([warning] if warning else []) + raw.warnings:
            report(problem, level="warning")
        if raw.audio_bytes is None:
            report(f"sample has no audio member ({'/'.join(AUDIO_EXTENSIONS)})")
            return
        end.samples += 1
        if raw.errors:
            report(raw.errors[0])
            return
        if key in used_keys:
            base, n = key, 1
            while f"{base}_dup{n}" in used_keys:
                n += 1
            key = f"{base}_dup{n}"
            report(f"duplicate key in unit, written as {key!r}", level="warning")
        used_keys.add(key)
        judge = self.options.filters.skip_silent is not None
        try:
            again = yield from self._decoded(shard, raw, key, end, report, judge)
            if again:   # a long file found loud only after its first windows were let go: once more, unjudged
                yield from self._decoded(shard, raw, key, end, report, judge=False)
        except FileFiltered as exc:
            end.filtered += 1
            report(f"{raw.audio_name}: {exc}", level=REJECTED)

    def _decoded(self, shard: Shard, raw: RawSample, key: str, end: ShardEnd, report: Callable[..., None],
                 judge: bool) -> Generator[WindowItem, None, bool]:
        """The sample's windows, held until all are decoded (a long file's passed on as they outgrow
        HOLD_BYTES). `judge` (--skip-silent): FileFiltered when no window is loud enough; a file that has
        outgrown HOLD_BYTES while silent is only measured on, and True returned if it turns out loud (its
        windows were let go: the caller decodes it again). A decoding failure is reported, not raised."""
        ext = (raw.audio_name or "").rsplit(".", 1)[-1].lower()
        opts = self.options
        held: list[Optional[WindowItem]] = []   # a sample's windows, yielded once all decoded...
        held_bytes, passed = 0, 0               # ...unless they outgrow HOLD_BYTES (a long file)
        first_chunk: Optional[WindowItem] = None  # --overlap: the file's first chunk (None: rejected)
        loudest, measuring = -math.inf, False
        try:
            for window in iter_windows(raw.audio_bytes, ext=ext, sample_rate=opts.sample_rate,
                                       channels=opts.channels, sample_size=opts.sample_size,
                                       chunking=opts.chunking, key=raw.key, seed=opts.seed,
                                       max_chunks=opts.max_chunks, length_multiple=opts.length_multiple,
                                       overlap=opts.overlap, check_duration=opts.filters.check_duration,
                                       # a custom metadata module is given the window at the model's rate
                                       resample_here=opts.resample_here or bool(shard.custom_metadata_module)):
                if judge:
                    real = window.audio.shape[-1] if window.resampling is not None else \
                        window.stitch.valid if window.stitch is not None else window.valid_length
                    loudest = max(loudest, window_level(window.audio, real))
                    if measuring:
                        if opts.filters.loud(loudest):
                            return True
                        continue
                if window.stitch is not None and window.stitch.index > 0:
                    # the chunks of one output window: its metadata (and a custom module's verdict) once
                    if first_chunk is None:
                        break  # rejected by the custom metadata module: the rest need no decoding
                    held.append(replace(first_chunk, audio=window.audio, resampling=window.resampling,
                                        metadata=dict(first_chunk.metadata), stitch=window.stitch))
                else:
                    held.append(self._item(shard, raw, key, window))
                    first_chunk = held[-1]
                held_bytes += window.audio.numel() * window.audio.element_size()
                if held_bytes > HOLD_BYTES:
                    if judge and not opts.filters.loud(loudest):
                        measuring, held = True, []   # silent so far: measure the rest, hold nothing
                        continue
                    passed += len(held)
                    yield from self._counted(held, end)
                    held, held_bytes = [], 0
        except FileFiltered:
            raise
        except Exception as exc:  # never let one sample stop the run
            reason = str(exc) if isinstance(exc, AudioDecodeError) else f"{type(exc).__name__}: {exc}"
            if passed and first_chunk is not None and first_chunk.stitch is not None:
                reason += f" (after its first {passed} chunks were encoded: nothing is written for it)"
            elif passed:
                reason += f" (after its first {passed} windows were passed on: the sample is incomplete)"
            report(f"{raw.audio_name}: {reason}")
            return False
        if judge and not opts.filters.loud(loudest):
            raise FileFiltered(opts.filters.silent_reason(loudest))
        yield from self._counted(held, end)
        return False

    def _counted(self, items: list[Optional[WindowItem]], end: ShardEnd) -> Iterator[WindowItem]:
        for item in items:
            if item is None:
                end.rejected += 1
                continue
            if item.stitch is None or item.stitch.index == item.stitch.count - 1:  # a file's chunks: one window
                end.windows += 1
                end.audio_seconds += item.metadata["valid_length"] / self.options.sample_rate
            yield item

    def _item(self, shard: Shard, raw: RawSample, key: str, window) -> Optional[WindowItem]:
        md: dict[str, Any] = dict(raw.metadata)
        if "text" in md and "prompt" not in md:
            md["prompt"] = md["text"]
        if raw.caption is not None:  # the caption file wins over KEY.json's prompt / text
            md["prompt"] = raw.caption
        md.update(window.metadata())
        md.update(raw.extra)
        out_key = key if window.num_chunks == 1 or window.stitch is not None else f"{key}_{window.chunk_index:04d}"
        md.update({"path": raw.path, "__key__": raw.key, "key": out_key,
                   "dataset_id": shard.dataset_id, "source_shard": shard.shard_id})
        if shard.custom_metadata_module:
            custom = self._custom_metadata(shard.custom_metadata_module)(dict(md), window.audio)
            if custom:
                if custom.get("__reject__"):
                    return None
                md.update({k: _json_native(v) for k, v in custom.items() if not k.startswith("__")})
        json.dumps(md)  # fail here, on this sample, rather than in the writer
        return WindowItem(audio=window.audio, key=out_key, resampling=window.resampling,
                          shard_id=shard.shard_id, metadata=md, stitch=window.stitch)

    def _custom_metadata(self, module_path: str) -> Callable:
        fn = self._metadata_fns.get(module_path)
        if fn is None:
            fn = load_custom_metadata_fn(module_path)
            self._metadata_fns[module_path] = fn
        return fn


def load_custom_metadata_fn(module_path: str) -> Callable:
    """`get_custom_metadata(info, audio)` from a stable-audio-tools custom metadata module file."""
    spec = importlib.util.spec_from_file_location("wds_encode_custom_metadata", module_path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"custom_metadata_module {module_path!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "get_custom_metadata", None)
    if not callable(fn):
        raise AttributeError(f"custom_metadata_module {module_path!r} has no get_custom_metadata(info, audio)")
    return fn


def _json_native(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
