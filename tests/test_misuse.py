"""A new user's mistakes (issue 28): each one is exit 2 and one message saying what is wrong, where, and
what to do, never a traceback. Through the real command: the installed `wds-encode` in a subprocess where
the error comes after the model starts loading or where time is measured, else click's CliRunner on
`wds_encode.cli.main` (the same code, without a new interpreter and torch import per case)."""

from __future__ import annotations

import os
import pickle
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import WDS_ENCODE, run_cli, write_dataset_config, write_tar
from s3_support import record_requests, s3_env
from wds_encode.cli import main
from wds_encode.models import CheckpointError, ModelConfigError, load_autoencoder
from wds_encode.models.factory import check_model_files


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """One input shard of two short real-audio files, and its dataset config."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("tiny")
    write_tar_shards(folder / "shards", 1, 2, seed=3, name="t", min_seconds=0.3, max_seconds=0.5)
    return write_dataset_config(folder / "dataset.json", "wds", [{"id": "tiny", "path": str(folder / "shards")}])


@pytest.fixture(scope="module")
def demo_ckpt(demo_model, tmp_path_factory):
    """The demo model's weights as a Lightning-style .ckpt (a zip torch.save writes)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": load_file(str(demo_model[1]))}, path)
    return path


def cli(*args, env: dict | None = None):
    """`wds-encode ARGS` in this process; `env` entries set (None: unset) for the call."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_usage_error(result, *words: str) -> str:
    """Exit 2, one `error:` line holding every word, no traceback. Returns the message."""
    if isinstance(result, subprocess.CompletedProcess):
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = result.exit_code, result.stderr
        if not isinstance(result.exception, SystemExit):
            pytest.fail(f"raised {type(result.exception).__name__}: {str(result.exception)[:300]}")
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    return lines[0]


def encode_args(model_config, ckpt, dataset, out, *extra) -> list:
    return ["--model-config", model_config, "--ckpt-path", ckpt, "--dataset-config", dataset, "--output-path", out,
            "--num-workers", 0, "--no-progress", *extra]


# ----------------------------------------------------------------------------- 1. swapped options

def test_model_config_and_checkpoint_swapped(demo_model, demo_ckpt, tiny_dataset, tmp_path):
    result = cli(*encode_args(demo_ckpt, demo_model[0], tiny_dataset, tmp_path / "out"))
    message = assert_usage_error(result, str(demo_ckpt), "not a JSON text file", "looks like a checkpoint",
                                 "swapped")
    assert "UnicodeDecodeError" not in message
    assert not list((tmp_path / "out").rglob("*"))   # nothing written (the output's probe is removed at once)


def test_the_swap_is_told_apart_before_anything_is_parsed(demo_model, demo_ckpt):
    with pytest.raises(ModelConfigError, match=r"not a JSON text file: it looks like a checkpoint .*swapped"):
        check_model_files(demo_ckpt, demo_model[0])
    with pytest.raises(ModelConfigError, match=r"looks like a checkpoint \(a safetensors file\)"):
        check_model_files(demo_model[1])
    with pytest.raises(CheckpointError, match=r"is not a checkpoint .*JSON text file, a model config; were "
                                              r"--model-config and --ckpt-path swapped"):
        check_model_files(demo_model[0], demo_model[0])
    check_model_files(demo_model[0], demo_ckpt)   # the right way round
    check_model_files(demo_model[0], demo_model[1])


def test_a_checkpoint_path_that_is_a_json_file_says_so(demo_model, tiny_dataset, tmp_path):
    result = run_cli(*encode_args(demo_model[0], demo_model[0], tiny_dataset, tmp_path / "out"))
    assert_usage_error(result, str(demo_model[0]), "is not a checkpoint", "JSON text file", "swapped")


# ----------------------------------------------------------------------------- 2. no S3 credentials

def no_credentials_env(tmp_path: Path, endpoint: str) -> dict:
    """The test server's endpoint and region, but no credentials anywhere boto3 looks."""
    env = {name: None for name in os.environ if name.startswith("AWS_")}
    env.update({name: value for name, value in s3_env(endpoint).items() if name.startswith("AWS_")})
    env.update(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None, AWS_PROFILE=None,
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-such" / "credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-such" / "config"))
    return env


def test_no_s3_credentials_is_a_message_not_a_traceback(s3, demo_model, tiny_dataset, tmp_path):
    s3.make_bucket("latents")
    env = no_credentials_env(tmp_path, s3.endpoint)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(random.Random(0).randbytes(4096))   # found before the model loads: never read
    how = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "--s3-profile", "AWS_PROFILE")
    run = cli(*encode_args(demo_model[0], garbage, tiny_dataset, "s3://latents/out/"), env=env)
    assert_usage_error(run, "--output-path s3://latents/out/", "no AWS credentials found", *how)

    status = cli("status", "s3://latents/out/", env=env)
    assert_usage_error(status, "wds-encode status: error:", "s3://latents/out/", "no AWS credentials found", *how)

    s3_input = write_dataset_config(tmp_path / "s3.json", "s3", [{"id": "set", "s3_path": "s3://audio/train/"}])
    listing = cli(*encode_args(demo_model[0], garbage, s3_input, tmp_path / "out"), env=env)
    assert_usage_error(listing, "dataset 'set'", "s3://audio/train/", "no AWS credentials found", *how)
    assert s3.keys("latents") == {}


# ----------------------------------------------------------------------------- 3. a file that is no checkpoint

@pytest.mark.parametrize("damage", ["random bytes", "truncated", "text"])
def test_a_corrupt_checkpoint_is_not_a_checkpoint(damage, demo_model, demo_ckpt, tiny_dataset, tmp_path):
    bad = tmp_path / "model.ckpt"
    if damage == "random bytes":
        bad.write_bytes(random.Random(1).randbytes(3000))
    elif damage == "truncated":
        data = demo_ckpt.read_bytes()
        bad.write_bytes(data[:len(data) // 2])
    else:
        bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    result = run_cli(*encode_args(demo_model[0], bad, tiny_dataset, tmp_path / "out"))
    message = assert_usage_error(result, f"{bad} is not a checkpoint", "not a zip/pickle file torch can read")
    assert "--allow-unsafe-pickle" not in message and "Weights only load failed" not in message
    assert {"random bytes": "no checkpoint format", "truncated": "ends early",
            "text": "a text file, starting 'version https://git-lfs"}[damage] in message


def test_only_a_real_pickle_refused_by_the_weights_only_reader_suggests_unsafe_loading(demo_model, tmp_path):
    import argparse
    import json
    config = json.loads(demo_model[0].read_text())
    weights = load_file(str(demo_model[1]))
    with_objects = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": weights, "hparams": argparse.Namespace(lr=1e-4)}, with_objects)
    with pytest.raises(CheckpointError, match=r"pickled Python objects besides tensors \(Unsupported global: "
                                              r"GLOBAL argparse.Namespace.*--allow-unsafe-pickle"):
        load_autoencoder(config, with_objects)
    load_autoencoder(config, with_objects, allow_unsafe_pickle=True)
    protocol_4 = tmp_path / "protocol4.ckpt"   # a real checkpoint the weights-only reader cannot parse
    torch.save({"state_dict": weights}, protocol_4, pickle_protocol=4)
    with pytest.warns(UserWarning, match="pickle protocol 4"), \
            pytest.raises(CheckpointError, match=r"weights-only reader does not read .*--allow-unsafe-pickle"):
        load_autoencoder(config, protocol_4)
    not_a_pickle = tmp_path / "noise.ckpt"   # pickle's first two bytes, then noise: even trusted, it is none
    not_a_pickle.write_bytes(b"\x80\x02" + random.Random(2).randbytes(2000))
    for trusted in (False, True):
        with pytest.raises(CheckpointError, match="is not a checkpoint") as refused:
            load_autoencoder(config, not_a_pickle, allow_unsafe_pickle=trusted)
        assert "--allow-unsafe-pickle" not in str(refused.value)


# ----------------------------------------------------------------------------- 4. an output path that is a file

def test_an_output_path_that_is_a_file(demo_model, tiny_dataset, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = cli(*encode_args(*demo_model, tiny_dataset, afile))
    message = assert_usage_error(result, f"output path {afile} is a file, not a folder")
    assert "File exists" not in message and ".partial" not in message
    below = cli(*encode_args(*demo_model, tiny_dataset, afile / "run" / "one"))
    assert_usage_error(below, f"{afile}, a folder above it, is a file")
    assert afile.read_text() == "not a folder"


# ----------------------------------------------------------------------------- 5. a dataset folder that is missing

def test_a_missing_dataset_folder_is_named_as_missing(demo_model, tmp_path):
    missing = tmp_path / "datasets" / "nope"
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "x", "path": str(missing)}])
    message = assert_usage_error(cli(*encode_args(*demo_model, dataset, tmp_path / "out")),
                                 f"dataset path '{missing}' does not exist", "no such folder", str(tmp_path))
    assert "shards do not exist" not in message
    # a pattern where some shards are missing keeps counting them
    write_tar(tmp_path / "s-0.tar", [])
    pattern = write_dataset_config(tmp_path / "p.json", "wds", [{"id": "x", "path": f"{tmp_path}/s-{{0..3}}.tar"}])
    assert_usage_error(cli(*encode_args(*demo_model, pattern, tmp_path / "out")), "3 of 4 shards do not exist")
    gone = write_dataset_config(tmp_path / "g.json", "wds", [{"id": "x", "path": f"{missing}/s-{{0..1}}.tar"}])
    assert_usage_error(cli(*encode_args(*demo_model, gone, tmp_path / "out")), "2 of 2 shards do not exist",
                       f"no folder {missing}")


# ----------------------------------------------------------------------------- 6. --pretrained-name given a folder

def test_pretrained_name_that_is_a_local_folder_never_mentions_the_hub(tiny_dataset, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None}
    empty = tmp_path / "my-model"
    empty.mkdir()
    (empty / "model_config.json").write_text("{}")   # the config without its weights
    missing = tmp_path / "not-made"
    for name, words in ((empty, (f"folder {empty} has no model config with its weights", "expected files:",
                                 "model_config.json", "model.safetensors", "it holds model_config.json")),
                        (missing, (f"folder {missing} does not exist",))):
        result = cli("--pretrained-name", name, "--dataset-config", tiny_dataset, "--output-path", tmp_path / "out",
                     "--no-progress", env=env)
        message = assert_usage_error(result, f"--pretrained-name '{name}'", *words)
        for hub in ("Hugging Face cache", "models--", "huggingface-cli download"):
            assert hub not in message


# ----------------------------------------------------------------------------- 7. an S3 endpoint nobody answers

def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_s3_endpoint_is_reported_within_seconds(demo_model, tiny_dataset, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = s3_env(endpoint)
    started = time.monotonic()
    run = subprocess.run([WDS_ENCODE, *map(str, encode_args(*demo_model, tiny_dataset, "s3://latents/out/",
                                                            "--s3-endpoint-url", endpoint))],
                         capture_output=True, text=True, env={**env, "AWS_ENDPOINT_URL": "http://unused.invalid"},
                         timeout=120)
    run_seconds = time.monotonic() - started
    assert_usage_error(run, "s3://latents/out/", f"cannot reach the S3 endpoint {endpoint}", "--s3-endpoint-url")

    started = time.monotonic()
    status = subprocess.run([WDS_ENCODE, "status", "s3://latents/out/"], capture_output=True, text=True, env=env,
                            timeout=120)
    status_seconds = time.monotonic() - started
    assert_usage_error(status, "s3://latents/out/", f"cannot reach the S3 endpoint {endpoint}")
    # before the preflight, botocore's 10 adaptive attempts (and the read's own retries) took 65-90 s
    print(f"unreachable endpoint reported in {run_seconds:.1f} s (run), {status_seconds:.1f} s (status)")
    assert run_seconds < 15 and status_seconds < 15, (run_seconds, status_seconds)


def test_the_preflight_costs_one_head_per_bucket_and_copies_inherit_it(s3, fault_proxy, proxied):
    s3.make_bucket("src")
    s3.put("src", "data/a.tar", b"tar bytes")
    requests, _held = record_requests(fault_proxy)
    assert proxied.read_bytes("s3://src/data/a.tar") == b"tar bytes"
    assert proxied.list_tars("s3://src/data/") == [("s3://src/data/a.tar", 9)]
    worker = pickle.loads(pickle.dumps(proxied))   # what a DataLoader worker receives
    assert worker.read_bytes("s3://src/data/a.tar") == b"tar bytes"
    assert [(method, target) for method, target, _headers in requests if method == "HEAD"] == [("HEAD", "/src")]
