"""`wds-encode status OUT`: how far the job writing OUT (a folder or s3:// prefix) has got.

Everything comes from what the run itself writes: details.json (the plan: how many units the
dataset has), one record per finished unit (counts, audio, errors; read through their index, so a
handful of requests however many units are done), the writing markers of ranks that are running or
were interrupted, and for an array job each part's plan (`manifest/parts/part-K-of-N.json`). It
reads; it never changes the output.
"""

from __future__ import annotations

from typing import Optional

import json

from ..job.parts import PARTS_DIR
from ..pipeline.manifest import RunManifest
from ..pipeline.records import UnitRecord
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


def run_state(markers: list[dict], total: Optional[int], done: int) -> str:
    """complete / writing / incomplete, from the writing markers, the planned units and those done."""
    if markers:
        return "writing (or interrupted: rerun the same command to finish)"
    if total is not None and done >= total:
        return "complete"
    return "incomplete: rerun the same command to finish"


def record_totals(records: list[UnitRecord]) -> dict:
    """What a set of unit records adds up to: units, files (samples), windows, audio, problems."""
    return {
        "units": len(records),
        "failed": sum(1 for r in records if r.get("failed")),
        "samples": sum(int(r.get("samples", 0)) for r in records),
        "windows": sum(int(r.get("windows", 0)) for r in records),
        "rejected": sum(int(r.get("rejected", 0)) for r in records),
        "audio_hours": sum(float(r.get("audio_seconds", 0.0)) for r in records) / 3600,
        "errors": sum(int(r.get("errors", 0)) for r in records),
        "warnings": sum(int(r.get("warnings", 0)) for r in records),
    }


def part_status(place: Place, parts: int, records: list[UnitRecord], markers: list[dict]) -> list[dict]:
    """Per part of an array job: its units (from its plan), done, state and who last ran it."""
    names = sorted(rel for rel in place.list(PARTS_DIR) if rel.endswith(".json"))
    plans = {}
    for data in place.read_many(names).values():
        try:
            plan = json.loads(data.decode("utf-8")) if data else None
        except (ValueError, UnicodeDecodeError):
            plan = None
        if isinstance(plan, dict) and str(plan.get("part", "")).endswith(f"/{parts}"):
            plans[int(plan["part"].split("/")[0])] = plan
    done = [0] * parts                       # one pass over the records, however many parts
    for record in records:
        done[int(record.get("rank", 0)) % parts] += 1
    writing: list[list[dict]] = [[] for _ in range(parts)]
    for marker in markers:
        if "rank" in marker:
            writing[int(marker["rank"]) % parts].append(marker)
    found = []
    for index in range(parts):
        plan = plans.get(index, {})
        total = plan.get("units")
        found.append({"part": f"{index}/{parts}", "units": {"total": total, "done": done[index]},
                      "state": run_state(writing[index], total, done[index]) if plan else "not started",
                      "host": plan.get("host"), "finished_at": plan.get("finished_at")})
    return found


def output_status(place: Place) -> dict:
    manifest, details = read_output(place)
    found = manifest.read_records()
    records, markers = found.records, found.markers
    total: Optional[int] = details.get("plan", {}).get("units_total")
    done = len(records)
    remaining = max(0, total - done) if total is not None else None
    totals = record_totals(records)
    stats = details.get("stats") or {}
    return {
        "output": place.url,
        "state": run_state(markers, total, done),
        "units": {"total": total, "done": done, "failed": totals["failed"], "remaining": remaining},
        "samples": totals["samples"],
        "windows": totals["windows"],
        "audio_hours": totals["audio_hours"],
        "input_bytes_done": sum(int(r.get("input_bytes", 0)) for r in records),
        "input_bytes_total": details.get("plan", {}).get("input_bytes"),
        "errors": totals["errors"],
        "warnings": totals["warnings"],
        "ranks_writing": sorted(int(m["rank"]) for m in markers if "rank" in m),
        "parts": part_status(place, int(details["parts"]), records, markers) if int(details.get("parts", 1)) > 1 else [],
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
