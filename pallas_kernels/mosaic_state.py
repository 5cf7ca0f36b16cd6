r"""WORK IN PROGRESS (branch `mgpu`, not dispatched, not run on a GPU yet): the gamma-free sequential state
pass of `forward.state_pass` as a Mosaic GPU kernel, the stepping stone to CARVE's state loop in Mosaic
GPU (`NOTES.md`, v7: the Triton loop's time is the staging around each product).

Per (batch, head) program, one warpgroup, the state S [K, V] float32 in registers (WGMMA layout):

    h_n   = S                                   (bf16, SMEM -> GMEM by TMA)
    V_new = U - W S                             (wgmma: A = W, B = S, both in SMEM, bf16)
    S    <- e^{G_C} S + Kd^T V_new              (wgmma into the scaled state: A = Kd^T, B = V_new in SMEM)

Inputs as in `forward.state_pass` (16-bit W, U, Kd; float32 G_C and S0). Runs in Pallas' Mosaic GPU
interpret mode on the CPU (`interpret=True`), which checks the math but not the SMEM tiling and swizzle
that the hardware needs: only a GPU run can tell whether the transforms here are right.
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


def _accumulate(init, issue, sign=1.0):
  """init + sign * (the wgmma(s) `issue(acc_ref)` issues into a zero accumulator), waited for (float32,
  WGMMA layout).

  The products go into a fresh accumulator and init is added after, and both operands are SMEM refs:
  Mosaic GPU's interpret mode in jax 0.11.2 cannot store into an accumulator ref, run
  `pl.run_state(...)(plgpu.ACC.init(x))` (the form attention_mgpu.py uses, one add fewer on the hardware)
  or take the left operand from registers."""
  def scope(acc):
    issue(acc)
    plgpu.wgmma_wait(0)
    return acc[...]
  return init + sign * pl.run_scoped(scope, plgpu.ACC(init.shape, jnp.float32))


def state_pass_mosaic(W, U, kd, gc, S0, *, C: int, interpret: bool):
  """(h [B, H, N, K, V], V_new [B, Tp, H, V], S_final [B, H, K, V]) as `forward.state_pass` (no V tiles)."""
  B, Tp, H, K = W.shape
  V, N = U.shape[-1], Tp // C
  dt = W.dtype
  if jnp.dtype(dt).itemsize != 2:
    raise ValueError(f"state_pass_mosaic: W, U, Kd must be 16-bit, got {dt}")
  if C % 64 or K % 64 or V % 64:
    raise ValueError(f"state_pass_mosaic: chunk, K and V must be multiples of 64, got {C}, {K}, {V}")
  tk, tv = _transforms(dt, K), _transforms(dt, V)

  def body(W_ref, U_ref, kd_ref, gc_ref, s0_ref, h_ref, vn_ref, sf_ref, w_s, u_s, kd_s, s_s, vn_s, gc_s, st_s, bar):
    b, h = lax.axis_index("b"), lax.axis_index("h")
    plgpu.copy_gmem_to_smem(s0_ref.at[b, h], st_s, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    S = plgpu.load(st_s, (), layout=plgpu.Layout.WGMMA)

    def chunk(n, S):
      rows = pl.ds(n * C, C)
      plgpu.copy_gmem_to_smem(W_ref.at[b, rows, h], w_s, bar.at[1])
      plgpu.copy_gmem_to_smem(U_ref.at[b, rows, h], u_s, bar.at[2])
      plgpu.copy_gmem_to_smem(kd_ref.at[b, rows, h], kd_s, bar.at[3])
      plgpu.copy_gmem_to_smem(gc_ref.at[b, h, n], gc_s, bar.at[4])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's h and V_new left s_s / vn_s
      s_s[...] = S.astype(dt)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s_s, h_ref.at[b, h, n])
      plgpu.barrier_wait(bar.at[1])
      plgpu.barrier_wait(bar.at[2])
      U0 = plgpu.load(u_s, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      vn = _accumulate(U0, lambda acc: plgpu.wgmma(acc, w_s, s_s), sign=-1.0)
      vn_s[...] = vn.astype(dt)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(vn_s, vn_ref.at[b, rows, h])
      plgpu.barrier_wait(bar.at[3])
      plgpu.barrier_wait(bar.at[4])
      decay = jnp.exp(plgpu.load(gc_s, (), layout=plgpu.Layout.WGMMA.reduce(1)))
      S = S * lax.broadcast_in_dim(decay, S.shape, [0])

      return _accumulate(S, lambda acc: plgpu.wgmma(acc, kd_s.transpose((1, 0)), vn_s))

    S = lax.fori_loop(0, N, chunk, S)
    plgpu.wait_smem_to_gmem(0)
    st_s[...] = S
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(st_s, sf_ref.at[b, h])
    plgpu.wait_smem_to_gmem(0)

  sd = jax.ShapeDtypeStruct
  kernel = plgpu.kernel(
      body, out_type=(sd((B, H, N, K, V), dt), sd((B, Tp, H, V), dt), sd((B, H, K, V), jnp.float32)),
      scratch_types=[plgpu.SMEM((C, K), dt, transforms=tk), plgpu.SMEM((C, V), dt, transforms=tv),
                     plgpu.SMEM((C, K), dt, transforms=tk), plgpu.SMEM((K, V), dt, transforms=tv),
                     plgpu.SMEM((C, V), dt, transforms=tv), plgpu.SMEM((K,), jnp.float32),
                     plgpu.SMEM((K, V), jnp.float32), plgpu.Barrier(num_barriers=5)],
      grid=(B, H), grid_names=("b", "h"), interpret=_interpret_params() if interpret else None)
  return kernel(W, U, kd, gc, S0.astype(jnp.float32))
