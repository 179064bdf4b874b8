"""Generator of the bundled demo model (`assets/demo_model_config.json` + `.safetensors`).

The demo lets `wds-encode demo`, the tests and CI run end to end with no download. Its initial
weights are seeded and scaled so activations stay O(0.1..1) through every layer; the bundled
file is that init trained briefly on synthetic audio (scripts/train_demo_model.py), so the round
trip is recognisable and `wds-encode verify` has something real to check. They are saved in
stable-audio-tools' layout
(`weight_g` / `weight_v`, decoder included), so loading the demo exercises the same code path as
a real checkpoint, and stable-audio-tools itself can load the files.
"""

from __future__ import annotations

import re
from typing import Any

import torch

DEMO_SEED = 20240601

DEMO_MODEL_CONFIG: dict[str, Any] = {
    "model_type": "autoencoder",
    "sample_size": 65536,
    "sample_rate": 44100,
    "audio_channels": 2,
    "model": {
        "encoder": {
            "type": "oobleck",
            "config": {"in_channels": 2, "channels": 8, "c_mults": [1, 2, 4],
                       "strides": [2, 4, 8], "latent_dim": 32, "use_snake": True},
        },
        "decoder": {
            "type": "oobleck",
            "config": {"out_channels": 2, "channels": 8, "c_mults": [1, 2, 4],
                       "strides": [2, 4, 8], "latent_dim": 16, "use_snake": True,
                       "final_tanh": False},
        },
        "bottleneck": {"type": "vae"},
        "latent_dim": 16,
        "downsampling_ratio": 64,
        "io_channels": 2,
    },
}

# Second conv of a residual unit: `<...>.layers.<block>.layers.<unit>.layers.3.weight`.
_RESIDUAL_OUT = re.compile(r"\.layers\.\d+\.layers\.\d+\.layers\.3\.weight$")


def demo_state_dict(config: dict[str, Any] = DEMO_MODEL_CONFIG, seed: int = DEMO_SEED
                    ) -> dict[str, torch.Tensor]:
    """Seeded weights in stable-audio-tools key layout for `config`."""
    from .factory import build_autoencoder

    model = build_autoencoder(config, with_decoder=True)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, ref in sorted(model.state_dict().items()):
        shape = tuple(ref.shape)
        if key.endswith(".weight") and ref.dim() == 3:
            # weight = g * v / ||v||: rows of norm g keep the output variance ~ g^2 * input's.
            base = key[: -len(".weight")]
            gain = 0.5 if _RESIDUAL_OUT.search(key) else 1.0
            out[base + ".weight_v"] = torch.randn(shape, generator=gen)
            out[base + ".weight_g"] = torch.full((shape[0], 1, 1), gain)
        elif key.endswith(".alpha") or key.endswith(".beta"):  # SnakeBeta, log scale
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            out[key] = 0.01 * torch.randn(shape, generator=gen)
        else:  # pragma: no cover - oobleck has no other tensor kinds
            raise AssertionError(f"unexpected demo model tensor {key}")
    # VAE: bias the scale half of the encoder output so std = softplus(scale) is ~0.2.
    latent = config["model"]["latent_dim"]
    final_bias = f"encoder.layers.{len(config['model']['encoder']['config']['strides']) + 2}.bias"
    out[final_bias][latent:] -= 1.5
    return out
