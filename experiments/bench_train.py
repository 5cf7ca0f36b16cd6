"""Training throughput of CARVE, GDN-2, KDA and attention: the device-only step against `carve-train`'s loop.

For each row (mixer x size x T, the batch B = tokens_per_step / T so every row trains on the same
tokens per step), in a process of its own (so the device's peak-memory counter is that row's):
  * first step s: from building the model to the end of its first training step (model init, trace,
    XLA compile, one step); the step is compiled ahead of time into the persistent XLA cache, which
    the loop below then loads;
  * device-only step ms: the jitted step (`carve_jax.train.step.FlatTrainStep`, the loop's own) run
    back to back `--device_reps` times on one random-token batch already on the device, timed to the
    last result (median of 3 such runs); the same on one batch of real text (the loop's data) as a
    check that the data does not change the step's time;
  * loop tokens/s: `carve_jax.train.loop.train` itself, same process and config, over `--loop_steps`
    steps after the first (its `perf` record), with its host ms per step (data, transfer, dispatch);
    loop / device is the issue-12 target (>= 0.95);
  * MFU: tokens/s x `carve_jax.train.metrics.train_flops_per_token` (the FLOP count, stated there:
    3 x (2 x matmul weights + per-layer mixer FLOPs)) / the device's dense bf16 peak
    (`PEAK_BF16_FLOPS`, 989.4 TFLOP/s for an H100/H200);
  * peak memory: the device's `peak_bytes_in_use` after the timed steps, and XLA's account of the
    compiled step (arguments + outputs + temporaries).
The loop trains without document resets (`reset_documents=False`): the unpacked kernels, as in
`bench_kernel` (with segment ids CARVE's state loop takes two passes in chunks where a content block begins
mid-chunk: `bench_kernel`'s pallas_carve_packed rows, NOTES v11).
Sizes: "50m" is the preset (d 512, 12 layers, 8 heads x 64); "350m" is d 1024, 24 layers, 8 heads
x 128 (347M parameters for CARVE at the byte vocabulary). bf16 compute, impl "auto" (Pallas on GPU),
scan over layers on. `--remat_policies` adds rows of other remat policies (memory / time trade-off).

    python -m experiments.bench_train --tiny                          # CPU: CARVE and attention, tiny sizes
    python -m experiments.bench_train --budget_s 450                  # GPU: as many rows as fit, in order
    python -m experiments.bench_train --rows 50m:8192,350m --mixers carve,attention --budget_s 450
    python -m experiments.bench_train --compile_scaling --tiny        # first-step time at 12 vs 48 layers

Writes <out_dir>/bench_train<tag>.{json,md,png} after every row (a cut run keeps what it measured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

MIXERS = ("carve", "gdn2", "kda", "attention")
SIZES = ("50m", "350m")
SEQ_LENS = (8192, 32768, 2048)  # row order: the most informative first, so a cut budget keeps them


def model_config(size: str, mixer: str, seq_len: int, *, tiny: bool, impl: str, remat_policy: str = "none",
                 scan_layers: bool = True, n_layers: int | None = None):
  from carve_jax.configs import ModelConfig, preset
  if tiny:
    cfg = preset("tiny", mixer=mixer, content_block=16, chunk_size=16, n_layers=2)
  elif size == "50m":
    cfg = preset("50m", mixer=mixer, compute_dtype="bfloat16")
  elif size == "350m":
    cfg = ModelConfig(mixer=mixer, vocab_size=256, d_model=1024, n_layers=24, n_heads=8, head_dim=128,
                      mlp_multiple=128, compute_dtype="bfloat16")
  else:
    raise ValueError(f"bench_train: size must be one of {SIZES}, got {size!r}")
  over = dict(impl=impl, remat_policy=remat_policy, scan_layers=scan_layers, max_seq_len=max(seq_len, 2048))
  if n_layers is not None:
    over["n_layers"] = n_layers
  return cfg.replace(**over)


def train_config(mcfg, *, batch: int, seq_len: int, steps: int, log_every: int, out_dir: str):
  from carve_jax.train.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
  return TrainConfig(model=mcfg, optim=OptimConfig(lr=1e-3, warmup_steps=10),
                     data=DataConfig(corpus="fixture", seq_len=seq_len, batch_size=batch, reset_documents=False),
                     ckpt=CheckpointConfig(ckpt_every=10**9, ckpt_async=False), steps=steps, log_every=log_every,
                     eval_every=0, eval_batches=1, out_dir=out_dir, progress=False)


def text_tokens(tokens_dir: str | None, need: int):
  """(tokenizer, train, val) byte streams: an export folder, or the bundled fixture corpus repeated."""
  import numpy as np
  from carve_jax.data.tokenizer import get_tokenizer
  from experiments.windows import load_stream
  stream, _ = load_stream(tokens_dir, "train")
  stream = np.asarray(stream, np.int32)
  reps = max(1, -(-need // len(stream)))
  stream = np.tile(stream, reps)
  return get_tokenizer("byte"), stream, stream[: max(need // 4, 4096)]


class _Stop(Exception):
  pass


def worker(spec: dict) -> dict:
  """One row, in this process. Returns the measurements (or an "error")."""
  import jax
  import numpy as np
  from flax import nnx

  from carve_jax.model import LM
  from carve_jax.train import distributed as dist
  from carve_jax.train.metrics import mfu, peak_flops, read_jsonl, train_flops_per_token
  from carve_jax.train.optim import lr_schedule, make_optimizer
  from carve_jax.train.step import FlatTrainStep, init_state
  from carve_jax import ops
  from carve_jax.train.batch_loop import compiled_memory
  from experiments import runtime

  runtime.setup(spec["cache_dir"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  # GPU: impl "auto" goes to the model as is (carve_jax.ops picks Pallas where it supports the call).
  impl = ops.resolve_impl(spec["impl"]) if spec["tiny"] else spec["impl"]
  T, B = spec["seq_len"], spec["batch"]
  mcfg = model_config(spec["size"], spec["mixer"], T, tiny=spec["tiny"], impl=impl,
                      remat_policy=spec["remat_policy"], scan_layers=spec["scan_layers"], n_layers=spec.get("n_layers"))
  loop_steps, log_every = spec["loop_steps"], spec["log_every"]
  out = dict(spec, impl=impl, params=None, flops_per_token=train_flops_per_token(mcfg, T))
  tmp = tempfile.mkdtemp(prefix="bench_train_")
  cfg = train_config(mcfg, batch=B, seq_len=T, steps=1 + loop_steps + log_every, log_every=log_every, out_dir=tmp)
  mesh = dist.make_mesh()
  rng = np.random.default_rng(0)

  def random_batch():
    toks = rng.integers(0, mcfg.vocab_size, (B, T + 1)).astype(np.int32)
    return dist.global_batch(mesh, {"inputs": toks[:, :-1], "targets": toks[:, 1:]})

  # 1. First step: model, state, trace, compile (into the persistent cache), one step.
  t0 = time.perf_counter()
  graphdef, params, rest = nnx.split(LM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  out["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  state = dist.replicate(mesh, init_state(params, optimizer, 0))
  del params
  step = FlatTrainStep(graphdef, rest, optimizer, mesh, state, schedule=lr_schedule(cfg.optim, cfg.steps))
  leaves = step.flatten(state)
  del state
  batch = random_batch()
  t1 = time.perf_counter()
  compiled = step.jitted.lower(leaves, batch).compile()
  out["compile_s"] = time.perf_counter() - t1
  leaves, m = compiled(leaves, batch)
  jax.block_until_ready(m)
  out["first_step_s"] = time.perf_counter() - t0
  out["xla_step_bytes"] = compiled_memory(compiled)

  # 2. Device-only: back-to-back steps on a batch already on the device.
  def timed(b, reps):
    nonlocal leaves
    runs = []
    for _ in range(3):
      t = time.perf_counter()
      for _ in range(reps):
        leaves, m = compiled(leaves, b)
      jax.block_until_ready(m)
      runs.append((time.perf_counter() - t) / reps)
    return 1e3 * float(np.median(runs))

  out["device_ms"] = timed(batch, spec["device_reps"])
  out["device_tokens_per_s"] = B * T / (out["device_ms"] / 1e3)
  try:  # the text and the loop need carve_jax.data (grain: carry its wheel on the GPU machine, .whl/)
    tokens = text_tokens(spec.get("tokens_dir"), (B * 4 + 1) * (T + 1))
    text = np.asarray(tokens[1][: B * (T + 1)]).reshape(B, T + 1)
    out["device_ms_text"] = timed(dist.global_batch(mesh, {"inputs": text[:, :-1], "targets": text[:, 1:]}),
                                  spec["device_reps"])
  except ImportError as e:
    tokens, out["loop_error"] = None, f"{type(e).__name__}: {e}"
  out["peak_device_bytes"] = dist.peak_memory_bytes()
  del leaves, compiled

  # 3. The real loop, same process: `train` over 1 + loop_steps steps; stopped at the next log point
  # (before its final evaluation and checkpoint, which this benchmark does not time).
  try:
    if tokens is None:
      raise ImportError(out["loop_error"])
    from carve_jax.train.loop import train

    def stop(s, rec):
      if s > 1 + loop_steps:
        raise _Stop

    t2 = time.perf_counter()
    try:
      train(cfg, tokens=tokens, on_step=stop)
    except _Stop:
      pass
    out["loop_wall_s"] = time.perf_counter() - t2
    perf = [r for r in read_jsonl(os.path.join(tmp, "metrics.jsonl")) if r["split"] == "perf"]
    last = perf[-1]
    out["loop_tokens_per_s"] = last["tokens_per_s"]
    out["loop_host_ms_per_step"] = last.get("host_ms_per_step")
    out["loop_over_device"] = last["tokens_per_s"] / out["device_tokens_per_s"]
    out["peak_device_bytes"] = max(out["peak_device_bytes"] or 0, dist.peak_memory_bytes() or 0) or None
  except ImportError as e:  # the loop needs grain (carry its wheel on the GPU machine: .whl/)
    out["loop_error"] = f"{type(e).__name__}: {e}"
  out["mfu_device"] = mfu(out["device_tokens_per_s"], mcfg, T)
  out["mfu_loop"] = mfu(out.get("loop_tokens_per_s"), mcfg, T)
  out["peak_flops"] = peak_flops()
  return out


def compile_scaling_rows(args) -> list[dict]:
  rows = []
  scans = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile_scan]
  inits = {"both": ("device", "host"), "device": ("device",), "host": ("host",)}[args.compile_init]
  for layers in (int(x) for x in args.compile_layers.split(",")):
    for scan in scans:
      for init_on in inits:
        for mode in args.compile_modes.split(","):
          rows.append(dict(kind="compile", size="50m", mixer=args.mixers.split(",")[0], seq_len=args.compile_seq_len,
                           batch=args.compile_batch, scan_layers=scan, n_layers=layers,
                           remat_policy="none", init_on=init_on, mode=mode))
  return rows


def compile_worker(spec: dict) -> dict:
  """First-step time only (model, trace, compile, one step) at a given depth. mode "ahead": as `carve-train`
  does it (`loop.step_compiled_ahead`: the step compiled in a background thread from the config's shapes
  while the model is built); "sequential": init, then trace + lower, then compile (each timed)."""
  import jax
  import numpy as np
  from flax import nnx

  from carve_jax.model import LM
  from carve_jax.train import distributed as dist
  from carve_jax.train.config import OptimConfig
  from carve_jax.train.loop import abstract_batch, step_compiled_ahead
  from carve_jax.train.optim import make_optimizer
  from carve_jax.train.step import FlatTrainStep, init_state
  from carve_jax import ops
  impl = ops.resolve_impl(spec["impl"]) if spec["tiny"] else spec["impl"]
  T, B = spec["seq_len"], spec["batch"]
  mcfg = model_config(spec["size"], spec["mixer"], T, tiny=spec["tiny"], impl=impl, scan_layers=spec["scan_layers"],
                      n_layers=spec["n_layers"])
  if spec["tiny"]:
    mcfg = mcfg.replace(d_model=32, n_heads=2, mlp_multiple=32)
  tcfg = train_config(mcfg, batch=B, seq_len=T, steps=10, log_every=1, out_dir="/tmp/unused").replace(
      optim=OptimConfig())
  mesh = dist.make_mesh()
  ahead = spec.get("mode", "sequential") == "ahead"
  t0 = time.perf_counter()
  opt = make_optimizer(tcfg.optim, tcfg.steps)
  step = step_compiled_ahead(tcfg, mesh, opt) if ahead else None
  # init_on "host": the parameters and optimizer state built on the CPU backend (its small eager-op compiles
  # are cheaper than the GPU's), then placed on the mesh
  host = spec.get("init_on", "device") == "host"
  with jax.default_device(jax.devices("cpu")[0]) if host else contextlib.nullcontext():
    graphdef, params, rest = nnx.split(LM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    state = init_state(params, opt, 0)
  state = dist.replicate(mesh, state)
  if host:
    rest = dist.replicate(mesh, rest)
  step = step or FlatTrainStep(graphdef, rest, opt, mesh, state)
  leaves = step.flatten(state)
  jax.block_until_ready(leaves)
  toks = np.zeros((B, T + 1), np.int32)
  batch = dist.global_batch(mesh, {"inputs": toks[:, :-1], "targets": toks[:, 1:]})
  assert jax.tree.structure(batch) == jax.tree.structure(abstract_batch(tcfg, mesh))
  t1 = time.perf_counter()
  out = dict(spec, impl=impl, d_model=mcfg.d_model, init_s=t1 - t0)
  if not ahead:
    lowered = step.jitted.lower(leaves, batch)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    out |= dict(trace_lower_s=t2 - t1, compile_s=time.perf_counter() - t2)
    _, m = compiled(leaves, batch)
  else:
    _, m = step(leaves, batch)
    out["used_ahead"] = step.compiled is not None
  jax.block_until_ready(m)
  return out | dict(first_step_s=time.perf_counter() - t0)


# -- driver ---------------------------------------------------------------------------------------


def plan(args) -> list[dict]:
  if args.compile_scaling:
    return compile_scaling_rows(args)
  mixers = args.mixers.split(",")
  sizes = ["tiny"] if args.tiny else args.sizes.split(",")
  seq_lens = [int(t) for t in args.seq_lens.split(",")]
  wanted = [r for r in args.rows.split(",") if r] if args.rows else None
  rows = []
  for T in seq_lens:
    for size in sizes:
      for policy in args.remat_policies.split(","):
        for mixer in mixers:
          if wanted and not any(_matches(w, size, T, mixer, policy) for w in wanted):
            continue
          if args.tokens_per_step % T:
            raise SystemExit(f"--tokens_per_step {args.tokens_per_step} must be a multiple of every T (got {T})")
          rows.append(dict(kind="train", size=size, mixer=mixer, seq_len=T, batch=args.tokens_per_step // T,
                           remat_policy=policy, scan_layers=not args.no_scan))
  return rows


def _matches(w: str, size: str, T: int, mixer: str, policy: str = "none") -> bool:
  """A --rows filter term: 'SIZE', 'SIZE:T', 'SIZE:T:MIXER', 'SIZE:T:MIXER:REMAT', ':T', '::MIXER'
  ('' matches anything; REMAT one of --remat_policies)."""
  parts = (w.split(":") + ["", "", "", ""])[:4]
  return ((not parts[0] or parts[0] == size) and (not parts[1] or int(parts[1]) == T)
          and (not parts[2] or parts[2] == mixer) and (not parts[3] or parts[3] == policy))


def run_rows(args, rows: list[dict]) -> list[dict]:
  from experiments.runtime import run_worker  # noqa: PLC0415
  results, t_start = [], time.time()
  for i, row in enumerate(rows):
    left = args.budget_s - (time.time() - t_start)
    if left < args.min_row_s:
      results.append(dict(row, error=f"skipped: {left:.0f} s of --budget_s left"))
      print(f"[bench_train] skip {row} ({left:.0f} s left)", flush=True)
      continue
    spec = dict(row, tiny=args.tiny, impl=args.impl, loop_steps=args.loop_steps, log_every=args.log_every,
                device_reps=args.device_reps, cache_dir=args.cache_dir, tokens_dir=args.tokens_dir)
    t = time.time()
    res = run_worker("experiments.bench_train", spec, max(10, left))
    res["row_wall_s"] = time.time() - t
    results.append(res)
    print(f"[bench_train] {i + 1}/{len(rows)} {_row_line(res)}", flush=True)
    write(args, results)
  return results


def _fmt(v, f="{:.1f}"):
  return "" if v is None else f.format(v)


def _row_line(r: dict) -> str:
  if r.get("error"):
    return f"{r['size']} {r['mixer']} T={r['seq_len']}: {r['error'][:300]}"
  if r.get("kind") == "compile":
    parts = (f"trace+lower {r['trace_lower_s']:.1f}, compile {r['compile_s']:.1f}" if "compile_s" in r else
             f"ahead, used {r.get('used_ahead')}")
    return (f"{r['mixer']} {r['n_layers']} layers scan={r['scan_layers']} {r.get('mode')}: first step "
            f"{r['first_step_s']:.1f} s (init {r['init_s']:.1f}, {parts})")
  return (f"{r['size']} {r['mixer']} B={r['batch']} T={r['seq_len']} {r['remat_policy']}: device {r['device_ms']:.1f} ms "
          f"({r['device_tokens_per_s']:,.0f} tok/s), loop {_fmt(r.get('loop_tokens_per_s'), '{:,.0f}')} tok/s "
          f"(x{_fmt(r.get('loop_over_device'), '{:.3f}')}), first step {r['first_step_s']:.1f} s")


def _error_cell(err: str) -> str:
  """A row's error in one table cell: "out of memory" for the allocator's messages, else its first 80 chars."""
  if any(m in err for m in ("out of memory", "RESOURCE_EXHAUSTED", "bfc_allocator")):
    return "out of memory"
  return " ".join(err.split())[:80].replace("|", "/")


def markdown(results: list[dict]) -> str:
  from experiments.report import fmt_bytes, md_table
  comp = [r for r in results if r.get("kind") == "compile" and not r.get("error")]
  if comp:
    rows = [[r["mixer"], r["n_layers"], r["scan_layers"], r.get("init_on", "device"), r.get("mode", "sequential"),
             r["init_s"], r.get("trace_lower_s", ""), r.get("compile_s", ""), r["first_step_s"]] for r in comp]
    out = md_table(["mixer", "layers", "scan", "init on", "mode", "init s", "trace+lower s", "compile s",
                    "first step s"], rows)
    out += ("\nmode ahead: as carve-train, the step compiled in a background thread from the config's shapes "
            "while the model is built (`loop.step_compiled_ahead`), so init overlaps trace and compile; "
            "sequential: init, then trace + lower, then compile.\n")
    by = {(r["n_layers"], r["scan_layers"], r.get("mode", "sequential")): r["first_step_s"] for r in comp
          if r.get("init_on", "device") == "device"}
    for scan in (False, True):
      for mode in ("sequential", "ahead"):
        if (12, scan, mode) in by and (48, scan, mode) in by:
          out += (f"\nscan_layers={scan}, {mode}: first step at 48 layers / at 12 = "
                  f"{by[48, scan, mode] / by[12, scan, mode]:.2f}x\n")
    return out
  rows = []
  for r in results:
    if r.get("error"):
      rows.append([r["size"], r["mixer"], r["seq_len"], r["batch"], r.get("remat_policy"), "", "", "", "", "", "", "",
                   "", _error_cell(r["error"])])
      continue
    rows.append([r["size"], r["mixer"], r["seq_len"], r["batch"], r["remat_policy"], _fmt(r["device_ms"]),
                 _fmt(r.get("device_ms_text")), f"{r['device_tokens_per_s']:,.0f}",
                 _fmt(r.get("loop_tokens_per_s"), "{:,.0f}"), _fmt(r.get("loop_over_device"), "{:.3f}"),
                 _fmt(r.get("loop_host_ms_per_step"), "{:.2f}"),
                 _fmt(None if r.get("mfu_loop") is None else 100 * r["mfu_loop"], "{:.1f}%"),
                 fmt_bytes(r.get("peak_device_bytes")), f"{r['first_step_s']:.1f}"])
  head = ["size", "mixer", "T", "B", "remat", "device ms", "device ms (text)", "device tok/s", "loop tok/s",
          "loop/device", "loop host ms/step", "MFU (loop)", "peak mem", "first step s"]
  if any("source" in r for r in results):  # merged files: which run each row is from
    head, rows = head + ["run"], [row + [r.get("source", "")] for row, r in zip(rows, results)]
  out = md_table(head, rows)
  out += ("\nMFU = tokens/s x train FLOPs per token (`carve_jax.train.metrics.train_flops_per_token`: 3 x (2 x "
          "matmul weights + per-layer mixer FLOPs)) / dense bf16 peak (989.4 TFLOP/s on H100/H200). device ms: "
          "back-to-back steps on one batch on the device (random tokens; '(text)': a batch of the loop's text). "
          "loop tok/s: `carve_jax.train.loop.train` in the same process, steps after the first.\n")
  ok = {(r["size"], r["seq_len"], r["mixer"], r["remat_policy"]): r for r in results
        if not r.get("error") and r.get("loop_tokens_per_s")}
  notes = []
  for (size, T, mixer, pol), r in sorted(ok.items()):
    if mixer != "carve":
      continue
    tag = "" if pol == "none" else f" (remat {pol})"
    if (size, T, "gdn2", pol) in ok:
      notes.append(f"{size} T={T}{tag}: CARVE / GDN-2 loop tokens/s = "
                   f"{r['loop_tokens_per_s'] / ok[size, T, 'gdn2', pol]['loop_tokens_per_s']:.3f} (target >= 0.95)")
    # against attention at its fastest policy measured (attention may fit without remat where CARVE does not)
    att = [a for (s_, t_, m_, _), a in ok.items() if (s_, t_, m_) == (size, T, "attention")]
    if att:
      best = max(att, key=lambda a: a["loop_tokens_per_s"])
      notes.append(f"{size} T={T}{tag}: CARVE / attention (remat {best['remat_policy']}) loop tokens/s = "
                   f"{r['loop_tokens_per_s'] / best['loop_tokens_per_s']:.3f}"
                   + (" (target >= 1 at T >= 8192 for 350m)" if size == "350m" and T >= 8192 else ""))
  return out + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def figure(results: list[dict]):
  """Loop tokens/s against T per mixer, one panel per size; at each point the fastest remat policy measured
  (the 350M delta-mixer rows fit only with one)."""
  from experiments.report import plt
  best = {}
  for r in results:
    if not r.get("error") and r.get("kind", "train") == "train":
      key, tps = (r["size"], r["mixer"], r["seq_len"]), r.get("loop_tokens_per_s") or r["device_tokens_per_s"]
      if key not in best or tps > best[key][0]:
        best[key] = (tps, r)
  ok = [dict(r, loop_tokens_per_s=tps) for tps, r in best.values()]
  if not ok:
    return None
  p = plt()
  sizes = [s_ for s_ in SIZES if any(r["size"] == s_ for r in ok)] or sorted({r["size"] for r in ok})
  fig, axes = p.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    for mixer in MIXERS:
      pts = sorted((r["seq_len"], r.get("loop_tokens_per_s") or r["device_tokens_per_s"]) for r in ok
                   if r["size"] == size and r["mixer"] == mixer)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=mixer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (tokens per sequence; same tokens per step)")
    ax.set_ylabel("loop tokens/s")
    ax.set_title(size)
    ax.legend()
  return fig


def merge(paths: list[str], out_dir: str, tag: str) -> dict[str, str]:
  """One table and plot from several bench_train result files (rows measured in different device calls
  on the same kind of device); the file lists every source's command, commit and time."""
  from experiments.report import write_results
  srcs = [json.loads(Path(p).read_text()) for p in paths]
  devices = {s_["env"]["device"] for s_ in srcs}
  if len(devices) != 1:
    raise SystemExit(f"bench_train --merge: the files come from different devices {sorted(devices)}")
  rows = [dict(r, source=i) for i, s_ in enumerate(srcs) for r in s_["rows"] if r.get("kind", "train") == "train"]
  rows.sort(key=lambda r: (SIZES.index(r["size"]) if r["size"] in SIZES else -1, r["seq_len"], r["source"]))
  env = dict(srcs[-1]["env"], git_commit=",".join(dict.fromkeys(s_["env"]["git_commit"] for s_ in srcs)),
             command=f"python -m experiments.bench_train --merge {','.join(paths)} --tag {tag}")
  listing = "\n".join(f"{i}. `{s_['env']['command']}` (commit {s_['env']['git_commit']}, {s_['env']['utc']}; "
                      f"{Path(p).name})" for i, (p, s_) in enumerate(zip(paths, srcs)))
  md = markdown(rows) + f"\nRows merged from {len(srcs)} runs (the `source` field of each JSON row):\n\n{listing}\n"
  return write_results("bench_train" + tag, out_dir, {"env": env, "sources": paths, "rows": rows}, md, figure(rows))


def write(args, results):
  from experiments.report import write_results
  name = ("bench_train_compile" if args.compile_scaling else "bench_train") + args.tag
  write_results(name, args.out_dir, {"args": vars(args), "rows": results}, markdown(results),
                None if args.compile_scaling else figure(results))


@dataclasses.dataclass
class BenchTrainFlags:
  """Flags of the training-throughput benchmark (the tiny defaults are applied where a flag keeps its default).

  Attributes:
    worker: internal: one row's JSON spec, run in this process.
    tiny: CPU-sized rows (tiny model, T 32/64), < 1 minute.
    mixers: comma list.
    sizes: comma list of model sizes.
    seq_lens: comma list of T.
    tokens_per_step: batch x T of every row (the batch follows T).
    rows: filter: comma-separated SIZE[:T[:MIXER[:REMAT]]] terms, e.g. 50m:8192,350m,350m:32768:carve:full.
    remat_policies: comma-separated; each adds a set of rows.
    no_scan: unrolled blocks (scan_layers=False).
    impl: carve_jax.ops implementation.
    loop_steps: timed loop steps after the first.
    log_every: the loop's logging interval (steps).
    device_reps: steps per timed run (3 runs, median).
    budget_s: no row starts with less than --min_row_s left of this budget.
    min_row_s: the least time a row needs.
    compile_scaling: first-step time at 12 vs 48 layers.
    compile_seq_len: T of the compile-scaling rows.
    compile_batch: batch of the compile-scaling rows (compile time does not depend on it; 48 unrematerialised
      CARVE layers at 16 x 2048 do not fit in 141 GB).
    compile_layers: comma list of depths of the compile-scaling rows.
    compile_scan: scan over layers in the compile-scaling rows.
    compile_init: where the compile-scaling rows build the model and optimizer state: the default device, the
      CPU backend ("host", then placed on the mesh), or both (a row each).
    compile_modes: comma list of the compile-scaling rows' modes: "ahead" (as carve-train: the step compiled in
      the background while the model is built) and/or "sequential" (init, trace + lower, compile, each timed).
    tokens_dir: byte export for the loop's text (default: the fixture).
    cache_dir: XLA's persistent compile cache.
    out_dir: where the results go.
    tag: suffix of the result file names.
    merge: comma list of result JSON files: write one table and plot of all their rows (no run).
  """
  worker: str | None = None
  tiny: bool = False
  mixers: str = ",".join(MIXERS)
  sizes: str = ",".join(SIZES)
  seq_lens: str = ",".join(map(str, SEQ_LENS))
  tokens_per_step: int = 32768
  rows: str = ""
  remat_policies: str = "none"
  no_scan: bool = False
  impl: Literal["auto", "chunk", "pallas", "recurrent"] = "auto"
  loop_steps: int = 20
  log_every: int = 10
  device_reps: int = 5
  budget_s: float = 450
  min_row_s: float = 45
  compile_scaling: bool = False
  compile_seq_len: int = 2048
  compile_batch: int = 1
  compile_layers: str = "12,48"
  compile_scan: Literal["both", "on", "off"] = "both"
  compile_init: Literal["device", "host", "both"] = "device"
  compile_modes: str = "ahead,sequential"
  tokens_dir: str | None = None
  cache_dir: str = "/tmp/bench_train_xla_cache"
  out_dir: str = str(Path(__file__).resolve().parent / "results" / "bench_train")
  tag: str = ""
  merge: str = ""


def main(argv=None) -> int:
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(BenchTrainFlags, train_flags.normalise_argv(argv), prog="python -m experiments.bench_train",
                         description=__doc__)
  if args.merge:
    print(merge(args.merge.split(","), args.out_dir, args.tag or "_merged"))
    return 0
  if args.worker:
    from experiments.runtime import print_result  # noqa: PLC0415
    spec = json.loads(args.worker)
    res = compile_worker(spec) if spec.get("kind") == "compile" else worker(spec)
    print_result(res)
    return 0
  if args.tiny:
    if args.mixers == ",".join(MIXERS):
      args.mixers = "carve,attention"
    if args.seq_lens == ",".join(map(str, SEQ_LENS)):
      args.seq_lens = "32"
    if args.tokens_per_step == 32768:
      args.tokens_per_step = 128
    if args.compile_seq_len == 2048:
      args.compile_seq_len = 32
    args.loop_steps, args.log_every, args.device_reps = min(args.loop_steps, 4), min(args.log_every, 2), 2
    args.min_row_s = min(args.min_row_s, 5)
    if not args.tag:
      args.tag = "_tiny"
  if args.loop_steps < args.log_every:  # the loop's tokens/s is read from its first perf log line
    raise SystemExit(f"bench_train: --loop_steps ({args.loop_steps}) must be >= --log_every ({args.log_every}): "
                     "the loop's tokens/s comes from its logged perf lines")
  rows = plan(args)
  print(f"[bench_train] {len(rows)} rows, budget {args.budget_s:.0f} s", flush=True)
  results = run_rows(args, rows)
  write(args, results)
  print(markdown(results))
  return 0 if any(not r.get("error") for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
