r"""Token-by-token reference for the gated delta-rule family: the slow ground truth.

Per head, with state S_t in R^{K x V} (key axis = rows), D_t = Diag(exp g_t):

    S_t = (I - k_t (b_t * k_t)^T) D_t S_{t-1} + k_t (w_t * v_t)^T
    o_t = S_t^T (scale * q_t)

Collapse rules: b_t = w_t = beta_t (a scalar per token) gives KDA; KDA with g_t constant across
the K channels gives Gated DeltaNet (GDN). CARVE is GDN-2 with w_t = beta_t * 1_V and
b_t = sigmoid(erase_logits_t + gamma_h * c_n), c_n the content signal of `gates.py` taken from the
state entering content block n = t // content_block.

Packed documents (`segment_ids`, see `segments.py`): before a token that starts a document the
state is reset to zero, and CARVE's content blocks are counted from the document's first token
(block start where the position inside the document is a multiple of content_block; at a start
the signal comes from the zero state, c = sqrt(1e-6)).

The value-axis-erase (VAE) variant, for the proofs only, erases per value column instead:

    S_t = D_t S_{t-1} - k_t k_t^T D_t S_{t-1} Diag(e_t) + k_t (w_t * v_t)^T

All arrays here are head-major and already in the compute dtype:
q, k, g, b: [B, H, T, K]; v, w, e: [B, H, T, V]; state: [B, H, K, V]; gamma: [H] or None.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from carve_jax.ops.gates import content_erase_gate, content_signal
from carve_jax.ops.segments import document_positions, document_starts

_HI = jax.lax.Precision.HIGHEST


def delta_update(S, q, k, v, g, b, w, scale):
  """One token of the rule. S: [B, H, K, V]; q, k, g, b: [B, H, K]; v, w: [B, H, V].

  Returns (o [B, H, V], S' [B, H, K, V]).
  """
  S = jnp.exp(g)[..., None] * S
  erase = jnp.einsum("bhk,bhkv->bhv", b * k, S, precision=_HI)
  S = S + k[..., None] * (w * v - erase)[..., None, :]
  return jnp.einsum("bhk,bhkv->bhv", scale * q, S, precision=_HI), S


def _time_major(*xs):
  return tuple(jnp.moveaxis(x, 2, 0) for x in xs)


def recurrent_gated_delta(q, k, v, g, b, w, gamma, *, scale, initial_state, content_block=None,
                          content_grad="stop", segment_ids=None):
  """Returns (o [B, H, T, V], final state [B, H, K, V]).

  With gamma=None, b is the erase gate in (0, 1). With gamma given (CARVE), b holds the erase
  logits and the gate is recomputed from the state snapshot taken every `content_block` tokens
  (of the document, with `segment_ids` int [B, T]; the state is reset at each document start).
  """
  B, H, T, K = q.shape
  c0 = jnp.zeros((B, H, K), initial_state.dtype)
  if segment_ids is None:
    starts = jnp.zeros((T, B), bool)
    pos = jnp.broadcast_to(jnp.arange(T)[:, None], (T, B))
  else:
    starts, pos = document_starts(segment_ids).T, document_positions(segment_ids).T

  def step(carry, x):
    S, c = carry
    qt, kt, vt, gt, bt, wt, start, p = x
    if segment_ids is not None:
      S = jnp.where(start[:, None, None, None], jnp.zeros_like(S), S)
    if gamma is not None:
      c = jnp.where((p % content_block == 0)[:, None, None], content_signal(S), c)
      bt = content_erase_gate(bt[:, :, None], gamma, c, content_grad)[:, :, 0]
    o, S = delta_update(S, qt, kt, vt, gt, bt, wt, scale)
    return (S, c), o

  xs = _time_major(q, k, v, g, b, w) + (starts, pos)
  (S, _), o = jax.lax.scan(step, (initial_state, c0), xs)
  return jnp.moveaxis(o, 0, 2), S


def recurrent_value_axis_erase(q, k, v, g, e, w, *, scale, initial_state):
  """The VAE recurrence (proofs and ablations only; no chunk form exists for it).

  Returns (o [B, H, T, V], final state [B, H, K, V]).
  """

  def step(S, x):
    qt, kt, vt, gt, et, wt = x
    S = jnp.exp(gt)[..., None] * S
    kS = jnp.einsum("bhk,bhkv->bhv", kt, S, precision=_HI)
    S = S - kt[..., None] * (kS * et)[..., None, :] + kt[..., None] * (wt * vt)[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", scale * qt, S, precision=_HI)
    return S, o

  S, o = jax.lax.scan(step, initial_state, _time_major(q, k, v, g, e, w))
  return jnp.moveaxis(o, 0, 2), S
