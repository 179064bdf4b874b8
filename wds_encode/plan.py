"""Planning a run: everything checked before the model loads or a rank joins the job (the dataset and
its units, the output's place, the model config and checkpoint, the window options), and, on rank 0,
the output's state: whose output it is (run identity), what was interrupted and is cleaned up, and
which units are left to do, in claim order. A bad input fails here, in seconds; `runner` drives the
loop that follows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError, DatasetConfig, EncodeConfig, load_dataset_config, load_model_config
from .job.parts import Part, PartError, no_conditional_writes, parse_part, part_from_scheduler
from .pipeline.filters import FileFilters
from .pipeline.manifest import OutputState, RunManifest, json_sha256, run_identity
from .models import resolve_autoencoder_config
from .models.factory import check_model_files
from .models.pretrained import resolve_pretrained
from .pipeline.reader import ReaderOptions, load_custom_metadata_fn
from .pipeline.sources import (LISTING, Shard, claim_order, file_groups_from_listing, list_shards, listing_bytes,
                               listing_fingerprint, units_from_listing)
from .storage import Place, S3Options, Storage, StorageError, redact_url


def resolve_model_source(config: EncodeConfig) -> tuple[dict, Path]:
    """(model config dict, checkpoint path) from --model-config/--ckpt-path or --pretrained-name."""
    if config.pretrained_name is not None:
        config_path, ckpt_path = resolve_pretrained(config.pretrained_name, allow_download=config.allow_download)
        return load_model_config(config_path), ckpt_path
    assert config.model_config_path is not None and config.ckpt_path is not None
    if not config.ckpt_path.is_file():
        raise ConfigError(f"--ckpt-path {config.ckpt_path}: file not found")
    check_model_files(config.model_config_path, config.ckpt_path)   # swapped or mistaken files, by their first bytes
    return load_model_config(config.model_config_path), config.ckpt_path



@dataclass
class RunInputs:
    """Everything checked before the model loads or any rank joins: a bad input fails here, in seconds."""

    config: EncodeConfig
    dataset_config: DatasetConfig
    model_config: dict
    ckpt_path: Path
    chunking: str
    units: list[Shard]           # every unit of the dataset, in listing order (the same on every rank)
    storage: Storage             # this process's S3 clients; defaults from --s3-profile / --s3-endpoint-url
    downsampling_ratio: int = 1
    part: Part = field(default_factory=Part)   # --part K/N (or the scheduler's array variables); Part(): the whole job
    part_source: str = ""        # where the part came from: "--part", or the scheduler's variable
    listing: str = "listed"      # "kept": the units the output's first run listed; "listed": listed now

    def window_options(self, sample_rate: int, channels: int, resample_here: bool = True) -> ReaderOptions:
        """How the reader cuts files for this run: fixed windows of --sample-size, or with --chunking
        full windows at each file's own length (rounded up to the ratio), at most --max-seconds."""
        config = self.config
        size, multiple = config.sample_size, 1
        if self.chunking == "full":
            multiple = self.downsampling_ratio
            size = max(multiple, int(config.max_seconds * sample_rate) // multiple * multiple)
        return ReaderOptions(sample_rate=sample_rate, channels=channels, sample_size=size,
                             chunking=self.chunking, max_chunks=config.max_chunks, seed=config.seed,
                             length_multiple=multiple, overlap=config.overlap if self.chunking == "full" else 0,
                             filters=FileFilters(config.min_duration, config.max_duration, config.skip_silent),
                             resample_here=resample_here)

    def output_place(self) -> Place:
        return self.storage.place(self.config.output_path)


def plan_inputs(config: EncodeConfig) -> RunInputs:
    """Validate configs, list the work units and check the output can be written (one probe
    object, removed at once): a bad input or an unwritable output fails before the model loads."""
    assert config.dataset_config is not None and config.output_path is not None
    part, part_source = resolve_part(config)
    dataset_config = load_dataset_config(config.dataset_config)
    for entry in dataset_config.datasets:  # fail fast on a broken metadata module
        module = dataset_config.metadata_module_for(entry)
        if module:
            try:
                load_custom_metadata_fn(module)
            except Exception as exc:
                raise ConfigError(f"{config.dataset_config}: custom_metadata_module {module}: {exc}") from exc
    storage = Storage(S3Options(profile=config.s3_profile, endpoint_url=config.s3_endpoint_url,
                                region=config.s3_region))
    units, listing = output_listing(config, dataset_config, storage, part)
    try:
        place = storage.place(config.output_path)
        place.check_writable()
        conditional = part.whole or place.conditional_writes()
    except StorageError as exc:
        raise ConfigError(f"--output-path {redact_url(config.output_path)}: {exc.reason} "
                          f"(at {exc.place}); fix the path, the bucket or its permissions") from None
    if not conditional:   # refused here, before the model loads (the part's lease would refuse it too)
        raise ConfigError(no_conditional_writes(redact_url(config.output_path), part))
    check_part_count(place, part, redact_url(config.output_path), part_source)
    model_config, ckpt_path = resolve_model_source(config)
    ratio = int(resolve_autoencoder_config(model_config).ae_config["downsampling_ratio"])
    if config.chunking == "full":
        rate = int(model_config["sample_rate"])
        if int(config.max_seconds * rate) < ratio:
            raise ConfigError(f"--max-seconds {config.max_seconds:g} is shorter than one latent frame "
                              f"({ratio} samples at {rate} Hz)")
        chunk = int(config.max_seconds * rate) // ratio   # the window of RunInputs.window_options, in frames
        if config.overlap >= chunk:
            raise ConfigError(f"--overlap {config.overlap} must be smaller than the --max-seconds "
                              f"{config.max_seconds:g} chunk, {chunk} latent frames of {ratio} samples at {rate} Hz "
                              f"(lower --overlap, or raise --max-seconds to at least "
                              f"{((config.overlap + 1) * ratio + 0.5) / rate:.8g})")
    elif config.sample_size % ratio and "sample_size" not in config.model_fields_set:
        # the default window (stable-audio-tools' 1320960) does not fit every model (SAME: 4096 per frame):
        # the largest window below it that does
        config = config.model_copy(update={"sample_size": config.sample_size // ratio * ratio})
    elif config.sample_size % ratio:
        raise ConfigError(f"--sample-size {config.sample_size} is not a multiple of the model's "
                          f"downsampling_ratio {ratio}; latents would not line up "
                          f"(try {config.sample_size // ratio * ratio})")
    chunking = config.chunking
    if chunking == "crop" and dataset_config.random_crop:
        chunking = "random_crop"
    return RunInputs(config=config, dataset_config=dataset_config, model_config=model_config, ckpt_path=ckpt_path,
                     chunking=chunking, units=units, storage=storage, downsampling_ratio=ratio,
                     part=part, part_source=part_source, listing=listing)


def output_listing(config: EncodeConfig, dataset_config: DatasetConfig, storage: Storage, part: Part
                   ) -> tuple[list[Shard], str]:
    """The units to encode, and whether they came from the listing the output keeps ("kept") or a new
    one ("listed": a first run, --relist, or a changed dataset config; rank 0 keeps it, `prepare_output`).
    One object to read instead of a listing of the whole corpus, for every rerun and every array part.
    A new listing keeps the audio_dir units of the kept one whose files all remain (`group_files`): a
    committed unit id never comes to mean other files, and added files go into new units."""
    if config.relist and not part.whole:
        raise ConfigError("--relist with --part: parts listing at different times could deal different units; "
                          "list again from one run without --part (--relist) while no part runs")
    try:
        data = storage.place(config.output_path).read(LISTING)
    except StorageError:
        data = None   # the output's own check (check_writable) says what is wrong with it
    if data is not None and not config.relist:
        units = kept_units(data, dataset_config, config.files_per_unit)
        if units is not None:
            return units, "kept"
        if not part.whole:
            raise ConfigError(f"--output-path {redact_url(config.output_path)}: its units were listed from "
                              "another dataset config, and array parts must all deal the same units: give every "
                              "part the dataset config of the first run, or use a new --output-path")
    previous = file_groups_from_listing(data) if data is not None else []
    return list_shards(dataset_config, storage, files_per_unit=config.files_per_unit, previous=previous), "listed"


def resolve_part(config: EncodeConfig, env=None) -> tuple[Part, str]:
    """This process's part of an array job: --part K/N, else the scheduler's variables, else the whole job."""
    try:
        if config.part is not None:
            part, source = parse_part(config.part), "--part"
            if config.num_parts is not None and config.num_parts != part.count:
                raise PartError(f"--part {config.part} and --num-parts {config.num_parts} disagree")
        else:
            found, source = part_from_scheduler(os.environ if env is None else env, config.num_parts)
            part = found or Part()
    except PartError as exc:
        raise ConfigError(str(exc)) from None
    if not part.whole and config.overwrite:
        raise ConfigError(f"--overwrite with --part {part.label}: every part would clear what the others wrote; "
                          "use a new --output-path, or remove the old output before starting the array")
    return part, source



def check_part_count(place: Place, part: Part, url: str, source: str = "--part") -> None:
    """An array job's parts all deal the units in one count: the one details.json records ("parts": N,
    written by the job's first part). --part K/M of another count M would deal them differently (its
    part K is not the part K of N that status reports), so it is refused here, before the model loads.
    A whole run (no --part) goes on any output, and parts may follow a whole run ("parts": 1)."""
    if part.whole:
        return
    try:
        details = RunManifest(place).load_details() or {}
        recorded = int(details.get("parts", 1) or 1)
    except (StorageError, ValueError, TypeError, AttributeError):
        return   # no readable details.json: the run's own start (prepare) says what is wrong with it
    if recorded <= 1 or recorded == part.count:
        return
    given = f"--part {part.label}" if source in ("--part", "") else f"part {part.label} (from {source})"
    raise ConfigError(
        f"{given}: {url} is an array job of {recorded} parts (its details.json records "
        f"\"parts\": {recorded}), not {part.count}; parts of another count would deal its units differently. "
        f"Run its own parts, --part 0/{recorded} to --part {recorded - 1}/{recorded} "
        f"(`wds-encode status {url}` says which are left); or give the {part.count} parts a new --output-path; "
        f"or start this output over in one run without --part, with --overwrite")


def keep_listing(inputs: RunInputs, place: Place) -> None:
    """Keep the units just listed with the output, for the reruns and array parts to come. The output's
    first listing is kept by a create-if-absent: a part (or run) that listed at the same moment and came
    second deals from the listing that was kept (`inputs.units` become those), so every part deals the
    same units however the input changes. --relist and a changed dataset config (whole jobs only)
    replace it."""
    data = listing_bytes(inputs.units, listing_fingerprint(inputs.dataset_config, inputs.config.files_per_unit))
    if place.create(LISTING, data):
        return
    current = place.read(LISTING)
    if current == data:
        return
    kept = kept_units(current, inputs.dataset_config, inputs.config.files_per_unit)
    if kept is not None and not inputs.config.relist:
        inputs.units, inputs.listing = kept, "kept"
        return
    place.write(LISTING, data)


def adopt_kept_listing(inputs: RunInputs) -> None:
    """A rank other than 0 whose listing is not the one rank 0 deals from: rank 0 kept another part's
    listing (`keep_listing`); read it too."""
    kept = kept_units(inputs.output_place().read(LISTING), inputs.dataset_config, inputs.config.files_per_unit)
    if kept is not None:
        inputs.units, inputs.listing = kept, "kept"


def kept_units(data: Optional[bytes], dataset_config: DatasetConfig, files_per_unit: int) -> Optional[list[Shard]]:
    """The units of a kept listing made from this dataset config and unit size; None when there is none,
    or it was made from others."""
    if data is None:
        return None
    return units_from_listing(data, dataset_config, listing_fingerprint(dataset_config, files_per_unit))


def units_fingerprint(units: list[Shard]) -> str:
    """What every rank must agree on: the same units at the same indices."""
    return json_sha256([[u.shard_id, u.url] for u in units])


def part_units(inputs: RunInputs) -> list[Shard]:
    """The units of this process's part (every unit for a whole job), in listing order."""
    return inputs.part.select(inputs.units, size=lambda u: u.size, name=lambda u: u.shard_id)


def prepare_output(inputs: RunInputs, manifest: RunManifest, lease: Optional[dict] = None
                   ) -> tuple[dict, list[int], OutputState, int]:
    """Rank 0, before anyone claims work: check the output is this run's (or clear it with
    --overwrite), remove what dead writers left (`lease`: the lease this attempt holds, its name and
    generation), and order what is left to do.
    Returns (run identity, unit indices in claim order, the output's state, units in this part)."""
    config = inputs.config
    options = {**config.model_dump(), "effective_precision": config.effective_precision}
    identity = run_identity(inputs.model_config, inputs.ckpt_path, options, inputs.dataset_config.random_crop)
    if inputs.listing == "listed" and not config.overwrite:
        keep_listing(inputs, manifest.place)   # may deal from another part's listing instead
    mine = part_units(inputs)
    state = manifest.prepare(identity, config.overwrite, inputs.part,
                             units=None if inputs.part.whole else {u.shard_id for u in mine}, lease=lease)
    if config.overwrite:   # it has just removed the one kept
        keep_listing(inputs, manifest.place)
    manifest.start_filelist()  # a first run's (or --overwrite's): an interrupted run lists no window
    index = {id(u): i for i, u in enumerate(inputs.units)}
    todo = claim_order([u for u in mine if u.shard_id not in state.done],
                       shuffle=config.shuffle, seed=config.seed)
    return identity, [index[id(u)] for u in todo], state, len(mine)
