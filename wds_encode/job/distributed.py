"""Where this process sits in a multi-GPU job, and how the job's processes agree on the work.

One `Launch` describes the process, whatever started it: torchrun (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT...), SLURM's srun (SLURM_PROCID, SLURM_LOCALID, the step's node list), plain
environment variables, or nothing (alone; `--devices N` then starts N ranks through torch's own
elastic launcher, the machinery torchrun uses). After that there is one code path.

The job coordinates through the c10d `TCPStore` that the launcher's agent (torchrun) or rank 0
hosts, under a prefix of our own (run id + restart count), never through collectives that could
time out on a long job:
- rank 0 publishes the plan (the ordered units still to do); the others wait for it;
- DataLoader workers claim units with `add(CLAIM, 1)` over that one ordered list, so every unit
  goes to exactly one (rank, worker) and nobody idles while units remain;
- at the start every rank publishes where it runs (host, GPU UUID, CPU affinity) under its host's
  keys, so two ranks given one GPU (a launch mistake: they would split its memory and time) stop
  with a clear error (exit 2) before any work, and each rank knows how many share its cores;
- every rank sends heartbeats; rank 0 watches everyone, the others watch rank 0, and any rank can
  publish an abort reason, so a dead rank stops the job within a heartbeat when it ran on the watcher's
  host (its process is gone: `processes.process_gone`), else within `--peer-timeout`;
- progress counters are summed in the store; at the end every rank publishes its stats there and
  waits (polling, no timeout) until all have; rank 0 reads them all and merges them.
There is no process group: nothing waits on NCCL or gloo, whose network setup can hang a job.
When rank 0 hosts the store, it leaves a barrier last, so it never takes the store away before
the others have read what they need from it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from ..config import SPAWNED_RUN_ID_PREFIX, ConfigError, EncodeConfig
from .processes import process_gone, this_process
from .resources import cpu_affinity

STORE_TIMEOUT = timedelta(minutes=5)      # one store operation, and connecting to the store
JOIN_TIMEOUT_SECONDS = 900.0              # every rank must have joined by then (torchrun's rendezvous default)
HEARTBEAT_SECONDS = 1.0
POLL_SECONDS = 0.2
SLURM_PORT_BASE = 10000                   # MASTER_PORT under srun when none is given: base + job id % span
SLURM_PORT_SPAN = 50000
CLAIM_KEY = "claims/next"
STOP_KEY = "claims/stop"   # set by a rank told to stop (SIGTERM...): no claimer takes another unit
STOP_REPORTED_ENV = "WDS_ENCODE_STOP_REPORTED"  # --devices: a file a rank creates once it has said why it stopped
PROGRESS_KEYS = ("bytes", "units", "windows", "samples", "audio_ms", "errors")
FROM_DEVICE = "from-device"              # Job(device_uuid=...): read the UUID from the device itself


class JobAborted(RuntimeError):
    """Another rank failed or vanished; this rank stopped (its committed units are kept)."""


# --------------------------------------------------------------------------- launch detection

@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as its launcher described it."""

    launcher: str = "alone"         # torchrun | slurm | env | alone
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0            # alone: 0, a free port is picked
    agent_store: bool = False       # torchrun's agent hosts the store: every rank is a client
    run_id: str = "alone"

    def describe(self) -> str:
        return (f"{self.launcher}: {self.world_size} rank(s) on {self.num_nodes} node(s), "
                f"{self.local_world_size} per node")


def _int_env(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"environment variable {name} is not set, but the launcher variables around it are")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: `gpu-[003-010,017],cpu1` -> `gpu-003`."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], entry)


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's tasks-per-node format: `4(x2),3` -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ConfigError(f"cannot parse SLURM tasks per node {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def detect_launch(env: Mapping[str, str]) -> Optional[Launch]:
    """The launch described by the environment, or None when no launcher started this process.

    torchrun (or anything that sets RANK and WORLD_SIZE) wins over SLURM, so torchrun inside an
    srun step works. SLURM counts as a launcher only inside an srun step with more than one task:
    an sbatch script or a salloc shell runs the command once, which then starts its own ranks.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local_rank = _int_env(env, "LOCAL_RANK", rank)
        local_world = _int_env(env, "LOCAL_WORLD_SIZE", world)
        nodes = _int_env(env, "GROUP_WORLD_SIZE", max(1, -(-world // local_world)))
        if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
            raise ConfigError("RANK and WORLD_SIZE are set but MASTER_ADDR / MASTER_PORT are not: start the "
                              "ranks with torchrun, or set all four")
        torchrun = "TORCHELASTIC_RUN_ID" in env
        run_id = (f"{env['TORCHELASTIC_RUN_ID']}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}" if torchrun
                  else f"env.{env['MASTER_PORT']}")
        return Launch(launcher="torchrun" if torchrun else "env", rank=rank, world_size=world,
                      local_rank=local_rank, local_world_size=local_world, num_nodes=nodes,
                      master_addr=env["MASTER_ADDR"], master_port=_int_env(env, "MASTER_PORT"),
                      agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True", run_id=run_id)
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    world = _int_env(env, "SLURM_STEP_NUM_TASKS", _int_env(env, "SLURM_NTASKS", 1)) if in_step else 1
    if world <= 1:
        return None
    nodes = _int_env(env, "SLURM_STEP_NUM_NODES", _int_env(env, "SLURM_NNODES", 1))
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = _int_env(env, "SLURM_NODEID", 0)
    per_node = slurm_tasks_per_node(per_node_spec) if per_node_spec else [world // nodes] * nodes
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    master = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "")
    if not master:
        raise ConfigError("under srun but SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is empty and MASTER_ADDR "
                          "is not set: cannot tell where rank 0 runs")
    job, step = _int_env(env, "SLURM_JOB_ID", 0), _int_env(env, "SLURM_STEP_ID", 0)
    port = _int_env(env, "MASTER_PORT", SLURM_PORT_BASE + (job + step) % SLURM_PORT_SPAN)
    return Launch(launcher="slurm", rank=_int_env(env, "SLURM_PROCID"), world_size=world,
                  local_rank=_int_env(env, "SLURM_LOCALID", 0),
                  local_world_size=per_node[node_id] if node_id < len(per_node) else per_node[-1],
                  num_nodes=nodes, master_addr=master, master_port=port, agent_store=False,
                  run_id=f"slurm.{job}.{step}.{env.get('SLURM_RESTART_COUNT', '0')}")


def local_process_count(config: EncodeConfig) -> int:
    """How many ranks `--devices` asks for when no launcher started us (auto: one per visible GPU)."""
    gpus = torch.cuda.device_count() if config.device in ("auto", "cuda") else 0
    if config.devices == "auto":
        return max(1, gpus)
    count = int(config.devices)
    if gpus and count > gpus:
        raise ConfigError(f"--devices {count}: only {gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES); "
                          f"use --devices {gpus} or fewer, or --device cpu")
    return count


def check_topology(launch: Launch, config: EncodeConfig) -> None:
    """--num-nodes and --devices must agree with what the launcher reports (exit 2 otherwise)."""
    if config.num_nodes is not None and config.num_nodes != launch.num_nodes:
        how = ("started alone on one machine; start one process per node with torchrun or srun "
               "(README: Running on many GPUs)") if launch.launcher == "alone" else launch.describe()
        raise ConfigError(f"--num-nodes {config.num_nodes}, but this job has {launch.num_nodes} node(s): {how}")
    if launch.launcher != "alone" and config.devices != "auto" and int(config.devices) != launch.local_world_size:
        raise ConfigError(f"--devices {config.devices}, but the launcher started {launch.local_world_size} "
                          f"rank(s) on this node ({launch.describe()}); drop --devices under a launcher")
    if launch.local_world_size > 1 and config.device.startswith("cuda:"):
        raise ConfigError(f"--device {config.device} with {launch.local_world_size} ranks per node: every rank "
                          "would share one GPU; use --device cuda (each rank takes cuda:LOCAL_RANK)")


def rank_device(name: str, launch: Launch = Launch()) -> torch.device:
    """The device for `--device NAME`: cuda:LOCAL_RANK for GPU ranks (cuda:0 when the launcher gave
    each task one GPU), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:"):
        return torch.device(name)
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda:0")
    if launch.local_rank >= visible:
        raise ConfigError(f"rank {launch.rank} has LOCAL_RANK {launch.local_rank}, but only {visible} GPUs are "
                          "visible on this node; start at most one rank per GPU")
    return torch.device(f"cuda:{launch.local_rank}")


# --------------------------------------------------------------------------- starting ranks ourselves

def spawn_local_ranks(config: EncodeConfig, nprocs: int) -> int:
    """Start `nprocs` ranks of `wds-encode run` on this machine with torch's elastic launcher.

    The agent hosts the store, watches the ranks and stops them all when one fails. Returns the
    job's exit code: rank 0's when it failed, 1 for a rank killed by a signal.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the agent's failure report: ours says it better
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="wds-encode-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config.as_args()))
        launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs,
                                     run_id=f"{SPAWNED_RUN_ID_PREFIX}{uuid.uuid4().hex[:12]}", rdzv_backend="c10d",
                                     rdzv_endpoint="127.0.0.1:0", max_restarts=config.max_restarts,
                                     monitor_interval=0.1)
        reported = Path(tmp) / "stop-reported"   # the ranks inherit this process's environment
        previous = os.environ.get(STOP_REPORTED_ENV)
        os.environ[STOP_REPORTED_ENV] = str(reported)
        try:
            elastic_launch(launch_config, sys.executable)("-m", "wds_encode", "run", "--config", str(config_file))
        except ChildFailedError as exc:
            return _report_failures(exc.failures)
        except SignalException as exc:  # Ctrl-C or a scheduler's SIGTERM: the agent stopped the ranks
            if not reported.exists():   # rank 0 said it already, with the counts: one line per job
                print(f"wds-encode: stopped by {exc.sigval.name}; committed units are kept, rerun to finish",
                      file=sys.stderr)
            return 128 + int(exc.sigval)
        finally:
            if previous is None:
                os.environ.pop(STOP_REPORTED_ENV, None)
            else:
                os.environ[STOP_REPORTED_ENV] = previous
    return 0


def _report_failures(failures: Mapping) -> int:
    """One line per rank killed by a signal; the exit code for the job (ProcessFailure by rank)."""
    signalled = {rank: f for rank, f in failures.items() if f.exitcode < 0}
    for rank, failure in sorted(signalled.items()):
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        print(f"wds-encode: rank {rank} (pid {failure.pid}) was killed by {name}; the other ranks were stopped. "
              "Committed units are kept: rerun the same command to finish.", file=sys.stderr)
    if 0 in failures and failures[0].exitcode > 0:
        return failures[0].exitcode
    codes = [f.exitcode for f in failures.values() if f.exitcode > 0]
    return max(codes) if codes else 1


# --------------------------------------------------------------------------- the store

@dataclass(frozen=True)
class StoreAddress:
    """Where the job's store is, and our key space in it; picklable, for DataLoader workers."""

    host: str
    port: int
    prefix: str

    def connect(self) -> dist.Store:
        """A new client (one per process: a store client must not cross a fork)."""
        client = dist.TCPStore(self.host, self.port, is_master=False, timeout=STORE_TIMEOUT)
        return dist.PrefixStore(self.prefix, client)


@dataclass(frozen=True)
class UnitClaims:
    """Indices into the job's ordered unit list; each is handed to exactly one claimer in the job."""

    address: StoreAddress
    count: int

    def __iter__(self) -> Iterator[int]:
        if self.count == 0:
            return
        store = self.address.connect()
        while True:
            if store.check([STOP_KEY]):
                return   # the job is stopping: the units already claimed finish, no new one starts
            index = store.add(CLAIM_KEY, 1) - 1
            if index >= self.count:
                return
            yield index


def _open_store(launch: Launch) -> dist.TCPStore:
    if launch.launcher == "alone":
        return dist.TCPStore(launch.master_addr, 0, 1, is_master=True, timeout=STORE_TIMEOUT,
                             wait_for_workers=False)
    if launch.agent_store:
        return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False,
                             timeout=STORE_TIMEOUT)
    try:
        return dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                             is_master=launch.rank == 0, timeout=STORE_TIMEOUT, wait_for_workers=False,
                             multi_tenant=True)
    except (RuntimeError, dist.DistError) as exc:
        where = "host" if launch.rank == 0 else "reach"
        raise ConfigError(f"rank {launch.rank} cannot {where} the job's store at {launch.master_addr}:"
                          f"{launch.master_port} ({exc}); check MASTER_ADDR / MASTER_PORT") from exc


# --------------------------------------------------------------------------- the job, seen from one rank

def gpu_uuid(device: torch.device) -> Optional[str]:
    """The GPU's UUID, the same whatever CUDA_VISIBLE_DEVICES numbers it; None for the CPU."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def shared_gpu_error(host: str, ranks: Iterable[dict]) -> Optional[str]:
    """What to tell the user when ranks on `host` (their join records) were given one GPU; None when
    each has its own. CPU ranks (no GPU) never clash."""
    by_gpu: dict[str, list[dict]] = {}
    for record in sorted(ranks, key=lambda r: r["rank"]):
        if record["gpu"] is not None:
            by_gpu.setdefault(record["gpu"], []).append(record)
    groups = [(gpu, records) for gpu, records in by_gpu.items() if len(records) > 1]
    if not groups:
        return None

    def names(records: list[dict]) -> str:
        each = [f"{r['rank']} (local rank {r['local_rank']}, {r['device']})" for r in records]
        return ", ".join(each[:-1]) + " and " + each[-1]

    shared = "; ".join(f"ranks {names(records)} all run on GPU {gpu}" for gpu, records in groups)
    return (f"on host {host}, {shared}. Every rank needs a GPU of its own: start one rank per GPU "
            "(torchrun --nproc-per-node = the number of GPUs on the node, or --devices N with N GPUs "
            "visible), and check CUDA_VISIBLE_DEVICES; under srun, --ntasks-per-node = GPUs per node and "
            "--gpus-per-task=1 (or every GPU visible to every task)")


def count_cpu_sharers(mine: Iterable[int], ranks: Iterable[dict]) -> int:
    """How many of `ranks` (join records of one host, this rank's among them) may run on any of the
    cores in `mine`: 1 when srun or taskset bound each rank to its own cores."""
    cores = set(mine)
    return max(1, sum(1 for record in ranks if cores & set(record["cpus"])))


class Job:
    """This rank's view of the job: the shared store, who runs where, heartbeats and failures.

    `device_uuid` is the GPU this rank runs on (default: read from `device`; tests inject one).
    `cpu_sharers` is the number of ranks on this host whose CPU affinity overlaps this rank's,
    itself included: what `resources.plan_cpus` divides the CPUs by.
    """

    def __init__(self, launch: Launch, device: torch.device, *, peer_timeout: float,
                 device_uuid: Optional[str] = FROM_DEVICE):
        if not dist.is_available():
            raise ConfigError(f"this torch build ({torch.__version__}) has no torch.distributed, whose store "
                              "the ranks coordinate through (one rank too); install a standard torch build")
        self.launch = launch
        self.rank = launch.rank
        self.world_size = launch.world_size
        self.peer_timeout = peer_timeout
        self._hosts_store = launch.rank == 0 and not launch.agent_store
        if device.type == "cuda":
            torch.cuda.set_device(device)  # code that uses "the current GPU" uses this rank's
        raw = _open_store(launch)
        prefix = f"wds-encode/{launch.run_id}"
        self.address = StoreAddress(launch.master_addr, raw.port, prefix)
        self.store = dist.PrefixStore(prefix, raw)
        self._failure: Optional[str] = None
        self._stop = threading.Event()
        self._neighbours: dict[int, dict] = {}   # rank -> its join record, for the ranks on this host
        self.cpu_sharers: int = self._join({
            "rank": self.rank, "local_rank": launch.local_rank, **this_process(),
            "device": str(device), "gpu": gpu_uuid(device) if device_uuid == FROM_DEVICE else device_uuid,
            "cpus": cpu_affinity()})
        self._watchdog = threading.Thread(target=self._watch, name="wds-encode-heartbeat", daemon=True)
        self._watchdog.start()

    # -- start: everyone joins and checks where it runs, rank 0 publishes the plan
    def _join(self, record: dict) -> int:
        """Publish `record` under this host's keys, wait for every rank, and stop the whole job (every
        rank raises ConfigError) when ranks on any host share a GPU. Returns this rank's CPU sharers."""
        node = f"node/{record['host']}"
        slot = self.store.add(f"{node}/count", 1) - 1
        self.store.set(f"{node}/{slot}", json.dumps(record))  # before "joined": complete once all joined
        self._barrier("joined", "joined")
        count = self.store.add(f"{node}/count", 0)  # final: every rank of the job has published
        neighbours = [json.loads(self.store.get(f"{node}/{i}")) for i in range(count)]
        self._neighbours = {n["rank"]: n for n in neighbours}
        problem = shared_gpu_error(record["host"], neighbours)
        if problem is not None:
            self.store.compare_set("join/error", "", problem)
        self._barrier("join/checked", "checked where they run")  # every host's verdict is in
        if self.store.check(["join/error"]):
            error = self.store.get("join/error").decode("utf-8", "replace")
            self._leave("join/read", timeout=JOIN_TIMEOUT_SECONDS)
            raise ConfigError(error)
        return count_cpu_sharers(record["cpus"], neighbours)

    def _barrier(self, key: str, what: str) -> None:
        """Wait until every rank has reached this point (added 1 to `key`), unless one aborts first."""
        self.store.add(key, 1)
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        while (count := self.store.add(key, 0)) < self.world_size:
            if (reason := self._abort_reason()) is not None:
                raise JobAborted(reason)
            if time.monotonic() > deadline:
                raise JobAborted(f"only {count} of {self.world_size} ranks {what} within "
                                 f"{JOIN_TIMEOUT_SECONDS:.0f} s ({self.launch.describe()})")
            time.sleep(POLL_SECONDS)

    def _leave(self, key: str, *, timeout: Optional[float]) -> None:
        """This rank's last use of the store for now. The rank hosting the store waits until every rank
        has added 1 to `key` (or the job failed, or `timeout`), so it cannot take the store away while
        others still read from it; the others go at once."""
        self.store.add(key, 1)
        if not self._hosts_store:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.store.add(key, 0) < self.world_size and self._failure is None:
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(POLL_SECONDS)

    def publish(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    def wait_for(self, key: str) -> dict:
        """A value another rank publishes, however long it takes, unless the job fails first."""
        while not self.store.check([key]):
            self.raise_if_failed()
            time.sleep(POLL_SECONDS)
        return json.loads(self.store.get(key).decode("utf-8"))

    # -- failures
    def abort(self, reason: str) -> None:
        """Tell every rank to stop (the first reason wins); safe to call when the store is gone."""
        try:
            self.store.compare_set("abort", "", reason)
        except Exception:  # the store itself is gone: the others find out on their own
            pass

    # -- a graceful stop (preemption.GracefulStop)
    def request_stop(self, reason: str) -> None:
        """No claimer anywhere in the job takes another unit; called off the signal handler, on its own
        connection to the store."""
        try:
            self.address.connect().compare_set(STOP_KEY, "", reason)
        except Exception:  # the store is gone: the job is ending anyway
            pass

    def stop_reason(self) -> Optional[str]:
        """Why the job stopped claiming (a signal's name), if it did."""
        try:
            if self.store.check([STOP_KEY]):
                return self.store.get(STOP_KEY).decode("utf-8", "replace")
        except Exception:
            pass
        return None

    def _abort_reason(self) -> Optional[str]:
        """The reason a rank published for stopping the job, if any."""
        if self.store.check(["abort"]):
            return self.store.get("abort").decode("utf-8", "replace")
        return None

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise JobAborted(self._failure)

    def failure_behind(self, error: BaseException) -> Optional[str]:
        """Why the job failed, when another rank's death or the store's loss is what caused `error`
        (a DataLoader worker that lost the store fails first; the heartbeat explains it)."""
        if isinstance(error, JobAborted):
            return str(error)
        if self.world_size == 1 or isinstance(error, ConfigError):
            return None
        deadline = time.monotonic() + 2 * HEARTBEAT_SECONDS
        while self._failure is None and self._watchdog.is_alive() and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 4)
        return self._failure

    def _watch(self) -> None:
        """Heartbeats: rank 0 watches every rank, the others watch rank 0; any abort stops everyone."""
        watched = range(1, self.world_size) if self.rank == 0 else [0]
        last_seen = {r: (-1, time.monotonic()) for r in watched if r != self.rank}
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if (reason := self._abort_reason()) is not None:
                    self._failure = reason
                    return
                now = time.monotonic()
                for r, (beats, since) in last_seen.items():
                    if (reason := self._exited(r)) is not None:
                        self.abort(reason)
                        self._failure = reason
                        return
                    current = self.store.add(f"beat/{r}", 0)
                    if current != beats:
                        last_seen[r] = (current, now)
                    elif now - since > self.peer_timeout:
                        reason = (f"rank {r} stopped responding (no heartbeat for {self.peer_timeout:.0f} s: "
                                  "killed, out of memory, or its node was lost)")
                        self.abort(reason)
                        self._failure = reason
                        return
            except Exception as exc:  # the store's host (rank 0 or the launcher's agent) is gone
                self._failure = (f"lost the job's store at {self.address.host}:{self.address.port} "
                                 f"({type(exc).__name__}: {exc}); another rank or the launcher has died")
                return

    def _exited(self, rank: int) -> Optional[str]:
        """Why rank `rank` failed, when it runs on this host and its process has exited before publishing
        its result (killed by a signal, or by the kernel when out of memory): the job stops within a
        heartbeat, not after --peer-timeout (a launcher's agent, which would notice too, first waits up to
        30 s for the survivors, which wait for the dead rank)."""
        record = self._neighbours.get(rank)
        if record is None or not process_gone(record) or self.store.check([f"result/{rank}"]):
            return None
        return f"rank {rank} exited before finishing (pid {record['pid']} on this host: killed, or out of memory)"

    # -- progress: counters summed over ranks
    def add_progress(self, deltas: Mapping[str, int]) -> None:
        for key, value in deltas.items():
            if value:
                self.store.add(f"progress/{key}", int(value))

    def read_progress(self) -> dict[str, int]:
        return {key: self.store.add(f"progress/{key}", 0) for key in PROGRESS_KEYS}

    # -- end: every rank's result through the store, waiting without a timeout
    def finish(self, result: dict) -> list[dict]:
        """Once all ranks have finished: on rank 0, which speaks for the job, every rank's `result`
        (JSON-serialisable) in rank order; on the others, their own alone (a thousand ranks each reading
        a thousand results would move gigabytes through the store). No collective: a slow rank is
        waited for, a dead one stops the job."""
        self.store.set(f"result/{self.rank}", json.dumps(result))
        self.store.add("finished", 1)
        while self.store.add("finished", 0) < self.world_size:
            self.raise_if_failed()
            time.sleep(POLL_SECONDS)
        results = [result]
        if self.rank == 0:
            results = [json.loads(self.store.get(f"result/{r}").decode("utf-8")) for r in range(self.world_size)]
        self._leave("collected", timeout=None)
        return results

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join(timeout=5)
