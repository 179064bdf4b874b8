"""The transformer layers of Stable Audio 3's SAME autoencoders, re-implemented natively.

Module nesting and parameter names follow SA3's `stable_audio_3/models/transformer.py` (commit
636f906: `TransformerBlock`, `Attention`, `FeedForward`, `GLU`, `DynamicTanh`, `RotaryEmbedding`) so
a SAME checkpoint's keys map 1:1 (`transformers.0.self_attn.to_qkv.weight`, `...q_norm.alpha`,
`...ff.ff.0.proj.weight`, `...rope.inv_freq`). Only the inference path SAME uses is here: self-
attention without a context, no adaptive norm, no conditioning inputs.

Differences from SA3, all of them numerically neutral:
- attention always goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels
  on a GPU); the two branches of differential attention run as one call with twice the heads;
- a sliding window attends over query blocks with a halo of keys (`banded_attention`), never an
  N x N mask;
- rotary angles are computed in fp32 from the standard frequencies whatever the model's dtype (SA3
  reads its `inv_freq` buffer, which a bf16 cast would round: at position 8000 that is radians of
  error); the loaded buffer is checked against those frequencies (`check_loaded`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

ROTARY_BASE = 10000.0
SIN_GATE_FREQUENCY = 3.14159265359   # SA3's `Sin` gate: sin(pi * x), with this literal
BAND_BLOCK = 64                      # queries per block of banded attention (a few times the band: less waste)


class DynamicTanh(nn.Module):
    """DyT: gamma * tanh(alpha * x) + beta (a normalisation-free stand-in for LayerNorm)."""

    def __init__(self, dim: int, init_alpha: float = 4.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1) * init_alpha)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


class RMSNorm(nn.Module):
    """RMS norm with a learned gain (SA3's `RMSNorm`, used where `dyt` is off)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], weight=self.gamma, eps=self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_val: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.full([dim], init_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def rotary_frequencies(dim: int) -> torch.Tensor:
    """SA3's `RotaryEmbedding(dim).inv_freq`: 1 / base^(2i / dim), fp32."""
    return 1.0 / (ROTARY_BASE ** (torch.arange(0, dim, 2).float() / dim))


class RotaryEmbedding(nn.Module):
    """Rotary position angles [N, dim] (partial rotary: `dim` is half a head in SAME)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", rotary_frequencies(dim))

    def check_loaded(self, where: str) -> None:
        """The checkpoint's buffer must hold the standard frequencies, which `forward` uses in fp32."""
        expected = rotary_frequencies(self.dim)
        loaded = self.inv_freq.detach().float().cpu()
        if loaded.shape != expected.shape or not torch.allclose(loaded, expected, rtol=1e-5, atol=0):
            raise CheckpointError(f"{where}.inv_freq does not hold the rotary frequencies 1/10000^(2i/{self.dim}) "
                                  "this SAME layer is built with (a base or rescale wds-encode does not support)")

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, rotary_frequencies(self.dim).to(device))
        return torch.cat((freqs, freqs), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first `freqs.shape[-1]` features of t [..., N, D] (in fp32), pass the rest through."""
    out_dtype = t.dtype
    rot = freqs.shape[-1]
    t = t.float()
    head, tail = t[..., :rot], t[..., rot:]
    head = head * freqs.cos() + rotate_half(head) * freqs.sin()
    return torch.cat((head, tail), dim=-1).to(out_dtype)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int,
                     block: int = BAND_BLOCK) -> torch.Tensor:
    """Attention of each query i over keys [i - left, i + right] only; q, k, v [..., N, D].

    Queries go in blocks of `block`, each with its own keys plus a halo of `left` / `right` keys,
    as one batched SDPA call: memory grows with N * (block + left + right), not N * N. The band's
    additive mask is the same for every block but the first and last (keys off the ends are padding)."""
    n = q.shape[-2]
    blocks = -(-n // block)
    pad_q = blocks * block - n
    span = block + left + right
    if pad_q:
        q = F.pad(q, (0, 0, 0, pad_q))
    # keys padded by the halo on both sides (and to whole blocks), then unfolded into overlapping spans
    kp = F.pad(k, (0, 0, left, right + pad_q))
    vp = F.pad(v, (0, 0, left, right + pad_q))
    kb = kp.unfold(-2, span, block).transpose(-1, -2)   # [..., blocks, span, D]
    vb = vp.unfold(-2, span, block).transpose(-1, -2)
    qb = q.unflatten(-2, (blocks, block))               # [..., blocks, block, D]
    query = torch.arange(blocks * block, device=q.device).view(blocks, block, 1)
    key = (torch.arange(blocks, device=q.device).view(blocks, 1, 1) * block
           + torch.arange(span, device=q.device).view(1, 1, span) - left)
    delta = key - query
    allowed = (delta >= -left) & (delta <= right) & (key >= 0) & (key < n)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return out.flatten(-3, -2)[..., :n, :]


class Attention(nn.Module):
    """Self-attention with q/k norms, partial rotary embeddings and optional differential heads.

    Differential attention (`to_qkv` gives q, k, v, q', k'): softmax(q k^T) v - softmax(q' k'^T) v,
    both branches through the same q/k norms and rotary angles."""

    def __init__(self, dim: int, dim_heads: int = 64, qk_norm: str = "none", qk_norm_eps: float = 1e-6,
                 differential: bool = False, feat_scale: bool = False):
        super().__init__()
        self.dim = dim
        self.dim_heads = dim_heads
        self.num_heads = dim // dim_heads
        self.differential = differential
        self.to_qkv = nn.Linear(dim, dim * (5 if differential else 3), bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.qk_norm = qk_norm
        self.qk_norm_eps = qk_norm_eps
        if qk_norm == "ln":
            self.q_norm = nn.LayerNorm(dim_heads, eps=qk_norm_eps)
            self.k_norm = nn.LayerNorm(dim_heads, eps=qk_norm_eps)
        elif qk_norm == "rms":
            self.q_norm = RMSNorm(dim_heads, eps=qk_norm_eps)
            self.k_norm = RMSNorm(dim_heads, eps=qk_norm_eps)
        elif qk_norm == "dyt":
            self.q_norm = DynamicTanh(dim_heads)
            self.k_norm = DynamicTanh(dim_heads)
        self.feat_scale = feat_scale
        if feat_scale:
            self.lambda_dc = nn.Parameter(torch.zeros(dim))
            self.lambda_hf = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None,
                sliding_window: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.dim_heads
        parts = self.to_qkv(x).view(b, n, -1, h, d)               # [B, N, 3 or 5, H, D]
        if self.differential:
            q, k, v = parts[:, :, [0, 3]], parts[:, :, [1, 4]], parts[:, :, 2:3]
        else:
            q, k, v = parts[:, :, 0:1], parts[:, :, 1:2], parts[:, :, 2:3]
        # [B, branches, H, N, D]; the branches become extra heads
        q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))
        if self.qk_norm == "l2":
            q = F.normalize(q, dim=-1, eps=self.qk_norm_eps)
            k = F.normalize(k, dim=-1, eps=self.qk_norm_eps)
        elif self.qk_norm != "none":
            q, k = self.q_norm(q), self.k_norm(k)
        if freqs is not None:
            q, k = apply_rotary(q, freqs).to(v.dtype), apply_rotary(k, freqs).to(v.dtype)
        branches = q.shape[1]
        q, k = q.flatten(1, 2), k.flatten(1, 2)                   # [B, branches * H, N, D]
        v = v.expand(-1, branches, -1, -1, -1).flatten(1, 2)
        if sliding_window is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = banded_attention(q, k, v, *sliding_window)
        out = out.unflatten(1, (branches, h))
        out = out[:, 0] - out[:, 1] if self.differential else out[:, 0]
        out = self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
        if self.feat_scale:
            out_dc = out.mean(dim=-2, keepdim=True)
            out = out + self.lambda_dc * out_dc + self.lambda_hf * (out - out_dc)
        return out


class GLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, activation: nn.Module):
        super().__init__()
        self.act = activation
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * self.act(gate)


class Sin(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(SIN_GATE_FREQUENCY * x)


class FeedForward(nn.Module):
    """GLU feed-forward: SiLU gate (SwiGLU), or SA3's sine gate for its `sinusoidal` blocks.
    `ff` keeps SA3's Sequential indices (0: GLU, 2: output linear) for the checkpoint keys."""

    def __init__(self, dim: int, mult: float = 4, no_bias: bool = False, sinusoidal: bool = False):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(GLU(dim, inner, Sin() if sinusoidal else nn.SiLU()), nn.Identity(),
                                nn.Linear(inner, dim, bias=not no_bias), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ff(norm(x)); rotary angles over the sequence."""

    def __init__(self, dim: int, dim_heads: int = 64, *, norm: str = "dyt", norm_eps: float = 1e-3,
                 qk_norm: str = "dyt", qk_norm_eps: float = 1e-3, differential: bool = True,
                 feat_scale: bool = False, layer_scale: bool = False, ff_mult: float = 3,
                 sinusoidal: bool = False):
        super().__init__()
        dim_heads = min(dim_heads, dim)
        self.dim = dim
        self.pre_norm = DynamicTanh(dim) if norm == "dyt" else RMSNorm(dim, eps=norm_eps)
        self.self_attn = Attention(dim, dim_heads, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
                                   differential=differential, feat_scale=feat_scale)
        self.self_attn_scale = LayerScale(dim) if layer_scale else nn.Identity()
        self.ff_norm = DynamicTanh(dim) if norm == "dyt" else RMSNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, mult=ff_mult, sinusoidal=sinusoidal)
        self.ff_scale = LayerScale(dim) if layer_scale else nn.Identity()
        self.rope = RotaryEmbedding(dim_heads // 2)

    def forward(self, x: torch.Tensor, sliding_window: tuple[int, int] | None = None) -> torch.Tensor:
        freqs = self.rope(x.shape[-2], x.device)
        x = x + self.self_attn_scale(self.self_attn(self.pre_norm(x), freqs, sliding_window))
        return x + self.ff_scale(self.ff(self.ff_norm(x)))
