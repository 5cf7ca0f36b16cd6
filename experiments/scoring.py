"""Scores of a trained model on fixed batches: mean masked loss, and accuracy on masked positions."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from carve_jax.train.batch_loop import masked_loss


def make_loss_eval(batches: list[dict]) -> Callable:
  """eval_fn(model) -> mean masked loss over fixed batches (one jitted forward per shape)."""
  fwd = nnx.jit(lambda m, b: masked_loss(m, b))
  return lambda model: float(np.mean([float(fwd(model, b)) for b in batches]))


@nnx.jit
def _argmax_logits(model, inputs):
  return jnp.argmax(model(inputs), axis=-1)


def masked_accuracy(model, batches: list[dict], *, per_row: bool = False) -> float:
  """Fraction of masked positions whose argmax equals the target (teacher forcing).

  per_row=True: fraction of rows whose masked positions are ALL right (exact match of an answer)."""
  right = total = 0
  for b in batches:
    pred = np.asarray(_argmax_logits(model, jnp.asarray(b["inputs"])))
    m = np.asarray(b["mask"]) > 0
    ok = (pred == np.asarray(b["targets"])) | ~m
    if per_row:
      right += int(ok.all(axis=1).sum())
      total += ok.shape[0]
    else:
      right += int((ok & m).sum())
      total += int(m.sum())
  return right / max(total, 1)
