"""Offline look at the compiled Pallas/Triton kernels (no GPU needed): barriers, layout changes, dots.

    python experiments/kernel_ptx_stats.py [--sub-chunks 16,32,64] [--num-warps 8]

Lowers the forward and backward kernels to Triton IR with jax's Pallas lowering (a compute
capability of 9.0 is faked, so this runs on a CPU-only machine), compiles that IR for sm_90 with
the `triton` package installed here (the GPU image compiles with jaxlib's own Triton, so counts are
indicative), and prints per chunk-loop body: CTA barriers (bar.sync), shared-memory staging
(ttg.local_alloc), layout conversions, dots, wgmma / mma.sync instructions, global loads, exp2 and
local-memory (spill) accesses. In these kernels time per chunk tracked the barrier count (NOTES.md).
"""

from __future__ import annotations

import argparse
import time
import types

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import pallas_call_registration as pcr

from pallas_kernels import chunk_bwd as cb
from pallas_kernels import chunk_fwd as cf
from pallas_kernels.config import TuningConfig


def ttir_of(fn, args) -> str:
  """Triton IR text of the single pallas_call inside fn(*args)."""
  mods = []
  orig_info, orig_lower = pcr.gpu_info_lib.get_gpu_info, pcr.lowering.lower_jaxpr_to_triton_module

  def lower(*a, **k):
    r = orig_lower(*a, **k)
    mods.append(r.module.operation.get_asm(enable_debug_info=False))
    return r
  pcr.gpu_info_lib.get_gpu_info = lambda: types.SimpleNamespace(compute_capability=90)
  pcr.lowering.lower_jaxpr_to_triton_module = lower
  try:
    export.export(jax.jit(fn), platforms=["cuda"])(*args)
  except ValueError:  # export refuses the Triton custom call after lowering: the IR is captured
    pass
  finally:
    pcr.gpu_info_lib.get_gpu_info, pcr.lowering.lower_jaxpr_to_triton_module = orig_info, orig_lower
  return mods[0]


def stats(ttir: str, num_warps: int, num_stages: int) -> dict:
  import tempfile  # noqa: PLC0415

  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as fh:
    fh.write(ttir)
  k = triton.compile(fh.name, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": num_warps, "num_stages": num_stages})
  ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
  return {"bar.sync": ptx.count("bar.sync"), "local_alloc": ttgir.count("ttg.local_alloc"),
          "convert_layout": ttgir.count("ttg.convert_layout"), "dots": ttgir.count("tt.dot "),
          "wgmma": ptx.count("wgmma.mma_async"), "mma.sync": ptx.count("mma.sync"),
          "ld.global": ptx.count("ld.global"), "ex2": ptx.count("ex2.approx"),
          "spill ld/st.local": ptx.count("ld.local") + ptx.count("st.local"), "shared_bytes": k.metadata.shared}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sub-chunks", default="16,32,64")
  ap.add_argument("--num-warps", type=int, default=8)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  a = ap.parse_args()
  B, T, H, K, N = 1, 128, 1, 128, 2
  dt = jnp.dtype(a.dtype)
  sd = lambda s, d=dt: jax.ShapeDtypeStruct(s, d)
  x, f32 = sd((B, T, H, K)), jnp.float32
  for sc in (int(s) for s in a.sub_chunks.split(",")):
    cfg = TuningConfig(sub_chunk=sc, num_warps=a.num_warps, bwd_num_warps=a.num_warps)
    fwd = lambda q, k, v, g, b, beta, gamma, S0: cf.chunk_fwd(
        q, k, v, g, b, beta, gamma, S0, scale=0.1, chunk_size=64, content_block=64, cfg=cfg, save=False,
        interpret=False)[:2]
    bwd = lambda q, k, v, g, b, beta, gamma, st, cv, do, dsf: cb.chunk_bwd(
        q, k, v, g, b, beta, gamma, st, cv, do, dsf, scale=0.1, chunk_size=64, cfg=cfg, interpret=False)
    common = (x, x, x, sd((B, T, H, K), f32), x, sd((B, T, H)), sd((H,), f32))
    for name, fn, args, (nw, ns) in (
        ("fwd", fwd, common + (sd((B, H, K, K), f32),), (cfg.num_warps, cfg.num_stages)),
        ("bwd", bwd, common + (sd((B, H, N, K, K), f32), sd((B, H, N, K), f32), x, sd((B, H, K, K), f32)),
         (cfg.bwd_num_warps, cfg.bwd_num_stages))):
      t0 = time.time()
      st = stats(ttir_of(fn, args), nw, ns)
      print(f"sub_chunk={sc} {name} CARVE {a.dtype} K=V=128 warps={nw}: {st} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
