r"""In-chunk math shared by the Pallas kernels: whole-chunk tiles, exact decay, the unit-lower inverse.

Everything here is a pure function of arrays, called inside kernels (and usable outside them). One
chunk of C tokens (C a power of two >= 16) is one tile: q, k, bk = b * k and the in-chunk cumulative
log decay G = cumsum(g) are [C, K]; the pairwise matrices are [C, C]:

    Aqk_rc = sum_i q_r[i] k_c[i] exp(G_r[i] - G_c[i])      (r >= c)
    L_rc   = sum_i bk_r[i] k_c[i] exp(G_r[i] - G_c[i])     (r >  c)

Exact decay without overflow (`Decay`): exp(G_r - G_c) is never formed per pair. Rows are split in
groups of 16 (`DECAY_GROUP`), and each matrix is a sum of 1 + log2(C/16) full-tile matmuls (C rows:
wgmma on Hopper), each with one row factor, one column factor and a mask:
  - the diagonal part: every row relative to the mid value m of its own group, factors clamped at
    e^80 and the product kept only inside the group's 16 x 16 block (exact unless a channel decays
    by more than e^-160 within 16 tokens);
  - level l (blocks of s = 16 * 2^l rows, in sibling pairs): rows of each odd block against the
    columns of the even block before it, relative to G at that even block's last row, so the row
    factor exp(G_r - G_ref) and the column factor exp(G_ref - G_c) are both <= 1 (zero outside the
    odd / even blocks; the mask drops the products of different pairs).
Every pair of 16-row groups (row group > column group) falls in exactly one level. The references
cancel in every product, so gradients treat them as constants.

(I + L)^{-1} (`block_unit_lower_inv`): the 16 x 16 diagonal blocks by the doubling product
(I + N)(I + N^2)(I + N^4)(I + N^8), N = -L_d, then merged: (I + L)^{-1} = sum_m (-D L_o)^m D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CONTENT_EPS = 1e-6  # = carve_jax.ops.gates.CONTENT_EPS (checked by the tests)
DECAY_GROUP = 16    # rows sharing one decay reference
_CLAMP = 80.0
F32 = jnp.float32

TF32 = "tf32"      # float32 operands, one TF32 tensor-core pass (~1e-3 relative)
TF32X3 = "tf32x3"  # float32 operands, three TF32 passes (~float32 accuracy)


def mm(a, b, dt, trans_a=False, trans_b=False):
  """a @ b (a^T / b^T as asked), float32 accumulation (float64 for float64 operands).

  dt: operand dtype (bf16: one bf16 pass; float32/float64: exact), or TF32 / TF32X3 (float32
  operands on tensor cores). In Pallas interpret mode TF32 modes compute exact float32 products.
  """
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  if dt == TF32X3:
    prec, dt = lax.DotAlgorithmPreset.TF32_TF32_F32_X3, F32
  elif dt == TF32:
    prec, dt = lax.Precision.DEFAULT, F32
  else:
    prec = None if dt == jnp.bfloat16 else lax.Precision.HIGHEST
  return lax.dot_general(a.astype(dt), b.astype(dt), dims, precision=prec,
                         preferred_element_type=jnp.float64 if dt == jnp.float64 else F32)


def iota(n, m, axis):
  return lax.broadcasted_iota(jnp.int32, (n, m), axis)


def row_of(x, r):
  """Row r of x [n, K] as a [K] vector (a masked reduction: no dynamic slicing in Triton)."""
  return jnp.sum(jnp.where(iota(x.shape[0], 1, 0) == r, x, 0.0), axis=0)


def revcumsum(x):
  """Reverse cumulative sum over rows: out_t = sum_{r >= t} x_r (Triton lowers only forward cumsum)."""
  return jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x


def content_signal(S):
  """Row RMS of the state [K, V] -> [K] (CARVE's c)."""
  return jnp.sqrt(jnp.mean(S * S, axis=1) + CONTENT_EPS)


def unit_lower_inv(L, dt, order=None):
  """(I + L)^{-1} for strictly lower L [n, n]: (I + N)(I + N^2)(I + N^4)... with N = -L (exact: N^order
  = 0; `order` a power of two, default n). Rounding grows with the entries of the powers of L, at most
  C(order - 1, order/2 - 1) max|L| (6435 for order 16 with |L| <= 1: unit keys, gates in (0, 1))."""
  n = L.shape[0]
  order = n if order is None else order
  P = -L
  A = jnp.where(iota(n, n, 0) == iota(n, n, 1), 1.0, 0.0).astype(L.dtype) + P
  steps = max(order.bit_length() - 2, 0)  # m = 2, 4, ... < order

  def step(_, PA):  # a rolled loop: one copy of the body in the kernel (instruction-cache bound otherwise)
    P, A = PA
    P = mm(P, P, dt)
    return P, A + mm(A, P, dt)
  return lax.fori_loop(0, steps, step, (P, A))[1] if steps else A


def block_unit_lower_inv(L, dt, group=DECAY_GROUP):
  """(I + L)^{-1} for strictly lower L [n, n]: I + L = (I + L_d)(I + D L_o) with L_d the diagonal
  group x group blocks and D = (I + L_d)^{-1}, so (I + L)^{-1} = sum_{m < n/group} (-D L_o)^m D."""
  n = L.shape[0]
  if n <= group:
    return unit_lower_inv(L, dt)
  same = iota(n, n, 0) // group == iota(n, n, 1) // group
  D = unit_lower_inv(jnp.where(same, L, 0.0), dt, order=group)
  P = -mm(D, jnp.where(same, 0.0, L), dt)

  def step(_, TA):
    term, A = TA
    term = mm(P, term, dt)
    return term, A + term
  return lax.fori_loop(0, n // group - 1, step, (D, D))[1]


class Decay:
  """The factors of exp(G_r - G_c) for one chunk, G [C, K] (see the module docstring).

  `parts()` yields (row factor, column factor, mask) for 1 + log2(C/16) parts; a part's products
  are kept where its [C, C] mask holds (mask None: everywhere, the factors are zero elsewhere).
  """

  def __init__(self, G):
    C = G.shape[0]
    self.G, self.C, self.ng = G, C, C // DECAY_GROUP
    self.rows = iota(C, 1, 0)
    self.Gend = [row_of(G, DECAY_GROUP * (h + 1) - 1) for h in range(self.ng)]
    self.Gprev = [jnp.zeros_like(self.Gend[0])] + self.Gend[:-1]
    self.GC = self.Gend[-1]

  def _per_row(self, size, vecs):
    """[C, K] tensor whose rows in block m of `size` rows are vecs[m] [K]."""
    out = jnp.zeros_like(self.G)
    for m, v in enumerate(vecs):
      out = jnp.where(self.rows // size == m, v[None, :], out)
    return out

  def parts(self):
    """Diagonal part: the 16 x 16 blocks, each relative to its group's mid value (clamped at e^80).
    Level l (block size s = 16 * 2^l): rows in the odd block of each pair of sibling blocks against
    columns in the even one, relative to G at the even block's last row (both factors <= 1)."""
    G, C, gs = self.G, self.C, DECAY_GROUP
    masks = part_masks(C)
    M = self._per_row(gs, [0.5 * (p + e) for p, e in zip(self.Gprev, self.Gend)])
    yield jnp.exp(jnp.minimum(G - M, _CLAMP)), jnp.exp(jnp.minimum(M - G, _CLAMP)), masks[0]
    s, level = gs, 1
    while s < C:
      ref = self._per_row(2 * s, [self.Gend[(2 * m + 1) * s // gs - 1] for m in range(C // (2 * s))])
      odd = (self.rows // s) % 2 == 1
      rf = jnp.where(odd, jnp.exp(jnp.minimum(G - ref, 0.0)), 0.0)
      cf = jnp.where(odd, 0.0, jnp.exp(jnp.minimum(ref - G, 0.0)))
      yield rf, cf, masks[level]
      s, level = 2 * s, level + 1

  def pairs(self, As, b, dt):
    """[M(a, b) for a in As], M_rc = sum_i a_r[i] b_c[i] exp(G_r[i] - G_c[i]) [C, C], valid for
    row group > column group and inside the 16 x 16 diagonal blocks (callers mask to lower or
    strictly lower). The factors of each part are shared by all of As."""
    outs = [0.0] * len(As)
    for rf, cf, mask in self.parts():
      bc = b * cf
      for n, a in enumerate(As):
        p = mm(a * rf, bc, dt, trans_b=True)
        outs[n] = outs[n] + (p if mask is None else jnp.where(mask, p, 0.0))
    return outs

  def pair_grads(self, terms, b, dt):
    """Gradients of M_rc = sum_i a_r[i] b_c[i] exp(G_r - G_c), summed over terms [(a, dM)] sharing b.

    Returns (da per term, db, dG) with dG the decay gradient (a da summed, minus b db).
    """
    das = [0.0] * len(terms)
    db = 0.0
    for rf, cf, mask in self.parts():
      bc = b * cf
      for n, (a, dM) in enumerate(terms):
        dMp = dM if mask is None else jnp.where(mask, dM, 0.0)
        das[n] = das[n] + mm(dMp, bc, dt) * rf
        db = db + mm(dMp, a * rf, dt, trans_a=True) * cf
    dG = -b * db
    for (a, _), da in zip(terms, das):
      dG = dG + a * da
    return das, db, dG


def part_masks(C):
  """The [C, C] masks of `Decay.parts`, in order (None: the part's factors are zero outside it)."""
  r, c = iota(C, C, 0), iota(C, C, 1)
  masks, s = [r // DECAY_GROUP == c // DECAY_GROUP], DECAY_GROUP
  while s < C:
    masks.append(None if 2 * s == C else r // (2 * s) == c // (2 * s))
    s *= 2
  return masks


def lower_masks(C):
  r, c = iota(C, C, 0), iota(C, C, 1)
  return r >= c, r > c
