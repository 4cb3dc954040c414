"""Every launcher gives the run of one torchrun launch with 2 processes.

The reference is ``tools/dist_train.sh CONFIG 2`` (MMSyncBN, float64, the
short run); the same training started as two nodes, by Open MPI's
environment and by a real Slurm must agree with it to 1e-9.
"""
import pytest
from conftest import device_env
from slurm_cluster import slurm_cluster, unavailable
from tools_launch import (SYNC_CONFIG, assert_runs_match, finish, free_port,
                          python, run, short_run_options, start)

RTOL = 1e-9


def test_two_nodes_match_one_node(runs, tmp_path):
    """Two torchrun launches with --nnodes 2 (node ranks 0 and 1, one
    process each) meeting at 127.0.0.1, through tools/dist_train.sh."""
    work_dir = str(tmp_path / 'work')
    port = str(free_port())
    nodes = [
        start([
            'bash', 'tools/dist_train.sh', SYNC_CONFIG, '1', '--work-dir',
            work_dir, *short_run_options('float64', 8)
        ],
              env=device_env(
                  'cpu',
                  NNODES='2',
                  NODE_RANK=str(node_rank),
                  MASTER_ADDR='127.0.0.1',
                  PORT=port)) for node_rank in range(2)
    ]
    results = [finish(node, timeout=300) for node in nodes]
    for node_rank, result in enumerate(results):
        assert result.returncode == 0, (
            f'node {node_rank}:\n{result.stdout[-2000:]}\n'
            f'{result.stderr[-2000:]}')
    assert_runs_match(work_dir, runs.sync_2proc(), RTOL)


def test_mpi_launcher_matches_torchrun(runs, tmp_path):
    """--launcher mpi reads the variables that Open MPI's mpirun sets."""
    work_dir = str(tmp_path / 'work')
    port = str(free_port())
    procs = [
        start(
            python('train.py', SYNC_CONFIG, '--launcher', 'mpi', '--work-dir',
                   work_dir, *short_run_options('float64', 8)),
            env=device_env(
                'cpu',
                OMPI_COMM_WORLD_RANK=str(rank),
                OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                OMPI_COMM_WORLD_SIZE='2',
                MASTER_ADDR='127.0.0.1',
                MASTER_PORT=port)) for rank in range(2)
    ]
    results = [finish(proc, timeout=300) for proc in procs]
    for rank, result in enumerate(results):
        assert result.returncode == 0, f'rank {rank}: {result.stderr[-3000:]}'
    assert_runs_match(work_dir, runs.sync_2proc(), RTOL)


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_slurm_matches_torchrun(runs, tmp_path):
    """tools/slurm_train.sh on a real one-node Slurm: srun -n 2 tasks."""
    work_dir = str(tmp_path / 'work')
    cluster_dir = tmp_path / 'slurm'
    cluster_dir.mkdir()
    reference = runs.sync_2proc()
    with slurm_cluster(str(cluster_dir)) as slurm_env:
        run([
            'bash', 'tools/slurm_train.sh', 'debug', 'mmsync-test',
            SYNC_CONFIG, work_dir, *short_run_options('float64', 8)
        ],
            timeout=300,
            env=device_env(
                'cpu',
                GPUS='2',
                GPUS_PER_NODE='2',
                CPUS_PER_TASK='1',
                GRES='',
                MASTER_PORT=str(free_port()),
                **slurm_env))
    assert_runs_match(work_dir, reference, RTOL)
