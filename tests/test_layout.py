"""wds_encode/models/layout.py: the channels-last encoder gives the channels-first encoder's latents
(within 1e-5 in fp32) for every encoder family, through `BatchEncoder(channels_last=True)` as a run
uses it, eager and compiled, and leaves the original model alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SEANET_SMALL, golden
from wds_encode.config import load_model_config
from wds_encode.pipeline.encoder import BatchEncoder
from wds_encode.models import build_autoencoder, load_autoencoder
from wds_encode.models.layout import ChannelsLastConv1d, channels_last_encoder

CPU = torch.device("cpu")

def _model(name: str):
    """(model, audio [2, C, N]) for an encoder family: golden stable-audio-tools models, seeded SEANet."""
    if name == "seanet":
        torch.manual_seed(0)
        model = build_autoencoder(SEANET_SMALL)
        return model, 0.1 * torch.randn(2, 1, 3200, generator=torch.Generator().manual_seed(3))
    d = golden({"oobleck": "oobleck_snake_vae", "oobleck_elu": "oobleck_elu_tanh", "dac": "dac_vae"}[name])
    model = load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors")
    return model, torch.from_numpy(np.load(d / "input.npy"))[:2]


def _encode(model, audio, **options) -> tuple[BatchEncoder, torch.Tensor]:
    encoder = BatchEncoder(model, device=CPU, precision="fp32", latent_mode="mean", **options)
    masks = torch.ones(audio.shape[0], audio.shape[-1], dtype=torch.bool)
    return encoder, encoder.encode(audio, masks, [f"k{i}" for i in range(audio.shape[0])]).latents


def _convs(module: nn.Module) -> tuple[int, int]:
    """(channels-last convolutions, plain Conv1d) in a module tree."""
    return (sum(isinstance(m, ChannelsLastConv1d) for m in module.modules()),
            sum(type(m) is nn.Conv1d for m in module.modules()))


@pytest.mark.parametrize("name", ["oobleck", "oobleck_elu", "dac", "seanet"])
def test_channels_last_latents_equal_channels_first(name):
    model, audio = _model(name)
    _, plain = _encode(model, audio)
    encoder, fast = _encode(model, audio, channels_last=True)
    assert encoder.channels_last
    assert fast.shape == plain.shape and fast.is_contiguous()
    assert plain.abs().max() > 1e-3   # not a degenerate all-zero comparison
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    swapped, left = _convs(encoder._eager[id(encoder.model)])
    assert swapped > 0
    if name != "seanet":
        assert left == 0    # every encoder conv of oobleck and DAC is zero-padded: all run channels-last
    assert _convs(model.encoder)[0] == 0, "the model's own encoder must stay as it was"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["oobleck", "seanet"])
def test_channels_last_compiled_equals_channels_first(name):
    torch._dynamo.reset()
    model, audio = _model(name)
    _, plain = _encode(model, audio)
    encoder, fast = _encode(model, audio, channels_last=True, compile=True)
    torch._dynamo.reset()
    assert encoder.compiled and encoder.compile_error is None, encoder.compile_error
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_activations_between_convolutions_stay_time_major():
    """The point of the layout: each conv's output is [B, C, N] with channels innermost in memory,
    so no layer converts back and forth."""
    conv = nn.Conv1d(8, 8, kernel_size=7, dilation=3, padding=9).eval()
    fast = channels_last_encoder(nn.Sequential(conv, nn.ELU(), nn.Conv1d(8, 4, kernel_size=1)))
    seen = []
    for m in fast.modules():
        if isinstance(m, (ChannelsLastConv1d, nn.ELU)):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.stride()))
    x = torch.randn(2, 8, 1000)
    with torch.inference_mode():
        y = fast(x)
        strides = list(seen)
        expected = fast.encoder[2](fast.encoder[1](fast.encoder[0](x)))
    assert [s[1] for s in strides] == [1, 1, 1]   # channel stride 1: time-major
    assert y.is_contiguous()                       # handed to the bottleneck channels-first again
    torch.testing.assert_close(y, expected)


def test_only_zero_padded_convolutions_are_converted():
    reflect = nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")
    same = nn.Conv1d(2, 2, 3, padding="same")
    fast = channels_last_encoder(nn.Sequential(reflect, same, nn.Conv1d(2, 2, 3, stride=2, padding=1)))
    assert [type(m).__name__ for m in fast.encoder] == ["Conv1d", "Conv1d", "ChannelsLastConv1d"]
    with pytest.raises(ValueError, match="zero-padded"):
        ChannelsLastConv1d(reflect)
    x = torch.randn(1, 2, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), fast.encoder(x))
