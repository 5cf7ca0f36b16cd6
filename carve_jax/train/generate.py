"""`carve-generate`: sample text from a checkpoint.

    carve-generate --ckpt_dir runs/demo/checkpoints --prompt "It is a truth" --max_new_tokens 200 \\
      --temperature 0.8 --top_k 40

The prompt is encoded with the run's tokenizer, prefilled in parallel, then decoded token by token
from the recurrent cache (`carve_jax.model.generate`). temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from carve_jax.train import distributed as dist
from carve_jax.train import flags


def sample(model, tokenizer, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0, num_samples: int = 1) -> list[str]:
  """Continuations (text after the prompt) of `prompt`, `num_samples` of them."""
  from carve_jax.model import generate
  ids = np.asarray(tokenizer.encode(prompt), np.int32)
  if ids.size == 0:
    ids = np.asarray([tokenizer.eos_id], np.int32)
  prompt_ids = jnp.asarray(np.tile(ids[None], (num_samples, 1)))
  out = generate(model, prompt_ids, max_new_tokens, rng=jax.random.key(seed), temperature=temperature, top_k=top_k)
  out = np.asarray(jax.device_get(out))[:, ids.size:]
  return [tokenizer.decode(row) for row in out]


@dataclasses.dataclass(frozen=True)
class GenerateFlags:
  """Sample text from a checkpoint (`carve-generate`).

  Attributes:
    ckpt_dir: a run's checkpoint folder (<out_dir>/checkpoints).
    step: checkpoint step (default: the latest that verifies).
    prompt: text the samples continue.
    max_new_tokens: tokens to generate per sample.
    temperature: softmax temperature; 0 is greedy.
    top_k: sample among the k most likely tokens; 0 disables top-k.
    num_samples: samples drawn (in one batch).
    seed: sampling seed.
    json: print one JSON object instead of text.
  """
  ckpt_dir: str
  step: Annotated[int | None, tyro.conf.arg(aliases=("--restore_step",))] = None
  prompt: str = "The "
  max_new_tokens: int = 200
  temperature: float = 0.8
  top_k: int = 40
  num_samples: int = 1
  seed: int = 0
  json: bool = False


def main(argv=None) -> int:
  prog = "carve-generate"
  argv = sys.argv[1:] if argv is None else list(argv)
  args = flags.cli(GenerateFlags, flags.normalise_argv(argv), prog=prog,
                   description=__doc__.splitlines()[0])
  if args.max_new_tokens < 0:
    flags.usage_error(prog, f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
  if args.num_samples < 1:
    flags.usage_error(prog, f"--num_samples must be >= 1, got {args.num_samples}")
  if args.temperature < 0:
    flags.usage_error(prog, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
  from carve_jax.data.tokenizer import get_tokenizer
  from carve_jax.train.checkpoint import CheckpointError
  from carve_jax.train.eval import load_trained
  try:
    cfg, model, step = load_trained(args.ckpt_dir, args.step, mesh=dist.make_mesh(jax.local_devices()[:1]))
  except CheckpointError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1
  tok = get_tokenizer(cfg.data.tokenizer)
  n_prompt = max(len(tok.encode(args.prompt)), 1)
  if cfg.model.mixer == "attention" and n_prompt + args.max_new_tokens > cfg.model.max_seq_len:
    flags.usage_error(prog, f"--max_new_tokens {args.max_new_tokens} + the prompt's {n_prompt} tokens exceed "
                      f"this attention model's max_seq_len={cfg.model.max_seq_len} (its RoPE and KV cache are sized for it)")
  texts = sample(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, seed=args.seed, num_samples=args.num_samples)
  if args.json:
    print(json.dumps({"ckpt_dir": args.ckpt_dir, "step": step, "prompt": args.prompt, "samples": texts}))
  else:
    for t in texts:
      print(args.prompt + t)
      print("-" * 40)
  return 0


if __name__ == "__main__":
  sys.exit(main())
