r"""RULER-style needle-in-a-haystack probes (Hsieh et al. 2024, "RULER"), as a seeded numpy generator.

Vocabulary: haystack tokens are bytes 1..255 (real text when a byte stream is given, else uniform
random bytes); NEEDLE = 256, QUERY = 257, SEP = 258; key and value tokens come from two disjoint
ranges above 258 (`KEY_RANGE`, `VALUE_RANGE`); keys and values are `width` tokens long.

    needle:  NEEDLE k_1..k_w SEP v_1..v_w          inserted at uniformly random depths
    query:   QUERY  k_1..k_w SEP <answer>          at the end of the row

Tasks (`TASKS`):
  single:      one needle; the answer is its value.
  multikey:    `n_needles` needles with distinct keys; one is queried; the answer is its value.
  multivalue:  `n_needles` needles with the SAME key and distinct values; the answer is all values
               in the order they appear.
Training-only task (`TRAIN_TASKS`), denser supervision for models trained from scratch on the probes:
  multiquery:  `n_needles` needles with distinct keys, then every key queried once, in random order,
               each query followed by its answer: QUERY k SEP v QUERY k' SEP v' ... at the end.
`mask` marks the input positions whose next-token targets are the answer tokens; a row is correct
when every masked position is predicted (teacher-forced argmax, which equals greedy decoding when
all of them are right).
"""

from __future__ import annotations

import numpy as np

NEEDLE, QUERY, SEP = 256, 257, 258
KEY_RANGE = (260, 386)
VALUE_RANGE = (386, 512)
VOCAB_SIZE = 512
TASKS = ("single", "multikey", "multivalue")
TRAIN_TASKS = TASKS + ("multiquery",)


def _code(rng, lo_hi, width, n, distinct):
  lo, hi = lo_hi
  out = set() if distinct else None
  codes = []
  while len(codes) < n:
    c = tuple(int(x) for x in rng.integers(lo, hi, width))
    if distinct:
      if c in out:
        continue
      out.add(c)
    codes.append(c)
  return codes


def needle_row(rng: np.random.Generator, task: str, seq_len: int, *, stream: np.ndarray | None = None,
               n_needles: int = 4, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """One row: (seq int64 [seq_len + 1], mask float32 [seq_len]) with inputs = seq[:-1], targets = seq[1:]."""
  if task not in TRAIN_TASKS:
    raise ValueError(f"needle_row: argument `task` must be one of {TRAIN_TASKS}, got {task!r}")
  n = 1 if task == "single" else n_needles
  if task == "multivalue":
    keys = _code(rng, KEY_RANGE, width, 1, True) * n
    vals = _code(rng, VALUE_RANGE, width, n, True)
    queries = [(keys[0], [t for v in vals for t in v])]
  else:
    keys = _code(rng, KEY_RANGE, width, n, True)
    vals = _code(rng, VALUE_RANGE, width, n, False)
    asked = rng.permutation(n) if task == "multiquery" else [int(rng.integers(n))]
    queries = [(keys[j], list(vals[j])) for j in asked]
  needles = [[NEEDLE, *k, SEP, *v] for k, v in zip(keys, vals)]
  query, answer_at = [], []
  for k, answer in queries:
    query += [QUERY, *k, SEP]
    answer_at += range(len(query), len(query) + len(answer))
    query += answer
  hay_len = seq_len + 1 - len(query) - sum(len(x) for x in needles)
  if hay_len < 1:
    raise ValueError(f"needle_row: argument `seq_len`={seq_len} is too short for {n} needles and the query")
  if stream is not None and len(stream) > hay_len + 1:
    s = int(rng.integers(0, len(stream) - hay_len))
    hay = np.asarray(stream[s:s + hay_len], np.int64)
    hay = np.where(hay == 0, 32, hay)  # the corpus' EOS (0) becomes a space: 0 is no haystack byte
  else:
    hay = rng.integers(1, 256, hay_len)
  cuts = np.sort(rng.integers(0, hay_len + 1, n))
  parts, prev = [], 0
  for c, nd in zip(cuts, needles):
    parts += [hay[prev:c], np.asarray(nd, np.int64)]
    prev = c
  parts += [hay[prev:], np.asarray(query, np.int64)]
  seq = np.concatenate(parts)
  mask = np.zeros(seq_len, np.float32)
  start = seq_len + 1 - len(query)  # the query block's first position in seq
  mask[[start + a - 1 for a in answer_at]] = 1.0  # input position i predicts seq[i + 1]
  return seq, mask


def needle_batch(rng: np.random.Generator, *, batch_size: int, seq_len: int, tasks=TASKS,
                 stream: np.ndarray | None = None, n_needles: int = 4, width: int = 2) -> dict[str, np.ndarray]:
  """Rows of tasks drawn uniformly from `tasks`: {"inputs", "targets": int32 [B, T], "mask": float32 [B, T]}."""
  rows = [needle_row(rng, tasks[int(rng.integers(len(tasks)))], seq_len, stream=stream, n_needles=n_needles,
                     width=width) for _ in range(batch_size)]
  seq = np.stack([r[0] for r in rows])
  return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
          "mask": np.stack([r[1] for r in rows])}
