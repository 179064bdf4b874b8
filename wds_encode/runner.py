"""The per-rank loop: DataLoader -> batches -> encoder -> writer thread -> commits.

Workers decode in parallel; this process batches windows, encodes them, and hands the latents to a
writer thread through a bounded queue, so the device never waits on disk. A unit's `ShardEnd`
travels through the same queue after the unit's last batch, so the writer commits a unit only once
all of its windows are written.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import ConfigError, DatasetConfig, EncodeConfig, load_dataset_config, load_model_config
from .encoder import BatchEncoder, token_dtype
from .manifest import RunManifest, run_identity, versions
from .models import load_autoencoder, resolve_autoencoder_config
from .models.pretrained import resolve_pretrained
from .reader import Reader, ReaderOptions, ShardEnd, WindowItem, error_record, load_custom_metadata_fn
from .sources import Shard, list_shards
from .writers import SHARDS_DIR, FolderWriter, LatentShardWriter, remove_partials

WRITE_QUEUE_DEPTH = 8


@dataclass
class RunStats:
    units_total: int = 0
    units_skipped: int = 0        # already done in an earlier run
    units_done: int = 0
    units_failed: int = 0         # could not be read to the end (still committed with what was read)
    samples: int = 0
    windows: int = 0
    rejected: int = 0
    errors: int = 0
    warnings: int = 0
    audio_seconds: float = 0.0
    batches: int = 0
    fp32_retries: int = 0
    elapsed_seconds: float = 0.0
    loop_seconds: float = 0.0     # from the first window to the last commit (steady-state throughput)
    stopped_early: bool = False

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        data = dict(self.__dict__)
        data["audio_hours"] = self.audio_seconds / 3600
        data["realtime_factor"] = self.realtime_factor
        return data


@dataclass
class _Pending:
    """What the writer keeps per open unit until its ShardEnd arrives."""

    folder_files: list[Path] = field(default_factory=list)
    shard_writer: Optional[LatentShardWriter] = None
    written: int = 0
    errors: list[dict] = field(default_factory=list)


def resolve_model_source(config: EncodeConfig) -> tuple[dict, Path]:
    """(model config dict, checkpoint path) from --model-config/--ckpt-path or --pretrained-name."""
    if config.pretrained_name is not None:
        config_path, ckpt_path = resolve_pretrained(config.pretrained_name, allow_download=config.allow_download)
        return load_model_config(config_path), ckpt_path
    assert config.model_config_path is not None and config.ckpt_path is not None
    if not config.ckpt_path.is_file():
        raise ConfigError(f"--ckpt-path {config.ckpt_path}: file not found")
    return load_model_config(config.model_config_path), config.ckpt_path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


class _WriterThread(threading.Thread):
    """Writes batches and commits units, in queue order. A failure stops the run (disk full...)."""

    def __init__(self, config: EncodeConfig, manifest: RunManifest, folder: FolderWriter,
                 output_dtype: torch.dtype, latent_metadata: dict, on_unit_done):
        super().__init__(name="wds-encode-writer", daemon=True)
        self.config = config
        self.manifest = manifest
        self.folder = folder
        self.output_dtype = output_dtype
        self.latent_metadata = latent_metadata
        self.on_unit_done = on_unit_done
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self.pending: dict[str, _Pending] = {}
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            while True:
                job = self.queue.get()
                if job is None:
                    return
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

    def _write_batch(self, batch_index: int, items: list[WindowItem], encoded) -> None:
        arrays = encoded.latents.to(self.output_dtype).numpy()
        masks = encoded.padding_masks.tolist()
        for i, item in enumerate(items):
            pend = self._unit(item.shard_id)
            if not encoded.finite[i]:
                pend.errors.append(error_record(item.shard_id, item.metadata["path"], item.metadata["__key__"],
                                                "encoder produced non-finite latents (also in fp32)"))
                continue
            array = np.ascontiguousarray(arrays[i])
            md = dict(item.metadata)
            md["padding_mask"] = masks[i]
            md["latent_shape"] = list(array.shape)
            md["latent_length"] = int(array.shape[-1])
            md.update(self.latent_metadata)
            latent_id = self.folder.latent_id(batch_index, i)
            md["latent_id"] = latent_id
            pend.folder_files.extend(self.folder.stage(latent_id, array, md))
            if self.config.shards:
                if pend.shard_writer is None:
                    dataset_id, name = item.shard_id.split("/", 1)
                    pend.shard_writer = LatentShardWriter(
                        self.config.output_path / SHARDS_DIR, dataset_id, name,
                        maxcount=self.config.shard_maxcount, maxsize=self.config.shard_maxsize)
                pend.shard_writer.write(item.key, array, md)
            pend.written += 1

    def _commit(self, end: ShardEnd) -> None:
        """Make a unit's outputs visible, then record it done; a crash in between is rolled back at restart."""
        pend = self.pending.pop(end.shard.shard_id, _Pending())
        tars = pend.shard_writer.parts if pend.shard_writer is not None else []
        journal = self.manifest.begin_commit(end.shard.shard_id, [*pend.folder_files, *tars])
        if pend.shard_writer is not None:
            pend.shard_writer.commit()
        self.folder.commit(pend.folder_files)
        errors = end.errors + pend.errors
        n_errors = sum(1 for e in errors if e["level"] == "error")
        self.manifest.write_record({
            "shard": end.shard.shard_id, "url": end.shard.url, "rank": self.folder.rank,
            "samples": end.samples, "windows": pend.written, "rejected": end.rejected,
            "errors": n_errors, "warnings": len(errors) - n_errors,
            "failed": end.failed, "latent_shards": [str(p.relative_to(self.config.output_path)) for p in tars],
            "folder_ids": sorted(p.stem for p in pend.folder_files if p.suffix == ".npy"),
            "problems": errors,
        })
        self.manifest.finish_commit(journal)
        self.manifest.append_errors(errors)
        self.on_unit_done(end, pend.written, n_errors, len(errors) - n_errors)

    def discard_open_units(self) -> int:
        for pend in self.pending.values():
            self.folder.discard(pend.folder_files)
            if pend.shard_writer is not None:
                pend.shard_writer.discard()
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


def _collate(items: list[WindowItem]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    audio = torch.stack([it.audio for it in items])
    masks = torch.stack([it.padding_mask for it in items])
    keys = [f"{it.shard_id}/{it.key}" for it in items]
    return audio, masks, keys


@dataclass
class RunPlan:
    """Everything checked before the model loads: a bad input fails here, in seconds."""

    config: EncodeConfig
    dataset_config: DatasetConfig
    model_config: dict
    ckpt_path: Path
    chunking: str
    manifest: RunManifest
    identity: dict
    shards: list[Shard]
    todo: list[Shard]


def plan_run(config: EncodeConfig) -> RunPlan:
    """Validate configs, list the work units, and check the output folder belongs to this run."""
    assert config.dataset_config is not None and config.output_path is not None
    dataset_config = load_dataset_config(config.dataset_config)
    for entry in dataset_config.datasets:  # fail fast on a broken metadata module
        module = dataset_config.metadata_module_for(entry)
        if module:
            try:
                load_custom_metadata_fn(module)
            except Exception as exc:
                raise ConfigError(f"{config.dataset_config}: custom_metadata_module {module}: {exc}") from exc
    shards = list_shards(dataset_config, files_per_unit=config.files_per_unit, shuffle=config.shuffle,
                         seed=config.seed)
    model_config, ckpt_path = resolve_model_source(config)
    ratio = int(resolve_autoencoder_config(model_config).ae_config["downsampling_ratio"])
    if config.sample_size % ratio:
        raise ConfigError(f"--sample-size {config.sample_size} is not a multiple of the model's "
                          f"downsampling_ratio {ratio}; latents would not line up "
                          f"(try {config.sample_size // ratio * ratio})")
    chunking = config.chunking
    if chunking == "crop" and dataset_config.random_crop:
        chunking = "random_crop"
    options = {**config.model_dump(), "effective_precision": config.effective_precision}
    identity = run_identity(model_config, ckpt_path, options, dataset_config.random_crop)
    manifest = RunManifest(config.output_path)
    done = manifest.prepare(identity, config.overwrite)
    todo = [s for s in shards if s.shard_id not in done]
    return RunPlan(config=config, dataset_config=dataset_config, model_config=model_config, ckpt_path=ckpt_path,
                   chunking=chunking, manifest=manifest, identity=identity,
                   shards=shards, todo=todo)


def run(config: EncodeConfig, *, rank: int = 0, world_size: int = 1) -> RunStats:
    """Encode every unfinished unit of the dataset; returns the run's statistics."""
    started = time.time()
    plan = plan_run(config)
    device = pick_device(config.device)
    model = load_autoencoder(plan.model_config, plan.ckpt_path, key_prefix=config.ckpt_prefix,
                             allow_unsafe_pickle=config.allow_unsafe_pickle)
    if config.is_discrete and not getattr(model.bottleneck, "is_discrete", False):
        raise ConfigError(f"--is-discrete: the model's bottleneck ({type(model.bottleneck).__name__}) "
                          "is continuous and has no tokens; drop --is-discrete")
    stats = RunStats(units_total=len(plan.shards), units_skipped=len(plan.shards) - len(plan.todo))
    details = {
        "model_config": plan.model_config,
        "dataset_config": plan.dataset_config.model_dump(mode="json"),
        "sample_size": config.sample_size,
        "args": config.as_args(),
        "run_identity": plan.identity,
        "versions": versions(),
        "model": {"sample_rate": model.sample_rate, "audio_channels": model.in_channels,
                  "latent_dim": model.latent_dim, "downsampling_ratio": model.downsampling_ratio},
        "started_at": started,
    }
    if rank == 0:
        plan.manifest.write_details(details)
    _encode_units(plan, model, device, stats, rank=rank, world_size=world_size, started=started)
    stats.elapsed_seconds = time.time() - started
    if rank == 0:
        details["finished_at"] = time.time()
        details["stats"] = stats.as_dict()
        plan.manifest.write_details(details)
    return stats


def _encode_units(plan: RunPlan, model, device: torch.device, stats: RunStats, *, rank: int, world_size: int,
                  started: float) -> None:
    """The loop: loader -> batches -> encoder -> writer thread; fills `stats`."""
    config = plan.config
    reader = Reader(plan.todo, ReaderOptions(sample_rate=model.sample_rate, channels=model.in_channels,
                                             sample_size=config.sample_size, chunking=plan.chunking,
                                             max_chunks=config.max_chunks, seed=config.seed),
                    rank=rank, world_size=world_size)
    num_workers = min(config.num_workers, len(plan.todo))
    loader = DataLoader(reader, batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=max(2, config.batch_size) if num_workers else None)
    encoder = BatchEncoder(model, device=device, precision=config.effective_precision,
                           latent_mode=config.latent_mode, is_discrete=config.is_discrete, seed=config.seed,
                           compile=config.compile)
    folder = FolderWriter(config.output_path, rank)
    if world_size == 1:  # latent tars of units an interrupted run left open (per-rank folders clean themselves)
        remove_partials(config.output_path / SHARDS_DIR)
    bar = tqdm(total=None, unit="win", disable=not config.progress, dynamic_ncols=True, desc=f"rank {rank}")

    def on_unit_done(end: ShardEnd, written: int, errors: int, warnings: int) -> None:
        stats.units_done += 1
        stats.units_failed += int(end.failed)
        stats.samples += end.samples
        stats.windows += written
        stats.rejected += end.rejected
        stats.audio_seconds += end.audio_seconds
        stats.errors += errors
        stats.warnings += warnings

    writer = _WriterThread(config, plan.manifest, folder, *latent_format(config, model), on_unit_done)
    writer.start()

    def put(job) -> None:
        while True:
            if writer.error is not None:
                raise RuntimeError(f"writing outputs failed: {writer.error}") from writer.error
            try:
                writer.queue.put(job, timeout=1.0)
                return
            except queue.Full:
                continue

    batch: list[WindowItem] = []
    ends_after_batch: list[ShardEnd] = []
    batch_index = folder.first_batch_index
    audio_seen = 0.0
    files_seen = 0

    def flush() -> None:
        nonlocal batch, ends_after_batch, batch_index
        if batch:
            audio, masks, keys = _collate(batch)
            encoded = encoder.encode(audio, masks, keys)
            stats.fp32_retries += int(encoded.fp32_retry)
            put(("batch", (batch_index, batch, encoded)))
            batch_index += 1
            stats.batches += 1
            bar.update(len(batch))
            bar.set_postfix(files=files_seen, units=f"{stats.units_done + stats.units_skipped}/{stats.units_total}",
                            hours=f"{audio_seen / 3600:.3f}",
                            rtf=f"{audio_seen / max(time.time() - started, 1e-9):.0f}x")
        for end in ends_after_batch:
            put(("end", end))
        batch, ends_after_batch = [], []

    loop_started: Optional[float] = None
    try:
        for item in loader:
            if loop_started is None:
                loop_started = time.time()
            if isinstance(item, ShardEnd):
                if batch:
                    ends_after_batch.append(item)
                else:
                    put(("end", item))
                continue
            if stats.stopped_early:
                break  # the first window past --limit-batches: units ending before it were committed
            batch.append(item)
            audio_seen += item.metadata["valid_length"] / model.sample_rate
            files_seen += item.metadata["chunk_index"] == 0
            if len(batch) >= config.batch_size:
                flush()
                if config.limit_batches is not None and stats.batches >= config.limit_batches:
                    stats.stopped_early = True
        else:
            flush()
    finally:
        bar.close()
        writer.queue.put(None)
        writer.join()
        del loader
    if writer.error is not None:
        raise RuntimeError(f"writing outputs failed: {writer.error}") from writer.error
    writer.discard_open_units()
    stats.loop_seconds = time.time() - loop_started if loop_started is not None else 0.0
