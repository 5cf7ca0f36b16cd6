"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping, a weight-decay mask.

    lr(t) = lr * t / warmup                                        t < warmup
          = lr * (r + (1 - r) * (1 + cos(pi * (t - warmup) / (steps - warmup))) / 2)   after
    (r = min_lr_ratio)

    update = AdamW(clip_by_global_norm(grad, clip_norm), lr(t), weight_decay * mask)

Weight decay (decoupled, AdamW) applies only to weight matrices: parameters with ndim >= 2 whose
path names none of `NO_DECAY`. So norms' scales, biases, the decay parameters `A_log` and
`dt_bias`, CARVE's content weight `gamma` (per head) are never decayed, and neither are the token
embeddings (nor a head tied to them): decaying an embedding row shrinks tokens that rarely occur,
which only hurts (as in OLMo 2 and most open LM recipes). The short-conv kernels and all
projection matrices are decayed.
"""

from __future__ import annotations

import re

import jax
import optax

from carve_jax.train.config import OptimConfig

# Path components (lower-cased, matched as substrings) that are never decayed.
NO_DECAY = ("bias", "norm", "scale", "a_log", "dt_bias", "gamma", "embed")


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    out.append(str(name).lower())
  return out


def decays(path, leaf) -> bool:
  """True where AdamW's weight decay applies (see the module docstring)."""
  if getattr(leaf, "ndim", 0) < 2:
    return False
  names = _path_names(path)
  return not any(bad in name for name in names for bad in NO_DECAY)


def decay_mask(params):
  """A pytree of bools shaped like `params` (an nnx.State or any pytree of arrays)."""
  return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to cfg.lr over cfg.warmup_steps, then cosine to cfg.lr * cfg.min_lr_ratio."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm (unless clip_norm == 0) then AdamW with the schedule and decay mask."""
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def describe_mask(params) -> dict[str, list[str]]:
  """{'decay': [...paths], 'no_decay': [...paths]} for logging and tests."""
  out = {"decay": [], "no_decay": []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    key = "/".join(_path_names(path))
    out["decay" if decays(path, leaf) else "no_decay"].append(re.sub(r"/value$", "", key))
  return out
