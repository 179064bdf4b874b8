"""pinned.py: a few reused buffers, each held by one batch until it is given back."""

import threading
import time

import pytest
import torch

from wds_encode.pipeline.pinned import PinnedRing

# page-locked memory needs a CUDA driver: the same ring over plain memory on a machine without one
PIN = torch.cuda.is_available()


def test_a_buffer_is_reused_and_grows_only_for_a_larger_batch():
    ring = PinnedRing(slots=1, pin=PIN)
    first = ring.acquire((4, 2, 100), torch.float32)
    assert first.tensor.shape == (4, 2, 100) and first.tensor.is_contiguous()
    first.tensor.fill_(1.0)
    storage = first.tensor.untyped_storage().data_ptr()
    first.release()
    smaller = ring.acquire((2, 2, 100), torch.float32)
    assert smaller.tensor.untyped_storage().data_ptr() == storage  # the same memory, no new allocation
    smaller.release()
    larger = ring.acquire((8, 2, 100), torch.float32)
    assert larger.tensor.shape == (8, 2, 100) and ring.pinned_bytes() == 8 * 2 * 100 * 4
    larger.release()


def test_acquire_waits_while_every_buffer_is_in_flight():
    ring = PinnedRing(slots=2, pin=PIN)
    held = [ring.acquire((1, 10), torch.float32) for _ in range(2)]
    assert ring.in_use == 2
    started = time.monotonic()
    assert ring.acquire((1, 10), torch.float32, timeout=0.1) is None
    assert time.monotonic() - started >= 0.09
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire((1, 10), torch.float32, timeout=5)))
    waiter.start()
    time.sleep(0.05)
    assert not got  # still waiting
    held[1].release()
    waiter.join(timeout=5)
    assert got and got[0].index == held[1].index and ring.in_use == 2


def test_a_buffer_given_back_twice_is_an_error():
    ring = PinnedRing(slots=2, pin=PIN)
    slot = ring.acquire((3,), torch.float32)
    slot.release()
    with pytest.raises(RuntimeError, match="released twice"):
        slot.release()
    with pytest.raises(ValueError):
        PinnedRing(slots=0)
