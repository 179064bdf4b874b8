"""Issue 28, through the real command: a dataset config key the run would not apply (a misspelling such as
`random_crp`) is said once on stderr with the closest known key and the run goes on; `--strict` refuses
it (exit 2); stable-audio-tools' own keys for training pass without a word; a missing required key or one
of the wrong type is named in our words (exit 2, before the model loads)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import run_cli, write_dataset_config, write_tar
from wds_encode.cli import main

SAMPLE_SIZE = 4096

# stable-audio-tools' dataset config keys for training or for reading latents back (its dataset.py
# create_dataloader_from_config), at values that change nothing of what its pre_encode.py would encode
STABLE_AUDIO_TOOLS_KEYS = {
    "drop_last": True, "epoch_steps": 2000, "resampled_shards": True,
    "remove_silence": False, "silence_threshold": [0.01, 0.5], "max_silence_duration": 0.25,
    "volume_norm": False, "volume_norm_param": [-16, 2],
    "pre_encoded": False, "latent_crop_length": 128, "latent_extension": "npy",
    "min_length_sec": 1.0, "max_length_sec": 30.0,
}

MISSPELLED_RANDOM_CROP = 'unknown key "random_crp" (did you mean "random_crop"?)'
MISSPELLED_MODULE = ('datasets[0] (id "one"): unknown key "custom_metadata_modul" '
                     '(did you mean "custom_metadata_module"?)')


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    """One tar shard of one short audio file (0.2 s)."""
    from wds_encode.synth import make_sample_set
    folder = tmp_path_factory.mktemp("one")
    (sample, data, _), = make_sample_set(1, seed=5, formats=("flac",), min_seconds=0.2, max_seconds=0.2)
    write_tar(folder / "shards" / "one.tar", [(f"{sample.key}.flac", data)])
    return folder / "shards"


def misspelled_config(path, shards, module):
    return write_dataset_config(path, "wds", [{"id": "one", "path": str(shards),
                                               "custom_metadata_modul": str(module)}],
                                random_crp=True, **STABLE_AUDIO_TOOLS_KEYS)


def encode_args(demo_model, dataset, out, *extra) -> list[str]:
    config, ckpt = demo_model
    return ["--model-config", str(config), "--ckpt-path", str(ckpt), "--dataset-config", str(dataset),
            "--output-path", str(out), "--sample-size", str(SAMPLE_SIZE), "--no-progress", *map(str, extra)]


def invoke(*args) -> tuple[int, str]:
    """`wds-encode run ARGS` in this process: (exit code, stderr)."""
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    return result.exit_code, result.stderr


def test_misspelled_keys_warn_once_with_the_closest_key_and_the_run_succeeds(one_file, demo_model, tmp_path):
    module = tmp_path / "md.py"
    module.write_text("def get_custom_metadata(info, audio):\n    return {'from_module': True}\n")
    dataset = misspelled_config(tmp_path / "d.json", one_file, module)
    result = run_cli(*encode_args(demo_model, dataset, tmp_path / "out", "--num-workers", 2))
    assert result.returncode == 0, result.stderr
    assert "windows written 1" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("wds-encode: warning:")]
    assert warnings == [  # each once (one process speaks for the job, not each decode worker), nothing else
        f"wds-encode: warning: dataset config {dataset}: {MISSPELLED_RANDOM_CROP}; it is ignored",
        f"wds-encode: warning: dataset config {dataset}: {MISSPELLED_MODULE}; it is ignored",
    ], result.stderr
    (latent_json,) = (tmp_path / "out").glob("[0-9]*/*.json")
    assert "from_module" not in json.loads(latent_json.read_text())   # ignored indeed: the module never ran


def test_strict_refuses_every_unknown_key_naming_its_closest_match(one_file, demo_model, tmp_path):
    dataset = misspelled_config(tmp_path / "d.json", one_file, tmp_path / "md.py")
    code, stderr = invoke(*encode_args(demo_model, dataset, tmp_path / "out", "--strict"))
    assert code == 2, stderr
    assert stderr.startswith("wds-encode: bad configuration:")
    for problem in (MISSPELLED_RANDOM_CROP, MISSPELLED_MODULE):
        assert f"dataset config {dataset}: {problem}; --strict refuses" in stderr, stderr
    assert "warning" not in stderr
    assert not (tmp_path / "out").exists()   # refused before anything was planned or written


def test_stable_audio_tools_keys_give_no_warning_even_with_strict(one_file, demo_model, tmp_path):
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "one", "path": str(one_file),
                                                                  "latent_crop_length": 64}],
                                   random_crop=False, **STABLE_AUDIO_TOOLS_KEYS)
    # a --sample-size the model refuses stops the run at its plan, after the dataset config was read and
    # before the model loads: what the dataset config gave on the way is on stderr
    code, stderr = invoke(*encode_args(demo_model, dataset, tmp_path / "out", "--strict", "--sample-size", 1000))
    assert code == 2
    assert "multiple of the model's downsampling_ratio" in stderr
    assert "dataset config" not in stderr and "warning" not in stderr and "unknown" not in stderr, stderr


def test_a_training_switch_that_would_change_the_latents_is_said(one_file, demo_model, tmp_path):
    """stable-audio-tools' pre_encode.py normalizes the loudness of wds audio with volume_norm on; wds-encode
    does not, so it says so (and --strict refuses it)."""
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "one", "path": str(one_file)}],
                                   volume_norm=True)
    code, stderr = invoke(*encode_args(demo_model, dataset, tmp_path / "out", "--sample-size", 1000))
    assert code == 2 and "multiple of the model's downsampling_ratio" in stderr
    assert stderr.count('"volume_norm": true') == 1, stderr
    assert f'wds-encode: warning: dataset config {dataset}: "volume_norm": true: stable-audio-tools' in stderr
    code, stderr = invoke(*encode_args(demo_model, dataset, tmp_path / "out", "--strict"))
    assert code == 2 and '"volume_norm": true' in stderr and "--strict refuses" in stderr


@pytest.mark.parametrize("data, message", [
    ({"datasets": [{"id": "x", "path": "/x"}]},
     'no "dataset_type": give "wds" (WebDataset tar shards, local or s3://), "s3"'),
    ({"dataset_type": "zip", "datasets": [{"id": "x", "path": "/x"}]},
     '"dataset_type" "zip" is not one wds-encode reads: give "wds"'),
    ({"dataset_type": "wds"}, 'no "datasets": give a list of the datasets to encode, each {"id": "a name"'),
    ({"dataset_type": "wds", "datasets": {"id": "x", "path": "/x"}},
     '"datasets" is one object, not a list: put it in [ ]'),
    ({"dataset_type": "wds", "datasets": "/x"}, '"datasets" must be a list of datasets, each {"id"'),
    ({"dataset_type": "wds", "datasets": []}, '"datasets" is empty'),
    ({"dataset_type": "wds", "datasets": [{"id": "x"}]},
     'datasets[0] (id "x") has no "path": give the folder, tar shard pattern or s3:// URL of its audio'),
    ({"dataset_type": "wds", "datasets": [{"id": "x", "pth": "/x"}]},
     'datasets[0] (id "x") has no "path" (is "pth" meant to be "path"?)'),
    ({"dataset_type": "audio_dir", "datasets": [{"id": "x"}]},
     'datasets[0] (id "x") has no "path": give the folder of its audio files'),
    ({"dataset_type": "s3", "datasets": [{"id": "x"}]}, 'datasets[0] (id "x") has no "s3_path"'),
    ({"dataset_type": "wds", "datasets": [{"path": "/x"}]},
     'datasets[0] has no "id": give each dataset a short name'),
    ({"dataset_type": "wds", "datasets": [{"id": 7, "path": "/x"}]},
     'datasets[0]: "id" must be a non-empty string'),
    ({"dataset_type": "wds", "datasets": [{"id": "x", "path": ["/x"]}]},
     'datasets[0] (id "x"): "path" must be a non-empty string (got ["/x"])'),
    ({"dataset_type": "wds", "datasets": [{"id": "x", "path": "/x"}], "random_crop": "sometimes"},
     '"random_crop" must be true or false (got "sometimes")'),
    ({"dataset_type": "wds", "datasets": [{"id": "x", "path": "/x", "profile": 3}]},
     'datasets[0] (id "x"): "profile" must be a string (got 3)'),
    (["not", "an", "object"], 'a dataset config is a JSON object with "dataset_type" and "datasets"'),
])
def test_missing_or_wrong_required_keys_are_named_in_our_words(demo_model, tmp_path, data, message):
    dataset = tmp_path / "d.json"
    dataset.write_text(json.dumps(data))
    code, stderr = invoke(*encode_args(demo_model, dataset, tmp_path / "out"))
    assert code == 2
    assert f"wds-encode: error: dataset config {dataset}: {message}" in stderr, stderr
    assert "Value error" not in stderr and "Input should" not in stderr and "(top level)" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_devices_ranks_do_not_repeat_the_warning(one_file, demo_model, tmp_path):
    """`--devices 2` checks the inputs in the starting process, which says what it found; the two ranks
    it starts load the dataset config again, silently."""
    dataset = misspelled_config(tmp_path / "d.json", one_file, tmp_path / "md.py")
    result = run_cli(*encode_args(demo_model, dataset, tmp_path / "out", "--devices", 2, "--num-workers", 1))
    assert result.returncode == 0, result.stderr
    assert "windows written 1" in result.stdout
    assert result.stderr.count("wds-encode: warning:") == 2, result.stderr
    assert result.stderr.count(MISSPELLED_RANDOM_CROP) == result.stderr.count(MISSPELLED_MODULE) == 1
