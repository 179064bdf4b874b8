"""End-to-end: the real `wds-encode` command on real shards, checked on what it wrote."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tarfile

import numpy as np
import pytest

from conftest import WDS_ENCODE, read_folder_layout, read_latent_shards, run_cli, write_dataset_config, write_tar
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace

SAMPLE_SIZE = 4096
SEED_OPTIONS = ["--model-config", "--ckpt-path", "--pretrained-name", "--dataset-config", "--output-path",
                "--batch-size", "--sample-size", "--num-workers", "--shuffle", "--model-half", "--is-discrete",
                "--num-nodes", "--strategy", "--limit-batches"]
CONTRACT_FIELDS = ["audio_channels", "sample_rate", "padding_mask", "path", "__key__", "duration", "start_time",
                   "end_time", "seconds_start", "seconds_total", "timestamps", "chunk_index", "num_chunks",
                   "latent_shape", "dataset_id", "source_shard"]


def unit_records(out) -> list[dict]:
    """Every committed unit record (`manifest/done/{unit}.json`)."""
    return RunManifest(LocalPlace(str(out))).records()


def encode(demo_model, dataset_config, out, *extra):
    config, ckpt = demo_model
    return run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset_config,
                   "--output-path", out, "--sample-size", SAMPLE_SIZE, "--no-progress", *extra)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, demo_model, mixed_shards):
    folder, _paths, samples = mixed_shards
    tmp = tmp_path_factory.mktemp("mixed_run")
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    result = encode(demo_model, dataset, tmp / "out", "--batch-size", 4, "--num-workers", 2)
    return result, tmp / "out", samples, dataset


def test_exactly_one_output_per_input_sample(mixed_run):
    result, out, samples, _ = mixed_run
    assert result.returncode == 0, result.stderr
    assert "windows written 60" in result.stdout
    folder = read_folder_layout(out)
    shards = read_latent_shards(out)
    # every input key exactly once, in both outputs
    assert sorted(md["__key__"] for _, md in folder.values()) == sorted(s.key for s in samples)
    assert sorted(shards) == sorted(folder) and len(folder) == 60 == len(samples)
    for key, (latent, md) in folder.items():
        assert np.array_equal(latent, shards[key][0])
        assert md == shards[key][1]


def test_latent_shapes_masks_and_metadata(mixed_run, demo_model):
    _, out, samples, _ = mixed_run
    model_config = json.loads(open(demo_model[0]).read())
    ratio = model_config["model"]["downsampling_ratio"]
    latent_dim = model_config["model"]["latent_dim"]
    by_key = {s.key: s for s in samples}
    for latent, md in read_folder_layout(out).values():
        assert latent.shape == (latent_dim, SAMPLE_SIZE // ratio) and latent.dtype == np.float32
        assert np.isfinite(latent).all()
        for field in CONTRACT_FIELDS:
            assert field in md, field
        src = by_key[md["__key__"]]
        assert md["sample_rate"] == model_config["sample_rate"]
        assert md["audio_channels"] == model_config["audio_channels"]
        assert md["source_sample_rate"] == src.sample_rate and md["source_channels"] == src.channels
        assert md["latent_shape"] == list(latent.shape)
        # padding mask: ones for the real audio, then zeros, at latent resolution
        mask = md["padding_mask"]
        assert len(mask) == latent.shape[1]
        ones = sum(mask)
        assert mask == [1] * ones + [0] * (len(mask) - ones)
        real = min(md["valid_length"], SAMPLE_SIZE)
        assert abs(ones - real / ratio) <= 1, (ones, real)
        assert md["seconds_total"] == math.ceil(md["total_length"] / md["sample_rate"])
        assert md["seconds_start"] == 0 and md["start_time"] == 0
        assert md["prompt"] == md["text"]  # the input's text field is kept and copied to prompt
        assert md["path"].endswith(f"#{src.key}.{src.ext}")


def test_details_json_and_manifest(mixed_run):
    _, out, _, dataset = mixed_run
    details = json.loads((out / "details.json").read_text())
    for field in ("model_config", "dataset_config", "sample_size", "args", "run_identity", "stats"):
        assert field in details
    assert details["sample_size"] == SAMPLE_SIZE
    assert details["args"]["dataset_config"] == str(dataset)
    assert details["stats"]["windows"] == 60 and details["stats"]["errors"] == 0
    records = unit_records(out)
    assert sorted(r["shard"] for r in records) == ["mix/mix-000000", "mix/mix-000001", "mix/mix-000002"]
    assert sum(r["windows"] for r in records) == 60


def test_rerun_skips_done_units_and_refuses_other_options(mixed_run, demo_model):
    _, out, _, dataset = mixed_run
    again = encode(demo_model, dataset, out, "--batch-size", 4, "--num-workers", 2)
    assert again.returncode == 0, again.stderr
    assert "  nothing to do: all 3 units were already done (use --overwrite to encode again)" in again.stdout
    assert "real-time factor" not in again.stdout
    assert len(read_folder_layout(out)) == 60
    refused = encode(demo_model, dataset, out, "--latent-mode", "mean")
    assert refused.returncode == 2
    assert "different run" in refused.stderr and "latent_mode" in refused.stderr


def test_sample_mode_is_deterministic_across_batch_and_worker_counts(mixed_run, demo_model, tmp_path):
    _, out, _, dataset = mixed_run
    reference = read_folder_layout(out)
    rerun = encode(demo_model, dataset, tmp_path / "again", "--batch-size", 4, "--num-workers", 2)
    assert rerun.returncode == 0, rerun.stderr
    again = read_folder_layout(tmp_path / "again")
    assert again.keys() == reference.keys()
    for key in reference:
        assert np.array_equal(again[key][0], reference[key][0]), key
    other = encode(demo_model, dataset, tmp_path / "other", "--batch-size", 7, "--num-workers", 0)
    assert other.returncode == 0, other.stderr
    for key, (latent, _) in read_folder_layout(tmp_path / "other").items():
        np.testing.assert_allclose(latent, reference[key][0], rtol=1e-4, atol=1e-5)  # float rounding only
    mean = encode(demo_model, dataset, tmp_path / "mean", "--latent-mode", "mean", "--num-workers", 0)
    assert mean.returncode == 0, mean.stderr
    diffs = [np.abs(lat - reference[k][0]).max() for k, (lat, _) in read_folder_layout(tmp_path / "mean").items()]
    assert min(diffs) > 1e-4  # sampling really adds noise


def test_options_from_a_config_file_with_flags_overriding(mixed_run, demo_model, tmp_path):
    _, _, _, dataset = mixed_run
    config, ckpt = demo_model
    options = tmp_path / "opts.yaml"
    options.write_text(f"model_config: {config}\nckpt_path: {ckpt}\ndataset_config: {dataset}\n"
                       f"output_path: {tmp_path / 'out'}\nsample_size: {SAMPLE_SIZE}\nbatch_size: 5\n"
                       "num_workers: 0\nlimit_batches: 2\nprogress: false\n")
    result = run_cli("run", "--config", options, "--batch-size", 3)
    assert result.returncode == 0, result.stderr
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["args"]["batch_size"] == 3 and details["args"]["limit_batches"] == 2
    assert details["stats"]["batches"] == 2
    options.write_text("batch_size: 0\n")
    bad = run_cli("run", "--config", options)
    assert bad.returncode == 2 and f"{options} + command line: batch_size" in bad.stderr


def test_help_lists_every_seed_option_with_default():
    for args in ([], ["run"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0
        for option in SEED_OPTIONS:
            assert option in result.stdout, (args, option)
        assert "[default: 1320960]" in result.stdout and "[default: 4]" in result.stdout


def test_bad_config_fails_fast_with_the_field(tmp_path, demo_model):
    bad = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "x"}])
    result = encode(demo_model, bad, tmp_path / "out")
    assert result.returncode == 2
    assert f'dataset config {bad}: datasets[0] (id "x") has no "path"' in result.stderr
    result = run_cli("--dataset-config", bad, "--output-path", tmp_path / "o", "--batch-size", "0",
                     "--model-config", demo_model[0], "--ckpt-path", demo_model[1])
    assert result.returncode == 2 and "batch_size" in result.stderr
    result = run_cli("--dataset-config", bad, "--output-path", tmp_path / "o")
    assert result.returncode == 2 and "--model-config" in result.stderr
    missing = write_dataset_config(tmp_path / "m.json", "wds", [{"id": "x", "path": f"{tmp_path}/s-{{0..3}}.tar"}])
    result = encode(demo_model, missing, tmp_path / "out")
    assert result.returncode == 2 and "4 of 4 shards do not exist" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written, nothing loaded
    wrong_size = write_dataset_config(tmp_path / "ok.json", "wds", [{"id": "x", "path": str(tmp_path)}])
    write_tar(tmp_path / "one.tar", [])
    result = encode(demo_model, wrong_size, tmp_path / "out", "--sample-size", 1000)
    assert result.returncode == 2 and "multiple of the model's downsampling_ratio 64" in result.stderr


def _tone_bytes(ext, seconds=0.5, sr=22050, channels=1):
    from wds_encode.synth import encode_audio_bytes
    t = np.arange(int(seconds * sr)) / sr
    wave = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    return encode_audio_bytes(np.repeat(wave[:, None], channels, axis=1), sr, ext)


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt")
    good = _tone_bytes("flac")
    write_tar(folder / "a.tar", [
        ("good1.flac", good), ("good1.json", b'{"text": "fine"}'),
        ("truncated.flac", good[: len(good) // 3]),
        ("random.wav", np.random.default_rng(1).bytes(5000)),
        ("zero.flac", b""),
        ("../escape.flac", good),
        ("orphan.json", b'{"text": "no audio"}'),
        ("good2.wav", _tone_bytes("wav", channels=2)),
    ])
    write_tar(folder / "b.tar", [(f"cut{i}.wav", _tone_bytes("wav", seconds=1.0)) for i in range(8)])
    data = (folder / "b.tar").read_bytes()
    (folder / "b.tar").write_bytes(data[: len(data) // 2 + 100])  # a tar cut in the middle of a member
    write_tar(folder / "c.tar", [("fine.mp3", _tone_bytes("mp3")), ("fine2.ogg", _tone_bytes("ogg"))])
    return folder


def test_corrupt_members_are_recorded_and_the_rest_is_written(corrupt_dataset, demo_model, tmp_path):
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "bad", "path": str(corrupt_dataset)}],
                                   random_crop=False)
    result = encode(demo_model, dataset, tmp_path / "out", "--num-workers", 2, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    written = {md["__key__"] for _, md in read_folder_layout(tmp_path / "out").values()}
    assert {"good1", "good2", "../escape", "fine", "fine2"} <= written
    assert {f"cut{i}" for i in range(3)} <= written  # what came before the cut is kept
    assert not {"random", "zero", "orphan"} & written
    records = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    by_key = {}
    for r in records:
        by_key.setdefault(r["key"], []).append(r)
        assert r["shard"].startswith("bad/") and r["reason"]
    for bad in ("random", "zero", "orphan"):
        assert by_key[bad][0]["level"] == "error", bad
    assert ("truncated" in by_key) != ("truncated" in written)
    assert by_key["../escape"][0]["level"] == "warning"
    assert any("tar read failed" in r["reason"] and r["shard"] == "bad/b" for r in records)
    # the sanitised key never escapes the output folders
    assert not list(tmp_path.glob("escape*")) and not list((tmp_path / "out").glob("*/escape*"))
    first_tar = next(r for r in unit_records(tmp_path / "out") if r["shard"] == "bad/a")["latent_shards"][0]
    names = tarfile.open(tmp_path / "out" / first_tar).getnames()
    assert "escape.npy" in names and all("/" not in n and ".." not in n for n in names)
    assert "errors" in result.stdout and "see errors.jsonl" in result.stdout

    strict = encode(demo_model, dataset, tmp_path / "strict", "--num-workers", 0, "--strict")
    assert strict.returncode == 1 and "bad samples" in strict.stderr
    tolerant = encode(demo_model, dataset, tmp_path / "tolerant", "--num-workers", 0, "--max-errors", 100)
    assert tolerant.returncode == 0
    limited = encode(demo_model, dataset, tmp_path / "limited", "--num-workers", 0, "--max-errors", 1)
    assert limited.returncode == 1


def test_audio_dir_with_custom_metadata_and_split(tmp_path, demo_model):
    from wds_encode.synth import write_audio_folder
    samples = write_audio_folder(tmp_path / "audio", 9, seed=3, min_seconds=0.05, max_seconds=0.25)
    assert len(samples) == 9
    module = tmp_path / "md.py"
    module.write_text("def get_custom_metadata(info, audio):\n"
                      "    return {'folder': info['relpath'].split('/')[0], 'rms': float(audio.pow(2).mean().sqrt())}\n")
    dataset = write_dataset_config(tmp_path / "d.json", "audio_dir",
                                   [{"id": "dir", "path": str(tmp_path / "audio"),
                                     "custom_metadata_module": str(module)}], random_crop=False)
    result = encode(demo_model, dataset, tmp_path / "out", "--chunking", "split", "--files-per-unit", 4,
                    "--num-workers", 2, "--batch-size", 3)
    assert result.returncode == 0, result.stderr
    found = read_folder_layout(tmp_path / "out")
    by_source = {}
    for latent, md in found.values():
        by_source.setdefault(md["__key__"], []).append(md)
        assert md["folder"] == md["relpath"].split("/")[0] and md["rms"] > 0
    assert len(by_source) == 9
    for key, mds in by_source.items():
        mds.sort(key=lambda m: m["chunk_index"])
        n = mds[0]["num_chunks"]
        assert [m["chunk_index"] for m in mds] == list(range(n))
        assert sum(m["valid_length"] for m in mds) == mds[0]["total_length"]
        assert n == math.ceil(mds[0]["total_length"] / SAMPLE_SIZE)
        if n > 1:
            assert [m["key"] for m in mds] == [f"{mds[0]['key'].rsplit('_', 1)[0]}_{i:04d}" for i in range(n)]
    assert sum(len(v) for v in by_source.values()) > 9  # some files really were split
    units = sorted(r["shard"] for r in unit_records(tmp_path / "out"))
    from wds_encode.config import load_dataset_config
    from wds_encode.pipeline.sources import list_shards
    assert units == sorted(u.shard_id for u in list_shards(load_dataset_config(dataset), files_per_unit=4))  # by their files


def test_limit_batches_leaves_unfinished_units_for_a_rerun(mixed_shards, demo_model, tmp_path):
    folder, _, samples = mixed_shards
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    first = encode(demo_model, dataset, tmp_path / "out", "--limit-batches", 3, "--batch-size", 8,
                   "--num-workers", 0)
    assert first.returncode == 0, first.stderr
    assert "stopped" in first.stdout
    partial = read_folder_layout(tmp_path / "out")
    assert len(partial) < 60 and not list((tmp_path / "out").rglob("*.partial"))
    rest = encode(demo_model, dataset, tmp_path / "out", "--batch-size", 8, "--num-workers", 0)
    assert rest.returncode == 0, rest.stderr
    done = read_folder_layout(tmp_path / "out")
    assert sorted(md["__key__"] for _, md in done.values()) == sorted(s.key for s in samples)


def test_demo_command(tmp_path):
    result = run_cli("demo", tmp_path / "demo", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "wds-encode summary" in result.stdout
    windows = int(result.stdout.split("windows written")[1].split()[0])
    assert windows > 0
    out = tmp_path / "demo" / "out"
    assert len(list(out.glob("0/*.npy"))) == windows == len(list(out.glob("0/*.json")))
    assert sum(1 for _ in read_latent_shards(out)) == windows


def test_folder_layout_reads_like_stable_audio_tools_pre_encoded_dataset(mixed_run):
    """The checks PreEncodedDataset (stable-audio-tools 0.0.19) makes on each file, restated."""
    _, out, _, _ = mixed_run
    latent_crop_length = 16
    # get_latent_filenames: OUT/filelist.txt when present (since 0.0.17; wds-encode writes it), else a scan
    listed = [out / line.strip() for line in (out / "filelist.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(out.glob("[0-9]*/*.npy")) and (out / "silence.npy").is_file()
    for npy in listed:
        latents = np.load(str(npy))
        info = json.loads(open(str(npy).replace(".npy", ".json")).read())
        last_ix = len(info["padding_mask"]) - 1 - info["padding_mask"][::-1].index(1)
        assert 0 <= last_ix < latents.shape[1]
        cropped = latents[:, :latent_crop_length]
        assert cropped.shape == (latents.shape[0], latent_crop_length)
        assert isinstance(info["seconds_total"], int) and isinstance(info["seconds_start"], int)
        assert isinstance(info["prompt"], str) and info["prompt"].strip()


@pytest.mark.parametrize("name, dtype", [("oobleck_rvq", np.uint8), ("oobleck_fsq", None)])
def test_is_discrete_writes_integer_tokens(mixed_shards, tmp_path, name, dtype):
    from conftest import golden_model
    from wds_encode.config import load_model_config
    from wds_encode.models import load_autoencoder
    from wds_encode.tools.verify import source_window
    folder, _, _ = mixed_shards
    config, ckpt = golden_model(name)
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "mix", "path": str(folder)}],
                                   random_crop=False)
    result = run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset,
                     "--output-path", tmp_path / "out", "--sample-size", 1024, "--is-discrete", "--no-progress",
                     "--num-workers", 1, "--batch-size", 8)
    assert result.returncode == 0, result.stderr
    model = load_autoencoder(load_model_config(config), ckpt)
    q, size = model.bottleneck.num_quantizers, model.bottleneck.codebook_size
    expected_dtype = dtype or (np.uint8 if size <= 256 else np.int16)
    found = read_folder_layout(tmp_path / "out")
    assert len(found) == 60
    for i, (tokens, md) in enumerate(sorted(found.values(), key=lambda v: v[1]["key"])):
        assert tokens.dtype == expected_dtype and tokens.shape == (q, 1024 // model.downsampling_ratio)
        assert md["latent_mode"] == "tokens" and md["codebook_size"] == size and md["num_quantizers"] == q
        assert int(tokens.max()) < size
        if i < 5:  # the tokens are the bottleneck's own, for the same window read back from its source
            window, _ = source_window(md, model.in_channels, model.sample_rate, 1024)
            again = model.bottleneck.encode_tokens(model.encode_pre_bottleneck(window[None]))[0]
            assert np.array_equal(again.numpy(), tokens.astype(np.int64))
    assert read_latent_shards(tmp_path / "out").keys() == found.keys()
    continuous = run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset,
                         "--output-path", tmp_path / "cont", "--sample-size", 1024, "--no-progress",
                         "--num-workers", 0, "--batch-size", 20, "--limit-batches", 1)
    assert continuous.returncode == 0, continuous.stderr
    cont = read_folder_layout(tmp_path / "cont")
    assert len(cont) == 20  # the limit stops after one batch, which held exactly the first unit
    latents = next(iter(cont.values()))[0]
    assert latents.dtype == np.float32 and latents.shape == (model.latent_dim, 1024 // model.downsampling_ratio)


def test_is_discrete_refuses_a_continuous_model(mixed_run, demo_model, tmp_path):
    _, _, _, dataset = mixed_run
    result = encode(demo_model, dataset, tmp_path / "out", "--is-discrete")
    assert result.returncode == 2 and "is continuous and has no tokens" in result.stderr


def test_overwrite_replaces_outputs_instead_of_adding_to_them(mixed_run, demo_model, tmp_path):
    _, _, _, dataset = mixed_run
    first = encode(demo_model, dataset, tmp_path / "out", "--num-workers", 0, "--batch-size", 20)
    assert first.returncode == 0, first.stderr
    writer = unit_records(tmp_path / "out")[0]["writer"]
    stale = tmp_path / "out" / "shards" / "mix" / f"gone.{writer}-000.tar.partial"
    stale.write_bytes(b"left by a crash")
    second = encode(demo_model, dataset, tmp_path / "out", "--num-workers", 0, "--batch-size", 20,
                    "--latent-mode", "mean", "--overwrite")
    assert second.returncode == 0, second.stderr
    found = read_folder_layout(tmp_path / "out")  # fails on any duplicate
    assert len(found) == 60 and all(md["latent_mode"] == "mean" for _, md in found.values())
    assert len(read_latent_shards(tmp_path / "out")) == 60 and not stale.exists()


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_once(mixed_run, demo_model, tmp_path):
    """SIGKILL mid-run (after some units committed), rerun: every sample exactly once, nothing lost."""
    import signal
    import subprocess
    import time

    from conftest import WDS_ENCODE
    _, _, samples, dataset = mixed_run
    config, ckpt = demo_model
    out = tmp_path / "out"
    args = [WDS_ENCODE, "--model-config", str(config), "--ckpt-path", str(ckpt), "--dataset-config", str(dataset),
            "--output-path", str(out), "--sample-size", "131072", "--batch-size", "2", "--num-workers", "1",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "manifest").glob("done/**/*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    committed = len(list((out / "manifest").glob("done/**/*.json")))
    assert 1 <= committed < 3, "the kill should land after the first unit and before the last"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{committed} already done" in rerun.stdout
    found = read_folder_layout(out)  # fails on any duplicate
    assert sorted(md["__key__"] for _, md in found.values()) == sorted(s.key for s in samples)
    assert read_latent_shards(out).keys() == found.keys()
    assert not list(out.rglob("*.partial")) and not list((out / "manifest" / "writing").glob("*"))


def test_ckpt_prefix_selects_the_ema_copy(mixed_run, demo_model, tmp_path):
    """A training checkpoint holds the autoencoder twice (raw and EMA); --ckpt-prefix picks one."""
    from safetensors.torch import load_file, save_file
    _, _, _, dataset = mixed_run
    config, ckpt = demo_model
    raw = load_file(str(ckpt))
    state = {f"autoencoder.{k}": v * 0.5 if k.endswith("weight_g") else v for k, v in raw.items()}
    state.update({f"autoencoder_ema.ema_model.{k}": v.clone() for k, v in raw.items()})
    save_file(state, str(tmp_path / "training.safetensors"))
    args = ("--num-workers", "0", "--batch-size", "20", "--limit-batches", "1", "--latent-mode", "mean")
    ema = run_cli("--model-config", config, "--ckpt-path", tmp_path / "training.safetensors",
                  "--ckpt-prefix", "autoencoder_ema.ema_model.", "--dataset-config", dataset,
                  "--output-path", tmp_path / "ema", "--sample-size", SAMPLE_SIZE, "--no-progress", *args)
    assert ema.returncode == 0, ema.stderr
    plain = encode(demo_model, dataset, tmp_path / "plain", *args)
    assert plain.returncode == 0, plain.stderr
    ema_out, plain_out = read_folder_layout(tmp_path / "ema"), read_folder_layout(tmp_path / "plain")
    assert ema_out.keys() == plain_out.keys() and len(ema_out) == 20
    for key in ema_out:
        assert np.array_equal(ema_out[key][0], plain_out[key][0])
    detected = run_cli("--model-config", config, "--ckpt-path", tmp_path / "training.safetensors",
                       "--dataset-config", dataset, "--output-path", tmp_path / "detected",
                       "--sample-size", SAMPLE_SIZE, "--no-progress", *args)
    assert detected.returncode == 0, detected.stderr  # the non-EMA copy under autoencoder.: other latents
    other = read_folder_layout(tmp_path / "detected")
    assert all(not np.allclose(other[k][0], plain_out[k][0]) for k in other)


BROKEN_BF16 = '''
import torch
import torch.nn.functional as F


def _broken(original):
    def conv(x, weight, *args, **kwargs):  # as oneDNN's AMX bf16 kernels on some CPUs: finite, wrong
        out = original(x, weight, *args, **kwargs)
        return out.flip(-1) if x.dtype == torch.bfloat16 else out
    return conv


F.conv1d, F.conv2d = _broken(F.conv1d), _broken(F.conv2d)
'''


def run_with_env(env_extra: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([WDS_ENCODE, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env_extra})


def test_bf16_that_disagrees_with_fp32_stops_before_anything_is_written(mixed_run, demo_model, tmp_path):
    _, _, _, dataset = mixed_run
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(BROKEN_BF16)  # the real command, with a broken bf16 path
    out = tmp_path / "out"
    config, ckpt = demo_model
    result = run_with_env({"PYTHONPATH": str(inject)}, "--model-config", config, "--ckpt-path", ckpt,
                          "--dataset-config", dataset, "--output-path", out, "--sample-size", SAMPLE_SIZE,
                          "--no-progress", "--precision", "bf16", "--batch-size", 4)
    assert result.returncode == 2, result.stderr
    measured = re.search(r"--precision bf16 disagrees with fp32 on cpu: relative error ([0-9.e+-]+)", result.stderr)
    assert measured and float(measured.group(1)) > 0.25, result.stderr
    assert "Nothing was written" in result.stderr and "--precision fp32" in result.stderr
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_bf16_that_agrees_with_fp32_runs_and_records_the_agreement(mixed_run, demo_model, tmp_path):
    _, _, samples, dataset = mixed_run
    out = tmp_path / "out"
    config, ckpt = demo_model
    # oneDNN kept off AMX, whose bf16 convolutions are wrong in this torch: bf16 is right on every CPU then
    result = run_with_env({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "--model-config", config, "--ckpt-path", ckpt,
                          "--dataset-config", dataset, "--output-path", out, "--sample-size", SAMPLE_SIZE,
                          "--no-progress", "--precision", "bf16", "--batch-size", 4)
    assert result.returncode == 0, result.stderr
    check = json.loads((out / "details.json").read_text())["stats"]["precision_check"]
    assert check["ok"] and check["precision"] == "bf16" and check["reference"] == "fp32"
    assert 0 < check["relative_error"] < check["limit"] == 0.25
    assert f"precision  bf16 agrees with fp32 on cpu: error {check['relative_error']:.2g}" in result.stdout
    assert len(read_folder_layout(out)) == len(samples)
