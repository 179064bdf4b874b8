"""config.py: defaults of the seed, validation messages that name the field and the file."""

import json

import pytest

from wds_encode.config import (ConfigError, DatasetConfig, EncodeConfig, encode_config_from, fields_help,
                               load_dataset_config, load_model_config)

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
    ({"dataset_type": "zip", "datasets": [{"id": "a", "path": "/x"}]}, "dataset_type"),
    ({"dataset_type": "wds", "datasets": []}, "datasets"),
    ({"dataset_type": "wds", "datasets": [{"path": "/x"}]}, "datasets.0.id"),
    ({"dataset_type": "s3", "datasets": [{"id": "a", "path": "/x"}]}, "s3_path"),
    ({"dataset_type": "wds", "datasets": [{"id": "a", "path": "/x"}, {"id": "a", "path": "/y"}]}, "unique"),
])
def test_bad_dataset_config(tmp_path, data, needle):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)


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
