"""resources.py: CPUs and memory as the kernel enforces them (cgroup v1 and v2 trees, /proc/meminfo and
/proc/self/cgroup written as the plain-text files they are), and how a rank splits its CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wds_encode.job.resources import (CpuPlan, available_cpus, available_memory, cgroup_cpu_quota, cgroup_memory_room,
                                  meminfo_available, parse_omp_num_threads, plan_cpus, process_cgroups,
                                  slurm_cpus_per_task)

GIB = 1 << 30
V1_UNLIMITED = "9223372036854771712"
MEMINFO = """MemTotal:       32768000 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
Buffers:          100000 kB
Cached:          5000000 kB
SwapTotal:             0 kB
"""


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def v2_self(tmp_path: Path, path: str = "/") -> str:
    """A /proc/self/cgroup of a process in a pure cgroup v2 system."""
    return str(write(tmp_path, "proc/self/cgroup", f"0::{path}"))


def v1_self(tmp_path: Path, cpu: str = "/", memory: str = "/") -> str:
    """A /proc/self/cgroup of a process under cgroup v1 (cpu and cpuacct co-mounted, as systemd does)."""
    return str(write(tmp_path, "proc/self/cgroup", "\n".join([
        "12:pids:/", f"4:memory:{memory}", f"3:cpu,cpuacct:{cpu}", "1:name=systemd:/", "0::/"])))


# --------------------------------------------------------------------------- CPUs

def test_no_cgroup_files_means_the_affinity_set(tmp_path):
    assert available_cpus(cgroup_root=str(tmp_path / "none"), affinity={0, 1, 2, 3},
                          proc_cgroup=str(tmp_path / "missing")) == 4.0


def test_v2_quota_at_the_root_is_a_fractional_cpu_count(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu.max", "150000 100000")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(8)), proc_cgroup=v2_self(tmp_path)) == 1.5


def test_v2_max_means_no_quota_and_affinity_is_smaller_than_quota(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu.max", "max 100000")
    assert available_cpus(cgroup_root=str(root), affinity={0, 1}, proc_cgroup=v2_self(tmp_path)) == 2.0
    write(root, "cpu.max", "800000 100000")  # 8 CPUs of quota, but pinned to 2 cores
    assert available_cpus(cgroup_root=str(root), affinity={0, 1}, proc_cgroup=v2_self(tmp_path)) == 2.0


def test_v2_quota_of_the_process_cgroup_and_of_its_parents(tmp_path):
    """No cgroup namespace: the root's cpu.max is absent (the root cgroup has none), the limits sit on
    the path /proc/self/cgroup names; the smallest on the way down applies."""
    root = tmp_path / "cg"
    write(root, "system.slice/cpu.max", "300000 100000")
    write(root, "system.slice/job.scope/cpu.max", "max 100000")
    write(root, "user.slice/cpu.max", "50000 100000")  # another branch: not ours
    self_file = v2_self(tmp_path, "/system.slice/job.scope")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(16)), proc_cgroup=self_file) == 3.0
    write(root, "system.slice/job.scope/cpu.max", "200000 100000")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(16)), proc_cgroup=self_file) == 2.0


def test_v2_path_absent_under_the_root_falls_back_to_the_root(tmp_path):
    """A container without its own cgroup namespace: /proc/self/cgroup names a host path that is not
    under the mount, whose own files are the container's."""
    root = tmp_path / "cg"
    write(root, "cpu.max", "250000 100000")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(16)),
                          proc_cgroup=v2_self(tmp_path, "/docker/abc123")) == 2.5


def test_v1_quota(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu/cpu.cfs_quota_us", "200000")
    write(root, "cpu/cpu.cfs_period_us", "100000")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(8)), proc_cgroup=v1_self(tmp_path)) == 2.0
    assert cgroup_cpu_quota(cgroup_root=str(root), proc_cgroup=v1_self(tmp_path)) == 2.0


def test_v1_minus_one_means_no_quota(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu/cpu.cfs_quota_us", "-1")
    write(root, "cpu/cpu.cfs_period_us", "100000")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(6)), proc_cgroup=v1_self(tmp_path)) == 6.0
    assert cgroup_cpu_quota(cgroup_root=str(root), proc_cgroup=v1_self(tmp_path)) is None


def test_v1_quota_in_the_process_cgroup_of_a_comounted_hierarchy(tmp_path):
    """`cpu,cpuacct` mounted under its joined name (no `cpu` link): the process's own cgroup holds the quota."""
    root = tmp_path / "cg"
    write(root, "cpu,cpuacct/cpu.cfs_quota_us", "-1")
    write(root, "cpu,cpuacct/cpu.cfs_period_us", "100000")
    write(root, "cpu,cpuacct/slurm/job_7/cpu.cfs_quota_us", "50000")
    write(root, "cpu,cpuacct/slurm/job_7/cpu.cfs_period_us", "100000")
    self_file = v1_self(tmp_path, cpu="/slurm/job_7")
    assert available_cpus(cgroup_root=str(root), affinity=set(range(4)), proc_cgroup=self_file) == 0.5


def test_unreadable_or_garbage_cgroup_files_mean_no_limit(tmp_path):
    root = tmp_path / "cg"
    write(root, "cpu.max", "lots 100000")
    write(root, "cpu/cpu.cfs_quota_us", "")
    write(root, "cpu/cpu.cfs_period_us", "0")
    (root / "cpu" / "cpu.cfs_quota_us").chmod(0)  # unreadable (root reads it anyway: then it is empty)
    write(tmp_path, "proc/self/cgroup", "garbage line\n\n0::")
    assert available_cpus(cgroup_root=str(root), affinity={0, 1, 2},
                          proc_cgroup=str(tmp_path / "proc/self/cgroup")) == 3.0


def test_process_cgroups_parses_v1_and_v2_lines(tmp_path):
    cgroups = process_cgroups(v1_self(tmp_path, cpu="/a", memory="/b/c"))
    assert cgroups["cpu"] == cgroups["cpuacct"] == cgroups["cpu,cpuacct"] == "/a"
    assert cgroups["memory"] == "/b/c" and cgroups[""] == "/"
    assert process_cgroups(str(tmp_path / "missing")) == {}


# --------------------------------------------------------------------------- memory

def test_meminfo_alone(tmp_path):
    meminfo = write(tmp_path, "meminfo", MEMINFO)
    assert available_memory(cgroup_root=str(tmp_path / "none"), meminfo=str(meminfo),
                            proc_cgroup=str(tmp_path / "missing")) == 20000000 * 1024


def test_meminfo_without_memavailable_estimates_it(tmp_path):
    meminfo = write(tmp_path, "meminfo", MEMINFO.replace("MemAvailable:   20000000 kB\n", ""))
    assert meminfo_available(str(meminfo)) == (1000000 + 100000 + 5000000) * 1024
    assert meminfo_available(str(tmp_path / "missing")) is None


def test_v2_limit_minus_usage_caps_meminfo(tmp_path):
    root, meminfo = tmp_path / "cg", write(tmp_path, "meminfo", MEMINFO)
    write(root, "memory.max", str(8 * GIB))
    write(root, "memory.current", str(3 * GIB))
    write(root, "memory.stat", f"anon {2 * GIB}\nfile {GIB}\nactive_file 0\ninactive_file {GIB // 2}")
    # 8 GiB limit, 3 GiB charged of which 0.5 GiB is inactive page cache: 5.5 GiB left
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo),
                            proc_cgroup=v2_self(tmp_path)) == 8 * GIB - 3 * GIB + GIB // 2


def test_v2_max_means_no_limit(tmp_path):
    root, meminfo = tmp_path / "cg", write(tmp_path, "meminfo", MEMINFO)
    write(root, "memory.max", "max")
    write(root, "memory.current", str(3 * GIB))
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo),
                            proc_cgroup=v2_self(tmp_path)) == 20000000 * 1024


def test_v2_limit_of_the_process_cgroup(tmp_path):
    root, meminfo = tmp_path / "cg", write(tmp_path, "meminfo", MEMINFO)
    write(root, "user.slice/memory.max", str(6 * GIB))
    write(root, "user.slice/memory.current", str(GIB))
    write(root, "user.slice/run.scope/memory.max", str(2 * GIB))
    write(root, "user.slice/run.scope/memory.current", str(GIB + 100))
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo),
                            proc_cgroup=v2_self(tmp_path, "/user.slice/run.scope")) == GIB - 100


def test_v1_limit_minus_usage(tmp_path):
    root, meminfo = tmp_path / "cg", write(tmp_path, "meminfo", MEMINFO)
    write(root, "memory/memory.limit_in_bytes", str(4 * GIB))
    write(root, "memory/memory.usage_in_bytes", str(3 * GIB))
    write(root, "memory/memory.stat", f"cache {GIB}\ninactive_file 1\ntotal_inactive_file {GIB}")
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo), proc_cgroup=v1_self(tmp_path)) == 2 * GIB


def test_v1_unlimited_at_the_root_limit_in_the_process_cgroup(tmp_path):
    """As on a host where the process's memory cgroup is a sub-group (/proc/self/cgroup `4:memory:/jobs/x`)."""
    root, meminfo = tmp_path / "cg", write(tmp_path, "meminfo", MEMINFO)
    write(root, "memory/memory.limit_in_bytes", V1_UNLIMITED)
    write(root, "memory/memory.usage_in_bytes", str(14 * GIB))
    write(root, "memory/jobs/x/memory.limit_in_bytes", V1_UNLIMITED)
    write(root, "memory/jobs/x/memory.usage_in_bytes", str(GIB))
    self_file = v1_self(tmp_path, memory="/jobs/x")
    assert cgroup_memory_room(cgroup_root=str(root), proc_cgroup=self_file) is None
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo), proc_cgroup=self_file) == 20000000 * 1024
    write(root, "memory/jobs/x/memory.limit_in_bytes", str(3 * GIB))
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo), proc_cgroup=self_file) == 2 * GIB


def test_usage_over_the_limit_leaves_nothing(tmp_path):
    root, meminfo = tmp_path / "cg", write(tmp_path, "meminfo", MEMINFO)
    write(root, "memory.max", str(GIB))
    write(root, "memory.current", str(GIB + 4096))
    assert available_memory(cgroup_root=str(root), meminfo=str(meminfo), proc_cgroup=v2_self(tmp_path)) == 0


# --------------------------------------------------------------------------- the plan

def test_cpu_plan_gives_the_encoder_every_core_and_half_as_many_workers():
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=2, omp_num_threads="") == CpuPlan(2, 1, 2)
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=1, omp_num_threads="") == CpuPlan(1, 1, 1)
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=1.5, omp_num_threads="") == CpuPlan(1.5, 1, 1)
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=0.5, omp_num_threads="") == CpuPlan(0.5, 1, 1)
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=5, omp_num_threads="") == CpuPlan(5, 2, 5)
    assert plan_cpus(max_workers=16, device_type="cpu", cpus=32, omp_num_threads="") == CpuPlan(32, 16, 32)


def test_cpu_plan_share_per_rank():
    plan = plan_cpus(max_workers=8, device_type="cpu", ranks_sharing=4, cpus=16, omp_num_threads="")
    assert plan == CpuPlan(4, 2, 4)
    plan = plan_cpus(max_workers=8, device_type="cpu", ranks_sharing=3, cpus=2, omp_num_threads="")
    assert plan == CpuPlan(0.67, 1, 1)  # more ranks than cores: each still gets one thread and a worker
    assert plan.describe() == "0.67 CPUs: 1 decode worker, 1 encoder thread"


def test_cuda_plan_decodes_on_the_cpus_and_keeps_one_for_the_main_process():
    assert plan_cpus(max_workers=4, device_type="cuda", cpus=2, omp_num_threads="") == CpuPlan(2, 1, 1)
    assert plan_cpus(max_workers=4, device_type="cuda", cpus=1, omp_num_threads="") == CpuPlan(1, 1, 1)
    assert plan_cpus(max_workers=64, device_type="cuda", cpus=16, omp_num_threads="") == CpuPlan(16, 15, 1)
    assert plan_cpus(max_workers=4, device_type="cuda", cpus=16, omp_num_threads="") == CpuPlan(16, 4, 4)
    assert plan_cpus(max_workers=8, device_type="cuda", ranks_sharing=8, cpus=96,
                     omp_num_threads="") == CpuPlan(12, 8, 4)


# A task of `scripts/slurm_encode.sbatch`: 8 tasks per node, --cpus-per-task=12, inside the srun step.
SRUN_TASK_ENV = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
                 "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12", "SLURM_CPUS_ON_NODE": "96"}


def node_cpus(tmp_path, cores: int) -> float:
    """What `available_cpus` reads for an affinity of `cores` cores and no cgroup quota."""
    return available_cpus(cgroup_root=str(tmp_path / "none"), affinity=set(range(cores)),
                          proc_cgroup=str(tmp_path / "missing"))


def test_an_srun_task_bound_to_its_cores_plans_for_all_of_them(tmp_path):
    """srun bound the task to its 12 cores: they are its own, not a twelfth of them (the old plan
    divided by the 8 ranks on the node: 1.5 CPUs, 1 decode worker for a GPU)."""
    cpus, slurm = node_cpus(tmp_path, 12), slurm_cpus_per_task(SRUN_TASK_ENV)
    assert (cpus, slurm) == (12.0, 12.0)
    for sharing in (1, 8):  # what Job.cpu_sharers says under binding; what the ranks on the node are
        plan = plan_cpus(max_workers=16, device_type="cuda", ranks_sharing=sharing, slurm_cpus_per_task=slurm,
                         cpus=cpus, omp_num_threads="")
        assert plan == CpuPlan(12, 11, 1)


def test_ranks_sharing_one_affinity_split_it(tmp_path):
    """torchrun or --devices 8 on a 96-core machine: every rank may run on every core."""
    plan = plan_cpus(max_workers=16, device_type="cuda", ranks_sharing=8, cpus=node_cpus(tmp_path, 96),
                     slurm_cpus_per_task=slurm_cpus_per_task({}), omp_num_threads="")
    assert plan == CpuPlan(12, 11, 1)


def test_srun_without_binding_plans_the_tasks_cpus(tmp_path):
    """--cpu-bind=none (or no task affinity plugin): each task's affinity is the whole node."""
    slurm = slurm_cpus_per_task(SRUN_TASK_ENV)
    plan = plan_cpus(max_workers=16, device_type="cuda", ranks_sharing=8, slurm_cpus_per_task=slurm,
                     cpus=node_cpus(tmp_path, 96), omp_num_threads="")
    assert plan == CpuPlan(12, 11, 1)


def test_slurm_cpus_per_task_is_capped_by_what_the_task_may_use(tmp_path):
    """From SLURM 22.05 srun does not inherit sbatch's --cpus-per-task: the task inherits the variable
    (12) but srun bound it to one core. A `--cpus 4` given by the user caps it too."""
    slurm = slurm_cpus_per_task(SRUN_TASK_ENV)
    one_core = node_cpus(tmp_path, 1)
    assert plan_cpus(max_workers=16, device_type="cuda", slurm_cpus_per_task=slurm, cpus=one_core,
                     omp_num_threads="") == CpuPlan(1, 1, 1)
    assert plan_cpus(max_workers=16, device_type="cuda", slurm_cpus_per_task=slurm, cpus=4,
                     omp_num_threads="") == CpuPlan(4, 3, 1)


@pytest.mark.parametrize("env, expected", [
    (SRUN_TASK_ENV, 12.0),
    ({**SRUN_TASK_ENV, "SLURM_CPUS_PER_TASK": "6"}, 6.0),
    ({k: v for k, v in SRUN_TASK_ENV.items() if k != "SLURM_STEP_ID"}, None),  # the sbatch script itself
    ({k: v for k, v in SRUN_TASK_ENV.items() if k != "SLURM_CPUS_PER_TASK"}, None),  # no --cpus-per-task
    ({**SRUN_TASK_ENV, "TORCHELASTIC_RUN_ID": "x"}, None),  # a rank torchrun started inside the task
    ({**SRUN_TASK_ENV, "SLURM_CPUS_PER_TASK": ""}, None),
    ({**SRUN_TASK_ENV, "SLURM_CPUS_PER_TASK": "twelve"}, None),
    ({**SRUN_TASK_ENV, "SLURM_CPUS_PER_TASK": "0"}, None),
    ({}, None),
])
def test_slurm_cpus_per_task_only_for_an_srun_task(env, expected):
    assert slurm_cpus_per_task(env) == expected


def test_max_workers_is_an_upper_bound_and_zero_stays_zero():
    for device in ("cpu", "cuda"):
        for cpus in (1, 2, 8, 64):
            for limit in (0, 1, 3):
                plan = plan_cpus(max_workers=limit, device_type=device, cpus=cpus, omp_num_threads="")
                assert 0 <= plan.workers <= limit and plan.torch_threads >= 1
    assert plan_cpus(max_workers=0, device_type="cuda", cpus=8, omp_num_threads="").workers == 0
    assert plan_cpus(max_workers=-1, device_type="cpu", cpus=8, omp_num_threads="").workers == 0


def test_omp_num_threads_fixes_the_encoder_threads(monkeypatch):
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=8, omp_num_threads="3") == CpuPlan(8, 4, 3, True)
    assert plan_cpus(max_workers=4, device_type="cuda", cpus=8, omp_num_threads="2,1").torch_threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=8) == CpuPlan(8, 4, 1, True)
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert plan_cpus(max_workers=4, device_type="cpu", cpus=8) == CpuPlan(8, 4, 8)
    assert [parse_omp_num_threads(v) for v in (None, "", "0", "x", " 6 ", "4,2")] == [None, None, None, None, 6, 4]


def test_describe_says_what_was_used():
    assert CpuPlan(2, 1, 2).describe() == "2 CPUs: 1 decode worker, 2 encoder threads"
    assert CpuPlan(1, 0, 1).describe() == "1 CPU: decoding in the main process, 1 encoder thread"
    assert CpuPlan(1.5, 3, 1, True).describe() == "1.5 CPUs: 3 decode workers, 1 encoder thread (OMP_NUM_THREADS)"


def test_default_cpus_come_from_this_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = plan_cpus(max_workers=64, device_type="cpu")
    assert plan.torch_threads == max(1, int(available_cpus())) and plan.cpus == round(available_cpus(), 2)


# --------------------------------------------------------------------------- this machine

def test_this_machine():
    cpus, memory = available_cpus(), available_memory()
    assert 0 < cpus <= (os.cpu_count() or 1)
    assert memory > 0
    assert available_cpus(affinity={0}) <= 1.0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity on this platform")
def test_this_machine_affinity_is_used():
    assert available_cpus() <= len(os.sched_getaffinity(0))
