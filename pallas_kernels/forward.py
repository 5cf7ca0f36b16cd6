r"""Forward of the gated delta-rule family (CARVE, GDN-2, KDA, GDN) as three Pallas/Triton passes.

Per chunk of C tokens entering with state S (the math of `carve_jax.ops.chunk.chunk_step`;
`intra.py` for Aqk, L and the exact decay):

    A     = (I + L)^{-1},  W = A (b k e^G),  U = A (w v)     (b: erase gate, w: write gate or beta)
    V_new = U - W S
    S_out = e^{G_C} S + (k e^{G_C - G})^T V_new
    O     = scale [(q e^G) S + Aqk V_new]

1. `_prep_kernel`, chunk-parallel (grid B x H x N): everything that does not need the state. All
   families: Aqk, q e^G, Kd = k e^{G_C - G}, G_C. Gamma-free: L, A, W, U. CARVE, whose erase gate
   b = sigmoid(logits + gamma_h c_n) depends on the state: the gate-independent factors of L and
   of b k e^G (k times each decay part's row and column factor, k e^G), so that the state loop
   multiplies by the gate and runs matmuls, and nothing else.
2. `_state_kernel`, sequential over chunks (grid B x H x V/BV): stores the state entering every chunk
   (h, the tensor FLA calls h) and V_new; the final state stays float32.
   `_carve_state_kernel` (grid B x H; the content signal c_n = row-RMS(S) needs the whole value
   axis): per chunk it forms c_n, the gate, L, A and V_new = A (beta v - b k e^G S) in the loop.
3. `_output_kernel`, chunk-parallel: O = scale [(q e^G) h + Aqk V_new] (two matmuls).

Packed documents (optional `Segments`, `segments.py`): the same passes with per-token document masks
in the preparation (Aqk, L, q e^G, k e^G, Kd, G_C) and, for CARVE, a per-row content signal in the
state loop; without them nothing of this is traced.

Code size matters as much as arithmetic: per-key-block work runs in rolled loops (`kloop`), the
inverse's steps too (ncu on the v4 preparation kernel: 59% of issue slots lost to instruction fetch).

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
from pallas_kernels.intra import CONTENT_EPS, F32, Decay, block_unit_lower_inv, content_signal, lower_masks, mm
from pallas_kernels.segments import AT_CHUNK, AT_START, MID, NO_CARRY, Segments


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
      head=lambda K: pl.BlockSpec((None, K), lambda b, h, n: (h, 0)),
      doc=pl.BlockSpec((None, C), lambda b, h, n: (b, n)))


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


def kloop(K, block_k, body, init):
  """carry = body(sl, carry) for each key block sl of K (blocks of min(block_k, K)), as a rolled loop.

  A Python loop would unroll every block into the kernel: the preparation kernel was ~22k SASS
  instructions and ncu (H200, v5 call 1) showed 59% of its issue slots lost to instruction fetch
  (instruction-cache misses). The loop keeps one copy of the body."""
  BK = min(block_k, K)
  if BK == K:
    return body(slice(None), init)
  return lax.fori_loop(0, K // BK, lambda j, c: body(pl.ds(pl.multiple_of(j * BK, BK), BK), c), init)


def by_name(kernel, names, **params):
  """A pallas_call body handing its refs (the call's inputs, then its outputs) to `kernel` as the keyword
  arguments `names`; the kernel's optional refs that the call does not have stay None."""
  return lambda *refs: kernel(**dict(zip(names, refs)), **params)


def wy_w(A, k_ref, g_ref, gate, W_ref, *, dt, block_k):
  """W = A (gate k e^G) [C, K] of a chunk, written key block by key block; gate(sl) -> [C, BK].
  k and G are reloaded and recomputed here rather than kept live from earlier: fewer registers."""
  cdt = dt.cdt

  def wblock(sl, carry):
    k = k_ref[:, sl].astype(cdt)
    eG = jnp.exp(jnp.cumsum(g_ref[:, sl].astype(cdt), axis=0))
    W_ref[:, sl] = mm(A, gate(sl) * k * eG, dt.inv).astype(W_ref.dtype)
    return carry
  kloop(k_ref.shape[1], block_k, wblock, 0)


# ---- 1. chunk-parallel preparation ----

def _prep_kernel(*, q_ref, k_ref, g_ref, aqk_ref, qe_ref, kd_ref, gc_ref, b_ref=None, w_ref=None, v_ref=None,
                 doc_ref=None, blk_ref=None, W_ref=None, U_ref=None, A_ref=None, kr_ref=None, kc_ref=None, ke_ref=None,
                 kj_ref=None, gj_ref=None, has_beta, dt, block_k):
  """Everything of a chunk that does not need the state. All families: Aqk (lower, unscaled), q e^G,
  Kd, G_C. Gamma-free (b_ref given): L -> A, W, U. CARVE (kr_ref given): the gate-independent factors
  of the state pass, k * (row factor) and k * (column factor) of each decay part, and k e^G.
  Packed documents (doc_ref given, `segments.py`): Aqk and L within documents, q e^G and k e^G of the
  chunk's first document, Kd of its last, G_C = NO_CARRY when a document starts in the chunk; for CARVE
  (blk_ref given) also G_j (decay to the row before j, the row where a content block begins mid-chunk)
  and k e^{G_j - G} on the rows before j, from which the state pass forms the state at j."""
  cdt = dt.cdt
  C, K = k_ref.shape
  lower, strict = lower_masks(C)
  carve = kr_ref is not None
  pk = None if doc_ref is None else packed_masks(doc_ref[...])
  first = (lambda x: x) if pk is None else (lambda x: jnp.where(pk.first, x, 0.0))
  last = (lambda x: x) if pk is None else (lambda x: jnp.where(pk.last, x, 0.0))
  before = None if blk_ref is None else intra.iota(C, 1, 0) < mid_row(blk_ref[...])  # [C, 1]: rows < j

  def block(sl, carry):
    Aqk, L = carry
    q, k = q_ref[:, sl].astype(cdt), k_ref[:, sl].astype(cdt)
    g = g_ref[:, sl].astype(cdt)
    G, GC = jnp.cumsum(g, axis=0), jnp.sum(g, axis=0)
    eG = jnp.exp(G)
    bk = None if carve else b_ref[:, sl].astype(cdt) * k
    for p, (rf, cf, mask) in enumerate(Decay(G).parts()):
      kc = k * cf
      m = (lambda x: x) if mask is None else (lambda x, mask=mask: jnp.where(mask, x, 0.0))
      Aqk = Aqk + m(mm(q * rf, kc, dt.dot, trans_b=True))
      if carve:
        kr_ref[p, :, sl] = (k * rf).astype(kr_ref.dtype)
        kc_ref[p, :, sl] = kc.astype(kc_ref.dtype)
      else:
        L = L + m(mm(bk * rf, kc, dt.dot, trans_b=True))
    qe_ref[:, sl] = first(q * eG).astype(qe_ref.dtype)
    kd_ref[:, sl] = last(k * jnp.exp(GC[None, :] - G)).astype(kd_ref.dtype)
    gc_ref[sl] = (GC if pk is None else jnp.where(pk.carry, GC, NO_CARRY)).astype(gc_ref.dtype)
    if carve:
      ke_ref[:, sl] = first(k * eG).astype(ke_ref.dtype)
    if before is not None:
      Gj = jnp.sum(jnp.where(before, g, 0.0), axis=0)
      gj_ref[sl] = Gj.astype(gj_ref.dtype)
      kj_ref[:, sl] = jnp.where(before, k * jnp.exp(jnp.where(before, Gj[None, :] - G, 0.0)), 0.0).astype(kj_ref.dtype)
    return Aqk, L
  Aqk, L = kloop(K, block_k, block, (jnp.zeros((C, C), cdt), jnp.zeros((C, C), cdt)))
  aqk_ref[...] = jnp.where(lower if pk is None else lower & pk.same, Aqk, 0.0).astype(aqk_ref.dtype)
  if carve:
    return
  A = block_unit_lower_inv(jnp.where(strict if pk is None else strict & pk.same, L, 0.0), dt.inv)
  A_ref[...] = A.astype(A_ref.dtype)
  U_ref[...] = mm(A, write_gate(w_ref, has_beta, cdt) * v_ref[...].astype(cdt), dt.inv).astype(U_ref.dtype)
  wy_w(A, k_ref, g_ref, lambda sl: first(b_ref[:, sl].astype(cdt)), W_ref, dt=dt, block_k=block_k)


class PackedMasks(NamedTuple):
  """Masks of one chunk from its in-chunk document numbers d [C] (`segments.py`): same [C, C] (d_r = d_c),
  first [C, 1] (d_r = 0: rows the entering state reaches), last [C, 1] (rows of the chunk's last
  document: they alone reach the state leaving it), carry (scalar: no document starts in the chunk)."""
  same: jax.Array
  first: jax.Array
  last: jax.Array
  carry: jax.Array


def mid_row(blk):
  """j: the row where a content block begins mid-chunk (class MID), C when none; blk [C] int."""
  return jnp.min(jnp.where(blk == MID, lax.broadcasted_iota(jnp.int32, blk.shape, 0), blk.shape[0]))


def packed_masks(d):
  d_last = jnp.max(d)
  return PackedMasks(same=d[:, None] == d[None, :], first=(d == 0)[:, None], last=(d == d_last)[:, None],
                     carry=d_last == 0)


def n_parts(C):
  """Decay parts of a chunk of C tokens (`intra.Decay`): 1 + log2(C / 16)."""
  return len(intra.part_masks(C))


def prep(q, k, g, b, w, v, seg=None, *, C, cfg: TuningConfig, dt: Dtypes, interpret):
  """The chunk-parallel preparation; b = w = v = None for CARVE (whose gate needs the state); seg: None,
  or the packed documents' `Segments` (then CARVE also gets kj [B, Tp, H, K] and gj [B, H, N, K]).

  Returns a dict: aqk [B, Tp, H, C], qe, kd [B, Tp, H, K] (dt.store), gc [B, H, N, K] (float32); gamma-free:
  W [B, Tp, H, K], U [B, Tp, H, V] (dt.store), A [B, Tp, H, C] (float32); CARVE: kr, kc [P, B, Tp, H, K]
  (k times the row / column factor of each of the P decay parts) and ke = k e^G [B, Tp, H, K]."""
  B, Tp, H, K = k.shape
  N, P = Tp // C, n_parts(C)
  carve = b is None
  V = None if carve else v.shape[-1]
  t = tiles(C)
  sd = jax.ShapeDtypeStruct
  tok = lambda D: sd((B, Tp, H, D), dt.store)
  ins = dict(q=(t["tok"](K), q), k=(t["tok"](K), k), g=(t["tok"](K), g))
  if not carve:
    ins |= dict(b=(t["tok"](K), b), w=(t["tok1"] if w.ndim == 3 else t["tok"](V), w), v=(t["tok"](V), v))
  if seg is not None:
    ins |= dict(doc=(t["doc"], seg.doc)) | (dict(blk=(t["doc"], seg.blk)) if carve else {})
  outs = {"aqk": (t["tok"](C), tok(C)), "qe": (t["tok"](K), tok(K)), "kd": (t["tok"](K), tok(K)),
          "gc": (t["vec"](K), sd((B, H, N, K), dt.cdt))}
  if carve:
    part = pl.BlockSpec((P, None, C, None, K), lambda b_, h_, n: (0, b_, n, h_, 0))
    outs |= {"kr": (part, sd((P, B, Tp, H, K), dt.store)), "kc": (part, sd((P, B, Tp, H, K), dt.store)),
             "ke": (t["tok"](K), tok(K))}
    if seg is not None:
      outs |= {"kj": (t["tok"](K), tok(K)), "gj": (t["vec"](K), sd((B, H, N, K), dt.cdt))}
  else:
    outs |= {"W": (t["tok"](K), tok(K)), "U": (t["tok"](V), tok(V)), "A": (t["tok"](C), sd((B, Tp, H, C), dt.cdt))}

  kernel = by_name(_prep_kernel, [n + "_ref" for n in list(ins) + list(outs)], has_beta=not carve and w.ndim == 3,
                   dt=dt, block_k=cfg.block_k)
  res = pl.pallas_call(
      kernel, grid=(B, H, N), in_specs=[sp for sp, _ in ins.values()], out_specs=[o[0] for o in outs.values()],
      out_shape=[o[1] for o in outs.values()], compiler_params=params(cfg.num_warps, cfg.num_stages),
      interpret=interpret, name="carve_prep" if carve else "gated_delta_prep",
  )(*[x for _, x in ins.values()])
  return dict(zip(outs, res))


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


def _carve_state_kernel(*, l_ref, beta_ref, v_ref, kr_ref, kc_ref, ke_ref, kd_ref, gc_ref, gam_ref, s0_ref,
                        h_ref, vn_ref, c_ref, A_ref, sf_ref, doc_ref=None, blk_ref=None, kj_ref=None, gj_ref=None,
                        c2_ref=None, C, N, cb, dt, ks):
  """Per chunk: c_n (at a content-block start), gate = sigmoid(logits + gamma c_n),
  L = sum_p mask_p [(gate * kr_p) kc_p^T], A = (I + L)^{-1}, V_new = A (beta v - (gate * ke) S),
  S <- e^{G_C} S + Kd^T V_new. Every gate-independent factor comes from `prep` (small loop body).

  Live ranges decide the speed here (the state alone is 64 float32 registers a thread at 8 warps):
  the decay parts of L run as a rolled loop (their factors are loaded part by part, not all hoisted
  to the top of the body), and X = beta v - (gate ke) S is formed after the inverse, with the gate
  recomputed, so no [C, V] float32 accumulator is live across it. Offline compile (sm_90, 8 warps):
  2024 -> ~500-630 bytes of stack, 570 -> ~100-140 spill stores.

  Packed documents (doc_ref given): L within documents, and each row takes its content block's signal
  (`_carve_packed_signals`); the loop runs one pass of the solve per step, two steps in a chunk where a
  content block begins mid-chunk (`packed_step`: one copy of the solve code in the kernel)."""
  cdt = dt.cdt
  _, strict = lower_masks(C)
  n_parts = len(intra.part_masks(C))
  r, col = intra.iota(C, C, 0), intra.iota(C, C, 1)

  def gate_of(rows, sl, c):  # c: [BK] (one signal per chunk), or () -> [C, BK] (per row, packed documents)
    logits = l_ref[rows, sl].astype(cdt)
    c = c() if callable(c) else c  # per-row signals formed at each use: no [C, BK] value live across the inverse
    gc = (gam_ref[sl].astype(cdt) * c)[None, :] if c.ndim == 1 else gam_ref[sl].astype(cdt)[None, :] * c
    return jax.nn.sigmoid(logits + gc)

  def solve(rows, Ss, cs, keep, store=None):
    """(A, V_new) of the chunk at `rows` entering with the states Ss and content signals cs by key block;
    keep: the [C, C] mask of L (strictly lower; within documents when packed); store: None, or (sl, S) ->
    writes h and c, and A -> writes A (at the same points as before packed documents: live ranges)."""
    L = jnp.zeros((C, C), cdt)
    for sl, S, c in zip(ks, Ss, cs):
      if store is not None:
        store[0](sl, S)
      gate = gate_of(rows, sl, c)

      def part(p, L, gate=gate, sl=sl):  # part p's products kept inside blocks of 16 * 2^p (`intra.part_masks`)
        Lp = mm(gate * kr_ref[p, rows, sl].astype(cdt), kc_ref[p, rows, sl], dt.dot, trans_b=True)
        p = p if p.dtype == jnp.int32 else p.astype(jnp.int32)  # the loop index is int64 under x64
        size = lax.shift_left(jnp.int32(intra.DECAY_GROUP), p)
        return L + jnp.where(r // size == col // size, Lp, 0.0)
      L = lax.fori_loop(0, n_parts, part, L)
    A = block_unit_lower_inv(jnp.where(keep, L, 0.0), dt.inv)
    if store is not None:
      store[1](A)
    X = beta_ref[rows].astype(cdt)[:, None] * v_ref[rows, :].astype(cdt)
    for sl, S, c in zip(ks, Ss, cs):
      X = X - mm(gate_of(rows, sl, c) * ke_ref[rows, sl].astype(cdt), S, dt.dot)
    return A, mm(A, X, dt.inv)

  def body(n, carry):
    Ss, cs = carry                                  # state and content signal, by key block
    rows = pl.ds(n * C, C)
    new_block = lax.rem(n * C, cb) == 0
    cs = tuple(jnp.where(new_block, content_signal(S), c) for S, c in zip(Ss, cs))

    def store(sl, S, c_of=dict(zip([x.start for x in ks], cs))):
      h_ref[n, sl, :] = S.astype(h_ref.dtype)
      c_ref[n, sl] = c_of[sl.start].astype(c_ref.dtype)
    def store_A(A):
      A_ref[rows, :] = A.astype(A_ref.dtype)
    _, vn = solve(rows, Ss, cs, strict, (store, store_A))
    vn_ref[rows, :] = vn.astype(vn_ref.dtype)
    Ss = tuple(jnp.exp(gc_ref[n, sl].astype(cdt))[:, None] * S + mm(kd_ref[rows, sl], vn, dt.dot, trans_a=True)
               for sl, S in zip(ks, Ss))
    return Ss, cs

  def packed_step(carry):
    """One pass of the solve over chunk n of packed documents; second = 1 in the second pass of
    a chunk with a MID row. Each pass stores h, c, A, V_new and c2 (the second pass's overwrite the first's)
    and forms S_t = e^{g} S + k^T V_new: the state leaving the chunk (g, k = G_C, Kd) after its last pass,
    else the state at j (g, k = G_j, k e^{G_j - G}), whose signal is c2 of the second pass."""
    n, second, Ss, c_prev, c2s = carry
    rows = pl.ds(n * C, C)
    keep = strict & packed_masks(doc_ref[rows]).same
    cs, c2s, last, row_cs = _carve_packed_signals(blk_ref[rows], Ss, c_prev, c2s, second)
    def store(sl, S, c_of=dict(zip([x.start for x in ks], cs)), c2_of=dict(zip([x.start for x in ks], c2s))):
      h_ref[n, sl, :] = S.astype(h_ref.dtype)
      c_ref[n, sl] = c_of[sl.start].astype(c_ref.dtype)
      c2_ref[n, sl] = c2_of[sl.start].astype(c2_ref.dtype)
    def store_A(A):
      A_ref[rows, :] = A.astype(A_ref.dtype)
    _, vn = solve(rows, Ss, row_cs, keep, (store, store_A))
    vn_ref[rows, :] = vn.astype(vn_ref.dtype)
    Sts = tuple(jnp.exp(jnp.where(last, gc_ref[n, sl], gj_ref[n, sl]).astype(cdt))[:, None] * S
                + mm(jnp.where(last, kd_ref[rows, sl], kj_ref[rows, sl]), vn, dt.dot, trans_a=True)
                for sl, S in zip(ks, Ss))
    Ss = tuple(jnp.where(last, St, S) for St, S in zip(Sts, Ss))
    c_prev = tuple(jnp.where(last, intra.row_of(c(), C - 1), c0) for c, c0 in zip(row_cs, c_prev))  # the last row's
    step = last.astype(jnp.int32)
    return n + step, 1 - step, Ss, c_prev, tuple(content_signal(St) for St in Sts)

  S0 = tuple(s0_ref[sl, :].astype(cdt) for sl in ks)
  c0 = tuple(jnp.zeros((sl.stop - sl.start,), cdt) for sl in ks)
  if doc_ref is None:
    Ss, _ = lax.fori_loop(0, N, body, (S0, c0))
  else:  # 2N steps: the first N + (number of chunks with a MID row) run a pass, the rest pass the carry on
    # (not a while_loop: offline its compile spills a little more)
    step = lambda i, x: lax.cond(x[0] < N, packed_step, lambda x: x, x)
    Ss = lax.fori_loop(0, 2 * N, step, (jnp.int32(0), jnp.int32(0), S0, c0, c0))[2]
  for sl, S in zip(ks, Ss):
    sf_ref[sl, :] = S.astype(sf_ref.dtype)


def _carve_packed_signals(blk, Ss, c_prev, c2_prev, second):
  r"""CARVE's content signals of one pass over a chunk of packed documents (classes `blk` [C] of `segments.py`).

  Row r's signal: c1 (stored as c) where its block was carried in (CARRIED) or begun at row 0 (AT_CHUNK: the
  signal of the state entering the chunk), sqrt(CONTENT_EPS) in a block begun at a document start
  (AT_START), c2 in the block begun at row j > 0 (MID): the signal of the state at j,
  S_j = e^{G_j} S + (k e^{G_j - G})_{<j}^T V_new, where V_new of rows < j does not depend on c2. So a chunk
  with a MID row takes two passes: the first with c2 = c1 (its V_new of rows < j gives S_j, thus c2), the
  second with every row's signal, which is exact for any per-row gate; other chunks take one.
  Ss, c_prev: the state entering the chunk and the signal carried in; c2_prev: the second pass's c2 (the
  first pass's S_j signal); second: 1 in the second pass. Returns (c1, c2 by key block [BK], last: whether
  this pass is the chunk's last, the per-row signals by key block as () -> [C, BK], formed at each use)."""
  at_chunk = jnp.max(jnp.where(blk == AT_CHUNK, 1, 0)) > 0
  c1 = tuple(jnp.where(at_chunk, content_signal(S), c) for S, c in zip(Ss, c_prev))
  c2 = tuple(jnp.where(second > 0, c, c_) for c, c_ in zip(c2_prev, c1))
  last = (second > 0) | (jnp.max(jnp.where(blk == MID, 1, 0)) == 0)
  b = blk[:, None]
  per_row = lambda c1, c2: lambda: jnp.where(b == AT_START, CONTENT_EPS**0.5,
                                             jnp.where(b == MID, c2[None, :], c1[None, :]))
  return c1, c2, last, [per_row(x, y) for x, y in zip(c1, c2)]


def carve_state_kernel(cfg: TuningConfig, dtype, *, K: int, V: int, C: int, packed: bool, interpret: bool) -> str:
  """Which kernel runs CARVE's state pass: cfg.carve_state_kernel, "auto" resolved to "mosaic" where the Mosaic
  GPU kernel runs and has been checked (compiled, 16-bit inputs, head and chunk sizes in
  `mosaic_state.GPU_CHECKED_SIZES`, for packed documents in `mosaic_state.GPU_CHECKED_PACKED_SIZES`), else
  "triton"."""
  from pallas_kernels import mosaic_state  # noqa: PLC0415
  if cfg.carve_state_kernel != "auto":
    return cfg.carve_state_kernel
  checked = mosaic_state.GPU_CHECKED_PACKED_SIZES if packed else mosaic_state.GPU_CHECKED_SIZES
  runs = (not interpret and jnp.dtype(dtype).itemsize == 2 and mosaic_state.fits(K=K, V=V, C=C, packed=packed)
          and (K, V, C) in checked)
  return "mosaic" if runs else "triton"


class CarveStatePass(NamedTuple):
  """What CARVE's forward state pass returns (N = Tp / C): h [B, H, N, K, V] and V_new [B, Tp, H, V] in
  dt.store; c [B, H, N, K] float32; A [B, Tp, H, C] (float32; float16 from the Mosaic loop with its float16
  inverse); S_final [B, H, K, V]; c2 [B, H, N, K]: the signal of content blocks begun mid-chunk (packed
  documents only, else None); W [B, Tp, H, K] = A (gate k e^G) in dt.store (the Mosaic loop with
  `TuningConfig.mosaic_w`, else None: the backward forms it)."""
  h: jax.Array
  vn: jax.Array
  c: jax.Array
  A: jax.Array
  S: jax.Array
  c2: jax.Array | None = None
  W: jax.Array | None = None


def carve_state_pass(logits, beta, v, pre, gamma, S0, seg=None, *, C, cb, cfg: TuningConfig, dt: Dtypes,
                     interpret) -> CarveStatePass:
  """CARVE's state pass (`CarveStatePass`), the gate formed in the loop from `pre` (the dict of `prep`).
  seg: packed documents' `Segments` (then also c2). cfg.carve_state_kernel: "mosaic", or "auto" where it runs
  (`carve_state_kernel`): the Mosaic GPU kernel of `mosaic_state`; else this Triton kernel."""
  from pallas_kernels import mosaic_state  # noqa: PLC0415
  if carve_state_kernel(cfg, logits.dtype, K=logits.shape[-1], V=v.shape[-1], C=C, packed=seg is not None,
                        interpret=interpret) == "mosaic":
    return mosaic_state.carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, seg, C=C, cb=cb, interpret=interpret,
                                                inverse_kind=cfg.mosaic_inverse, ax_kind=cfg.mosaic_ax,
                                                emit_w=cfg.mosaic_w, approx_math=cfg.mosaic_approx_math)
  B, Tp, H, K = logits.shape
  V, N, P = v.shape[-1], Tp // C, n_parts(C)
  s = seq_specs(Tp, N)
  sd = jax.ShapeDtypeStruct
  gam = jnp.broadcast_to(gamma.astype(dt.cdt)[:, None], (H, K))
  parts = pl.BlockSpec((P, None, Tp, None, K), lambda b, h, j: (0, b, 0, h, 0))
  seqd = pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0))
  ins = dict(l=(s["tok"](K), logits), beta=(s["tok1"], beta), v=(s["tokv"](V), v), kr=(parts, pre["kr"]),
             kc=(parts, pre["kc"]), ke=(s["tok"](K), pre["ke"]), kd=(s["tok"](K), pre["kd"]),
             gc=(s["vecs"](K), pre["gc"]), gam=(s["head"](K), gam), s0=(s["state"](K, V), S0))
  outs = dict(h=(s["states"](K, V), sd((B, H, N, K, V), dt.store)), vn=(s["tokv"](V), sd((B, Tp, H, V), dt.store)),
              c=(s["vecs"](K), sd((B, H, N, K), dt.cdt)), A=(s["tokv"](C), sd((B, Tp, H, C), dt.cdt)),
              sf=(s["state"](K, V), sd((B, H, K, V), S0.dtype)))
  if seg is not None:
    ins |= dict(doc=(seqd, seg.doc), blk=(seqd, seg.blk), kj=(s["tok"](K), pre["kj"]), gj=(s["vecs"](K), pre["gj"]))
    outs |= dict(c2=(s["vecs"](K), sd((B, H, N, K), dt.cdt)))
  kernel = by_name(_carve_state_kernel, [n + "_ref" for n in list(ins) + list(outs)], C=C, N=N, cb=cb, dt=dt,
                   ks=kblocks(K, cfg.carve_block_k))
  return CarveStatePass(*pl.pallas_call(
      kernel, grid=(B, H, 1), in_specs=[sp for sp, _ in ins.values()], out_specs=[sp for sp, _ in outs.values()],
      out_shape=[x for _, x in outs.values()], compiler_params=params(cfg.carve_num_warps, cfg.num_stages),
      interpret=interpret, name="carve_state")(*[x for _, x in ins.values()]))


# ---- 3. chunk-parallel output ----

def _output_kernel(qe_ref, aqk_ref, h_ref, vn_ref, o_ref, *, scale, dt):
  o = mm(qe_ref[...], h_ref[...], dt.dot) + mm(aqk_ref[...], vn_ref[...], dt.dot)
  o_ref[...] = (scale * o).astype(o_ref.dtype)


def output(qe, aqk, h, vn, *, scale, C, cfg: TuningConfig, dt: Dtypes, interpret, out_dtype):
  """o = scale [(q e^G) S_in + Aqk V_new] [B, Tp, H, V] in out_dtype, from `prep`'s q e^G and Aqk."""
  B, Tp, H, K = qe.shape
  V = vn.shape[-1]
  t = tiles(C)
  return pl.pallas_call(
      functools.partial(_output_kernel, scale=scale, dt=dt), grid=(B, H, Tp // C),
      in_specs=[t["tok"](K), t["tok"](C), t["state"](K, V), t["tok"](V)],
      out_specs=t["tok"](V), out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
      compiler_params=params(cfg.num_warps, cfg.num_stages), interpret=interpret,
      name="gated_delta_output")(qe, aqk, h, vn)


class Residuals(NamedTuple):
  """What the forward keeps for the backward (all per chunk; N = Tp / C).

  h [B, H, N, K, V]: the state entering each chunk; vn [B, Tp, H, V]: V_new; c [B, H, N, K]: CARVE's
  content signal (None otherwise); A [B, Tp, H, C]: (I + L)^{-1} (float32; float16 from CARVE's Mosaic
  loop); aqk [B, Tp, H, C]: the lower-triangular Aqk (unscaled); qe, kd [B, Tp, H, K]: q e^G and
  k e^{G_C - G}; gc [B, H, N, K]:
  G_C (`segments.NO_CARRY` where a packed document starts in the chunk); W [B, Tp, H, K]: A (b k e^G)
  for the gamma-free families and CARVE's Mosaic loop (None for CARVE's Triton loop: the backward forms it
  from A and the saved gate);
  c2 [B, H, N, K]: CARVE's signal of the content block begun mid-chunk (packed documents only, else None)."""
  h: jax.Array
  vn: jax.Array
  c: jax.Array | None
  A: jax.Array
  aqk: jax.Array
  qe: jax.Array
  kd: jax.Array
  gc: jax.Array
  W: jax.Array | None
  c2: jax.Array | None = None


def forward(q, k, v, g, b, w, gamma, S0, seg: Segments | None = None, *, scale, chunk_size, content_block,
            cfg: TuningConfig, interpret):
  """Forward over padded inputs (Tp a multiple of chunk_size), public layout.

  q, k, g, b: [B, Tp, H, K]; v: [B, Tp, H, V]; w: [B, Tp, H, V] or beta [B, Tp, H] (when gamma [H] is
  given, b holds erase logits and w is beta). S0: [B, H, K, V] float32 (float64 under x64).
  seg: None, or the packed documents' `Segments` (`segments.py`).
  Returns (o [B, Tp, H, V] in q's dtype, S_final [B, H, K, V], `Residuals`).
  """
  dt = Dtypes(q, interpret)
  kw = dict(C=chunk_size, cfg=cfg, dt=dt, interpret=interpret)
  if gamma is not None:
    pre = prep(q, k, g, None, None, None, seg, **kw)
    h, vn, c, A, S, c2, W = carve_state_pass(b, w, v, pre, gamma, S0, seg, cb=content_block, **kw)
  else:
    pre = prep(q, k, g, b, w, v, seg, **kw)
    h, vn, S = state_pass(pre["W"], pre["U"], pre["kd"], pre["gc"], S0, **kw)
    c, A, W, c2 = None, pre["A"], pre["W"], None
  o = output(pre["qe"], pre["aqk"], h, vn, scale=scale, out_dtype=q.dtype, **kw)
  return o, S, Residuals(h=h, vn=vn, c=c, A=A, aqk=pre["aqk"], qe=pre["qe"], kd=pre["kd"], gc=pre["gc"], W=W, c2=c2)
