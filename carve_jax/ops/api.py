"""Public entry points of the gated delta-rule family and the one place an implementation is picked.

Argument convention follows flash-linear-attention (`fla.ops.gdn2.naive_recurrent_gdn2`):
inputs are time-major per head, [B, T, H, D]; q and k are NOT normalised here; `scale` defaults
to K^-1/2; states are [B, H, K, V] in float32 (float64 for float64 inputs).

Packed documents: `segment_ids` int [B, T] (a document begins where the id changes; the state
resets to zero there and CARVE's content blocks restart), or FLA's `cu_seqlens` int [N + 1] for
B = 1, converted to segment ids (`carve_jax.ops.segments`). Unlike FLA, `initial_state` stays
[B, H, K, V] and feeds each row's first document only; the final state is that of the last one.
Every implementation takes them (the Pallas kernels: per-token document masks, `pallas_kernels.segments`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from carve_jax.ops import validate as vd
from carve_jax.ops.chunk import chunk_gated_delta
from carve_jax.ops.recurrent import recurrent_gated_delta
from carve_jax.ops.segments import segment_ids_from_cu_seqlens
from carve_jax.ops.validate import ContentGrad, Impl, KernelBwd


def pallas_available() -> bool:
  """True when the default backend is a CUDA GPU and the Pallas kernels import."""
  if jax.default_backend() != "gpu":
    return False
  try:
    import pallas_kernels  # noqa: F401
  except ImportError:
    return False
  return True


def resolve_impl(impl: str, *, K: int | None = None, V: int | None = None, chunk_size: int | None = None,
                 dtype=None, content_grad: ContentGrad = "stop") -> str:
  """'auto' -> 'pallas' on a GPU where the kernels import and support the call, 'chunk' elsewhere.

  Given K, V, chunk_size and dtype, 'auto' also asks `pallas_kernels.supported` (power-of-two head
  sizes, 16-bit inputs) and keeps content_grad="full" on the chunk path; without them only the
  platform decides. Packed documents (segment ids) run on either.
  """
  if impl != "auto":
    return impl
  if not pallas_available() or content_grad != "stop":
    return "chunk"
  if K is None:
    return "pallas"
  from pallas_kernels import supported
  return "pallas" if supported(K=K, V=V, chunk_size=chunk_size, dtype=dtype) else "chunk"


def _compute_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _heads_first(*xs):
  return tuple(jnp.swapaxes(x, 1, 2) for x in xs)


def _run(fn, q, k, v, g, b, w, gamma, *, scale, initial_state, output_final_state, impl, chunk_size,
         content_block=None, content_grad="stop", segment_ids=None, kernel_bwd="kernels"):
  """Dispatches once. w is [B, T, H, V], or beta [B, T, H] for CARVE (gamma given).

  The references get head-major arrays in the compute dtype (float32, or float64 for float64
  inputs); the Pallas kernels get the public layout in the caller's dtype (bf16 stays bf16).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  dt = _compute_dtype(q, k, v, g, b, w, *(() if gamma is None else (gamma,)))
  S0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)
  scale = K**-0.5 if scale is None else float(scale)
  chunk_size = None if chunk_size is None else int(chunk_size)  # NumPy integers are accepted
  if T == 0:  # nothing to do (the chunked forms would divide by the number of chunks)
    return jnp.zeros((B, 0, H, V), q.dtype), (S0 if output_final_state else None)
  kw = dict(scale=scale, initial_state=S0, content_block=content_block, content_grad=content_grad)
  impl = resolve_impl(impl, K=K, V=V, chunk_size=chunk_size, dtype=q.dtype, content_grad=content_grad)
  if segment_ids is not None:
    kw["segment_ids"] = segment_ids
  vd.check_choice(fn, "kernel_bwd", kernel_bwd, vd.KERNEL_BWDS)
  if impl == "pallas":
    from pallas_kernels import pallas_gated_delta  # imported lazily: GPU (or interpret mode) only
    ref = None
    if kernel_bwd == "reference":  # the chunk path's VJP replaces the kernels' backward
      ref = functools.partial(_chunk_reference, dt=dt, chunk_size=chunk_size, scale=scale,
                              content_block=content_block, content_grad=content_grad)
    o, S = pallas_gated_delta(q, k, v, g, b, w, gamma, chunk_size=chunk_size, reference=ref, **kw)
  else:
    w = jnp.broadcast_to(w[..., None], v.shape) if w.ndim == 3 else w
    args = _heads_first(*(x.astype(dt) for x in (q, k, v, g, b, w)))
    gamma = None if gamma is None else gamma.astype(dt)
    match impl:
      case "recurrent":
        o, S = recurrent_gated_delta(*args, gamma, **kw)
      case "chunk":
        o, S = chunk_gated_delta(*args, gamma, chunk_size=chunk_size, **kw)
      case other:
        raise ValueError(f"{fn}: argument `impl` must be one of {vd.IMPLS}, got {other!r}")
    o = jnp.swapaxes(o, 1, 2)
  return o.astype(q.dtype), (S if output_final_state else None)


def _chunk_reference(q, k, v, g, b, w, gamma, S0, *, dt, chunk_size, scale, content_block, content_grad,
                     segment_ids=None):
  """The chunk path in the kernels' layout and dtypes: (o [B, T, H, V] in q's dtype, S [B, H, K, V])."""
  w = jnp.broadcast_to(w[..., None], v.shape) if w.ndim == 3 else w
  args = _heads_first(*(x.astype(dt) for x in (q, k, v, g, b, w)))
  o, S = chunk_gated_delta(*args, None if gamma is None else gamma.astype(dt), chunk_size=chunk_size, scale=scale,
                           initial_state=S0.astype(dt), content_block=content_block, content_grad=content_grad,
                           segment_ids=segment_ids)
  return jnp.swapaxes(o, 1, 2).astype(q.dtype), S.astype(S0.dtype)


def gated_delta(q, k, v, g, b, w, *, scale=None, initial_state=None, output_final_state=False,
                impl: Impl = "chunk", chunk_size: int = 64, segment_ids=None, cu_seqlens=None,
                kernel_bwd: KernelBwd = "kernels"):
  r"""The general gated delta rule (GDN-2 form; GDN and KDA are special cases).

      S_t = (I - k_t (b_t * k_t)^T) Diag(exp g_t) S_{t-1} + k_t (w_t * v_t)^T,   o_t = S_t^T (scale q_t)

  Args:
    q, k: queries and keys, [B, T, H, K] (not normalised here).
    v: values, [B, T, H, V].
    g: per-key-channel decay in natural-log space (g <= 0), [B, T, H, K].
    b: erase gate, [B, T, H, K]; w: write gate, [B, T, H, V].
    scale: output scale, default K^-1/2.
    initial_state: optional [B, H, K, V].
    output_final_state: also return the final state [B, H, K, V].
    impl: "recurrent" (token scan), "chunk" (WY form, pure JAX), "pallas" (GPU kernel), or "auto".
    chunk_size: tokens per chunk for "chunk"/"pallas"; any T works (padded inside).
    segment_ids: optional int [B, T], packed documents: the state resets to zero where the id
      changes (module docstring). cu_seqlens: optional int [N + 1] offsets for B = 1 instead.
    kernel_bwd: with the Pallas kernels, "kernels" (their backward) or "reference" (the chunk path's
      VJP at the same inputs: checks a suspect kernel gradient in place, at the chunk path's cost).

  Returns:
    (o [B, T, H, V] in q's dtype, final state or None).
  """
  fn = "gated_delta"
  _check_common(fn, q, k, v, g, initial_state, scale, impl)
  B, T, H, K = q.shape
  vd.check_float(fn, "b", b, (B, T, H, K))
  vd.check_float(fn, "w", w, v.shape)
  vd.check_positive_int(fn, "chunk_size", chunk_size)
  segment_ids = _segments(fn, segment_ids, cu_seqlens, B, T)
  return _run(fn, q, k, v, g, b, w, None, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, segment_ids=segment_ids,
              kernel_bwd=kernel_bwd)


def carve(q, k, v, g, erase_logits, beta, gamma, *, content_block: int = 64, content_grad: ContentGrad = "stop",
          scale=None, initial_state=None, output_final_state=False, impl: Impl = "chunk",
          chunk_size: int | None = None, segment_ids=None, cu_seqlens=None, kernel_bwd: KernelBwd = "kernels"):
  r"""CARVE: GDN-2 with a content-aware erase gate and a scalar write gate per head.

      b_t = sigmoid(erase_logits_t + gamma_h * c_n),   w_t = beta_t * 1_V
      c_n[i] = sqrt(mean_j S_{nG-1}[i, j]^2 + 1e-6)   (state entering content block n, G = content_block)

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; g: log decay [B, T, H, K].
    erase_logits: pre-activation of the erase gate, W_b x_t, [B, T, H, K].
    beta: write strength per token and head, in (0, 1), [B, T, H].
    gamma: content weight per head, [H] (0 at init: identical to GDN-2).
    content_block: G, tokens per content block (a model hyperparameter).
    content_grad: "stop" (no gradient through c into the state) or "full".
    chunk_size: kernel/chunk tile, must divide content_block; default content_block.
    segment_ids, cu_seqlens: packed documents as in `gated_delta`; content blocks are counted
      from each document's first token, whose block takes the zero state's signal sqrt(1e-6).
    scale, initial_state, output_final_state, impl, kernel_bwd: as in `gated_delta`.

  Returns:
    (o [B, T, H, V] in q's dtype, final state or None).
  """
  fn = "carve"
  _check_common(fn, q, k, v, g, initial_state, scale, impl)
  B, T, H, K = q.shape
  vd.check_float(fn, "erase_logits", erase_logits, (B, T, H, K))
  vd.check_float(fn, "beta", beta, (B, T, H))
  vd.check_float(fn, "gamma", gamma, (H,))
  vd.check_positive_int(fn, "content_block", content_block)
  vd.check_choice(fn, "content_grad", content_grad, vd.CONTENT_GRADS)
  chunk_size = content_block if chunk_size is None else chunk_size
  vd.check_positive_int(fn, "chunk_size", chunk_size)
  vd.check_divides(fn, "chunk_size", chunk_size, "content_block", content_block)
  segment_ids = _segments(fn, segment_ids, cu_seqlens, B, T)
  return _run(fn, q, k, v, g, erase_logits, beta, gamma, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, impl=impl, chunk_size=chunk_size,
              content_block=content_block, content_grad=content_grad, segment_ids=segment_ids,
              kernel_bwd=kernel_bwd)


def gdn(q, k, v, g, beta, **kwargs):
  """Gated DeltaNet: scalar decay g [B, T, H] and scalar beta [B, T, H] per token and head."""
  fn = "gdn"
  _check_qkv(fn, q, k, v)
  B, T, H, K = q.shape
  vd.check_float(fn, "g", g, (B, T, H))
  vd.check_float(fn, "beta", beta, (B, T, H))
  return kda(q, k, v, jnp.broadcast_to(g[..., None], q.shape), beta, **kwargs)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, impl: Impl = "chunk",
        chunk_size: int = 64, segment_ids=None, cu_seqlens=None, kernel_bwd: KernelBwd = "kernels"):
  """Kimi Delta Attention: per-channel decay g [B, T, H, K], scalar beta [B, T, H] (b = w = beta).

  The write gate goes to `_run` as beta itself: the kernels take a scalar write gate per token (no
  [B, T, H, V] broadcast is read), the references broadcast it."""
  fn = "kda"
  _check_common(fn, q, k, v, g, initial_state, scale, impl)
  vd.check_float(fn, "beta", beta, q.shape[:3])
  vd.check_positive_int(fn, "chunk_size", chunk_size)
  segment_ids = _segments(fn, segment_ids, cu_seqlens, *q.shape[:2])
  return _run(fn, q, k, v, g, jnp.broadcast_to(beta[..., None], q.shape), beta, None, scale=scale,
              initial_state=initial_state, output_final_state=output_final_state, impl=impl,
              chunk_size=chunk_size, segment_ids=segment_ids, kernel_bwd=kernel_bwd)


def _segments(fn, segment_ids, cu_seqlens, B, T):
  """The checked segment ids int32 [B, T] (from `cu_seqlens` when given), or None."""
  if segment_ids is not None and cu_seqlens is not None:
    raise ValueError(f"{fn}: arguments `segment_ids` and `cu_seqlens` are alternatives, got both")
  if cu_seqlens is not None:
    vd.check_cu_seqlens(fn, cu_seqlens, B, T)
    return segment_ids_from_cu_seqlens(cu_seqlens, T)
  if segment_ids is not None:
    vd.check_int(fn, "segment_ids", segment_ids, (B, T))
    return jnp.asarray(segment_ids, jnp.int32)
  return None


def _check_qkv(fn, q, k, v):
  vd.check_float(fn, "q", q, (None, None, None, None))
  B, T, H, K = q.shape
  vd.check_float(fn, "k", k, (B, T, H, K))
  vd.check_float(fn, "v", v, (B, T, H, None))


def _check_common(fn, q, k, v, g, initial_state, scale, impl):
  _check_qkv(fn, q, k, v)
  B, T, H, K = q.shape
  vd.check_float(fn, "g", g, (B, T, H, K))
  if initial_state is not None:
    vd.check_float(fn, "initial_state", initial_state, (B, H, K, v.shape[-1]))
  vd.check_scale(fn, scale)
  vd.check_choice(fn, "impl", impl, vd.IMPLS)
