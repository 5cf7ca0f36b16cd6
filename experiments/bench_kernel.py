"""Benchmark of the Pallas chunk kernels against XLA, cuDNN attention and flash-linear-attention.

    python -m experiments.bench_kernel --out experiments/results/bench_kernel/bench_kernel \
        [--fla-bench .peers/fla_bench.py --fla-seed .peers/fla_autotune_h100.tgz --fla-path /tmp/site]

Times forward and forward+backward (median of device-synchronised wall times after warm-up) at
B=8 T=2048 and B=2 T=8192, H=16, K=V=128, bf16 (decay g in float32, as FLA's layers keep it):
  pallas_carve         carve(..., impl="pallas")                     content gate on (gamma != 0)
  pallas_nocontent     the same kernel with gamma=None (erase gate = sigmoid(logits), w = beta); the
                       sigmoid, which a GDN-2 layer runs in XLA, is inside the timed function
  pallas_gdn2          gated_delta(..., impl="pallas") with a full write gate w [B, T, H, V]
  pallas_kda           kda(..., impl="pallas"): b = w = beta (the kernels take w as the scalar beta)
  pallas_carve_packed  carve(..., impl="pallas", segment_ids=...): packed documents of random lengths
  pallas_gdn2_packed   the same for gated_delta (lengths uniform in [doc_len/5, 9 doc_len/5], --doc_len
                       500: the cost of the document resets, next to the unpacked rows)
  pallas_carve_packed_mosaic / _triton  the packed CARVE row with the state loop named (the Mosaic GPU
                       loop, `mosaic_state`, or the Triton one)
  xla_chunk_carve_packed  carve(..., impl="chunk", segment_ids=...) (not in the default --impls)
  xla_chunk_carve      carve(..., impl="chunk") under XLA
  cudnn_attention      jax.nn.dot_product_attention(causal, implementation="cudnn")
  fla_chunk_kda/gdn2   flash-linear-attention 0.6.0 in a separate process (torch; its own script)
Peak memory is XLA's compiled memory analysis (arguments + outputs + temporaries) of the timed
function. The roofline floor counts the bytes each op must move (inputs read once, outputs written
once) and the matmul FLOPs of the WY chunk form, over the copy bandwidth and bf16 matmul rate
measured in the same run. Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from carve_jax.ops import carve, gated_delta, kda
from pallas_kernels import TuningConfig, pallas_gated_delta

H, D = 16, 128


def _sync(x):
  jax.tree.map(lambda a: a.block_until_ready(), x)
  return x


def timeit(f, *args, warmup=3, reps=20):
  """Median milliseconds of f(*args) over reps, after warm-up (compile included in warm-up)."""
  for _ in range(warmup):
    _sync(f(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    _sync(f(*args))
    ts.append((time.perf_counter() - t) * 1e3)
  return statistics.median(ts)


def peak_gib(f, *args):
  try:
    m = f.lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**30
  except Exception:  # noqa: BLE001 - memory analysis is best effort
    return float("nan")


def packed_ids(B, T, doc_len, seed=0):
  """int32 [B, T] segment ids: documents of lengths uniform in [doc_len / 5, 9 doc_len / 5] (fixed seed)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(B):
    lengths = rng.integers(max(doc_len // 5, 1), 9 * doc_len // 5 + 1, size=T // max(doc_len // 5, 1) + 1)
    rows.append(np.repeat(np.arange(len(lengths)), lengths)[:T])
  return jnp.asarray(np.stack(rows), jnp.int32)


def inputs(B, T, key=0, doc_len=500):
  ks = jax.random.split(jax.random.PRNGKey(key), 9)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (B, T, H, D), bf)
  k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(bf)
  v = jax.random.normal(ks[2], (B, T, H, D), bf)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D)) + 4.0) / 16  # as fla_bench.py
  logits = jax.random.normal(ks[4], (B, T, H, D), bf)
  beta = jax.random.uniform(ks[5], (B, T, H), bf)
  w = jax.random.uniform(ks[6], (B, T, H, D), bf)
  gamma = 0.5 * jax.random.normal(ks[7], (H,), jnp.float32)
  return dict(q=q, k=k, v=v, g=g, logits=logits, beta=beta, w=w, gamma=gamma, seg=packed_ids(B, T, doc_len))


def ops(x):
  """name -> (fn(args) -> output, args tuple)."""
  s = D**-0.5
  S0 = jnp.zeros((x["q"].shape[0], H, D, D), jnp.float32)
  base = (x["q"], x["k"], x["v"], x["g"])
  carve_args = base + (x["logits"], x["beta"], x["gamma"])
  nocontent_args = base + (x["logits"], x["beta"])  # the GDN-2 gate sigmoid is timed (inside fn)
  gated = lambda a: a[:4] + (jax.nn.sigmoid(a[4]),) + a[5:]

  def direct(cfg, gamma=True, packed=False):  # the kernel entry point with a non-default TuningConfig
    kw = dict(scale=s, initial_state=S0, chunk_size=64, content_block=64, config=cfg,
              segment_ids=x["seg"] if packed else None)
    if gamma:
      return lambda a: pallas_gated_delta(*a, **kw)[0].astype(jnp.bfloat16), carve_args
    return lambda a: pallas_gated_delta(*gated(a), None, **kw)[0], nocontent_args
  variants = {  # one knob changed from the default TuningConfig each
      "pallas_carve_bk128": direct(TuningConfig(block_k=128)),
      "pallas_carve_bk64": direct(TuningConfig(block_k=64)),
      "pallas_carve_cw4": direct(TuningConfig(carve_num_warps=4)),
      "pallas_carve_cw16": direct(TuningConfig(carve_num_warps=16)),
      "pallas_carve_cw16_st2": direct(TuningConfig(carve_num_warps=16, num_stages=2)),
      "pallas_carve_gbk64": direct(TuningConfig(grad_block_k=64)),
      "pallas_carve_cbk64": direct(TuningConfig(carve_block_k=64)),
      "pallas_carve_nw8": direct(TuningConfig(num_warps=8)),
      "pallas_carve_sw8": direct(TuningConfig(state_num_warps=8)),
      "pallas_carve_sbv128": direct(TuningConfig(state_block_v=None)),
      "pallas_carve_st2": direct(TuningConfig(num_stages=2)),
      "pallas_carve_mosaic": direct(TuningConfig(carve_state_kernel="mosaic")),
      "pallas_carve_triton": direct(TuningConfig(carve_state_kernel="triton")),
      "pallas_carve_mosaic_exact": direct(TuningConfig(mosaic_approx_math=False)),
      "pallas_carve_mosaic_bf16x3": direct(TuningConfig(mosaic_inverse="bf16x3")),
      "pallas_carve_mosaic_ax3": direct(TuningConfig(mosaic_ax="bf16x3")),
      "pallas_carve_mosaic_now": direct(TuningConfig(mosaic_w=False)),
      "pallas_carve_packed_mosaic": direct(TuningConfig(carve_state_kernel="mosaic"), packed=True),
      "pallas_carve_packed_triton": direct(TuningConfig(carve_state_kernel="triton"), packed=True),
  }
  return variants | {
      "pallas_carve": (lambda a: carve(*a, impl="pallas")[0], carve_args),
      "pallas_nocontent": (lambda a: pallas_gated_delta(*gated(a), None, scale=s, initial_state=S0,
                                                        chunk_size=64)[0], nocontent_args),
      "pallas_gdn2": (lambda a: gated_delta(*gated(a), impl="pallas")[0], base + (x["logits"], x["w"])),
      "pallas_kda": (lambda a: kda(*a, impl="pallas")[0], base + (x["beta"],)),
      "pallas_carve_packed": (lambda a: carve(*a, impl="pallas", segment_ids=x["seg"])[0], carve_args),
      "pallas_gdn2_packed": (lambda a: gated_delta(*gated(a), impl="pallas", segment_ids=x["seg"])[0],
                             base + (x["logits"], x["w"])),
      "xla_chunk_carve_packed": (lambda a: carve(*a, impl="chunk", segment_ids=x["seg"])[0], carve_args),
      "xla_chunk_carve": (lambda a: carve(*a, impl="chunk")[0], carve_args),
      "cudnn_attention": (lambda a: jax.nn.dot_product_attention(*a, is_causal=True, implementation="cudnn"),
                          (x["q"], x["k"], x["v"])),
  }


def kernel_steps(x, cfg=None):
  """name -> zero-argument function running one kernel of the CARVE / content-off paths on realistic
  intermediates (each built by running the kernels before it once); cfg: a TuningConfig (default DEFAULT)."""
  from pallas_kernels import backward as bw_mod, forward as fw_mod  # noqa: PLC0415
  from pallas_kernels.config import DEFAULT  # noqa: PLC0415
  cfg = DEFAULT if cfg is None else cfg
  q, k, v, g, logits, beta, gamma = (x[n] for n in ("q", "k", "v", "g", "logits", "beta", "gamma"))
  B, T = q.shape[:2]
  S0 = jnp.zeros((B, H, D, D), jnp.float32)
  interpret = jax.default_backend() != "gpu"  # CPU: a dry run of the script in interpret mode
  dt = fw_mod.Dtypes(q, interpret)
  kw = dict(C=64, cfg=cfg, dt=dt, interpret=interpret)
  s = D**-0.5
  gate = jax.nn.sigmoid(logits.astype(jnp.float32)).astype(q.dtype)
  do = jax.random.normal(jax.random.PRNGKey(5), v.shape, v.dtype)
  dsf = jnp.zeros_like(S0)
  run = lambda f: jax.jit(f)()
  steps = {"fwd prep (content off)": lambda: fw_mod.prep(q, k, g, gate, beta, v, **kw)}
  pre0 = run(steps["fwd prep (content off)"])
  steps["fwd state (content off)"] = lambda: fw_mod.state_pass(pre0["W"], pre0["U"], pre0["kd"], pre0["gc"], S0, **kw)
  h0, vn0, _ = run(steps["fwd state (content off)"])
  res0 = fw_mod.Residuals(h=h0, vn=vn0, c=None, A=pre0["A"], aqk=pre0["aqk"], qe=pre0["qe"], kd=pre0["kd"],
                          gc=pre0["gc"], W=pre0["W"])
  steps["bwd prep (content off)"] = lambda: bw_mod.bprep(res0, k, g, gate, None, do, scale=s, **kw)
  dvl0, _ = run(steps["bwd prep (content off)"])
  steps["bwd state (content off)"] = lambda: bw_mod.bstate(res0.qe, res0.W, res0.kd, res0.gc, dvl0, do, dsf, scale=s,
                                                           **kw)
  dh0, dvn0, _ = run(steps["bwd state (content off)"])
  steps["bwd grads (content off)"] = lambda: bw_mod.grads(q, k, v, g, gate, beta, None, None, h0, dh0, vn0, dvn0, do,
                                                           pre0["A"], scale=s, **kw)
  steps["fwd prep (CARVE)"] = lambda: fw_mod.prep(q, k, g, None, None, None, **kw)
  pre = run(steps["fwd prep (CARVE)"])
  steps["fwd state (CARVE, gate in loop)"] = lambda: fw_mod.carve_state_pass(logits, beta, v, pre, gamma, S0, cb=64,
                                                                              **kw)
  h, vn, c, A, _, _, W = run(steps["fwd state (CARVE, gate in loop)"])
  steps["fwd output"] = lambda: fw_mod.output(pre["qe"], pre["aqk"], h, vn, scale=s, out_dtype=q.dtype, **kw)
  res = fw_mod.Residuals(h=h, vn=vn, c=c, A=A, aqk=pre["aqk"], qe=pre["qe"], kd=pre["kd"], gc=pre["gc"], W=W)
  steps["bwd prep (CARVE)"] = lambda: bw_mod.bprep(res, k, g, logits, gamma, do, scale=s, **kw)
  dvl, Wb = run(steps["bwd prep (CARVE)"])
  steps["bwd state (CARVE)"] = lambda: bw_mod.bstate(res.qe, Wb, res.kd, res.gc, dvl, do, dsf, scale=s, **kw)
  dh, dvn, _ = run(steps["bwd state (CARVE)"])
  steps["bwd grads (CARVE)"] = lambda: bw_mod.grads(q, k, v, g, logits, beta, c, gamma, h, dh, vn, dvn, do, A,
                                                     scale=s, **kw)
  return steps


def breakdown(x, reps):
  """Median ms of each kernel of the CARVE and content-off paths alone, on realistic intermediates."""
  B, T = x["q"].shape[:2]
  out = {}
  for name, f in kernel_steps(x).items():
    try:
      out[name] = timeit(jax.jit(f), reps=reps)
    except Exception as e:  # noqa: BLE001 - record, go on
      out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(f"breakdown B={B} T={T} {name}: {out[name]}", flush=True)
  return out


def floors(B, T, bw, flops_rate):
  """(fwd floor ms, fwd+bwd floor ms, detail) for the CARVE kernel at this shape."""
  n = B * T * H * D
  # fwd: read q, k, v, logits (bf16), g (fp32), beta; write o (bf16); states are in-kernel.
  fwd_bytes = n * (2 * 4 + 4 + 2) + B * T * H * 2
  # bwd: read the fwd inputs again and dO; write dq, dk, dv, dlogits (bf16), dg (fp32), dbeta.
  bwd_bytes = (fwd_bytes - 2 * n) + 2 * n + n * (2 * 4 + 4) + B * T * H * 2
  C = 64
  per_chunk = 2 * (C * C * D) + 3 * 2 * C * D * D + 2 * C * C * D / 2  # L+Aqk, XS/OS/S-update, solve+AV
  fwd_flops = B * H * (T // C) * per_chunk
  bwd_flops = 2.5 * fwd_flops
  f = lambda b, fl: max(b / bw, fl / flops_rate) * 1e3
  return f(fwd_bytes, fwd_flops), f(fwd_bytes + bwd_bytes, fwd_flops + bwd_flops), dict(
      fwd_GB=fwd_bytes / 1e9, fwd_GFLOP=fwd_flops / 1e9, fb_GB=(fwd_bytes + bwd_bytes) / 1e9,
      fb_GFLOP=(fwd_flops + bwd_flops) / 1e9)


def measure_ceilings():
  small = jax.default_backend() == "cpu"  # dry run of the script only
  x = jnp.ones((2**20 if small else 2**29,), jnp.float32)  # 2 GiB on the GPU
  copy = jax.jit(lambda a: a * 1.0001)
  t = timeit(copy, x, reps=10)
  bw = 2 * x.nbytes / (t * 1e-3)
  n = 256 if small else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  mmf = jax.jit(lambda p: p @ p)
  t = timeit(mmf, a, reps=10)
  return bw, 2 * n**3 / (t * 1e-3)


def run_fla(args, shapes):
  if not args.fla_bench:
    return {}, "not run (no --fla-bench)"
  env = dict(os.environ)
  if args.fla_path:
    env["PYTHONPATH"] = args.fla_path + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, args.fla_bench, "--shapes", ",".join(f"{b}x{t}" for b, t in shapes), "--ops", "kda,gdn2"]
  if args.fla_seed:
    cmd += ["--autotune-seed", args.fla_seed]
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.fla_timeout)
  rows = {}
  for line in p.stdout.splitlines():
    f = line.split()
    if f and f[0].startswith("fla_") and len(f) >= 10:
      rows[(f[0], int(f[1]), int(f[2]))] = dict(fwd_ms=float(f[5]), fb_ms=float(f[6]), peak_gib=float(f[8]))
  return rows, (p.stdout + p.stderr)[-3000:]


@dataclasses.dataclass
class BenchKernelFlags:
  """Flags of the kernel benchmark (hyphens or underscores: --fla-bench = --fla_bench).

  Attributes:
    out: results path without extension (<out>.md, <out>.json).
    shapes: comma list of BxT (add 1x32768 for the goal's long-context row; the first is the reference).
    impls: comma list of rows (`ops`' names) timed at every shape.
    variants: extra impls (one TuningConfig knob changed each), timed at the first shape only.
    fla_bench: FLA's benchmark script (../shared/peers/fla_bench.py), run in its own process first.
    fla_seed: tgz of FLA's Triton autotune results for this GPU.
    fla_path: a site folder holding fla-core, put on FLA's PYTHONPATH.
    fla_timeout: seconds for the FLA process.
    reps: timed repetitions per row (median).
    breakdown: time each kernel alone at the first shape.
    doc_len: mean document length of the *_packed rows (lengths uniform in [doc_len/5, 9 doc_len/5]).
  """
  out: str = "experiments/results/bench_kernel/bench_kernel"
  shapes: str = "8x2048,2x8192"
  impls: str = ("pallas_carve,pallas_nocontent,pallas_gdn2,pallas_kda,pallas_carve_packed,pallas_gdn2_packed,"
                "xla_chunk_carve,cudnn_attention")
  variants: str = ""
  fla_bench: str | None = None
  fla_seed: str | None = None
  fla_path: str | None = None
  fla_timeout: int = 240
  reps: int = 20
  breakdown: bool = False
  doc_len: int = 500


def main(argv=None):
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(BenchKernelFlags, train_flags.normalise_argv(argv), prog="python -m experiments.bench_kernel",
                         description=__doc__)
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}; jax {jax.__version__}", flush=True)
  bw, rate = measure_ceilings()
  print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
  results = []
  fla, fla_log = run_fla(args, shapes)  # first: its figures survive a JAX-side time-out
  print(fla_log, flush=True)
  for (name, B, T), r in fla.items():
    results.append(dict(impl=name, B=B, T=T, **r))
  # every shape's main rows first, then the variants (first shape), then the breakdown: a time-out cuts the extras
  variants = [v for v in args.variants.split(",") if v]
  plan = [(B, T, args.impls.split(",")) for B, T in shapes] + ([(*shapes[0], variants)] if variants else [])
  for B, T, names in plan:
    x = inputs(B, T, doc_len=args.doc_len)
    ffl, fbfl, detail = floors(B, T, bw, rate)
    table = ops(x)
    for name in names:
      fn, a = table[name]
      row = dict(impl=name, B=B, T=T)
      try:
        fwd = jax.jit(fn)
        fb = jax.jit(jax.grad(lambda a: jnp.sum(fn(a).astype(jnp.float32))))
        t0 = time.time()
        _sync(fwd(a)), _sync(fb(a))
        row["compile_s"] = time.time() - t0
        row["fwd_ms"] = timeit(fwd, a, reps=args.reps)
        row["fb_ms"] = timeit(fb, a, reps=args.reps)
        row["peak_gib"] = peak_gib(fb, a)
        if name.startswith("pallas") or name.startswith("xla"):
          row["fwd_floor_ratio"] = row["fwd_ms"] / ffl
          row["fb_floor_ratio"] = row["fb_ms"] / fbfl
      except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking the rest
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
      results.append(row)
      print(json.dumps(row), flush=True)
      write(args, results, shapes, bw, rate, dev, quiet=True)  # a time-out keeps what was measured
  if args.breakdown:
    B, T = shapes[0]
    results.append(dict(impl="breakdown", B=B, T=T, kernels_ms=breakdown(inputs(B, T), args.reps)))
  write(args, results, shapes, bw, rate, dev)


def _get(results, impl, B, T, key):
  for r in results:
    if r["impl"] == impl and r["B"] == B and r["T"] == T and key in r:
      return r[key]
  return None


def write(args, results, shapes, bw, rate, dev, quiet=False):
  versions = dict(jax=jax.__version__, python=platform.python_version())
  try:
    import triton  # noqa: PLC0415
    versions["triton"] = triton.__version__
  except ImportError:
    pass
  commit = os.environ.get("CARVE_COMMIT", "unknown (set CARVE_COMMIT)")
  lines = [f"# Kernel benchmark ({dev.device_kind})", "",
           f"Command: `{' '.join(sys.argv)}`; commit {commit}", "",
           f"Versions: {versions}; FLA: fla-core 0.6.0 via its own torch script (separate process).", "",
           f"Measured ceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s.",
           "", "H=16, K=V=128, bf16 (g float32). Times: median ms after warm-up.", "",
           "| impl | B | T | fwd ms | fwd+bwd ms | peak GiB | fwd/floor | fb/floor |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    if r["impl"] == "breakdown":
      continue
    if "error" in r:
      lines.append(f"| {r['impl']} | {r['B']} | {r['T']} | error: {r['error'][:120]} | | | | |")
      continue
    f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if k in r and r[k] is not None else ""
    lines.append(f"| {r['impl']} | {r['B']} | {r['T']} | {f('fwd_ms')} | {f('fb_ms')} | {f('peak_gib', '{:.2f}')} "
                 f"| {f('fwd_floor_ratio', '{:.1f}x')} | {f('fb_floor_ratio', '{:.1f}x')} |")
  for r in results:
    if r["impl"] == "breakdown":
      lines += ["", f"Kernels alone, B={r['B']} T={r['T']} (median ms):", ""]
      lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in r["kernels_ms"].items()]
  lines += ["", "## Targets", ""]
  targets = {}
  for B, T in shapes:
    ffl, fbfl, detail = floors(B, T, bw, rate)
    lines.append(f"Floor B={B} T={T}: fwd {ffl:.3f} ms, fwd+bwd {fbfl:.3f} ms ({detail}).")
    c = _get(results, "pallas_carve", B, T, "fb_ms")
    cf = _get(results, "pallas_carve", B, T, "fwd_ms")
    n = _get(results, "pallas_nocontent", B, T, "fb_ms")
    kda = _get(results, "fla_chunk_kda", B, T, "fb_ms")
    kdaf = _get(results, "fla_chunk_kda", B, T, "fwd_ms")
    gdn2 = _get(results, "fla_chunk_gdn2", B, T, "fb_ms")
    ours_gdn2 = _get(results, "pallas_gdn2", B, T, "fb_ms")
    ours_kda = _get(results, "pallas_kda", B, T, "fb_ms")
    peak, fla_peak = _get(results, "pallas_carve", B, T, "peak_gib"), _get(results, "fla_chunk_kda", B, T, "peak_gib")
    t = {}
    if c and gdn2:
      t["must: CARVE fwd+bwd / FLA chunk_gdn2 (<= 1.0)"] = c / gdn2
    if c and n:
      t["must: content overhead fwd+bwd, % (<= 10; goal <= 2)"] = (c / n - 1) * 100
    if ours_gdn2 and gdn2:
      t["must: our GDN-2 / FLA chunk_gdn2 fwd+bwd (<= 1.0)"] = ours_gdn2 / gdn2
    if ours_kda and kda:
      t["must: our KDA / FLA chunk_kda fwd+bwd (<= 1.0)"] = ours_kda / kda
    if peak and fla_peak:
      t["must: CARVE peak memory / FLA chunk_kda's (< 1.0)"] = peak / fla_peak
    if c and kda:
      t["goal: CARVE fwd+bwd / FLA chunk_kda (<= 0.8)"] = c / kda
    if cf and kdaf:
      t["goal: CARVE forward / FLA chunk_kda forward (<= 1.0)"] = cf / kdaf
    if cf:
      t["CARVE forward / roofline floor"] = cf / ffl
    for name, plain in (("pallas_carve_packed", c), ("pallas_gdn2_packed", ours_gdn2)):
      packed = _get(results, name, B, T, "fb_ms")
      if packed and plain:
        t[f"{name} fwd+bwd / unpacked (document reset cost)"] = packed / plain
    targets[f"{B}x{T}"] = t
    for k, v in t.items():
      lines.append(f"- B={B} T={T}: {k}: {v:.3f}")
  per_tok = [(_get(results, "pallas_carve", B, T, "fb_ms") or float("nan")) / (B * T) for B, T in shapes]
  for (B, T), pt in list(zip(shapes, per_tok))[1:]:  # the goal: every longer row within 1.1x the first's
    lines.append(f"- goal: CARVE time per token fwd+bwd, B={B} T={T} vs B={shapes[0][0]} T={shapes[0][1]} (<= 1.10): "
                 f"{pt / per_tok[0]:.3f}")
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".md", "w") as fh:
    fh.write(text)
  with open(args.out + ".json", "w") as fh:
    json.dump(dict(device=dev.device_kind, versions=versions, command=sys.argv, commit=commit, copy_bw=bw, bf16_rate=rate,
                   results=results, targets=targets), fh, indent=1)
  if not quiet:
    print(text, flush=True)


if __name__ == "__main__":
  main()
