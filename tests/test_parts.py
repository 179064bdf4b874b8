"""job/parts.py: which part a task is (--part, the schedulers' variables), the balanced deal of units,
the part's rank ids, and the lease that keeps a retry from doing the work of a running original."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from wds_encode.job.parts import (Lease, LeaseLost, NoConditionalWrites, Part, PartError, lease_alive,
                                  lease_name, parse_part, part_from_scheduler, read_lease)
from wds_encode.job.processes import pid_namespace, process_start
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


# ---------------------------------------------------------------------- the lease

NAME = lease_name(Part(1, 3))


def lease(place, part: Part = Part(1, 3), *, lease_seconds: float = 2.0, say=lambda line: None) -> Lease:
    return Lease(place, part, lease_seconds=lease_seconds, say=say)


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.02)


def foreign_lease(**fields) -> bytes:
    """A lease object as another process would have written it."""
    return json.dumps({"owner": "other", "generation": 1, "part": "1/3", "host": "another-host", "pid": 1,
                       "pid_started": 1, "pid_namespace": "another-boot:4026531836", "beat": 7,
                       "written_at": time.time(), "released": False, **fields}).encode()


def dead_pid() -> int:
    """The pid of a process of this PID namespace that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start(child.pid) is None
    return child.pid


class Stalling:
    """A Place whose conditional writes hang while `running` is clear: a holder's renewals stop as
    when its process stalls or its store does not answer."""

    def __init__(self, place):
        self._place = place
        self.running = threading.Event()
        self.running.set()

    def __getattr__(self, name):
        return getattr(self._place, name)

    def replace(self, relative, data, tag):
        self.running.wait()
        return self._place.replace(relative, data, tag)


def test_lease_names_of_a_part_and_of_a_whole_job():
    assert lease_name(Part(1, 3)) == "manifest/parts/part-1-of-3.lease"
    assert lease_name(Part()) == lease_name(Part(0, 1)) == "manifest/parts/job.lease"


def test_pid_namespace_names_this_boot_and_namespace_and_is_the_same_in_a_child_process():
    namespace = pid_namespace()
    assert namespace is not None and namespace.count(":") == 1
    boot, inode = namespace.split(":")
    assert boot == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert int(inode) == os.stat("/proc/self/ns/pid").st_ino
    code = "from wds_encode.job.processes import pid_namespace; print(pid_namespace())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == namespace


def test_the_first_holder_takes_a_free_lease_at_once_as_generation_1(place):
    holder = lease(place, lease_seconds=30)
    assert holder.acquire() < 5
    holder.check()
    written = read_lease(place, NAME)
    assert written["owner"] == holder.owner and written["generation"] == holder.generation == 1
    assert written["host"] == socket.gethostname() and written["pid"] == os.getpid()
    assert written["pid_namespace"] == pid_namespace() and written["released"] is False
    assert holder.marker_fields() == {"lease": NAME, "generation": 1}
    assert lease_alive(place, NAME, 1) and not lease_alive(place, NAME, 2)
    holder.release()
    assert read_lease(place, NAME)["released"] is True
    assert not lease_alive(place, NAME, 1)
    assert not lease_alive(place, lease_name(Part(2, 3)), 1)         # none at all


def test_a_second_holder_waits_for_the_first_to_release_and_gets_the_next_generation(place):
    said = []
    first, second = lease(place, lease_seconds=30), lease(place, lease_seconds=30, say=said.append)
    first.acquire()
    first.check()
    waited = []
    thread = threading.Thread(target=lambda: waited.append(second.acquire()))
    thread.start()
    time.sleep(1.5)
    assert not waited, "the second must not hold the part while the first does"
    assert thread.is_alive() and read_lease(place, NAME)["owner"] == first.owner
    assert said and "is being written by" in said[0] and f"pid {os.getpid()}" in said[0]
    first.release()
    thread.join(15)
    assert waited and waited[0] >= 1.5
    assert (first.generation, second.generation) == (1, 2)
    second.check()
    assert read_lease(place, NAME)["owner"] == second.owner
    assert lease_alive(place, NAME, 2) and not lease_alive(place, NAME, 1)
    second.release()
    assert not lease_alive(place, NAME, 2)


def _hold_forever(root: str, held) -> None:
    holder = Lease(LocalPlace(root), Part(1, 3), lease_seconds=30, say=lambda line: None)
    holder.acquire()
    held.set()
    time.sleep(3600)


def test_a_dead_holder_in_this_pid_namespace_is_taken_over_at_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    process = context.Process(target=_hold_forever, args=(str(tmp_path), held))
    process.start()
    try:
        assert held.wait(60), "the holder never took the lease"
        written = read_lease(LocalPlace(tmp_path), NAME)
        assert written["pid"] == process.pid and written["pid_namespace"] == pid_namespace()
        assert written["generation"] == 1
    finally:
        os.kill(process.pid, 9)
        process.join()
    started = time.monotonic()
    newcomer = lease(LocalPlace(tmp_path), lease_seconds=30)
    newcomer.acquire()
    assert time.monotonic() - started < 5, "a dead pid in this PID namespace needs no lease time"
    assert newcomer.generation == 2 and read_lease(LocalPlace(tmp_path), NAME)["owner"] == newcomer.owner
    newcomer.release()


def test_a_holder_with_this_hostname_in_another_pid_namespace_waits_out_the_lease_time(tmp_path):
    """Two containers on one host share a hostname, and a pid of one means nothing in the other: a pid
    that is not alive here is no proof the holder is gone."""
    place = LocalPlace(tmp_path)
    pid = dead_pid()
    mine = pid_namespace()
    boot, inode = mine.split(":")
    for other in (f"{boot}:{int(inode) + 1}", f"another-boot:{inode}", None):
        place.write(NAME, foreign_lease(host=socket.gethostname(), pid=pid, pid_started=12345,
                                        pid_namespace=other, generation=4))
        started = time.monotonic()
        newcomer = lease(place, lease_seconds=1.5)
        newcomer.acquire()
        assert time.monotonic() - started >= 1.5, other
        assert newcomer.generation == 5
        newcomer.release()
    # the same lease in this PID namespace: the pid is known to be gone, no lease time
    place.write(NAME, foreign_lease(host=socket.gethostname(), pid=pid, pid_started=12345, pid_namespace=mine,
                                    generation=4))
    started = time.monotonic()
    newcomer = lease(place, lease_seconds=30)
    newcomer.acquire()
    assert time.monotonic() - started < 5 and newcomer.generation == 5
    newcomer.release()


def test_a_live_process_in_this_pid_namespace_on_another_host_is_not_taken_for_dead(tmp_path):
    """Only the host *and* the namespace together make a pid comparable."""
    place = LocalPlace(tmp_path)
    place.write(NAME, foreign_lease(host="another-host", pid=dead_pid(), pid_namespace=pid_namespace()))
    started = time.monotonic()
    newcomer = lease(place, lease_seconds=1.0)
    newcomer.acquire()
    assert time.monotonic() - started >= 1.0 and newcomer.generation == 2
    newcomer.release()


def test_a_silent_holder_elsewhere_is_taken_over_after_the_lease_time(place):
    place.write(NAME, foreign_lease(generation=7))
    started = time.monotonic()
    newcomer = lease(place, lease_seconds=1.5)
    newcomer.acquire()
    assert time.monotonic() - started >= 1.5
    assert newcomer.generation == 8
    written = read_lease(place, NAME)
    assert written["owner"] == newcomer.owner and written["generation"] == 8 and not written["released"]
    newcomer.release()


def test_a_holder_elsewhere_that_keeps_renewing_is_never_taken_over(tmp_path):
    place = LocalPlace(tmp_path)
    place.write(NAME, foreign_lease(beat=0))
    beating = threading.Event()
    beating.set()

    def renew():   # another host's holder, renewing (by conditional writes) every 0.25 s
        beat = 0
        while beating.is_set():
            time.sleep(0.25)
            current = place.read_tagged(NAME)
            beat += 1
            place.replace(NAME, foreign_lease(beat=beat), current.tag)
    renewer = threading.Thread(target=renew)
    renewer.start()
    newcomer = lease(place, lease_seconds=1.0)
    got = []
    thread = threading.Thread(target=lambda: got.append(newcomer.acquire()))
    thread.start()
    time.sleep(3.0)   # three lease times
    assert not got, "a holder heard from within the lease time keeps the lease"
    beating.clear()
    renewer.join()
    stopped = time.monotonic()
    thread.join(15)
    assert got and time.monotonic() - stopped >= 0.8   # a lease time after its last renewal
    assert newcomer.generation == 2
    newcomer.release()


class ReadsTogether:
    """A Place (a view of its own, as another process has) whose first lease read waits, after reading,
    for the other claimant's: both find the lease free before either writes its claim."""

    def __init__(self, place, together: threading.Barrier):
        self._place = place
        self._together = together
        self._first = True
        self.claims = []                      # (tag the claim was conditioned on, its outcome)

    def __getattr__(self, name):
        return getattr(self._place, name)

    def read_tagged(self, relative):
        found = self._place.read_tagged(relative)
        if self._first:
            self._first = False
            self._together.wait(30)
        return found

    def replace(self, relative, data, tag):
        outcome = self._place.replace(relative, data, tag)
        self.claims.append((tag, outcome))
        return outcome


def another_view(place):
    """The same output, reached through a Place object of its own."""
    if isinstance(place, LocalPlace):
        return LocalPlace(place.url)
    from wds_encode.storage import Storage
    return Storage().place(place.url)


def test_two_claims_at_once_leave_exactly_one_holder(place):
    together = threading.Barrier(2)
    views = [ReadsTogether(another_view(place), together) for _ in range(2)]
    leases = [lease(view, lease_seconds=30) for view in views]
    holding = []

    def claim(lz):
        lz.acquire()
        holding.append(lz)
    threads = [threading.Thread(target=claim, args=(lz,), daemon=True) for lz in leases]
    for thread in threads:
        thread.start()
    wait_for(lambda: holding, what="a claim to win")
    time.sleep(1.5)
    assert len(holding) == 1, "one claim wins, the other waits"
    winner = holding[0]
    loser = next(lz for lz in leases if lz is not winner)
    assert [thread.is_alive() for thread in threads].count(True) == 1
    # both claimed the free lease (a create-if-absent each): one was refused
    assert sorted((claims[0][0], claims[0][1] is None) for claims in (v.claims for v in views)) == [
        (None, False), (None, True)]
    assert winner.generation == 1 and read_lease(place, NAME)["owner"] == winner.owner
    winner.check()
    winner.release()
    for thread in threads:
        thread.join(15)
    assert holding == [winner, loser] and loser.generation == 2
    loser.check()
    assert read_lease(place, NAME)["owner"] == loser.owner
    loser.release()


def _hold_briefly(root: str, start, results) -> None:
    place = LocalPlace(root)
    holder = Lease(place, Part(1, 3), lease_seconds=4.0, say=lambda line: None)
    start.wait()
    holder.acquire()
    began = time.monotonic()
    mine = True
    while time.monotonic() - began < 0.3:   # while it holds the lease, no one else does
        holder.check()
        mine = mine and read_lease(place, NAME)["owner"] == holder.owner
        time.sleep(0.02)
    ended = time.monotonic()
    holder.release()
    results.put((holder.generation, began, ended, mine))


def test_processes_claiming_one_lease_at_once_hold_it_one_after_another(tmp_path):
    context = multiprocessing.get_context("spawn")
    racers = 4
    start, results = context.Barrier(racers), context.Queue()
    processes = [context.Process(target=_hold_briefly, args=(str(tmp_path), start, results))
                 for _ in range(racers)]
    for process in processes:
        process.start()
    held = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert [generation for generation, *_ in held] == list(range(1, racers + 1))
    assert all(mine for *_, mine in held)
    for (_, _, ended, _), (_, began, _, _) in zip(held, held[1:]):
        assert ended <= began, "two processes held the lease at once"


def test_a_holder_taken_over_finds_out_at_check_and_its_release_leaves_the_new_holder(place):
    stalling = Stalling(place)
    holder = lease(stalling, lease_seconds=1.0)
    holder.acquire()
    holder.check()
    stalling.running.clear()                      # its renewals hang from now on
    newcomer = lease(place, lease_seconds=1.0)
    started = time.monotonic()
    newcomer.acquire()
    assert time.monotonic() - started >= 1.0, "a holder of this process, alive, is waited out"
    assert (holder.generation, newcomer.generation) == (1, 2)
    with pytest.raises(LeaseLost, match="not renewed"):   # silent for over half its lease time
        holder.check()
    # what explains the holder's next failure (a write the newcomer's clean-up refused), before its renewal
    # has found out: read from the store now
    assert f"taken over by {socket.gethostname()} pid {os.getpid()}" in holder.taken_over()
    assert newcomer.taken_over() is None
    stalling.running.set()                        # its renewal goes out, and finds the lease changed

    def lost() -> bool:
        try:
            holder.check()
        except LeaseLost as exc:
            return "taken over" in str(exc)
        return False
    wait_for(lost, what="the holder to find it was taken over")
    with pytest.raises(LeaseLost, match=f"taken over by {socket.gethostname()} pid {os.getpid()}"):
        holder.check()
    holder.release()
    written = read_lease(place, NAME)
    assert written["owner"] == newcomer.owner and written["generation"] == 2 and not written["released"]
    assert lease_alive(place, NAME, 2) and not lease_alive(place, NAME, 1)
    newcomer.check()
    newcomer.release()
    assert read_lease(place, NAME)["released"] is True and not lease_alive(place, NAME, 2)


def _take_over_by_hand(place, **fields) -> dict:
    """Another host's take-over: a conditional write of generation+1 over the version read."""
    while True:
        current = place.read_tagged(NAME)
        taken = {**json.loads(current.data), "owner": "usurper", "host": "elsewhere", "pid": 1, "beat": 0,
                 "pid_namespace": "elsewhere:1", "released": False, **fields}
        taken["generation"] = json.loads(current.data)["generation"] + 1
        if place.replace(NAME, json.dumps(taken).encode(), current.tag) is not None:
            return taken


def test_a_holder_whose_lease_was_taken_over_stops_before_its_next_commit(place):
    holder = lease(place, lease_seconds=0.8)
    holder.acquire()
    taken = _take_over_by_hand(place)
    assert taken["generation"] == 2
    wait_for(lambda: holder._lost is not None, what="the holder's next renewal")
    with pytest.raises(LeaseLost, match="taken over by elsewhere pid 1"):
        holder.check()
    holder.release()
    assert read_lease(place, NAME) == taken        # neither renewed nor released by the old holder
    assert lease_alive(place, NAME, 2)


def test_the_release_of_a_holder_taken_over_is_refused_even_before_it_noticed(place):
    holder = lease(place, lease_seconds=30)         # its next renewal is far off
    holder.acquire()
    taken = _take_over_by_hand(place)
    holder.release()                                # a conditional write from its own version: refused
    assert read_lease(place, NAME) == taken and lease_alive(place, NAME, 2)


def test_a_holder_whose_renewals_stall_stops_committing_even_if_no_one_took_over(tmp_path):
    stalling = Stalling(LocalPlace(tmp_path))
    holder = lease(stalling, lease_seconds=1.0)
    holder.acquire()
    stalling.running.clear()
    time.sleep(0.8)
    with pytest.raises(LeaseLost, match="not renewed"):
        holder.check()
    stalling.running.set()                          # the store answers again: the lease is still its own
    wait_for(lambda: _checks(holder), what="a renewal")
    assert holder.generation == 1 and lease_alive(stalling, NAME, 1)
    holder.release()


def _checks(holder) -> bool:
    try:
        holder.check()
        return True
    except LeaseLost:
        return False


def test_on_wait_is_called_while_waiting_and_can_stop_the_wait(tmp_path):
    place = LocalPlace(tmp_path)
    place.write(NAME, foreign_lease())
    calls = []

    class Stop(Exception):
        pass

    def on_wait():
        calls.append(1)
        if len(calls) == 3:
            raise Stop
    with pytest.raises(Stop):
        lease(place, lease_seconds=4).acquire(on_wait)
    assert len(calls) == 3
    assert read_lease(place, NAME)["owner"] == "other"


class NoConditions(LocalPlace):
    """A store that ignores If-None-Match / If-Match (some S3-compatible ones)."""

    def conditional_writes(self) -> bool:
        return False


def test_array_parts_are_refused_on_a_store_without_conditional_writes(tmp_path):
    place = NoConditions(str(tmp_path))
    with pytest.raises(NoConditionalWrites, match="--part 1/3"):
        lease(place).acquire()
    assert read_lease(place, NAME) is None


def test_a_whole_job_on_a_store_without_conditional_writes_warns_and_goes_on(tmp_path):
    place = NoConditions(str(tmp_path))
    said = []
    whole = lease(place, Part(), lease_seconds=30, say=said.append)
    whole.acquire()
    assert any("warning" in line and "conditional writes" in line for line in said)
    assert read_lease(place, "manifest/parts/job.lease")["owner"] == whole.owner
    assert whole.generation == 1
    assert whole.marker_fields() == {"lease": "manifest/parts/job.lease", "generation": 1}
    whole.check()
    whole.release()
    assert read_lease(place, "manifest/parts/job.lease")["released"] is True


def test_a_whole_job_holds_the_job_lease(place):
    first = lease(place, Part(), lease_seconds=30)
    first.acquire()
    assert read_lease(place, "manifest/parts/job.lease")["owner"] == first.owner
    assert read_lease(place, NAME) is None          # no part's lease
    first.release()
    second = lease(place, Part(), lease_seconds=30)
    second.acquire()
    assert second.generation == 2
    second.release()
