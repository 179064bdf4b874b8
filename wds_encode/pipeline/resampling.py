"""Windows still at their source rate -> one batch at the model's rate, on the device (`--resample-on
device`, the default on a GPU).

Resampling is most of a decode worker's time when the rates differ (48 kHz files for a 44.1 kHz model:
the worker reads at 0.4 of its decoder's speed). So on a GPU rank the workers cut each window's source
frames (those the resampler's kernel reaches, `audio.Resampling`) and the main process resamples them
after the host-to-device copy, with the same kernel (torchaudio's), windows of one source rate together:
the latents are those of resampling in the workers, up to float rounding. Runs in the main process.
"""

from __future__ import annotations

import torch

from .audio import resample
from .reader import WindowItem


def device_batch(items: list[WindowItem], device: torch.device, target_rate: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(audio [B, C, size] on `device`, padding masks [B, size], noise keys) of windows of one size, some
    at their source rate (`item.resampling`), the others already at the model's rate (zero-padded)."""
    size = items[0].size
    channels = int(items[0].audio.shape[0])
    audio = torch.zeros((len(items), channels, size), dtype=torch.float32, device=device)
    by_rate: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        if item.resampling is None:
            audio[index] = item.audio.to(device, non_blocking=True)
        else:
            by_rate.setdefault(item.resampling.source_rate, []).append(index)
    for rate, indices in by_rate.items():
        # a batch of segments, zero-padded at the end to the longest: the samples each window keeps see
        # only its own segment (past its end the resampler sees zeros either way)
        longest = max(int(items[i].audio.shape[-1]) for i in indices)
        # page-locked on CUDA, so the copy below does not block (torch's pinned-block cache keeps the
        # block until that copy is done, and hands it out again for the next batch)
        segments = torch.zeros((len(indices), channels, longest), dtype=torch.float32,
                               pin_memory=device.type == "cuda")
        for row, index in enumerate(indices):
            segment = items[index].audio
            segments[row, :, :segment.shape[-1]] = segment
        resampled = resample(segments.to(device, non_blocking=True), rate, target_rate)
        for row, index in enumerate(indices):
            plan = items[index].resampling
            audio[index, :, :plan.valid] = resampled[row, :, plan.skip:plan.skip + plan.valid]
    real = torch.tensor([item.real_samples for item in items])
    masks = torch.arange(size).unsqueeze(0) < real.unsqueeze(1)
    return audio, masks, [item.noise_key for item in items]
