r"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), as a seeded numpy generator.

A row of T tokens holds P key-value pairs, then P queries scattered over the rest:

    k_1 v_1 k_2 v_2 ... k_P v_P  0 0 k_{s(1)} v_{s(1)} 0 ... k_{s(P)} v_{s(P)} 0 ...

keys are distinct within a row and drawn from [1, V/2), values from [V/2, V) (repeats allowed),
0 is the filler. Each key is queried once, in a random order s, at random non-overlapping slots
(a query occupies two positions: the key, then its value). The model reads `inputs` and must
predict `targets = next token`; `mask` is 1 exactly at the query keys, where the target is the
value bound to that key earlier in the row. Needs T >= 4P.
"""

from __future__ import annotations

import numpy as np


def mqar_batch(rng: np.random.Generator, *, batch_size: int, seq_len: int, num_pairs: int,
               vocab_size: int) -> dict[str, np.ndarray]:
  """One batch: {"inputs": int32 [B, T], "targets": int32 [B, T], "mask": float32 [B, T]}."""
  B, T, P, V = batch_size, seq_len, num_pairs, vocab_size
  for name, x in (("batch_size", B), ("seq_len", T), ("num_pairs", P), ("vocab_size", V)):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
      raise ValueError(f"mqar_batch: argument `{name}` must be a positive int, got {x!r}")
  if T < 4 * P:
    raise ValueError(f"mqar_batch: argument `seq_len` must be >= 4 * num_pairs = {4 * P}, got {T}")
  if V // 2 - 1 < P:
    raise ValueError(f"mqar_batch: argument `vocab_size` must give >= num_pairs={P} keys in [1, V/2), got {V}")
  seq = np.zeros((B, T + 1), np.int64)
  mask = np.zeros((B, T), np.float32)
  n_slots = (T + 1 - 2 * P) // 2
  for r in range(B):
    keys = rng.choice(np.arange(1, V // 2), P, replace=False)
    vals = rng.integers(V // 2, V, P)
    seq[r, 0:2 * P:2], seq[r, 1:2 * P:2] = keys, vals
    slots = np.sort(rng.choice(n_slots, P, replace=False))
    order = rng.permutation(P)
    pos = 2 * P + 2 * slots
    seq[r, pos], seq[r, pos + 1] = keys[order], vals[order]
    mask[r, pos] = 1.0
  return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32), "mask": mask}
