#!/usr/bin/env python3
"""Throughput of the whole pipeline against the encoder alone, on this machine.

Generates a dataset of real audio shards (FLAC/WAV, stereo, 44.1/48 kHz), builds an encoder with
seeded weights (the Stable Audio Open VAE at full size, or the small demo model), then for each
precision:
  1. encoder only: the same batches already on the device, timed with synchronisation;
  2. the real `wds-encode` pipeline (decode workers, batching, encoder, writer thread) on the shards.
Pipeline throughput / encoder-only throughput is how busy the pipeline keeps the device.

    python scripts/benchmark.py --model sao --files 96 --seconds 30 --batch-size 8 --num-workers 12
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.config import EncodeConfig  # noqa: E402
from wds_encode.encoder import BatchEncoder  # noqa: E402
from wds_encode.models import demo_model_paths  # noqa: E402
from wds_encode.models.demo_model import demo_state_dict  # noqa: E402
from wds_encode.models.reference_configs import STABLE_AUDIO_OPEN_VAE as SAO_VAE  # noqa: E402
from wds_encode.distributed import rank_device  # noqa: E402
from wds_encode.runner import run  # noqa: E402
from wds_encode.synth import write_tar_shards  # noqa: E402

def model_files(name: str, folder: Path) -> tuple[Path, Path, dict]:
    if name == "demo":
        config_path, ckpt = demo_model_paths()
        return config_path, ckpt, json.loads(config_path.read_text())
    from safetensors.torch import save_file
    config_path, ckpt = folder / "sao_vae_config.json", folder / "sao_vae.safetensors"
    config_path.write_text(json.dumps(SAO_VAE))
    state = {k: v for k, v in demo_state_dict(SAO_VAE).items() if not k.startswith("decoder.")}
    save_file(state, str(ckpt))
    return config_path, ckpt, SAO_VAE


def encoder_only(model_config: dict, ckpt: Path, *, device: torch.device, precision: str, batch_size: int,
                 sample_size: int, batches: int) -> float:
    """Windows per second of the encoder alone on device-resident batches."""
    from wds_encode.models import load_autoencoder
    model = load_autoencoder(model_config, ckpt)
    enc = BatchEncoder(model, device=device, precision=precision, latent_mode="sample", seed=0)
    audio = torch.randn(batch_size, model.in_channels, sample_size) * 0.1
    masks = torch.ones(batch_size, sample_size, dtype=torch.bool)
    keys = [f"k{i}" for i in range(batch_size)]
    for _ in range(2):
        enc.encode(audio, masks, keys)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        enc.encode(audio, masks, keys)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sao", "demo"], default="sao")
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each generated file")
    parser.add_argument("--sample-size", type=int, default=1320960)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="wds-encode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = rank_device(args.device)
    t0 = time.perf_counter()
    write_tar_shards(work / "shards", args.shards, -(-args.files // args.shards), seed=0, name="bench",
                     formats=("flac", "wav"), rates=(44100, 48000), channels=(2,),
                     min_seconds=args.seconds, max_seconds=args.seconds)
    print(f"dataset: {args.files} x {args.seconds:.0f} s in {time.perf_counter() - t0:.1f} s", flush=True)
    (work / "dataset.json").write_text(json.dumps({"dataset_type": "wds", "random_crop": False,
                                                   "datasets": [{"id": "bench", "path": str(work / "shards")}]}))
    config_path, ckpt, model_config = model_files(args.model, work)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "model": args.model, "batch_size": args.batch_size, "sample_size": args.sample_size,
               "num_workers": args.num_workers, "runs": []}
    for precision in args.precisions.split(","):
        alone = encoder_only(model_config, ckpt, device=device, precision=precision, batch_size=args.batch_size,
                             sample_size=args.sample_size, batches=max(3, args.files // args.batch_size // 2))
        config = EncodeConfig(model_config=config_path, ckpt_path=ckpt, dataset_config=work / "dataset.json",
                              output_path=work / f"out-{precision}", batch_size=args.batch_size,
                              sample_size=args.sample_size, num_workers=args.num_workers, precision=precision,
                              device=args.device, overwrite=True, progress=False)
        stats = run(config)
        window_seconds = args.sample_size / model_config["sample_rate"]
        pipeline = stats.windows / stats.loop_seconds
        row = {"precision": precision, "encoder_only_windows_per_s": alone,
               "encoder_only_realtime": alone * window_seconds,
               "pipeline_windows_per_s": pipeline, "pipeline_realtime": stats.realtime_factor,
               "windows": stats.windows, "elapsed_s": stats.elapsed_seconds, "loop_s": stats.loop_seconds, "fp32_retries": stats.fp32_retries,
               "busy_fraction": pipeline / alone}
        results["runs"].append(row)
        print(f"{name} {args.model} {precision}: encoder alone {alone:.1f} win/s "
              f"({alone * window_seconds:.0f}x real time); pipeline {pipeline:.1f} win/s "
              f"({pipeline * window_seconds:.0f}x real time; {stats.windows} windows in {stats.loop_seconds:.1f} s, "
              f"{stats.elapsed_seconds:.1f} s with start-up); pipeline/encoder {pipeline / alone:.2f}; "
              f"fp32 retries {stats.fp32_retries}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
