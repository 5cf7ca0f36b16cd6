r"""CARVE's sequential forward state pass (`forward.carve_state_pass`) as a Mosaic GPU kernel. WORK IN
PROGRESS: opt-in (`TuningConfig(carve_state_kernel="mosaic")`), never chosen by default, not yet compiled or
timed on a GPU. This is the kernel that misses issue 11's targets (`NOTES.md` v7: the Triton loop's time is
the staging around each product, which Mosaic GPU makes explicit).

What is checked: it agrees with the Triton pass in Mosaic GPU's interpret mode on the CPU, alone and
through the kernels' forward and backward (`tests/test_mosaic_state.py`), and it lowers for CUDA offline
(`jax.export(..., platforms=["cuda"])`: Mosaic's own checks of wgmma operands, layouts and shared memory
pass). The interpreter does not check the SMEM tiling and swizzle the hardware needs; the GPU test in the
same file and `python -m experiments.kernel_probe --carve-only --carve-configs carve_state_kernel=mosaic` are
the next device call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
  return InterpretGPUParams()


def _transforms(dtype, minor: int):
  """SMEM tiling + swizzle of a wgmma operand whose minor dimension has `minor` elements."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, *, C: int, cb: int, interpret: bool):
  """(h, V_new, c, A, S_final) as `forward.carve_state_pass` (unpacked documents; 16-bit inputs), per chunk:

      c_n   = sqrt(mean_j S[:, j]^2 + eps)          (at a content-block start, else carried)
      gate  = sigmoid(logits + gamma c_n)           [C, K]
      L     = sum_p mask_p [(gate kr_p) kc_p^T]     (strictly lower; `intra.part_masks`)
      A     = (I + L)^{-1}                          (`intra.block_unit_lower_inv`'s products, split 16-bit)
      V_new = A (beta v - (gate ke) S)
      S    <- e^{G_C} S + Kd^T V_new

  Every product is a wgmma with both operands in SMEM: the data products in 16 bits as in the Triton
  kernel, the inverse's and A X as three 16-bit products of hi / lo halves (`mm_split`: float32 (TF32)
  wgmma takes only K-major operands and register arrays cannot be transposed here). SMEM: the decay
  parts' factors one part at a time and the solve's operands in scopes of their own (219.6 KB at
  K = V = 128, C = 64, of 227 KB). Not yet tuned: one warpgroup holds the [K, V] float32 state (128
  registers a thread at K = V = 128), no TMA prefetch of the next chunk, every product waited for."""
  from pallas_kernels import intra  # noqa: PLC0415
  B, Tp, H, K = logits.shape
  V, N, P = v.shape[-1], Tp // C, pre["kr"].shape[0]
  dt = logits.dtype
  f32 = jnp.float32
  if jnp.dtype(dt).itemsize != 2:
    raise ValueError(f"carve_state_pass_mosaic: the inputs must be 16-bit, got {dt}")
  tk, tv, tc = _transforms(dt, K), _transforms(dt, V), _transforms(dt, C)
  betaT = jnp.swapaxes(beta, 1, 2)  # [B, H, Tp]: TMA needs a unit innermost stride
  gam = jnp.broadcast_to(gamma.astype(f32)[:, None], (H, K))
  WG = plgpu.Layout.WGMMA
  group = intra.DECAY_GROUP

  n_copies = 6
  loop_smem = [plgpu.SMEM((C, K), dt, transforms=tk), plgpu.SMEM((C, V), dt, transforms=tv),
               plgpu.SMEM((C, K), dt, transforms=tk), plgpu.SMEM((C, K), dt, transforms=tk),
               plgpu.SMEM((C,), dt), plgpu.SMEM((K,), f32), plgpu.SMEM((K,), f32),
               plgpu.SMEM((K, V), dt, transforms=tv), plgpu.SMEM((C, V), dt, transforms=tv), plgpu.SMEM((K,), f32)]
  # scoped inside a chunk, one set after the other (SMEM budget): the decay parts' factors, then the solve's
  # split operands (hi / lo 16-bit halves of [C, C] and [C, V] float32 values) and the A output's staging
  parts_smem = [plgpu.SMEM((C, K), dt, transforms=tk), plgpu.SMEM((C, K), dt, transforms=tk)]
  solve_smem = [plgpu.SMEM((C, C), dt, transforms=tc), plgpu.SMEM((C, C), dt, transforms=tc),
                plgpu.SMEM((C, C), dt, transforms=tc), plgpu.SMEM((C, C), dt, transforms=tc),
                plgpu.SMEM((C, V), dt, transforms=tv), plgpu.SMEM((C, V), dt, transforms=tv),
                plgpu.SMEM((C, C), f32)]

  def body(l_ref, beta_ref, v_ref, kr_ref, kc_ref, ke_ref, kd_ref, gc_ref, gam_ref, s0_ref,
           h_ref, vn_ref, c_ref, A_ref, sf_ref, bar):
    b, h = lax.axis_index("b"), lax.axis_index("h")

    def with_state_smem(f):  # the [K, V] float32 staging of S0 and S_final, not live during the loop
      return pl.run_scoped(f, plgpu.SMEM((K, V), f32))

    def load_s0(st_s):
      plgpu.copy_gmem_to_smem(s0_ref.at[b, h], st_s, bar.at[0])
      plgpu.barrier_wait(bar.at[0])
      return plgpu.load(st_s, (), layout=WG)
    def loop(S, l_s, v_s, ke_s, kd_s, beta_s, gc_s, gam_s, s16_s, vn_s, c_s):
      a16_s = l_s  # the logits are in registers once the gate is formed: their buffer takes the 16-bit operands

      def mm(a_s, b_s, shape):  # a fresh accumulator, both operands SMEM refs: Mosaic GPU's interpret mode in
        # jax 0.11.2 can neither store into an accumulator ref, run `pl.run_state(...)(plgpu.ACC.init(x))`
        # (the form attention_mgpu.py uses) nor take the left operand from registers
        def scope(acc):
          plgpu.wgmma(acc, a_s, b_s)
          plgpu.wgmma_wait(0)
          return acc[...]
        return pl.run_scoped(scope, plgpu.ACC(shape, f32))

      def mm_split(a, b, bufs):
        """a @ b of float32 values [C, C] x [C, C or V] as three 16-bit wgmmas: a_hi b_hi + a_hi b_lo + a_lo b_hi
        (hi = x in 16 bits, lo = x - hi in 16 bits; ~2^-16 relative for bf16, finer than one TF32 pass).
        16-bit operands because float32 (TF32) wgmma takes only K-major operands, and register arrays cannot
        be transposed here."""
        ah_s, al_s, bch_s, bcl_s, bvh_s, bvl_s, _ = bufs
        bh_s, bl_s = (bch_s, bcl_s) if b.shape[1] == C else (bvh_s, bvl_s)
        ah, bh = a.astype(dt), b.astype(dt)
        ah_s[...] = ah
        al_s[...] = (a - ah.astype(f32)).astype(dt)
        bh_s[...] = bh
        bl_s[...] = (b - bh.astype(f32)).astype(dt)
        plgpu.commit_smem()

        def scope(acc):
          plgpu.wgmma(acc, ah_s, bh_s)
          plgpu.wgmma(acc, ah_s, bl_s)
          plgpu.wgmma(acc, al_s, bh_s)
          plgpu.wgmma_wait(0)
          return acc[...]
        return pl.run_scoped(scope, plgpu.ACC((C, b.shape[1]), f32))

      plgpu.copy_gmem_to_smem(gam_ref.at[h], gam_s, bar.at[1])
      plgpu.barrier_wait(bar.at[1])
      r = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=WG)
      col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=WG)
      eye = (r == col).astype(f32)  # masks as float factors: no select with an implicit broadcast (not lowered)
      same = (r // group == col // group).astype(f32)

      def inverse(L, bufs):  # intra.block_unit_lower_inv's products, split 16-bit
        Pd = -(same * L)
        D = eye + Pd
        for _ in range(group.bit_length() - 2):
          Pd = mm_split(Pd, Pd, bufs)
          D = D + mm_split(D, Pd, bufs)
        Q = -mm_split(D, (1.0 - same) * L, bufs)
        term, A = D, D
        for _ in range(C // group - 1):
          term = mm_split(Q, term, bufs)
          A = A + term
        return A

      def chunk(n, carry):
        S, c_prev = carry
        rows = pl.ds(n * C, C)
        copies = [(l_ref.at[b, rows, h], l_s), (v_ref.at[b, rows, h], v_s), (ke_ref.at[b, rows, h], ke_s),
                  (kd_ref.at[b, rows, h], kd_s), (beta_ref.at[b, h, rows], beta_s), (gc_ref.at[b, h, n], gc_s)]
        for i, (src, dst) in enumerate(copies):
          plgpu.copy_gmem_to_smem(src, dst, bar.at[2 + i])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's stores have left the buffers
        s16_s[...] = S.astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s16_s, h_ref.at[b, h, n])
        c_new = jnp.sqrt((S * S).sum(axis=1) / V + intra.CONTENT_EPS)            # [K], rows of S
        new = (lax.rem(n * C, cb) == 0).astype(f32)
        c_s[...] = new * c_new + (1.0 - new) * c_prev
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(c_s, c_ref.at[b, h, n])
        for i in range(len(copies)):
          plgpu.barrier_wait(bar.at[2 + i])
        c_row = plgpu.load(c_s, (), layout=WG.reduce(0))                         # [K] along the columns
        gam_row = plgpu.load(gam_s, (), layout=WG.reduce(0))
        logit = plgpu.load(l_s, (), layout=WG).astype(f32)
        gate = jax.nn.sigmoid(logit + lax.broadcast_in_dim(gam_row * c_row, (C, K), [1]))
        def decay_parts(kr_s, kc_s):  # one part's factors in SMEM at a time; the previous product has completed
          L = jnp.zeros((C, C), f32)
          for p in range(P):
            plgpu.copy_gmem_to_smem(kr_ref.at[p, b, rows, h], kr_s, bar.at[2 + n_copies])
            plgpu.copy_gmem_to_smem(kc_ref.at[p, b, rows, h], kc_s, bar.at[3 + n_copies])
            plgpu.barrier_wait(bar.at[2 + n_copies])
            plgpu.barrier_wait(bar.at[3 + n_copies])
            a16_s[...] = (gate * plgpu.load(kr_s, (), layout=WG).astype(f32)).astype(dt)
            plgpu.commit_smem()
            Lp = mm(a16_s, kc_s.transpose((1, 0)), (C, C))
            size = group << p
            L = L + (r // size == col // size).astype(f32) * Lp
          return L
        L = pl.run_scoped(decay_parts, *parts_smem)

        def solve(*bufs):
          A = inverse((r > col).astype(f32) * L, bufs)
          a16_s[...] = (gate * plgpu.load(ke_s, (), layout=WG).astype(f32)).astype(dt)
          plgpu.commit_smem()
          beta_col = plgpu.load(beta_s, (), layout=WG.reduce(1)).astype(f32)
          X = (lax.broadcast_in_dim(beta_col, (C, V), [0]) * plgpu.load(v_s, (), layout=WG).astype(f32)
               - mm(a16_s, s16_s, (C, V)))
          vn = mm_split(A, X, bufs)
          fa_s = bufs[-1]
          fa_s[...] = A
          vn_s[...] = vn.astype(dt)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(fa_s, A_ref.at[b, rows, h])
          plgpu.copy_smem_to_gmem(vn_s, vn_ref.at[b, rows, h])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # fa_s leaves scope after this
        pl.run_scoped(solve, *solve_smem)
        decay = jnp.exp(plgpu.load(gc_s, (), layout=WG.reduce(1)))
        S = S * lax.broadcast_in_dim(decay, S.shape, [0]) + mm(kd_s.transpose((1, 0)), vn_s, (K, V))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        return S, c_s[...]

      S, _ = lax.fori_loop(0, N, chunk, (S, jnp.zeros((K,), f32)))
      plgpu.wait_smem_to_gmem(0)
      return S

    S = with_state_smem(load_s0)
    S = pl.run_scoped(lambda *bufs: loop(S, *bufs), *loop_smem)

    def store_sf(st_s):
      st_s[...] = S
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(st_s, sf_ref.at[b, h])
      plgpu.wait_smem_to_gmem(0)
    with_state_smem(store_sf)

  sd = jax.ShapeDtypeStruct
  kernel = plgpu.kernel(
      body,
      out_type=(sd((B, H, N, K, V), dt), sd((B, Tp, H, V), dt), sd((B, H, N, K), f32), sd((B, Tp, H, C), f32),
                sd((B, H, K, V), f32)),
      scratch_types=[plgpu.Barrier(num_barriers=4 + n_copies)],
      grid=(B, H), grid_names=("b", "h"), interpret=_interpret_params() if interpret else None)
  return kernel(logits, betaT, v, pre["kr"], pre["kc"], pre["ke"], pre["kd"], pre["gc"], gam, S0.astype(f32))
