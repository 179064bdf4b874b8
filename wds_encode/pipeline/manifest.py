"""Run identity, details.json, per-unit completion records, and the clean-up of interrupted runs;
errors.jsonl and filelist.txt, rewritten from the records.

A unit counts as done only when its record exists under `OUT/manifest/log/`: it is written last,
atomically, after the unit's outputs, and it lists them. While a rank writes, it keeps a marker
under `OUT/manifest/writing/`; a marker left behind means that rank was interrupted, and the next
run removes from that rank's folder, and from `shards/`, every object no record lists. So a rerun
ends with exactly the committed outputs of every unit, locally and on S3 (which has no rename).
A rerun with another model, checkpoint or encode option is refused unless `--overwrite`.

Records are numbered per rank and listed again in index objects (`RankLog`, `RunManifest.compact`),
so that whoever reads the output needs a few requests, not one per unit (`read_records`). With array
jobs (`job.parts`) the clean-up after an interrupted rank touches only what its part owns.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..job.parts import Part
from ..storage import PROBE_DIR, Place, StorageError, redact
from .writers import SHARDS_DIR, folder_file_id, folder_files, latent_shard_unit, parse_latent_id

# Options that change what is written; anything else (workers, batch size, progress) does not.
IDENTITY_OPTIONS = ("sample_size", "chunking", "max_chunks", "latent_mode", "is_discrete", "seed",
                    "latent_dtype", "effective_precision", "ckpt_prefix")
DETAILS = "details.json"
RECORDS_DIR = "manifest"
LOG_DIR = "manifest/log"          # the unit records, LOG_DIR/{rank}/{seq}.json: the source of truth
INDEX_DIR = "manifest/index"      # index objects: gzip'd JSON lines of records, so readers need not GET each
WRITING_DIR = "manifest/writing"
INDEX_READ_TRIES = 5
INDEX_EVERY_SECONDS = 120.0       # a rank still writing lists its records in an index at least this often
WHOLE_JOB = Part()
_LOG_RANK_RE = re.compile(r"^manifest/log/(\d+)/")
ERRORS_LOG = "errors.jsonl"
FILELIST = "filelist.txt"    # the committed windows of the folder layout, as PreEncodedDataset reads them
SILENCE = "silence.npy"      # the latents of silence, with which SA3's PreEncodedDataset pads short latents


class ManifestError(RuntimeError):
    """The output belongs to a different run."""


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def run_identity(model_config: dict, ckpt_path: str | Path, options: dict, random_crop: bool) -> dict:
    """What makes two runs' outputs interchangeable: model, weights and encode options."""
    ident = {
        "model_config_sha256": json_sha256(model_config),
        "checkpoint_sha256": file_sha256(ckpt_path),
        "options": {**{k: options[k] for k in IDENTITY_OPTIONS}, "random_crop": random_crop,
                    # only where it changes what is written, so outputs of other modes keep their identity
                    **({"max_seconds": options["max_seconds"]} if options.get("chunking") == "full" else {}),
                    # --overlap joins a long file's chunks into one window; 0 (the default) keeps old identities
                    **({"overlap": options["overlap"]} if options.get("overlap") else {}),
                    # --no-folder: a resumed output would hold the folder layout of only some units
                    **({"folder": False} if options.get("folder") is False else {})},
    }
    ident["hash"] = json_sha256(ident)
    return ident


def versions() -> dict:
    import numpy
    import torch

    from .. import __version__
    return {"wds_encode": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def record_name(rank: int, seq: int) -> str:
    """Rank `rank`'s `seq`-th record: the names of one rank sort in commit order, so what came after
    an index is one listing (`start_after`) of the rank's folder."""
    return f"{LOG_DIR}/{rank}/{seq:09d}.json"


def index_name(rank: int) -> str:
    """A new index object's name (never reused: index objects are written once, deleted after a merge)."""
    return f"{INDEX_DIR}/{time.time_ns():020d}-r{rank}-{uuid.uuid4().hex[:8]}.json.gz"


@dataclass
class OutputState:
    """What `prepare` found: units done, where each rank's batch ids and record numbers continue,
    what it removed."""

    done: set[str] = field(default_factory=set)
    next_batch: dict[int, int] = field(default_factory=dict)
    next_seq: dict[int, int] = field(default_factory=dict)
    removed: int = 0              # objects of unfinished units, partial files, open uploads
    interrupted_ranks: list[int] = field(default_factory=list)


@dataclass
class RecordSet:
    """Every committed unit's record as `RunManifest.read_records` found it, and how it found them."""

    records: list[dict]
    index_names: list[str]        # the index objects read
    uncompacted: list[dict]       # records no index lists yet (the tails of ranks still marked as writing)
    markers: list[dict]

    def next_seq(self) -> dict[int, int]:
        """Per rank, one past the highest record number found."""
        return {rank: seq + 1 for rank, seq in _last_seq(self.records).items()}


class RunManifest:
    """Reads and writes details.json, the unit records and their index, the writing markers and
    errors.jsonl of a Place."""

    def __init__(self, place: Place):
        self.place = place
        self._seq: dict[int, int] = {}   # write_record without a seq: where this rank's numbers continue

    # ------------------------------------------------------------------ details.json
    def load_details(self) -> Optional[dict]:
        data = self.place.read(DETAILS)
        return None if data is None else json.loads(data.decode("utf-8"))

    def write_details(self, details: dict) -> None:
        self.place.write(DETAILS, json.dumps(redact(details), indent=1, default=str).encode("utf-8"))

    # ------------------------------------------------------------------ records
    def records(self) -> list[dict]:
        """Every unit record, one per unit (see `read_records`)."""
        return self.read_records().records

    def read_records(self) -> RecordSet:
        """The index objects, then the records written after them: in O(1) requests (a listing of the
        index, one of the writing markers, one per marked rank), however many units are done.

        Records are written only while their rank's marker exists, and a marker is removed only once an
        index lists its rank's records (`RankLog.close`, `prepare`): so what no index lists is in the
        folder of a marked rank, after the last record an index lists. With no index at all (a first run
        still going, or an output of an older version) every record is listed and read."""
        for _attempt in range(INDEX_READ_TRIES):
            names = sorted(self.place.list(INDEX_DIR))
            indexed = self.place.read_many(names) if names else {}
            if all(data is not None for data in indexed.values()):
                break  # else a merge removed one after the listing: list again (the merged one is there)
        else:
            raise StorageError(self.place.child(INDEX_DIR), "the index objects kept changing while read; retry")
        by_unit: dict[str, dict] = {}
        for data in indexed.values():
            for record in _index_records(data):
                by_unit.setdefault(record["shard"], record)
        markers = self.writing_markers()
        if names:
            covered = _last_seq(by_unit.values())
            tails = []
            for rank in sorted({int(m["rank"]) for m in markers if "rank" in m}):
                after = record_name(rank, covered[rank]) if rank in covered else ""
                tails.extend(rel for rel in self.place.list(f"{LOG_DIR}/{rank}/", start_after=after)
                             if rel.endswith(".json"))
        else:
            tails = [rel for rel in self.place.list(RECORDS_DIR)
                     if rel.endswith(".json") and (rel.count("/") == 1 or rel.startswith(f"{LOG_DIR}/"))]
        uncompacted = []
        for data in self.place.read_many(sorted(tails)).values():
            record = _parse_record(data)
            if record is not None and record["shard"] not in by_unit:
                by_unit[record["shard"]] = record
                uncompacted.append(record)
        records = sorted(by_unit.values(), key=lambda r: r["shard"])
        return RecordSet(records=records, index_names=names, uncompacted=uncompacted, markers=markers)

    def write_record(self, record: dict) -> dict:
        """Commit one unit: its record, written last, after the unit's outputs (`rank` and `seq` name it;
        without a `seq`, the rank's next number); returns the record as written."""
        rank = int(record.get("rank", 0))
        if "seq" not in record:
            if rank not in self._seq:
                self._seq[rank] = self.read_records().next_seq().get(rank, 0)
            record = {**record, "seq": self._seq[rank]}
        self._seq[rank] = int(record["seq"]) + 1
        record = {"rank": rank, **record, "finished_at": time.time()}
        self.place.write(record_name(rank, int(record["seq"])), json.dumps(record).encode("utf-8"))
        return record

    def write_index(self, records: list[dict], rank: int = 0) -> Optional[str]:
        """One new index object listing `records` (records that exist: an index never lists a unit whose
        record is missing); None when there is nothing to list."""
        if not records:
            return None
        name = index_name(rank)
        lines = "".join(json.dumps(record, default=str) + "\n" for record in records)
        self.place.write(name, gzip.compress(lines.encode("utf-8"), compresslevel=6, mtime=0))
        return name

    def compact(self, found: Optional[RecordSet] = None, rank: int = 0) -> int:
        """Merge every index object and the records no index lists yet into one index object, then remove
        the objects it replaces (after: a crash in between leaves two indexes that agree). Safe while other
        ranks or parts run: it removes only index objects it has read, and index objects never change.
        Returns how many index objects it replaced."""
        found = self.read_records() if found is None else found
        if len(found.index_names) <= 1 and not found.uncompacted:
            return 0
        if self.write_index(found.records, rank) is not None:
            self.place.delete(found.index_names)
        return len(found.index_names)

    def writing_markers(self) -> list[dict]:
        names = sorted(self.place.list(WRITING_DIR))
        markers = []
        for rel, data in self.place.read_many(names).items():
            try:
                marker = json.loads(data.decode("utf-8")) if data else {}
            except (ValueError, UnicodeDecodeError):
                marker = {}
            markers.append({**marker, "name": rel})
        return markers

    def start_writing(self, rank: int, first_batch: int, first_seq: int = 0, part: str = "") -> str:
        """Mark that `rank` is writing: if it never calls `done_writing`, the next run cleans up after it."""
        name = f"{WRITING_DIR}/rank-{rank:03d}.json"
        self.place.write(name, json.dumps({"rank": rank, "first_batch": first_batch, "first_seq": first_seq,
                                           "part": part, "host": socket.gethostname(),
                                           "pid": os.getpid(), "started_at": time.time()}).encode("utf-8"))
        return name

    def done_writing(self, name: str) -> None:
        self.place.delete([name])

    # ------------------------------------------------------------------ a run starts
    def prepare(self, identity: dict, overwrite: bool, part: Part = WHOLE_JOB,
                units: Optional[set[str]] = None) -> OutputState:
        """Check the output belongs to this run (or clear it with --overwrite), clean up after this part's
        interrupted ranks (`units`: this part's unit ids; None: every unit), and say which units are done
        and where each rank's batch ids and record numbers continue."""
        details = self.load_details()
        old = (details or {}).get("run_identity")
        if old and old.get("hash") != identity["hash"]:
            if not overwrite:
                changed = [k for k in ("model_config_sha256", "checkpoint_sha256") if old.get(k) != identity.get(k)]
                before, now = old.get("options", {}), identity["options"]
                changed += [f"options.{k}" for k in [*now, *(k for k in before if k not in now)]
                            if before.get(k) != now.get(k)]
                raise ManifestError(
                    f"{self.place.url} holds the output of a different run (changed: {', '.join(changed) or 'identity'}); "
                    "use a new --output-path, or --overwrite to re-encode everything into it")
        if overwrite:
            return OutputState(removed=self.clear())
        found = self.read_records()
        state = OutputState(done={r["shard"] for r in found.records}, next_seq=found.next_seq())
        claimed: set[str] = set()
        for record in found.records:
            rank = int(record.get("rank", 0))
            for latent_id in record.get("folder_ids", ()):
                claimed.update(folder_files(rank, latent_id))
                _note_batch(state.next_batch, latent_id)
            if "batch_end" in record:
                state.next_batch[rank] = max(state.next_batch.get(rank, 0), int(record["batch_end"]))
            claimed.update(record.get("latent_shards", ()))
        markers = [m for m in found.markers if "rank" in m and part.owns(int(m["rank"]))]
        state.interrupted_ranks = sorted({int(m["rank"]) for m in markers})
        # before a marker goes, an index must list its rank's records (so do the records of an older
        # version, which no index lists; with no index yet, every record found goes into the first one)
        self.write_index([r for r in found.uncompacted
                          if not found.index_names or "seq" not in r or int(r.get("rank", 0)) in state.interrupted_ranks])
        if markers:
            owned = owned_by(part, units)
            candidates: dict[str, int] = {}
            for rank in state.interrupted_ranks:
                candidates.update(self.place.list(f"{rank}/"))
            candidates.update(self.place.list(f"{SHARDS_DIR}/"))
            if part.whole:
                candidates.update(self.place.list(f"{PROBE_DIR}/"))
            orphans = []
            for rel in candidates:
                folder_file = folder_file_id(rel)
                if folder_file is not None:
                    _note_batch(state.next_batch, folder_file[1])  # never reuse even a removed object's id
                ours = folder_file is not None or rel.startswith((f"{SHARDS_DIR}/", f"{PROBE_DIR}/"))
                if ours and rel not in claimed and owned(rel):
                    orphans.append(rel)
            state.removed = self.place.delete(orphans) + self.place.remove_unfinished(owned)
            self.place.delete(m["name"] for m in markers)
        return state

    def clear(self) -> int:
        """--overwrite: remove every object the writers and the manifest made; returns how many
        (the index first: an index never lists a record that is gone)."""
        found = self.place.list()
        index = [rel for rel in found if rel.startswith(f"{INDEX_DIR}/")]
        removed = self.place.delete(index)
        ours = [rel for rel in found
                if folder_file_id(rel) is not None or rel.startswith((f"{SHARDS_DIR}/", f"{RECORDS_DIR}/",
                                                                      f"{PROBE_DIR}/"))
                or rel in (ERRORS_LOG, DETAILS, FILELIST, SILENCE)]
        return removed + self.place.delete(rel for rel in ours if rel not in index) + self.place.remove_unfinished()

    # ------------------------------------------------------------------ errors.jsonl
    def write_error_log(self, records: Optional[list[dict]] = None) -> int:
        """Rewrite errors.jsonl from the records (every problem of every done unit); returns lines."""
        records = self.records() if records is None else records
        lines = [json.dumps(problem, default=str) + "\n"
                 for record in sorted(records, key=lambda r: r["shard"]) for problem in record.get("problems", ())]
        if lines or self.place.read(ERRORS_LOG) is not None:
            self.place.write(ERRORS_LOG, "".join(lines).encode("utf-8"))
        return len(lines)

    # ------------------------------------------------------------------ filelist.txt
    def write_filelist(self, records: Optional[list[dict]] = None) -> int:
        """Rewrite filelist.txt from the records: one `RANK/ID.npy` per committed window, relative to the
        output, sorted; Stable Audio 3's and stable-audio-tools' PreEncodedDataset then read exactly these
        windows, never an interrupted run's uncommitted files. Atomic (`Place.write`); returns lines."""
        records = self.records() if records is None else records
        paths = sorted(folder_files(int(record["rank"]), latent_id)[1]
                       for record in records for latent_id in record.get("folder_ids") or ())
        self.place.write(FILELIST, "".join(f"{path}\n" for path in paths).encode("utf-8"))
        return len(paths)


def _note_batch(next_batch: dict[int, int], latent_id: str) -> None:
    parsed = parse_latent_id(latent_id)
    if parsed is not None:
        rank, batch, _ = parsed
        next_batch[rank] = max(next_batch.get(rank, 0), batch + 1)


class RankLog:
    """One rank's commits in one run: its writing marker while it writes, its records in order
    (`LOG_DIR/{rank}/{seq}.json`), and an index of them, renewed every `index_every` seconds and at
    the end, before the marker goes: so a reader finds this run's records in one index object plus
    the few written since it. `check` (a part's lease) is asked before every commit."""

    def __init__(self, manifest: RunManifest, rank: int, *, first_batch: int = 0, first_seq: int = 0,
                 part: str = "", check: Optional[Callable[[], None]] = None,
                 index_every: float = INDEX_EVERY_SECONDS):
        self.manifest = manifest
        self.rank = rank
        self.first_batch = first_batch
        self.part = part
        self.check = check
        self.index_every = index_every
        self.next_seq = first_seq
        self.records: list[dict] = []
        self._index: Optional[str] = None
        self._indexed = 0                    # records the current index object lists
        self._indexed_at = time.monotonic()
        self.marker = manifest.start_writing(rank, first_batch, first_seq, part)

    def commit(self, record: dict) -> None:
        """Write one unit's record (its outputs are already visible)."""
        if self.check is not None:
            self.check()
        record = self.manifest.write_record({**record, "rank": self.rank, "seq": self.next_seq})
        self.next_seq += 1
        self.records.append(record)
        if time.monotonic() - self._indexed_at >= self.index_every:
            self._reindex()

    def _reindex(self) -> None:
        """A new index of every record of this run, then the previous one removed (a merge may have removed
        it already: it had read it, and its merged index lists those records too)."""
        name = self.manifest.write_index(self.records, self.rank)
        if self._index is not None:
            self.manifest.place.delete([self._index])
        self._index, self._indexed, self._indexed_at = name, len(self.records), time.monotonic()

    def close(self) -> None:
        """Every unit this rank opened is committed or removed: index what is not yet, then drop the marker."""
        if len(self.records) > self._indexed:
            self._reindex()
        self.manifest.done_writing(self.marker)


def owned_by(part: Part, units: Optional[set[str]]) -> Callable[[str], bool]:
    """Whether an object (a relative path) is one that `part` writes: its ranks' folders and records,
    the latent tars of its units (`units`: None, every unit); probe leftovers only for a whole job."""
    def owned(rel: str) -> bool:
        folder_file = folder_file_id(rel)
        if folder_file is not None:
            return part.owns(folder_file[0])
        unit = latent_shard_unit(rel)
        if unit is not None:
            return units is None or unit in units
        rank = _LOG_RANK_RE.match(rel)
        if rank is not None:
            return part.owns(int(rank.group(1)))
        return part.whole
    return owned


def _parse_record(data: Optional[bytes]) -> Optional[dict]:
    """A record's JSON (damaged ones, which atomic writes should never leave, are None)."""
    try:
        record = json.loads(data.decode("utf-8")) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "shard" in record else None


def _index_records(data: bytes) -> list[dict]:
    """The records an index object lists (gzip'd JSON lines)."""
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    return [record for record in map(lambda line: _parse_record(line.encode("utf-8")), lines) if record is not None]


def _last_seq(records) -> dict[int, int]:
    """Per rank, the highest record number among `records` (records of an older version have none)."""
    last: dict[int, int] = {}
    for record in records:
        if "seq" in record:
            rank = int(record.get("rank", 0))
            last[rank] = max(last.get(rank, -1), int(record["seq"]))
    return last
