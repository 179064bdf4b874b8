"""Model configs of published stable-audio-tools autoencoders, for benchmarks and tests.

Architecture only (no training section); weights are not bundled.
"""

# stable-audio-tools' stable_audio_2_0_vae.json = stable-audio-open-1.0's vae_config.json
STABLE_AUDIO_OPEN_VAE = {
    "model_type": "autoencoder", "sample_size": 65536, "sample_rate": 44100, "audio_channels": 2,
    "model": {
        "encoder": {"type": "oobleck", "config": {"in_channels": 2, "channels": 128, "c_mults": [1, 2, 4, 8, 16],
                                                  "strides": [2, 4, 4, 8, 8], "latent_dim": 128, "use_snake": True}},
        "decoder": {"type": "oobleck", "config": {"out_channels": 2, "channels": 128, "c_mults": [1, 2, 4, 8, 16],
                                                  "strides": [2, 4, 4, 8, 8], "latent_dim": 64, "use_snake": True,
                                                  "final_tanh": False}},
        "bottleneck": {"type": "vae"}, "latent_dim": 64, "downsampling_ratio": 2048, "io_channels": 2,
    },
}
