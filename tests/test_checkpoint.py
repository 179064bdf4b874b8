"""models/checkpoint.py: a diffusion checkpoint loads only its encoder tensors, in memory and in time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from wds_encode.models import demo_model_paths

PADDING_MB = 250   # against a 60 MB bound: reading the whole file would show

MEASURE = r"""
import json, resource, sys, torch
from wds_encode.config import load_model_config
from wds_encode.models import load_autoencoder
cfg = json.loads(open(sys.argv[1]).read())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_autoencoder(cfg, sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = model.encode(torch.zeros(1, 2, 64 * 8), mode="mean")
print(json.dumps({"peak_growth_mb": (after - before) / 1024, "latent_shape": list(out.shape)}))
"""


def diffusion_config(autoencoder_config: dict) -> dict:
    return {"model_type": "diffusion_cond", "sample_rate": autoencoder_config["sample_rate"],
            "audio_channels": autoencoder_config["audio_channels"], "sample_size": 2097152,
            "model": {"pretransform": {"type": "autoencoder", "config": autoencoder_config["model"]},
                      "diffusion": {"type": "dit", "config": {}}, "io_channels": 16}}


@pytest.fixture(scope="module")
def padded_checkpoints(tmp_path_factory):
    """The demo VAE under `pretransform.model.` plus 250 MB of other (diffusion) tensors."""
    folder = tmp_path_factory.mktemp("padded")
    config_path, ckpt = demo_model_paths()
    state = {f"pretransform.model.{k}": v for k, v in load_file(str(ckpt)).items()}
    gen = torch.Generator().manual_seed(0)
    for i in range(PADDING_MB // 50):
        state[f"model.model.transformer.layers.{i}.weight"] = torch.randn(50 * 2**18, generator=gen)  # 50 MB
    cfg = folder / "model_config.json"
    cfg.write_text(json.dumps(diffusion_config(json.loads(config_path.read_text()))))
    save_file(state, str(folder / "model.safetensors"))
    torch.save({"state_dict": state}, folder / "model.ckpt")
    return cfg, folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_loading_a_diffusion_checkpoint_reads_only_the_encoder(padded_checkpoints, name):
    cfg, folder = padded_checkpoints
    assert (folder / name).stat().st_size > PADDING_MB * 2**20
    result = subprocess.run([sys.executable, "-c", MEASURE, str(cfg), str(folder / name)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["latent_shape"] == [1, 16, 8]
    # the encoder is ~0.2 MB; reading the whole file would add >= 250 MB
    assert measured["peak_growth_mb"] < 60, measured


def test_a_weight_norm_pair_that_folds_to_nan_is_refused_with_its_names(tmp_path):
    """A direction row of zeros makes weight = v * g / |v| = 0/0: the load says so instead of every
    latent coming out NaN."""
    config_path, ckpt = demo_model_paths()
    tensors = load_file(str(ckpt))
    key = next(k for k in sorted(tensors) if k.startswith("encoder.") and k.endswith(".weight_v"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 0
    broken = tmp_path / "zero_row.safetensors"
    save_file(tensors, str(broken))
    from wds_encode.models import CheckpointError, load_autoencoder
    base = key[: -len(".weight_v")]
    with pytest.raises(CheckpointError, match=rf"{base}\.weight gives non-finite values"):
        load_autoencoder(json.loads(config_path.read_text()), broken)
