"""encoder.py: precision, fp32 fallback, key-seeded VAE noise, latent modes, padding masks."""

import pytest
import torch

from wds_encode.config import load_model_config
from wds_encode.encoder import BatchEncoder, key_seed, latent_padding_mask
from wds_encode.models import demo_model_paths, load_autoencoder

N = 64 * 32


@pytest.fixture(scope="module")
def model():
    config, ckpt = demo_model_paths()
    return load_autoencoder(load_model_config(config), ckpt)


def batch(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    audio = 0.3 * torch.randn(n, 2, N, generator=gen)
    masks = torch.ones(n, N, dtype=torch.bool)
    masks[0, N // 2:] = False
    return audio, masks


def test_key_seed_is_stable():
    assert key_seed(0, "a/b") == key_seed(0, "a/b")
    assert len({key_seed(0, "a"), key_seed(1, "a"), key_seed(0, "b")}) == 3
    assert 0 <= key_seed(0, "x") < 2**63


def test_sample_mode_depends_on_key_not_on_batch(model):
    enc = BatchEncoder(model, device=torch.device("cpu"), latent_mode="sample", seed=5)
    audio, masks = batch()
    full = enc.encode(audio, masks, ["k0", "k1", "k2"])
    alone = enc.encode(audio[1:2], masks[1:2], ["k1"])
    torch.testing.assert_close(full.latents[1:2], alone.latents, rtol=1e-4, atol=1e-5)
    again = enc.encode(audio, masks, ["k0", "k1", "k2"])
    assert torch.equal(full.latents, again.latents)
    other_keys = enc.encode(audio, masks, ["x0", "x1", "x2"])
    assert not torch.allclose(full.latents, other_keys.latents)
    other_seed = BatchEncoder(model, device=torch.device("cpu"), seed=6).encode(audio, masks, ["k0", "k1", "k2"])
    assert not torch.allclose(full.latents, other_seed.latents)


def test_modes_and_shapes(model):
    audio, masks = batch()
    keys = ["a", "b", "c"]
    out = {mode: BatchEncoder(model, device=torch.device("cpu"), latent_mode=mode).encode(audio, masks, keys)
           for mode in ("sample", "mean", "params")}
    T = N // model.downsampling_ratio
    assert out["sample"].latents.shape == (3, model.latent_dim, T)
    assert out["mean"].latents.shape == (3, model.latent_dim, T)
    assert out["params"].latents.shape == (3, 2 * model.latent_dim, T)
    mean, std = out["params"].latents.chunk(2, dim=1)
    torch.testing.assert_close(mean, out["mean"].latents)
    assert (std > 0).all()
    # the sample lies within a few std of the mean, and is not the mean
    z = (out["sample"].latents - mean) / std
    assert 0.5 < z.std() < 2.0 and z.abs().max() < 8
    assert out["sample"].padding_masks.shape == (3, T)


def test_padding_mask_interpolation():
    masks = torch.zeros(2, 640, dtype=torch.bool)
    masks[0, :640] = True
    masks[1, :100] = True
    lat = latent_padding_mask(masks, 10)
    assert lat.dtype == torch.int32
    assert lat[0].tolist() == [1] * 10
    assert lat[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # nearest: latent i looks at sample 64*i


def test_low_precision_overflow_is_rerun_in_fp32(model):
    import copy
    loud = copy.deepcopy(model)
    with torch.no_grad():
        last = [m for m in loud.encoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
        last.weight.mul_(1e6)  # latents ~1e6: finite in fp32, inf in fp16
    audio, masks = batch()
    fp32 = BatchEncoder(loud, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, ["a", "b", "c"])
    assert all(fp32.finite) and fp32.latents.abs().max() > 65504
    enc = BatchEncoder(loud, device=torch.device("cpu"), precision="fp16", latent_mode="mean")
    out = enc.encode(audio, masks, ["a", "b", "c"])
    assert out.fp32_retry and enc.retries == 1 and all(out.finite)
    torch.testing.assert_close(out.latents, fp32.latents)


def test_non_finite_even_in_fp32_is_flagged_per_sample(model):
    audio, masks = batch()
    audio[1, 0, 10] = float("inf")
    out = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, ["a", "b", "c"])
    assert out.finite == [True, False, True]


def test_bf16_is_close_to_fp32(model):
    audio, masks = batch()
    ref = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, list("abc"))
    low = BatchEncoder(model, device=torch.device("cpu"), precision="bf16", latent_mode="mean")
    out = low.encode(audio, masks, list("abc"))
    assert out.latents.dtype == torch.float32 and not out.fp32_retry
    rel = (out.latents - ref.latents).norm() / ref.latents.norm()
    assert rel < 0.05


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_latents(model):
    audio, masks = batch()
    plain = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, list("abc"))
    compiled = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean", compile=True)
    out = compiled.encode(audio, masks, list("abc"))
    torch.testing.assert_close(out.latents, plain.latents, rtol=1e-4, atol=1e-4)
