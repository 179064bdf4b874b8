"""Tests for wds_encode.models: numerics against stable-audio-tools golden data, checkpoint
formats / prefixes / weight-norm folding, strict key checking, bottleneck modes, demo model."""

from __future__ import annotations

import copy
import json
import math
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN_CKPTS, golden
from wds_encode.models import (
    CheckpointError,
    ModelConfigError,
    UnsupportedModelError,
    build_autoencoder,
    demo_model_paths,
    load_autoencoder,
)
from wds_encode.config import load_model_config
from wds_encode.models.checkpoint import fold_weight_norm_pair, unfold_weight_norm
from wds_encode.models.demo_model import demo_state_dict

SUPPORTED_GOLDEN = ("oobleck_snake_vae", "oobleck_elu_tanh")


# ----------------------------------------------------------------------------- golden data
@pytest.mark.parametrize("ckpt", GOLDEN_CKPTS)
@pytest.mark.parametrize("name", SUPPORTED_GOLDEN)
def test_golden_encoder_matches_stable_audio_tools(name, ckpt):
    d = golden(name)
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / ckpt)
    audio = torch.from_numpy(np.load(d / "input.npy"))
    pre = model.encode_pre_bottleneck(audio).numpy()
    np.testing.assert_allclose(pre, np.load(d / "pre_bottleneck.npy"), rtol=0, atol=1e-5)
    if (d / "mean.npy").exists():
        assert model.bottleneck.type_name == "vae"
        out, ref = model.encode(audio, mode="mean"), np.load(d / "mean.npy")
    else:
        out, ref = model.encode(audio), np.load(d / "latents.npy")
    assert tuple(out.shape) == ref.shape == (audio.shape[0], model.latent_dim,
                                             audio.shape[-1] // model.downsampling_ratio)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SUPPORTED_GOLDEN)
def test_golden_decoder_round_trip(name):
    d = golden(name)
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / "model.ckpt",
                             with_decoder=True)
    audio = torch.from_numpy(np.load(d / "input.npy"))
    z = model.encode(audio, mode="mean")  # == latents for tanh (deterministic in every mode)
    decoded = model.decode(z).numpy()
    np.testing.assert_allclose(decoded, np.load(d / "decoded.npy"), rtol=0, atol=1e-4)


def test_golden_tanh_scale_is_honoured():
    # stable-audio-tools >= 0.0.17 computes scale * tanh(x / scale); the golden config has 2.0
    d = golden("oobleck_elu_tanh")
    cfg = load_model_config(d / "model_config.json")
    assert cfg["model"]["bottleneck"]["config"]["scale"] == 2.0
    model = load_autoencoder(cfg, d / "model.safetensors")
    pre = model.encode_pre_bottleneck(torch.from_numpy(np.load(d / "input.npy")))
    z = model.bottleneck.encode(pre)
    assert torch.allclose(z, 2.0 * torch.tanh(pre / 2.0))
    assert not torch.allclose(z, torch.tanh(pre), atol=1e-3)


@pytest.mark.parametrize("section,kind", [("encoder", "local_attn"), ("bottleneck", "no_such_bottleneck")])
def test_unsupported_types_give_clear_error(section, kind):
    cfg = load_model_config(golden("oobleck_snake_vae") / "model_config.json")
    cfg["model"][section]["type"] = kind
    with pytest.raises(ModelConfigError) as err:
        load_autoencoder(cfg, None)
    assert repr(kind) in str(err.value) and "supported" in str(err.value)


# ----------------------------------------------------------------------------- helpers
def small_config(bottleneck=None, use_snake=True) -> dict:
    bottleneck = bottleneck or {"type": "vae"}
    enc_latent = 6 if bottleneck["type"] == "vae" else 3
    return {
        "model_type": "autoencoder",
        "sample_rate": 16000,
        "audio_channels": 2,
        "sample_size": 4096,
        "model": {
            "encoder": {"type": "oobleck", "config": {
                "in_channels": 2, "channels": 4, "c_mults": [1, 2], "strides": [2, 3],
                "latent_dim": enc_latent, "use_snake": use_snake}},
            "decoder": {"type": "oobleck", "config": {
                "out_channels": 2, "channels": 4, "c_mults": [1, 2], "strides": [2, 3],
                "latent_dim": 3, "use_snake": use_snake, "final_tanh": False}},
            "bottleneck": bottleneck,
            "latent_dim": 3,
            "downsampling_ratio": 6,
            "io_channels": 2,
        },
    }


def diffusion_config(ae_config: dict, scale: float = 1.0) -> dict:
    return {
        "model_type": "diffusion_cond",
        "sample_rate": ae_config["sample_rate"],
        "audio_channels": 2,
        "sample_size": 8192,
        "model": {
            "pretransform": {"type": "autoencoder", "iterate_batch": True, "scale": scale,
                             "config": copy.deepcopy(ae_config["model"])},
            "diffusion": {"type": "dit", "config": {"io_channels": 3, "embed_dim": 8}},
            "conditioning": {"configs": [], "cond_dim": 8},
        },
    }


def random_sat_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A perturbed full (encoder+decoder) state dict in stable-audio-tools layout, where the
    weight-norm direction `v` is NOT already unit-scaled (as after training)."""
    torch.manual_seed(seed)
    model = build_autoencoder(config, with_decoder=True)
    gen = torch.Generator().manual_seed(seed)
    plain = {k: v + 0.1 * torch.randn(v.shape, generator=gen)
             for k, v in model.state_dict().items()}
    sat = unfold_weight_norm(plain)
    for key in list(sat):
        if key.endswith(".weight_v"):
            rows = torch.rand(sat[key].shape[0], 1, 1, generator=gen) * 3 + 0.5
            sat[key] = sat[key] * rows
    return sat


def save_ckpt(sd: dict, path: Path, prefix: str = "", extra: dict | None = None) -> Path:
    tensors = {prefix + k: v.contiguous() for k, v in sd.items()}
    tensors.update(extra or {})
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": tensors, "global_step": 7}, path)
    else:
        torch.save(tensors, path)
    return path


AUDIO = torch.randn(2, 2, 6 * 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vae_ref():
    cfg = small_config()
    sd = random_sat_state_dict(cfg)
    return cfg, sd


# ----------------------------------------------------------------------------- weight norm
def test_fold_matches_torch_weight_norm():
    conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(3, 5, 4))
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand_like(conv.weight_g) + 0.5)
        conv.weight_v.mul_(3.0)
    conv(torch.zeros(1, 3, 8))  # weight_norm recomputes .weight in a forward pre-hook
    folded = fold_weight_norm_pair(conv.weight_g, conv.weight_v)
    assert torch.allclose(folded, conv.weight, atol=1e-7, rtol=1e-6)
    # transposed convs are normed over dim 0 too (its in_channels)
    convt = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(3, 5, 4, stride=2))
    with torch.no_grad():
        convt.weight_g.mul_(2.0)
    convt(torch.zeros(1, 3, 8))
    assert torch.allclose(fold_weight_norm_pair(convt.weight_g, convt.weight_v), convt.weight)
    # half-precision inputs are folded in float32 and returned in their own dtype
    half = fold_weight_norm_pair(conv.weight_g.half(), conv.weight_v.half())
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), conv.weight, atol=2e-3)


def test_parametrizations_weight_norm_naming(tmp_path, vae_ref):
    cfg, sat = vae_ref
    reference = load_autoencoder(cfg, save_ckpt(sat, tmp_path / "ref.safetensors"))
    renamed = {}
    for k, v in sat.items():
        k = k.replace(".weight_g", ".parametrizations.weight.original0")
        k = k.replace(".weight_v", ".parametrizations.weight.original1")
        renamed[k] = v
    # sanity: this is the naming torch's new weight_norm really uses
    keys = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(2, 2, 3)).state_dict()
    assert set(keys) == {"bias", "parametrizations.weight.original0",
                         "parametrizations.weight.original1"}
    model = load_autoencoder(cfg, save_ckpt(renamed, tmp_path / "param.safetensors"))
    assert torch.equal(model.encode_pre_bottleneck(AUDIO),
                       reference.encode_pre_bottleneck(AUDIO))


def test_plain_weight_checkpoint_loads(tmp_path, vae_ref):
    cfg, sat = vae_ref
    reference = load_autoencoder(cfg, save_ckpt(sat, tmp_path / "ref.safetensors"))
    plain = reference.state_dict()  # already folded: plain `weight` keys
    assert not any(k.endswith("weight_g") for k in plain)
    model = load_autoencoder(cfg, save_ckpt(plain, tmp_path / "plain.pt"))
    assert torch.equal(model.encode(AUDIO, mode="params"), reference.encode(AUDIO, mode="params"))


# ----------------------------------------------------------------------------- round trips
JUNK = {"model.model.transformer.layers.0.weight": torch.ones(3, 3),
        "conditioner.conditioners.prompt.model.encoder.block.0.weight": torch.ones(2),
        "discriminator.encoder.0.weight": torch.ones(1)}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".pt"])
@pytest.mark.parametrize("prefix", ["", "autoencoder.", "pretransform.model.", "model."])
def test_checkpoint_round_trip(tmp_path, vae_ref, suffix, prefix):
    cfg, sat = vae_ref
    # expected output computed independently of our loader: fold with torch's own weight_norm
    expected_model = build_autoencoder(cfg)
    with torch.no_grad():
        for key, param in expected_model.state_dict(keep_vars=True).items():
            if key.startswith("encoder.") and key.endswith(".weight"):
                base = key[: -len(".weight")]
                param.copy_(torch._weight_norm(sat[base + ".weight_v"],
                                               sat[base + ".weight_g"], 0))
            elif key.startswith("encoder."):
                param.copy_(sat[key])
    expected = expected_model.eval().encode(AUDIO, mode="params")

    path = save_ckpt(sat, tmp_path / f"ae{suffix}", prefix, JUNK)
    model = load_autoencoder(cfg, path)
    out = model.encode(AUDIO, mode="params")
    assert torch.allclose(out, expected, atol=1e-6)
    # every format/prefix gives bit-identical results
    baseline = load_autoencoder(cfg, save_ckpt(sat, tmp_path / "baseline.safetensors"))
    assert torch.equal(out, baseline.encode(AUDIO, mode="params"))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_diffusion_config_with_autoencoder_pretransform(tmp_path, vae_ref, suffix):
    cfg, sat = vae_ref
    baseline = load_autoencoder(cfg, save_ckpt(sat, tmp_path / "ae.safetensors"))
    dcfg = diffusion_config(cfg, scale=1.5)
    path = save_ckpt(sat, tmp_path / f"diffusion{suffix}", "pretransform.model.", JUNK)
    model = load_autoencoder(dcfg, path)
    assert torch.equal(model.encode(AUDIO, mode="mean"), baseline.encode(AUDIO, mode="mean"))
    assert (model.sample_rate, model.latent_dim, model.downsampling_ratio) == (16000, 3, 6)
    assert model.pretransform_scale == 1.5 and model.sample_size == 8192
    # explicit prefix override works too
    model2 = load_autoencoder(dcfg, path, key_prefix="pretransform.model.")
    assert torch.equal(model2.encode(AUDIO, mode="mean"), baseline.encode(AUDIO, mode="mean"))


def test_safetensors_reads_only_needed_tensors(tmp_path, vae_ref, monkeypatch):
    cfg, sat = vae_ref
    path = save_ckpt(sat, tmp_path / "big.safetensors", "pretransform.model.", JUNK)
    import safetensors

    real_open = safetensors.safe_open
    fetched: list[str] = []

    class Spy:
        def __init__(self, *a, **kw):
            self._f = real_open(*a, **kw)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, key):
            fetched.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    load_autoencoder(cfg, path)
    assert fetched and all(k.startswith("pretransform.model.encoder.") for k in fetched)
    load_autoencoder(cfg, path, with_decoder=True)
    assert any(k.startswith("pretransform.model.decoder.") for k in fetched)


# ----------------------------------------------------------------------------- strictness
def test_missing_and_unexpected_keys_are_listed(tmp_path, vae_ref):
    cfg, sat = vae_ref
    broken = dict(sat)
    del broken["encoder.layers.1.layers.0.layers.1.bias"]
    broken["encoder.layers.9.bias"] = torch.zeros(3)
    path = save_ckpt(broken, tmp_path / "broken.ckpt", "autoencoder.")
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(cfg, path)
    msg = str(err.value)
    assert str(path) in msg and "'autoencoder.'" in msg
    assert "missing keys: (1) encoder.layers.1.layers.0.layers.1.bias" in msg
    assert "unexpected keys: (1) encoder.layers.9.bias" in msg

    only_missing = dict(sat)
    del only_missing["encoder.layers.0.weight_g"], only_missing["encoder.layers.0.weight_v"]
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(cfg, save_ckpt(only_missing, tmp_path / "m.safetensors"))
    msg = str(err.value)
    assert "missing keys: (1) encoder.layers.0.weight" in msg and "unexpected keys: none" in msg
    assert "weight_g" in msg  # hint about upstream naming


def test_shape_mismatch_and_wrong_config(tmp_path, vae_ref):
    cfg, sat = vae_ref
    path = save_ckpt(sat, tmp_path / "ae.safetensors")
    wrong = copy.deepcopy(cfg)
    wrong["model"]["encoder"]["config"]["channels"] = 8
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(wrong, path)
    assert "shape mismatches" in str(err.value) and "encoder.layers.0.weight" in str(err.value)
    elu = copy.deepcopy(cfg)
    elu["model"]["encoder"]["config"]["use_snake"] = False
    with pytest.raises(CheckpointError, match="unexpected keys: .*alpha"):
        load_autoencoder(elu, path)


def test_unpaired_weight_norm_tensor(tmp_path, vae_ref):
    cfg, sat = vae_ref
    broken = {k: v for k, v in sat.items() if k != "encoder.layers.0.weight_v"}
    with pytest.raises(CheckpointError, match="encoder.layers.0.weight_g.*no partner"):
        load_autoencoder(cfg, save_ckpt(broken, tmp_path / "x.safetensors"))


def test_unknown_prefix_lists_tried_prefixes(tmp_path, vae_ref):
    cfg, sat = vae_ref
    path = save_ckpt(sat, tmp_path / "odd.safetensors", "ema.shadow.")
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(cfg, path)
    msg = str(err.value)
    assert "tried key prefixes" in msg and str(path) in msg
    for prefix in ("(none)", "autoencoder.", "pretransform.model.", "model."):
        assert repr(prefix) in msg
    assert "'ema.shadow.'" in msg and "key_prefix" in msg
    model = load_autoencoder(cfg, path, key_prefix="ema.shadow.")
    assert model.encode(AUDIO, mode="mean").shape == (2, 3, 40)


def test_checkpoint_file_errors(tmp_path, vae_ref):
    cfg, sat = vae_ref
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(cfg, tmp_path / "nope.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 4)
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        load_autoencoder(cfg, garbage)
    # pickled non-tensor objects: refused unless explicitly trusted
    pickled = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sat, "hyper_parameters": {"path": pathlib.PurePosixPath("/x")}},
               pickled)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_autoencoder(cfg, pickled)
    model = load_autoencoder(cfg, pickled, allow_unsafe_pickle=True)
    assert model.encode(AUDIO, mode="mean").shape == (2, 3, 40)


# ----------------------------------------------------------------------------- bottlenecks
def test_vae_modes(tmp_path, vae_ref):
    cfg, sat = vae_ref
    model = load_autoencoder(cfg, save_ckpt(sat, tmp_path / "ae.safetensors"))
    pre = model.encode_pre_bottleneck(AUDIO)
    params = model.encode(AUDIO, mode="params")
    assert params.shape == (2, 2 * model.latent_dim, 40)
    mean, std = params.chunk(2, dim=1)
    assert torch.equal(mean, pre[:, :3]) and torch.equal(mean, model.encode(AUDIO, mode="mean"))
    assert torch.allclose(std, torch.nn.functional.softplus(pre[:, 3:]) + 1e-4)
    assert model.bottleneck.needs_noise and not model.is_discrete
    shape = model.noise_shape(2, AUDIO.shape[-1])
    assert shape == (2, 3, 40) == model.bottleneck.noise_shape(pre)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    sample = model.encode(AUDIO, mode="sample", noise=noise)
    assert torch.allclose(sample, mean + std * noise)
    assert torch.equal(sample, model.encode(AUDIO, noise=noise))  # "sample" is the default
    assert not torch.equal(model.encode(AUDIO), model.encode(AUDIO))  # no noise -> random
    with pytest.raises(ValueError, match="noise must have shape"):
        model.encode(AUDIO, noise=torch.zeros(2, 6, 40))
    with pytest.raises(ValueError, match="unknown encode mode"):
        model.encode(AUDIO, mode="median")


@pytest.mark.parametrize("scale", [None, 0.5])
def test_tanh_bottleneck_is_bounded_and_deterministic(scale):
    bottleneck = {"type": "tanh"} if scale is None else {"type": "tanh", "config": {"scale": scale}}
    torch.manual_seed(0)
    model = load_autoencoder(small_config(bottleneck, use_snake=False), None)
    bound = 1.0 if scale is None else scale
    loud = AUDIO * 1000
    z = model.encode(loud)
    assert z.shape == (2, 3, 40) and z.abs().max() <= bound
    assert z.abs().max() > 0.9 * bound  # saturates on loud input, so the bound is real
    for mode in ("mean", "params"):
        assert torch.equal(model.encode(loud, mode=mode), z)
    assert not model.bottleneck.needs_noise and model.noise_shape(2, 240) is None


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda c: c["model"].pop("latent_dim"), ModelConfigError, r"'model\.latent_dim' is missing"),
    (lambda c: c.pop("sample_rate"), ModelConfigError, r"'sample_rate' is missing"),
    (lambda c: c.pop("model_type"), ModelConfigError, r"'model_type' is missing"),
    (lambda c: c["model"].update(latent_dim=4), ModelConfigError,
     r"'model\.encoder\.config\.latent_dim' = 6 .* 'model\.latent_dim' = 4.*2 \* latent_dim"),
    (lambda c: c["model"].update(downsampling_ratio=8), ModelConfigError,
     r"'model\.downsampling_ratio' = 8 .* strides \[2, 3\]"),
    (lambda c: c["model"].update(io_channels=1), ModelConfigError, r"in_channels' \(2\)"),
    (lambda c: c["model"]["encoder"].update(type="local_attn"), UnsupportedModelError,
     r"'model\.encoder\.type' = 'local_attn' is a stable-audio-tools encoder .*\['dac', 'oobleck', 'seanet'\]"),
    (lambda c: c["model"]["encoder"].update(type="nope"), UnsupportedModelError, r"is unknown"),
    (lambda c: c["model"]["encoder"]["config"].update(antialias_activation=True),
     UnsupportedModelError, r"antialias_activation"),
    (lambda c: c["model"]["encoder"]["config"].update(chanels=3), ModelConfigError,
     r"'model\.encoder\.config' has unknown oobleck option\(s\) \['chanels'\]"),
    (lambda c: c["model"]["bottleneck"].update(type="rvq_vae"), UnsupportedModelError,
     r"'model\.bottleneck\.type' = 'rvq_vae' .*'tanh', 'vae'"),
    (lambda c: c["model"]["encoder"]["config"].update(strides=[2, 0]), ModelConfigError,
     r"strides' must be a non-empty list of positive ints"),
])
def test_config_errors_name_the_field(mutate, exc, pattern):
    cfg = small_config()
    mutate(cfg)
    with pytest.raises(exc, match=pattern):
        load_autoencoder(cfg, None)


def test_diffusion_config_errors():
    dcfg = diffusion_config(small_config())
    del dcfg["model"]["pretransform"]["config"]["io_channels"]
    with pytest.raises(ModelConfigError, match=r"'model\.pretransform\.config\.io_channels'"):
        load_autoencoder(dcfg, None)
    dcfg["model"]["pretransform"] = {"type": "wavelet", "config": {}}
    with pytest.raises(UnsupportedModelError, match="'wavelet'"):
        load_autoencoder(dcfg, None)
    del dcfg["model"]["pretransform"]
    with pytest.raises(UnsupportedModelError, match="pretransform"):
        load_autoencoder(dcfg, None)


def test_model_state_and_dtype(tmp_path, vae_ref):
    cfg, sat = vae_ref
    path = save_ckpt(sat, tmp_path / "ae.safetensors")
    model = load_autoencoder(cfg, path, dtype=torch.float64)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert model.decoder is None
    with pytest.raises(RuntimeError, match="with_decoder=True"):
        model.decode(torch.zeros(1, 3, 4))
    assert model.encode(AUDIO, mode="mean").dtype == torch.float64  # input is cast
    ref = load_autoencoder(cfg, path).encode(AUDIO, mode="mean")
    assert torch.allclose(model.encode(AUDIO, mode="mean").float(), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[batch, 2, samples\]"):
        model.encode(AUDIO[:, :1])


# ----------------------------------------------------------------------------- demo model
def test_demo_model_loads_and_gives_sane_latents():
    config_path, ckpt_path = demo_model_paths()
    assert config_path.is_file() and ckpt_path.is_file()
    assert ckpt_path.stat().st_size < 400_000
    cfg = load_model_config(config_path)
    assert cfg["model_type"] == "autoencoder" and "decoder" in cfg["model"]
    # stored in stable-audio-tools layout, decoder included
    keys = load_file(str(ckpt_path)).keys()
    assert "encoder.layers.0.weight_g" in keys and "encoder.layers.0.weight_v" in keys
    assert any(k.startswith("decoder.") for k in keys)

    model = load_autoencoder(cfg, ckpt_path)
    assert (model.sample_rate, model.audio_channels, model.io_channels) == (44100, 2, 2)
    assert (model.latent_dim, model.downsampling_ratio) == (16, 64)
    n = 64 * 50
    t = torch.arange(n) / 44100
    audio = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t),
                         0.2 * torch.sin(2 * math.pi * 330 * t + 1)])[None].repeat(2, 1, 1)
    audio[1] *= 0.1
    params = model.encode(audio, mode="params")
    mean, std = params.chunk(2, dim=1)
    assert mean.shape == (2, 16, n // 64) == model.encode(audio).shape
    assert model.latent_length(n) == n // 64
    assert torch.isfinite(params).all()
    assert 0.1 < mean[0].std() < 10  # neither vanished nor exploded
    assert (mean[0].std(dim=-1) > 1e-3).all()  # every channel varies over time
    assert (std > 0).all() and std.mean() < 2
    assert not torch.allclose(mean[0], mean[1], atol=1e-2)  # depends on the input
    decoded = load_autoencoder(cfg, ckpt_path, with_decoder=True).decode(mean)
    assert decoded.shape == audio.shape and torch.isfinite(decoded).all()


def test_demo_model_is_trained_from_the_seeded_init(tmp_path):
    """The bundled weights are scripts/train_demo_model.py's training of demo_state_dict()."""
    from wds_encode.models.demo_model import DEMO_MODEL_CONFIG
    from wds_encode.tools.verify import log_mel, mel_distance

    config_path, ckpt_path = demo_model_paths()
    assert json.loads(config_path.read_text()) == DEMO_MODEL_CONFIG
    bundled = load_file(str(ckpt_path))
    init = demo_state_dict()
    assert {k: v.shape for k, v in bundled.items()} == {k: v.shape for k, v in init.items()}
    untrained = tmp_path / "init.safetensors"
    save_file(init, str(untrained))
    cfg = load_model_config(config_path)
    n = 64 * 512
    t = torch.arange(n) / 44100
    audio = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t), 0.2 * torch.sin(2 * math.pi * 330 * t + 1)])[None]
    distances = []
    for ckpt in (ckpt_path, untrained):
        model = load_autoencoder(cfg, ckpt, with_decoder=True)
        decoded = model.decode(model.encode(audio, mode="mean"))
        distances.append(mel_distance(log_mel(audio[0], 44100), log_mel(decoded[0], 44100)))
    trained, random_init = distances
    assert trained < 1.0 and trained < random_init / 4, distances
