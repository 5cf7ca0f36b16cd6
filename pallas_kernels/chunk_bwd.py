r"""Fused backward kernel: one reverse pass over the chunks carrying dS = dLoss/dS_out in float32.

Per chunk it reloads the chunk-entry state S_in saved by the forward (and CARVE's content signal
c_n), recomputes the c x c blocks and V_new (`Chunk`, `chunk_solve`), then (cotangents dO, dS_out):

    dV_new = scale Aqk^T dO + (k e^{G_C - G}) dS_out
    dX     = (I + L)^{-T} dV_new                  (blocked back substitution, last sub-block first)
    dL     = -StrictLower[dX V_new^T],  dAqk = scale Lower[dO V_new^T]
    d(wv)  = dX
    dS_in  = e^{G_C} dS_out + scale (q e^G)^T dO - (b k e^G)^T dX

For every pairwise term M_rc = sum_i a_ri k_ci exp(G_ri - G_ci) the gradients are
da_r = sum_c dM_rc k_c e^{G_r - G_c} and dk_c = sum_r dM_rc a_r e^{G_r - G_c} (same split factors as
the forward), and its decay gradient is dG_r += a_r da_r, dG_c -= k_c dk_c. The e^{+-G} factors
contribute dG = x dx likewise; dg is the reverse in-chunk cumulative sum of dG.

CARVE with content_grad="stop": b = sigmoid(logit + gamma c) with c a constant, so
dlogit = db b (1 - b) and dgamma_h = sum dlogit c (formed outside the kernel).

The value axis may be tiled (`TuningConfig.bwd_block_v`): every key-side gradient (dq, dk, dg, db,
dbeta) is linear in the tile's dO, dX, dS, so each tile writes its partial and the caller sums them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.chunk_fwd import Chunk, chunk_solve, compute_dtypes, mm
from pallas_kernels.config import TuningConfig


def _revcumsum(x):
  """Reverse cumulative sum over rows: out_t = sum_{r >= t} x_r."""
  return jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x


def _bwd_kernel(*refs, carve, has_beta, scale, C, bc, N, dt, cdt):
  it = iter(refs)
  in_refs = tuple(next(it) for _ in range(6))
  gamma_ref = next(it) if carve else None
  st_ref = next(it)
  c_ref = next(it) if carve else None
  do_ref, dsf_ref = next(it), next(it)
  dq_ref, dk_ref, dg_ref, db_ref, dv_ref, dw_ref, ds0_ref = (next(it) for _ in range(7))
  ns = C // bc

  def body(m, dS):
    n = N - 1 - m
    t0 = n * C
    S = st_ref[n].astype(cdt)
    if carve:
      cvec = c_ref[n].astype(cdt)
      gc = (gamma_ref[...].astype(cdt) * cvec)[None, :]  # gamma_h c_n, once per chunk
      gate = lambda logits: jax.nn.sigmoid(logits + gc)
    else:
      gate = lambda x: x
    ch = Chunk(in_refs, t0, ns=ns, bc=bc, dt=dt, cdt=cdt, gate=gate, has_beta=has_beta)
    Vn, diag, off = chunk_solve(ch, S)
    Aqk = lambda i, j: diag[i][1] if i == j else off[i, j][1]
    Lb = lambda i, j: diag[i][0] if i == j else off[i, j][0]
    GC = ch.Gend[-1]
    eGC = jnp.exp(GC)
    dO = lambda i: do_ref[ch.rows(i), :].astype(cdt)

    # dV_new (and the G_C gradient of the state-update term), then dX by back substitution.
    dGC = jnp.sum(S * dS, axis=1) * eGC
    dVn = []
    for i in range(ns):
      kdec = ch.k(i) * jnp.exp(GC[None, :] - ch.G(i))
      x = mm(kdec, dS, dt)
      dGC = dGC + jnp.sum(mm(Vn[i], dS, dt, trans_b=True) * kdec, axis=0)
      for r in range(i, ns):
        x = x + scale * mm(Aqk(r, i), dO(r), dt, trans_a=True)
      dVn.append(x)
    dX = [None] * ns
    for i in reversed(range(ns)):
      y = dVn[i]
      for j in range(i + 1, ns):
        y = y - mm(Lb(j, i), dX[j], dt, trans_a=True)
      dX[i] = mm(diag[i][2], y, dt, trans_a=True)

    def pair_grads(i, j):
      """(dAqk_ij, dL_ij) of this value tile, masked on the diagonal."""
      dA = scale * mm(dO(i), Vn[j], dt, trans_b=True)
      dL = -mm(dX[i], Vn[j], dt, trans_b=True)
      if i == j:
        dA, dL = jnp.where(ch.lower, dA, 0.0), jnp.where(ch.strict, dL, 0.0)
      return dA, dL

    dS_in = eGC[:, None] * dS
    suffix = dGC
    for i in reversed(range(ns)):
      q, k, G, bg = ch.q(i), ch.k(i), ch.G(i), ch.bg(i)
      bk, eG = bg * k, jnp.exp(G)
      # Row pass: pairs (i, j <= i) give d(q_i), d(bk_i) through Aqk and L.
      dq_p = jnp.zeros_like(q)
      dbk_p = jnp.zeros_like(q)
      for j in range(i + 1):
        dA, dL = pair_grads(i, j)
        if j < i:
          rf, kc = ch.row_factor(i, j, G), ch.k(j) * ch.col(j)
          dq_p = dq_p + mm(dA, kc, dt) * rf
          dbk_p = dbk_p + mm(dL, kc, dt) * rf
        else:
          for rf, cf in ch.diag_parts(i, G):
            kc = k * cf
            dq_p = dq_p + mm(dA, kc, dt) * rf
            dbk_p = dbk_p + mm(dL, kc, dt) * rf
      # Column pass: pairs (r >= i, i) give d(k_i).
      dk_p = jnp.zeros_like(q)
      for r in range(i, ns):
        dA, dL = pair_grads(r, i)
        if r > i:
          Gr = ch.G(r)
          parts, qr, bkr = [(ch.row_factor(r, i, Gr), ch.col(i, G))], ch.q(r), ch.bg(r) * ch.k(r)
        else:
          parts, qr, bkr = ch.diag_parts(i, G), q, bk
        for rf, cf in parts:
          dk_p = dk_p + (mm(dA, qr * rf, dt, trans_a=True) + mm(dL, bkr * rf, dt, trans_a=True)) * cf
      dOi = dO(i)
      kdec_f = jnp.exp(GC[None, :] - G)
      dqe = scale * mm(dOi, S, dt, trans_b=True)
      dbke = -mm(dX[i], S, dt, trans_b=True)
      dkdec = mm(Vn[i], dS, dt, trans_b=True)
      dS_in = dS_in + scale * mm(q * eG, dOi, dt, trans_a=True) - mm(bk * eG, dX[i], dt, trans_a=True)
      dG = (dqe * q * eG + dbke * bk * eG - dkdec * k * kdec_f
            + q * dq_p + bk * dbk_p - k * dk_p)
      dbk = dbke * eG + dbk_p
      dgate = dbk * k
      rows = ch.rows(i)
      dq_ref[rows, :] = (dqe * eG + dq_p).astype(dq_ref.dtype)
      dk_ref[rows, :] = (dkdec * kdec_f + dk_p + dbk * bg).astype(dk_ref.dtype)
      db_ref[rows, :] = (dgate * bg * (1.0 - bg) if carve else dgate).astype(db_ref.dtype)
      dg_ref[rows, :] = (_revcumsum(dG) + suffix[None, :]).astype(dg_ref.dtype)
      suffix = suffix + jnp.sum(dG, axis=0)
      v, w = ch.v(i), ch.w(i)
      dv_ref[rows, :] = (dX[i] * w).astype(dv_ref.dtype)
      if has_beta:
        dw_ref[rows] = jnp.sum(dX[i] * v, axis=1).astype(dw_ref.dtype)
      else:
        dw_ref[rows, :] = (dX[i] * v).astype(dw_ref.dtype)
    return dS_in

  dS = lax.fori_loop(0, N, body, dsf_ref[...].astype(cdt))
  ds0_ref[...] = dS.astype(ds0_ref.dtype)


def chunk_bwd(q, k, v, g, b, w, gamma, states, cvec, do, dsf, *, scale, chunk_size, cfg: TuningConfig,
              interpret: bool):
  """Backward over padded inputs (layout as `chunk_fwd`), from the saved chunk-entry states.

  states: [B, H, N, K, V]; cvec: CARVE's content signal [B, H, N, K] or None; do: [B, Tp, H, V];
  dsf: cotangent of the final state [B, H, K, V].
  Returns float32 (dq, dk, dg, db, dv, dw, dS0); db holds d(erase logits) for CARVE, dw is dbeta
  [B, Tp, H] when w is beta. Key-side gradients are already summed over value tiles.
  """
  B, Tp, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  N = Tp // C
  carve = gamma is not None
  has_beta = w.ndim == 3
  dt, cdt = compute_dtypes(q, k, v, interpret=interpret)
  BV = V if cfg.bwd_block_v is None else min(cfg.bwd_block_v, V)
  if cdt == jnp.float32 and dt != jnp.bfloat16 and not interpret:  # float32 operands: v1 (IEEE dots)
    BV = min(BV, 32)                                # overflowed shared memory at value tile 64
  NV = V // BV
  sdt = states.dtype

  tk = pl.BlockSpec((None, Tp, None, K), lambda b_, h, j: (b_, 0, h, 0))
  tv = pl.BlockSpec((None, Tp, None, BV), lambda b_, h, j: (b_, 0, h, j))
  sv = pl.BlockSpec((None, None, K, BV), lambda b_, h, j: (b_, h, 0, j))
  tb = pl.BlockSpec((None, Tp, None), lambda b_, h, j: (b_, 0, h))
  in_specs = [tk, tk, tv, tk, tk, tb if has_beta else tv]
  args = [q, k, v, g, b, w]
  if carve:
    in_specs.append(pl.BlockSpec((None, K), lambda b_, h, j: (h, 0)))
    args.append(jnp.broadcast_to(gamma.astype(sdt)[:, None], (H, K)))
  in_specs.append(pl.BlockSpec((None, None, N, K, BV), lambda b_, h, j: (b_, h, 0, 0, j)))
  args.append(states)
  if carve:
    in_specs.append(pl.BlockSpec((None, None, N, K), lambda b_, h, j: (b_, h, 0, 0)))
    args.append(cvec)
  in_specs += [tv, sv]
  args += [do, dsf.astype(sdt)]

  part_k = pl.BlockSpec((None, None, Tp, None, K), lambda b_, h, j: (j, b_, 0, h, 0))
  kshape = jax.ShapeDtypeStruct((NV, B, Tp, H, K), sdt)
  out_specs = [part_k] * 4 + [tv]
  out_shape = [kshape] * 4 + [jax.ShapeDtypeStruct((B, Tp, H, V), sdt)]
  if has_beta:
    out_specs.append(pl.BlockSpec((None, None, Tp, None), lambda b_, h, j: (j, b_, 0, h)))
    out_shape.append(jax.ShapeDtypeStruct((NV, B, Tp, H), sdt))
  else:
    out_specs.append(tv)
    out_shape.append(jax.ShapeDtypeStruct((B, Tp, H, V), sdt))
  out_specs.append(sv)
  out_shape.append(jax.ShapeDtypeStruct((B, H, K, V), sdt))
  kernel = functools.partial(_bwd_kernel, carve=carve, has_beta=has_beta, scale=scale, C=C,
                             bc=cfg.sub_chunk, N=N, dt=dt, cdt=cdt)
  dq, dk, dg, db, dv, dw, ds0 = pl.pallas_call(
      kernel, grid=(B, H, NV), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages),
      interpret=interpret, name="gated_delta_chunk_bwd")(*args)
  dq, dk, dg, db = (x.sum(0) if NV > 1 else x[0] for x in (dq, dk, dg, db))
  if has_beta:
    dw = dw.sum(0) if NV > 1 else dw[0]
  return dq, dk, dg, db, dv, dw, ds0
