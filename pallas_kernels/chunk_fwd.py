r"""Fused forward kernel of the gated delta-rule family (CARVE, GDN-2, KDA, GDN) in Pallas/Triton.

One program per (batch, head[, value tile]) walks the chunks of its sequence in order with the
state S [K, BV] resident in float32. Per chunk of C tokens entering with S (the math of
`carve_jax.ops.chunk.chunk_step`), split into C / c sub-blocks of c = `sub_chunk` rows:

    G      = in-chunk cumulative decay (per key channel)
    b      = sigmoid(logits + gamma_h * c_n)  (CARVE; c_n = row-RMS of S entering content block n)
    L_ij   = StrictLower[(b k)_i Gamma_ij k_j^T],  Aqk_ij = Lower[q_i Gamma_ij k_j^T]    (c x c blocks)
    X      = w v - (b k e^G) S
    V_new  = (I + L)^{-1} X                       blocked forward substitution over sub-blocks:
             V_new_i = (I + L_ii)^{-1} (X_i - sum_{j<i} L_ij V_new_j)
    O      = scale [(q e^G) S + Aqk V_new]
    S_out  = e^{G_C} S + (k e^{G_C - G})^T V_new

Folding W S into the right-hand side (V_new = A (w v - b k e^G S)) needs one triangular solve
instead of the two (W and U) of the reference; W itself is never formed.

Decay numerics (nothing overflows): for an off-diagonal block (rows i > cols j) the pairwise factor
exp(G_r - G_c) is split at G_ref = G at the last row of block j, so exp(G_r - G_ref) <= 1 and
exp(G_ref - G_c) <= 1. Inside a diagonal block the reference is the mid value m = (G_before + G_end)/2
of its 16-row decay group and each factor is clamped at e^80: exact unless one channel decays by
more than e^-160 within 16 tokens (a mean log decay below -10 per token); masked entries are
selected away, never multiplied. Every other exponent is <= 0. Sub-blocks larger than 16 rows
(`TuningConfig.sub_chunk` 32 or 64: fewer, larger ops per chunk) keep these references per
16-row group by summing masked products (`Chunk.diag_parts`), and invert by 16-row blocks
(`block_unit_lower_inv`), so their numerics match sub_chunk 16.

(I + L_ii)^{-1} is the product (I + N)(I + N^2)(I + N^4)(I + N^8), N = -L_ii (exact, as N^16 = 0;
4 dependent float32 dot pairs instead of 16 dependent row steps; see `unit_lower_inv` for the
rounding bound). v1 used row-wise forward substitution (a 15-step loop of cross-warp reductions).
bf16 inputs give bf16 matmul operands with float32 accumulation; float32 inputs use TF32x3 dots
on the GPU (exact float32 in interpret mode); the c x c inverses are always IEEE float32.

Registers: a program keeps only S, V_new and the c x c blocks across a chunk; every [c, K] quantity
(q, k, gate, G, decay factors) is reloaded and recomputed where it is used (`Chunk`). (v1 kept
them; this version measured 8% faster. Neither spills; what limits both is the chain of small
Triton ops, each behind a CTA barrier: see pallas_kernels/NOTES.md.)

CARVE needs the whole state row to form c, so its forward keeps all of V in one program; the
gamma-free variants may tile V (`TuningConfig.block_v`), each tile recomputing the c x c blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.config import TuningConfig

CONTENT_EPS = 1e-6  # = carve_jax.ops.gates.CONTENT_EPS (checked by the tests)
_CLAMP = 80.0
DECAY_GROUP = 16  # rows sharing one decay reference inside a diagonal block
F32 = jnp.float32


TF32X3 = "tf32x3"  # dot mode of float32 inputs on the GPU: three TF32 tensor-core passes


def mm(a, b, dt, trans_a=False, trans_b=False):
  """a @ b (a^T / b^T as asked), float32 accumulation. dt: operand dtype (bf16: one bf16 pass;
  float32/float64: IEEE), or TF32X3 (float32 operands, ~float32 accuracy on tensor cores)."""
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  if isinstance(dt, str):
    prec, dt = lax.DotAlgorithmPreset.TF32_TF32_F32_X3, F32
  else:
    prec = lax.Precision.HIGHEST if dt != jnp.bfloat16 else None
  return lax.dot_general(a.astype(dt), b.astype(dt), dims, precision=prec,
                         preferred_element_type=F32 if dt != jnp.float64 else dt)


def unit_lower_inv(L, order=None):
  """(I + L)^{-1} for strictly lower L [n, n], n a power of two: (I + N)(I + N^2)(I + N^4)... with
  N = -L (exact: N is nilpotent; `order` = a power of two with N^order = 0, default n).
  log2(order) squarings instead of n dependent row steps; the dots are float32 (IEEE). Rounding grows
  with the largest entry of the powers of L, at most C(order-1, order/2-1) times max|L| (6435 for
  order 16 with |L_rc| <= 1; keys of norm 1 and gates in (0, 1) give |L| <= 1)."""
  n = L.shape[0]
  order = n if order is None else order
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  P = -L
  A = jnp.where(rows == cols, 1.0, 0.0).astype(L.dtype) + P
  m = 2
  while m < order:
    P = mm(P, P, L.dtype)
    A = A + mm(A, P, L.dtype)
    m *= 2
  return A


def block_unit_lower_inv(L, group=DECAY_GROUP):
  """(I + L)^{-1} for n > group: I + L = (I + L_d)(I + D L_o) with L_d the diagonal group x group
  blocks, D = (I + L_d)^{-1} (`unit_lower_inv`, order group) and L_o the rest, so
  (I + L)^{-1} = sum_{m < n/group} (-D L_o)^m D (D L_o is strictly block-lower: nilpotent)."""
  n = L.shape[0]
  if n <= group:
    return unit_lower_inv(L)
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0) // group
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1) // group
  D = unit_lower_inv(jnp.where(rows == cols, L, 0.0), order=group)
  P = -mm(D, jnp.where(rows == cols, 0.0, L), L.dtype)
  A = term = D
  for _ in range(n // group - 1):
    term = mm(P, term, L.dtype)
    A = A + term
  return A


def content_signal(S):
  """Row RMS of the state [K, V] -> [K] (CARVE's c)."""
  return jnp.sqrt(jnp.mean(S * S, axis=1) + CONTENT_EPS)


class Chunk:
  """Loads and recomputes the per-token quantities of one chunk on demand, sub-block by sub-block.

  Nothing of size [c, K] is kept across sub-blocks: it is reloaded (L1/L2 hits) and recomputed
  where used, which keeps the live set of a program near the state plus V_new (no register
  spills). Kept: the decay boundaries Gprev_i, Gend_i ([K] each).
  """

  def __init__(self, refs, t0, *, ns, bc, dt, cdt, gate, has_beta):
    self.q_ref, self.k_ref, self.v_ref, self.g_ref, self.b_ref, self.w_ref = refs
    self.t0, self.ns, self.bc, self.dt, self.cdt, self.gate, self.has_beta = t0, ns, bc, dt, cdt, gate, has_beta
    K = self.k_ref.shape[-1]
    self.Gprev, self.Gend = [], []
    Gp = jnp.zeros((K,), cdt)
    for i in range(ns):
      self.Gprev.append(Gp)
      Gp = Gp + jnp.sum(self._load(self.g_ref, i), axis=0)
      self.Gend.append(Gp)
    r = lax.broadcasted_iota(jnp.int32, (bc, bc), 0)
    c = lax.broadcasted_iota(jnp.int32, (bc, bc), 1)
    self.strict, self.lower = r > c, r >= c

  def rows(self, i):
    return pl.ds(self.t0 + i * self.bc, self.bc)

  def _load(self, ref, i):
    return ref[self.rows(i), :].astype(self.cdt)

  def q(self, i):
    return self._load(self.q_ref, i)

  def k(self, i):
    return self._load(self.k_ref, i)

  def G(self, i):
    return jnp.cumsum(self._load(self.g_ref, i), axis=0) + self.Gprev[i][None, :]

  def bg(self, i):
    return self.gate(self._load(self.b_ref, i))

  def v(self, i):
    return self._load(self.v_ref, i)

  def w(self, i):
    if self.has_beta:
      return self.w_ref[self.rows(i)].astype(self.cdt)[:, None]
    return self._load(self.w_ref, i)

  def mid(self, i):
    return 0.5 * (self.Gprev[i] + self.Gend[i])

  def col(self, j, G=None):
    """Column factor e^{Gend_j - G_j} (<= 1) of off-diagonal blocks with columns in block j."""
    G = self.G(j) if G is None else G
    return jnp.exp(self.Gend[j][None, :] - G)

  def row_factor(self, i, j, G):
    """e^{G_i - Gend_j} for rows of block i against columns of block j < i (<= 1)."""
    return jnp.exp(G - self.Gprev[i][None, :]) * jnp.exp(self.Gprev[i] - self.Gend[j])[None, :]

  def diag_parts(self, i, G):
    """[(row factor, column factor)] whose masked products sum to exp(G_r - G_c) on block i.

    Decay groups of 16 rows: a group's own 16 x 16 block uses its mid value as reference (factors
    clamped at e^80); rows after the group use the group's last G (both factors <= 1). Rows and
    columns outside a part are zero in its factors. With sub_chunk 16 there is one part.
    """
    gs = DECAY_GROUP
    row = lax.broadcasted_iota(jnp.int32, (self.bc, 1), 0)
    parts = []
    Gp = self.Gprev[i]
    for h in range(self.bc // gs):
      lo, hi = h * gs, (h + 1) * gs
      Ge = self.Gend[i] if hi == self.bc else jnp.sum(jnp.where(row == hi - 1, G, 0.0), axis=0)
      m = (0.5 * (Gp + Ge))[None, :]
      if self.bc == gs:
        parts.append((jnp.exp(jnp.minimum(G - m, _CLAMP)), jnp.exp(jnp.minimum(m - G, _CLAMP))))
        break
      in_h = (row >= lo) & (row < hi)
      parts.append((jnp.where(in_h, jnp.exp(jnp.minimum(G - m, _CLAMP)), 0.0),
                    jnp.where(in_h, jnp.exp(jnp.minimum(m - G, _CLAMP)), 0.0)))
      if hi < self.bc:
        parts.append((jnp.where(row >= hi, jnp.exp(jnp.minimum(G - Ge[None, :], 0.0)), 0.0),
                      jnp.where(in_h, jnp.exp(jnp.minimum(Ge[None, :] - G, 0.0)), 0.0)))
      Gp = Ge
    return parts

  def diag_blocks(self, i):
    """(L_ii strictly lower, Aqk_ii lower, (I + L_ii)^{-1})."""
    G, k, q = self.G(i), self.k(i), self.q(i)
    bk = self.bg(i) * k
    L = A = 0.0
    for rf, cf in self.diag_parts(i, G):
      kk = k * cf
      L = L + mm(bk * rf, kk, self.dt, trans_b=True)
      A = A + mm(q * rf, kk, self.dt, trans_b=True)
    L = jnp.where(self.strict, L, 0.0)
    return L, jnp.where(self.lower, A, 0.0), block_unit_lower_inv(L)

  def off_blocks(self, i, j, bk_i, q_i, G_i):
    """(L_ij, Aqk_ij) for j < i given row block i's bk, q, G."""
    kc = self.k(j) * self.col(j)
    rf = self.row_factor(i, j, G_i)
    return mm(bk_i * rf, kc, self.dt, trans_b=True), mm(q_i * rf, kc, self.dt, trans_b=True)


def chunk_solve(ch: Chunk, S, *, with_output=None):
  """V_new sub-blocks [bc, BV] by blocked forward substitution of (I + L) V_new = w v - (b k e^G) S.

  Returns (V_new list, diagonal blocks list of (L_ii, Aqk_ii, Ainv_ii), off-diagonal dict).
  with_output(i, O_i): called with scale-free O_i = (q e^G)_i S + sum_{j<=i} Aqk_ij V_new_j.
  """
  dt = ch.dt
  diag = [ch.diag_blocks(i) for i in range(ch.ns)]
  off = {}
  Vn = []
  for i in range(ch.ns):
    G, k, q = ch.G(i), ch.k(i), ch.q(i)
    bk = ch.bg(i) * k
    eG = jnp.exp(G)
    X = ch.w(i) * ch.v(i) - mm(bk * eG, S, dt)
    O = mm(q * eG, S, dt) if with_output is not None else None
    for j in range(i):
      off[i, j] = ch.off_blocks(i, j, bk, q, G)
      X = X - mm(off[i, j][0], Vn[j], dt)
      if O is not None:
        O = O + mm(off[i, j][1], Vn[j], dt)
    Vn.append(mm(diag[i][2], X, dt))
    if O is not None:
      with_output(i, O + mm(diag[i][1], Vn[i], dt))
  return Vn, diag, off


def _fwd_kernel(*refs, carve, has_beta, save, scale, C, bc, cb, N, dt, cdt):
  it = iter(refs)
  in_refs = tuple(next(it) for _ in range(6))
  gamma_ref = next(it) if carve else None
  s0_ref, o_ref, sf_ref = next(it), next(it), next(it)
  st_ref = next(it) if save else None
  c_ref = next(it) if (save and carve) else None
  ns = C // bc
  K = in_refs[1].shape[-1]

  def body(n, carry):
    S, cvec = carry
    t0 = n * C
    if save:
      st_ref[n] = S
    if carve:
      cvec = jnp.where(lax.rem(t0, cb) == 0, content_signal(S), cvec)
      if save:
        c_ref[n] = cvec
      gc = (gamma_ref[...].astype(cdt) * cvec)[None, :]  # gamma_h c_n, once per chunk
      gate = lambda logits: jax.nn.sigmoid(logits + gc)
    else:
      gate = lambda x: x
    ch = Chunk(in_refs, t0, ns=ns, bc=bc, dt=dt, cdt=cdt, gate=gate, has_beta=has_beta)

    def write(i, O):
      o_ref[ch.rows(i), :] = (scale * O).astype(o_ref.dtype)
    Vn, _, _ = chunk_solve(ch, S, with_output=write)
    GC = ch.Gend[-1]
    S_new = jnp.exp(GC)[:, None] * S
    for i in range(ns):
      S_new = S_new + mm(ch.k(i) * jnp.exp(GC[None, :] - ch.G(i)), Vn[i], dt, trans_a=True)
    return S_new, cvec

  S0 = s0_ref[...].astype(cdt)
  S, _ = lax.fori_loop(0, N, body, (S0, jnp.zeros((K,), cdt)))
  sf_ref[...] = S.astype(sf_ref.dtype)


def compute_dtypes(*xs, interpret=True):
  """(dot mode, elementwise/accumulation dtype): bf16 dots when any input is 16-bit; float32
  inputs get TF32x3 dots on the GPU (IEEE float32 dots there ran on CUDA cores and compiled for
  minutes) and exact float32 dots in interpret mode."""
  dts = {jnp.dtype(x.dtype) for x in xs}
  if jnp.dtype(jnp.float64) in dts:
    return jnp.float64, jnp.float64
  if dts & {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}:
    return jnp.bfloat16, F32
  return (F32 if interpret else TF32X3), F32


def chunk_fwd(q, k, v, g, b, w, gamma, S0, *, scale, chunk_size, content_block, cfg: TuningConfig,
              save: bool, interpret: bool):
  """Forward over padded inputs (Tp a multiple of chunk_size), public layout.

  q, k, g, b: [B, Tp, H, K]; v: [B, Tp, H, V]; w: [B, Tp, H, V] or beta [B, Tp, H] (when gamma [H]
  is given, b holds erase logits). S0: [B, H, K, V] float32.
  Returns (o [B, Tp, H, V] in q's dtype, S_final [B, H, K, V] float32, and with save=True the
  chunk-entry states [B, H, N, K, V] float32 and CARVE's per-chunk content signal [B, H, N, K]).
  """
  B, Tp, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  N = Tp // C
  carve = gamma is not None
  has_beta = w.ndim == 3
  dt, cdt = compute_dtypes(q, k, v, interpret=interpret)
  BV = V if (carve or cfg.block_v is None) else min(cfg.block_v, V)
  NV = V // BV
  sdt = jnp.float64 if cdt == jnp.float64 else F32

  tk = pl.BlockSpec((None, Tp, None, K), lambda b_, h, j: (b_, 0, h, 0))
  tv = pl.BlockSpec((None, Tp, None, BV), lambda b_, h, j: (b_, 0, h, j))
  sv = pl.BlockSpec((None, None, K, BV), lambda b_, h, j: (b_, h, 0, j))
  in_specs = [tk, tk, tv, tk, tk,
              pl.BlockSpec((None, Tp, None), lambda b_, h, j: (b_, 0, h)) if has_beta else tv]
  args = [q, k, v, g, b, w]
  if carve:
    in_specs.append(pl.BlockSpec((None, K), lambda b_, h, j: (h, 0)))
    args.append(jnp.broadcast_to(gamma.astype(sdt)[:, None], (H, K)))
  in_specs.append(sv)
  args.append(S0.astype(sdt))
  out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), q.dtype), jax.ShapeDtypeStruct((B, H, K, V), sdt)]
  out_specs = [tv, sv]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), sdt))
    out_specs.append(pl.BlockSpec((None, None, N, K, BV), lambda b_, h, j: (b_, h, 0, 0, j)))
    if carve:
      out_shape.append(jax.ShapeDtypeStruct((B, H, N, K), sdt))
      out_specs.append(pl.BlockSpec((None, None, N, K), lambda b_, h, j: (b_, h, 0, 0)))
  kernel = functools.partial(_fwd_kernel, carve=carve, has_beta=has_beta, save=save, scale=scale, C=C,
                             bc=cfg.sub_chunk, cb=content_block or C, N=N, dt=dt, cdt=cdt)
  outs = pl.pallas_call(
      kernel, grid=(B, H, NV), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="gated_delta_chunk_fwd")(*args)
  if save:
    return tuple(outs) if carve else (*outs, None)
  return outs[0], outs[1], None, None
