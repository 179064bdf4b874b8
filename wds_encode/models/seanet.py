"""Native re-implementation of EnCodec's SEANet encoder and decoder (`encodec.modules`), as
stable-audio-tools builds them for config `type: "seanet"`.

Module nesting mirrors EnCodec so checkpoint keys map 1:1:
- `model.{i}` is one `nn.Sequential` of layers;
- a convolution is `SConv1d.conv` (NormConv1d) `.conv` (nn.Conv1d) -> `model.0.conv.conv.weight`,
  its normalisation `model.0.conv.norm` (parameter-free Identity unless `time_group_norm`);
- a transposed convolution is `SConvTranspose1d.convtr.convtr` -> `model.4.convtr.convtr.weight`;
- a residual block has `block.{1,3}` convs (activations at 0, 2) and `shortcut` (a 1x1 conv,
  EnCodec's default `true_skip=False`, or Identity);
- the LSTM is `SLSTM.lstm` (nn.LSTM) -> `model.7.lstm.weight_ih_l0`, ...
With `norm: "weight_norm"` upstream stores `...conv.conv.weight_g` / `weight_v`; as in
`oobleck.py`, our convolutions hold one plain `weight` and the checkpoint loader folds the pair.

stable-audio-tools contract: the encoder gets `ratios = reversed(config.ratios or [2,2,2,2,2])`
and SEANetEncoder reverses its `ratios` again, so the encoder downsamples in the order the config
lists them; the decoder gets the config unchanged (default [8, 5, 4, 2]) and upsamples in that
same order (so with SAT the decoder is *not* the mirror image of the encoder unless the
ratios are a palindrome).

Padding (EnCodec's SConv1d): non-causal convs pad (k-1)*d - (s-1) split left-heavy, plus extra
right padding so the last window is full, so a stride-s conv gives ceil(L / s) frames; the
transposed convs trim k - s samples, so the decoder gives exactly T * prod(ratios).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .options import check_options
from .errors import ModelConfigError, UnsupportedModelError

SUPPORTED_NORMS = ("none", "weight_norm", "time_group_norm")
UNSUPPORTED_NORMS = ("spectral_norm", "layer_norm")  # EnCodec has them; not implemented here
PAD_MODES = ("reflect", "constant", "replicate", "circular")


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad, except that reflect padding of an input shorter than the padding first appends
    zeros (and drops them again afterwards), as EnCodec's `pad1d` does."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    extra = max(left, right) - x.shape[-1] + 1
    if extra > 0:
        x = F.pad(x, (0, extra))
    y = F.pad(x, (left, right), mode="reflect")
    return y[..., : y.shape[-1] - extra] if extra > 0 else y


def _norm_module(norm: str, channels: int, norm_params: Mapping[str, Any]) -> nn.Module:
    if norm == "time_group_norm":
        return nn.GroupNorm(1, channels, **norm_params)
    return nn.Identity()


class NormConv1d(nn.Module):
    """Keys `conv.*` (+ `norm.*` for time_group_norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, norm: str = "none",
                 norm_params: Mapping[str, Any] | None = None):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        self.norm = _norm_module(norm, out_channels, norm_params or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """Keys `convtr.*` (+ `norm.*` for time_group_norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: str = "none", norm_params: Mapping[str, Any] | None = None):
        super().__init__()
        self.convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.norm = _norm_module(norm, out_channels, norm_params or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convtr(x))


class SConv1d(nn.Module):
    """Conv1d with "same"-style padding (causal: all on the left) plus the extra right padding
    that makes the last window full: L samples -> ceil(L / stride) frames."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, causal: bool = False, norm: str = "none",
                 norm_params: Mapping[str, Any] | None = None, pad_mode: str = "reflect"):
        super().__init__()
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation, norm,
                               norm_params)
        self.causal = causal
        self.pad_mode = pad_mode
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, d = self.kernel_size, self.stride, self.dilation
        padding_total = (k - 1) * d - (s - 1)
        length = x.shape[-1]
        # EnCodec's get_extra_padding_for_conv1d, in exact integer arithmetic
        n_frames = -(-(length - k + padding_total) // s) + 1
        extra = (n_frames - 1) * s + (k - padding_total) - length
        if self.causal:
            left, right = padding_total, extra
        else:
            right = padding_total // 2
            left, right = padding_total - right, right + extra
        return self.conv(_pad1d(x, left, right, self.pad_mode))


class SConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed by kernel - stride samples: T frames -> T * stride samples."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none", trim_right_ratio: float = 1.0,
                 norm_params: Mapping[str, Any] | None = None):
        super().__init__()
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride, norm,
                                          norm_params)
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convtr(x)
        padding_total = self.kernel_size - self.stride
        if self.causal:
            right = math.ceil(padding_total * self.trim_right_ratio)
        else:
            right = padding_total // 2
        left = padding_total - right
        return y[..., left: y.shape[-1] - right]


class SLSTM(nn.Module):
    """Multi-layer LSTM over time on [B, C, T], with the input added back (skip)."""

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # [T, B, C]
        y, _ = self.lstm(x)
        if self.skip:
            y = y + x
        return y.permute(1, 2, 0)


def _activation(name: str, params: Mapping[str, Any]) -> nn.Module:
    return getattr(nn, name)(**params)


class SEANetResnetBlock(nn.Module):
    """act -> conv (k=residual_kernel_size, dilated, dim -> dim // compress) -> act ->
    conv (k=1, back to dim), plus the shortcut (1x1 conv, or identity with true_skip)."""

    def __init__(self, dim: int, kernel_sizes: list[int], dilations: list[int],
                 activation: str, activation_params: Mapping[str, Any], norm: str,
                 norm_params: Mapping[str, Any], causal: bool, pad_mode: str, compress: int,
                 true_skip: bool):
        super().__init__()
        hidden = dim // compress
        layers: list[nn.Module] = []
        last = len(kernel_sizes) - 1
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations)):
            layers += [
                _activation(activation, activation_params),
                SConv1d(dim if i == 0 else hidden, dim if i == last else hidden, kernel_size,
                        dilation=dilation, norm=norm, norm_params=norm_params, causal=causal,
                        pad_mode=pad_mode),
            ]
        self.block = nn.Sequential(*layers)
        self.shortcut: nn.Module = (
            nn.Identity() if true_skip else
            SConv1d(dim, dim, 1, norm=norm, norm_params=norm_params, causal=causal,
                    pad_mode=pad_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SEANetEncoder(nn.Module):
    """audio [B, channels, N] -> [B, dimension, ceil(N / prod(ratios))].

    `ratios` follows EnCodec's convention (the *decoder's* order; the encoder applies them
    reversed). `strides` is the order actually applied; `latent_dim` = `dimension`."""

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: list[int] | None = None,
                 activation: str = "ELU", activation_params: Mapping[str, Any] | None = None,
                 norm: str = "weight_norm", norm_params: Mapping[str, Any] | None = None,
                 kernel_size: int = 7, last_kernel_size: int = 7, residual_kernel_size: int = 3,
                 dilation_base: int = 2, causal: bool = False, pad_mode: str = "reflect",
                 true_skip: bool = False, compress: int = 2, lstm: int = 2):
        super().__init__()
        ratios = [8, 5, 4, 2] if ratios is None else list(ratios)
        act_params = {"alpha": 1.0} if activation_params is None else dict(activation_params)
        norm_params = dict(norm_params or {})
        self.in_channels = channels
        self.latent_dim = dimension
        self.strides = list(reversed(ratios))
        conv = dict(norm=norm, norm_params=norm_params, causal=causal, pad_mode=pad_mode)

        mult = 1
        layers: list[nn.Module] = [SConv1d(channels, n_filters, kernel_size, **conv)]
        for ratio in self.strides:
            width = mult * n_filters
            for j in range(n_residual_layers):
                layers.append(SEANetResnetBlock(
                    width, [residual_kernel_size, 1], [dilation_base ** j, 1], activation,
                    act_params, norm, norm_params, causal, pad_mode, compress, true_skip))
            layers += [_activation(activation, act_params),
                       SConv1d(width, 2 * width, 2 * ratio, stride=ratio, **conv)]
            mult *= 2
        if lstm:
            layers.append(SLSTM(mult * n_filters, num_layers=lstm))
        layers += [_activation(activation, act_params),
                   SConv1d(mult * n_filters, dimension, last_kernel_size, **conv)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def output_length(self, num_samples: int) -> int:
        """Exact number of latent frames for `num_samples` input samples."""
        n = num_samples
        for s in self.strides:
            n = -(-n // s)
        return n


class SEANetDecoder(nn.Module):
    """latents [B, dimension, T] -> audio [B, channels, T * prod(ratios)], upsampling in the
    order of `ratios`."""

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 n_residual_layers: int = 1, ratios: list[int] | None = None,
                 activation: str = "ELU", activation_params: Mapping[str, Any] | None = None,
                 final_activation: str | None = None,
                 final_activation_params: Mapping[str, Any] | None = None,
                 norm: str = "weight_norm", norm_params: Mapping[str, Any] | None = None,
                 kernel_size: int = 7, last_kernel_size: int = 7, residual_kernel_size: int = 3,
                 dilation_base: int = 2, causal: bool = False, pad_mode: str = "reflect",
                 true_skip: bool = False, compress: int = 2, lstm: int = 2,
                 trim_right_ratio: float = 1.0):
        super().__init__()
        ratios = [8, 5, 4, 2] if ratios is None else list(ratios)
        act_params = {"alpha": 1.0} if activation_params is None else dict(activation_params)
        norm_params = dict(norm_params or {})
        self.out_channels = channels
        self.latent_dim = dimension
        self.strides = ratios
        conv = dict(norm=norm, norm_params=norm_params, causal=causal, pad_mode=pad_mode)

        mult = 2 ** len(ratios)
        layers: list[nn.Module] = [SConv1d(dimension, mult * n_filters, kernel_size, **conv)]
        if lstm:
            layers.append(SLSTM(mult * n_filters, num_layers=lstm))
        for ratio in ratios:
            width = mult * n_filters
            layers += [_activation(activation, act_params),
                       SConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio,
                                        causal=causal, norm=norm, norm_params=norm_params,
                                        trim_right_ratio=trim_right_ratio)]
            for j in range(n_residual_layers):
                layers.append(SEANetResnetBlock(
                    width // 2, [residual_kernel_size, 1], [dilation_base ** j, 1], activation,
                    act_params, norm, norm_params, causal, pad_mode, compress, true_skip))
            mult //= 2
        layers += [_activation(activation, act_params),
                   SConv1d(n_filters, channels, last_kernel_size, **conv)]
        if final_activation is not None:
            layers.append(_activation(final_activation, final_activation_params or {}))
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


# ----------------------------------------------------------------------------- config checks
_COMMON_KEYS = {"channels", "dimension", "n_filters", "n_residual_layers", "ratios",
                "activation", "activation_params", "norm", "norm_params", "kernel_size",
                "last_kernel_size", "residual_kernel_size", "dilation_base", "causal",
                "pad_mode", "true_skip", "compress", "lstm"}
_ENCODER_KEYS = _COMMON_KEYS
_DECODER_KEYS = _COMMON_KEYS | {"final_activation", "final_activation_params",
                                "trim_right_ratio"}
_POSITIVE = {"channels", "dimension", "n_filters", "kernel_size", "last_kernel_size",
             "residual_kernel_size", "dilation_base", "compress"}


def _check_activation(opts: dict[str, Any], name_key: str, params_key: str, field: str,
                      default: str | None) -> None:
    name = opts.get(name_key, default)
    if name is None:
        return
    cls = getattr(nn, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)
            and cls.__module__ == "torch.nn.modules.activation"):
        raise ModelConfigError(f"'{field}.{name_key}' = {name!r} is not a torch.nn activation "
                               "(e.g. 'ELU', 'ReLU', 'LeakyReLU', 'Tanh')")
    params = opts.get(params_key) or {}
    if not isinstance(params, Mapping):
        raise ModelConfigError(f"'{field}.{params_key}' must be an object, "
                               f"got {type(params).__name__}")
    try:
        cls(**params)
    except TypeError as exc:
        raise ModelConfigError(f"'{field}.{params_key}' = {dict(params)!r} does not fit "
                               f"nn.{name}: {exc}") from exc


def _check_seanet(cfg: Mapping[str, Any], field: str, kind: str, allowed: set[str]
                  ) -> dict[str, Any]:
    opts = check_options(cfg, field, kind, allowed=allowed, positive_ints=_POSITIVE,
                         int_lists={"ratios"})
    for key in ("n_residual_layers", "lstm"):
        if key in opts:
            value = opts[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelConfigError(f"'{field}.{key}' must be an int >= 0, got {value!r}")
    for key in ("causal", "true_skip"):
        if key in opts and not isinstance(opts[key], bool):
            raise ModelConfigError(f"'{field}.{key}' must be true or false, got {opts[key]!r}")
    norm = opts.get("norm", "weight_norm")
    if norm in UNSUPPORTED_NORMS:
        raise UnsupportedModelError(f"'{field}.norm' = {norm!r} is not supported yet; "
                                    f"supported: {list(SUPPORTED_NORMS)}")
    if norm not in SUPPORTED_NORMS:
        raise ModelConfigError(f"'{field}.norm' = {norm!r} is unknown; supported: "
                               f"{list(SUPPORTED_NORMS)}")
    if norm == "time_group_norm" and opts.get("causal", False):
        raise ModelConfigError(f"'{field}.norm' = 'time_group_norm' cannot be causal "
                               "(EnCodec refuses it too)")
    if not isinstance(opts.get("norm_params", {}), Mapping):
        raise ModelConfigError(f"'{field}.norm_params' must be an object")
    if opts.get("pad_mode", "reflect") not in PAD_MODES:
        raise ModelConfigError(f"'{field}.pad_mode' = {opts['pad_mode']!r}; expected one of "
                               f"{list(PAD_MODES)}")
    _check_activation(opts, "activation", "activation_params", field, "ELU")
    _check_activation(opts, "final_activation", "final_activation_params", field, None)
    if "trim_right_ratio" in opts:
        ratio = opts["trim_right_ratio"]
        if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                or not 0.0 <= ratio <= 1.0):
            raise ModelConfigError(f"'{field}.trim_right_ratio' must be in [0, 1], "
                                   f"got {ratio!r}")
        if ratio != 1.0 and not opts.get("causal", False):
            raise ModelConfigError(f"'{field}.trim_right_ratio' != 1 only makes sense with "
                                   "'causal': true (EnCodec asserts this)")
    return opts


def build_seanet_encoder(cfg: Mapping[str, Any], field: str) -> SEANetEncoder:
    """Build from an `encoder.config` dict (`type: "seanet"`) exactly as stable-audio-tools
    does: the config's `ratios` (default [2, 2, 2, 2, 2]) are reversed before SEANetEncoder
    reverses them back, so the encoder downsamples in the listed order."""
    opts = _check_seanet(cfg, field, "seanet encoder", _ENCODER_KEYS)
    opts["ratios"] = list(reversed(opts.get("ratios", [2, 2, 2, 2, 2])))
    return SEANetEncoder(**opts)


def build_seanet_decoder(cfg: Mapping[str, Any], field: str) -> SEANetDecoder:
    """Build from a `decoder.config` dict (`type: "seanet"`); stable-audio-tools passes it to
    SEANetDecoder unchanged (default ratios [8, 5, 4, 2])."""
    return SEANetDecoder(**_check_seanet(cfg, field, "seanet decoder", _DECODER_KEYS))
