"""distributed.py: launch detection, topology checks, claiming over a real store, dead-rank detection."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from wds_encode.config import ConfigError, EncodeConfig, encode_config_from
from wds_encode.distributed import (Job, Launch, UnitClaims, check_topology, detect_launch, first_slurm_host,
                                    local_process_count, slurm_tasks_per_node)

BASE = {"model_config": "m.json", "ckpt_path": "m.ckpt", "dataset_config": "d.json", "output_path": "out"}
TORCHRUN_ENV = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2",
                "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job7",
                "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
SRUN_ENV = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
            "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu-[003-004]", "SLURM_NTASKS": "8"}


def config(**kw) -> EncodeConfig:
    return EncodeConfig(**BASE, **kw)


def test_torchrun_environment():
    launch = detect_launch(TORCHRUN_ENV)
    assert launch == Launch(launcher="torchrun", rank=5, world_size=8, local_rank=1, local_world_size=4,
                            num_nodes=2, master_addr="10.1.2.3", master_port=29500, agent_store=True,
                            run_id="job7.2")


def test_plain_environment_means_one_node_and_rank_zero_hosts_the_store():
    launch = detect_launch({"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})
    assert (launch.launcher, launch.local_rank, launch.local_world_size, launch.num_nodes) == ("env", 1, 3, 1)
    assert not launch.agent_store
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})


def test_srun_step():
    launch = detect_launch(SRUN_ENV)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 6, 8, 2)
    assert (launch.local_world_size, launch.num_nodes, launch.master_addr) == (4, 2, "gpu-003")
    assert launch.master_port == 10000 + 4242 and not launch.agent_store
    assert detect_launch({**SRUN_ENV, "MASTER_PORT": "3333"}).master_port == 3333


@pytest.mark.parametrize("env", [
    {},                                                                     # alone
    {k: v for k, v in SRUN_ENV.items() if not k.startswith("SLURM_STEP")},  # the sbatch script itself
    {**SRUN_ENV, "SLURM_STEP_NUM_TASKS": "1"},                             # srun --pty bash, salloc + srun -n1
])
def test_not_a_launcher(env):
    assert detect_launch(env) is None


def test_torchrun_inside_slurm_is_torchrun():
    assert detect_launch({**SRUN_ENV, **TORCHRUN_ENV}).launcher == "torchrun"


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("a,b,c", "a"), ("gpu-[003-010,017],cpu1", "gpu-003"), ("n[7,2]", "n7"),
    ("rack[1-2]-node[01-04]", "rack1-node01"), ("[5-6]x", "5x")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_tasks_per_node():
    assert slurm_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert slurm_tasks_per_node("8") == [8]
    with pytest.raises(ConfigError, match="tasks per node"):
        slurm_tasks_per_node("4x2")


def test_num_nodes_and_devices_must_agree_with_the_launcher():
    two_nodes = detect_launch(TORCHRUN_ENV)
    check_topology(two_nodes, config(num_nodes=2))
    check_topology(two_nodes, config())  # not given: the launcher's count
    with pytest.raises(ConfigError, match=r"--num-nodes 3, but this job has 2 node\(s\): torchrun: 8 rank"):
        check_topology(two_nodes, config(num_nodes=3))
    with pytest.raises(ConfigError, match="started alone"):
        check_topology(Launch(), config(num_nodes=4))
    with pytest.raises(ConfigError, match="--devices 2, but the launcher started 4"):
        check_topology(two_nodes, config(devices="2"))
    with pytest.raises(ConfigError, match="share one GPU"):
        check_topology(two_nodes, config(device="cuda:1"))


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_strategies_that_mean_something(strategy):
    assert config(strategy=strategy).strategy == strategy


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp", "ddp_spawn"])
def test_training_strategies_are_refused_with_a_reason(strategy):
    with pytest.raises(ConfigError, match="means nothing for encoding"):
        encode_config_from(None, {**BASE, "strategy": strategy})


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts ranks on a CPU-only machine")
def test_devices_on_a_cpu_only_machine():
    assert local_process_count(config()) == 1
    assert local_process_count(config(devices="3")) == 3
    assert local_process_count(encode_config_from(None, {**BASE, "devices": 2})) == 2  # YAML gives an int
    with pytest.raises(ConfigError, match="devices"):
        encode_config_from(None, {**BASE, "devices": "0"})


def _claim_all(address, count, out):
    out.put(list(UnitClaims(address, count)))


def test_every_index_is_claimed_exactly_once_across_processes():
    job = Job(Launch(), torch.device("cpu"), peer_timeout=60)
    try:
        claims = UnitClaims(job.address, 500)
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=_claim_all, args=(job.address, 500, out)) for _ in range(4)]
        for p in procs:
            p.start()
        got = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        assert sorted(i for part in got for i in part) == list(range(500))
        assert list(claims) == []  # a late claimer finds nothing and ends cleanly
        assert list(UnitClaims(job.address, 0)) == []
    finally:
        job.close()


RANK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, torch
    from wds_encode.distributed import Job, JobAborted, detect_launch
    launch = detect_launch(os.environ)
    job = Job(launch, torch.device("cpu"), peer_timeout=float(sys.argv[1]))
    if launch.rank == 1:
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.monotonic()
    try:
        job.finish({})
    except JobAborted as exc:
        print(f"aborted after {time.monotonic() - started:.1f} s: {exc}", flush=True)
        sys.exit(3)
""")


def test_a_rank_that_dies_without_a_launcher_stops_the_job():
    """No launcher to kill the others (plain env, like srun without --kill-on-bad-exit): heartbeats do."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, "3"], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    started = time.monotonic()
    out0, err0 = procs[0].communicate(timeout=60)
    procs[1].communicate(timeout=10)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 3, err0
    assert "rank 1 stopped responding (no heartbeat for 3 s" in out0
    assert time.monotonic() - started < 30
