"""distributed.py: launch detection, topology checks, claiming over a real store, dead-rank detection."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from wds_encode.config import ConfigError, EncodeConfig, encode_config_from
from wds_encode.job.distributed import (CLAIM_KEY, Job, Launch, UnitClaims, check_topology, count_cpu_sharers,
                                    detect_launch, first_slurm_host, local_process_count, shared_gpu_error,
                                    slurm_tasks_per_node)

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
    from wds_encode.job.distributed import Job, JobAborted, detect_launch
    launch = detect_launch(os.environ)
    job = Job(launch, torch.device("cpu"), peer_timeout=float(sys.argv[1]))
    if launch.rank == 1:
        time.sleep(1.5)
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    started = time.monotonic()
    try:
        job.finish({})
    except JobAborted as exc:
        print(f"aborted after {time.monotonic() - started:.1f} s: {exc}", flush=True)
        sys.exit(3)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks_one_stopped(peer_timeout: float, signal_name: str):
    """Two ranks without a launcher to stop the others (plain env, like srun without --kill-on-bad-exit);
    rank 1 sends itself `signal_name` after joining. Returns (rank 0's exit code, its output, seconds taken)."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(peer_timeout), signal_name],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    started = time.monotonic()
    try:
        out0, err0 = procs[0].communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        procs[1].kill()
        procs[1].communicate(timeout=10)
    return procs[0].returncode, out0 + err0, took


def test_a_rank_that_stops_responding_without_a_launcher_stops_the_job():
    """A rank alive but silent (stopped, hung, or on a node that was lost, where there is no process to
    look at): the heartbeats stop the job after --peer-timeout."""
    code, output, took = two_ranks_one_stopped(3, "SIGSTOP")
    assert code == 3, output
    assert "rank 1 stopped responding (no heartbeat for 3 s" in output
    assert took < 30


def test_a_rank_that_dies_on_this_host_stops_the_job_within_a_heartbeat():
    """Killed (SIGKILL, the OOM killer) on this host: its process is gone (a zombie its parent has not
    reaped yet counts), so the job stops at once instead of after --peer-timeout."""
    code, output, took = two_ranks_one_stopped(600, "SIGKILL")
    assert code == 3, output
    assert "rank 1 exited before finishing (pid " in output and "on this host: killed, or out of memory" in output
    assert took < 30


# --------------------------------------------------------------------------- who runs where, and the end

def env_launch(rank: int, port: int, world: int = 2) -> Launch:
    """Rank `rank` of a plain RANK / WORLD_SIZE / MASTER_* job on this machine: rank 0 hosts the store."""
    return Launch(launcher="env", rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                  master_addr="127.0.0.1", master_port=port, run_id=f"env.{port}")


def in_threads(rank_main, world: int = 2) -> list:
    """`rank_main(rank)` for every rank, each in its own thread: what each returned or raised."""
    outcome: list = [None] * world

    def run(rank):
        try:
            outcome[rank] = rank_main(rank)
        except BaseException as exc:  # noqa: B036 - handed to the test
            outcome[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank is stuck"
    return outcome


def test_ranks_with_their_own_gpus_join_and_merge_results_through_the_store():
    port = free_port()

    def rank_main(rank):
        job = Job(env_launch(rank, port), torch.device("cpu"), peer_timeout=60, device_uuid=f"GPU-{rank}")
        try:
            process_group = torch.distributed.is_initialized()
            results = job.finish({"rank": rank, "units_done": 3 + rank, "x": [1.5]})
            return job.cpu_sharers, process_group, results
        finally:
            job.close()

    outcome = in_threads(rank_main)
    expected = [{"rank": 0, "units_done": 3, "x": [1.5]}, {"rank": 1, "units_done": 4, "x": [1.5]}]
    # one affinity, shared by both threads; rank 0 speaks for the job and gets every rank's result
    assert outcome == [(2, False, expected), (2, False, expected[1:])]
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to bind two ranks apart")
def test_ranks_bound_to_their_own_cores_share_them_with_nobody():
    port, cores = free_port(), sorted(os.sched_getaffinity(0))

    def rank_main(rank):
        os.sched_setaffinity(0, {cores[rank]})  # this thread only, as srun --cpu-bind does per task
        job = Job(env_launch(rank, port), torch.device("cpu"), peer_timeout=60, device_uuid=None)
        try:
            return job.cpu_sharers
        finally:
            job.finish({})
            job.close()

    assert in_threads(rank_main) == [1, 1]


def test_two_ranks_on_one_gpu_stop_at_join_before_any_work():
    """The launcher's agent hosts the store (torchrun), so the test can look into it afterwards."""
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launches = [Launch(launcher="torchrun", rank=r, world_size=2, local_rank=r, local_world_size=2,
                       master_addr="127.0.0.1", master_port=agent.port, agent_store=True, run_id="same-gpu")
                for r in range(2)]
    outcome = in_threads(lambda r: Job(launches[r], torch.device("cpu"), peer_timeout=60,
                                       device_uuid="GPU-5f1c0e3a"))
    host = socket.gethostname()
    for error in outcome:
        assert isinstance(error, ConfigError), error
        assert str(error).startswith(f"on host {host}, ranks 0 (local rank 0, cpu) and 1 (local rank 1, cpu) "
                                     "all run on GPU GPU-5f1c0e3a. Every rank needs a GPU of its own")
        assert "--nproc-per-node" in str(error) and "CUDA_VISIBLE_DEVICES" in str(error)
    store = torch.distributed.PrefixStore("wds-encode/same-gpu", agent)
    assert store.add("joined", 0) == 2  # both got as far as joining...
    assert not store.check([CLAIM_KEY])  # ...no further: no unit claimed, no heartbeat ever sent
    assert not store.check(["beat/0"]) and not store.check(["beat/1"])


HOSTED_BY_RANK_0_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch
    from wds_encode.job import distributed
    from wds_encode.config import ConfigError
    launch = distributed.detect_launch(os.environ)
    if launch.rank == 1:  # join second, then be slow to see each barrier pass: rank 0 must wait for it
        probe = distributed.StoreAddress(launch.master_addr, launch.master_port,
                                         f"wds-encode/{launch.run_id}").connect()
        while probe.add("joined", 0) < 1:
            time.sleep(0.01)
        distributed.POLL_SECONDS = 1.5
    try:
        job = distributed.Job(launch, torch.device("cpu"), peer_timeout=60,
                              device_uuid=sys.argv[1 + launch.rank])
    except ConfigError as exc:
        print(f"ConfigError: {exc}", flush=True)
        sys.exit(2)
    while launch.rank == 0 and not job.store.check(["result/1"]):
        time.sleep(0.01)  # rank 1 finishes first and sleeps through the moment everyone has
    print(json.dumps(job.finish({"rank": launch.rank, "units_done": 5 + launch.rank})), flush=True)
    job.close()
""")


def ranks_hosted_by_rank_0(*gpus: str) -> list[tuple[int, str]]:
    """(exit code, output) of two processes of a plain RANK / WORLD_SIZE / MASTER_* job with these GPUs."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", HOSTED_BY_RANK_0_SCRIPT, *gpus],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    return [(p.returncode, out) for p, out in ((p, p.communicate(timeout=60)[0]) for p in procs)]


def test_when_rank_0_hosts_the_store_every_rank_gets_the_clear_error():
    """Rank 0 must not exit (taking the store with it) before the others have read why: rank 1, which
    sees the barriers pass last, would get a connection error instead."""
    for code, out in ranks_hosted_by_rank_0("GPU-5f1c0e3a", "GPU-5f1c0e3a"):
        assert code == 2, out
        assert out.startswith(f"ConfigError: on host {socket.gethostname()}, ranks 0 (local rank 0, cpu) "
                              "and 1 (local rank 1, cpu) all run on GPU GPU-5f1c0e3a"), out


def test_when_rank_0_hosts_the_store_it_gets_every_result_and_the_others_finish_cleanly():
    """Rank 0 must not return from `finish` (and exit) while the others still use the store."""
    expected = [{"rank": 0, "units_done": 5}, {"rank": 1, "units_done": 6}]
    (code0, out0), (code1, out1) = ranks_hosted_by_rank_0("GPU-0", "GPU-1")
    assert code0 == 0 and json.loads(out0) == expected, out0
    assert code1 == 0 and json.loads(out1) == expected[1:], out1


def test_shared_gpu_error_names_every_group_and_ignores_cpu_ranks():
    def record(rank, gpu, device="cuda:0"):
        return {"rank": rank, "local_rank": rank, "device": device, "gpu": gpu, "cpus": [0]}

    assert shared_gpu_error("n1", [record(0, "GPU-a"), record(1, "GPU-b"), record(2, None, "cpu"),
                                   record(3, None, "cpu")]) is None
    message = shared_gpu_error("n1", [record(3, "GPU-a"), record(0, "GPU-a"), record(1, "GPU-b"),
                                      record(2, "GPU-a"), record(4, "GPU-b", "cuda:1")])
    assert message.startswith("on host n1, ranks 0 (local rank 0, cuda:0), 2 (local rank 2, cuda:0) and "
                              "3 (local rank 3, cuda:0) all run on GPU GPU-a; ranks 1 (local rank 1, cuda:0) "
                              "and 4 (local rank 4, cuda:1) all run on GPU GPU-b. ")


def test_cpu_sharers_count_overlapping_affinities_itself_included():
    ranks = [{"cpus": [0, 1, 2, 3]}, {"cpus": [4, 5, 6, 7]}, {"cpus": [3, 4]}]
    assert [count_cpu_sharers(r["cpus"], ranks) for r in ranks] == [2, 2, 3]
    assert count_cpu_sharers([0], [{"cpus": [0]}]) == 1
