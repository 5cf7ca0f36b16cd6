"""Shared fixtures: float64 on demand, tolerances per dtype, relative-error helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Relative-error bounds ||fast - slow|| / ||slow|| for the reference paths (spec: "What counts as done").
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


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
