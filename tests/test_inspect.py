"""inspect.py and `wds-encode inspect`: counts equal the run's own, statistics equal numpy's on the same arrays.

The references are computed here with plain numpy over the arrays read straight from the folder
layout (`OUT/{rank}/{id}.npy` + `.json` of the ids the unit records list), over the unpadded frames
(padding_mask 1), as inspect defines them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import golden_model, run_cli, write_dataset_config, write_tar
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.tools.inspect import ChannelMoments, Reservoir, format_inspection, inspect_output, inspect_shards, \
    reason_kind
from wds_encode.tools.status import output_status
from wds_encode.storage import LocalPlace, Storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def committed_windows(out: Path) -> list[tuple[np.ndarray, dict]]:
    """(latent, metadata) of every window the unit records list, read with np.load from the folder layout."""
    found = []
    for record in records(out):
        for latent_id in record["folder_ids"]:
            base = out / str(record["rank"]) / latent_id
            found.append((np.load(f"{base}.npy"), json.loads(Path(f"{base}.json").read_text())))
    return found


def unpadded(windows: list[tuple[np.ndarray, dict]]) -> np.ndarray:
    """[C, frames] of every window's frames where its padding_mask is 1, in float64."""
    return np.concatenate([latent[:, np.asarray(md["padding_mask"], bool)].astype(np.float64)
                           for latent, md in windows], axis=1)


def records(out: Path) -> list[dict]:
    """Every committed unit record, in commit order (per rank, per writer, by journal number)."""
    return sorted(RunManifest(LocalPlace(str(out))).records(), key=lambda r: (r["rank"], r["writer"], r["seq"]))


def shard_pattern(out: Path, units: list[str], brace: str) -> str:
    """A brace pattern naming the first latent tar of each of `units` (one writer wrote them all): the
    names come from the records, `shards/{dataset}/{unit name}.{writer}-{part:03d}.tar`."""
    by_unit = {r["shard"]: r for r in records(out)}
    firsts = [by_unit[u]["latent_shards"][0] for u in units]
    writers = {by_unit[u]["writer"] for u in units}
    assert len(writers) == 1, writers
    writer = writers.pop()
    dataset = units[0].split("/")[0]
    assert firsts == [f"shards/{dataset}/{u.split('/', 1)[1]}.{writer}-000.tar" for u in units]
    return f"{out}/shards/{dataset}/{dataset}-{brace}.{writer}-000.tar"


def inspect_json(*args) -> dict:
    result = run_cli("inspect", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect_demo")
    result = run_cli("demo", folder, "--no-progress")
    assert result.returncode == 0, result.stderr
    return folder / "out"


def _tone(ext: str, seconds: float = 0.5, sr: int = 22050) -> bytes:
    from wds_encode.synth import encode_audio_bytes
    t = np.arange(int(seconds * sr)) / sr
    return encode_audio_bytes((0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[:, None], sr, ext)


@pytest.fixture(scope="module")
def params_output(tmp_path_factory, demo_model):
    """`--latent-mode params` over two datasets, one of them with bad members (errors and a warning)."""
    from wds_encode.synth import write_tar_shards
    tmp = tmp_path_factory.mktemp("inspect_params")
    write_tar_shards(tmp / "good", 2, 4, seed=5, name="g", min_seconds=0.1, max_seconds=0.5)
    (tmp / "bad").mkdir()
    write_tar(tmp / "bad" / "a.tar", [
        ("ok1.flac", _tone("flac")), ("ok1.json", b'{"text": "fine"}'),
        ("random.wav", np.random.default_rng(1).bytes(3000)), ("random2.wav", np.random.default_rng(2).bytes(3000)),
        ("zero.flac", b""), ("orphan.json", b"{}"), ("../escape.flac", _tone("flac", 0.2)),
    ])
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "good", "path": str(tmp / "good")},
                                                           {"id": "bad", "path": str(tmp / "bad")}], random_crop=False)
    config, ckpt = demo_model
    result = run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset, "--output-path",
                     tmp / "out", "--sample-size", 16384, "--latent-mode", "params", "--no-progress",
                     "--num-workers", 0, "--batch-size", 8)
    assert result.returncode == 0, result.stderr
    return tmp / "out"


@pytest.fixture(scope="module")
def discrete_output(tmp_path_factory, mixed_shards):
    """Integer tokens [num_quantizers, T] of the golden rvq model; split windows, so last ones are padded."""
    from wds_encode.synth import write_tar_shards
    tmp = tmp_path_factory.mktemp("inspect_tokens")
    write_tar_shards(tmp / "in", 2, 4, seed=7, name="t", min_seconds=0.1, max_seconds=0.4)
    dataset = write_dataset_config(tmp / "d.json", "wds", [{"id": "tok", "path": str(tmp / "in")}],
                                   random_crop=False)
    config, ckpt = golden_model("oobleck_rvq")
    result = run_cli("--model-config", config, "--ckpt-path", ckpt, "--dataset-config", dataset, "--output-path",
                     tmp / "out", "--sample-size", 8192, "--chunking", "split", "--is-discrete", "--no-progress",
                     "--num-workers", 0, "--batch-size", 8)
    assert result.returncode == 0, result.stderr
    return tmp / "out"


# ---------------------------------------------------------------------------------------- an output folder

def test_counts_equal_the_run_summary_and_the_records(demo_output):
    report = inspect_json(demo_output)
    stats = json.loads((demo_output / "details.json").read_text())["stats"]
    total = report["total"]
    assert total["units"] == stats["units_done"] == 3 and total["failed"] == 0
    assert total["samples"] == stats["samples"] == 60
    assert total["windows"] == stats["windows"] == report["sampling"]["windows_read"] == 93
    assert total["audio_hours"] == pytest.approx(stats["audio_hours"], rel=1e-12)
    assert (total["errors"], total["warnings"], total["rejected"]) == (stats["errors"], stats["warnings"], 0)
    assert report["state"] == "complete" and report["manifest"] is True and report["sampling"]["exact"] is True
    assert report["datasets"]["demo"]["windows"] == 93 and report["datasets"]["demo"]["samples"] == 60
    assert report["errors_by_reason"] == [] and report["problems"] == []

    windows = committed_windows(demo_output)
    latent = report["latent"]
    assert latent["mode"] == "sample" and latent["dtype"] == "float32"
    assert latent["shape"] == list(windows[0][0].shape) and latent["shapes"] == {"16x1024": 93}
    masks = np.concatenate([md["padding_mask"] for _, md in windows])
    assert latent["frames"] == len(masks) and latent["unpadded_frames"] == int(masks.sum())
    assert latent["padding_share"] == pytest.approx(1 - masks.mean())
    durations = [md["duration"] for _, md in windows if md["chunk_index"] == 0]
    assert report["durations"]["files"] == len(durations) == 60
    assert report["durations"]["mean_seconds"] == pytest.approx(np.mean(durations))
    # status reads the same records the same way
    status = output_status(LocalPlace(str(demo_output)))
    assert (status["samples"], status["windows"], status["errors"]) == (60, 93, 0)
    assert status["audio_hours"] == pytest.approx(total["audio_hours"]) and status["state"] == "complete"


def test_channel_statistics_equal_numpy_over_unpadded_frames(demo_output):
    report = inspect_output(LocalPlace(str(demo_output))).report
    x = unpadded(committed_windows(demo_output))
    rows = report["channels"]
    assert [r["channel"] for r in rows] == list(range(x.shape[0]))
    np.testing.assert_allclose([r["mean"] for r in rows], x.mean(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([r["std"] for r in rows], x.std(axis=1), rtol=1e-9)
    assert [r["min"] for r in rows] == x.min(axis=1).tolist() and [r["max"] for r in rows] == x.max(axis=1).tolist()
    g = report["global"]
    assert g["std"] == pytest.approx(x.std(), rel=1e-9) and g["mean"] == pytest.approx(x.mean(), rel=1e-9)
    assert g["scale_factor"] == pytest.approx(1 / x.std(), rel=1e-9) and g["pretransform_scale"] == g["std"]
    assert g["values"] == x.size and report["stats_over"] == "unpadded frames (padding_mask == 1)"


def test_the_text_report_is_an_aligned_table(demo_output):
    result = run_cli("inspect", demo_output)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"wds-encode inspect of {demo_output}\n")
    assert "all 93 windows: exact statistics, over unpadded frames (padding_mask == 1)" in out
    assert "latents    sample, float32 [16, 1024]; padding" in out and "0 errors, 0 warnings" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["dataset", "units"])
    row = lines[lines.index(header) + 1].split()
    assert row[:5] == ["demo", "3", "0", "60", "93"]
    table = [line for line in lines if line.split()[:1] == ["channel"]][0]
    channel_rows = lines[lines.index(table) + 1:lines.index(table) + 18]
    assert [r.split()[0] for r in channel_rows] == [str(c) for c in range(16)] + ["all"]
    assert len({len(r) for r in channel_rows}) == 1  # right-aligned columns
    assert "scale_factor " in out and "= 1 / std" in out


def test_uncommitted_leftovers_are_not_counted(demo_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_output, out)
    stray = f"{records(out)[0]['writer']}-000999-0000"   # a writer's window file that no record lists
    np.save(out / "0" / f"{stray}.npy", np.full((16, 1024), 1e6, np.float32))
    (out / "0" / f"{stray}.json").write_text(json.dumps({"padding_mask": [1] * 1024}))
    before = inspect_output(LocalPlace(str(demo_output))).report
    after = inspect_output(LocalPlace(str(out))).report
    assert after["global"] == before["global"] and after["latent"]["frames"] == before["latent"]["frames"]
    first = records(out)[0]
    rank, removed = first["rank"], first["folder_ids"][0]
    (out / str(rank) / f"{removed}.npy").unlink()  # a file a record lists but the output lacks: said, not fatal
    damaged = inspect_output(LocalPlace(str(out))).report
    assert damaged["sampling"]["windows_read"] == 92
    assert damaged["problems"] == [
        f"1 files listed by unit records are missing (first: {out}/{rank}/{removed}.npy)"]


def test_max_windows_samples_and_says_so(demo_output):
    sampled = inspect_output(LocalPlace(str(demo_output)), max_windows=10, seed=3)
    again = inspect_output(LocalPlace(str(demo_output)), max_windows=10, seed=3)
    assert sampled.report == again.report  # seeded
    s = sampled.report["sampling"]
    assert (s["windows_read"], s["windows_total"], s["exact"]) == (10, 93, False)
    assert "sampled 10 of 93 windows" in format_inspection(sampled.report)
    assert sampled.report["total"]["windows"] == 93  # the counts still come from every record
    assert sampled.report["latent"]["frames"] == 10 * 1024


def test_plot_is_a_png_with_per_channel_distributions(demo_output, tmp_path):
    path = tmp_path / "inspect.png"
    result = run_cli("inspect", demo_output, "--plot", path)
    assert result.returncode == 0, result.stderr
    assert f"plot       {path}" in result.stdout
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    from PIL import Image
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400
    import matplotlib.image
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[:2] == (image.size[1], image.size[0])
    assert pixels.std() > 0.01  # not a blank canvas


def test_plot_without_matplotlib_says_what_to_install(demo_output, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wds_encode.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    result = CliRunner().invoke(main, ["inspect", str(demo_output), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "pip install 'wds-encode[plot]'" in result.output and not (tmp_path / "x.png").exists()


def test_errors_are_one_actionable_line(tmp_path):
    from click.testing import CliRunner

    from wds_encode.cli import main
    result = run_cli("inspect", tmp_path / "nothing")
    assert result.returncode == 2 and "no details.json" in result.stderr and ".tar paths" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    missing = CliRunner().invoke(main, ["inspect", f"{tmp_path}/shards/x-{{000..001}}.tar"])
    assert missing.exit_code == 2 and "2 of 2 shards do not exist" in missing.stderr
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    broken = CliRunner().invoke(main, ["inspect", str(tmp_path / "bad.tar")])
    assert broken.exit_code == 0 and "warning    " in broken.stdout and "tar read failed" in broken.stdout


# ---------------------------------------------------------------------------------------- latent shards, S3

def test_shard_urls_give_the_same_statistics_without_unit_counts(demo_output):
    pattern = shard_pattern(demo_output, ["demo/demo-000000", "demo/demo-000001", "demo/demo-000002"],
                            "{000000..000002}")
    shards = inspect_json(pattern)
    full = inspect_output(LocalPlace(str(demo_output))).report
    assert shards["manifest"] is False and "no manifest" in shards["note"]
    assert "errors_by_reason" not in shards and "units" not in shards["total"]
    assert shards["total"]["tars"] == 3 and shards["total"]["windows"] == 93 and shards["total"]["files"] == 60
    assert shards["total"]["audio_hours"] == pytest.approx(full["total"]["audio_hours"], rel=1e-9)
    assert shards["datasets"]["demo"]["units_seen"] == 3
    for a, b in zip(shards["channels"], full["channels"]):
        assert a == pytest.approx(b, rel=1e-9)
    assert shards["global"].pop("std_of") == full["global"].pop("std_of")
    assert shards["global"] == pytest.approx(full["global"], rel=1e-9)
    text = run_cli("inspect", pattern).stdout
    assert "no manifest: unit, rejection and error counts are not known" in text
    first = inspect_shards(Storage(), [pattern], max_windows=5).report["sampling"]
    assert first["windows_read"] == 5 and first["exact"] is False and "the first 5 windows" in first["text"]


def test_an_s3_output_reads_exactly_like_the_local_folder(demo_output, s3_in_process):
    s3_in_process.make_bucket("out")
    for path in demo_output.rglob("*"):
        if path.is_file():
            s3_in_process.put("out", f"run/{path.relative_to(demo_output).as_posix()}", path.read_bytes())
    local = inspect_output(LocalPlace(str(demo_output))).report
    remote = inspect_output(Storage().place("s3://out/run/")).report
    assert remote.pop("output") == "s3://out/run/" and local.pop("output") == str(demo_output)
    assert remote == local
    pattern = shard_pattern(demo_output, ["demo/demo-000000", "demo/demo-000001"], "{000000,000001}")
    shards = inspect_shards(Storage(), ["s3://out/run/" + pattern[len(f"{demo_output}/"):]]).report
    assert shards["total"]["tars"] == 2 and shards["total"]["windows"] == sum(
        r["windows"] for r in records(demo_output) if r["shard"] in ("demo/demo-000000", "demo/demo-000001"))


# ---------------------------------------------------------------------------------------- params, tokens

def test_params_output_statistics_errors_and_datasets(params_output):
    report = inspect_json(params_output)
    windows = committed_windows(params_output)
    x = unpadded(windows)
    half = x.shape[0] // 2
    mean, std = x[:half], x[half:]
    rows = report["channels"]
    assert report["latent"]["mode"] == "params" and len(rows) == half
    np.testing.assert_allclose([r["mean"] for r in rows], mean.mean(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([r["std"] for r in rows], mean.std(axis=1), rtol=1e-9)
    np.testing.assert_allclose([r["posterior_std_mean"] for r in rows], std.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose([r["sample_std"] for r in rows],
                               np.sqrt(mean.var(axis=1) + (std ** 2).mean(axis=1)), rtol=1e-9)
    sample_std = np.sqrt(mean.var() + (std ** 2).mean())
    assert report["global"]["std"] == pytest.approx(sample_std, rel=1e-9)
    assert report["global"]["scale_factor"] == pytest.approx(1 / sample_std, rel=1e-9)
    assert "mean of std^2" in report["global"]["std_of"]

    recs = records(params_output)
    assert (report["datasets"]["good"]["windows"], report["datasets"]["bad"]["windows"]) == (8, 2)  # one per file
    for name in ("good", "bad"):
        mine = [r for r in recs if r["shard"].startswith(f"{name}/")]
        row = report["datasets"][name]
        assert row["units"] == len(mine) and row["samples"] == sum(r["samples"] for r in mine)
        assert row["windows"] == row["windows_read"] == sum(r["windows"] for r in mine)
        assert row["errors"] == sum(r["errors"] for r in mine)
    problems = [p for r in recs for p in r["problems"]]
    groups = report["errors_by_reason"]
    assert sum(g["count"] for g in groups) == len(problems) == report["total"]["errors"] + report["total"]["warnings"]
    assert report["total"]["errors"] >= 3 and report["total"]["warnings"] >= 1
    assert groups[0]["level"] == "error" and groups[-1]["level"] == "warning"
    assert len(groups) < len(problems)  # random.wav and random2.wav share a reason kind
    assert any(g["count"] == 2 and g["example"]["key"] in ("random", "random2") for g in groups)
    text = run_cli("inspect", params_output).stdout
    assert "post.std" in text and "level    reason" in text and "bad/a/" in text


def test_discrete_output_token_histograms_and_codebook_usage(discrete_output):
    report = inspect_json(discrete_output)
    windows = committed_windows(discrete_output)
    tokens = np.concatenate([t[:, np.asarray(md["padding_mask"], bool)].astype(np.int64) for t, md in windows],
                            axis=1)
    q, size = windows[0][1]["num_quantizers"], windows[0][1]["codebook_size"]
    assert report["latent"]["mode"] == "tokens" and report["latent"]["dtype"] == "uint8"
    assert report["latent"]["padding_share"] > 0 and "channels" not in report
    assert len(report["tokens"]) == q == 3
    for row, ids in zip(report["tokens"], tokens):
        counts = np.bincount(ids, minlength=size)
        assert row["counts"] == counts.tolist() and row["tokens"] == len(ids) and row["codebook_size"] == size
        assert row["used"] == int((counts > 0).sum()) and row["usage"] == pytest.approx((counts > 0).mean())
        p = counts[counts > 0] / counts.sum()
        assert row["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    text = run_cli("inspect", discrete_output, "--plot", discrete_output.parent / "tokens.png")
    assert text.returncode == 0, text.stderr
    assert "quantizer  codebook  used  usage  perplexity" in text.stdout
    assert (discrete_output.parent / "tokens.png").read_bytes()[:8] == PNG_SIGNATURE
    shards = inspect_shards(Storage(), [str(discrete_output / "shards")]).report
    assert [t["counts"] for t in shards["tokens"]] == [t["counts"] for t in report["tokens"]]


# ---------------------------------------------------------------------------------------- the streaming parts

def test_channel_moments_merge_to_numpy_and_reservoir_stays_bounded():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(4, n)).astype(np.float32) for n in (1, 7, 500, 0, 33)]
    moments = ChannelMoments(4)
    for chunk in chunks:
        moments.add(chunk)
    x = np.concatenate(chunks, axis=1).astype(np.float64)
    np.testing.assert_allclose(moments.mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.var, x.var(axis=1), rtol=1e-12)
    mean, var = moments.pooled()
    assert mean == pytest.approx(x.mean(), rel=1e-12) and var == pytest.approx(x.var(), rel=1e-12)
    reservoir = Reservoir(100, np.random.default_rng(1))
    for start in range(0, 10_000, 37):
        reservoir.add(np.arange(start, min(start + 37, 10_000), dtype=np.float64))
    kept = reservoir.values()
    assert len(kept) == 100 and len(set(kept.tolist())) == 100 and reservoir.seen == 10_000
    assert 3000 < kept.mean() < 7000  # uniform over the stream, not its head


def test_reason_kind_groups_what_varies_per_sample():
    assert reason_kind("a-001.wav: no audio frames in .wav data") == "no audio frames in .wav data"
    assert reason_kind("b.flac: decoded 10 of 200 samples for window at 3") == \
        "decoded N of N samples for window at N"
    assert reason_kind("unsafe key '../x' written as 'x'") == "unsafe key '…' written as '…'"
    assert reason_kind("sample has no audio member (mp3/m4a)") == "sample has no audio member (mp3/m4a)"
    assert len(reason_kind("x" * 500)) == 100
