"""Parameters, peak training memory and step time of CARVE vs GDN-2 at the paper's 1.3B width.

Paper (1.3B, H100): CARVE has 19% fewer parameters, 13% lower peak memory, 0.4% more step time
than GDN-2. Here:
  * parameters: exact, from the abstract model (`carve_jax.model.abstract_model`, nothing
    allocated) of `preset("1.3b")` (d_model 2048, 16 heads x 128, 24 layers, vocab 32000, untied),
    in total, without embeddings/head, and in the token mixers alone;
  * memory and time (GPU): one AdamW training step (bf16 compute, float32 params and optimizer
    state) on a micro-batch of B x T tokens, each mixer in its own process so the device's peak
    counter (`memory_stats()["peak_bytes_in_use"]`) belongs to that model alone; XLA's own
    account of the step (arguments + outputs + temporaries) is reported beside it. Step time is
    the median of `--steps` steps after `--warmup`.

    python -m experiments.efficiency --tiny                     # CPU: exact 1.3B counts + a tiny step
    python -m experiments.efficiency --batch 1 --seq_len 2048   # GPU
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

from carve_jax import ops
from carve_jax.configs import preset
from carve_jax.model import abstract_model, param_breakdown, param_count
from carve_jax.train.batch_loop import compiled_memory
from experiments import flags, report
from experiments.paper import PAPER

MIXERS = ("carve", "gdn2")


def count_params(cfg) -> dict:
  m = abstract_model(cfg)
  c = param_count(m)
  emb = c.get("embed", 0) + c.get("head", 0)
  return {"total": c["total"], "non_embedding": c["total"] - emb, "mixer": c.get("mixer", 0), "mlp": c.get("mlp", 0),
          "embed_and_head": emb, "breakdown": param_breakdown(m)}


def worker(mixer: str, args) -> dict:
  """One training step of the model, timed and measured, in this process."""
  import jax
  from flax import nnx

  from carve_jax.model import LM
  from carve_jax.train import distributed as dist
  from carve_jax.train.config import OptimConfig
  from carve_jax.train.optim import make_optimizer
  from carve_jax.train.step import init_state, lm_loss, make_train_step

  impl = ops.resolve_impl(args.impl)
  if args.tiny:
    cfg = preset("tiny", mixer=mixer, impl=impl)
  else:
    cfg = preset("1.3b", mixer=mixer, impl=impl, n_layers=args.n_layers, remat=args.remat,
                 max_seq_len=max(args.seq_len, 2048))
  mesh = dist.make_mesh()
  t0 = time.time()
  model = LM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = make_optimizer(OptimConfig(), 1000)
  state = dist.replicate(mesh, init_state(params, opt, 0))
  del model, params
  jax.block_until_ready(state.params)
  init_s = time.time() - t0
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
  batch = dist.global_batch(mesh, {"inputs": tok[:, :-1], "targets": tok[:, 1:]})
  step = make_train_step(graphdef, rest, opt, mesh, loss_fn=lm_loss)
  t0 = time.time()
  compiled = step.lower(state, batch).compile()
  compile_s = time.time() - t0
  xla_bytes = compiled_memory(compiled)
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {"mixer": mixer, "impl": impl, "params": n_params, "init_s": init_s, "compile_s": compile_s,
          "step_s_median": float(np.median(times)), "step_s_all": times,
          "tokens_per_s": args.batch * args.seq_len / float(np.median(times)),
          "peak_bytes_in_use": dist.peak_memory_bytes(), "xla_step_bytes": xla_bytes,
          "loss": float(metrics["loss"]), "device": report.env_info()["device"]}


@dataclasses.dataclass(frozen=True)
class EfficiencyFlags(flags.CommonFlags):
  """Flags of the efficiency measurement.

  Attributes:
    batch: rows of the micro-batch.
    seq_len: tokens per row.
    n_layers: blocks of the 1.3B-width model.
    remat: rematerialise each block in the backward pass.
    steps: timed steps.
    warmup: untimed steps first.
    no_step: parameter counts only.
    worker_timeout: seconds per mixer's measuring process.
    worker: (internal) measure this mixer in this process.
  """
  batch: int = 1
  seq_len: int = 2048
  n_layers: int = 24
  remat: bool = False
  steps: int = 8
  warmup: int = 2
  no_step: bool = False
  worker_timeout: float = 300
  worker: str | None = None


TINY = dict(batch=2, seq_len=64, steps=3, warmup=1)


def main(argv=None) -> dict:
  args = flags.parse(EfficiencyFlags, argv, prog="python -m experiments.efficiency", description=__doc__, tiny=TINY)
  if args.worker:
    print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
    return {}

  counts = {m: count_params(preset("1.3b", mixer=m)) for m in MIXERS}
  rel = {k: counts["carve"][k] / counts["gdn2"][k] - 1 for k in ("total", "non_embedding", "mixer")}
  steps = {}
  if not args.no_step:
    for m in MIXERS:
      cmd = [sys.executable, "-m", "experiments.efficiency", "--worker", m, "--batch", str(args.batch),
             "--seq_len", str(args.seq_len), "--n_layers", str(args.n_layers), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--impl", args.impl] + (["--tiny"] if args.tiny else []) + (["--remat"] if args.remat else [])
      env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
      print(f"[efficiency] {m}: {' '.join(cmd[1:])}", flush=True)
      try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout,
                             cwd=report.REPO)
      except subprocess.TimeoutExpired as e:
        out = subprocess.CompletedProcess(cmd, -9, e.stdout or "", f"timed out after {args.worker_timeout}s\n"
                                          + (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""))
      lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
      if out.returncode or not lines:
        steps[m] = {"error": (out.stderr or out.stdout)[-2000:]}
        print(f"  failed: {steps[m]['error'][-500:]}", flush=True)
      else:
        steps[m] = json.loads(lines[-1][7:])
        print(f"  {steps[m]['step_s_median'] * 1e3:.1f} ms/step, peak {report.fmt_bytes(steps[m]['peak_bytes_in_use'])}, "
              f"XLA {report.fmt_bytes(steps[m]['xla_step_bytes'])}, compile {steps[m]['compile_s']:.0f}s", flush=True)
  step_rel = {}
  if all("step_s_median" in steps.get(m, {}) for m in MIXERS):
    c, g = steps["carve"], steps["gdn2"]
    step_rel = {"step_time": c["step_s_median"] / g["step_s_median"] - 1}
    if c["peak_bytes_in_use"] and g["peak_bytes_in_use"]:
      step_rel["peak_memory"] = c["peak_bytes_in_use"] / g["peak_bytes_in_use"] - 1
    if c["xla_step_bytes"] and g["xla_step_bytes"]:
      step_rel["xla_step_memory"] = c["xla_step_bytes"] / g["xla_step_bytes"] - 1
  payload = {"experiment": "efficiency", "tiny": args.tiny, "paper": PAPER,
             "params_1p3b": counts, "params_relative": rel,
             "step_shape": {"batch": args.batch, "seq_len": args.seq_len,
                            "model": "preset('tiny')" if args.tiny else f"preset('1.3b', n_layers={args.n_layers})",
                            "remat": args.remat, "compute": "float32 (CPU)" if args.tiny else "bfloat16, f32 params+AdamW"},
             "step": steps, "step_relative": step_rel}
  md = _markdown(args, counts, rel, steps, step_rel)
  plt = report.plt()
  fig, ax = plt.subplots(1, 3 if step_rel else 1, figsize=(12 if step_rel else 5, 3.6), squeeze=False)
  ax = ax[0]
  keys = ["total", "non_embedding", "mixer"]
  x = np.arange(len(keys))
  for i, m in enumerate(MIXERS):
    ax[0].bar(x + 0.4 * i, [counts[m][k] / 1e6 for k in keys], 0.4, label=m)
  ax[0].set_xticks(x + 0.2, keys)
  ax[0].set(ylabel="parameters (M)", title="1.3B config: parameters")
  ax[0].legend()
  if step_rel:
    mem_key = "peak_bytes_in_use" if steps["carve"]["peak_bytes_in_use"] else "xla_step_bytes"
    for i, m in enumerate(MIXERS):
      ax[1].bar(i, (steps[m][mem_key] or 0) / 2**30, 0.6, label=m)
      ax[2].bar(i, steps[m]["step_s_median"] * 1e3, 0.6, label=m)
    ax[1].set_xticks(range(2), MIXERS)
    ax[2].set_xticks(range(2), MIXERS)
    ax[1].set(ylabel="GiB", title=f"{'peak' if mem_key == 'peak_bytes_in_use' else 'XLA step'} memory, "
              f"B={args.batch} T={args.seq_len}")
    ax[2].set(ylabel="ms", title="training step time (median)")
  report.write_results("efficiency" + args.tag, args.out_dir or report.results_dir("efficiency"), payload, md, fig)
  plt.close(fig)
  return payload


def _markdown(args, counts, rel, steps, step_rel) -> str:
  rows = [[k, f"{counts['carve'][k]:,}", f"{counts['gdn2'][k]:,}", f"{100 * rel[k]:+.2f}%"]
          for k in ("total", "non_embedding", "mixer")]
  md = ("Parameters of `preset('1.3b')` (d_model 2048, 16 heads x 128, 24 layers, vocab 32000, untied head), "
        "exact (abstract init):\n\n" + report.md_table(["count", "CARVE", "GDN-2", "CARVE vs GDN-2"], rows)
        + f"\n\nPaper: {100 * PAPER['params']:+.0f}% parameters.\n\n")
  per = {m: {k: v for k, v in counts[m]["breakdown"].items() if k.startswith("mixer.")} for m in MIXERS}
  names = sorted(set(per["carve"]) | set(per["gdn2"]))
  md += "Mixer parameters by projection (summed over 24 layers):\n\n" + report.md_table(
      ["projection", "CARVE", "GDN-2"], [[n, per["carve"].get(n, 0), per["gdn2"].get(n, 0)] for n in names]) + "\n\n"
  shape = "preset('tiny') (CPU)" if args.tiny else f"1.3B config, {args.n_layers} layers"
  if not steps:
    return md + "Training step: not run.\n"
  rows = []
  for m in MIXERS:
    s = steps[m]
    if "error" in s:
      rows.append([m, "failed", "", "", "", ""])
    else:
      rows.append([m, s["impl"], f"{s['step_s_median'] * 1e3:.1f}", f"{s['tokens_per_s']:,.0f}",
                   report.fmt_bytes(s["peak_bytes_in_use"]), report.fmt_bytes(s["xla_step_bytes"])])
  md += (f"One AdamW training step, {shape}, micro-batch {args.batch} x {args.seq_len} tokens"
         f"{', remat' if args.remat else ''} (median of {args.steps} steps after {args.warmup} warm-up; each "
         "mixer in its own process):\n\n" + report.md_table(["mixer", "impl", "step ms", "tokens/s", "peak device memory",
                                                       "XLA step memory"], rows))
  if step_rel:
    md += "\n\nCARVE vs GDN-2: " + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in step_rel.items())
    md += (f" (paper: memory {100 * PAPER['memory']:+.0f}%, time {100 * PAPER['time']:+.1f}%).")
  return md + "\n"


if __name__ == "__main__":
  main()
