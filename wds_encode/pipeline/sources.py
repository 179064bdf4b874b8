"""Dataset config -> an ordered list of work units (`Shard`), the unit of claiming and of resume.

A work unit is either one input tar shard, or (for `audio_dir` datasets) a fixed group of audio
files, with the `.txt` captions found beside them. Its `shard_id` (`dataset_id/name`) is stable
across runs, so outputs and manifest records can be named after it (two inputs that would share one
are refused), and an audio_dir unit is named by its files, not its place. Units carry their size on
disk: the job claims the largest first (a short tail) and measures progress in bytes. Tar shards may
live on S3 (`s3://bucket/prefix/`, brace patterns, globs), listed through `storage`.

An output keeps the units of its first listing (`LISTING`): reruns, array parts and their retries
read them back instead of listing the corpus again, so every part deals the same units, however
the input changes while the job runs (`--relist` lists again, keeping the audio_dir units whose
files all remain: files added only add units).
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import braceexpand

from .audio import AUDIO_EXTENSIONS
from ..config import ConfigError, DatasetConfig, DatasetEntry
from ..storage import S3Options, Storage, StorageError, is_s3


@dataclass(frozen=True)
class Shard:
    """One work unit: a tar shard (`files` empty) or a group of audio files under `url`."""

    url: str
    dataset_id: str
    name: str
    files: tuple[str, ...] = field(default=())
    custom_metadata_module: str | None = None
    size: int = 0                  # bytes on disk (the tar, or the unit's files)
    s3: Optional[S3Options] = None  # how to reach an s3:// unit (the dataset's profile, endpoint, region)
    captions: tuple[str, ...] = ()  # audio_dir: the sidecar captions (`sidecar_caption`) of `files` that exist

    @property
    def shard_id(self) -> str:
        return f"{self.dataset_id}/{self.name}"

    @property
    def is_tar(self) -> bool:
        return not self.files


CAPTION_SUFFIX = "txt"


def sidecar_caption(relative: str) -> str:
    """Where an audio file's caption sits: beside it, same stem, `.txt` (`a/song.flac` -> `a/song.txt`),
    as Stable Audio 3's pre_encode_dataset.py looks for it."""
    return os.path.splitext(relative)[0] + "." + CAPTION_SUFFIX


def safe_name(relative: str) -> str:
    """A file-system-safe shard name from a relative path: no separators, no dots-only parts."""
    stem = relative[:-4] if relative.lower().endswith(".tar") else relative
    parts = [p for p in stem.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    name = "__".join(parts) or "shard"
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name)


def _expand_tar_paths(spec: str) -> tuple[list[str], str]:
    """Local tar paths for a path spec (dir, brace pattern, glob, file) and the root for naming."""
    if os.path.isdir(spec):
        root = os.path.abspath(spec)
        found = sorted(str(p) for p in Path(root).rglob("*.tar") if p.is_file())
        return found, root
    expanded = list(braceexpand.braceexpand(spec))
    paths: list[str] = []
    missing: list[str] = []
    for item in expanded:
        if any(c in item for c in "*?["):
            paths.extend(sorted(glob.glob(item, recursive=True)))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            missing.append(item)
    if missing:
        folders = {os.path.dirname(os.path.abspath(item)) for item in missing}
        gone = sorted(folder for folder in folders if not os.path.isdir(folder))
        raise ConfigError(f"dataset path {spec!r}: {len(missing)} of {len(expanded)} shards do not exist "
                          f"(first: {missing[0]}" + (f"; no folder {gone[0]}" if gone else "")
                          + "); fix the pattern or the files")
    root = os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths]) if paths else ""
    return [os.path.abspath(p) for p in paths], root


def _nearest_folder(path: str) -> str:
    """The deepest folder above `path` that exists (to say where a wrong path stops being true)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def _is_pattern(spec: str) -> bool:
    """A brace pattern or a glob, as opposed to the path of one folder or one file."""
    return any(c in spec for c in "*?[") or len(list(braceexpand.braceexpand(spec))) > 1


def _tar_shards(entry: DatasetEntry, spec: str, module: str | None) -> list[Shard]:
    if not _is_pattern(spec) and not os.path.exists(spec):
        what = "no such shard file" if spec.lower().endswith(".tar") else "no such folder"
        raise ConfigError(f"dataset {entry.id!r}: dataset path {spec!r} does not exist ({what}; the nearest "
                          f"folder that exists is {_nearest_folder(spec)})")
    paths, root = _expand_tar_paths(spec)
    if not paths:
        raise ConfigError(f"dataset {entry.id!r}: no .tar shards found at {spec!r}")
    shards = [Shard(url=p, dataset_id=entry.id, name=safe_name(os.path.relpath(p, root)),
                    custom_metadata_module=module, size=os.path.getsize(p)) for p in paths]
    return shards


def _s3_tar_shards(entry: DatasetEntry, spec: str, module: str | None, storage: Storage) -> list[Shard]:
    """Tars under an s3:// prefix (recursive), or named by a brace pattern / glob: one listing each."""
    options = S3Options(profile=entry.profile, endpoint_url=entry.endpoint_url, region=entry.region)
    expanded = list(braceexpand.braceexpand(spec))
    try:
        if len(expanded) == 1 and not any(c in spec for c in "*?[") and not spec.endswith(".tar"):
            root = spec if spec.endswith("/") else spec + "/"
            found = storage.list_tars(root, options)
        else:
            fixed = os.path.commonprefix([item.split("*")[0].split("?")[0].split("[")[0] for item in expanded])
            root = fixed[:fixed.rindex("/") + 1]
            listing = dict(storage.list_tars(root, options))
            found, missing = [], []
            for item in expanded:
                if any(c in item for c in "*?["):
                    found.extend((url, listing[url]) for url in sorted(fnmatch.filter(listing, item)))
                elif item in listing:
                    found.append((item, listing[item]))
                else:
                    missing.append(item)
            if missing:
                raise ConfigError(f"dataset {entry.id!r} path {spec!r}: {len(missing)} of {len(expanded)} shards do "
                                  f"not exist (first: {missing[0]}); fix the pattern or the bucket")
    except (StorageError, ValueError) as exc:
        raise ConfigError(f"dataset {entry.id!r}: {exc}") from None
    if not found:
        raise ConfigError(f"dataset {entry.id!r}: no .tar shards found at {spec!r}")
    return [Shard(url=url, dataset_id=entry.id, name=safe_name(url[len(root):]), custom_metadata_module=module,
                  size=size, s3=options) for url, size in found]


def unit_name(files: Iterable[str]) -> str:
    """An audio_dir unit is named by what it holds (`files-` and 16 hex digits of the sha256 of its
    sorted relative paths), never by its place in the listing: once files are added (or
    --files-per-unit changes) and the folder is listed again, a place would name other files, and a
    unit committed under that name would stand for files never encoded."""
    digest = hashlib.sha256("\n".join(sorted(files)).encode("utf-8")).hexdigest()
    return f"files-{digest[:16]}"


FileGroup = tuple[str, tuple[str, ...]]   # an audio_dir unit's (name, relative paths of its files)


def group_files(files: Iterable[str], files_per_unit: int, previous: Sequence[FileGroup] = ()
                ) -> tuple[list[FileGroup], list[FileGroup]]:
    """The units of an audio folder holding `files`, around the units a previous listing made of it:
    listing again only adds units. A previous unit whose files all remain is kept as it was (its name,
    its files), so a unit committed under a name still means the same files; the files in no kept unit
    are grouped, sorted, `files_per_unit` at a time. A previous unit with a file gone is dropped and its
    other files are grouped anew. Returns the units, in path order, and the (name, files gone) of each
    previous unit dropped."""
    present = set(files)
    kept: list[FileGroup] = []
    dropped: list[FileGroup] = []
    taken: set[str] = set()
    for name, group in previous:
        gone = tuple(f for f in group if f not in present or f in taken)   # (in another kept unit: a damaged listing)
        if gone:
            dropped.append((name, gone))
            continue
        kept.append((name, tuple(group)))
        taken.update(group)
    rest = sorted(present - taken)
    added = [tuple(rest[start:start + files_per_unit]) for start in range(0, len(rest), files_per_unit)]
    units = kept + [(unit_name(group), group) for group in added]
    return sorted(units, key=lambda unit: min(unit[1])), dropped


def _audio_dir_units(entry: DatasetEntry, files_per_unit: int, module: str | None,
                     previous: Sequence[Shard] = ()) -> list[Shard]:
    root = entry.path or ""
    if not os.path.isdir(root):
        raise ConfigError(f"dataset {entry.id!r}: audio folder {root!r} does not exist")
    root = os.path.abspath(root)
    sizes, texts = {}, set()
    for p in Path(root).rglob("*"):
        if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS and p.is_file():
            sizes[os.path.relpath(str(p), root)] = p.stat().st_size
        elif p.suffix == "." + CAPTION_SUFFIX and p.is_file():
            texts.add(os.path.relpath(str(p), root))
    if not sizes:
        raise ConfigError(f"dataset {entry.id!r}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    before = [(u.name, u.files) for u in previous if u.dataset_id == entry.id and u.url == root and u.files]
    groups, dropped = group_files(sizes, files_per_unit, before)
    for name, gone in dropped:
        print(f"wds-encode: warning: unit {entry.id}/{name} dropped: {len(gone)} of its files gone "
              f"(first: {gone[0]}); its other files are grouped into new units", file=sys.stderr)
    units = []
    for name, group in groups:
        captions = tuple(sorted({sidecar_caption(f) for f in group} & texts))
        units.append(Shard(url=root, dataset_id=entry.id, name=name, files=group, custom_metadata_module=module,
                           size=sum(sizes[f] for f in group), captions=captions))
    return units


def _check_unique_ids(units: list[Shard]) -> None:
    """Two inputs named apart only by characters `safe_name` replaces (`a b.tar`, `a_b.tar`) would be
    one unit id, and one unit's outputs would overwrite the other's: refused before any work."""
    seen: dict[str, Shard] = {}
    for unit in units:
        first = seen.setdefault(unit.shard_id, unit)
        if first is unit:
            continue
        if first.url == unit.url:
            raise ConfigError(f"dataset {unit.dataset_id!r}: {unit.url} is listed twice; name each shard once")
        raise ConfigError(f"dataset {unit.dataset_id!r}: {first.url} and {unit.url} both make the unit "
                          f"{unit.shard_id!r} (unit names replace separators and unsafe characters); "
                          "rename one of them")


def list_shards(config: DatasetConfig, storage: Optional[Storage] = None, *, files_per_unit: int = 64,
                previous: Sequence[Shard] = ()) -> list[Shard]:
    """Every work unit of every dataset, in a deterministic order (by dataset, then path). `previous`:
    the units of the output's kept listing, whose audio_dir units are kept (`group_files`)."""
    shards: list[Shard] = []
    for entry in config.datasets:
        module = config.metadata_module_for(entry)
        if config.dataset_type == "audio_dir":
            if is_s3(entry.path or ""):
                raise ConfigError(f"dataset {entry.id!r}: audio_dir datasets are read from a local folder; "
                                  "for audio on S3, pack it into tar shards and use dataset_type wds or s3")
            shards.extend(_audio_dir_units(entry, files_per_unit, module, previous))
            continue
        spec = entry.s3_path or entry.path or ""
        if is_s3(spec):
            shards.extend(_s3_tar_shards(entry, spec, module, storage or Storage()))
        else:
            shards.extend(_tar_shards(entry, spec, module))
    _check_unique_ids(shards)
    return shards


def claim_order(units: list[Shard], *, shuffle: bool = False, seed: int = 0) -> list[Shard]:
    """The order units are handed out: largest first, so the job does not end waiting on one big
    unit; with `shuffle`, a seeded shuffle instead (same on every rank)."""
    if shuffle:
        ordered = list(units)
        random.Random(seed).shuffle(ordered)
        return ordered
    return sorted(units, key=lambda u: -u.size)  # stable: equal sizes keep the listing order


# ---------------------------------------------------------------------- the listing kept with the output

LISTING = "manifest/units.json.gz"   # the units of the output's first listing: what reruns and array parts use


def listing_fingerprint(config: DatasetConfig, files_per_unit: int) -> str:
    """What the listing depends on: the dataset config (its entries, paths, endpoints) and the unit size."""
    data = json.dumps([config.model_dump(mode="json"), files_per_unit], sort_keys=True)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def listing_bytes(units: list[Shard], fingerprint: str) -> bytes:
    """The units as gzip'd JSON lines, after a header line with the fingerprint. Only what the listing
    found is kept (no S3 options, no metadata module: those come from the dataset config, which may
    hold an endpoint with credentials)."""
    lines = [json.dumps({"fingerprint": fingerprint, "units": len(units)})]
    lines += [json.dumps({"url": u.url, "dataset": u.dataset_id, "name": u.name, "size": u.size,
                          **({"files": list(u.files)} if u.files else {}),
                          **({"captions": list(u.captions)} if u.captions else {})}) for u in units]
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=6, mtime=0)


def _listing_records(data: bytes) -> tuple[dict, list[dict]]:
    """(header, unit records) of a kept listing; ValueError (and its kin) when it is damaged."""
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    header = json.loads(lines[0])
    if header.get("units") != len(lines) - 1:
        raise ValueError("truncated listing")
    return header, [json.loads(line) for line in lines[1:]]


def units_from_listing(data: bytes, config: DatasetConfig, fingerprint: str) -> Optional[list[Shard]]:
    """The units a kept listing holds, or None when it was made from another dataset config (or is damaged)."""
    try:
        header, records = _listing_records(data)
        if header.get("fingerprint") != fingerprint:
            return None
        entries = {entry.id: entry for entry in config.datasets}
        units = []
        for unit in records:
            entry = entries[unit["dataset"]]
            s3 = (S3Options(profile=entry.profile, endpoint_url=entry.endpoint_url, region=entry.region)
                  if is_s3(unit["url"]) else None)
            units.append(Shard(url=unit["url"], dataset_id=unit["dataset"], name=unit["name"],
                               files=tuple(unit.get("files", ())), custom_metadata_module=config.metadata_module_for(entry),
                               size=int(unit["size"]), s3=s3, captions=tuple(unit.get("captions", ()))))
        return units
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError):
        return None


def file_groups_from_listing(data: bytes) -> list[Shard]:
    """The audio_dir units a kept listing holds, whatever dataset config or unit size it was made with:
    what listing the folders again keeps (`list_shards(previous=)`); none when the listing is damaged."""
    try:
        _, records = _listing_records(data)
        return [Shard(url=unit["url"], dataset_id=unit["dataset"], name=unit["name"],
                      files=tuple(unit["files"]), size=int(unit["size"])) for unit in records if unit.get("files")]
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError):
        return []
