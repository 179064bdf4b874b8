"""verify.py and `wds-encode verify`: a round trip that passes for the right model and flags a wrong one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli, write_tar
from wds_encode.models.demo_model import demo_state_dict
from wds_encode.synth import encode_audio_bytes
from wds_encode.storage import LocalPlace, Storage
from wds_encode.tools.verify import WindowCheck, pick_windows, read_source, snr_db, verdict


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    result = run_cli("demo", folder, "--no-progress")
    assert result.returncode == 0, result.stderr
    return folder / "out"


def test_verify_passes_with_the_model_that_wrote_the_output(demo_output):
    result = run_cli("verify", demo_output, "-n", 12)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["window", "snr_db", "mel", "rank", "reencode"]
    rows = [line.split() for line in lines[1:13]]
    assert len(rows) == 12
    snrs = [float(r[1]) for r in rows]
    assert np.median(snrs) > 0  # the bundled demo VAE is trained: better than silence
    assert all(float(r[4]) < 1e-4 for r in rows)  # re-encoding reproduces the stored latents
    assert "OK: 12 windows match this model" in result.stdout


def test_verify_checks_full_length_windows_at_their_own_length(demo_output, tmp_path, demo_model):
    """`--chunking full` writes each file at its own length (rounded up to the ratio): verify re-encodes
    each at that length, not at --sample-size, and compares decoded audio of differing lengths."""
    out = tmp_path / "full"
    run = run_cli("run", "--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config",
                  demo_output.parent / "dataset_config.json", "--output-path", out, "--chunking", "full",
                  "--batch-size", "4", "--num-workers", "1", "--devices", "1", "--no-progress")
    assert run.returncode == 0, run.stderr
    lengths = {json.loads(p.read_text())["latent_length"] for p in out.glob("0/*.json")}
    assert len(lengths) > 3                     # windows really differ in length
    result = run_cli("verify", out, "-n", 8)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:9]]
    assert all(float(r[4]) < 1e-4 for r in rows)
    assert "OK: 8 windows match this model" in result.stdout


def test_verify_flags_a_wrong_checkpoint(demo_output, tmp_path, demo_model):
    wrong = tmp_path / "untrained.safetensors"
    save_file(demo_state_dict(), str(wrong))  # same architecture, the untrained seeded weights
    result = run_cli("verify", demo_output, "-n", 12, "--model-config", demo_model[0], "--ckpt-path", wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FLAGGED: " in result.stdout
    assert "is not the checkpoint this output was encoded with" in result.stdout
    assert "re-encoding the sources gives different latents" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()[1:13]]
    assert np.median([float(r[1]) for r in rows]) < 0


def test_verify_errors_are_clear(tmp_path):
    result = run_cli("verify", tmp_path)
    assert result.returncode == 2 and "no details.json" in result.stderr


def test_snr_and_verdict():
    x = torch.sin(torch.linspace(0, 100, 1000))[None]
    assert snr_db(x, x) == float("inf")
    assert snr_db(x, x * 0.9) == pytest.approx(20.0, abs=1e-3)
    assert snr_db(x, torch.zeros_like(x)) == pytest.approx(0.0, abs=1e-6)
    good = [WindowCheck(str(i), "k", 10.0, 0.5, 1e-7, rank=0) for i in range(4)]
    assert verdict(good) == []
    assert verdict(good, min_snr_db=12.0)[0].startswith("median round-trip SNR")
    shuffled = [WindowCheck(str(i), "k", -3.0, 2.0, 1e-7, rank=2) for i in range(4)]
    assert "not recognisably their sources" in verdict(shuffled)[0]
    reencoded = [WindowCheck(str(i), "k", None, None, 0.3) for i in range(4)]
    assert "different latents" in verdict(reencoded)[0]


def test_read_source_from_tar_member_and_file(tmp_path):
    audio = np.zeros((100, 1), np.float32)
    data = encode_audio_bytes(audio, 16000, "wav")
    write_tar(tmp_path / "s.tar", [("a.json", b"{}"), ("a.wav", data), ("b.wav", b"x")])
    storage = Storage()
    assert read_source(f"{tmp_path / 's.tar'}#a.wav", storage) == (data, "wav")
    (tmp_path / "f.flac").write_bytes(b"abc")
    assert read_source(str(tmp_path / "f.flac"), storage) == (b"abc", "flac")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_source(f"{tmp_path / 's.tar'}#zzz.wav", storage)


def test_pick_windows_is_deterministic(tmp_path):
    (tmp_path / "0").mkdir()
    for i in range(20):
        np.save(tmp_path / "0" / f"000000000{i:04d}.npy", np.zeros(1))
    place = LocalPlace(str(tmp_path))
    first = pick_windows(place, 5, seed=1)
    assert first == pick_windows(place, 5, seed=1) and len(first) == 5
    assert len(pick_windows(place, 50)) == 20
    with pytest.raises(FileNotFoundError):
        pick_windows(LocalPlace(str(tmp_path / "empty")), 3)


def test_pick_windows_takes_only_committed_windows(demo_output, tmp_path):
    """After an interrupted run (no rerun yet) a rank folder holds windows no record lists: not the output."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(demo_output, out)
    committed = pick_windows(LocalPlace(str(out)), 10_000)
    stray = out / "0" / "0009999990000.npy"
    np.save(stray, np.zeros((16, 4), np.float32))
    stray.with_suffix(".json").write_text("{}")
    assert pick_windows(LocalPlace(str(out)), 10_000) == committed and "0/0009999990000.npy" not in committed
    assert len(committed) == len(list(demo_output.glob("[0-9]*/*.npy")))


def test_verify_without_a_runnable_decoder_checks_re_encoding_only(demo_output, demo_model, tmp_path):
    config = json.loads(demo_model[0].read_text())
    config["model"]["decoder"]["type"] = "local_attn"  # a decoder this version cannot build
    path = tmp_path / "no_decoder.json"
    path.write_text(json.dumps(config))
    result = run_cli("verify", demo_output, "-n", 4, "--model-config", path, "--ckpt-path", demo_model[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checking re-encoding only" in result.stderr
    assert "no decoder: SNR and mel distance not computed" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()[1:5]]
    assert all(r[1] == "-" and float(r[4]) < 1e-4 for r in rows)


def test_verify_with_an_unreadable_checkpoint_is_a_clear_error(demo_output, demo_model, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    result = run_cli("verify", demo_output, "--model-config", demo_model[0], "--ckpt-path", broken)
    assert result.returncode == 2 and "wds-encode verify: error:" in result.stderr and "Traceback" not in result.stderr
