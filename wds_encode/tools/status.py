"""`wds-encode status OUT`: how far the job writing OUT (a folder or s3:// prefix) has got.

Everything comes from what the run itself writes: details.json (the plan: how many units the
dataset has), one record per finished unit (counts, audio, errors) and the writing markers of
ranks that are running or were interrupted. It reads; it never changes the output.
"""

from __future__ import annotations

from typing import Optional

from ..pipeline.manifest import RunManifest
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


def record_totals(records: list[dict]) -> dict:
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


def output_status(place: Place) -> dict:
    manifest, details = read_output(place)
    records = manifest.records()
    markers = manifest.writing_markers()
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
    return "\n".join(lines)
