r"""The WY chunk form of the gated delta rule in pure JAX: the CPU/TPU path and gradient reference.

Per chunk of C tokens entering with state S_in, with in-chunk cumulative decay
G_r = sum_{s<=r} g_s (per key channel, log space) and Gamma[r, c] = exp(G_r - G_c) for r >= c:

    L      = StrictLower[ sum_i (b k)_r[i] k_c[i] Gamma[r, c, i] ]         (C x C)
    A      = (I + L)^{-1}                                                 (unit lower triangular)
    W      = A (b * k * e^G),   U = A (w * v)
    V_new  = U - W S_in
    S_out  = Diag(e^{G_C}) S_in + (k * e^{G_C - G})^T V_new
    O      = scale [ (q * e^G) S_in + Lower[ sum_i q_r[i] k_c[i] Gamma[r, c, i] ] V_new ]

The in-chunk decays are formed pairwise, exp(G_r - G_c) with r >= c (exponent <= 0), instead of
as exp(G_r) * exp(-G_c): nothing overflows however strong the decay, at the cost of a [C, C, K]
elementwise product per chunk. Every other exponent used is <= 0 as well. The state is kept in
float32 (float64 for float64 inputs).

Chunks are processed by one `lax.scan`; all per-chunk work sits in its body so that CARVE, whose
erase gate depends on the state entering each content block, and GDN-2 run the very same
arithmetic (gamma = 0 is bit-identical to GDN-2). The body is rematerialised in the backward
pass (`jax.checkpoint`), so memory holds one state per chunk, not every intermediate.

Layout: head-major, already in the compute dtype. q, k, g, b: [B, H, T, K]; v, w: [B, H, T, V];
initial_state: [B, H, K, V]; gamma: [H] or None (then b is the gate itself, else its logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from carve_jax.ops.gates import content_erase_gate, content_signal

_HI = jax.lax.Precision.HIGHEST


def _pairwise_decay(G: jax.Array) -> jax.Array:
  """Gamma[..., r, c, i] = exp(G[r, i] - G[c, i]) for r >= c, else 0. G: [..., C, K] -> [..., C, C, K]."""
  C = G.shape[-2]
  lower = jnp.tril(jnp.ones((C, C), bool))[..., None]
  diff = G[..., :, None, :] - G[..., None, :, :]
  return jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)


def chunk_step(q, k, v, g, b, w, S, *, scale):
  """One chunk of the WY form. q, k, g, b: [B, H, C, K]; v, w: [B, H, C, V]; S: [B, H, K, V].

  Returns (O [B, H, C, V], S_out [B, H, K, V]).
  """
  C = q.shape[-2]
  G = jnp.cumsum(g, axis=-2)
  Gamma = _pairwise_decay(G)
  strict = jnp.tril(jnp.ones((C, C), q.dtype), -1)
  L = jnp.einsum("bhrk,bhck,bhrck->bhrc", b * k, k, Gamma, precision=_HI) * strict
  Aqk = jnp.einsum("bhrk,bhck,bhrck->bhrc", q, k, Gamma, precision=_HI)
  eG = jnp.exp(G)
  I_plus_L = L + jnp.eye(C, dtype=q.dtype)
  solve = lambda rhs: jax.lax.linalg.triangular_solve(I_plus_L, rhs, left_side=True, lower=True,
                                                      unit_diagonal=True)
  W = solve(b * k * eG)
  U = solve(w * v)
  V_new = U - jnp.einsum("bhck,bhkv->bhcv", W, S, precision=_HI)
  G_last = G[..., -1:, :]
  S_out = jnp.exp(G_last[..., 0, :])[..., None] * S + jnp.einsum(
      "bhck,bhcv->bhkv", k * jnp.exp(G_last - G), V_new, precision=_HI)
  O = scale * (jnp.einsum("bhck,bhkv->bhcv", q * eG, S, precision=_HI)
               + jnp.einsum("bhrc,bhcv->bhrv", Aqk, V_new, precision=_HI))
  return O, S_out


def chunk_gated_delta(q, k, v, g, b, w, gamma, *, scale, initial_state, chunk_size, content_block=None,
                      content_grad="stop"):
  """Returns (o [B, H, T, V], final state [B, H, K, V]); any T (padded inside).

  Padding tokens have k = v = b = w = g = 0, so they leave the state unchanged.
  """
  B, H, T, K = q.shape
  C = chunk_size
  N = -(-T // C)
  pad = N * C - T

  def chunks(x):  # [B, H, T, D] -> [N, B, H, C, D]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return jnp.moveaxis(x.reshape(B, H, N, C, x.shape[-1]), 2, 0)

  @jax.checkpoint
  def body(carry, x):
    S, c = carry
    qc, kc, vc, gc, bc, wc, n = x
    if gamma is not None:
      c = jnp.where((n * C) % content_block == 0, content_signal(S), c)
      bc = content_erase_gate(bc, gamma, c, content_grad)
    O, S = chunk_step(qc, kc, vc, gc, bc, wc, S, scale=scale)
    return (S, c), O

  c0 = jnp.zeros((B, H, K), initial_state.dtype)
  xs = tuple(chunks(x) for x in (q, k, v, g, b, w)) + (jnp.arange(N),)
  (S, _), O = jax.lax.scan(body, (initial_state, c0), xs)
  O = jnp.moveaxis(O, 0, 2).reshape(B, H, N * C, -1)[:, :, :T]
  return O, S
