"""Tests for the DAC encoder/decoder (`type: "dac"`): numerics against stable-audio-tools golden
data, shrunk copies of stable-audio-tools' DAC configs, half precision, checkpoint layouts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN_CKPTS, assert_half_precision_close_or_refused, golden
from wds_encode.config import load_model_config
from wds_encode.models import (
    CheckpointError,
    ModelConfigError,
    build_autoencoder,
    load_autoencoder,
)
from wds_encode.models.checkpoint import unfold_weight_norm
from wds_encode.models.dac import DACDecoder, DACEncoder



# ----------------------------------------------------------------------------- golden data
@pytest.mark.parametrize("ckpt", GOLDEN_CKPTS)
def test_golden_dac_vae_matches_stable_audio_tools(ckpt):
    d = golden("dac_vae")
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / ckpt,
                             with_decoder=True)
    audio = torch.from_numpy(np.load(d / "input.npy"))
    pre = model.encode_pre_bottleneck(audio)
    np.testing.assert_allclose(pre.numpy(), np.load(d / "pre_bottleneck.npy"), rtol=0, atol=1e-5)
    mean = model.encode(audio, mode="mean")
    ref = np.load(d / "mean.npy")
    assert tuple(mean.shape) == ref.shape == (3, 4, audio.shape[-1] // 8)
    np.testing.assert_allclose(mean.numpy(), ref, rtol=0, atol=1e-5)
    decoded = model.decode(mean)
    assert decoded.shape == audio.shape
    np.testing.assert_allclose(decoded.numpy(), np.load(d / "decoded.npy"), rtol=0, atol=1e-4)


def test_golden_dac_key_layout():
    """Our module tree, put back into stable-audio-tools' layout, has exactly its keys: every
    conv weight-normed except the wrapper's `proj_out`, Snake `alpha` as [1, C, 1]."""
    d = golden("dac_vae")
    model = build_autoencoder(load_model_config(d / "model_config.json"), with_decoder=True)
    ours = unfold_weight_norm(model.state_dict())
    ours["encoder.proj_out.weight"] = ours.pop("encoder.proj_out.weight_v")
    del ours["encoder.proj_out.weight_g"]
    theirs = load_file(str(d / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape)
                                                           for k, v in theirs.items()}
    assert model.encoder.strides == [2, 4] and model.encoder.latent_dim == 8
    assert model.latent_length(128) == 16


# ----------------------------------------------------------------------------- shrunk SAT configs
def _ae(encoder: dict, decoder: dict, *, latent_dim: int, ratio: int, io_channels: int,
        audio_channels: int, bottleneck: dict | None = None) -> dict:
    return {
        "model_type": "autoencoder", "sample_size": 65536, "sample_rate": 44100,
        "audio_channels": audio_channels,
        "model": {"encoder": encoder, "decoder": decoder,
                  "bottleneck": bottleneck or {"type": "vae"}, "latent_dim": latent_dim,
                  "downsampling_ratio": ratio, "io_channels": io_channels},
    }


SHRUNK = {
    # stable_audio_tools/configs/model_configs/autoencoders/dac_1024_64_stereo_vae_44k.json
    # (d_model 128 -> 4, decoder channels 1536 -> 32, latent 128/64 -> 8/4)
    "dac_1024_64_stereo_vae_44k": _ae(
        {"type": "dac", "config": {"in_channels": 2, "latent_dim": 8, "d_model": 4,
                                   "strides": [4, 4, 8, 8]}},
        {"type": "dac", "config": {"out_channels": 2, "latent_dim": 4, "channels": 32,
                                   "rates": [8, 8, 4, 4]}},
        latent_dim=4, ratio=1024, io_channels=2, audio_channels=2),
    # .../dac_1024_64_stereo_vae_44k_ft_bigger_dec.json (frozen encoder, wider decoder:
    # 2048 -> 48; `requires_grad` sits beside the encoder's config)
    "dac_1024_64_stereo_vae_44k_ft_bigger_dec": _ae(
        {"type": "dac", "config": {"in_channels": 2, "latent_dim": 8, "d_model": 4,
                                   "strides": [4, 4, 8, 8]}, "requires_grad": False},
        {"type": "dac", "config": {"out_channels": 2, "latent_dim": 4, "channels": 48,
                                   "rates": [8, 8, 4, 4]}},
        latent_dim=4, ratio=1024, io_channels=2, audio_channels=2),
    # .../dac_2048_32_vae.json: mono, so no in_channels / out_channels (wrapper defaults = 1)
    "dac_2048_32_vae": _ae(
        {"type": "dac", "config": {"latent_dim": 6, "d_model": 4, "strides": [4, 8, 8, 8]}},
        {"type": "dac", "config": {"latent_dim": 3, "channels": 32, "rates": [8, 8, 8, 4]}},
        latent_dim=3, ratio=2048, io_channels=1, audio_channels=1),
}


def _audio(channels: int, n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return 0.5 * torch.randn(batch, channels, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_shrunk_sat_configs_encode_and_round_trip(name):
    cfg = SHRUNK[name]
    torch.manual_seed(0)
    model = load_autoencoder(cfg, None, with_decoder=True)
    ae = cfg["model"]
    ratio, channels = ae["downsampling_ratio"], ae["io_channels"]
    audio = _audio(channels, 3 * ratio)
    z = model.encode(audio, mode="mean")
    assert z.shape == (2, ae["latent_dim"], 3) == model.noise_shape(2, 3 * ratio)
    assert model.latent_length(3 * ratio) == 3
    params = model.encode(audio, mode="params")
    assert params.shape == (2, 2 * ae["latent_dim"], 3)
    out = model.decode(model.encode(audio))
    assert out.shape == audio.shape and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0  # DAC's decoder always ends in tanh
    assert isinstance(model.encoder, DACEncoder) and isinstance(model.decoder, DACDecoder)
    assert model.encoder.in_channels == channels == model.decoder.out_channels


def test_mono_default_first_conv_and_plain_proj_out():
    model = build_autoencoder(SHRUNK["dac_2048_32_vae"])
    sd = model.state_dict()
    assert tuple(sd["encoder.encoder.block.0.weight"].shape) == (4, 1, 7)
    assert tuple(sd["encoder.proj_out.weight"].shape) == (6, 4 * 2 ** 4, 1)
    assert tuple(sd["encoder.encoder.block.1.block.0.block.0.alpha"].shape) == (1, 4, 1)


def test_no_latent_dim_means_no_proj_out():
    # DACEncoderWrapper: latent_dim=None -> proj_out is Identity, the output is the DAC
    # encoder's own width d_model * 2**len(strides)
    cfg = copy.deepcopy(SHRUNK["dac_2048_32_vae"])
    del cfg["model"]["encoder"]["config"]["latent_dim"]
    cfg["model"]["latent_dim"] = 32  # 4 * 2**4 = 64 channels = mean + scale
    cfg["model"]["decoder"]["config"]["latent_dim"] = 32
    model = build_autoencoder(cfg)
    assert model.encoder.latent_dim == 64
    assert not any("proj_out" in k for k in model.state_dict())
    assert model.encode(_audio(1, 2048), mode="mean").shape == (2, 32, 1)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_encode_is_close(tmp_path, dtype):
    cfg, sat = _reference()
    path = tmp_path / "ae.safetensors"
    save_file(sat, str(path))
    audio = _audio(2, 4 * 1024)
    ref = load_autoencoder(cfg, path).encode(audio, mode="mean")
    half = load_autoencoder(cfg, path, dtype=dtype)
    out = half.encode(audio, mode="mean")
    assert out.dtype == dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert_half_precision_close_or_refused(lambda: load_autoencoder(cfg, path), dtype, rel, audio.shape[-1])


# ----------------------------------------------------------------------------- checkpoints
def sat_layout(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Perturbed weights in stable-audio-tools' layout: weight-normed convs as weight_g /
    weight_v (with v not unit-norm, as after training) except the plain `proj_out`."""
    gen = torch.Generator().manual_seed(seed)
    # noise relative to each tensor's spread keeps the net well conditioned (Snake's alpha
    # starts as all ones: absolute noise there)
    plain = {k: v + 0.2 * torch.randn(v.shape, generator=gen)
             * (v.std() if v.numel() > 1 and v.std() > 0 else 1.0)
             for k, v in model.state_dict().items()}
    sat = unfold_weight_norm(plain)
    for key in list(sat):
        if key.endswith("proj_out.weight_v"):
            sat[key[: -len("_v")]] = sat.pop(key)
            del sat[key[: -len("_v")] + "_g"]
        elif key.endswith(".weight_v"):
            sat[key] = sat[key] * (torch.rand(sat[key].shape[0], 1, 1, generator=gen) * 3 + 0.5)
    return sat


def _reference() -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = SHRUNK["dac_1024_64_stereo_vae_44k"]
    torch.manual_seed(0)
    return cfg, sat_layout(build_autoencoder(cfg, with_decoder=True))


def _torch_weight_norm_model(cfg: dict, sat: dict):
    """The model with weights folded by torch's own weight-norm, not by our loader."""
    model = build_autoencoder(cfg, with_decoder=True).eval()
    with torch.no_grad():
        for key, param in model.state_dict(keep_vars=True).items():
            base = key[: -len(".weight")]
            if key.endswith(".weight") and base + ".weight_g" in sat:
                param.copy_(torch._weight_norm(sat[base + ".weight_v"],
                                               sat[base + ".weight_g"], 0))
            else:
                param.copy_(sat[key])
    return model


@pytest.mark.parametrize("suffix,prefix", [(".ckpt", ""), (".safetensors", ""),
                                           (".safetensors", "pretransform.model.")])
def test_sat_checkpoint_round_trip(tmp_path, suffix, prefix):
    cfg, sat = _reference()
    assert "encoder.proj_out.weight" in sat and "encoder.encoder.block.0.weight_g" in sat
    audio = _audio(2, 2 * 1024)
    reference = _torch_weight_norm_model(cfg, sat)
    z_ref = reference.encode(audio, mode="mean")
    tensors = {prefix + k: v.contiguous() for k, v in sat.items()}
    path = tmp_path / f"ae{suffix}"
    if suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, path)
    model = load_autoencoder(cfg, path, with_decoder=True)
    z = model.encode(audio, mode="mean")
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(model.decode(z_ref), reference.decode(z_ref), atol=1e-5)


def test_checkpoint_for_other_config_is_refused(tmp_path):
    cfg, sat = _reference()
    path = tmp_path / "ae.safetensors"
    save_file(sat, str(path))
    wrong = copy.deepcopy(cfg)
    wrong["model"]["encoder"]["config"]["d_model"] = 8
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_autoencoder(wrong, path)
    no_proj = {k: v for k, v in sat.items() if "proj_out" not in k}
    save_file(no_proj, str(tmp_path / "noproj.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: .*encoder\.proj_out\.bias"):
        load_autoencoder(cfg, tmp_path / "noproj.safetensors")


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("mutate,pattern", [
    (lambda c: c["model"]["encoder"]["config"].pop("d_model"),
     r"'model\.encoder\.config' is missing required dac encoder option\(s\) \['d_model'\]"),
    (lambda c: c["model"]["encoder"]["config"].update(channels=4),
     r"'model\.encoder\.config' has unknown dac encoder option\(s\) \['channels'\]"),
    (lambda c: c["model"]["encoder"]["config"].update(latent_dim=4),
     r"latent_dim' = 4 gives 2 latent channels.*2 \* latent_dim"),
    (lambda c: c["model"].update(downsampling_ratio=512),
     r"'model\.downsampling_ratio' = 512 .* strides \[4, 4, 8, 8\]"),
    (lambda c: c["model"]["decoder"]["config"].update(latent_dim=5),
     r"'model\.decoder\.config\.latent_dim' = 5"),
    (lambda c: c["model"]["decoder"]["config"].pop("rates"), r"\['rates'\]"),
    (lambda c: c["model"]["decoder"]["config"].update(channels=8),
     r"'model\.decoder\.config\.channels' = 8 is too small"),
    (lambda c: c["model"]["encoder"]["config"].update(strides=[4, 0]),
     r"strides' must be a non-empty list of positive ints"),
    (lambda c: c["model"].update(io_channels=1), r"in_channels' \(2\)"),
])
def test_config_errors_name_the_field(mutate, pattern):
    cfg = copy.deepcopy(SHRUNK["dac_1024_64_stereo_vae_44k"])
    mutate(cfg)
    with pytest.raises(ModelConfigError, match=pattern):
        build_autoencoder(cfg, with_decoder=True)
