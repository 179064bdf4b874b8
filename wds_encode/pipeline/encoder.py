"""A batch of windows on the device -> latents (or tokens), without making the caller wait.

The model runs under `torch.inference_mode()` in the chosen precision; the bottleneck runs in
fp32. VAE noise is drawn per sample from a generator seeded by the sample's key, so latents do not
depend on batch composition, rank or worker count (beyond float rounding: another batch shape can
take another kernel). A low-precision run starts with a precision check (`check_precision`): a
probe window in the requested precision must agree with fp32 on the same device, which catches
broken kernels (oneDNN's AMX bf16 convolutions in some torch builds) and models that overflow in
fp16 before anything is written. During the run, a low-precision window with a non-finite latent
is re-run in fp32 (only that window, eagerly); a window still non-finite then is reported, not
written. A batch that runs out of device memory is halved and retried, down to one window, and
the size that fit is remembered for the batches after it; a window that still does not fit is
reported, and the run goes on.
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import ConfigError
from ..models.layout import channels_last_encoder
from .pinned import PinnedRing, PinnedSlot
from ..job.resources import cpu_flags

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The precision check's bound on the error of the encoder's output for one probe window: the L2 norm of the
# difference over that of the fp32 output's variation in time (per-channel mean removed: some models' outputs
# sit far from 0, and a constant offset would hide a wrong result). Rounding stays far below it: measured on
# the CPU for the stable-audio-tools models here, 0.024 to 0.062 in bf16 and 0.0025 to 0.0055 in fp16; broken
# kernels and a time-reversed convolution output give 1 and more.
PRECISION_CHECK_LIMIT = 0.25
PRECISION_PROBE_SECONDS = 10.0   # the probe window: at most this long (a window of the run, if shorter)

# --batch-size auto on a CPU is chosen by speed, not by memory alone: a CPU gains little from large batches
# (a window of a long run already fills its cores) and loses cache, and a batch larger than a small job's
# windows leaves the decode workers nothing to overlap (measured: 93 windows took 15.0 s at batch 256 against
# 4.6 s at 8). Candidates (powers of two, within the memory bound) are timed on probe batches, growing
# until they stop getting faster or the timing would cost more than CPU_PROBE_SECONDS; the smallest whose
# time per window is within CPU_BATCH_TOLERANCE of the fastest is kept.
CPU_BATCH_TOLERANCE = 0.10
CPU_PROBE_SECONDS = 2.0

# What allocation failures look like: PyTorch's own error, and cuDNN / cuBLAS failing to allocate a
# workspace or a handle near a full device (cuDNN reports some of those as an internal error).
ALLOCATION_FAILURE_MARKERS = ("out of memory", "can't allocate memory", "CUDNN_STATUS_ALLOC_FAILED",
                              "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_INTERNAL_ERROR")
_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                               getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, sample key): stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def latent_padding_mask(masks: torch.Tensor, latent_length: int, ratio: int) -> torch.Tensor:
    """[B, N] sample-rate masks -> [B, T] int masks at latent resolution: frame t is real when its first
    sample, t * ratio, is. Where T = N / ratio this is the seed's nearest resampling; a model that pads on
    to whole chunks (SAME returns 34 frames for a window of 33) gets its extra frames marked padding."""
    n = masks.shape[-1]
    starts = torch.arange(latent_length, device=masks.device) * ratio
    real = masks[:, starts.clamp(max=n - 1)].bool() & (starts < n)
    return real.to(torch.int32)


OOM_SPLIT_NOTE = "out of device memory even for this one window; lower --sample-size or use a larger device"


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failure: the batch may fit in smaller pieces."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(marker in text for marker in ALLOCATION_FAILURE_MARKERS)


def probe_window(channels: int, samples: int, sample_rate: int = 44100) -> torch.Tensor:
    """[1, C, N] of music-like audio (a few partials over soft noise, about -12 dBFS), the same every time."""
    t = torch.arange(samples, dtype=torch.float64) / sample_rate
    tone = sum(math.pow(0.6, k) * torch.sin(2 * math.pi * 220.0 * (k + 1) * t + k) for k in range(6))
    noise = torch.randn(channels, samples, generator=torch.Generator().manual_seed(1234))
    return (0.12 * tone.float() + 0.03 * noise)[None]


def output_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """How far `output` is from `reference` [B, C, T]: the norm of the difference over the norm of the
    reference's variation in time (its per-channel mean removed; the plain norm for a single frame); inf
    when `output` has a non-finite value."""
    if not bool(torch.isfinite(output).all()):
        return math.inf
    spread = reference - reference.mean(dim=-1, keepdim=True) if reference.shape[-1] > 1 else reference
    return float((output - reference).norm() / spread.norm().clamp_min(1e-20))


class PrecisionMismatch(ConfigError):
    """The requested precision disagrees with fp32 on this device beyond what rounding explains."""

    def __init__(self, check: dict, advice: str):
        self.check = check
        error = check["relative_error"]
        measured = "non-finite output" if not math.isfinite(error) else f"relative error {error:.3g}"
        super().__init__(
            f"--precision {check['precision']} disagrees with fp32 on {check['device']}: {measured} on a probe "
            f"window of {check['window_samples']} samples (limit {check['limit']:g}; float rounding stays far "
            f"below it), so its latents would be wrong. Nothing was written. {advice}")


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
    slot: Optional[PinnedSlot] = field(default=None, repr=False)  # the pinned buffer `audio` lives in


class BatchEncoder:
    """Owns the model copies on the device; `submit` queues a batch, `collect` returns its latents.

    On CUDA, `submit` returns as soon as the work is queued: the batch is copied from a pinned
    buffer of `staging` without blocking, and the latents and per-window finiteness flags are
    copied back into pinned host buffers behind a blocking event. `collect` (the writer thread)
    sleeps on that event only, then gives the batch's pinned buffer back. The main loop thus never
    waits for the device. `encode` does both, for callers that want the result now.

    `autotune` lets cuDNN benchmark the convolutions of each new input shape (worth it where shapes
    repeat: fixed windows; with a length per batch every shape would be benchmarked anew).
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, precision: str = "fp32",
                 latent_mode: str = "sample", is_discrete: bool = False, seed: int = 0, compile: bool = False,
                 channels_last: bool = False, autotune: bool = True):
        self.device = device
        self.precision = precision
        self.latent_mode = latent_mode
        self.is_discrete = is_discrete
        self.seed = seed
        self.model = model.to(device).eval()
        self.autotune = autotune and device.type == "cuda"
        if device.type == "cuda":
            if device.index is not None:
                torch.cuda.set_device(device)  # events, pinned buffers and streams of this rank's GPU
            torch.backends.cudnn.benchmark = self.autotune
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
        self.rerun_limit: int | None = None   # windows per fp32 re-run pass (set by the batch-size probe)
        self._fit_samples: int | None = None  # after running out of memory: the most samples a part may hold
        self._last_length = 0
        self.staging = PinnedRing() if device.type == "cuda" else None

    def _networks(self, compile: bool) -> dict:
        """The encoder network each model copy runs, by the copy's id: torch.compile'd or eager."""
        return {key: (torch.compile(net, dynamic=False) if compile else net) for key, net in self._eager.items()}

    def use_compile(self, compile: bool) -> None:
        """Switch torch.compile on or off (before the first batch: the runner decides it once the plan is known)."""
        self.compiled = compile
        self._encoders = self._networks(compile)

    @property
    def bottleneck(self):
        return self.model.bottleneck

    @property
    def split_limit(self) -> int | None:
        """None until a batch ran out of memory; then the most windows (of the last length seen) one
        forward pass may take: batches are cut to it up front instead of running out of memory again."""
        if self._fit_samples is None:
            return None
        return max(1, self._fit_samples // max(1, self._last_length))

    # ------------------------------------------------------------------ the precision check
    @torch.inference_mode()
    def check_precision(self, window_samples: int, limit: float = PRECISION_CHECK_LIMIT) -> dict:
        """Encode one probe window in the run's precision and in fp32 on this device and compare the
        encoder outputs; {} in fp32. Raises PrecisionMismatch when they disagree beyond `limit`."""
        if self.low_model is None:
            return {}
        ratio = max(1, int(getattr(self.model, "downsampling_ratio", 1)))
        longest = math.ceil(PRECISION_PROBE_SECONDS * self.model.sample_rate / ratio) * ratio
        samples = max(ratio, min(int(window_samples), longest))
        audio = probe_window(self.model.in_channels, samples, self.model.sample_rate).to(self.device)
        reference = self._eager[id(self.model)](audio).float()
        low = self._eager[id(self.low_model)](audio.to(self.dtype)).float()
        error = output_error(low, reference)
        check = {"precision": self.precision, "reference": "fp32", "device": str(self.device),
                 "relative_error": error if math.isfinite(error) else None, "limit": limit,
                 "window_samples": samples, "ok": error <= limit}
        if not check["ok"]:
            raise PrecisionMismatch({**check, "relative_error": error}, self._precision_advice(error))
        return check

    def _precision_advice(self, error: float) -> str:
        advice = "Use --precision fp32"
        if self.precision == "fp16" and not math.isfinite(error):
            return advice + " or bf16: this model overflows float16 (values past 65504)."
        if self.device.type == "cpu" and self.precision == "bf16" and "amx_bf16" in cpu_flags():
            advice += (". This CPU has AMX (amx_bf16), whose oneDNN bf16 convolution kernels in this torch "
                       "compute some shapes wrong: to keep bf16, rerun with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 "
                       "in the environment (oneDNN then stays off AMX)")
        return advice + "."

    # ------------------------------------------------------------------ forward passes
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
                 eager: bool = False) -> _Part:
        """Queue one forward pass and the copies of its results to the host."""
        x = audio.to(self.device, non_blocking=True).to(next(model.parameters()).dtype)
        network = self._eager[id(model)] if eager else self._encoders[id(model)]
        try:
            pre = network(x).float()
        except Exception as exc:
            if eager or not self.compiled or is_out_of_memory(exc):
                raise
            # torch.compile could not build the graph here (no C++ compiler, no triton...): go on eagerly
            self._encoders = self._networks(compile=False)
            self.compiled, self.compile_error = False, f"{type(exc).__name__}: {str(exc)[:300]}"
            pre = self._eager[id(model)](x).float()
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
            part.event = torch.cuda.Event(blocking=True)  # a waiting thread sleeps instead of spinning a core
            part.event.record(torch.cuda.current_stream(self.device))
        else:
            part.latents, part.finite = out, finite
        return part

    def _part_size(self, length: int, limit: int | None) -> int | None:
        """The most windows of `length` samples one forward pass may take now (None: no limit)."""
        sizes = [limit] if limit is not None else []
        with self._lock:
            self._last_length = length
            if self._fit_samples is not None:
                sizes.append(max(1, self._fit_samples // max(1, length)))
        return min(sizes) if sizes else None

    def _remember_fit(self, windows: int, length: int) -> None:
        """`windows` ran out of memory: from now on a part holds at most half as many samples."""
        with self._lock:
            fit = (windows // 2) * length
            self._fit_samples = fit if self._fit_samples is None else min(self._fit_samples, fit)

    def _forward_split(self, model: torch.nn.Module, audio: torch.Tensor, keys: list[str], start: int,
                       eager: bool = False, limit: int | None = None) -> tuple[list[_Part], int]:
        """Forward passes over the batch in parts of at most the size known to fit, halving a part
        that runs out of memory down to one window. Returns the parts and the halvings."""
        size = self._part_size(audio.shape[-1], limit)
        if size is not None and len(keys) > size:
            parts, splits = [], 0
            for i in range(0, len(keys), size):
                more, n = self._forward_split(model, audio[i:i + size], keys[i:i + size], start + i, eager, limit)
                parts += more
                splits += n
            return parts, splits
        try:
            return [self._forward(model, audio, keys, start, eager)], 0
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()  # the failed pass's blocks go back before the retry
        self._remember_fit(len(keys), audio.shape[-1])
        if len(keys) == 1:  # a window that does not fit alone is an error, not a split
            return [_Part(start, start + 1, error=f"{OOM_SPLIT_NOTE} ({reason})")], 0
        with self._lock:
            self.splits += 1
        half = len(keys) // 2
        first, n1 = self._forward_split(model, audio[:half], keys[:half], start, eager, limit)
        second, n2 = self._forward_split(model, audio[half:], keys[half:], start + half, eager, limit)
        return first + second, 1 + n1 + n2

    # ------------------------------------------------------------------ submit / collect
    def pinned_batch(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                     timeout: Optional[float] = None) -> Optional[PinnedSlot]:
        """A pinned buffer to collate the next batch into (CUDA only), waiting up to `timeout` seconds
        while every buffer is in flight (None: still none free). Pass it to `submit` as `slot`."""
        if self.staging is None:
            raise RuntimeError("pinned staging buffers are for a CUDA device")
        return self.staging.acquire(shape, dtype, timeout=timeout)

    @torch.inference_mode()
    def submit(self, audio: torch.Tensor, padding_masks: torch.Tensor, keys: list[str],
               slot: Optional[PinnedSlot] = None) -> PendingBatch:
        """Queue a CPU batch [B, C, N] on the device; returns at once on CUDA. `slot`: the pinned buffer
        `audio` lives in (from `pinned_batch`), given back when the batch is collected."""
        count = len(keys)
        if self.pad_to is not None and count < self.pad_to:  # the short last batch reuses the compiled graph
            extra = self.pad_to - count
            audio = torch.cat([audio, audio.new_zeros(extra, *audio.shape[1:])])
            padding_masks = torch.cat([padding_masks, padding_masks.new_zeros(extra, *padding_masks.shape[1:])])
            keys = keys + [f"padding/{i}" for i in range(extra)]
        try:
            parts, splits = self._forward_split(self.low_model or self.model, audio, keys, 0)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        # in fp32 nothing is re-run: let the batch go (a queue of pending batches of long windows is large);
        # a pinned batch stays reserved (its slot) until the batch is collected
        keep = audio if self.low_model is not None else None
        return PendingBatch(audio=keep, padding_masks=padding_masks, keys=keys, parts=parts, splits=splits,
                            count=count, slot=slot)

    @torch.inference_mode()
    def collect(self, pending: PendingBatch) -> EncodedBatch:
        """Wait for a submitted batch and finish it: low-precision windows with a non-finite latent are
        re-run in fp32; a window still non-finite, or that never fit in memory, gets an error."""
        try:
            return self._finish(pending)
        finally:
            if pending.slot is not None:
                pending.slot.release()
                pending.slot = None

    def _finish(self, pending: PendingBatch) -> EncodedBatch:
        for part in pending.parts:
            if part.event is not None:
                part.event.synchronize()
        errors: list[str | None] = [None] * len(pending.keys)
        done = [p for p in pending.parts if p.error is None]
        latents = None
        if done:
            latents = torch.zeros((len(pending.keys), *done[0].latents.shape[1:]), dtype=done[0].latents.dtype)
        rerun: list[int] = []
        for part in pending.parts:
            if part.error is not None:
                errors[part.start] = part.error
                continue
            latents[part.start:part.stop] = part.latents
            for i, ok in enumerate(part.finite.tolist()):
                if not ok:
                    if part.low_precision:
                        rerun.append(part.start + i)
                    else:
                        errors[part.start + i] = "encoder produced non-finite latents"
        splits = pending.splits
        if rerun:
            splits += self._rerun_in_fp32(pending, rerun, latents, errors)
        length = latents.shape[-1] if latents is not None else 1
        n = pending.count or len(pending.keys)
        masks = latent_padding_mask(pending.padding_masks[:n], length, self.model.downsampling_ratio)
        return EncodedBatch(latents=latents[:n] if latents is not None else None, padding_masks=masks,
                            errors=errors[:n], fp32_retry=bool(rerun), splits=splits)

    def _rerun_in_fp32(self, pending: PendingBatch, windows: list[int], latents: torch.Tensor,
                       errors: list[str | None]) -> int:
        """Re-run these windows of a low-precision batch through the eager fp32 network (no second
        compiled graph in the writer thread) and put their latents in place. Returns the halvings."""
        index = torch.tensor(windows)
        parts, splits = self._forward_split(self.model, pending.audio[index], [pending.keys[i] for i in windows], 0,
                                            eager=True, limit=self.rerun_limit)
        for part in parts:
            if part.event is not None:
                part.event.synchronize()
        for part in parts:
            if part.error is not None:
                errors[windows[part.start]] = part.error
                continue
            latents[index[part.start:part.stop]] = part.latents
            for i, ok in enumerate(part.finite.tolist()):
                if not ok:
                    errors[windows[part.start + i]] = "encoder produced non-finite latents (also in fp32)"
        with self._lock:
            self.retries += 1
        return splits

    def encode(self, audio: torch.Tensor, padding_masks: torch.Tensor, keys: list[str]) -> EncodedBatch:
        return self.collect(self.submit(audio, padding_masks, keys))

    # ------------------------------------------------------------------ batch size
    def _cuda_peak(self, model: torch.nn.Module, size: int, sample_size: int) -> int | None:
        """Peak device bytes of an eager forward pass of `size` windows, measured on a second pass (the
        first autotunes the shape, with workspaces the run does not keep); None: out of memory."""
        audio = torch.zeros(size, self.model.in_channels, sample_size)
        keys = [f"probe{i}" for i in range(size)]
        try:
            self._forward(model, audio, keys, 0, eager=True).event.synchronize()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._forward(model, audio, keys, 0, eager=True).event.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device) - base)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return None
        finally:
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def probe_batch_size(self, sample_size: int, *, cap: int, host_memory: int, headroom: float = 0.2,
                         windows: Optional[int] = None, budget: float = CPU_PROBE_SECONDS) -> tuple[int, dict]:
        """The batch size for `--batch-size auto` (a power of two <= cap), and how it was found.

        On CUDA: the largest that fits with `headroom` to spare. Eager forward passes of growing batches
        (one compiled graph per probe would cost minutes), each measured on its second pass, stopping at the
        first that runs out of memory or whose peak leaves less than `headroom` of the device free. A
        low-precision run also keeps room for the writer thread's fp32 re-run of one window at a time
        (`rerun_limit`), which can run while the next batch does.

        On the CPU: the fastest. The memory bound comes first: one window's largest activation, measured by
        forward hooks, against the memory the process may still use (`host_memory`). Then batches of 1, 2,
        4, ... up to that bound (and to `windows`, the most windows the run has, when known) are timed on a
        probe window (`cpu_batch_timings`), and `fastest_batch_size` keeps the smallest within
        CPU_BATCH_TOLERANCE of the fastest time per window.
        """
        model = self.low_model or self.model
        channels = self.model.in_channels
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget_bytes = free * (1 - headroom)
            rerun_peak = 0
            if self.low_model is not None:
                rerun_peak = self._cuda_peak(self.model, 1, sample_size) or 0
                self.rerun_limit = 1
            chosen, tried = 0, []
            size = 1
            while size <= cap:
                peak = self._cuda_peak(model, size, sample_size)
                tried.append({"batch_size": size, "peak_bytes": peak})
                if peak is None or peak + rerun_peak > budget_bytes:
                    break
                chosen = size
                size *= 2
            return max(1, chosen), {"device_free_bytes": int(free), "device_total_bytes": int(total),
                                    "headroom": headroom, "fp32_rerun_peak_bytes": int(rerun_peak),
                                    "probes": tried}
        largest = [0]

        def measure(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())
        network = self._eager[id(model)]
        hooks = [m.register_forward_hook(measure) for m in network.modules()]
        audio = probe_window(channels, sample_size, self.model.sample_rate)
        try:   # also the timing's warm-up: the first pass builds the kernels
            self._forward(model, audio, ["probe"], 0, eager=True)
        finally:
            for hook in hooks:
                hook.remove()
        per_window = 4 * largest[0]  # input, output and temporaries of the widest layer
        host_budget = host_memory * (1 - headroom) / 2  # half of it: decode workers and queues need the rest
        bound = 1
        while bound * 2 <= cap and bound * 2 * per_window <= host_budget:
            bound *= 2
        limit = bound if windows is None else max(1, min(bound, windows))
        timings, stopped, spent = self.cpu_batch_timings(model, audio, limit, budget)
        chosen = fastest_batch_size(timings)
        return chosen, {"host_memory_bytes": int(host_memory), "headroom": headroom,
                        "bytes_per_window_estimate": int(per_window), "memory_bound": bound,
                        "windows_bound": windows, "chosen_by": "speed",
                        "timings": [{"batch_size": size, "seconds_per_window": seconds}
                                    for size, seconds in sorted(timings.items())],
                        "tolerance": CPU_BATCH_TOLERANCE, "timing_stopped": stopped,
                        "timing_seconds": round(spent, 4)}

    def cpu_batch_timings(self, model: torch.nn.Module, audio: torch.Tensor, limit: int, budget: float
                          ) -> tuple[dict[int, float], str, float]:
        """Seconds per window of eager forward passes of 1, 2, 4, ... (<= limit) copies of `audio` [1, C, N],
        growing while they get faster and while the next would keep the timing under `budget` seconds
        (its cost guessed from the fastest time per window so far). Returns (timings, why it stopped, seconds
        spent)."""
        timings: dict[int, float] = {}
        spent, size = 0.0, 1
        while True:
            batch = audio.expand(size, -1, -1).contiguous()
            started = time.perf_counter()
            self._forward(model, batch, [f"probe{i}" for i in range(size)], 0, eager=True)
            elapsed = time.perf_counter() - started
            spent += elapsed
            timings[size] = elapsed / size
            best = min(timings.values())
            if timings[size] > best * (1 + CPU_BATCH_TOLERANCE):
                return timings, "slower", spent
            if size * 2 > limit:
                return timings, "bound", spent
            if spent + best * size * 2 > budget:
                return timings, "budget", spent
            size *= 2


def fastest_batch_size(timings: dict[int, float], tolerance: float = CPU_BATCH_TOLERANCE) -> int:
    """The smallest batch size whose time per window is within `tolerance` of the fastest of `timings`
    ({batch size: seconds per window}): a larger batch that is no faster only holds more memory, and
    leaves the decode workers less to overlap."""
    best = min(timings.values())
    return min(size for size, seconds in timings.items() if seconds <= best * (1 + tolerance))


def bound_compile_workers(workers: int) -> None:
    """Inductor starts up to 32 compile worker processes per rank by default (8 ranks: 256 processes
    competing with the decode workers); give each rank at most its own CPUs."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # no inductor in this build: nothing to bound
        return
    current = inductor_config.compile_threads or workers
    inductor_config.compile_threads = max(1, min(int(current), workers))


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every token of a codebook of this size."""
    if codebook_size <= 1 << 8:
        return torch.uint8
    if codebook_size <= 1 << 15:
        return torch.int16
    return torch.int32
