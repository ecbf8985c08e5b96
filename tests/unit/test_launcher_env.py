"""Launcher detection (torchrun, Open MPI, MPICH/PMI, Slurm), MASTER_ADDR defaults and the
rendezvous port every rank of one job agrees on."""

from __future__ import annotations

import sys

import pytest

from megatron_vlm.runtime import launcher_env as le
from megatron_vlm.runtime.launcher_env import LaunchEnv, agreed_port, detect, export_torch_env

# id: (environment, expected (launcher, rank, world, local rank, local world, single node))
ENVS = {
    "plain_python": ({"PATH": "/bin"}, ("none", 0, 1, 0, 1, True)),
    "torchrun": ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "node0"}, ("torchrun", 5, 8, 1, 4, False)),
    "torchrun_one_node": ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
                          ("torchrun", 1, 2, 1, 2, True)),
    "torch_env_without_local": ({"RANK": "3", "WORLD_SIZE": "4"}, ("torchrun", 3, 4, 3, 4, True)),
    "openmpi": ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "6",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "PMIX_NAMESPACE": "prterun-host-123@1"},
                ("openmpi", 6, 16, 6, 8, False)),
    "openmpi_one_node": ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                          "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
                         ("openmpi", 1, 2, 1, 2, True)),
    "mpich": ({"PMI_RANK": "9", "PMI_SIZE": "12", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "6"},
              ("mpich", 9, 12, 3, 6, False)),
    "intel_mpi_no_local_size": ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2"},
                                ("mpich", 2, 4, 2, 4, True)),
    "slurm_ntasks_per_node": ({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                               "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "777"},
                              ("slurm", 13, 16, 5, 8, False)),
    "slurm_tasks_per_node_only": ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                   "SLURM_TASKS_PER_NODE": "2(x4)"}, ("slurm", 3, 8, 1, 2, False)),
    "slurm_one_node": ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                        "SLURM_TASKS_PER_NODE": "4"}, ("slurm", 1, 4, 1, 4, True)),
    # mpirun / torchrun inside a Slurm allocation: the launcher that started the process wins
    "openmpi_inside_slurm": ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                              "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                              "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"},
                             ("openmpi", 3, 4, 3, 4, True)),
    "torchrun_inside_slurm": ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                               "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, ("torchrun", 2, 4, 2, 4, True)),
}


@pytest.mark.parametrize("case", list(ENVS))
def test_detect(case):
    env, (launcher, rank, world, local_rank, local_world, single) = ENVS[case]
    got = detect(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.local_world_size) == (
        launcher, rank, world, local_rank, local_world)
    assert got.single_node is single


def test_detect_reads_os_environ_by_default(monkeypatch):
    for key in [k for keys in le._LAUNCHERS for k in keys[1:4]]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "3")
    assert (detect().launcher, detect().rank, detect().world_size) == ("mpich", 1, 3)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is outside the world of 4 ranks (WORLD_SIZE)"),
    ({"OMPI_COMM_WORLD_RANK": "-1", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK=-1 is outside"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "launcher variable SLURM_PROCID='x' is not an integer"),
])
def test_detect_rejects_bad_values(env, message):
    with pytest.raises(RuntimeError) as info:
        detect(env)
    assert message in str(info.value)


# ---- MASTER_ADDR / MASTER_PORT ------------------------------------------------------------------

def test_single_node_defaults_master_addr_to_localhost():
    launch = detect(ENVS["torchrun_one_node"][0])
    env = export_torch_env(launch, {"SLURM_JOB_ID": "42"})
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] == str(agreed_port(launch, {"SLURM_JOB_ID": "42"}))
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("1", "2", "1", "2")


def test_export_keeps_given_master_addr_and_port():
    launch = LaunchEnv("slurm", 9, 16, 1, 8)  # multi-node
    env = export_torch_env(launch, {"MASTER_ADDR": "node17", "MASTER_PORT": "31000"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"], env["LOCAL_RANK"]) == ("node17", "31000", "9", "1")


@pytest.mark.parametrize("case", ["torchrun", "openmpi", "mpich", "slurm_ntasks_per_node",
                                  "slurm_tasks_per_node_only"])
def test_multi_node_without_master_addr_is_a_clear_error(case):
    env = {k: v for k, v in ENVS[case][0].items() if k != "MASTER_ADDR"}
    launch = detect(env)
    assert not launch.single_node
    with pytest.raises(RuntimeError) as info:
        export_torch_env(launch, dict(env))
    message = str(info.value)
    assert "MASTER_ADDR is not set for a multi-node job" in message
    assert f"{launch.world_size} ranks, {launch.local_world_size} per node, launcher {launch.launcher}" in message
    assert "export MASTER_ADDR=" in message


@pytest.mark.parametrize("key", ["SLURM_JOB_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_PORT"])
def test_port_from_job_id_same_job_agrees_different_jobs_differ(key):
    ranks = [LaunchEnv("slurm", r, 4, r, 4) for r in range(4)]
    ports = {agreed_port(launch, {key: "job-1234"}) for launch in ranks}
    assert len(ports) == 1  # every rank of the job derives the same port
    (port,) = ports
    assert le.DEFAULT_PORT_BASE < port <= le.DEFAULT_PORT_BASE + 20000
    others = {agreed_port(ranks[0], {key: f"job-{i}"}) for i in range(1000, 1020)}
    assert len(others) >= 19 and port not in others  # concurrent jobs on one node get other ports


def test_port_job_id_precedence_and_default():
    launch = LaunchEnv("slurm", 0, 2, 0, 2)
    assert agreed_port(launch, {}) == le.DEFAULT_PORT_BASE
    both = {"PMIX_NAMESPACE": "ns-a", "SLURM_JOB_ID": "99"}
    assert agreed_port(launch, both) == agreed_port(launch, {"PMIX_NAMESPACE": "ns-a"})
    assert agreed_port(launch, both) != agreed_port(launch, {"SLURM_JOB_ID": "99"})


def test_openmpi_without_mpi4py_falls_back_to_the_job_id(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` raises ImportError
    env = {"PMIX_NAMESPACE": "prterun-x-1@1"}
    ports = {agreed_port(LaunchEnv("openmpi", r, 2, r, 2), env) for r in range(2)}
    assert ports == {agreed_port(LaunchEnv("slurm", 0, 2, 0, 2), env)}


def test_free_port_is_bindable():
    import socket

    port = le.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
