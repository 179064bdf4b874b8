"""Run identity, details.json, the commit of each unit, and the clean-up after dead writers;
errors.jsonl and filelist.txt, rewritten from the records.

The commit protocol (exactly once does not depend on leases, timing or the store's listing):
- a writer (one rank of one attempt, `writers.new_writer_id`) writes only names no other writer can
  produce: its window files and latent tars carry its id;
- before it commits a unit it notes the unit in its journal, `manifest/journal/{writer}/{seq}.json`;
- a unit commits by one create-if-absent of its record, `manifest/done/{unit}.json`
  (`Place.create`: S3's If-None-Match, a hard link locally). The first commit of a unit wins; a later
  one is refused, and its writer deletes what it wrote for the unit. A record is never overwritten,
  and removed only by --overwrite.
While a writer writes it keeps a marker under `manifest/writing/`; it names the lease its attempt
holds (`job.parts.Lease`) and the lease's generation. A marker whose lease has since been taken over
or released belongs to a dead writer: the next holder removes every object that no record names and
whose writer is not alive, then the marker.

Readers need a few requests, not one per unit (`read_records`): index objects list records and which
journal entries they cover; a marked writer's journal past that is read, each entry resolved to its
unit's record. A rerun with another model, checkpoint or encode option is refused unless --overwrite.
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

from ..job.parts import Part, lease_alive
from ..storage import PROBE_DIR, Place, StorageError, redact
from .records import UnitRecord, output_files, parse_record, window_paths
from .writers import SHARDS_DIR, folder_file_id, latent_shard_unit, writer_of

# Options that change what is written; anything else (workers, batch size, progress) does not.
IDENTITY_OPTIONS = ("sample_size", "chunking", "max_chunks", "latent_mode", "is_discrete", "seed",
                    "latent_dtype", "effective_precision", "ckpt_prefix")
DETAILS = "details.json"
RECORDS_DIR = "manifest"
DONE_DIR = "manifest/done"        # the unit records, DONE_DIR/{unit}.json: created once, the commit
JOURNAL_DIR = "manifest/journal"  # per writer, the units it commits, in order: JOURNAL_DIR/{writer}/{seq}.json
INDEX_DIR = "manifest/index"      # index objects: gzip'd JSON lines of records, so readers need not GET each
WRITING_DIR = "manifest/writing"
LEGACY_LOG_DIR = "manifest/log"   # records of the previous version: LEGACY_LOG_DIR/{rank}/{seq}.json
INDEX_READ_TRIES = 50            # listings of the index while writers replace their index objects
VIEW_WRITE_TRIES = 20             # filelist.txt / errors.jsonl rewritten while other parts rewrite them too
INDEX_EVERY_SECONDS = 120.0       # a writer still writing lists its records in an index at least this often
WHOLE_JOB = Part()
_LEGACY_LOG_RANK_RE = re.compile(r"^manifest/log/(\d+)/")
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
                    **({"folder": False} if options.get("folder") is False else {}),
                    # the filters skip files; unset (the default) keeps old identities
                    **{k: options[k] for k in ("min_duration", "max_duration", "skip_silent")
                       if options.get(k) is not None}},
    }
    ident["hash"] = json_sha256(ident)
    return ident


def versions() -> dict:
    import numpy
    import torch

    from .. import __version__
    return {"wds_encode": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def done_name(unit: str) -> str:
    """A unit's record: the one object whose creation commits the unit."""
    return f"{DONE_DIR}/{unit}.json"


def journal_name(writer: str, seq: int) -> str:
    """A writer's `seq`-th journal entry: one writer's entries sort in commit order, so what came after
    an index is one listing (`start_after`) of its folder."""
    return f"{JOURNAL_DIR}/{writer}/{seq:09d}.json"


def index_name(owner: str) -> str:
    """A new index object's name (never reused: index objects are written once, deleted after a merge)."""
    return f"{INDEX_DIR}/{time.time_ns():020d}-{owner}-{uuid.uuid4().hex[:8]}.json.gz"


@dataclass
class OutputState:
    """What `prepare` found: units done, the writers it found dead and cleaned up after, what it removed."""

    done: set[str] = field(default_factory=set)
    removed: int = 0              # objects of dead writers that no record names, partial files, open uploads
    interrupted_ranks: list[int] = field(default_factory=list)
    dead_writers: list[str] = field(default_factory=list)


@dataclass
class RecordSet:
    """Every committed unit's record as `RunManifest.read_records` found it, and how it found them."""

    records: list[UnitRecord]
    index_names: list[str]        # the index objects read
    markers: list[dict]
    covers: dict[str, int] = field(default_factory=dict)   # per writer, the last journal entry these records cover
    # records no index lists yet, by where they were found: a marker's name (its writer's journal, or an
    # older version's rank log), or "" (the listing of every record, when there is no index)
    tails: dict[str, list[UnitRecord]] = field(default_factory=dict)

    @property
    def uncompacted(self) -> list[UnitRecord]:
        """The records no index lists yet."""
        return [record for found in self.tails.values() for record in found]


class RunManifest:
    """Reads and writes details.json, the unit records, journals and their index, the writing markers,
    errors.jsonl and filelist.txt of a Place."""

    def __init__(self, place: Place):
        self.place = place

    # ------------------------------------------------------------------ details.json
    def load_details(self) -> Optional[dict]:
        data = self.place.read(DETAILS)
        return None if data is None else json.loads(data.decode("utf-8"))

    def write_details(self, details: dict) -> None:
        self.place.write(DETAILS, json.dumps(redact(details), indent=1, default=str).encode("utf-8"))

    # ------------------------------------------------------------------ records
    def records(self) -> list[UnitRecord]:
        """Every unit record, one per unit (see `read_records`)."""
        return self.read_records().records

    def read_records(self) -> RecordSet:
        """The writing markers, then the index objects, then the records past them: in O(1) requests (a
        listing of the markers, one of the index, one per marked writer), however many units are done.

        Markers are listed first: a writer removes its marker only after an index lists its records
        (`RankLog.close`, `prepare`), so a marker gone before the listing means its index is there, and
        a marker seen means its journal is read past whatever index was read. Journal entries are never
        removed, and index objects only after a merged one lists their records (a reader that finds one
        gone lists again). With no index at all, every record is listed."""
        markers = self.writing_markers()
        indexed: dict[str, bytes] = {}
        for _attempt in range(INDEX_READ_TRIES):
            names = sorted(self.place.list(INDEX_DIR))
            fresh = self.place.read_many([name for name in names if name not in indexed])
            indexed.update((name, data) for name, data in fresh.items() if data is not None)
            if all(data is not None for data in fresh.values()):
                break
            # one was removed after the listing: whoever removed it (a merge, its writer's newer index) had
            # written one that lists as much before; list again and read what is new
        else:
            raise StorageError(self.place.child(INDEX_DIR), "the index objects kept changing while read; retry")
        names = sorted(indexed)
        by_unit: dict[str, dict] = {}
        covers: dict[str, int] = {}
        for data in indexed.values():
            header, records = _index_content(data)
            for writer, seq in header.get("covers", {}).items():
                covers[writer] = max(covers.get(writer, -1), int(seq))
            for record in records:
                by_unit.setdefault(record["shard"], record)
        tails: dict[str, list[UnitRecord]] = {}

        def take(source: str, records) -> None:
            for record in records:
                if record is not None and record["shard"] not in by_unit:
                    by_unit[record["shard"]] = record
                    tails.setdefault(source, []).append(record)

        for marker in markers:
            writer = marker.get("writer")
            if writer:
                after = journal_name(writer, covers[writer]) if writer in covers else ""
                entries = sorted(self.place.list(f"{JOURNAL_DIR}/{writer}/", start_after=after))
                if entries:
                    covers[writer] = max(covers.get(writer, -1), _journal_seq(entries[-1]))
                units = [_parse_unit(data) for data in self.place.read_many(entries).values()]
                wanted = [u for u in dict.fromkeys(units) if u is not None and u not in by_unit]
                take(marker["name"], (parse_record(data) for data in
                                      self.place.read_many([done_name(u) for u in wanted]).values()))
            elif "rank" in marker:   # a rank of the previous version: records numbered per rank
                rank = int(marker["rank"])
                done = [int(r["seq"]) for r in by_unit.values()
                        if "seq" in r and "writer" not in r and int(r.get("rank", 0)) == rank]
                after = f"{LEGACY_LOG_DIR}/{rank}/{max(done):09d}.json" if done and names else ""
                tail = [rel for rel in self.place.list(f"{LEGACY_LOG_DIR}/{rank}/", start_after=after)
                        if rel.endswith(".json")]
                take(marker["name"], map(parse_record, self.place.read_many(tail).values()))
        if not names:   # no index yet: a first run still going, or an output of an older version
            listed = [rel for rel in self.place.list(RECORDS_DIR) if rel.endswith(".json") and (
                rel.startswith(f"{DONE_DIR}/") or rel.startswith(f"{LEGACY_LOG_DIR}/") or rel.count("/") == 1)]
            take("", map(parse_record, self.place.read_many(sorted(listed)).values()))
        records = sorted(by_unit.values(), key=lambda r: r["shard"])
        return RecordSet(records=records, index_names=names, markers=markers, covers=covers, tails=tails)

    def write_record(self, record: UnitRecord) -> Optional[UnitRecord]:
        """Commit one unit: create its record, after the unit's outputs are visible; returns it as written.
        None when the unit was committed already (by another attempt): this one's outputs for it are
        then garbage."""
        record = {"rank": int(record.get("rank", 0)), **record, "finished_at": time.time()}
        created = self.place.create(done_name(record["shard"]), json.dumps(record).encode("utf-8"))
        return record if created else None

    def read_record(self, unit: str) -> Optional[UnitRecord]:
        return parse_record(self.place.read(done_name(unit)))

    def write_index(self, records: list[dict], covers: Optional[dict[str, int]] = None,
                    owner: str = "merged") -> Optional[str]:
        """One new index object listing `records` (records that exist: an index never lists a unit whose
        record is missing) and the journal entries it covers; None when there is nothing to list."""
        if not records and not covers:
            return None
        name = index_name(owner)
        lines = [json.dumps({"covers": covers or {}})] + [json.dumps(record, default=str) for record in records]
        self.place.write(name, gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=6, mtime=0))
        return name

    def compact(self, found: Optional[RecordSet] = None) -> int:
        """Merge every index object and the records no index lists yet into one index object, then remove
        the objects it replaces (after: a crash in between leaves two indexes that agree). Safe while other
        writers run: it removes only index objects it has read, and index objects never change.
        Returns how many index objects it replaced."""
        found = self.read_records() if found is None else found
        if len(found.index_names) <= 1 and not found.uncompacted:
            return 0
        if self.write_index(found.records, found.covers) is not None:
            self.place.delete(found.index_names)
        return len(found.index_names)

    def writing_markers(self) -> list[dict]:
        names = sorted(self.place.list(WRITING_DIR))
        markers = []
        for rel, data in self.place.read_many(names).items():
            if data is None:
                continue   # removed since the listing: its writer is done
            try:
                marker = json.loads(data.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                marker = {}
            markers.append({**(marker if isinstance(marker, dict) else {}), "name": rel})
        return markers

    def start_writing(self, writer: str, rank: int, part: str = "", lease: Optional[dict] = None) -> str:
        """Mark that `writer` is writing: until `done_writing`, no one removes its objects while its lease
        (`lease`: the lease object's name and generation) is its attempt's."""
        name = f"{WRITING_DIR}/{writer}.json"
        self.place.write(name, json.dumps({"writer": writer, "rank": rank, "part": part, **(lease or {}),
                                           "host": socket.gethostname(), "pid": os.getpid(),
                                           "started_at": time.time()}).encode("utf-8"))
        return name

    def done_writing(self, name: str) -> None:
        self.place.delete([name])

    # ------------------------------------------------------------------ a run starts
    def prepare(self, identity: dict, overwrite: bool, part: Part = WHOLE_JOB,
                units: Optional[set[str]] = None, lease: Optional[dict] = None) -> OutputState:
        """Check the output belongs to this run (or clear it with --overwrite), clean up after dead writers
        (`units`: this part's unit ids, None: every unit; `lease`: the lease this attempt holds, its name
        and generation), and say which units are done."""
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
        dead = [m for m in found.markers if self._dead(m, part, lease)]
        state = OutputState(done={r["shard"] for r in found.records},
                            interrupted_ranks=sorted({int(m["rank"]) for m in dead if "rank" in m}),
                            dead_writers=sorted(m["writer"] for m in dead if m.get("writer")))
        if not found.index_names and found.tails.get(""):
            # no index yet: index what was found (records of an older version, which no journal names)
            self.write_index(found.tails[""], owner="prepare")
        if not dead:
            return state
        # list first, then read records and markers again: whatever a writer committed meanwhile is named by
        # a record, and a writer that started meanwhile made its marker before any object
        candidates: dict[str, int] = {}
        for rank in state.interrupted_ranks:
            candidates.update(self.place.list(f"{rank}/"))
        candidates.update(self.place.list(f"{SHARDS_DIR}/"))
        if part.whole:
            candidates.update({rel: size for rel, size in self.place.list(f"{PROBE_DIR}/").items()
                               if "/conditional-" not in rel})   # a probe in flight is its prober's
        found = self.read_records()
        dead_names = {m["name"] for m in dead}
        live = {m["writer"] for m in found.markers if m.get("writer") and m["name"] not in dead_names}
        claimed = {rel for record in found.records for rel in output_files(record)}
        garbage = dead_objects(part, units, live)
        ours = [rel for rel in candidates if folder_file_id(rel) is not None or latent_shard_unit(rel) is not None
                or rel.startswith(f"{PROBE_DIR}/")]   # never a file a user put beside the outputs
        state.removed = self.place.delete(rel for rel in ours if rel not in claimed and garbage(rel))
        state.removed += self.place.remove_unfinished(garbage)
        # before a marker goes, an index must list what its writer committed (records no index lists are
        # found through the markers)
        tails = [r for m in dead for r in found.tails.get(m["name"], ())]
        covers = {m["writer"]: found.covers[m["writer"]] for m in dead if m.get("writer") in found.covers}
        self.write_index(tails, covers, owner="prepare")
        self.place.delete(m["name"] for m in dead)
        state.done = {r["shard"] for r in found.records}
        return state

    def _dead(self, marker: dict, part: Part, lease: Optional[dict]) -> bool:
        """Whether a marker's writer can no longer write: its attempt's lease was taken over or released.
        A marker of the previous version (no lease) of this part is dead: this run holds the part."""
        if not marker.get("writer"):
            return "rank" in marker and part.owns(int(marker["rank"]))
        if lease is not None and marker.get("lease") == lease.get("lease"):
            return int(marker.get("generation", 0)) < int(lease.get("generation", 0))
        if not marker.get("lease"):
            return False
        return not lease_alive(self.place, marker["lease"], int(marker.get("generation", 0)))

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
        # a lease under manifest/parts/ is the running job's own (taken before the clear): never ours to remove
        ours = [rel for rel in ours if not (rel.startswith(f"{RECORDS_DIR}/parts/") and rel.endswith(".lease"))]
        return removed + self.place.delete(rel for rel in ours if rel not in index) + self.place.remove_unfinished()

    # ------------------------------------------------------------------ derived views
    def _rewrite_view(self, name: str, render: Callable[[list[UnitRecord]], bytes], skip_unchanged: bool = False
                      ) -> None:
        """Rewrite a view of the records (filelist.txt, errors.jsonl) so that no writer's update is lost:
        read its version, then the records, then write it only if its version is unchanged (If-Match);
        a view that changed meanwhile (another part rewrote it) is done again. `skip_unchanged`: a view that
        already holds these bytes is left as it is (a no-op rerun writes nothing)."""
        for _attempt in range(VIEW_WRITE_TRIES):
            current = self.place.read_tagged(name)
            data = render(self.records())
            if current is not None and skip_unchanged and current.data == data:
                return
            if self.place.replace(name, data, current.tag if current else None) is not None:
                return
        raise StorageError(self.place.child(name), f"kept changing while rewritten ({VIEW_WRITE_TRIES} tries); rerun")

    def write_error_log(self) -> int:
        """Rewrite errors.jsonl from the records (every problem of every done unit; an empty file when no
        unit has one, so the output's layout is the same either way); returns lines."""
        lines: list[str] = []

        def render(records: list[UnitRecord]) -> bytes:
            lines[:] = [json.dumps(problem, default=str) + "\n" for record in sorted(records, key=lambda r: r["shard"])
                        for problem in record.get("problems", ())]
            return "".join(lines).encode("utf-8")
        self._rewrite_view(ERRORS_LOG, render, skip_unchanged=True)
        return len(lines)

    def write_filelist(self) -> int:
        """Rewrite filelist.txt from the records: one `RANK/ID.npy` per committed window, relative to the
        output, sorted; Stable Audio 3's and stable-audio-tools' PreEncodedDataset then read exactly these
        windows, never an interrupted run's uncommitted files. Atomic, and no part's update is lost
        (`_rewrite_view`); returns lines."""
        paths: list[str] = []

        def render(records: list[UnitRecord]) -> bytes:
            paths[:] = sorted(path for record in records for path in window_paths(record))
            return "".join(f"{path}\n" for path in paths).encode("utf-8")
        self._rewrite_view(FILELIST, render)
        return len(paths)

    def start_filelist(self) -> None:
        """An empty filelist.txt for an output with none yet, so even an interrupted first run exposes no
        uncommitted window (create-if-absent: never over another part's)."""
        self.place.create(FILELIST, b"")


class RankLog:
    """One writer's commits: its writing marker while it writes, its journal and unit records in order,
    and an index of them, renewed every `index_every` seconds and at the end, before the marker goes: so
    a reader finds this writer's records in one index object plus the few written since it. `check`
    (the attempt's lease) is asked before every commit."""

    def __init__(self, manifest: RunManifest, writer: str, rank: int, *, part: str = "",
                 lease: Optional[dict] = None, check: Optional[Callable[[], None]] = None,
                 index_every: float = INDEX_EVERY_SECONDS):
        self.manifest = manifest
        self.writer = writer
        self.rank = rank
        self.part = part
        self.check = check
        self.index_every = index_every
        self.next_seq = 0
        self.records: list[dict] = []
        self.refused = 0                     # commits refused: another attempt had committed the unit
        self._index: Optional[str] = None
        self._indexed = 0                    # journal entries the current index object covers
        self._indexed_at = time.monotonic()
        self.marker = manifest.start_writing(writer, rank, part, lease)

    def fence(self) -> None:
        """Raise (LeaseLost, JobAborted) when this writer may no longer write: before every batch it writes,
        every unit it publishes and every commit."""
        if self.check is not None:
            self.check()

    def commit(self, record: UnitRecord) -> bool:
        """Commit one unit (its outputs are already visible): note it in the journal, then create its
        record, the last step (anything raised here means the unit is not committed). False when another
        attempt committed it first: the caller removes its outputs."""
        unit = record["shard"]
        seq = self.next_seq
        self.manifest.place.write(journal_name(self.writer, seq), json.dumps({"shard": unit}).encode("utf-8"))
        self.next_seq += 1
        self.fence()
        created = self.manifest.write_record({**record, "rank": self.rank, "writer": self.writer, "seq": seq})
        if created is not None:
            self.records.append(created)
            return True
        self.refused += 1
        try:
            winner = self.manifest.read_record(unit)
        except StorageError:
            winner = None   # the winner's own journal and index name it anyway
        if winner is not None:
            self.records.append(winner)   # its journal names this unit now: the index lists its record
        return False

    def index_if_due(self) -> None:
        """Renew this writer's index when `index_every` has passed since the last (after a commit: a
        failure here never makes a committed unit look uncommitted)."""
        if time.monotonic() - self._indexed_at >= self.index_every:
            self._reindex()

    def _reindex(self) -> None:
        """A new index of every record of this writer, then the previous one removed (a merge may have
        removed it already: it had read it, and its merged index lists those records too)."""
        name = self.manifest.write_index(self.records, {self.writer: self.next_seq - 1}, owner=self.writer)
        if self._index is not None:
            self.manifest.place.delete([self._index])
        self._index, self._indexed, self._indexed_at = name, self.next_seq, time.monotonic()

    def close(self) -> None:
        """Every unit this writer opened is committed or removed: index what is not yet, then drop the marker."""
        if self.next_seq > self._indexed:
            self._reindex()
        self.manifest.done_writing(self.marker)


def dead_objects(part: Part, units: Optional[set[str]], live: set[str]) -> Callable[[str], bool]:
    """Whether an object no record names is garbage: its name carries a writer id that is not alive (a
    dead writer, or one that finished: what it did not commit it left behind); for the names of older
    versions, which carry none, whether `part` wrote it (its ranks' folders and records, the latent tars
    of `units`, None: every unit; probe leftovers only for a whole job). Temporary files of the
    manifest's own objects (journals, indexes) are never touched: another writer may be creating one
    now, and none is ever read; but a record's (a writer killed between writing it and linking it into
    place leaves one) is, for the units of `part`, whose lease this attempt holds: only a writer fenced
    out of the part could be creating it, and its commit then fails, as it must."""
    def garbage(rel: str) -> bool:
        writer = writer_of(rel)
        if writer is not None:
            return writer not in live
        if rel.startswith(f"{DONE_DIR}/") and rel.endswith(".json"):   # from remove_unfinished only
            return units is None or rel[len(DONE_DIR) + 1:-len(".json")] in units
        if rel.startswith(f"{RECORDS_DIR}/"):
            legacy = _LEGACY_LOG_RANK_RE.match(rel)
            return legacy is not None and part.owns(int(legacy.group(1)))
        folder_file = folder_file_id(rel)
        if folder_file is not None:
            return part.owns(folder_file[0])
        unit = latent_shard_unit(rel)
        if unit is not None:
            return units is None or unit in units
        return part.whole
    return garbage


def _parse_unit(data: Optional[bytes]) -> Optional[str]:
    """The unit a journal entry names."""
    entry = parse_record(data)
    return entry["shard"] if entry is not None else None


def _journal_seq(relative: str) -> int:
    return int(relative.rsplit("/", 1)[1].split(".", 1)[0])


def _index_content(data: bytes) -> tuple[dict, list[dict]]:
    """An index object's header (which journal entries it covers; none in an older version's) and the
    records it lists (gzip'd JSON lines)."""
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    header: dict = {}
    if lines:
        try:
            first = json.loads(lines[0])
        except ValueError:
            first = None
        if isinstance(first, dict) and "covers" in first and "shard" not in first:
            header, lines = first, lines[1:]
    records = [parse_record(line.encode("utf-8")) for line in lines]
    return header, [record for record in records if record is not None]
