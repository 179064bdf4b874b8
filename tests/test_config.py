"""config.py: defaults of the seed, validation messages that name the field and the file."""

import json

import pytest

from wds_encode.config import (DATASET_ENTRY_KEYS_IGNORED, DATASET_ENTRY_KEYS_USED, DATASET_KEYS_IGNORED,
                               DATASET_KEYS_USED, ConfigError, DatasetConfig, EncodeConfig, closest_key,
                               dataset_config_problems, encode_config_from, fields_help, ignored_dataset_settings,
                               load_dataset_config, load_model_config, speaks_for_job)

BASE = {"model_config": "m.json", "ckpt_path": "m.ckpt", "dataset_config": "d.json", "output_path": "out"}


def test_seed_defaults():
    cfg = EncodeConfig(**BASE)
    assert cfg.batch_size == 1
    assert cfg.sample_size == 1320960
    assert cfg.num_workers == 4
    assert cfg.num_nodes is None  # the launcher's count; checked when given
    assert cfg.strategy == "auto"
    assert cfg.limit_batches is None
    assert (cfg.shuffle, cfg.model_half, cfg.is_discrete) == (False, False, False)
    assert cfg.effective_precision == "fp32"
    assert EncodeConfig(**BASE, model_half=True).effective_precision == "fp16"


def test_every_seed_option_is_a_field():
    names = set(fields_help())
    for seed in ("model_config", "ckpt_path", "pretrained_name", "dataset_config", "output_path", "batch_size",
                 "sample_size", "num_workers", "shuffle", "model_half", "is_discrete", "num_nodes",
                 "strategy", "limit_batches"):
        assert seed in names


@pytest.mark.parametrize("bad, field", [
    ({"batch_size": 0}, "batch_size"),
    ({"sample_size": 10}, "sample_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"strategy": "fsdp9"}, "strategy"),
    ({"precision": "fp8"}, "precision"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        encode_config_from(None, {**BASE, **bad}, "cfg.yaml")
    assert f"cfg.yaml: {field}" in str(err.value)


def test_model_and_checkpoint_go_together():
    with pytest.raises(ConfigError, match="--ckpt-path"):
        encode_config_from(None, {**BASE, "ckpt_path": None})
    with pytest.raises(ConfigError, match="not both"):
        encode_config_from(None, {**BASE, "pretrained_name": "x"})
    cfg = encode_config_from(None, {"pretrained_name": "x", "dataset_config": "d", "output_path": "o"})
    assert cfg.pretrained_name == "x"


def test_model_half_conflicts_with_other_precision():
    with pytest.raises(ConfigError, match="model-half"):
        encode_config_from(None, {**BASE, "model_half": True, "precision": "bf16"})


def test_file_then_command_line_override(tmp_path):
    file_values = {"batch-size": 8, "num_workers": 2, **BASE}
    cfg = encode_config_from(file_values, {"batch_size": 16})
    assert cfg.batch_size == 16 and cfg.num_workers == 2


def test_dataset_config_types(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"dataset_type": "wds", "datasets": [{"id": "a", "path": "/x"}],
                                "random_crop": False, "drop_last": True}))
    cfg = load_dataset_config(path)
    assert cfg.dataset_type == "wds" and cfg.datasets[0].id == "a" and cfg.random_crop is False
    assert DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "a", "path": "/x"}]).random_crop is True


@pytest.mark.parametrize("data, needle", [
    ({"dataset_type": "zip", "datasets": [{"id": "a", "path": "/x"}]}, '"dataset_type" "zip" is not one'),
    ({"dataset_type": "wds", "datasets": []}, '"datasets" is empty'),
    ({"dataset_type": "wds", "datasets": [{"path": "/x"}]}, 'datasets[0] has no "id"'),
    ({"dataset_type": "s3", "datasets": [{"id": "a", "path": "/x"}]},
     'datasets[0] (id "a") has no "s3_path" (its "path" "/x" is not an s3:// URL)'),
    ({"dataset_type": "wds", "datasets": [{"id": "a", "path": "/x"}, {"id": "a", "path": "/y"}]},
     'datasets[0] and datasets[1] have the same id "a": dataset ids must be unique'),
])
def test_bad_dataset_config(tmp_path, data, needle):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    assert f"dataset config {path}: {needle}" in str(err.value)


def test_unparsable_files(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"dataset_type": ')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_dataset_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_dataset_config(tmp_path / "missing.json")
    bad_model = tmp_path / "m.json"
    bad_model.write_text(json.dumps({"model_type": "autoencoder"}))
    with pytest.raises(ConfigError, match="sample_rate"):
        load_model_config(bad_model)


def test_base_yaml_lists_every_option_with_its_default():
    from pathlib import Path

    import yaml
    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/encode/base.yaml").read_text())
    assert set(values) == set(fields_help())
    for name, (default, _) in fields_help().items():
        assert values[name] == default, name


# --------------------------------------------------------------------------- dataset config keys (issue 28)

# every key stable-audio-tools' create_dataloader_from_config reads from a dataset config and its entries
# (stable_audio_tools/data/dataset.py), plus the top-level custom_metadata_module of its older audio_dir reader
SAT_TOP_KEYS = {"dataset_type", "datasets", "random_crop", "drop_last", "custom_metadata_module", "epoch_steps",
                "resampled_shards", "remove_silence", "silence_threshold", "max_silence_duration", "volume_norm",
                "volume_norm_param", "pre_encoded", "latent_crop_length", "latent_extension", "min_length_sec",
                "max_length_sec"}
SAT_ENTRY_KEYS = {"id", "path", "s3_path", "profile", "custom_metadata_module"}
WDS = {"dataset_type": "wds", "datasets": [{"id": "a", "path": "/x"}]}


def test_every_stable_audio_tools_key_is_known_and_each_known_once():
    assert SAT_TOP_KEYS <= set(DATASET_KEYS_USED) | set(DATASET_KEYS_IGNORED)
    assert SAT_ENTRY_KEYS <= set(DATASET_ENTRY_KEYS_USED)
    assert not set(DATASET_KEYS_USED) & set(DATASET_KEYS_IGNORED)
    assert not set(DATASET_ENTRY_KEYS_USED) & set(DATASET_ENTRY_KEYS_IGNORED)
    # a config with all of them, switched off where they would change what is encoded, passes without a word
    quiet = {"dataset_type": "wds", "random_crop": False, "drop_last": True, "custom_metadata_module": "m.py",
             "epoch_steps": 100, "resampled_shards": True, "remove_silence": False,
             "silence_threshold": [0.01, 0.5], "max_silence_duration": 0.25, "volume_norm": False,
             "volume_norm_param": [-16, 2], "pre_encoded": False,
             "latent_crop_length": 64, "latent_extension": "npy", "min_length_sec": 1, "max_length_sec": 9,
             "datasets": [{"id": "a", "s3_path": "s3://b/p/", "profile": "p", "custom_metadata_module": "m.py",
                           "endpoint_url": "http://minio:9000", "region": "eu-west-1", "latent_crop_length": 64}]}
    assert set(quiet) == SAT_TOP_KEYS
    assert ignored_dataset_settings(quiet) == []


def test_unknown_keys_name_the_closest_known_key_at_their_level():
    data = {**WDS, "random_crp": True, "Random-Crop": False, "zzz": 1,
            "datasets": [{"id": "a", "path": "/x", "custom_metadata_modul": "m.py", "s3path": "s3://b/"},
                         {"id": "b", "path": "/y", "pofile": "p"}]}
    found = {(s.where, s.key): s for s in ignored_dataset_settings(data)}
    assert {k: s.suggestion for k, s in found.items()} == {
        ("", "random_crp"): "random_crop", ("", "Random-Crop"): "random_crop", ("", "zzz"): None,
        ('datasets[0] (id "a")', "custom_metadata_modul"): "custom_metadata_module",
        ('datasets[0] (id "a")', "s3path"): "s3_path",
        ('datasets[1] (id "b")', "pofile"): "profile"}
    assert found[("", "random_crp")].line("dataset config x.json") == \
        'dataset config x.json: unknown key "random_crp" (did you mean "random_crop"?); it is ignored'
    assert found[('datasets[1] (id "b")', "pofile")].line("dataset config x.json", "refused") == \
        'dataset config x.json: datasets[1] (id "b"): unknown key "pofile" (did you mean "profile"?); refused'
    assert "not a key of stable-audio-tools or wds-encode" in found[("", "zzz")].text


def test_closest_key():
    keys = DATASET_KEYS_USED + DATASET_KEYS_IGNORED
    assert closest_key("random_crp", keys) == "random_crop"
    assert closest_key("RANDOM CROP", keys) == "random_crop"
    assert closest_key("dataset-type", keys) == "dataset_type"
    assert closest_key("dataset", keys) == "datasets"
    assert closest_key("volume_normalize", keys) == "volume_norm"
    assert closest_key("sample_rate", keys) is None


def test_a_key_of_the_other_level_is_told_where_it_goes():
    data = {**WDS, "path": "/x", "datasets": [{"id": "a", "path": "/x", "random_crop": False}]}
    texts = {s.key: s.text for s in ignored_dataset_settings(data)}
    assert texts == {"path": '"path" is a key of each dataset, not of the whole config (move it into the entries '
                             'of "datasets")',
                     "random_crop": '"random_crop" is a key of the whole config, not of one dataset '
                                    "(move it to the top level)"}


def test_training_switches_that_would_change_the_latents_are_said_for_wds_only():
    on = {"remove_silence": True, "volume_norm": True, "pre_encoded": True}
    found = ignored_dataset_settings({**WDS, **on})
    assert sorted(s.key for s in found) == sorted(on)
    assert all(s.text.startswith(f'"{s.key}": true: stable-audio-tools') for s in found)
    assert ignored_dataset_settings({**WDS, "dataset_type": "audio_dir", **on}) == []   # its audio_dir reads none
    assert ignored_dataset_settings({**WDS, **{k: False for k in on}}) == []


def test_load_dataset_config_keeps_and_prints_the_warnings_or_refuses_them_with_strict(tmp_path, capsys,
                                                                                     monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**WDS, "random_crp": True, "random_crop": False,
                                "datasets": [{"id": "a", "path": "/x", "custom_metadata_modul": "m.py"}]}))
    expected = [f'dataset config {path}: unknown key "random_crp" (did you mean "random_crop"?); it is ignored',
                f'dataset config {path}: datasets[0] (id "a"): unknown key "custom_metadata_modul" '
                '(did you mean "custom_metadata_module"?); it is ignored']
    cfg = load_dataset_config(path)
    assert cfg.warnings == expected and cfg.random_crop is False
    assert capsys.readouterr().err.splitlines() == [f"wds-encode: warning: {line}" for line in expected]
    assert load_dataset_config(path, report=False).warnings == expected
    assert capsys.readouterr().err == ""
    assert "warnings" not in cfg.model_dump() and "_warnings" not in cfg.model_dump()   # the fingerprint's dump
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path, strict=True)
    assert str(err.value).splitlines() == [line.replace("it is ignored", "--strict refuses what a run would ignore")
                                           for line in expected]
    assert capsys.readouterr().err == ""
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(WDS))
    assert load_dataset_config(clean, strict=True).warnings == []


def test_strict_option_refuses_the_dataset_configs_unknown_keys_with_the_options(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**WDS, "random_crp": True}))
    given = {**BASE, "dataset_config": str(path)}
    assert encode_config_from(None, given).strict is False   # without --strict: a warning, when the run loads it
    with pytest.raises(ConfigError, match='unknown key "random_crp" \\(did you mean "random_crop"\\?\\); --strict'):
        encode_config_from(None, {**given, "strict": True})
    assert encode_config_from(None, {**BASE, "strict": True}).strict   # no such file here: the plan says so


@pytest.mark.parametrize("env, speaks", [
    ({}, True),                                                                       # alone
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, True),   # torchrun rank 0
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, False),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
      "TORCHELASTIC_RUN_ID": "wds-encode-0123456789ab"}, False),                       # a --devices rank
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1"}, True),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1"}, False),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, True),     # one task: alone
])
def test_one_process_speaks_for_the_job(env, speaks):
    assert speaks_for_job(env) is speaks


def test_dataset_config_problems_are_all_said_at_once():
    problems = dataset_config_problems({"datasets": [{"path": "/x"}, {"id": "b"}, {"id": "b", "path": "/y"}]})
    assert problems[0].startswith('no "dataset_type": give "wds"')
    assert problems[1].startswith('datasets[0] has no "id"')
    assert problems[2].startswith('datasets[1] (id "b") has no "path"')
    assert problems[3].startswith('datasets[1] and datasets[2] have the same id "b"')
    assert len(problems) == 4
    assert dataset_config_problems(WDS) == []


def test_dataset_config_built_directly_says_it_in_our_words():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match='datasets\\[0\\] \\(id "a"\\) has no "path": give the folder'):
        DatasetConfig(dataset_type="wds", datasets=[{"id": "a"}])
