"""Argument checks shared by the public ops: every failure is a ValueError naming the argument,
what was expected and what was given. Shapes are static under jit, so these run while tracing."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Literal, Sequence, get_args

import jax
import jax.numpy as jnp
import numpy as np

# The ops' option names, once: each Literal types the argument, its tuple is what the checks accept.
Impl = Literal["auto", "recurrent", "chunk", "pallas"]
ContentGrad = Literal["stop", "full"]  # CARVE: gradient through the content signal into the state, or not
KernelBwd = Literal["kernels", "reference"]  # impl="pallas": the kernels' backward, or the chunk path's VJP
IMPLS: tuple[str, ...] = get_args(Impl)
CONTENT_GRADS: tuple[str, ...] = get_args(ContentGrad)
KERNEL_BWDS: tuple[str, ...] = get_args(KernelBwd)


def _fail(fn: str, name: str, expected: str, got: Any) -> ValueError:
  return ValueError(f"{fn}: argument `{name}` must be {expected}, got {got}")


def check_float(fn: str, name: str, x: Any, shape: Sequence[int | None]) -> None:
  """x must be a floating array whose shape matches `shape` (None = any size on that axis)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise _fail(fn, name, "an array", type(x).__name__)
  if len(x.shape) != len(shape):
    raise _fail(fn, name, f"rank {len(shape)} (shape {_fmt(shape)})", f"shape {tuple(x.shape)}")
  if any(e is not None and e != a for e, a in zip(shape, x.shape)):
    raise _fail(fn, name, f"shape {_fmt(shape)}", f"shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise _fail(fn, name, "a floating-point array", f"dtype {x.dtype}")


def check_int(fn: str, name: str, x: Any, shape: Sequence[int | None]) -> None:
  """x must be an integer array whose shape matches `shape` (None = any size on that axis)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise _fail(fn, name, "an integer array", type(x).__name__)
  if len(x.shape) != len(shape) or any(e is not None and e != a for e, a in zip(shape, x.shape)):
    raise _fail(fn, name, f"shape {_fmt(shape)}", f"shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise _fail(fn, name, "an integer array", f"dtype {x.dtype}")


def check_cu_seqlens(fn: str, cu_seqlens: Any, B: int, T: int) -> None:
  """FLA-style offsets: int [N + 1] for a batch of one row, 0 = c_0 < c_1 < ... < c_N = T (checked
  when the values are concrete; under jit only shape and dtype are)."""
  if B != 1:
    raise _fail(fn, "cu_seqlens", f"used with a batch of 1 row (pass segment_ids [B, T] for B={B})", f"B={B}")
  check_int(fn, "cu_seqlens", cu_seqlens, (None,))
  if cu_seqlens.shape[0] < 2:
    raise _fail(fn, "cu_seqlens", "at least 2 offsets [0, ..., T]", f"shape {tuple(cu_seqlens.shape)}")
  if isinstance(cu_seqlens, jax.core.Tracer):  # values unknown while tracing
    return
  c = np.asarray(cu_seqlens)
  if c[0] != 0 or c[-1] != T or np.any(np.diff(c) <= 0):
    raise _fail(fn, "cu_seqlens", f"strictly increasing offsets from 0 to T={T}", c.tolist())


def check_positive_int(fn: str, name: str, x: Any) -> None:
  """A Python or NumPy integer > 0 (not a bool)."""
  if isinstance(x, bool) or not isinstance(x, Integral) or x <= 0:
    raise _fail(fn, name, "a positive int", repr(x))


def check_choice(fn: str, name: str, x: Any, choices: Sequence[str]) -> None:
  if x not in choices:
    raise _fail(fn, name, f"one of {tuple(choices)}", repr(x))


def check_scale(fn: str, scale: Any) -> None:
  """None, or a finite Python/NumPy real > 0 (not a bool)."""
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)
                            or scale <= 0):
    raise _fail(fn, "scale", "None or a finite positive float", repr(scale))


def check_divides(fn: str, name: str, x: int, of_name: str, of: int) -> None:
  if of % x != 0:
    raise _fail(fn, name, f"a divisor of {of_name}={of}", x)


def _fmt(shape: Sequence[int | None]) -> str:
  return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
