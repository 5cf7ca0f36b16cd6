"""`pallas_gated_delta`: the Pallas chunk kernels of the family under one `jax.custom_vjp`.

Contract (called by `carve_jax.ops.api._run` for impl="pallas"): public layout, caller's dtype.
    q, k, g, b: [B, T, H, K]; v: [B, T, H, V]; w: [B, T, H, V], or beta [B, T, H] when gamma [H] is
    given (CARVE: b then holds the erase logits, gate = sigmoid(b + gamma_h c_n)).
    initial_state: [B, H, K, V] float32. Any T: padded inside with k = v = g = b = w = 0 tokens.
Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32).

The forward (`forward.py`: chunk-parallel preparation, a sequential state pass, chunk-parallel
output) materialises the state entering every chunk ([B, H, T/C, K, V], the tensor FLA calls h),
V_new and CARVE's content signal per chunk; under differentiation these are the residuals, and the
backward (`backward.py`) recomputes every other in-chunk quantity from them.
On a backend other than GPU the kernels run in Pallas interpret mode (CPU CI).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backward import backward
from pallas_kernels.forward import forward
from pallas_kernels.config import DEFAULT, TuningConfig


def _static(scale, chunk_size, content_block, cfg, interpret):
  return (float(scale), int(chunk_size), None if content_block is None else int(content_block), cfg,
          bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _gated_delta(q, k, v, g, b, w, gamma, S0, static):
  (o, S), _ = _gated_delta_fwd(q, k, v, g, b, w, gamma, S0, static)
  return o, S


def _gated_delta_fwd(q, k, v, g, b, w, gamma, S0, static):
  scale, C, cb, cfg, interpret = static
  o, S, res = forward(q, k, v, g, b, w, gamma, S0, scale=scale, chunk_size=C, content_block=cb, cfg=cfg,
                      interpret=interpret)
  return (o, S), (q, k, v, g, b, w, gamma, res)


def _gated_delta_bwd(static, res, cts):
  scale, C, _, cfg, interpret = static
  q, k, v, g, b, w, gamma, fres = res
  do, dsf = cts
  return backward(q, k, v, g, b, w, gamma, fres, do, dsf, scale=scale, chunk_size=C, cfg=cfg, interpret=interpret)


_gated_delta.defvjp(_gated_delta_fwd, _gated_delta_bwd)


def supported(*, K: int, V: int, chunk_size: int, dtype, config: TuningConfig | None = None) -> bool:
  """Whether the kernels take these head sizes, chunk size and input dtype (for impl="auto").

  K, V: powers of two >= 16; chunk_size: a power of two >= 16. Only 16-bit
  inputs count as supported for "auto": float32 runs (TF32x3 dots on the GPU) but was verified
  only in interpret mode, and its kernels compile slowly.
  """
  cfg = DEFAULT if config is None else config
  try:
    cfg.check_shapes(chunk_size=chunk_size, K=K, V=V)
  except ValueError:
    return False
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def pallas_gated_delta(q, k, v, g, b, w, gamma, *, scale, initial_state, chunk_size, content_block=None,
                       content_grad="stop", config: TuningConfig | None = None):
  """(o [B, T, H, V], final state [B, H, K, V] float32) of the gated delta rule; see the module doc."""
  if content_grad != "stop":
    raise ValueError(f"pallas_gated_delta: argument `content_grad` must be 'stop' for the Pallas kernels "
                     f"(the gradient through the content signal into the state is not implemented), got "
                     f"{content_grad!r}; use impl='chunk' for content_grad='full'")
  cfg = DEFAULT if config is None else config
  B, T, H, K = q.shape
  V = v.shape[-1]
  cfg.check_shapes(chunk_size=chunk_size, K=K, V=V)
  if gamma is not None and (content_block is None or content_block % chunk_size):
    raise ValueError(f"pallas_gated_delta: argument `chunk_size` must divide `content_block`, got "
                     f"{chunk_size} and {content_block}")
  pad = -T % chunk_size
  if pad:
    p = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, g, b, w = (p(x) for x in (q, k, v, g, b, w))
  interpret = jax.default_backend() != "gpu"
  static = _static(scale, chunk_size, content_block if gamma is not None else None, cfg, interpret)
  o, S = _gated_delta(q, k, v, g, b, w, gamma, initial_state.astype(jnp.float32)
                      if initial_state.dtype != jnp.float64 else initial_state, static)
  return o[:, :T], S
