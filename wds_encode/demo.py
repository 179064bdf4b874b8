"""`wds-encode demo`: a small real-audio dataset and the bundled model, to see the pipeline work.

The dataset is synthetic (tones, noise, sweeps) but real: FLAC/WAV/MP3/OGG files encoded by
libsndfile at 16-48 kHz, mono and stereo, in WebDataset tar shards with JSON metadata.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from .config import EncodeConfig
from .models import demo_model_paths
from .synth import write_tar_shards

DEMO_SAMPLE_SIZE = 65536  # ~1.5 s at the demo model's 44.1 kHz


def prepare_demo(directory: Path, *, num_shards: int = 3, samples_per_shard: int = 20, num_workers: int = 2,
                 batch_size: int = 8, progress: bool = True) -> EncodeConfig:
    """Write DIR/shards/*.tar and DIR/dataset_config.json; return the run's config (output DIR/out)."""
    directory = Path(directory)
    shards_dir = directory / "shards"
    if shards_dir.exists():
        shutil.rmtree(shards_dir)
    write_tar_shards(shards_dir, num_shards, samples_per_shard, seed=0, name="demo")
    dataset_config = directory / "dataset_config.json"
    dataset_config.write_text(json.dumps({
        "dataset_type": "wds",
        "datasets": [{"id": "demo", "path": str(shards_dir.resolve())}],
        "random_crop": False,
    }, indent=2))
    model_config, ckpt = demo_model_paths()
    output = directory / "out"
    return EncodeConfig(model_config=model_config, ckpt_path=ckpt, dataset_config=dataset_config,
                        output_path=output, batch_size=batch_size, sample_size=DEMO_SAMPLE_SIZE,
                        num_workers=num_workers, chunking="split", max_chunks=4, overwrite=True,
                        progress=progress, devices="1")  # 60 short files: one rank is plenty


def run_command_line(config: EncodeConfig) -> str:
    """The `wds-encode run ...` command that runs `config`: every option that differs from its default,
    with absolute paths, quoted for a POSIX shell (the demo prints it, to be rerun with other options)."""
    args = [command_name(), "run"]
    for name, field in EncodeConfig.model_fields.items():
        value = getattr(config, name)
        if value == field.default:
            continue
        flag = "--" + (field.alias or name).replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
            continue
        if isinstance(value, Path) or (name == "output_path" and "://" not in str(value)):
            value = Path(value).resolve()
        args += [flag, str(value)]
    return " ".join(shlex.quote(arg) for arg in args)


def command_name(argv0: str | None = None) -> str:
    """How to start this wds-encode again from the user's shell: `wds-encode` when that name finds it on
    PATH, else the absolute path of the script that is running (`make demo` runs .venv/bin/wds-encode,
    which an unactivated shell does not find)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) != "wds-encode" or not os.path.exists(argv0):
        return "wds-encode"   # started otherwise (python -m wds_encode, a test runner)
    found = shutil.which("wds-encode")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "wds-encode"
    return os.path.abspath(argv0)
