"""stable-audio-tools' own autoencoder configs build and encode here.

Shrunk copies (same structure and options, small widths) of the configs in stable-audio-tools'
configs/model_configs/autoencoders/ not covered by tests/test_models_dac.py and
tests/test_models_seanet.py, plus the Stable Audio Open VAE at full size.
"""

import copy

import pytest
import torch

from wds_encode.models import build_autoencoder, load_autoencoder
from wds_encode.models.reference_configs import STABLE_AUDIO_OPEN_VAE

TRAINING = {"training": {"learning_rate": 1e-4, "loss_configs": {"bottleneck": {"type": "kl"}}}}

# stable_audio_1_0_vae.json: dac encoder/decoder, vae (d_model 128 -> 4, decoder channels 1536 -> 32)
STABLE_AUDIO_1_0_VAE = {
    "model_type": "autoencoder", "sample_size": 65536, "sample_rate": 44100, "audio_channels": 2,
    "model": {
        "encoder": {"type": "dac", "config": {"in_channels": 2, "latent_dim": 128, "d_model": 4,
                                               "strides": [4, 4, 8, 8]}},
        "decoder": {"type": "dac", "config": {"out_channels": 2, "latent_dim": 64, "channels": 32,
                                               "rates": [8, 8, 4, 4]}},
        "bottleneck": {"type": "vae"}, "latent_dim": 64, "downsampling_ratio": 1024, "io_channels": 2,
    }, **TRAINING,
}

# stable_audio_2_0_vae.json (and stable-audio-open-1.0's vae_config.json): oobleck, vae
STABLE_AUDIO_2_0_VAE_FULL = {**STABLE_AUDIO_OPEN_VAE, **TRAINING}


def shrink_oobleck(config, channels=4):
    small = copy.deepcopy(config)
    for part in ("encoder", "decoder"):
        small["model"][part]["config"]["channels"] = channels
    return small


def diffusion_cond(autoencoder):
    """The Stable Audio Open model_config.json layout: the autoencoder as the diffusion pretransform."""
    return {"model_type": "diffusion_cond", "sample_size": 2097152, "sample_rate": 44100, "audio_channels": 2,
            "model": {"pretransform": {"type": "autoencoder", "iterate_batch": True,
                                       "config": autoencoder["model"]},
                      "conditioning": {"configs": [], "cond_dim": 768},
                      "diffusion": {"type": "dit", "config": {"io_channels": 64, "embed_dim": 1536}},
                      "io_channels": 64}}


@pytest.mark.parametrize("config", [STABLE_AUDIO_1_0_VAE, shrink_oobleck(STABLE_AUDIO_2_0_VAE_FULL)],
                         ids=["stable_audio_1_0_vae", "stable_audio_2_0_vae"])
def test_shrunk_configs_encode_and_round_trip(config):
    torch.manual_seed(0)
    model = build_autoencoder(config, with_decoder=True).eval()
    ratio = config["model"]["downsampling_ratio"]
    audio = 0.1 * torch.randn(2, 2, 4 * ratio)
    latents = model.encode(audio, mode="mean")
    assert latents.shape == (2, config["model"]["latent_dim"], 4)
    assert model.decode(latents).shape == audio.shape
    for mode in ("sample", "params"):
        assert torch.isfinite(model.encode(audio, mode=mode)).all()


def test_diffusion_cond_layout_builds_the_same_autoencoder(tmp_path):
    from safetensors.torch import save_file

    from wds_encode.models.checkpoint import unfold_weight_norm
    small = shrink_oobleck(STABLE_AUDIO_2_0_VAE_FULL)
    torch.manual_seed(1)
    model = build_autoencoder(small).eval()
    state = {f"pretransform.model.{k}": v for k, v in unfold_weight_norm(model.state_dict()).items()}
    state["model.model.transformer.layers.0.weight"] = torch.zeros(16, 16)  # the diffusion part
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_autoencoder(diffusion_cond(small), tmp_path / "model.safetensors")
    audio = 0.1 * torch.randn(1, 2, 2048 * 2)
    torch.testing.assert_close(loaded.encode(audio, mode="mean"), model.encode(audio, mode="mean"))


def test_stable_audio_open_vae_at_full_size_encodes():
    torch.manual_seed(0)
    model = build_autoencoder(STABLE_AUDIO_2_0_VAE_FULL).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 40e6 < params < 120e6  # the real encoder's size, not a toy
    audio = 0.1 * torch.randn(1, 2, 2048 * 4)
    latents = model.encode(audio, mode="mean")
    assert latents.shape == (1, 64, 4) and torch.isfinite(latents).all()
