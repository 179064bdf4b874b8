"""models/same.py, models/transformer.py and the soft_norm bottleneck: Stable Audio 3's SAME autoencoders
against the numbers SA3's own code computed (tests/golden-sa3), in fp32 within 1e-4."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import GOLDEN_SA3_MODELS, assert_half_precision_close_or_refused, golden_sa3
from wds_encode.models import CheckpointError, ModelConfigError, UnsupportedModelError, load_autoencoder
from wds_encode.models.pretrained import resolve_pretrained
from wds_encode.models.same import SAMEEncoder, is_same_autoencoder
from wds_encode.models.transformer import banded_attention

TOLERANCE = 1e-4   # the golden README's: SDPA kernels differ in summation order


def _config(name: str, form: str = "model_config.json") -> dict:
    return json.loads((golden_sa3(name) / form).read_text())


def _load(name: str, *, form: str = "model_config.json", ckpt: str = "model.safetensors", **kw):
    return load_autoencoder(_config(name, form), golden_sa3(name) / ckpt, **kw)


def _padded_input(name: str, model) -> torch.Tensor:
    """SA3's `preprocess_audio_for_encoder`: zero-padded at the end to a multiple of the ratio."""
    x = torch.from_numpy(np.load(golden_sa3(name) / "input.npy"))
    return F.pad(x, (0, (-x.shape[-1]) % model.downsampling_ratio))


def _npy(name: str, file: str) -> torch.Tensor:
    return torch.from_numpy(np.load(golden_sa3(name) / file))


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("name", GOLDEN_SA3_MODELS)
def test_latents_pre_bottleneck_and_decoded_audio_match_sa3(name):
    model = _load(name, with_decoder=True)
    x = _padded_input(name, model)
    latents = _npy(name, "latents.npy")
    assert latents.abs().max() > 0.01                    # the golden is not a trivial all-zero output
    assert _max_error(model.encode_pre_bottleneck(x), _npy(name, "pre_bottleneck.npy")) < TOLERANCE
    assert _max_error(model.encode(x), latents) < TOLERANCE
    assert _max_error(model.decode(latents), _npy(name, "decoded.npy")) < TOLERANCE


@pytest.mark.parametrize("name", GOLDEN_SA3_MODELS)
def test_long_input_in_one_pass_matches_sa3(name):
    model = _load(name)
    long = _npy(name, "long_input.npy")
    assert _max_error(model.encode(long), _npy(name, "long_latents.npy")) < TOLERANCE


@pytest.mark.parametrize("form", ["model_config.json", "full_config.json"])
@pytest.mark.parametrize("ckpt", ["model.safetensors", "wrapped.safetensors"])
def test_both_config_forms_and_both_checkpoint_forms_load(form, ckpt):
    name = "same_tiny_shift"
    model = _load(name, form=form, ckpt=ckpt, with_decoder=True)
    assert (model.sample_rate, model.latent_dim, model.downsampling_ratio) == (44100, 8, 32)
    assert _max_error(model.encode(_padded_input(name, model)), _npy(name, "latents.npy")) < TOLERANCE


def _without_types(value):
    if isinstance(value, dict):
        return {k: _without_types(v) for k, v in value.items() if k != "type"}
    return value


def test_a_same_config_is_recognised_by_its_structure_not_its_types(tmp_path):
    """SA3's factory reads no `type` field: a SAME config without them (or with other ones) is SAME."""
    name = "same_tiny_window"
    config = _config(name)
    bare = _without_types(config)
    assert is_same_autoencoder(bare["model"])
    model = load_autoencoder(bare, golden_sa3(name) / "model.safetensors")
    assert _max_error(model.encode(_padded_input(name, model)), _npy(name, "latents.npy")) < TOLERANCE
    full = _config(name, "full_config.json")
    full["model"]["pretransform"]["type"] = "sa3_autoencoder"
    full["model"]["pretransform"]["config"] = _without_types(full["model"]["pretransform"]["config"])
    model = load_autoencoder(full, golden_sa3(name) / "wrapped.safetensors")
    assert _max_error(model.encode(_padded_input(name, model)), _npy(name, "latents.npy")) < TOLERANCE


def _rewrite(src, dst, edit) -> None:
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst))


def test_a_checkpoint_missing_one_attention_tensor_is_refused_with_its_name(tmp_path):
    name = "same_tiny_two_stage"
    key = "encoder.layers.1.transformers.1.self_attn.to_qkv.weight"
    broken = tmp_path / "broken.safetensors"
    _rewrite(golden_sa3(name) / "model.safetensors", broken, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys: \(1\) " + key.replace(".", r"\.")):
        load_autoencoder(_config(name), broken)
    # the same, nested as a full SA3 checkpoint holds it
    _rewrite(golden_sa3(name) / "wrapped.safetensors", broken, lambda t: t.pop("pretransform.model." + key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_autoencoder(_config(name, "full_config.json"), broken)


def test_an_unexpected_tensor_is_refused_with_its_name(tmp_path):
    name = "same_tiny_shift"
    extra = tmp_path / "extra.safetensors"
    _rewrite(golden_sa3(name) / "model.safetensors", extra,
             lambda t: t.update({"encoder.layers.0.transformers.0.self_attn.lambda_dc": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: \(1\) encoder\.layers\.0\.transformers\.0\.self_attn\.lambda_dc"):
        load_autoencoder(_config(name), extra)


def test_only_the_encoder_side_is_read_unless_decoding(tmp_path):
    """Encoding reads encoder.* and bottleneck.*: a checkpoint whose decoder tensors are gone still encodes."""
    name = "same_tiny_shift"
    enc_only = tmp_path / "enc.safetensors"
    _rewrite(golden_sa3(name) / "model.safetensors", enc_only,
             lambda t: [t.pop(k) for k in list(t) if k.startswith("decoder.")])
    model = load_autoencoder(_config(name), enc_only)
    assert model.decoder is None
    assert _max_error(model.encode(_padded_input(name, model)), _npy(name, "latents.npy")) < TOLERANCE
    with pytest.raises(CheckpointError, match="missing keys"):
        load_autoencoder(_config(name), enc_only, with_decoder=True)


def test_a_rotary_buffer_with_other_frequencies_is_refused(tmp_path):
    name = "same_tiny_shift"
    key = "encoder.layers.0.transformers.1.rope.inv_freq"
    odd = tmp_path / "odd.safetensors"
    _rewrite(golden_sa3(name) / "model.safetensors", odd, lambda t: t.__setitem__(key, t[key] * 1.5))
    with pytest.raises(CheckpointError, match="layers.0.transformers.1.rope.inv_freq"):
        load_autoencoder(_config(name), odd)


def test_the_shift_model_pads_33_frames_on_to_34_as_sa3_does():
    """Its input pads to 33 latent frames; SAME pads on to whole chunks (8 patches = 2 frames), so SA3
    returns 34. wds-encode returns the same 34 (the run marks the 34th as padding: tests/test_encoder.py)."""
    model = _load("same_tiny_shift")
    meta = json.loads((golden_sa3("same_tiny_shift") / "meta.json").read_text())
    assert meta["latent_frames_of_padded_input"] == 33 and meta["latent_shape"][-1] == 34
    x = _padded_input("same_tiny_shift", model)
    assert x.shape[-1] == 33 * 32
    assert model.latent_length(1036) == model.latent_length(x.shape[-1]) == 34
    assert model.encode(x).shape[-1] == 34
    assert model.latent_length(1024) == 32 and model.latent_length(1025) == 34


@pytest.mark.parametrize("name", GOLDEN_SA3_MODELS)
def test_a_window_encoded_alone_equals_it_in_a_batch(name):
    model = _load(name)
    x = _padded_input(name, model)
    batch = model.encode(torch.cat([x, x.flip(0), x * 0.5]))
    for i in range(2):
        alone = model.encode(x[i:i + 1])
        assert _max_error(alone, batch[i:i + 1]) <= 1e-5 * max(1.0, float(alone.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["same_tiny_shift", "same_tiny_window"])
def test_half_precision_encode_is_close(name, dtype):
    ref = _load(name)
    x = _padded_input(name, ref)
    expected = ref.encode(x)
    half = _load(name, dtype=dtype)
    out = half.encode(x)
    assert out.dtype == dtype
    rel = float((out.float() - expected).norm() / expected.norm())
    assert_half_precision_close_or_refused(lambda: _load(name), dtype, rel, x.shape[-1])


# ----------------------------------------------------------------------------- attention
def _band_reference(q, k, v, left, right):
    """SA3's masked-SDPA fallback: one N x N additive band mask."""
    n = q.shape[-2]
    delta = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    mask = torch.zeros(n, n).masked_fill(~((delta >= -left) & (delta <= right)), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1000])
@pytest.mark.parametrize("window", [(0, 0), (3, 5), (17, 17), (40, 2)])
def test_banded_attention_equals_one_band_mask(n, window):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
    expected = _band_reference(q, k, v, *window)
    for block in (1, 16, 64, 256):
        out = banded_attention(q, k, v, *window, block=block)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_banded_attention_on_a_long_sequence_needs_no_n_by_n_mask():
    """2^17 tokens: an N x N fp32 mask alone would be 64 GiB; the banded form needs N x (block + halo)."""
    n = 1 << 17
    q = k = v = torch.randn(1, 1, n, 4)
    out = banded_attention(q, k, v, 17, 17)
    assert out.shape == (1, 1, n, 4) and bool(torch.isfinite(out).all())
    # spot-check a query in the middle against attention over its own band
    i = n // 2 + 5
    keys = slice(i - 17, i + 18)
    scores = (q[0, 0, i] @ k[0, 0, keys].T) / 2.0
    torch.testing.assert_close(out[0, 0, i], scores.softmax(-1) @ v[0, 0, keys], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- configs
def _encoder_config(name: str, **changes) -> dict:
    config = copy.deepcopy(_config(name))
    config["model"]["encoder"]["config"].update(changes)
    return config


def test_config_errors_name_the_field():
    with pytest.raises(ModelConfigError, match=r"model\.encoder\.config\.in_channels' = 8 but the patched pretransform gives 2 x 8 = 16"):
        load_autoencoder(_encoder_config("same_tiny_shift", in_channels=8), None)
    with pytest.raises(ModelConfigError, match=r"transformer_depths' must be a list of 1"):
        load_autoencoder(_encoder_config("same_tiny_shift", transformer_depths=[2, 2]), None)
    with pytest.raises(ModelConfigError, match=r"chunk_size' = 6 must be a multiple of every stride"):
        load_autoencoder(_encoder_config("same_tiny_shift", chunk_size=6), None)
    with pytest.raises(ModelConfigError, match=r"sliding_window' must be \[left, right\]"):
        load_autoencoder(_encoder_config("same_tiny_window", sliding_window=[1]), None)
    with pytest.raises(UnsupportedModelError, match=r"encoder\.config\.conformer' = true is not supported"):
        load_autoencoder(_encoder_config("same_tiny_shift", conformer=True), None)
    config = _config("same_tiny_shift")
    config["model"]["pretransform"]["config"]["oversampling"] = 2
    with pytest.raises(UnsupportedModelError, match="oversampling"):
        load_autoencoder(config, None)
    config = _config("same_tiny_shift")
    config["model"]["bottleneck"]["config"]["dim"] = 6
    with pytest.raises(ModelConfigError, match=r"soft_norm bottleneck's 'dim' \(6\)"):
        load_autoencoder(config, None)


def test_options_sa3_ignores_are_ignored_with_a_warning():
    """SA3 hands its config on as **kwargs and drops what no layer takes; refusing such a config would
    refuse a model SA3 loads. Training switches are accepted silently."""
    name = "same_tiny_shift"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_autoencoder(_encoder_config(name, some_future_option=1, checkpointing=True),
                                 golden_sa3(name) / "model.safetensors")
    assert [str(w.message) for w in caught if "some_future_option" in str(w.message)]
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert _max_error(model.encode(_padded_input(name, model)), _npy(name, "latents.npy")) < TOLERANCE


def test_soft_norm_bottleneck_scales_by_its_running_std():
    model = _load("same_tiny_window", with_decoder=True)
    b = model.bottleneck
    pre = torch.randn(1, 8, 5)
    expected = (pre * b.scaling_factor + b.bias) / b.running_std
    torch.testing.assert_close(b.encode(pre), expected)
    torch.testing.assert_close(b.decode(expected), expected * b.running_std)
    assert float(b.running_std) != 1.0          # the golden checkpoint's value is really read


def test_flops_count_every_linear_layer():
    """SAMEEncoder.flops, restated for the one-stage tiny model by hand."""
    model = _load("same_tiny_shift")
    enc: SAMEEncoder = model.encoder
    n = 33 * 32                      # 132 patches -> padded to 136 -> 34 groups of 4 (+1 new token)
    tokens, seq, dim = 136, 34 * 5, 32
    mapping = 2 * tokens * 16 * dim
    inner = 96
    per_layer = 2 * seq * (dim * 5 * dim + dim * dim + dim * 2 * inner + inner * dim) + 2 * 2 * seq * 10 * dim * 2
    assert enc.flops(n) == pytest.approx(mapping + 2 * per_layer + 2 * 34 * dim * 8)


def test_pretrained_name_finds_same_l_in_the_hugging_face_cache(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--stabilityai--SAME-L"
    snapshot = repo / "snapshots" / "5ame"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("5ame")
    shutil.copy(golden_sa3("same_tiny_window") / "model_config.json", snapshot / "model_config.json")
    shutil.copy(golden_sa3("same_tiny_window") / "model.safetensors", snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config, ckpt = resolve_pretrained("stabilityai/SAME-L")
    assert (config, ckpt) == (snapshot / "model_config.json", snapshot / "model.safetensors")
    model = load_autoencoder(json.loads(config.read_text()), ckpt)
    assert _max_error(model.encode(_padded_input("same_tiny_window", model)),
                      _npy("same_tiny_window", "latents.npy")) < TOLERANCE
