"""Tests for the SEANet (EnCodec) encoder/decoder (`type: "seanet"`): checkpoint key names as
EnCodec's module tree produces them, stable-audio-tools' ratio handling, padding arithmetic,
options, half precision and checkpoint round trips. There is no golden data for SEANet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import assert_half_precision_close_or_refused
from wds_encode.models import (
    ModelConfigError,
    UnsupportedModelError,
    build_autoencoder,
    load_autoencoder,
    supported_bottleneck_types,
)
from wds_encode.models.checkpoint import unfold_weight_norm
from wds_encode.models.seanet import SConv1d, SEANetDecoder, SEANetEncoder, _pad1d

# Shrunk copy of stable_audio_tools/configs/model_configs/autoencoders/encodec_musicgen_rvq.json
# (dimension 128 -> 16, n_filters 64 -> 2; same ratios, residual layers, dilation base, LSTM
# depth and norm). Its `rvq` bottleneck is swapped for tanh: these tests are about the codec.
SEANET = {"channels": 1, "dimension": 16, "n_filters": 2, "ratios": [4, 4, 5, 8],
          "n_residual_layers": 1, "dilation_base": 2, "lstm": 2, "norm": "weight_norm"}
MUSICGEN = {
    "model_type": "autoencoder", "sample_size": 32000, "sample_rate": 32000, "audio_channels": 1,
    "model": {
        "encoder": {"type": "seanet", "config": copy.deepcopy(SEANET)},
        "decoder": {"type": "seanet", "config": copy.deepcopy(SEANET)},
        "bottleneck": {"type": "tanh"},
        "latent_dim": 16, "downsampling_ratio": 640, "io_channels": 1,
    },
}


def config(encoder: dict | None = None, decoder: dict | None = None, **model) -> dict:
    cfg = copy.deepcopy(MUSICGEN)
    cfg["model"]["encoder"]["config"].update(encoder or {})
    cfg["model"]["decoder"]["config"].update(decoder or {})
    cfg["model"].update(model)
    return cfg


def _audio(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return 0.5 * torch.randn(batch, 1, n, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- key names
# Derived by hand from facebookresearch/encodec `encodec/modules/seanet.py` (SEANetEncoder /
# SEANetDecoder / SEANetResnetBlock), `conv.py` (SConv1d.conv -> NormConv1d.conv -> nn.Conv1d
# wrapped in torch weight_norm; SConvTranspose1d.convtr -> NormConvTranspose1d.convtr; the
# `norm` submodule is a parameter-free Identity for weight_norm) and `lstm.py` (SLSTM.lstm =
# nn.LSTM), for channels=1, dimension=8, n_filters=2, ratios=[2, 4] as stable-audio-tools
# passes them, n_residual_layers=1, lstm=1, true_skip=False (EnCodec's default).
def _conv(prefix: str) -> list[str]:
    return [f"{prefix}.bias", f"{prefix}.weight_g", f"{prefix}.weight_v"]


def _resblock(prefix: str) -> list[str]:
    return (_conv(f"{prefix}.block.1.conv.conv") + _conv(f"{prefix}.block.3.conv.conv")
            + _conv(f"{prefix}.shortcut.conv.conv"))


LSTM1 = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0"]
EXPECTED_ENCODER_KEYS = (
    _conv("model.0.conv.conv")            # SConv1d(1 -> 2, k7)
    + _resblock("model.1")                # resnet block at width 2 (model.2 = ELU)
    + _conv("model.3.conv.conv")          # SConv1d(2 -> 4, k4, stride 2)
    + _resblock("model.4")                # resnet block at width 4 (model.5 = ELU)
    + _conv("model.6.conv.conv")          # SConv1d(4 -> 8, k8, stride 4)
    + [f"model.7.{k}" for k in LSTM1]     # SLSTM(8, 1 layer)   (model.8 = ELU)
    + _conv("model.9.conv.conv")          # SConv1d(8 -> dimension 8, k7)
)
EXPECTED_DECODER_KEYS = (
    _conv("model.0.conv.conv")            # SConv1d(dimension 8 -> 8, k7)
    + [f"model.1.{k}" for k in LSTM1]     # SLSTM(8)            (model.2 = ELU)
    + _conv("model.3.convtr.convtr")      # SConvTranspose1d(8 -> 4, k4, stride 2)
    + _resblock("model.4")                # (model.5 = ELU)
    + _conv("model.6.convtr.convtr")      # SConvTranspose1d(4 -> 2, k8, stride 4)
    + _resblock("model.7")                # (model.8 = ELU)
    + _conv("model.9.conv.conv")          # SConv1d(2 -> 1, k7)
)
SMALL = {"channels": 1, "dimension": 8, "n_filters": 2, "ratios": [2, 4], "lstm": 1}


def small_config() -> dict:
    return config(SMALL, SMALL, latent_dim=8, downsampling_ratio=8)


def test_state_dict_keys_match_encodec_module_tree():
    model = build_autoencoder(small_config(), with_decoder=True)
    sat = unfold_weight_norm(model.state_dict())  # back to torch weight_norm naming
    enc = [k[len("encoder."):] for k in sat if k.startswith("encoder.")]
    dec = [k[len("decoder."):] for k in sat if k.startswith("decoder.")]
    assert sorted(enc) == sorted(EXPECTED_ENCODER_KEYS)
    assert sorted(dec) == sorted(EXPECTED_DECODER_KEYS)
    shapes = {k: tuple(v.shape) for k, v in sat.items()}
    assert shapes["encoder.model.3.conv.conv.weight_v"] == (4, 2, 4)  # [out, in, 2 * stride]
    assert shapes["encoder.model.1.block.1.conv.conv.weight_v"] == (1, 2, 3)  # compress 2
    assert shapes["encoder.model.1.shortcut.conv.conv.weight_v"] == (2, 2, 1)
    assert shapes["encoder.model.7.lstm.weight_ih_l0"] == (32, 8)  # 4 gates x 8
    assert shapes["decoder.model.3.convtr.convtr.weight_v"] == (8, 4, 4)  # [in, out, k]
    assert shapes["decoder.model.3.convtr.convtr.weight_g"] == (8, 1, 1)
    assert shapes["decoder.model.9.conv.conv.weight_v"] == (1, 2, 7)


def test_options_change_the_tree():
    enc = SEANetEncoder(channels=2, dimension=4, n_filters=4, ratios=[2], n_residual_layers=2,
                        true_skip=True, compress=4, residual_kernel_size=5, dilation_base=3,
                        lstm=0, norm="time_group_norm")
    keys = set(enc.state_dict())
    assert not any("shortcut" in k or "lstm" in k for k in keys)  # true_skip, lstm=0
    assert {"model.0.conv.norm.weight", "model.0.conv.norm.bias"} <= keys  # GroupNorm(1, C)
    conv = enc.model[2].block[1].conv.conv  # second resnet block: dilation 3**1, k5, 4 -> 1
    assert (conv.kernel_size, conv.dilation, conv.out_channels) == ((5,), (3,), 1)
    assert enc.model[1].block[1].conv.conv.dilation == (1,)
    assert enc(torch.randn(1, 2, 10)).shape == (1, 4, 5)


# ----------------------------------------------------------------------------- SAT contract
def test_musicgen_shrunk_config_encode_and_round_trip():
    cfg = config()
    before = copy.deepcopy(cfg)
    torch.manual_seed(0)
    model = load_autoencoder(cfg, None, with_decoder=True)
    assert cfg == before  # stable-audio-tools reverses `ratios` in place; we must not
    audio = _audio(3 * 640)
    z = model.encode(audio)
    assert z.shape == (2, 16, 3) and model.latent_length(3 * 640) == 3
    out = model.decode(z)
    assert out.shape == audio.shape and torch.isfinite(out).all()
    # the encoder downsamples in the listed order (SAT reverses, SEANetEncoder reverses back) and
    # the decoder upsamples in the same listed order: they are not mirror images
    assert model.encoder.strides == [4, 4, 5, 8]
    enc_k = [m.conv.conv.kernel_size[0] for m in model.encoder.model
             if isinstance(m, SConv1d) and m.stride > 1]
    dec_k = [m.convtr.convtr.kernel_size[0] for m in model.decoder.model
             if hasattr(m, "convtr")]
    assert enc_k == dec_k == [8, 8, 10, 16]


def test_musicgen_rvq_bottleneck_when_registered():
    if "rvq" not in supported_bottleneck_types():
        pytest.skip("the rvq bottleneck is not in the registry yet")
    cfg = config()
    cfg["model"]["bottleneck"] = {"type": "rvq", "config": {
        "num_quantizers": 4, "codebook_size": 32, "dim": 16, "decay": 0.99,
        "threshold_ema_dead_code": 2}}
    model = build_autoencoder(cfg)
    assert model.encode_pre_bottleneck(_audio(640)).shape == (2, 16, 1)


def test_latent_length_rounds_up():
    # SConv1d pads the right end so the last window is full: ceil(N / hop) frames
    model = build_autoencoder(config(), with_decoder=True)
    n = 3 * 640 + 17
    z = model.encode(_audio(n))
    assert z.shape[-1] == 4 == model.latent_length(n)
    assert model.decode(z).shape[-1] == 4 * 640


def test_encodec_reference_shapes():
    # the shapes EnCodec's own seanet.py `test()` asserts for its defaults
    torch.manual_seed(0)
    encoder, decoder = SEANetEncoder(), SEANetDecoder()
    x = torch.randn(1, 1, 24000)
    with torch.no_grad():
        z = encoder(x)
        assert list(z.shape) == [1, 128, 75]
        assert decoder(z).shape == x.shape


# ----------------------------------------------------------------------------- padding
def test_pad1d_reflect_on_short_input():
    # EnCodec's pad1d: zeros are appended first when the input is not longer than the padding,
    # then dropped again: [1, 2] padded (3, 3) -> reflect([1, 2, 0, 0], 3)[:-2]
    x = torch.tensor([[[1.0, 2.0]]])
    assert _pad1d(x, 3, 3, "reflect").flatten().tolist() == [0, 0, 2, 1, 2, 0, 0, 0]
    long = torch.arange(8.0).reshape(1, 1, 8)
    assert torch.equal(_pad1d(long, 2, 3, "reflect"), F.pad(long, (2, 3), mode="reflect"))
    assert torch.equal(_pad1d(x, 1, 2, "constant"), F.pad(x, (1, 2)))


@pytest.mark.parametrize("length,pads", [(6, (1, 1)), (7, (1, 2))])
def test_sconv1d_padding(length, pads):
    # k=4, s=2: padding_total = (k-1) - (s-1) = 2, split (1, 1); an odd length gets one extra
    # sample on the right so that ceil(L / 2) frames come out
    conv = SConv1d(1, 1, 4, stride=2)
    x = torch.randn(1, 1, length)
    inner = conv.conv.conv
    expected = F.conv1d(F.pad(x, pads, mode="reflect"), inner.weight, inner.bias, stride=2)
    out = conv(x)
    assert out.shape[-1] == -(-length // 2)
    assert torch.allclose(out, expected)


def test_causal_model_does_not_look_ahead():
    # zero padding: with EnCodec's default reflect padding a causal conv's left pad mirrors
    # samples 1..pad, so the first few frames do see a little of the future (upstream too)
    opts = {"causal": True, "pad_mode": "constant"}
    torch.manual_seed(0)
    model = load_autoencoder(config(opts, opts), None, with_decoder=True)
    audio = _audio(4 * 640)
    changed = audio.clone()
    changed[..., 2 * 640:] += 1.0  # change the future from frame 2 on
    z, z2 = model.encode(audio), model.encode(changed)
    assert torch.equal(z[..., :2], z2[..., :2]) and not torch.equal(z[..., 2:], z2[..., 2:])
    zc = z.clone()
    zc[..., 2:] += 0.5
    y, y2 = model.decode(z), model.decode(zc)
    assert torch.equal(y[..., : 2 * 640], y2[..., : 2 * 640])
    # ... whereas the non-causal model's early frames see the future
    plain = load_autoencoder(config(), None)
    assert not torch.equal(plain.encode(audio)[..., :2], plain.encode(changed)[..., :2])


def test_pad_mode_and_activation_options_are_used():
    torch.manual_seed(0)
    reflect = build_autoencoder(config())
    sd = reflect.state_dict()
    audio = _audio(640)
    variants = [config({"pad_mode": "constant"}),
                config({"activation": "LeakyReLU", "activation_params": {"negative_slope": 0.3}}),
                config({"activation_params": {"alpha": 0.5}})]
    ref = reflect.encode(audio)
    for cfg in variants:
        model = build_autoencoder(cfg)
        model.load_state_dict(sd)
        assert not torch.allclose(model.encode(audio), ref)
    tanh = build_autoencoder(config(decoder={"final_activation": "Tanh"}), with_decoder=True)
    assert isinstance(tanh.decoder.model[-1], torch.nn.Tanh)


# ----------------------------------------------------------------------------- precision/ckpt
def sat_layout(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Perturbed weights in stable-audio-tools' layout (`...conv.conv.weight_g/_v`, LSTM plain),
    with v not unit-norm as after training."""
    gen = torch.Generator().manual_seed(seed)
    plain = {k: v + 0.2 * torch.randn(v.shape, generator=gen)
             * (v.std() if v.numel() > 1 and v.std() > 0 else 1.0)
             for k, v in model.state_dict().items()}
    sat = unfold_weight_norm(plain)
    for key in list(sat):
        if key.endswith(".weight_v"):
            sat[key] = sat[key] * (torch.rand(sat[key].shape[0], 1, 1, generator=gen) * 3 + 0.5)
    return sat


@pytest.fixture(scope="module")
def reference():
    cfg = config()
    torch.manual_seed(0)
    return cfg, sat_layout(build_autoencoder(cfg, with_decoder=True))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_sat_checkpoint_round_trip(tmp_path, reference, suffix):
    cfg, sat = reference
    assert "encoder.model.0.conv.conv.weight_g" in sat
    assert "decoder.model.1.lstm.weight_hh_l1" in sat
    # expected output from weights folded by torch's own weight norm, not by our loader
    expected = build_autoencoder(cfg, with_decoder=True).eval()
    with torch.no_grad():
        for key, param in expected.state_dict(keep_vars=True).items():
            base = key[: -len(".weight")]
            if key.endswith(".weight") and base + ".weight_g" in sat:
                param.copy_(torch._weight_norm(sat[base + ".weight_v"], sat[base + ".weight_g"], 0))
            else:
                param.copy_(sat[key])
    path = tmp_path / f"ae{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sat.items()}, str(path))
    else:
        torch.save({"state_dict": sat}, path)
    model = load_autoencoder(cfg, path, with_decoder=True)
    audio = _audio(2 * 640)
    z = model.encode(audio)
    z_ref = expected.encode(audio)
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(model.decode(z_ref), expected.decode(z_ref), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_encode_is_close(tmp_path, reference, dtype):
    cfg, sat = reference
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in sat.items()}, str(path))
    audio = _audio(4 * 640)
    ref = load_autoencoder(cfg, path).encode_pre_bottleneck(audio)
    out = load_autoencoder(cfg, path, dtype=dtype).encode_pre_bottleneck(audio)
    assert out.dtype == dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert_half_precision_close_or_refused(lambda: load_autoencoder(cfg, path), dtype, rel, audio.shape[-1])


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda c: c["model"]["encoder"]["config"].update(norm="spectral_norm"),
     UnsupportedModelError, r"'model\.encoder\.config\.norm' = 'spectral_norm' is not supported"),
    (lambda c: c["model"]["encoder"]["config"].update(norm="batch_norm"),
     ModelConfigError, r"'model\.encoder\.config\.norm' = 'batch_norm' is unknown"),
    (lambda c: c["model"]["encoder"]["config"].update(filters=3),
     ModelConfigError, r"unknown seanet encoder option\(s\) \['filters'\]"),
    (lambda c: c["model"]["encoder"]["config"].update(final_activation="Tanh"),
     ModelConfigError, r"unknown seanet encoder option\(s\) \['final_activation'\]"),
    (lambda c: c["model"]["encoder"]["config"].update(activation="Relu"),
     ModelConfigError, r"'model\.encoder\.config\.activation' = 'Relu' is not a torch\.nn"),
    (lambda c: c["model"]["encoder"]["config"].update(activation_params={"slope": 1}),
     ModelConfigError, r"activation_params' = \{'slope': 1\} does not fit nn\.ELU"),
    (lambda c: c["model"]["encoder"]["config"].update(pad_mode="zero"),
     ModelConfigError, r"pad_mode' = 'zero'"),
    (lambda c: c["model"]["encoder"]["config"].update(lstm=-1),
     ModelConfigError, r"'model\.encoder\.config\.lstm' must be an int >= 0"),
    (lambda c: c["model"]["decoder"]["config"].update(trim_right_ratio=0.5),
     ModelConfigError, r"trim_right_ratio' != 1 only makes sense"),
    (lambda c: c["model"].update(downsampling_ratio=320),
     ModelConfigError, r"'model\.downsampling_ratio' = 320 .* strides \[4, 4, 5, 8\]"),
    (lambda c: c["model"].update(latent_dim=8),
     ModelConfigError, r"gives 16 latent channels .* 'model\.latent_dim' = 8"),
    (lambda c: c["model"].update(io_channels=2),
     ModelConfigError, r"in_channels' \(1\)"),
])
def test_config_errors_name_the_field(mutate, exc, pattern):
    cfg = config()
    mutate(cfg)
    with pytest.raises(exc, match=pattern):
        build_autoencoder(cfg, with_decoder=True)
