r"""Softmax attention baseline: causal multi-head attention with rotary position embeddings.

    q, k, v = rope(W_q x), rope(W_k x), W_v x         per head, K = head_dim
    o_t     = sum_{s<=t} softmax_s(q_t . k_s / sqrt(K)) v_s,      y = W_o o

The parallel form calls `jax.nn.dot_product_attention` with the cuDNN implementation on a GPU when
the compute dtype is bf16/fp16 (cuDNN's flash attention has no fp32 path), XLA elsewhere; odd
lengths are padded by one position for cuDNN. Decoding
keeps a KV cache of `max_len` positions and masks the unwritten ones.
RoPE rotates channel pairs (i, i + K/2) by angle pos * theta^(-2i/K) (the GPT-NeoX / Llama layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from carve_jax.configs import ModelConfig
from carve_jax.layers.dense import compute_dtype, dense


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


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal softmax attention, q, k, v: [B, T, H, K] -> [B, T, H, K].

  cuDNN's fused kernel rejects odd sequence lengths in training (seen on an H100 with T = 255), so
  an odd T gets one padding position at the end; causality keeps it out of every real row.
  """
  impl = attention_implementation(q.dtype, q.shape[-1])
  T = q.shape[1]
  if impl == "cudnn" and T % 2:
    q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)[:, :T]


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

  def __call__(self, x: jax.Array) -> jax.Array:
    """Parallel causal form. x: [B, T, d_model] -> [B, T, d_model]."""
    q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
    o = causal_attention(q, k, v)
    return self.o_proj(o.reshape(*x.shape[:-1], -1))

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """KV cache: k, v [B, max_len, H, K] zeros in the compute dtype."""
    shape = (batch_size, max_len, self.cfg.n_heads, self.cfg.head_k)
    dt = compute_dtype(self.cfg)
    return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))

  def prefill(self, x: jax.Array, max_len: int) -> tuple[jax.Array, dict]:
    """x: [B, T, d_model] -> (y [B, T, d_model], cache with positions 0..T-1 written); T <= max_len."""
    B, T, _ = x.shape
    if T > max_len:
      raise ValueError(f"Attention.prefill: sequence length {T} exceeds the cache length max_len={max_len}")
    q, k, v = self._qkv(x, jnp.arange(T))
    o = causal_attention(q, k, v)
    cache = self.init_cache(B, max_len)
    cache = dict(k=cache["k"].at[:, :T].set(k), v=cache["v"].at[:, :T].set(v))
    return self.o_proj(o.reshape(B, T, -1)), cache

  def step(self, x: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
    """One token at position `pos` (int32 scalar, < max_len). x: [B, d_model] -> (y [B, d_model], cache)."""
    B = x.shape[0]
    q, k, v = self._qkv(x[:, None], jnp.reshape(pos, (1,)))
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, axis=1)
    mask = (jnp.arange(ck.shape[1]) <= pos)[None, None, None, :]  # [1, 1, 1, L]: written positions
    o = jax.nn.dot_product_attention(q, ck, cv, mask=mask, implementation="xla")
    return self.o_proj(o.reshape(B, -1)), dict(k=ck, v=cv)
