#!/usr/bin/env python3
"""Throughput of wds-encode on this machine, in one run on the same generated shards.

Generates WebDataset shards of real audio (FLAC, stereo, 44.1 and 48 kHz, one file length), builds an
encoder with seeded weights (the Stable Audio Open VAE at full size, Stable Audio 3's SAME-S or SAME-L
autoencoder at full size from configs/same_*_shape.json, `--tiny` for the same structure at width 48,
or the small bundled demo model), then measures, in audio seconds per wall second (x real time):

  encoder   the encoder alone (`BatchEncoder`) on batches already on the device, per precision, in three
            modes: eager (the model as written, channels first), channels-last (`--channels-last`) and
            compiled (torch.compile, in the layout wds-encode uses on the device; its warm-up reported apart);
  data      the data path alone: the `Reader` (tar streaming, decode, resample, windows) in a DataLoader
            with the workers wds-encode plans for this machine, no model; also per CPU core;
  e2e       wds-encode end to end (`runner.run`), in steady state: from the first batch written to the
            last, the warm-up before it (start-up, compile) reported apart; the dataset is read as many
            times as needed for --min-steady-seconds of steady state. On a GPU, nvidia-smi samples the
            utilisation every 0.5 s meanwhile;
  chunking  wds-encode end to end with --chunking crop, split and full on files of mixed lengths
            (--mixed-seconds, 5 s to 10 min): the padding each encodes (zeros per real sample) and its
            throughput;
  baseline  stable-audio-tools' pre_encode.py approach, written here: its DataLoader over the same shards
            (whole-file decode with soundfile, a torchaudio Resample built per file, then crop/pad to the
            sample size), its default batch size 1, model.encode under no_grad, then per sample a
            synchronous np.save + json.dump, and gc.collect() + torch.cuda.empty_cache() after every batch.
            Same model, sample size, windows (crop from the start) and precision as the e2e part. It runs
            in a fresh interpreter, as the seed does: torch's default threads and cuDNN settings, and
            glibc's default allocator (wds-encode's own parts keep freed memory on a CPU, `heap.py`).

For an encoder that counts its FLOPs (SAME: `SAMEEncoder.flops`, every linear layer and the attention over
the keys each query sees), the JSON's `model_shape` has the FLOPs per window and per audio second, and
every encoder-alone and end-to-end row its achieved GFLOP/s and, on a GPU, the model FLOPs utilisation:
achieved FLOP/s over the chip's dense peak in that precision (GPU_PEAK_TFLOPS by the device name, for
H100 / H200 / A100; fp32 against the CUDA-core peak, as wds-encode keeps TF32 off; `--peak-tflops`
overrides). On a CPU it reports GFLOP/s only, and the cores the encoder got (`cores_used`).

The parts run in the order data, encoder, e2e, baseline (each on the same shards), chunking. It prints the
figures and the ratios (end to end / encoder alone, end to end / baseline, fast modes / eager), peak
RSS, what other processes used of the CPUs meanwhile (a shared machine), and writes them with the
command line and every parameter to a JSON file (benchmarks/*.json were made this way):

    python scripts/benchmark.py --model demo --files 16 --shards 4 --encoder-seconds 30 \\
        --data-seconds 10 --skip chunking --json-out benchmarks/cpu_demo_defaults.json
    python scripts/benchmark.py --model sao --files 16 --shards 4 --seconds 3 --sample-size 131072 \\
        --compile on --encoder-seconds 30 --data-seconds 10 --skip chunking --json-out benchmarks/cpu_sao_vae.json
    python scripts/benchmark.py --model demo --batch-size 2 --skip encoder,data,e2e,baseline \\
        --json-out benchmarks/cpu_demo_chunking.json
    python scripts/benchmark.py --model sao --files 96 --shards 16 --seconds 30 --batch-size 8 \\
        --num-workers 12 --precisions bf16,fp32 --compile on --encoder-seconds 5 --data-seconds 3 \\
        --baseline-seconds 15 --skip chunking --json-out benchmarks/h200_sao_vae.json   # one GPU, ~6 min
    python scripts/benchmark.py --model same_s --files 4 --shards 2 --sample-size 442368 \\
        --precisions bf16,fp32 --encoder-seconds 20 --min-steady-seconds 20 --channels-last off \\
        --skip data,baseline,chunking,channels-last --json-out benchmarks/cpu_same_s.json
    python scripts/benchmark.py --model same_l --files 4 --shards 2 --sample-size 442368 \\
        --precisions bf16,fp32 --encoder-seconds 20 --min-steady-seconds 20 --channels-last off \\
        --skip data,baseline,chunking,channels-last,compiled --json-out benchmarks/cpu_same_l.json
    python scripts/benchmark.py --model same_l --files 64 --shards 16 --batch-size 16 \\
        --num-workers 12 --precisions bf16 --compile on --encoder-seconds 10 --min-steady-seconds 30 \\
        --skip data,baseline,chunking,channels-last --json-out benchmarks/h200_same_l.json  # H200: not run yet
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import io
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.job.resources import cpu_flags  # noqa: E402  (imports no torch)


def keep_onednn_off_amx() -> bool:
    """On a CPU with AMX (amx_bf16), oneDNN's bf16 convolutions in torch 2.14 compute some shapes wrong,
    and wds-encode's precision check (rightly) stops a bf16 run there: measure the path that is right,
    AVX-512 bf16, as the check's message advises. oneDNN reads the cap when torch loads it: before the
    import. True when this set it."""
    if "amx_bf16" not in cpu_flags() or "ONEDNN_MAX_CPU_ISA" in os.environ:
        return False
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"  # the seed baseline's fresh interpreter inherits it
    return True


ONEDNN_CAPPED = keep_onednn_off_amx()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from wds_encode.config import EncodeConfig, load_dataset_config  # noqa: E402
from wds_encode.job.distributed import rank_device  # noqa: E402
from wds_encode.pipeline.encoder import BatchEncoder, PrecisionMismatch  # noqa: E402
from wds_encode.models import build_autoencoder, demo_model_paths, load_autoencoder  # noqa: E402
from wds_encode.models.demo_model import demo_state_dict  # noqa: E402
from wds_encode.models.reference_configs import STABLE_AUDIO_OPEN_VAE as SAO_VAE  # noqa: E402
from wds_encode.pipeline.reader import Reader, ReaderOptions, ShardEnd, WindowItem  # noqa: E402
from wds_encode.job.resources import available_cpus, plan_cpus  # noqa: E402
from wds_encode.job.heap import keep_freed_memory  # noqa: E402
from wds_encode.runner import run, use_channels_last  # noqa: E402
from wds_encode.pipeline.sources import list_shards  # noqa: E402
from wds_encode.synth import write_tar_shards  # noqa: E402

# --skip names ("channels-last", "compiled": those modes of the encoder alone)
PARTS = ("encoder", "channels-last", "compiled", "data", "e2e", "baseline", "chunking")
ENCODER_MODES = ("eager", "channels-last", "compiled")
FORMATS, RATES, CHANNELS = ("flac",), (44100, 48000), (2,)
SEED_BATCH_SIZE = 1          # pre_encode.py's default --batch-size
SEED_NUM_WORKERS = 4         # pre_encode.py's default --num-workers
GPU_SAMPLE_INTERVAL = 0.5    # seconds between nvidia-smi samples
AUDIO_SUFFIXES = ("flac", "wav", "mp3", "ogg", "opus")
DEFAULT_SAMPLE_SIZE = 1320960  # wds-encode's default --sample-size
REPO = Path(__file__).resolve().parents[1]
# Stable Audio 3's SAME autoencoders at full size (structure of stabilityai/SAME-S and SAME-L; seeded weights)
SAME_SHAPES = {"same_s": REPO / "configs" / "same_s_shape.json",
               "same_l": REPO / "configs" / "same_l_shape.json"}
# SAME's default window: 162 x 8192 samples (30.1 s at 44.1 kHz), a multiple of the downsampling ratio
# (4096) and of SAME-S's attention chunk (32 tokens of 256 samples), so no window is padded
SAME_SAMPLE_SIZE = 1327104
TINY_SAME = {"channels": 8, "dim_heads": 16, "depth": 2, "latent_dim": 16}   # --tiny: width 6 x 8 = 48
# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by the name torch reports
# (torch.cuda.get_device_name), most specific first. "fp32" is the CUDA-core peak: wds-encode's fp32
# turns TF32 off (exact fp32 latents), so that is the peak an fp32 run can reach; "tf32" for reference.
GPU_PEAK_TFLOPS = (
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),     # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),     # SXM4 and PCIe
)


# --------------------------------------------------------------------------- machine and process

def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of its largest waited-for child (decode workers,
    compiler workers), in MB (ru_maxrss is in KB on Linux)."""
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: clear_refs 5), so that the next
    reading is the peak of what runs from now on, not of the setup (building a model's weights)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _machine_cpu_seconds() -> Optional[tuple[float, float]]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat; None elsewhere."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(values) - values[3] - values[4] - values[7]  # all but idle, iowait, steal
    return busy / tick, values[7] / tick


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants: this process and the reaped ones from
    getrusage, the live ones (decode workers, compiler workers) from /proc."""
    own, kids = cpu_seconds()
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # after the command name, which may hold spaces
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    live, stack = 0, list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        live += times.get(pid, 0)
        stack.extend(children.get(pid, []))
    return own + kids + live / tick


class MachineMeter:
    """How busy the machine was while a part ran: CPU seconds of the whole machine (/proc/stat), of
    this process tree, and so of everything else (other jobs on a shared machine), plus steal time
    (a virtual machine's CPUs running other guests)."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.machine = _machine_cpu_seconds()
        self.own = _own_cpu_seconds()
        self.load = load_average()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall
        own = _own_cpu_seconds() - self.own
        out = {"wall_seconds": round(wall, 2), "own_cpu_seconds": round(own, 2),
               "load_average_before": self.load, "load_average_after": load_average()}
        machine = _machine_cpu_seconds()
        if machine is not None and self.machine is not None:
            busy, steal = machine[0] - self.machine[0], machine[1] - self.machine[1]
            others = max(0.0, busy - own)
            out.update(machine_busy_cpu_seconds=round(busy, 2), others_cpu_seconds=round(others, 2),
                       others_cores=round(others / wall, 3) if wall > 0 else None,
                       steal_cpu_seconds=round(steal, 2))
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- GPU utilisation

def nvidia_smi_id(device: torch.device) -> str:
    """What `nvidia-smi -i` calls this device: CUDA_VISIBLE_DEVICES renumbers GPUs for CUDA, not for
    nvidia-smi, so map the CUDA index through it (an index or a UUID, both accepted by -i)."""
    index = device.index if device.index is not None else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


class GpuSampler(threading.Thread):
    """Samples `utilization.gpu` (%) and `memory.used` (MiB) of one GPU with nvidia-smi every `interval` s."""

    def __init__(self, gpu_id: str, interval: float = GPU_SAMPLE_INTERVAL, executable: str = "nvidia-smi"):
        super().__init__(name="gpu-sampler", daemon=True)
        self.gpu_id = gpu_id
        self.interval = interval
        self.executable = shutil.which(executable)
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), utilisation %, memory MiB)
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def start(self) -> None:
        if self.executable is not None:
            super().start()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=15)

    def sample(self) -> None:
        try:
            out = subprocess.run([self.executable, "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "-i", self.gpu_id],
                                 capture_output=True, text=True, timeout=10)
            util, mem = (float(v) for v in out.stdout.strip().splitlines()[0].split(",")[:2])
            self.samples.append((time.time(), util, mem))
        except Exception as exc:  # a failed sample is counted, not fatal
            self.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def summary(self, start: Optional[float] = None, end: Optional[float] = None) -> dict:
        """Mean / median / min / max over the samples taken between `start` and `end` (time.time())."""
        if self.executable is None:
            return {"skipped": "nvidia-smi not found on PATH"}
        rows = [s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
        out: dict = {"samples": len(rows), "interval_s": self.interval, "gpu": self.gpu_id,
                     "failed_samples": len(self.errors)}
        if self.errors:
            out["first_error"] = self.errors[0]
        if rows:
            util, mem = [r[1] for r in rows], [r[2] for r in rows]
            out.update(utilization_mean=statistics.fmean(util), utilization_median=statistics.median(util),
                       utilization_min=min(util), utilization_max=max(util),
                       memory_used_mib_mean=statistics.fmean(mem), memory_used_mib_max=max(mem))
        return out


# --------------------------------------------------------------------------- inputs

def _write_one_shard(job: tuple) -> None:
    folder, index, count, seconds = job
    write_tar_shards(folder, 1, count, seed=index, name=f"bench{index:04d}", formats=FORMATS, rates=RATES,
                     channels=CHANNELS, min_seconds=seconds, max_seconds=seconds)


def make_shards(folder: Path, files: int, shards: int, seconds: float) -> dict:
    """`files` FLAC files of `seconds` each in `shards` tars (generated in parallel, reused when the
    folder already holds the same specification)."""
    spec = {"files": files, "shards": shards, "seconds": seconds, "formats": FORMATS, "rates": RATES,
            "channels": CHANNELS, "generator": "wds_encode.synth.write_tar_shards, seed = shard index"}
    marker = folder / "spec.json"
    started = time.perf_counter()
    reused = marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec))
    if not reused:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        counts = [files // shards + (1 if i < files % shards else 0) for i in range(shards)]
        jobs = [(folder, i, n, seconds) for i, n in enumerate(counts) if n > 0]
        processes = max(1, min(len(jobs), int(available_cpus())))
        if processes == 1:
            for job in jobs:
                _write_one_shard(job)
        else:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                pool.map(_write_one_shard, jobs)
        marker.write_text(json.dumps(spec))
    tars = sorted(folder.glob("*.tar"))
    return {**spec, "tars": len(tars), "bytes": sum(p.stat().st_size for p in tars),
            "audio_seconds": files * seconds, "generate_seconds": round(time.perf_counter() - started, 2),
            "reused": reused}


def same_config(name: str, tiny: bool = False) -> dict:
    """The model config of SAME-S / SAME-L at full size (`configs/same_*_shape.json`), or, `tiny`, the
    same structure (patches of 256 samples, one stride-16 stage, chunked attention with the mid-point
    shift / a sliding window, differential attention, DyT) at width 48, 2 layers and 16 latent channels,
    for tests."""
    config = json.loads(SAME_SHAPES[name].read_text())
    if tiny:
        for part in ("encoder", "decoder"):
            cfg = config["model"][part]["config"]
            cfg.update(channels=TINY_SAME["channels"], dim_heads=TINY_SAME["dim_heads"],
                       transformer_depths=[TINY_SAME["depth"]], latent_dim=TINY_SAME["latent_dim"])
            if "sinusoidal_blocks" in cfg:
                cfg["sinusoidal_blocks"] = [1]
        config["model"]["latent_dim"] = TINY_SAME["latent_dim"]
        config["model"]["bottleneck"]["config"]["dim"] = TINY_SAME["latent_dim"]
    return config


def same_state_dict(config: dict, seed: int = 0) -> dict:
    """Seeded random encoder + bottleneck weights for a SAME config, in SA3's key layout (convolutions as
    plain `weight`, which wds-encode loads as it loads folded weight norm). Scaled so that activations
    stay O(1) through every layer (linear weights ~ N(0, 1/fan_in), residual outputs further / sqrt(2 depth),
    DyT near identity-like gains, learned new tokens ~ N(0, 1)): the latents depend on the input and stay
    finite in bf16 and fp16, as a trained model's do. The rotary frequencies are the standard ones.

    Tuned so that the latents depend on the input as a trained model's do (otherwise the learned new
    tokens, identical for every frame, dominate them and wds-encode's precision check, which measures
    errors against the latents' variation in time, fails on rounding): the input mapping amplifies audio
    (about -20 dBFS) to O(1) tokens, the new tokens start small, and the query/key norms are sharp so
    that the two softmaxes of differential attention do not cancel (as the golden models' are)."""
    model = build_autoencoder(config)
    gen = torch.Generator().manual_seed(seed)
    depth = max(block.depth for block in model.encoder.blocks())
    out: dict[str, torch.Tensor] = {}
    for key, ref in sorted(model.state_dict().items()):
        shape = tuple(ref.shape)
        if key.endswith(".inv_freq") or key.endswith("noise_scaling_factor"):
            out[key] = ref.clone()
        elif key.endswith(".weight") and ref.dim() >= 2:
            fan_in = math.prod(shape[1:])
            scale = 1.0 / math.sqrt(fan_in)
            if key.endswith("self_attn.to_out.weight") or key.endswith("ff.ff.2.weight"):
                scale /= math.sqrt(2 * depth)
            elif ".mapping." in key:
                scale *= 10.0   # audio of std ~0.1 -> tokens of std ~1
            out[key] = scale * torch.randn(shape, generator=gen)
        elif key.endswith(".alpha"):
            sharp = "q_norm" in key or "k_norm" in key
            out[key] = (3.0 if sharp else 1.0) + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".gamma"):
            sharp = "q_norm" in key or "k_norm" in key
            out[key] = (2.0 if sharp else 1.0) + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("scaling_factor"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".beta") or key.endswith(".bias"):
            out[key] = 0.01 * torch.randn(shape, generator=gen)
        elif key.endswith("new_tokens"):
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("running_std"):
            out[key] = torch.ones(shape)
        else:
            raise AssertionError(f"unexpected SAME tensor {key} {shape}")
    return out


def model_files(name: str, folder: Path, tiny: bool = False) -> tuple[Path, Path, dict]:
    """(config path, checkpoint, config) of the bundled demo model, of the SAO VAE, or of SAME-S / SAME-L
    (full size, or `tiny`) with seeded weights; reused from `folder` when it holds the same config."""
    if name == "demo":
        config_path, ckpt = demo_model_paths()
        return config_path, ckpt, json.loads(config_path.read_text())
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    if name in SAME_SHAPES:
        config = same_config(name, tiny)
        stem = f"{name}{'_tiny' if tiny else ''}"
        config_path, ckpt = folder / f"{stem}_config.json", folder / f"{stem}.safetensors"
        if not (ckpt.is_file() and config_path.is_file() and json.loads(config_path.read_text()) == config):
            ckpt.unlink(missing_ok=True)
            save_file(same_state_dict(config), str(ckpt))
            config_path.write_text(json.dumps(config, indent=1))
        return config_path, ckpt, config
    config_path, ckpt = folder / "sao_vae_config.json", folder / "sao_vae.safetensors"
    if not (ckpt.is_file() and config_path.is_file() and json.loads(config_path.read_text()) == SAO_VAE):
        state = {k: v for k, v in demo_state_dict(SAO_VAE).items() if not k.startswith("decoder.")}
        save_file(state, str(ckpt))
        config_path.write_text(json.dumps(SAO_VAE))
    return config_path, ckpt, SAO_VAE


def write_dataset_config(path: Path, shards_dir: Path, repeats: int = 1) -> Path:
    """A wds dataset config over the shards; `repeats` > 1 lists them again under other dataset ids,
    so the run reads (and encodes) every shard that many times."""
    datasets = [{"id": f"bench{r}", "path": str(shards_dir)} for r in range(repeats)]
    path.write_text(json.dumps({"dataset_type": "wds", "random_crop": False, "datasets": datasets}))
    return path


# --------------------------------------------------------------------------- FLOPs, model FLOPs utilisation

def parse_peak_override(text: Optional[str]) -> dict:
    """--peak-tflops: one number for every precision ("989"), or per precision ("bf16=989,fp32=67")."""
    if not text:
        return {}
    if "=" not in text:
        return {"*": float(text)}
    out = {}
    for item in text.split(","):
        precision, _, value = item.partition("=")
        out[precision.strip()] = float(value)
    return out


def gpu_peak_tflops(device_name: str, precision: str,
                    override: Optional[dict] = None) -> tuple[Optional[float], str]:
    """(dense peak TFLOP/s of this GPU in `precision`, where the figure comes from); (None, why) when
    unknown: the --peak-tflops override first, then GPU_PEAK_TFLOPS by the device name."""
    override = override or {}
    if precision in override or "*" in override:
        return override.get(precision, override.get("*")), "--peak-tflops"
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(precision), f"data sheet, dense: {pattern}"
    return None, f"no peak known for {device_name!r}: give --peak-tflops"


def flops_figures(flops_per_window: Optional[float], windows_per_second: float,
                  peak_tflops: Optional[float]) -> dict:
    """Achieved FLOP/s of a measured rate of windows, and its share of the peak (MFU) when one is known."""
    if not flops_per_window:
        return {"flops_per_window": None, "achieved_gflops": None, "mfu": None}
    achieved = flops_per_window * windows_per_second
    return {"flops_per_window": flops_per_window, "achieved_gflops": achieved / 1e9,
            "mfu": achieved / (peak_tflops * 1e12) if peak_tflops else None}


def model_shape(model, sample_size: int) -> dict:
    """What the benchmark ran: the encoder's structure and parameter count, and, for an encoder that
    counts its FLOPs (SAME: `SAMEEncoder.flops`), the FLOPs of one window and per audio second."""
    encoder = model.encoder
    shape = {"encoder": type(encoder).__name__,
             "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
             "sample_rate": model.sample_rate, "audio_channels": model.in_channels,
             "latent_dim": model.latent_dim, "downsampling_ratio": model.downsampling_ratio}
    blocks = encoder.blocks() if hasattr(encoder, "blocks") else []
    if blocks:
        shape["blocks"] = [{"in_channels": b.in_channels, "width": b.dim, "stride": b.stride,
                            "depth": b.depth,
                            "heads": b.transformers[0].self_attn.num_heads if b.depth else 0,
                            "dim_heads": b.transformers[0].self_attn.dim_heads if b.depth else 0,
                            "ff_inner": b.transformers[0].ff.ff[2].in_features if b.depth else 0,
                            "attention": (f"sliding window {list(b.window)} tokens" if b.window is not None
                                          else f"chunks of {b.effective_chunk} tokens"
                                          + (", mid-point shift" if b.chunk_midpoint_shift else "")),
                            "sequence_tokens_per_window":
                                b.sequence_length(-(-sample_size // encoder.patch_size))}
                           for b in blocks]
        shape["patch_size"] = encoder.patch_size
    flops = getattr(encoder, "flops", None)
    if flops is not None:
        window_seconds = sample_size / model.sample_rate
        long = math.ceil(3600 * model.sample_rate / model.downsampling_ratio) * model.downsampling_ratio  # 1 h
        shape.update(flops_per_window=flops(sample_size),
                     latent_frames_per_window=encoder.output_length(sample_size),
                     flops_per_audio_second=flops(sample_size) / window_seconds,
                     # of an hour-long window: without the padding to whole chunks a short one may need
                     flops_per_audio_second_long=flops(long) / (long / model.sample_rate),
                     flops_counted_by=f"{type(encoder).__name__}.flops: 2 x multiply-adds of every linear "
                                      "layer and of attention over the keys each query sees")
    else:
        shape["flops_per_window"] = None
    return shape


# --------------------------------------------------------------------------- (1) encoder alone

def encoder_mode_options(mode: str, device: torch.device) -> tuple[bool, bool]:
    """(compile, channels_last) of an encoder-alone mode: `eager` is the model as written (channels
    first, no compile); `compiled` uses the layout wds-encode uses on this device by default."""
    default_layout = use_channels_last(None, device)
    return {"eager": (False, False), "channels-last": (False, True), "compiled": (True, default_layout)}[mode]


def measure_encoder(model_config: dict, ckpt: Path, *, device: torch.device, precision: str, mode: str,
                    batch_size: int, sample_size: int, min_seconds: float, min_batches: int = 3,
                    peak_tflops: Optional[float] = None, precision_check: bool = False) -> dict:
    """The encoder alone on one device-resident batch, submitted again and again two deep (submit the
    next, then collect the last: the device always has queued work). Warm-up (two batches; with
    compile, the first one compiles) is timed apart. For an encoder that counts its FLOPs (SAME), the
    achieved GFLOP/s and, with a peak, the model FLOPs utilisation. `precision_check`: first run
    wds-encode's check of a low precision against fp32 (as a run does at start) and record it."""
    compile, channels_last = encoder_mode_options(mode, device)
    model = load_autoencoder(model_config, ckpt)
    sample_rate = model.sample_rate
    flops = getattr(model.encoder, "flops", None)
    flops_per_window = flops(sample_size) if flops is not None else None
    encoder = BatchEncoder(model, device=device, precision=precision, latent_mode="sample", seed=0,
                           compile=compile, channels_last=channels_last)
    check = None
    if precision_check and precision != "fp32":
        try:
            check = encoder.check_precision(sample_size)
        except PrecisionMismatch as exc:
            check = {**exc.check, "message": str(exc)}
    audio = (0.1 * torch.randn(batch_size, model.in_channels, sample_size,
                               generator=torch.Generator().manual_seed(0))).to(device)
    masks = torch.ones(batch_size, sample_size, dtype=torch.bool)
    keys = [f"bench/k{i}" for i in range(batch_size)]
    started = time.perf_counter()
    encoder.encode(audio, masks, keys)
    synchronize(device)
    first = time.perf_counter() - started
    encoder.encode(audio, masks, keys)
    synchronize(device)
    warmup = time.perf_counter() - started
    batches, pending = 0, None
    cpu_started = cpu_seconds()[0]
    started = time.perf_counter()
    done_at = [started]  # when each batch's latents were back on the host
    while True:
        submitted = encoder.submit(audio, masks, keys)
        if pending is not None:
            encoder.collect(pending)
            batches += 1
            done_at.append(time.perf_counter())
        pending = submitted
        if batches + 1 >= min_batches and time.perf_counter() - started >= min_seconds:
            break
    encoder.collect(pending)
    batches += 1
    synchronize(device)
    done_at.append(time.perf_counter())
    seconds = done_at[-1] - started
    # CPU time of this process over the timed batches: on a shared CPU, how many cores the encoder got
    cpu_used = cpu_seconds()[0] - cpu_started
    windows = batches * batch_size
    audio_seconds = windows * sample_size / sample_rate
    batch_audio = batch_size * sample_size / sample_rate
    median_batch = statistics.median(b - a for a, b in zip(done_at, done_at[1:]))
    row = {"precision": precision, "mode": mode, "compiled": encoder.compiled, "channels_last": channels_last,
           "compile_error": encoder.compile_error, "batch_size": batch_size, "batches": batches,
           "windows": windows, "audio_seconds": audio_seconds, "seconds": seconds,
           "warmup_seconds": warmup, "first_batch_seconds": first,
           "windows_per_second": windows / seconds, "realtime": audio_seconds / seconds,
           "median_batch_seconds": median_batch, "realtime_of_median_batch": batch_audio / median_batch,
           **flops_figures(flops_per_window, windows / seconds, peak_tflops), "peak_tflops": peak_tflops,
           "precision_check": check, "cpu_seconds": cpu_used, "cores_used": cpu_used / seconds,
           # audio seconds per CPU second of this process (threads that wait spin, so a lower bound)
           "realtime_per_cpu_second": audio_seconds / cpu_used if cpu_used > 0 else None,
           "fp32_retries": encoder.retries, "torch_threads": torch.get_num_threads()}
    del encoder, model, audio
    if compile:
        torch._dynamo.reset()  # the next compiled part starts as a fresh process would (on-disk caches aside)
    release_memory(device)
    return row


# --------------------------------------------------------------------------- (2) data path alone

class WorkerSplit:
    """Unit indices for the DataLoader worker iterating it: every num_workers-th one (a static split,
    as webdataset's split_by_worker; wds-encode itself claims units dynamically from the job's store)."""

    def __init__(self, units: int):
        self.units = units

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(range(worker, self.units, workers))


def _read_windows(shards: list, options: ReaderOptions, workers: int) -> dict:
    reader = Reader(shards, options, WorkerSplit(len(shards)))
    loader = DataLoader(reader, batch_size=None, num_workers=workers, in_order=False,
                        prefetch_factor=4 if workers else None)
    threads = torch.get_num_threads()
    own0, kids0 = cpu_seconds()
    windows, samples, errors, audio = 0, 0, 0, 0.0
    started = time.perf_counter()
    for item in loader:
        if isinstance(item, WindowItem):
            windows += 1
            audio += item.metadata["valid_length"] / options.sample_rate
        elif isinstance(item, ShardEnd):
            samples += item.samples
            errors += sum(1 for e in item.errors if e["level"] == "error")
    seconds = time.perf_counter() - started
    del loader  # the workers exit (and their CPU time is counted) here
    gc.collect()
    torch.set_num_threads(threads)  # the Reader sets 1 thread in whatever process iterates it
    own1, kids1 = cpu_seconds()
    return {"units": len(shards), "samples": samples, "windows": windows, "errors": errors,
            "audio_seconds": audio, "seconds": seconds, "cpu_seconds": (own1 - own0) + (kids1 - kids0)}


def measure_data_path(dataset_config: Path, *, sample_rate: int, channels: int, sample_size: int,
                      workers: int, min_seconds: float) -> dict:
    """Reader over the shards in a DataLoader with `workers` processes (0: in this process), no model.
    A first pass over the shards; if it took less than `min_seconds`, a measured pass over the shards
    repeated enough times to last about that long."""
    shards = list_shards(load_dataset_config(dataset_config))
    options = ReaderOptions(sample_rate=sample_rate, channels=channels, sample_size=sample_size,
                            chunking="crop")
    result = _read_windows(shards, options, workers)
    passes = 1
    if 0 < result["seconds"] < min_seconds:
        passes = math.ceil(min_seconds / result["seconds"])
        result = _read_windows(shards * passes, options, workers)
    cpus_used = max(1, workers)
    realtime = result["audio_seconds"] / result["seconds"]
    return {**result, "passes": passes, "workers": workers, "cpus_used": cpus_used,
            "realtime": realtime, "realtime_per_cpu": realtime / cpus_used,
            "realtime_per_cpu_second": result["audio_seconds"] / result["cpu_seconds"]
            if result["cpu_seconds"] > 0 else None,
            "note": "realtime_per_cpu: wall-clock throughput / decode processes; realtime_per_cpu_second: "
                    "audio seconds per CPU second used by the workers and this process (insensitive to "
                    "other load)"}


# --------------------------------------------------------------------------- (3) end to end

def measure_end_to_end(config_path: Path, ckpt: Path, *, shards_dir: Path, workdir: Path, precision: str,
                       args: argparse.Namespace, device: torch.device, expected_realtime: Optional[float],
                       dataset_audio: float, window_seconds: float, flops_per_window: Optional[float] = None,
                       peak_tflops: Optional[float] = None) -> dict:
    """`wds_encode.runner.run` on the shards (repeated as needed), steady-state throughput (and, for an
    encoder that counts its FLOPs, the achieved GFLOP/s and MFU of the steady state)."""
    compile_option = {"auto": None, "on": True, "off": False}[args.compile]
    layout_option = {"auto": None, "on": True, "off": False}[args.channels_last]
    # enough audio for the steady state at the encoder's measured speed (+25%), and at least 3 batches
    steady_target = 1.25 * args.min_steady_seconds + (2 if args.min_steady_seconds > 0 else 0)
    needed_audio = 3 * args.batch_size * window_seconds + (expected_realtime or 0.0) * steady_target
    repeats = max(1, math.ceil(needed_audio / dataset_audio))
    attempts = []
    for attempt in range(3):
        dataset_config = write_dataset_config(workdir / f"dataset-e2e-{precision}.json", shards_dir, repeats)
        out = workdir / f"out-e2e-{precision}"
        config = EncodeConfig(model_config=config_path, ckpt_path=ckpt, dataset_config=dataset_config,
                              output_path=str(out), batch_size=args.batch_size, sample_size=args.sample_size,
                              num_workers=args.num_workers, precision=precision, device=args.device,
                              compile=compile_option, channels_last=layout_option, overwrite=True,
                              progress=False, devices="1")
        sampler = GpuSampler(nvidia_smi_id(device)) if device.type == "cuda" else None
        if sampler is not None:
            sampler.start()
        meter = MachineMeter()
        called = time.time()
        try:
            stats = run(config)
        finally:
            if sampler is not None:
                sampler.stop()
        returned = time.time()
        machine = meter.stop()
        shutil.rmtree(out, ignore_errors=True)
        attempts.append({"repeats": repeats, "windows": stats.windows,
                         "steady_seconds": stats.steady_seconds})
        if stats.steady_seconds >= args.min_steady_seconds and stats.steady_seconds > 0 or attempt == 2:
            break
        # too short: read the shards more times, in proportion (at least twice as many)
        measured = max(stats.steady_seconds, 0.1 * steady_target, 1e-3)
        repeats = max(2 * repeats, math.ceil(repeats * steady_target / measured))
    # where the steady state lay on the clock (run() starts its clock when called; the loop ends
    # `elapsed - loop` later): used to pick the GPU samples of the steady state
    loop_end = called + stats.elapsed_seconds
    steady_start = loop_end - stats.loop_seconds + stats.warmup_seconds
    steady_end = steady_start + stats.steady_seconds
    realtime = stats.steady_audio_seconds / stats.steady_seconds if stats.steady_seconds > 0 else 0.0
    row = {"precision": precision, "compile": args.compile, "compiled": stats.compiled,
           "channels_last": stats.channels_last, "batch_size": stats.batch_size,
           "num_workers": args.num_workers, "cpus": stats.cpus, "repeats": repeats, "attempts": attempts,
           "units": stats.units_done, "windows": stats.windows, "errors": stats.errors,
           "audio_seconds": stats.audio_seconds, "elapsed_seconds": stats.elapsed_seconds,
           "loop_seconds": stats.loop_seconds, "warmup_seconds": stats.warmup_seconds,
           "steady_seconds": stats.steady_seconds, "steady_audio_seconds": stats.steady_audio_seconds,
           "realtime": realtime, "windows_per_second": realtime / window_seconds,
           "realtime_with_startup": stats.audio_seconds / (returned - called),
           "steady_ok": stats.steady_seconds >= args.min_steady_seconds,
           # a smaller last batch is a new shape: compiled, it compiles again, inside the steady state
           "last_batch_partial": stats.windows % max(1, stats.batch_size) != 0,
           "fp32_retries": stats.fp32_retries, "precision_check": stats.precision_check or None,
           **flops_figures(flops_per_window, realtime / window_seconds, peak_tflops),
           "peak_tflops": peak_tflops,
           "machine": machine}
    if sampler is not None:
        row["gpu_utilisation"] = {"run": sampler.summary(),
                                  "steady": sampler.summary(steady_start, steady_end),
                                  "note": "steady: samples between the first and the last batch written "
                                          "(placed from RunStats' times, within about a second)"}
    else:
        row["gpu_utilisation"] = {"skipped": f"device is {device.type}, not a GPU"}
    release_memory(device)
    return row


# --------------------------------------------------------------------------- (4) the seed's approach

def _tar_samples(path: Path):
    """(key, {extension: bytes}) per sample of a tar, members grouped by key as webdataset does."""
    with tarfile.open(path) as tar:
        key, group = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            data = tar.extractfile(member).read()
            if stem != key and group:
                yield key, group
                group = {}
            key = stem
            group[ext] = data
        if group:
            yield key, group


class SeedDataset(IterableDataset):
    """The seed's dataset as pre_encode.py used it: each worker takes every n-th shard; per sample the
    whole file is decoded (soundfile), resampled by a `torchaudio.transforms.Resample` built for that
    file when its rate differs, made stereo/mono, then cropped from the start or zero-padded to
    `sample_size` (PadCrop_Normalized_T without randomisation)."""

    def __init__(self, tars: list[Path], sample_rate: int, channels: int, sample_size: int):
        super().__init__()
        self.tars, self.sample_rate = tars, sample_rate
        self.channels, self.sample_size = channels, sample_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for path in self.tars[worker::workers]:
            for key, group in _tar_samples(path):
                yield self.prepare(path, key, group)

    def prepare(self, path: Path, key: str, group: dict) -> tuple[torch.Tensor, dict]:
        import soundfile
        import torchaudio
        ext = next(e for e in group if e.rsplit(".", 1)[-1].lower() in AUDIO_SUFFIXES)
        decoded, rate = soundfile.read(io.BytesIO(group[ext]), dtype="float32", always_2d=True)
        audio = torch.from_numpy(np.ascontiguousarray(decoded.T))
        if rate != self.sample_rate:
            audio = torchaudio.transforms.Resample(rate, self.sample_rate)(audio)
        if self.channels == 1:
            audio = audio.mean(0, keepdim=True)
        elif audio.shape[0] == 1:
            audio = audio.repeat(self.channels, 1)
        elif audio.shape[0] > self.channels:
            audio = audio[:self.channels]
        n = audio.shape[-1]
        size = self.sample_size
        upper = max(0, n - size)
        chunk = audio.new_zeros((audio.shape[0], size))
        chunk[:, :min(n, size)] = audio[:, :size]
        padding_mask = torch.zeros(size)
        padding_mask[:min(n, size)] = 1
        metadata = json.loads(group["json"]) if "json" in group else {}
        metadata.update({"path": f"{path}#{key}.{ext}", "__key__": key,
                         "timestamps": (0.0, size / (upper + size)), "seconds_start": 0,
                         "seconds_total": math.ceil(n / self.sample_rate), "padding_mask": padding_mask})
        return chunk, metadata


def seed_collate(samples: list) -> list:
    """stable-audio-tools' collation_fn: tensors stacked, everything else kept as a tuple."""
    out = []
    for column in zip(*samples):
        out.append(torch.stack(column) if isinstance(column[0], torch.Tensor) else column)
    return out


def measure_seed_baseline(model_config: dict, ckpt: Path, *, tars: list[Path], workdir: Path,
                          device: torch.device, precision: str, sample_size: int, workers: int,
                          min_seconds: float) -> dict:
    """pre_encode.py's loop over the shards (one pass at most), timed from the end of its first batch
    until `min_seconds` have passed (at least two batches) or the data runs out."""
    model = load_autoencoder(model_config, ckpt).to(device).eval()
    if precision != "fp32":  # the seed: model.half() for --model-half (bf16 is not one of its options)
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    out = workdir / f"baseline-{precision}" / "0"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.mkdir(parents=True)
    loader = DataLoader(SeedDataset(tars, model.sample_rate, model.in_channels, sample_size),
                        batch_size=SEED_BATCH_SIZE, num_workers=workers, collate_fn=seed_collate)
    started = time.perf_counter()
    timed_from, windows, audio_seconds, warmup = None, 0, 0.0, 0.0
    for batch_idx, (audio, metadata) in enumerate(loader):
        audio = audio.to(device)
        with torch.no_grad():
            latents = model.encode(audio)
        latents = latents.float().cpu().numpy() if precision == "bf16" else latents.cpu().numpy()
        for i, latent in enumerate(latents):
            latent_id = f"{0:03d}{batch_idx:06d}{i:04d}"
            with open(out / f"{latent_id}.npy", "wb") as f:
                np.save(f, latent)
            md = dict(metadata[i])
            valid = float(md["padding_mask"].sum())
            mask = F.interpolate(md["padding_mask"][None, None].float(), size=latents.shape[2],
                                 mode="nearest")
            md["padding_mask"] = mask.squeeze().int().cpu().numpy().tolist()
            for k, v in md.items():
                if isinstance(v, torch.Tensor):
                    md[k] = v.cpu().numpy().tolist()
            with open(out / f"{latent_id}.json", "w") as f:
                json.dump(md, f)
            if timed_from is not None:
                windows += 1
                audio_seconds += valid / model.sample_rate
        gc.collect()
        torch.cuda.empty_cache()
        now = time.perf_counter()
        if timed_from is None:
            timed_from, warmup = now, now - started
        elif windows >= 2 * SEED_BATCH_SIZE and now - timed_from >= min_seconds:
            break
    seconds = time.perf_counter() - timed_from if timed_from is not None else 0.0
    del loader, model
    shutil.rmtree(out.parent, ignore_errors=True)
    release_memory(device)
    return {"precision": precision, "batch_size": SEED_BATCH_SIZE, "num_workers": workers, "windows": windows,
            "audio_seconds": audio_seconds, "seconds": seconds, "warmup_seconds": warmup,
            "realtime": audio_seconds / seconds if seconds > 0 else 0.0,
            "windows_per_second": windows / seconds if seconds > 0 else 0.0,
            "torch_threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_fresh_process(function, *args, **kwargs):
    """function(*args, **kwargs) in a new interpreter (spawned, not forked: nothing of this process's
    state, such as torch settings or the allocator's, carries over); returns its result."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


# --------------------------------------------------------------------------- (5) chunking modes

def make_mixed_shards(folder: Path, lengths: list[float]) -> dict:
    """One FLAC file per length (one tar each), reused when the folder holds the same lengths."""
    spec = {"lengths": lengths, "formats": FORMATS, "rates": RATES, "channels": CHANNELS}
    marker = folder / "spec.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec))):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, seconds in enumerate(lengths):
            write_tar_shards(folder, 1, 1, seed=i, name=f"mixed{i:03d}", formats=FORMATS, rates=RATES,
                             channels=CHANNELS, min_seconds=seconds, max_seconds=seconds)
        marker.write_text(json.dumps(spec))
    tars = sorted(folder.glob("*.tar"))
    return {**spec, "files": len(lengths), "audio_seconds": sum(lengths),
            "bytes": sum(p.stat().st_size for p in tars)}


def run_with_peak(config: EncodeConfig):
    """(runner.run's stats, this process's peak RSS in MB from VmHWM, where the kernel has it)."""
    stats = run(config)
    try:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        peak = None
    return stats, peak


def measure_chunking(config_path: Path, ckpt: Path, *, shards_dir: Path, workdir: Path, precision: str,
                     args: argparse.Namespace, sample_rate: int) -> list[dict]:
    """wds-encode end to end with --chunking crop, split and full on files of mixed lengths: the
    padding each mode encodes, and its throughput (real audio, and all samples encoded, per second)."""
    dataset_config = write_dataset_config(workdir / "dataset-mixed.json", shards_dir)
    rows = []
    runs = [("crop", None), ("split", None)] + [("full", seconds) for seconds in args.max_seconds]
    for mode, max_seconds in runs:
        out = workdir / f"out-chunking-{mode}"
        config = EncodeConfig(model_config=config_path, ckpt_path=ckpt, dataset_config=dataset_config,
                              output_path=str(out), batch_size=args.batch_size, sample_size=args.sample_size,
                              num_workers=args.num_workers, precision=precision, device=args.device, chunking=mode,
                              max_seconds=max_seconds or 300.0, overwrite=True, progress=False, devices="1")
        meter = MachineMeter()
        stats, peak_mb = in_fresh_process(run_with_peak, config)   # a run of its own, as a user would start it
        shutil.rmtree(out, ignore_errors=True)
        seconds = stats.loop_seconds
        rows.append({"chunking": mode, "max_seconds": max_seconds, "precision": precision, "windows": stats.windows,
                     "batches": stats.batches, "peak_rss_mb": peak_mb,
                     "audio_seconds": stats.audio_seconds, "real_samples": stats.real_samples,
                     "padding_samples": stats.padding_samples, "padding_overhead": stats.padding_overhead,
                     "loop_seconds": seconds, "warmup_seconds": stats.warmup_seconds,
                     "realtime": stats.audio_seconds / seconds if seconds > 0 else 0.0,
                     "encoded_realtime": (stats.real_samples + stats.padding_samples) / sample_rate / seconds
                     if seconds > 0 else 0.0,
                     "machine": meter.stop()})
    return rows


# --------------------------------------------------------------------------- ratios and report

def compute_ratios(results: dict) -> dict:
    """Per precision: channels-last / eager and compiled / eager encoder, end to end / encoder alone (in
    the mode end to end ran, and against each mode), end to end / baseline. Missing parts give None."""
    def rt(rows, **match):
        for row in rows or []:
            if all(row.get(k) == v for k, v in match.items()):
                return row["realtime"]
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    encoder, e2e, baseline = results.get("encoder_alone"), results.get("end_to_end"), results.get("baseline")
    out = {}
    for precision in results["params"]["precisions"]:
        eager, layout, compiled = (rt(encoder, precision=precision, mode=mode) for mode in ENCODER_MODES)
        whole = rt(e2e, precision=precision)
        ran = next((r for r in e2e or [] if r["precision"] == precision), {})
        same_mode = compiled if ran.get("compiled") else layout if ran.get("channels_last") else eager
        out[precision] = {
            "encoder_channels_last_over_eager": ratio(layout, eager),
            "encoder_compiled_over_eager": ratio(compiled, eager),
            "end_to_end_over_encoder": ratio(whole, same_mode),
            "end_to_end_over_encoder_eager": ratio(whole, eager),
            "end_to_end_over_encoder_channels_last": ratio(whole, layout),
            "end_to_end_over_encoder_compiled": ratio(whole, compiled),
            "end_to_end_over_baseline": ratio(whole, rt(baseline, precision=precision)),
        }
    return out


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _others(row: dict) -> str:
    """`; others 0.31 cores`: what other processes used of the machine meanwhile, when it was measurable."""
    cores = row.get("machine", {}).get("others_cores")
    return "" if cores is None else f"; others {cores:.2f} cores"


def _compute(row: dict) -> str:
    """`, 123.4 GFLOP/s (41.2% MFU)` for a row of an encoder that counts its FLOPs; "" otherwise."""
    if not row.get("achieved_gflops"):
        return ""
    mfu = f" ({100 * row['mfu']:.1f}% of {row['peak_tflops']:g} TFLOP/s)" if row.get("mfu") is not None else ""
    return f", {row['achieved_gflops']:.4g} GFLOP/s{mfu}"


def report(results: dict) -> str:
    """The human-readable summary, and table rows for the README's throughput section."""
    lines = [f"{results['device']} | {results['model']} | sample size {results['params']['sample_size']} | "
             f"batch size {results['params']['batch_size']} | {results['cpus_available']:g} CPUs | "
             f"load {results['load_average_start']} -> {results['load_average_end']}"]
    shape = results.get("model_shape") or {}
    if shape.get("flops_per_window"):
        lines.append(f"model: {shape['encoder']} {shape['encoder_parameters'] / 1e6:.1f} M parameters, "
                     f"{shape['flops_per_window'] / 1e9:.4g} GFLOP per window, "
                     f"{shape['flops_per_audio_second'] / 1e9:.4g} GFLOP per audio second "
                     f"({shape['flops_per_audio_second_long'] / 1e9:.4g} in an hour-long window)")
    data = results.get("data_path")
    if data:
        lines.append(f"data path: {data['realtime']:.0f}x real time with {data['workers']} worker(s), "
                     f"{data['realtime_per_cpu']:.0f}x per core "
                     f"({data['realtime_per_cpu_second']:.0f}x per CPU second), {data['windows']} windows"
                     f"{_others(data)}")
    for row in results.get("encoder_alone") or []:
        lines.append(f"encoder alone {row['precision']} {row['mode']}: {row['realtime']:.2f}x real time, "
                     f"{row['windows_per_second']:.3f} windows/s{_compute(row)} "
                     f"(warm-up {row['warmup_seconds']:.1f} s"
                     + ("; compile FAILED, ran eagerly" if row["mode"] == "compiled" and not row["compiled"] else "")
                     + (f"; {row['cores_used']:.2f} cores used" if row.get("cores_used") is not None else "")
                     + f"{_others(row)})")
    for row in results.get("end_to_end") or []:
        gpu = row["gpu_utilisation"].get("steady", {})
        util = f", GPU {gpu['utilization_mean']:.0f}% busy" if "utilization_mean" in gpu else ""
        ran = ", ".join(["channels-last"] * row["channels_last"] + ["compiled"] * row["compiled"]) or "eager"
        lines.append(f"end to end {row['precision']} ({ran}): "
                     f"{row['realtime']:.2f}x real time in steady state{_compute(row)} "
                     f"({row['steady_seconds']:.1f} s, "
                     f"{row['windows']} windows), warm-up {row['warmup_seconds']:.1f} s{util}{_others(row)}")
    for row in results.get("baseline") or []:
        lines.append(f"seed baseline {row['precision']}: {row['realtime']:.2f}x real time "
                     f"({row['windows']} windows in {row['seconds']:.1f} s, {row['num_workers']} workers"
                     f"{_others(row)})")
    for precision, r in results["ratios"].items():
        lines.append(f"ratios {precision}: channels-last/eager {_fmt(r['encoder_channels_last_over_eager'], 2)}, "
                     f"compiled/eager {_fmt(r['encoder_compiled_over_eager'], 2)}, "
                     f"end to end/encoder {_fmt(r['end_to_end_over_encoder'], 2)}, "
                     f"end to end/baseline {_fmt(r['end_to_end_over_baseline'], 2)}")
    for row in results.get("chunking") or []:
        label = row["chunking"] + (f" (max {row['max_seconds']:g} s)" if row.get("max_seconds") else "")
        lines.append(f"chunking {label:18s}: {row['windows']} windows, padding "
                     f"{100 * row['padding_overhead']:.1f}% of real samples, {row['realtime']:.2f}x real time "
                     f"({row['encoded_realtime']:.2f}x counting padding), peak RSS {_fmt(row['peak_rss_mb'], 0, ' MB')}"
                     f"{_others(row)}")
    rss = results["peak_rss_mb"]
    lines.append(f"peak RSS: {rss['self']:.0f} MB (this process, {rss['self_measures']}), "
                 f"{rss['children']:.0f} MB (largest child process)")
    lines.append("")
    lines.append("| precision | encoder alone, eager | encoder alone, channels-last | encoder alone, compiled "
                 "| end to end (steady) | end to end / encoder | seed baseline | end to end / baseline |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    by = {(r["precision"], r["mode"]): r["realtime"] for r in results.get("encoder_alone") or []}
    for precision, r in results["ratios"].items():
        e2e = next((x["realtime"] for x in results.get("end_to_end") or [] if x["precision"] == precision),
                   None)
        base = next((x["realtime"] for x in results.get("baseline") or [] if x["precision"] == precision),
                    None)
        lines.append(f"| {precision} | {_fmt(by.get((precision, 'eager')))} "
                     f"| {_fmt(by.get((precision, 'channels-last')))} "
                     f"| {_fmt(by.get((precision, 'compiled')))} "
                     f"| {_fmt(e2e)} | {_fmt(r['end_to_end_over_encoder'], 2, '')} | {_fmt(base)} "
                     f"| {_fmt(r['end_to_end_over_baseline'], 2, '')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sao", "demo", *SAME_SHAPES], default="sao",
                        help="sao: the Stable Audio Open VAE at full size (seeded weights); "
                             "demo: the bundled model; same_s / same_l: Stable Audio 3's SAME-S / SAME-L "
                             "autoencoders at full size (configs/same_*_shape.json, seeded weights)")
    parser.add_argument("--tiny", action="store_true",
                        help="same_s / same_l: the same structure at width 48, 2 layers (for tests)")
    parser.add_argument("--peak-tflops", default=None,
                        help="the GPU's dense peak for the model FLOPs utilisation: one number in TFLOP/s, or "
                             "per precision (bf16=989,fp32=67); default: a table of H100 / H200 / A100 peaks "
                             "by the device name")
    parser.add_argument("--files", type=int, default=96, help="audio files to generate")
    parser.add_argument("--shards", type=int, default=8, help="tar shards to spread them over")
    parser.add_argument("--seconds", type=float, default=None,
                        help="length of every file (default: one window, rounded up to a second)")
    parser.add_argument("--sample-size", type=int, default=None,
                        help=f"window length in samples (default: wds-encode's, {DEFAULT_SAMPLE_SIZE}; "
                             f"for SAME models {SAME_SAMPLE_SIZE}, 30.1 s, a multiple of their ratio 4096)")
    parser.add_argument("--batch-size", type=int, default=1, help="wds-encode's batch size (its default: 1)")
    parser.add_argument("--num-workers", type=int, default=4,
                        help="wds-encode's --num-workers (default 4; an upper bound, it plans fewer on "
                             "small machines)")
    parser.add_argument("--precisions", default=None,
                        help="comma list (default: fp32 on CPU, bf16,fp32 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile in the end-to-end part (auto: wds-encode's default)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="the channels-last layout in the end-to-end part (auto: wds-encode's default)")
    parser.add_argument("--min-steady-seconds", type=float, default=30.0,
                        help="end to end: read the shards enough times for this much steady state")
    parser.add_argument("--encoder-seconds", type=float, default=10.0,
                        help="timed seconds per encoder-alone figure")
    parser.add_argument("--data-seconds", type=float, default=5.0,
                        help="timed seconds (about) of the data path")
    parser.add_argument("--baseline-seconds", type=float, default=30.0,
                        help="timed seconds (at most one pass over the shards) of the seed baseline")
    parser.add_argument("--baseline-workers", type=int, default=SEED_NUM_WORKERS,
                        help="DataLoader workers of the seed baseline (pre_encode.py's default: 4)")
    parser.add_argument("--mixed-seconds", default="5,12,30,60,120,240,420,600",
                        help="chunking part: the lengths (s) of its files, one each (default: 5 s to 10 min)")
    parser.add_argument("--max-seconds", default="300,30",
                        help="chunking part: wds-encode's --max-seconds for --chunking full, a run per value")
    parser.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(PARTS)}")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where shards, model and outputs go (default: a new temporary folder); "
                             "shards and the model are reused from an earlier run with the same options")
    parser.add_argument("--json-out", type=Path, default=None, help="default: WORKDIR/benchmark.json")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        args.mixed_seconds = [float(v) for v in args.mixed_seconds.split(",") if v.strip()]
        args.max_seconds = [float(v) for v in args.max_seconds.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--mixed-seconds / --max-seconds: expected a comma list of seconds, got "
                     f"{args.mixed_seconds!r} / {args.max_seconds!r}")
    unknown = args.skip - set(PARTS)
    if unknown:
        parser.error(f"--skip: unknown part(s) {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    if args.files < 1 or args.shards < 1:
        parser.error("--files and --shards must be >= 1")
    if args.tiny and args.model not in SAME_SHAPES:
        parser.error(f"--tiny is for the SAME models ({', '.join(SAME_SHAPES)})")
    if args.sample_size is None:
        args.sample_size = SAME_SAMPLE_SIZE if args.model in SAME_SHAPES else DEFAULT_SAMPLE_SIZE
    try:
        args.peak_override = parse_peak_override(args.peak_tflops)
    except ValueError:
        parser.error(f"--peak-tflops: expected a number or precision=number pairs, got {args.peak_tflops!r}")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = rank_device(args.device)
    default_precisions = "bf16,fp32" if device.type == "cuda" else "fp32"
    precisions = [p.strip() for p in (args.precisions or default_precisions).split(",") if p.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="wds-encode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    json_out = args.json_out or work / "benchmark.json"
    torch_threads_default = torch.get_num_threads()
    cpus = available_cpus()
    plan = plan_cpus(max_workers=args.num_workers, device_type=device.type)
    load_start = load_average()

    config_path, ckpt, model_config = model_files(args.model, work / "model", tiny=args.tiny)
    sample_rate = int(model_config["sample_rate"])
    channels = int(model_config.get("audio_channels", 2))
    window_seconds = args.sample_size / sample_rate
    seconds = args.seconds or float(math.ceil(window_seconds))
    dataset = make_shards(work / "shards", args.files, args.shards, seconds)
    dataset["window_audio_seconds"] = args.files * min(seconds, window_seconds)
    print(f"dataset: {args.files} files x {seconds:g} s in {dataset['tars']} shards "
          f"({dataset['bytes'] / 1e6:.0f} MB, {'reused' if dataset['reused'] else 'generated'} "
          f"in {dataset['generate_seconds']:.1f} s)", flush=True)
    dataset_config = write_dataset_config(work / "dataset.json", work / "shards")

    results: dict = {
        "command": "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "argv": sys.argv if argv is None else [sys.argv[0], *argv],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})",
        "torch": torch.__version__, "python": platform.python_version(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "onednn_capped_off_amx": ONEDNN_CAPPED,
        "cpus_available": cpus, "cpu_plan": plan.describe(), "torch_threads_default": torch_threads_default,
        "model": args.model,
        "params": {**{k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                      for k, v in vars(args).items()},
                   "precisions": precisions, "seconds": seconds, "device_resolved": str(device),
                   "sample_rate": sample_rate, "window_seconds": window_seconds,
                   "seed_batch_size": SEED_BATCH_SIZE},
        "dataset": dataset,
        "load_average_start": load_start,
        "peak_rss_mb_setup": peak_rss_mb(),
        "peak_rss_mb_after": {},
    }
    results["model_config"] = str(config_path)
    results["model_shape"] = shape = model_shape(build_autoencoder(model_config), args.sample_size)
    flops_per_window = shape["flops_per_window"]
    # the dense peak per precision, for the model FLOPs utilisation (a GPU's; none on a CPU)
    peaks = {}
    for precision in precisions:
        if device.type == "cuda":
            value, source = gpu_peak_tflops(results["device"], precision, args.peak_override)
        elif precision in args.peak_override or "*" in args.peak_override:
            value, source = gpu_peak_tflops("", precision, args.peak_override)
        else:
            value, source = None, "CPU: achieved GFLOP/s only (no peak table for CPUs; --peak-tflops sets one)"
        peaks[precision] = {"tflops": value, "source": source}
    results["peak_tflops"] = peaks
    gc.collect()
    # as wds-encode does on a CPU (runner.run), before any part: the data path's workers inherit it
    results["heap_kept"] = keep_freed_memory() if device.type == "cpu" else False
    peak_reset = reset_peak_rss()  # from here on, the peaks are the parts' (when the kernel allows it)

    def part_done(name: str) -> None:
        results["peak_rss_mb_after"][name] = peak_rss_mb()

    if "data" not in args.skip:
        meter = MachineMeter()
        results["data_path"] = measure_data_path(dataset_config, sample_rate=sample_rate, channels=channels,
                                                 sample_size=args.sample_size, workers=plan.workers,
                                                 min_seconds=args.data_seconds)
        results["data_path"]["machine"] = meter.stop()
        part_done("data")
        print(f"data path: {results['data_path']['realtime_per_cpu']:.0f}x real time per core", flush=True)

    if "encoder" not in args.skip:
        torch.set_num_threads(plan.torch_threads)  # the threads end to end gives the encoder
        rows = []
        for precision in precisions:
            for mode in (m for m in ENCODER_MODES if m not in args.skip):
                meter = MachineMeter()
                rows.append(measure_encoder(model_config, ckpt, device=device, precision=precision,
                                            mode=mode, batch_size=args.batch_size,
                                            sample_size=args.sample_size, min_seconds=args.encoder_seconds,
                                            peak_tflops=peaks[precision]["tflops"],
                                            precision_check=not rows or rows[-1]["precision"] != precision))
                rows[-1]["machine"] = meter.stop()
                print(f"encoder alone {precision} {rows[-1]['mode']}: {rows[-1]['realtime']:.2f}x real time"
                      f"{_compute(rows[-1])} (warm-up {rows[-1]['warmup_seconds']:.1f} s)", flush=True)
        results["encoder_alone"] = rows
        part_done("encoder")

    if "e2e" not in args.skip:
        rows = []
        for precision in precisions:
            measured = [r["realtime"] for r in results.get("encoder_alone", [])
                        if r["precision"] == precision]
            rows.append(measure_end_to_end(config_path, ckpt, shards_dir=work / "shards", workdir=work,
                                           precision=precision, args=args, device=device,
                                           expected_realtime=max(measured) if measured else None,
                                           dataset_audio=dataset["window_audio_seconds"],
                                           window_seconds=window_seconds, flops_per_window=flops_per_window,
                                           peak_tflops=peaks[precision]["tflops"]))
            print(f"end to end {precision}: {rows[-1]['realtime']:.2f}x real time in steady state "
                  f"({rows[-1]['steady_seconds']:.1f} s; warm-up {rows[-1]['warmup_seconds']:.1f} s)",
                  flush=True)
        results["end_to_end"] = rows
        part_done("e2e")

    if "baseline" not in args.skip:
        # a fresh interpreter per precision, as the seed runs: torch's defaults (its thread count,
        # cudnn.benchmark off, TF32 on), glibc's default allocator (wds-encode keeps freed memory on a CPU)
        tars = sorted((work / "shards").glob("*.tar"))
        rows = []
        for precision in precisions:
            meter = MachineMeter()
            rows.append(in_fresh_process(measure_seed_baseline, model_config, ckpt, tars=tars, workdir=work,
                                         device=device, precision=precision, sample_size=args.sample_size,
                                         workers=args.baseline_workers, min_seconds=args.baseline_seconds))
            rows[-1].update(machine=meter.stop())
            print(f"seed baseline {precision}: {rows[-1]['realtime']:.2f}x real time", flush=True)
        results["baseline"] = rows
        part_done("baseline")

    if "chunking" not in args.skip:
        mixed = make_mixed_shards(work / "mixed", args.mixed_seconds)
        results["dataset"]["mixed"] = mixed
        results["chunking"] = measure_chunking(config_path, ckpt, shards_dir=work / "mixed", workdir=work,
                                               precision=precisions[-1], args=args, sample_rate=sample_rate)
        part_done("chunking")
        for row in results["chunking"]:
            print(f"chunking {row['chunking']} {row['max_seconds'] or ''}: "
                  f"padding {100 * row['padding_overhead']:.1f}%, {row['realtime']:.2f}x real time", flush=True)

    for part in ("encoder_alone", "data_path", "end_to_end", "baseline", "chunking"):
        results.setdefault(part, {"skipped": True})
    results["peak_rss_mb"] = {**peak_rss_mb(), "self_measures": "the parts, after setup" if peak_reset else
                              "the whole process, setup included (the peak could not be reset)"}
    results["load_average_end"] = load_average()
    present = {k: (None if isinstance(v, dict) and "skipped" in v else v) for k, v in results.items()}
    results["ratios"] = present["ratios"] = compute_ratios(present)
    text = report(present)
    print(text, flush=True)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {json_out}", flush=True)
    return results


if __name__ == "__main__":
    main()
