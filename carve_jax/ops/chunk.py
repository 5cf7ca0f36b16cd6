r"""The WY chunk form of the gated delta rule in pure JAX: the CPU/TPU path and gradient reference.

Per chunk of C tokens entering with state S_in, with in-chunk cumulative decay
G_r = sum_{s<=r} g_s (per key channel, log space) and Gamma[r, c] = exp(G_r - G_c) for r >= c:

    L      = StrictLower[ sum_i (b k)_r[i] k_c[i] Gamma[r, c, i] ]         (C x C)
    A      = (I + L)^{-1}                                                 (unit lower triangular)
    W      = A (b * k * e^G),   U = A (w * v)
    V_new  = U - W S_in
    S_out  = Diag(e^{G_C}) S_in + (k * e^{G_C - G})^T V_new
    O      = scale [ (q * e^G) S_in + Lower[ sum_i q_r[i] k_c[i] Gamma[r, c, i] ] V_new ]

The in-chunk decays exp(G_r - G_c) are never formed as exp(G_r) * exp(-G_c), which overflows for
strong decay: `decayed_products` factors them through a point between r and c (sub-blocks of 16)
so every exponential has a non-positive exponent, and nothing overflows however strong the decay.
Every other exponent used is <= 0 as well. The state is kept in
float32 (float64 for float64 inputs).

Chunks are processed by one `lax.scan`; all per-chunk work sits in its body so that CARVE, whose
erase gate depends on the state entering each content block, and GDN-2 run the very same
arithmetic (gamma = 0 is bit-identical to GDN-2). The body is rematerialised in the backward
pass (`jax.checkpoint`), so memory holds one state per chunk, not every intermediate.

Packed documents (`segment_ids`, see `segments.py`) reset the state exactly, as if the decay were
-inf across a boundary but without infinities: with d_r the number of document starts at chunk
positions <= r, the pairwise terms L and Lower[q k Gamma] are kept only where d_r = d_c, the
state entering the chunk reaches only the rows with d_r = 0 (e^G is masked to 0 elsewhere), and
S_out sums only the tokens of the chunk's last document (plus e^{G_C} S_in when no start lies in
the chunk). Within one document the plain cumulative G gives the right decays. CARVE's content
blocks restart at each document start, so a block can begin inside a chunk; since the chunk size
divides G, at most one block per chunk begins inside it away from a document start (a
document's blocks are G >= C apart), at position j. Such chunks run as two masked passes,
tokens < j then tokens >= j, the second entering with the state at j and its content signal;
the blocks that begin at a document start take the zero state's signal, sqrt(1e-6). Without
segment ids nothing of this runs.

Layout: head-major, already in the compute dtype. q, k, g, b: [B, H, T, K]; v, w: [B, H, T, V];
initial_state: [B, H, K, V]; gamma: [H] or None (then b is the gate itself, else its logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from carve_jax.ops.gates import content_erase_gate, content_signal
from carve_jax.ops.segments import document_starts, positions_from_starts

_HI = jax.lax.Precision.HIGHEST


def decayed_products(xs, k, G, block: int = 16):
  """M_x[r, c] = sum_i x[r, i] k[c, i] exp(G[r, i] - G[c, i]) for r >= c, 0 above, for each x in xs.

  xs: tuple of [..., C, K]; k, G: [..., C, K] (G non-increasing along C) -> tuple of [..., C, C].
  Exact and overflow-free: for a row r in sub-block i > j and a column c in sub-block j, the decay
  factors through G_e, the last position of sub-block j (G_c >= G_e >= G_r), as
  exp(G_r - G_e) * exp(G_e - G_c), both <= 1, so the off-diagonal blocks are matmuls; the diagonal
  sub-blocks are formed pairwise, exp(G_r - G_c) for r >= c. Cost: (C/block + 1) C K exponentials
  and block C K pairwise products instead of C^2 K.
  """
  C, K = G.shape[-2:]
  s = block if C % block == 0 else C
  n = C // s
  lead = G.shape[:-2]
  Gb, kb = G.reshape(*lead, n, s, K), k.reshape(*lead, n, s, K)
  G_end = Gb[..., :, -1, :]                                           # [..., n, K]
  after = (jnp.arange(C) // s)[None, :] > jnp.arange(n)[:, None]      # [n, C]: row r lies past block j
  left = jnp.exp(jnp.where(after[:, :, None], G[..., None, :, :] - G_end[..., :, None, :], 0.0))
  right = kb * jnp.exp(G_end[..., :, None, :] - Gb)                   # [..., n, s, K], factors <= 1
  lower = jnp.tril(jnp.ones((s, s), bool))[:, :, None]
  diag_decay = jnp.where(lower, jnp.exp(jnp.where(lower, Gb[..., :, :, None, :] - Gb[..., :, None, :, :], 0.0)), 0.0)
  off_mask = after.T.reshape(n, s, n, 1)                              # [n_r, s, n_c, 1]
  eye = jnp.eye(n, dtype=G.dtype)
  out = []
  for x in xs:
    off = jnp.einsum("...jrk,...jck->...rjc", x[..., None, :, :] * left, right, precision=_HI).reshape(
        *lead, n, s, n, s)
    diag = jnp.einsum("...nrk,...nck,...nrck->...nrc", x.reshape(*lead, n, s, K), kb, diag_decay, precision=_HI)
    full = jnp.where(off_mask, off, 0.0) + jnp.einsum("...nrc,nm->...nrmc", diag, eye)
    out.append(full.reshape(*lead, C, C))
  return tuple(out)


@jax.custom_jvp
def unit_lower_inverse(L: jax.Array) -> jax.Array:
  """A = (I + L)^-1 for strictly lower-triangular L [..., C, C]; A is unit lower triangular.

  On the CPU by forward substitution, row r of A = e_r - L[r, :] A (C steps of batched
  vector-matrix products): XLA:CPU's batched triangular_solve took ~250 ms for 32 matrices of
  64 x 64 where this takes ~0.6 ms, with identical results. Elsewhere the platform's
  triangular solve. Differentiated by dA = -A dL A, so nothing of the loop is stored.
  """
  C = L.shape[-1]
  eye = jnp.eye(C, dtype=L.dtype)

  def forward_substitution(L):
    row = lambda r, A: A.at[..., r, :].set(eye[r] - jnp.einsum("...c,...cd->...d", L[..., r, :], A, precision=_HI))
    return jax.lax.fori_loop(0, C, row, jnp.zeros_like(L))

  def solve(L):
    return jax.lax.linalg.triangular_solve(L + eye, jnp.broadcast_to(eye, L.shape), left_side=True, lower=True,
                                           unit_diagonal=True)

  return jax.lax.platform_dependent(L, cpu=forward_substitution, default=solve)


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
  A = unit_lower_inverse(primals[0])
  # HIGHEST: under the default precision these two matmuls (and their transposes in the VJP) ran in TF32
  # on the GPU, and every gradient through A (erase logits, gamma, b) was only ~3e-4 accurate.
  return A, -jnp.matmul(jnp.matmul(A, tangents[0], precision=_HI), A, precision=_HI)


def chunk_step(q, k, v, g, b, w, S, *, scale, doc=None):
  """One chunk of the WY form. q, k, g, b: [B, H, C, K]; v, w: [B, H, C, V]; S: [B, H, K, V].

  doc: optional int [B, C], the number of document starts at chunk positions <= r (0 = the
  document the chunk entered in); pairs in different documents are masked and S reaches only
  document 0 (the exact reset, see the module docstring).

  Returns (O [B, H, C, V], S_out [B, H, K, V]).
  """
  C = q.shape[-2]
  G = jnp.cumsum(g, axis=-2)
  L, Aqk = decayed_products((b * k, q), k, G)
  L = L * jnp.tril(jnp.ones((C, C), q.dtype), -1)
  eG = jnp.exp(G)
  G_last = G[..., -1:, :]
  decay_in = jnp.exp(G_last[..., 0, :])[..., None]                            # [B, H, K, 1]
  eG_in, k_out = eG, k
  if doc is not None:
    same = (doc[:, None, :, None] == doc[:, None, None, :]).astype(q.dtype)    # [B, 1, C, C]
    L, Aqk = L * same, Aqk * same
    eG_in = eG * (doc == 0)[:, None, :, None].astype(q.dtype)
    k_out = k * (doc == doc[:, -1:])[:, None, :, None].astype(q.dtype)
    decay_in = decay_in * (doc[:, -1] == 0)[:, None, None, None].astype(q.dtype)
  A = unit_lower_inverse(L)
  W = jnp.einsum("bhrc,bhck->bhrk", A, b * k * eG_in, precision=_HI)
  U = jnp.einsum("bhrc,bhcv->bhrv", A, w * v, precision=_HI)
  V_new = U - jnp.einsum("bhck,bhkv->bhcv", W, S, precision=_HI)
  S_out = decay_in * S + jnp.einsum(
      "bhck,bhcv->bhkv", k_out * jnp.exp(G_last - G), V_new, precision=_HI)
  O = scale * (jnp.einsum("bhck,bhkv->bhcv", q * eG_in, S, precision=_HI)
               + jnp.einsum("bhrc,bhcv->bhrv", Aqk, V_new, precision=_HI))
  return O, S_out


def chunk_gated_delta(q, k, v, g, b, w, gamma, *, scale, initial_state, chunk_size, content_block=None,
                      content_grad="stop", segment_ids=None):
  """Returns (o [B, H, T, V], final state [B, H, K, V]); any T (padded inside).

  Padding tokens have k = v = b = w = g = 0, so they leave the state unchanged. A chunk_size far
  above T is halved while it stays >= T (it then still divides content_block): the same result, less
  padding. T = 0 returns an empty output and the initial state.
  segment_ids: optional int [B, T], packed documents (reset at each start, see the module docstring).
  """
  B, H, T, K = q.shape
  if T == 0:
    return jnp.zeros((B, H, 0, v.shape[-1]), q.dtype), initial_state
  C = int(chunk_size)
  while C % 2 == 0 and C // 2 >= T:
    C //= 2
  N = -(-T // C)
  pad = N * C - T

  def chunks(x):  # [B, H, T, D] -> [N, B, H, C, D]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return jnp.moveaxis(x.reshape(B, H, N, C, x.shape[-1]), 2, 0)

  c0 = jnp.zeros((B, H, K), initial_state.dtype)
  xs = tuple(chunks(x) for x in (q, k, v, g, b, w))
  if segment_ids is None:

    @jax.checkpoint
    def body(carry, x):
      S, c = carry
      qc, kc, vc, gc, bc, wc, n = x
      if gamma is not None:
        c = jnp.where((n * C) % content_block == 0, content_signal(S), c)
        bc = content_erase_gate(bc, gamma, c, content_grad)
      O, S = chunk_step(qc, kc, vc, gc, bc, wc, S, scale=scale)
      return (S, c), O

    xs = xs + (jnp.arange(N),)
  else:
    starts = jnp.pad(document_starts(segment_ids), ((0, 0), (0, pad)))          # [B, N C]
    pos = positions_from_starts(starts)      # padding continues the last document
    per_chunk = lambda x: jnp.moveaxis(x.reshape(B, N, C), 1, 0)              # [N, B, C]
    xs = xs + (per_chunk(starts), per_chunk(pos))
    body = jax.checkpoint(_packed_body(gamma, scale=scale, content_block=content_block,
                                       content_grad=content_grad))
  (S, _), O = jax.lax.scan(body, (initial_state, c0), xs)
  O = jnp.moveaxis(O, 0, 2).reshape(B, H, N * C, -1)[:, :, :T]
  return O, S


def _packed_body(gamma, *, scale, content_block, content_grad):
  """The scan body over chunks with document starts `st` and in-document positions `pos`, [B, C]."""

  def doc_of(st):
    return jnp.cumsum(st, axis=-1, dtype=jnp.int32)

  def gdn_body(carry, x):
    S, c = carry
    qc, kc, vc, gc, bc, wc, st, _ = x
    O, S = chunk_step(qc, kc, vc, gc, bc, wc, S, scale=scale, doc=doc_of(st))
    return (S, c), O

  def gate(logits, c_tok):  # logits [B, H, C, K], c_tok [B, H, C, K] -> sigmoid(logits + gamma c)
    if content_grad == "stop":
      c_tok = jax.lax.stop_gradient(c_tok)
    return jax.nn.sigmoid(logits + gamma[:, None, None] * c_tok)

  def carve_body(carry, x):
    S, c_prev = carry
    qc, kc, vc, gc, lc, wc, st, pos = x
    C = st.shape[-1]
    r = jnp.arange(C)
    block = pos % content_block == 0                                  # a content block begins at r
    last_block = jax.lax.cummax(jnp.where(block, r, -1), axis=1)      # [B, C], -1: none in the chunk yet
    mid = block & ~st & (r > 0)                                        # at most one per row
    j = jnp.where(mid.any(-1), jnp.argmax(mid, axis=-1), C)[:, None]    # [B, 1]
    from_zero = jnp.take_along_axis(st, jnp.maximum(last_block, 0), axis=-1) & (last_block >= 0)
    c_zero = content_signal(jnp.zeros_like(S))
    c_in = content_signal(S)
    sel = lambda m: m[:, None, :, None]                                # [B, C] -> [B, 1, C, 1]

    def masked_pass(active, S_enter, c_tok):
      keep = sel(active).astype(kc.dtype)
      O, S_exit = chunk_step(qc, kc * keep, vc * keep, gc * keep, gate(lc, c_tok), wc, S_enter, scale=scale,
                             doc=doc_of(st & active))
      return O, S_exit

    # Pass 1, tokens before j: blocks carried in, begun at chunk position 0, or at a document start.
    c1 = jnp.where(sel(last_block < 0), c_prev[:, :, None, :],
                   jnp.where(sel(from_zero), c_zero[:, :, None, :], c_in[:, :, None, :]))
    first = r[None] < j
    O1, S_mid = masked_pass(first, S, c1)
    # Pass 2, tokens from j on: the block begun at j (signal of the state there) or at a start.
    c_mid = content_signal(S_mid)
    c2 = jnp.where(sel(from_zero), c_zero[:, :, None, :], c_mid[:, :, None, :])
    O2, S_out = masked_pass(~first, S_mid, c2)
    c_tok = jnp.where(sel(first), c1, c2)
    return (S_out, c_tok[:, :, -1]), jnp.where(sel(first), O1, O2)

  return gdn_body if gamma is None else carve_body
