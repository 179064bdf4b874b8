"""How much of the machine this process may use (CPUs, memory), and how to split the CPUs.

`os.cpu_count()` and /proc/meminfo describe the host, not this process. A container, a SLURM job
or `taskset` may give it fewer cores (the affinity set) or a fraction of their time (the cgroup CPU
quota), and a cgroup memory limit is what gets it OOM-killed, whatever the host has free. Sizing
DataLoader workers and torch's intra-op threads from the host's count puts decode workers and the
encoder's threads on the same few cores, where they slow each other down (on a 2-core machine the
default of 4 workers is slower than 1, see `plan_cpus`).

So: `available_cpus()` and `available_memory()` read what the kernel enforces (affinity, cgroup
v1 or v2, /proc/meminfo), treating any file they cannot read as "no limit from it", and
`plan_cpus()` turns this rank's share of the CPUs into a number of decode workers and encoder
threads, with `--num-workers` as the user's upper bound. The share is what SLURM gave the task
(`slurm_cpus_per_task`) under srun, else the CPUs divided among the ranks whose affinity overlaps
this one's (`distributed.Job.cpu_sharers`): ranks that srun or taskset bound to their own cores
do not split them again. Nothing here sets anything: the caller applies the `CpuPlan` and prints
`describe()` in its summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"       # which cgroup this process is in, per hierarchy
MEMINFO = "/proc/meminfo"
CPUINFO = "/proc/cpuinfo"
NO_LIMIT_BYTES = 1 << 62                # a cgroup v1 "unlimited" reads as ~2**63 (page-rounded)
CUDA_MAX_TORCH_THREADS = 4              # a GPU rank's CPU threads only run glue (copies, small ops)
_EPSILON = 1e-9                         # 2.9999999 CPUs (float division) still counts as 3


# --------------------------------------------------------------------------- reading kernel files

def _read_text(path: Path | str) -> Optional[str]:
    """The file's text, stripped, or None when it is absent or unreadable."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path | str) -> Optional[int]:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _read_stat(path: Path | str) -> dict[str, int]:
    """A `key value` per line file (memory.stat, /proc/meminfo with its ` kB`) as a dict; {} if unreadable."""
    values: dict[str, int] = {}
    for line in (_read_text(path) or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return values


def process_cgroups(proc_cgroup: str = PROC_CGROUP) -> dict[str, str]:
    """This process's cgroup per hierarchy, from /proc/self/cgroup: `"4:memory:/a/b"` -> {"memory": "/a/b"},
    a v1 line naming several controllers (`cpu,cpuacct`) gives each of them and the joined name,
    the v2 line `"0::/a/b"` -> {"": "/a/b"}. {} when unreadable."""
    paths: dict[str, str] = {}
    for line in (_read_text(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in {controllers, *controllers.split(",")}:
            paths.setdefault(name, path)
    return paths


def _cgroup_dirs(base: Path, path: Optional[str]) -> list[Path]:
    """The folders that may hold limits for this process: the mount itself (inside a container it is
    the container's own cgroup) and every level from the top down to the process's own cgroup. A limit
    anywhere on that path applies, so callers take the smallest; levels that do not exist are skipped."""
    dirs = [base]
    current = base
    for part in (path or "").strip("/").split("/"):
        if part and part not in (".", ".."):
            current = current / part
            dirs.append(current)
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _v1_dirs(cgroup_root: str, controller: str, cgroups: dict[str, str]) -> list[Path]:
    """The cgroup v1 folders of one controller: `<root>/cpu` (often a link to `cpu,cpuacct`) and the
    mount named after the controller list /proc/self/cgroup gives, each with the process's path."""
    names = [controller] + [name for name in cgroups if "," in name and controller in name.split(",")]
    dirs: list[Path] = []
    for name in names:
        dirs += _cgroup_dirs(Path(cgroup_root) / name, cgroups.get(name))
    return list(dict.fromkeys(dirs))


# --------------------------------------------------------------------------- CPUs

def _v2_cpu_quota(text: Optional[str]) -> Optional[float]:
    """`cpu.max`: "150000 100000" -> 1.5 CPUs; "max 100000" (or anything unparseable) -> None."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_cpu_quota(folder: Path) -> Optional[float]:
    """`cpu.cfs_quota_us` / `cpu.cfs_period_us` in CPUs; a quota of -1 means none."""
    quota, period = _read_int(folder / "cpu.cfs_quota_us"), _read_int(folder / "cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_quota(*, cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> Optional[float]:
    """The smallest CPU quota (in CPUs, may be fractional) of the cgroups above this process, v2 and v1
    alike; None when there is none or nothing could be read."""
    cgroups = process_cgroups(proc_cgroup)
    quotas = [_v2_cpu_quota(_read_text(d / "cpu.max")) for d in _cgroup_dirs(Path(cgroup_root), cgroups.get(""))]
    quotas += [_v1_cpu_quota(d) for d in _v1_dirs(cgroup_root, "cpu", cgroups)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def cpu_affinity() -> list[int]:
    """The cores this process may be scheduled on (taskset, cpuset, SLURM's binding); every core of the
    host where the platform cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def affinity_cpus() -> int:
    """How many cores `cpu_affinity` gives, at least 1."""
    return len(cpu_affinity()) or 1


def cpu_flags(cpuinfo: str = CPUINFO) -> set[str]:
    """The CPU's feature flags (`amx_bf16`, `avx512_bf16`...), empty where /proc/cpuinfo cannot be read.
    (No torch import here: the benchmark reads them before torch loads oneDNN.)"""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available_cpus(*, cgroup_root: str = CGROUP_ROOT, affinity: Optional[set[int]] = None,
                   proc_cgroup: str = PROC_CGROUP) -> float:
    """CPUs this process may use: the smaller of its affinity set (default: this process's) and the
    cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`, at the mount and at each
    level down to this process's cgroup per `proc_cgroup`). A float: a quota of 1.5 CPUs is 1.5."""
    cores = float(len(affinity) or 1) if affinity is not None else float(affinity_cpus())
    quota = cgroup_cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    return min(cores, quota) if quota is not None else cores


# --------------------------------------------------------------------------- memory

def _limit(value: Optional[int]) -> Optional[int]:
    """A cgroup memory limit, or None for "none" (absent, 'max', or the v1 huge 'unlimited' number)."""
    return value if value is not None and 0 <= value < NO_LIMIT_BYTES else None


def _cgroup_room(limit: Optional[int], usage: Optional[int], stat: dict[str, int], cache_key: str) -> Optional[int]:
    """Bytes left under one cgroup's limit. Its usage counts page cache, which the kernel drops before
    it OOM-kills, so the inactive part of it is not counted as used (the "working set", as kubelet does)."""
    if limit is None:
        return None
    used = max(0, (usage or 0) - stat.get(cache_key, 0))
    return max(0, limit - used)


def cgroup_memory_room(*, cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> Optional[int]:
    """The least room left under any cgroup memory limit above this process (v2 memory.max - memory.current,
    v1 memory.limit_in_bytes - memory.usage_in_bytes, less inactive page cache); None when unlimited."""
    cgroups = process_cgroups(proc_cgroup)
    rooms = [_cgroup_room(_limit(_read_int(d / "memory.max")), _read_int(d / "memory.current"),
                          _read_stat(d / "memory.stat"), "inactive_file")
             for d in _cgroup_dirs(Path(cgroup_root), cgroups.get(""))]
    rooms += [_cgroup_room(_limit(_read_int(d / "memory.limit_in_bytes")), _read_int(d / "memory.usage_in_bytes"),
                           _read_stat(d / "memory.stat"), "total_inactive_file")
              for d in _v1_dirs(cgroup_root, "memory", cgroups)]
    found = [r for r in rooms if r is not None]
    return min(found) if found else None


def meminfo_available(meminfo: str = MEMINFO) -> Optional[int]:
    """MemAvailable in bytes (before Linux 3.14: MemFree + Buffers + Cached); None if unreadable."""
    info = _read_stat(meminfo)
    if "MemAvailable" in info:
        return info["MemAvailable"]
    if "MemFree" in info:
        return info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
    return None


def _sysconf_available() -> int:
    """Free physical memory as libc reports it: the last resort where /proc/meminfo cannot be read."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory(*, cgroup_root: str = CGROUP_ROOT, meminfo: str = MEMINFO,
                     proc_cgroup: str = PROC_CGROUP) -> int:
    """Bytes this process may still allocate: the host's MemAvailable, capped by the room left under
    the cgroup memory limits (see `cgroup_memory_room`)."""
    host = meminfo_available(meminfo)
    if host is None:
        host = _sysconf_available()
    room = cgroup_memory_room(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    return min(host, room) if room is not None else host


# --------------------------------------------------------------------------- the split

@dataclass(frozen=True)
class CpuPlan:
    """How one rank uses its CPUs."""

    cpus: float                 # CPUs available to this rank (its share of the node)
    workers: int                # DataLoader decode workers (0: decode in the main process)
    torch_threads: int          # intra-op threads of the encoder
    omp_fixed: bool = False     # torch_threads came from OMP_NUM_THREADS

    def describe(self) -> str:
        """`2 CPUs: 1 decode worker, 2 encoder threads`."""
        cpus = f"{self.cpus:g} CPU" + ("" if self.cpus == 1 else "s")
        workers = ("decoding in the main process" if self.workers == 0 else
                   f"{self.workers} decode worker" + ("" if self.workers == 1 else "s"))
        threads = f"{self.torch_threads} encoder thread" + ("" if self.torch_threads == 1 else "s")
        return f"{cpus}: {workers}, {threads}" + (" (OMP_NUM_THREADS)" if self.omp_fixed else "")


def parse_omp_num_threads(value: Optional[str]) -> Optional[int]:
    """OMP_NUM_THREADS as a thread count: "4" -> 4, a nested list "4,2" -> 4 (the outer level);
    None when unset, empty or not a positive integer (torch then ignores it too)."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def slurm_cpus_per_task(env: Mapping[str, str]) -> Optional[float]:
    """SLURM_CPUS_PER_TASK when this process is itself a task of an srun step, else None.

    The sbatch script's own shell (no SLURM_STEP_ID) is not a task: what it starts shares the whole
    allocation. Nor is a rank that torchrun or `--devices` (TORCHELASTIC_RUN_ID) started inside a task:
    it shares that task's CPUs with the other ranks there. Garbage or a value <= 0 counts as unset.
    """
    value = env.get("SLURM_CPUS_PER_TASK")
    if not value or "SLURM_STEP_ID" not in env or "TORCHELASTIC_RUN_ID" in env:
        return None
    try:
        cpus = float(value)
    except ValueError:
        return None
    return cpus if cpus > 0 else None


def plan_cpus(*, max_workers: int, device_type: str, ranks_sharing: int = 1,
              slurm_cpus_per_task: Optional[float] = None, cpus: Optional[float] = None,
              omp_num_threads: Optional[str] = None) -> CpuPlan:
    """Decode workers and encoder threads for one rank, from its share of the CPUs.

    share = `slurm_cpus_per_task` (an srun task's own cores, see `slurm_cpus_per_task()`), capped by
    `cpus` (default `available_cpus()`): from 22.05 srun no longer inherits sbatch's --cpus-per-task, so
    a task may be bound to fewer cores than the variable it inherited says. Otherwise share = `cpus` /
    `ranks_sharing`, the ranks on this node whose CPU affinity overlaps this rank's, itself included
    (torchrun's and `--devices`'s ranks all share one set; ranks bound to their own cores share nothing).
    The share is reported as `CpuPlan.cpus`; `whole` = the share rounded down, at least 1 (a 1.5-CPU
    quota runs 1 thread unthrottled; 2 would be throttled a quarter of the time).
    `max_workers` (`--num-workers`) is an upper bound the plan never exceeds; 0 stays 0 (decode in the
    main process).

    - device "cpu": the encoder is the bottleneck and scales with threads, so it gets every core
      (`torch_threads = whole`), and decoding overlaps with it in `workers = min(max_workers,
      max(1, whole // 2))` processes. Measured with the real command on a 2-core machine (demo model,
      48 files, batch 8, median wall of 4 runs on a quiet machine): 1 worker 8.9 s, 2 workers 9.2 s,
      4 workers (the old default) 10.0 s; 1 encoder thread instead of 2 is slower (1 worker 11.7 s,
      4 workers 10.0 s), and so is decoding in the main process (0 workers 11.5 s). Pinned to 1 core,
      0 and 1 worker tie (11.3 s and 11.1 s, median of 5), so 1 CPU still gets a worker. Every worker
      is a process whose decoding competes with the encoder's threads for the same cores: past the few
      needed to keep batches ready they only take time from the encoder.
    - any other device ("cuda"): the GPU encodes, so the CPU's job is decoding: `workers = min(max_workers,
      whole - 1)` (at least 1 where the user allows any), leaving a core for the main process, which
      feeds the GPU and writes the output; `torch_threads = min(4, whole - workers)`, at least 1: the
      main process's CPU ops are small (copies, casts), so more threads only contend with the workers.

    OMP_NUM_THREADS, when set (`omp_num_threads`, default from the environment), fixes torch_threads:
    the user said so; workers are planned as above.
    """
    if cpus is None:
        cpus = available_cpus()
    if slurm_cpus_per_task is not None:
        share = min(slurm_cpus_per_task, cpus)
    else:
        share = cpus / max(1, ranks_sharing)
    whole = max(1, int(share + _EPSILON))
    max_workers = max(0, max_workers)
    if device_type != "cpu":
        workers = min(max_workers, max(1, whole - 1))
        threads = min(CUDA_MAX_TORCH_THREADS, max(1, whole - workers))
    else:
        workers = min(max_workers, max(1, whole // 2))
        threads = whole
    omp = parse_omp_num_threads(omp_num_threads if omp_num_threads is not None
                                else os.environ.get("OMP_NUM_THREADS"))
    if omp is not None:
        threads = omp
    return CpuPlan(cpus=round(share, 2), workers=workers, torch_threads=threads, omp_fixed=omp is not None)
