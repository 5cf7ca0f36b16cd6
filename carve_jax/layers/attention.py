r"""Softmax attention baseline: causal multi-head attention with rotary position embeddings.

    q, k, v = rope(W_q x), rope(W_k x), W_v x         per head, K = head_dim
    o_t     = sum_{s<=t} softmax_s(q_t . k_s / sqrt(K)) v_s,      y = W_o o

The parallel form calls `jax.nn.dot_product_attention` with the cuDNN implementation on a GPU when
the compute dtype is bf16/fp16 (cuDNN's flash attention has no fp32 path), XLA elsewhere; odd
lengths are padded by one position for cuDNN.
RoPE rotates channel pairs (i, i + K/2) by angle pos * theta^(-2i/K) (the GPT-NeoX / Llama layout).

Sliding window (`cfg.attention_window` = W tokens, None = full causal): token t attends to
s in (t - W, t], through cuDNN's sliding window or XLA's window mask (`local_window_size`).
Packed documents (`segment_ids` [B, T]): a document mask (no attention across a start) and RoPE
positions that restart at 0 in each document. `jax.nn.dot_product_attention` takes no segment ids, so
the mask goes in as a boolean [B, 1, T, T] array: cuDNN adds it as a constant bias (no bias gradient)
inside its fused kernel, which keeps no [B, H, T, T] scores; XLA's path (CPU, fp32) materialises them.
(The cuDNN packed call has not yet run on a GPU: `tests/test_layers.py::test_cudnn_packed_attention_matches_xla`.)

Decoding keeps a KV ring buffer of L = min(W, max_len) positions (max_len without a window):
position p lives in slot p % L; a slot is attended to when it holds a position <= pos that
lies in the row's current document (and, by construction, in the window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from carve_jax.configs import ModelConfig
from carve_jax.layers.dense import compute_dtype, dense
from carve_jax.ops.segments import document_numbers, document_positions


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x: [B, T, H, K]; positions: [T] or [B, T] int -> rotated x (angles in float32)."""
  K = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)  # [K/2]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, K/2]
  if ang.ndim == 2:
    ang = ang[None]
  cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_implementation(dtype, head_dim: int) -> str:
  """"cudnn" on a GPU for 16-bit inputs and head_dim a multiple of 8 up to 128, "xla" otherwise."""
  if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return "xla"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None,
                     segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal softmax attention, q, k, v: [B, T, H, K] -> [B, T, H, K].

  window: attend to the last `window` tokens (self included) only; None = all earlier tokens.
  segment_ids: optional int [B, T]; no attention across a document start (a [B, 1, T, T] mask).
  cuDNN's fused kernel rejects odd sequence lengths in training (seen on an H100 with T = 255), so
  an odd T gets one padding position at the end; causality keeps it out of every real row.
  """
  impl = attention_implementation(q.dtype, q.shape[-1])
  T = q.shape[1]
  if impl == "cudnn" and T % 2:
    q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, 1)), mode="edge")
  mask = None
  if segment_ids is not None:
    d = document_numbers(segment_ids)
    mask = (d[:, :, None] == d[:, None, :])[:, None]               # [B, 1, T, T]
  local = None if window is None else (window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local,
                                      implementation=impl)[:, :T]


class Attention(nnx.Module):
  """Causal softmax attention with RoPE; q/k/v/o projections without bias."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, HK = cfg.d_model, cfg.n_heads * cfg.head_k
    self.q_proj = dense(d, HK, cfg, rngs=rngs)
    self.k_proj = dense(d, HK, cfg, rngs=rngs)
    self.v_proj = dense(d, HK, cfg, rngs=rngs)
    self.o_proj = dense(HK, d, cfg, rngs=rngs)

  def _qkv(self, x, positions):
    H = self.cfg.n_heads
    q, k, v = (p(x).reshape(*x.shape[:-1], H, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
    return rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta), v

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Parallel causal form. x: [B, T, d_model] -> [B, T, d_model]; segment_ids: optional int
    [B, T], packed documents (document mask, RoPE positions restart)."""
    positions = jnp.arange(x.shape[1]) if segment_ids is None else document_positions(segment_ids)
    q, k, v = self._qkv(x, positions)
    o = causal_attention(q, k, v, window=self.cfg.attention_window, segment_ids=segment_ids)
    return self.o_proj(o.reshape(*x.shape[:-1], -1))

  def cache_len(self, max_len: int) -> int:
    """Slots of the KV ring buffer: min(attention_window, max_len), max_len without a window."""
    W = self.cfg.attention_window
    return max_len if W is None else min(W, max_len)

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """KV ring buffer: k, v [B, cache_len(max_len), H, K] zeros in the compute dtype."""
    shape = (batch_size, self.cache_len(max_len), self.cfg.n_heads, self.cfg.head_k)
    dt = compute_dtype(self.cfg)
    return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))

  def prefill(self, x: jax.Array, max_len: int) -> tuple[jax.Array, dict]:
    """x: [B, T, d_model] -> (y [B, T, d_model], cache holding positions max(0, T-L)..T-1); T <= max_len."""
    B, T, _ = x.shape
    if T > max_len:
      raise ValueError(f"Attention.prefill: sequence length {T} exceeds the cache length max_len={max_len}")
    q, k, v = self._qkv(x, jnp.arange(T))
    o = causal_attention(q, k, v, window=self.cfg.attention_window)
    cache = self.init_cache(B, max_len)
    L = cache["k"].shape[1]
    kept = jnp.arange(max(T - L, 0), T)                               # the positions the ring buffer holds
    slots = kept % L
    cache = dict(k=cache["k"].at[:, slots].set(k[:, kept].astype(cache["k"].dtype)),
                 v=cache["v"].at[:, slots].set(v[:, kept].astype(cache["v"].dtype)))
    return self.o_proj(o.reshape(B, T, -1)), cache

  def step(self, x: jax.Array, cache: dict, pos: jax.Array, doc_pos: jax.Array | None = None
           ) -> tuple[jax.Array, dict]:
    """One token at position `pos` (int32 scalar; < max_len without a window).

    doc_pos: optional int32 [B], the token's position inside its document (default pos): RoPE
    uses it and slots before the document's start are masked.
    x: [B, d_model] -> (y [B, d_model], cache).
    """
    B = x.shape[0]
    doc_pos = jnp.broadcast_to(pos, (B,)) if doc_pos is None else doc_pos
    q, k, v = self._qkv(x[:, None], doc_pos[:, None])
    L = cache["k"].shape[1]
    slot = pos % L
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), slot, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), slot, axis=1)
    held = pos - (pos - jnp.arange(L)) % L                            # [L]: the position each slot holds
    mask = (held[None] >= 0) & (held[None] >= (pos - doc_pos)[:, None])  # [B, L]: written, same document
    o = jax.nn.dot_product_attention(q, ck, cv, mask=mask[:, None, None, :], implementation="xla")
    return self.o_proj(o.reshape(B, -1)), dict(k=ck, v=cv)
