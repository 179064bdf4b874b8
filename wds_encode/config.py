"""Configuration at the edge: every option validated once, before any model is loaded.

`EncodeConfig` holds the command's options (stable-audio-tools pre_encode.py names and defaults,
plus ours). `DatasetConfig` parses stable-audio-tools dataset JSON. Both come from JSON or YAML
files; command-line flags override the file. Errors are `ConfigError` with the file and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    text = path.read_text(encoding="utf-8")
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
        1, description="Windows per encoder batch, or auto: the largest power of two (<= 256) that fits the "
                       "device with 20% to spare, found by a short probe at start")
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
    strict: bool = Field(False, description="Exit non-zero on any bad sample")
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
        return EncodeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def fields_help() -> dict[str, tuple[Any, str]]:
    """name -> (default, description) for every EncodeConfig field (CLI help text)."""
    out = {}
    for name, field in EncodeConfig.model_fields.items():
        out[field.alias or name] = (field.default, field.description or "")
    return out


# --------------------------------------------------------------------------- dataset config

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
    """stable-audio-tools dataset JSON: `dataset_type`, `datasets[]`, `random_crop` (drop_last ignored)."""

    model_config = ConfigDict(extra="allow")

    dataset_type: Literal["audio_dir", "wds", "s3"]
    datasets: list[DatasetEntry] = Field(..., min_length=1)
    random_crop: bool = True
    custom_metadata_module: Optional[str] = None
    drop_last: Optional[bool] = None

    @model_validator(mode="after")
    def _paths_present(self) -> "DatasetConfig":
        ids = [d.id for d in self.datasets]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"dataset ids must be unique, repeated: {dupes}")
        for i, entry in enumerate(self.datasets):
            if self.dataset_type == "s3":
                if not (entry.s3_path or (entry.path or "").startswith("s3://")):
                    raise ValueError(f"datasets[{i}] ({entry.id}): dataset_type s3 needs s3_path")
            elif not entry.path and not entry.s3_path:
                raise ValueError(f"datasets[{i}] ({entry.id}): needs path")
        return self

    def metadata_module_for(self, entry: DatasetEntry) -> Optional[str]:
        return entry.custom_metadata_module or self.custom_metadata_module


def load_dataset_config(path: str | Path) -> DatasetConfig:
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a dataset config is a JSON object with dataset_type and datasets")
    try:
        config = DatasetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
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
