"""Native re-implementation of the DAC (descript-audio-codec 1.0) encoder and decoder, as
stable-audio-tools wraps them (`DACEncoderWrapper` / `DACDecoderWrapper`, config `type: "dac"`).

Module nesting mirrors upstream so checkpoint keys map 1:1:
- encoder: `encoder.block.{0..}` (DAC's `Encoder.block` Sequential) + `proj_out` (a *plain*
  conv added by stable-audio-tools, not weight-normed; absent when `latent_dim` is not given);
- decoder: `decoder.model.{0..}` (DAC's `Decoder.model` Sequential).
As in `oobleck.py`, convolutions hold one plain `weight`; upstream's weight-norm pairs are folded
by the checkpoint loader.

stable-audio-tools' wrapper contract (config -> modules):
- encoder config `{in_channels=1, latent_dim, d_model, strides}`: DAC's `Encoder(d_model,
  strides, d_latent=d_model * 2**len(strides))` (its last conv keeps the width), then
  `proj_out: Conv1d(enc_dim, latent_dim, 1)`; with `in_channels != 1` the first conv is
  rebuilt to take `in_channels`. A vae bottleneck needs `latent_dim = 2 * model.latent_dim`.
- decoder config `{latent_dim, out_channels=1, channels, rates}`: `Decoder(input_channel=
  latent_dim, channels, rates, d_out=out_channels)`; widths halve per block and the output
  always goes through tanh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ModelConfigError
from .oobleck import (ConstantCacheModule, derived_constants, eager_no_grad, snake_eager,
                      strided_output_length)
from .options import check_options


class Snake1d(ConstantCacheModule):
    """x + 1/(alpha + 1e-9) * sin(alpha * x)^2, alpha stored as-is (shape [1, C, 1]).

    Without autograd 1/(alpha + 1e-9) is computed once (see `derived_constants`) and the
    activation runs in place (`snake_eager`), bit-for-bit equal to the formula."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    @staticmethod
    def _inverse(alpha: torch.Tensor) -> torch.Tensor:
        return (alpha + 1e-9).reciprocal()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        if eager_no_grad():
            return snake_eager(x, alpha, derived_constants(self, (alpha,), self._inverse))
        return x + self._inverse(alpha) * torch.sin(alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """snake -> conv k7 (dilated, length-preserving) -> snake -> conv k1, plus the input,
    centre-cropped if the branch came out shorter (upstream does the same)."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        if crop > 0:
            x = x[..., crop:-crop]
        if eager_no_grad():
            return y.add_(x)  # a conv output: a fresh tensor, safe to add into
        return x + y


class EncoderBlock(nn.Module):
    """3 residual units (dilation 1/3/9) at `dim // 2` -> snake -> strided conv to `dim`."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, 1),
            ResidualUnit(half, 3),
            ResidualUnit(half, 9),
            Snake1d(half),
            nn.Conv1d(half, dim, kernel_size=2 * stride, stride=stride,
                      padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    """snake -> transposed conv (upsample by `stride`) -> 3 residual units (dilation 1/3/9)."""

    def __init__(self, input_dim: int, output_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(input_dim),
            nn.ConvTranspose1d(input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                               padding=math.ceil(stride / 2)),
            ResidualUnit(output_dim, 1),
            ResidualUnit(output_dim, 3),
            ResidualUnit(output_dim, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _DACEncoderCore(nn.Module):
    """DAC's `Encoder` with its first conv taking `in_channels` (keys `block.{i}`)."""

    def __init__(self, in_channels: int, d_model: int, strides: list[int], d_latent: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(in_channels, d_model, kernel_size=7, padding=3)]
        width = d_model
        for stride in strides:
            width *= 2
            layers.append(EncoderBlock(width, stride))
        layers += [Snake1d(width), nn.Conv1d(width, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)
        self.enc_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DACEncoder(nn.Module):
    """audio [B, in_channels, N] -> [B, latent_dim, ~N / prod(strides)] (stable-audio-tools'
    `DACEncoderWrapper`). `latent_dim` is the output channel count: the configured one, or the
    DAC encoder's own width `d_model * 2**len(strides)` when the config gives none."""

    def __init__(self, in_channels: int = 1, d_model: int = 64,
                 strides: list[int] | None = None, latent_dim: int | None = None):
        super().__init__()
        strides = [2, 4, 8, 8] if strides is None else list(strides)
        enc_dim = d_model * 2 ** len(strides)
        self.encoder = _DACEncoderCore(in_channels, d_model, strides, enc_dim)
        self.proj_out: nn.Module = (nn.Conv1d(enc_dim, latent_dim, kernel_size=1)
                                    if latent_dim is not None else nn.Identity())
        self.in_channels = in_channels
        self.latent_dim = latent_dim if latent_dim is not None else enc_dim
        self.strides = strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.encoder(x))

    def output_length(self, num_samples: int) -> int:
        """Exact number of latent frames for `num_samples` input samples (conv arithmetic)."""
        return strided_output_length(num_samples, self.strides)


class _DACDecoderCore(nn.Module):
    """DAC's `Decoder` (keys `model.{i}`)."""

    def __init__(self, input_channel: int, channels: int, rates: list[int], d_out: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(input_channel, channels, kernel_size=7, padding=3)]
        out_dim = channels
        for i, stride in enumerate(rates):
            in_dim, out_dim = channels // 2 ** i, channels // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, stride))
        layers += [Snake1d(out_dim), nn.Conv1d(out_dim, d_out, kernel_size=7, padding=3),
                   nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DACDecoder(nn.Module):
    """latents [B, latent_dim, T] -> audio [B, out_channels, T * prod(rates)] in [-1, 1]
    (stable-audio-tools' `DACDecoderWrapper`; exact length for even rates)."""

    def __init__(self, latent_dim: int, out_channels: int = 1, channels: int = 1536,
                 rates: list[int] | None = None):
        super().__init__()
        rates = [8, 8, 4, 2] if rates is None else list(rates)
        self.decoder = _DACDecoderCore(latent_dim, channels, rates, out_channels)
        self.latent_dim = latent_dim
        self.out_channels = out_channels
        self.strides = rates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


# ----------------------------------------------------------------------------- config checks
_ENCODER_KEYS = {"in_channels", "latent_dim", "d_model", "strides"}
_DECODER_KEYS = {"latent_dim", "out_channels", "channels", "rates"}


def build_dac_encoder(cfg: Mapping[str, Any], field: str) -> DACEncoder:
    """Build from an `encoder.config` dict (`type: "dac"`); `field` is its JSON path."""
    # stable-audio-tools reads kwargs["d_model"] / kwargs["strides"] unguarded: both required.
    opts = check_options(cfg, field, "dac encoder", allowed=_ENCODER_KEYS,
                         required={"d_model", "strides"},
                         positive_ints={"in_channels", "latent_dim", "d_model"},
                         int_lists={"strides"})
    return DACEncoder(**opts)


def build_dac_decoder(cfg: Mapping[str, Any], field: str) -> DACDecoder:
    """Build from a `decoder.config` dict (`type: "dac"`); `field` is its JSON path."""
    opts = check_options(cfg, field, "dac decoder", allowed=_DECODER_KEYS,
                         required={"latent_dim", "channels", "rates"},
                         positive_ints={"latent_dim", "out_channels", "channels"},
                         int_lists={"rates"})
    channels, rates = opts["channels"], opts["rates"]
    if channels // 2 ** len(rates) < 1:
        raise ModelConfigError(
            f"'{field}.channels' = {channels} is too small for {len(rates)} rates: each "
            "decoder block halves the width")
    return DACDecoder(**opts)
