"""Packed documents in the math core: a packed row computes exactly what running each document alone
and concatenating computes (spec, "Packed documents"), for every family, impl="recurrent" and
impl="chunk", forward and gradients, in float64 with fixed seeds.

The layout (chunk C = 8, content block G = 16) has a document of length 1, boundaries on a chunk
edge and mid-chunk, documents longer than a content block whose later blocks begin mid-chunk,
and T not a multiple of C.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carve_jax import ops
from carve_jax.ops import api
from carve_jax.ops.sample_inputs import FAMILIES, family_inputs, run_family
from conftest import TOL, rel_err

C, G = 8, 16
# Row 0 starts at 0, 8 (chunk edge), 9, 10 (length 1 each), 13 (mid-chunk, 19 long: block at 29
# mid-chunk), 32 (edge), 37 (40 long: blocks at 53 and 69, mid-chunk). Row 1: other cuts.
LENGTHS = [(8, 1, 1, 3, 19, 5, 40), (30, 2, 45)]
T = 77
SEEDS = {"gdn": 11, "kda": 12, "gdn2": 13, "carve": 14}


def _segment_ids(lengths_per_row):
  return jnp.asarray([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row], jnp.int32)


def _inputs(family, *, initial_state=True, B=2, T=T, H=2, K=8, V=6):
  return family_inputs(jax.random.PRNGKey(SEEDS[family]), family, B=B, T=T, H=H, K=K, V=V, dtype=jnp.float64,
                       initial_state=initial_state)


def _per_document(family, inputs, lengths_per_row, content_block=G, **kw):
  """Each document alone (recurrent, unpacked), outputs concatenated; the row's initial state feeds
  its first document only; the final state is the last document's.

  The documents run as one batch, each padded at its end with k = v = g = 0 tokens (they change
  neither the state nor any earlier output), so the reference costs one call.
  """
  docs, where = [], []
  for b, lengths in enumerate(lengths_per_row):
    start = 0
    for i, L in enumerate(lengths):
      docs.append((b, start, L, i == 0))
      start += L
  Lmax = max(L for _, _, L, _ in docs)
  batch = {}
  for n, x in inputs.items():
    if n in ("gamma", "initial_state"):
      continue
    rows = []
    for b, start, L, _ in docs:
      piece = x[b, start:start + L]
      pad = jnp.zeros((Lmax - L,) + piece.shape[1:], x.dtype)
      rows.append(jnp.concatenate([piece, pad]))
    batch[n] = jnp.stack(rows)
  if "gamma" in inputs:
    batch["gamma"] = inputs["gamma"]
  if "initial_state" in inputs:
    S0 = inputs["initial_state"]
    batch["initial_state"] = jnp.stack([S0[b] if first else jnp.zeros_like(S0[b]) for b, _, _, first in docs])
  o, S = run_family(family, impl="recurrent", content_block=content_block, **batch, **kw)
  outs, states, d = [], [], 0
  for lengths in lengths_per_row:
    outs.append(jnp.concatenate([o[d + i, :L] for i, L in enumerate(lengths)]))
    d += len(lengths)
    states.append(S[d - 1])
  return jnp.stack(outs), jnp.stack(states)


def _packed(family, inputs, impl, seg, **kw):
  return run_family(family, impl=impl, chunk_size=C, content_block=G, segment_ids=seg, **inputs, **kw)


def _value_and_grads(f, inputs):
  """(outputs, gradients of a fixed random-like projection of them w.r.t. every input), jitted."""
  names = sorted(inputs)

  @jax.jit
  def run(xs):
    out, vjp = jax.vjp(lambda xs: f(dict(zip(names, xs))), xs)
    o, S = out
    cot = (jnp.cos(jnp.arange(o.size, dtype=o.dtype)).reshape(o.shape),
           jnp.sin(jnp.arange(S.size, dtype=S.dtype)).reshape(S.shape))
    return out, dict(zip(names, vjp(cot)[0]))

  return run([inputs[n] for n in names])


@pytest.mark.parametrize("family,content_grad", [(f, "stop") for f in FAMILIES] + [("carve", "full")])
def test_packed_equals_documents_alone_float64(x64, family, content_grad):
  """Forward and the gradients of every input, recurrent and chunk, against the documents alone."""
  kw = dict(content_grad=content_grad) if family == "carve" else {}
  inputs = _inputs(family)
  seg = _segment_ids(LENGTHS)
  ref, ref_grads = _value_and_grads(lambda x: _per_document(family, x, LENGTHS, **kw), inputs)
  for impl in ("recurrent", "chunk"):
    out, grads = _value_and_grads(lambda x: _packed(family, x, impl, seg, **kw), inputs)
    assert rel_err(out, ref) < TOL[jnp.float64].out, (family, impl, rel_err(out, ref))
    for n in grads:
      assert np.all(np.isfinite(np.asarray(grads[n]))), (family, impl, n)
      err = rel_err(grads[n], ref_grads[n])
      assert err < TOL[jnp.float64].grad, (family, impl, n, err)


def test_reset_restarts_the_content_block_at_the_zero_state_signal(x64):
  """A document's first block uses c = sqrt(1e-6): with a huge gamma the packed second document
  still equals the document run alone from the zero state (not the state the first one left)."""
  inputs = _inputs("carve", initial_state=False, B=1, T=20)
  inputs["gamma"] = jnp.full_like(inputs["gamma"], 50.0)
  seg = _segment_ids([(9, 11)])
  o, _ = jax.jit(lambda x: _packed("carve", x, "chunk", seg))(inputs)
  run = jax.jit(lambda x: run_family("carve", impl="recurrent", content_block=G, **x))
  alone, _ = run({n: (x if n == "gamma" else x[:, 9:]) for n, x in inputs.items()})
  carried, _ = run(inputs)
  assert rel_err(o[:, 9:], alone) < TOL[jnp.float64].out
  assert rel_err(carried[:, 9:], alone) > 1e-3  # the test can tell a reset from none


def test_one_document_is_the_unpacked_call(x64):
  inputs = _inputs("carve", T=40)
  seg = jnp.full((2, 40), 7, jnp.int32)
  f = jax.jit(lambda x: (run_family("carve", impl="chunk", chunk_size=C, content_block=G, **x),
                         _packed("carve", x, "chunk", seg)))
  plain, packed = f(inputs)
  assert rel_err(packed, plain) < TOL[jnp.float64].rounding


def test_cu_seqlens_is_converted_to_segment_ids(x64):
  lengths = (3, 1, 8, 5)
  inputs = _inputs("gdn2", B=1, T=17, initial_state=False)
  cu = jnp.asarray(np.cumsum((0,) + lengths), jnp.int32)
  np.testing.assert_array_equal(ops.segment_ids_from_cu_seqlens(cu, 17), _segment_ids([lengths]))
  f = jax.jit(lambda cu, seg: (_packed("gdn2", inputs, "chunk", seg),
                               run_family("gdn2", impl="chunk", chunk_size=C, cu_seqlens=cu, **inputs)))
  a, b = f(cu, _segment_ids([lengths]))
  assert rel_err(a, b) == 0.0


def test_segment_helpers():
  seg = jnp.asarray([[3, 3, 5, 5, 5, 3, 9]], jnp.int32)
  np.testing.assert_array_equal(ops.document_starts(seg), [[0, 0, 1, 0, 0, 1, 1]])
  np.testing.assert_array_equal(ops.document_positions(seg), [[0, 1, 0, 1, 2, 0, 0]])
  np.testing.assert_array_equal(ops.document_numbers(seg), [[0, 0, 1, 1, 1, 2, 3]])


def test_bad_segment_arguments_raise():
  inp = family_inputs(jax.random.PRNGKey(0), "gdn2", B=2, T=10, H=1, K=4, V=4)
  run = lambda **kw: run_family("gdn2", impl="chunk", chunk_size=4, **inp, **kw)
  with pytest.raises(ValueError, match="`segment_ids` must be shape"):
    run(segment_ids=jnp.zeros((2, 9), jnp.int32))
  with pytest.raises(ValueError, match="`segment_ids` must be an integer array"):
    run(segment_ids=jnp.zeros((2, 10), jnp.float32))
  with pytest.raises(ValueError, match="alternatives"):
    run(segment_ids=jnp.zeros((2, 10), jnp.int32), cu_seqlens=jnp.asarray([0, 10]))
  with pytest.raises(ValueError, match="batch of 1 row"):
    run(cu_seqlens=jnp.asarray([0, 10]))
  one = {n: x[:1] for n, x in inp.items()}
  with pytest.raises(ValueError, match="strictly increasing offsets from 0 to T=10"):
    run_family("gdn2", impl="chunk", chunk_size=4, cu_seqlens=jnp.asarray([0, 4, 4, 10]), **one)
  with pytest.raises(ValueError, match="strictly increasing offsets from 0 to T=10"):
    run_family("gdn2", impl="chunk", chunk_size=4, cu_seqlens=jnp.asarray([0, 4, 9]), **one)


def test_auto_gives_segment_ids_to_the_kernels(monkeypatch):
  """impl='auto' treats packed calls as unpacked ones (the kernels take segment ids): no warning, the
  segment ids reach `pallas_gated_delta` (its results: tests/test_pallas_segments.py)."""
  import warnings

  import pallas_kernels
  inp = family_inputs(jax.random.PRNGKey(0), "carve", B=1, T=8, H=1, K=16, V=16, dtype=jnp.bfloat16)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
  monkeypatch.setattr(api, "pallas_available", lambda: True)
  called = []
  monkeypatch.setattr(pallas_kernels, "pallas_gated_delta", lambda *a, **kw: called.append(kw) or (
      jnp.zeros((1, 8, 1, 16), jnp.bfloat16), jnp.zeros((1, 1, 16, 16))))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    run_family("carve", impl="auto", chunk_size=16, content_block=16, segment_ids=seg, **inp)
  assert called and np.array_equal(called[0]["segment_ids"], seg)


# -- the model: layers reset at document starts, decoding too ----------------------------------------

from flax import nnx  # noqa: E402

from carve_jax.configs import MIXERS, preset  # noqa: E402
from carve_jax.model import LM, decode_step, init_cache  # noqa: E402
from test_model import scramble  # noqa: E402

DOCS = (5, 1, 19, 11)  # T = 36, content block 8: the 19-long document crosses two block boundaries
_decode = nnx.jit(decode_step)


def _model(mixer, **kw):
  cfg = preset("tiny", mixer=mixer, impl="chunk", content_block=8, chunk_size=8, n_layers=1, **kw)
  return scramble(LM(cfg, rngs=nnx.Rngs(0)))


def _doc_tokens(seed=3):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (2, sum(DOCS))), jnp.int32)


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_packed_row_equals_documents_alone(mixer):
  """Every layer (conv taps, state, content blocks, attention mask, RoPE) restarts at a start."""
  model = _model(mixer)
  tokens = _doc_tokens()
  seg = jnp.asarray(np.repeat(np.arange(len(DOCS)), DOCS)[None].repeat(2, 0), jnp.int32)
  run = nnx.jit(lambda m, t, s: m(t, s))
  packed, mixed = run(model, tokens, seg), run(model, tokens, None)
  # The documents alone, as one batch: each padded at its end (causal: earlier logits unchanged).
  bounds = np.cumsum((0,) + DOCS)
  docs = [np.pad(np.asarray(tokens[b, s:e]), (0, max(DOCS) - (e - s)), constant_values=7)
          for s, e in zip(bounds[:-1], bounds[1:]) for b in range(2)]
  out = run(model, jnp.asarray(np.stack(docs)), None)
  alone = jnp.stack([jnp.concatenate([out[2 * i + b, :L] for i, L in enumerate(DOCS)]) for b in range(2)])
  assert rel_err(packed, alone) < TOL[jnp.float32].out
  assert rel_err(mixed, alone) > 1e-3  # without segment ids the documents do mix


@pytest.mark.parametrize("mixer", ["carve", "gdn", "attention"])
def test_decode_with_new_documents_matches_packed_forward(mixer):
  """decode_step(new_document=...) on two rows with different cuts == model(tokens, segment_ids)."""
  model = _model(mixer)
  tokens = _doc_tokens()
  rows = [DOCS, (12, 3, 21)]
  seg = jnp.asarray([np.repeat(np.arange(len(r)), r) for r in rows], jnp.int32)
  ref = model(tokens, seg)
  starts = ops.document_starts(seg)
  cache = init_cache(model, 2, max_len=tokens.shape[1])
  outs = []
  for t in range(tokens.shape[1]):
    logits, cache = _decode(model, tokens[:, t], cache, new_document=starts[:, t])
    outs.append(logits)
  assert rel_err(jnp.stack(outs, 1), ref) < TOL[jnp.float32].out


def test_model_rejects_bad_segment_ids():
  model = _model("gdn2")
  with pytest.raises(ValueError, match="`segment_ids`"):
    model(_doc_tokens(), jnp.zeros((2, 5), jnp.int32))


# -- data and training: windows carry document ids, the loss passes them ------------------------------

import optax  # noqa: E402

from carve_jax.data import make_batches  # noqa: E402
from carve_jax.train.config import DataConfig, TrainConfig, identity_diff  # noqa: E402
from carve_jax.train.step import lm_loss  # noqa: E402


def test_pipeline_emits_document_ids_that_start_at_each_eos():
  eos = 0
  rng = np.random.default_rng(2)
  stream = rng.integers(1, 50, 4001).astype(np.uint16)
  stream[rng.choice(4001, 150, replace=False)] = eos
  stream[[16, 17, 40]] = eos  # adjacent EOS: a document holding only its EOS
  T = 32
  batches = make_batches(stream, seq_len=T, batch_size=4, seed=0, shuffle=False, eos_id=eos, num_epochs=1)
  n = 0
  for batch in batches:
    seg = batch["segment_ids"]
    assert seg.shape == batch["inputs"].shape and seg.dtype == np.int32
    for row_in, row_seg in zip(batch["inputs"], seg):
      want = np.cumsum(row_in == eos)  # reference written out: a new id exactly at each EOS input
      np.testing.assert_array_equal(row_seg, want)
      starts = np.asarray(ops.document_starts(row_seg[None]))[0]
      np.testing.assert_array_equal(starts[1:], row_in[1:] == eos)
    n += 1
  assert n == (4000 // T) // 4
  first = next(make_batches(stream, seq_len=T, batch_size=4, seed=0, shuffle=False))
  assert set(first) == {"inputs", "targets"}  # without eos_id: no document ids
  with pytest.raises(ValueError, match="eos_id"):
    make_batches(stream, seq_len=T, batch_size=4, seed=0, eos_id=-1)


def test_reset_documents_is_on_by_default_and_part_of_the_run_identity():
  assert DataConfig().reset_documents is True
  with pytest.raises(ValueError, match="reset_documents"):
    DataConfig(reset_documents=1)
  a, b = TrainConfig(), TrainConfig(data=DataConfig(reset_documents=False))
  assert any("reset_documents" in d for d in identity_diff(a.to_dict(), b.to_dict()))


def test_lm_loss_passes_segment_ids_to_the_model():
  model = _model("gdn2")
  tokens = _doc_tokens()
  seg = jnp.asarray(np.repeat(np.arange(len(DOCS)), DOCS)[None].repeat(2, 0), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)
  loss = nnx.jit(lm_loss)
  want = optax.softmax_cross_entropy_with_integer_labels(nnx.jit(lambda m: m(tokens, seg))(model), targets).mean()
  got = loss(model, {"inputs": tokens, "targets": targets, "segment_ids": seg})
  plain = loss(model, {"inputs": tokens, "targets": targets})
  assert float(jnp.abs(got - want)) < TOL[jnp.float32].rounding and float(jnp.abs(got - plain)) > 1e-4
