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
from wds_encode.tools.verify import (WindowCheck, format_figures, negative_snr_note, pick_windows,
                                     read_source, snr_db, verdict)


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


FULL_SAMPLE_SIZE = 65536   # the demo's --sample-size: most demo files (0.3-3 s at 44.1 kHz) are longer


@pytest.fixture(scope="module")
def full_output(demo_output, demo_model, tmp_path_factory):
    """The demo dataset encoded with `--chunking full` and the demo's --sample-size 65536: every file at its
    own length rounded up to the ratio, most of them longer than --sample-size (issue 28)."""
    out = tmp_path_factory.mktemp("verify-full") / "full"
    run = run_cli("run", "--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config",
                  demo_output.parent / "dataset_config.json", "--output-path", out, "--chunking", "full",
                  "--sample-size", FULL_SAMPLE_SIZE, "--max-chunks", "4", "--batch-size", "4", "--num-workers", "1",
                  "--devices", "1", "--no-progress")
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def full_verified(full_output):
    """`wds-encode verify` of `full_output` with the model that wrote it (8 windows)."""
    return run_cli("verify", full_output, "-n", 8)


def figure(stdout: str, name: str) -> str:
    """The value printed beside a verify figure (`median SNR   5.18 dB  (...)` -> `5.18`)."""
    lines = [line for line in stdout.splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, stdout
    return lines[0][len(name):].split()[0]


def test_verify_checks_full_length_windows_at_their_own_length(full_output, full_verified):
    """`--chunking full` writes each file at its own length rounded up to the ratio, past --sample-size for a
    long file: verify re-encodes each at that length (not cut to the audio or to --sample-size) and passes."""
    windows = {md["latent_id"]: md for md in (json.loads(p.read_text()) for p in full_output.glob("0/*.json"))}
    assert len({md["latent_length"] for md in windows.values()}) > 3     # windows really differ in length
    result = full_verified
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:9]]
    assert len(rows) == 8 and all(float(r[4]) < 1e-4 for r in rows)
    # the windows that were flagged before: longer than --sample-size, not a whole number of latent frames
    long = [windows[r[0]] for r in rows if windows[r[0]]["valid_length"] > FULL_SAMPLE_SIZE
            and windows[r[0]]["valid_length"] % 64]
    assert len(long) >= 2, result.stdout
    assert all(md["latent_length"] == -(-md["valid_length"] // 64) for md in long)
    assert "latent shape" not in result.stdout and "FLAGGED" not in result.stdout
    assert "OK: 8 windows match this model" in result.stdout


def test_verify_flags_a_wrong_model_on_full_length_windows(full_output, demo_model, tmp_path):
    """The same output with the demo architecture's untrained weights: flagged because re-encoding gives other
    latents (the shapes agree, so every window is checked), not because windows could not be checked."""
    wrong = tmp_path / "untrained.safetensors"
    save_file(demo_state_dict(), str(wrong))
    result = run_cli("verify", full_output, "-n", 8, "--model-config", demo_model[0], "--ckpt-path", wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:9]]
    assert len(rows) == 8 and all(1e-3 < float(r[4]) < float("inf") for r in rows)
    assert "re-encoding the sources gives different latents" in result.stdout
    assert "could not be checked" not in result.stdout and "latent shape" not in result.stdout
    assert float(figure(result.stdout, "median re-encode difference")) > 1e-3   # the figures, flagged or not
    assert figure(result.stdout, "checkpoint") == "NOT"
    assert "OK:" not in result.stdout


def test_verify_prints_the_figures_it_judged_by_and_explains_a_negative_snr(full_verified):
    """An OK verdict shows the medians it was taken from, each beside its limit, and says in one line why a
    negative SNR does not make the output wrong."""
    result = full_verified
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:9]]
    snrs, mels, reencodes = ([float(r[i]) for r in rows] for i in (1, 2, 4))
    assert float(figure(result.stdout, "median SNR")) == pytest.approx(np.median(snrs), abs=0.01)
    assert float(figure(result.stdout, "median mel distance")) == pytest.approx(np.median(mels), abs=1e-3)
    assert float(figure(result.stdout, "median re-encode difference")) == pytest.approx(np.median(reencodes),
                                                                                        rel=0.02)
    closest = sum(int(r[3]) == 0 for r in rows)
    assert f"closest to own source        {closest} of 8 decoded windows" in result.stdout
    assert "(flagged above 0.001" in result.stdout and "(flagged below 50%" in result.stdout
    assert "median SNR" in result.stdout and "not judged; --min-snr DB flags a median below DB" in result.stdout
    negative = sum(v < 0 for v in snrs)
    assert negative > 0            # the small demo model: some windows decode below 0 dB, and still pass
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert notes == [notes[0]] and notes[0].startswith(f"note: {negative} of 8 windows have a negative SNR")
    assert "does not judge by SNR unless --min-snr is given" in notes[0]
    lines = result.stdout.splitlines()
    assert lines.index(notes[0]) == lines.index("OK: 8 windows match this model") + 1


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
    lossy = good[:3] + [WindowCheck("3", "k", -2.4, 0.6, 1e-7, rank=0)]
    assert verdict(lossy) == [] and negative_snr_note(good) is None
    assert negative_snr_note(lossy).startswith("note: 1 of 4 windows have a negative SNR")
    assert "judges SNR only by its median, against --min-snr 3 dB" in negative_snr_note(lossy, 3.0)
    shown = format_figures(lossy, 3.0)
    assert "median SNR                   10.00 dB  (flagged below --min-snr 3 dB)" in shown
    assert "closest to own source        4 of 4 decoded windows (100%)" in shown
    assert "median re-encode difference  1e-07" in shown and "median mel distance          0.500" in shown
    assert "windows not checked" not in shown
    assert "windows not checked          1 of 1" in format_figures([WindowCheck("0", "k", None, None, None, "gone")])


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
