"""A batch of windows on the device -> latents (or tokens), without making the caller wait.

The model runs under `torch.inference_mode()` in the chosen precision; the bottleneck runs in
fp32. VAE noise is drawn per sample from a generator seeded by the sample's key, so latents do not
depend on batch composition, rank or worker count. A low-precision batch with any non-finite
latent is re-run in fp32; a sample still non-finite then is reported, not written. A batch that
runs out of device memory is halved and retried, down to one window; a window that still does
not fit is reported, and the run goes on.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .models.layout import channels_last_encoder

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, sample key): stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def latent_padding_mask(masks: torch.Tensor, latent_length: int) -> torch.Tensor:
    """[B, N] sample-rate masks -> [B, T] int masks at latent resolution (nearest, as the seed)."""
    return F.interpolate(masks[:, None].float(), size=latent_length, mode="nearest")[:, 0].to(torch.int32)


OOM_SPLIT_NOTE = "out of device memory even for this one window; lower --sample-size or use a larger device"


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failure: the batch may fit in smaller pieces."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class EncodedBatch:
    latents: torch.Tensor | None  # float32 (or int tokens) on the CPU, [B, C, T]; None when no window fit
    padding_masks: torch.Tensor   # int32 [B, T]
    errors: list[str | None]      # per sample: why it is not written (non-finite, out of memory), or None
    fp32_retry: bool              # part of the batch was re-run in fp32
    splits: int = 0               # times the batch was halved after running out of memory

    @property
    def finite(self) -> list[bool]:
        return [e is None for e in self.errors]


@dataclass
class _Part:
    """The result of one forward pass over windows [start, stop) of a batch, on its way to the host."""

    start: int
    stop: int
    latents: torch.Tensor | None = None  # host tensor (pinned on CUDA), filled once `event` completes
    finite: torch.Tensor | None = None   # host bool [stop - start]
    event: object = None                 # torch.cuda.Event recorded after the copies, or None
    low_precision: bool = False
    error: str | None = None             # this one window did not fit in memory


@dataclass
class PendingBatch:
    """A batch submitted to the device: what `collect` needs to finish it."""

    audio: Optional[torch.Tensor]  # the CPU batch, kept for an fp32 re-run (low precision only)
    padding_masks: torch.Tensor
    keys: list[str]
    parts: list[_Part]
    splits: int = 0
    count: int = 0                 # real windows; the rest are padding (a short last batch)


class BatchEncoder:
    """Owns the model copies on the device; `submit` queues a batch, `collect` returns its latents.

    On CUDA, `submit` returns as soon as the work is queued: the batch is copied from pinned memory
    without blocking, and the latents and per-window finiteness flags are copied back into pinned
    host buffers behind an event. `collect` (the writer thread) waits for that event only. The main
    loop thus never waits for the device. `encode` does both, for callers that want the result now.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, precision: str = "fp32",
                 latent_mode: str = "sample", is_discrete: bool = False, seed: int = 0, compile: bool = False,
                 channels_last: bool = False):
        self.device = device
        self.precision = precision
        self.latent_mode = latent_mode
        self.is_discrete = is_discrete
        self.seed = seed
        self.model = model.to(device).eval()
        if device.type == "cuda":
            if device.index is not None:
                torch.cuda.set_device(device)  # events, pinned buffers and streams of this rank's GPU
            torch.backends.cudnn.benchmark = True  # windows have one fixed shape: autotune it once
            if precision == "fp32":
                # cuDNN convolutions default to TF32, which moves fp32 latents by ~1e-3: keep fp32 exact
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        self.dtype = PRECISION_DTYPES[precision]
        self.low_model = None
        if self.dtype != torch.float32:
            self.low_model = copy.deepcopy(self.model).to(self.dtype)
        self.compiled = compile
        self.compile_error: str | None = None
        self.channels_last = channels_last
        # the encoder network each model copy runs, by the copy's id: eager (in the channels-last layout
        # on request), and torch.compile'd on request (one graph per batch shape)
        self._eager = {id(m): channels_last_encoder(m.encoder) if channels_last else m.encoder
                       for m in (self.model, self.low_model) if m is not None}
        self._encoders = self._networks(compile)
        self._lock = threading.Lock()
        self.pad_to: int | None = None  # pad shorter batches to this size (a compiled graph per shape)
        self.retries = 0     # batches (or parts) re-run in fp32
        self.splits = 0      # halvings after running out of memory

    def _networks(self, compile: bool) -> dict:
        """The encoder network each model copy runs, by the copy's id: torch.compile'd or eager."""
        return {key: (torch.compile(net, dynamic=False) if compile else net) for key, net in self._eager.items()}

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
        if pre.device.type == "cuda":
            noise = noise.pin_memory()
        return noise.to(pre.device, non_blocking=True)

    def _forward(self, model: torch.nn.Module, audio: torch.Tensor, keys: list[str], start: int,
                 encoder=None) -> _Part:
        """Queue one forward pass and the copies of its results to the host."""
        x = audio.to(self.device, non_blocking=True).to(next(model.parameters()).dtype)
        eager = self._eager[id(model)]
        network = encoder or self._encoders[id(model)]
        try:
            pre = network(x).float()
        except Exception as exc:
            if network is eager or encoder is not None or is_out_of_memory(exc):
                raise
            # torch.compile could not build the graph here (no C++ compiler, no triton...): go on eagerly
            self._encoders = self._networks(compile=False)
            self.compiled, self.compile_error = False, f"{type(exc).__name__}: {str(exc)[:300]}"
            pre = eager(x).float()
        if self.is_discrete:
            out, finite = self.bottleneck.encode_tokens(pre), torch.isfinite(pre.flatten(1)).all(dim=1)
        else:
            out = self.bottleneck.encode(pre, mode=self.latent_mode, noise=self._noise(pre, keys))
            finite = torch.isfinite(out.flatten(1)).all(dim=1)
        part = _Part(start, start + len(keys), low_precision=model is self.low_model)
        if self.device.type == "cuda":
            part.latents = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            part.latents.copy_(out, non_blocking=True)
            part.finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            part.finite.copy_(finite, non_blocking=True)
            part.event = torch.cuda.Event()
            part.event.record(torch.cuda.current_stream(self.device))
        else:
            part.latents, part.finite = out, finite
        return part

    def _forward_split(self, model: torch.nn.Module, audio: torch.Tensor, keys: list[str], start: int
                       ) -> tuple[list[_Part], int]:
        """Forward passes over the batch, halving it on out-of-memory down to one window."""
        try:
            return [self._forward(model, audio, keys, start)], 0
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
        if len(keys) == 1:
            return [_Part(start, start + 1, error=OOM_SPLIT_NOTE)], 0
        half = len(keys) // 2
        first, n1 = self._forward_split(model, audio[:half], keys[:half], start)
        second, n2 = self._forward_split(model, audio[half:], keys[half:], start + half)
        return first + second, 1 + n1 + n2

    @torch.inference_mode()
    def submit(self, audio: torch.Tensor, padding_masks: torch.Tensor, keys: list[str]) -> PendingBatch:
        """Queue a CPU batch [B, C, N] on the device; returns at once on CUDA."""
        count = len(keys)
        if self.pad_to is not None and count < self.pad_to:  # the short last batch reuses the compiled graph
            extra = self.pad_to - count
            audio = torch.cat([audio, audio.new_zeros(extra, *audio.shape[1:])])
            padding_masks = torch.cat([padding_masks, padding_masks.new_zeros(extra, *padding_masks.shape[1:])])
            keys = keys + [f"padding/{i}" for i in range(extra)]
        parts, splits = self._forward_split(self.low_model or self.model, audio, keys, 0)
        if splits:
            with self._lock:
                self.splits += splits
        # in fp32 nothing is re-run: let the batch go (a queue of pending batches of long windows is large);
        # on CUDA a pinned batch stays reserved until its copy to the device is done
        keep = audio if self.low_model is not None else None
        return PendingBatch(audio=keep, padding_masks=padding_masks, keys=keys, parts=parts, splits=splits,
                            count=count)

    @torch.inference_mode()
    def collect(self, pending: PendingBatch) -> EncodedBatch:
        """Wait for a submitted batch and finish it: low-precision parts with a non-finite latent are
        re-run in fp32; a window still non-finite, or that never fit in memory, gets an error."""
        parts: list[_Part] = []
        retried = False
        splits = pending.splits
        for part in pending.parts:
            if part.event is not None:
                part.event.synchronize()
            if part.error is None and part.low_precision and not bool(part.finite.all()):
                again, n = self._forward_split(self.model, pending.audio[part.start:part.stop],
                                               pending.keys[part.start:part.stop], part.start)
                for p in again:
                    if p.event is not None:
                        p.event.synchronize()
                parts.extend(again)
                splits += n
                retried = True
                with self._lock:
                    self.retries += 1
                    self.splits += n
            else:
                parts.append(part)
        errors: list[str | None] = [None] * len(pending.keys)
        done = [p for p in parts if p.error is None]
        latents = None
        if done:
            latents = torch.zeros((len(pending.keys), *done[0].latents.shape[1:]), dtype=done[0].latents.dtype)
        for part in parts:
            if part.error is not None:
                errors[part.start] = part.error
                continue
            latents[part.start:part.stop] = part.latents
            for i, ok in enumerate(part.finite.tolist()):
                if not ok:
                    errors[part.start + i] = "encoder produced non-finite latents" + (
                        " (also in fp32)" if self.low_model is not None else "")
        length = latents.shape[-1] if latents is not None else 1
        n = pending.count or len(pending.keys)
        masks = latent_padding_mask(pending.padding_masks[:n], length)
        return EncodedBatch(latents=latents[:n] if latents is not None else None, padding_masks=masks,
                            errors=errors[:n], fp32_retry=retried, splits=splits)

    def encode(self, audio: torch.Tensor, padding_masks: torch.Tensor, keys: list[str]) -> EncodedBatch:
        return self.collect(self.submit(audio, padding_masks, keys))

    @torch.inference_mode()
    def probe_batch_size(self, sample_size: int, *, cap: int, host_memory: int, headroom: float = 0.2
                         ) -> tuple[int, dict]:
        """The largest power-of-two batch (<= cap) that fits with `headroom` to spare, and how it was found.

        On CUDA: forward passes of growing batches (the eager encoder: one compiled graph per probe
        would cost minutes), stopping at the first that runs out of memory or whose peak leaves less
        than `headroom` of the device free. On the CPU: one window's largest activation, measured by
        forward hooks, against the memory the process may still use (`host_memory`).
        """
        model = self.low_model or self.model
        channels = self.model.in_channels
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free * (1 - headroom)
            chosen, tried = 0, []
            size = 1
            while size <= cap:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                audio = torch.zeros(size, channels, sample_size)
                try:
                    part = self._forward(model, audio, [f"probe{i}" for i in range(size)], 0,
                                         encoder=self._eager[id(model)])
                    part.event.synchronize()
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    tried.append({"batch_size": size, "peak_bytes": None})
                    break
                finally:
                    torch.cuda.empty_cache()
                peak = torch.cuda.max_memory_allocated(self.device) - base
                tried.append({"batch_size": size, "peak_bytes": int(peak)})
                if peak > budget:
                    break
                chosen = size
                size *= 2
            return max(1, chosen), {"device_free_bytes": int(free), "device_total_bytes": int(total),
                                    "headroom": headroom, "probes": tried}
        largest = [0]

        def measure(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())
        network = self._eager[id(model)]
        hooks = [m.register_forward_hook(measure) for m in network.modules()]
        try:
            self._forward(model, torch.zeros(1, channels, sample_size), ["probe"], 0, encoder=network)
        finally:
            for hook in hooks:
                hook.remove()
        per_window = 4 * largest[0]  # input, output and temporaries of the widest layer
        budget = host_memory * (1 - headroom) / 2  # half of it: decode workers and queues need the rest
        chosen = 1
        while chosen * 2 <= cap and chosen * 2 * per_window <= budget:
            chosen *= 2
        return chosen, {"host_memory_bytes": int(host_memory), "headroom": headroom,
                        "bytes_per_window_estimate": int(per_window)}


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every token of a codebook of this size."""
    if codebook_size <= 1 << 8:
        return torch.uint8
    if codebook_size <= 1 << 15:
        return torch.int16
    return torch.int32
