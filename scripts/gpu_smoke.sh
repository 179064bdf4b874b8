#!/usr/bin/env bash
# gpu_smoke.sh: run every CUDA path of wds-encode once (about 5 min on one H200; two-rank runs add a
# couple of minutes with 2+ GPUs). On a machine without a GPU it runs the CPU parts at tiny sizes
# (well under 2 min on 2 cores) and says which GPU steps it skipped.
#
#   bash scripts/gpu_smoke.sh [WORKDIR]      # wds-encode, python and torchrun are taken from PATH
#
# Every step prints one verdict, `[PASS] name: figure` or `[FAIL] name: figure`; `[INFO] name: ...`
# lines are measurements to read, `[SKIP] name: why` lines steps this machine cannot run.
# Exit code: the number of [FAIL] lines (capped at 255).
# WORKDIR (default: a new temp dir) keeps smoke.log (everything: verdicts and every step's output),
# each step's output in logs/NAME.txt, and the runs' output folders.
set -uo pipefail

W=$(realpath -m "${1:-$(mktemp -d -t wds-gpu-smoke.XXXXXX)}")
mkdir -p "$W/logs"
LOG=$W/smoke.log
: > "$LOG"
CHECKS=$W/smoke_checks.py   # the Python half of this script, written below
export WDS_SMOKE_REPO=${WDS_SMOKE_REPO:-$(realpath "$(dirname "$0")/..")}   # its configs/ and tests/golden-sa3/
FAILS=0

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
fail() { say "[FAIL] $1: $2"; FAILS=$((FAILS + 1)); }
skip() { local why=$1 name; shift; for name in "$@"; do say "[SKIP] $name: $why"; done; }

# run_cmd NAME SECONDS CMD...: run CMD under a time limit; its output goes to logs/NAME.txt and smoke.log.
# Leaves STEP_RC (exit status; 124 = ran out of time), STEP_SECS and STEP_LOG for the verdict.
run_cmd() {
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  STEP_LOG=$W/logs/$name.txt
  timeout "$limit" "$@" > "$STEP_LOG" 2>&1
  STEP_RC=$?
  STEP_SECS=$((SECONDS - t0))
  export STEP_LOG STEP_RC STEP_SECS
  { printf -- '---- %s: exit %s after %s s: %s\n' "$name" "$STEP_RC" "$STEP_SECS" "$*"
    sed 's/^/    | /' "$STEP_LOG"; } >> "$LOG"
}

# check FUNCTION ARGS...: one function of smoke_checks.py; each [FAIL] line it prints counts, and so
# does a crash that printed none.
check() {
  local out=$W/logs/.check.out rc n
  : > "$out"
  python "$CHECKS" "$@" 2>&1 | tee -a "$LOG" "$out"
  rc=${PIPESTATUS[0]}
  n=$(grep -c '^\[FAIL\]' "$out")
  FAILS=$((FAILS + n))
  if [ "$rc" -ne 0 ] && [ "$n" -eq 0 ]; then fail "$1" "the check itself crashed (exit $rc), see $LOG"; fi
  return 0
}

for tool in python wds-encode torchrun; do
  command -v "$tool" > /dev/null || { fail setup "$tool is not on PATH (activate the virtualenv)"; exit 1; }
done

cat > "$CHECKS" <<'PYTHON'
"""The Python half of gpu_smoke.sh: verdicts on the runs it made, and BatchEncoder's paths called
directly. `python smoke_checks.py FUNCTION ARGS...`; each verdict is one `[PASS|FAIL] name: figure`
line. The exit status is non-zero only when a check crashed before it could say why."""

import copy
import json
import numbers
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

GiB = 2 ** 30
MISSING = "<missing>"
PRECISION_KEYS = ("precision", "reference", "relative_error", "limit", "window_samples", "ok")


SAID = []   # the names of the lines printed so far


def say(tag, name, figure):
    SAID.append(name)
    figure = " ".join(str(figure).split("\n"))   # one line per verdict, whatever an error message holds
    print(f"[{tag}] {name}: {figure}", flush=True)


def verdict(name, ok, figure):
    say("PASS" if ok else "FAIL", name, figure)


# ------------------------------------------------------------------ verdicts on `wds-encode` runs

def step():
    """(exit status, seconds, output text) of the step run_cmd just ran."""
    log = Path(os.environ["STEP_LOG"])
    return int(os.environ["STEP_RC"]), int(os.environ["STEP_SECS"]), log.read_text(errors="replace")


def details(out):
    path = Path(out) / "details.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def why_not(rc, text):
    """What a failed command said last, for the verdict line."""
    if rc == 0:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
    return f"; exit {rc}{' (time limit)' if rc == 124 else ''}: {said[:300]}"


def precision_record(record, precision, window_samples=None):
    """(ok, figure) for a `check_precision` result / details.json `stats.precision_check`."""
    if not isinstance(record, dict) or not record:
        return False, f"no precision check recorded ({record!r})"
    missing = [k for k in PRECISION_KEYS if k not in record]
    err, limit = record.get("relative_error"), record.get("limit")
    ok = (not missing and record["precision"] == precision and record["reference"] == "fp32"
          and record["ok"] is True and isinstance(err, numbers.Real) and isinstance(limit, numbers.Real)
          and err <= limit
          and (window_samples is None or record["window_samples"] == window_samples))
    figure = (f"{record.get('precision')} vs {record.get('reference')}: rel err "
              f"{f'{err:.1e}' if isinstance(err, numbers.Real) else err} (limit {limit}), "
              f"window {record.get('window_samples')} samples, ok {record.get('ok')}")
    return ok, figure + (f"; keys missing: {missing}" if missing else "")


def run_ok(name, out):
    """A run (or `wds-encode demo`) went through: latents for every window, no errors."""
    rc, secs, text = step()
    d = details(out)
    s = d.get("stats", {})
    devices = sorted({r.get("device") for r in d.get("ranks", [])})
    verdict(name, rc == 0 and s.get("windows", 0) > 0 and s.get("errors") == 0,
            f"{s.get('windows')} windows of {s.get('samples')} files in {s.get('units_done')} units on {devices}, "
            f"{s.get('errors')} errors, {secs} s" + why_not(rc, text))


def run_fp32(name, out):
    """An fp32 run: it succeeds, and it records no precision check (an empty dict)."""
    run_ok(name, out)
    check = details(out).get("stats", {}).get("precision_check", MISSING)
    verdict("precision-record-fp32", check == {},
            f"details.json stats.precision_check of the fp32 run {name}: {check!r} ({{}} expected)")


def precision_run(name, out, precision, mode):
    """A low-precision run. It either passed its precision check (details.json stats.precision_check:
    ok, and the summary's `  precision  ` line), or, mode `either` only, refused to start: exit 2, a
    message about precision, no details.json."""
    rc, secs, text = step()
    summary = next((line.strip() for line in text.splitlines() if line.startswith("  precision  ")), None)
    if rc == 0:
        ok, figure = precision_record(details(out).get("stats", {}).get("precision_check", MISSING), precision)
        verdict(name, ok and summary is not None,
                f"run succeeded, {figure}; summary line: {summary or 'none starting with `  precision  `'}, "
                f"{secs} s")
    elif rc == 2 and mode == "either":
        said = next((line.strip() for line in text.splitlines() if "precision" in line.lower()), None)
        written = (Path(out) / "details.json").exists()
        verdict(name, said is not None and not written,
                f"run refused (exit 2): {said or 'no message mentions precision'}"
                + ("; but it wrote details.json" if written else "; no details.json written") + f", {secs} s")
    else:
        verdict(name, False, f"{precision} run" + why_not(rc, text))


def latent_lengths(out):
    return sorted({json.loads(p.read_text())["latent_length"] for p in Path(out).glob("[0-9]*/*.json")})


def full_run(name, out):
    """--chunking full: windows at each file's own length (several lengths), little padding, and
    cudnn autotuning off (one new shape per length would autotune again and again)."""
    rc, secs, text = step()
    s = details(out).get("stats", {})
    lengths = latent_lengths(out)
    padding = s.get("padding_overhead", 1.0)
    verdict(name, rc == 0 and s.get("windows", 0) > 0 and len(lengths) >= 2 and padding < 0.05,
            f"{s.get('windows')} windows of {len(lengths)} latent lengths "
            f"({f'{lengths[0]}..{lengths[-1]} frames' if lengths else 'none'}), padding "
            f"{100 * padding:.2f}% (limit 5%), {s.get('batches')} batches, {secs} s" + why_not(rc, text))
    autotune = s.get("autotune", MISSING)
    verdict(f"{name}-autotune-off", autotune is False,
            f"details.json stats.autotune {autotune!r} (False expected)")


def auto_compile_run(name, out):
    """--batch-size auto --compile: the probe chose a batch, the encoder compiled, autotuning on."""
    rc, secs, text = step()
    s = details(out).get("stats", {})
    probe = s.get("batch_probe", {})
    table = [(p["batch_size"], None if p["peak_bytes"] is None else round(p["peak_bytes"] / GiB, 2))
             for p in probe.get("probes", [])]
    verdict(name, rc == 0 and s.get("compiled") is True and probe.get("requested") == "auto",
            f"batch {s.get('batch_size')} chosen from probes (batch, GiB) {table}, compiled {s.get('compiled')}, "
            f"warm-up {s.get('warmup_seconds', 0):.1f} s, {s.get('oom_splits')} OOM splits, {secs} s"
            + why_not(rc, text))
    autotune = s.get("autotune", MISSING)
    verdict(f"{name}-autotune-on", autotune is True,
            f"details.json stats.autotune {autotune!r} (True expected)")


def two_ranks(name, out, distinct_devices):
    """Two ranks on this machine: one summary (rank 0 speaks for the job), two rank entries in
    details.json, and with GPUs one device each."""
    rc, secs, text = step()
    d = details(out)
    ranks = d.get("ranks", [])
    devices = [r.get("device") for r in ranks]
    summaries = text.count("wds-encode summary")
    ok = rc == 0 and summaries == 1 and len(ranks) == 2
    if distinct_devices == "distinct":
        ok = ok and len(set(devices)) == 2
    verdict(name, ok, f"{summaries} summary, {len(ranks)} ranks on devices {devices}, units per rank "
                      f"{d.get('stats', {}).get('units_per_rank')}, {secs} s" + why_not(rc, text))


SHARED_GPU = r"duplicate gpu|same (gpu|device)|run on (one|the same) gpu|all run on gpu|gpu of its own"


def two_ranks_one_gpu(name):
    """torchrun with 2 ranks on one visible GPU: each rank must stop at once with exit 2 and say that
    the GPU is taken twice (torchrun itself exits 1 and reports the ranks' exit codes)."""
    rc, secs, text = step()
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", text)]
    said = next((line.strip() for line in text.splitlines()
                 if re.search(SHARED_GPU, line, re.I)), None)
    exit2 = rc == 2 or (rc != 0 and codes and all(c == 2 for c in codes))
    verdict(name, bool(exit2) and said is not None and secs < 120,
            f"torchrun exit {rc}, ranks' exit codes {codes}, {secs} s (limit 120 s): "
            f"{(said or 'no message mentions the duplicate GPU')[:300]}")


def refused(name, what):
    """A command that must stop before any work with exit 2 (bad configuration)."""
    rc, secs, text = step()
    said = next((line.strip() for line in text.splitlines() if "error" in line.lower()), "")
    verdict(name, rc == 2 and secs < 60, f"{what}: exit {rc} after {secs} s: {said[:300]}")


def latents(name, out, reference, limit):
    """Latents of two runs over the same windows (keyed by source shard and key) agree within a
    relative error (the VAE's noise is seeded by key, so `sample` latents compare too)."""
    def load(folder):
        found = {}
        for path in Path(folder).glob("[0-9]*/*.json"):
            md = json.loads(path.read_text())
            found[(md["source_shard"], md["key"])] = np.load(path.with_suffix(".npy")).astype(np.float64)
        return found
    got, ref = load(out), load(reference)
    keys = sorted(set(got) & set(ref))
    errors = [float(np.linalg.norm(got[k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-12))
              if got[k].shape == ref[k].shape else float("inf") for k in keys]
    worst = max(errors, default=float("inf"))
    verdict(name, bool(keys) and len(keys) == len(got) == len(ref) and worst < float(limit),
            f"{len(keys)} windows in common of {len(got)} / {len(ref)}, max rel err {worst:.1e} (limit {limit})")


RUN_VERDICTS = {f.__name__: f for f in (run_ok, run_fp32, precision_run, full_run, auto_compile_run, two_ranks,
                                        two_ranks_one_gpu, refused, latents)}
if __name__ == "__main__" and sys.argv[1] in RUN_VERDICTS:   # these need no torch: spare its import
    RUN_VERDICTS[sys.argv[1]](*sys.argv[2:])
    sys.exit(0)

# ------------------------------------------------------------------ BatchEncoder, called directly

import torch  # noqa: E402

from wds_encode.config import load_model_config  # noqa: E402
from wds_encode.pipeline.encoder import BatchEncoder  # noqa: E402
from wds_encode.models import demo_model_paths, load_autoencoder  # noqa: E402

CPU = torch.device("cpu")
F10 = 215 * 2048   # ~10 s at 44.1 kHz, a multiple of the SAO VAE's downsampling ratio (2048)


def demo_model():
    config, ckpt = demo_model_paths()
    return load_autoencoder(load_model_config(config), ckpt)


def batch(n, samples, seed, amplitude=0.3):
    audio = amplitude * torch.randn(n, 2, samples, generator=torch.Generator().manual_seed(seed))
    return audio, torch.ones(n, samples, dtype=torch.bool), [f"smoke/{seed}/{i}" for i in range(n)]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


class RunsOutOfMemory(torch.nn.Module):
    """The real encoder network, except that a batch larger than `most` raises the device's
    out-of-memory error (as tests/test_encoder.py does); records every batch size it was given."""

    def __init__(self, inner, most):
        super().__init__()
        self.inner, self.most, self.sizes = inner, most, []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.most:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return self.inner(x)


def encoder_cpu():
    """BatchEncoder's device-independent paths on the CPU, with the demo model at tiny sizes."""
    guarded(cpu_oom_split, "oom-split-cpu", "oom-split-remembered-cpu")
    guarded(oom_messages, "oom-messages")
    guarded(cpu_check_precision, "check-precision-cpu")


def cpu_oom_split():
    # A batch of 8 where only 2 fit: it is halved until the parts fit, and the encoder remembers
    # the size that fit, so later batches are cut to it up front: no forward pass above 2 again.
    most = 2
    audio, masks, keys = batch(8, 4096, seed=1)
    ref = BatchEncoder(demo_model(), device=CPU, latent_mode="mean").encode(audio, masks, keys).latents
    model = demo_model()
    model.encoder = wrapper = RunsOutOfMemory(model.encoder, most)
    enc = BatchEncoder(model, device=CPU, latent_mode="mean")
    first = enc.encode(audio, masks, keys)
    limit = getattr(enc, "split_limit", MISSING)
    pass1 = list(wrapper.sizes)
    verdict("oom-split-cpu", first.splits > 0 and not any(first.errors) and rel(first.latents, ref) < 1e-5
            and limit == most,
            f"batch of 8, more than {most} 'runs out of memory': forward passes {pass1}, {first.splits} splits, "
            f"split_limit {limit!r} ({most} expected), rel err {rel(first.latents, ref):.1e}")
    del wrapper.sizes[:]
    again = enc.encode(audio, masks, keys)
    odd = enc.encode(audio[:5], masks[:5], keys[:5])
    later = list(wrapper.sizes)
    verdict("oom-split-remembered-cpu",
            bool(later) and max(later) <= most and again.splits == 0 and odd.splits == 0
            and not any(again.errors + odd.errors) and rel(again.latents, ref) < 1e-5
            and rel(odd.latents, ref[:5]) < 1e-5,
            f"after the split, the same batch and a batch of 5: forward passes {later} (none above {most}), "
            f"splits {again.splits} and {odd.splits} (0 expected), rel err {rel(again.latents, ref):.1e}")


def oom_messages():
    # cuDNN and cuBLAS report a failed allocation with their own status codes, not "out of memory"
    from wds_encode.pipeline.encoder import is_out_of_memory
    cases = {
        "CUDA out of memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        "CUDNN_STATUS_ALLOC_FAILED": RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        "CUBLAS_STATUS_ALLOC_FAILED": RuntimeError(
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        "CUDNN_STATUS_INTERNAL_ERROR": RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    }
    seen = {name: is_out_of_memory(exc) for name, exc in cases.items()}
    other = is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    verdict("oom-messages", all(seen.values()) and not other,
            f"is_out_of_memory: {seen}; an unrelated RuntimeError: {other} (False expected)")


def cpu_check_precision():
    # bf16 on this CPU is either right (rounding only: the check passes and says by how much) or wrong
    # (oneDNN's AMX kernels in some torch builds: the check must refuse, and a direct measurement of
    # the encoder's bf16 output must agree that it is wrong)
    from wds_encode.pipeline.encoder import PrecisionMismatch
    model = demo_model()
    enc = BatchEncoder(model, device=CPU, precision="bf16")
    try:
        ok, figure = precision_record(enc.check_precision(65536), "bf16", window_samples=65536)
        verdict("check-precision-cpu", ok, f"demo model, bf16 on the CPU: {figure}")
    except PrecisionMismatch as exc:
        audio, _, _ = batch(2, 65536, seed=4)
        with torch.inference_mode():
            low = enc.low_model.encoder(audio.bfloat16()).float()
            ref = model.encoder(audio)
        off = rel(low, ref)
        verdict("check-precision-cpu", off > 0.05,
                f"refused bf16 on this CPU ({str(exc)[:160]}); the bf16 encoder output is {off:.2f} off fp32 "
                "(over 0.05: broken kernels, rightly refused)")


# CUDA checks: (function, the verdict names it prints); each runs with the device to itself
CUDA_CHECKS = []


def cuda_check(*names):
    def register(func):
        CUDA_CHECKS.append((func, names))
        return func
    return register


def guarded(func, *names, args=()):
    """Run func(*args); if it crashes, every verdict it had not printed yet is a FAIL with the error."""
    before = len(SAID)
    started = time.perf_counter()
    try:
        func(*args)
    except Exception as exc:
        traceback.print_exc()
        for name in names:
            if name not in SAID[before:]:
                say("FAIL", name, f"not reached: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        print(f"    ({func.__name__}: {time.perf_counter() - started:.1f} s)", flush=True)


class Cuda:
    """What the CUDA checks share: the device, and the full-size SAO VAE encoder with seeded weights
    (as scripts/benchmark.py --model sao builds it; weights are not bundled)."""

    def __init__(self, workdir):
        from wds_encode.models.demo_model import demo_state_dict
        from wds_encode.models.reference_configs import STABLE_AUDIO_OPEN_VAE
        self.device = torch.device("cuda:0")
        self.total = torch.cuda.get_device_properties(self.device).total_memory
        self.sao_config = STABLE_AUDIO_OPEN_VAE
        self.sao_ckpt = Path(workdir) / "sao_vae_encoder.safetensors"
        if not self.sao_ckpt.is_file():
            from safetensors.torch import save_file
            state = demo_state_dict(STABLE_AUDIO_OPEN_VAE)
            save_file({k: v for k, v in state.items() if not k.startswith("decoder.")}, str(self.sao_ckpt))

    def sao(self):
        return load_autoencoder(self.sao_config, self.sao_ckpt)

    def encoder(self, model, precision, device=None, **options):
        return BatchEncoder(model, device=device or self.device, precision=precision, seed=0, **options)


def pinned(tensor):
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor)
    return out


@cuda_check("latents-fp32-vs-cpu", "latents-bf16-vs-cpu", "latents-fp16-vs-cpu")
def precisions(cu):
    # each precision on the GPU against fp32 on the CPU, full-size SAO VAE, 2 windows of ~5 s
    audio, masks, keys = batch(2, 108 * 2048, seed=1)
    ref = cu.encoder(cu.sao(), "fp32", device=CPU, latent_mode="mean").encode(audio, masks, keys).latents
    for precision, limit in (("fp32", 1e-4), ("bf16", 5e-2), ("fp16", 5e-2)):
        out = cu.encoder(cu.sao(), precision, latent_mode="mean").encode(audio, masks, keys)
        err = rel(out.latents, ref)
        verdict(f"latents-{precision}-vs-cpu", err < limit and not any(out.errors),
                f"SAO VAE, 2 x 5 s: rel err {err:.1e} (limit {limit:g}), fp32 re-run {out.fp32_retry}")


@cuda_check("check-precision-bf16-cuda", "check-precision-fp16-cuda")
def precision_checks(cu):
    # the check a low-precision run makes before it starts: one window in both precisions
    for precision in ("bf16", "fp16"):
        name = f"check-precision-{precision}-cuda"
        enc = cu.encoder(cu.sao(), precision)
        if not hasattr(enc, "check_precision"):
            verdict(name, False, "BatchEncoder has no check_precision (not there yet)")
            continue
        started = time.perf_counter()
        ok, figure = precision_record(enc.check_precision(F10), precision, window_samples=F10)
        verdict(name, ok, f"SAO VAE, one 10 s window: {figure}, {time.perf_counter() - started:.1f} s")


@cuda_check("compile-on-vs-off", "fp32-rerun-in-writer-thread")
def compiled(cu):
    # torch.compile gives eager's latents; then an fp16 batch that overflows has its window re-run in
    # fp32 (eagerly) by a second thread, the writer's collect, while the main thread goes on
    # submitting batches through the compiled graph
    audio, masks, keys = batch(8, 65536, seed=7)
    eager = cu.encoder(demo_model(), "fp16", latent_mode="mean").encode(audio, masks, keys).latents
    enc = cu.encoder(demo_model(), "fp16", latent_mode="mean", compile=True)
    started = time.perf_counter()
    out = enc.encode(audio, masks, keys)
    first = time.perf_counter() - started
    started = time.perf_counter()
    enc.encode(audio, masks, keys)
    second = time.perf_counter() - started
    diff = rel(out.latents, eager)
    verdict("compile-on-vs-off", enc.compiled and enc.compile_error is None and diff < 1e-2,
            f"demo model, fp16, 8 x 65536: rel diff {diff:.1e} (limit 1e-2), first batch {first:.1f} s "
            f"(compiles), next {1e3 * second:.0f} ms, compile error {enc.compile_error}")
    loud = audio.clone()
    loud[0] *= 1e6                     # beyond fp16's 65504: inf in fp16, finite in fp32
    pending = enc.submit(pinned(loud), masks, keys)
    results = []

    def writer():
        try:
            results.append(enc.collect(pending))
        except Exception as exc:       # reported below
            results.append(exc)
    thread = threading.Thread(target=writer, name="smoke-writer")
    thread.start()
    meanwhile = 0
    while thread.is_alive() or meanwhile < 3:
        enc.encode(*batch(8, 65536, seed=50 + meanwhile))
        meanwhile += 1
        time.sleep(0.02)
    thread.join()
    got = results[0] if results else None
    good = (hasattr(got, "latents") and got.fp32_retry and not any(got.errors)
            and got.latents is not None and bool(torch.isfinite(got.latents).all()))
    verdict("fp32-rerun-in-writer-thread", bool(good) and enc.compiled,
            f"fp32 re-run {getattr(got, 'fp32_retry', got)!r}, retries {enc.retries}, errors "
            f"{getattr(got, 'errors', None)}, still compiled {enc.compiled} ({enc.compile_error}), {meanwhile} "
            "batches submitted meanwhile")


@cuda_check("batch-size-probe")
def probe(cu):
    # --batch-size auto: growing batches until the peak passes the budget (here 10% of free memory,
    # to keep it short); a batch of the chosen size then runs without splitting
    enc = cu.encoder(cu.sao(), "bf16")
    started = time.perf_counter()
    size, info = enc.probe_batch_size(F10, cap=256, host_memory=64 * GiB, headroom=0.9)
    took = time.perf_counter() - started
    table = [(p["batch_size"], None if p["peak_bytes"] is None else round(p["peak_bytes"] / GiB, 1))
             for p in info["probes"]]
    out = enc.encode(*batch(size, F10, seed=5))
    verdict("batch-size-probe", size >= 1 and out.splits == 0 and not any(out.errors),
            f"SAO VAE bf16, 10 s windows: chose {size} in {took:.1f} s with a budget of "
            f"{0.1 * info['device_free_bytes'] / GiB:.1f} GiB, probes (batch, GiB) {table}; a batch of {size} "
            f"then ran with {out.splits} splits")


@cuda_check("autotune-flag")
def autotune(cu):
    # cudnn.benchmark only when autotune (--chunking full turns it off: every length a new shape)
    seen = {}
    for flag in (True, False):
        torch.backends.cudnn.benchmark = False
        cu.encoder(demo_model(), "fp32", autotune=flag)
        seen[flag] = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    verdict("autotune-flag", seen[True] is True and seen[False] is False,
            f"cudnn.benchmark after BatchEncoder(autotune=True): {seen[True]} (True expected), "
            f"after autotune=False: {seen[False]} (False expected)")


@cuda_check("oom-split-cuda", "oom-split-remembered-cuda", "oom-one-window-cuda")
def oom_split(cu):
    # a real out-of-memory: cap this process at ~3x what a batch of 4 needs; a batch of 32 splits,
    # its latents are still right, and the encoder remembers the part size that fit (split_limit),
    # so the same batch again is cut up front and never runs out of memory
    enc = cu.encoder(cu.sao(), "bf16", latent_mode="mean")
    audio, masks, keys = batch(32, F10, seed=3)
    ref = torch.cat([enc.encode(audio[i:i + 4], masks[i:i + 4], keys[i:i + 4]).latents
                     for i in range(0, 32, 4)])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(cu.device)
    enc.encode(audio[:4], masks[:4], keys[:4])
    cap = 3 * torch.cuda.max_memory_reserved(cu.device)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / cu.total), cu.device)
    figures = []
    for attempt in (1, 2):
        started = time.perf_counter()
        out = enc.encode(audio, masks, keys)
        figures.append((out, time.perf_counter() - started, getattr(enc, "split_limit", MISSING)))
    (one, t1, limit1), (two, t2, limit2) = figures
    verdict("oom-split-cuda", one.splits > 0 and not any(one.errors) and rel(one.latents, ref) < 1e-2
            and isinstance(limit1, int) and 1 <= limit1 < 32,
            f"SAO VAE bf16, 32 x 10 s under a {cap / GiB:.1f} GiB cap: {one.splits} splits, split_limit "
            f"{limit1!r}, rel err {rel(one.latents, ref):.1e}, {t1:.2f} s")
    verdict("oom-split-remembered-cuda", two.splits == 0 and not any(two.errors) and rel(two.latents, ref) < 1e-2
            and isinstance(limit2, int) and limit2 == limit1,
            f"pass 2 over the same batch: {two.splits} splits (0 expected), split_limit {limit2!r}, rel err "
            f"{rel(two.latents, ref):.1e}, {t2:.2f} s")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_allocated(cu.device) / cu.total, cu.device)
    out = enc.encode(audio[:2], masks[:2], keys[:2])
    verdict("oom-one-window-cuda", out.latents is None and all(out.errors),
            f"no memory left even for one window: per-window errors {out.errors[:1]}, the run would go on")


@cuda_check("in-flight-10", "in-flight-staging-ring", "pad-to")
def in_flight(cu):
    # 10 batches submitted before any is collected, each from a pinned buffer the caller drops at once
    # while other pinned buffers come and go; then 10 batches the way the runner sends them: collated
    # into the encoder's ring of pinned staging buffers (a slot is reused once its batch is collected)
    # while a writer thread collects. Either way the results equal one-at-a-time results.
    import queue
    enc = cu.encoder(cu.sao(), "bf16")
    inputs = [batch(8, F10, seed=100 + i) for i in range(10)]
    expect = [enc.encode(*x).latents for x in inputs]
    pending = []
    for audio, masks, keys in inputs:
        buffer = pinned(audio)
        pending.append(enc.submit(buffer, masks, keys))
        del buffer
        junk = pinned(torch.full_like(audio, 7.0))   # would reuse a freed pinned block still being copied
        del junk
    got = [enc.collect(p).latents for p in pending]
    diffs = [rel(g, x) for g, x in zip(got, expect)]
    verdict("in-flight-10", max(diffs) < 1e-3,
            f"SAO VAE bf16, 10 x (8 x 10 s) in flight: max rel diff to one at a time {max(diffs):.1e} (limit 1e-3)")
    handed, collected = queue.Queue(), {}

    def writer():
        while (item := handed.get()) is not None:
            try:
                collected[item[0]] = enc.collect(item[1]).latents
            except Exception as exc:               # the verdict below shows it
                collected[item[0]] = exc
    thread = threading.Thread(target=writer, name="smoke-writer")
    thread.start()
    try:
        for i, (audio, masks, keys) in enumerate(inputs):
            slot = enc.pinned_batch(tuple(audio.shape), audio.dtype, timeout=120)
            slot.tensor.copy_(audio)
            handed.put((i, enc.submit(slot.tensor, masks, keys, slot=slot)))
    finally:
        handed.put(None)
        thread.join()
    failed = [v for v in collected.values() if isinstance(v, Exception)]
    if failed:
        raise failed[0]
    diffs = [rel(collected[i], x) for i, x in enumerate(expect)]
    verdict("in-flight-staging-ring", max(diffs) < 1e-3 and enc.staging.in_use == 0,
            f"10 batches through {enc.staging.slots} pinned slots, a writer thread collecting: max rel diff "
            f"{max(diffs):.1e} (limit 1e-3), slots still held after {enc.staging.in_use} (0 expected)")
    enc.pad_to = 8                                 # a short last batch reuses the full batch's shape
    audio, masks, keys = inputs[0]
    short = enc.encode(audio[:5], masks[:5], keys[:5]).latents
    verdict("pad-to", short.shape[0] == 5 and rel(short, expect[0][:5]) < 1e-2,
            f"5 windows padded to 8: {short.shape[0]} results, rel diff {rel(short, expect[0][:5]):.1e}")


@cuda_check("writer-cpu-while-waiting")
def waiting_cpu(cu):
    # the writer thread waits in collect() on the batch's CUDA event; a blocking event sleeps there,
    # a spinning one burns a core per rank (fp32 SAO, 3 x (16 x 10 s) queued: seconds of GPU work)
    enc = cu.encoder(cu.sao(), "fp32", latent_mode="mean")
    audio, masks, keys = batch(16, F10, seed=9)
    enc.encode(audio, masks, keys)                 # autotune this shape first
    buffer = pinned(audio)
    queued = [enc.submit(buffer, masks, keys) for _ in range(3)]
    measured = {}

    def writer():
        cpu, wall = time.thread_time(), time.perf_counter()
        enc.collect(queued[-1])
        measured["cpu"], measured["wall"] = time.thread_time() - cpu, time.perf_counter() - wall
    thread = threading.Thread(target=writer, name="smoke-writer")
    thread.start()
    thread.join()
    for p in queued[:-1]:
        enc.collect(p)
    share = measured["cpu"] / max(measured["wall"], 1e-9)
    short = " (a short wait: weak evidence)" if measured["wall"] < 0.1 else ""
    verdict("writer-cpu-while-waiting", share <= 0.5,
            f"collect() waited {measured['wall']:.2f} s using {measured['cpu']:.2f} s of CPU ({100 * share:.0f}%, "
            f"limit 50%; a blocking event: near 0%){short}")


@cuda_check("channels-last-cuda")
def channels_last(cu):
    # the channels-last layout (the CPU default) also runs on CUDA and gives the same latents
    audio, masks, keys = batch(8, F10, seed=11)
    results = {}
    for layout in (False, True):
        enc = cu.encoder(cu.sao(), "bf16", latent_mode="mean", channels_last=layout)
        enc.encode(audio, masks, keys)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):
            out = enc.encode(audio, masks, keys)
        results[layout] = (1e3 * (time.perf_counter() - started) / 3, out.latents)
    diff = rel(results[True][1], results[False][1])
    say("INFO", "channels-last-cuda", f"SAO VAE bf16 eager, 8 x 10 s: channels-first {results[False][0]:.0f} ms, "
        f"channels-last {results[True][0]:.0f} ms per batch")
    verdict("channels-last-cuda", diff < 2e-2, f"rel diff channels-last vs channels-first {diff:.1e} (limit 2e-2)")


def golden_sa3_dir():
    """SA3's reference data: WDS_GOLDEN_SA3_DIR, else the copy in the repository's tests/, else None."""
    repo = Path(os.environ.get("WDS_SMOKE_REPO", "."))
    for folder in (os.environ.get("WDS_GOLDEN_SA3_DIR"), repo / "tests" / "golden-sa3",
                   repo.parent / "shared" / "golden-sa3"):
        if folder and (Path(folder) / "index.json").is_file():
            return Path(folder)
    return None


@cuda_check("same-golden-fp32-cuda", "same-l-bf16-vs-fp32-cuda", "same-l-bf16-speed")
def same_models(cu):
    # Stable Audio 3's SAME: the golden tiny models in fp32 on CUDA against SA3's own latents (SDPA's CUDA
    # kernels, banded sliding-window attention); then SAME-L at full size with seeded weights, one 47 s
    # window in bf16 against fp32 on the same GPU, and its speed in bf16 at batch 8
    import torch.nn.functional as F
    from wds_encode.models import build_autoencoder
    golden = golden_sa3_dir()
    if golden is None:
        say("FAIL", "same-golden-fp32-cuda", "no golden-sa3 folder (tests/golden-sa3 or WDS_GOLDEN_SA3_DIR)")
    else:
        worst = 0.0
        for name in ("same_tiny_shift", "same_tiny_window", "same_tiny_two_stage"):
            folder = golden / name
            model = load_autoencoder(json.loads((folder / "model_config.json").read_text()),
                                     folder / "model.safetensors", device=cu.device)
            x = torch.from_numpy(np.load(folder / "input.npy"))
            x = F.pad(x, (0, (-x.shape[-1]) % model.downsampling_ratio)).to(cu.device)
            worst = max(worst, float((model.encode(x, mode="mean").cpu()
                                      - torch.from_numpy(np.load(folder / "latents.npy"))).abs().max()))
        verdict("same-golden-fp32-cuda", worst < 2e-4, f"3 golden SAME models: max |error| {worst:.1e} (limit 2e-4)")
    config = json.loads((Path(os.environ.get("WDS_SMOKE_REPO", ".")) / "configs" / "same_l_shape.json").read_text())
    torch.manual_seed(0)
    model = build_autoencoder(config).eval().requires_grad_(False)
    window = int(os.environ.get("WDS_SMOKE_SAME_FRAMES", 512)) * 4096   # 512 frames: 47.6 s
    audio, masks, keys = batch(2, window, seed=3)
    ref = cu.encoder(copy.deepcopy(model), "fp32", latent_mode="mean").encode(audio, masks, keys).latents
    out = cu.encoder(copy.deepcopy(model), "bf16", latent_mode="mean").encode(audio, masks, keys)
    err = rel(out.latents, ref)
    verdict("same-l-bf16-vs-fp32-cuda", err < 5e-2 and not any(out.errors),
            f"SAME-L shape, 2 x {window / 44100:.1f} s: rel err {err:.1e} (limit 5e-2), fp32 re-run {out.fp32_retry}")
    enc = cu.encoder(copy.deepcopy(model), "bf16", latent_mode="mean")
    audio, masks, keys = batch(8, window, seed=4)
    enc.encode(audio, masks, keys)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        enc.encode(audio, masks, keys)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 3
    rtf = 8 * window / 44100 / seconds
    flops = model.encoder.flops(window) * 8 / seconds
    verdict("same-l-bf16-speed", rtf > 1, f"SAME-L bf16, batch 8 x {window / 44100:.1f} s: {rtf:.0f}x real time, "
            f"{flops / 1e12:.0f} TFLOP/s of model FLOPs (eager, H200 dense bf16 peak ~989)")


def encoder_cuda(workdir):
    """Every CUDA path of BatchEncoder once; without a CUDA device, a SKIP line for each."""
    if not torch.cuda.is_available():
        for _, names in CUDA_CHECKS:
            for name in names:
                say("SKIP", name, "no CUDA device")
        return
    cu = Cuda(workdir)
    for func, names in CUDA_CHECKS:
        guarded(func, *names, args=(cu,))


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
PYTHON

# ---------------------------------------------------------------------------------- 0. this machine
NGPU=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
say "[INFO] machine: $(python -c 'import os, torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda},"
  f" cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs")'), $NGPU CUDA device(s)"
if [ "$NGPU" -gt 0 ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
    | sed 's/^/[INFO] gpu: /' | tee -a "$LOG"
fi
MODE=$([ "$NGPU" -gt 0 ] && echo "CUDA" || echo "CPU only")
read -r CFG CKPT < <(python -c 'from wds_encode.models import demo_model_paths as p; print(*p())')

# ---------------------------------------------------------------------------------- 1. the demo
# Proves the whole pipeline on this machine: synthetic shards -> decode workers -> batches -> encoder
# -> writer thread -> manifest. With CUDA it runs on the GPU (fp32, fixed windows) at its full size;
# without, on the CPU with 2 shards of 4 files.
if [ "$NGPU" -gt 0 ]; then DEMO_SIZE=(); else DEMO_SIZE=(--shards 2 --samples-per-shard 4 --batch-size 4); fi
run_cmd demo 300 wds-encode demo "$W/demo" --no-progress "${DEMO_SIZE[@]}"
check run_ok demo "$W/demo/out"

# The runs below read the demo's dataset (its shards exist even if its encoding failed).
RUN=(wds-encode run --model-config "$CFG" --ckpt-path "$CKPT" --dataset-config "$W/demo/dataset_config.json"
     --overwrite --no-progress --sample-size 65536)
SPLIT=(--chunking split --max-chunks 4)               # the demo's windows
FULL=(--chunking full --max-seconds 3 --bucket-buffer 16)

# ---------------------------------------------------------------------------------- 2. CPU runs
# fp32 on the CPU: the reference every GPU run is compared with, and it records no precision check.
run_cmd cpu-fp32 180 "${RUN[@]}" "${SPLIT[@]}" --device cpu --batch-size 4 --output-path "$W/cpu-fp32"
check run_fp32 cpu-fp32 "$W/cpu-fp32"
# the demo's latents (on the GPU when there is one) are the CPU's, to fp32 accuracy; its files are at
# 16 to 48 kHz, so on a GPU this also checks --resample-on device (auto there) against the workers'
# resampling of the CPU run
check latents demo-latents-vs-cpu-fp32 "$W/demo/out" "$W/cpu-fp32" 1e-4
# bf16 on the CPU: the run checks its precision against fp32 first; it goes on (and records the
# agreement) or refuses with exit 2. Either is a pass; the verdict says which.
run_cmd cpu-bf16 180 "${RUN[@]}" "${SPLIT[@]}" --device cpu --precision bf16 --batch-size 4 \
        --output-path "$W/cpu-bf16"
check precision_run cpu-bf16-precision "$W/cpu-bf16" bf16 either
# --chunking full: every file at its own length, batched by length (also the GPU's reference)
run_cmd cpu-full 180 "${RUN[@]}" "${FULL[@]}" --device cpu --batch-size 4 --output-path "$W/cpu-full"
check full_run cpu-full "$W/cpu-full"
# --devices 2 on the CPU: two gloo ranks started by the command itself, one summary
run_cmd cpu-two-ranks 180 "${RUN[@]}" "${SPLIT[@]}" --device cpu --devices 2 --batch-size 4 \
        --output-path "$W/cpu-two-ranks"
check two_ranks cpu-two-ranks "$W/cpu-two-ranks" any

# ---------------------------------------------------------------------------------- 3. BatchEncoder on the CPU
# An out-of-memory split (injected) and that it is remembered; the OOM messages of cuDNN / cuBLAS;
# check_precision's record.
check encoder_cpu

# ---------------------------------------------------------------------------------- 4. GPU runs
# --batch-size auto with --compile in bf16, --chunking full in fp16 (mixed lengths, autotuning off),
# both with their precision check; latents against the CPU's; `wds-encode verify` decoding on CUDA.
GPU_RUNS=(gpu-bf16-auto-compile gpu-bf16-auto-compile-autotune-on gpu-bf16-precision gpu-bf16-latents-vs-cpu-fp32
          gpu-fp16-full gpu-fp16-full-autotune-off gpu-fp16-precision gpu-fp16-full-latents-vs-cpu-full gpu-verify)
if [ "$NGPU" -gt 0 ]; then
  run_cmd gpu-bf16-auto-compile 400 "${RUN[@]}" "${SPLIT[@]}" --devices 1 --precision bf16 --batch-size auto \
          --compile --output-path "$W/gpu-bf16-auto-compile"
  check auto_compile_run gpu-bf16-auto-compile "$W/gpu-bf16-auto-compile"
  check precision_run gpu-bf16-precision "$W/gpu-bf16-auto-compile" bf16 success
  check latents gpu-bf16-latents-vs-cpu-fp32 "$W/gpu-bf16-auto-compile" "$W/cpu-fp32" 5e-2
  run_cmd gpu-fp16-full 300 "${RUN[@]}" "${FULL[@]}" --devices 1 --precision fp16 --no-compile --batch-size 8 \
          --output-path "$W/gpu-fp16-full"
  check full_run gpu-fp16-full "$W/gpu-fp16-full"
  check precision_run gpu-fp16-precision "$W/gpu-fp16-full" fp16 success
  check latents gpu-fp16-full-latents-vs-cpu-full "$W/gpu-fp16-full" "$W/cpu-full" 5e-2
  run_cmd gpu-verify 180 wds-encode verify "$W/demo/out" --device cuda -n 4
  case $STEP_RC in
    0) say "[PASS] gpu-verify: decoded 4 windows of the demo output on CUDA, $STEP_SECS s" ;;
    1) say "[INFO] gpu-verify: verify flagged the demo output (exit 1; the demo model is tiny), see $STEP_LOG"
       say "[PASS] gpu-verify: decoding on CUDA ran, $STEP_SECS s" ;;
    *) fail gpu-verify "exit $STEP_RC after $STEP_SECS s, see $STEP_LOG" ;;
  esac
else
  skip "no CUDA device" "${GPU_RUNS[@]}"
fi

# ---------------------------------------------------------------------------------- 5. BatchEncoder on CUDA
# Each precision against the CPU, check_precision, compile on and off (and the fp32 re-run in the
# writer thread), the batch-size probe, cudnn autotuning, a real OOM split and that it is remembered,
# 10 batches in flight, pad_to, the writer's CPU use while it waits, channels-last.
check encoder_cuda "$W"

# ---------------------------------------------------------------------------------- 6. ranks and GPUs
# With 2+ GPUs: --devices 2 and torchrun give each rank its own GPU. With any GPU: two ranks on one
# visible GPU are refused at once (torchrun: exit 2 from each rank), and so is --devices 2.
if [ "$NGPU" -ge 2 ]; then
  run_cmd gpu-devices-2 300 env CUDA_VISIBLE_DEVICES=0,1 "${RUN[@]}" "${SPLIT[@]}" --devices 2 --precision bf16 \
          --batch-size 8 --output-path "$W/gpu-devices-2"
  check two_ranks gpu-devices-2 "$W/gpu-devices-2" distinct
  run_cmd gpu-torchrun-2 300 env CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc-per-node 2 -m wds_encode \
          "${RUN[@]:1}" "${SPLIT[@]}" --precision bf16 --batch-size 8 --output-path "$W/gpu-torchrun-2"
  check two_ranks gpu-torchrun-2 "$W/gpu-torchrun-2" distinct
else
  skip "$([ "$NGPU" -eq 0 ] && echo "no CUDA device" || echo "one CUDA device (needs 2)")" gpu-devices-2 gpu-torchrun-2
fi
if [ "$NGPU" -ge 1 ]; then
  run_cmd gpu-torchrun-2-on-one-gpu 150 env CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node 2 \
          -m wds_encode "${RUN[@]:1}" "${SPLIT[@]}" --batch-size 8 --output-path "$W/gpu-torchrun-2-on-one-gpu"
  check two_ranks_one_gpu gpu-torchrun-2-on-one-gpu
  run_cmd gpu-devices-2-on-one-gpu 60 env CUDA_VISIBLE_DEVICES=0 "${RUN[@]}" "${SPLIT[@]}" --devices 2 \
          --batch-size 8 --output-path "$W/gpu-devices-2-on-one-gpu"
  check refused gpu-devices-2-on-one-gpu "--devices 2 with one visible GPU"
else
  skip "no CUDA device" gpu-torchrun-2-on-one-gpu gpu-devices-2-on-one-gpu
fi

rm -f "$W/logs/.check.out"
PASSED=$(grep -c '^\[PASS\]' "$LOG")
SKIPPED=$(grep -c '^\[SKIP\]' "$LOG")
say "smoke ($MODE): $FAILS failed, $PASSED passed, $SKIPPED skipped in $SECONDS s; log $LOG"
exit $((FAILS > 255 ? 255 : FAILS))
