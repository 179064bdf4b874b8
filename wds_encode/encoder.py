"""A batch of windows on the device -> latents (or tokens), with precision handling.

The model runs under `torch.inference_mode()` in the chosen precision; the bottleneck runs in
fp32. VAE noise is drawn per sample from a generator seeded by the sample's key, so latents do not
depend on batch composition, rank or worker count. A low-precision batch with any non-finite
latent is re-run in fp32; a sample still non-finite then is reported, not written.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, sample key): stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def latent_padding_mask(masks: torch.Tensor, latent_length: int) -> torch.Tensor:
    """[B, N] sample-rate masks -> [B, T] int masks at latent resolution (nearest, as the seed)."""
    return F.interpolate(masks[:, None].float(), size=latent_length, mode="nearest")[:, 0].to(torch.int32)


@dataclass
class EncodedBatch:
    latents: torch.Tensor        # float32 (or int tokens) on the CPU, [B, C, T]
    padding_masks: torch.Tensor  # int32 [B, T]
    finite: list[bool]           # per sample: False means do not write, report instead
    fp32_retry: bool             # the batch was re-run in fp32


class BatchEncoder:
    """Owns the model copies on the device and turns CPU batches into CPU latents."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device, precision: str = "fp32",
                 latent_mode: str = "sample", is_discrete: bool = False, seed: int = 0, compile: bool = False):
        self.device = device
        self.precision = precision
        self.latent_mode = latent_mode
        self.is_discrete = is_discrete
        self.seed = seed
        self.model = model.to(device).eval()
        if device.type == "cuda" and precision == "fp32":
            # cuDNN convolutions default to TF32, which moves fp32 latents by ~1e-3: keep fp32 exact
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.dtype = PRECISION_DTYPES[precision]
        self.low_model = None
        if self.dtype != torch.float32:
            self.low_model = copy.deepcopy(self.model).to(self.dtype)
        # the encoder network each model copy runs; torch.compile'd on request (one graph per batch shape)
        self._encoders = {id(m): (torch.compile(m.encoder, dynamic=False) if compile else m.encoder)
                          for m in (self.model, self.low_model) if m is not None}
        self.retries = 0

    @property
    def bottleneck(self):
        return self.model.bottleneck

    def _noise(self, pre: torch.Tensor, keys: list[str]) -> torch.Tensor | None:
        if self.is_discrete or self.latent_mode != "sample" or not getattr(self.bottleneck, "needs_noise", False):
            return None
        shape = self.bottleneck.noise_shape(pre[:1])[1:]
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(self.seed, key)))
            for key in keys])
        return noise.to(pre.device, non_blocking=True)

    def _run(self, model: torch.nn.Module, audio: torch.Tensor, keys: list[str]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents or tokens, per-sample finiteness of the continuous values they came from)."""
        x = audio.to(self.device, non_blocking=True).to(next(model.parameters()).dtype)
        pre = self._encoders[id(model)](x).float()
        if self.is_discrete:
            return self.bottleneck.encode_tokens(pre), torch.isfinite(pre.flatten(1)).all(dim=1)
        out = self.bottleneck.encode(pre, mode=self.latent_mode, noise=self._noise(pre, keys))
        return out, torch.isfinite(out.flatten(1)).all(dim=1)

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor, padding_masks: torch.Tensor, keys: list[str]) -> EncodedBatch:
        retried = False
        if self.low_model is not None:
            out, finite = self._run(self.low_model, audio, keys)
            if not bool(finite.all()):
                out, finite = self._run(self.model, audio, keys)
                retried = True
                self.retries += 1
        else:
            out, finite = self._run(self.model, audio, keys)
        out = out.cpu()
        masks = latent_padding_mask(padding_masks, out.shape[-1])
        return EncodedBatch(latents=out, padding_masks=masks, finite=finite.cpu().tolist(), fp32_retry=retried)


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every token of a codebook of this size."""
    if codebook_size <= 1 << 8:
        return torch.uint8
    if codebook_size <= 1 << 15:
        return torch.int16
    return torch.int32
