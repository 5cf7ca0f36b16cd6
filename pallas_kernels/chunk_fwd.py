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
of the block and each factor is clamped at e^80: exact unless one channel decays by more than
e^-160 within one sub-block (a mean log decay below -10 per token); masked entries are selected
away, never multiplied. Every other exponent is <= 0.

(I + L_ii)^{-1} is formed by row-wise forward substitution on the c x c block (stable for any
strictly lower L, unlike a Neumann product). bf16 inputs give bf16 matmul operands with float32
accumulation; float32 inputs use full-precision (IEEE) dots.

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
F32 = jnp.float32


def mm(a, b, dt, trans_a=False, trans_b=False):
  """a @ b (a^T / b^T as asked) with operands in dt and float32 accumulation."""
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  prec = lax.Precision.HIGHEST if dt != jnp.bfloat16 else None
  return lax.dot_general(a.astype(dt), b.astype(dt), dims, precision=prec,
                         preferred_element_type=F32 if dt != jnp.float64 else dt)


def unit_lower_inv(L):
  """(I + L)^{-1} for strictly lower L [n, n] by forward substitution, row by row."""
  n = L.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  A0 = jnp.where(rows == cols, 1.0, 0.0).astype(L.dtype)

  def body(i, A):
    li = jnp.sum(jnp.where(rows == i, L, 0.0), axis=0)      # row i of L (zero from column i on)
    new = jnp.sum(li[:, None] * A, axis=0)                   # sum_{j<i} L_ij A_j
    return jnp.where(rows == i, A - new[None, :], A)         # row i was e_i
  return lax.fori_loop(1, n, body, A0)


def content_signal(S):
  """Row RMS of the state [K, V] -> [K] (CARVE's c)."""
  return jnp.sqrt(jnp.mean(S * S, axis=1) + CONTENT_EPS)


def chunk_intra(q_ref, k_ref, g_ref, b_ref, t0, *, ns, bc, dt, cdt, gate):
  """Everything of one chunk that does not touch the state, per sub-block (lists of length ns).

  gate: maps the loaded b rows [bc, K] to the erase gate (identity, or CARVE's sigmoid).
  """
  K = k_ref.shape[-1]
  r = lax.broadcasted_iota(jnp.int32, (bc, bc), 0)
  c = lax.broadcasted_iota(jnp.int32, (bc, bc), 1)
  F = dict(q=[], k=[], bg=[], bk=[], G=[], Gprev=[], Gend=[], eG=[], rdec=[], kcol=[], ad=[], kd=[],
           L={}, Aqk={}, Ainv=[])
  Gprev = jnp.zeros((K,), cdt)
  for i in range(ns):
    rows = pl.ds(t0 + i * bc, bc)
    q = q_ref[rows, :].astype(cdt)
    k = k_ref[rows, :].astype(cdt)
    g = g_ref[rows, :].astype(cdt)
    bg = gate(b_ref[rows, :].astype(cdt))
    G = jnp.cumsum(g, axis=0) + Gprev[None, :]
    Gend = Gprev + jnp.sum(g, axis=0)
    m = 0.5 * (Gprev + Gend)
    for name, x in (("q", q), ("k", k), ("bg", bg), ("bk", bg * k), ("G", G), ("Gprev", Gprev),
                    ("Gend", Gend)):
      F[name].append(x)
    F["eG"].append(jnp.exp(G))
    F["rdec"].append(jnp.exp(G - Gprev[None, :]))
    F["kcol"].append(jnp.exp(Gend[None, :] - G))
    F["ad"].append(jnp.exp(jnp.minimum(G - m[None, :], _CLAMP)))
    F["kd"].append(jnp.exp(jnp.minimum(m[None, :] - G, _CLAMP)))
    Gprev = Gend
  for i in range(ns):
    bk, q = F["bk"][i], F["q"][i]
    for j in range(i):
      e = jnp.exp(F["Gprev"][i] - F["Gend"][j])[None, :]
      rf = F["rdec"][i] * e
      kc = F["k"][j] * F["kcol"][j]
      F["L"][i, j] = mm(bk * rf, kc, dt, trans_b=True)
      F["Aqk"][i, j] = mm(q * rf, kc, dt, trans_b=True)
    kd = F["k"][i] * F["kd"][i]
    F["L"][i, i] = jnp.where(r > c, mm(bk * F["ad"][i], kd, dt, trans_b=True), 0.0)
    F["Aqk"][i, i] = jnp.where(r >= c, mm(q * F["ad"][i], kd, dt, trans_b=True), 0.0)
    F["Ainv"].append(unit_lower_inv(F["L"][i, i]))
  return F


def chunk_solve(F, wv, S, *, ns, dt):
  """V_new sub-blocks [bc, BV] of one chunk: blocked forward substitution of (I + L) V_new = X."""
  Vn = []
  for i in range(ns):
    X = wv[i] - mm(F["bk"][i] * F["eG"][i], S, dt)
    for j in range(i):
      X = X - mm(F["L"][i, j], Vn[j], dt)
    Vn.append(mm(F["Ainv"][i], X, dt))
  return Vn


def load_wv(v_ref, w_ref, t0, *, ns, bc, cdt, has_beta):
  """(v, w v) per sub-block; w_ref holds w [T, BV] or beta [T]."""
  vs, wvs, ws = [], [], []
  for i in range(ns):
    rows = pl.ds(t0 + i * bc, bc)
    v = v_ref[rows, :].astype(cdt)
    w = w_ref[rows].astype(cdt)[:, None] if has_beta else w_ref[rows, :].astype(cdt)
    vs.append(v)
    ws.append(w)
    wvs.append(w * v)
  return vs, ws, wvs


def _fwd_kernel(*refs, carve, has_beta, save, scale, C, bc, cb, N, dt, cdt):
  it = iter(refs)
  q_ref, k_ref, v_ref, g_ref, b_ref, w_ref = (next(it) for _ in range(6))
  gamma_ref = next(it) if carve else None
  s0_ref, o_ref, sf_ref = next(it), next(it), next(it)
  st_ref = next(it) if save else None
  c_ref = next(it) if (save and carve) else None
  ns = C // bc
  K = k_ref.shape[-1]

  def body(n, carry):
    S, cvec = carry
    t0 = n * C
    if save:
      st_ref[n] = S
    if carve:
      cvec = jnp.where(lax.rem(t0, cb) == 0, content_signal(S), cvec)
      if save:
        c_ref[n] = cvec
      gam = gamma_ref[...].astype(cdt)
      gate = lambda logits: jax.nn.sigmoid(logits + gam[None, :] * cvec[None, :])
    else:
      gate = lambda x: x
    F = chunk_intra(q_ref, k_ref, g_ref, b_ref, t0, ns=ns, bc=bc, dt=dt, cdt=cdt, gate=gate)
    _, _, wv = load_wv(v_ref, w_ref, t0, ns=ns, bc=bc, cdt=cdt, has_beta=has_beta)
    Vn = chunk_solve(F, wv, S, ns=ns, dt=dt)
    GC = F["Gend"][-1]
    S_new = jnp.exp(GC)[:, None] * S
    for i in range(ns):
      O = mm(F["q"][i] * F["eG"][i], S, dt)
      for j in range(i + 1):
        O = O + mm(F["Aqk"][i, j], Vn[j], dt)
      o_ref[pl.ds(t0 + i * bc, bc), :] = (scale * O).astype(o_ref.dtype)
      S_new = S_new + mm(F["k"][i] * jnp.exp(GC[None, :] - F["G"][i]), Vn[i], dt, trans_a=True)
    return S_new, cvec

  S0 = s0_ref[...].astype(cdt)
  S, _ = lax.fori_loop(0, N, body, (S0, jnp.zeros((K,), cdt)))
  sf_ref[...] = S.astype(sf_ref.dtype)


def compute_dtypes(*xs):
  """(dot operand dtype, elementwise/accumulation dtype): bf16 dots when any input is 16-bit."""
  dts = {jnp.dtype(x.dtype) for x in xs}
  if jnp.dtype(jnp.float64) in dts:
    return jnp.float64, jnp.float64
  if dts & {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}:
    return jnp.bfloat16, F32
  return F32, F32


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
  dt, cdt = compute_dtypes(q, k, v)
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
