r"""Backward of the gated delta-rule family as three Pallas/Triton passes, from the forward's h and V_new.

With content_grad="stop" CARVE's content signal c_n is a saved constant, so every gate-dependent
quantity is chunk-local and only the state cotangent runs through the chunks. Per chunk, with
cotangents dO and dS_out of the state leaving it (and W, A, Aqk, Kd of `forward.py`):

    dV_new = scale Aqk^T dO + Kd dS_out
    dS_in  = e^{G_C} dS_out + scale (q e^G)^T dO - W^T dV_new
    dX     = A^T dV_new,  d(w v) = dX,  d(b k e^G) = -dX S_in^T
    dL     = -StrictLower[dX V_new^T],  dAqk = scale Lower[dO V_new^T],  dKd = V_new dS_out^T

1. `_bprep_kernel`, chunk-parallel: dV_loc = scale Aqk^T dO from the forward's Aqk; for CARVE's Triton
   loop also W = A (b k e^G) from the forward's A and the saved gate (the gamma-free forward and CARVE's
   Mosaic loop keep their W). The
   forward also keeps q e^G, Kd and G_C, so nothing of the WY form is recomputed here.
2. `_bstate_kernel`, sequential in reverse (grid B x H x V/BV; linear in V, so value tiles are
   independent): stores dS_out of every chunk (dh) and dV_new; returns dS_0.
3. `_grad_kernel`, chunk-parallel: every input gradient of a chunk from S_in = h, dS_out = dh,
   V_new, dV_new, dO and A. Pairwise terms go through `Decay.pair_grads` (same exact factors as the
   forward); the decay gradient dg is the reverse in-chunk cumulative sum of dG plus the G_C terms.

CARVE: b = sigmoid(logit + gamma c) with c constant: dlogit = db b (1 - b); each chunk writes
sum_t dlogit_t * c_n [K], and dgamma_h sums these (outside the kernel).

Packed documents (`segments.py`): the forward's residuals are already masked, so the state pass is
unchanged; the gradient kernel masks dAqk, dL to pairs within a document, d(q e^G), d(b k e^G) to the
chunk's first document, dKd to its last, and the e^{G_C} S term of dG_C where a document starts; CARVE's
gate takes each row's content signal (`content_rows`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.config import TuningConfig
from pallas_kernels.forward import Dtypes, by_name, packed_masks, params, seq_specs, tiles, write_gate, wy_w
from pallas_kernels.intra import CONTENT_EPS, Decay, lower_masks, mm, revcumsum
from pallas_kernels.segments import AT_START, MID


def _gate(b_ref, c_ref, gam_ref, sl, cdt, c2_ref=None, blk_ref=None):
  """Erase gate [C, BK] of key block sl: b itself (c_ref None), or CARVE's sigmoid(logits + gamma_h c) with
  the chunk's content signal c_n, or with packed documents (blk_ref given) each row's (`content_rows`)."""
  b = b_ref[:, sl].astype(cdt)
  if c_ref is None:
    return b
  if blk_ref is None:
    return jax.nn.sigmoid(b + (gam_ref[sl].astype(cdt) * c_ref[sl].astype(cdt))[None, :])
  return jax.nn.sigmoid(b + gam_ref[sl].astype(cdt)[None, :] * content_rows(c_ref, c2_ref, blk_ref, sl, cdt))


def content_rows(c_ref, c2_ref, blk_ref, sl, cdt):
  """CARVE's content signal of key block sl: [1, BK] from the per-chunk c_ref; with packed documents
  (blk_ref given) [C, BK] per row by content class (`segments.py`): c_ref's signal for the classes
  CARRIED and AT_CHUNK, c2_ref's for MID, the zero state's sqrt(eps) for AT_START."""
  c = c_ref[sl].astype(cdt)[None, :]
  if blk_ref is None:
    return c
  blk = blk_ref[...][:, None]
  c = jnp.where(blk == MID, c2_ref[sl].astype(cdt)[None, :], c)
  return jnp.where(blk == AT_START, CONTENT_EPS**0.5, c)


# ---- 1. chunk-parallel preparation ----

def _bprep_kernel(*, aqk_ref, do_ref, dvl_ref, A_ref=None, k_ref=None, g_ref=None, b_ref=None, c_ref=None,
                  gam_ref=None, doc_ref=None, c2_ref=None, blk_ref=None, W_ref=None, scale, dt, block_k):
  """dV_loc = scale Aqk^T dO; for CARVE (A_ref given) also W = A (b k e^G) with the saved gate (packed
  documents: the per-row content signal, b k e^G of the chunk's first document only)."""
  dvl_ref[...] = (scale * mm(aqk_ref[...], do_ref[...], dt.dot, trans_a=True)).astype(dvl_ref.dtype)
  if A_ref is None:
    return
  first = None if doc_ref is None else packed_masks(doc_ref[...]).first

  def gate(sl):
    b = _gate(b_ref, c_ref, gam_ref, sl, dt.cdt, c2_ref, blk_ref)
    return b if first is None else jnp.where(first, b, 0.0)
  wy_w(A_ref[...], k_ref, g_ref, gate, W_ref, dt=dt, block_k=block_k)


def bprep(res, k, g, b, gamma, do, seg=None, *, scale, C, cfg, dt: Dtypes, interpret):
  """(dV_loc [B, Tp, H, V] float32, W [B, Tp, H, K] in dt.store) from the forward's residuals.

  The gamma-free families and CARVE's Mosaic loop reuse the forward's W; after CARVE's Triton loop (res.W
  None) W = A (b k e^G) is formed here from the saved A and content signal c (b then holds the erase
  logits). seg: packed documents' `Segments` or None."""
  B, Tp, H, K = k.shape
  V, N = do.shape[-1], Tp // C
  t = tiles(C)
  sd = jax.ShapeDtypeStruct
  carve = res.c is not None and res.W is None  # W to form here
  ins = dict(aqk=(t["tok"](C), res.aqk), do=(t["tok"](V), do))
  if carve:
    ins |= dict(A=(t["tok"](C), res.A), k=(t["tok"](K), k), g=(t["tok"](K), g), b=(t["tok"](K), b),
                c=(t["vec"](K), res.c), gam=(t["head"](K), jnp.broadcast_to(gamma.astype(dt.cdt)[:, None], (H, K))))
    if seg is not None:
      ins |= dict(doc=(t["doc"], seg.doc), c2=(t["vec"](K), res.c2), blk=(t["doc"], seg.blk))
  outs = dict(dvl=(t["tok"](V), sd((B, Tp, H, V), dt.cdt)))
  if carve:
    outs |= dict(W=(t["tok"](K), sd((B, Tp, H, K), dt.store)))
  kernel = by_name(_bprep_kernel, [n + "_ref" for n in list(ins) + list(outs)], scale=scale, dt=dt,
                   block_k=cfg.block_k)
  res_ = pl.pallas_call(
      kernel, grid=(B, H, N), in_specs=[sp for sp, _ in ins.values()], out_specs=[sp for sp, _ in outs.values()],
      out_shape=[x for _, x in outs.values()], compiler_params=params(cfg.num_warps, cfg.num_stages),
      interpret=interpret, name="gated_delta_bwd_prep")(*[x for _, x in ins.values()])
  return (res_[0], res_[1]) if carve else (res_[0], res.W)


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

def _grad_kernel(*, q_ref, k_ref, g_ref, b_ref, w_ref, v_ref, h_ref, dh_ref, vn_ref, dvn_ref, do_ref, A_ref,
                 dq_ref, dk_ref, dg_ref, db_ref, dv_ref, dw_ref, c_ref=None, gam_ref=None, doc_ref=None, c2_ref=None,
                 blk_ref=None, dgam_ref=None, has_beta, scale, dt):
  """Every input gradient of one chunk and key block (module docstring, step 3). CARVE: c_ref, gam_ref
  (and dgam_ref) given. Packed documents: doc_ref given (the masks of `forward.packed_masks`), and for
  CARVE c2_ref, blk_ref (the per-row content signal of `content_rows`)."""
  cdt, dd = dt.cdt, dt.dot
  lower, strict = lower_masks(q_ref.shape[0])
  pk = None if doc_ref is None else packed_masks(doc_ref[...])
  if pk is not None:
    lower, strict = lower & pk.same, strict & pk.same
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
  gate = _gate(b_ref, c_ref, gam_ref, sl, cdt, c2_ref, blk_ref)
  bk = gate * k
  eG, kdf = jnp.exp(G), jnp.exp(dec.GC[None, :] - G)
  S, dS = h_ref[sl, :].astype(cdt), dh_ref[sl, :].astype(cdt)
  dGC = jnp.sum(S * dS, axis=1) * jnp.exp(dec.GC)
  dQe = scale * mm(dO, S, dd, trans_b=True)
  dBke = -mm(dX, S, dd, trans_b=True)
  dKd = mm(vn, dS, dd, trans_b=True)
  if pk is not None:  # q e^G and b k e^G of the first document, Kd of the last, e^{G_C} S only without a start
    dQe, dBke = jnp.where(pk.first, dQe, 0.0), jnp.where(pk.first, dBke, 0.0)
    dKd = jnp.where(pk.last, dKd, 0.0)
    dGC = jnp.where(pk.carry, dGC, 0.0)
  (dq_p, dbk_p), dk_p, dG = dec.pair_grads([(q, dAqk), (bk, dL)], k, dd)
  dbk = dBke * eG + dbk_p
  dG = dG + dQe * q * eG + dBke * bk * eG - dKd * k * kdf
  dGC = dGC + jnp.sum(dKd * k * kdf, axis=0)
  dq_ref[:, sl] = (dQe * eG + dq_p).astype(dq_ref.dtype)
  dk_ref[:, sl] = (dKd * kdf + dk_p + dbk * gate).astype(dk_ref.dtype)
  dg_ref[:, sl] = (revcumsum(dG) + dGC[None, :]).astype(dg_ref.dtype)
  dgate = dbk * k
  if c_ref is not None:
    dlogit = dgate * gate * (1.0 - gate)
    db_ref[:, sl] = dlogit.astype(db_ref.dtype)
    c = c_ref[sl].astype(cdt)[None, :] if blk_ref is None else content_rows(c_ref, c2_ref, blk_ref, sl, cdt)
    dgam_ref[sl] = jnp.sum(dlogit * c, axis=0).astype(dgam_ref.dtype)
  else:
    db_ref[:, sl] = dgate.astype(db_ref.dtype)


def grads(q, k, v, g, b, w, c, gamma, h, dh, vn, dvn, do, A, seg=None, c2=None, *, scale, C, cfg, dt: Dtypes,
          interpret):
  """(dq, dk, dg, db, dv, dw, per-chunk dgamma partials [B, H, N, K] or None), in the inputs' dtypes.

  Grid (B, H, N, K / BK): every key-side gradient is per channel given dX, dAqk and dL, so each
  program takes one key block (and recomputes those three from V-sized inputs); the first key block
  also writes dv and dw. seg: packed documents' `Segments` or None; c2: CARVE's second signal per
  chunk (packed only)."""
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
  tokd = pl.BlockSpec((None, C), lambda b_, h_, n, j: (b_, n))
  ins = dict(q=(tokk, q), k=(tokk, k), g=(tokk, g), b=(tokk, b), w=(wspec, w), v=(tok(V), v))
  if carve:
    ins |= dict(c=(veck, c), gam=(pl.BlockSpec((None, BK), lambda b_, h_, n, j: (h_, j)),
                                  jnp.broadcast_to(gamma.astype(dt.cdt)[:, None], (H, K))))
  ins |= dict(h=(statek, h), dh=(statek, dh), vn=(tok(V), vn), dvn=(tok(V), dvn), do=(tok(V), do), A=(tok(C), A))
  if seg is not None:
    ins |= dict(doc=(tokd, seg.doc))
    if carve:
      ins |= dict(c2=(veck, c2), blk=(tokd, seg.blk))
  outs = dict(dq=(tokk, q), dk=(tokk, k), dg=(tokk, g), db=(tokk, b), dv=(tok(V), v), dw=(wspec, w))
  out_shape = [sd(x.shape, x.dtype) for _, x in outs.values()]
  if carve:
    outs |= dict(dgam=(veck, None))
    out_shape.append(sd((B, H, N, K), dt.cdt))
  kernel = by_name(_grad_kernel, [n + "_ref" for n in list(ins) + list(outs)], has_beta=has_beta, scale=scale, dt=dt)
  res = pl.pallas_call(
      kernel, grid=(B, H, N, K // BK),
      in_specs=[sp for sp, _ in ins.values()], out_specs=[sp for sp, _ in outs.values()], out_shape=out_shape,
      compiler_params=params(cfg.grad_num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_bwd_grads")(*[x for _, x in ins.values()])
  return (*res, None) if not carve else tuple(res)


def backward(q, k, v, g, b, w, gamma, seg, res, do, dsf, *, scale, chunk_size, cfg: TuningConfig, interpret):
  """Gradients (dq, dk, dv, dg, db, dw, dgamma or None, dS0) over padded inputs, from the forward's
  `Residuals` (seg: the packed documents' `Segments`, or None). db is d(erase logits) for CARVE; dw is dbeta [B, Tp, H] when w is beta. Input gradients
  come in the inputs' dtypes; dgamma in gamma's, dS0 in dsf's."""
  dt = Dtypes(q, interpret)
  kw = dict(scale=scale, C=chunk_size, cfg=cfg, dt=dt, interpret=interpret)
  do = do.astype(q.dtype)
  dvl, W = bprep(res, k, g, b, gamma, do, seg, **kw)
  dh, dvn, ds0 = bstate(res.qe, W, res.kd, res.gc, dvl, do, dsf, **kw)
  dq, dk, dg, db, dv, dw, dgam = grads(q, k, v, g, b, w, res.c, gamma, res.h, dh, res.vn, dvn, do, res.A, seg,
                                       res.c2, **kw)
  dgamma = None if gamma is None else dgam.sum((0, 2, 3)).astype(gamma.dtype)
  return dq, dk, dv, dg, db, dw, dgamma, ds0
