"""Packed documents (segment ids) in the Pallas kernels, forward and every gradient (issue 13).

On CPU the kernels run in Pallas interpret mode, in float64, at chunk 16 and content block 32
(= 2 chunks, so CARVE's later blocks of a document begin mid-chunk). The layout covers documents
of length 1, boundaries on a chunk edge, mid-chunk and on a chunk's last row, CARVE documents
longer than a content block, T not a multiple of the chunk, and an initial state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carve_jax.ops.sample_inputs import family_inputs, run_family
from conftest import rel_err
from pallas_kernels import TuningConfig, pallas_gated_delta
from pallas_kernels.segments import AT_CHUNK, AT_START, CARRIED, MID, segments
from test_packed import _per_document, _value_and_grads  # each document alone; outputs and their gradients

C, G = 16, 32
# Row 0 starts at 16 (chunk edge), 17, 18 (length 1 each), 23 (mid-chunk; 40 long: its second block
# begins at 55, row 7 of chunk 3), 63 (the last row of chunk 3). Row 1: 35 (mid-chunk; 48 long: block at
# 67, row 3 of chunk 4); its first document's second block begins on a chunk edge (32).
LENGTHS = [(16, 1, 1, 5, 40, 20), (35, 48)]
T = 83
SEEDS = {"kda": 21, "gdn2": 22, "carve": 23}


def _segment_ids(lengths_per_row):
  return jnp.asarray([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row], jnp.int32)


def _inputs(family, *, B=2, T=T, H=2, K=16, V=16, dtype=jnp.float64):
  return family_inputs(jax.random.PRNGKey(SEEDS[family]), family, B=B, T=T, H=H, K=K, V=V, dtype=dtype,
                       initial_state=True)


def _run(family, impl, inputs, seg=None, content_block=G, **kw):
  return run_family(family, impl=impl, chunk_size=C, content_block=content_block, segment_ids=seg, **inputs, **kw)


def _assert_close(got, want, tol, what):
  out, grads = got
  out_ref, grads_ref = want
  errs = {"o": rel_err(out[0], out_ref[0]), "S": rel_err(out[1], out_ref[1])}
  errs |= {"d" + n: rel_err(grads[n], grads_ref[n]) for n in grads_ref}
  bad = {n: e for n, e in errs.items() if not e <= tol}
  assert not bad, f"{what}: errors over {tol:g}: {bad} (all: {errs})"


def _kernels(family, inputs, seg, config, content_block=G):
  """The kernel entry point itself (to pass a TuningConfig), with the public op's arguments of `family`."""
  x = dict(inputs)
  K = x["q"].shape[-1]
  if family == "carve":
    b, w, gamma = x["erase_logits"], x["beta"], x["gamma"]
  else:
    b, w, gamma = x["b"], x["w"], None
  return pallas_gated_delta(x["q"], x["k"], x["v"], x["g"], b, w, gamma, scale=K**-0.5, initial_state=x["initial_state"],
                            chunk_size=C, content_block=content_block, segment_ids=seg, config=config)


# carve and gdn2 at K = 32 in key blocks of 16 (every kernel's loop over key blocks); kda through the public op
@pytest.mark.parametrize("family, K", [("carve", 32), ("gdn2", 32), ("kda", 16)])
def test_kernels_equal_chunk_path_and_documents_alone_float64(x64, family, K):
  """Forward, final state and the gradients of every input (initial state and gamma included) == the chunk
  path with the same segment ids, and == each document alone (recurrent) concatenated (not for kda)."""
  inputs, seg = _inputs(family, H=1 if K == 32 else 2, K=K), _segment_ids(LENGTHS)
  if family == "kda":
    got = _value_and_grads(lambda x: _run(family, "pallas", x, seg), inputs)
  else:
    cfg = TuningConfig(block_k=16, grad_block_k=16, carve_block_k=16)
    got = _value_and_grads(lambda x: _kernels(family, x, seg, cfg), inputs)
  _assert_close(got, _value_and_grads(lambda x: _run(family, "chunk", x, seg), inputs), 1e-11, f"{family} chunk")
  if family == "kda":  # = gdn2 with b = w = beta (the kernels' scalar write gate): the chunk path suffices
    return
  alone = _value_and_grads(lambda x: _per_document(family, x, LENGTHS, content_block=G), inputs)
  _assert_close(got, alone, 1e-11, f"{family} documents alone")
  # the test can tell a reset from none: without segment ids the documents mix
  assert rel_err(jax.jit(lambda x: _run(family, "recurrent", x))(inputs)[0], alone[0][0]) > 1e-3


def test_carve_consecutive_mid_chunk_blocks_float64(x64):
  """CARVE at content block = chunk (16): a document starting at row 1 (its blocks begin at row 1 of the
  next chunks), one starting on a chunk's last row (blocks on the last row of each later chunk), a chunk
  with a mid-chunk block and a document start: runs of consecutive chunks that take two passes of the
  state loop's solve. Forward, final state and every
  gradient == the chunk path and each document alone."""
  lengths, cb = [(1, 40, 30, 12), (15, 68)], C
  inputs, seg = _inputs("carve", H=1, K=32), _segment_ids(lengths)
  blk = np.asarray(segments(seg, Tp=96, chunk_size=C, content_block=cb).blk).reshape(2, 6, C)
  assert (blk[0, 1:4] == MID).any(axis=1).all() and (blk[1, 1:5, -1] == MID).all()  # the layout is as described
  assert (blk[0, 1, 1:] == MID).all() and (blk[0, 2, 9:] == AT_START).all()
  cfg = TuningConfig(block_k=16, grad_block_k=16, carve_block_k=16)
  got = _value_and_grads(lambda x: _kernels("carve", x, seg, cfg, content_block=cb), inputs)
  _assert_close(got, _value_and_grads(lambda x: _run("carve", "chunk", x, seg, content_block=cb), inputs), 1e-11,
                "carve chunk")
  alone = _value_and_grads(lambda x: _per_document("carve", x, lengths, content_block=cb), inputs)
  _assert_close(got, alone, 1e-11, "carve documents alone")


def test_segments_classes():
  """The kernels' per-token inputs on a hand-checked row (chunk 4, content block 8)."""
  ids = jnp.asarray([[0] * 6 + [1] * 11 + [2]], jnp.int32)            # starts at 6 and 17, T = 18
  s = segments(ids, Tp=20, chunk_size=4, content_block=8)
  np.testing.assert_array_equal(s.ids[0, 17:], [2, 2, 2])             # padding continues the last document
  np.testing.assert_array_equal(s.doc[0], [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
  c0, c1, m, z = CARRIED, AT_CHUNK, MID, AT_START
  # t = 0: block of the initial state; 6: a start; 14 = 6 + 8: mid-chunk block (row 2); 17: a start
  np.testing.assert_array_equal(s.blk[0], [c1, c1, c1, c1, c0, c0, z, z, c0, c0, c0, c0, c0, c0, m, m,
                                           c0, z, z, z])


def test_reference_backward_with_segment_ids(x64):
  """kernel_bwd="reference" passes the (padded) segment ids to the chunk path's VJP."""
  family, lengths = "gdn2", [(5, 12, 20)]
  inputs, seg = _inputs(family, B=1, T=37, H=1), _segment_ids(lengths)
  want = _value_and_grads(lambda x: _run(family, "chunk", x, seg), inputs)
  got = _value_and_grads(lambda x: _run(family, "pallas", x, seg, kernel_bwd="reference"), inputs)
  _assert_close(got, want, 1e-11, family)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["carve", "gdn2"])
def test_gpu_bf16_packed(family):
  """Compiled Triton kernels, bf16, head size 128, documents of random lengths: == the chunk path (float32)."""
  B, T_, H, D = 2, 700, 4, 128
  rng = np.random.default_rng(7)
  lengths = [rng.integers(1, 200, size=40) for _ in range(B)]
  seg = jnp.asarray([np.repeat(np.arange(len(ls)), ls)[:T_] for ls in lengths], jnp.int32)
  inp = family_inputs(jax.random.PRNGKey(31), family, B=B, T=T_, H=H, K=D, V=D, dtype=jnp.bfloat16,
                      initial_state=True)
  ref_inp = {n: x.astype(jnp.float32) for n, x in inp.items()}
  kw = dict(chunk_size=64, content_block=128, segment_ids=seg)
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(lambda x: run_family(family, impl="chunk", **kw, **x), ref_inp)
  got = _value_and_grads(lambda x: run_family(family, impl="pallas", **kw, **x), inp)
  errs = {"o": rel_err(got[0][0], want[0][0]), "S": rel_err(got[0][1], want[0][1])}
  errs |= {"d" + n: rel_err(got[1][n], want[1][n]) for n in want[1]}
  print(f"GPU packed bf16 {family}: {errs}")
  assert all(e < 3e-2 for e in errs.values()), errs
