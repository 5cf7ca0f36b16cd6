"""Process setup of an experiment run: the persistent XLA cache and a stack dump on SIGTERM.

Nothing happens on import; an experiment's `main` calls `setup()`.
"""

from __future__ import annotations

import faulthandler
import signal

import jax


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def setup(cache_dir: str = "/tmp/carve_jax_cache") -> None:
  """Persistent XLA cache (repeated configurations, e.g. seeds, compile once per process tree), and
  a run stopped by `timeout` (SIGTERM) prints where every thread was, so the log says what ran long."""
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
