"""Quantizing (discrete) bottlenecks, compatible with stable-audio-tools checkpoints.

Registered types (the `bottleneck.type` of a stable-audio-tools config):
- `rvq`: `RVQBottleneck`, a vector-quantize-pytorch `ResidualVQ` (Euclidean or cosine codebooks
  with EMA buffers). Keys `bottleneck.quantizer.layers.N._codebook.{embed, embed_avg,
  cluster_size, initted}` (+ `bottleneck.quantizer.project_{in,out}.*` when `codebook_dim` !=
  `dim`, the layout of vector-quantize-pytorch >= 1.22, which stable-audio-tools requires).
- `dac_rvq`: `DACRVQBottleneck`, descript-audio-codec's `ResidualVectorQuantize` (factorized,
  l2-normalized code lookup). Keys `bottleneck.quantizer.quantizers.N.{in_proj, out_proj}.*`
  (weight-normed upstream: folded to `weight` by the checkpoint reader) and `.codebook.weight`.
- `fsq`: `FSQBottleneck`, vector-quantize-pytorch's `FSQ` (finite scalar quantization; only
  `bottleneck.quantizer.project_{in,out}.*` when `dim` != len(levels) * num_codebooks).
- `dithered_fsq`: `DitheredFSQBottleneck`, stable-audio-tools' own `fsq.py` (no tensors).

Only inference is implemented: training-only options (EMA decay, dead-code expiry, k-means
init, quantizer dropout, noise dropout, commitment weights, ...) are accepted and ignored,
because upstream ignores them in eval mode too. Options that would change inference results
and are not implemented raise `UnsupportedModelError`; unknown options raise
`ModelConfigError`; both name the field.

Every bottleneck here computes in float32 (upstream's codebooks force float32 as well) and
returns latents in the input's dtype; tokens are int64 `[B, Q, T]` (see `DiscreteBottleneck`).
The EMA statistics vector-quantize-pytorch saves (`embed_avg`, `cluster_size`) are registered
as buffers under the same names so that checkpoints load strictly; they are not used.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bottlenecks import (
    DiscreteBottleneck,
    _no_options,
    append_noise_channels,
    opt_bool,
    opt_int,
    opt_number,
    register_bottleneck,
    reject_enabled,
)
from .errors import CheckpointError, ModelConfigError


def _linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`layer(x)` computed in float32 (Identity passes through)."""
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, layer.weight.float(), bias)
    return x


def _conv1x1(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv1d(x, conv.weight.float(), bias)


def _check_width(pre_channels: int, expected: int, field: str, key: str, what: str) -> None:
    if pre_channels != expected:
        raise ModelConfigError(
            f"'{field}.{key}' = {expected}, but the encoder outputs {pre_channels} channels "
            f"(encoder.config.latent_dim): the {what} bottleneck's input width must match")


def _levels(value: Any, field: str) -> list[int]:
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in value)):
        raise ModelConfigError(f"'{field}.levels' must be a non-empty list of integers >= 2, "
                               f"got {value!r}")
    return [int(v) for v in value]


def _basis(levels: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for level in levels:
        out.append(acc)
        acc *= level
    return out


# ============================================================================ rvq
class _Codebook(nn.Module):
    """vector-quantize-pytorch's EuclideanCodebook / CosineSimCodebook buffers (one head)."""

    def __init__(self, codebook_size: int, dim: int, cosine: bool):
        super().__init__()
        embed = torch.randn(1, codebook_size, dim)
        embed = F.normalize(embed, dim=-1) if cosine else embed / math.sqrt(dim)
        # initted is 1 here so an un-loaded model (tests, dry runs) works; a checkpoint's 0 is
        # caught by RVQBottleneck.check_loaded
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)


class _VQLayer(nn.Module):
    def __init__(self, codebook: _Codebook):
        super().__init__()
        self._codebook = codebook


class _ResidualVQ(nn.Module):
    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, codebook_dim: int,
                 cosine: bool, shared_codebook: bool):
        super().__init__()
        has_proj = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if has_proj else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if has_proj else nn.Identity()
        first = _Codebook(codebook_size, codebook_dim, cosine)
        self.layers = nn.ModuleList(
            _VQLayer(first if (i == 0 or shared_codebook)
                     else _Codebook(codebook_size, codebook_dim, cosine))
            for i in range(num_quantizers))


def _neg_euclidean_distance(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """-cdist as vector-quantize-pytorch computes it: sqrt(clamp(|x|^2 + |e|^2 - 2 x.e, 1e-8))."""
    x2 = (x ** 2).sum(-1, keepdim=True)
    e2 = (embed ** 2).sum(-1)
    return -(x2 + e2 + (x @ embed.t()) * -2).clamp(min=1e-8).sqrt()


@register_bottleneck("rvq")
class RVQBottleneck(DiscreteBottleneck):
    """stable-audio-tools `RVQBottleneck`: `ResidualVQ(**config)` over [B, T, C] frames."""

    # stable-audio-tools' create_bottleneck_from_config merges the config over these
    DEFAULTS = {"dim": 128, "codebook_size": 1024, "num_quantizers": 8, "decay": 0.99,
                "kmeans_init": True, "kmeans_iters": 50, "threshold_ema_dead_code": 2}
    USED = ("dim", "num_quantizers", "codebook_size", "codebook_dim", "use_cosine_sim",
            "shared_codebook")
    # ResidualVQ / VectorQuantize options that only act while training (or that are neutral
    # with heads = 1 and no projection inside the layers): accepted, ignored
    TRAINING_ONLY = (
        "decay", "eps", "kmeans_init", "kmeans_iters", "sync_kmeans", "threshold_ema_dead_code",
        "commitment_weight", "commitment_use_cross_entropy_loss", "orthogonal_reg_weight",
        "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes",
        "stochastic_sample_codes", "sample_codebook_temp", "straight_through", "reinmax",
        "sync_codebook", "ema_update", "learnable_codebook", "freeze_codebook",
        "quantize_dropout", "quantize_dropout_cutoff_index", "quantize_dropout_multiple_of",
        "distributed_replace_codes", "rotation_trick", "quant_grad_frac", "sync_update_v",
        "layernorm_after_project_in", "separate_codebook_per_head", "manual_ema_update",
        "manual_in_place_optimizer_update", "affine_param_batch_decay",
        "affine_param_codebook_decay", "mlp_kwargs", "beam_score_quantizer_weights")
    # accepted only at the value that leaves them off
    UNSUPPORTED = {"heads": (1,), "affine_param": (False,), "sync_affine_param": (False,),
                   "implicit_neural_codebook": (False,), "beam_size": (None, 1),
                   "eval_beam_size": (None, 1), "accept_image_fmap": (False,),
                   "channel_last": (True,)}

    accepts_fewer_quantizers = True

    def __init__(self, dim: int, num_quantizers: int, codebook_size: int,
                 codebook_dim: int | None = None, use_cosine_sim: bool = False,
                 shared_codebook: bool = False, field: str = "bottleneck.config"):
        super().__init__()
        self.dim = int(dim)
        self.num_quantizers = int(num_quantizers)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim if codebook_dim is not None else dim)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.field = field
        self.quantizer = _ResidualVQ(self.dim, self.num_quantizers, self.codebook_size,
                                     self.codebook_dim, self.use_cosine_sim,
                                     bool(shared_codebook))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "RVQBottleneck":
        opts = _no_options(cfg, field, cls.USED + cls.TRAINING_ONLY + tuple(cls.UNSUPPORTED))
        reject_enabled(opts, field, "rvq bottleneck", cls.UNSUPPORTED)
        opts = {**cls.DEFAULTS, **opts}
        if isinstance(opts["codebook_size"], (list, tuple)):
            raise ModelConfigError(f"'{field}.codebook_size' must be one integer (per-layer "
                                   f"codebook sizes are not supported), got "
                                   f"{opts['codebook_size']!r}")
        codebook_dim = opts.get("codebook_dim")
        return cls(dim=opt_int(opts, "dim", field),
                   num_quantizers=opt_int(opts, "num_quantizers", field),
                   codebook_size=opt_int(opts, "codebook_size", field),
                   codebook_dim=None if codebook_dim is None
                   else opt_int(opts, "codebook_dim", field),
                   use_cosine_sim=opt_bool(opts, "use_cosine_sim", field),
                   shared_codebook=opt_bool(opts, "shared_codebook", field),
                   field=field)

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        _check_width(pre_channels, self.dim, self.field, "dim", "rvq")
        return self.dim

    def _codebooks(self) -> list[torch.Tensor]:
        return [layer._codebook.embed[0].float() for layer in self.quantizer.layers]

    def check_loaded(self) -> None:
        """Once, after the checkpoint is loaded (reading the flags synchronises with the device, so not
        per batch): a codebook stable-audio-tools never initialised cannot give reproducible tokens."""
        flags = torch.stack([layer._codebook.initted.reshape(-1)[0]
                             for layer in self.quantizer.layers])
        if not bool(flags.all()):
            bad = [i for i, f in enumerate(flags.tolist()) if not f]
            raise CheckpointError(
                f"rvq bottleneck: codebook layer(s) {bad} were never initialised "
                "('bottleneck.quantizer.layers.N._codebook.initted' is 0, the codebook is "
                "its k-means placeholder): stable-audio-tools would k-means-initialise it from "
                "the first batch it sees, so these tokens cannot be reproduced. Use a trained "
                "checkpoint.")

    def quantize(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _linear(pre.float().transpose(1, 2), self.quantizer.project_in)  # [B, T, D]
        residual, out, indices = x, torch.zeros_like(x), []
        for embed in self._codebooks():
            if self.use_cosine_sim:
                scores = F.normalize(residual, dim=-1, eps=1e-6) @ embed.t()
            else:
                scores = _neg_euclidean_distance(residual, embed)
            index = scores.argmax(dim=-1)
            chosen = F.embedding(index, embed)
            residual = residual - chosen
            out = out + chosen
            indices.append(index)
        out = _linear(out, self.quantizer.project_out)
        return out.transpose(1, 2).to(pre.dtype), torch.stack(indices, dim=1)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the chosen codebook rows (of the first Q layers), projected out; float32."""
        codebooks = self._codebooks()
        tokens = self.check_tokens(tokens, codebooks[0].device).transpose(1, 2)  # [B, T, Q]
        out = torch.zeros(*tokens.shape[:2], self.codebook_dim, device=tokens.device)
        for q in range(tokens.shape[-1]):
            out = out + F.embedding(tokens[..., q], codebooks[q])
        return _linear(out, self.quantizer.project_out).transpose(1, 2)


# ============================================================================ dac_rvq
class _DACVectorQuantize(nn.Module):
    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = nn.Conv1d(input_dim, codebook_dim, kernel_size=1)
        self.out_proj = nn.Conv1d(codebook_dim, input_dim, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)


class _DACResidualVQ(nn.Module):
    def __init__(self, input_dim: int, codebook_size: int, codebook_dims: list[int]):
        super().__init__()
        self.quantizers = nn.ModuleList(
            _DACVectorQuantize(input_dim, codebook_size, d) for d in codebook_dims)


@register_bottleneck("dac_rvq")
class DACRVQBottleneck(DiscreteBottleneck):
    """stable-audio-tools `DACRVQBottleneck`: DAC's `ResidualVectorQuantize(**config)`.

    Each stage projects the residual to `codebook_dim` (1x1 conv), picks the codebook row
    nearest by cosine (both sides l2-normalized), and projects that (unnormalized) row back.
    With `quantize_on_decode`, upstream `encode` returns its input unquantized and quantizes in
    `decode`; the same here (tokens are still the codes of the input).
    """

    OPTIONS = ("input_dim", "n_codebooks", "codebook_size", "codebook_dim", "quantizer_dropout",
               "quantize_on_decode", "noise_augment_dim")
    accepts_fewer_quantizers = True

    def __init__(self, input_dim: int = 512, n_codebooks: int = 9, codebook_size: int = 1024,
                 codebook_dim: int | Sequence[int] = 8, quantize_on_decode: bool = False,
                 noise_augment_dim: int = 0, field: str = "bottleneck.config"):
        super().__init__()
        dims = ([int(codebook_dim)] * n_codebooks if isinstance(codebook_dim, int)
                else [int(d) for d in codebook_dim])
        self.input_dim = int(input_dim)
        self.num_quantizers = int(n_codebooks)
        self.codebook_size = int(codebook_size)
        self.codebook_dims = dims
        self.quantize_on_decode = bool(quantize_on_decode)
        self.noise_augment_dim = int(noise_augment_dim)
        self.field = field
        self.quantizer = _DACResidualVQ(self.input_dim, self.codebook_size, dims)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "DACRVQBottleneck":
        opts = _no_options(cfg, field, cls.OPTIONS)
        n = opt_int(opts, "n_codebooks", field, 9)
        dims = opts.get("codebook_dim", 8)
        if isinstance(dims, (list, tuple)):
            if len(dims) != n:
                raise ModelConfigError(f"'{field}.codebook_dim' lists {len(dims)} sizes but "
                                       f"'{field}.n_codebooks' = {n}")
            dims = [opt_int({"codebook_dim": d}, "codebook_dim", field) for d in dims]
        else:
            dims = opt_int(opts, "codebook_dim", field, 8)
        dropout = opts.get("quantizer_dropout", 0.0)  # training only
        if not isinstance(dropout, (int, float)):
            raise ModelConfigError(f"'{field}.quantizer_dropout' must be a number, "
                                   f"got {dropout!r}")
        return cls(input_dim=opt_int(opts, "input_dim", field, 512), n_codebooks=n,
                   codebook_size=opt_int(opts, "codebook_size", field, 1024), codebook_dim=dims,
                   quantize_on_decode=opt_bool(opts, "quantize_on_decode", field),
                   noise_augment_dim=opt_int(opts, "noise_augment_dim", field, 0, minimum=0),
                   field=field)

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        _check_width(pre_channels, self.input_dim, self.field, "input_dim", "dac_rvq")
        return self.input_dim

    def decoder_channels(self, latent_dim: int) -> int:
        return latent_dim + self.noise_augment_dim

    def _residual_quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D, T] float32 -> (z [B, D, T], codes [B, Q, T]) as DAC's forward in eval."""
        z, residual, codes = None, x, []
        for vq in self.quantizer.quantizers:
            z_e = _conv1x1(residual, vq.in_proj)  # [B, d, T]
            flat = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]))
            book = vq.codebook.weight.float()
            normed = F.normalize(book)
            dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ normed.t()
                    + normed.pow(2).sum(1, keepdim=True).t())
            index = (-dist).max(1)[1].reshape(x.shape[0], -1)
            z_q = F.embedding(index, book).transpose(1, 2)
            z_q = _conv1x1(z_e + (z_q - z_e), vq.out_proj)  # straight-through form, as upstream
            z = z_q if z is None else z + z_q
            residual = residual - z_q
            codes.append(index)
        return z, torch.stack(codes, dim=1)

    def quantize(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, codes = self._residual_quantize(pre.float())
        return (pre if self.quantize_on_decode else z.to(pre.dtype)), codes

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.quantize_on_decode:
            latents = self._residual_quantize(latents.float())[0].to(latents.dtype)
        return append_noise_channels(latents, self.noise_augment_dim)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """DAC `from_codes`: sum over the first Q stages of out_proj(codebook row); float32."""
        stages = self.quantizer.quantizers
        tokens = self.check_tokens(tokens, stages[0].codebook.weight.device)
        z = None
        for q in range(tokens.shape[1]):
            rows = F.embedding(tokens[:, q], stages[q].codebook.weight.float()).transpose(1, 2)
            z_q = _conv1x1(rows, stages[q].out_proj)
            z = z_q if z is None else z + z_q
        return z


# ============================================================================ fsq
class _FSQ(nn.Module):
    def __init__(self, levels: list[int], dim: int, num_codebooks: int, bias: bool):
        super().__init__()
        self.levels = list(levels)
        self.num_codebooks = int(num_codebooks)
        self.dim = int(dim)
        effective = len(levels) * num_codebooks
        has_proj = dim != effective
        self.project_in = nn.Linear(dim, effective, bias=bias) if has_proj else nn.Identity()
        self.project_out = nn.Linear(effective, dim, bias=bias) if has_proj else nn.Identity()
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32),
                             persistent=False)
        self.register_buffer("_basis", torch.tensor(_basis(levels), dtype=torch.int64),
                             persistent=False)


@register_bottleneck("fsq")
class FSQBottleneck(DiscreteBottleneck):
    """stable-audio-tools `FSQBottleneck`: vector-quantize-pytorch `FSQ(**config)` over
    [B, T, C] frames. Per codebook: bound each dim with tanh to its level range, round, and
    renormalize to [-1, 1]; the token is the mixed-radix index of the rounded levels.

    `noise_dropout` only acts in training and is ignored; `preserve_symmetry` (whose formula
    differs between vector-quantize-pytorch releases), `orthogonal_rotation` and
    `channel_first` are not supported.
    """

    OPTIONS = ("levels", "dim", "num_codebooks", "keep_num_codebooks_dim", "scale",
               "projection_has_bias", "force_quantization_f32", "noise_dropout",
               "bound_hard_clamp", "noise_augment_dim")
    UNSUPPORTED = {"preserve_symmetry": (False,), "orthogonal_rotation": (False,),
                   "channel_first": (False,), "return_indices": (True,)}

    def __init__(self, levels: list[int], dim: int | None = None, num_codebooks: int = 1,
                 projection_has_bias: bool = True, bound_hard_clamp: bool = False,
                 noise_augment_dim: int = 0, field: str = "bottleneck.config"):
        super().__init__()
        self.levels = list(levels)
        self.num_quantizers = int(num_codebooks)
        self.codebook_size = int(math.prod(self.levels))
        self.dim = int(dim if dim is not None else len(self.levels) * num_codebooks)
        self.bound_hard_clamp = bool(bound_hard_clamp)
        self.noise_augment_dim = int(noise_augment_dim)
        self.field = field
        self.quantizer = _FSQ(self.levels, self.dim, self.num_quantizers, projection_has_bias)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "FSQBottleneck":
        opts = _no_options(cfg, field, cls.OPTIONS + tuple(cls.UNSUPPORTED))
        reject_enabled(opts, field, "fsq bottleneck", cls.UNSUPPORTED)
        if "levels" not in opts:
            raise ModelConfigError(f"'{field}.levels' is missing (the fsq bottleneck needs its "
                                   "quantization levels, e.g. [8, 5, 5, 5])")
        levels = _levels(opts["levels"], field)
        dim = opts.get("dim")
        noise_dropout = opt_number(opts, "noise_dropout", field, 0.0)  # training only
        if not 0.0 <= noise_dropout <= 1.0:
            raise ModelConfigError(f"'{field}.noise_dropout' must lie in [0, 1], "
                                   f"got {noise_dropout!r}")
        for key in ("keep_num_codebooks_dim", "force_quantization_f32"):
            if opts.get(key) is not None:
                opt_bool(opts, key, field)
        return cls(levels, dim=None if dim is None else opt_int(opts, "dim", field),
                   num_codebooks=opt_int(opts, "num_codebooks", field, 1),
                   projection_has_bias=opt_bool(opts, "projection_has_bias", field, True),
                   bound_hard_clamp=opt_bool(opts, "bound_hard_clamp", field),
                   noise_augment_dim=opt_int(opts, "noise_augment_dim", field, 0, minimum=0),
                   field=field)

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        _check_width(pre_channels, self.dim, self.field, "dim", "fsq")
        return self.dim

    def decoder_channels(self, latent_dim: int) -> int:
        return latent_dim + self.noise_augment_dim

    def quantize(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fsq = self.quantizer
        z = _linear(pre.float().transpose(1, 2), fsq.project_in)  # [B, T, C*d]
        b, t, _ = z.shape
        z = z.reshape(b, t, self.num_quantizers, len(self.levels))
        levels = fsq._levels
        half_width = levels // 2
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(z.device)
        if self.bound_hard_clamp:
            bounded = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        codes = (bounded + (bounded.round() - bounded)) / half_width  # round_ste, renormalize
        tokens = ((codes * half_width + half_width) * fsq._basis).sum(-1).round().long()
        out = _linear(codes.reshape(b, t, -1), fsq.project_out)
        return out.transpose(1, 2).to(pre.dtype), tokens.transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return append_noise_channels(latents, self.noise_augment_dim)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """FSQ `indices_to_codes` (+ project_out) on [B, Q, T] tokens; float32."""
        fsq = self.quantizer
        tokens = self.check_tokens(tokens, fsq._basis.device).transpose(1, 2)  # [B, T, Q]
        levels = fsq._levels.long()
        half_width = levels // 2
        level_index = (tokens.unsqueeze(-1) // fsq._basis) % levels
        codes = (level_index - half_width) / half_width
        out = _linear(codes.reshape(*tokens.shape[:2], -1).float(), fsq.project_out)
        return out.transpose(1, 2)


@register_bottleneck("dithered_fsq")
class DitheredFSQBottleneck(DiscreteBottleneck):
    """stable-audio-tools `DitheredFSQBottleneck` (its own `fsq.py`), in eval mode: per dim,
    tanh, then round to `levels` evenly spaced values in [-1, 1]. Dithering and noise dropout
    only act in training (`dither_inference` is stored but unused upstream). No tensors.
    Input and latent width: len(levels) * num_codebooks. Upstream returns these tokens as
    [B, T, Q]; here [B, Q, T]."""

    OPTIONS = ("dim", "levels", "num_codebooks", "dither_inference", "noise_dropout")

    def __init__(self, levels: list[int], num_codebooks: int = 1,
                 field: str = "bottleneck.config"):
        super().__init__()
        self.levels = list(levels)
        self.num_quantizers = int(num_codebooks)
        self.codebook_size = int(math.prod(self.levels))
        self.width = len(self.levels) * self.num_quantizers
        self.field = field
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("_basis", torch.tensor(_basis(self.levels), dtype=torch.int64),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], field: str) -> "DitheredFSQBottleneck":
        opts = _no_options(cfg, field, cls.OPTIONS)
        if "dim" not in opts or "levels" not in opts:
            raise ModelConfigError(f"'{field}' needs 'dim' and 'levels' for the dithered_fsq "
                                   "bottleneck")
        dim = opt_int(opts, "dim", field)
        levels = opts["levels"]
        if isinstance(levels, int) and not isinstance(levels, bool):
            levels = [levels] * dim
        levels = _levels(levels, field)
        if len(levels) != dim:
            raise ModelConfigError(f"'{field}.levels' has {len(levels)} entries but "
                                   f"'{field}.dim' = {dim}")
        opt_bool(opts, "dither_inference", field, True)
        opt_number(opts, "noise_dropout", field, 0.05)
        return cls(levels, num_codebooks=opt_int(opts, "num_codebooks", field, 1), field=field)

    def latent_channels(self, pre_channels: int, mode: str = "sample") -> int:
        if pre_channels != self.width:
            raise ModelConfigError(
                f"'{self.field}': dim * num_codebooks = {self.width}, but the encoder outputs "
                f"{pre_channels} channels (encoder.config.latent_dim)")
        return self.width

    def _half_l(self) -> torch.Tensor:
        return 1.0 * 2 / (self._levels - 1)  # scale = 1

    def quantize(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(pre.float().transpose(1, 2))
        b, t, _ = z.shape
        z = z.reshape(b, t, self.num_quantizers, len(self.levels))
        half_l = self._half_l()
        level_index = (z + 1.0) / half_l
        level_index = level_index + (level_index.round() - level_index)  # round_ste
        codes = level_index * half_l - 1.0
        tokens = (((codes + 1.0) / half_l).round().long() * self._basis).sum(-1)
        return (codes.reshape(b, t, -1).transpose(1, 2).to(pre.dtype), tokens.transpose(1, 2))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.check_tokens(tokens, self._basis.device).transpose(1, 2)  # [B, T, Q]
        level_index = (tokens.unsqueeze(-1) // self._basis) % self._levels
        codes = level_index * self._half_l() - 1.0
        return codes.reshape(*tokens.shape[:2], -1).float().transpose(1, 2)
