"""`wds-encode demo`: a small real-audio dataset and the bundled model, to see the pipeline work.

The dataset is synthetic (tones, noise, sweeps) but real: FLAC/WAV/MP3/OGG files encoded by
libsndfile at 16-48 kHz, mono and stereo, in WebDataset tar shards with JSON metadata.
"""

from __future__ import annotations

import json
import shutil
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
