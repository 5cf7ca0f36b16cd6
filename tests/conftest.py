"""Shared fixtures: float64 on demand, the tolerance table per dtype, relative-error helper."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Runs under test use no persistent compilation cache unless a test asks for one (the `xla_cache` fixture,
# or CARVE_JAX_CACHE in a subprocess's environment): nothing is written to ~/.cache.
os.environ.setdefault("CARVE_JAX_CACHE", "none")


@dataclasses.dataclass(frozen=True)
class Tol:
  """Largest relative error `rel_err(fast, slow)` = ||fast - slow|| / ||slow|| allowed in one dtype.

  out, grad: two algorithms for one function (chunk form vs recurrence, the kernels vs the chunk path,
    decoding token by token vs the parallel form): outputs / gradients (spec, "What counts as done":
    float64 ~1e-10, float32 ~1e-5). bfloat16: bf16 matmul operands against a float32 reference.
  rounding: the same math in another order or layout (other chunk, tile or block sizes, a split
    sequence, one document packed vs alone, scanned vs unrolled layers, a step vs the recurrence):
    outputs, and gradients where the backward is the same program too (else `grad`);
    bfloat16: only the bf16 rounding of inputs and outputs differs.
  Thresholds that a test must EXCEED (the check can fail: "G changes the function") stay inline.
  """

  out: float
  grad: float
  rounding: float


class _ByDtype(dict):
  """A dict keyed by dtype name that takes any dtype-like key: TOL[jnp.float32], TOL[x.dtype]."""

  def __getitem__(self, dtype):
    return super().__getitem__(jnp.dtype(dtype).name)


TOL = _ByDtype(
    float64=Tol(out=1e-10, grad=1e-10, rounding=1e-13),
    float32=Tol(out=1e-5, grad=1e-5, rounding=1e-6),
    bfloat16=Tol(out=2e-2, grad=5e-2, rounding=1e-2),
)
# The compiled GPU kernels (head size 128, T = 300) against the float32 "highest"-precision chunk path,
# outputs and gradients: bf16 operands; float32 runs TF32x3 dots.
GPU_KERNEL_TOL = _ByDtype(bfloat16=3e-2, float32=1e-4)


@pytest.fixture
def x64():
  """Run the test with 64-bit types enabled (restored afterwards)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's runs and its subprocesses."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("xla_cache"))
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield path
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()  # later tests in this process must not write into this (deleted) folder


def rel_err(a, b) -> float:
  """Largest ||a - b|| / ||b|| over matching leaves of two pytrees (NaN counts as failure)."""
  errs = jax.tree.map(lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                                         / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-300)), a, b)
  leaves = jax.tree.leaves(errs)
  return float("inf") if any(np.isnan(leaves)) else max(leaves)


def pytest_collection_modifyitems(config, items):
  """GPU-only tests are skipped, visibly, where JAX has no GPU backend."""
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
