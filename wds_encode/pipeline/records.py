"""The unit record: what a committed unit's record says, in one place.

The writer thread builds one per unit (`unit_record`) and commits it by creating
`manifest/done/{unit}.json` (`manifest.RankLog.commit`); every reader (reruns, `status`, `inspect`,
`verify`, the loader, `filelist.txt`) reads records through `manifest.RunManifest.read_records` and
finds a unit's outputs here (`window_files`, `latent_shards`). Records are JSON objects, so readers
of older versions' records (which lack `writer` and `seq`) keep working.
"""

from __future__ import annotations

import json
from typing import Optional, TypedDict

from .writers import folder_files


class UnitRecord(TypedDict, total=False):
    """One committed unit. `shard`, `rank`, `folder_ids` and `latent_shards` name its outputs; the rest
    are its counts and problems."""

    shard: str                 # the unit id, DATASET/NAME: the record's name, `manifest/done/{shard}.json`
    url: str                   # the input: a tar's URL, or an audio_dir unit's folder
    rank: int                  # the rank folder its windows are in, OUT/{rank}/
    writer: str                # the writer that committed it (`writers.new_writer_id`): in every name it wrote
    seq: int                   # its entry in that writer's journal, `manifest/journal/{writer}/{seq}.json`
    part: str                  # "K/N" for an array part, "" for a whole job
    worker: int                # the decode worker that read it
    samples: int
    windows: int               # windows written (both output forms hold the same ones)
    rejected: int              # windows a custom metadata module dropped
    filtered: int              # files --min-duration, --max-duration or --skip-silent skipped
    audio_seconds: float
    input_bytes: int
    errors: int
    warnings: int
    failed: bool               # the input could not be read to its end (what was read is committed)
    folder_ids: list[str]      # its windows in the folder layout: OUT/{rank}/{id}.npy + .json (none with --no-folder)
    latent_shards: list[str]   # its latent tars, relative to OUT
    problems: list[dict]       # one per bad sample: what errors.jsonl lists
    finished_at: float         # when it was committed (the committing process's clock)


def unit_record(*, shard: str, url: str, rank: int, part: str, worker: int, samples: int, windows: int,
                rejected: int, filtered: int, audio_seconds: float, input_bytes: int, failed: bool, folder_ids: list[str],
                latent_shards: list[str], problems: list[dict]) -> UnitRecord:
    """A unit's record as the writer thread has it before the commit (`writer`, `seq` and `finished_at`
    are added by the commit)."""
    errors = sum(1 for problem in problems if problem.get("level") == "error")
    warnings = sum(1 for problem in problems if problem.get("level") == "warning")
    return UnitRecord(shard=shard, url=url, rank=rank, part=part, worker=worker, samples=samples, windows=windows,
                      rejected=rejected, filtered=filtered, audio_seconds=audio_seconds, input_bytes=input_bytes, errors=errors,
                      warnings=warnings, failed=failed, latent_shards=list(latent_shards),
                      folder_ids=sorted(folder_ids), problems=list(problems))


def parse_record(data: Optional[bytes]) -> Optional[UnitRecord]:
    """A record's JSON (a damaged one, which atomic writes never leave, or another object: None)."""
    try:
        record = json.loads(data.decode("utf-8")) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "shard" in record else None


def window_files(record: UnitRecord) -> list[str]:
    """The folder-layout files of the unit's windows, relative to OUT: `RANK/ID.json`, `RANK/ID.npy`, ..."""
    rank = int(record.get("rank", 0))
    return [rel for latent_id in record.get("folder_ids") or () for rel in folder_files(rank, latent_id)]


def window_paths(record: UnitRecord) -> list[str]:
    """The unit's windows as `filelist.txt` and PreEncodedDataset name them: `RANK/ID.npy`."""
    return [rel for rel in window_files(record) if rel.endswith(".npy")]


def output_files(record: UnitRecord) -> list[str]:
    """Every object the record names: its windows' files and its latent tars."""
    return [*window_files(record), *(record.get("latent_shards") or ())]
