"""Run identity, details.json, per-unit completion records, and the clean-up of interrupted runs;
errors.jsonl and filelist.txt, rewritten from the records.

A unit counts as done only when its record exists under `OUT/manifest/`: it is written last,
atomically, after the unit's outputs, and it lists them. While a rank writes, it keeps a marker
under `OUT/manifest/writing/`; a marker left behind means that rank was interrupted, and the next
run removes from that rank's folder, and from `shards/`, every object no record lists. So a rerun
ends with exactly the committed outputs of every unit, locally and on S3 (which has no rename).
A rerun with another model, checkpoint or encode option is refused unless `--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..storage import PROBE_DIR, Place, redact
from .writers import SHARDS_DIR, folder_file_id, folder_files, parse_latent_id

# Options that change what is written; anything else (workers, batch size, progress) does not.
IDENTITY_OPTIONS = ("sample_size", "chunking", "max_chunks", "latent_mode", "is_discrete", "seed",
                    "latent_dtype", "effective_precision", "ckpt_prefix")
DETAILS = "details.json"
RECORDS_DIR = "manifest"
WRITING_DIR = "manifest/writing"
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
                    **({"overlap": options["overlap"]} if options.get("overlap") else {})},
    }
    ident["hash"] = json_sha256(ident)
    return ident


def versions() -> dict:
    import numpy
    import torch

    from .. import __version__
    return {"wds_encode": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def record_name(shard_id: str) -> str:
    return f"{RECORDS_DIR}/" + shard_id.replace("/", "__") + ".json"


@dataclass
class OutputState:
    """What `prepare` found: units done, where each rank's batch ids continue, what it removed."""

    done: set[str] = field(default_factory=set)
    next_batch: dict[int, int] = field(default_factory=dict)
    removed: int = 0              # objects of unfinished units, partial files, open uploads
    interrupted_ranks: list[int] = field(default_factory=list)


class RunManifest:
    """Reads and writes details.json, manifest/*.json, the writing markers and errors.jsonl of a Place."""

    def __init__(self, place: Place):
        self.place = place

    # ------------------------------------------------------------------ details.json
    def load_details(self) -> Optional[dict]:
        data = self.place.read(DETAILS)
        return None if data is None else json.loads(data.decode("utf-8"))

    def write_details(self, details: dict) -> None:
        self.place.write(DETAILS, json.dumps(redact(details), indent=1, default=str).encode("utf-8"))

    # ------------------------------------------------------------------ records
    def records(self) -> list[dict]:
        """Every unit record (damaged ones, which atomic writes should never leave, are skipped)."""
        names = sorted(rel for rel in self.place.list(RECORDS_DIR)
                       if rel.count("/") == 1 and rel.endswith(".json"))
        records = []
        for data in self.place.read_many(names).values():
            try:
                record = json.loads(data.decode("utf-8")) if data is not None else None
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and "shard" in record:
                records.append(record)
        return records

    def write_record(self, record: dict) -> None:
        record = {**record, "finished_at": time.time()}
        self.place.write(record_name(record["shard"]), json.dumps(record).encode("utf-8"))

    def writing_markers(self) -> list[dict]:
        markers = []
        for rel in sorted(self.place.list(WRITING_DIR)):
            data = self.place.read(rel)
            try:
                marker = json.loads(data.decode("utf-8")) if data else {}
            except (ValueError, UnicodeDecodeError):
                marker = {}
            markers.append({**marker, "name": rel})
        return markers

    def start_writing(self, rank: int, first_batch: int) -> str:
        """Mark that `rank` is writing: if it never calls `done_writing`, the next run cleans up after it."""
        name = f"{WRITING_DIR}/rank-{rank:03d}.json"
        self.place.write(name, json.dumps({"rank": rank, "first_batch": first_batch, "host": socket.gethostname(),
                                           "pid": os.getpid(), "started_at": time.time()}).encode("utf-8"))
        return name

    def done_writing(self, name: str) -> None:
        self.place.delete([name])

    # ------------------------------------------------------------------ a run starts
    def prepare(self, identity: dict, overwrite: bool) -> OutputState:
        """Check the output belongs to this run (or clear it with --overwrite), clean up after
        interrupted ranks, and say which units are done and where batch ids continue."""
        details = self.load_details()
        old = (details or {}).get("run_identity")
        if old and old.get("hash") != identity["hash"]:
            if not overwrite:
                changed = [k for k in ("model_config_sha256", "checkpoint_sha256") if old.get(k) != identity.get(k)]
                changed += [f"options.{k}" for k, v in identity["options"].items()
                            if old.get("options", {}).get(k) != v]
                raise ManifestError(
                    f"{self.place.url} holds the output of a different run (changed: {', '.join(changed) or 'identity'}); "
                    "use a new --output-path, or --overwrite to re-encode everything into it")
        if overwrite:
            return OutputState(removed=self.clear())
        records = self.records()
        markers = self.writing_markers()
        state = OutputState(done={r["shard"] for r in records})
        claimed: set[str] = set()
        for record in records:
            for latent_id in record.get("folder_ids", ()):
                claimed.update(folder_files(int(record["rank"]), latent_id))
                _note_batch(state.next_batch, latent_id)
            claimed.update(record.get("latent_shards", ()))
        if markers:
            state.interrupted_ranks = sorted({int(m["rank"]) for m in markers if "rank" in m})
            candidates: dict[str, int] = {}
            for rank in state.interrupted_ranks:
                candidates.update(self.place.list(f"{rank}/"))
            candidates.update(self.place.list(f"{SHARDS_DIR}/"))
            candidates.update(self.place.list(f"{PROBE_DIR}/"))
            orphans = []
            for rel in candidates:
                folder_file = folder_file_id(rel)
                if folder_file is not None:
                    _note_batch(state.next_batch, folder_file[1])  # never reuse even a removed object's id
                ours = folder_file is not None or rel.startswith((f"{SHARDS_DIR}/", f"{PROBE_DIR}/"))
                if ours and rel not in claimed:
                    orphans.append(rel)
            state.removed = self.place.delete(orphans) + self.place.remove_unfinished()
            self.place.delete(m["name"] for m in markers)
        return state

    def clear(self) -> int:
        """--overwrite: remove every object the writers and the manifest made; returns how many."""
        found = self.place.list()
        ours = [rel for rel in found
                if folder_file_id(rel) is not None or rel.startswith((f"{SHARDS_DIR}/", f"{RECORDS_DIR}/",
                                                                      f"{PROBE_DIR}/"))
                or rel in (ERRORS_LOG, DETAILS, FILELIST, SILENCE)]
        return self.place.delete(ours) + self.place.remove_unfinished()

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
