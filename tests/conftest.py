"""Shared fixtures: real audio shards made by wds_encode.synth, the bundled model, the real command."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import tarfile
import sys
from pathlib import Path

import numpy as np
import pytest

from s3_support import fault_proxy, moto_s3, s3, s3_env  # noqa: F401  (fixtures for every test module)

WDS_ENCODE = str(Path(sys.executable).with_name("wds-encode"))


TESTS = Path(__file__).resolve().parent
# the reference data of stable-audio-tools and SA3, copied into tests/ (each folder's README says what
# every file is and how it was made), so that a clone with nothing beside it passes its tests
GOLDEN_DIR = Path(os.environ.get("WDS_GOLDEN_DIR") or TESTS / "golden")
GOLDEN_CKPTS = ("model.ckpt", "model.safetensors", "wrapped.safetensors")


# stable-audio-tools' encodec config, shrunk (no golden data exists for SEANet): reflect padding, weight
# norm, an LSTM at the end; 3200 samples give 20 latent frames
SEANET_SMALL = {"model_type": "autoencoder", "sample_size": 3200, "sample_rate": 32000, "audio_channels": 1,
                "model": {"encoder": {"type": "seanet", "config": {
                    "channels": 1, "dimension": 8, "n_filters": 2, "ratios": [4, 5, 8], "n_residual_layers": 1,
                    "dilation_base": 2, "lstm": 1, "norm": "weight_norm"}},
                    "bottleneck": {"type": "tanh"}, "latent_dim": 8, "downsampling_ratio": 160, "io_channels": 1}}


def _golden_folder(root: Path, name: str, variable: str) -> Path:
    folder = root / name
    if not (folder / "model_config.json").is_file():
        pytest.fail(f"golden data not found at {folder}: the checkout ships it under tests/{root.name}, "
                    f"or {variable} pointing at it")
    return folder


def golden(name: str) -> Path:
    """The folder of a model saved by stable-audio-tools itself, with its inputs and outputs."""
    return _golden_folder(GOLDEN_DIR, name, "WDS_GOLDEN_DIR")


GOLDEN_SA3_DIR = Path(os.environ.get("WDS_GOLDEN_SA3_DIR")
                      or TESTS / "golden-sa3")
GOLDEN_SA3_MODELS = ("same_tiny_shift", "same_tiny_window", "same_tiny_two_stage")


def golden_sa3(name: str) -> Path:
    """The folder of a tiny SAME model saved by Stable Audio 3's own code, with its inputs and outputs."""
    return _golden_folder(GOLDEN_SA3_DIR, name, "WDS_GOLDEN_SA3_DIR")


def golden_model(name: str) -> tuple[Path, Path]:
    """(model_config.json, model.safetensors) of a golden model."""
    folder = golden(name)
    return folder / "model_config.json", folder / "model.safetensors"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `wds-encode` command with these arguments, as a user runs it, and what it printed and returned.

    It runs in this process (click's runner on the command's own entry point), which spares the 2-3 s of CPU
    a new interpreter spends importing torch, unless it starts processes of its own (`--devices` of more
    than one rank), which the launcher needs a process of its own for. As from a process: an exception the
    command lets escape comes back as its traceback on stderr and exit 1, and what the run sets for itself
    (torch's threads, signal handlers) is put back. `env`: the command's whole environment; one that adds
    code to the interpreter (PYTHONPATH: a sitecustomize that injects a fault) needs a process of its own.
    `run_cli_process` runs the installed command itself."""
    args = [str(a) for a in args]
    if _starts_processes(args) or (env is not None and env.get("PYTHONPATH") != os.environ.get("PYTHONPATH")):
        return run_cli_process(*args, timeout=timeout, env=env)
    return run_cli_here(*args, env=env)


def run_cli_process(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `wds-encode` command in a process of its own."""
    return subprocess.run([WDS_ENCODE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def _starts_processes(args: list[str]) -> bool:
    for flag in ("--devices", "--nproc-per-node"):
        if flag in args:
            value = args[args.index(flag) + 1] if args.index(flag) + 1 < len(args) else ""
            if value not in ("1", "cpu", "cuda:0", "0"):
                return True
    return False


def run_cli_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import signal
    import traceback

    import torch
    from click.testing import CliRunner
    from wds_encode.cli import main

    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    environ = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        result = CliRunner().invoke(main, list(map(str, args)), prog_name="wds-encode")
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(*result.exc_info)[1:])
        code = 1
    return subprocess.CompletedProcess([WDS_ENCODE, *args], code, result.stdout, stderr)


def write_dataset_config(path: Path, dataset_type: str, datasets: list[dict], **extra) -> Path:
    path.write_text(json.dumps({"dataset_type": dataset_type, "datasets": datasets, **extra}))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (names are not checked: tests need bad ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


MiB = 1 << 20


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def read_folder_layout(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every (latent, metadata) of OUT/{rank}/*.npy, by output key; fails on a duplicate key."""
    found: dict[str, tuple[np.ndarray, dict]] = {}
    for npy in sorted(out.glob("[0-9]*/*.npy")):
        md = json.loads(npy.with_suffix(".json").read_text())
        key = f"{md['source_shard']}/{md['key']}"
        assert key not in found, f"duplicate output for {key}"
        found[key] = (np.load(npy), md)
    return found


def read_latent_shards(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every (latent, metadata) of OUT/shards/**.tar read with plain webdataset; fails on a duplicate key."""
    import webdataset as wds

    found: dict[str, tuple[np.ndarray, dict]] = {}
    for tar in sorted((out / "shards").rglob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode():
            key = f"{sample['json']['source_shard']}/{sample['__key__']}"
            assert key not in found, f"duplicate latent shard sample {key}"
            found[key] = (sample["npy"], sample["json"])
    return found


def assert_exactly_once(out: Path, samples) -> dict:
    """Every input sample's windows exactly once, in the folder layout and the latent shards alike."""
    folder = read_folder_layout(out)      # fails on a duplicate output key
    shards = read_latent_shards(out)
    assert sorted(folder) == sorted(shards)
    for key, (latent, md) in folder.items():
        assert np.array_equal(latent, shards[key][0]) and md == shards[key][1]
    chunks: dict[str, list[int]] = {}
    for _, md in folder.values():
        chunks.setdefault(md["__key__"], []).append(md["chunk_index"])
        assert md["num_chunks"] >= 1
    assert sorted(chunks) == sorted(s.key for s in samples)
    for key, indices in chunks.items():
        n = next(md["num_chunks"] for _, md in folder.values() if md["__key__"] == key)
        assert sorted(indices) == list(range(n)), key
    ids = [p.stem for p in out.glob("[0-9]*/*.npy")]
    assert len(ids) == len(set(ids)) == len(folder)
    assert not list(out.rglob("*.partial"))
    return json.loads((out / "details.json").read_text())


@pytest.fixture(scope="session")
def demo_model():
    from wds_encode.models import demo_model_paths
    return demo_model_paths()


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory):
    """3 shards x 20 samples: FLAC/WAV/MP3/OGG, 16-48 kHz, mono and stereo, 0.3-3 s."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("mixed")
    paths, samples = write_tar_shards(folder, 3, 20, seed=1, name="mix")
    return folder, paths, samples


@pytest.fixture
def s3_in_process(s3, monkeypatch):
    """The moto server, with this process's environment pointing boto3 at it (test credentials only)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_env(s3.endpoint).items():
        if name.startswith("AWS_") or name.lower() == "no_proxy":
            monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def storage(s3_in_process):
    """A Storage reaching moto directly (endpoint from AWS_ENDPOINT_URL, test credentials from the env)."""
    from wds_encode.storage import Storage
    return Storage()


@pytest.fixture
def proxied(s3_in_process, fault_proxy):
    """A Storage whose S3 requests all go through the fault proxy."""
    from wds_encode.storage import S3Options, Storage
    return Storage(S3Options(endpoint_url=fault_proxy.endpoint))


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """An empty output Place: a local folder, or a prefix in a bucket of the moto server."""
    from wds_encode.storage import LocalPlace, Storage
    if request.param == "local":
        return LocalPlace(str(tmp_path / "out"))
    server = request.getfixturevalue("s3_in_process")
    server.make_bucket("out")
    return Storage().place("s3://out/run/")


def assert_half_precision_close_or_refused(model_loader, dtype, relative_error: float, window_samples: int) -> None:
    """A low-precision encode `relative_error` off fp32: rounding (under 0.05), or this CPU computes these
    shapes wrong in `dtype` (oneDNN's AMX bf16 kernels in some torch builds), and then a run must refuse
    to write such latents: the precision check at its start has to find the same disagreement."""
    import torch

    from wds_encode.pipeline.encoder import BatchEncoder, PrecisionMismatch
    if relative_error < 0.05:
        return
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    encoder = BatchEncoder(model_loader(), device=torch.device("cpu"), precision=precision)
    with pytest.raises(PrecisionMismatch):
        encoder.check_precision(window_samples)



# `make test` hands whole modules to its processes (pytest-xdist, --dist loadfile: a module's fixtures are built
# once), in collection order. The modules that take longest (it prints the 20 slowest tests) are collected
# first: a long module begun last keeps one process busy while the others have finished. (Handing their tests
# out one by one instead was no faster on two cores: 15.4 min, against 13.9 and 16.6 for whole modules.)
LONGEST_MODULES = ("test_races.py", "test_s3.py", "test_preemption.py", "test_multi_rank.py", "test_benchmark.py",
                   "test_overlap.py", "test_full_length.py", "test_array_jobs.py", "test_cli.py", "test_encoder.py",
                   "test_gpu_smoke.py", "test_verify.py", "test_no_folder.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
    items.sort(key=rank)   # stable: each module's tests keep their order
