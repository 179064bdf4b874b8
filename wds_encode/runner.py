"""One rank of the job: prepare (rank 0), claim units, encode, write, commit, merge stats.

Every rank checks its inputs (`plan`), joins the job (`distributed.Job`), loads the model and checks its
precision (a low precision that gives wrong latents stops the run before anything is written), and
waits for rank 0's plan: the units still to do, in claim order. DataLoader workers claim those units one by one and decode
them in parallel; this process batches windows, encodes them, and hands the latents to a writer
thread through a bounded queue, so the device never waits on disk. A unit's `ShardEnd` travels
through the same queue after the unit's last batch, so the writer commits a unit only once all of
its windows are written. At the end rank 0 merges every rank's stats (through the job's store) into
one summary.
"""

from __future__ import annotations

import io
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import ConfigError, EncodeConfig
from .job.distributed import Job, JobAborted, Launch, UnitClaims, check_topology, rank_device
from .pipeline.encoder import BatchEncoder, PendingBatch, bound_compile_workers, token_dtype
from .pipeline.manifest import SILENCE, RankLog, RunManifest, versions
from .pipeline.records import unit_record
from .models import load_autoencoder
from .models.layout import swappable_convs
from .job.heap import give_back_freed_memory, keep_freed_memory
from .plan import RunInputs, adopt_kept_listing, plan_inputs, prepare_output, units_fingerprint
from .job.parts import PARTS_DIR, Lease, LeaseLost, NoConditionalWrites
from .job.preemption import (GracefulStop, decode_worker_init, start_decode_workers, stop_signals_ignored,
                             stop_workers)
from .job.resources import CpuPlan, available_memory, plan_cpus, slurm_cpus_per_task
from .job.progress import ProgressCounter, ProgressDisplay, ProgressMonitor, ProgressTotals
from .pipeline.batching import LengthBatcher
from .pipeline.reader import Reader, ShardEnd, WindowItem, error_record
from .pipeline.resampling import device_batch
from .pipeline.sources import Shard
from .storage import Place, StorageError, redact
from .pipeline.writers import FolderWriter, LatentShardWriter, new_writer_id, npy_bytes

WRITE_QUEUE_DEPTH = 8
TRIM_EVERY_BATCHES = 8   # --chunking full on a CPU: batches between heap trims (measured: RSS flat, no slowdown)
COMPILE_MIN_INPUT_BYTES = 1 << 30   # --compile's default on CUDA: a job this large pays back the warm-up
AUTO_BATCH_CAP = 256
PREFETCH_BYTES = 1 << 30   # windows decode workers keep ready, per rank in all (on top of the batch being built)
SHM_PATH = "/dev/shm"
SILENCE_KEY = "silence"  # seeds the VAE noise of silence.npy (window keys are "dataset/unit/key": no clash)


@dataclass
class RunStats:
    units_total: int = 0
    units_skipped: int = 0        # already done in an earlier run
    units_done: int = 0
    units_failed: int = 0         # could not be read to the end (still committed with what was read)
    units_refused: int = 0        # encoded, but another attempt had committed them first (its outputs stand)
    samples: int = 0
    windows: int = 0
    rejected: int = 0
    filtered: int = 0             # files skipped by --min-duration, --max-duration or --skip-silent
    errors: int = 0
    warnings: int = 0
    audio_seconds: float = 0.0
    batches: int = 0
    batched_windows: int = 0      # windows (--overlap: chunks) that went to the encoder in those batches
    fp32_retries: int = 0
    oom_splits: int = 0           # batches halved after running out of device memory
    retries: int = 0              # storage requests repeated (S3 503 SlowDown, 5xx, dropped connections)
    resumes: int = 0              # broken S3 read streams continued where they broke
    elapsed_seconds: float = 0.0
    loop_seconds: float = 0.0     # from the first window to the last commit
    warmup_seconds: float = 0.0   # from the first window until the first batch was written (compile, autotune)
    steady_seconds: float = 0.0   # from the first batch written to the last: the steady state
    steady_audio_seconds: float = 0.0  # audio of the windows written in the steady state
    batch_size: int = 0           # the batch size used (chosen by the probe with --batch-size auto)
    real_samples: int = 0         # audio samples encoded (at the model rate)...
    padding_samples: int = 0      # ...and zeros encoded with them (windows padded to their size)
    batch_probe: dict = field(default_factory=dict)
    compiled: bool = False        # the encoder ran through torch.compile
    autotune: bool = False        # cuDNN benchmarked the convolutions of each new shape (fixed windows on CUDA)
    precision_check: dict = field(default_factory=dict)  # a low-precision run's agreement with fp32 at start
    channels_last: bool = False   # the encoder's convolutions ran in the channels-last layout
    cpus: str = ""                # the CPUs this rank could use, and how it split them (resources.plan_cpus)
    chunking: str = ""            # crop | random_crop | split | full: how files became windows
    resample_on: str = ""         # workers | device: where windows at another rate were resampled
    stopped_early: bool = False
    stopped_by: str = ""          # the signal that stopped the job's claiming (it committed what was in flight)
    units_per_rank: list[int] = field(default_factory=list)  # merged stats: units each rank encoded

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def units_encoded(self) -> int:
        """Units this run committed whole: `units_done` less the broken ones (committed with what was read)."""
        return self.units_done - self.units_failed

    @property
    def units_left(self) -> int:
        """Units neither done before, nor committed by this run or by another attempt (a stop, --limit-batches)."""
        return max(0, self.units_total - self.units_skipped - self.units_done - self.units_refused)

    @property
    def windows_per_batch(self) -> float:
        """How full the batches were on average (--chunking full: only windows of one length share a batch)."""
        return self.batched_windows / self.batches if self.batches else 0.0

    def as_dict(self) -> dict:
        data = dict(self.__dict__)
        data["audio_hours"] = self.audio_seconds / 3600
        data["realtime_factor"] = self.realtime_factor
        data["padding_overhead"] = self.padding_overhead
        data["units_encoded"] = self.units_encoded
        data["units_left"] = self.units_left
        data["windows_per_batch"] = self.windows_per_batch
        return data

    @property
    def padding_overhead(self) -> float:
        """Zeros encoded per real sample (0.25: a quarter more samples went through the encoder)."""
        return self.padding_samples / self.real_samples if self.real_samples else 0.0


@dataclass
class _Pending:
    """What the writer keeps per open unit until its ShardEnd arrives."""

    folder_files: list[str] = field(default_factory=list)
    shard_writer: Optional[LatentShardWriter] = None
    written: int = 0
    errors: list[dict] = field(default_factory=list)
    stitching: dict[str, "_Stitching"] = field(default_factory=dict)  # --overlap: files with chunks to come


@dataclass
class _Stitching:
    """One file's latent sequence (--overlap) while its chunks come in."""

    latents: Optional[np.ndarray] = None  # [C, frames] (tokens [Q, frames]); None before a chunk came, after a failure
    received: int = 0                     # chunks placed (or failed) so far
    error: Optional[str] = None           # the first chunk failure: the file is an error record


class _WriterThread(threading.Thread):
    """Writes batches and commits units, in queue order. A failure stops the run (disk full...).

    With --overlap the chunks of a long file may come in several batches: their latents are joined
    (`_stitch`) and the file is written as one window when its last chunk comes, before its unit's end."""

    def __init__(self, config: EncodeConfig, log: RankLog, folder: FolderWriter, encoder: BatchEncoder,
                 output_dtype: torch.dtype, latent_metadata: dict, on_unit_done,
                 abandoned: Optional[threading.Event] = None):
        super().__init__(name="wds-encode-writer", daemon=True)
        self.config = config
        self.encoder = encoder
        self.sample_rate = encoder.model.sample_rate
        self.progress: list[tuple[float, float]] = []  # (time, audio seconds written so far) per batch
        self.log = log
        self.folder = folder
        self.output_dtype = output_dtype
        self.latent_metadata = latent_metadata
        self.on_unit_done = on_unit_done
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self.pending: dict[str, _Pending] = {}
        self.error: Optional[BaseException] = None
        # set past the grace period, or by the main loop when it stops without finishing: nothing more is committed
        self.abandoned = abandoned if abandoned is not None else threading.Event()

    def run(self) -> None:
        try:
            if self.encoder.device.type == "cuda":
                torch.cuda.set_device(self.encoder.device)  # a thread starts on cuda:0: no second context there
            while True:
                job = self.queue.get()
                if job is None:
                    return
                if self.abandoned.is_set():
                    continue   # the loop failed or ran out of grace: nothing more is written or committed
                kind, payload = job
                if kind == "batch":
                    self._write_batch(*payload)
                else:
                    self._commit(payload)
        except BaseException as exc:  # surfaced by the main loop
            self.error = exc
            while True:  # keep draining so the producer never blocks forever
                if self.queue.get() is None:
                    return

    def _unit(self, shard_id: str) -> _Pending:
        pend = self.pending.get(shard_id)
        if pend is None:
            pend = self.pending[shard_id] = _Pending()
        return pend

    def _write_batch(self, batch_index: int, items: list[WindowItem], pending: PendingBatch) -> None:
        encoded = self.encoder.collect(pending)  # waits for the device here, not in the main loop
        self.log.fence()
        arrays = encoded.latents.to(self.output_dtype).numpy() if encoded.latents is not None else None
        masks = encoded.padding_masks.tolist()
        audio = 0.0
        for i, item in enumerate(items):
            pend = self._unit(item.shard_id)
            if item.stitch is not None:  # a chunk of a file written as one sequence (--overlap)
                whole = self._stitch(pend, item, arrays[i] if encoded.errors[i] is None else None, encoded.errors[i])
                if whole is not None:
                    audio += item.metadata["valid_length"] / self.sample_rate
                    self._write_window(pend, batch_index, i, item, whole, [1] * int(whole.shape[-1]))
                continue
            if encoded.errors[i] is not None:
                pend.errors.append(error_record(item.shard_id, item.metadata["path"], item.metadata["__key__"],
                                                encoded.errors[i]))
                continue
            audio += item.metadata["valid_length"] / self.sample_rate
            self._write_window(pend, batch_index, i, item, np.ascontiguousarray(arrays[i]), masks[i])
        self.progress.append((time.time(), (self.progress[-1][1] if self.progress else 0.0) + audio))

    def _write_window(self, pend: _Pending, batch_index: int, i: int, item: WindowItem, array: np.ndarray,
                      mask: list[int]) -> None:
        """Stage one output window (its latents `array` and `mask`) in both output forms."""
        md = dict(item.metadata)
        md["padding_mask"] = mask
        md["latent_shape"] = list(array.shape)
        md["latent_length"] = int(array.shape[-1])
        md["valid_latent_length"] = int(sum(mask))   # real frames; fewer where the model pads (SAME's chunks)
        md.update(self.latent_metadata)
        latent_id = self.folder.latent_id(batch_index, i)
        md["latent_id"] = latent_id
        pend.folder_files.extend(self.folder.stage(latent_id, array, md))
        if self.config.shards:
            if pend.shard_writer is None:
                dataset_id, name = item.shard_id.split("/", 1)
                pend.shard_writer = LatentShardWriter(
                    self.folder.place, dataset_id, name, writer=self.folder.writer,
                    maxcount=self.config.shard_maxcount, maxsize=self.config.shard_maxsize)
            pend.shard_writer.write(item.key, array, md)
        pend.written += 1

    def _stitch(self, pend: _Pending, item: WindowItem, latents: Optional[np.ndarray], error: Optional[str]
                ) -> Optional[np.ndarray]:
        """Put one chunk's latents (or its failure) in place in its file's sequence; the whole sequence once
        every chunk of the file has come (chunks of a file may come in any batches, in any order), else None.
        A chunk that failed (non-finite, out of memory) makes the whole file one error record."""
        st = item.stitch
        assert st is not None
        acc = pend.stitching.setdefault(item.key, _Stitching())
        acc.received += 1
        if acc.error is None:
            if error is None and latents.shape[-1] < st.src_start + st.length:
                error = (f"chunk {st.index} gave {latents.shape[-1]} latent frames, fewer than its "
                         f"{st.chunk_frames} (frames {st.src_start}..{st.src_start + st.length} are used)")
            if error is not None:
                acc.error, acc.latents = error, None
                pend.errors.append(error_record(item.shard_id, item.metadata["path"], item.metadata["__key__"],
                                                f"{error} (chunk {st.index + 1} of {st.count} of a file encoded "
                                                "in overlapping chunks: nothing is written for it)"))
            else:
                if acc.latents is None:
                    acc.latents = np.zeros((*latents.shape[:-1], st.frames), dtype=latents.dtype)
                acc.latents[..., st.dst_start:st.dst_start + st.length] = \
                    latents[..., st.src_start:st.src_start + st.length]
        if acc.received < st.count:
            return None
        del pend.stitching[item.key]
        return acc.latents  # None when a chunk failed

    def _commit(self, end: ShardEnd) -> None:
        """Make a unit's outputs visible, then commit it by creating its record. A crash before the record
        leaves objects no record lists; the next holder removes them (`RunManifest.prepare`). A commit
        refused (another attempt committed the unit first) removes this writer's outputs of the unit."""
        if self.abandoned.is_set():
            return   # past --grace-seconds: the unit stays open, and is discarded with the others
        self.log.fence()   # a writer whose lease is lost publishes nothing more
        pend = self.pending.pop(end.shard.shard_id, _Pending())
        # every chunk of the unit came before its end (LengthBatcher holds the end back): a file still in
        # `pend.stitching` stopped decoding part-way, which the reader reported; nothing of it is written
        written = [*pend.folder_files, *(pend.shard_writer.parts if pend.shard_writer is not None else ())]
        try:
            tars = pend.shard_writer.commit() if pend.shard_writer is not None else []
            self.folder.commit(pend.folder_files)
            record = unit_record(
                shard=end.shard.shard_id, url=end.shard.url, rank=self.folder.rank, part=self.log.part,
                worker=end.worker, samples=end.samples, windows=pend.written, rejected=end.rejected,
                filtered=end.filtered,
                audio_seconds=end.audio_seconds, input_bytes=end.shard.size, failed=end.failed, latent_shards=tars,
                folder_ids=[rel.rsplit("/", 1)[1][:-4] for rel in pend.folder_files if rel.endswith(".npy")],
                problems=end.errors + pend.errors)
            committed = self.log.commit(record)
        except BaseException:   # the record was not created (it is the last step): the unit is not committed
            if pend.shard_writer is not None:
                pend.shard_writer.discard()
            _delete_quietly(self.folder.place, written)   # this writer's own names: no one else's
            raise
        if not committed:
            self.folder.place.delete(written)
        self.log.index_if_due()
        self.on_unit_done(end, pend.written, record["errors"], record["warnings"], committed)

    def discard_open_units(self, quietly: bool = False) -> int:
        """Remove what units still open have written (a stop at --limit-batches, or a failure: then
        `quietly`, as the best effort it is; the next run removes whatever is left)."""
        for pend in self.pending.values():
            try:
                if pend.shard_writer is not None:
                    pend.shard_writer.discard()
                self.folder.discard(pend.folder_files)
            except Exception:
                if not quietly:
                    raise
        count = len(self.pending)
        self.pending.clear()
        return count


def latent_format(config: EncodeConfig, model) -> tuple[torch.dtype, dict]:
    """The dtype written and the fields every window's metadata gets about its latents."""
    metadata = {"downsampling_ratio": model.downsampling_ratio}
    if config.is_discrete:
        bottleneck = model.bottleneck
        metadata.update(latent_mode="tokens", codebook_size=int(bottleneck.codebook_size),
                        num_quantizers=int(bottleneck.num_quantizers))
        return token_dtype(bottleneck.codebook_size), metadata
    metadata["latent_mode"] = config.latent_mode
    if config.latent_mode == "params":
        metadata["params_layout"] = "mean,std"  # channels [0, C/2): mean; [C/2, C): std
    return (torch.float16 if config.latent_dtype == "float16" else torch.float32), metadata


def silence_samples(inputs: RunInputs, window_size: int) -> int:
    """Samples of silence that silence.npy encodes: --sample-size, as SA3's pre_encode_dataset.py; with
    --chunking full rounded up to the downsampling ratio and at most the run's longest window (the
    --max-seconds one), so it never takes more memory than the run's own windows."""
    size = inputs.config.sample_size
    if inputs.chunking == "full":
        ratio = inputs.downsampling_ratio
        size = min(-(-size // ratio) * ratio, window_size)
    return size


def write_silence(place: Place, encoder: BatchEncoder, samples: int, dtype: torch.dtype) -> Optional[str]:
    """OUT/silence.npy: the latents [1, C, T] of `samples` zeros, in the output's dtype, encoded as the run
    encodes its windows (the same encoder: precision, fp32 re-run, latent mode, VAE noise seeded by
    SILENCE_KEY), unless the output already holds one of that form (an earlier run of this output: the
    run identity is the same). Returns why it could not be encoded (non-finite, out of memory), or None."""
    expected = torch.empty((), dtype=dtype).numpy().dtype
    existing = place.read(SILENCE)
    if existing is not None:
        try:
            found = np.load(io.BytesIO(existing), allow_pickle=False)
            if found.ndim == 3 and found.shape[0] == 1 and found.dtype == expected:
                return None
        except ValueError:
            pass  # not a readable array: written again
    audio = torch.zeros(1, encoder.model.in_channels, samples)
    encoded = encoder.encode(audio, torch.ones(1, samples, dtype=torch.bool), [SILENCE_KEY])
    if encoded.errors[0] is not None:
        return encoded.errors[0]
    place.write(SILENCE, npy_bytes(np.ascontiguousarray(encoded.latents.to(dtype).numpy())))
    return None


def _collate(items: list[WindowItem], out: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack windows into a batch: into `out` (a pinned buffer for a CUDA device, so its copy does not
    block) or a new tensor."""
    first = items[0].audio
    audio = out if out is not None else torch.empty((len(items), *first.shape), dtype=first.dtype)
    torch.stack([it.audio for it in items], out=audio)
    real = torch.tensor([it.real_samples for it in items])
    masks = torch.arange(first.shape[-1]).unsqueeze(0) < real.unsqueeze(1)   # True on real audio
    keys = [it.noise_key for it in items]
    return audio, masks, keys


def merge_stats(per_rank: list[dict], *, units_total: int, units_skipped: int, elapsed: float) -> RunStats:
    """The job's stats from every rank's: counts add up, times are the longest rank's."""
    merged = RunStats(units_total=units_total, units_skipped=units_skipped, elapsed_seconds=elapsed)
    for stats in per_rank:
        for name in ("units_done", "units_failed", "units_refused", "samples", "windows", "rejected", "filtered",
                     "errors", "warnings",
                     "audio_seconds", "batches", "batched_windows", "fp32_retries", "oom_splits", "retries", "resumes",
                     "steady_audio_seconds", "real_samples", "padding_samples"):
            setattr(merged, name, getattr(merged, name) + stats[name])
        for name in ("loop_seconds", "warmup_seconds", "steady_seconds"):
            setattr(merged, name, max(getattr(merged, name), stats[name]))
        merged.stopped_early = merged.stopped_early or stats["stopped_early"]
        merged.stopped_by = merged.stopped_by or stats["stopped_by"]
        merged.units_per_rank.append(stats["units_done"])
    if per_rank:  # how rank 0 ran (the others run the same way on the same kind of device)
        first = per_rank[0]
        for name in ("batch_size", "batch_probe", "compiled", "channels_last", "cpus", "autotune", "precision_check",
                     "chunking", "resample_on"):
            setattr(merged, name, first[name])
    return merged


def resample_in_workers(resample_on: str, device: torch.device) -> bool:
    """--resample-on: in the decode workers, or on the device after the copy; `auto`: the device on a GPU
    (the workers' cores go to decoding), the workers on a CPU, where they resample beside the encoder's
    threads instead of taking turns with them (measured: see README, Throughput)."""
    if resample_on == "auto":
        return device.type != "cuda"
    return resample_on == "workers"


def use_compile(config: EncodeConfig, device: torch.device, todo: list[Shard]) -> bool:
    """--compile / --no-compile, else on for a CUDA job large enough to pay back the compile warm-up."""
    if config.compile is not None:
        return config.compile
    if config.chunking == "full":
        return False  # one graph per window length: the compile warm-up would come back for every length
    return device.type == "cuda" and sum(u.size for u in todo) >= COMPILE_MIN_INPUT_BYTES


def use_autotune(chunking: str) -> bool:
    """cuDNN autotuning where shapes repeat: fixed windows give one batch shape (two with a short last
    batch), worth benchmarking once; with --chunking full nearly every batch has a new length, and each
    would be benchmarked anew (workspaces up to the free memory) for one use."""
    return chunking != "full"


def use_channels_last(option: Optional[bool], device: torch.device, encoder: Optional[torch.nn.Module] = None) -> bool:
    """--channels-last / --no-channels-last, else on for a CPU device (measured faster there; not on CUDA)
    when the encoder has convolutions the layout changes (a SAME transformer has none: only a copy)."""
    if option is not None:
        return option
    return device.type == "cpu" and (encoder is None or swappable_convs(encoder) > 0)


def resolve_batch_size(config: EncodeConfig, encoder: BatchEncoder, window_size: int) -> tuple[int, dict]:
    """The batch size to use, and with `auto`, how the probe found it for windows of `window_size`
    samples, the longest of the run (recorded in details.json)."""
    if config.batch_size != "auto":
        return int(config.batch_size), {}
    size, probe = encoder.probe_batch_size(window_size, cap=AUTO_BATCH_CAP, host_memory=available_memory())
    return size, {"requested": "auto", "chosen": size, **probe}


def run(config: EncodeConfig, launch: Optional[Launch] = None) -> RunStats:
    """Run this process's rank of the job (alone: the whole job); returns the job's merged stats on
    rank 0, which speaks for the job, and this rank's own on the others."""
    started = time.time()
    launch = launch or Launch()
    check_topology(launch, config)
    inputs = plan_inputs(config)
    device = rank_device(config.device, launch)
    job = Job(launch, device, peer_timeout=config.peer_timeout)  # checks that no two ranks share a GPU
    try:
        # this rank's CPUs: srun's task share, else split among the ranks on this host that share its cores
        cpus = plan_cpus(max_workers=config.num_workers, device_type=device.type, ranks_sharing=job.cpu_sharers,
                         slurm_cpus_per_task=slurm_cpus_per_task(os.environ), cpus=config.cpus)
        torch.set_num_threads(cpus.torch_threads)
        if device.type == "cpu":
            keep_freed_memory()  # a CPU forward pass would otherwise fault in every layer's output afresh
        return _run_rank(inputs, job, device, cpus, started)
    except BaseException as exc:
        cause = job.failure_behind(exc)
        if cause is not None:
            raise JobAborted(cause) from exc
        job.abort(f"rank {launch.rank} failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        job.close()


def _run_rank(inputs: RunInputs, job: Job, device: torch.device, cpus: CpuPlan, started: float) -> RunStats:
    config = inputs.config
    place = inputs.output_place()
    manifest = RunManifest(place)
    model = load_autoencoder(inputs.model_config, inputs.ckpt_path, key_prefix=config.ckpt_prefix,
                             allow_unsafe_pickle=config.allow_unsafe_pickle)
    if config.is_discrete and not getattr(model.bottleneck, "is_discrete", False):
        raise ConfigError(f"--is-discrete: the model's bottleneck ({type(model.bottleneck).__name__}) "
                          "is continuous and has no tokens; drop --is-discrete")
    window_size = inputs.window_options(model.sample_rate, model.in_channels).sample_size
    encoder = BatchEncoder(model, device=device, precision=config.effective_precision,
                           latent_mode=config.latent_mode, is_discrete=config.is_discrete, seed=config.seed,
                           channels_last=use_channels_last(config.channels_last, device, model.encoder),
                           autotune=use_autotune(inputs.chunking))
    # before the output is touched: a low-precision path that gives wrong latents stops the run here (exit 2)
    precision_check = encoder.check_precision(window_size, limit=config.precision_check_limit)
    lease = None
    try:
        if job.rank == 0:  # no other attempt of this part (or job) works beside this one
            lease = Lease(place, inputs.part, lease_seconds=config.lease_seconds, on_lost=job.abort)
            try:
                lease.acquire(on_wait=job.raise_if_failed)
            except NoConditionalWrites as exc:
                lease = None
                raise ConfigError(str(exc)) from None
        try:
            return _run_part(inputs, job, device, cpus, started, manifest, encoder, window_size, precision_check,
                             lease)
        except (LeaseLost, ConfigError):
            raise
        except Exception as exc:   # e.g. an upload the new holder's clean-up aborted: say what happened first
            taken_over = lease.taken_over() if lease is not None else None
            if taken_over is not None:
                raise LeaseLost(taken_over) from exc
            raise
    finally:
        if lease is not None:
            lease.release()


def _run_part(inputs: RunInputs, job: Job, device: torch.device, cpus: CpuPlan, started: float,
              manifest: RunManifest, encoder: BatchEncoder, window_size: int, precision_check: dict,
              lease: Optional[Lease]) -> RunStats:
    """Rank 0 plans (the output's state, what is left of this part), every rank encodes its claims,
    rank 0 sums up (errors.jsonl, filelist.txt, one index of every record, details.json)."""
    config, place, model, part = inputs.config, manifest.place, encoder.model, inputs.part
    if job.rank == 0:
        identity, todo_order, state, part_total = prepare_output(
            inputs, manifest, lease.marker_fields() if lease is not None else None)
    details: dict = {}
    if job.rank == 0:
        details = {
            "model_config": inputs.model_config,
            "dataset_config": inputs.dataset_config.model_dump(mode="json"),
            "sample_size": config.sample_size,
            "args": config.as_args(),
            "run_identity": identity,
            "versions": versions(),
            "model": {"sample_rate": model.sample_rate, "audio_channels": model.in_channels,
                      "latent_dim": model.latent_dim, "downsampling_ratio": model.downsampling_ratio},
            "launch": {"launcher": job.launch.launcher, "world_size": job.world_size,
                       "num_nodes": job.launch.num_nodes, "device": device.type},
            "started_at": started,
            "parts": part.count,
            "plan": {"units_total": len(inputs.units), "units_todo": len(todo_order),
                     "input_bytes": sum(u.size for u in inputs.units), "listing": inputs.listing,
                     "interrupted_ranks_cleaned": state.interrupted_ranks, "objects_removed": state.removed},
        }
        if part.whole or (manifest.load_details() or {}).get("parts") != part.count:
            manifest.write_details(details)   # the parts share one details.json: the first writes it
        if not part.whole:
            write_part_details(place, part, {"part": part.label, "source": inputs.part_source, "units": part_total,
                                             "units_todo": len(todo_order), "started_at": started,
                                             "host": socket.gethostname(), "pid": os.getpid()})
        job.publish("plan", {"units": units_fingerprint(inputs.units), "todo": todo_order,
                             "total": part_total, "skipped": part_total - len(todo_order),
                             "lease": lease.marker_fields() if lease is not None else {}})
    plan = job.wait_for("plan")
    if plan["units"] != units_fingerprint(inputs.units):
        adopt_kept_listing(inputs)   # rank 0 deals from the listing another part kept first
    if plan["units"] != units_fingerprint(inputs.units):
        raise ConfigError(f"rank {job.rank} ({socket.gethostname()}) lists different input units than rank 0 "
                          f"({len(inputs.units)} units here): the input changed while the job started, or the "
                          "nodes do not see the same files")
    todo = [inputs.units[i] for i in plan["todo"]]
    out_rank = part.output_rank(job.rank)   # the id this rank writes under: its folder, batch ids, records
    writer_id = new_writer_id(out_rank, int(plan["lease"].get("generation", 0)))  # in every name it writes
    if use_compile(config, device, todo):
        bound_compile_workers(max(1, int(cpus.cpus)))
        encoder.use_compile(True)
    stats = RunStats(units_total=plan["total"], units_skipped=plan["skipped"], compiled=encoder.compiled,
                     channels_last=encoder.channels_last, cpus=cpus.describe(), autotune=encoder.autotune,
                     precision_check=precision_check, chunking=inputs.chunking)
    stats.batch_size, stats.batch_probe = resolve_batch_size(config, encoder, window_size)
    if encoder.compiled:
        encoder.pad_to = stats.batch_size  # one graph for every batch, the short last one included
    if job.rank == 0:  # once per output, encoded as the windows are; a rerun keeps the one it finds
        problem = write_silence(place, encoder, silence_samples(inputs, window_size),
                                latent_format(config, model)[0])
        if problem is not None:
            print(f"wds-encode: warning: {SILENCE} not written: {problem}", file=sys.stderr)
    monitor = None
    if job.rank == 0 and config.progress and todo:   # nothing to do: the summary says so, no 0-byte progress
        totals = ProgressTotals(bytes=sum(u.size for u in todo), units=stats.units_total,
                                units_before=stats.units_skipped)
        monitor = ProgressMonitor(ProgressDisplay(totals, interval=config.progress_interval), job.read_progress)
        monitor.start()
    finished = False
    try:
        abandoned = threading.Event()   # past the grace period: the writer commits nothing more
        with GracefulStop(job.request_stop, config.grace_seconds, on_deadline=abandoned.set):
            log = RankLog(manifest, writer_id, out_rank, part="" if part.whole else part.label,
                          lease=plan["lease"], check=lease.check if lease is not None else job.raise_if_failed)
            _encode_units(inputs, todo, encoder, stats, job, log, cpus.workers, abandoned)
            stats.stopped_by = job.stop_reason() or ""
        stats.elapsed_seconds = time.time() - started
        with stop_signals_ignored(bool(stats.stopped_by)):
            per_rank = job.finish({**asdict(stats), "rank": job.rank, "host": socket.gethostname(),
                                   "device": str(device)})
        finished = True
    finally:
        if monitor is not None:  # after every rank has finished, so the last line counts everyone
            monitor.stop(final=finished)
    merged = merge_stats(per_rank, units_total=plan["total"], units_skipped=plan["skipped"],
                         elapsed=time.time() - started)
    if job.rank == 0:  # every rank has finished: the records list exactly the committed units
        manifest.write_error_log()
        manifest.write_filelist()
        manifest.compact()
        finished_at = time.time()
        ranks = [{k: r[k] for k in ("rank", "host", "device", "units_done", "windows", "samples",
                                    "errors", "batches", "batch_size", "cpus", "loop_seconds", "warmup_seconds",
                                    "steady_seconds", "steady_audio_seconds")} for r in per_rank]
        if part.whole:
            manifest.write_details({**details, "finished_at": finished_at, "stats": merged.as_dict(), "ranks": ranks})
        else:
            write_part_details(place, part, {"part": part.label, "source": inputs.part_source, "units": plan["total"],
                                             "units_todo": len(todo), "started_at": started,
                                             "finished_at": finished_at, "host": socket.gethostname(),
                                             "pid": os.getpid(), "stats": merged.as_dict(), "ranks": ranks})
    return merged


def write_part_details(place: Place, part, details: dict) -> None:
    """manifest/parts/part-K-of-N.json: one array part's plan and, once it ends, its stats (details.json is the
    job's, shared by the parts)."""
    place.write(f"{PARTS_DIR}/part-{part.index}-of-{part.count}.json",
                json.dumps(redact(details), indent=1, default=str).encode("utf-8"))


def _encode_units(inputs: RunInputs, todo: list[Shard], encoder: BatchEncoder, stats: RunStats,
                  job: Job, log: RankLog, max_workers: int, abandoned: threading.Event) -> None:
    """The loop: claimed units -> loader -> batches -> encoder -> writer thread; fills `stats`.

    The loop never waits for the device: it submits a batch and goes on collating the next one;
    the writer thread collects each batch's latents when the device has them."""
    config = inputs.config
    model, device, batch_size = encoder.model, encoder.device, stats.batch_size
    resample_here = resample_in_workers(config.resample_on, device)
    stats.resample_on = "workers" if resample_here else "device"
    reader = Reader(todo, inputs.window_options(model.sample_rate, model.in_channels, resample_here),
                    UnitClaims(job.address, len(todo)), inputs.storage)
    num_workers = min(max_workers, len(todo))
    # in_order=False: a worker decoding a long file does not hold up windows the others have ready
    # (each worker's own items still arrive in order, so a unit's end marker follows its windows)
    # windows are collated into pinned memory by the main loop (`_collate`), not pinned one by one here
    window_bytes = model.in_channels * reader.options.sample_size * 4  # float32 windows
    prefetch = prefetch_windows(inputs.chunking, batch_size, window_bytes, num_workers,
                                shared_memory_free() // max(1, job.launch.local_world_size)) if num_workers else None
    loader = DataLoader(reader, batch_size=None, num_workers=num_workers, in_order=False, prefetch_factor=prefetch,
                        worker_init_fn=partial(decode_worker_init, parent_pid=os.getpid()) if num_workers else None)
    manifest = log.manifest
    folder = FolderWriter(manifest.place, log.rank, log.writer, enabled=config.folder)
    counter = ProgressCounter(job.add_progress)

    def on_unit_done(end: ShardEnd, written: int, errors: int, warnings: int, committed: bool) -> None:
        if not committed:
            stats.units_refused += 1
            counter.add(units=1, bytes=end.input_bytes)
            return
        stats.units_done += 1
        stats.units_failed += int(end.failed)
        stats.samples += end.samples
        stats.windows += written
        stats.rejected += end.rejected
        stats.filtered += end.filtered
        stats.audio_seconds += end.audio_seconds
        stats.errors += errors
        stats.warnings += warnings
        stats.retries += end.retries
        stats.resumes += end.resumes
        counter.add(units=1, bytes=end.input_bytes, samples=end.samples, errors=errors)

    writer = _WriterThread(config, log, folder, encoder, *latent_format(config, model), on_unit_done, abandoned)
    writer.start()

    def wait_on_writer(attempt):
        """attempt() until it gives something (each try waits up to a second for the writer thread:
        room in its queue, a pinned buffer it gave back); a failed writer or job stops the wait."""
        while True:
            if writer.error is not None:
                raise _writer_failure(writer.error)
            result = attempt()
            if result is not None:
                return result
            job.raise_if_failed()

    def try_put(job_item) -> Optional[bool]:
        try:
            writer.queue.put(job_item, timeout=1.0)
            return True
        except queue.Full:
            return None

    def put(job_item) -> None:
        wait_on_writer(lambda: try_put(job_item))

    def staging_slot(items: list[WindowItem]):
        """A pinned buffer for the next batch: waits while every one is in flight (the device has work)."""
        shape = (len(items), *items[0].audio.shape)
        return wait_on_writer(lambda: encoder.pinned_batch(shape, items[0].audio.dtype, timeout=1.0))

    batcher = LengthBatcher(batch_size, config.bucket_buffer)
    # windows of every length fragment the kept heap of a CPU run: give its free pages back now and then
    trim_heap = device.type == "cpu" and inputs.chunking == "full"
    batch_index = 0

    def send(released: list) -> None:
        """Batches to the device and on to the writer; unit ends to the writer after their batches."""
        nonlocal batch_index
        for part in released:
            if isinstance(part, ShardEnd):
                put(("end", part))
                continue
            if any(item.resampling is not None for item in part):   # windows at their source rate
                slot = None
                audio, masks, keys = device_batch(part, device, model.sample_rate)
            else:
                slot = staging_slot(part) if encoder.staging is not None else None  # pinned buffers: CUDA
                audio, masks, keys = _collate(part, out=slot.tensor if slot is not None else None)
            pending = encoder.submit(audio, masks, keys, slot=slot)
            part = [item.without_audio() for item in part]   # the writer needs metadata only
            put(("batch", (batch_index, part, pending)))
            batch_index += 1
            stats.batches += 1
            stats.batched_windows += len(part)
            real = sum(it.real_samples for it in part)   # chunks (--overlap) encode some audio twice
            stats.real_samples += real
            stats.padding_samples += audio.shape[0] * audio.shape[-1] - real
            counter.add(windows=sum(it.stitch is None or it.stitch.index == it.stitch.count - 1 for it in part),
                        bytes=sum(it.input_bytes for it in part),
                        audio_ms=round(1000 * sum(it.audio_samples for it in part) / model.sample_rate))
            if trim_heap and stats.batches % TRIM_EVERY_BATCHES == 0:
                give_back_freed_memory()
            if config.limit_batches is not None and stats.batches >= config.limit_batches:
                stats.stopped_early = True

    loop_started: Optional[float] = None
    completed = False
    batches_in = start_decode_workers(loader)
    try:
        for item in batches_in:
            job.raise_if_failed()
            if loop_started is None:
                loop_started = time.time()
            if isinstance(item, ShardEnd):
                send(batcher.end(item))
                continue
            if stats.stopped_early:
                break  # the first window past --limit-batches: units ending before it were committed
            send(batcher.add(item))
        else:
            send(batcher.drain())
        completed = True
    finally:
        if not completed:   # a failure, or past --grace-seconds: what is still queued is not committed
            writer.abandoned.set()
        writer.queue.put(None)
        writer.join()
        try:
            stop_workers(batches_in)
            del batches_in, loader
            counter.flush()   # raises when the job's store is gone with rank 0: the units are discarded still
        finally:
            if not completed:
                writer.discard_open_units(quietly=True)
    if writer.error is not None:
        raise _writer_failure(writer.error)
    writer.discard_open_units()
    manifest.place.close()
    log.close()  # every unit this rank opened is committed or removed: its records indexed, its marker gone
    stats.fp32_retries, stats.oom_splits, stats.compiled = encoder.retries, encoder.splits, encoder.compiled
    if writer.progress and loop_started is not None:
        (first_at, first_audio), (last_at, last_audio) = writer.progress[0], writer.progress[-1]
        stats.warmup_seconds = first_at - loop_started
        stats.steady_seconds = last_at - first_at
        stats.steady_audio_seconds = last_audio - first_audio
    own = inputs.storage.counters()  # the main process: uploads, records, listing
    stats.retries += own["retries"]
    stats.resumes += own["resumes"]
    stats.loop_seconds = time.time() - loop_started if loop_started is not None else 0.0


def prefetch_windows(chunking: str, batch_size: int, window_bytes: int, workers: int, shm_free: int) -> int:
    """Windows each decode worker keeps ready: a batch's worth, but at most PREFETCH_BYTES per rank in
    all and half of this rank's share of /dev/shm (windows travel from the workers through it: a
    container's small /dev/shm would otherwise crash the workers with `--batch-size auto`), and at least 2
    (one in hand, one coming). With full windows, which can be minutes long each, 2."""
    if chunking == "full" or workers < 1:
        return 2
    budget = min(PREFETCH_BYTES, shm_free // 2)
    return max(2, min(batch_size, budget // max(1, workers * window_bytes)))


def shared_memory_free(path: str = SHM_PATH) -> int:
    """Bytes free in /dev/shm (where DataLoader workers put the tensors they hand over); a large
    number where it cannot be read (then it is not what limits us)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return 1 << 62
    return stat.f_bavail * stat.f_frsize


def _delete_quietly(place: Place, relatives: list[str]) -> None:
    """Remove objects on the way out of a failure (the next holder's clean-up removes what is left)."""
    try:
        place.delete(relatives)
    except Exception:
        pass


def _writer_failure(error: BaseException) -> BaseException:
    """A storage failure (disk full, bucket gone) stays itself, so the command can say it in one line."""
    if isinstance(error, (StorageError, LeaseLost)):
        return error
    return RuntimeError(f"writing outputs failed: {type(error).__name__}: {error}")
