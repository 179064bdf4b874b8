"""Dataset config -> an ordered list of work units (`Shard`), the unit of claiming and of resume.

A work unit is either one input tar shard, or (for `audio_dir` datasets) a fixed group of audio
files. Its `shard_id` (`dataset_id/name`) is stable across runs, so outputs and manifest records
can be named after it. Units carry their size on disk: the job claims the largest first (a short
tail) and measures progress in bytes.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from .audio import AUDIO_EXTENSIONS
from .config import ConfigError, DatasetConfig, DatasetEntry


@dataclass(frozen=True)
class Shard:
    """One work unit: a tar shard (`files` empty) or a group of audio files under `url`."""

    url: str
    dataset_id: str
    name: str
    files: tuple[str, ...] = field(default=())
    custom_metadata_module: str | None = None
    size: int = 0                  # bytes on disk (the tar, or the unit's files)

    @property
    def shard_id(self) -> str:
        return f"{self.dataset_id}/{self.name}"

    @property
    def is_tar(self) -> bool:
        return not self.files


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
        raise ConfigError(f"dataset path {spec!r}: {len(missing)} of {len(expanded)} shards do not exist "
                          f"(first: {missing[0]}); fix the pattern or the files")
    root = os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths]) if paths else ""
    return [os.path.abspath(p) for p in paths], root


def _tar_shards(entry: DatasetEntry, spec: str, module: str | None) -> list[Shard]:
    paths, root = _expand_tar_paths(spec)
    if not paths:
        raise ConfigError(f"dataset {entry.id!r}: no .tar shards found at {spec!r}")
    shards = [Shard(url=p, dataset_id=entry.id, name=safe_name(os.path.relpath(p, root)),
                    custom_metadata_module=module, size=os.path.getsize(p)) for p in paths]
    return shards


def _audio_dir_units(entry: DatasetEntry, files_per_unit: int, module: str | None) -> list[Shard]:
    root = entry.path or ""
    if not os.path.isdir(root):
        raise ConfigError(f"dataset {entry.id!r}: audio folder {root!r} does not exist")
    root = os.path.abspath(root)
    sizes = {
        os.path.relpath(str(p), root): p.stat().st_size
        for p in Path(root).rglob("*")
        if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS and p.is_file()
    }
    files = sorted(sizes)
    if not files:
        raise ConfigError(f"dataset {entry.id!r}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    units = []
    for start in range(0, len(files), files_per_unit):
        group = tuple(files[start:start + files_per_unit])
        units.append(Shard(url=root, dataset_id=entry.id, name=f"files-{start // files_per_unit:06d}",
                           files=group, custom_metadata_module=module, size=sum(sizes[f] for f in group)))
    return units


def list_shards(config: DatasetConfig, *, files_per_unit: int = 64) -> list[Shard]:
    """Every work unit of every dataset, in a deterministic order (by dataset, then path)."""
    shards: list[Shard] = []
    for entry in config.datasets:
        module = config.metadata_module_for(entry)
        if config.dataset_type == "audio_dir":
            shards.extend(_audio_dir_units(entry, files_per_unit, module))
            continue
        spec = entry.s3_path or entry.path or ""
        if spec.startswith("s3://"):
            raise ConfigError(
                f"dataset {entry.id!r}: s3:// sources are not supported by this version yet; "
                "copy the shards locally (aws s3 sync) and point `path` at the folder")
        shards.extend(_tar_shards(entry, spec, module))
    return shards


def claim_order(units: list[Shard], *, shuffle: bool = False, seed: int = 0) -> list[Shard]:
    """The order units are handed out: largest first, so the job does not end waiting on one big
    unit; with `shuffle`, a seeded shuffle instead (same on every rank)."""
    if shuffle:
        ordered = list(units)
        random.Random(seed).shuffle(ordered)
        return ordered
    return sorted(units, key=lambda u: -u.size)  # stable: equal sizes keep the listing order
