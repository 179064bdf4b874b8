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


def test_the_units_of_the_first_listing_are_kept_and_used_until_relist(demo_model, tmp_path):
    """A rerun (and every array part) reads the units the output's first run listed, one object, instead
    of listing the corpus again; --relist lists again, and a changed dataset config is listed anew."""
    from wds_encode.config import ConfigError, encode_config_from
    from wds_encode.pipeline.manifest import RunManifest
    from wds_encode.plan import plan_inputs, prepare_output
    from wds_encode.synth import write_tar_shards
    write_tar_shards(tmp_path / "in", 3, 1, seed=3, name="a", min_seconds=0.2, max_seconds=0.4)
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "d", "path": str(tmp_path / "in")}],
                                   random_crop=False)
    given = {"model_config": str(demo_model[0]), "ckpt_path": str(demo_model[1]), "dataset_config": str(dataset),
             "output_path": str(tmp_path / "out"), "sample_size": 8192}
    first = plan_inputs(encode_config_from(None, given))
    assert first.listing == "listed" and len(first.units) == 3
    prepare_output(first, RunManifest(first.output_place()))        # rank 0 keeps the listing
    write_tar_shards(tmp_path / "in", 1, 1, seed=4, name="b", min_seconds=0.2, max_seconds=0.4)   # an input added
    again = plan_inputs(encode_config_from(None, given))
    assert again.listing == "kept" and again.units == first.units
    relisted = plan_inputs(encode_config_from(None, {**given, "relist": True}))
    assert relisted.listing == "listed" and len(relisted.units) == 4
    with pytest.raises(ConfigError, match="--relist with --part"):
        plan_inputs(encode_config_from(None, {**given, "relist": True, "part": "0/2"}))
    other = write_dataset_config(tmp_path / "d2.json", "wds", [{"id": "d", "path": str(tmp_path / "in")}],
                                 random_crop=True)
    assert plan_inputs(encode_config_from(None, {**given, "dataset_config": str(other)})).listing == "listed"
    with pytest.raises(ConfigError, match="listed from another dataset config"):
        plan_inputs(encode_config_from(None, {**given, "dataset_config": str(other), "part": "1/2"}))
