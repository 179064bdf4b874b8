"""Run identity, details.json, per-unit completion records and the error log.

A unit counts as done only when its record exists under `OUT/manifest/` (written last, atomically,
after the unit's outputs). A rerun with the same identity skips done units; a rerun with another
model, checkpoint or encode option is refused unless `--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

from .writers import clear_outputs, write_atomic

# Options that change what is written; anything else (workers, batch size, progress) does not.
IDENTITY_OPTIONS = ("sample_size", "chunking", "max_chunks", "latent_mode", "is_discrete", "seed",
                    "latent_dtype", "effective_precision", "ckpt_prefix")


class ManifestError(RuntimeError):
    """The output folder belongs to a different run."""


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
        "options": {**{k: options[k] for k in IDENTITY_OPTIONS}, "random_crop": random_crop},
    }
    ident["hash"] = json_sha256(ident)
    return ident


def versions() -> dict:
    import numpy
    import torch

    from . import __version__
    return {"wds_encode": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def record_name(shard_id: str) -> str:
    return shard_id.replace("/", "__") + ".json"


class RunManifest:
    """Reads and writes OUT/details.json, OUT/manifest/*.json and OUT/errors.jsonl."""

    def __init__(self, output_path: Path):
        self.root = Path(output_path)
        self.details_path = self.root / "details.json"
        self.records_dir = self.root / "manifest"
        self.errors_path = self.root / "errors.jsonl"

    def load_details(self) -> dict | None:
        if not self.details_path.exists():
            return None
        return json.loads(self.details_path.read_text(encoding="utf-8"))

    def prepare(self, identity: dict, overwrite: bool) -> set[str]:
        """Check the folder belongs to this run; returns the ids of units already done."""
        self.root.mkdir(parents=True, exist_ok=True)
        details = self.load_details()
        old = (details or {}).get("run_identity")
        if old and old.get("hash") != identity["hash"]:
            if not overwrite:
                changed = [k for k in ("model_config_sha256", "checkpoint_sha256") if old.get(k) != identity.get(k)]
                changed += [f"options.{k}" for k, v in identity["options"].items()
                            if old.get("options", {}).get(k) != v]
                raise ManifestError(
                    f"{self.root} holds the output of a different run (changed: {', '.join(changed) or 'identity'}); "
                    "use a new --output-path, or --overwrite to re-encode everything into it")
        if overwrite:
            self.clear()
            return set()
        self.roll_back_unfinished_commits()
        return self.done_ids()

    # A unit's commit: journal (the files about to appear) -> renames -> record -> journal removed.
    # A journal without its record means the run died mid-commit: its files are removed, the unit redone.
    def _journal_path(self, shard_id: str) -> Path:
        return self.records_dir / "commits" / record_name(shard_id)

    def begin_commit(self, shard_id: str, final_paths: list[Path]) -> Path:
        journal = self._journal_path(shard_id)
        journal.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(journal, json.dumps({"shard": shard_id, "files": [str(p) for p in final_paths]}).encode())
        return journal

    @staticmethod
    def finish_commit(journal: Path) -> None:
        journal.unlink(missing_ok=True)

    def roll_back_unfinished_commits(self) -> int:
        """Remove the outputs of units whose commit was interrupted; returns how many units."""
        folder = self.records_dir / "commits"
        if not folder.is_dir():
            return 0
        done = self.done_ids()
        rolled = 0
        for journal in folder.glob("*.json"):
            try:
                entry = json.loads(journal.read_text(encoding="utf-8"))
            except ValueError:
                entry = {"shard": None, "files": []}  # unreadable (journals are written atomically): skip it
            if entry["shard"] not in done:
                for name in entry["files"]:
                    Path(name).unlink(missing_ok=True)
                rolled += 1
            journal.unlink()
        return rolled

    def clear(self) -> None:
        """--overwrite: forget every finished unit and remove its outputs, so nothing is written twice."""
        self.clear_records()
        clear_outputs(self.root)
        self.errors_path.unlink(missing_ok=True)

    def clear_records(self) -> None:
        if self.records_dir.is_dir():
            for path in [*self.records_dir.glob("*.json"), *self.records_dir.glob("commits/*.json")]:
                path.unlink()

    def done_ids(self) -> set[str]:
        if not self.records_dir.is_dir():
            return set()
        done = set()
        for path in self.records_dir.glob("*.json"):
            try:
                done.add(json.loads(path.read_text(encoding="utf-8"))["shard"])
            except (ValueError, KeyError):
                continue  # a damaged record counts as not done
        return done

    def write_details(self, details: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.details_path, json.dumps(details, indent=1, default=str).encode("utf-8"))

    def write_record(self, record: dict) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        record = {**record, "finished_at": time.time()}
        write_atomic(self.records_dir / record_name(record["shard"]), json.dumps(record).encode("utf-8"))

    def append_errors(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, default=str) + "\n" for r in records)
        if not lines:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # one write per batch of lines with O_APPEND: safe with several ranks on a local disk
        fd = os.open(self.errors_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode("utf-8"))
        finally:
            os.close(fd)
