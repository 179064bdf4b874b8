"""job/parts.py: which part a task is (--part, the schedulers' variables), the balanced deal of units,
the part's rank ids, and the lease that keeps a retry from writing beside a running original."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from wds_encode.job.parts import LeaseLost, Part, PartError, PartLease, lease_name, parse_part, part_from_scheduler
from wds_encode.storage import LocalPlace


def test_parse_part_takes_k_of_n_from_zero():
    assert parse_part("0/3") == Part(0, 3) and parse_part(" 2 / 3 ") == Part(2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "1/0", ""):
        with pytest.raises(PartError):
            parse_part(bad)


@pytest.mark.parametrize("env, num_parts, expected", [
    ({"JOB_COMPLETION_INDEX": "4"}, 8, (Part(4, 8), "JOB_COMPLETION_INDEX")),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "1", "AWS_BATCH_JOB_ARRAY_SIZE": "3"}, None, (Part(1, 3), "AWS_BATCH_JOB_ARRAY_INDEX")),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, 2, (Part(1, 2), "AWS_BATCH_JOB_ARRAY_INDEX")),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, None, (Part(3, 4), "SLURM_ARRAY_TASK_ID")),
    # --array=1-4: task ids from SLURM_ARRAY_TASK_MIN
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, None,
     (Part(3, 4), "SLURM_ARRAY_TASK_ID")),
    ({}, None, (None, "")),
    ({"SLURM_JOB_ID": "7"}, None, (None, "")),
])
def test_the_schedulers_variables_name_the_part(env, num_parts, expected):
    assert part_from_scheduler(env, num_parts) == expected


@pytest.mark.parametrize("env, num_parts, says", [
    ({"JOB_COMPLETION_INDEX": "4"}, None, "--num-parts"),          # Kubernetes does not say how many
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, None, "AWS_BATCH_JOB_ARRAY_SIZE"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, None, "not a whole number"),
    ({"JOB_COMPLETION_INDEX": "4"}, 4, "K must be from 0 to N-1"),
    ({}, 3, "without a part"),
])
def test_an_incomplete_scheduler_environment_is_refused_with_what_to_give(env, num_parts, says):
    with pytest.raises(PartError, match=says):
        part_from_scheduler(env, num_parts)


def test_the_deal_is_balanced_by_bytes_covers_every_unit_once_and_is_the_same_every_time():
    sizes = {f"u{i:03d}": size for i, size in enumerate([900, 10, 10, 10, 500, 400, 300, 20, 700, 650, 5, 30, 60])}
    names = list(sizes)
    parts = [Part(k, 3).select(names, size=sizes.get, name=str) for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(names)                       # every unit in exactly one part
    assert all(p == sorted(p) for p in parts)                            # in listing order
    loads = [sum(sizes[n] for n in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes.values()) // 2, loads   # largest first: about the same bytes
    assert parts == [Part(k, 3).select(list(reversed(names)), size=sizes.get, name=str)[::-1] for k in range(3)]
    assert Part(0, 1).select(names, size=sizes.get, name=str) == names


def test_each_part_writes_under_rank_ids_no_other_part_uses():
    ids = {(k, r): Part(k, 3).output_rank(r) for k in range(3) for r in range(4)}
    assert len(set(ids.values())) == len(ids)
    assert all(Part(k, 3).owns(rank) and not Part((k + 1) % 3, 3).owns(rank) for (k, _), rank in ids.items())
    assert Part(0, 1).output_rank(5) == 5 and Part(0, 1).owns(5)


def lease(place, **kw) -> PartLease:
    return PartLease(place, Part(1, 3), lease_seconds=kw.pop("lease_seconds", 2.0),
                     settle_seconds=kw.pop("settle_seconds", 0.2), say=kw.pop("say", lambda line: None), **kw)


def test_a_second_holder_waits_for_the_first_to_release(tmp_path):
    place = LocalPlace(tmp_path)
    first, second = lease(place, lease_seconds=30), lease(place, lease_seconds=30)
    first.acquire()
    first.check()
    waited = []
    thread = threading.Thread(target=lambda: waited.append(second.acquire()))
    thread.start()
    time.sleep(1.0)
    assert not waited, "the second must not hold the part while the first does"
    first.release()
    thread.join(10)
    assert waited and waited[0] >= 1.0
    second.check()
    second.release()


def _hold_forever(root: str) -> None:
    holder = PartLease(LocalPlace(root), Part(1, 3), lease_seconds=30, settle_seconds=0.1, say=lambda line: None)
    holder.acquire()
    time.sleep(3600)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=_hold_forever, args=(str(tmp_path),))
    process.start()
    deadline = time.time() + 60
    while not (tmp_path / lease_name(Part(1, 3))).exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # past its settle time: it holds the part
    os.kill(process.pid, 9)
    process.join()
    started = time.monotonic()
    newcomer = lease(LocalPlace(tmp_path), lease_seconds=30)
    newcomer.acquire()
    assert time.monotonic() - started < 5, "a dead pid on this host needs no lease time"
    newcomer.release()


def test_a_silent_holder_elsewhere_is_taken_over_after_the_lease_time(tmp_path):
    place = LocalPlace(tmp_path)
    place.write(lease_name(Part(1, 3)), b'{"owner": "other", "host": "another-host", "pid": 1, "beat": 7}')
    started = time.monotonic()
    newcomer = lease(place, lease_seconds=1.5)
    newcomer.acquire()
    assert time.monotonic() - started >= 1.5
    newcomer.release()


def test_two_claims_at_once_leave_one_holder(tmp_path):
    place = LocalPlace(tmp_path)
    leases = [lease(place, lease_seconds=30, settle_seconds=0.5) for _ in range(2)]
    holding = []
    threads = [threading.Thread(target=lambda lz=lz: (lz.acquire(), holding.append(lz)), daemon=True)
               for lz in leases]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    assert len(holding) == 1
    holding[0].release()
    for thread in threads:
        thread.join(10)
    assert len(holding) == 2
    holding[1].release()


def test_a_holder_that_was_taken_over_stops_before_its_next_commit(tmp_path):
    place = LocalPlace(tmp_path)
    holder = lease(place, lease_seconds=0.8)
    holder.acquire()
    place.write(lease_name(Part(1, 3)), b'{"owner": "usurper", "host": "elsewhere", "pid": 1, "beat": 0}')
    time.sleep(0.6)  # the holder's next beat reads the lease
    with pytest.raises(LeaseLost, match="taken over by elsewhere"):
        holder.check()
    holder.release()
