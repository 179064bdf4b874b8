"""plan.py: what is checked and decided before the model loads (here: the window that fits the model)."""

from __future__ import annotations

import json

import pytest

from conftest import write_dataset_config


def _ratio_4096_config(tmp_path) -> tuple[str, str]:
    """A SAME-shaped model config of 4096 samples per frame (stable-audio-tools' default window,
    1320960 samples, is not a multiple of it), and a checkpoint file."""
    from conftest import golden_sa3
    config = json.loads((golden_sa3("same_tiny_shift") / "model_config.json").read_text())
    model = config["model"]
    model["pretransform"]["config"]["patch_size"] = 256
    model["downsampling_ratio"] = 4096
    for side, key in (("encoder", "in_channels"), ("decoder", "out_channels")):
        model[side]["config"].update({key: 512, "strides": [16], "chunk_size": 32})
    path = tmp_path / "same_4096.json"
    path.write_text(json.dumps(config))
    ckpt = tmp_path / "same_4096.safetensors"
    from safetensors.torch import save_file
    from wds_encode.models import build_autoencoder
    save_file({k: v.contiguous() for k, v in build_autoencoder(config).state_dict().items()}, str(ckpt))
    return str(path), str(ckpt)


def test_the_default_window_is_fitted_to_the_model_and_an_explicit_one_is_checked(tmp_path):
    from wds_encode.config import ConfigError, encode_config_from
    from wds_encode.plan import plan_inputs
    config, ckpt = _ratio_4096_config(tmp_path)
    (tmp_path / "audio").mkdir()
    from wds_encode.synth import write_audio_folder
    write_audio_folder(tmp_path / "audio", 1, seed=0, formats=("flac",))
    dataset = write_dataset_config(tmp_path / "d.json", "audio_dir", [{"id": "a", "path": str(tmp_path / "audio")}])
    given = {"model_config": config, "ckpt_path": ckpt, "dataset_config": str(dataset),
             "output_path": str(tmp_path / "out")}
    assert plan_inputs(encode_config_from(None, given)).config.sample_size == 1318912   # 322 frames, 29.9 s
    with pytest.raises(ConfigError, match=r"--sample-size 1320960 is not a multiple of the model's downsampling_ratio "
                                          r"4096.*try 1318912"):
        plan_inputs(encode_config_from(None, {**given, "sample_size": 1320960}))
