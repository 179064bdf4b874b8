"""plan.py: what is checked and decided before the model loads (here: the window that fits the model)."""

from __future__ import annotations

import json

import pytest

from conftest import assert_exactly_once, run_cli, write_dataset_config, write_tar


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


def test_listing_an_audio_folder_again_keeps_the_units_of_the_kept_listing(demo_model, tmp_path):
    """Files added to an audio_dir only add units, at --relist or a new --files-per-unit alike: a unit id
    committed before never comes to mean other files, and every file is in exactly one unit."""
    from wds_encode.config import encode_config_from
    from wds_encode.pipeline.manifest import RunManifest
    from wds_encode.plan import plan_inputs, prepare_output
    from wds_encode.synth import write_audio_folder
    audio = tmp_path / "audio"
    write_audio_folder(audio / "first", 5, seed=0, formats=("wav",), min_seconds=0.05, max_seconds=0.1)
    dataset = write_dataset_config(tmp_path / "d.json", "audio_dir", [{"id": "a", "path": str(audio)}])
    given = {"model_config": str(demo_model[0]), "ckpt_path": str(demo_model[1]), "dataset_config": str(dataset),
             "output_path": str(tmp_path / "out"), "sample_size": 8192, "files_per_unit": 2}
    first = plan_inputs(encode_config_from(None, given))
    prepare_output(first, RunManifest(first.output_place()))           # rank 0 keeps the listing
    write_audio_folder(audio / "added", 3, seed=1, formats=("wav",), min_seconds=0.05, max_seconds=0.1)
    every_file = sorted(str(p.relative_to(audio)) for p in audio.rglob("*.wav"))
    assert len(every_file) == 8 and len(first.units) == 3

    def check(units, size):
        assert [u for u in units if u in first.units] == first.units
        added = [u for u in units if u not in first.units]
        assert sorted(f for u in added for f in u.files) == [f for f in every_file if f.startswith("added/")]
        assert [len(u.files) for u in added] == [size] * (3 // size) + [3 % size] * bool(3 % size)
        assert sorted(f for u in units for f in u.files) == every_file

    assert plan_inputs(encode_config_from(None, given)).units == first.units     # kept until --relist
    relisted = plan_inputs(encode_config_from(None, {**given, "relist": True}))
    assert relisted.listing == "listed"
    check(relisted.units, 2)
    resized = plan_inputs(encode_config_from(None, {**given, "files_per_unit": 3}))   # another unit size: listed anew
    assert resized.listing == "listed"
    check(resized.units, 3)


def _encode(demo_model, dataset, out, *extra):
    return run_cli("--model-config", demo_model[0], "--ckpt-path", demo_model[1], "--dataset-config", dataset,
                   "--output-path", out, "--sample-size", 4096, "--num-workers", 0, "--no-progress", *extra)


def test_files_added_to_an_audio_folder_are_encoded_exactly_once_by_the_runs_that_list_again(demo_model, tmp_path):
    """The real command: encode a folder, add files (they sort first: every position shifts), rerun with
    --relist, add more, rerun with another --files-per-unit; every file's windows come out once."""
    from wds_encode.synth import write_audio_folder
    audio = tmp_path / "audio"
    options = dict(nested=False, formats=("wav",), min_seconds=0.05, max_seconds=0.3)
    samples = write_audio_folder(audio, 5, seed=0, **options)
    dataset = write_dataset_config(tmp_path / "d.json", "audio_dir", [{"id": "a", "path": str(audio)}],
                                   random_crop=False)
    out = tmp_path / "out"
    first = _encode(demo_model, dataset, out, "--files-per-unit", 2)
    assert first.returncode == 0, first.stderr
    samples += write_audio_folder(audio, 3, seed=1, key_prefix="added", **options)
    relisted = _encode(demo_model, dataset, out, "--files-per-unit", 2, "--relist")
    assert relisted.returncode == 0, relisted.stderr
    assert_exactly_once(out, samples)
    samples += write_audio_folder(audio, 4, seed=2, key_prefix="more", **options)
    resized = _encode(demo_model, dataset, out, "--files-per-unit", 3)
    assert resized.returncode == 0, resized.stderr
    assert_exactly_once(out, samples)


def test_inputs_that_would_share_a_unit_id_stop_the_command_before_any_work(demo_model, tmp_path):
    for name in ("a b.tar", "a_b.tar"):
        write_tar(tmp_path / "in" / name, [("k.flac", b"x")])
    dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "d", "path": str(tmp_path / "in")}])
    result = _encode(demo_model, dataset, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "a b.tar" in line]
    assert str(tmp_path / "in" / "a_b.tar") in line and "rename one of them" in line
    assert not (tmp_path / "out").exists()   # nothing written, nothing loaded
