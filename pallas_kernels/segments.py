r"""Packed documents for the kernels: the per-token int inputs derived from the public segment ids.

A document begins at token t > 0 where segment_ids[b, t] != segment_ids[b, t - 1] (the convention of
`carve_jax.ops.segments`; padding continues the last document). Per chunk of C tokens, row r:

    doc[b, t]  = number of document starts at chunk rows <= r (0: the document the chunk entered in)

The kernels keep the pairwise terms L and Aqk where doc_r = doc_c, let the state entering a chunk reach
only rows with doc = 0 (q e^G and b k e^G masked), sum into the state leaving it only the rows of its
last document (Kd masked), and carry the entering state through the chunk only when no document starts
in it (G_C replaced by `NO_CARRY`, so e^{G_C} = 0 in the state passes).

CARVE's content blocks restart at every document start (in-document position p, a block begins where
p % content_block = 0). Each token takes the content signal of the block it lies in, by class:

    blk = 0  the block entering the chunk (the signal carried from the previous chunk)
          1  a block begun at chunk row 0 of a continuing document (signal of the state entering the chunk)
          2  the block begun at row j > 0 of a continuing document (signal of the state at j; at most one
             per chunk, since content_block is a multiple of C and a document's blocks lie that far apart)
          3  a block begun at a document start (the zero state's signal, sqrt(1e-6))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NO_CARRY = -1e30  # G_C of a chunk in which a document starts: exp(NO_CARRY) = 0, finite everywhere

CARRIED, AT_CHUNK, MID, AT_START = 0, 1, 2, 3  # the content classes `blk`


class Segments(NamedTuple):
  """ids [B, Tp] int32: the segment ids, padded with each row's last id (for a reference backward);
  doc [B, Tp] int32: the in-chunk document number; blk [B, Tp] int32: CARVE's content class (None
  without gamma)."""
  ids: jax.Array
  doc: jax.Array
  blk: jax.Array | None


def segments(segment_ids, *, Tp: int, chunk_size: int, content_block: int | None) -> Segments:
  """The kernels' `Segments` from segment ids int [B, T] (T <= Tp; Tp a multiple of chunk_size)."""
  ids = jnp.asarray(segment_ids, jnp.int32)
  B, T = ids.shape
  ids = jnp.pad(ids, ((0, 0), (0, Tp - T)), mode="edge")
  C, N = chunk_size, Tp // chunk_size
  t = jnp.arange(Tp, dtype=jnp.int32)
  starts = jnp.concatenate([jnp.zeros((B, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  per_chunk = lambda x: x.reshape(B, N, C)
  doc = jnp.cumsum(per_chunk(starts), axis=-1, dtype=jnp.int32).reshape(B, Tp)
  if content_block is None:
    return Segments(ids=ids, doc=doc, blk=None)
  pos = t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)            # position inside the document
  r = jnp.arange(C, dtype=jnp.int32)
  begin = per_chunk(pos % content_block == 0)                           # a content block begins at row r
  last = jax.lax.cummax(jnp.where(begin, r, -1), axis=2)                # its latest begin at rows <= r
  at_start = jnp.take_along_axis(per_chunk(starts), jnp.maximum(last, 0), axis=2)
  blk = jnp.where(last < 0, CARRIED, jnp.where(at_start, AT_START, jnp.where(last == 0, AT_CHUNK, MID)))
  return Segments(ids=ids, doc=doc, blk=blk.astype(jnp.int32).reshape(B, Tp))
