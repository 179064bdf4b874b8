"""Autoencoders that turn audio into latents: stable-audio-tools' families (oobleck, dac, seanet) and
Stable Audio 3's SAME (same.py, with its transformer layers in transformer.py), loading their checkpoints
unchanged.

Public entry points:
- `load_autoencoder(model_config, ckpt_path, device=..., dtype=...)` -> `AutoencoderModel`
- `demo_model_paths()` -> (config_path, ckpt_path) of the small bundled demo model
"""

from __future__ import annotations

from pathlib import Path

from .autoencoder import AutoencoderModel
from .bottlenecks import Bottleneck, supported_bottleneck_types
from .errors import CheckpointError, ModelConfigError, UnsupportedModelError
from .factory import build_autoencoder, load_autoencoder, resolve_autoencoder_config

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_CONFIG_NAME = "demo_model_config.json"
DEMO_CKPT_NAME = "demo_model.safetensors"


def demo_model_paths() -> tuple[Path, Path]:
    """(model_config.json, weights.safetensors) of the bundled demo VAE (random weights)."""
    return _ASSETS / DEMO_CONFIG_NAME, _ASSETS / DEMO_CKPT_NAME


__all__ = [
    "AutoencoderModel",
    "Bottleneck",
    "CheckpointError",
    "ModelConfigError",
    "UnsupportedModelError",
    "build_autoencoder",
    "demo_model_paths",
    "load_autoencoder",
    "resolve_autoencoder_config",
    "supported_bottleneck_types",
]
