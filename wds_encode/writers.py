"""Latents -> files, in both output forms, made visible per input unit all at once.

`FolderWriter` writes stable-audio-tools' pre_encode layout, `OUT/{rank}/{id}.npy` + `{id}.json`;
each file is first written as `*.partial` and renamed when its input unit commits.
`LatentShardWriter` writes one input unit's latent tars (`KEY.npy` + `KEY.json` members) under
temporary names and renames them on commit. Either way a crash leaves only `*.partial` files,
which the next run removes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np

PARTIAL = ".partial"
_ID_RE = re.compile(r"^(\d{3,})(\d{6})(\d{4})\.npy$")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def json_bytes(metadata: dict) -> bytes:
    return json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync-free, then rename over `path`."""
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove_partials(folder: Path) -> int:
    """Delete leftovers of an interrupted run; returns how many were removed."""
    count = 0
    if folder.is_dir():
        for path in folder.rglob(f"*{PARTIAL}"):
            path.unlink(missing_ok=True)
            count += 1
    return count


_OUTPUT_FILE_RE = re.compile(r"^\d+\.(npy|json)(\.partial)?$")
SHARDS_DIR = "shards"


def clear_outputs(root: Path) -> int:
    """Remove both output forms of earlier runs under `root` (for --overwrite); returns files removed.

    Only what the writers create is touched: `ROOT/{rank}/{id}.npy|json` and `ROOT/shards/`.
    """
    removed = 0
    root = Path(root)
    if not root.is_dir():
        return 0
    for rank_dir in root.iterdir():
        if rank_dir.is_dir() and rank_dir.name.isdigit():
            for path in rank_dir.iterdir():
                if _OUTPUT_FILE_RE.match(path.name):
                    path.unlink()
                    removed += 1
    shards = root / SHARDS_DIR
    if shards.is_dir():
        removed += sum(1 for p in shards.rglob("*") if p.is_file())
        shutil.rmtree(shards)
    return removed


class FolderWriter:
    """The per-rank folder layout, with ids `f"{rank:03d}{batch:06d}{i:04d}"` never reused."""

    def __init__(self, output_path: Path, rank: int):
        self.rank = rank
        self.folder = Path(output_path) / str(rank)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_partials(self.folder)
        self.first_batch_index = self._next_free_batch_index()

    def _next_free_batch_index(self) -> int:
        """One past the largest batch index already on disk, so a resumed run never reuses an id."""
        last = -1
        for entry in os.scandir(self.folder):
            match = _ID_RE.match(entry.name)
            if match and int(match.group(1)) == self.rank:
                last = max(last, int(match.group(2)))
        return last + 1

    def latent_id(self, batch_index: int, sample_index: int) -> str:
        return f"{self.rank:03d}{batch_index:06d}{sample_index:04d}"

    def stage(self, latent_id: str, latent: np.ndarray, metadata: dict) -> list[Path]:
        """Write both files under `.partial` names; returns their final paths."""
        finals = [self.folder / f"{latent_id}.npy", self.folder / f"{latent_id}.json"]
        for final, data in zip(finals, (npy_bytes(latent), json_bytes(metadata))):
            with open(final.with_name(final.name + PARTIAL), "wb") as f:
                f.write(data)
        return finals

    @staticmethod
    def commit(finals: list[Path]) -> None:
        # json files first, npy last: a reader that lists *.npy always finds the json beside it
        for final in sorted(finals, key=lambda p: p.suffix == ".npy"):
            os.replace(final.with_name(final.name + PARTIAL), final)

    @staticmethod
    def discard(finals: list[Path]) -> None:
        for final in finals:
            final.with_name(final.name + PARTIAL).unlink(missing_ok=True)


class LatentShardWriter:
    """Latent tars for one input unit: `ROOT/{dataset_id}/{name}-{part:03d}.tar`.

    A new part starts when the current one holds `maxcount` samples or `maxsize` bytes.
    Members are written with fixed mtime/owner so identical latents give identical tars.
    """

    def __init__(self, root: Path, dataset_id: str, name: str, *, maxcount: int, maxsize: int):
        self.folder = Path(root) / dataset_id
        self.name = name
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.parts: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._size = 0
        self._keys: set[str] = set()

    def _part_path(self, index: int) -> Path:
        return self.folder / f"{self.name}-{index:03d}.tar"

    def _open_part(self) -> None:
        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self._part_path(len(self.parts))
        self.parts.append(final)
        self._tar = tarfile.open(final.with_name(final.name + PARTIAL), "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._size = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = "wds-encode"
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))
        self._size += 512 + (len(data) + 511) // 512 * 512

    def write(self, key: str, latent: np.ndarray, metadata: dict) -> str:
        """Add `KEY.npy` + `KEY.json`; returns the member key actually used (unique in the unit)."""
        if key in self._keys:
            n = 1
            while f"{key}_dup{n}" in self._keys:
                n += 1
            key = f"{key}_dup{n}"
        self._keys.add(key)
        npy, js = npy_bytes(latent), json_bytes(metadata)
        if self._tar is None or self._count >= self.maxcount or (
                self._count > 0 and self._size + len(npy) + len(js) + 1024 > self.maxsize):
            self._open_part()
        self._add(f"{key}.npy", npy)
        self._add(f"{key}.json", js)
        self._count += 1
        return key

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def commit(self) -> list[Path]:
        self.close()
        for final in self.parts:
            os.replace(final.with_name(final.name + PARTIAL), final)
        return list(self.parts)

    def discard(self) -> None:
        self.close()
        for final in self.parts:
            final.with_name(final.name + PARTIAL).unlink(missing_ok=True)
