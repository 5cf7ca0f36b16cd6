r"""Backward of the gated delta-rule family as three Pallas/Triton passes, from the forward's h and V_new.

With content_grad="stop" CARVE's content signal c_n is a saved constant, so every gate-dependent
quantity is chunk-local and only the state cotangent runs through the chunks. Per chunk, with
cotangents dO and dS_out of the state leaving it (and W, A, Aqk, Kd of `forward.py`):

    dV_new = scale Aqk^T dO + Kd dS_out
    dS_in  = e^{G_C} dS_out + scale (q e^G)^T dO - W^T dV_new
    dX     = A^T dV_new,  d(w v) = dX,  d(b k e^G) = -dX S_in^T
    dL     = -StrictLower[dX V_new^T],  dAqk = scale Lower[dO V_new^T],  dKd = V_new dS_out^T

1. `_bprep_kernel`, chunk-parallel: dV_loc = scale Aqk^T dO from the forward's Aqk; for CARVE also
   W = A (b k e^G) from the forward's A and the saved gate (the gamma-free forward keeps its W). The
   forward also keeps q e^G, Kd and G_C, so nothing of the WY form is recomputed here.
2. `_bstate_kernel`, sequential in reverse (grid B x H x V/BV; linear in V, so value tiles are
   independent): stores dS_out of every chunk (dh) and dV_new; returns dS_0.
3. `_grad_kernel`, chunk-parallel: every input gradient of a chunk from S_in = h, dS_out = dh,
   V_new, dV_new, dO and A. Pairwise terms go through `Decay.pair_grads` (same exact factors as the
   forward); the decay gradient dg is the reverse in-chunk cumulative sum of dG plus the G_C terms.

CARVE: b = sigmoid(logit + gamma c) with c constant: dlogit = db b (1 - b); each chunk writes
sum_t dlogit_t * c_n [K], and dgamma_h sums these (outside the kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.config import TuningConfig
from pallas_kernels.forward import Dtypes, by_name, params, seq_specs, tiles, write_gate, wy_w
from pallas_kernels.intra import Decay, lower_masks, mm, revcumsum


def _gate(b_ref, c_ref, gam_ref, sl, cdt):
  """Erase gate [C, BK] of key block sl: b itself, or CARVE's sigmoid(logits + gamma_h c_n)."""
  b = b_ref[:, sl].astype(cdt)
  if c_ref is None:
    return b
  return jax.nn.sigmoid(b + (gam_ref[sl].astype(cdt) * c_ref[sl].astype(cdt))[None, :])


# ---- 1. chunk-parallel preparation ----

def _bprep_kernel(*, aqk_ref, do_ref, dvl_ref, A_ref=None, k_ref=None, g_ref=None, b_ref=None, c_ref=None,
                  gam_ref=None, W_ref=None, scale, dt, block_k):
  """dV_loc = scale Aqk^T dO; for CARVE (A_ref given) also W = A (b k e^G) with the saved gate."""
  dvl_ref[...] = (scale * mm(aqk_ref[...], do_ref[...], dt.dot, trans_a=True)).astype(dvl_ref.dtype)
  if A_ref is not None:
    wy_w(A_ref[...], k_ref, g_ref, lambda sl: _gate(b_ref, c_ref, gam_ref, sl, dt.cdt), W_ref, dt=dt,
         block_k=block_k)


def bprep(res, k, g, b, gamma, do, *, scale, C, cfg, dt: Dtypes, interpret):
  """(dV_loc [B, Tp, H, V] float32, W [B, Tp, H, K] in dt.store) from the forward's residuals.

  The gamma-free families reuse the forward's W; CARVE forms W = A (b k e^G) here from the saved A
  and content signal c (b then holds the erase logits)."""
  B, Tp, H, K = k.shape
  V, N = do.shape[-1], Tp // C
  t = tiles(C)
  sd = jax.ShapeDtypeStruct
  carve = res.c is not None
  names = ["aqk_ref", "do_ref"] + (["A_ref", "k_ref", "g_ref", "b_ref", "c_ref", "gam_ref"] if carve else [])
  in_specs = [t["tok"](C), t["tok"](V)] + ([t["tok"](C)] + [t["tok"](K)] * 3 + [t["vec"](K), t["head"](K)]
                                            if carve else [])
  args = [res.aqk, do] + ([res.A, k, g, b, res.c, jnp.broadcast_to(gamma.astype(dt.cdt)[:, None], (H, K))]
                          if carve else [])
  out_specs = [t["tok"](V)] + ([t["tok"](K)] if carve else [])
  out_shape = [sd((B, Tp, H, V), dt.cdt)] + ([sd((B, Tp, H, K), dt.store)] if carve else [])

  kernel = by_name(_bprep_kernel, names + ["dvl_ref"] + (["W_ref"] if carve else []), scale=scale, dt=dt,
                   block_k=cfg.block_k)
  outs = pl.pallas_call(
      kernel, grid=(B, H, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=params(cfg.num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_bwd_prep")(*args)
  return (outs[0], outs[1]) if carve else (outs[0], res.W)


# ---- 2. sequential reverse state pass ----

def _bstate_kernel(qe_ref, W_ref, kd_ref, gc_ref, dvl_ref, do_ref, dsf_ref, dh_ref, dvn_ref, ds0_ref, *,
                   scale, C, N, dt):
  def body(m, dS):
    n = N - 1 - m
    rows = pl.ds(n * C, C)
    dh_ref[n] = dS.astype(dh_ref.dtype)
    dvn = dvl_ref[rows, :].astype(dt.cdt) + mm(kd_ref[rows, :], dS, dt.dot)
    dvn_ref[rows, :] = dvn.astype(dvn_ref.dtype)
    return (jnp.exp(gc_ref[n].astype(dt.cdt))[:, None] * dS
            + scale * mm(qe_ref[rows, :], do_ref[rows, :], dt.dot, trans_a=True)
            - mm(W_ref[rows, :], dvn, dt.dot, trans_a=True))
  ds0_ref[...] = lax.fori_loop(0, N, body, dsf_ref[...].astype(dt.cdt)).astype(ds0_ref.dtype)


def bstate(qe, W, kd, gc, dvl, do, dsf, *, scale, C, cfg: TuningConfig, dt: Dtypes, interpret):
  """(dh [B, H, N, K, V] = dS_out per chunk, dV_new [B, Tp, H, V] float32, dS_0 [B, H, K, V])."""
  B, Tp, H, K = qe.shape
  V, N = do.shape[-1], Tp // C
  BV = cfg.value_tile(V)
  s = seq_specs(Tp, N)
  sd = jax.ShapeDtypeStruct
  return pl.pallas_call(
      functools.partial(_bstate_kernel, scale=scale, C=C, N=N, dt=dt), grid=(B, H, V // BV),
      in_specs=[s["tok"](K)] * 3 + [s["vecs"](K), s["tokv"](BV), s["tokv"](BV), s["state"](K, BV)],
      out_specs=[s["states"](K, BV), s["tokv"](BV), s["state"](K, BV)],
      out_shape=[sd((B, H, N, K, V), dt.store), sd((B, Tp, H, V), dt.cdt), sd((B, H, K, V), dsf.dtype)],
      compiler_params=params(cfg.state_num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_bwd_state")(qe, W, kd, gc, dvl, do, dsf)


# ---- 3. chunk-parallel gradients ----

def _grad_kernel(*refs, carve, has_beta, scale, dt):
  it = iter(refs)
  q_ref, k_ref, g_ref, b_ref, w_ref, v_ref = (next(it) for _ in range(6))
  c_ref, gam_ref = (next(it), next(it)) if carve else (None, None)
  h_ref, dh_ref, vn_ref, dvn_ref, do_ref, A_ref = (next(it) for _ in range(6))
  dq_ref, dk_ref, dg_ref, db_ref, dv_ref, dw_ref = (next(it) for _ in range(6))
  dgam_ref = next(it) if carve else None
  cdt, dd = dt.cdt, dt.dot
  lower, strict = lower_masks(q_ref.shape[0])
  vn, dO = vn_ref[...], do_ref[...]
  dX = mm(A_ref[...], dvn_ref[...].astype(cdt), dt.inv, trans_a=True)

  @pl.when(pl.program_id(3) == 0)
  def _():
    v = v_ref[...].astype(cdt)
    dv_ref[...] = (dX * write_gate(w_ref, has_beta, cdt)).astype(dv_ref.dtype)
    dw_ref[...] = (jnp.sum(dX * v, axis=1) if has_beta else dX * v).astype(dw_ref.dtype)
  dAqk = jnp.where(lower, scale * mm(dO, vn, dd, trans_b=True), 0.0)
  dL = jnp.where(strict, -mm(dX, vn, dd, trans_b=True), 0.0)
  sl = slice(None)  # the refs hold only this program's key block
  q, k, g = q_ref[:, sl].astype(cdt), k_ref[:, sl].astype(cdt), g_ref[:, sl].astype(cdt)
  G = jnp.cumsum(g, axis=0)
  dec = Decay(G)
  gate = _gate(b_ref, c_ref, gam_ref, sl, cdt)
  bk = gate * k
  eG, kdf = jnp.exp(G), jnp.exp(dec.GC[None, :] - G)
  S, dS = h_ref[sl, :].astype(cdt), dh_ref[sl, :].astype(cdt)
  dGC = jnp.sum(S * dS, axis=1) * jnp.exp(dec.GC)
  dQe = scale * mm(dO, S, dd, trans_b=True)
  dBke = -mm(dX, S, dd, trans_b=True)
  dKd = mm(vn, dS, dd, trans_b=True)
  (dq_p, dbk_p), dk_p, dG = dec.pair_grads([(q, dAqk), (bk, dL)], k, dd)
  dbk = dBke * eG + dbk_p
  dG = dG + dQe * q * eG + dBke * bk * eG - dKd * k * kdf
  dGC = dGC + jnp.sum(dKd * k * kdf, axis=0)
  dq_ref[:, sl] = (dQe * eG + dq_p).astype(dq_ref.dtype)
  dk_ref[:, sl] = (dKd * kdf + dk_p + dbk * gate).astype(dk_ref.dtype)
  dg_ref[:, sl] = (revcumsum(dG) + dGC[None, :]).astype(dg_ref.dtype)
  dgate = dbk * k
  if carve:
    dlogit = dgate * gate * (1.0 - gate)
    db_ref[:, sl] = dlogit.astype(db_ref.dtype)
    dgam_ref[sl] = jnp.sum(dlogit * c_ref[sl].astype(cdt)[None, :], axis=0).astype(dgam_ref.dtype)
  else:
    db_ref[:, sl] = dgate.astype(db_ref.dtype)


def grads(q, k, v, g, b, w, c, gamma, h, dh, vn, dvn, do, A, *, scale, C, cfg, dt: Dtypes, interpret):
  """(dq, dk, dg, db, dv, dw, per-chunk dgamma partials [B, H, N, K] or None), in the inputs' dtypes.

  Grid (B, H, N, K / BK): every key-side gradient is per channel given dX, dAqk and dL, so each
  program takes one key block (and recomputes those three from V-sized inputs); the first key block
  also writes dv and dw."""
  B, Tp, H, K = q.shape
  V, N = v.shape[-1], Tp // C
  BK = min(cfg.grad_block_k, K)
  sd = jax.ShapeDtypeStruct
  carve, has_beta = c is not None, w.ndim == 3
  tokk = pl.BlockSpec((None, C, None, BK), lambda b_, h_, n, j: (b_, n, h_, j))
  tok = lambda D: pl.BlockSpec((None, C, None, D), lambda b_, h_, n, j: (b_, n, h_, 0))
  wspec = pl.BlockSpec((None, C, None), lambda b_, h_, n, j: (b_, n, h_)) if has_beta else tok(V)
  veck = pl.BlockSpec((None, None, None, BK), lambda b_, h_, n, j: (b_, h_, n, j))
  statek = pl.BlockSpec((None, None, None, BK, V), lambda b_, h_, n, j: (b_, h_, n, j, 0))
  in_specs = ([tokk] * 4 + [wspec, tok(V)]
              + ([veck, pl.BlockSpec((None, BK), lambda b_, h_, n, j: (h_, j))] if carve else [])
              + [statek] * 2 + [tok(V)] * 3 + [tok(C)])
  args = ([q, k, g, b, w, v] + ([c, jnp.broadcast_to(gamma.astype(dt.cdt)[:, None], (H, K))] if carve else [])
          + [h, dh, vn, dvn, do, A])
  out_specs = [tokk] * 4 + [tok(V), wspec] + ([veck] if carve else [])
  out_shape = ([sd(x.shape, x.dtype) for x in (q, k, g, b, v, w)]
               + ([sd((B, H, N, K), dt.cdt)] if carve else []))
  outs = pl.pallas_call(
      functools.partial(_grad_kernel, carve=carve, has_beta=has_beta, scale=scale, dt=dt),
      grid=(B, H, N, K // BK),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=params(cfg.grad_num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_bwd_grads")(*args)
  return (*outs, None) if not carve else tuple(outs)


def backward(q, k, v, g, b, w, gamma, res, do, dsf, *, scale, chunk_size, cfg: TuningConfig, interpret):
  """Gradients (dq, dk, dv, dg, db, dw, dgamma or None, dS0) over padded inputs, from the forward's
  `Residuals`. db is d(erase logits) for CARVE; dw is dbeta [B, Tp, H] when w is beta. Input gradients
  come in the inputs' dtypes; dgamma in gamma's, dS0 in dsf's."""
  dt = Dtypes(q, interpret)
  kw = dict(scale=scale, C=chunk_size, cfg=cfg, dt=dt, interpret=interpret)
  do = do.astype(q.dtype)
  dvl, W = bprep(res, k, g, b, gamma, do, **kw)
  dh, dvn, ds0 = bstate(res.qe, W, res.kd, res.gc, dvl, do, dsf, **kw)
  dq, dk, dg, db, dv, dw, dgam = grads(q, k, v, g, b, w, res.c, gamma, res.h, dh, res.vn, dvn, do, res.A, **kw)
  dgamma = None if gamma is None else dgam.sum((0, 2, 3)).astype(gamma.dtype)
  return dq, dk, dv, dg, db, dw, dgamma, ds0
