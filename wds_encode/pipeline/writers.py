"""Latents -> objects, in both output forms, made visible per input unit all at once.

`FolderWriter` writes stable-audio-tools' pre_encode layout, `OUT/{rank}/{id}.npy` + `{id}.json`
(or nothing, with `--no-folder`);
`LatentShardWriter` writes one input unit's latent tars (`KEY.json` + `KEY.npy` members, through
webdataset's `TarWriter`). Both write through a `storage.Place`: staged while the unit is open,
published when it commits (locally: `*.partial` files renamed; on S3: uploads awaited, multipart
uploads completed), discarded otherwise. What a crash leaves behind is removed by the next run
(`manifest.RunManifest.prepare`), because no unit record claims it.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from typing import Optional

import numpy as np
import webdataset

from ..storage import ObjectWriter, Place

SHARDS_DIR = "shards"
_WRITER = r"r\d+-g\d+-[0-9a-f]{6}"
_WRITER_FILE_RE = re.compile(rf"^\d+/({_WRITER})-\d{{6}}-\d{{4}}\.(?:npy|json)(?:\.partial)?$")
_WRITER_TAR_RE = re.compile(rf"\.({_WRITER})-\d{{3,}}\.tar(?:\.partial)?$")
_ID_RE = re.compile(r"^(\d{3,})(\d{6})(\d{4})$")                                  # ids of older versions
_FOLDER_FILE_RE = re.compile(rf"^(\d+)/((?:{_WRITER}-\d{{6}}-\d{{4}})|\d{{13,}})\.(npy|json)(\.partial)?$")
_LATENT_SHARD_RE = re.compile(rf"^shards/([^/]+)/(.+?)(?:\.{_WRITER})?-\d{{3,}}\.tar(\.partial)?$")


def new_writer_id(rank: int, generation: int) -> str:
    """The name of one rank's writing in one attempt: `r{rank}-g{generation}-{6 random hex}`. Every object
    the writer makes carries it (window files, latent tars, its journal), so two attempts of one unit,
    part or job never write the same name, and the clean-up knows whose an object is."""
    return f"r{rank}-g{generation}-{uuid.uuid4().hex[:6]}"


def writer_of(relative: str) -> Optional[str]:
    """The writer id in the name of a window file or a latent tar (whatever its unit is called), or None
    for other names and for the names of older versions, which had none."""
    match = _WRITER_FILE_RE.match(relative) or _WRITER_TAR_RE.search(relative)
    return match.group(1) if match else None


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def json_bytes(metadata: dict) -> bytes:
    return json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8")


def parse_latent_id(latent_id: str) -> Optional[tuple[int, int, int]]:
    """An older version's id, `f"{rank:03d}{batch:06d}{i:04d}"` -> (rank, batch, i); None for another name."""
    match = _ID_RE.match(latent_id)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None


def folder_file_id(relative: str) -> Optional[tuple[int, str]]:
    """`"3/r3-g1-a1b2c3-000012-0001.npy"` -> (3, "r3-g1-a1b2c3-000012-0001"): a folder-layout file
    written by the writers (older versions' all-digit ids too)."""
    match = _FOLDER_FILE_RE.match(relative)
    return (int(match.group(1)), match.group(2)) if match else None


def latent_shard_unit(relative: str) -> Optional[str]:
    """`"shards/music/part-000001.r0-g1-a1b2c3-002.tar"` -> `"music/part-000001"`: the unit whose latent
    tar it is."""
    match = _LATENT_SHARD_RE.match(relative)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def folder_files(rank: int, latent_id: str) -> list[str]:
    """A window's two files, json first: a reader that lists *.npy always finds the json beside it."""
    return [f"{rank}/{latent_id}.json", f"{rank}/{latent_id}.npy"]


class FolderWriter:
    """The per-rank folder layout, `OUT/{rank}/{writer}-{batch:06d}-{i:04d}.npy` (and `.json`).

    The writer id makes every name this attempt's own (`new_writer_id`), so a retry racing its
    original, or a resumed run, never writes over another's file. With `enabled=False` (`--no-folder`)
    nothing is written: ids are still made (they go into every window's metadata), `stage` returns no
    files and `commit` / `discard` have nothing to do.
    """

    def __init__(self, place: Place, rank: int, writer: str, enabled: bool = True):
        self.place = place
        self.rank = rank
        self.writer = writer
        self.enabled = enabled

    def latent_id(self, batch_index: int, sample_index: int) -> str:
        return f"{self.writer}-{batch_index:06d}-{sample_index:04d}"

    def stage(self, latent_id: str, latent: np.ndarray, metadata: dict) -> list[str]:
        """Stage both files; returns their relative paths (json first), none when disabled."""
        if not self.enabled:
            return []
        files = folder_files(self.rank, latent_id)
        self.place.stage(files[0], json_bytes(metadata))
        self.place.stage(files[1], npy_bytes(latent))
        return files

    def commit(self, files: list[str]) -> None:
        if self.enabled:
            self.place.publish(files)

    def discard(self, files: list[str]) -> None:
        if self.enabled:
            self.place.unstage(files)


class LatentShardWriter:
    """Latent tars for one input unit: `shards/{dataset_id}/{name}.{writer}-{part:03d}.tar`.

    A new part starts when the current one holds `maxcount` samples or `maxsize` bytes. Members
    have a fixed mtime/owner/mode, so identical latents give byte-identical tars.
    """

    def __init__(self, place: Place, dataset_id: str, name: str, *, writer: str, maxcount: int, maxsize: int):
        self.place = place
        self.folder = f"{SHARDS_DIR}/{dataset_id}"
        self.name = f"{name}.{writer}"
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.parts: list[str] = []          # relative paths of the parts, in order
        self._objects: list[ObjectWriter] = []
        self._tar: Optional[webdataset.TarWriter] = None
        self._count = 0
        self._size = 0
        self._keys: set[str] = set()

    def _open_part(self) -> None:
        self._close_tar()
        relative = f"{self.folder}/{self.name}-{len(self.parts):03d}.tar"
        target = self.place.open_object(relative)
        self.parts.append(relative)
        self._objects.append(target)
        self._tar = webdataset.TarWriter(target, encoder=False, user="wds-encode", group="wds-encode",
                                         mode=0o644, mtime=0)
        self._count = 0
        self._size = 0

    def write(self, key: str, latent: np.ndarray, metadata: dict) -> str:
        """Add `KEY.json` + `KEY.npy`; returns the member key actually used (unique in the unit)."""
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
        assert self._tar is not None
        self._tar.write({"__key__": key, "json": js, "npy": npy})
        self._count += 1
        self._size += sum(512 + (len(data) + 511) // 512 * 512 for data in (npy, js))
        return key

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._objects[-1].finish()
            self._tar = None

    def commit(self) -> list[str]:
        self._close_tar()
        for target in self._objects:
            target.commit()
        return list(self.parts)

    def discard(self) -> None:
        try:
            if self._tar is not None:
                self._tar.close()
        except Exception:
            pass
        self._tar = None
        for target in self._objects:
            target.abort()
