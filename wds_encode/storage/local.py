"""The local-path backend: a file is written under a temporary name (`*.partial`) and renamed into
place, so a reader sees the old file or the new one, never a part. A create-if-absent is a hard link
of the temporary file (it fails when the name exists); a write-if-unchanged holds an advisory lock
(flock) on the object's folder while it compares and renames. Temporary files are never listed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

from . import FULL_ERRNOS, PARTIAL, PROBE_DIR, ObjectWriter, Place, StorageError, Tagged, local_error

_WRITER_TOKEN = re.compile(r"\.\d+-[0-9a-f]{8}$")   # `write`'s temporary files: NAME.PID-RANDOM.partial
# A compare-and-rename holds its folder's lock for a read and a rename; a lock held this long belongs to
# a process that was paused (SIGSTOP, a frozen VM) inside that window: say so rather than wait unseen
FOLDER_LOCK_WAIT_SECONDS = 120.0


def _rename_into_place(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise local_error(str(target), exc, "cannot rename into place") from None


class LocalPlace(Place):
    def __init__(self, url: str):
        self.url = str(url)
        self.root = Path(url)

    def _path(self, relative: str) -> Path:
        return self.root / relative

    def read(self, relative: str) -> Optional[bytes]:
        try:
            return self._path(relative).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise local_error(str(self._path(relative)), exc, "cannot read") from None

    def _write_file(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                path.unlink(missing_ok=True)  # a truncated file helps nobody on a full disk
            raise local_error(str(path), exc, "cannot write") from None

    def _temporary(self, final: Path, data: bytes, sync: bool = False) -> Path:
        """`data` in a temporary file of this writer's own beside `final` (two writers never share one)."""
        tmp = final.with_name(f"{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}")
        self._write_file(tmp, data)
        if sync:
            try:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise local_error(str(final), exc, "cannot write") from None
        return tmp

    def write(self, relative: str, data: bytes) -> None:
        """Atomic, also against another process writing the same object (array parts share details.json and
        the listing): each writer renames its own temporary file."""
        final = self._path(relative)
        _rename_into_place(self._temporary(final, data), final)

    def read_tagged(self, relative: str) -> Optional[Tagged]:
        path = self._path(relative)
        try:
            with open(path, "rb") as f:
                data = f.read()
                return Tagged(data, _tag(os.fstat(f.fileno()), data))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise local_error(str(path), exc, "cannot read") from None

    def replace(self, relative: str, data: bytes, tag: Optional[str]) -> Optional[str]:
        final = self._path(relative)
        tmp = self._temporary(final, data, sync=True)
        new_tag = _tag(os.stat(tmp), data)   # a link or a rename keeps the inode, its mtime and size
        try:
            if tag is None:
                try:
                    os.link(tmp, final)
                    return new_tag
                except FileExistsError:
                    return None
            with _folder_lock(final.parent):
                current = self.read_tagged(relative)
                if current is None or current.tag != tag:
                    return None
                _rename_into_place(tmp, final)
                return new_tag
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise local_error(str(final), exc, "cannot replace") from None
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, relatives: Iterable[str]) -> int:
        count = 0
        for rel in relatives:
            try:
                self._path(rel).unlink()
                count += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise local_error(str(self._path(rel)), exc, "cannot delete") from None
        return count

    def list(self, prefix: str = "", start_after: str = "") -> dict[str, int]:
        """Files under `prefix` (a folder, relative), recursively: relative path -> size; with
        `start_after`, only the paths that sort after it (as S3's StartAfter). Temporary files
        (`*.partial`) are not listed: a writer killed mid-write leaves one, and it is no data."""
        return {rel: size for rel, size in self._walk(prefix, start_after).items() if not rel.endswith(PARTIAL)}

    def _walk(self, prefix: str = "", start_after: str = "") -> dict[str, int]:
        """Every file under `prefix`, temporary ones too."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        found = {}
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                if start_after and rel <= start_after:
                    continue
                try:
                    found[rel] = os.path.getsize(path)
                except FileNotFoundError:
                    continue
        return found

    def stage(self, relative: str, data: bytes) -> None:
        final = self._path(relative)
        self._write_file(final.with_name(final.name + PARTIAL), data)

    def publish(self, relatives: list[str]) -> None:
        for rel in relatives:
            final = self._path(rel)
            _rename_into_place(final.with_name(final.name + PARTIAL), final)

    def unstage(self, relatives: list[str]) -> None:
        for rel in relatives:
            final = self._path(rel)
            final.with_name(final.name + PARTIAL).unlink(missing_ok=True)

    def open_object(self, relative: str) -> "ObjectWriter":
        return LocalObjectWriter(self._path(relative))

    def check_writable(self) -> None:
        """A probe file in the output folder itself, deleted at once (a probe folder would stay behind,
        and removing it would race with another rank's probe); a leftover is a `*.partial`."""
        self._check_folder()
        name = f"{PROBE_DIR}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}"
        probe = self._path(name)
        self._write_file(probe, b"wds-encode write probe\n")
        try:
            probe.unlink()
        except OSError as exc:
            raise local_error(str(probe), exc, "cannot delete") from None

    def _check_folder(self) -> None:
        """The output is a folder (made if missing): a file at its path, or at a folder above it, is refused
        by name rather than by the errno of the first write into it."""
        for path in (self.root, *self.root.parents):
            if os.path.isdir(path):
                return
            if os.path.lexists(path):
                what = "is a file" if path == self.root else f"cannot be made: {path}, a folder above it, is a file"
                raise StorageError(str(path), f"output path {self.url} {what}, not a folder (an output path is a "
                                              "folder, made if missing): pick another path, or move the file")

    def remove_unfinished(self, owned: Optional[Callable[[str], bool]] = None) -> int:
        """Delete `*.partial` files an interrupted run left behind (only those `owned` says are ours)."""
        partials = [rel for rel in self._walk() if rel.endswith(PARTIAL)
                    and (owned is None or owned(_WRITER_TOKEN.sub("", rel[:-len(PARTIAL)])))]
        return self.delete(partials)


def _tag(stat: os.stat_result, data: bytes) -> str:
    """A local file's version: every write renames a new file into place, but inode numbers are reused
    and mtimes can be coarse, so the content's hash too (as S3's ETag)."""
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{hashlib.blake2b(data, digest_size=12).hexdigest()}"


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on a folder, for a compare-and-rename of one of its files (processes
    on one host, or NFS clients with lock support; it leaves no file behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + FOLDER_LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(str(folder), f"another process has held this folder's lock for over "
                                       f"{FOLDER_LOCK_WAIT_SECONDS:g} s (a wds-encode paused or hung while "
                                       "it replaced a file here, on this host or over NFS): resume or stop it, "
                                       "then rerun") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)   # releases the lock


class LocalObjectWriter(ObjectWriter):
    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + PARTIAL)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: Optional[BinaryIO] = open(self.tmp, "wb")
        except OSError as exc:
            raise local_error(str(self.tmp), exc, "cannot write") from None

    def write(self, data: bytes) -> int:
        assert self._file is not None
        try:
            return self._file.write(data)
        except OSError as exc:
            raise local_error(str(self.path), exc, "cannot write") from None

    def finish(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                raise local_error(str(self.path), exc, "cannot write") from None
            self._file = None

    def commit(self) -> None:
        self.finish()
        _rename_into_place(self.tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)
