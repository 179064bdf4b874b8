"""`AutoencoderModel`: encoder + bottleneck (+ optional decoder) with the model's metadata.

This is the object the rest of wds-encode talks to. It mirrors stable-audio-tools'
`AudioAutoencoder` state_dict layout (`encoder.*`, `bottleneck.*`, `decoder.*`) so checkpoints
load unchanged, but exposes an explicit `mode` / `noise` on `encode` for reproducible VAE
sampling. Latents are returned exactly as upstream `AudioAutoencoder.encode` (and its
`pre_encode.py`) returns them: a diffusion pretransform's `scale` is *not* applied; it is only
reported as `pretransform_scale`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .bottlenecks import Bottleneck


class AutoencoderModel(nn.Module):
    def __init__(self, encoder: nn.Module, bottleneck: Bottleneck, *,
                 sample_rate: int, io_channels: int, latent_dim: int, downsampling_ratio: int,
                 audio_channels: int = 2, in_channels: int | None = None,
                 decoder: nn.Module | None = None, sample_size: int | None = None,
                 pretransform_scale: float = 1.0, soft_clip: bool = False,
                 config: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder
        self.soft_clip = bool(soft_clip)
        self.sample_rate = int(sample_rate)
        self.audio_channels = int(audio_channels)
        self.io_channels = int(io_channels)
        self.in_channels = int(in_channels if in_channels is not None else io_channels)
        self.latent_dim = int(latent_dim)
        self.downsampling_ratio = int(downsampling_ratio)
        self.sample_size = sample_size
        self.pretransform_scale = float(pretransform_scale)
        self.config = config or {}

    # -- metadata ---------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return bool(self.bottleneck.is_discrete)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def latent_length(self, num_samples: int) -> int:
        """Latent frames produced for `num_samples` audio samples (== N // ratio when N is a
        multiple of `downsampling_ratio`)."""
        exact = getattr(self.encoder, "output_length", None)
        return exact(num_samples) if exact is not None else num_samples // self.downsampling_ratio

    def noise_shape(self, batch_size: int, num_samples: int) -> tuple[int, int, int] | None:
        """Shape of the `noise` that `encode(audio[B, C, num_samples], "sample", noise)` takes,
        or None when the bottleneck is deterministic."""
        if not self.bottleneck.needs_noise:
            return None
        return (batch_size, self.latent_dim, self.latent_length(num_samples))

    # -- inference --------------------------------------------------------------------------
    def _check_audio(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 3 or audio.shape[1] != self.in_channels:
            raise ValueError(f"expected audio of shape [batch, {self.in_channels}, samples], "
                             f"got {tuple(audio.shape)}")
        return audio.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_pre_bottleneck(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, C, N] -> encoder output [B, C_pre, N / downsampling_ratio]."""
        return self.encoder(self._check_audio(audio))

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, mode: str = "sample",
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """audio [B, C, N] -> latents [B, latent_dim, N / downsampling_ratio] (`params` mode:
        2 * latent_dim channels for a VAE: mean then std)."""
        return self.bottleneck.encode(self.encode_pre_bottleneck(audio), mode=mode, noise=noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, latent_dim, T] -> audio [B, io_channels, T * downsampling_ratio]."""
        if self.decoder is None:
            raise RuntimeError("this model was loaded without its decoder; use "
                               "load_autoencoder(..., with_decoder=True)")
        latents = latents.to(device=self.device, dtype=self.dtype)
        audio = self.decoder(self.bottleneck.decode(latents))
        return torch.tanh(audio) if self.soft_clip else audio
