"""`--no-folder`: only the latent shards and the unit records are written (no `OUT/{rank}/` files), and
every reader of an output (status, inspect, verify, the training loader) works from the shards, giving
what it gives for a `--folder` run of the same input. The real command, on real tar shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import WDS_ENCODE, read_latent_shards, run_cli, write_dataset_config
from s3_support import s3_env
from wds_encode.loader import LatentSourceError, latent_loader
from wds_encode.pipeline.manifest import RunManifest
from wds_encode.storage import LocalPlace, Storage
from wds_encode.tools.inspect import inspect_output

SAMPLE_SIZE = 65536      # ~1.5 s at the demo model's 44.1 kHz: files of 0.5-2.5 s give 1-2 windows
RTOL = 1e-4              # latents of two processes: the same computation, rounding may differ


def encode_args(demo_model, dataset: Path, out, *extra) -> list[str]:
    config, ckpt = demo_model
    return ["--model-config", str(config), "--ckpt-path", str(ckpt), "--dataset-config", str(dataset),
            "--output-path", str(out), "--sample-size", str(SAMPLE_SIZE), "--chunking", "split",
            "--batch-size", "3", "--num-workers", "1", "--devices", "1", "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """3 units x 4 files (FLAC and WAV, 0.5-2.5 s)."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("nofolder-in")
    _, samples = write_tar_shards(folder / "in", 3, 4, seed=21, name="nf", min_seconds=0.5, max_seconds=2.5,
                                  formats=("flac", "wav"))
    dataset = write_dataset_config(folder / "d.json", "wds", [{"id": "nf", "path": str(folder / "in")}],
                                   random_crop=False)
    return dataset, samples


@pytest.fixture(scope="module")
def outputs(inputs, demo_model, tmp_path_factory):
    """The same input encoded twice: `--folder` (the default) and `--no-folder`."""
    dataset, _ = inputs
    root = tmp_path_factory.mktemp("nofolder-out")
    for name, flag in (("folder", "--folder"), ("shards", "--no-folder")):
        result = run_cli(*encode_args(demo_model, dataset, root / name, flag))
        assert result.returncode == 0, result.stderr
    return root / "folder", root / "shards"


def files_of(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def without_writer(tar: str) -> str:
    """A latent tar's name with its writer id taken out: `shards/nf/nf-000000.r0-g1-a1b2c3-000.tar` ->
    `shards/nf/nf-000000-000.tar`, the same for two runs that wrote the same unit's parts."""
    return re.sub(r"\.r\d+-g\d+-[0-9a-f]{6}-(\d{3,}\.tar)$", r"-\1", tar)


def records_of(out) -> list[dict]:
    return RunManifest(Storage().place(str(out))).records()


def by_name(windows) -> dict[str, tuple[np.ndarray, dict]]:
    return {f"{md['source_shard']}/{md['key']}": (np.asarray(latent), md) for latent, md in windows}


def assert_same_windows(a: dict[str, tuple[np.ndarray, dict]], b: dict[str, tuple[np.ndarray, dict]]) -> None:
    assert sorted(a) == sorted(b) and a
    for name, (latent, md) in a.items():
        other, other_md = b[name]
        assert latent.shape == other.shape and latent.dtype == other.dtype, name
        np.testing.assert_allclose(latent, other, rtol=RTOL, atol=RTOL * float(np.abs(other).max()), err_msg=name)
        strip = ("latent_id", "latent_url", "latent_key", "latent_filename", "padding_mask")
        assert {k: v for k, v in md.items() if k not in strip} == {k: v for k, v in other_md.items() if k not in strip}


# ------------------------------------------------------------------------------------------ what is written

def test_no_folder_writes_the_latent_shards_and_the_records_only(outputs, inputs):
    folder_out, shards_out = outputs
    _, samples = inputs
    written = files_of(shards_out)
    assert not [f for f in written if f.split("/", 1)[0].isdigit()], "no OUT/{rank}/ file"
    assert {f for f in files_of(folder_out) if f.split("/", 1)[0].isdigit()}, "the folder run has them"
    tars = {f for f in written if f.startswith("shards/")}
    # the same latent tars as the folder run's, but for the writer id in their names
    assert {without_writer(f) for f in tars} == {without_writer(f) for f in files_of(folder_out)
                                                 if f.startswith("shards/")}
    assert len({without_writer(f) for f in tars}) == len(tars)
    records = records_of(shards_out)
    assert len(records) == 3 and all(r["folder_ids"] == [] and r["latent_shards"] for r in records)
    assert {t for r in records for t in r["latent_shards"]} == tars
    assert all(t.startswith(f"shards/{r['shard']}.{r['writer']}-") for r in records for t in r["latent_shards"])
    assert (shards_out / "filelist.txt").read_text() == ""
    details = json.loads((shards_out / "details.json").read_text())
    assert details["args"]["folder"] is False
    # the identity says so: resuming it with the folder layout would leave that layout with some units only
    folder_identity = json.loads((folder_out / "details.json").read_text())["run_identity"]
    assert details["run_identity"]["options"] == {**folder_identity["options"], "folder": False}
    assert details["run_identity"]["checkpoint_sha256"] == folder_identity["checkpoint_sha256"]
    # every input file once, with the same windows and latents as the folder run's shards
    shards = read_latent_shards(shards_out)
    assert sorted({md["__key__"] for _, md in shards.values()}) == sorted(s.key for s in samples)
    assert_same_windows(shards, read_latent_shards(folder_out))


def test_no_folder_with_no_shards_is_refused_before_anything_is_written(inputs, demo_model, tmp_path):
    dataset, _ = inputs
    result = run_cli(*encode_args(demo_model, dataset, tmp_path / "out", "--no-folder", "--no-shards"))
    assert result.returncode == 2
    assert "--no-folder with --no-shards would write no latents" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_resuming_with_the_other_setting_is_refused(outputs, inputs, demo_model, tmp_path):
    import shutil
    dataset, _ = inputs
    for name, flag in (("shards", "--folder"), ("folder", "--no-folder")):
        copy = tmp_path / name
        shutil.copytree(outputs[name == "shards"], copy)
        result = run_cli(*encode_args(demo_model, dataset, copy, flag))
        assert result.returncode == 2 and "changed: options.folder" in result.stderr, result.stderr


def test_the_config_refuses_neither_form_and_keeps_folder_in_the_recorded_args(demo_model, tmp_path):
    from wds_encode.config import ConfigError, encode_config_from
    base = {"model_config": demo_model[0], "ckpt_path": demo_model[1], "dataset_config": tmp_path / "d.json",
            "output_path": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="--no-folder with --no-shards would write no latents"):
        encode_config_from({"folder": False}, {**base, "shards": False})
    config = encode_config_from({"folder": False}, base)   # from a config file, as --config gives it
    assert config.folder is False and config.shards is True and config.as_args()["folder"] is False
    assert encode_config_from(None, base).folder is True


def test_the_option_is_in_the_help_beside_shards():
    help_text = " ".join(run_cli("run", "--help").stdout.split())
    assert "--folder / --no-folder" in help_text and "only the latent shards" in help_text
    assert help_text.index("--folder / --no-folder") < help_text.index("--shards / --no-shards")


# ------------------------------------------------------------------------------------------ what reads it

def json_reports(command: str, outputs) -> dict:
    """`wds-encode COMMAND OUT --json` of each output."""
    reports = {}
    for out in outputs:
        result = run_cli(command, out, "--json")
        assert result.returncode == 0, result.stderr
        reports[out] = json.loads(result.stdout)
    return reports


def test_status_is_the_same_as_for_a_folder_run(outputs):
    folder_out, shards_out = outputs
    status = json_reports("status", outputs)
    for key in ("state", "units", "samples", "windows", "audio_hours", "errors", "warnings"):
        assert status[shards_out][key] == status[folder_out][key], key
    assert status[shards_out]["state"] == "complete"


def test_inspect_reads_the_windows_from_the_shards(outputs):
    folder_out, shards_out = outputs
    reports = json_reports("inspect", outputs)
    a, b = reports[shards_out], reports[folder_out]
    assert a["problems"] == [] and a["sampling"]["exact"] is True
    assert a["sampling"]["windows_read"] == b["sampling"]["windows_read"] == b["total"]["windows"] > 3
    assert a["total"] == b["total"] and a["datasets"] == b["datasets"]
    assert a["latent"] == b["latent"] and a["durations"] == pytest.approx(b["durations"])
    for x, y in zip(a["channels"], b["channels"]):
        assert x == pytest.approx(y, rel=1e-3, abs=1e-5)
    assert a["global"].pop("std_of") == b["global"].pop("std_of")
    assert a["global"] == pytest.approx(b["global"], rel=1e-3, abs=1e-5)
    # a seeded sample reads only the picked windows, from the tars of their units
    sampled = inspect_output(LocalPlace(str(shards_out)), max_windows=3, seed=2).report
    assert sampled["sampling"]["windows_read"] == 3 and sampled["problems"] == []
    assert sampled == inspect_output(LocalPlace(str(shards_out)), max_windows=3, seed=2).report


def test_inspect_reports_a_missing_latent_tar_instead_of_failing(outputs, tmp_path):
    import shutil
    _, shards_out = outputs
    out = tmp_path / "out"
    shutil.copytree(shards_out, out)
    gone = records_of(out)[0]["latent_shards"][0]
    (out / gone).unlink()
    report = inspect_output(LocalPlace(str(out))).report
    assert any(gone in problem for problem in report["problems"]), report["problems"]
    assert report["sampling"]["windows_read"] == report["total"]["windows"] - records_of(out)[0]["windows"]


def test_verify_takes_its_windows_from_the_shards(outputs):
    _, shards_out = outputs
    result = run_cli("verify", shards_out, "-n", 4)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:5]]
    shard_ids = {md["latent_id"] for _, md in read_latent_shards(shards_out).values()}
    assert len(rows) == 4 and all(r[0] in shard_ids for r in rows)
    assert all(float(r[4]) < 1e-4 for r in rows)  # re-encoding reproduces the stored latents
    assert "OK: 4 windows match this model" in result.stdout


def test_verify_flags_a_wrong_checkpoint_from_the_shards(outputs, demo_model, tmp_path):
    from safetensors.torch import save_file

    from wds_encode.models.demo_model import demo_state_dict
    _, shards_out = outputs
    wrong = tmp_path / "untrained.safetensors"
    save_file(demo_state_dict(), str(wrong))
    result = run_cli("verify", shards_out, "-n", 4, "--model-config", demo_model[0], "--ckpt-path", wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "re-encoding the sources gives different latents" in result.stdout


def test_the_loader_yields_the_folder_runs_windows_from_the_shards(outputs):
    folder_out, shards_out = outputs
    read = {}
    for out, form in ((shards_out, "shards"), (folder_out, "folder"), (folder_out, "shards")):
        loader = latent_loader(str(out), 4, form=form, num_workers=0, shuffle=False)
        read[out, form] = by_name((latent, md) for latents, metadata in loader
                                  for latent, md in zip(latents.numpy(), metadata))
    assert_same_windows(read[shards_out, "shards"], read[folder_out, "folder"])
    assert_same_windows(read[shards_out, "shards"], read[folder_out, "shards"])
    with pytest.raises(LatentSourceError, match="--no-folder"):
        latent_loader(str(shards_out), 4, form="folder", num_workers=0)


# ------------------------------------------------------------------------------------------ killed and rerun

KILL_AT_SECOND_COMMIT = '''
import os
import signal
from pathlib import Path

from wds_encode.pipeline import writers

MARK = Path(os.environ["WDS_TEST_KILL_MARK"])
_commit = writers.LatentShardWriter.commit
_done = []


def commit(self):  # the second unit's tars become visible, then the process dies before its record
    parts = _commit(self)
    _done.append(self.name)
    if len(_done) == 2 and not MARK.exists():
        MARK.write_text(self.name)
        os.kill(os.getpid(), signal.SIGKILL)
    return parts


writers.LatentShardWriter.commit = commit
'''


@pytest.fixture(scope="module")
def killed_and_rerun(inputs, demo_model, tmp_path_factory):
    """A --no-folder run SIGKILLed right after its second unit's latent tars were committed (no record yet),
    then the same command again."""
    dataset, samples = inputs
    root = tmp_path_factory.mktemp("nofolder-kill")
    inject = root / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_AT_SECOND_COMMIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])),
           "WDS_TEST_KILL_MARK": str(root / "killed")}
    out = root / "out"
    args = encode_args(demo_model, dataset, out, "--no-folder", "--batch-size", 2)
    process = subprocess.Popen([WDS_ENCODE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        process.wait(timeout=300)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its decode worker too
        except ProcessLookupError:
            pass
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    killed_unit = (root / "killed").read_text()
    orphans = sorted(str(p.relative_to(out)) for p in (out / "shards").rglob(f"{killed_unit}-*.tar"))
    assert orphans, "the kill came after the second unit's tars were committed"
    assert len(records_of(out)) == 1
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    return out, samples, rerun


def test_a_killed_no_folder_run_then_a_rerun_has_every_sample_exactly_once(killed_and_rerun, outputs):
    out, samples, rerun = killed_and_rerun
    assert "2 encoded, 1 already done" in rerun.stdout
    shards = read_latent_shards(out)        # fails on a duplicate output key
    chunks: dict[str, list[int]] = {}
    for _, md in shards.values():
        chunks.setdefault(md["__key__"], []).append(md["chunk_index"])
    assert sorted(chunks) == sorted(s.key for s in samples)
    for key, indices in chunks.items():
        assert sorted(indices) == list(range(len(indices))), key
    records = records_of(out)
    assert len(records) == 3 and {t for r in records for t in r["latent_shards"]} == {
        f for f in files_of(out) if f.startswith("shards/")}, "no orphan tar is left"
    assert not [f for f in files_of(out) if f.split("/", 1)[0].isdigit() or f.endswith(".partial")]
    assert_same_windows(shards, read_latent_shards(outputs[1]))


def test_window_ids_are_not_reused_after_a_killed_no_folder_run(killed_and_rerun):
    out, _, _ = killed_and_rerun
    ids = [md["latent_id"] for _, md in read_latent_shards(out).values()]
    assert len(ids) == len(set(ids)), "a rerun starts its batch ids after the committed units' ones"


# ------------------------------------------------------------------------------------------ S3

def test_an_s3_no_folder_output_holds_no_folder_objects_and_reads_from_its_shards(inputs, demo_model, outputs,
                                                                                  s3_in_process):
    dataset, _ = inputs
    s3_in_process.make_bucket("latents")
    out = "s3://latents/nofolder/"
    result = run_cli(*encode_args(demo_model, dataset, out, "--no-folder"),
                     env={**os.environ, **s3_env(s3_in_process.endpoint)})
    assert result.returncode == 0, result.stderr
    keys = [k[len("nofolder/"):] for k in s3_in_process.keys("latents", "nofolder/")]
    assert keys and not [k for k in keys if k.split("/", 1)[0].isdigit()]
    assert s3_in_process.multipart_uploads("latents") == []
    assert {k for k in keys if k.startswith("shards/")} == {t for r in records_of(out) for t in r["latent_shards"]}
    report = inspect_output(Storage().place(out)).report
    local = inspect_output(LocalPlace(str(outputs[1]))).report
    assert report["problems"] == [] and report["total"] == local["total"]
    assert report["sampling"]["windows_read"] == local["total"]["windows"]
    loaded = by_name((latent, md) for latents, metadata in latent_loader(out, 4, num_workers=0, shuffle=False)
                     for latent, md in zip(latents.numpy(), metadata))
    assert_same_windows(loaded, read_latent_shards(outputs[1]))
    verified = run_cli("verify", out, "-n", 2)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK: 2 windows match this model" in verified.stdout
