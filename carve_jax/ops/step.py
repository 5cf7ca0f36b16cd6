r"""One token of the gated delta-rule family, for decoding with a recurrent-state cache.

Per head, with state S in R^{K x V}:

    S' = (I - k (b * k)^T) Diag(exp g) S + k (w * v)^T,      o = S'^T (scale * q)

CARVE's erase gate is b = sigmoid(erase_logits + gamma_h * c), with c the content signal of the
state entering the token's content block: at a block start (pos % content_block == 0) c is
recomputed from S, otherwise the cached c is used. The products are those of
`recurrent.recurrent_gated_delta`, in the same order, so a loop of steps reproduces
`carve_jax.ops.gated_delta / carve(impl="recurrent")`.

Arrays are per token, head-major: q, k, g, b, erase_logits: [B, H, K]; v, w: [B, H, V];
beta: [B, H]; gamma: [H]; state: [B, H, K, V]; content: [B, H, K]; pos: int scalar or [B].
States and content stay float32 (float64 with float64 inputs); o comes back in q's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from carve_jax.ops import validate as vd
from carve_jax.ops.gates import content_erase_gate, content_signal
from carve_jax.ops.recurrent import delta_update


def _check_token(fn, state, q, k, v, g):
  vd.check_float(fn, "q", q, (None, None, None))
  B, H, K = q.shape
  vd.check_float(fn, "k", k, (B, H, K))
  vd.check_float(fn, "v", v, (B, H, None))
  vd.check_float(fn, "g", g, (B, H, K))
  vd.check_float(fn, "state", state, (B, H, K, v.shape[-1]))


def gated_delta_step(state, q, k, v, g, b, w, *, scale=None):
  """One token of the general gated delta rule (GDN-2 form; KDA/GDN with b, w = beta broadcast).

  Args:
    state: [B, H, K, V]; q, k: [B, H, K] (normalised by the caller); v: [B, H, V];
    g: log decay [B, H, K]; b: erase gate [B, H, K]; w: write gate [B, H, V].
    scale: output scale, default K^-1/2.

  Returns:
    (o [B, H, V] in q's dtype, new state [B, H, K, V] float32/float64).
  """
  fn = "gated_delta_step"
  _check_token(fn, state, q, k, v, g)
  vd.check_float(fn, "b", b, q.shape)
  vd.check_float(fn, "w", w, v.shape)
  vd.check_scale(fn, scale)
  dt = jnp.promote_types(jnp.result_type(q, k, v, g, b, w), jnp.float32)
  scale = q.shape[-1]**-0.5 if scale is None else float(scale)
  o, S = delta_update(state.astype(dt), *(x.astype(dt) for x in (q, k, v, g, b, w)), scale)
  return o.astype(q.dtype), S


def carve_step(state, content, pos, q, k, v, g, erase_logits, beta, gamma, *, content_block: int, scale=None):
  """One token of CARVE.

  Args:
    state: [B, H, K, V]; content: the cached content signal c of the current block [B, H, K].
    pos: the token's position (tokens seen before it), int scalar or [B]; a block starts where
      pos % content_block == 0 and c is then recomputed from `state`.
    q, k: [B, H, K]; v: [B, H, V]; g: log decay [B, H, K].
    erase_logits: W_b x, [B, H, K]; beta: write strength [B, H]; gamma: content weight [H].
    content_block: G, tokens per content block.
    scale: output scale, default K^-1/2.

  Returns:
    (o [B, H, V] in q's dtype, new state [B, H, K, V], content [B, H, K] to cache).
  """
  fn = "carve_step"
  _check_token(fn, state, q, k, v, g)
  B, H, K = q.shape
  vd.check_float(fn, "content", content, (B, H, K))
  vd.check_float(fn, "erase_logits", erase_logits, (B, H, K))
  vd.check_float(fn, "beta", beta, (B, H))
  vd.check_float(fn, "gamma", gamma, (H,))
  vd.check_positive_int(fn, "content_block", content_block)
  vd.check_scale(fn, scale)
  pos = jnp.asarray(pos)
  if not jnp.issubdtype(pos.dtype, jnp.integer) or pos.ndim > 1 or (pos.ndim == 1 and pos.shape[0] != B):
    raise ValueError(f"{fn}: argument `pos` must be an int scalar or int array of shape ({B},), "
                     f"got {pos.dtype} of shape {pos.shape}")
  dt = jnp.promote_types(jnp.result_type(q, k, v, g, erase_logits, beta, gamma), jnp.float32)
  scale = K**-0.5 if scale is None else float(scale)
  S = state.astype(dt)
  at_start = jnp.reshape(pos % content_block == 0, (-1, 1, 1))
  c = jnp.where(at_start, content_signal(S), content.astype(dt))
  b = content_erase_gate(erase_logits.astype(dt)[:, :, None], gamma.astype(dt), c, "stop")[:, :, 0]
  w = jnp.broadcast_to(beta.astype(dt)[..., None], v.shape)
  o, S = delta_update(S, *(x.astype(dt) for x in (q, k, v, g)), b, w, scale)
  return o.astype(q.dtype), S, c
