"""Sliding-window attention (`ModelConfig.attention_window`): the windowed layer equals full attention
under an explicit window mask, and decoding from the KV ring buffer reproduces the parallel forward
(the buffer wraps several times; prefill longer than the window; packed rows too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from carve_jax import ops
from carve_jax.configs import ModelConfig, preset
from carve_jax.layers.attention import causal_attention
from carve_jax.model import LM, decode_step, init_cache
from conftest import TOL, rel_err
from test_model import assert_decode_matches_forward, scramble

T, W = 30, 7
_decode = nnx.jit(decode_step)


def _qkv(seed=0, B=2, H=2, K=8):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(k, (B, T, H, K), jnp.float32) for k in ks]


def _masked_reference(q, k, v, mask):
  """softmax(q k^T / sqrt(K)) v under a boolean mask [B or 1, T, T], in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(mask)[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", p, v)


def test_windowed_attention_equals_masked_full_attention():
  q, k, v = _qkv()
  t = np.arange(T)
  window = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < W)
  assert rel_err(causal_attention(q, k, v, window=W), _masked_reference(q, k, v, window[None])) < TOL[jnp.float32].out
  # The window changes the result (else the test could not fail) and None is full causal.
  causal = t[None, :] <= t[:, None]
  assert rel_err(causal_attention(q, k, v), _masked_reference(q, k, v, causal[None])) < TOL[jnp.float32].out
  assert rel_err(causal_attention(q, k, v, window=W), causal_attention(q, k, v)) > 1e-2
  # With packed documents the window and the document mask combine.
  seg = jnp.asarray(np.repeat([[0, 1, 2]], [4, 15, 11], axis=1).repeat(2, 0), jnp.int32)
  d = np.asarray(ops.document_numbers(seg))
  both = window[None] & (d[:, :, None] == d[:, None, :])
  got = causal_attention(q, k, v, window=W, segment_ids=seg)
  assert rel_err(got, _masked_reference(q, k, v, both)) < TOL[jnp.float32].out


def _model(window, **kw):
  cfg = preset("tiny", mixer="attention", n_layers=2, attention_window=window, max_seq_len=64, **kw)
  return scramble(LM(cfg, rngs=nnx.Rngs(0)))


def _tokens():
  return jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, T)), jnp.int32)


@pytest.mark.parametrize("window", [W, 1, T + 5])
def test_windowed_decode_matches_parallel_forward(window):
  model = _model(window)
  tokens = _tokens()
  cache = init_cache(model, 2, max_len=T)
  assert cache["layers"][0]["k"].shape[1] == min(window, T)  # the ring buffer keeps the window only
  # prefills shorter than, equal to and longer than the window
  assert_decode_matches_forward(model, tokens, model(tokens), (3, W, 17))


def test_windowed_decode_with_new_documents_matches_packed_forward():
  model = _model(W)
  tokens = _tokens()
  seg = jnp.asarray([np.repeat([0, 1, 2], [4, 15, 11]), np.repeat([0, 1], [20, 10])], jnp.int32)
  ref = model(tokens, seg)
  starts = ops.document_starts(seg)
  cache = init_cache(model, 2, max_len=T)
  outs = []
  for t in range(T):
    logits, cache = _decode(model, tokens[:, t], cache, new_document=starts[:, t])
    outs.append(logits)
  assert rel_err(jnp.stack(outs, 1), ref) < TOL[jnp.float32].out


def test_attention_window_is_validated():
  with pytest.raises(ValueError, match="`attention_window`"):
    ModelConfig(mixer="attention", attention_window=0)


@pytest.mark.gpu
def test_cudnn_sliding_window_matches_xla():
  """On a GPU, bf16: the cuDNN sliding window (what the layer picks) equals XLA's window mask."""
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(B=2, H=2, K=64))
  got = causal_attention(q, k, v, window=W)  # cudnn: bf16, head_dim 64
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(W - 1, 0), implementation="xla")
  assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) < TOL[jnp.bfloat16].rounding
  full = causal_attention(q, k, v)
  assert rel_err(got.astype(jnp.float32), full.astype(jnp.float32)) > 5e-2
