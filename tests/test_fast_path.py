"""The fast inference path of the encoders: Snake / SnakeBeta with cached per-channel constants and
in-place temporaries (eager, autograd off), and `torch.compile` (BatchEncoder(compile=True)).
Both must give what the textbook formulas and stable-audio-tools' golden outputs give."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from conftest import SEANET_SMALL, golden
from wds_encode.config import load_model_config
from wds_encode.pipeline.encoder import BatchEncoder
from wds_encode.models import build_autoencoder, load_autoencoder
from wds_encode.models.dac import Snake1d
from wds_encode.models.oobleck import SnakeBeta

CPU = torch.device("cpu")
C = 5


def snakebeta_textbook(x: torch.Tensor, log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """stable-audio-tools' SnakeBeta with logscale parameters, in float64."""
    x = x.double()
    alpha = torch.exp(log_alpha.double())[None, :, None]
    beta = torch.exp(log_beta.double())[None, :, None]
    return x + 1.0 / (beta + 1e-9) * torch.sin(x * alpha) ** 2


def snake_textbook(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """DAC's snake (alpha on linear scale, shape [1, C, 1]), in float64."""
    x, alpha = x.double(), alpha.double()
    return x + 1.0 / (alpha + 1e-9) * torch.sin(alpha * x) ** 2


def _x(dtype=torch.float32, seed=0, n=300) -> torch.Tensor:
    return (2 * torch.randn(3, C, n, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _params(kind: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "snakebeta":  # log scale: alpha, beta in about [0.4, 2.5]
        return {"alpha": 0.4 * torch.randn(C, generator=gen), "beta": 0.4 * torch.randn(C, generator=gen)}
    return {"alpha": 0.3 + 2 * torch.rand(1, C, 1, generator=gen)}  # DAC: linear scale, positive


def _module(kind: str) -> torch.nn.Module:
    return (SnakeBeta(C) if kind == "snakebeta" else Snake1d(C)).eval()


def _textbook(kind: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind == "snakebeta":
        return snakebeta_textbook(x, module.alpha.detach(), module.beta.detach())
    return snake_textbook(x, module.alpha.detach())


def _check(kind: str, module: torch.nn.Module, x: torch.Tensor) -> None:
    """The module equals the textbook formula in every grad mode (the cached, in-place path is taken
    under inference_mode and no_grad), within 1e-6 (float32) or 1e-12 (float64)."""
    expected = _textbook(kind, module, x)
    tol = 1e-12 if x.dtype == torch.float64 else 1e-6
    with torch.inference_mode():
        fast = module(x)
    with torch.no_grad():
        fast_no_grad = module(x)
    plain = module(x)  # autograd on: the out-of-place formula, constants computed per call
    for out in (fast, fast_no_grad, plain):
        assert out.dtype == x.dtype
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    # not just close: the in-place fast path does the formula's operations in its order
    assert torch.equal(fast, plain.detach()) and torch.equal(fast_no_grad, plain.detach())


@pytest.mark.parametrize("kind", ["snakebeta", "snake"])
def test_snake_equals_textbook_formula_and_cache_follows_the_parameters(kind):
    module = _module(kind)
    x = _x()
    module.load_state_dict(_params(kind, 1))
    _check(kind, module, x)
    _check(kind, module, x)                       # cached constants reused
    module.load_state_dict(_params(kind, 2))      # new values, same storage: copy_ bumps _version
    _check(kind, module, x)
    with torch.no_grad():
        module.alpha.mul_(1.5)                    # any in-place write
    _check(kind, module, x)
    module.to(torch.float64)                      # new dtype and storage
    assert module.alpha.dtype == torch.float64
    _check(kind, module, _x(torch.float64))
    module.load_state_dict({k: v.double() for k, v in _params(kind, 3).items()})
    _check(kind, module, _x(torch.float64, seed=1))
    module.to(torch.float32)
    _check(kind, module, x)
    module.load_state_dict(_params(kind, 4), assign=True)   # new Parameter objects
    _check(kind, module, x)
    for seed in (5, 6, 7):
        module.alpha.data = _params(kind, seed)["alpha"]
        _check(kind, module, x)
    # .data replaced twice between calls: the second tensor could be allocated at the cached one's
    # freed address with the same version (0); the cache keeps that storage alive to rule it out
    values = [_params(kind, seed)["alpha"] for seed in (8, 9, 10, 11)]
    for first, second in zip(values[::2], values[1::2]):
        _check(kind, module, x)
        module.alpha.data = first.clone()
        module.alpha.data = second.clone()
        _check(kind, module, x)


@pytest.mark.parametrize("kind", ["snakebeta", "snake"])
def test_snake_cache_across_modes_copies_and_inference_parameters(kind):
    module = _module(kind)
    module.load_state_dict(_params(kind, 1))
    x = _x()
    with torch.inference_mode():
        first = module(x)        # constants cached as inference tensors...
    with torch.no_grad():
        again = module(x)        # ...and still usable outside inference mode
    assert torch.equal(first, again)
    # autograd still works (and does not use the cache)
    xg = x.clone().requires_grad_(True)
    module(xg).sum().backward()
    assert module.alpha.grad is not None and torch.isfinite(module.alpha.grad).all()
    assert xg.grad is not None
    module.zero_grad()
    # copies (BatchEncoder deep-copies the model for fp16/bf16) and pickles leave the cache behind
    clone = copy.deepcopy(module)
    assert "_derived_constants" not in clone.__dict__
    assert "_derived_constants" not in pickle.loads(pickle.dumps(module)).__dict__
    with torch.no_grad():
        clone.alpha.add_(0.25)
        assert torch.equal(module(x), first)      # the original keeps its own constants
    _check(kind, clone, x)
    half = copy.deepcopy(module).to(torch.bfloat16)
    with torch.inference_mode():
        low = half(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), _textbook(kind, module, x), atol=0.1, rtol=0.02)
    # parameters made under inference mode have no version counter: computed every call, still right
    with torch.inference_mode():
        made_inside = _module(kind)
        made_inside.load_state_dict(_params(kind, 2))
        out = made_inside(x)
    torch.testing.assert_close(out.double(), _textbook(kind, made_inside, x), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- whole models
GOLDEN_BY_ENCODER = {"oobleck": "oobleck_snake_vae", "dac": "dac_vae"}


def _golden_model(name: str):
    d = golden(name)
    return d, load_autoencoder(load_model_config(d / "model_config.json"), d / "model.safetensors")


@pytest.mark.parametrize("name", ["oobleck_snake_vae", "oobleck_elu_tanh", "dac_vae"])
def test_fast_eager_encoder_is_bit_exact(name):
    """The in-place eager path (inference_mode) gives bit for bit what the plain formulas give."""
    d, model = _golden_model(name)
    audio = torch.from_numpy(np.load(d / "input.npy"))
    with torch.inference_mode():
        fast = model.encode_pre_bottleneck(audio)
    plain = model.encode_pre_bottleneck(audio)  # autograd on: out-of-place, constants per call
    assert torch.equal(fast, plain.detach())
    np.testing.assert_allclose(fast.numpy(), np.load(d / "pre_bottleneck.npy"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(GOLDEN_BY_ENCODER.values()))
def test_snake_encoders_compile_to_one_graph(name):
    """No graph break from the cache: the whole encoder is one Dynamo graph."""
    torch._dynamo.reset()
    d, model = _golden_model(name)
    audio = torch.from_numpy(np.load(d / "input.npy"))
    with torch.inference_mode():
        explained = torch._dynamo.explain(model.encoder)(audio)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def _compiled_vs_eager(model, audio: torch.Tensor):
    """(compiled latents, eager latents) from BatchEncoder, checking that compilation really ran."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()   # a fresh cache: earlier tests must not push this one past the recompile limit
    masks = torch.ones(audio.shape[0], audio.shape[-1], dtype=torch.bool)
    keys = [f"k{i}" for i in range(audio.shape[0])]
    eager = BatchEncoder(model, device=CPU, precision="fp32", latent_mode="mean").encode(audio, masks, keys)
    before = counters["stats"]["unique_graphs"]
    enc = BatchEncoder(model, device=CPU, precision="fp32", latent_mode="mean", compile=True)
    compiled = enc.encode(audio, masks, keys)
    assert counters["stats"]["unique_graphs"] > before, f"torch.compile built no graph: {enc.compile_error}"
    assert getattr(enc, "compile_error", None) is None and getattr(enc, "compiled", True)
    assert compiled.latents.shape == eager.latents.shape
    return compiled.latents, eager.latents


@pytest.mark.slow
@pytest.mark.parametrize("encoder", sorted(GOLDEN_BY_ENCODER))
def test_compiled_encoder_matches_eager_and_golden(encoder):
    """compile=True equals compile=False within 1e-5 on 2 windows of the golden audio, and both equal
    stable-audio-tools' saved VAE means."""
    d, model = _golden_model(GOLDEN_BY_ENCODER[encoder])
    audio = torch.from_numpy(np.load(d / "input.npy"))[:2]
    compiled, eager = _compiled_vs_eager(model, audio)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    ref = torch.from_numpy(np.load(d / "mean.npy"))[:2]
    torch.testing.assert_close(compiled, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_seanet_encoder_matches_eager():
    """SEANet has no golden data: default-initialised weights, 2 windows of 3200 samples of seeded noise
    (20 latent frames). Its LSTM makes Dynamo split the graph, which must not change the result."""
    torch.manual_seed(0)
    model = build_autoencoder(SEANET_SMALL)
    n = 3200
    assert n % model.downsampling_ratio == 0
    audio = 0.1 * torch.randn(2, model.in_channels, n, generator=torch.Generator().manual_seed(3))
    compiled, eager = _compiled_vs_eager(model, audio)
    assert compiled.shape[-1] == n // model.downsampling_ratio
    assert eager.abs().max() > 1e-3   # not a degenerate all-zero comparison
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
