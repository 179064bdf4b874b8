"""Continuous bottlenecks added for stable-audio-tools parity (l2_norm, wasserstein), the
registry, option errors, and the discrete API every bottleneck exposes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wds_encode.models import (
    ModelConfigError,
    UnsupportedModelError,
    build_autoencoder,
    load_autoencoder,
    supported_bottleneck_types,
)
from wds_encode.models.bottlenecks import (
    Bottleneck,
    DiscreteBottleneck,
    build_bottleneck,
)

FIELD = "model.bottleneck"
PRE = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)) * 4


def small_config(bottleneck: dict, decoder_latent_dim: int = 3) -> dict:
    return {
        "model_type": "autoencoder", "sample_rate": 16000, "audio_channels": 2,
        "model": {
            "encoder": {"type": "oobleck", "config": {
                "in_channels": 2, "channels": 4, "c_mults": [1, 2], "strides": [2, 3],
                "latent_dim": 3, "use_snake": False}},
            "decoder": {"type": "oobleck", "config": {
                "out_channels": 2, "channels": 4, "c_mults": [1, 2], "strides": [2, 3],
                "latent_dim": decoder_latent_dim, "use_snake": False, "final_tanh": False}},
            "bottleneck": bottleneck, "latent_dim": 3, "downsampling_ratio": 6,
            "io_channels": 2,
        },
    }


def test_registry_lists_the_new_types():
    assert {"vae", "tanh", "l2_norm", "wasserstein", "rvq", "dac_rvq", "fsq",
            "dithered_fsq"} <= set(supported_bottleneck_types())


# ----------------------------------------------------------------------------- l2_norm
def test_l2_norm_matches_upstream():
    b = build_bottleneck({"type": "l2_norm"}, FIELD)
    assert not b.is_discrete and not b.needs_noise and b.latent_channels(3) == 3
    z = b.encode(PRE)
    assert torch.equal(z, F.normalize(PRE, dim=1))
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 7))
    for mode in ("mean", "params"):
        assert torch.equal(b.encode(PRE, mode=mode), z)
    # upstream normalizes again on decode (so scaled latents decode like unit ones)
    assert torch.allclose(b.decode(3 * z), z)
    with pytest.raises(ValueError, match="unknown encode mode"):
        b.encode(PRE, mode="median")


def test_l2_norm_through_the_model():
    torch.manual_seed(0)
    model = load_autoencoder(small_config({"type": "l2_norm"}), None, with_decoder=True)
    audio = torch.randn(1, 2, 60)
    z = model.encode(audio)
    assert z.shape == (1, 3, 10) and torch.allclose(z.norm(dim=1), torch.ones(1, 10))
    assert model.decode(z).shape[:2] == (1, 2)


def test_l2_norm_takes_no_options():
    with pytest.raises(ModelConfigError, match=r"'model\.bottleneck\.config' has unknown "
                                               r"option\(s\) \['eps'\]"):
        build_bottleneck({"type": "l2_norm", "config": {"eps": 1e-6}}, FIELD)
    assert build_bottleneck({"type": "l2_norm", "config": {}}, FIELD).type_name == "l2_norm"


# ----------------------------------------------------------------------------- wasserstein
def test_wasserstein_encode_is_identity_at_inference():
    b = build_bottleneck({"type": "wasserstein", "config": {"bypass_mmd": True}}, FIELD)
    assert not b.is_discrete and not b.needs_noise
    for mode in ("sample", "mean", "params"):
        assert torch.equal(b.encode(PRE, mode=mode), PRE)
    assert torch.equal(b.decode(PRE), PRE) and b.decoder_channels(3) == 3


def test_wasserstein_use_tanh():
    b = build_bottleneck({"type": "wasserstein",
                          "config": {"use_tanh": True, "tanh_scale": 2.0}}, FIELD)
    assert torch.allclose(b.encode(PRE), 2.0 * torch.tanh(PRE / 2.0))
    default = build_bottleneck({"type": "wasserstein", "config": {"use_tanh": True}}, FIELD)
    assert torch.allclose(default.encode(PRE), 5.0 * torch.tanh(PRE / 5.0))


def test_wasserstein_noise_augment_on_decode():
    b = build_bottleneck({"type": "wasserstein", "config": {"noise_augment_dim": 2}}, FIELD)
    assert torch.equal(b.encode(PRE), PRE)  # noise only on the decoder side
    out = b.decode(PRE)
    assert out.shape == (2, 5, 7) and torch.equal(out[:, :3], PRE)
    assert not torch.equal(out[:, 3:], b.decode(PRE)[:, 3:])  # fresh N(0, 1) each call
    assert b.decoder_channels(3) == 5


@pytest.mark.parametrize("config,pattern", [
    ({"noise_augment": 2}, r"'model\.bottleneck\.config' has unknown option\(s\) \['noise_augment'\]"),
    ({"noise_augment_dim": -1}, r"'model\.bottleneck\.config\.noise_augment_dim' must be an integer >= 0"),
    ({"use_tanh": "yes"}, r"'model\.bottleneck\.config\.use_tanh' must be true or false"),
    ({"tanh_scale": 0}, r"'model\.bottleneck\.config\.tanh_scale' must be a positive number"),
])
def test_wasserstein_bad_options(config, pattern):
    with pytest.raises(ModelConfigError, match=pattern):
        build_autoencoder(small_config({"type": "wasserstein", "config": config}))


# ----------------------------------------------------------------------------- discrete API
def test_discrete_api_on_every_type():
    configs = {
        "rvq": {"dim": 3, "num_quantizers": 2, "codebook_size": 5},
        "dac_rvq": {"input_dim": 3, "n_codebooks": 2, "codebook_size": 5, "codebook_dim": 2},
        "fsq": {"dim": 3, "levels": [3, 4], "num_codebooks": 2},
        "dithered_fsq": {"dim": 3, "levels": 3},
    }
    for kind, config in configs.items():
        torch.manual_seed(0)
        model = load_autoencoder(small_config({"type": kind, "config": config}), None)
        b = model.bottleneck
        assert isinstance(b, DiscreteBottleneck) and model.is_discrete, kind
        assert model.noise_shape(2, 60) is None
        pre = model.encode_pre_bottleneck(torch.randn(2, 2, 60))
        tokens = b.encode_tokens(pre)
        assert tokens.dtype == torch.int64 and tokens.shape == (2, b.num_quantizers, 10), kind
        assert 0 <= int(tokens.min()) and int(tokens.max()) < b.codebook_size, kind
        latents = b.encode(pre)
        assert latents.shape == (2, 3, 10) and latents.dtype == pre.dtype, kind
        assert torch.allclose(b.decode_tokens(tokens), latents, atol=1e-5), kind
        assert all(torch.equal(b.encode(pre, mode=m), latents) for m in ("mean", "params"))
        with pytest.raises(ValueError, match="unknown encode mode"):
            b.encode(pre, mode="median")


def test_continuous_bottlenecks_refuse_tokens():
    for kind in ("vae", "tanh", "l2_norm", "wasserstein"):
        b = build_bottleneck({"type": kind}, FIELD)
        assert isinstance(b, Bottleneck) and not b.is_discrete
        with pytest.raises(TypeError, match=f"'{kind}' bottleneck is continuous"):
            b.encode_tokens(PRE)
        with pytest.raises(TypeError, match="no tokens"):
            b.decode_tokens(torch.zeros(1, 1, 1, dtype=torch.long))


def test_unsupported_upstream_type_is_named():
    with pytest.raises(UnsupportedModelError, match=r"'model\.bottleneck\.type' = 'rvq_vae' is a "
                                                    r"stable-audio-tools bottleneck not supported"):
        build_bottleneck({"type": "rvq_vae", "config": {}}, FIELD)
