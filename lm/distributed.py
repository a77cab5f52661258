"""Joining a multi-process run: the same command on every host (or every GPU), one call.

`initialize(...)` starts `jax.distributed` from, in order of precedence:

    arguments / lm.train flags   --coordinator HOST:PORT --num_processes N --process_id I
                                 [--local_device_ids 0,1,...]
    environment                  LM_COORDINATOR, LM_NUM_PROCESSES, LM_PROCESS_ID,
                                 LM_LOCAL_DEVICE_IDS (what launch/local.py sets)
    a cluster JAX detects        SLURM (srun, SLURM_NTASKS > 1), Open MPI (mpirun,
                                 OMPI_COMM_WORLD_SIZE > 1): coordinator and ids come from it

and does nothing when none of these is set (a single-process run). CPU collectives use gloo, so
the same path runs across processes on one machine; on GPUs XLA uses NCCL (NVLink within a node,
InfiniBand across nodes: see launch/slurm.sbatch for the environment).
"""
from __future__ import annotations

import os

import jax

from lm.config import ConfigError

ENV = ("LM_COORDINATOR", "LM_NUM_PROCESSES", "LM_PROCESS_ID", "LM_LOCAL_DEVICE_IDS")


def cluster() -> str | None:
    """The scheduler that started this process as one of several, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: str | None = None) -> bool:
    """Joins the run described by the arguments, the environment or the cluster; returns
    whether this is a multi-process run. Must run before anything touches a device."""
    coordinator = coordinator or os.environ.get("LM_COORDINATOR") or None
    num_processes = num_processes or _int_env("LM_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("LM_PROCESS_ID")
    local_device_ids = local_device_ids or os.environ.get("LM_LOCAL_DEVICE_IDS") or None
    explicit = [coordinator, num_processes, process_id]
    # CPU collectives across processes (no effect on GPU backends, which use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(v is None for v in explicit):
        if cluster() is None:
            return False
        jax.distributed.initialize()  # SLURM / Open MPI: JAX reads the cluster's environment
        return True
    if any(v is None for v in explicit):
        raise ConfigError("a multi-process run needs all of --coordinator (HOST:PORT), "
                          "--num_processes and --process_id (or LM_COORDINATOR, "
                          "LM_NUM_PROCESSES, LM_PROCESS_ID); got coordinator="
                          f"{coordinator!r}, num_processes={num_processes!r}, "
                          f"process_id={process_id!r}")
    if ":" not in coordinator:
        raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    ids = None
    if local_device_ids:
        try:
            ids = [int(i) for i in local_device_ids.split(",")]
        except ValueError:
            raise ConfigError("--local_device_ids must be comma-separated integers, got "
                              f"{local_device_ids!r}") from None
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=ids)
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
