"""scripts/gpu_smoke.sh without a GPU: its CPU parts pass, and it says which GPU steps it skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.sh"

# the steps that run on the CPU: each must print a PASS line
CPU_STEPS = [
    "demo", "cpu-fp32", "precision-record-fp32", "demo-latents-vs-cpu-fp32", "cpu-bf16-precision",
    "cpu-full", "cpu-full-autotune-off", "cpu-two-ranks",
    "oom-split-cpu", "oom-split-remembered-cpu", "oom-messages", "check-precision-cpu",
]
# the steps that need CUDA: each must print a SKIP line here
GPU_STEPS = [
    # `wds-encode run` / `verify` on the GPU
    "gpu-bf16-auto-compile", "gpu-bf16-auto-compile-autotune-on", "gpu-bf16-precision",
    "gpu-bf16-latents-vs-cpu-fp32", "gpu-fp16-full", "gpu-fp16-full-autotune-off", "gpu-fp16-precision",
    "gpu-fp16-full-latents-vs-cpu-full", "gpu-verify",
    # BatchEncoder on CUDA
    "latents-fp32-vs-cpu", "latents-bf16-vs-cpu", "latents-fp16-vs-cpu", "check-precision-bf16-cuda",
    "check-precision-fp16-cuda", "compile-on-vs-off", "fp32-rerun-in-writer-thread", "batch-size-probe",
    "autotune-flag", "oom-split-cuda", "oom-split-remembered-cuda", "oom-one-window-cuda", "in-flight-10",
    "in-flight-staging-ring", "pad-to", "writer-cpu-while-waiting", "channels-last-cuda",
    "same-golden-fp32-cuda", "same-l-bf16-vs-fp32-cuda", "same-l-bf16-speed",
    # ranks and GPUs
    "gpu-devices-2", "gpu-torchrun-2", "gpu-torchrun-2-on-one-gpu", "gpu-devices-2-on-one-gpu",
]
VERDICT = re.compile(r"^\[(PASS|FAIL|SKIP|INFO)\] ([\w.-]+): (.*)$")


@pytest.mark.slow
def test_cpu_mode_passes_its_cpu_steps_and_skips_the_gpu_ones(tmp_path):
    workdir = tmp_path / "smoke"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               CUDA_VISIBLE_DEVICES="")  # CPU mode, even on a machine with a GPU
    result = subprocess.run(["bash", str(SCRIPT), str(workdir)], env=env, capture_output=True, text=True,
                            timeout=300)
    log = (workdir / "smoke.log").read_text()
    tags: dict[str, set[str]] = {}
    for line in log.splitlines():
        match = VERDICT.match(line)
        if match:
            tags.setdefault(match.group(2), set()).add(match.group(1))
    failed = [line for line in log.splitlines() if line.startswith("[FAIL]")]
    assert not failed, "\n".join(failed) + f"\n(log: {workdir / 'smoke.log'})\n{result.stderr[-2000:]}"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert [s for s in CPU_STEPS if "PASS" not in tags.get(s, set())] == []
    assert [s for s in GPU_STEPS if tags.get(s) != {"SKIP"}] == []
    assert all(line.endswith(": no CUDA device") for line in log.splitlines() if line.startswith("[SKIP]"))
    verdicts = [line for line in log.splitlines() if VERDICT.match(line)]
    on_console = [line for line in result.stdout.splitlines() if VERDICT.match(line)]
    assert on_console == verdicts
    # every run's output was kept
    for step in ("demo", "cpu-fp32", "cpu-bf16", "cpu-full", "cpu-two-ranks"):
        assert (workdir / "logs" / f"{step}.txt").is_file()
