#!/usr/bin/env python3
"""How wds-encode's bookkeeping scales with the number of input units, on S3 (issue 22).

What it measures. For each size N of `--units` (default 200 and 20000), the script puts N single-sample
WebDataset shards (one 0.5 s stereo 44.1 kHz FLAC each, key `s000123`) under a fresh input bucket of a
moto S3 server it starts itself on 127.0.0.1, then runs the real `wds-encode` command, as subprocesses, with
the bundled tiny demo model (encoding costs next to nothing, so what is timed is the per-unit work:
listing, claims, manifest records, commits, shard and folder writes), into s3://scale-out/N/:

  first_run   the encode command on an empty output;
  noop_rerun  the same command again: every unit is done, nothing is encoded;
  status      `wds-encode status OUT`;
  inspect     `wds-encode inspect OUT --max-windows K` (counts from the manifest, statistics of a small
              sample of windows; `--inspect-max-windows 0` reads every window).

The quick steps (all but the first run) run `--repeat` times (default 3) and report the median.

Each step is timed with time.perf_counter around subprocess.run (check=True). The JSON also has the
number of objects in the output prefix, the S3 requests each step made (counted by a wrapper around the
moto server's WSGI app, by kind: object GET, LIST, HEAD, PUT, POST, DELETE), the command lines, the last
lines of each command's output, this machine's CPU, and the issue's baseline figures. Issue 22's target:
the no-op rerun and status at the largest size take at most 2x what they take at the smallest
(`ratios` in the JSON, with `meets_target`).

The subprocesses get the test credentials of tests/s3_support.py and AWS_ENDPOINT_URL set to the moto
server, and nothing else of the caller's AWS_* settings (`s3_env`), so they reach only that server.
moto answers about 150 PUT/s, so the inputs are uploaded by a thread pool (20000 shards: a few minutes);
the 20000 size takes tens of minutes in all.

    .venv/bin/python scripts/scale_benchmark.py                      # 200 and 20000 units
    .venv/bin/python scripts/scale_benchmark.py --units 20 60 --json-out /tmp/scale.json   # a quick check
    .venv/bin/python scripts/scale_benchmark.py --extra-args "--no-shards" --keep

Full stdout/stderr of every command are in WORKDIR/logs/ (kept with --keep, or when --workdir is given).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from s3_support import MotoS3, s3_env  # noqa: E402  (tests/s3_support.py: moto on 127.0.0.1, test env)

# the command beside this interpreter (the venv's), else the one on PATH
_BESIDE = Path(sys.executable).with_name("wds-encode")
WDS_ENCODE = str(_BESIDE) if _BESIDE.exists() else shutil.which("wds-encode") or "wds-encode"
OUT_BUCKET = "scale-out"
SAMPLE_RATE = 44100          # the demo model's rate and channels: no resampling, no channel conversion
CHANNELS = 2
SECONDS = 0.5
SAMPLE_SIZE = 32768          # one window per file (0.5 s = 22050 samples), a multiple of the model's 64
STEPS = ("first_run", "noop_rerun", "status", "inspect")
TARGET_RATIO = 2.0
# issue 22's figures (seconds), measured with the same steps on moto before the fix
BASELINE = {"200": {"first_run": 12.2, "noop_rerun": 2.7, "status": 2.1, "inspect": 3.9},
            "2000": {"first_run": 105, "noop_rerun": 12.6, "status": 7.1, "inspect": 26.5}}
TAIL_LINES = 12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, nargs="+", default=[200, 20000],
                        help="input unit counts to measure, smallest first (default: 200 20000)")
    parser.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "scale_moto_s3.json",
                        help="results (default: benchmarks/scale_moto_s3.json)")
    parser.add_argument("--extra-args", default="",
                        help="appended to both encode commands (first run and rerun), e.g. '--no-shards'")
    parser.add_argument("--num-workers", type=int, default=2, help="wds-encode --num-workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="wds-encode --batch-size (default 16)")
    parser.add_argument("--inspect-max-windows", type=int, default=64,
                        help="inspect --max-windows; 0: every window (default 64)")
    parser.add_argument("--upload-threads", type=int, default=32, help="threads uploading inputs")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each quick step (no-op rerun, status, "
                        "inspect); the median is reported (default 3)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds allowed per command")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="local folder for configs and logs (default: a temp dir, deleted unless --keep; "
                             "a folder given here is never deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the temp workdir (it is kept anyway when a "
                        "command fails)")
    args = parser.parse_args(argv)
    args.units = sorted(set(args.units))
    if args.units[0] < 1:
        parser.error("--units must be positive")
    return args


# --- machine and S3 server -----------------------------------------------------------------------------

def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import moto
    import wds_encode
    return {"cpu_model": model or platform.processor(), "cpu_count": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_at_start": list(os.getloadavg()), "platform": platform.platform(),
            "python": platform.python_version(), "wds_encode": wds_encode.__version__,
            "moto": moto.__version__}


class RequestCounter:
    """WSGI middleware in front of moto's app: counts requests by kind (the benchmark reads snapshots)."""

    def __init__(self, app) -> None:
        self.app = app
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        kind = self.kind(environ)
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return self.app(environ, start_response)

    @staticmethod
    def kind(environ) -> str:
        method = environ.get("REQUEST_METHOD", "?")
        path = environ.get("PATH_INFO", "")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        _bucket, _, key = path.lstrip("/").partition("/")
        if method == "GET" and not key:
            return "LIST" if "list-type" in query or not query else "GET bucket"
        return method

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def start_moto() -> tuple[MotoS3, RequestCounter | None]:
    """moto on 127.0.0.1 (free port), with a request counter wrapped around its app when reachable."""
    server = MotoS3().start()
    counter = None
    wsgi_server = getattr(getattr(server, "_server", None), "_server", None)  # ThreadedMotoServer's werkzeug
    if wsgi_server is not None and hasattr(wsgi_server, "app"):
        counter = RequestCounter(wsgi_server.app)
        wsgi_server.app = counter
    return server, counter


def request_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after)}
    delta = {k: v for k, v in delta.items() if v}
    delta["total"] = sum(delta.values())
    return delta


# --- inputs --------------------------------------------------------------------------------------------

def audio_payload() -> bytes:
    """One short FLAC (seeded sine plus noise), reused by every shard."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(SAMPLE_RATE * SECONDS)) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal((t.size, CHANNELS))
    buf = io.BytesIO()
    sf.write(buf, tone.astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def shard_bytes(key: str, payload: bytes) -> bytes:
    """A WebDataset tar with one sample: KEY.flac."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(f"{key}.flac")
        info.size = len(payload)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def upload_inputs(client, bucket: str, prefix: str, n: int, payload: bytes, threads: int) -> float:
    """N single-sample shards under s3://bucket/prefix, uploaded concurrently; returns the seconds taken."""
    client.create_bucket(Bucket=bucket)

    def put(i: int) -> None:
        body = shard_bytes(f"s{i:06d}", payload)
        client.put_object(Bucket=bucket, Key=f"{prefix}shard-{i:06d}.tar", Body=body)

    start = time.perf_counter()
    step = max(1, n // 10)
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(put, i) for i in range(n)]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()
            if done % step == 0 and n >= 1000:
                print(f"  uploaded {done}/{n} ({time.perf_counter() - start:.0f} s)", flush=True)
    return time.perf_counter() - start


def write_dataset_config(path: Path, s3_path: str, endpoint: str) -> Path:
    """stable-audio-tools' S3 dataset config, its endpoint named in the entry (as a MinIO user would)."""
    config = {"dataset_type": "s3", "random_crop": False,
              "datasets": [{"id": "scale", "s3_path": s3_path, "endpoint_url": endpoint}]}
    path.write_text(json.dumps(config, indent=1))
    return path


def count_objects(client, bucket: str, prefix: str) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(page.get("KeyCount", 0) for page in pages)


# --- commands ------------------------------------------------------------------------------------------

def encode_command(args, dataset: Path, out: str, endpoint: str) -> list[str]:
    from wds_encode.models import demo_model_paths

    config, ckpt = demo_model_paths()
    return [WDS_ENCODE, "--model-config", str(config), "--ckpt-path", str(ckpt),
            "--dataset-config", str(dataset), "--output-path", out, "--s3-endpoint-url", endpoint,
            "--sample-size", str(SAMPLE_SIZE), "--batch-size", str(args.batch_size),
            "--num-workers", str(args.num_workers), "--no-progress", *shlex.split(args.extra_args)]


def tail(text: str, n: int = TAIL_LINES) -> list[str]:
    return text.rstrip("\n").splitlines()[-n:]


def timed_run(name: str, cmd: list[str], env: dict, counter: RequestCounter | None, log: Path,
              timeout: float) -> dict:
    """Run one command (check=True), timed; its full output goes to `log`, its last lines to the result."""
    before = counter.snapshot() if counter else {}
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.CalledProcessError as exc:
        sys.stdout.flush()
        log.write_text(f"$ {shlex.join(cmd)}\n--- stdout\n{exc.stdout}\n--- stderr\n{exc.stderr}")
        sys.stderr.write(f"{name} failed (exit {exc.returncode}); output in {log}\n"
                         + "\n".join(tail(exc.stderr or exc.stdout or "", 30)) + "\n")
        raise
    seconds = time.perf_counter() - start
    log.write_text(f"$ {shlex.join(cmd)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    step = {"seconds": round(seconds, 3), "command": shlex.join(cmd),
            "stdout_tail": tail(result.stdout), "stderr_tail": tail(result.stderr, 5)}
    if counter:
        step["s3_requests"] = request_delta(before, counter.snapshot())
    print(f"  {name:<11} {step['seconds']:8.2f} s"
          + (f"  ({step['s3_requests']['total']} S3 requests)" if counter else ""), flush=True)
    return step


def units_line(stdout: str) -> str:
    """The summary's `units  N encoded, M already done, ...` line (a no-op rerun: its `nothing to do: ...`), or ''."""
    found = re.search(r"^\s*(?:units\s+|(?=nothing to do:))(.*)$", stdout, re.MULTILINE)
    return found.group(1).strip() if found else ""


def bench_size(args, n: int, server: MotoS3, counter, client, payload: bytes, workdir: Path) -> dict:
    """Upload N units, then time the four steps on them; returns this size's record."""
    print(f"{n} units", flush=True)
    in_bucket = f"scale-in-{n}"
    upload_s = upload_inputs(client, in_bucket, "train/", n, payload, args.upload_threads)
    print(f"  uploaded {n} shards in {upload_s:.1f} s ({n / upload_s:.0f} PUT/s)", flush=True)
    dataset = write_dataset_config(workdir / f"dataset-{n}.json", f"s3://{in_bucket}/train/", server.endpoint)
    out = f"s3://{OUT_BUCKET}/{n}/"
    env = s3_env(server.endpoint)
    logs = workdir / "logs"
    encode = encode_command(args, dataset, out, server.endpoint)
    inspect = [WDS_ENCODE, "inspect", out]
    if args.inspect_max_windows > 0:
        inspect += ["--max-windows", str(args.inspect_max_windows)]
    commands = {"first_run": encode, "noop_rerun": encode, "status": [WDS_ENCODE, "status", out],
                "inspect": inspect}
    steps = {}
    for name, cmd in commands.items():
        repeats = 1 if name == "first_run" else max(1, args.repeat)
        tries = [timed_run(name, cmd, env, counter, logs / f"{n}-{name}-{i}.log", args.timeout) for i in range(repeats)]
        median = sorted(tries, key=lambda step: step["seconds"])[len(tries) // 2]
        steps[name] = {**median, "all_seconds": [step["seconds"] for step in tries]}
    record = {"units": n, "upload_seconds": round(upload_s, 2),
              "timings": {name: step["seconds"] for name, step in steps.items()},
              "output_objects": count_objects(client, OUT_BUCKET, f"{n}/"),
              "first_run_units": units_line("\n".join(steps["first_run"]["stdout_tail"])),
              "noop_rerun_units": units_line("\n".join(steps["noop_rerun"]["stdout_tail"])),
              "steps": steps}
    print(f"  output objects {record['output_objects']}", flush=True)
    return record


# --- results -------------------------------------------------------------------------------------------

def ratios(sizes: dict[str, dict]) -> dict:
    """largest / smallest size, per step; the issue's target applies to noop_rerun and status."""
    if len(sizes) < 2:
        return {}
    small, large = min(sizes, key=int), max(sizes, key=int)
    found = {"smallest": int(small), "largest": int(large), "unit_ratio": int(large) / int(small)}
    for step in STEPS:
        ratio = sizes[large]["timings"][step] / sizes[small]["timings"][step]
        found[step] = {"ratio": round(ratio, 3)}
        if step in ("noop_rerun", "status"):
            found[step]["meets_target"] = ratio <= TARGET_RATIO
    return found


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def print_table(report: dict) -> None:
    print(f"\n{'units':>7} " + " ".join(f"{s:>11}" for s in STEPS) + f" {'objects':>8}  (seconds)")
    for n, record in report["sizes"].items():
        print(f"{n:>7} " + " ".join(f"{record['timings'][s]:>11.2f}" for s in STEPS)
              + f" {record['output_objects']:>8}")
    for n, figures in BASELINE.items():
        print(f"{n:>7} " + " ".join(f"{figures[s]:>11.1f}" for s in STEPS) + f" {'':>8}  issue 22 baseline")
    found = report["ratios"]
    if found:
        print(f"\n{found['largest']} / {found['smallest']} units (x{found['unit_ratio']:g} units): "
              + ", ".join(f"{s} x{found[s]['ratio']:.2f}" for s in STEPS))
        for s in ("noop_rerun", "status"):
            verdict = "meets" if found[s]["meets_target"] else "MISSES"
            print(f"  {s:<11} x{found[s]['ratio']:.2f} {verdict} the target (<= {TARGET_RATIO:g})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="wds-scale-")) if own_workdir else args.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    server, counter = start_moto()
    client = server.client(max_pool_connections=args.upload_threads)
    report = {"benchmark": "scale_moto_s3", "issue": 22,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "script_command": shlex.join([sys.executable, *sys.argv]), "machine": machine_info(),
              "parameters": {"units": args.units, "num_workers": args.num_workers,
                             "batch_size": args.batch_size, "extra_args": args.extra_args,
                             "inspect_max_windows": args.inspect_max_windows,
                             "sample_size": SAMPLE_SIZE, "audio": f"{SECONDS} s FLAC, {CHANNELS} ch, "
                             f"{SAMPLE_RATE} Hz, one per shard", "model": "bundled demo model"},
              "baseline_issue_22": BASELINE, "target_ratio": TARGET_RATIO, "sizes": {}, "ratios": {}}
    finished = False
    try:
        client.create_bucket(Bucket=OUT_BUCKET)
        payload = audio_payload()
        for n in args.units:
            report["sizes"][str(n)] = bench_size(args, n, server, counter, client, payload, workdir)
            report["ratios"] = ratios(report["sizes"])
            write_json(args.json_out, report)  # after every size: a failed large size keeps the small one
        finished = True
    finally:
        server.stop()
        if own_workdir and finished and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # kept on a failure too: its logs say what went wrong
            print(f"workdir kept: {workdir}", file=sys.stderr)
    print_table(report)
    print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
