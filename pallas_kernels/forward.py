r"""Forward of the gated delta-rule family (CARVE, GDN-2, KDA, GDN) as three Pallas/Triton passes.

Per chunk of C tokens entering with state S (the math of `carve_jax.ops.chunk.chunk_step`;
`intra.py` for Aqk, L and the exact decay):

    A     = (I + L)^{-1},  W = A (b k e^G),  U = A (w v)     (b: erase gate, w: write gate or beta)
    V_new = U - W S
    S_out = e^{G_C} S + (k e^{G_C - G})^T V_new
    O     = scale [(q e^G) S + Aqk V_new]

1. `_prep_kernel`, chunk-parallel (grid B x H x N): W, U, Kd = k e^{G_C - G} and G_C per chunk.
   Skipped for CARVE, whose erase gate b = sigmoid(logits + gamma_h c_n) depends on the state.
2. `_state_kernel`, sequential over chunks (grid B x H x V/BV): stores the state entering every chunk
   (h, the tensor FLA calls h) and V_new; the final state stays float32.
   `_carve_state_kernel` (grid B x H; the content signal c_n = row-RMS(S) needs the whole value
   axis): per chunk it forms c_n, the gate, L, A and V_new = A (beta v - b k e^G S) in the loop.
3. `_output_kernel`, chunk-parallel: O from h, V_new and Aqk.

Dots: bf16 operands with float32 accumulation for 16-bit inputs; the inverse and products with A
in TF32 on the GPU (float32 in interpret mode); float32 inputs use TF32x3 on the GPU. Stored
intermediates (h, V_new, W, U, Kd) are in the input dtype for 16-bit inputs, float32 otherwise.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import intra
from pallas_kernels.config import TuningConfig
from pallas_kernels.intra import F32, Decay, block_unit_lower_inv, content_signal, lower_masks, mm


class Dtypes:
  """dot: operands of data dots; inv: the inverse and products with A; cdt: elementwise math;
  store: stored intermediates (states, V_new, W, ...)."""

  def __init__(self, x, interpret: bool):
    d = jnp.dtype(x.dtype)
    if d == jnp.float64:
      self.dot = self.inv = self.cdt = self.store = jnp.float64
    elif d in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      self.dot, self.inv, self.cdt, self.store = d.type, (F32 if interpret else intra.TF32), F32, d.type
    else:
      self.dot = self.inv = F32 if interpret else intra.TF32X3
      self.cdt = self.store = F32


def tiles(C):
  """BlockSpec factories for chunk-parallel kernels on grid (B, H, N)."""
  return dict(
      tok=lambda D: pl.BlockSpec((None, C, None, D), lambda b, h, n: (b, n, h, 0)),
      tok1=pl.BlockSpec((None, C, None), lambda b, h, n: (b, n, h)),
      vec=lambda K: pl.BlockSpec((None, None, None, K), lambda b, h, n: (b, h, n, 0)),
      state=lambda K, V: pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0)),
      head=lambda K: pl.BlockSpec((None, K), lambda b, h, n: (h, 0)))


def seq_specs(Tp, N):
  """BlockSpec factories for sequential kernels on grid (B, H, NV): whole sequences, value tiles."""
  return dict(
      tok=lambda D: pl.BlockSpec((None, Tp, None, D), lambda b, h, j: (b, 0, h, 0)),
      tokv=lambda BV: pl.BlockSpec((None, Tp, None, BV), lambda b, h, j: (b, 0, h, j)),
      tok1=pl.BlockSpec((None, Tp, None), lambda b, h, j: (b, 0, h)),
      vecs=lambda K: pl.BlockSpec((None, None, N, K), lambda b, h, j: (b, h, 0, 0)),
      states=lambda K, BV: pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j)),
      state=lambda K, BV: pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j)),
      head=lambda K: pl.BlockSpec((None, K), lambda b, h, j: (h, 0)))


def params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def write_gate(w_ref, has_beta, cdt):
  """[C, 1] beta or [C, V] w of a chunk-tile ref."""
  return w_ref[...].astype(cdt)[:, None] if has_beta else w_ref[...].astype(cdt)


def kblocks(K, block_k):
  """Static slices of the key axis: per-channel math (decay, gates) is done block by block, which keeps
  the [C, BK] float32 temporaries of the exact decay in registers."""
  BK = min(block_k, K)
  return [slice(i, i + BK) for i in range(0, K, BK)]


# ---- 1. chunk-parallel preparation (gamma-free families) ----

def _prep_kernel(k_ref, g_ref, b_ref, w_ref, v_ref, W_ref, U_ref, kd_ref, gc_ref, A_ref, *, has_beta, dt, ks):
  cdt = dt.cdt
  _, strict = lower_masks(k_ref.shape[0])
  L = 0.0
  for sl in ks:
    k = k_ref[:, sl].astype(cdt)
    (Lp,) = Decay(jnp.cumsum(g_ref[:, sl].astype(cdt), axis=0)).pairs([b_ref[:, sl].astype(cdt) * k], k, dt.dot)
    L = L + Lp
  A = block_unit_lower_inv(jnp.where(strict, L, 0.0), dt.inv)
  A_ref[...] = A.astype(A_ref.dtype)
  U_ref[...] = mm(A, write_gate(w_ref, has_beta, cdt) * v_ref[...].astype(cdt), dt.inv).astype(U_ref.dtype)
  for sl in ks:  # reloaded and recomputed rather than kept from the first loop: fewer live registers
    k, g = k_ref[:, sl].astype(cdt), g_ref[:, sl].astype(cdt)
    G, GC = jnp.cumsum(g, axis=0), jnp.sum(g, axis=0)
    W_ref[:, sl] = mm(A, b_ref[:, sl].astype(cdt) * k * jnp.exp(G), dt.inv).astype(W_ref.dtype)
    kd_ref[:, sl] = (k * jnp.exp(GC[None, :] - G)).astype(kd_ref.dtype)
    gc_ref[sl] = GC.astype(gc_ref.dtype)


def prep(k, g, b, w, v, *, C, cfg: TuningConfig, dt: Dtypes, interpret):
  """W, U, Kd [B, Tp, H, *] (dt.store), G_C [B, H, N, K] and A = (I + L)^{-1} [B, Tp, H, C] (float32)."""
  B, Tp, H, K = k.shape
  V, N = v.shape[-1], Tp // C
  has_beta = w.ndim == 3
  t = tiles(C)
  sd = jax.ShapeDtypeStruct
  return pl.pallas_call(
      functools.partial(_prep_kernel, has_beta=has_beta, dt=dt, ks=kblocks(K, cfg.block_k)), grid=(B, H, N),
      in_specs=[t["tok"](K), t["tok"](K), t["tok"](K), t["tok1"] if has_beta else t["tok"](V), t["tok"](V)],
      out_specs=[t["tok"](K), t["tok"](V), t["tok"](K), t["vec"](K), t["tok"](C)],
      out_shape=[sd((B, Tp, H, K), dt.store), sd((B, Tp, H, V), dt.store), sd((B, Tp, H, K), dt.store),
                 sd((B, H, N, K), dt.cdt), sd((B, Tp, H, C), dt.cdt)],
      compiler_params=params(cfg.num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_prep")(k, g, b, w, v)


# ---- 2. sequential state pass ----

def _state_kernel(W_ref, U_ref, kd_ref, gc_ref, s0_ref, h_ref, vn_ref, sf_ref, *, C, N, dt):
  def body(n, S):
    rows = pl.ds(n * C, C)
    h_ref[n] = S.astype(h_ref.dtype)
    vn = U_ref[rows, :].astype(dt.cdt) - mm(W_ref[rows, :], S, dt.dot)
    vn_ref[rows, :] = vn.astype(vn_ref.dtype)
    return jnp.exp(gc_ref[n].astype(dt.cdt))[:, None] * S + mm(kd_ref[rows, :], vn, dt.dot, trans_a=True)
  sf_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(dt.cdt)).astype(sf_ref.dtype)


def state_pass(W, U, kd, gc, S0, *, C, cfg: TuningConfig, dt: Dtypes, interpret):
  """(h [B, H, N, K, V], V_new [B, Tp, H, V], S_final [B, H, K, V]) from the prepared W, U, Kd, G_C."""
  B, Tp, H, K = W.shape
  V, N = U.shape[-1], Tp // C
  BV = cfg.value_tile(V)
  s = seq_specs(Tp, N)
  sd = jax.ShapeDtypeStruct
  return pl.pallas_call(
      functools.partial(_state_kernel, C=C, N=N, dt=dt), grid=(B, H, V // BV),
      in_specs=[s["tok"](K), s["tokv"](BV), s["tok"](K), s["vecs"](K), s["state"](K, BV)],
      out_specs=[s["states"](K, BV), s["tokv"](BV), s["state"](K, BV)],
      out_shape=[sd((B, H, N, K, V), dt.store), sd((B, Tp, H, V), dt.store), sd((B, H, K, V), S0.dtype)],
      compiler_params=params(cfg.state_num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_state")(W, U, kd, gc, S0)


def _carve_state_kernel(k_ref, g_ref, l_ref, beta_ref, v_ref, gam_ref, s0_ref, h_ref, vn_ref, c_ref, A_ref, kd_ref,
                        gc_ref, sf_ref, *, C, N, cb, dt, ks):
  cdt = dt.cdt
  _, strict = lower_masks(C)

  def body(n, carry):
    Ss, cs = carry                                  # state and content signal, by key block
    rows = pl.ds(n * C, C)
    new_block = lax.rem(n * C, cb) == 0
    cs = tuple(jnp.where(new_block, content_signal(S), c) for S, c in zip(Ss, cs))
    L, X, parts = 0.0, beta_ref[rows].astype(cdt)[:, None] * v_ref[rows, :].astype(cdt), []
    for sl, S, c in zip(ks, Ss, cs):
      h_ref[n, sl, :] = S.astype(h_ref.dtype)
      c_ref[n, sl] = c.astype(c_ref.dtype)
      k = k_ref[rows, sl].astype(cdt)
      G = jnp.cumsum(g_ref[rows, sl].astype(cdt), axis=0)
      bk = jax.nn.sigmoid(l_ref[rows, sl].astype(cdt) + (gam_ref[sl].astype(cdt) * c)[None, :]) * k
      (Lp,) = Decay(G).pairs([bk], k, dt.dot)
      L = L + Lp
      X = X - mm(bk * jnp.exp(G), S, dt.dot)
    A = block_unit_lower_inv(jnp.where(strict, L, 0.0), dt.inv)
    A_ref[rows, :] = A.astype(A_ref.dtype)
    vn = mm(A, X, dt.inv)
    vn_ref[rows, :] = vn.astype(vn_ref.dtype)
    for sl, S in zip(ks, Ss):  # k and G reloaded / recomputed, not kept live across the solve
      g = g_ref[rows, sl].astype(cdt)
      G, GC = jnp.cumsum(g, axis=0), jnp.sum(g, axis=0)
      kd = k_ref[rows, sl].astype(cdt) * jnp.exp(GC[None, :] - G)
      kd_ref[rows, sl] = kd.astype(kd_ref.dtype)
      gc_ref[n, sl] = GC.astype(gc_ref.dtype)
      parts.append(jnp.exp(GC)[:, None] * S + mm(kd, vn, dt.dot, trans_a=True))
    return tuple(parts), cs

  S0 = tuple(s0_ref[sl, :].astype(cdt) for sl in ks)
  c0 = tuple(jnp.zeros((sl.stop - sl.start,), cdt) for sl in ks)
  Ss, _ = lax.fori_loop(0, N, body, (S0, c0))
  for sl, S in zip(ks, Ss):
    sf_ref[sl, :] = S.astype(sf_ref.dtype)


def carve_state_pass(k, g, logits, beta, v, gamma, S0, *, C, cb, cfg: TuningConfig, dt: Dtypes, interpret):
  """(h, V_new, c [B, H, N, K], A [B, Tp, H, C], Kd [B, Tp, H, K], G_C [B, H, N, K], S_final): CARVE's state
  pass with the gate formed in the loop (c, A, G_C float32; h, V_new, Kd in dt.store)."""
  B, Tp, H, K = k.shape
  V, N = v.shape[-1], Tp // C
  s = seq_specs(Tp, N)
  sd = jax.ShapeDtypeStruct
  gam = jnp.broadcast_to(gamma.astype(dt.cdt)[:, None], (H, K))
  return pl.pallas_call(
      functools.partial(_carve_state_kernel, C=C, N=N, cb=cb, dt=dt, ks=kblocks(K, cfg.carve_block_k)), grid=(B, H, 1),
      in_specs=[s["tok"](K), s["tok"](K), s["tok"](K), s["tok1"], s["tokv"](V), s["head"](K), s["state"](K, V)],
      out_specs=[s["states"](K, V), s["tokv"](V), s["vecs"](K), s["tokv"](C), s["tok"](K), s["vecs"](K),
                 s["state"](K, V)],
      out_shape=[sd((B, H, N, K, V), dt.store), sd((B, Tp, H, V), dt.store), sd((B, H, N, K), dt.cdt),
                 sd((B, Tp, H, C), dt.cdt), sd((B, Tp, H, K), dt.store), sd((B, H, N, K), dt.cdt),
                 sd((B, H, K, V), S0.dtype)],
      compiler_params=params(cfg.carve_num_warps, cfg.num_stages), interpret=interpret,
      name="carve_state")(k, g, logits, beta, v, gam, S0)


# ---- 3. chunk-parallel output ----

def _output_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref, aqk_ref, qe_ref, *, scale, dt, ks):
  cdt = dt.cdt
  lower, _ = lower_masks(q_ref.shape[0])
  Aqk = o = 0.0
  for sl in ks:
    q, k = q_ref[:, sl].astype(cdt), k_ref[:, sl].astype(cdt)
    G = jnp.cumsum(g_ref[:, sl].astype(cdt), axis=0)
    (Ap,) = Decay(G).pairs([q], k, dt.dot)
    Aqk = Aqk + Ap
    qe = q * jnp.exp(G)
    qe_ref[:, sl] = qe.astype(qe_ref.dtype)
    o = o + mm(qe, h_ref[sl, :], dt.dot)
  Aqk = jnp.where(lower, Aqk, 0.0)
  aqk_ref[...] = Aqk.astype(aqk_ref.dtype)
  o = o + mm(Aqk, vn_ref[...], dt.dot)
  o_ref[...] = (scale * o).astype(o_ref.dtype)


def output(q, k, g, h, vn, *, scale, C, cfg: TuningConfig, dt: Dtypes, interpret):
  """(o [B, Tp, H, V] in q's dtype, Aqk [B, Tp, H, C] (lower, unscaled) and q e^G [B, Tp, H, K] in dt.store)."""
  B, Tp, H, K = q.shape
  V, N = vn.shape[-1], Tp // C
  t = tiles(C)
  return pl.pallas_call(
      functools.partial(_output_kernel, scale=scale, dt=dt, ks=kblocks(K, cfg.block_k)), grid=(B, H, N),
      in_specs=[t["tok"](K), t["tok"](K), t["tok"](K), t["state"](K, V), t["tok"](V)],
      out_specs=[t["tok"](V), t["tok"](C), t["tok"](K)],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, H, V), q.dtype), jax.ShapeDtypeStruct((B, Tp, H, C), dt.store),
                 jax.ShapeDtypeStruct((B, Tp, H, K), dt.store)],
      compiler_params=params(cfg.num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_output")(q, k, g, h, vn)


class Residuals(NamedTuple):
  """What the forward keeps for the backward (all per chunk; N = Tp / C).

  h [B, H, N, K, V]: the state entering each chunk; vn [B, Tp, H, V]: V_new; c [B, H, N, K]: CARVE's
  content signal (None otherwise); A [B, Tp, H, C]: (I + L)^{-1} (float32); aqk [B, Tp, H, C]: the
  lower-triangular Aqk (unscaled); qe, kd [B, Tp, H, K]: q e^G and k e^{G_C - G}; gc [B, H, N, K]:
  G_C; W [B, Tp, H, K]: A (b k e^G) for the gamma-free families (None for CARVE, whose backward
  forms it from A and the saved gate)."""
  h: jax.Array
  vn: jax.Array
  c: jax.Array | None
  A: jax.Array
  aqk: jax.Array
  qe: jax.Array
  kd: jax.Array
  gc: jax.Array
  W: jax.Array | None


def forward(q, k, v, g, b, w, gamma, S0, *, scale, chunk_size, content_block, cfg: TuningConfig, interpret):
  """Forward over padded inputs (Tp a multiple of chunk_size), public layout.

  q, k, g, b: [B, Tp, H, K]; v: [B, Tp, H, V]; w: [B, Tp, H, V] or beta [B, Tp, H] (when gamma [H] is
  given, b holds erase logits and w is beta). S0: [B, H, K, V] float32 (float64 under x64).
  Returns (o [B, Tp, H, V] in q's dtype, S_final [B, H, K, V], `Residuals`).
  """
  dt = Dtypes(q, interpret)
  C = chunk_size
  kw = dict(C=C, cfg=cfg, dt=dt, interpret=interpret)
  if gamma is not None:
    h, vn, c, A, kd, gc, S = carve_state_pass(k, g, b, w, v, gamma, S0, cb=content_block, **kw)
    W = None
  else:
    W, U, kd, gc, A = prep(k, g, b, w, v, **kw)
    h, vn, S = state_pass(W, U, kd, gc, S0, **kw)
    c = None
  o, aqk, qe = output(q, k, g, h, vn, scale=scale, **kw)
  return o, S, Residuals(h=h, vn=vn, c=c, A=A, aqk=aqk, qe=qe, kd=kd, gc=gc, W=W)
