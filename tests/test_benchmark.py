"""scripts/benchmark.py: one run on a tiny dataset writes every part (encoder alone eager, channels-last
and compiled, data path, end to end in steady state, the seed's approach) with positive throughputs and the ratios
computed from them; --skip leaves parts out and says so; the nvidia-smi sampler parses what
nvidia-smi prints, asks for the right GPU, and says why it is skipped when nvidia-smi is absent. The SAME
modes (--model same_s / same_l, --tiny) record the shape, FLOPs equal to `SAMEEncoder.flops`, achieved
GFLOP/s and, with a peak, the model FLOPs utilisation; the full-size shape configs give SA3's FLOPs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
TINY = ["--model", "demo", "--files", "6", "--shards", "2", "--seconds", "0.5", "--sample-size", "16384",
        "--min-steady-seconds", "0", "--encoder-seconds", "0.2", "--data-seconds", "0.2",
        "--baseline-seconds", "0", "--mixed-seconds", "0.2,1.3", "--max-seconds", "0.5"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("wds_encode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(tmp_path: Path, *args: str, base: tuple[str, ...] | list[str] = TINY) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *base, *args, "--workdir", str(tmp_path / "work"),
                           "--json-out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


@pytest.mark.slow
def test_tiny_run_like_the_gpu_command_measures_every_part_and_the_ratios(tmp_path):
    """The GPU command's options (two precisions, compiled end to end, batches of 2) on the CPU."""
    result = run_benchmark(tmp_path, "--precisions", "bf16,fp32", "--compile", "on", "--batch-size", "2",
                           "--num-workers", "2", "--baseline-workers", "2")
    assert result["command"].startswith("python ") and "--precisions bf16,fp32" in result["command"]
    assert result["argv"][1:3] == ["--model", "demo"]
    for field in ("date", "host", "device", "torch", "cpus_available", "cpu_plan", "load_average_start",
                  "load_average_end"):
        assert result[field], field
    params = result["params"]
    assert params["precisions"] == ["bf16", "fp32"] and params["batch_size"] == 2
    assert params["compile"] == "on"
    assert params["sample_size"] == 16384 and params["sample_rate"] == 44100
    dataset = result["dataset"]
    assert dataset["formats"] == ["flac"] and dataset["rates"] == [44100, 48000]
    assert dataset["channels"] == [2]
    assert dataset["files"] == 6 and dataset["tars"] == 2 and dataset["bytes"] > 0

    encoder = result["encoder_alone"]
    assert sorted((r["precision"], r["mode"]) for r in encoder) == [
        (p, m) for p in ("bf16", "fp32") for m in ("channels-last", "compiled", "eager")]
    for row in encoder:
        assert row["realtime"] > 0 and row["batches"] >= 3 and row["batch_size"] == 2
        assert _close(row["realtime"], row["audio_seconds"] / row["seconds"])
        assert _close(row["audio_seconds"], row["windows"] * 16384 / 44100)
        assert row["compiled"] == (row["mode"] == "compiled") and row["compile_error"] is None
        assert row["channels_last"] == (row["mode"] != "eager")   # compiled: the CPU's default layout
        assert row["warmup_seconds"] >= row["first_batch_seconds"] > 0

    data = result["data_path"]
    assert data["windows"] >= 6 and data["errors"] == 0 and data["windows"] == 6 * data["passes"]
    assert data["realtime"] > 0 and _close(data["realtime"], data["audio_seconds"] / data["seconds"])
    assert _close(data["realtime_per_cpu"], data["realtime"] / data["cpus_used"])
    assert data["cpus_used"] == max(1, data["workers"])

    e2e = result["end_to_end"]
    assert [r["precision"] for r in e2e] == ["bf16", "fp32"]
    for row in e2e:
        assert row["compiled"] is True and row["batch_size"] == 2 and row["errors"] == 0
        assert row["channels_last"] is True      # wds-encode's default on a CPU
        assert row["windows"] == 6 * row["repeats"] and row["windows"] >= 6
        assert row["steady_seconds"] > 0 and row["steady_audio_seconds"] > 0 and row["warmup_seconds"] > 0
        assert _close(row["realtime"], row["steady_audio_seconds"] / row["steady_seconds"])
        assert row["steady_ok"] is True and row["last_batch_partial"] is False  # 6 windows, batches of 2
        assert row["gpu_utilisation"] == {"skipped": "device is cpu, not a GPU"}

    baseline = result["baseline"]
    assert [r["precision"] for r in baseline] == ["bf16", "fp32"]
    for row in baseline:
        assert row["batch_size"] == 1 and row["num_workers"] == 2 and row["windows"] >= 2
        assert row["realtime"] > 0 and _close(row["realtime"], row["audio_seconds"] / row["seconds"])
        assert row["torch_threads"] == torch.get_num_threads()   # a fresh process: torch's default
        assert row["peak_rss_mb"] > 100                          # measured in that process
    assert result["heap_kept"] is True       # wds-encode's parts, on a CPU (glibc)
    chunking = {row["chunking"]: row for row in result["chunking"]}
    assert [(r["chunking"], r["max_seconds"]) for r in result["chunking"]] == [
        ("crop", None), ("split", None), ("full", 0.5)]
    assert chunking["crop"]["windows"] == 2 and chunking["split"]["windows"] == 1 + 4   # 16384-sample windows
    assert chunking["full"]["windows"] == 1 + 3          # 1.3 s in windows of at most 0.5 s
    assert chunking["full"]["padding_overhead"] < 0.01 < chunking["split"]["padding_overhead"]
    for row in chunking.values():
        assert row["realtime"] > 0 and row["encoded_realtime"] >= row["realtime"]
        assert row["real_samples"] > 0 and row["padding_samples"] >= 0 and row["peak_rss_mb"] > 100
    assert result["dataset"]["mixed"]["lengths"] == [0.2, 1.3]
    work = tmp_path / "work"
    assert not list(work.glob("out-e2e-*")) and not list(work.glob("baseline-*"))  # outputs removed

    def realtime(rows, **match):
        return next(r["realtime"] for r in rows if all(r[k] == v for k, v in match.items()))
    for precision in ("bf16", "fp32"):
        ratios = result["ratios"][precision]
        whole = realtime(e2e, precision=precision)
        eager, layout, compiled = (realtime(encoder, precision=precision, mode=mode)
                                   for mode in ("eager", "channels-last", "compiled"))
        assert _close(ratios["encoder_compiled_over_eager"], compiled / eager)
        assert _close(ratios["encoder_channels_last_over_eager"], layout / eager)
        assert _close(ratios["end_to_end_over_encoder"], whole / compiled)  # end to end ran compiled
        assert _close(ratios["end_to_end_over_encoder_eager"], whole / eager)
        assert _close(ratios["end_to_end_over_baseline"], whole / realtime(baseline, precision=precision))
    for row in [*encoder, data, *e2e, *baseline]:  # what else ran on the machine meanwhile
        machine = row["machine"]
        assert machine["own_cpu_seconds"] > 0 and machine["wall_seconds"] > 0
        assert machine["others_cores"] >= 0
        assert machine["machine_busy_cpu_seconds"] >= machine["others_cpu_seconds"]
    assert result["peak_rss_mb"]["self"] > 100 and result["peak_rss_mb"]["children"] > 0
    assert set(result["peak_rss_mb_after"]) == {"data", "encoder", "e2e", "baseline", "chunking"}


def test_skipped_parts_are_marked_and_their_ratios_are_none(tmp_path):
    result = run_benchmark(tmp_path, "--skip", "encoder,e2e,baseline,chunking")
    for part in ("encoder_alone", "end_to_end", "baseline", "chunking"):
        assert result[part] == {"skipped": True}
    assert result["data_path"]["realtime_per_cpu"] > 0
    assert result["params"]["precisions"] == ["fp32"]
    assert result["params"]["skip"] == ["baseline", "chunking", "e2e", "encoder"]
    assert set(result["ratios"]["fp32"].values()) == {None}


def test_unknown_part_to_skip_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip", "encoder,decoder"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) ['decoder']" in proc.stderr


def test_gpu_sampler_parses_nvidia_smi_for_the_right_gpu_and_says_why_when_absent(tmp_path, monkeypatch):
    bench = load_benchmark()
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "nvidia-smi"
    # odd calls report 40% and 1000 MiB, even calls 80% and 3000 MiB
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n"
                    f"if [ $(( $(wc -l < {calls}) % 2 )) = 1 ]; then echo '40, 1000'\n"
                    "else echo '80, 3000'; fi\n")
    fake.chmod(0o755)
    sampler = bench.GpuSampler("GPU-1234", interval=0.01, executable=str(fake))
    sampler.start()
    deadline = time.time() + 30
    while len(sampler.samples) < 4 and time.time() < deadline:
        time.sleep(0.05)
    sampler.stop()
    summary = sampler.summary()
    assert summary["samples"] >= 4 and summary["failed_samples"] == 0 and summary["gpu"] == "GPU-1234"
    assert summary["utilization_min"] == 40 and summary["utilization_max"] == 80
    assert 40 < summary["utilization_mean"] < 80 and summary["memory_used_mib_max"] == 3000
    assert calls.read_text().splitlines()[0] == \
        "--query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -i GPU-1234"
    assert sampler.summary(start=time.time() + 60)["samples"] == 0  # a window with no samples in it

    absent = bench.GpuSampler("0", executable=str(tmp_path / "no-such-nvidia-smi"))
    absent.start()
    absent.stop()
    assert absent.summary() == {"skipped": "nvidia-smi not found on PATH"}

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert bench.nvidia_smi_id(torch.device("cuda:1")) == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert bench.nvidia_smi_id(torch.device("cuda:1")) == "1"
    assert bench.nvidia_smi_id(torch.device("cuda")) == "0"


SAME_TINY = ["--tiny", "--files", "2", "--shards", "1", "--seconds", "0.5", "--sample-size", "16384",
             "--min-steady-seconds", "0", "--encoder-seconds", "0.1",
             "--skip", "data,baseline,chunking,channels-last,compiled"]


@pytest.mark.parametrize("model, precision, peak", [("same_l", "bf16", None), ("same_s", "fp32", "0.5")])
def test_same_modes_record_shape_flops_and_utilisation(tmp_path, model, precision, peak):
    """SAME at a tiny width, encoder alone and end to end on the CPU: FLOPs per window are those of
    `SAMEEncoder.flops` for the shape run, achieved GFLOP/s follow from the measured rate, and MFU is
    given only with a peak (on a CPU: from --peak-tflops). No timing assertions."""
    from wds_encode.models import build_autoencoder

    extra = ["--precisions", precision] + (["--peak-tflops", peak] if peak else [])
    result = run_benchmark(tmp_path, "--model", model, *extra, base=SAME_TINY)
    bench = load_benchmark()
    encoder = build_autoencoder(bench.same_config(model, tiny=True)).encoder
    flops = encoder.flops(16384)
    assert flops > 0
    assert result["model"] == model and result["params"]["tiny"] is True
    assert result["params"]["sample_size"] == 16384
    shape = result["model_shape"]
    assert shape["encoder"] == "SAMEEncoder" and shape["downsampling_ratio"] == 4096
    assert shape["flops_per_window"] == flops
    assert _close(shape["flops_per_audio_second"], flops / (16384 / 44100))
    assert shape["flops_per_audio_second_long"] > 0
    assert shape["latent_frames_per_window"] == encoder.output_length(16384) == 4
    block = shape["blocks"][0]
    assert block["width"] == 48 and block["depth"] == 2 and block["stride"] == 16 and block["heads"] == 3
    assert ("sliding window" if model == "same_l" else "mid-point shift") in block["attention"]
    expected_peak = float(peak) if peak else None
    assert result["peak_tflops"][precision]["tflops"] == expected_peak

    rows = result["encoder_alone"] + result["end_to_end"]
    assert [r["precision"] for r in rows] == [precision, precision]
    assert result["encoder_alone"][0]["mode"] == "eager"
    for row in rows:
        assert row["realtime"] > 0 and row["windows_per_second"] > 0
        assert row["flops_per_window"] == flops
        assert _close(row["achieved_gflops"], flops * row["windows_per_second"] / 1e9)
        if peak:
            assert _close(row["mfu"], row["achieved_gflops"] / (1e3 * expected_peak))
        else:
            assert row["mfu"] is None
    alone = result["encoder_alone"][0]
    assert alone["cpu_seconds"] > 0 and alone["cores_used"] > 0 and alone["realtime_per_cpu_second"] > 0
    e2e = result["end_to_end"][0]
    assert e2e["errors"] == 0 and e2e["windows"] >= 2
    if precision == "bf16":   # the seeded weights pass wds-encode's precision check, alone and end to end
        for check in (result["encoder_alone"][0]["precision_check"], e2e["precision_check"]):
            assert check["ok"] is True and check["relative_error"] < 0.1
    config = json.loads(Path(result["model_config"]).read_text())
    assert config == bench.same_config(model, tiny=True)


def test_full_size_same_shapes_load_and_count_sa3_flops():
    """configs/same_*_shape.json build (on the meta device: shapes only) with SA3's structure; SAME-L's
    encoder does about 156 GFLOP per audio second."""
    from wds_encode.models import build_autoencoder

    bench = load_benchmark()
    per_second = {}
    for name, width, depth, params in (("same_s", 768, 6, 53.7e6), ("same_l", 1536, 12, 426.1e6)):
        config = json.loads(bench.SAME_SHAPES[name].read_text())
        assert config["model_type"] == "autoencoder" and config["sample_rate"] == 44100
        with torch.device("meta"):
            model = build_autoencoder(config, with_decoder=True)
        assert model.downsampling_ratio == 4096 and model.latent_dim == 256
        (block,) = model.encoder.blocks()
        assert (block.dim, block.depth, block.stride) == (width, depth, 16)
        assert abs(sum(p.numel() for p in model.encoder.parameters()) - params) < 0.1e6
        shape = bench.model_shape(model, bench.SAME_SAMPLE_SIZE)
        per_second[name] = shape["flops_per_audio_second_long"]
        assert shape["flops_per_window"] == model.encoder.flops(bench.SAME_SAMPLE_SIZE)
    assert 150e9 < per_second["same_l"] < 160e9
    assert 18e9 < per_second["same_s"] < 22e9


def test_gpu_peaks_by_device_name_and_override():
    bench = load_benchmark()
    assert bench.gpu_peak_tflops("NVIDIA H200", "bf16")[0] == 989.4
    assert bench.gpu_peak_tflops("NVIDIA H200 NVL", "bf16")[0] == 835.5
    assert bench.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp16")[0] == 989.4
    assert bench.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert bench.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32")[0] == 156.0
    assert bench.gpu_peak_tflops("NVIDIA A100 80GB PCIe", "fp32")[0] == 19.5
    value, why = bench.gpu_peak_tflops("NVIDIA GeForce RTX 4090", "bf16")
    assert value is None and "--peak-tflops" in why
    override = bench.parse_peak_override("bf16=900,fp32=60")
    assert bench.gpu_peak_tflops("NVIDIA H200", "bf16", override) == (900.0, "--peak-tflops")
    assert bench.gpu_peak_tflops("NVIDIA H200", "fp16", override)[0] == 989.4   # not overridden
    assert bench.gpu_peak_tflops("x", "fp16", bench.parse_peak_override("123"))[0] == 123.0
    figures = bench.flops_figures(2e12, 100.0, 989.4)
    assert _close(figures["achieved_gflops"], 2e5) and _close(figures["mfu"], 2e14 / 989.4e12)
    assert bench.flops_figures(None, 100.0, 989.4) == {"flops_per_window": None, "achieved_gflops": None,
                                                       "mfu": None}
