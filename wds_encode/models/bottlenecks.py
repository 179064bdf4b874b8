"""Autoencoder bottlenecks (the step from encoder output to stored latents), by config `type`.

A registry keyed by the stable-audio-tools `bottleneck.type` string keeps the factory generic:
adding a type means one new class with `@register_bottleneck("name")`. The discrete (quantizing)
bottlenecks live in `quantizers.py` and register themselves when this module is imported.

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
        """Channels of `encode(...)`'s output for an encoder output with `pre_channels`.
        Bottlenecks whose input width is fixed by their config raise `ModelConfigError` (naming
        the field) when `pre_channels` does not match it."""
        return pre_channels

    def decoder_channels(self, latent_dim: int) -> int:
        """Channels the decoder receives from `decode(latents[B, latent_dim, T])`: `latent_dim`,
        plus `noise_augment_dim` for the bottlenecks that append noise channels on decode."""
        return latent_dim

    def noise_shape(self, pre: torch.Tensor) -> tuple[int, ...] | None:
        """Shape of the noise `encode(pre, "sample", noise)` consumes, or None if it needs none."""
        return None

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> decoder input (identity for the continuous bottlenecks here)."""
        return latents

    def encode_tokens(self, pre: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"the '{self.type_name}' bottleneck is continuous: it has no tokens")

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"the '{self.type_name}' bottleneck is continuous: it has no tokens")


class DiscreteBottleneck(Bottleneck):
    """A quantizing bottleneck: latents are sums of codebook entries, identified by tokens.

    Subclasses set `num_quantizers` and `codebook_size` and implement `quantize` and
    `decode_tokens`. Tokens are always int64 `[B, num_quantizers, T]` (stable-audio-tools'
    `info[tokens_id]` is `[B, T, Q]` for `rvq`; it is transposed here), values in
    `[0, codebook_size)`.
    """

    is_discrete = True
    num_quantizers: int = 1
    codebook_size: int = 1
    # decode_tokens accepts fewer than num_quantizers rows (coarse reconstruction), as the
    # residual quantizers upstream do
    accepts_fewer_quantizers: bool = False

    def quantize(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pre [B, C, T] -> (latents [B, latent_dim, T] in pre's dtype, tokens int64 [B, Q, T])."""
        raise NotImplementedError

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """The quantized latents, exactly as upstream `model.encode` returns them; every `mode`
        gives the same (there is nothing to sample), `noise` is ignored."""
        _check_mode(mode)
        return self.quantize(pre)[0]

    def encode_tokens(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, C, T] -> tokens int64 [B, num_quantizers, T]."""
        return self.quantize(pre)[1]

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, Q, T] -> the latents `encode` gives for them (before `decode`)."""
        raise NotImplementedError

    def check_tokens(self, tokens: torch.Tensor, device: torch.device | None = None
                     ) -> torch.Tensor:
        """Validate tokens [B, Q, T] and return them as int64 (on `device`)."""
        if not torch.is_tensor(tokens) or tokens.dim() != 3:
            raise ValueError(f"{self.type_name} tokens must be a [batch, quantizers, frames] "
                             f"tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"{self.type_name} tokens must be integers, got {tokens.dtype}")
        q = tokens.shape[1]
        ok = (1 <= q <= self.num_quantizers if self.accepts_fewer_quantizers
              else q == self.num_quantizers)
        if not ok:
            want = (f"1..{self.num_quantizers}" if self.accepts_fewer_quantizers
                    else str(self.num_quantizers))
            raise ValueError(f"{self.type_name} tokens have {q} quantizer rows (dim 1); "
                             f"expected {want}")
        tokens = tokens.to(device=device, dtype=torch.long)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"{self.type_name} tokens must lie in [0, {self.codebook_size}), "
                             f"got values in [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens


def append_noise_channels(x: torch.Tensor, noise_augment_dim: int) -> torch.Tensor:
    """Upstream `noise_augment_dim`: append that many N(0, 1) channels for the decoder."""
    if noise_augment_dim <= 0:
        return x
    noise = torch.randn(x.shape[0], noise_augment_dim, x.shape[-1], device=x.device,
                        dtype=x.dtype)
    return torch.cat([x, noise], dim=1)


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


def opt_int(opts: Mapping[str, Any], key: str, field: str, default: int | None = None, *,
            minimum: int = 1) -> int:
    """opts[key] (or `default`) as an int >= `minimum`; else an error naming `field.key`."""
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"'{field}.{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def opt_bool(opts: Mapping[str, Any], key: str, field: str, default: bool = False) -> bool:
    value = opts.get(key, default)
    if not isinstance(value, bool):
        raise ModelConfigError(f"'{field}.{key}' must be true or false, got {value!r}")
    return value


def opt_number(opts: Mapping[str, Any], key: str, field: str, default: float,
               *, positive: bool = False) -> float:
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            positive and value <= 0):
        what = "a positive number" if positive else "a number"
        raise ModelConfigError(f"'{field}.{key}' must be {what}, got {value!r}")
    return float(value)


def reject_enabled(opts: Mapping[str, Any], field: str, what: str,
                   allowed: Mapping[str, tuple[Any, ...]]) -> None:
    """Options stable-audio-tools accepts but we do not implement: allowed only at the values
    that leave them off (`allowed[key]`, e.g. `(False,)`)."""
    for key, values in allowed.items():
        if key in opts and not any(opts[key] is v or (type(opts[key]) is type(v)
                                                     and opts[key] == v) for v in values):
            shown = " or ".join(repr(v) for v in values)
            raise UnsupportedModelError(
                f"'{field}.{key}' = {opts[key]!r} is not supported by wds-encode's {what} "
                f"(only {shown})")


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


@register_bottleneck("l2_norm")
class L2NormBottleneck(Bottleneck):
    """Upstream `L2Bottleneck`: unit L2 norm over channels (`F.normalize(x, dim=1)`) on encode,
    and again on decode. Takes no options (upstream ignores `config`; we reject unknown ones)."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "L2NormBottleneck":
        _no_options(cfg, field)
        return cls()

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        _check_mode(mode)
        return F.normalize(pre, dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.normalize(latents, dim=1)


@register_bottleneck("wasserstein")
class WassersteinBottleneck(Bottleneck):
    """Upstream `WassersteinBottleneck`: the MMD regulariser is training-only, so encode is the
    identity (or `tanh_scale * tanh(x / tanh_scale)` with `use_tanh`); decode appends
    `noise_augment_dim` random channels, which the decoder's `latent_dim` includes."""

    OPTIONS = ("noise_augment_dim", "bypass_mmd", "use_tanh", "tanh_scale")

    def __init__(self, noise_augment_dim: int = 0, use_tanh: bool = False,
                 tanh_scale: float = 5.0):
        super().__init__()
        self.noise_augment_dim = int(noise_augment_dim)
        self.use_tanh = bool(use_tanh)
        self.tanh_scale = float(tanh_scale)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "WassersteinBottleneck":
        opts = _no_options(cfg, field, cls.OPTIONS)
        opt_bool(opts, "bypass_mmd", field)  # training-only; validated, then ignored
        return cls(noise_augment_dim=opt_int(opts, "noise_augment_dim", field, 0, minimum=0),
                   use_tanh=opt_bool(opts, "use_tanh", field),
                   tanh_scale=opt_number(opts, "tanh_scale", field, 5.0, positive=True))

    def decoder_channels(self, latent_dim: int) -> int:
        return latent_dim + self.noise_augment_dim

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        _check_mode(mode)
        if self.use_tanh:
            return torch.tanh(pre / self.tanh_scale) * self.tanh_scale
        return pre

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return append_noise_channels(latents, self.noise_augment_dim)


@register_bottleneck("soft_norm")
class SoftNormBottleneck(Bottleneck):
    """Stable Audio 3's `SoftNormBottleneck` (SAME): x * scaling_factor + bias, divided by the
    `running_std` the training kept (`auto_scale`); decode multiplies it back. Its training loss and
    noise options do nothing to encoding; `noise_regularize` adds SA3's small decode-time noise and
    `noise_augment_dim` appends noise channels for the decoder, as upstream."""

    OPTIONS = ("dim", "noise_augment_dim", "noise_regularize", "auto_scale", "freeze")

    def __init__(self, dim: int = 32, noise_augment_dim: int = 0, noise_regularize: bool = False,
                 auto_scale: bool = False):
        super().__init__()
        self.dim = dim
        self.noise_augment_dim = noise_augment_dim
        self.noise_regularize = noise_regularize
        self.scaling_factor = nn.Parameter(torch.ones(1, dim, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1))
        self.noise_scaling_factor = nn.Parameter(torch.ones(1, noise_augment_dim, 1))
        self.running_std = nn.Parameter(torch.ones(1), requires_grad=False) if auto_scale else None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "SoftNormBottleneck":
        opts = _no_options(cfg, field, cls.OPTIONS)
        opt_bool(opts, "freeze", field)  # training-only
        return cls(dim=opt_int(opts, "dim", field, 32), noise_augment_dim=opt_int(opts, "noise_augment_dim", field, 0,
                                                                               minimum=0),
                   noise_regularize=opt_bool(opts, "noise_regularize", field),
                   auto_scale=opt_bool(opts, "auto_scale", field))

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        if pre_channels != self.dim:
            raise ModelConfigError(f"the soft_norm bottleneck's 'dim' ({self.dim}) differs from the encoder's "
                                   f"'latent_dim' ({pre_channels})")
        return pre_channels

    def decoder_channels(self, latent_dim: int) -> int:
        return latent_dim + self.noise_augment_dim

    def encode(self, pre: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        _check_mode(mode)
        x = pre * self.scaling_factor + self.bias
        return x / self.running_std if self.running_std is not None else x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents * self.running_std if self.running_std is not None else latents
        if self.noise_regularize:
            scale = self.running_std if self.running_std is not None else x.std(dim=-1, keepdim=True)
            x = x + torch.randn_like(x) * scale * 1e-3
        if self.noise_augment_dim:
            noise = torch.randn(x.shape[0], self.noise_augment_dim, x.shape[-1], device=x.device, dtype=x.dtype)
            x = torch.cat([x, self.noise_scaling_factor * noise], dim=1)
        return x


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


# The quantizing bottlenecks (rvq, dac_rvq, fsq, dithered_fsq) register themselves on import;
# imported last because they subclass the classes above.
from . import quantizers as _quantizers  # noqa: E402,F401
