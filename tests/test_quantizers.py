"""Discrete bottlenecks (rvq, dac_rvq, fsq, dithered_fsq): numerics against stable-audio-tools
golden data, tokens API, strict checkpoint loading, options, and independent reference
computations for the options the golden models do not exercise."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import GOLDEN_CKPTS, golden
from wds_encode.config import load_model_config
from wds_encode.models import (
    CheckpointError,
    ModelConfigError,
    UnsupportedModelError,
    build_autoencoder,
    load_autoencoder,
)
from wds_encode.models.bottlenecks import build_bottleneck

DISCRETE_GOLDEN = ("oobleck_rvq", "oobleck_dac_rvq", "oobleck_fsq")
FIELD = "model.bottleneck.config"


def golden_tokens(name: str) -> torch.Tensor:
    """Golden tokens as [B, Q, T] int64 (stable-audio-tools' rvq gives [B, T, Q])."""
    tokens = torch.from_numpy(np.load(golden(name) / "tokens.npy")).long()
    return tokens.transpose(1, 2) if name == "oobleck_rvq" else tokens


def npy(name: str, what: str) -> np.ndarray:
    return np.load(golden(name) / f"{what}.npy")


# ----------------------------------------------------------------------------- golden data
@pytest.mark.parametrize("ckpt", GOLDEN_CKPTS)
@pytest.mark.parametrize("name", DISCRETE_GOLDEN)
def test_golden_discrete_matches_stable_audio_tools(name, ckpt):
    d = golden(name)
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / ckpt)
    bottleneck = model.bottleneck
    assert model.is_discrete and bottleneck.is_discrete and not bottleneck.needs_noise
    assert bottleneck.type_name == name.split("_", 1)[1]
    assert model.noise_shape(3, 128) is None

    audio = torch.from_numpy(npy(name, "input"))
    pre = model.encode_pre_bottleneck(audio)
    np.testing.assert_allclose(pre.numpy(), npy(name, "pre_bottleneck"), rtol=0, atol=1e-5)

    latents = model.encode(audio)
    np.testing.assert_allclose(latents.numpy(), npy(name, "latents"), rtol=0, atol=1e-5)
    for mode in ("mean", "params"):  # nothing to sample: every mode gives the quantized latents
        assert torch.equal(model.encode(audio, mode=mode), latents)

    tokens = bottleneck.encode_tokens(pre)
    expected = golden_tokens(name)
    assert tokens.dtype == torch.int64
    assert tokens.shape == expected.shape == (3, bottleneck.num_quantizers, latents.shape[-1])
    assert torch.equal(tokens, expected)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < bottleneck.codebook_size

    decoded_latents = bottleneck.decode_tokens(expected)
    np.testing.assert_allclose(decoded_latents.numpy(), npy(name, "latents"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DISCRETE_GOLDEN)
def test_golden_discrete_decoder(name):
    d = golden(name)
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors",
                             with_decoder=True)
    decoded = model.decode(torch.from_numpy(npy(name, "latents")))
    np.testing.assert_allclose(decoded.numpy(), npy(name, "decoded"), rtol=0, atol=1e-4)
    # tokens -> latents -> audio, the path `verify` takes for token outputs
    again = model.decode(model.bottleneck.decode_tokens(golden_tokens(name)))
    np.testing.assert_allclose(again.numpy(), npy(name, "decoded"), rtol=0, atol=1e-4)


def test_golden_sizes():
    expect = {"oobleck_rvq": (3, 16), "oobleck_dac_rvq": (4, 32), "oobleck_fsq": (2, 7 * 5 * 5)}
    for name, (q, size) in expect.items():
        d = golden(name)
        bottleneck = build_autoencoder(load_model_config(d / "model_config.json")).bottleneck
        assert (bottleneck.num_quantizers, bottleneck.codebook_size) == (q, size)


# ----------------------------------------------------------------------------- strict loading
def _rewrite(name: str, tmp_path: Path, edit) -> Path:
    tensors = load_file(str(golden(name) / "model.safetensors"))
    edit(tensors)
    out = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize("name,key", [
    ("oobleck_rvq", "bottleneck.quantizer.layers.1._codebook.embed"),
    ("oobleck_rvq", "bottleneck.quantizer.layers.2._codebook.cluster_size"),
    ("oobleck_dac_rvq", "bottleneck.quantizer.quantizers.3.codebook.weight"),
    ("oobleck_fsq", "bottleneck.quantizer.project_in.weight"),
])
def test_missing_codebook_tensor_is_named(tmp_path, name, key):
    path = _rewrite(name, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as err:
        load_autoencoder(load_model_config(golden(name) / "model_config.json"), path)
    assert f"missing keys: (1) {key}" in str(err.value) and str(path) in str(err.value)


def test_dac_weight_norm_halves_must_pair(tmp_path):
    key = "bottleneck.quantizer.quantizers.0.in_proj.weight_v"
    path = _rewrite("oobleck_dac_rvq", tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="in_proj.weight_g.*no partner"):
        load_autoencoder(load_model_config(golden("oobleck_dac_rvq") / "model_config.json"), path)


def test_codebook_shape_mismatch_is_named(tmp_path):
    cfg = load_model_config(golden("oobleck_rvq") / "model_config.json")
    cfg["model"]["bottleneck"]["config"]["codebook_size"] = 32
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*_codebook.embed"):
        load_autoencoder(cfg, golden("oobleck_rvq") / "model.safetensors")


def test_uninitialised_rvq_codebook_is_refused(tmp_path):
    key = "bottleneck.quantizer.layers.1._codebook.initted"
    path = _rewrite("oobleck_rvq", tmp_path, lambda t: t.__setitem__(key, torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"layer\(s\) \[1\] were never initialised"):
        load_autoencoder(load_model_config(golden("oobleck_rvq") / "model_config.json"), path)


def test_the_codebook_check_runs_at_load_not_per_batch():
    """Reading the `initted` flags synchronises with the device: done once at load, never per batch."""
    d = golden("oobleck_rvq")
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors")
    for layer in model.bottleneck.quantizer.layers:
        layer._codebook.initted.fill_(0)  # a check per batch would now refuse to encode
    audio = torch.from_numpy(npy("oobleck_rvq", "input"))
    tokens = model.bottleneck.encode_tokens(model.encoder(audio))
    assert torch.equal(tokens.long(), golden_tokens("oobleck_rvq").long())


# ----------------------------------------------------------------------------- tokens API
@pytest.fixture(scope="module")
def rvq_model():
    d = golden("oobleck_rvq")
    return load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors")


def test_decode_tokens_validates_its_input(rvq_model):
    bottleneck = rvq_model.bottleneck
    tokens = golden_tokens("oobleck_rvq")
    with pytest.raises(ValueError, match=r"\[batch, quantizers, frames\]"):
        bottleneck.decode_tokens(tokens[0])
    with pytest.raises(ValueError, match="4 quantizer rows"):
        bottleneck.decode_tokens(torch.cat([tokens, tokens[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        bottleneck.decode_tokens(tokens + 10)
    with pytest.raises(ValueError, match="integers"):
        bottleneck.decode_tokens(tokens.float())
    # stored tokens come back in the smallest integer dtype; any integer dtype is accepted
    assert torch.equal(bottleneck.decode_tokens(tokens.to(torch.uint8)),
                       bottleneck.decode_tokens(tokens))


def test_residual_decode_tokens_accepts_a_prefix_of_quantizers(rvq_model):
    bottleneck = rvq_model.bottleneck
    tokens = golden_tokens("oobleck_rvq")
    books = [layer._codebook.embed[0] for layer in bottleneck.quantizer.layers]
    coarse = bottleneck.decode_tokens(tokens[:, :2])
    expected = (books[0][tokens[:, 0]] + books[1][tokens[:, 1]]).transpose(1, 2)
    assert torch.allclose(coarse, expected, atol=1e-6)


def test_continuous_bottleneck_has_no_tokens():
    cfg = load_model_config(golden("oobleck_elu_tanh") / "model_config.json")
    model = build_autoencoder(cfg)
    assert not model.is_discrete
    with pytest.raises(TypeError, match="continuous"):
        model.bottleneck.encode_tokens(torch.zeros(1, 4, 3))


def test_half_precision_model_quantizes_in_float32(tmp_path):
    d = golden("oobleck_fsq")
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors",
                             dtype=torch.float16)
    audio = torch.from_numpy(npy("oobleck_fsq", "input"))
    latents = model.encode(audio)
    assert latents.dtype == torch.float16 and latents.shape == (3, 4, 16)
    tokens = model.bottleneck.encode_tokens(model.encode_pre_bottleneck(audio))
    assert tokens.dtype == torch.int64
    assert (tokens == golden_tokens("oobleck_fsq")).float().mean() > 0.9
    assert model.bottleneck.decode_tokens(tokens).dtype == torch.float32


# ----------------------------------------------------------------------------- references
def _bottleneck(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_bottleneck(cfg, "model.bottleneck").eval()


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if t.is_floating_point() and t.numel() > 1:
                t.add_(0.3 * torch.randn(t.shape, generator=gen))


PRE = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("cosine", [False, True])
def test_rvq_reference_with_projection_and_cosine(cosine):
    b = _bottleneck({"type": "rvq", "config": {
        "dim": 6, "codebook_dim": 3, "num_quantizers": 3, "codebook_size": 10,
        "use_cosine_sim": cosine, "kmeans_init": False, "decay": 0.9}})
    _perturb(b, 1)
    keys = set(b.state_dict())
    assert {"quantizer.project_in.weight", "quantizer.project_out.bias",
            "quantizer.layers.2._codebook.embed_avg"} <= keys
    latents, tokens = b.quantize(PRE)
    # reference: brute-force nearest code per stage
    x = F.linear(PRE.transpose(1, 2), b.quantizer.project_in.weight,
                 b.quantizer.project_in.bias)
    residual, out = x, torch.zeros_like(x)
    for q, layer in enumerate(b.quantizer.layers):
        book = layer._codebook.embed[0]
        if cosine:
            idx = (F.normalize(residual, dim=-1) @ book.t()).argmax(-1)
        else:
            idx = torch.cdist(residual, book.expand(residual.shape[0], -1, -1)).argmin(-1)
        assert torch.equal(idx, tokens[:, q])
        residual, out = residual - book[idx], out + book[idx]
    ref = F.linear(out, b.quantizer.project_out.weight, b.quantizer.project_out.bias)
    assert torch.allclose(latents, ref.transpose(1, 2), atol=1e-6)
    assert torch.allclose(b.decode_tokens(tokens), latents, atol=1e-6)


def test_rvq_shared_codebook_and_defaults():
    b = _bottleneck({"type": "rvq", "config": {"dim": 6, "codebook_size": 8,
                                              "num_quantizers": 2, "shared_codebook": True}})
    layers = b.quantizer.layers
    assert layers[0]._codebook is layers[1]._codebook
    assert "quantizer.layers.1._codebook.embed" in b.state_dict()  # saved per layer upstream too
    # stable-audio-tools' defaults fill what the config leaves out
    d = _bottleneck({"type": "rvq", "config": {}})
    assert (d.dim, d.codebook_size, d.num_quantizers) == (128, 1024, 8)


def test_dac_reference_with_per_stage_codebook_dims():
    b = _bottleneck({"type": "dac_rvq", "config": {
        "input_dim": 6, "n_codebooks": 3, "codebook_size": 12, "codebook_dim": [2, 3, 4],
        "quantizer_dropout": 0.5}})
    _perturb(b, 2)
    latents, tokens = b.quantize(PRE)
    residual, z = PRE, 0
    for q, vq in enumerate(b.quantizer.quantizers):
        z_e = vq.in_proj(residual)
        sims = torch.einsum("bdt,kd->btk", F.normalize(z_e, dim=1),
                            F.normalize(vq.codebook.weight, dim=1))
        idx = sims.argmax(-1)
        assert torch.equal(idx, tokens[:, q])
        z_q = vq.out_proj(vq.codebook(idx).transpose(1, 2))
        residual, z = residual - z_q, z + z_q
    assert torch.allclose(latents, z, atol=1e-5)
    assert torch.allclose(b.decode_tokens(tokens), latents, atol=1e-5)


def test_dac_quantize_on_decode_and_noise_augment():
    b = _bottleneck({"type": "dac_rvq", "config": {
        "input_dim": 6, "n_codebooks": 2, "codebook_size": 8, "codebook_dim": 4,
        "quantize_on_decode": True, "noise_augment_dim": 2}})
    latents, tokens = b.quantize(PRE)
    assert torch.equal(latents, PRE)  # upstream: encode returns its input, decode quantizes
    plain = copy.deepcopy(b)
    plain.quantize_on_decode, plain.noise_augment_dim = False, 0
    assert torch.equal(tokens, plain.encode_tokens(PRE))
    decoded = b.decode(latents)
    assert decoded.shape == (2, 8, 11) and b.decoder_channels(6) == 8
    assert torch.allclose(decoded[:, :6], plain.encode(PRE), atol=1e-6)


@pytest.mark.parametrize("levels,codebooks,dim,hard", [
    ([8, 5, 5, 5], 1, 4, False),    # even level, no projection, one codebook
    ([3, 4], 3, 6, False),
    ([5, 6, 7], 2, 5, True),       # projection, bound_hard_clamp
])
def test_fsq_reference(levels, codebooks, dim, hard):
    b = _bottleneck({"type": "fsq", "config": {
        "levels": levels, "num_codebooks": codebooks, "dim": dim, "bound_hard_clamp": hard,
        "noise_dropout": 0.5}})
    _perturb(b, 3)
    pre = PRE[:, :dim] * 3
    latents, tokens = b.quantize(pre)
    assert tokens.shape == (2, codebooks, 11) and b.codebook_size == math.prod(levels)
    # reference, per scalar: bound to [-(L-1)/2, (L-1)/2] (shifted by 1/2 for even L), round
    proj = b.quantizer.project_in
    z = pre.transpose(1, 2)
    if isinstance(proj, torch.nn.Linear):
        z = proj(z)
    z = z.reshape(2, 11, codebooks, len(levels)).double()
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * 1.001 / 2
    offset = (1 - lv % 2) * 0.5
    if hard:
        bounded = (z + offset / half_l).clamp(-1, 1) * half_l - offset
    else:
        bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    rounded = bounded.round()
    hw = torch.div(lv, 2, rounding_mode="floor")
    digits = rounded + hw
    assert bool(((digits >= 0) & (digits < lv)).all())
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.float64)
    assert torch.equal((digits * basis).sum(-1).long(), tokens.transpose(1, 2))
    codes = (rounded / hw).reshape(2, 11, -1).float()
    out = b.quantizer.project_out(codes) if isinstance(proj, torch.nn.Linear) else codes
    assert torch.allclose(latents, out.transpose(1, 2), atol=1e-6)
    assert torch.allclose(b.decode_tokens(tokens), latents, atol=1e-6)


def test_dithered_fsq_reference():
    b = _bottleneck({"type": "dithered_fsq", "config": {"dim": 3, "levels": [3, 4, 5],
                                                       "num_codebooks": 2}})
    assert b.state_dict() == {} and b.codebook_size == 60 and b.num_quantizers == 2
    latents, tokens = b.quantize(PRE)
    z = torch.tanh(PRE.transpose(1, 2)).reshape(2, 11, 2, 3).double()
    lv = torch.tensor([3, 4, 5], dtype=torch.float64)
    digits = ((z + 1) * (lv - 1) / 2).round()
    codes = digits * 2 / (lv - 1) - 1
    assert torch.allclose(latents, codes.reshape(2, 11, 6).transpose(1, 2).float(), atol=1e-6)
    assert torch.equal(tokens.transpose(1, 2), (digits * torch.tensor([1., 3., 12.])).sum(-1).long())
    assert torch.allclose(b.decode_tokens(tokens), latents, atol=1e-6)
    assert _bottleneck({"type": "dithered_fsq", "config": {"dim": 4, "levels": 5}}).levels == [5] * 4


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kind,config,exc,pattern", [
    ("rvq", {"dim": 8, "colour": 1}, ModelConfigError, r"config' has unknown option\(s\) \['colour'\]"),
    ("rvq", {"dim": 8, "affine_param": True}, UnsupportedModelError, r"config.affine_param' = True"),
    ("rvq", {"dim": 8, "heads": 2}, UnsupportedModelError, r"config.heads' = 2"),
    ("rvq", {"dim": 8, "codebook_size": [16, 32]}, ModelConfigError, r"config.codebook_size'.*per-layer"),
    ("rvq", {"dim": 8, "num_quantizers": 0}, ModelConfigError, r"config.num_quantizers' must be"),
    ("dac_rvq", {"input_dim": 8, "n_codebooks": 2, "codebook_dim": [4]}, ModelConfigError,
     r"config.codebook_dim' lists 1 sizes but .*n_codebooks' = 2"),
    ("dac_rvq", {"input_dim": 8, "n_quantizers": 2}, ModelConfigError, r"unknown option\(s\) \['n_quantizers'\]"),
    ("fsq", {"dim": 4}, ModelConfigError, r"config.levels' is missing"),
    ("fsq", {"dim": 4, "levels": [8, 1]}, ModelConfigError, r"config.levels' must be"),
    ("fsq", {"dim": 4, "levels": [5, 5], "preserve_symmetry": True}, UnsupportedModelError,
     r"config.preserve_symmetry' = True"),
    ("fsq", {"dim": 4, "levels": [5, 5], "allowed_dtypes": []}, ModelConfigError, r"\['allowed_dtypes'\]"),
    ("dithered_fsq", {"dim": 2, "levels": [5, 5, 5]}, ModelConfigError, r"has 3 entries but .*dim' = 2"),
])
def test_bad_options_name_the_field(kind, config, exc, pattern):
    cfg = load_model_config(golden("oobleck_rvq") / "model_config.json")
    cfg["model"]["bottleneck"] = {"type": kind, "config": config}
    with pytest.raises(exc) as err:
        build_autoencoder(cfg)
    assert f"'{FIELD}" in str(err.value)
    assert err.match(pattern)


@pytest.mark.parametrize("kind,config,field", [
    ("rvq", {"dim": 6}, "dim"),
    ("dac_rvq", {"input_dim": 6}, "input_dim"),
    ("fsq", {"dim": 6, "levels": [5, 5]}, "dim"),
])
def test_width_mismatch_with_encoder_names_the_field(kind, config, field):
    cfg = load_model_config(golden("oobleck_rvq") / "model_config.json")  # encoder gives 8
    cfg["model"]["bottleneck"] = {"type": kind, "config": config}
    with pytest.raises(ModelConfigError, match=rf"'{FIELD}\.{field}' = 6, but the encoder outputs 8"):
        build_autoencoder(cfg)


def test_training_only_options_do_not_change_inference():
    d = golden("oobleck_rvq")
    cfg = load_model_config(d / "model_config.json")
    cfg["model"]["bottleneck"]["config"].update(
        decay=0.5, threshold_ema_dead_code=0, commitment_weight=0.25, quantize_dropout=True,
        rotation_trick=True, kmeans_iters=3, beam_size=1, channel_last=True)
    model = load_autoencoder(cfg, d / "model.safetensors")
    pre = torch.from_numpy(npy("oobleck_rvq", "pre_bottleneck"))
    assert torch.equal(model.bottleneck.encode_tokens(pre), golden_tokens("oobleck_rvq"))
