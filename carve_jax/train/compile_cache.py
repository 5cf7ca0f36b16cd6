"""JAX's persistent compilation cache for training runs: a program compiled once is loaded on every later run.

    compile_cache.enable(cfg.compile_cache)     # carve-train, the demo: before anything compiles

A resumed or repeated run of the same configuration (same model, shapes, mesh, jax version and device kind:
jax keys every entry by the lowered program, the compile options and the backend) skips the XLA compile of
its train and eval steps; tracing and lowering still run. `TrainConfig.compile_cache`: "auto" keeps a cache
the process already has (jax's JAX_COMPILATION_CACHE_DIR, a caller's `jax.config`), else takes the folder in
$CARVE_JAX_CACHE, else ~/.cache/carve_jax/xla; a folder; "none" turns it off. Only programs that took at
least `MIN_COMPILE_S` to compile are written (the train and eval steps, not the small eager ops).
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = "~/.cache/carve_jax/xla"
ENV = "CARVE_JAX_CACHE"
OFF = ("none", "off", "")
MIN_COMPILE_S = 0.5


def resolve(setting: str | None) -> str | None:
  """The cache folder of a `compile_cache` setting other than a process's own ("auto": $CARVE_JAX_CACHE or
  DEFAULT_DIR), None if off."""
  if setting is None:
    return None
  if setting == "auto":
    setting = os.environ.get(ENV, DEFAULT_DIR)
  return None if setting.strip().lower() in OFF else os.path.abspath(os.path.expanduser(setting))


def enable(setting: str | None) -> str | None:
  """Points jax's persistent compilation cache (process-wide) at the folder of `setting`; returns the folder
  in use (None: no cache)."""
  current = jax.config.jax_compilation_cache_dir
  if setting == "auto" and current:
    return current
  path = resolve(setting)
  if path != current:
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415
    compilation_cache.reset_cache()  # jax decides once per process whether a cache is in use: decide again
    jax.config.update("jax_compilation_cache_dir", path)
    if path is not None:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
  return path
