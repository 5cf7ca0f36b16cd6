r"""CARVE's sequential forward state pass (`forward.carve_state_pass`) as a Mosaic GPU kernel, the default on
the GPU (`TuningConfig(carve_state_kernel="auto")`: 16-bit inputs, `GPU_CHECKED_SIZES`; packed documents since
v11, `GPU_CHECKED_PACKED_SIZES`: packed CARVE fwd+bwd x1.20 / x1.38 of unpacked, was x1.57 / x2.38 on Triton):
on the H200 1.73-1.83 ms against the Triton loop's 3.8-3.9 at B2 T8192 H16, 0.67 against 1.2-1.5 at B8 T2048
(v9), and with A X in float16 and the backward's W from the loop CARVE's fwd+bwd is 0.80 / 0.88x FLA's
chunk_gdn2 (v10; `NOTES.md`: the figures, where a chunk's time goes, what is next).

What is checked: on the H200, agreement with the Triton pass and with the float32 reference through the
kernels' forward and backward at heads 128 and 64 (`tests/test_mosaic_state.py`'s GPU tests, run on v10 at
4b8108a, the packed ones at e9d2b3c: the Triton loop's errors), and `kernel_probe --carve-only`; on the CPU,
in CI: agreement in Mosaic GPU's interpret mode, alone and through the kernels' forward and backward (the
interpreter takes SMEM operands only, so it checks the stored-operand path: `a_regs=False`), and the GPU
path lowers for CUDA
(`jax.export(..., platforms=["cuda"])`: Mosaic's checks of wgmma operands, layouts and shared memory)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.forward import CarveStatePass


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
  return InterpretGPUParams()


def _transforms(dtype, minor: int):
  """SMEM tiling + swizzle of a wgmma operand whose minor dimension has `minor` elements."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def mask_codes(C: int, group: int, dtype):
  """[C, C] codes of the in-chunk masks (small integers, exact in 16 bits): 0 above the diagonal, 1 on it,
  2 + l below it, l the level of the smallest diagonal block of group * 2^l rows holding the pair."""
  r, c = jnp.arange(C)[:, None], jnp.arange(C)[None, :]
  level = jnp.zeros((C, C), jnp.int32)
  size = group
  while size < C:
    level = level + (r // size != c // size)
    size *= 2
  return jnp.where(r > c, 2 + level, jnp.where(r == c, 1, 0)).astype(dtype)


class _Masks:
  """The in-chunk masks as [C, C] 0/1 factors, formed at each use from `mask_codes` in SMEM: a load the
  compiler does not hoist out of the chunk loop (hoisted, each mask would hold C * C / 128 registers a
  thread all loop long), and float compares only (no integer [C, C] arrays)."""

  def __init__(self, codes_s):
    self.codes_s = codes_s

  def _code(self):
    return plgpu.load(self.codes_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)

  def lower_within(self, level: int):  # strictly lower, inside the diagonal blocks of group * 2^level rows
    code = self._code()
    return ((code >= 2.0) & (code <= 2.0 + level)).astype(jnp.float32)

  def lower_across(self):  # strictly lower, outside the diagonal blocks of group rows
    return (self._code() >= 3.0).astype(jnp.float32)

  def eye(self):
    return (self._code() == 1.0).astype(jnp.float32)


def _halves(x, dtype):
  """(hi, lo): hi = x in the 16-bit dtype, lo = x - hi in it (hi + lo ~ x to ~2^-16 relative for bf16)."""
  hi = x.astype(dtype)
  return hi, (x - hi.astype(jnp.float32)).astype(dtype)


def _split_store(x, *pairs, commit: bool = True):
  """`_halves` of x into each (hi, lo) pair of SMEM refs (then committed for wgmma and TMA)."""
  hi, lo = _halves(x, pairs[0][0].dtype)
  for hi_s, lo_s in pairs:
    hi_s[...] = hi
    lo_s[...] = lo
  if commit:
    plgpu.commit_smem()


def _wgmmas(terms, shape):
  """[sum of a @ b over the (a, b) pairs of t, for t in terms]: every wgmma issued, one float32 accumulator per
  t, then one wait (a: an SMEM ref or a WGMMA-layout 16-bit array, from registers; b: an SMEM ref)."""
  def scope(*accs):
    for acc, t in zip(accs, terms):
      for a, b in t:
        plgpu.wgmma(acc, a, b)
    plgpu.wgmma_wait(0)
    return [acc[...] for acc in accs]
  return pl.run_scoped(scope, *[plgpu.ACC(shape, jnp.float32) for _ in terms])


def _mm(a, b_s, shape):
  """a @ b of 16-bit operands into a fresh accumulator (Mosaic GPU's interpret mode in jax 0.11.2 can neither
  store into an accumulator ref nor take the left operand from registers)."""
  return _wgmmas([[(a, b_s)]], shape)[0]


def _left(x, refs, a_regs: bool):
  """x as a wgmma's left operand: x itself (registers: a_regs, on the GPU), else stored in SMEM (Mosaic GPU's
  interpret mode takes no register operands): refs a (hi, lo) pair (x float32: `_split_store`, for `_mms3`) or
  one ref (x 16-bit, for `_mm`)."""
  if a_regs:
    return x
  if isinstance(refs, tuple):
    _split_store(x, refs)
  else:
    refs[...] = x
    plgpu.commit_smem()
  return refs


def _mms(lefts, b_s, shape):
  """[a @ b for a in lefts] of 16-bit operands, issued together, one wait (`_wgmmas`)."""
  return _wgmmas([[(a, b_s)] for a in lefts], shape)


def _mms3(lefts, b, shape):
  """[a @ b for a in lefts], a ~ a_hi + a_lo and b ~ b_hi + b_lo (`_halves`: finer than one TF32 pass) as
  a_hi b_hi + a_hi b_lo + a_lo b_hi, three wgmmas each, issued together, one wait; float32 accumulation.
  lefts: float32 arrays in the WGMMA layout (split here: from registers) or SMEM (hi, lo) pairs; b: a pair."""
  bh_s, bl_s = b
  halves = [a if isinstance(a, tuple) else _halves(a, bh_s.dtype) for a in lefts]
  return _wgmmas([[(ah, bh_s), (ah, bl_s), (al, bh_s)] for ah, al in halves], shape)


class Products(NamedTuple):
  """The inverse's [C, C] products. kind "f16": one float16 wgmma (11-bit significand, like TF32), the right
  operand stored once; "bf16x3": three bfloat16 wgmmas of hi / lo halves (`_mms3`, ~16 bits), the right
  operand's two halves stored. b: the right operand's SMEM (f16: one ref; bf16x3: a (hi, lo) pair); lefts:
  SMEM for up to two left operands in interpret mode (f16: refs; bf16x3: pairs), None on the GPU (registers)."""
  kind: str
  b: Any
  lefts: Any

  def right(self, x):
    """Stores x (float32, the b refs' shape) as the right operand of the next products (committed)."""
    if self.kind == "f16":
      self.b[...] = x.astype(jnp.float16)
      plgpu.commit_smem()
    else:
      _split_store(x, self.b)

  def times(self, xs):
    """[x @ right for x in xs] (xs float32 [M, C] arrays), issued together, one wait."""
    shape = (xs[0].shape[0], (self.b if self.kind == "f16" else self.b[0]).shape[-1])
    if self.kind == "f16":
      xs = [x.astype(jnp.float16) for x in xs]
      if self.lefts is not None:
        xs = [_left(x, ref, False) for x, ref in zip(xs, self.lefts)]
      return _mms(xs, self.b, shape)
    if self.lefts is not None:
      xs = [_left(x, pair, False) for x, pair in zip(xs, self.lefts)]
    return _mms3(xs, self.b, shape)


def _geometric(X, P, levels: int, prod: Products, eye):
  """X prod_{j < levels} (I + P^(2^j)) (X None: the identity), one dependent step per factor: P^(2^(j+1)) =
  P^(2^j) P^(2^j) and X P^(2^j) share the stored right operand P^(2^j), so they are issued together."""
  for j in range(levels):
    prod.right(P)
    lefts = ([P] if j + 1 < levels else []) + ([] if X is None else [X])
    out = prod.times(lefts) if lefts else []
    X = eye + P if X is None else X + out[-1]
    if j + 1 < levels:
      P = out[0]
  return X


def inverse(L, prod: Products, masks: _Masks, group: int):
  """(I + L)^{-1} for strictly lower L [C, C] (float32, registers), in C / group diagonal blocks then merged:
    D = (I + L_d)^{-1} = (I + N)(I + N^2)(I + N^4)(I + N^8), N = -L_d    (group 16: four dependent steps)
    (I + L)^{-1} = D sum_{m < C / group} Q^m = D (I + Q)(I + Q^2), Q = -L_o D   (I + L = (I + L_o D)(I + L_d))
  Seven dependent product steps at C = 64 (`_geometric` pairs the products that share a right operand).
  prod.kind "f16" needs the operands' entries below 6.5e4: with unit-norm keys, gates in (0, 1) and decays
  <= 1, |L| <= 1, so N^m <= C(14, 7) = 3432 and D <= 2^14 (the doubling is safe); the merge's Q and A stay
  there for any chunk whose inverse is not itself ill-conditioned (A's entries are the WY weights)."""
  eye = masks.eye()
  D = _geometric(None, -(masks.lower_within(0) * L), group.bit_length() - 1, prod, eye)
  levels = (L.shape[0] // group).bit_length() - 1
  if levels == 0:
    return D
  prod.right(D)
  Q = -prod.times([masks.lower_across() * L])[0]
  return _geometric(D, Q, levels, prod, eye)


PROFILE_REGIONS_PER_CHUNK = 13  # the most `scope` ranges a warpgroup records in a chunk (solve: 7 with W + 2 a part)
PROFILE_MAX_CHUNKS = 12  # their trace buffer: 16 bytes a range a warpgroup, in the SMEM left (~9 KB)


INVERSE_KINDS = ("f16", "bf16x3")
SMEM_LIMIT = 227 * 1024  # shared memory of one block on the H100 / H200
SMEM_RESERVE = 4096  # barriers, the reduction scratch, alignment
# (K, V, C) at which the compiled kernel has passed the GPU tests: "auto" picks it only there (interpret mode
# does not check the SMEM tiling and swizzles the hardware needs; `tests/test_mosaic_state.py`'s GPU tests).
GPU_CHECKED_SIZES = frozenset({(128, 128, 64), (64, 64, 64)})  # head 64: the GPU tests at 4b8108a
# packed documents: `tests/test_mosaic_state.py::test_gpu_mosaic_packed` and the packed kernel tests at e9d2b3c
GPU_CHECKED_PACKED_SIZES = frozenset({(128, 128, 64), (64, 64, 64)})


def _buffers(K: int, V: int, C: int, dt, inv_dt, ax_dt, packed: bool = False):
  """The kernel's SMEM on the GPU: name -> (shape, dtype, whether a wgmma / TMA tile: tiled and swizzled);
  packed documents add a chunk's document numbers and content classes and the mid-chunk block's signal."""
  f32 = jnp.float32
  extra = dict(doc=((C,), dt, False), docc=((C,), dt, False), blk=((C,), dt, False), c2=((K,), f32, False)) \
      if packed else {}  # (doc loaded as rows, docc as columns: one SMEM ref takes one register layout)
  return extra | dict(l=((C, K), dt, True), v=((C, V), dt, True), ke=((C, K), dt, True), beta=((C,), dt, False),
              kd=((C, K), dt, True), gc=((K,), f32, False), gam=((K,), f32, False), codes=((C, C), dt, True),
              s16=((K, V), dt, True), c=((K,), f32, False), xh=((C, V), dt, True), xl=((C, V), ax_dt, True),
              bh=((C, C), inv_dt, True), bl=((C, C), inv_dt, True), kr=((2, C, K), dt, True),
              kc=((2, C, K), dt, True))


def smem_bytes(K: int, V: int, C: int, packed: bool = False) -> int:
  """Bytes of the kernel's SMEM buffers at head sizes K, V and chunk C (16-bit inputs)."""
  return sum(math.prod(shape) * jnp.dtype(d).itemsize
             for shape, d, _ in _buffers(K, V, C, jnp.bfloat16, jnp.float16, jnp.float16, packed).values())


def fits(*, K: int, V: int, C: int, packed: bool = False) -> bool:
  """Whether the kernel runs at these sizes: wgmma tiles (multiples of 64) and SMEM within one block's."""
  return (K % 64 == 0 and V % 64 == 0 and C % 64 == 0
          and smem_bytes(K, V, C, packed) <= SMEM_LIMIT - SMEM_RESERVE)


class PassSchedule(NamedTuple):
  """The passes of the packed loop over chunks (`packed_schedule`; M = 2N entries, those past npass unused):
  chunk [B, M] int32, the chunk of pass i; kind [B, M] int32: 0 the chunk's only pass, 1 the first of two
  (its V_new gives the state at the mid-chunk block's row j, thus c2), 2 the second; info [B, N, 3] float32
  per chunk: a content block begins at row 0 (AT_CHUNK), the last row's class is MID, is AT_START;
  npass [B] int32: N + the number of chunks with a MID row."""
  chunk: jax.Array
  kind: jax.Array
  info: jax.Array
  npass: jax.Array


def packed_schedule(blk, C: int) -> PassSchedule:
  """`PassSchedule` from the content classes blk [B, Tp] (`segments.py`): one pass per chunk, two where a
  content block begins mid-chunk (as the Triton loop's `forward._carve_packed_signals`)."""
  from pallas_kernels.segments import AT_CHUNK, AT_START, MID  # noqa: PLC0415
  B, Tp = blk.shape
  N = Tp // C
  b3 = blk.reshape(B, N, C)
  has_mid = jnp.any(b3 == MID, axis=-1).astype(jnp.int32)             # [B, N]
  ends = jnp.cumsum(1 + has_mid, axis=1)                               # one past chunk n's last pass
  i = jnp.arange(2 * N, dtype=jnp.int32)
  chunk = jnp.minimum(jnp.sum(ends[:, None, :] <= i[None, :, None], axis=-1), N - 1).astype(jnp.int32)
  first = jnp.take_along_axis(ends - 1 - has_mid, chunk, axis=1) == i[None, :]
  kind = jnp.where(jnp.take_along_axis(has_mid, chunk, axis=1) == 0, 0, jnp.where(first, 1, 2))
  info = jnp.stack([b3[..., 0] == AT_CHUNK, b3[..., -1] == MID, b3[..., -1] == AT_START], -1)
  return PassSchedule(chunk=chunk, kind=kind.astype(jnp.int32), info=info.astype(jnp.float32),
                      npass=(N + jnp.sum(has_mid, axis=1)).astype(jnp.int32))


def _bcast(x, shape, dim: int):
  """x [n] broadcast along `dim` of a 2-D shape, in the WGMMA layout (stated: Mosaic GPU's layout inference
  does not find it for every broadcast of the packed loop)."""
  return plgpu.layout_cast(lax.broadcast_in_dim(x, shape, [dim]), plgpu.Layout.WGMMA)


def _sigmoid(x):
  """1 / (1 + e^-x) as rsqrt(1 + e^-x)^2: with approx_math two MUFU instructions (ex2, rsqrt; relative error
  ~2^-22) instead of an IEEE division."""
  r = lax.rsqrt(1.0 + jnp.exp(-x))
  return r * r


def carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, seg=None, *, C: int, cb: int, interpret: bool,
                            inverse_kind: str = "f16", ax_kind: str = "f16", emit_w: bool = True,
                            approx_math: bool = True, profile_dir: str | None = None):
  """`forward.CarveStatePass` (h, V_new, c, A, S_final, with packed documents c2, with emit_w W) as
  `forward.carve_state_pass` (16-bit inputs), per chunk:

      c_n   = sqrt(mean_j S[:, j]^2 + eps)          (at a content-block start, else carried)
      gate  = sigmoid(logits + gamma c_n)           [C, K]
      L     = sum_p mask_p [(gate kr_p) kc_p^T]     (strictly lower; `intra.part_masks`)
      X     = beta v - (gate ke) S                  [C, V]
      A     = (I + L)^{-1}                          (`inverse`: seven dependent product steps)
      V_new = A X
      W     = A (gate ke)                       [C, K]   (emit_w: the backward's W, `backward.bprep`)
      S    <- e^{G_C} S + Kd^T V_new

  Packed documents (seg: `segments.Segments`; pre then also holds kj, gj): L within documents (doc_r = doc_c)
  and each row's signal by its content class (c of the block carried in or begun at row 0, c2 of a block
  begun at row j > 0, sqrt(eps) of one begun at a document start), as the Triton loop. A chunk with such a
  mid-chunk block takes two passes (`packed_schedule`): the first, with c2 = c, gives V_new of the rows
  before j, thus the state there, S_j = e^{G_j} S + kj^T V_new (in two [64, V] halves: S stays in registers),
  and c2 = its signal; the second is the chunk's pass with every row's signal (the WY form holds for any
  per-row gate). Only a chunk's last pass writes its outputs and updates S. kj and G_j arrive in kd's and
  G_C's buffers for a first pass.

  Two warpgroups per (batch, head), handing over through SMEM and barriers:
    state (wg 1): holds S [K, V] float32 in registers; per chunk hands c over, stores S in 16 bits (the X
      operand and h), forms X (while wg 0 forms L and A), then the state update (accumulated into S);
      fetches the chunk tiles.
    solve (wg 0): the gate, L from the decay parts (their factors double-buffered; the first two parts'
      products issued together), the inverse and V_new = A X (into xh, where wg 1 reads it); with emit_w
      then W = A (gate ke) from the gate ke wg 1 left in ke's buffer (A's bf16 halves, two wgmmas), stored
      out through that buffer, after which wg 0 fetches the next chunk's ke.
  Every product is a wgmma: the data products in 16 bits as in the Triton kernel; the inverse's in float16
  (inverse_kind "f16", one wgmma each, 11-bit significand like the Triton kernel's TF32) or as three bf16
  products of hi / lo halves ("bf16x3"); A X likewise (ax_kind: "bf16x3", X's halves in xh / xl, or "f16",
  X once in xl; float16 needs X's entries below 6.5e4, true unless the state diverges). Left operands
  come from registers on the GPU (interpret mode: from SMEM, `a_regs`), right operands from SMEM. A leaves
  staged in the inverse's right-operand buffers: in float16 (inverse_kind "f16": TF32's significand, which
  the backward's products with A round it to anyway), or as two bf16 halves summed outside into float32
  ("bf16x3"). SMEM `smem_bytes`: 218 KB at K = V = 128, C = 64 (packed: 0.9 KB more).
  approx_math: exp, rsqrt and sqrt as single approximate instructions (relative error ~2^-22).

  profile_dir: record every chunk's phases ("state/c", "solve/inverse", ...: the `scope` regions) per
  warpgroup with Mosaic GPU's on-device profiler and write a Chrome trace there (GPU only; the trace buffer
  lives in the ~9 KB of SMEM left, so at most PROFILE_MAX_CHUNKS chunks: `experiments.mosaic_step_probe
  --trace-loop`)."""
  from pallas_kernels import intra  # noqa: PLC0415
  from pallas_kernels.segments import AT_START, MID  # noqa: PLC0415
  B, Tp, H, K = logits.shape
  V, N, P = v.shape[-1], Tp // C, pre["kr"].shape[0]
  dt = logits.dtype
  f32 = jnp.float32
  packed = seg is not None
  if jnp.dtype(dt).itemsize != 2:
    raise ValueError(f"carve_state_pass_mosaic: the inputs must be 16-bit, got {dt}")
  if inverse_kind not in INVERSE_KINDS:
    raise ValueError(f"carve_state_pass_mosaic: inverse_kind must be one of {INVERSE_KINDS}, got {inverse_kind!r}")
  if ax_kind not in INVERSE_KINDS:
    raise ValueError(f"carve_state_pass_mosaic: ax_kind must be one of {INVERSE_KINDS}, got {ax_kind!r}")
  inv_dt = jnp.float16 if inverse_kind == "f16" else dt  # the inverse's operands and A's output halves
  ax_dt = jnp.float16 if ax_kind == "f16" else dt  # X's stored half (its lo half for bf16x3)
  tc = _transforms(dt, C)
  ti = _transforms(inv_dt, C)
  betaT = jnp.swapaxes(beta, 1, 2)  # [B, H, Tp]: TMA needs a unit innermost stride
  gam = jnp.broadcast_to(gamma.astype(f32)[:, None], (H, K))
  WG = plgpu.Layout.WGMMA
  group = intra.DECAY_GROUP
  SM = plgpu.SMEM
  a_regs = not interpret  # left wgmma operands from registers (the interpreter takes SMEM refs only)
  params = dict(approx_math=approx_math)
  if profile_dir is not None:
    if interpret or N > PROFILE_MAX_CHUNKS or packed:
      raise ValueError(f"carve_state_pass_mosaic: profile_dir needs the GPU, unpacked documents and at most "
                       f"{PROFILE_MAX_CHUNKS} chunks, got {N} (interpret={interpret}, packed={packed})")
    params |= dict(profile_space=PROFILE_REGIONS_PER_CHUNK * N + 4, profile_dir=profile_dir,
                   profile_bounds_check=True)
  params = plgpu.CompilerParams(**params)
  scope = jax.named_scope  # profiler regions (no code without profile_dir)
  smem = {n: SM(shape, d, transforms=_transforms(d, shape[-1])) if operand else SM(shape, d)
          for n, (shape, d, operand) in _buffers(K, V, C, dt, inv_dt, ax_dt, packed).items()}
  if not a_regs:  # the left operands (interpret mode): A's halves for A X, two of the inverse's
    smem |= dict(ah=SM((C, C), dt, transforms=tc), al=SM((C, C), dt, transforms=tc),
                 ax16=SM((C, C), jnp.float16, transforms=_transforms(jnp.float16, C)),
                 **{f"la{i}": SM((C, C), inv_dt, transforms=ti) for i in range(4)})
  # one barrier per TMA destination (and below)
  tma_names = ("gam", "codes", "l", "v", "ke", "beta", "kd", "gc") + (("doc", "docc", "blk") if packed else ())
  hand_names = ("c_ready", "x_ready", "vn_ready", "l_read")  # hand-overs between the warpgroups
  a_halves = inverse_kind == "bf16x3"  # A leaves as (hi, lo) bf16 halves, else once in float16
  in_names = ["l", "beta", "v", "kr", "kc", "ke", "kd", "gc", "gam", "s0", "codes"]
  out_names = ["h", "vn", "c", "ahi", "sf"] + (["alo"] if a_halves else []) + (["w"] if emit_w else [])
  if packed:
    in_names += ["doc", "blk", "kj", "gj", "p_chunk", "p_kind", "info", "npass"]
    out_names += ["c2"]
  rest_eps = float(intra.CONTENT_EPS) ** 0.5  # the signal of a block begun at a document start (zero state)

  def when(cond, f):  # f() where cond holds (cond a Python bool when unpacked: traced only if True)
    if isinstance(cond, bool):
      return f() if cond else None
    return pl.when(cond)(f)

  def carve_state_mosaic(*refs):  # (the name the kernel shows in profiles)
    r = dict(zip(in_names + out_names, refs))
    scratch = refs[len(in_names) + len(out_names):]
    sm = dict(zip(smem, scratch[:len(smem)]))
    tma_bar, part_bar, hand_bar = scratch[len(smem):]
    tma = {k: tma_bar.at[i] for i, k in enumerate(tma_names)}
    hand = {k: hand_bar.at[i] for i, k in enumerate(hand_names)}
    b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    masks = _Masks(sm["codes"])
    if inverse_kind == "f16":
      prod = Products("f16", sm["bh"], None if a_regs else (sm["la0"], sm["la1"]))
    else:
      prod = Products("bf16x3", (sm["bh"], sm["bl"]),
                      None if a_regs else ((sm["la0"], sm["la1"]), (sm["la2"], sm["la3"])))
    if ax_kind == "f16":  # V_new = A X: X stored once in float16 (in xl)
      prod_ax = Products("f16", sm["xl"], None if a_regs else (sm["ax16"],))
    else:  # X's hi / lo halves in xh / xl
      prod_ax = Products("bf16x3", (sm["xh"], sm["xl"]), None if a_regs else ((sm["ah"], sm["al"]),))
    n_pass = r["npass"][b] if packed else N  # passes over chunks (unpacked: pass i is chunk i)

    def pass_of(i):  # (chunk, kind, last) of pass i (`PassSchedule`; last: the chunk's last pass, which writes
      if not packed:  # the outputs and updates S); unpacked (i, 0, True)
        return i, 0, True
      kind = r["p_kind"][b, i]
      return r["p_chunk"][b, i], kind, kind != 1

    def fetch(names, i):  # TMA of pass i's tiles into their buffers (packed, a first pass: kj, G_j for Kd, G_C)
      n, kind, _ = pass_of(i)
      rows = pl.ds(n * C, C)
      src = dict(l=r["l"].at[b, rows, h], v=r["v"].at[b, rows, h], ke=r["ke"].at[b, rows, h],
                 beta=r["beta"].at[b, h, rows], kd=r["kd"].at[b, rows, h], gc=r["gc"].at[b, h, n])
      if packed:
        src |= dict(doc=r["doc"].at[b, rows], docc=r["doc"].at[b, rows], blk=r["blk"].at[b, rows])
        names = names + (("doc", "docc", "blk") if "l" in names else ())
      for k in names:
        if packed and k in ("kd", "gc"):
          mid = dict(kd=r["kj"].at[b, rows, h], gc=r["gj"].at[b, h, n])[k]
          pl.when(kind == 1)(lambda k=k, mid=mid: plgpu.copy_gmem_to_smem(mid, sm[k], tma[k]))
          pl.when(kind != 1)(lambda k=k: plgpu.copy_gmem_to_smem(src[k], sm[k], tma[k]))
        else:
          plgpu.copy_gmem_to_smem(src[k], sm[k], tma[k])

    def fetch_part(q):  # decay part q % P of pass q // P (q counts parts over the passes) into slot q % 2
      n, p, slot = pass_of(q // P)[0], lax.rem(q, P), lax.rem(q, 2)
      rows = pl.ds(n * C, C)
      plgpu.copy_gmem_to_smem(r["kr"].at[p, b, rows, h], sm["kr"].at[slot], part_bar.at[slot])
      plgpu.copy_gmem_to_smem(r["kc"].at[p, b, rows, h], sm["kc"].at[slot], part_bar.at[2 + slot])

    def wait(*names):
      for k in names:
        plgpu.barrier_wait(tma[k])

    def gate_of():  # sigmoid(logits + gamma c_row) [C, K] of the chunk in SMEM (c_row: the row's signal)
      g_ = plgpu.load(sm["gam"], layout=WG.reduce(0))
      cg = g_ * plgpu.load(sm["c"], layout=WG.reduce(0))
      x = plgpu.load(sm["l"], layout=WG).astype(f32) + lax.broadcast_in_dim(cg, (C, K), [1])
      if packed:  # rows of a mid-chunk block take c2, rows of a block begun at a document start sqrt(eps)
        cls = plgpu.load(sm["blk"], layout=WG.reduce(1)).astype(f32)
        row = lambda m: _bcast(m.astype(f32), (C, K), 0)
        col = lambda y: _bcast(y, (C, K), 1)
        x = (x + row(cls == MID) * col(g_ * plgpu.load(sm["c2"], layout=WG.reduce(0)) - cg)
             + row(cls == AT_START) * col(g_ * rest_eps - cg))
      return _sigmoid(x)

    @pl.when(wg == 1)
    def state_wg():
      plgpu.copy_gmem_to_smem(r["gam"].at[h], sm["gam"], tma["gam"])
      plgpu.copy_gmem_to_smem(r["codes"], sm["codes"], tma["codes"])
      fetch(("l", "v", "ke", "beta", "kd", "gc"), 0)
      wait("gam", "codes")  # (codes: wg 0's, observed here too for the interpreter's barrier checks)

      def chunk(i, carry):
        S, c_prev = carry
        n, kind, last = pass_of(i)
        with scope("state/c"):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # chunk n - 1's h, c and V_new have left s16, c, xh
          c_new = jnp.sqrt((S * S).sum(axis=1) / V + intra.CONTENT_EPS)  # [K], rows of S
          new = r["info"][b, n, 0] if packed else (lax.rem(n * C, cb) == 0).astype(f32)  # a block begins at row 0
          c1 = new * c_new + (1.0 - new) * c_prev
          sm["c"][...] = c1
          if packed:  # c2 = c1 but in a second pass (c2 then from the first's S_j)
            def c2_is_c1():
              sm["c2"][...] = c1
            pl.when(kind != 2)(c2_is_c1)
          plgpu.commit_smem()
          plgpu.barrier_arrive(hand["c_ready"])  # wg 0 starts on c; the state's 16-bit copy after

          def c_out():
            plgpu.copy_smem_to_gmem(sm["c"], r["c"].at[b, h, n])
            if packed:
              plgpu.copy_smem_to_gmem(sm["c2"], r["c2"].at[b, h, n])
          when(last, c_out)
        with scope("state/s16"):
          sm["s16"][...] = S.astype(dt)
          plgpu.commit_smem()
          when(last, lambda: plgpu.copy_smem_to_gmem(sm["s16"], r["h"].at[b, h, n]))
        with scope("state/X"):
          wait("l", "v", "ke", "beta", *(("blk",) if packed else ()))
          # gate ke (interpret mode: in place of ke)
          gke = _left((gate_of() * plgpu.load(sm["ke"], layout=WG).astype(f32)).astype(dt), sm["ke"], a_regs)
          beta_col = plgpu.load(sm["beta"], layout=WG.reduce(1)).astype(f32)
          X = lax.broadcast_in_dim(beta_col, (C, V), [0]) * plgpu.load(sm["v"], layout=WG).astype(f32) - _mm(
              gke, sm["s16"], (C, V))
          if emit_w and a_regs:  # gate ke for wg 0's W (interpret mode: already there), committed with X
            sm["ke"][...] = gke
          prod_ax.right(X)
          plgpu.barrier_arrive(hand["x_ready"])

        @pl.when(i + 1 < n_pass)
        def _():  # the next pass's tiles, once wg 0 has read this pass's logits
          plgpu.barrier_wait(hand["l_read"])
          fetch(("l", "v", "beta") if emit_w else ("l", "v", "ke", "beta"), i + 1)  # (emit_w: wg 0 fetches ke)
        with scope("state/wait_vn"):
          plgpu.barrier_wait(hand["vn_ready"])  # V_new in xh
        with scope("state/update"):
          when(last, lambda: plgpu.copy_smem_to_gmem(sm["xh"], r["vn"].at[b, pl.ds(n * C, C), h]))  # read
          wait("kd", "gc")                                                      # before X's next store: the
                                                                                # wait at the chunk's top
          def update(S):  # S <- e^{G_C} S + Kd^T V_new
            decay = jnp.exp(plgpu.load(sm["gc"], layout=WG.reduce(1)))
            S = S * lax.broadcast_in_dim(decay, S.shape, [0])
            if a_regs:  # S accumulates in place (no second [K, V] float32 array: 128 registers a thread fewer)
              def acc_update(acc):
                plgpu.wgmma(acc, sm["kd"].transpose((1, 0)), sm["xh"])
                plgpu.wgmma_wait(0)
              return pl.run_state(acc_update)(plgpu.ACC.init(S))
            return S + _mm(sm["kd"].transpose((1, 0)), sm["xh"], (K, V))  # (the interpreter cannot initialise
                                                                            # an accumulator)
          def state_at_j(S):  # a first pass: c2 = signal of S_j = e^{G_j} S + kj^T V_new (kj, G_j in kd, gc)
            for m in range(K // 64):  # [64, V] halves of the key rows: S stays whole in registers
              ks = pl.ds(m * 64, 64)
              decay = jnp.exp(plgpu.load(sm["gc"].at[ks], layout=WG.reduce(1)))
              Sm = S[m * 64:(m + 1) * 64] * _bcast(decay, (64, V), 0)
              kj_t = sm["kd"].at[:, ks].transpose((1, 0))
              if a_regs:
                def acc_j(acc, kj_t=kj_t):
                  plgpu.wgmma(acc, kj_t, sm["xh"])
                  plgpu.wgmma_wait(0)
                Sj = pl.run_state(acc_j)(plgpu.ACC.init(Sm))
              else:
                Sj = Sm + _mm(kj_t, sm["xh"], (64, V))
              sm["c2"].at[ks][...] = jnp.sqrt((Sj * Sj).sum(axis=1) / V + intra.CONTENT_EPS)
            plgpu.commit_smem()
            return S
          S = update(S) if not packed else lax.cond(kind == 1, state_at_j, update, S)
        pl.when(i + 1 < n_pass)(lambda: fetch(("kd", "gc"), i + 1))
        if not packed:
          return S, sm["c"][...]
        # the signal carried into the next chunk: its last row's (a first pass carries c_prev on)
        c2 = plgpu.load(sm["c2"], layout=WG.reduce(1))
        to_mid, to_start = r["info"][b, n, 1], r["info"][b, n, 2]
        c_last = c1 + to_mid * (c2 - c1) + to_start * (rest_eps - c1)
        lastf = last.astype(f32)
        return S, lastf * c_last + (1.0 - lastf) * c_prev

      S0_ = plgpu.load(r["s0"].at[b, h], layout=WG, optimized=False)
      S, _ = lax.fori_loop(0, n_pass, chunk, (S0_, jnp.zeros((K,), f32)))
      r["sf"].at[b, h][...] = S
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 0)
    def solve_wg():
      for q in range(min(2, N * P)):
        fetch_part(q)
      wait("gam", "codes")

      def chunk(i, carry):
        n, _, last = pass_of(i)
        with scope("solve/wait_c"):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # chunk n - 1's A has left bh and bl
          plgpu.barrier_wait(hand["c_ready"])
          wait("l", *(("doc", "docc", "blk") if packed else ()))
        with scope("solve/gate"):
          gate = gate_of()
          if packed:  # the document numbers, read before wg 1 may fetch the next pass's
            doc_r = plgpu.load(sm["doc"], layout=WG.reduce(1)).astype(f32)
            doc_c = plgpu.load(sm["docc"], layout=WG.reduce(0)).astype(f32)
          pl.when(i + 1 < n_pass)(lambda: plgpu.barrier_arrive(hand["l_read"]))  # waited for before the next fetch

        def part(p):  # (gate kr_p, kc_p^T) of chunk n's part p once its factors are in (interpret mode: gate
          q = i * P + p  # kr_p stored in place of kr_p)
          slot = lax.rem(q, 2)
          kr_s, kc_s = sm["kr"].at[slot], sm["kc"].at[slot]
          with scope("solve/wait_part"):
            plgpu.barrier_wait(part_bar.at[slot])
            plgpu.barrier_wait(part_bar.at[2 + slot])
          gkr = _left((gate * plgpu.load(kr_s, layout=WG).astype(f32)).astype(dt), kr_s, a_regs)
          return gkr, kc_s.transpose((1, 0))

        def refill(p):  # part p + 2 into the slot part p's product has read
          q = i * P + p
          pl.when(q + 2 < n_pass * P)(lambda: fetch_part(q + 2))

        def first_parts(*accs):  # the two resident parts' products issued together; each slot refilled once read
          for acc, (gkr, kc_t) in zip(accs, pairs):
            plgpu.wgmma(acc, gkr, kc_t)
          for p in range(len(accs)):
            plgpu.wgmma_wait(len(accs) - 1 - p)
            refill(p)
          return [acc[...] for acc in accs]
        with scope("solve/part"):
          pairs = [part(p) for p in range(min(2, P))]
          Lps = pl.run_scoped(first_parts, *[plgpu.ACC((C, C), f32) for _ in pairs])
        for p in range(len(pairs), P):
          with scope("solve/part"):
            Lps.append(_mm(*part(p), (C, C)))
            refill(p)
        L = sum(masks.lower_within(p) * Lp for p, Lp in enumerate(Lps))
        if packed:  # within documents
          L = L * plgpu.layout_cast((_bcast(doc_r, (C, C), 0) == _bcast(doc_c, (C, C), 1)).astype(f32), WG)
        with scope("solve/inverse"):
          A = inverse(L, prod, masks, group)
        with scope("solve/wait_x"):
          plgpu.barrier_wait(hand["x_ready"])
        with scope("solve/AX"):
          vn = prod_ax.times([A])[0]
          sm["xh"][...] = vn.astype(dt)  # (bf16x3: over X's hi half, which A X has read); wg 1 stores it out
          plgpu.commit_smem()
          plgpu.barrier_arrive(hand["vn_ready"])
        rows = pl.ds(n * C, C)

        def w_out():
          with scope("solve/W"):  # W = A (gate ke): gate ke is in ke's buffer (wg 1, before x_ready)
            ah, al = _halves(A, dt)
            if not a_regs:
              ah, al = _left(ah, sm["ah"], False), _left(al, sm["al"], False)
            W = _wgmmas([[(ah, sm["ke"]), (al, sm["ke"])]], (C, K))[0]
            sm["ke"][...] = W.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(sm["ke"], r["w"].at[b, rows, h])

        def a_out():
          with scope("solve/A_out"):  # A for its output, while wg 1 updates the state
            if a_halves:
              _split_store(A, (sm["bh"], sm["bl"]))
              plgpu.copy_smem_to_gmem(sm["bh"], r["ahi"].at[b, rows, h])
              plgpu.copy_smem_to_gmem(sm["bl"], r["alo"].at[b, rows, h])
            else:
              sm["bh"][...] = A.astype(inv_dt)
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(sm["bh"], r["ahi"].at[b, rows, h])
        if emit_w:
          when(last, w_out)
        when(last, a_out)
        if emit_w:
          @pl.when(i + 1 < n_pass)
          def _():  # the next pass's ke, once W has left its buffer
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            fetch(("ke",), i + 1)
        return carry

      lax.fori_loop(0, n_pass, chunk, 0)
      plgpu.wait_smem_to_gmem(0)

  sd = jax.ShapeDtypeStruct
  a_out_t = sd((B, Tp, H, C), inv_dt)
  out_type = [sd((B, H, N, K, V), dt), sd((B, Tp, H, V), dt), sd((B, H, N, K), f32), a_out_t, sd((B, H, K, V), f32),
              *([a_out_t] if a_halves else []), *([sd((B, Tp, H, K), dt)] if emit_w else []),
              *([sd((B, H, N, K), f32)] if packed else [])]
  kernel = plgpu.kernel(
      carve_state_mosaic, out_type=tuple(out_type),
      scratch_types=[*smem.values(), plgpu.Barrier(num_barriers=len(tma_names)),
                     plgpu.Barrier(num_barriers=4),  # the parts' factors: kr in slot 0 / 1, kc in slot 0 / 1
                     plgpu.Barrier(num_arrivals=1, num_barriers=len(hand_names))],
      grid=(B, H), grid_names=("b", "h"), num_threads=2, thread_name="wg", compiler_params=params,
      interpret=_interpret_params() if interpret else None)
  args = [logits, betaT, v, pre["kr"], pre["kc"], pre["ke"], pre["kd"], pre["gc"], gam, S0.astype(f32),
          mask_codes(C, group, dt)]
  if packed:
    sch = packed_schedule(seg.blk, C)
    args += [seg.doc.astype(dt), seg.blk.astype(dt), pre["kj"], pre["gj"], sch.chunk, sch.kind, sch.info, sch.npass]
  outs = dict(zip(out_names, kernel(*args)))
  A = outs["ahi"] if not a_halves else outs["ahi"].astype(f32) + outs["alo"].astype(f32)
  return CarveStatePass(h=outs["h"], vn=outs["vn"], c=outs["c"], A=A, S=outs["sf"], c2=outs.get("c2"),
                        W=outs.get("w"))
