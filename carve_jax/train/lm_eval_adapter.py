r"""lm-evaluation-harness (0.4.x) over a carve_jax checkpoint: `carve-eval --tasks ...`.

    carve-eval --ckpt_dir runs/gdn2/checkpoints --tasks hellaswag,piqa,arc_easy,lambada_openai --batch_size 16
    lm_eval --model carve_jax --model_args ckpt_dir=runs/gdn2/checkpoints --tasks piqa   # after importing this module

`CarveLM` implements the three request types of lm-eval's `LM`:

  loglikelihood(ctx, cont)   sum_{t in cont} log p(x_t | x_<t) and whether every x_t is the argmax;
                             context and continuation are tokenised together (lm-eval's TemplateLM
                             rule), the pair is left-truncated to `max_length` + 1 tokens, rows are
                             sorted by length, right-padded to a power-of-two bucket and scored in
                             batches of `batch_size` by one parallel forward (causal: padding after
                             a row never changes its scores).
  loglikelihood_rolling(s)   the log-likelihood of the whole text, in lm-eval's disjoint rolling
                             windows of `max_length` tokens (the first predicted from the EOS token).
  generate_until(ctx, kw)    greedy (or sampled, `do_sample` / `temperature`) continuation up to
                             `max_gen_toks` tokens or the first `until` string, which is cut off.
                             Batched through the recurrent cache: the rows' common prompt prefix
                             (rounded down to a power of two) is prefilled in parallel, then every
                             row advances one token per `decode_step`, fed its own prompt tokens
                             until they run out and its own samples after that. No padding ever
                             enters a recurrent state.

Tokens are the run's tokenizer (`cfg.data.tokenizer`); its EOS id is lm-eval's prefix / end-of-text token.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval import utils as lm_utils
except ImportError as e:  # the optional extra
  raise ImportError("carve-eval --tasks needs lm-evaluation-harness: pip install 'carve_jax[eval]' "
                    "(lm-eval==0.4.13)") from e

from carve_jax.model import LM, decode_step, prefill


def _bucket(n: int, cap: int, lo: int = 8) -> int:
  """Smallest power of two >= n (at least `lo`), at most `cap`."""
  b = lo
  while b < n:
    b *= 2
  return min(b, max(cap, n))


@register_model("carve_jax")
class CarveLM(TemplateLM):
  """An lm-eval model over a carve_jax `LM` and tokenizer (or a checkpoint folder: `ckpt_dir=`)."""

  def __init__(self, ckpt_dir: str | None = None, step: int | None = None, *, model: LM | None = None,
               tokenizer=None, batch_size: int | str = 8, max_length: int = 2048, seed: int = 0,
               max_batch_size: int | None = None, device: str | None = None):
    super().__init__()
    del max_batch_size, device  # lm-eval passes these to every model; JAX picks the device
    if (model is None) == (ckpt_dir is None):
      raise ValueError("CarveLM: give exactly one of `ckpt_dir` (a checkpoint folder) or `model` (+ `tokenizer`)")
    if ckpt_dir is not None:
      from carve_jax.data.tokenizer import get_tokenizer
      from carve_jax.train import distributed as dist
      from carve_jax.train.eval import load_trained
      cfg, model, _ = load_trained(ckpt_dir, None if step is None else int(step),
                                   mesh=dist.make_mesh(jax.local_devices()[:1]))
      tokenizer = get_tokenizer(cfg.data.tokenizer)
    if tokenizer is None:
      raise ValueError("CarveLM: argument `tokenizer` is required with `model`")
    if str(batch_size).startswith("auto"):
      batch_size = 8
    self.batch_size, self.max_length = int(batch_size), int(max_length)
    for name in ("batch_size", "max_length"):
      if getattr(self, name) < 1:
        raise ValueError(f"CarveLM: argument `{name}` must be >= 1, got {getattr(self, name)}")
    self.model, self.tok, self.seed = model, tokenizer, int(seed)
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    @jax.jit
    def score(state, tokens, targets):
      logits = nnx.merge(graphdef, state)(tokens)
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
      return lp, jnp.argmax(logits, axis=-1) == targets

    @jax.jit
    def step(state, cache, logits, forced, is_forced, rng, temperature):
      greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1).astype(jnp.int32)
      new = jnp.where(temperature > 0, sampled, greedy)
      tok = jnp.where(is_forced, forced, new)
      logits, cache = decode_step(nnx.merge(graphdef, state), tok, cache)
      return tok, logits, cache

    self._score, self._step = score, step
    self._prefill = jax.jit(lambda state, tokens, max_len: prefill(nnx.merge(graphdef, state), tokens,
                                                                     max_len=max_len), static_argnums=2)

  # -- lm-eval's TemplateLM interface --------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.tok.eos_id)

  @property
  def tokenizer_name(self) -> str:
    return type(self.tok).__name__

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    return [int(i) for i in self.tok.encode(string)]

  def tok_decode(self, ids) -> str:
    return self.tok.decode(np.asarray(ids, np.int32))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    return self.score_tokens([(ctx, cont) for _, ctx, cont in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    rows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                                                   max_seq_len=self.max_length, context_len=1)
      for ctx, cont in map(lm_utils.make_disjoint_window, windows):
        rows.append((ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self.score_tokens(rows)):
      totals[i] += ll
    for req, ll in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    items = []
    for i, req in enumerate(requests):
      ctx, kw = req.args
      kw = dict(kw or {})
      until = kw.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen = int(kw.pop("max_gen_toks", 256))
      do_sample = bool(kw.pop("do_sample", False))
      temp = float(kw.pop("temperature", 1.0)) if do_sample else 0.0  # do_sample=False is greedy (as in HF)
      ids = self.tok_encode(ctx) or [self.eot_token_id]
      ids = ids[-max(1, self.max_length - max_gen):]
      items.append((i, ids, until, max_gen, temp))
    out = [""] * len(requests)
    items.sort(key=lambda it: -len(it[1]))
    for b in range(0, len(items), self.batch_size):
      chunk = items[b:b + self.batch_size]
      for (i, *_), text in zip(chunk, self._generate_batch(chunk, b)):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  # -- batched work --------------------------------------------------------------------------------

  def score_tokens(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), cont is greedy) per (context ids, continuation ids) row."""
    prepared = []
    for ctx, cont in rows:
      if not cont:
        raise ValueError("CarveLM: a loglikelihood request has an empty continuation")
      if len(cont) > self.max_length:
        raise ValueError(f"CarveLM: continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
      full = (list(ctx) + list(cont))[-(self.max_length + 1):]
      prepared.append((full[:-1], full[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(prepared[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for b in range(0, len(order), self.batch_size):
      idx = order[b:b + self.batch_size]
      L = _bucket(max(len(prepared[i][0]) for i in idx), self.max_length)
      tokens = np.zeros((self.batch_size, L), np.int32)
      targets = np.zeros((self.batch_size, L), np.int32)
      for r, i in enumerate(idx):
        inp, tgt, _ = prepared[i]
        tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      lp, greedy = jax.device_get(self._score(self.state, jnp.asarray(tokens), jnp.asarray(targets)))
      for r, i in enumerate(idx):
        n_in, n_cont = len(prepared[i][0]), prepared[i][2]
        sl = slice(n_in - n_cont, n_in)
        out[i] = (float(np.sum(lp[r, sl], dtype=np.float64)), bool(np.all(greedy[r, sl])))
    return out

  def _generate_batch(self, chunk, salt: int) -> list[str]:
    B = self.batch_size
    prompts = [ids for _, ids, *_ in chunk] + [[self.eot_token_id]] * (B - len(chunk))
    max_gen = [m for *_, m, _ in chunk] + [1] * (B - len(chunk))
    temps = {t for *_, t in chunk}
    if len(temps) > 1:
      raise ValueError(f"CarveLM: one batch mixes sampling temperatures {sorted(temps)}")
    temperature = jnp.float32(temps.pop())
    lens = [len(p) for p in prompts]
    total = max(l + m for l, m in zip(lens, max_gen))
    fill = 1 << (min(lens).bit_length() - 1)  # power of two <= the shortest prompt
    max_len = _bucket(total, total)
    head = jnp.asarray(np.asarray([p[:fill] for p in prompts], np.int32))
    logits, cache = self._prefill(self.state, head, max_len)
    logits = logits[:, -1]
    gen: list[list[int]] = [[] for _ in range(B)]
    done = [False] * len(chunk) + [True] * (B - len(chunk))
    rng = jax.random.fold_in(jax.random.key(self.seed), salt)
    for t in range(fill, total):
      forced = np.asarray([p[t] if t < len(p) else 0 for p in prompts], np.int32)
      is_forced = np.asarray([t < len(p) for p in prompts])
      tok, logits, cache = self._step(self.state, cache, logits, jnp.asarray(forced), jnp.asarray(is_forced),
                                      jax.random.fold_in(rng, t), temperature)
      tok = np.asarray(jax.device_get(tok))
      for r in range(B):
        if done[r] or is_forced[r]:
          continue
        gen[r].append(int(tok[r]))
        until = chunk[r][2]
        if (tok[r] == self.eot_token_id or len(gen[r]) >= max_gen[r]
            or any(s and s in self.tok_decode(gen[r]) for s in until)):
          done[r] = True
      if all(done):
        break
    texts = []
    for r, (_, _, until, _, _) in enumerate(chunk):
      ids = gen[r][:-1] if gen[r] and gen[r][-1] == self.eot_token_id else gen[r]
      text = self.tok_decode(ids)
      for s in until:
        text = text.split(s)[0] if s else text
      texts.append(text)
    return texts


@dataclasses.dataclass(frozen=True)
class TaskEvalFlags:
  """Flags of `carve-eval --tasks` (lm-evaluation-harness tasks on a checkpoint).

  Attributes:
    ckpt_dir: a run's checkpoint folder (<out_dir>/checkpoints).
    tasks: comma-separated lm-eval task names, e.g. hellaswag,piqa.
    step: checkpoint step (default: latest).
    num_fewshot: few-shot examples (default: each task's own).
    limit: examples per task (or a fraction if < 1).
    batch_size: requests scored per forward pass.
    max_length: tokens per scored window.
    include_path: a folder of extra task YAML files.
    output: write lm-eval's full results JSON here.
    seed: lm-eval's and the sampler's seed.
  """
  ckpt_dir: str
  tasks: str
  step: int | None = None
  num_fewshot: int | None = None
  limit: float | None = None
  batch_size: int = 8
  max_length: int = 2048
  include_path: str | None = None
  output: str | None = None
  seed: int = 0


def main(argv=None) -> int:
  from carve_jax.train import flags  # noqa: PLC0415
  prog = "carve-eval"
  argv = sys.argv[1:] if argv is None else list(argv)
  args = flags.cli(TaskEvalFlags, flags.normalise_argv(argv), prog=prog,
                   description="lm-evaluation-harness tasks on a checkpoint")
  for name in ("batch_size", "max_length"):
    if getattr(args, name) < 1:
      flags.usage_error(prog, f"--{name} must be >= 1, got {getattr(args, name)}")
  tasks = [t for t in args.tasks.split(",") if t]
  if not tasks:
    flags.usage_error(prog, "--tasks must name at least one task")
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  tm = TaskManager(include_path=args.include_path)
  unknown = [t for t in tasks if t not in tm.all_tasks]
  if unknown:
    flags.usage_error(prog, f"--tasks: unknown lm-eval task(s) {unknown}" + ("" if args.include_path else
                      " (local task YAMLs need --include_path)"))
  lm = CarveLM(args.ckpt_dir, args.step, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
  res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=tm,
                        random_seed=args.seed, numpy_random_seed=args.seed, log_samples=False, bootstrap_iters=0)
  if args.output:
    with open(args.output, "w") as fh:
      json.dump(res, fh, indent=2, default=str)
  print(json.dumps({"ckpt_dir": args.ckpt_dir, "tasks": tasks, "results": res["results"]}, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
