r"""CARVE's content block G: gate perturbation against G (fitted power law vs the paper's -1/2), and
(with --train) language-model quality and throughput against G.

Perturbation. CARVE's erase gate uses the content signal of the state ENTERING the block,
c_n = rms_rows(S_{nG-1}), for every token of block n; a token-level gate would use
c_t = rms_rows(S_{t-1}). Along the CARVE trajectory with block length G (`carve_jax.ops.carve_step`
token by token) we measure

    gate perturbation   delta_G = mean_{t,h,i} | sigmoid(l_t + gamma_h c_n) - sigmoid(l_t + gamma_h c_t) |
    signal gap          rho_G   = mean_t ||c_n - c_t|| / ||c_t||
    output perturbation eps_G   = ||o^{(G)} - o^{(1)}|| / ||o^{(1)}||   (o^{(1)}: G = 1, the token-level gate)

and fit log(metric) = a + p log G over the paper's range G in {16, 32, 64, 128} and over all G.
The paper reports O(1/sqrt(L)) (p = -1/2). Inputs: `sample_inputs.family_inputs` random
inputs (gamma = 1 in every head) at two decay strengths, and (with --train) the first layer's
inputs of the trained G=64 CARVE LM on validation text, with its learned gamma and with gamma = 1.

    python -m experiments.content_block_sweep --tiny            # CPU, < 60 s
    python -m experiments.content_block_sweep                   # CPU: the perturbation sweep
    python -m experiments.content_block_sweep --train --tokens_dir .data/exp   # GPU: + quality/throughput
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from carve_jax import ops
from carve_jax.configs import ModelConfig
from carve_jax.ops.gates import content_signal
from carve_jax.ops.sample_inputs import family_inputs
from carve_jax.ops.step import carve_step
from carve_jax.train.batch_loop import StepCache, short_optim, train_on_batches
from experiments import flags, report, runtime
from experiments.gpu_lock import GpuLock
from experiments.paper import PAPER
from experiments.scoring import make_loss_eval
from experiments.stats import fit_power_law, mean_std
from experiments.task_models import compile_threads
from experiments.windows import DOCUMENT_RESETS, fixed_batches, load_stream, window_batches

PAPER_RANGE = (16, 32, 64, 128)


def _head_major(x):
  return jnp.moveaxis(x, 1, 0)  # [B, T, ...] -> [T, B, ...]


def gate_perturbation(inp: dict, G: int) -> tuple[float, float]:
  """(delta_G, rho_G) along the CARVE trajectory with content block G. inp: `ops.carve` inputs."""
  q, k, v, g, el, beta, gamma = (inp[n] for n in ("q", "k", "v", "g", "erase_logits", "beta", "gamma"))
  B, T, H, K = q.shape

  def step(carry, x):
    S, c = carry
    qt, kt, vt, gt, lt, bt, t = x
    c_tok = content_signal(S)
    _, S_new, c_used = carve_step(S, c, t, qt, kt, vt, gt, lt, bt, gamma, content_block=G)
    gd = jnp.abs(jax.nn.sigmoid(lt + gamma[:, None] * c_used) - jax.nn.sigmoid(lt + gamma[:, None] * c_tok)).mean()
    rel = (jnp.linalg.norm(c_used - c_tok, axis=-1) / jnp.linalg.norm(c_tok, axis=-1)).mean()
    return (S_new, c_used), (gd, rel)

  S0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
  xs = tuple(_head_major(x) for x in (q, k, v, g, el, beta)) + (jnp.arange(T),)
  _, (gd, rel) = jax.lax.scan(step, (S0, content_signal(S0)), xs)
  return float(gd.mean()), float(rel.mean())


def output_perturbation(inp: dict, G: int, ref: jax.Array) -> float:
  o, _ = ops.carve(**inp, content_block=G, impl="recurrent")
  return float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))


def power_law_fits(rows) -> dict:
  """Power-law fits of each metric against G, over the paper's range of G and over all of them."""
  fits = {}
  for metric in ("gate", "signal", "output"):
    for label, sel in (("paper_range", [r for r in rows if r["G"] in PAPER_RANGE]), ("all", rows)):
      pts = [(r["G"], r[metric]) for r in sel if r[metric] > 0]
      if len(pts) >= 3:
        fits[f"{metric}/{label}"] = fit_power_law(*zip(*pts))
  return fits


def sweep(inp: dict, Gs: list[int]) -> dict:
  inp = {k: jnp.asarray(v, jnp.float32) for k, v in inp.items()}
  ref, _ = ops.carve(**inp, content_block=1, impl="recurrent")
  rows = []
  for G in Gs:
    gd, rel = gate_perturbation(inp, G)
    rows.append({"G": G, "gate": gd, "signal": rel, "output": output_perturbation(inp, G, ref)})
  return {"rows": rows, "fits": power_law_fits(rows)}


def random_inputs(seed: int, *, B, T, H, K, decay_scale) -> dict:
  inp = family_inputs(jax.random.key(seed), "carve", B=B, T=T, H=H, K=K, V=K, decay_scale=decay_scale)
  inp["gamma"] = jnp.ones((H,), jnp.float32)
  return inp


def model_inputs(model, tokens: np.ndarray) -> dict:
  """First block's `ops.carve` inputs of a CARVE LM on `tokens` [B, T] (the layer's `op_inputs`)."""
  block = model.blocks[0]
  x = block.mixer_norm(model.embed(jnp.asarray(tokens)).astype(jnp.float32))
  inp, _ = block.mixer.op_inputs(x)
  inp = {k: jnp.asarray(v, jnp.float32) for k, v in inp.items()}
  inp["gamma"] = jnp.asarray(block.mixer.gamma[...], jnp.float32)
  return inp


def train_sweep(args, impl: str, Gs: list[int], on_row=None) -> tuple[list[dict], object]:
  """CARVE LMs with content_block G (same data and steps; seeds 0..train_seeds-1): val loss and tokens/s.
  Every G's first seed comes first, then the extra seeds. on_row(rows) is called after each run."""
  train, src = load_stream(args.tokens_dir, "train")
  val, _ = load_stream(args.tokens_dir, "val")
  eval_fn = make_loss_eval(fixed_batches(val, seq_len=args.seq_len, batch_size=args.batch_size,
                                         n_batches=args.eval_batches))

  def config(G):
    return ModelConfig(mixer="carve", vocab_size=256, d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, content_block=G, chunk_size=min(G, 64), mlp_multiple=64,
                       max_seq_len=args.seq_len, compute_dtype="bfloat16" if runtime.on_gpu() else "float32", impl=impl)

  cache, lock, optim = StepCache(compile_threads()), GpuLock.from_env(), short_optim(args.steps, lr=args.lr)
  for G in Gs:  # every G's step compiles in a background thread from the start
    cache.precompile(config(G), window_batches(train, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)(0),
                     optim, args.steps)
  out, keep = [], None
  for seed in range(args.train_seeds):
    for G in Gs:
      print(f"[content_block_sweep] train G={G} seed {seed}", flush=True)
      r = train_on_batches(config(G), window_batches(train, seq_len=args.seq_len, batch_size=args.batch_size,
                                                     seed=seed),
                           steps=args.steps, seed=seed, optim=optim, cache=cache, eval_fn=eval_fn, lock=lock)
      val_loss = [h["val_loss"] for h in r.history if "val_loss" in h][-1]
      gamma = [np.asarray(b.mixer.gamma[...]).tolist() for b in r.model().blocks]
      out.append({"G": G, "seed": seed, "impl": impl, "chunk_size": min(G, 64), "val_loss": val_loss,
                  "tokens_per_s": r.tokens_per_s, "train_s": r.train_s, "compile_s": r.compile_s,
                  "compile_wait_s": r.compile_wait_s, "gpu_wait_s": r.lock_wait_s,
                  "step_memory_bytes": r.step_memory_bytes, "gamma": gamma, "data": src})
      print(f"  val {val_loss:.4f}  {r.tokens_per_s:,.0f} tok/s  compile {r.compile_s:.1f}s  "
            f"gamma[0] {np.round(gamma[0], 3)}", flush=True)
      if (G == 64 and seed == 0) or keep is None:
        keep = (G, r.model())
      if on_row is not None:
        on_row(out)
  return out, (*keep, val)


def summarize_train(rows: list[dict]) -> list[dict]:
  """Per G: seeds, mean and std of val loss, mean tokens/s (over the runs of that G)."""
  out = []
  for G in dict.fromkeys(r["G"] for r in rows):
    rs = [r for r in rows if r["G"] == G]
    m, sd = mean_std(r["val_loss"] for r in rs)
    out.append({"G": G, "seeds": len(rs), "val_loss_mean": m, "val_loss_std": sd,
                "tokens_per_s_mean": float(np.mean([r["tokens_per_s"] for r in rs])),
                "compile_s": max(r["compile_s"] for r in rs), "gamma_layer1_seed0": rs[0]["gamma"][0]})
  return out


@dataclasses.dataclass(frozen=True)
class SweepFlags(flags.CommonFlags):
  """Flags of the content-block sweep.

  Attributes:
    Gs: comma-separated content blocks G of the perturbation sweep.
    T: tokens of the random inputs.
    B: rows of the random inputs.
    H: heads of the random inputs.
    K: head size (K = V) of the random inputs.
    seeds: seeds of the random inputs.
    train: also train CARVE LMs at each G in --train_Gs.
    train_Gs: comma-separated G of the trained LMs.
    train_seeds: seeds per G of the trained LMs.
    tokens_dir: byte export folder (default: the committed fixture corpus).
    steps: training steps per LM.
    batch_size: rows per batch.
    seq_len: bytes per row.
    d_model: LM width.
    n_layers: LM blocks.
    n_heads: LM heads.
    lr: peak learning rate.
    eval_batches: fixed validation batches.
    no_random: skip the random-input sweeps (run them on a CPU).
    replot: only redraw the plot of an existing results file (JSON).
  """
  Gs: str = "2,4,8,16,32,64,128,256,512"
  T: int = 2048
  B: int = 2
  H: int = 4
  K: int = 64
  seeds: int = 2
  train: bool = False
  train_Gs: str = "16,32,64,128"
  train_seeds: int = 1
  tokens_dir: str | None = None
  steps: int = 200
  batch_size: int = 32
  seq_len: int = 512
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  lr: float = 2e-3
  eval_batches: int = 8
  no_random: bool = False
  replot: str | None = None


TINY = dict(Gs="2,4,8,16,32", T=128, B=1, H=2, K=16, seeds=1, train_Gs="16,32", steps=4, batch_size=4, seq_len=64,
            train_seeds=1, d_model=32, n_layers=1, n_heads=2, eval_batches=1)


def main(argv=None) -> dict:
  args = flags.parse(SweepFlags, argv, prog="python -m experiments.content_block_sweep", description=__doc__,
                     tiny=TINY)
  if args.replot:
    print(replot(args.replot))
    return {}
  runtime.setup()
  Gs = [int(x) for x in args.Gs.split(",")]
  sources = {}
  for decay in () if args.no_random else (1.0, 0.05):
    per_seed = [sweep(random_inputs(s, B=args.B, T=args.T, H=args.H, K=args.K, decay_scale=decay), Gs)
                for s in range(args.seeds)]
    sources[f"random, decay_scale {decay}"] = _merge(per_seed)
    print(f"[content_block_sweep] random decay {decay}: " + _fit_line(sources[f"random, decay_scale {decay}"]),
          flush=True)
  trained = []
  if args.train:
    impl = ops.resolve_impl(args.impl)
    trained, (G_kept, model, val) = train_sweep(args, impl, [int(x) for x in args.train_Gs.split(",")],
                                                on_row=lambda rows: _write(args, Gs, sources, rows))
    _write(args, Gs, sources, trained)  # the trained rows survive a timeout of the sweeps below
    toks = np.stack([val[i * args.T:(i + 1) * args.T] for i in range(args.B)]).astype(np.int32)
    # No GPU lock here: these token-by-token scans are mostly compile time (CPU) and tiny kernels.
    inp = model_inputs(model, toks)
    sources[f"trained G={G_kept} LM layer 1, learned gamma"] = sweep(inp, Gs)
    sources[f"trained G={G_kept} LM layer 1, gamma = 1"] = sweep({**inp, "gamma": jnp.ones_like(inp["gamma"])}, Gs)
    for k in list(sources)[-2:]:
      print(f"[content_block_sweep] {k}: " + _fit_line(sources[k]), flush=True)
  return _write(args, Gs, sources, trained)


def _write(args, Gs, sources, trained) -> dict:
  payload = {"experiment": "content_block_sweep", "tiny": args.tiny, "paper_exponent": PAPER["perturbation_exponent"],
             "shape": {"B": args.B, "T": args.T, "H": args.H, "K": args.K, "seeds": args.seeds}, "Gs": Gs,
             "perturbation": sources, "train": trained, "train_summary": summarize_train(trained) if trained else [],
             "train_shape": ({"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                              "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads}
                             if args.train else None),
             "document_resets": DOCUMENT_RESETS if args.train else None}
  report.write_results("content_block_sweep" + args.tag, args.out_dir or report.results_dir("content_block_sweep"),
                       payload, _markdown(args, sources, trained), _figure(sources, trained))
  return payload


def _merge(per_seed: list[dict]) -> dict:
  """Mean over seeds of each metric at each G, refitted."""
  rows = []
  for i, r in enumerate(per_seed[0]["rows"]):
    rows.append({"G": r["G"], **{m: float(np.mean([s["rows"][i][m] for s in per_seed])) for m in ("gate", "signal", "output")}})
  return {"rows": rows, "fits": power_law_fits(rows), "seeds": len(per_seed)}


def _fit_line(s: dict) -> str:
  return "  ".join(f"{k}: p={v['exponent']:+.3f}" for k, v in s["fits"].items())


def _markdown(args, sources, trained) -> str:
  if any(k.startswith("random") for k in sources):
    what = (f"B={args.B}, T={args.T}, H={args.H}, K=V={args.K}; random inputs averaged over {args.seeds} seeds"
            + ("; and the first layer's inputs of a trained LM" if args.train else ""))
  else:
    what = f"the first layer's inputs of the trained LM on {args.B} x {args.T} validation bytes; no random inputs"
  md = (f"Gate perturbation of the block-level content signal against content block G ({what}). Fitted "
        f"exponent p of metric ∝ G^p; the paper reports p = -1/2 for L up to 128.\n\n")
  rows = []
  for name, s in sources.items():
    for metric in ("gate", "signal", "output"):
      f1, f2 = s["fits"].get(f"{metric}/paper_range"), s["fits"].get(f"{metric}/all")
      rows.append([name, metric, f"{f1['exponent']:+.3f} ± {f1['exponent_stderr']:.3f}" if f1 else "n/a",
                   f"{f2['exponent']:+.3f} (R² {f2['r2']:.3f})" if f2 else "n/a"])
  md += report.md_table(["inputs", "metric", "p over G in 16..128", "p over all G"], rows) + "\n\n"
  for name, s in sources.items():
    md += f"**{name}**\n\n" + report.md_table(["G", "gate delta", "signal gap rho", "output eps"],
                                         [[r["G"], r["gate"], r["signal"], r["output"]] for r in s["rows"]]) + "\n\n"
  if trained:
    impl = trained[0].get("impl", "?")
    ts = (f"d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} bytes")
    md += (f"Quality and throughput of CARVE LMs against G ({ts}; same data and steps for every G; seeds "
           f"0..{max(t['seed'] for t in trained)}; chunk = min(G, 64); impl={impl}):\n\n"
           + report.md_table(["G", "seeds", "val loss (nats/byte) mean ± std", "tokens/s", "compile s",
                         "gamma layer 1 (learned, seed 0)"],
                        [[t["G"], t["seeds"], f"{t['val_loss_mean']:.4f} ± {t['val_loss_std']:.4f}",
                          f"{t['tokens_per_s_mean']:,.0f}", t["compile_s"],
                          " ".join(f"{x:+.3f}" for x in t["gamma_layer1_seed0"])] for t in summarize_train(trained)])
           + "\n")
  else:
    md += "Quality/throughput against G: not run in this invocation (needs --train; GPU).\n"
  return md


def _figure(sources, trained):
  """Gate and output perturbation against G (when there are perturbation sweeps) and the trained LMs'
  validation loss and tokens/s against G (when there are trained runs)."""
  plt = report.plt()
  n = (2 if sources else 0) + (1 if trained else 0)
  fig, ax = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 3.8), squeeze=False)
  ax = list(ax[0])
  if sources:
    for i, (name, s) in enumerate(sources.items()):
      G = [r["G"] for r in s["rows"]]
      ax[0].loglog(G, [r["gate"] for r in s["rows"]], "o-", color=f"C{i}", label=name)
      ax[1].loglog(G, [r["output"] for r in s["rows"]], "o-", color=f"C{i}", label=name)
    for a in ax[:2]:
      G = np.array([16, 128], float)
      ys = [float(np.interp(16, l.get_xdata(), l.get_ydata())) for l in a.get_lines()]
      if ys:
        a.loglog(G, min(ys) * (G / 16) ** -0.5, "k--", lw=1, label="paper: G^-1/2 (slope)")
      a.set_xlabel("content block G")
    ax[0].set(ylabel="mean |b_block - b_token|", title="gate perturbation")
    ax[1].set(ylabel="||o_G - o_1|| / ||o_1||", title="output perturbation")
    ax[0].legend(fontsize=7)
  if trained:
    ax2 = ax[-1]
    summ = summarize_train(trained)
    G = [t["G"] for t in summ]
    ax2.errorbar(G, [t["val_loss_mean"] for t in summ], yerr=[t["val_loss_std"] for t in summ], fmt="o-", color="C0",
                 capsize=3)
    ax2.set(xscale="log", xlabel="content block G", ylabel="val loss (nats/byte)",
            title=f"CARVE LM vs G ({', '.join(f'G={g}' for g in G)} trained)")
    t2 = ax2.twinx()
    t2.plot(G, [t["tokens_per_s_mean"] for t in summ], "s--", color="C1")
    t2.set_ylabel("tokens/s", color="C1")
  fig.tight_layout()
  return fig


def replot(json_path: str) -> str:
  """Redraws <name>.png from a results file <name>.json of this script (same numbers, current figure code)."""
  import json
  payload = json.loads(Path(json_path).read_text())
  fig = _figure(payload["perturbation"], payload["train"])
  out = str(Path(json_path).with_suffix(".png"))
  fig.savefig(out, dpi=110, bbox_inches="tight")
  report.plt().close(fig)
  return out


if __name__ == "__main__":
  main()
