"""Offline look at the compiled Pallas/Triton kernels (no GPU needed): registers, spills, barriers, dots.

    python -m experiments.kernel_ptx_stats [--kernels prep,grads] [--num-warps 4,8] [--dtype bfloat16]

Lowers the forward and backward kernels (`--kernels ..._packed`: their packed-document forms) to Triton IR
with jax's Pallas lowering (a compute
capability of 9.0 is faked, so this runs on a CPU-only machine), compiles that IR for sm_90 with
the `triton` package installed here (the GPU image compiles with jaxlib's own Triton, so counts are
indicative), and prints per chunk-loop body: CTA barriers (bar.sync), shared-memory staging
(ttg.local_alloc), layout conversions, dots, wgmma / mma.sync instructions, global loads, exp2 and
local-memory accesses; from the cubin (cuobjdump --dump-resource-usage, bundled with triton) the
registers per thread, spill stores/loads and the stack frame.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types
from typing import Literal

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import pallas_call_registration as pcr

from pallas_kernels import backward as bw
from pallas_kernels import forward as fw
from pallas_kernels.config import TuningConfig
from pallas_kernels.segments import Segments


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
  import os  # noqa: PLC0415
  import re  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as fh:
    fh.write(ttir)
  k = triton.compile(fh.name, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": num_warps, "num_stages": num_stages})
  ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
  out = {"bar.sync": ptx.count("bar.sync"), "convert_layout": ttgir.count("ttg.convert_layout"),
         "dots": ttgir.count("tt.dot ") + ttgir.count("ttng.warp_group_dot "),
         "wgmma": ptx.count("wgmma.mma_async"), "mma.sync": ptx.count("mma.sync"), "ex2": ptx.count("ex2.approx"),
         "shared_bytes": k.metadata.shared}
  with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
    fh.write(k.asm["cubin"])
  tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
  res = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
  for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
    m = re.search(pat, res)
    out[key] = int(m.group(1)) if m else None
  sass = subprocess.run([tool, "--dump-sass", fh.name], capture_output=True, text=True).stdout
  out["STL"], out["LDL"] = sass.count(" STL"), sass.count(" LDL")
  return out


def kernels(dt, cfg):
  """name -> (fn, abstract args, num_warps) for every kernel, B=1 T=128 H=1 K=V=128, chunk 64."""
  B, T, H, K, N, C = 1, 128, 1, 128, 2, 64
  sd = lambda s, d=dt: jax.ShapeDtypeStruct(s, d)
  f32 = jnp.float32
  d = fw.Dtypes(sd((1,)), False)
  kw = dict(C=C, cfg=cfg, dt=d, interpret=False)
  x, xg, beta, gam = sd((B, T, H, K)), sd((B, T, H, K), f32), sd((B, T, H)), sd((H,), f32)
  st, vec, S0, A = sd((B, H, N, K, K)), sd((B, H, N, K), f32), sd((B, H, K, K), f32), sd((B, T, H, C), f32)
  parts = sd((fw.n_parts(C), B, T, H, K))
  i32 = sd((B, T), jnp.int32)
  seg = lambda doc, blk=None: Segments(ids=doc, doc=doc, blk=blk)
  packed = {  # packed documents (segment ids): the kernels that take them
      "prep_packed": (lambda q, k, g, b, w, v, doc: fw.prep(q, k, g, b, w, v, seg(doc), **kw),
                      (x, x, xg, x, beta, x, i32), cfg.num_warps),
      "carve_prep_packed": (lambda q, k, g, doc, blk: fw.prep(q, k, g, None, None, None, seg(doc, blk), **kw),
                            (x, x, xg, i32, i32), cfg.num_warps),
      "carve_state_packed": (lambda l, b, v, kr, kc, ke, kd, gc, gm, S, kj, gj, doc, blk: fw.carve_state_pass(
          l, b, v, dict(kr=kr, kc=kc, ke=ke, kd=kd, gc=gc, kj=kj, gj=gj), gm, S, seg(doc, blk), cb=64, **kw),
                             (x, beta, x, parts, parts, x, x, vec, gam, S0, x, vec, i32, i32), cfg.carve_num_warps),
      "bprep_packed": (lambda aqk, do, A, k, g, b, c, gm, c2, doc, blk: bw.bprep(
          fw.Residuals(h=None, vn=None, c=c, A=A, aqk=aqk, qe=None, kd=None, gc=None, W=None, c2=c2), k, g, b, gm, do,
          seg(doc, blk), scale=0.1, **kw), (sd((B, T, H, C)), x, A, x, xg, x, vec, gam, vec, i32, i32), cfg.num_warps),
      "grads_packed": (lambda *a: bw.grads(*a[:14], seg(a[15], a[16]), a[14], scale=0.1, **kw),
                       (x, x, x, xg, x, beta, vec, gam, st, st, x, sd((B, T, H, K), f32), x, A, vec, i32, i32),
                       cfg.grad_num_warps),
  }
  return packed | {
      "prep": (lambda q, k, g, b, w, v: fw.prep(q, k, g, b, w, v, **kw), (x, x, xg, x, beta, x), cfg.num_warps),
      "carve_prep": (lambda q, k, g: fw.prep(q, k, g, None, None, None, **kw), (x, x, xg), cfg.num_warps),
      "state": (lambda W, U, kd, gc, S: fw.state_pass(W, U, kd, gc, S, **kw), (x, x, x, vec, S0),
                cfg.state_num_warps),
      "carve_state": (lambda l, b, v, kr, kc, ke, kd, gc, gm, S: fw.carve_state_pass(
          l, b, v, dict(kr=kr, kc=kc, ke=ke, kd=kd, gc=gc), gm, S, cb=64, **kw),
                      (x, beta, x, parts, parts, x, x, vec, gam, S0), cfg.carve_num_warps),
      "output": (lambda qe, aqk, h, vn: fw.output(qe, aqk, h, vn, scale=0.1, out_dtype=dt, **kw),
                 (x, sd((B, T, H, C)), st, x), cfg.num_warps),
      "bprep": (lambda aqk, do, A, k, g, b, c, gm: bw.bprep(
          fw.Residuals(h=None, vn=None, c=c, A=A, aqk=aqk, qe=None, kd=None, gc=None, W=None), k, g, b, gm, do,
          scale=0.1, **kw), (sd((B, T, H, C)), x, A, x, xg, x, vec, gam), cfg.num_warps),
      "bstate": (lambda qe, W, kd, gc, dvl, do, dsf: bw.bstate(qe, W, kd, gc, dvl, do, dsf, scale=0.1, **kw),
                 (x, x, x, vec, sd((B, T, H, K), f32), x, S0), cfg.state_num_warps),
      "grads": (lambda *a: bw.grads(*a, scale=0.1, **kw),
                (x, x, x, xg, x, beta, vec, gam, st, st, x, sd((B, T, H, K), f32), x, A), cfg.grad_num_warps),
  }


@dataclasses.dataclass
class PtxFlags:
  """Flags of the offline compile statistics (hyphens or underscores).

  Attributes:
    kernels: comma list of kernels (prep, carve_prep, state, carve_state, output, bprep, bstate, grads; the
      packed-document forms prep_packed, carve_prep_packed, carve_state_packed, bprep_packed, grads_packed).
    num_warps: comma list overriding every kernel's warps (empty: each kernel's own).
    dtype: input dtype of the kernels.
    block_k: TuningConfig.block_k.
  """
  kernels: str = "prep,carve_prep,state,carve_state,output,bprep,bstate,grads"
  num_warps: str = ""
  dtype: Literal["bfloat16", "float32"] = "bfloat16"
  block_k: int = TuningConfig().block_k


def main(argv=None):
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  a = train_flags.cli(PtxFlags, train_flags.normalise_argv(argv), prog="python -m experiments.kernel_ptx_stats",
                      description=__doc__)
  dt = jnp.dtype(a.dtype)
  for nw in ([int(w) for w in a.num_warps.split(",")] if a.num_warps else [None]):
    cfg = TuningConfig(block_k=a.block_k) if nw is None else TuningConfig(
        block_k=a.block_k, num_warps=nw, grad_num_warps=nw, state_num_warps=nw, carve_num_warps=nw)
    table = kernels(dt, cfg)
    for name in a.kernels.split(","):
      fn, args, warps = table[name]
      t0 = time.time()
      st = stats(ttir_of(fn, args), warps, cfg.num_stages)
      print(f"{name} {a.dtype} K=V=128 C=64 block_k={cfg.block_k} warps={warps}: {st} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
