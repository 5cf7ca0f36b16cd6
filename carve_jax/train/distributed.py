"""Devices, hosts and the data-parallel mesh.

One mesh axis, `data`, spans every device of every process. Parameters and optimizer state are
replicated (`P()`); a batch is sharded on its leading axis (`P("data")`). Each process reads only
its own rows: process p of n takes shard p of the data with `batch_size / n` rows per step
(`process_batch_size`), and `global_batch` stitches the per-process arrays into one global
`jax.Array` with `jax.make_array_from_process_local_data`. Nothing here assumes one host.

Multi-host (several processes, e.g. one per GPU node): start the same command on every host and
ask for `jax.distributed.initialize()` before anything touches a device, with `--distributed` or
`CARVE_DISTRIBUTED=1`. On SLURM/Open MPI/Kubernetes-with-JobSet JAX finds the coordinator itself;
elsewhere set `JAX_COORDINATOR_ADDRESS=host0:1234`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`
(`CARVE_COORDINATOR`, `CARVE_NUM_PROCESSES`, `CARVE_PROCESS_ID` are read as well):

    # host i of 2
    CARVE_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 \\
      JAX_PROCESS_ID=i carve-train --preset 50m --batch_size 256

Checkpoints must then live on a filesystem every host sees; orbax coordinates the write.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
_initialized = False


def maybe_initialize(requested: bool = False) -> bool:
  """Calls `jax.distributed.initialize()` once if requested (flag) or CARVE_DISTRIBUTED=1."""
  global _initialized
  if _initialized or not (requested or os.environ.get("CARVE_DISTRIBUTED", "0") not in ("", "0")):
    return _initialized
  kw = {}
  if os.environ.get("CARVE_COORDINATOR"):
    kw["coordinator_address"] = os.environ["CARVE_COORDINATOR"]
  if os.environ.get("CARVE_NUM_PROCESSES"):
    kw["num_processes"] = int(os.environ["CARVE_NUM_PROCESSES"])
  if os.environ.get("CARVE_PROCESS_ID"):
    kw["process_id"] = int(os.environ["CARVE_PROCESS_ID"])
  jax.distributed.initialize(**kw)
  _initialized = True
  return True


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named `data` over all (global) devices, or the given ones."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def process_batch_size(global_batch_size: int, mesh, grad_accum: int = 1) -> int:
  """Rows this process reads per step; checks the global batch splits evenly.

  Raises ValueError unless batch_size is divisible by (devices * grad_accum) and by the processes.
  """
  n_dev = mesh.devices.size
  if global_batch_size % (n_dev * grad_accum):
    raise ValueError(
        f"batch_size must be divisible by devices * grad_accum = {n_dev} * {grad_accum}, "
        f"got {global_batch_size}")
  n_proc = jax.process_count()
  if global_batch_size % n_proc:
    raise ValueError(f"batch_size must be divisible by the process count {n_proc}, got {global_batch_size}")
  return global_batch_size // n_proc


def global_batch(mesh, local_batch: dict) -> dict:
  """Per-process numpy rows -> global arrays sharded on `data` (rows of process p come p-th)."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local_batch.items()}


def replicate(mesh, tree):
  """Places a pytree (identical on every process) replicated on the mesh.

  With several processes each one fills its own devices from its host copy
  (`jax.make_array_from_callback`), which needs no cross-host transfer.
  """
  sh = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sh)

  def one(x):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
  return jax.tree.map(one, tree)


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on this process's first device (None where the backend doesn't say)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def host_peak_rss_bytes() -> int:
  """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
