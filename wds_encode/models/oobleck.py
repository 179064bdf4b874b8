"""Native re-implementation of stable-audio-tools' "oobleck" encoder and decoder.

Why native: stable-audio-tools pulls in a large dependency tree (training code, conditioners,
alias-free-torch, dac, ...) that an encoding tool does not need. This module reproduces the
network exactly, with the *same module nesting*, so that a checkpoint's state_dict keys map 1:1
(`encoder.layers.1.layers.0.layers.1.weight`, ...).

Difference from upstream: convolutions are plain `nn.Conv1d` / `nn.ConvTranspose1d` holding a
single `weight`. Upstream wraps them in `weight_norm` (keys `weight_g` / `weight_v`); the
checkpoint loader folds those into `weight` once at load time (see `checkpoint.py`), which is
numerically the same forward pass and avoids recomputing the norm on every call.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ModelConfigError, UnsupportedModelError
from .options import check_options


def eager_no_grad() -> bool:
    """True when a forward may take the eager fast path: autograd off (`torch.no_grad` /
    `torch.inference_mode`) and not being traced by `torch.compile`, which fuses the textbook
    formula into one kernel by itself and must not see the cache (no graph breaks)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def derived_constants(module: nn.Module, params: tuple[torch.Tensor, ...], compute) -> tuple:
    """`compute(*params)` (per-channel constants such as exp(alpha)), computed once and reused
    while autograd is off and the parameters are unchanged.

    A cache entry is keyed on each parameter's version counter (bumped by every in-place write:
    `load_state_dict`, optimiser steps, `param.data.copy_`), storage address, dtype and device
    (`.to()`, `.half()`, `param.data = ...`). The entry holds detached aliases of the parameters it
    was computed from, so their storage stays alive and its address cannot be reused by a later
    tensor. With autograd on, under `torch.compile`, or for inference-mode parameters (they have no
    version counter) the constants are computed every call, as before."""
    if not eager_no_grad() or any(p.is_inference() for p in params):
        return compute(*params)
    key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
    entry = module.__dict__.get("_derived_constants")
    if entry is None or entry[0] != key:
        entry = (key, compute(*params), tuple(p.detach() for p in params))
        module.__dict__["_derived_constants"] = entry
    return entry[1]


class ConstantCacheModule(nn.Module):
    """Drops the derived-constants cache from pickles and deep copies (it is rebuilt on use)."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_derived_constants", None)
        return state


def snake_eager(x: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    """x + inv_beta * sin(alpha * x)^2 without autograd: one new tensor, written in place.

    The same operations in the same order as the out-of-place formula (sin(x * alpha), squared,
    times inv_beta, plus x), so the result is bit-for-bit the same; it only skips the four
    temporaries (each a fresh [B, C, N] allocation) the formula makes."""
    s = torch.mul(x, alpha)
    s.sin_()
    s.mul_(s)
    s.mul_(inv_beta)
    return s.add_(x)


class SnakeBeta(ConstantCacheModule):
    """x + 1/(beta + 1e-9) * sin(alpha * x)^2, with alpha/beta stored as logs (upstream default).

    Without autograd the per-channel constants exp(alpha) and 1/(exp(beta) + 1e-9) are computed
    once (see `derived_constants`) and the activation runs in place (`snake_eager`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    @staticmethod
    def _constants(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.exp(log_alpha)[None, :, None]
        beta = torch.exp(log_beta)[None, :, None]
        return alpha, 1.0 / (beta + 1e-9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_no_grad():
            alpha, inv_beta = derived_constants(self, (self.alpha, self.beta), self._constants)
            return snake_eager(x, alpha, inv_beta)
        alpha, inv_beta = self._constants(self.alpha, self.beta)
        return x + inv_beta * torch.sin(x * alpha).pow(2)


def _activation(use_snake: bool, channels: int, antialias: bool) -> nn.Module:
    if antialias:
        raise UnsupportedModelError(
            "oobleck 'antialias_activation': true is not supported yet (it needs alias-free "
            "up/down-sampling filters around each activation); use a model trained without it"
        )
    return SnakeBeta(channels) if use_snake else nn.ELU()


class ResidualUnit(nn.Module):
    """act -> conv k7 (dilated) -> act -> conv k1, plus skip. Keys: `layers.{0..3}`."""

    def __init__(self, channels: int, dilation: int, use_snake: bool):
        super().__init__()
        self.layers = nn.Sequential(
            _activation(use_snake, channels, False),
            nn.Conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation),
            _activation(use_snake, channels, False),
            nn.Conv1d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_no_grad():
            return self.layers(x).add_(x)  # a conv output: a fresh tensor, safe to add into
        return x + self.layers(x)


class EncoderBlock(nn.Module):
    """3 residual units (dilation 1/3/9) -> act -> strided conv (kernel 2*stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, use_snake: bool,
                 antialias: bool):
        super().__init__()
        self.layers = nn.Sequential(
            ResidualUnit(in_channels, 1, use_snake),
            ResidualUnit(in_channels, 3, use_snake),
            ResidualUnit(in_channels, 9, use_snake),
            # upstream passes antialias only to this activation, not to the residual units
            _activation(use_snake, in_channels, antialias),
            nn.Conv1d(in_channels, out_channels, kernel_size=2 * stride, stride=stride,
                      padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderBlock(nn.Module):
    """act -> upsample (transposed conv, or nearest + conv) -> 3 residual units."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, use_snake: bool,
                 antialias: bool, use_nearest_upsample: bool):
        super().__init__()
        if use_nearest_upsample:
            upsample: nn.Module = nn.Sequential(
                nn.Upsample(scale_factor=stride, mode="nearest"),
                nn.Conv1d(in_channels, out_channels, kernel_size=2 * stride, stride=1,
                          bias=False, padding="same"),
            )
        else:
            upsample = nn.ConvTranspose1d(in_channels, out_channels, kernel_size=2 * stride,
                                          stride=stride, padding=math.ceil(stride / 2))
        self.layers = nn.Sequential(
            _activation(use_snake, in_channels, antialias),
            upsample,
            ResidualUnit(out_channels, 1, use_snake),
            ResidualUnit(out_channels, 3, use_snake),
            ResidualUnit(out_channels, 9, use_snake),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def strided_output_length(num_samples: int, strides: list[int]) -> int:
    """Frames after the downsampling convs oobleck and DAC share: kernel 2s, stride s, padding ceil(s/2)."""
    n = num_samples
    for s in strides:
        n = (n + 2 * math.ceil(s / 2) - 2 * s) // s + 1
    return n


def _layout(c_mults: list[int] | None, strides: list[int] | None, what: str) -> tuple[list[int], list[int]]:
    """stable-audio-tools' defaults for the per-block widths and strides, checked to pair up."""
    c_mults = [1, 2, 4, 8] if c_mults is None else list(c_mults)
    strides = [2, 4, 8, 8] if strides is None else list(strides)
    if len(strides) != len(c_mults):
        raise ModelConfigError(
            f"{what}: 'strides' ({len(strides)} entries) and 'c_mults' ({len(c_mults)} "
            "entries) must have the same length")
    return c_mults, strides


class OobleckEncoder(nn.Module):
    """audio [B, in_channels, N] -> pre-bottleneck latents [B, latent_dim, ~N / prod(strides)]."""

    def __init__(self, in_channels: int = 2, channels: int = 128, latent_dim: int = 32,
                 c_mults: list[int] | None = None, strides: list[int] | None = None,
                 use_snake: bool = False, antialias_activation: bool = False):
        super().__init__()
        c_mults, strides = _layout(c_mults, strides, "oobleck")
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        self.strides = strides
        dims = [m * channels for m in [1] + c_mults]
        layers: list[nn.Module] = [nn.Conv1d(in_channels, dims[0], kernel_size=7, padding=3)]
        for i, stride in enumerate(strides):
            layers.append(EncoderBlock(dims[i], dims[i + 1], stride, use_snake,
                                       antialias_activation))
        layers += [
            _activation(use_snake, dims[-1], antialias_activation),
            nn.Conv1d(dims[-1], latent_dim, kernel_size=3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def output_length(self, num_samples: int) -> int:
        """Exact number of latent frames for `num_samples` input samples (conv arithmetic)."""
        return strided_output_length(num_samples, self.strides)


class OobleckDecoder(nn.Module):
    """latents [B, latent_dim, T] -> audio [B, out_channels, T * prod(strides)]."""

    def __init__(self, out_channels: int = 2, channels: int = 128, latent_dim: int = 32,
                 c_mults: list[int] | None = None, strides: list[int] | None = None,
                 use_snake: bool = False, antialias_activation: bool = False,
                 use_nearest_upsample: bool = False, final_tanh: bool = True):
        super().__init__()
        c_mults, strides = _layout(c_mults, strides, "oobleck decoder")
        self.out_channels = out_channels
        self.latent_dim = latent_dim
        dims = [m * channels for m in [1] + c_mults]
        layers: list[nn.Module] = [nn.Conv1d(latent_dim, dims[-1], kernel_size=7, padding=3)]
        for i in range(len(strides), 0, -1):
            layers.append(DecoderBlock(dims[i], dims[i - 1], strides[i - 1], use_snake,
                                       antialias_activation, use_nearest_upsample))
        layers += [
            _activation(use_snake, dims[0], antialias_activation),
            nn.Conv1d(dims[0], out_channels, kernel_size=7, padding=3, bias=False),
            nn.Tanh() if final_tanh else nn.Identity(),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


_ENCODER_KEYS = {"in_channels", "channels", "latent_dim", "c_mults", "strides", "use_snake",
                 "antialias_activation"}
_DECODER_KEYS = {"out_channels", "channels", "latent_dim", "c_mults", "strides", "use_snake",
                 "antialias_activation", "use_nearest_upsample", "final_tanh"}


_POSITIVE_INTS = {"in_channels", "out_channels", "channels", "latent_dim"}
_INT_LISTS = {"c_mults", "strides"}


def _check_fields(cfg: Mapping[str, Any], allowed: set[str], field: str) -> dict[str, Any]:
    return check_options(cfg, field, "oobleck", allowed=allowed, positive_ints=_POSITIVE_INTS & allowed,
                         int_lists=_INT_LISTS)


def build_oobleck_encoder(cfg: Mapping[str, Any], field: str) -> OobleckEncoder:
    """Build from an `encoder.config` dict; `field` is its JSON path, used in error messages."""
    return OobleckEncoder(**_check_fields(cfg, _ENCODER_KEYS, field))


def build_oobleck_decoder(cfg: Mapping[str, Any], field: str) -> OobleckDecoder:
    """Build from a `decoder.config` dict; `field` is its JSON path, used in error messages."""
    return OobleckDecoder(**_check_fields(cfg, _DECODER_KEYS, field))
