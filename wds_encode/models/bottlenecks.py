"""Autoencoder bottlenecks (the step from encoder output to stored latents), by config `type`.

A registry keyed by the stable-audio-tools `bottleneck.type` string keeps the factory generic:
adding `rvq`, `fsq`, ... later means one new class with `@register_bottleneck("name")`.

Unlike upstream, `encode` takes an explicit `mode` and optional `noise`, because a pre-encoding
tool must be able to store either a VAE sample reproducibly (seeded noise supplied by the
caller), the deterministic mean, or the distribution parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelConfigError, UnsupportedModelError

MODES = ("sample", "mean", "params")

# Bottleneck types stable-audio-tools knows but we do not implement (yet): named in errors so a
# user can tell "not supported here" from "typo in the config".
KNOWN_UPSTREAM_TYPES = ("rvq", "dac_rvq", "rvq_vae", "dac_rvq_vae", "fsq", "dithered_fsq",
                        "l2_norm", "wasserstein")


class Bottleneck(nn.Module):
    """Base class. Subclasses set `type_name`, `is_discrete`, `needs_noise`."""

    type_name: str = ""
    is_discrete: bool = False
    needs_noise: bool = False

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        """Channels of `encode(...)`'s output for an encoder output with `pre_channels`."""
        return pre_channels

    def noise_shape(self, pre: torch.Tensor) -> tuple[int, ...] | None:
        """Shape of the noise `encode(pre, "sample", noise)` consumes, or None if it needs none."""
        return None

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> decoder input (identity for the continuous bottlenecks here)."""
        return latents


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown encode mode {mode!r}; expected one of {list(MODES)}")


_REGISTRY: dict[str, Callable[[Mapping[str, Any], str], Bottleneck]] = {}


def register_bottleneck(type_name: str):
    """Class decorator: make `type_name` buildable via `build_bottleneck`.

    The class provides `from_config(config: Mapping | None, field: str)`; `field` is the JSON
    path of `config`, for error messages.
    """

    def deco(cls):
        cls.type_name = type_name
        _REGISTRY[type_name] = cls.from_config
        return cls

    return deco


def supported_bottleneck_types() -> list[str]:
    return sorted(_REGISTRY)


def _no_options(cfg: Mapping[str, Any], field: str, allowed: tuple[str, ...] = ()) -> dict:
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"'{field}' must be an object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ModelConfigError(f"'{field}' has unknown option(s) {unknown}; "
                               f"allowed: {list(allowed)}")
    return dict(cfg)


@register_bottleneck("vae")
class VAEBottleneck(Bottleneck):
    """Encoder output = [mean; scale] on channels; std = softplus(scale) + 1e-4."""

    needs_noise = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "VAEBottleneck":
        _no_options(cfg, field)
        return cls()

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        return pre_channels if mode == "params" else pre_channels // 2

    def noise_shape(self, pre: torch.Tensor) -> tuple[int, ...]:
        b, c, t = pre.shape
        return (b, c // 2, t)

    def split(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean, std)."""
        if pre.shape[1] % 2:
            raise ValueError(f"vae bottleneck needs an even number of channels, got {pre.shape[1]}")
        mean, scale = pre.chunk(2, dim=1)
        return mean, F.softplus(scale) + 1e-4

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        _check_mode(mode)
        mean, std = self.split(pre)
        if mode == "mean":
            return mean
        if mode == "params":
            return torch.cat([mean, std], dim=1)
        if noise is None:
            noise = torch.randn_like(mean)
        elif tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"vae noise must have shape {tuple(mean.shape)}, "
                             f"got {tuple(noise.shape)}")
        return mean + std * noise.to(device=mean.device, dtype=mean.dtype)


@register_bottleneck("tanh")
class TanhBottleneck(Bottleneck):
    """scale * tanh(x / scale); `config.scale` defaults to 1 (newer upstream versions honour it)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "TanhBottleneck":
        opts = _no_options(cfg, field, ("scale",))
        scale = opts.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ModelConfigError(f"'{field}.scale' must be a positive number, got {scale!r}")
        return cls(scale)

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        _check_mode(mode)
        if self.scale == 1.0:
            return torch.tanh(pre)
        return torch.tanh(pre / self.scale) * self.scale


class IdentityBottleneck(Bottleneck):
    """No `bottleneck` in the config: upstream stores the encoder output unchanged."""

    type_name = "none"

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        _check_mode(mode)
        return pre


def build_bottleneck(cfg: Mapping[str, Any] | None, field: str) -> Bottleneck:
    """Build from a config's `bottleneck` object (None -> identity). `field` is its JSON path."""
    if cfg is None:
        return IdentityBottleneck()
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"'{field}' must be an object, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind is None:
        raise ModelConfigError(f"'{field}.type' is missing; supported: "
                               f"{supported_bottleneck_types()}")
    if kind not in _REGISTRY:
        what = ("is a stable-audio-tools bottleneck not supported yet"
                if kind in KNOWN_UPSTREAM_TYPES else "is unknown")
        raise UnsupportedModelError(
            f"'{field}.type' = {kind!r} {what}; supported bottleneck types: "
            f"{supported_bottleneck_types()}")
    return _REGISTRY[kind](cfg.get("config"), f"{field}.config")
