"""Array jobs: part K of N of one job, as independent processes that share only the output.

A scheduler (a Kubernetes Indexed Job, an AWS Batch array job, a SLURM job array) starts N tasks and
retries or replaces each on its own; every task runs `wds-encode --part K/N` (or finds K and N in the
scheduler's variables). Part K:
- takes a fixed share of the units, balanced by bytes (`Part.select`: largest first, each to the part
  with the fewest bytes so far), the same on every retry since it depends only on the listing;
- writes under rank ids no other part uses (`Part.output_rank`: K, K+N, K+2N, ... for its ranks 0, 1, 2),
  so its folders, batch ids, records and writing markers are its own, and its clean-up of an
  interrupted run touches only what it owns (`Part.owns`);
- holds the part's lease (`PartLease`) while it runs, so a retry racing a slow original waits for it
  instead of writing beside it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, TypeVar

from ..storage import Place

PART_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
PARTS_DIR = "manifest/parts"
LEASE_SECONDS = 60.0       # a holder not heard from for this long (on the waiter's clock) is taken to be gone
SETTLE_SECONDS = 2.0       # between writing a claim and reading it back: far longer than one request takes

T = TypeVar("T")


class PartError(ValueError):
    """--part, or the scheduler's variables, do not name a valid part."""


@dataclass(frozen=True)
class Part:
    """Part `index` (0-based) of `count`; Part(0, 1) is a whole job."""

    index: int = 0
    count: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def output_rank(self, rank: int) -> int:
        """The id this part's rank `rank` writes under (its folder OUT/{id}/, its batch ids and records)."""
        return self.index + self.count * rank

    def owns(self, output_rank: int) -> bool:
        return output_rank % self.count == self.index

    def select(self, items: Sequence[T], size: Callable[[T], int], name: Callable[[T], str]) -> list[T]:
        """This part's share of `items`, in their order: dealt largest first (ties by name), each to the
        part with the fewest bytes so far (ties to the lower part), so every part gets about the same input
        and the deal depends only on the items."""
        if self.whole:
            return list(items)
        loads = [0] * self.count
        mine: set[int] = set()
        for i in sorted(range(len(items)), key=lambda i: (-size(items[i]), name(items[i]))):
            target = min(range(self.count), key=lambda k: (loads[k], k))
            loads[target] += size(items[i])
            if target == self.index:
                mine.add(i)
        return [item for i, item in enumerate(items) if i in mine]


def parse_part(text: str) -> Part:
    """`K/N` (K from 0 to N-1) -> Part."""
    match = PART_RE.match(text or "")
    if not match:
        raise PartError(f"--part {text!r}: expected K/N, e.g. --part 0/8 for the first of 8 parts")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise PartError(f"--part {text}: K must be from 0 to N-1 (parts are numbered from 0, "
                        "as JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX and SLURM_ARRAY_TASK_ID are)")
    return Part(index, count)


def part_from_scheduler(env: Mapping[str, str], num_parts: Optional[int]) -> tuple[Optional[Part], str]:
    """The part a scheduler's array task is, from its variables: (Part or None, where it came from).

    - Kubernetes Indexed Job: JOB_COMPLETION_INDEX, with the count from --num-parts (the Job's
      `completions`; Kubernetes does not put it in the environment);
    - AWS Batch array job: AWS_BATCH_JOB_ARRAY_INDEX and AWS_BATCH_JOB_ARRAY_SIZE (our variable:
      Batch sets only the index; pass the array size, or use --num-parts);
    - SLURM job array: SLURM_ARRAY_TASK_ID, and SLURM_ARRAY_TASK_COUNT (or --num-parts); task ids
      are counted from SLURM_ARRAY_TASK_MIN, so `--array=1-8` is parts 0..7.
    """
    def count_from(var: Optional[str]) -> Optional[int]:
        if num_parts is not None:
            return num_parts
        if var and env.get(var, "").strip():
            return _int(env, var)
        return None

    if env.get("JOB_COMPLETION_INDEX", "").strip():
        source, index, count = "JOB_COMPLETION_INDEX", _int(env, "JOB_COMPLETION_INDEX"), count_from(None)
        missing = "--num-parts (the Indexed Job's completions)"
    elif env.get("AWS_BATCH_JOB_ARRAY_INDEX", "").strip():
        source, index = "AWS_BATCH_JOB_ARRAY_INDEX", _int(env, "AWS_BATCH_JOB_ARRAY_INDEX")
        count = count_from("AWS_BATCH_JOB_ARRAY_SIZE")
        missing = "--num-parts or AWS_BATCH_JOB_ARRAY_SIZE (the array size)"
    elif env.get("SLURM_ARRAY_TASK_ID", "").strip():
        source = "SLURM_ARRAY_TASK_ID"
        index = _int(env, "SLURM_ARRAY_TASK_ID") - (_int(env, "SLURM_ARRAY_TASK_MIN")
                                                    if env.get("SLURM_ARRAY_TASK_MIN", "").strip() else 0)
        count = count_from("SLURM_ARRAY_TASK_COUNT")
        missing = "--num-parts or SLURM_ARRAY_TASK_COUNT"
    else:
        if num_parts is not None and num_parts != 1:
            raise PartError(f"--num-parts {num_parts} without a part: give --part K/{num_parts}, or run as an "
                            "array task (JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX or SLURM_ARRAY_TASK_ID)")
        return None, ""
    if count is None:
        raise PartError(f"{source}={env[source]} says which part this task is, but not of how many: give {missing}")
    return parse_part(f"{index}/{count}"), source


def _int(env: Mapping[str, str], var: str) -> int:
    try:
        return int(env[var].strip())
    except ValueError:
        raise PartError(f"{var}={env[var]!r} is not a whole number") from None


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started (clock ticks after boot, from /proc), or None: no such process, or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])   # field 22, counted after the command name
    except (ValueError, IndexError):
        return None


def lease_name(part: Part) -> str:
    return f"{PARTS_DIR}/part-{part.index}-of-{part.count}.lease"


class LeaseLost(RuntimeError):
    """Another process holds this part now: this one stops before committing more."""


class PartLease:
    """Who runs part K now, so that a retry racing a slow original (or a task started twice) never writes
    beside it: two writers of one part would share rank ids, and one's clean-up would remove the other's
    work in flight.

    The lease is one small object per part, `manifest/parts/part-K-of-N.lease`, holding its owner (a
    random id), host, pid and a beat number that the holder rewrites every LEASE_SECONDS/4. A newcomer
    takes a lease that is free (released, or absent), or whose holder is gone: on the same host, its pid is
    no longer alive; elsewhere, the beat has not changed for LEASE_SECONDS on the newcomer's own clock (no
    two hosts' clocks are compared). It writes its claim, waits SETTLE_SECONDS and reads the lease back: it
    holds the part only if the claim is still its own. Two newcomers that both found the lease free both
    write; the later claim stands, the earlier one reads it back and waits. A newcomer that came after the
    settle time finds the first claim and waits. That needs only read-after-write consistency (S3 has it,
    as has every local disk), no conditional write, which not every S3-compatible store has.

    The holder checks at each beat that the lease is still its own, and commits a unit only while its last
    beat is recent (`check`: less than half the lease time ago, on its own clock): a holder that stalled
    long enough to be taken over finds out before its next commit and stops (`LeaseLost`)."""

    def __init__(self, place: Place, part: Part, *, lease_seconds: float = LEASE_SECONDS,
                 settle_seconds: float = SETTLE_SECONDS, say: Callable[[str], None] = None):
        self.place = place
        self.part = part
        self.name = lease_name(part)
        self.lease_seconds = lease_seconds
        self.settle_seconds = settle_seconds
        self.owner = uuid.uuid4().hex
        self.say = say or (lambda line: print(f"wds-encode: {line}", file=sys.stderr, flush=True))
        self._beat = 0
        self._beat_at = 0.0            # monotonic time of the last beat that found the lease ours
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- what the lease object says
    def _read(self) -> Optional[dict]:
        data = self.place.read(self.name)
        if data is None:
            return None
        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def _write(self, released: bool = False) -> None:
        self.place.write(self.name, json.dumps({
            "owner": self.owner, "part": self.part.label, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": process_start(os.getpid()),
            "beat": self._beat, "written_at": time.time(), "released": released}).encode("utf-8"))

    # -- taking it
    def acquire(self, on_wait: Optional[Callable[[], None]] = None) -> float:
        """Wait until this process holds the part; returns the seconds waited. `on_wait` is called while
        waiting (to notice a stop signal or a failed job)."""
        started = time.monotonic()
        seen: Optional[tuple] = None       # (owner, beat) of the other holder, and since when unchanged
        seen_since = 0.0
        told = False
        while True:
            current = self._read()
            holder = None if current is None or current.get("released") else (current.get("owner"), current.get("beat"))
            free = holder is None or holder[0] == self.owner or self._gone(current)
            if not free:
                if holder != seen:
                    seen, seen_since = holder, time.monotonic()
                elif time.monotonic() - seen_since >= self.lease_seconds:
                    free = True
            if free:
                self._write()
                time.sleep(self.settle_seconds)
                back = self._read()
                if back is not None and back.get("owner") == self.owner and not back.get("released"):
                    self._beat_at = time.monotonic()
                    self._start_beating()
                    return time.monotonic() - started
                seen, seen_since = None, 0.0     # another claim won: wait for it like any holder
                continue
            if not told:
                told = True
                self.say(f"part {self.part.label} is being written by {current.get('host')} pid {current.get('pid')}; "
                         f"waiting until it finishes, or until it has not been heard from for "
                         f"{self.lease_seconds:g} s (a retry racing its original never writes beside it)")
            if on_wait is not None:
                on_wait()
            time.sleep(min(1.0, self.lease_seconds / 8))

    def _gone(self, lease: dict) -> bool:
        """The holder ran on this host and its process is no longer alive (a pid with another start
        time is another process: pids are reused, and in a container every first process is pid 1)."""
        if lease.get("host") != socket.gethostname():
            return False
        try:
            pid = int(lease.get("pid"))
        except (TypeError, ValueError):
            return False
        started = process_start(pid)
        if started is not None or lease.get("pid_started") is not None:
            return started != lease.get("pid_started")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # -- holding it
    def _start_beating(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name="wds-encode-lease", daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                current = self._read()
                if current is None or current.get("owner") != self.owner:
                    self._lost = (f"part {self.part.label} was taken over by "
                                  f"{(current or {}).get('host')} pid {(current or {}).get('pid')}")
                    return
                started = time.monotonic()
                self._beat += 1
                self._write()
                self._beat_at = started
            except Exception:  # a flaky store: keep trying; `check` stops commits if it lasts
                continue

    def check(self) -> None:
        """Raise LeaseLost unless this process may still commit (its lease is its own and recently renewed)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        silent = time.monotonic() - self._beat_at
        if silent > self.lease_seconds / 2:
            raise LeaseLost(f"part {self.part.label}: the lease was not renewed for {silent:.0f} s "
                            "(the output's store did not answer); another task may take the part over")

    def release(self) -> None:
        """Let a waiting retry go on at once (it finds the part done, or resumes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self._read()
            if current is not None and current.get("owner") == self.owner:
                self._write(released=True)
        except Exception:
            pass  # the lease lapses on its own
