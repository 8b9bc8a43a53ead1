"""Device mesh, shardings and multi-host helpers (``jax.jit`` + ``NamedSharding``; no ``pmap``)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# How a device runs its slots (config.mesh.stack; train.stack_mode says what each does).
STACKS = ("auto", "each", "unroll", "map", "vmap")
# Environment variables that mean "this process is one of several" on common clusters.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Start ``jax.distributed`` when the run spans several processes.

    Explicit ``coordinator_address`` (+ count and id) for clusters that jax cannot detect;
    otherwise TPU pods / SLURM / Open MPI are picked up from the environment. A single
    process does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise ValueError("distributed.coordinator_address needs distributed.num_processes >= 1 "
                             "and distributed.process_id >= 0.")
        _maybe_cpu_collectives()
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _looks_multiprocess():
        _maybe_cpu_collectives()
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _looks_multiprocess() -> bool:
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if name == "TPU_WORKER_HOSTNAMES" and "," in value:
            return True
        if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") and value.isdigit() and int(value) > 1:
            return True
        if name == "JAX_COORDINATOR_ADDRESS" and value:
            return True
    return False


def _maybe_cpu_collectives() -> None:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_hint():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _has_accelerator_hint() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CUDA_VISIBLE_DEVICES"))


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every host, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def plan_mesh(num_jobs: int, batch_size: int, data: int | str = "auto", model: int | str = "auto",
              num_devices: int | None = None, processes: int | None = None) -> tuple[int, int]:
    """``(model, data)``: devices along the job axis and devices per job's batch.

    ``data`` divides ``batch_size``. Auto on one process: one device per job (a small model's
    batch fits one), ``model = min(jobs, devices)``, jobs beyond that stacked on the devices.
    On several processes every device is used (``model * data`` = devices, so every host takes
    part), with the fewest padding jobs.
    """
    n = jax.device_count() if num_devices is None else num_devices
    hosts = jax.process_count() if processes is None else processes
    if data != "auto":
        data = int(data)
        if data < 1 or data > n or batch_size % data:
            raise ValueError(f"config.mesh.data={data} must divide train.batch_size={batch_size} and "
                             f"be at most the {n} devices.")
    if model != "auto":
        model = int(model)
        if model < 1 or model > n:
            raise ValueError(f"config.mesh.model={model} must be between 1 and the {n} devices.")
    if data == "auto" and model == "auto":
        divisors = [d for d in range(1, n + 1) if batch_size % d == 0]
        if hosts > 1:
            fits = [(-(-num_jobs // (n // d)) * (n // d), d) for d in divisors if n % d == 0]
            data = min(fits)[1]
        else:
            data = 1
    elif data == "auto":
        data = max(d for d in range(1, n // model + 1) if batch_size % d == 0)
    if model == "auto":
        model = n // data if hosts > 1 else min(num_jobs, n // data)
    if model * data > n:
        raise ValueError(f"config.mesh.model={model} x mesh.data={data} needs {model * data} devices; "
                         f"there are {n}.")
    return model, data


def make_job_mesh(model: int, data: int) -> Mesh:
    """A ``(model, data)`` mesh over the first ``model * data`` devices (all of them on several hosts)."""
    devices = np.asarray(jax.devices()[: model * data]).reshape(model, data)
    if jax.process_count() > 1:
        hosts = {d.process_index for d in devices.flat}
        if len(hosts) < jax.process_count():
            raise ValueError(f"mesh.model={model} x mesh.data={data} leaves hosts without devices; "
                             "use every device (mesh.model=auto, mesh.data=auto).")
    return Mesh(devices, (MODEL_AXIS, DATA_AXIS))


def job_sharding(mesh: Mesh) -> NamedSharding:
    """Stacked per-job values: the leading (job) axis over ``model``."""
    return NamedSharding(mesh, P(MODEL_AXIS))


def job_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Per-job batches ``[job, example, ...]``: jobs over ``model``, examples over ``data``."""
    return NamedSharding(mesh, P(MODEL_AXIS, DATA_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, key: str = "train.batch_size") -> None:
    """The global batch must split evenly over all devices."""
    n = jax.device_count()
    if global_batch % n:
        raise ValueError(f"config.{key}={global_batch} is not divisible by the {n} devices "
                         f"({jax.process_count()} host(s)); choose a multiple of {n}.")


def to_global(local: Any, mesh: Mesh) -> Any:
    """Host-local NumPy batch (leading axis = this host's part) -> global batch-sharded arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def gather_to_all(tree: Any) -> Any:
    """Batch-sharded arrays -> the whole global batch as NumPy on every host."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def replicated_abstract(tree: Any, mesh: Mesh) -> Any:
    """``tree``'s shapes and dtypes, replicated over ``mesh`` (a restore target)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place identical host values on every device (params, optimizer state)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda idx: np.asarray(x)[idx]), tree)
