"""Soak test of exactly once under races (issue 27): for a set time, round after round on one output,
start two tasks of one array part, the other part, and a whole run beside them; SIGKILL and SIGSTOP
(then SIGCONT) them at random moments; then rerun both parts and the whole job to the end. After every round the
output must hold every input sample exactly once, every record's files must exist and hold that
unit's windows (equal to a clean run's latents), filelist.txt must list exactly the committed windows,
and no window file may be left that no record names.

    python scripts/soak_races.py --seconds 600 --out benchmarks/soak_races.json

Local output only (the races are the same on S3; the test suite runs each on a moto server). Prints
one line per round and writes the totals as JSON: rounds, processes started, SIGKILLs, SIGSTOPs, take-overs
of a lease whose holder was gone or paused, tasks that waited for a live holder, holders that found their
lease taken over, and commits refused because another attempt had committed the unit first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wds_encode.models import demo_model_paths
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace
from wds_encode.synth import write_tar_shards

WDS_ENCODE = str(Path(sys.executable).with_name("wds-encode"))
REFUSED = re.compile(r", (\d+) committed first by another attempt")


def command(model, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [WDS_ENCODE, "--model-config", str(model[0]), "--ckpt-path", str(model[1]), "--dataset-config",
            str(dataset), "--output-path", str(out), "--sample-size", "16384", "--chunking", "split",
            "--batch-size", "2", "--num-workers", "1", "--no-progress", "--lease-seconds", "6", *extra]


def folder_windows(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for npy in out.glob("[0-9]*/*.npy"):
        md = json.loads(npy.with_suffix(".json").read_text())
        key = f"{md['source_shard']}/{md['key']}"
        if key in found:
            raise AssertionError(f"duplicate window {key}")
        found[key] = np.load(npy)
    return found


def check(out: Path, reference: dict[str, np.ndarray], units: int) -> None:
    records = RunManifest(LocalPlace(out)).records()
    assert len(records) == len({r["shard"] for r in records}) == units, f"{len(records)} records for {units} units"
    named = sorted(f"{r['rank']}/{i}.npy" for r in records for i in r["folder_ids"])
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("[0-9]*/*.npy"))
    assert on_disk == named, f"{len(on_disk)} window files, {len(named)} named by records"
    assert (out / "filelist.txt").read_text().splitlines() == named, "filelist.txt differs from the records"
    for record in records:
        for latent_id in record["folder_ids"]:
            md = json.loads((out / str(record["rank"]) / f"{latent_id}.json").read_text())
            assert md["source_shard"] == record["shard"], f"{latent_id} holds {md['source_shard']}"
        for tar in record["latent_shards"]:
            assert (out / tar).is_file(), f"{tar} missing"
    windows = folder_windows(out)
    assert sorted(windows) == sorted(reference), "not every window exactly once"
    for key, latent in windows.items():
        assert np.abs(latent - reference[key]).max() <= 1e-3 * max(1.0, float(np.abs(reference[key]).max())), key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--units", type=int, default=10)
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--out", type=Path, default=None, help="write the totals here as JSON")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    model = demo_model_paths()
    work = Path(tempfile.mkdtemp(prefix="wds-soak-"))
    try:
        write_tar_shards(work / "in", args.units, 2, seed=args.seed, name="soak", min_seconds=0.5, max_seconds=1.5)
        dataset = work / "d.json"
        dataset.write_text(json.dumps({"dataset_type": "wds", "datasets": [{"id": "soak", "path": str(work / "in")}],
                                       "random_crop": False}))
        subprocess.run(command(model, dataset, work / "clean"), check=True, capture_output=True)
        reference = folder_windows(work / "clean")
        totals = {"rounds": 0, "processes": 0, "kills": 0, "pauses": 0, "takeovers": 0, "waited": 0,
                  "refused_commits": 0, "lease_lost": 0, "failures": []}
        started = time.time()
        while time.time() - started < args.seconds:
            out = work / f"out-{totals['rounds']}"
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True)
                     for cmd in (command(model, dataset, out, "--part", "0/2"), command(model, dataset, out, "--part", "0/2"),
                                 command(model, dataset, out, "--part", "1/2"), command(model, dataset, out))]
            totals["processes"] += len(procs)
            paused = []
            deadline = time.time() + 60
            while any(p.poll() is None for p in procs) and time.time() < deadline:
                time.sleep(rng.uniform(0.5, 3.0))
                alive = [p for p in procs if p.poll() is None and p not in paused]
                if not alive:
                    break
                victim, action = rng.choice(alive), rng.random()
                if action < 0.3:
                    os.killpg(victim.pid, signal.SIGKILL)
                    totals["kills"] += 1
                elif action < 0.5:
                    os.killpg(victim.pid, signal.SIGSTOP)
                    paused.append(victim)
                    totals["pauses"] += 1
                if paused and rng.random() < 0.5:
                    os.killpg(paused.pop(0).pid, signal.SIGCONT)
            for p in paused:
                os.killpg(p.pid, signal.SIGCONT)
            for p in procs:
                try:
                    out_text, err = p.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    out_text, err = p.communicate()
                totals["takeovers"] += "took over from" in err
                totals["waited"] += "is being written by" in err
                totals["lease_lost"] += "taken over" in err or "not renewed" in err
                totals["refused_commits"] += sum(int(n) for n in REFUSED.findall(out_text))   # the summary
            try:   # the parts first (an output is finished in the part count it was left in), then the whole job
                for extra in (("--part", "0/2"), ("--part", "1/2"), ()):
                    final = subprocess.run(command(model, dataset, out, *extra), capture_output=True, text=True)
                    assert final.returncode == 0, final.stderr[-2000:]
                check(out, reference, args.units)
                verdict = "exactly once"
            except AssertionError as exc:
                verdict = f"FAILED: {exc}"
                totals["failures"].append({"round": totals["rounds"], "error": str(exc)})
            records = RunManifest(LocalPlace(out)).records()
            generations: dict[str, set[str]] = {}   # per lease (a part, or the whole job): the generations that committed
            for r in records:
                generations.setdefault(r.get("part", ""), set()).add(r["writer"].split("-")[1])
            totals["rounds"] += 1
            print(f"round {totals['rounds']}: {verdict}; generations per lease "
                  f"{ {k or 'job': sorted(v) for k, v in generations.items()} }", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        totals["seconds"] = round(time.time() - started, 1)
        print(json.dumps(totals, indent=1))
        if args.out is not None:
            args.out.write_text(json.dumps(totals, indent=1) + "\n")
        return 1 if totals["failures"] else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
