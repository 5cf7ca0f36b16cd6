"""The README's main demo: train a small CARVE language model, checkpoint it, evaluate, generate.

    python -m carve_jax.demo                      # CPU, a few minutes: byte-level CARVE LM
    python -m carve_jax.demo --minutes 10         # train longer (stops cleanly, resumable)
    python -m carve_jax.demo --gpu                # real size on a GPU: 50m preset (43.7M params), bf16, seq 1024
    python -m carve_jax.demo --gpu --tokens_dir .data/gpu --steps 3000 --batch_size 64

Stages: (1) corpus and tokenizer (`carve_jax.data`: the small "ci" corpus, or the bundled fixture
when the package mirror can't be reached); (2) the model and its parameter count; (3) training
with a progress bar, async orbax checkpoints under `<out_dir>/checkpoints`, a JSON-lines log and
TensorBoard events; (4) validation perplexity of the checkpoint, restored from disk; (5) a sample
generated from it; (6) a summary. Running the same command again resumes from the checkpoint.

Every `carve-train` flag is accepted on top of the demo's defaults (`--help` lists them).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from carve_jax import configs
from carve_jax.train import config as tc
from carve_jax.train import flags as tc_flags

# impl="auto": the pure-JAX chunk form on a CPU (2 cores: ~0.5 s per gradient of 16 x 128 tokens,
# against ~0.8 s for the token-by-token scan), the Pallas kernels on a GPU.
CPU_DEMO = tc.TrainConfig(
    model=configs.preset("demo"),
    optim=tc.OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.1, clip_norm=1.0),
    data=tc.DataConfig(corpus="ci", tokenizer="byte", seq_len=128, batch_size=8),
    ckpt=tc.CheckpointConfig(ckpt_every=50, ckpt_keep=2),
    steps=600, log_every=10, eval_every=200, eval_batches=4, out_dir="runs/demo")

GPU_DEMO = tc.TrainConfig(
    model=configs.preset("50m", compute_dtype="bfloat16"),
    optim=tc.OptimConfig(lr=1.5e-3, warmup_steps=200),
    data=tc.DataConfig(corpus="full", tokenizer="byte", seq_len=1024, batch_size=32),
    ckpt=tc.CheckpointConfig(ckpt_every=500, ckpt_keep=3),
    steps=3000, log_every=50, eval_every=500, eval_batches=16, out_dir="runs/demo-gpu")


def _stage(i: int, text: str) -> None:
  print(f"\n[{i}/6] {text}", flush=True)


@dataclasses.dataclass(frozen=True)
class DemoFlags:
  """The demo's own flags (every carve-train flag is accepted besides).

  Attributes:
    gpu: the real-size demo on a GPU (50m preset, bf16, seq 1024) instead of the CPU one.
    minutes: stop training cleanly after this many minutes (resumable); default 4 on CPU, none on GPU.
    prompt: the prompt of the generated sample.
    sample_tokens: tokens to generate.
  """
  gpu: bool = False
  minutes: float | None = None
  prompt: str = "The "
  sample_tokens: int = 300


def main(argv=None) -> int:
  prog = "python -m carve_jax.demo"
  argv = list(sys.argv[1:] if argv is None else argv)
  gpu = "--gpu" in argv
  cfg, known = tc_flags.parse_train_flags(argv, prog=prog, base=GPU_DEMO if gpu else CPU_DEMO,
                                          description=__doc__.splitlines()[0], extra=DemoFlags)
  minutes = known.minutes if known.minutes is not None else (None if known.gpu else 4.0)
  if minutes is not None and cfg.time_limit_s is None:
    if minutes <= 0:
      tc_flags.usage_error(prog, f"--minutes must be > 0, got {minutes}")
    cfg = dataclasses.replace(cfg, time_limit_s=60.0 * minutes)

  import jax
  if known.gpu and jax.default_backend() != "gpu":
    tc_flags.usage_error(prog, f"--gpu needs a CUDA GPU, but JAX sees only {jax.default_backend()} devices "
                 f"({jax.devices()[0].device_kind}); run without --gpu for the CPU demo")
  # Reuse compiled programs across the stages and across runs of the demo (the eval and sampling
  # programs otherwise compile twice on a 2-core CPU).
  from carve_jax.train import compile_cache
  compile_cache.enable(cfg.compile_cache)

  from carve_jax.model import param_count
  from carve_jax.train import distributed as dist
  from carve_jax.train.eval import load_trained, perplexity
  from carve_jax.train.generate import sample
  from carve_jax.train.loop import build_model, format_summary, load_tokens, train

  dist.maybe_initialize(cfg.distributed)
  t0 = time.time()
  _stage(1, f"data: corpus {cfg.data.tokens_dir or cfg.data.corpus!r}, {cfg.data.tokenizer} tokenizer")
  try:
    tokens = load_tokens(cfg.data)
  except Exception as e:  # no network / no apt: fall back to the corpus bundled with the package
    from carve_jax.data.corpus import CorpusUnavailableError
    if not isinstance(e, CorpusUnavailableError) or cfg.data.corpus == "fixture":
      raise
    print(f"  corpus {cfg.data.corpus!r} unavailable ({e}); using the bundled fixture corpus")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus="fixture"))
    tokens = load_tokens(cfg.data)
  tok, train_tokens, val_tokens = tokens
  print(f"  train {len(train_tokens):,} tokens, val {len(val_tokens):,} tokens; "
        f"batches of {cfg.data.batch_size} x {cfg.data.seq_len}")

  counts = param_count(build_model(cfg))
  m = cfg.model
  _stage(2, f"model: {m.mixer} LM, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads x "
            f"{m.head_k}, content block {m.content_block}, {counts['total']:,} parameters, "
            f"{m.compute_dtype} compute on {jax.device_count()} {jax.default_backend()} device(s)")
  print("  " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total"))

  limit = f", stopping after {cfg.time_limit_s / 60:.1f} min" if cfg.time_limit_s else ""
  _stage(3, f"training {cfg.steps} steps{limit} -> {cfg.out_dir}")
  from carve_jax.train.checkpoint import CheckpointError
  from carve_jax.train.runlock import RunDirError, RunLockedError
  try:
    summary = train(cfg, tokens=tokens)
  except (CheckpointError, RunLockedError, RunDirError) as e:
    print(f"demo: error: {e}", file=sys.stderr)
    return 1

  _stage(4, "validation perplexity of the saved checkpoint (restored from disk)")
  cfg_ck, model, step = load_trained(cfg.checkpoint_dir)
  n_eval = max(cfg.eval_batches, 8)
  ev = perplexity(dataclasses.replace(cfg_ck, data=cfg.data), model, n_batches=n_eval, tokens=tokens)
  print(f"  step {step}: val loss {ev['loss']:.4f} nats/token, perplexity {ev['ppl']:.2f} "
        f"({ev['tokens']:,} tokens; {ev['loss'] / 0.6931:.3f} bits per {tok.name} token)")

  _stage(5, f"sample (temperature 0.8, top-k 40) after the prompt {known.prompt!r}")
  text = sample(model, tok, known.prompt, max_new_tokens=known.sample_tokens, temperature=0.8, top_k=40)[0]
  print("  " + (known.prompt + text).replace("\n", "\n  "))

  _stage(6, "summary")
  print(format_summary(summary))
  print(f"checkpoint eval    step {step}: val ppl {ev['ppl']:.2f}")
  print(f"total time         {time.time() - t0:.0f} s")
  print(f"\nnext: carve-eval --ckpt_dir {cfg.checkpoint_dir}\n"
        f"      carve-generate --ckpt_dir {cfg.checkpoint_dir} --prompt 'It was' --max_new_tokens 200")
  return 0


if __name__ == "__main__":
  sys.exit(main())
