"""`carve-generate`: sample text from a checkpoint.

    carve-generate --ckpt_dir runs/demo/checkpoints --prompt "It is a truth" --max_new_tokens 200 \\
      --temperature 0.8 --top_k 40

The prompt is encoded with the run's tokenizer, prefilled in parallel, then decoded token by token
from the recurrent cache (`carve_jax.model.generate`). temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from carve_jax.train import distributed as dist


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


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="carve-generate", description=__doc__.splitlines()[0])
  ap.add_argument("--ckpt_dir", required=True)
  ap.add_argument("--step", "--restore_step", dest="step", type=int, default=None,
                  help="checkpoint step (default: the latest that verifies)")
  ap.add_argument("--prompt", default="The ")
  ap.add_argument("--max_new_tokens", type=int, default=200)
  ap.add_argument("--temperature", type=float, default=0.8)
  ap.add_argument("--top_k", type=int, default=40, help="0 disables top-k")
  ap.add_argument("--num_samples", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = ap.parse_args(argv)
  if args.max_new_tokens < 0:
    ap.error(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
  if args.num_samples < 1:
    ap.error(f"--num_samples must be >= 1, got {args.num_samples}")
  if args.temperature < 0:
    ap.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
  from carve_jax.data.tokenizer import get_tokenizer
  from carve_jax.train.checkpoint import CheckpointError
  from carve_jax.train.eval import load_trained
  try:
    cfg, model, step = load_trained(args.ckpt_dir, args.step, mesh=dist.make_mesh(jax.local_devices()[:1]))
  except CheckpointError as e:
    print(f"carve-generate: error: {e}", file=sys.stderr)
    return 1
  tok = get_tokenizer(cfg.data.tokenizer)
  n_prompt = max(len(tok.encode(args.prompt)), 1)
  if cfg.model.mixer == "attention" and n_prompt + args.max_new_tokens > cfg.model.max_seq_len:
    ap.error(f"--max_new_tokens {args.max_new_tokens} + the prompt's {n_prompt} tokens exceed this attention "
             f"model's max_seq_len={cfg.model.max_seq_len} (its RoPE and KV cache are sized for it)")
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
