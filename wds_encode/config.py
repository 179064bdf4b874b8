"""Configuration at the edge: every option validated once, before any model is loaded.

`EncodeConfig` holds the command's options (stable-audio-tools pre_encode.py names and defaults,
plus ours). `DatasetConfig` parses stable-audio-tools dataset JSON; `load_dataset_config` also says which
of its keys a run would ignore (a warning, or with --strict an error). Both come from JSON or YAML
files; command-line flags override the file. Errors are `ConfigError` with the file and field.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

# Bounds for --sample-size: at least one latent frame of any real model, at most ~1 h at 192 kHz.
MIN_SAMPLE_SIZE = 64
MAX_SAMPLE_SIZE = 192_000 * 3600
MAX_BATCH_SIZE = 4096


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the file and the field."""


def read_config_file(path: str | Path) -> Any:
    """Parse a JSON or YAML file, with an error that names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON/YAML text file (byte {exc.start} is not UTF-8); is it the file "
                          "you meant?") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: `source: field.path: message (got value)`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        got = ""
        if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            got = f" (got {err['input']!r})"
        lines.append(f"{source}: {where}: {msg}{got}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- encode options

class EncodeConfig(BaseModel):
    """Every option of `wds-encode run`. Defaults follow stable-audio-tools' pre_encode.py."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              protected_namespaces=())

    # --- the seed's options (pre_encode.py names and defaults)
    model_config_path: Optional[Path] = Field(None, alias="model_config", description="Model config JSON")
    ckpt_path: Optional[Path] = Field(None, description="Autoencoder checkpoint (.ckpt or .safetensors)")
    pretrained_name: Optional[str] = Field(
        None, description="Model folder or Hugging Face repo id (local cache; see --allow-download)")
    dataset_config: Optional[Path] = Field(None, description="Dataset config JSON")
    output_path: Optional[str] = Field(None, description="Output folder, or s3://bucket/prefix/")
    batch_size: Union[int, str] = Field(
        1, description="Windows per encoder batch, or auto, found by a short probe at start: on a GPU the largest "
                       "power of two (<= 256) that fits the device with 20% to spare; on a CPU the fastest of the "
                       "batch sizes it times, within the memory the process may use")
    sample_size: int = Field(1320960, ge=MIN_SAMPLE_SIZE, le=MAX_SAMPLE_SIZE,
                             description="Samples per window (pad/crop), at the model's rate")
    num_workers: int = Field(4, ge=0, le=256, description="DataLoader worker processes")
    shuffle: bool = Field(False, description="Shuffle the order of input shards (seeded)")
    model_half: bool = Field(False, description="Encode in float16 (same as --precision fp16)")
    is_discrete: bool = Field(False, description="Write discrete tokens instead of latents")
    num_nodes: Optional[int] = Field(
        None, ge=1, description="Nodes in the job; checked against what torchrun / srun report (default: theirs)")
    strategy: str = Field("auto", description="auto or ddp (one encoding process per GPU either way)")
    limit_batches: Optional[int] = Field(None, ge=1, description="Stop after this many batches per rank")

    # --- ours
    ckpt_prefix: Optional[str] = Field(
        None, description="Key prefix of the autoencoder in the checkpoint (default: detected), "
                          "e.g. autoencoder_ema.ema_model. for EMA weights")
    allow_download: bool = Field(False, description="Let --pretrained-name download from the Hugging Face hub")
    allow_unsafe_pickle: bool = Field(
        False, description="Load .ckpt files that hold Python objects besides tensors (runs code from the file)")
    compile: Optional[bool] = Field(
        None, description="torch.compile the encoder: fused activations, faster once compiled; default: on for "
                          "CUDA jobs of at least 1 GB of input, where the warm-up pays back")
    channels_last: Optional[bool] = Field(
        None, description="Run the encoder's convolutions in the channels-last (time-major) memory layout, "
                          "several times faster on a CPU for few channels; default: on for a CPU device")
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = Field(
        None, description="Encoder precision (default fp32, fp16 with --model-half)")
    precision_check_limit: float = Field(
        0.25, gt=0, description="With fp16 / bf16: stop at start when a probe window encoded in that precision "
                                "differs from fp32 by more than this (error norm over the fp32 output's variation "
                                "in time; rounding stays below 0.07, broken kernels give 1 and more)")
    latent_mode: Literal["sample", "mean", "params"] = Field(
        "sample", description="VAE output: sample (seeded by key), mean, or params (mean and std)")
    chunking: Literal["crop", "split", "full"] = Field(
        "crop", description="crop: one window per file; split: every window of a long file; full: each file at its "
                            "own length (rounded up to the downsampling ratio), split only past --max-seconds")
    max_chunks: Optional[int] = Field(None, ge=1, description="With split or full: at most this many windows per file")
    resample_on: Literal["auto", "workers", "device"] = Field(
        "auto", description="Where files at another rate than the model's are resampled: in the decode workers, or "
                            "on the device after the host-to-device copy (the same kernel; it frees the decode "
                            "cores); auto: the device on a GPU, the workers on a CPU")
    min_duration: Optional[float] = Field(None, gt=0, description="Skip files shorter than this many seconds, before "
                                                                  "encoding (errors.jsonl lists each as rejected)")
    max_duration: Optional[float] = Field(None, gt=0, description="Skip files longer than this many seconds, before "
                                                                  "encoding (errors.jsonl lists each as rejected)")
    skip_silent: Optional[float] = Field(None, le=0, description="Skip files whose loudest window's RMS level stays "
                                                                 "under this many dBFS (-60: near silence), before "
                                                                 "encoding (errors.jsonl lists each as rejected)")
    max_seconds: float = Field(300.0, gt=0, le=MAX_SAMPLE_SIZE / 8000,
                               description="With full: the longest window; a longer file is split into windows "
                                           "of this length (its last one at its own length)")
    overlap: int = Field(0, ge=0, le=MAX_SAMPLE_SIZE,
                         description="With full: latent frames shared by the --max-seconds chunks of a longer file, "
                                     "which then comes out as one latent sequence without seams (Stable Audio 3's "
                                     "chunked encode_audio; at least the encoder's receptive field); 0: independent "
                                     "windows")
    bucket_buffer: int = Field(64, ge=1, le=100_000,
                               description="With full: windows held back to fill batches of one length (memory: "
                                           "up to this many windows of --max-seconds each)")
    folder: bool = Field(True, description="Write the per-rank folder layout OUT/{rank}/{id}.npy + .json, as "
                                           "stable-audio-tools' pre_encode does; off: only the latent shards and "
                                           "the unit records (2 objects fewer per window)")
    shards: bool = Field(True, description="Also write latent tar shards under OUT/shards")
    shard_maxcount: int = Field(10000, ge=1, description="Samples per latent shard before a new part")
    shard_maxsize: int = Field(3_000_000_000, ge=1024, description="Bytes per latent shard before a new part")
    latent_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of written latents")
    s3_profile: Optional[str] = Field(
        None, description="AWS profile for an s3:// output, and for s3:// datasets that name none (default: "
                          "AWS_PROFILE or the default chain)")
    s3_endpoint_url: Optional[str] = Field(
        None, description="S3-compatible endpoint (MinIO, R2, Ceph...) for the output and for datasets that name "
                          "none (default: AWS_ENDPOINT_URL, else AWS)")
    s3_region: Optional[str] = Field(None, description="S3 region (default: AWS_REGION or the profile's)")
    files_per_unit: int = Field(64, ge=1, description="audio_dir: files per work unit")
    relist: bool = Field(False, description="List the dataset again instead of using the units the output's first "
                         "run listed (kept in OUT/manifest/units.json.gz), e.g. after adding shards to the input")
    seed: int = Field(0, description="Seed for random crops, VAE sampling and shard shuffle")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (under a launcher: cuda:LOCAL_RANK)")
    cpus: Optional[float] = Field(
        None, gt=0, description="CPUs to plan decode workers and encoder threads for (default: an srun task's "
                                "--cpus-per-task, else what CPU affinity and the cgroup quota allow, split among the "
                                "ranks on this machine that share these cores)")
    devices: str = Field("auto", description="Started alone: ranks to start on this machine, one per GPU "
                                             "(auto: every visible GPU; on a CPU-only machine N CPU ranks)")
    max_restarts: int = Field(0, ge=0, le=100, description="With --devices N > 1: times torch's elastic agent "
                              "restarts the ranks after one dies (as torchrun --max-restarts); each restart "
                              "resumes from the committed units")
    part: Optional[str] = Field(None, description="K/N: run part K (0..N-1) of an array job of N parts that share "
                                "only the output (each a process, a torchrun job or --devices); not given: from "
                                "JOB_COMPLETION_INDEX (with --num-parts), AWS_BATCH_JOB_ARRAY_INDEX/"
                                "AWS_BATCH_JOB_ARRAY_SIZE or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set")
    num_parts: Optional[int] = Field(None, ge=1, description="N of an array job whose scheduler gives only the "
                                     "index (a Kubernetes Indexed Job: its completions)")
    lease_seconds: float = Field(60.0, gt=0, le=3600, description="An array part's lease: a retry of a part "
                                 "waits while the part's last holder was heard from within this many seconds "
                                 "(on another host; on the same host, while its process lives)")
    peer_timeout: float = Field(60.0, gt=0, description="Seconds without a heartbeat after which a rank is "
                                                       "taken as dead and the job stops")
    grace_seconds: float = Field(25.0, gt=0, le=3600, description="After a stop signal (SIGTERM, SIGINT, SIGUSR1): "
                                 "seconds the units in flight get to finish and commit before they are discarded; "
                                 "the run then exits 128 + the signal (143 for SIGTERM)")
    strict: bool = Field(False, description="Exit non-zero on any bad sample; refuse (exit 2) dataset config "
                                            "keys a run would ignore: unknown or misspelled ones")
    max_errors: Optional[int] = Field(None, ge=0, description="Exit non-zero when more bad samples than this")
    overwrite: bool = Field(False, description="Allow writing into a non-empty output of another run")
    progress: bool = Field(True, description="Show progress (a bar on a terminal, else a line every "
                                             "--progress-interval seconds)")
    progress_interval: float = Field(30.0, gt=0, description="Seconds between progress lines when stderr is "
                                                             "not a terminal (batch jobs, SLURM logs)")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in ("auto", "ddp"):
            raise ValueError(f"strategy {value!r} means nothing for encoding: there are no gradients or "
                             "optimizer state to shard, and every rank holds the whole encoder; use auto or ddp "
                             "(one encoding process per GPU)")
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value):
        text = str(value).strip()
        if text == "auto":
            return "auto"
        if text.isdigit() and 1 <= int(text) <= MAX_BATCH_SIZE:
            return int(text)
        raise ValueError(f"batch size {value!r}: use auto or a number of windows from 1 to {MAX_BATCH_SIZE}")

    @field_validator("devices", mode="before")
    @classmethod
    def _known_devices(cls, value: str) -> str:
        value = str(value).strip()
        if value == "auto" or (value.isdigit() and int(value) >= 1):
            return value
        raise ValueError(f"devices {value!r}: use auto or a number of ranks (1, 2, ...)")

    @field_validator("output_path", mode="before")
    @classmethod
    def _output_as_text(cls, value):
        if value is None:
            return None
        value = str(value).strip()
        if not value:
            raise ValueError("empty --output-path")
        if value.startswith("s3://") and not value[5:].split("/", 1)[0]:
            raise ValueError(f"{value!r}: no bucket name (use s3://bucket/prefix/)")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or value.startswith("cuda:"):
            return value
        raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _model_source(self) -> "EncodeConfig":
        has_pair = self.model_config_path is not None or self.ckpt_path is not None
        if self.pretrained_name is not None and has_pair:
            raise ValueError("give either --pretrained-name or --model-config with --ckpt-path, not both")
        if self.pretrained_name is None:
            if self.model_config_path is None or self.ckpt_path is None:
                missing = "--ckpt-path" if self.model_config_path is not None else "--model-config"
                if self.model_config_path is None and self.ckpt_path is None:
                    missing = "--model-config and --ckpt-path (or --pretrained-name)"
                raise ValueError(f"missing {missing}: a model config and its checkpoint go together")
        if self.dataset_config is None:
            raise ValueError("missing --dataset-config")
        if self.output_path is None:
            raise ValueError("missing --output-path")
        if self.model_half and self.precision not in (None, "fp16"):
            raise ValueError(f"--model-half conflicts with --precision {self.precision}")
        return self

    @model_validator(mode="after")
    def _overlap_needs_full(self) -> "EncodeConfig":
        if self.overlap and self.chunking != "full":
            raise ValueError(f"--overlap {self.overlap} works with --chunking full only (got --chunking "
                             f"{self.chunking}): it joins the --max-seconds chunks of a long file into one latent "
                             "sequence; drop --overlap or use --chunking full")
        if self.overlap and self.max_chunks is not None:
            raise ValueError(f"--overlap {self.overlap} and --max-chunks {self.max_chunks} exclude each other: with "
                             "--overlap a long file is one output window of its whole length; drop --max-chunks")
        return self

    @model_validator(mode="after")
    def _durations_leave_room(self) -> "EncodeConfig":
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise ValueError(f"--min-duration {self.min_duration:g} is over --max-duration {self.max_duration:g}: "
                             "every file would be skipped")
        return self

    @model_validator(mode="after")
    def _something_to_write(self) -> "EncodeConfig":
        if not self.folder and not self.shards:
            raise ValueError("--no-folder with --no-shards would write no latents at all: keep one output form "
                             "(--no-folder writes only the latent shards; --no-shards only the folder layout)")
        return self

    @property
    def effective_precision(self) -> str:
        if self.precision is not None:
            return self.precision
        return "fp16" if self.model_half else "fp32"

    def as_args(self) -> dict:
        """JSON-native dict with pre_encode.py's argument names (for details.json `args`)."""
        data = self.model_dump(mode="json", by_alias=True)
        return data


def encode_config_from(file_values: dict | None, cli_values: dict, source: str = "command line") -> EncodeConfig:
    """Merge defaults < config file < command line, validate, and raise ConfigError on problems."""
    merged: dict[str, Any] = {}
    for name, value in (file_values or {}).items():
        merged[name.replace("-", "_")] = value
    merged.update({k: v for k, v in cli_values.items()})
    if "model_config_path" in merged:
        merged["model_config"] = merged.pop("model_config_path")
    try:
        config = EncodeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    if config.strict and config.dataset_config is not None and config.dataset_config.is_file():
        # --strict refuses the dataset config's unknown keys here, with the options, before the run plans:
        # the plan loads the dataset config knowing nothing of --strict (its other problems are said there)
        load_dataset_config(config.dataset_config, strict=True, report=False)
    return config


def fields_help() -> dict[str, tuple[Any, str]]:
    """name -> (default, description) for every EncodeConfig field (CLI help text)."""
    out = {}
    for name, field in EncodeConfig.model_fields.items():
        out[field.alias or name] = (field.default, field.description or "")
    return out


# --------------------------------------------------------------------------- dataset config

# The keys of a stable-audio-tools dataset config, as its create_dataloader_from_config reads them
# (stable_audio_tools/data/dataset.py; pre_encode.py and train.py hand it the JSON as it is), and ours.
# Read to encode (a top-level custom_metadata_module: stable-audio-tools' audio_dir until 0.0.16, ours for all):
DATASET_KEYS_USED = ("dataset_type", "datasets", "random_crop", "custom_metadata_module")
DATASET_ENTRY_KEYS_USED = ("id", "path", "s3_path", "profile", "custom_metadata_module",
                           "endpoint_url", "region")   # the last two are ours (an S3-compatible store)
# Known, and ignored without a word: stable-audio-tools reads them to train, or to read latents back.
DATASET_KEYS_IGNORED = (
    "drop_last", "epoch_steps", "resampled_shards",                  # its training DataLoader and shard sampling
    "silence_threshold", "max_silence_duration", "volume_norm_param",  # settings of the two switches below
    "latent_crop_length", "latent_extension", "min_length_sec", "max_length_sec",   # "pre_encoded" datasets
    # switches of processing before encoding that wds-encode does not do: quiet while off, warned when on
    "remove_silence", "volume_norm", "pre_encoded",
)
DATASET_ENTRY_KEYS_IGNORED = ("latent_crop_length",)   # per dataset in its docs/datasets.md pre_encoded example
# The switches of stable-audio-tools' wds (and s3) reader that change what its pre_encode.py encodes, and what
# each does when true (its audio_dir reader has none of them)
NOT_APPLIED_WHEN_TRUE = {
    "remove_silence": "stable-audio-tools shortens the long silences of mono audio before encoding, "
                      "wds-encode encodes the audio as it is",
    "volume_norm": "stable-audio-tools sets each window's loudness (volume_norm_param, LUFS) before encoding, "
                   "wds-encode encodes the audio at its own loudness",
    "pre_encoded": "stable-audio-tools would read these shards as latents already encoded, wds-encode reads audio "
                   "from them and encodes it",
}
DATASET_TYPES = ("wds", "s3", "audio_dir")
_TYPES_HELP = ('"wds" (WebDataset tar shards, local or s3://), "s3" (the same; stable-audio-tools\' older name) '
               'or "audio_dir" (a folder of audio files)')
_ENTRY_HELP = '{"id": "a name", "path": "/folder/of/shards/"}'


@dataclass(frozen=True)
class IgnoredSetting:
    """A key of a dataset config that the run would not apply: unknown (`suggestion`: the closest known key), in
    the wrong place, or a stable-audio-tools switch that wds-encode does not do."""

    where: str                  # "" for the top level, else the entry: 'datasets[0] (id "x")'
    key: str
    text: str                   # what is wrong, in the user's words
    suggestion: Optional[str] = None

    def line(self, source: str, consequence: str = "it is ignored") -> str:
        return f"{source}: {self.where + ': ' if self.where else ''}{self.text}; {consequence}"


def _normal(key: str) -> str:
    return key.strip().lower().replace("-", "_").replace(" ", "_")


def closest_key(key: str, known: Sequence[str]) -> Optional[str]:
    """The known key `key` most likely misspells: the same but for case, dashes or spaces, else difflib's
    closest (ratio 0.6 and up); None when none is near."""
    by_normal = {_normal(k): k for k in known}
    if _normal(key) in by_normal:
        return by_normal[_normal(key)]
    found = difflib.get_close_matches(_normal(key), list(by_normal), n=1, cutoff=0.6)
    return by_normal[found[0]] if found else None


def _entry_label(index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    if isinstance(ident, str) and ident:
        return f"datasets[{index}] (id {json.dumps(ident)})"
    return f"datasets[{index}]"


def _json(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown_keys(obj: dict, known: Sequence[str], elsewhere: Sequence[str], where: str,
                  elsewhere_text: str) -> list[IgnoredSetting]:
    found = []
    for key in obj:
        if not isinstance(key, str) or key in known:
            continue
        if key in elsewhere:
            found.append(IgnoredSetting(where, key, f'"{key}" {elsewhere_text}'))
            continue
        suggestion = closest_key(key, known)
        hint = (f' (did you mean "{suggestion}"?)' if suggestion
                else " (not a key of stable-audio-tools or wds-encode)")
        found.append(IgnoredSetting(where, key, f"unknown key {json.dumps(key)}{hint}", suggestion))
    return found


def ignored_dataset_settings(data: Any) -> list[IgnoredSetting]:
    """Every key of a dataset config (as parsed from its JSON) that a run would not apply: keys that neither
    stable-audio-tools nor wds-encode knows, at the top level and in each entry of `datasets` (each with
    the closest known key), keys of one level given at the other, and stable-audio-tools' switches of
    processing before encoding (`NOT_APPLIED_WHEN_TRUE`) turned on. Its other keys pass without a word."""
    if not isinstance(data, dict):
        return []
    top_known = DATASET_KEYS_USED + DATASET_KEYS_IGNORED
    entry_known = DATASET_ENTRY_KEYS_USED + DATASET_ENTRY_KEYS_IGNORED
    found = _unknown_keys(data, top_known, entry_known, "", 'is a key of each dataset, not of the whole config '
                          '(move it into the entries of "datasets")')
    for key, what in NOT_APPLIED_WHEN_TRUE.items():
        if data.get(key) is True and data.get("dataset_type") in ("wds", "s3"):
            found.append(IgnoredSetting("", key, f'"{key}": true: {what}'))
    datasets = data.get("datasets")
    for index, entry in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(entry, dict):
            found += _unknown_keys(entry, entry_known, top_known, _entry_label(index, entry),
                                   "is a key of the whole config, not of one dataset (move it to the top level)")
    return found


def _missing(obj: dict, key: str, known: Sequence[str]) -> str:
    """` (is "pth" meant to be "path"?)` when an unknown key of `obj` is closest to the missing `key`."""
    for other in obj:
        if isinstance(other, str) and other not in known and closest_key(other, known) == key:
            return f' (is {json.dumps(other)} meant to be "{key}"?)'
    return ""


def dataset_config_problems(data: Any) -> list[str]:
    """What makes `data` no dataset config, one sentence per problem (without the file): a missing
    required key (dataset_type, datasets, each dataset's id, and its path or s3_path) or one of the
    wrong type, a repeated id. Values of other keys are checked by `DatasetConfig`."""
    if not isinstance(data, dict):
        return [f"a dataset config is a JSON object with \"dataset_type\" and \"datasets\" (got {_json(data)})"]
    top_known = DATASET_KEYS_USED + DATASET_KEYS_IGNORED
    entry_known = DATASET_ENTRY_KEYS_USED + DATASET_ENTRY_KEYS_IGNORED
    problems = []
    dataset_type = data.get("dataset_type")
    if "dataset_type" not in data:
        problems.append(f'no "dataset_type"{_missing(data, "dataset_type", top_known)}: give {_TYPES_HELP}')
    elif dataset_type == "pre_encoded":
        problems.append('"dataset_type" "pre_encoded" is stable-audio-tools\' reader of latents already encoded; '
                        f"to encode audio, give {_TYPES_HELP}")
    elif dataset_type not in DATASET_TYPES:
        problems.append(f'"dataset_type" {_json(dataset_type)} is not one wds-encode reads: give {_TYPES_HELP}')
    datasets = data.get("datasets")
    if "datasets" not in data:
        problems.append(f'no "datasets"{_missing(data, "datasets", top_known)}: give a list of the datasets to '
                        f"encode, each {_ENTRY_HELP}")
        return problems
    if isinstance(datasets, dict):
        return problems + [f'"datasets" is one object, not a list: put it in [ ] (a list of datasets, each '
                           f"{_ENTRY_HELP})"]
    if not isinstance(datasets, list):
        return problems + [f'"datasets" must be a list of datasets, each {_ENTRY_HELP} (got {_json(datasets)})']
    if not datasets:
        return problems + [f'"datasets" is empty: give at least one dataset, {_ENTRY_HELP}']
    first_of: dict[str, int] = {}
    for index, entry in enumerate(datasets):
        label = _entry_label(index, entry)
        if not isinstance(entry, dict):
            problems.append(f"{label} must be an object, {_ENTRY_HELP} (got {_json(entry)})")
            continue
        ident = entry.get("id")
        if "id" not in entry:
            problems.append(f'{label} has no "id"{_missing(entry, "id", entry_known)}: give each dataset a short '
                            "name, unique in the config (its work units are named ID/SHARD, and it is written as "
                            "dataset_id in the metadata of every window)")
        elif not isinstance(ident, str) or not ident.strip():
            problems.append(f'{label}: "id" must be a non-empty string, a short name unique in the config '
                            f"(got {_json(ident)})")
        elif ident in first_of:
            problems.append(f"datasets[{first_of[ident]}] and datasets[{index}] have the same id "
                            f"{json.dumps(ident)}: dataset ids must be unique (they name the work units and "
                            "outputs)")
        else:
            first_of[ident] = index
        for key in ("path", "s3_path"):
            if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
                problems.append(f'{label}: "{key}" must be a non-empty string (got {_json(entry[key])})')
        path, s3_path = entry.get("path"), entry.get("s3_path")
        if any(key in entry and not (isinstance(entry[key], str) and entry[key].strip())
               for key in ("path", "s3_path")):
            continue   # said above
        if dataset_type == "s3":
            if not s3_path and not (path or "").startswith("s3://"):
                got = (f' (its "path" {_json(path)} is not an s3:// URL)' if path
                       else _missing(entry, "s3_path", entry_known))
                problems.append(f'{label} has no "s3_path"{got}: "dataset_type" "s3" reads tar shards from S3, '
                                "give the s3://bucket/prefix/ that holds them")
        elif "path" not in entry and "s3_path" not in entry:
            what = ("the folder of its audio files" if dataset_type == "audio_dir"
                    else "the folder, tar shard pattern or s3:// URL of its audio")
            problems.append(f'{label} has no "path"{_missing(entry, "path", entry_known)}: give {what}')
    return problems


_PYDANTIC_WORDS = {"bool_type": "must be true or false", "bool_parsing": "must be true or false",
                   "string_type": "must be a string", "list_type": "must be a list",
                   "dict_type": "must be an object"}


def _dataset_validation_error(exc: ValidationError, data: dict, source: str) -> str:
    """pydantic's errors of a DatasetConfig in our words: `source: datasets[0] (id "x"): "profile" must be a
    string (got 3)`."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "datasets" and isinstance(loc[1], int):
            datasets = data.get("datasets")
            entry = datasets[loc[1]] if isinstance(datasets, list) and loc[1] < len(datasets) else None
            where, loc = _entry_label(loc[1], entry) + ": ", loc[2:]
        key = ".".join(str(p) for p in loc)
        msg = _PYDANTIC_WORDS.get(err["type"], err["msg"].removeprefix("Value error, "))
        got = f" (got {_json(err['input'])})" if "input" in err and err["type"] != "missing" else ""
        lines.append(f"{source}: {where}{json.dumps(key) + ' ' if key else ''}{msg}{got}")
    return "\n".join(lines)


class DatasetEntry(BaseModel):
    """One entry of `datasets[]` in a stable-audio-tools dataset config."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(..., min_length=1)
    path: Optional[str] = None
    s3_path: Optional[str] = None
    profile: Optional[str] = None          # AWS profile for this dataset's s3:// shards
    endpoint_url: Optional[str] = None     # S3-compatible endpoint (MinIO, R2, Ceph) for this dataset
    region: Optional[str] = None
    custom_metadata_module: Optional[str] = None


class DatasetConfig(BaseModel):
    """stable-audio-tools dataset JSON: `dataset_type`, `datasets[]`, `random_crop` (drop_last ignored).
    Unknown keys are kept (and dumped: the kept listing's fingerprint hashes the dump); `load_dataset_config`
    warns about them, or refuses them with --strict."""

    model_config = ConfigDict(extra="allow")

    dataset_type: Literal["audio_dir", "wds", "s3"]
    datasets: list[DatasetEntry] = Field(..., min_length=1)
    random_crop: bool = True
    custom_metadata_module: Optional[str] = None
    drop_last: Optional[bool] = None
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _paths_present(self) -> "DatasetConfig":
        problems = dataset_config_problems(self.model_dump(exclude_none=True))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def warnings(self) -> list[str]:
        """What `load_dataset_config` found the run would not apply, one line each, naming the file."""
        return list(self._warnings)

    def metadata_module_for(self, entry: DatasetEntry) -> Optional[str]:
        return entry.custom_metadata_module or self.custom_metadata_module


# torch's elastic agent gives the ranks that `--devices N` starts this run id prefix (job.distributed,
# spawn_local_ranks); the process that started them has checked the inputs, and said what it found, already
SPAWNED_RUN_ID_PREFIX = "wds-encode-"


def speaks_for_job(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process prints what the job's configuration check found: a process started alone (which
    may go on to start `--devices` ranks), or rank 0 under torchrun or srun; not the other ranks, nor the
    ranks `--devices` started (their parent printed it). Decode workers never load the config."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID", "").startswith(SPAWNED_RUN_ID_PREFIX):
        return False
    from .job.distributed import detect_launch   # here: it imports this module
    try:
        launch = detect_launch(env)
    except ConfigError:
        return True    # the run stops on this environment soon, with its own message
    return launch is None or launch.rank == 0


def load_dataset_config(path: str | Path, strict: bool = False, report: bool = True) -> DatasetConfig:
    """Read and check a dataset config. What the run would not apply (`ignored_dataset_settings`: unknown keys,
    with the closest known one) is refused with `strict`; otherwise kept in `.warnings` and, with `report`,
    printed to stderr by the process that speaks for the job (`speaks_for_job`)."""
    source = f"dataset config {path}"
    try:
        data = read_config_file(path)
    except ConfigError as exc:
        raise ConfigError(f"dataset config {exc}") from None
    problems = dataset_config_problems(data)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    ignored = ignored_dataset_settings(data)
    if strict and ignored:
        raise ConfigError("\n".join(s.line(source, "--strict refuses what a run would ignore") for s in ignored))
    try:
        config = DatasetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_dataset_validation_error(exc, data, source)) from None
    config._warnings = [s.line(source) for s in ignored]
    if report and config._warnings and speaks_for_job():
        for line in config._warnings:
            print(f"wds-encode: warning: {line}", file=sys.stderr)
    base = Path(path).resolve().parent
    for entry in config.datasets:
        for module_field in ("custom_metadata_module",):
            value = getattr(entry, module_field)
            if value and not Path(value).is_absolute() and not Path(value).exists():
                candidate = base / value
                if candidate.exists():
                    setattr(entry, module_field, str(candidate))
    return config


def load_model_config(path: str | Path) -> dict:
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config is a JSON object")
    for required in ("sample_rate", "model"):
        if required not in data:
            raise ConfigError(f"{path}: {required}: field required (a stable-audio-tools model config)")
    if not isinstance(data["sample_rate"], int) or data["sample_rate"] <= 0:
        raise ConfigError(f"{path}: sample_rate: must be a positive integer (got {data['sample_rate']!r})")
    return data
