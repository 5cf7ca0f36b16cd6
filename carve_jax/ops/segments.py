r"""Packed documents: the per-token segment ids of the public API and what every layer derives from them.

Public form: `segment_ids`, int [B, T], one id per token; a new document begins at token t > 0 where
segment_ids[b, t] != segment_ids[b, t - 1] (only changes matter, not the values). Token 0 of a row
always continues from the given initial state (zero by default), so with an initial state only
the row's first document sees it. FLA's `cu_seqlens` (int [N + 1] offsets 0 = c_0 < ... < c_N = T
into a batch of one row) converts to it with `segment_ids_from_cu_seqlens`.

    starts[b, t]    = t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]      (reset before token t)
    positions[b, t] = t - (first token of t's document)                          (0 at each start)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_ids_from_cu_seqlens(cu_seqlens: jax.Array, T: int) -> jax.Array:
  """int32 [1, T]: token t gets the index i of the sequence with cu_seqlens[i] <= t < cu_seqlens[i+1]."""
  t = jnp.arange(T, dtype=jnp.int32)
  return (jnp.searchsorted(jnp.asarray(cu_seqlens, jnp.int32), t, side="right") - 1)[None].astype(jnp.int32)


def document_starts(segment_ids: jax.Array) -> jax.Array:
  """bool [B, T]: True where a new document begins (never at t = 0)."""
  s = jnp.asarray(segment_ids)
  return jnp.concatenate([jnp.zeros_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], axis=1)


def document_positions(segment_ids: jax.Array) -> jax.Array:
  """int32 [B, T]: each token's position inside its document (restarts at 0 at every start)."""
  return positions_from_starts(document_starts(segment_ids))


def positions_from_starts(starts: jax.Array) -> jax.Array:
  """int32 [B, T] positions inside the documents from the start flags bool [B, T]."""
  t = jnp.arange(starts.shape[1], dtype=jnp.int32)
  return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def document_numbers(segment_ids: jax.Array) -> jax.Array:
  """int32 [B, T]: how many documents began before each token in its row (0 for the first one).

  Two tokens are in the same document iff their numbers are equal; equal ids in separate runs
  (e.g. [0, 1, 0]) are different documents, as `document_starts` reads them.
  """
  return jnp.cumsum(document_starts(segment_ids), axis=1, dtype=jnp.int32)
