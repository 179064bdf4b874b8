"""wds_encode/pipeline/batching.py: batches hold windows of one length, at most `buffer` windows wait, and a
unit's end comes out only after every batch holding one of its windows."""

from __future__ import annotations

import random

import pytest
import torch

from wds_encode.pipeline.batching import LengthBatcher
from wds_encode.pipeline.reader import ShardEnd, WindowItem
from wds_encode.pipeline.sources import Shard


def window(unit: str, length: int, i: int) -> WindowItem:
    return WindowItem(audio=torch.zeros(1, length),
                      key=f"k{i}", shard_id=f"d/{unit}", metadata={"valid_length": length})


def end_of(unit: str) -> ShardEnd:
    return ShardEnd(shard=Shard(url=f"/x/{unit}.tar", dataset_id="d", name=unit), worker=0)


def run_through(batcher: LengthBatcher, stream: list) -> list:
    out = []
    for thing in stream:
        out.extend(batcher.end(thing) if isinstance(thing, ShardEnd) else batcher.add(thing))
        assert batcher.held <= batcher.buffer
    out.extend(batcher.drain())
    return out


def check_order(out: list, stream: list) -> None:
    """Every window once, batches of one length, each unit end after its unit's last window."""
    windows = [w for part in out if isinstance(part, list) for w in part]
    assert sorted(id(w) for w in windows) == sorted(id(w) for w in stream if isinstance(w, WindowItem))
    seen_end = set()
    for part in out:
        if isinstance(part, ShardEnd):
            seen_end.add(part.shard.shard_id)
            continue
        assert len({w.audio.shape[-1] for w in part}) == 1, "one length per batch"
        assert not {w.shard_id for w in part} & seen_end, "a window after its unit's end"
    assert seen_end == {e.shard.shard_id for e in stream if isinstance(e, ShardEnd)}


def test_fixed_windows_batch_in_arrival_order_and_ends_follow_their_batch():
    stream = [window("a", 8, 0), window("a", 8, 1), window("a", 8, 2), end_of("a"),
              window("b", 8, 3), end_of("b")]
    batcher = LengthBatcher(2, 64)
    out = run_through(batcher, stream)
    shape = [[w.key for w in p] if isinstance(p, list) else p.shard.shard_id for p in out]
    assert shape == [["k0", "k1"], ["k2", "k3"], "d/a", "d/b"]


def test_an_end_with_nothing_waiting_goes_straight_through():
    batcher = LengthBatcher(4, 8)
    assert batcher.add(window("a", 8, 0)) == []
    assert [e.shard.shard_id for e in batcher.end(end_of("b"))] == ["d/b"]
    assert batcher.end(end_of("a")) == []
    assert batcher.pending_units == {"d/a"}


@pytest.mark.parametrize("seed", range(5))
def test_mixed_lengths_make_homogeneous_batches_within_the_buffer(seed):
    rng = random.Random(seed)
    stream, i = [], 0
    for unit in "abcdefgh":
        for _ in range(rng.randint(0, 9)):
            stream.append(window(unit, rng.choice([64, 128, 192, 640]), i))
            i += 1
        stream.append(end_of(unit))
    batcher = LengthBatcher(4, 10)
    out = run_through(batcher, stream)
    check_order(out, stream)
    sizes = [len(p) for p in out if isinstance(p, list)]
    assert max(sizes) <= 4
    assert sum(s == 4 for s in sizes) >= len(sizes) // 3, "most windows leave in full batches"


def test_a_full_buffer_lets_the_fullest_bucket_go():
    batcher = LengthBatcher(4, 5)
    for i, length in enumerate([64, 128, 128, 64, 128]):
        out = batcher.add(window("a", length, i))
    assert len(out) == 1 and [w.audio.shape[-1] for w in out[0]] == [128, 128, 128]
    assert batcher.held == 2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        LengthBatcher(0, 4)
