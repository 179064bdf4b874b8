"""Read wds-encode's latents back for training: latent shards as a webdataset pipeline, the folder
layout as a map-style dataset, and `latent_loader` wrapping either in a DataLoader.

Sources. An output (local folder or `s3://` prefix) is read through its manifest: only units whose
record exists (committed) are read, never the leftovers of an interrupted run. The latent shards
(the default form) hold every window, with or without the folder layout (`--no-folder`). Latent
shards can also be named directly (URLs, a list, or a brace pattern `shards/ds/a-{000..009}.tar`).

One window becomes `(latent [C, T], metadata)`, the same way in both forms:
- `--latent-mode params` outputs (mean and std stacked on the channel axis) are sampled afresh on
  every read, `mean + std * noise`, with noise seeded by (seed, epoch, window): another epoch gives
  another sample, the same epoch and seed the same one (`params="mean"` returns the mean instead);
- `latent_crop_length` crops as stable-audio-tools' pre-encoded readers do: from the start, or
  with `random_crop` from a seeded random start such that the crop ends inside the unpadded part;
  a latent shorter than the crop is padded with zeros (and a padding mask of 0) to the crop length;
- tokens (`--is-discrete`) come back as int64 tensors [Q, T], latents as float32.
`metadata["padding_mask"]` becomes a bool tensor aligned with the returned latent.
`collate_latents` stacks a batch into `(latents [B, C, T], list of metadata)`, padding shorter
latents to the longest (mask 0 there); `bucket_width` batches latents of similar length together
(`--chunking full` outputs), so that padding stays under that many frames.

Epochs and ranks. Every rank and DataLoader worker reads a disjoint part of every epoch: shards
(or folder windows) are shuffled with (seed, epoch), identically on every rank, then dealt out by
rank and worker. Call `set_epoch(n)` before each epoch, as with a DistributedSampler;
`latent_loader` does it for you (each `iter()` is the next epoch). Ranks read whole shards, so
their window counts differ by up to a shard's worth: with DDP, stop an epoch at a fixed number of
steps, or write more, smaller shards (`--shard-maxcount`).
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from .pipeline.encoder import key_seed
from .pipeline.manifest import RunManifest
from .pipeline.records import UnitRecord
from .storage import Storage
from .pipeline.writers import folder_files

PARAMS_CHOICES = ("sample", "mean")


class LatentSourceError(ValueError):
    """The source holds no latents this reader can find; the message says what to pass instead."""


# --------------------------------------------------------------------------- what to read

def _expand(urls: Iterable[str]) -> list[str]:
    out: list[str] = []
    for url in urls:
        out.extend(expand_urls(str(url)))
    return out


def _committed_records(source: str, storage: Storage) -> list[UnitRecord]:
    place = storage.place(source)
    manifest = RunManifest(place)
    if manifest.load_details() is None:
        raise LatentSourceError(
            f"{source}: no details.json; pass the --output-path of a wds-encode run, or latent shard URLs "
            "(a list or a brace pattern such as shards/ds/a-{000..009}.tar)")
    return manifest.records()


def latent_shard_urls(source: str | Sequence[str], storage: Optional[Storage] = None) -> list[str]:
    """The latent tars of a source: an output's committed units (in record order), or the URLs given."""
    if not isinstance(source, (str, os.PathLike)):
        return _expand(source)
    source = str(source)
    if source.endswith(".tar") or "{" in source:
        return _expand([source])
    storage = storage or Storage()
    place = storage.place(source)
    urls = [place.child(rel) for record in _committed_records(source, storage)
            for rel in record.get("latent_shards") or ()]
    if not urls:
        raise LatentSourceError(f"{source}: no committed unit has latent shards (was it written with "
                                "--no-shards? then read the folder layout with form='folder')")
    return urls


def latent_folder_files(source: str, storage: Optional[Storage] = None) -> list[tuple[str, str]]:
    """(json, npy) paths, relative to the output, of every committed window of the folder layout."""
    storage = storage or Storage()
    files = [tuple(folder_files(int(record["rank"]), latent_id))
             for record in _committed_records(str(source), storage)
             for latent_id in record.get("folder_ids") or ()]
    if not files:
        raise LatentSourceError(f"{source}: no committed window in the folder layout (was it written with "
                                "--no-folder? then read the latent shards with form='shards')")
    return files


# --------------------------------------------------------------------------- one window

def read_seed(seed: int, epoch: int, window: str, purpose: str) -> int:
    """A 63-bit seed for one read of one window: stable across processes, ranks and workers."""
    return key_seed(seed, f"{epoch}:{purpose}:{window}")


def window_name(metadata: dict, fallback: str) -> str:
    """What identifies a window in both output forms: its unit and output key."""
    if "source_shard" in metadata and "key" in metadata:
        return f"{metadata['source_shard']}/{metadata['key']}"
    return fallback


@dataclass(frozen=True)
class LatentReading:
    """How a stored window becomes a training example (see the module docstring)."""

    latent_crop_length: Optional[int] = None
    random_crop: bool = False
    params: str = "sample"
    seed: int = 0

    def __post_init__(self):
        if self.params not in PARAMS_CHOICES:
            raise ValueError(f"params={self.params!r}: expected one of {PARAMS_CHOICES}")
        if self.latent_crop_length is not None and self.latent_crop_length < 1:
            raise ValueError(f"latent_crop_length={self.latent_crop_length}: expected a positive number of frames")

    def __call__(self, array: np.ndarray, metadata: dict, *, epoch: int, fallback_name: str
                 ) -> tuple[torch.Tensor, dict]:
        md = dict(metadata)
        name = window_name(md, fallback_name)
        mask = torch.tensor(md.get("padding_mask") or [1] * array.shape[-1], dtype=torch.bool)
        if md.get("latent_mode") == "tokens" or np.issubdtype(array.dtype, np.integer):
            latent = torch.from_numpy(array.astype(np.int64))
        else:
            latent = torch.from_numpy(np.asarray(array, dtype=np.float32))
            if md.get("latent_mode") == "params":
                latent = self._from_params(latent, md, epoch, name)
        if self.latent_crop_length is not None:
            latent, mask = self._crop(latent, mask, md, epoch, name)
        md["padding_mask"] = mask
        return latent, md

    def _from_params(self, latent: torch.Tensor, md: dict, epoch: int, name: str) -> torch.Tensor:
        if latent.shape[0] % 2:
            raise ValueError(f"{name}: a params latent needs an even channel count (mean, std), got {latent.shape}")
        mean, std = latent.chunk(2, dim=0)
        md["latent_mode"] = "params:" + self.params
        if self.params == "mean":
            return mean.contiguous()
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(
            read_seed(self.seed, epoch, name, "noise")))
        return mean + std * noise

    def _crop(self, latent: torch.Tensor, mask: torch.Tensor, md: dict, epoch: int, name: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.latent_crop_length
        valid = torch.nonzero(mask).flatten()
        last = int(valid[-1]) if len(valid) else 0       # the last unpadded frame
        start = 0
        if self.random_crop and last > length:
            start = random.Random(read_seed(self.seed, epoch, name, "crop")).randint(0, last - length)
        latent, mask = latent[..., start:start + length], mask[start:start + length]
        if latent.shape[-1] < length:
            extra = length - latent.shape[-1]
            latent = torch.nn.functional.pad(latent, (0, extra))
            mask = torch.nn.functional.pad(mask, (0, extra))
        md["latent_crop_start"], md["latent_crop_length"] = start, length
        return latent.contiguous(), mask


def collate_latents(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """(latents [B, C, T], metadata list); shorter latents are padded to the longest, mask 0 there."""
    longest = max(latent.shape[-1] for latent, _ in batch)
    latents, metadata = [], []
    for latent, md in batch:
        extra = longest - latent.shape[-1]
        if extra:
            latent = torch.nn.functional.pad(latent, (0, extra))
            md = {**md, "padding_mask": torch.nn.functional.pad(md["padding_mask"], (0, extra))}
        latents.append(latent)
        metadata.append(md)
    return torch.stack(latents), metadata


# --------------------------------------------------------------------------- who reads what

def distributed_position(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when initialised, else RANK / WORLD_SIZE."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return rank, world_size


def epoch_order(count: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """0..count-1, shuffled by (seed, epoch): the same list on every rank and worker."""
    order = list(range(count))
    if shuffle:
        random.Random(read_seed(seed, epoch, "", "order")).shuffle(order)
    return order


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Epoch:
    """The epoch number the stages of a pipeline read; travels with the dataset into its workers."""

    def __init__(self):
        self.value = 0


class _ShardsForThisReader(IterableDataset):
    """Pipeline source: this rank's and this worker's shards of the current epoch, as {"url": ...}."""

    def __init__(self, urls: list[str], epoch: _Epoch, *, shuffle: bool, seed: int, rank: int, world_size: int):
        self.urls, self.epoch, self.shuffle, self.seed = urls, epoch, shuffle, seed
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        order = epoch_order(len(self.urls), seed=self.seed, epoch=self.epoch.value, shuffle=self.shuffle)
        mine = order[self.rank::self.world_size][worker::workers]
        for index in mine:
            yield {"url": self.urls[index]}


class _OpenStreams:
    """Stage: {"url"} -> {"url", "stream"} through `storage` (local or s3://), closed once read."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for source in sources:
            stream = self.storage.open_read(source["url"])
            try:
                yield {**source, "stream": stream}
            finally:
                stream.close()


class _ShuffleSamples:
    """Stage: a seeded shuffle buffer (seed, epoch, rank, worker), so a run can be repeated exactly."""

    def __init__(self, bufsize: int, epoch: _Epoch, seed: int, rank: int):
        self.bufsize, self.epoch, self.seed, self.rank = bufsize, epoch, seed, rank

    def __call__(self, samples: Iterable) -> Iterator:
        worker, _ = _worker()
        rng = random.Random(read_seed(self.seed, self.epoch.value, f"{self.rank}/{worker}", "buffer"))
        buffer: list = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.bufsize:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


class _Decode:
    """Stage: tar samples (`KEY.json` + `KEY.npy`) -> (latent, metadata) through a `LatentReading`."""

    def __init__(self, reading: LatentReading, epoch: _Epoch):
        self.reading, self.epoch = reading, epoch

    def __call__(self, samples: Iterable[dict]) -> Iterator[tuple[torch.Tensor, dict]]:
        for sample in samples:
            if "npy" not in sample or "json" not in sample:
                raise LatentSourceError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r} lacks a "
                                        ".npy or .json member; is this a wds-encode latent shard?")
            array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            md = json.loads(sample["json"].decode("utf-8"))
            latent, md = self.reading(array, md, epoch=self.epoch.value, fallback_name=sample["__key__"])
            md["latent_url"], md["latent_key"] = sample["__url__"], sample["__key__"]
            yield latent, md


class _BatchByLength:
    """Stage: batches of latents of similar length (`--chunking full` outputs): samples wait in buckets
    of `width` frames, a bucket leaves when it holds `batch_size`, the fullest when `buffer` wait in all;
    so collation pads by less than `width` frames."""

    def __init__(self, batch_size: int, width: int, buffer: int):
        self.batch_size, self.width, self.buffer = batch_size, width, max(buffer, batch_size)

    def __call__(self, samples: Iterable[tuple[torch.Tensor, dict]]) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        buckets: dict[int, list] = {}
        held = 0
        for sample in samples:
            bucket = buckets.setdefault(-(-sample[0].shape[-1] // self.width), [])
            bucket.append(sample)
            held += 1
            if len(bucket) >= self.batch_size or held >= self.buffer:
                key = max(buckets, key=lambda k: len(buckets[k]))
                held -= len(buckets[key])
                yield collate_latents(buckets.pop(key))
        for bucket in buckets.values():
            yield collate_latents(bucket)


class LatentShards(wds.DataPipeline):
    """The webdataset pipeline `latent_dataset` returns; `set_epoch` before each epoch."""

    def __init__(self, urls: list[str], reading: LatentReading, *, storage: Storage, shuffle: bool,
                 shuffle_buffer: int, rank: int, world_size: int, batch_size: Optional[int],
                 bucket_width: Optional[int] = None):
        self.urls = urls
        self.reading = reading
        self.epoch = _Epoch()
        stages: list = [
            _ShardsForThisReader(urls, self.epoch, shuffle=shuffle, seed=reading.seed, rank=rank,
                                 world_size=world_size),
            _OpenStreams(storage),
            tar_file_expander,
            group_by_keys,
        ]
        if shuffle and shuffle_buffer > 1:
            stages.append(_ShuffleSamples(shuffle_buffer, self.epoch, reading.seed, rank))
        stages.append(_Decode(reading, self.epoch))
        if batch_size is not None and bucket_width is not None:
            stages.append(_BatchByLength(batch_size, bucket_width, max(shuffle_buffer, 4 * batch_size)))
        elif batch_size is not None:
            stages.append(wds.batched(batch_size, collation_fn=collate_latents, partial=True))
        super().__init__(*stages)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = int(epoch)


def latent_dataset(source: str | Sequence[str], *, latent_crop_length: Optional[int] = None,
                   random_crop: bool = False, params: str = "sample", seed: int = 0, shuffle: bool = True,
                   shuffle_buffer: int = 1000, batch_size: Optional[int] = None, bucket_width: Optional[int] = None,
                   rank: Optional[int] = None, world_size: Optional[int] = None,
                   storage: Optional[Storage] = None) -> LatentShards:
    """A webdataset pipeline over the latent shards of `source` yielding (latent, metadata), or batches
    of them (`collate_latents`) with `batch_size`; with `bucket_width` (frames) too, batches of latents
    whose lengths differ by less than that. See the module docstring for the rest."""
    if bucket_width is not None and (batch_size is None or bucket_width < 1):
        raise ValueError("bucket_width needs a batch_size, and must be >= 1 frame")
    storage = storage or Storage()
    urls = latent_shard_urls(source, storage)
    rank, world_size = distributed_position(rank, world_size)
    reading = LatentReading(latent_crop_length=latent_crop_length, random_crop=random_crop, params=params, seed=seed)
    return LatentShards(urls, reading, storage=storage, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                        rank=rank, world_size=world_size, batch_size=batch_size, bucket_width=bucket_width)


# --------------------------------------------------------------------------- the folder layout

class LatentFolder(Dataset):
    """The folder layout (`OUT/{rank}/{id}.npy` + `.json`) of committed units, map-style."""

    def __init__(self, source: str, *, latent_crop_length: Optional[int] = None, random_crop: bool = False,
                 params: str = "sample", seed: int = 0, storage: Optional[Storage] = None):
        self.storage = storage or Storage()
        self.source = str(source)
        self.files = latent_folder_files(self.source, self.storage)
        self.reading = LatentReading(latent_crop_length=latent_crop_length, random_crop=random_crop,
                                     params=params, seed=seed)
        self.epoch = 0
        self._place = None

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_place": None}  # a place (S3 clients, threads) is per process

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if self._place is None:
            self._place = self.storage.place(self.source)
        json_rel, npy_rel = self.files[index]
        found = self._place.read_many([json_rel, npy_rel])
        if found[json_rel] is None or found[npy_rel] is None:
            raise LatentSourceError(f"{self._place.child(npy_rel)}: listed by the manifest but missing; "
                                    "the output was changed after the run (check it with wds-encode status)")
        md = json.loads(found[json_rel].decode("utf-8"))
        array = np.load(io.BytesIO(found[npy_rel]), allow_pickle=False)
        latent, md = self.reading(array, md, epoch=self.epoch, fallback_name=npy_rel)
        md["latent_filename"] = self._place.child(npy_rel)
        return latent, md


class RankSampler(Sampler[int]):
    """This rank's share of an epoch's order of a map-style dataset: disjoint, no repeats, no padding."""

    def __init__(self, size: int, *, rank: int, world_size: int, shuffle: bool, seed: int):
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.size, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


# --------------------------------------------------------------------------- one call

class LatentLoader:
    """A DataLoader over latents whose every `iter()` is the next epoch (`epoch` says which is next)."""

    def __init__(self, loader, dataset, sampler: Optional[RankSampler] = None, first_epoch: int = 0):
        self.loader, self.dataset, self.sampler = loader, dataset, sampler
        self.epoch = first_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        self.dataset.set_epoch(self.epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def __len__(self) -> int:
        if self.sampler is None:
            raise TypeError("the number of batches of latent shards is known only after reading them")
        return len(self.loader)


def latent_loader(source: str | Sequence[str], batch_size: int, *, form: str = "shards", num_workers: int = 2,
                  latent_crop_length: Optional[int] = None, random_crop: bool = False, params: str = "sample",
                  seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                  bucket_width: Optional[int] = None, rank: Optional[int] = None,
                  world_size: Optional[int] = None, first_epoch: int = 0, pin_memory: bool = False,
                  storage: Optional[Storage] = None, **loader_options) -> LatentLoader:
    """Latents of `source` in batches `(latents [B, C, T], metadata list)`, from the latent shards
    (`form="shards"`: a `webdataset.WebLoader`, batches made in the workers) or the folder layout
    (`form="folder"`: a DataLoader with this rank's share of a seeded order). The last batch may
    be smaller: every window is read once per epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    rank, world_size = distributed_position(rank, world_size)
    options = dict(latent_crop_length=latent_crop_length, random_crop=random_crop, params=params, seed=seed,
                   storage=storage)
    if form == "shards":
        dataset = latent_dataset(source, shuffle=shuffle, shuffle_buffer=shuffle_buffer, batch_size=batch_size,
                                 bucket_width=bucket_width, rank=rank, world_size=world_size, **options)
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                               **loader_options)
        return LatentLoader(loader, dataset, first_epoch=first_epoch)
    if form == "folder":
        if bucket_width is not None:
            raise ValueError("bucket_width works with form='shards' (the folder form reads in a sampler's order)")
        if not isinstance(source, (str, os.PathLike)) or str(source).endswith(".tar") or "{" in str(source):
            raise LatentSourceError(f"form='folder' reads an output (folder or s3:// prefix), not {source!r}")
        dataset = LatentFolder(str(source), **options)
        sampler = RankSampler(len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            collate_fn=collate_latents, pin_memory=pin_memory, **loader_options)
        return LatentLoader(loader, dataset, sampler, first_epoch=first_epoch)
    raise ValueError(f"form={form!r}: expected 'shards' or 'folder'")

