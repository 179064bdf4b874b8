"""Stable Audio 3's SAME autoencoders (SAME-S, SAME-L), re-implemented natively.

A SAME encoder is a transformer, not a convolution stack:
1. the patched pretransform folds every `patch_size` samples of each channel into one token
   ([B, C, N] -> [B, C * patch, N / patch]; 256 samples per patch in SAME-S/L);
2. each `TransformerResamplingBlock` maps the tokens to its width, appends one learned "new token"
   after every `stride` tokens, runs transformer layers over chunks of that sequence (optionally
   shifted by half a chunk for the second half of the layers) or over a sliding window, and keeps
   only the new tokens: one latent frame per `stride` input tokens;
3. a linear projection to `latent_dim`, then the SoftNorm bottleneck (`bottlenecks.py`).
The decoder runs the same blocks the other way (one latent frame + `stride` new tokens each).

Module nesting and parameter names follow SA3's `stable_audio_3/models/autoencoders.py` (commit
636f906) so checkpoints load unchanged (`encoder.layers.0.transformers.3.self_attn.to_qkv.weight`,
`encoder.layers.2.weight` for the projection, ...). The pretransform has no parameters on the encode
side, so the patching lives inside `SAMEEncoder` (and the unpatching inside `SAMEDecoder`): the rest of
wds-encode sees an audio -> latents encoder like any other.

SA3's factory ignores the config's `type` fields; `is_same_autoencoder` recognises a SAME config by
its structure (a patched pretransform and a transformer-depth encoder), as SA3 loads it.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelConfigError, UnsupportedModelError
from .options import check_options
from .transformer import TransformerBlock

# Options SA3's SAMEEncoder / SAMEDecoder / TransformerResamplingBlock take.
_BLOCK_KEYS = {"c_mults", "strides", "transformer_depths", "latent_dim", "channels", "sliding_window",
               "chunk_size", "chunk_midpoint_shift", "dim_heads", "differential", "dyt", "ff_mult",
               "feat_scale", "layer_scale", "variable_stride", "mapping_bias", "conv_mapping",
               "sinusoidal_blocks", "conformer", "cross_attn", "mask_noise", "checkpointing",
               "freeze_backbone", "causal"}
_ENCODER_KEYS = _BLOCK_KEYS | {"in_channels"}
_DECODER_KEYS = _BLOCK_KEYS | {"out_channels"}
# Accepted and without effect at inference: training switches (SA3's `causal` never reaches a layer).
# `mask_noise` adds N(0, mask_noise) to the new tokens on every SA3 forward; a pre-encoder must be
# deterministic, so it is left out here (its training-time augmentation does not belong in stored latents).
_INFERENCE_NEUTRAL = {"checkpointing", "freeze_backbone", "causal", "mask_noise"}
_PATCH_KEYS = {"channels", "patch_size", "oversampling", "postfilter_channels"}


def is_same_autoencoder(ae: Mapping[str, Any]) -> bool:
    """A SAME autoencoder config: a patched pretransform in front of a transformer-depth encoder
    (SA3 builds `PatchedPretransform` + `SAMEEncoder` from exactly these, whatever the `type`s say)."""
    pre = ae.get("pretransform")
    enc = ae.get("encoder")
    if not isinstance(pre, Mapping) or not isinstance(enc, Mapping):
        return False
    pre_cfg, enc_cfg = pre.get("config"), enc.get("config")
    return (isinstance(pre_cfg, Mapping) and "patch_size" in pre_cfg
            and isinstance(enc_cfg, Mapping) and ("transformer_depths" in enc_cfg or enc.get("type") == "same"))


def _zero_pad_to(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    extra = (-x.shape[dim]) % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pad)


class Transpose(nn.Module):
    """Swaps the last two dims (kept as a module so the layer indices match SA3's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2)


class TransformerResamplingBlock(nn.Module):
    """One SAME stage: `stride` tokens -> one new token (encoder), or one -> `stride` (decoder)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, kind: str, depth: int,
                 chunk_size: int, chunk_midpoint_shift: bool, sliding_window: list[int] | None,
                 dim_heads: int, differential: bool, dyt: bool, ff_mult: float, feat_scale: bool,
                 layer_scale: bool, variable_stride: bool, mapping_bias: bool, conv_mapping: bool,
                 sinusoidal_blocks: int):
        super().__init__()
        self.kind = kind
        self.stride = stride
        self.depth = depth
        self.chunk_size = chunk_size
        self.chunk_midpoint_shift = chunk_midpoint_shift
        self.in_channels, self.out_channels = in_channels, out_channels
        dim = out_channels if kind == "encoder" else in_channels
        self.dim = dim
        # tokens in and out per group: the encoder keeps 1 new token per `stride`, the decoder `stride` per 1
        self.input_seg_size = stride if kind == "encoder" else 1
        self.output_seg_size = 1 if kind == "encoder" else stride
        self.sub_chunk_size = stride + 1
        self.window = None if sliding_window is None else tuple(w * (stride + 1) for w in sliding_window)
        self.mapping = (nn.Conv1d(in_channels, out_channels, 3 if conv_mapping else 1, padding="same",
                                  bias=mapping_bias) if in_channels != out_channels else nn.Identity())
        norm = "dyt" if dyt else "rms_norm"
        self.transformers = nn.ModuleList(
            TransformerBlock(dim, dim_heads, norm=norm, qk_norm="dyt" if dyt else "rms",
                             differential=differential, feat_scale=feat_scale, layer_scale=layer_scale,
                             ff_mult=ff_mult, sinusoidal=(depth - i) < sinusoidal_blocks)
            for i in range(depth))
        self.new_tokens = nn.Parameter(torch.zeros(1, 1 if variable_stride else self.output_seg_size, dim))

    # -- lengths ----------------------------------------------------------------------------
    def pad_multiple(self) -> int:
        """Input tokens are zero-padded to a multiple of this (whole chunks, or whole groups)."""
        if self.kind == "encoder":
            return self.chunk_size if self.window is None else self.input_seg_size
        return self.chunk_size // self.stride if self.window is None else 1

    def output_length(self, tokens: int) -> int:
        if self.depth == 0:
            return tokens
        padded = -(-tokens // self.pad_multiple()) * self.pad_multiple()
        return padded // self.input_seg_size * self.output_seg_size

    def sequence_length(self, tokens: int) -> int:
        """Tokens the transformer layers see for `tokens` input tokens (new tokens included)."""
        padded = -(-tokens // self.pad_multiple()) * self.pad_multiple()
        return padded // self.input_seg_size * self.sub_chunk_size

    @property
    def effective_chunk(self) -> int:
        return self.chunk_size + self.chunk_size // self.stride

    # -- forward ----------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, layers, window) -> torch.Tensor:
        for layer in layers:
            x = layer(x, window)
        return x

    def _in_chunks(self, x: torch.Tensor, layers) -> torch.Tensor:
        b, n, d = x.shape
        x = x.reshape(b * (n // self.effective_chunk), self.effective_chunk, d)
        return self._layers(x, layers, None).reshape(b, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder":
            if self.depth > 0:
                x = _zero_pad_to(x, self.pad_multiple(), dim=-1)   # zeros go through the mapping
            x = self.mapping(x)
        if self.depth > 0:
            x = x.transpose(1, 2)                                  # [B, tokens, D]
            if self.kind == "decoder":
                x = _zero_pad_to(x, self.pad_multiple(), dim=1)
            b, n, d = x.shape
            groups = x.reshape(b * (n // self.input_seg_size), self.input_seg_size, d)
            new = self.new_tokens.expand(groups.shape[0], self.output_seg_size, d)
            x = torch.cat([groups, new], dim=1).reshape(b, -1, d)
            if self.window is not None:
                x = self._layers(x, self.transformers, self.window)
            elif self.chunk_midpoint_shift:
                split, shift = self.depth // 2, self.effective_chunk // 2
                x = self._in_chunks(x, self.transformers[:split])
                # the second half sees chunks shifted by half a chunk, the ends repeated to fill them
                x = torch.cat([x[:, :shift], x, x[:, -shift:]], dim=1)
                x = self._in_chunks(x, self.transformers[split:])[:, shift:-shift]
            else:
                x = self._in_chunks(x, self.transformers)
            x = x.reshape(-1, self.sub_chunk_size, d)[:, -self.output_seg_size:]
            x = x.reshape(b, -1, d).transpose(1, 2)                # [B, D, tokens out]
        if self.kind == "decoder":
            x = self.mapping(x)
        return x


def _block_options(opts: Mapping[str, Any], field: str, stages: int) -> dict[str, Any]:
    """The per-block options shared by encoder and decoder, SA3's defaults filled in and checked."""
    depths = opts.get("transformer_depths", [3] * stages)
    if (not isinstance(depths, list) or len(depths) != stages
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in depths)):
        raise ModelConfigError(f"'{field}.transformer_depths' must be a list of {stages} non-negative "
                               f"ints (one per entry of 'c_mults'), got {depths!r}")
    window = opts.get("sliding_window")
    if window is not None and (not isinstance(window, list) or len(window) != 2
                               or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                          for v in window)):
        raise ModelConfigError(f"'{field}.sliding_window' must be [left, right] latent frames "
                               f"(non-negative ints), got {window!r}")
    for key in ("conformer", "cross_attn"):
        if opts.get(key):
            raise UnsupportedModelError(f"'{field}.{key}' = true is not supported by wds-encode's SAME "
                                        "model (no released SAME model uses it)")
    ignored = sorted(k for k in _INFERENCE_NEUTRAL if opts.get(k))
    if "mask_noise" in ignored:
        warnings.warn(f"'{field}.mask_noise' is ignored: SA3 adds that noise to its new tokens on every "
                      "forward; wds-encode encodes deterministically", stacklevel=3)
    chunk_size = opts.get("chunk_size", 128)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ModelConfigError(f"'{field}.chunk_size' must be a positive int, got {chunk_size!r}")
    ff_mult = opts.get("ff_mult", 3)
    # an encoder's one count for every stage (SA3 passes it on through **kwargs); a decoder's per-stage
    # list is read by `build_same_decoder`
    sinusoidal = opts.get("sinusoidal_blocks", 0)
    if isinstance(ff_mult, bool) or not isinstance(ff_mult, (int, float)) or ff_mult <= 0:
        raise ModelConfigError(f"'{field}.ff_mult' must be a positive number, got {ff_mult!r}")
    return dict(depths=depths, chunk_size=chunk_size, chunk_midpoint_shift=bool(opts.get("chunk_midpoint_shift", False)),
                sliding_window=window, dim_heads=opts.get("dim_heads", 128),
                differential=bool(opts.get("differential", True)), dyt=bool(opts.get("dyt", True)),
                ff_mult=ff_mult, feat_scale=bool(opts.get("feat_scale", False)),
                layer_scale=bool(opts.get("layer_scale", False)),
                variable_stride=bool(opts.get("variable_stride", False)),
                mapping_bias=bool(opts.get("mapping_bias", True)), conv_mapping=bool(opts.get("conv_mapping", False)),
                sinusoidal_blocks=sinusoidal if isinstance(sinusoidal, int) else 0)


def _check_stage(field: str, dim: int, stride: int, shared: Mapping[str, Any]) -> None:
    heads = min(shared["dim_heads"], dim)
    if dim % heads:
        raise ModelConfigError(f"'{field}': a stage of width {dim} does not split into heads of "
                               f"'dim_heads' = {shared['dim_heads']}")
    if shared["sliding_window"] is None and shared["chunk_size"] % stride:
        raise ModelConfigError(f"'{field}.chunk_size' = {shared['chunk_size']} must be a multiple of every "
                               f"stride (got stride {stride}) when there is no 'sliding_window'")


def _block(in_ch: int, out_ch: int, stride: int, depth: int, kind: str, shared: Mapping[str, Any],
           sinusoidal_blocks: int) -> TransformerResamplingBlock:
    keys = ("chunk_size", "chunk_midpoint_shift", "sliding_window", "dim_heads", "differential", "dyt",
            "ff_mult", "feat_scale", "layer_scale", "variable_stride", "mapping_bias", "conv_mapping")
    return TransformerResamplingBlock(in_ch, out_ch, stride, kind=kind, depth=depth,
                                      sinusoidal_blocks=sinusoidal_blocks, **{k: shared[k] for k in keys})


class SAMEEncoder(nn.Module):
    """audio [B, channels, N] -> pre-bottleneck latents [B, latent_dim, T].

    T = `output_length(N)`: N is patched (zero-padded to whole patches), then every stage pads its
    tokens to whole chunks, so T can exceed ceil(N / downsampling_ratio) (SA3 does the same)."""

    def __init__(self, audio_channels: int, patch_size: int, in_channels: int, channels: int, latent_dim: int,
                 c_mults: list[int], strides: list[int], shared: Mapping[str, Any], field: str):
        super().__init__()
        self.in_channels = audio_channels       # what the model takes: audio channels, before patching
        self.patch_size = patch_size
        self.latent_dim = latent_dim
        dims = [in_channels] + [m * channels for m in c_mults]
        depths = shared["depths"]
        layers: list[nn.Module] = []
        for i, stride in enumerate(strides):
            _check_stage(field, dims[i + 1], stride, shared)
            layers.append(_block(dims[i], dims[i + 1], stride, depths[i], "encoder", shared,
                                 shared["sinusoidal_blocks"]))
        layers += [Transpose(), nn.Linear(dims[-1], latent_dim), Transpose()]
        self.layers = nn.ModuleList(layers)
        # the downsampling chain: patching, then every stage that has transformer layers
        self.strides = [patch_size] + [s for s, d in zip(strides, depths) if d > 0]

    def blocks(self) -> list[TransformerResamplingBlock]:
        return [m for m in self.layers if isinstance(m, TransformerResamplingBlock)]

    def patch(self, audio: torch.Tensor) -> torch.Tensor:
        """SA3's `PatchedPretransform.encode`: 'b c (l h) -> b (c h) l', zero-padded to whole patches."""
        x = _zero_pad_to(audio, self.patch_size, dim=-1)
        b, c, n = x.shape
        return x.reshape(b, c, n // self.patch_size, self.patch_size).transpose(2, 3).reshape(b, c * self.patch_size, -1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.patch(audio)
        for layer in self.layers:
            x = layer(x)
        return x

    def output_length(self, num_samples: int) -> int:
        tokens = -(-num_samples // self.patch_size)
        for block in self.blocks():
            tokens = block.output_length(tokens)
        return tokens

    def flops(self, num_samples: int) -> float:
        """Forward FLOPs (2 x multiply-adds) of one window of `num_samples`: every linear layer and the
        attention over the keys each query sees, for the model FLOPs utilisation figure."""
        tokens = -(-num_samples // self.patch_size)
        total = 0.0
        for block in self.blocks():
            if isinstance(block.mapping, nn.Conv1d):
                padded = -(-tokens // block.pad_multiple()) * block.pad_multiple() if block.depth else tokens
                total += 2.0 * padded * block.in_channels * block.out_channels * block.mapping.kernel_size[0]
            if block.depth:
                seq = block.sequence_length(tokens)
                keys = min(seq, sum(block.window) + 1) if block.window is not None else block.effective_chunk
                total += sum(layer_flops(layer, seq, keys) for layer in block.transformers)
            tokens = block.output_length(tokens)
        total += 2.0 * tokens * self.layers[-2].in_features * self.latent_dim
        return total


def layer_flops(layer: TransformerBlock, tokens: int, keys_per_query: int) -> float:
    attn = layer.self_attn
    dim = layer.dim
    inner = layer.ff.ff[2].in_features
    qkv = attn.to_qkv.out_features
    linear = 2.0 * tokens * (dim * qkv + dim * dim + dim * inner * 2 + inner * dim)
    branches = 2 if attn.differential else 1
    scores = 2.0 * 2 * tokens * keys_per_query * attn.num_heads * attn.dim_heads * branches
    return linear + scores


class SAMEDecoder(nn.Module):
    """latents [B, latent_dim, T] -> audio [B, channels, T * downsampling_ratio]."""

    def __init__(self, audio_channels: int, patch_size: int, out_channels: int, channels: int, latent_dim: int,
                 c_mults: list[int], strides: list[int], shared: Mapping[str, Any], sinusoidal_blocks: list[int],
                 field: str):
        super().__init__()
        self.out_channels = audio_channels
        self.patch_size = patch_size
        self.latent_dim = latent_dim
        dims = [out_channels] + [m * channels for m in c_mults]
        depths = shared["depths"]
        layers: list[nn.Module] = [Transpose(), nn.Linear(latent_dim, dims[-1]), Transpose()]
        for i in range(len(c_mults), 0, -1):
            _check_stage(field, dims[i], strides[i - 1], shared)
            layers.append(_block(dims[i], dims[i - 1], strides[i - 1], depths[i - 1], "decoder", shared,
                                 sinusoidal_blocks[i - 1]))
        self.layers = nn.ModuleList(layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents
        for layer in self.layers:
            x = layer(x)
        b, ch, n = x.shape          # SA3's `PatchedPretransform.decode`: 'b (c h) l -> b c (l h)'
        c = ch // self.patch_size
        return x.reshape(b, c, self.patch_size, n).transpose(2, 3).reshape(b, c, n * self.patch_size)


def _patching(ae: Mapping[str, Any], field: str) -> tuple[int, int]:
    cfg = check_options(ae["pretransform"].get("config", {}), f"{field}.pretransform.config", "patched pretransform",
                        allowed=_PATCH_KEYS, required={"channels", "patch_size"},
                        positive_ints={"channels", "patch_size", "oversampling"})
    if cfg.get("oversampling", 1) != 1 or cfg.get("postfilter_channels", 0):
        raise UnsupportedModelError(f"'{field}.pretransform.config': 'oversampling' > 1 and "
                                    "'postfilter_channels' are not supported by wds-encode (SAME-S and "
                                    "SAME-L use neither)")
    return cfg["channels"], cfg["patch_size"]


def _codec_options(section: Any, field: str, allowed: set[str], channels_key: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise ModelConfigError(f"'{field}' must be an object, got {type(section).__name__}")
    cfg = section.get("config", {})
    unknown = sorted(set(cfg) - allowed) if isinstance(cfg, Mapping) else []
    if unknown:
        # SA3 passes its config on as **kwargs and ignores what it does not know; so do we, but say so
        warnings.warn(f"'{field}.config' options {unknown} are not SAME options; SA3 ignores them and "
                      "so does wds-encode", stacklevel=3)
        cfg = {k: v for k, v in cfg.items() if k not in unknown}
    return check_options(cfg, f"{field}.config", "SAME", allowed=allowed,
                         positive_ints={"channels", "latent_dim", channels_key, "dim_heads"},
                         int_lists={"c_mults", "strides"})


def _layout(opts: Mapping[str, Any], field: str) -> tuple[list[int], list[int]]:
    c_mults = opts.get("c_mults", [1, 2, 4, 8])
    strides = opts.get("strides", [2, 4, 8, 8])
    if len(c_mults) != len(strides):
        raise ModelConfigError(f"'{field}.config': 'strides' ({len(strides)} entries) and 'c_mults' "
                               f"({len(c_mults)} entries) must have the same length")
    return c_mults, strides


def _side(ae: Mapping[str, Any], field: str, side: str) -> tuple[int, int, dict[str, Any], list[int], list[int], int]:
    """What the encoder (or decoder) of a SAME config is built from, checked against the patching:
    (audio channels, patch size, options, c_mults, strides, patched channels)."""
    audio_channels, patch = _patching(ae, field)
    key = "in_channels" if side == "encoder" else "out_channels"
    opts = _codec_options(ae[side], f"{field}.{side}", _ENCODER_KEYS if side == "encoder" else _DECODER_KEYS, key)
    c_mults, strides = _layout(opts, f"{field}.{side}")
    patched = opts.get(key, 2)
    if patched != audio_channels * patch:
        raise ModelConfigError(f"'{field}.{side}.config.{key}' = {patched} but the patched pretransform "
                               f"{'gives' if side == 'encoder' else 'takes'} {audio_channels} x {patch} = "
                               f"{audio_channels * patch} channels")
    return audio_channels, patch, opts, c_mults, strides, patched


def build_same_encoder(ae: Mapping[str, Any], field: str) -> SAMEEncoder:
    """The encoder of a SAME autoencoder config (`ae` = the autoencoder's `model` object)."""
    audio_channels, patch, opts, c_mults, strides, in_channels = _side(ae, field, "encoder")
    shared = _block_options(opts, f"{field}.encoder.config", len(c_mults))
    return SAMEEncoder(audio_channels, patch, in_channels, opts.get("channels", 128), opts.get("latent_dim", 32),
                       c_mults, strides, shared, f"{field}.encoder.config")


def build_same_decoder(ae: Mapping[str, Any], field: str) -> SAMEDecoder:
    audio_channels, patch, opts, c_mults, strides, out_channels = _side(ae, field, "decoder")
    sinusoidal = opts.get("sinusoidal_blocks", [0] * len(c_mults))
    if (not isinstance(sinusoidal, list) or len(sinusoidal) != len(c_mults)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sinusoidal)):
        raise ModelConfigError(f"'{field}.decoder.config.sinusoidal_blocks' must be a list of {len(c_mults)} "
                               f"non-negative ints, got {sinusoidal!r}")
    shared = _block_options(opts, f"{field}.decoder.config", len(c_mults))
    return SAMEDecoder(audio_channels, patch, out_channels, opts.get("channels", 128), opts.get("latent_dim", 32),
                       c_mults, strides, shared, sinusoidal, f"{field}.decoder.config")


def check_loaded(model: nn.Module) -> None:
    """After loading: every rotary buffer holds the frequencies the layers compute with."""
    for name, module in model.named_modules():
        check = getattr(module, "check_loaded", None)
        if check is not None and name.endswith(".rope"):
            check(name)


__all__ = ["SAMEDecoder", "SAMEEncoder", "TransformerResamplingBlock", "build_same_decoder",
           "build_same_encoder", "check_loaded", "is_same_autoencoder"]
