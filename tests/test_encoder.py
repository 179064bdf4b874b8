"""encoder.py: precision, fp32 fallback, key-seeded VAE noise, latent modes, padding masks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from wds_encode.config import load_model_config
from wds_encode.pipeline.encoder import PRECISION_CHECK_LIMIT, BatchEncoder, PrecisionMismatch, is_out_of_memory, key_seed, latent_padding_mask
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
    lat = latent_padding_mask(masks, 10, 64)
    assert lat.dtype == torch.int32
    assert lat[0].tolist() == [1] * 10
    assert lat[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # latent i looks at sample 64*i


def test_padding_mask_marks_frames_past_the_window_as_padding():
    """A model that pads on to whole chunks returns more frames than the window holds (SAME: 34 for 33):
    the extra frames are padding, and the real ones are exactly ceil(valid / ratio)."""
    masks = torch.zeros(2, 1056, dtype=torch.bool)
    masks[0, :1036] = True
    masks[1, :1056] = True
    lat = latent_padding_mask(masks, 34, 32)
    assert lat[0].tolist() == [1] * 33 + [0]       # ceil(1036 / 32) = 33 real frames
    assert lat[1].tolist() == [1] * 33 + [0]       # 1056 samples are 33 frames; the 34th is chunk padding


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


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_is_close_to_fp32_or_the_precision_check_refuses_it(model):
    """Holds on every CPU: where bf16 is right (rounding only) the check lets it run and the latents are
    close; where the CPU's bf16 kernels are broken (oneDNN on AMX) the check refuses, and rightly."""
    audio, masks = batch()
    ref = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, list("abc"))
    low = BatchEncoder(model, device=torch.device("cpu"), precision="bf16", latent_mode="mean")
    out = low.encode(audio, masks, list("abc"))
    assert out.latents.dtype == torch.float32 and not out.fp32_retry
    rel = relative_error(out.latents, ref.latents)
    try:
        check = low.check_precision(N)
    except PrecisionMismatch as exc:
        assert rel > 0.05, f"refused bf16 that is only {rel:.3g} off: {exc}"
        assert exc.check["relative_error"] > PRECISION_CHECK_LIMIT
    else:
        assert check["ok"] and 0 < check["relative_error"] < PRECISION_CHECK_LIMIT
        assert rel < 0.05


def emulate_low_precision_convolutions(monkeypatch, broken, dtype=torch.bfloat16):
    """Convolutions of `dtype` inputs computed in fp32 and rounded to `dtype`, so that this CPU's own
    low-precision kernels, right or wrong (oneDNN on AMX), play no part; `broken` also reverses their
    output in time: finite, wrong results, as broken kernels give."""
    for name in ("conv1d", "conv2d"):
        original = getattr(F, name)

        def conv(x, weight, bias=None, *args, _original=original, **kwargs):
            if x.dtype != dtype:
                return _original(x, weight, bias, *args, **kwargs)
            out = _original(x.float(), weight.float(), None if bias is None else bias.float(), *args, **kwargs)
            return (out.flip(-1) if broken else out).to(dtype)
        monkeypatch.setattr(F, name, conv)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_precision_check_refuses_a_broken_low_precision_path(model, monkeypatch, channels_last):
    enc = BatchEncoder(model, device=torch.device("cpu"), precision="bf16", channels_last=channels_last)
    emulate_low_precision_convolutions(monkeypatch, broken=False)
    healthy = enc.check_precision(N)  # bf16 rounding alone passes
    assert healthy["ok"] and healthy["relative_error"] < PRECISION_CHECK_LIMIT
    emulate_low_precision_convolutions(monkeypatch, broken=True)
    with pytest.raises(PrecisionMismatch) as info:
        enc.check_precision(N)
    check = info.value.check
    assert check["relative_error"] > 10 * healthy["relative_error"] and check["relative_error"] > PRECISION_CHECK_LIMIT
    text = str(info.value)
    assert "--precision bf16 disagrees with fp32" in text and f"{check['relative_error']:.3g}" in text
    assert "Nothing was written" in text and "--precision fp32" in text
    fp32 = BatchEncoder(model, device=torch.device("cpu"))
    assert fp32.check_precision(N) == {}  # fp32 is the reference: nothing to check


def test_the_precision_check_refuses_a_model_that_overflows_fp16(model):
    loud = copy.deepcopy(model)
    with torch.no_grad():
        last = [m for m in loud.encoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
        last.weight.mul_(1e6)
    with pytest.raises(PrecisionMismatch, match="non-finite output.*overflows float16"):
        BatchEncoder(loud, device=torch.device("cpu"), precision="fp16").check_precision(N)


def test_the_precision_check_advises_the_onednn_cap_on_an_amx_cpu(model, monkeypatch):
    import wds_encode.pipeline.encoder as encoder_module
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    emulate_low_precision_convolutions(monkeypatch, broken=True)
    with pytest.raises(PrecisionMismatch, match="ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"):
        BatchEncoder(model, device=torch.device("cpu"), precision="bf16").check_precision(N)


class CountsPasses(torch.nn.Module):
    """The real encoder network, recording the (dtype, batch size) of every pass."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner = inner
        self.calls = calls

    def forward(self, x):
        self.calls.append((x.dtype, x.shape[0]))
        return self.inner(x)


class Calls(list):
    """A list that model copies share (deepcopy keeps it): every copy's passes land in one place."""

    def __deepcopy__(self, memo):
        return self


def test_only_the_non_finite_windows_are_rerun_in_fp32(model):
    calls = Calls()
    counted = copy.deepcopy(model)
    counted.encoder = CountsPasses(counted.encoder, calls)
    audio, masks = batch(n=4)
    audio[2] *= 1e5  # past float16's range: inf in fp16, finite in fp32
    keys = list("abcd")
    ref = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio[2:3], masks[2:3], ["c"])
    enc = BatchEncoder(counted, device=torch.device("cpu"), precision="fp16", latent_mode="mean")
    low_alone = BatchEncoder(model, device=torch.device("cpu"), precision="fp16", latent_mode="mean")
    calls.clear()
    out = enc.encode(audio, masks, keys)
    assert calls == [(torch.float16, 4), (torch.float32, 1)]  # the batch, then window 2 alone
    assert out.fp32_retry and enc.retries == 1 and out.errors == [None] * 4
    assert relative_error(out.latents[2], ref.latents[0]) < 1e-5  # window 2 is its fp32 latents
    others = low_alone.encode(audio[[0, 1, 3]], masks[[0, 1, 3]], list("abd")).latents
    torch.testing.assert_close(out.latents[[0, 1, 3]], others)


def test_a_pinned_slot_is_given_back_when_its_batch_is_collected(model):
    from wds_encode.pipeline.pinned import PinnedRing
    ring = PinnedRing(slots=2, pin=False)  # no CUDA here: the same ring over plain memory
    enc = BatchEncoder(model, device=torch.device("cpu"), precision="bf16", latent_mode="mean")
    audio, masks = batch()
    pending = []
    for _ in range(2):
        slot = ring.acquire(audio.shape, audio.dtype, timeout=0)
        slot.tensor.copy_(audio)
        pending.append(enc.submit(slot.tensor, masks, list("abc"), slot=slot))
    assert ring.in_use == 2 and ring.acquire(audio.shape, audio.dtype, timeout=0.05) is None
    first_slot = pending[0].slot.index
    first = enc.collect(pending[0])
    assert ring.in_use == 1 and pending[0].slot is None
    again = ring.acquire(audio.shape, audio.dtype, timeout=0)
    assert again is not None and again.index == first_slot
    enc.collect(pending[1])
    assert ring.in_use == 1
    torch.testing.assert_close(first.latents, enc.encode(audio, masks, list("abc")).latents)


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_latents(model):
    audio, masks = batch()
    plain = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, list("abc"))
    compiled = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean", compile=True)
    out = compiled.encode(audio, masks, list("abc"))
    torch.testing.assert_close(out.latents, plain.latents, rtol=1e-4, atol=1e-4)


class RunsOutOfMemory(torch.nn.Module):
    """The real encoder, except that a batch the test deems too large raises the device's OOM error."""

    def __init__(self, inner, too_large):
        super().__init__()
        self.inner = inner
        self.too_large = too_large
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if self.too_large(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        return self.inner(x)


def with_oom(model, too_large):
    import copy
    patched = copy.deepcopy(model)
    patched.encoder = RunsOutOfMemory(patched.encoder, too_large)
    return patched


def test_a_batch_that_runs_out_of_memory_is_halved_until_it_fits(model):
    audio, masks = torch.cat([batch()[0], batch(seed=1)[0][:1]]), torch.ones(4, N, dtype=torch.bool)
    keys = ["a", "b", "c", "d"]
    ref = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, keys)
    oom = with_oom(model, lambda x: x.shape[0] > 1)
    enc = BatchEncoder(oom, device=torch.device("cpu"), latent_mode="mean")
    out = enc.encode(audio, masks, keys)
    # 4 -> 2 + 2 -> 1 + 1, then the second half goes as 1 + 1 at once: the split is remembered
    assert out.errors == [None] * 4 and out.splits == 2 and enc.splits == 2
    assert oom.encoder.calls == [4, 2, 1, 1, 1, 1]
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-5, atol=1e-6)


def test_after_a_split_no_batch_larger_than_what_fit_is_submitted(model):
    k = 3
    oom = with_oom(model, lambda x: x.shape[0] > k)
    enc = BatchEncoder(oom, device=torch.device("cpu"), latent_mode="mean")
    assert enc.split_limit is None
    audio, masks = batch(n=16)
    keys = [f"w{i}" for i in range(16)]
    ref = BatchEncoder(model, device=torch.device("cpu"), latent_mode="mean").encode(audio, masks, keys)
    first = enc.encode(audio, masks, keys)
    assert first.splits > 0 and first.errors == [None] * 16
    after_first = len(oom.encoder.calls)
    failed = [size for size in oom.encoder.calls if size > k]
    assert failed == [16, 8, 4], "halving 16 -> 8 -> 4 -> 2: the sizes that ran out of memory"
    assert enc.split_limit == 2
    for _ in range(3):  # later batches, full and short, never go above the size that fit
        out = enc.encode(audio, masks, keys)
        assert out.splits == 0 and out.errors == [None] * 16
        torch.testing.assert_close(out.latents, ref.latents, rtol=1e-5, atol=1e-6)
        enc.encode(audio[:5], masks[:5], keys[:5])
    assert max(oom.encoder.calls[after_first:]) <= enc.split_limit <= k
    assert enc.splits == first.splits


@pytest.mark.parametrize("message", [
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes",
])
def test_allocation_failures_of_cudnn_and_cublas_count_as_out_of_memory(model, message):
    assert is_out_of_memory(RuntimeError(message))
    raised = []

    def too_large(x):
        if x.shape[0] > 1:
            raised.append(x.shape[0])
            return True
        return False
    oom = with_oom(model, lambda x: False)
    inner = oom.encoder.inner

    def forward(x):
        if too_large(x):
            raise RuntimeError(message)
        return inner(x)
    oom.encoder.forward = forward
    out = BatchEncoder(oom, device=torch.device("cpu"), latent_mode="mean").encode(*batch(), list("abc"))
    assert raised == [3] and out.splits == 1 and out.errors == [None] * 3


def test_other_runtime_errors_are_not_out_of_memory():
    for message in ("shape mismatch", "cuDNN error: CUDNN_STATUS_BAD_PARAM", "CUDA error: an illegal memory access"):
        assert not is_out_of_memory(RuntimeError(message))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an error torch raises


def test_a_window_that_never_fits_is_an_error_and_the_rest_are_written(model):
    audio, masks = batch()
    marked = audio.clone()
    marked[1, 0, 0] = 0.987654  # the test's way to point at one window from inside the encoder
    oom = with_oom(model, lambda x: bool((x[:, 0, 0] == 0.987654).any()))
    out = BatchEncoder(oom, device=torch.device("cpu"), latent_mode="mean").encode(marked, masks, list("abc"))
    assert out.errors[0] is None and out.errors[2] is None
    assert "out of device memory even for this one window" in out.errors[1]
    assert out.finite == [True, False, True] and out.splits == 1  # 3 -> 1 + 2, then 2 goes as 1 + 1 (remembered)
    alone = BatchEncoder(oom, device=torch.device("cpu"), latent_mode="mean").encode(marked[1:2], masks[1:2], ["b"])
    assert alone.latents is None and alone.finite == [False]


def test_other_errors_are_not_taken_for_out_of_memory(model):
    broken = with_oom(model, lambda x: True)
    broken.encoder.forward = lambda x: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        BatchEncoder(broken, device=torch.device("cpu")).encode(*batch(), list("abc"))


def test_submit_then_collect_is_encode(model):
    enc = BatchEncoder(model, device=torch.device("cpu"), latent_mode="sample", seed=3)
    audio, masks = batch()
    pending = [enc.submit(audio, masks, list("abc")), enc.submit(audio[:2], masks[:2], list("xy"))]
    collected = [enc.collect(p) for p in pending]
    assert torch.equal(collected[0].latents, enc.encode(audio, masks, list("abc")).latents)
    assert torch.equal(collected[1].latents, enc.encode(audio[:2], masks[:2], list("xy")).latents)


def test_batch_size_probe_on_the_cpu_fits_the_memory_it_is_given(model):
    enc = BatchEncoder(model, device=torch.device("cpu"))
    size, probe = enc.probe_batch_size(N, cap=64, host_memory=64 << 30)
    per_window = probe["bytes_per_window_estimate"]
    # the memory bound; within it, the CPU keeps the fastest size it timed (tests/test_first_hour.py)
    assert probe["memory_bound"] == 64 and per_window > 2 * N * 4  # at least the input window
    assert size <= 64 and size in {t["batch_size"] for t in probe["timings"]}
    small, probe = enc.probe_batch_size(N, cap=64, host_memory=per_window * 20)
    bound = probe["memory_bound"]
    assert bound == 8 and bound * per_window <= per_window * 20 * 0.8 / 2 < 2 * bound * per_window
    assert small <= 8 and max(t["batch_size"] for t in probe["timings"]) <= 8
    assert enc.probe_batch_size(N, cap=64, host_memory=1)[0] == 1


def test_a_short_batch_padded_to_the_compiled_shape_gives_the_same_latents(model):
    audio, masks = batch()
    plain = BatchEncoder(model, device=torch.device("cpu"), latent_mode="sample", seed=2)
    padded = BatchEncoder(model, device=torch.device("cpu"), latent_mode="sample", seed=2)
    padded.pad_to = 5
    ref, out = plain.encode(audio, masks, list("abc")), padded.encode(audio, masks, list("abc"))
    assert out.latents.shape[0] == 3 and len(out.errors) == 3 and out.padding_masks.shape[0] == 3
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.padding_masks, ref.padding_masks)


def test_compile_workers_are_bounded_by_the_ranks_cpus():
    import torch._inductor.config as inductor_config
    from wds_encode.pipeline.encoder import bound_compile_workers
    before = inductor_config.compile_threads
    # the config's own patch (monkeypatch's undo would delete the entry, and every later compile would fail)
    with inductor_config.patch(compile_threads=32):  # inductor's default on a large node
        bound_compile_workers(6)
        assert inductor_config.compile_threads == 6
        bound_compile_workers(64)  # never raised above what inductor would start anyway
        assert inductor_config.compile_threads == 6
    assert inductor_config.compile_threads == before
