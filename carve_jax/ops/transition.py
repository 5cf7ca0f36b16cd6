r"""The linear map one chunk applies to the state, and its Kronecker rank: claim 2 in numbers.

With nothing written (w = 0), a chunk maps S_in -> S_out linearly. Written on vec(S) (row-major,
index i*V + j) it is a (K V) x (K V) matrix M. Key-axis erase gives M = P (x) I_V for one K x K
matrix P -- the form the WY solver needs -- so the Van Loan-Pitsianis rearrangement
R[(i, i'), (j, j')] = M[(i, j), (i', j')] has rank 1. Value-axis erase gives each value column its
own transition, and R has rank > 1: no single WY pair (W, U) represents the chunk.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

from carve_jax.ops.recurrent import recurrent_gated_delta, recurrent_value_axis_erase


def chunk_transition(k, g, erase, *, V: int, axis: Literal["key", "value"] = "key"):
  """The chunk's state transition as a matrix on vec(S).

  Args:
    k, g: keys and log decays of one head over one chunk, [C, K].
    erase: erase gate, [C, K] for axis="key" (b_t) or [C, V] for axis="value" (e_t).
    V: value dimension.
  Returns:
    M: [K*V, K*V] with vec(S_out) = M vec(S_in).
  """
  C, K = k.shape
  n = K * V
  basis = jnp.eye(n, dtype=k.dtype).reshape(n, 1, K, V)  # every basis state as a batch entry

  def bcast(x):  # [C, D] -> [n, 1, C, D]
    return jnp.broadcast_to(x[None, None], (n, 1) + x.shape)

  zeros_v = jnp.zeros((n, 1, C, V), k.dtype)
  if axis == "key":
    _, S = recurrent_gated_delta(bcast(k), bcast(k), zeros_v, bcast(g), bcast(erase), zeros_v, None,
                                 scale=1.0, initial_state=basis)
  elif axis == "value":
    _, S = recurrent_value_axis_erase(bcast(k), bcast(k), zeros_v, bcast(g), bcast(erase), zeros_v,
                                      scale=1.0, initial_state=basis)
  else:
    raise ValueError(f"chunk_transition: argument `axis` must be 'key' or 'value', got {axis!r}")
  return S.reshape(n, n).T


def kronecker_rank(M, K: int, V: int, rtol: float = 1e-9) -> tuple[int, np.ndarray]:
  """Kronecker rank of M [K*V, K*V] over the split (K x K) (x) (V x V).

  Returns (rank, singular values of the rearranged matrix, largest first); rank counts singular
  values above rtol * the largest.
  """
  R = np.asarray(M).reshape(K, V, K, V).transpose(0, 2, 1, 3).reshape(K * K, V * V)
  s = np.linalg.svd(R, compute_uv=False)
  return int(np.sum(s > rtol * s[0])), s
