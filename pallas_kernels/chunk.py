"""`pallas_gated_delta`: the Pallas chunk kernels of the family under one `jax.custom_vjp`.

Contract (called by `carve_jax.ops.api._run` for impl="pallas"): public layout, caller's dtype.
    q, k, g, b: [B, T, H, K]; v: [B, T, H, V]; w: [B, T, H, V], or beta [B, T, H] when gamma [H] is
    given (CARVE: b then holds the erase logits, gate = sigmoid(b + gamma_h c_n)).
    initial_state: [B, H, K, V] float32. Any T: padded inside with k = v = g = b = w = 0 tokens.
    segment_ids: optional int [B, T], packed documents (`segments.py`: per-token int inputs of the kernels).
Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32).

The forward (`forward.py`: chunk-parallel preparation, a sequential state pass, chunk-parallel
output) materialises the state entering every chunk ([B, H, T/C, K, V], the tensor FLA calls h),
V_new, CARVE's content signal, A = (I + L)^{-1}, Aqk, q e^G, Kd and G_C per chunk (`forward.Residuals`);
under differentiation these are the residuals of the backward (`backward.py`). `reference=` swaps the
kernels' backward for the VJP of a reference function (`carve_jax.ops`: `kernel_bwd="reference"`).
On a backend other than GPU the kernels run in Pallas interpret mode (CPU CI).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.backward import backward
from pallas_kernels.forward import forward
from pallas_kernels.config import DEFAULT, TuningConfig
from pallas_kernels.segments import segments


@dataclasses.dataclass(frozen=True)
class Static:
  """The custom_vjp's static (hashable) part.

  reference: None (the kernels' backward), or a function (q, k, v, g, b, w, gamma, S0) -> (o, S) in the
  kernels' layout whose VJP replaces the kernels' backward (`bwd="reference"`: a suspect kernel
  gradient can be checked in place; jax's attention op calls this `backward_pass_impl="xla"`); with
  packed documents it is also given `segment_ids=` (padded, [B, Tp]).
  Packed documents are not a static field: the `Segments` argument is None without them (an empty
  pytree: the unpacked kernels are traced exactly as before), int arrays with them."""
  scale: float
  chunk_size: int
  content_block: int | None
  config: TuningConfig
  interpret: bool
  reference: Callable | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _gated_delta(q, k, v, g, b, w, gamma, S0, seg, static):
  # the primal (no backward follows): the Mosaic loop need not write the backward's W
  primal = dataclasses.replace(static, config=dataclasses.replace(static.config, mosaic_w=False))
  (o, S), _ = _gated_delta_fwd(q, k, v, g, b, w, gamma, S0, seg, primal)
  return o, S


def _gated_delta_fwd(q, k, v, g, b, w, gamma, S0, seg, static: Static):
  o, S, res = forward(q, k, v, g, b, w, gamma, S0, seg, scale=static.scale, chunk_size=static.chunk_size,
                      content_block=static.content_block, cfg=static.config, interpret=static.interpret)
  return (o, S), (q, k, v, g, b, w, gamma, S0, seg, None if static.reference is not None else res)


def _gated_delta_bwd(static: Static, res, cts):
  q, k, v, g, b, w, gamma, S0, seg, fres = res
  if static.reference is not None:
    ref = static.reference if seg is None else functools.partial(static.reference, segment_ids=seg.ids)
    return jax.vjp(ref, q, k, v, g, b, w, gamma, S0)[1](cts) + (None,)
  do, dsf = cts
  grads = backward(q, k, v, g, b, w, gamma, seg, fres, do, dsf, scale=static.scale, chunk_size=static.chunk_size,
                   cfg=static.config, interpret=static.interpret)
  return grads[:7] + (grads[7].astype(S0.dtype), None)


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
                       content_grad="stop", segment_ids=None, config: TuningConfig | None = None,
                       reference: Callable | None = None):
  """(o [B, T, H, V], final state [B, H, K, V] float32) of the gated delta rule; see the module doc.

  segment_ids: optional int [B, T], packed documents: the state resets to zero where the id changes and
  CARVE's content blocks restart there (`segments.py`; the math of `carve_jax.ops.chunk`).
  reference: optional (q, k, v, g, b, w, gamma, S0[, segment_ids=]) -> (o, S) on the padded inputs, whose
  VJP is used instead of the kernels' backward (`Static.reference`)."""
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
  static = Static(scale=float(scale), chunk_size=int(chunk_size),
                  content_block=None if gamma is None else int(content_block), config=cfg,
                  interpret=jax.default_backend() != "gpu", reference=reference)
  seg = None if segment_ids is None else segments(segment_ids, Tp=T + pad, chunk_size=chunk_size,
                                                   content_block=static.content_block)
  o, S = _gated_delta(q, k, v, g, b, w, gamma, initial_state.astype(jnp.float32)
                      if initial_state.dtype != jnp.float64 else initial_state, seg, static)
  return o[:, :T], S
