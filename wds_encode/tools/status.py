"""`wds-encode status OUT`: how far the job writing OUT (a folder or s3:// prefix) has got.

Everything comes from what the run itself writes: details.json (the plan: how many units the
dataset has), one record per finished unit (counts, audio, errors; read through their index, so a
handful of requests however many units are done), the writing markers of ranks that are running or
were interrupted, and for an array job each part's plan (`manifest/parts/part-K-of-N.json`) and its
units, dealt from the output's kept listing as the parts deal them; the state line then names the parts
left to run (`incomplete: part 1/2 has not run; run it with --part 1/2`). It reads; it never changes the
output.
"""

from __future__ import annotations

from typing import Optional

import json

from ..job.parts import PARTS_DIR, deal
from ..pipeline.manifest import RunManifest
from ..pipeline.records import UnitRecord
from ..pipeline.sources import LISTING, _listing_records
from ..storage import Place


class NotAnOutput(FileNotFoundError):
    """The place holds no details.json."""


def read_output(place: Place) -> tuple[RunManifest, dict]:
    """The output's manifest and details.json; NotAnOutput when the place holds no run."""
    manifest = RunManifest(place)
    details = manifest.load_details()
    if details is None:
        raise NotAnOutput(f"{place.url}: no details.json; is this the --output-path of a wds-encode run?")
    return manifest, details


def run_state(markers: list[dict], total: Optional[int], done: int, parts: list[dict] = ()) -> str:
    """complete / writing / incomplete, from the writing markers, the planned units and those done; for an
    array job (`parts`, from `part_status`), which parts are left to run."""
    left = [part for part in parts if part["state"] != "complete"]
    if markers:
        if left:
            return "writing (or interrupted): " + parts_to_run(left)
        return "writing (or interrupted: rerun the same command to finish)"
    if total is not None and done >= total:
        return "complete"
    if left:
        return "incomplete: " + parts_to_run(left)
    return "incomplete: rerun the same command to finish"


PART_WRITING = "writing (or interrupted)"
PART_STOPPED = "stopped before its end"
PART_NOT_STARTED = "not started"


def parts_to_run(parts: list[dict]) -> str:
    """What to run to finish an array job, from the states of its parts that are not complete:
    `part 1/2 has not run; run it with --part 1/2`."""
    said = []
    for state, one, many in (
            (PART_NOT_STARTED, "{} has not run; run it with {}", "{} have not run; run them with {}"),
            (PART_STOPPED, "{} stopped before its end; rerun it with {}",
             "{} stopped before their end; rerun them with {}"),
            (PART_WRITING, "{} is writing, or was interrupted; unless it is running, rerun it with {}",
             "{} are writing, or were interrupted; unless they are running, rerun them with {}")):
        labels = [part["part"] for part in parts if part["state"] == state]
        if labels:
            text = one if len(labels) == 1 else many
            said.append(text.format(("part " if len(labels) == 1 else "parts ") + _listed(labels),
                                    _listed([f"--part {label}" for label in labels])))
    return "; ".join(said)


def _listed(items: list[str], most: int = 6) -> str:
    """`a`, `a and b`, `a, b and c`; a long list as `a, b, ... z (N in all)`."""
    if len(items) > most:
        return f"{items[0]}, {items[1]}, ... {items[-1]} ({len(items)} in all)"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def record_totals(records: list[UnitRecord]) -> dict:
    """What a set of unit records adds up to: units, files (samples), windows, audio, problems."""
    return {
        "units": len(records),
        "failed": sum(1 for r in records if r.get("failed")),
        "samples": sum(int(r.get("samples", 0)) for r in records),
        "windows": sum(int(r.get("windows", 0)) for r in records),
        "rejected": sum(int(r.get("rejected", 0)) for r in records),
        "filtered": sum(int(r.get("filtered", 0)) for r in records),
        "audio_hours": sum(float(r.get("audio_seconds", 0.0)) for r in records) / 3600,
        "errors": sum(int(r.get("errors", 0)) for r in records),
        "warnings": sum(int(r.get("warnings", 0)) for r in records),
    }


def dealt_units(place: Place, parts: int) -> Optional[list[set[str]]]:
    """Each part's unit ids, dealt as the parts deal them (`Part.select`) from the units the output keeps
    (`manifest/units.json.gz`, which every part deals from); None when the output keeps no listing."""
    data = place.read(LISTING)
    if data is None:
        return None
    try:
        _, units = _listing_records(data)
        ids = [f"{unit['dataset']}/{unit['name']}" for unit in units]
        sizes = [int(unit["size"]) for unit in units]
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError):
        return None
    owners = deal(range(len(ids)), parts, size=sizes.__getitem__, name=ids.__getitem__)
    found: list[set[str]] = [set() for _ in range(parts)]
    for unit, owner in zip(ids, owners):
        found[owner].add(unit)
    return found


def part_status(place: Place, parts: int, records: list[UnitRecord], markers: list[dict]) -> list[dict]:
    """Per part of an array job: its units (dealt from the output's listing, else its plan's count), those
    done (by it or by any other run), its state and who last ran it."""
    names = sorted(rel for rel in place.list(PARTS_DIR) if rel.endswith(".json"))
    plans = {}
    for data in place.read_many(names).values():
        try:
            plan = json.loads(data.decode("utf-8")) if data else None
        except (ValueError, UnicodeDecodeError):
            plan = None
        if isinstance(plan, dict) and str(plan.get("part", "")).endswith(f"/{parts}"):
            plans[int(plan["part"].split("/")[0])] = plan
    shares = dealt_units(place, parts)
    done = [0] * parts                       # one pass over the records, however many parts
    if shares is not None:
        owner = {unit: index for index, share in enumerate(shares) for unit in share}
        for record in records:
            if record.get("shard") in owner:
                done[owner[record["shard"]]] += 1
    else:                                    # an output without a kept listing: by the rank that wrote it
        for record in records:
            done[int(record.get("rank", 0)) % parts] += 1
    writing: list[list[dict]] = [[] for _ in range(parts)]
    for marker in markers:
        label = marker.get("part")
        if label is None and "rank" in marker:           # a marker without its part: by its rank
            writing[int(marker["rank"]) % parts].append(marker)
        elif isinstance(label, str) and label.endswith(f"/{parts}"):
            writing[int(label.split("/")[0]) % parts].append(marker)
    found = []
    for index in range(parts):
        plan = plans.get(index, {})
        total = len(shares[index]) if shares is not None else plan.get("units")
        if writing[index]:
            state = PART_WRITING
        elif total is not None and done[index] >= total and (plan or shares is not None):
            state = "complete"
        else:
            state = PART_STOPPED if plan else PART_NOT_STARTED
        found.append({"part": f"{index}/{parts}", "units": {"total": total, "done": done[index]},
                      "state": state, "host": plan.get("host"), "finished_at": plan.get("finished_at")})
    return found


def output_parts(place: Place, details: dict, records: list[dict], markers: list[dict]) -> list[dict]:
    """The parts of an array job's output (`part_status`), or [] for an output written whole."""
    count = int(details.get("parts", 1) or 1)
    return part_status(place, count, records, markers) if count > 1 else []


def output_status(place: Place) -> dict:
    manifest, details = read_output(place)
    found = manifest.read_records()
    records, markers = found.records, found.markers
    total: Optional[int] = details.get("plan", {}).get("units_total")
    done = len(records)
    remaining = max(0, total - done) if total is not None else None
    totals = record_totals(records)
    stats = details.get("stats") or {}
    parts = output_parts(place, details, records, markers)
    return {
        "output": place.url,
        "state": run_state(markers, total, done, parts),
        "units": {"total": total, "done": done, "failed": totals["failed"], "remaining": remaining},
        "samples": totals["samples"],
        "windows": totals["windows"],
        "filtered": totals["filtered"],
        "audio_hours": totals["audio_hours"],
        "input_bytes_done": sum(int(r.get("input_bytes", 0)) for r in records),
        "input_bytes_total": details.get("plan", {}).get("input_bytes"),
        "errors": totals["errors"],
        "warnings": totals["warnings"],
        "ranks_writing": sorted(int(m["rank"]) for m in markers if "rank" in m),
        "parts": parts,
        "parts_to_run": [part["part"] for part in parts if part["state"] != "complete"],
        "last_run": {"started_at": details.get("started_at"), "finished_at": details.get("finished_at"),
                     "elapsed_seconds": stats.get("elapsed_seconds")},
    }


def format_status(status: dict) -> str:
    units = status["units"]
    total = "?" if units["total"] is None else units["total"]
    remaining = "?" if units["remaining"] is None else units["remaining"]
    lines = [
        f"wds-encode status of {status['output']}",
        f"  state      {status['state']}",
        f"  units      {units['done']} done ({units['failed']} broken), {remaining} remaining, of {total}",
        f"  samples    {status['samples']}  windows {status['windows']}",
        f"  audio      {status['audio_hours']:.4f} h",
        f"  problems   {status['errors']} errors, {status['warnings']} warnings",
    ]
    if status["ranks_writing"]:
        lines.append("  writing    ranks " + ", ".join(map(str, status["ranks_writing"])))
    for part in status.get("parts", ()):
        total = "?" if part["units"]["total"] is None else part["units"]["total"]
        lines.append(f"  {'part ' + part['part']:<10} {part['units']['done']} of {total} units, {part['state']}")
    return "\n".join(lines)
