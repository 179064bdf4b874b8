"""Array jobs: part K of N of one job, as independent processes that share only the output.

A scheduler (a Kubernetes Indexed Job, an AWS Batch array job, a SLURM job array) starts N tasks and
retries or replaces each on its own; every task runs `wds-encode --part K/N` (or finds K and N in the
scheduler's variables). Part K:
- takes a fixed share of the units, balanced by bytes (`Part.select`: largest first, each to the part
  with the fewest bytes so far), the same on every retry since it depends only on the listing;
- writes under rank ids no other part uses (`Part.output_rank`: K, K+N, K+2N, ... for its ranks 0, 1, 2),
  so its folders, batch ids, records and writing markers are its own, and its clean-up of an
  interrupted run touches only what it owns (`Part.owns`);
- holds the part's lease (`Lease`) while it runs, so a retry racing a slow original waits for it
  instead of doing the same work beside it. A whole job holds a lease too, so the same job started
  twice on one output runs once. Exactly once does not depend on the lease (a unit commits by a
  create-if-absent, `pipeline.manifest`); the lease saves duplicate work and says whose objects
  the clean-up may remove.
"""

from __future__ import annotations

import heapq
import json
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, TypeVar

from ..storage import Place
from .processes import process_gone, this_process

PART_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
PARTS_DIR = "manifest/parts"
LEASE_SECONDS = 60.0       # a holder not heard from for this long (on the waiter's clock) is taken to be gone

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
        owners = deal(items, self.count, size=size, name=name)
        return [item for item, owner in zip(items, owners) if owner == self.index]


def deal(items: Sequence[T], count: int, size: Callable[[T], int], name: Callable[[T], str]) -> list[int]:
    """The part (0..count-1) each of `items` goes to, as `Part.select` deals them: largest first (ties by
    name), each to the part with the fewest bytes so far (ties to the lower part). One pass for every part
    (status reads all N parts' shares of a listing at once)."""
    owners = [0] * len(items)
    loads = [(0, k) for k in range(count)]   # a heap: the part with the fewest bytes (then the lowest) on top
    for i in sorted(range(len(items)), key=lambda i: (-size(items[i]), name(items[i]))):
        load, target = heapq.heappop(loads)
        owners[i] = target
        heapq.heappush(loads, (load + size(items[i]), target))
    return owners


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


def lease_name(part: Part) -> str:
    """The lease object of a part, or of a whole job (Part(0, 1))."""
    if part.whole:
        return f"{PARTS_DIR}/job.lease"
    return f"{PARTS_DIR}/part-{part.index}-of-{part.count}.lease"


class LeaseLost(RuntimeError):
    """Another process holds this part now: this one stops before committing more."""


class NoConditionalWrites(RuntimeError):
    """The output's store does not honour conditional writes, which array parts need."""


def no_conditional_writes(url: str, part: Part) -> str:
    """Why an array part is refused on a store that ignores conditional writes."""
    return (f"{url}: this store ignores conditional writes (If-None-Match), so two tasks of one part could not "
            f"be kept apart: array parts (--part {part.label}) need a store that has them (AWS S3, MinIO, a local "
            "disk); run the job whole (no --part) here")


def read_lease(place: Place, name: str) -> Optional[dict]:
    tagged = place.read_tagged(name)
    return None if tagged is None else _parse_lease(tagged.data)


def lease_alive(place: Place, name: str, generation: int) -> bool:
    """Whether the lease `name` is still held by generation `generation` (not released, not taken over)."""
    lease = read_lease(place, name)
    return lease is not None and not lease.get("released") and int(lease.get("generation", 0)) == generation


def _parse_lease(data: bytes) -> Optional[dict]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


class Lease:
    """Who runs part K (or the whole job) now, so that a retry racing a slow original, or a job started
    twice, does not do the same work twice, and so that the clean-up knows which writers are dead.

    The lease is one small object, `manifest/parts/part-K-of-N.lease` (`job.lease` for a whole job),
    holding its owner (a random id), a generation number, host, pid and a beat number. It is taken,
    renewed and taken over only by conditional writes: created if absent, else replaced if unchanged
    since read (S3's If-None-Match / If-Match on the ETag; locally a link, and a compare-and-rename
    under a lock). Of two newcomers, one write wins and the other sees the new holder. A newcomer takes
    a lease that is released, or whose holder is gone: the beat has not changed for `lease_seconds` on
    the newcomer's own clock (no two hosts' clocks are compared), or, in the same PID namespace of the
    same boot, its process no longer exists. Each take-over raises the generation, which goes into the
    names of everything the new holder writes (`writers.new_writer_id`) and into its writing markers.

    The holder renews the lease every `lease_seconds`/4 (a renewal that finds it changed means it was
    taken over), and commits a unit only while its last renewal is under half the lease time old
    (`check`): a holder that stalled long enough to be taken over finds out before its next commit.

    On a store that ignores conditional writes (`Place.conditional_writes`), a whole job warns and goes
    on (its lease is then advisory); array parts are refused (`NoConditionalWrites`)."""

    def __init__(self, place: Place, part: Part, *, lease_seconds: float = LEASE_SECONDS,
                 say: Optional[Callable[[str], None]] = None, on_lost: Optional[Callable[[str], None]] = None):
        self.place = place
        self.part = part
        self.name = lease_name(part)
        self.lease_seconds = lease_seconds
        self.owner = uuid.uuid4().hex
        self.generation = 0
        self.say = say or (lambda line: print(f"wds-encode: {line}", file=sys.stderr, flush=True))
        self._tag: Optional[str] = None
        self._beat = 0
        self._beat_at = 0.0            # monotonic time of the last renewal that found the lease ours
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._advisory = False         # the store ignores conditional writes: nothing is fenced
        self.on_lost = on_lost         # told at once when a renewal finds the lease taken over (the other ranks)

    @property
    def what(self) -> str:
        return "the job" if self.part.whole else f"part {self.part.label}"

    def marker_fields(self) -> dict:
        """What every writing marker of this attempt says about its lease."""
        return {"lease": self.name, "generation": self.generation}

    def _claim(self, released: bool = False) -> bytes:
        return json.dumps({
            "owner": self.owner, "generation": self.generation, "part": self.part.label,
            **this_process(), "beat": self._beat, "written_at": time.time(),
            "released": released}).encode("utf-8")

    # -- taking it
    def acquire(self, on_wait: Optional[Callable[[], None]] = None) -> float:
        """Wait until this process holds the lease; returns the seconds waited. `on_wait` is called while
        waiting (to notice a stop signal or a failed job)."""
        if not self.place.conditional_writes():
            if not self.part.whole:
                raise NoConditionalWrites(no_conditional_writes(self.place.url, self.part))
            self._advisory = True
            self.say(f"warning: {self.place.url}: this store ignores conditional writes (If-None-Match), so "
                     "nothing keeps a second run on this output from writing beside this one: start one run at "
                     "a time here")
        started = time.monotonic()
        seen: Optional[tuple] = None       # (owner, generation, beat) of the holder, and since when unchanged
        seen_since = 0.0
        told = False
        while True:
            current = self.place.read_tagged(self.name)
            lease = None if current is None else _parse_lease(current.data)
            holder = None if lease is None or lease.get("released") else (
                lease.get("owner"), lease.get("generation"), lease.get("beat"))
            # a holder whose process is gone (seen from its host and PID namespace) frees it at once;
            # elsewhere, or in another container with the same hostname, only the lease time tells
            free = holder is None or process_gone(lease)
            if not free:
                if holder != seen:
                    seen, seen_since = holder, time.monotonic()
                elif time.monotonic() - seen_since >= self.lease_seconds:
                    free = True
            if free:
                taken_over = holder is not None   # not released: its holder died or stalled
                self.generation = int((lease or {}).get("generation", 0)) + 1
                self._beat = 0
                if self._advisory:
                    self.place.write(self.name, self._claim())
                    tag = ""
                else:
                    tag = self.place.replace(self.name, self._claim(), current.tag if current else None)
                if tag is not None:
                    self._tag, self._beat_at = tag, time.monotonic()
                    self._start_beating()
                    if taken_over:
                        self.say(f"{self.what}: took over from {lease.get('host')} pid {lease.get('pid')}, "
                                 f"whose process is gone or has not renewed its lease for {self.lease_seconds:g} s; "
                                 "what it left uncommitted is cleaned up")
                    return time.monotonic() - started
                continue   # another claim came first: look again
            if not told:
                told = True
                self.say(f"{self.what} is being written by {lease.get('host')} pid {lease.get('pid')}; "
                         f"waiting until it finishes, or until it has not been heard from for "
                         f"{self.lease_seconds:g} s (a retry racing its original never does the same work twice)")
            if on_wait is not None:
                on_wait()
            time.sleep(min(1.0, self.lease_seconds / 8))

    # -- holding it
    def _start_beating(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name="wds-encode-lease", daemon=True)
        self._thread.start()

    def _renew(self, released: bool = False) -> bool:
        """Write the lease again if it is still this holder's version; False when it was taken over."""
        if self._advisory:
            current = read_lease(self.place, self.name)
            if current is None or current.get("owner") != self.owner:
                return False
            self.place.write(self.name, self._claim(released))
            return True
        tag = self.place.replace(self.name, self._claim(released), self._tag)
        if tag is None:
            return False
        self._tag = tag
        return True

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                started = time.monotonic()
                self._beat += 1
                if not self._renew():
                    self._lost = self._taken_over_by(read_lease(self.place, self.name) or {})
                    if self.on_lost is not None:
                        self.on_lost(self._lost)
                    return
                self._beat_at = started
            except Exception:  # a flaky store: keep trying; `check` stops commits if it lasts
                continue

    def _taken_over_by(self, current: dict) -> str:
        return (f"{self.what} was taken over by {current.get('host')} pid {current.get('pid')} "
                f"(this process had not renewed its lease for {time.monotonic() - self._beat_at:.0f} s)")

    def taken_over(self) -> Optional[str]:
        """Why this process lost the lease, if another holds it now (read from the store, not waiting for
        the next renewal): what explains a failure such as a write refused because the new holder's
        clean-up removed this process's unfinished upload."""
        if self._lost is not None:
            return self._lost
        try:
            current = read_lease(self.place, self.name)
        except Exception:   # the store does not answer: nothing to tell
            return None
        if current is None or (current.get("owner"), current.get("generation")) == (self.owner, self.generation):
            return None
        return self._taken_over_by(current)

    def check(self) -> None:
        """Raise LeaseLost unless this process may still commit (its lease is its own and recently renewed)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        silent = time.monotonic() - self._beat_at
        if silent > self.lease_seconds / 2:
            raise LeaseLost(f"{self.what}: the lease was not renewed for {silent:.0f} s "
                            "(the process stalled, or the output's store did not answer); another task may take it over")

    def release(self) -> None:
        """Let a waiting retry go on at once (it finds the part done, or resumes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost is None and self._tag is not None:
            try:
                self._renew(released=True)
            except Exception:
                pass  # the lease lapses on its own

