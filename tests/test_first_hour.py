"""A new user's first hour (issue 28), through the real command: what `status` says to run after part of
an array job, the refusal of another part count, `--batch-size auto` on a CPU chosen by speed, the demo's
equivalent `wds-encode run` command, and help texts without `[default: None]`."""

from __future__ import annotations

import json
import re
import shlex
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import WDS_ENCODE, run_cli, write_dataset_config
from wds_encode.cli import main
from wds_encode.pipeline import encoder as encoder_module
from wds_encode.pipeline.encoder import CPU_BATCH_TOLERANCE, fastest_batch_size


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """2 input shards x 2 short files: an array job of 2 parts has one unit per part."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("first-hour")
    _paths, samples = write_tar_shards(folder / "in", 2, 2, seed=28, name="fh", min_seconds=0.4, max_seconds=0.9)
    dataset = write_dataset_config(folder / "d.json", "wds", [{"id": "fh", "path": str(folder / "in")}],
                                   random_crop=False)
    return dataset, samples


def encode_args(demo_model, dataset, out, *extra) -> list:
    return ["run", "--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
            "--output-path", out, "--sample-size", 8192, "--num-workers", 0, "--batch-size", 1, "--no-progress",
            *extra]


def status(out, *extra) -> str:
    """`wds-encode status OUT` (in this process: it loads no model)."""
    result = CliRunner().invoke(main, ["status", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result.output


# ---------------------------------------------------------------------------------------------- item 1

def test_status_names_the_parts_left_to_run_and_another_part_count_is_refused(two_shards, demo_model, tmp_path):
    dataset, samples = two_shards
    out = tmp_path / "out"
    first = run_cli(*encode_args(demo_model, dataset, out, "--part", "0/2"))
    assert first.returncode == 0, first.stderr
    text = status(out)
    assert "  state      incomplete: part 1/2 has not run; run it with --part 1/2\n" in text, text
    assert "  part 0/2   1 of 1 units, complete\n" in text
    assert "  part 1/2   0 of 1 units, not started" in text
    found = json.loads(status(out, "--json"))
    assert found["parts_to_run"] == ["1/2"] and found["units"]["remaining"] == 1
    inspected = run_cli("inspect", out)   # inspect says the same of the run's state
    assert inspected.returncode == 0, inspected.stderr
    assert "incomplete: part 1/2 has not run; run it with --part 1/2" in inspected.stdout, inspected.stdout

    # another count: refused with exit 2, before the model loads, naming both counts and what to do
    refused = run_cli(*encode_args(demo_model, dataset, out, "--part", "0/3"))
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    err = refused.stderr
    assert err.startswith("wds-encode: error: --part 0/3: ") and err.count("\n") == 1, err
    assert "array job of 2 parts" in err and "not 3" in err
    assert "--part 0/2 to --part 1/2" in err and "new --output-path" in err and "--overwrite" in err
    assert "Traceback" not in err and refused.stdout == ""
    details = json.loads((out / "details.json").read_text())
    assert details["parts"] == 2                                    # nothing of the 3 parts was written
    assert not list((out / "manifest" / "parts").glob("part-*-of-3*"))

    # the missing part, stopped before its end: status says to rerun it
    stopped = run_cli(*encode_args(demo_model, dataset, out, "--part", "1/2", "--limit-batches", 1))
    assert stopped.returncode == 0, stopped.stderr
    text = status(out)
    assert "  state      incomplete: part 1/2 stopped before its end; rerun it with --part 1/2\n" in text, text
    assert "  part 1/2   0 of 1 units, stopped before its end" in text

    finished = run_cli(*encode_args(demo_model, dataset, out, "--part", "1/2"))
    assert finished.returncode == 0, finished.stderr
    text = status(out)
    assert "  state      complete\n" in text and "2 done (0 broken), 0 remaining, of 2" in text
    assert "  part 0/2   1 of 1 units, complete\n" in text and "  part 1/2   1 of 1 units, complete" in text
    assert f"  samples    {len(samples)}  windows {len(samples)}" in text

    # a whole run (no --part) on the parts' output still goes on: nothing left to do, exit 0
    whole = run_cli(*encode_args(demo_model, dataset, out))
    assert whole.returncode == 0, whole.stderr
    assert json.loads(status(out, "--json"))["state"] == "complete"


def test_the_part_count_check_names_where_the_part_came_from_and_lets_whole_runs_and_first_parts_go(tmp_path):
    from wds_encode.config import ConfigError
    from wds_encode.job.parts import Part
    from wds_encode.pipeline.manifest import RunManifest
    from wds_encode.plan import check_part_count
    from wds_encode.storage import LocalPlace

    place = LocalPlace(str(tmp_path / "out"))
    check_part_count(place, Part(0, 3), "out")                       # no details.json yet: the first part
    RunManifest(place).write_details({"parts": 1})
    check_part_count(place, Part(2, 3), "out")                       # parts may follow a whole run
    RunManifest(place).write_details({"parts": 2})
    check_part_count(place, Part(1, 2), "out")                       # its own count
    check_part_count(place, Part(), "out")                           # a whole run goes on
    with pytest.raises(ConfigError, match=r"^part 5/8 \(from SLURM_ARRAY_TASK_ID\): out is an array job of 2 "
                                          r"parts .* not 8; .*--part 0/2 to --part 1/2"):
        check_part_count(place, Part(5, 8), "out", "SLURM_ARRAY_TASK_ID")


def test_what_status_says_to_run_for_several_parts():
    from wds_encode.tools.status import parts_to_run
    parts = [{"part": f"{k}/64", "state": "not started"} for k in range(2, 64)]
    parts += [{"part": "1/64", "state": "writing (or interrupted)"}, {"part": "0/64", "state": "stopped before its end"}]
    assert parts_to_run(parts) == (
        "parts 2/64, 3/64, ... 63/64 (62 in all) have not run; run them with --part 2/64, --part 3/64, ... "
        "--part 63/64 (62 in all); part 0/64 stopped before its end; rerun it with --part 0/64; part 1/64 is "
        "writing, or was interrupted; unless it is running, rerun it with --part 1/64")
    assert parts_to_run([{"part": "1/3", "state": "not started"}, {"part": "2/3", "state": "not started"}]) == \
        "parts 1/3 and 2/3 have not run; run them with --part 1/3 and --part 2/3"


# ---------------------------------------------------------------------------------------------- item 2

def test_the_fastest_batch_size_is_the_smallest_within_the_tolerance_of_the_best():
    assert fastest_batch_size({1: 0.100, 2: 0.060, 4: 0.050, 8: 0.052, 16: 0.080}) == 4
    # 2 is within 10% of the best (4): the smaller batch holds less memory and overlaps decoding more
    assert fastest_batch_size({1: 0.100, 2: 0.053, 4: 0.050, 8: 0.049}) == 2
    assert fastest_batch_size({1: 0.030, 2: 0.045, 4: 0.090}) == 1
    assert fastest_batch_size({8: 1.0}) == 8


class FakeClock:
    """A clock that a fake forward pass advances by a timing table's seconds per window."""

    def __init__(self, per_window: dict[int, float]):
        self.now, self.per_window, self.sizes = 0.0, per_window, []

    def perf_counter(self) -> float:
        return self.now

    def forward(self, _model, audio, keys, _start, eager=False):
        assert eager and audio.shape[0] == len(keys)
        self.sizes.append(len(keys))
        self.now += self.per_window[len(keys)] * len(keys)


@pytest.mark.parametrize("table, limit, budget, timed, stopped, chosen", [
    # faster up to 8, then slower: stops at 16, keeps 8
    ({1: 0.10, 2: 0.07, 4: 0.05, 8: 0.04, 16: 0.06, 32: 0.03}, 256, 60.0, [1, 2, 4, 8, 16], "slower", 8),
    # never larger than the bound (memory, or the windows at hand)
    ({1: 0.10, 2: 0.07, 4: 0.05, 8: 0.04}, 4, 60.0, [1, 2, 4], "bound", 4),
    # the next candidate would take the timing past its budget: 1 + 2x0.9 + 4x0.8 = 6.0 s, + 8x0.8 > 7 s
    ({1: 1.0, 2: 0.9, 4: 0.8, 8: 0.7}, 256, 7.0, [1, 2, 4], "budget", 4),
    # flat: every size within the tolerance, so the smallest
    ({1: 0.050, 2: 0.049, 4: 0.048, 8: 0.047, 16: 0.0465}, 16, 60.0, [1, 2, 4, 8, 16], "bound", 1),
])
def test_cpu_batch_timings_grow_until_slower_bound_or_budget(monkeypatch, table, limit, budget, timed, stopped,
                                                             chosen):
    clock = FakeClock(table)
    monkeypatch.setattr(encoder_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    fake = types.SimpleNamespace(_forward=clock.forward)
    import torch
    timings, why, spent = encoder_module.BatchEncoder.cpu_batch_timings(fake, None, torch.zeros(1, 2, 64), limit,
                                                                       budget)
    assert clock.sizes == timed and sorted(timings) == timed and why == stopped
    assert timings == pytest.approx({size: table[size] for size in timed})
    assert spent == pytest.approx(sum(size * table[size] for size in timed))
    assert fastest_batch_size(timings) == chosen


def test_batch_size_auto_on_the_cpu_keeps_a_size_about_as_fast_as_the_fastest_it_timed(two_shards, demo_model,
                                                                                        tmp_path):
    dataset, samples = two_shards
    out = tmp_path / "auto"
    args = encode_args(demo_model, dataset, out, "--device", "cpu", "--chunking", "split")
    args[args.index("--batch-size") + 1] = "auto"
    args[args.index("--sample-size") + 1] = 65536             # the demo's windows
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    said = re.search(r"batch size (\d+) \(auto\)", result.stdout)
    assert said, result.stdout
    size = int(said.group(1))
    probe = json.loads((out / "details.json").read_text())["stats"]["batch_probe"]
    assert probe["requested"] == "auto" and probe["chosen"] == size and probe["chosen_by"] == "speed"
    timed = {t["batch_size"]: t["seconds_per_window"] for t in probe["timings"]}
    assert size in timed and timed[size] <= (1 + CPU_BATCH_TOLERANCE) * min(timed.values()), probe
    assert all(s & (s - 1) == 0 and s <= probe["memory_bound"] for s in timed)
    assert probe["timing_stopped"] in ("slower", "bound", "budget") and probe["timing_seconds"] > 0
    assert probe["host_memory_bytes"] > 0 and probe["bytes_per_window_estimate"] > 0


# ---------------------------------------------------------------------------------------------- item 3

def test_the_demo_prints_a_run_command_that_runs_again_with_other_options(tmp_path):
    demo = run_cli("demo", tmp_path / "demo", "--shards", 1, "--samples-per-shard", 3, "--no-progress")
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("the same encode as a command"))
    assert "--overwrite replaces" in lines[index]
    command = shlex.split(lines[index + 1])
    options = {flag: value for flag, value in zip(command, command[1:])
               if flag.startswith("--") and not value.startswith("--")}
    # the script that ran (not on this test's PATH: by its path), as the user's shell can start it again
    assert command[0] in ("wds-encode", WDS_ENCODE) and command[1] == "run" and "--overwrite" in command
    assert {"--chunking": "split", "--max-chunks": "4", "--sample-size": "65536", "--batch-size": "8",
            "--num-workers": "2", "--devices": "1"}.items() <= options.items()
    assert "--no-progress" in command
    for flag in ("--model-config", "--ckpt-path", "--dataset-config", "--output-path"):
        assert Path(options[flag]).is_absolute(), flag
    assert Path(options["--output-path"]) == (tmp_path / "demo" / "out").resolve()
    recorded = json.loads((tmp_path / "demo" / "out" / "details.json").read_text())["args"]
    assert recorded["max_chunks"] == 4 and recorded["chunking"] == "split"

    # as printed (--overwrite: the demo's own output), then with another option into a new output
    again = run_cli(*command[1:])
    assert again.returncode == 0, again.stderr
    assert "wds-encode summary" in again.stdout
    other = [*command[1:]]
    other[other.index("--output-path") + 1] = str(tmp_path / "other")
    other[other.index("--max-chunks") + 1] = "1"
    changed = run_cli(*other)
    assert changed.returncode == 0, changed.stderr
    details = json.loads((tmp_path / "other" / "details.json").read_text())
    assert details["args"]["max_chunks"] == 1 and details["stats"]["samples"] == 3
    assert details["stats"]["windows"] == 3                 # one window per file now


def test_every_demo_option_has_help_text():
    demo = main.commands["demo"]
    options = [p for p in demo.params if isinstance(p, click.Option)]
    assert {o.name for o in options} >= {"num_shards", "samples_per_shard", "num_workers", "batch_size", "progress"}
    for option in options:
        assert option.help and len(option.help) > 10, option.name
    text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "Audio files per shard" in text and "wds-encode run" in " ".join(text.split())


def test_run_help_shows_meaningful_defaults_and_never_none():
    for args in (["run", "--help"], ["--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())           # click wraps lines anywhere
        assert "[default: None]" not in text and "default: None" not in text
        assert "[default: False]" not in text and "[default: True]" not in text
        assert "Stop after this many batches per rank [default: no limit]" in text
        assert "Shuffle the order of input shards (seeded) [default: off]" in text
        assert "[default: on]" in text                    # --folder / --shards
        assert "(default: detected)" in text              # --ckpt-prefix says its own default, once
        assert "(default: detected), e.g. autoencoder_ema.ema_model. for EMA weights [default" not in text


# ---------------------------------------------------------------------------------------------- item 4

def test_the_license_is_an_spdx_string_that_setuptools_reads_without_a_deprecation():
    """setuptools >= 77 reads `license = "MIT"` (PEP 639) and warns about the old table form on every install."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()   # (tomllib: Python 3.11+)
    assert re.search(r'^license = "MIT"$', text, re.MULTILINE), "project.license is not the SPDX string"
    found = re.search(r'^requires = \[.*"setuptools>=(\d+)"', text, re.MULTILINE)
    assert found and int(found.group(1)) >= 77, "the build needs setuptools >= 77 for an SPDX license string"
