r"""Decoder-only language model over any token mixer of the family, and its decoding cache.

    h_0 = embed(tokens)                                      residual stream in float32
    h_l = h_{l-1} + mixer_l(rmsnorm(h_{l-1}));  h_l += mlp_l(rmsnorm(h_l))     (pre-norm blocks)
    logits = head(rmsnorm(h_L))      head = W_out, or embed^T when tie_embeddings

Block stack: `cfg.scan_layers=False` holds one `Block` per layer (`model.blocks[i]`); True holds one
`Block` whose every parameter has a leading [n_layers] axis (the same layers, stacked) and runs the
layers with one `lax.scan` (compile time independent of depth). `convert_layout` turns one layout
into the other; both compute the same function. `cfg.remat_mode` puts each block under
`jax.checkpoint` with the policy `remat_policy(cfg)`.

Decoding keeps a cache pytree {"pos": int32 [], "doc_start": int32 [B], "layers": [one dict per
block]}: for a delta mixer the state [B, H, K, V] (float32), the conv tails [B, W-1, H*K] of q, k, v
and, for CARVE, the content vector [B, H, K]; for attention a KV ring buffer [B, L, H, K]. "pos"
counts the tokens seen, "doc_start" where each row's current document began (`decode_step(...,
new_document=)` moves it; every layer then starts that row afresh). Decoding token by token
reproduces the parallel forward's logits, packed rows (`model(tokens, segment_ids)`) included.
With scan_layers, "layers" is one such dict whose leaves have a leading [n_layers] axis.

    model = LM(preset("tiny"), rngs=nnx.Rngs(0))
    logits = model(tokens)                          # [B, T] int32 -> [B, T, vocab] float32
    out = generate(model, prompt, 32, rng=jax.random.key(0), temperature=0.8, top_k=40)
    param_count(abstract_model(preset("1.3b")))     # exact, allocates nothing
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from carve_jax.configs import ModelConfig
from carve_jax.layers.attention import Attention
from carve_jax.layers.delta import DeltaMixer
from carve_jax.layers.dense import compute_dtype, dense
from carve_jax.layers.mlp import SwiGLU
from carve_jax.layers.norms import RMSNorm

_F32 = jnp.float32

# Primitives whose outputs "save_mixer_outputs" keeps: the Pallas recurrence kernels (their outputs
# are the recurrence's outputs and the residuals of its custom_vjp) and cuDNN's fused attention.
KERNEL_PRIMITIVES = frozenset({"pallas_call", "dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"})
MIXER_OUT = "mixer_out"  # `checkpoint_name` of each block's mixer output


def _save_mixer_outputs(prim, *_, **params) -> bool:
  if prim.name in KERNEL_PRIMITIVES:
    return True
  return prim.name == "name" and params.get("name") == MIXER_OUT  # jax.ad_checkpoint.checkpoint_name


def remat_policy(cfg: ModelConfig):
  """(rematerialise?, jax.checkpoint policy) of `cfg.remat_mode`:

  "none" -> no jax.checkpoint; "full" -> nothing saved but the block input (policy None);
  "dots_saveable" -> `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`;
  "save_mixer_outputs" -> outputs of `KERNEL_PRIMITIVES` and of each block's mixer (`MIXER_OUT`);
  "save_dots_and_mixer" -> both of the last two: only elementwise work (norms, conv, gates, SiLU) is
  recomputed.
  """
  mode = cfg.remat_mode
  if mode == "none":
    return False, None
  return True, {"full": None, "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "save_mixer_outputs": _save_mixer_outputs,
                "save_dots_and_mixer": jax.checkpoint_policies.save_from_both_policies(
                    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save_mixer_outputs)}[mode]


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then + mlp(norm(.)). Residual in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cdt = compute_dtype(cfg)
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cdt)
    self.mixer = Attention(cfg, rngs=rngs) if cfg.mixer == "attention" else DeltaMixer(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cdt)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def _mlp(self, h):
    return h + self.mlp(self.mlp_norm(h)).astype(_F32)

  def __call__(self, h: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """h: [B, T, d_model] float32 -> same; segment_ids: optional int [B, T] (packed documents)."""
    y = checkpoint_name(self.mixer(self.mixer_norm(h), segment_ids), MIXER_OUT)
    return self._mlp(h + y.astype(_F32))

  def prefill(self, h, max_len):
    if isinstance(self.mixer, Attention):
      y, cache = self.mixer.prefill(self.mixer_norm(h), max_len)
    else:
      y, cache = self.mixer.prefill(self.mixer_norm(h))
    return self._mlp(h + y.astype(_F32)), cache

  def step(self, h, cache, pos, doc_pos=None):
    y, cache = self.mixer.step(self.mixer_norm(h), cache, pos, doc_pos)
    return self._mlp(h + y.astype(_F32)), cache


class LM(nnx.Module):
  """Decoder LM. `LM(cfg, rngs=nnx.Rngs(seed))`; `model(tokens [B, T] int) -> logits [B, T, vocab] f32`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise ValueError(f"LM: argument `cfg` must be a ModelConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    cdt = compute_dtype(cfg)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cdt, param_dtype=_F32,
                           embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    layers = [Block(cfg.layer_config(m), rngs=rngs) for m in cfg.layer_mixers]
    if not cfg.scan_layers:
      self.blocks = nnx.List(layers)
    elif len(cfg.pattern) == 1:
      self.blocks = _stack(layers)
    else:  # position p of the pattern: layers p, p + P, p + 2P, ... stacked
      P = len(cfg.pattern)
      self.blocks = nnx.List([_stack(layers[p::P]) for p in range(P)])
    del layers
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cdt)
    self.head = None if cfg.tie_embeddings else dense(cfg.d_model, cfg.vocab_size, cfg, rngs=rngs)

  def _embed(self, tokens):
    # Gather from the float32 table, then round: the same values as nnx.Embed's (round the table,
    # gather), but the backward is a float32 scatter-add (a bfloat16 one adds thousands of
    # repeated-token rows in bfloat16) and the table is not cast whole every step.
    table = self.embed.embedding[...]
    return jnp.take(table, tokens, axis=0).astype(compute_dtype(self.cfg)).astype(_F32)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm and head: h [..., d_model] -> logits [..., vocab] float32."""
    x = self.norm(h)
    out = self.embed.attend(x) if self.head is None else self.head(x)
    return out.astype(_F32)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens: int [B, T] -> logits float32 [B, T, vocab].

    segment_ids: optional int [B, T], packed documents: a document begins where the id changes
    and no layer carries anything across it (`carve_jax.ops.segments`).
    """
    _check_tokens("LM", tokens, 2)
    _check_segment_ids("LM", segment_ids, tokens.shape)
    h = self._embed(tokens)
    remat, policy = remat_policy(self.cfg)
    call = nnx.remat(Block.__call__, policy=policy, prevent_cse=not self.cfg.scan_layers) if remat else Block.__call__
    h, _ = _scan_blocks(self, lambda block, h, _: (call(block, h, segment_ids), None), h)
    return self.logits(h)


def _stack(layers: list[Block]) -> Block:
  """One Block whose parameters have a leading [len(layers)] axis. The layers are drawn first, in
  the unrolled order, so both layouts start from the same parameters for a seed (eager `nnx.vmap`
  init, the textbook way, was 2x slower to run)."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in layers])
  return nnx.merge(nnx.graphdef(layers[0]), stacked)


def _positions(model: "LM") -> list[Block]:
  """Scanned layout: the stacked Block of each position of the pattern."""
  return [model.blocks] if len(model.cfg.pattern) == 1 else list(model.blocks)


def _scan_blocks(model: "LM", fn, h, xs=None):
  """Runs fn(block, h, x) -> (h, y) over the layers in order, in either layout; returns (h, ys).

  Unrolled: xs and ys are lists, one entry per layer. Scanned: one `lax.scan` over the repeats of
  the pattern (P positions, each a stacked Block): xs and ys are one pytree stacked on a leading
  [n_layers / P] axis per position (a list of P of them for a hybrid, the pytree itself when P = 1).
  """
  if not model.cfg.scan_layers:
    ys = []
    for i, block in enumerate(model.blocks):
      h, y = fn(block, h, None if xs is None else xs[i])
      ys.append(y)
    return h, ys
  blocks = _positions(model)
  P = len(blocks)
  graphdefs = [nnx.graphdef(b) for b in blocks]
  states = [nnx.state(b) for b in blocks]
  xs = [None] * P if xs is None else ([xs] if P == 1 else list(xs))

  def body(h, a):
    ys = []
    for gd, st, x in zip(graphdefs, *a):
      h, y = fn(nnx.merge(gd, st), h, x)
      ys.append(y)
    return h, ys

  h, ys = jax.lax.scan(body, h, (states, xs))
  return h, (ys[0] if P == 1 else ys)


def _check_tokens(fn: str, tokens, ndim: int) -> None:
  if not hasattr(tokens, "shape") or len(tokens.shape) != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
    what = f"{getattr(tokens, 'dtype', type(tokens).__name__)} of shape {getattr(tokens, 'shape', None)}"
    expected = "[B, T]" if ndim == 2 else "[B]"
    raise ValueError(f"{fn}: argument `tokens` must be an integer array of shape {expected}, got {what}")
  if ndim == 2 and tokens.shape[1] < 1:
    raise ValueError(f"{fn}: argument `tokens` must hold at least one token per row, got shape {tokens.shape}")


def _check_segment_ids(fn: str, segment_ids, shape) -> None:
  if segment_ids is None:
    return
  if (not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != tuple(shape)
      or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    what = f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)} of shape {getattr(segment_ids, 'shape', None)}"
    raise ValueError(f"{fn}: argument `segment_ids` must be None or an integer array of shape {tuple(shape)} "
                     f"(the tokens' shape), got {what}")


# -- decoding -------------------------------------------------------------------------------------


def _max_len(model: LM, max_len: int | None) -> int:
  max_len = model.cfg.max_seq_len if max_len is None else max_len
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f"argument `max_len` must be a positive int, got {max_len!r}")
  return max_len


def init_cache(model: LM, batch_size: int, *, max_len: int | None = None) -> dict:
  """The cache before any token: {"pos": 0, "layers": [...]}; `max_len` (attention's KV length)
  defaults to cfg.max_seq_len."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"init_cache: argument `batch_size` must be a positive int, got {batch_size!r}")
  max_len = _max_len(model, max_len)
  one = lambda b: (b.mixer.init_cache(batch_size, max_len) if isinstance(b.mixer, Attention)
                   else b.mixer.init_cache(batch_size))
  if model.cfg.scan_layers:  # a position's layers start from the same zeros: one cache, repeated
    layers = []
    for b in _positions(model):
      graphdef, stacked = nnx.split(b)
      R = jax.tree.leaves(stacked)[0].shape[0]
      first = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], stacked))
      layers.append(jax.tree.map(lambda x, R=R: jnp.broadcast_to(x, (R, *x.shape)), one(first)))
    layers = layers[0] if len(layers) == 1 else layers
  else:
    layers = [one(b) for b in model.blocks]
  return dict(pos=jnp.zeros((), jnp.int32), doc_start=jnp.zeros((batch_size,), jnp.int32), layers=layers)


def prefill(model: LM, tokens: jax.Array, *, max_len: int | None = None) -> tuple[jax.Array, dict]:
  """Parallel forward over a prompt (one document per row) that also builds the cache.

  tokens: int [B, P] -> (logits float32 [B, P, vocab], cache with pos = P).
  """
  _check_tokens("prefill", tokens, 2)
  max_len = _max_len(model, max_len)
  h = model._embed(tokens)
  h, layers = _scan_blocks(model, lambda block, h, _: block.prefill(h, max_len), h)
  return model.logits(h), dict(pos=jnp.asarray(tokens.shape[1], jnp.int32),
                               doc_start=jnp.zeros((tokens.shape[0],), jnp.int32), layers=layers)


def decode_step(model: LM, tokens: jax.Array, cache: dict, *, new_document: jax.Array | None = None
                ) -> tuple[jax.Array, dict]:
  """One token per row at position cache["pos"].

  tokens: int [B] -> (logits float32 [B, vocab], cache advanced by one). new_document: optional
  bool [B]; where True the token begins a new document: that row continues as from a fresh cache
  (what a packed row's segment start does in the parallel forward). Attention caches without a
  window hold max_len positions; stepping past them is the caller's error (`generate` checks it).
  """
  _check_tokens("decode_step", tokens, 1)
  pos = cache["pos"]
  doc_start = cache["doc_start"]
  if new_document is not None:
    doc_start = jnp.where(jnp.asarray(new_document, bool), pos, doc_start)
  doc_pos = pos - doc_start
  h = model._embed(tokens)
  h, layers = _scan_blocks(model, lambda block, h, c: block.step(h, c, pos, doc_pos), h, cache["layers"])
  return model.logits(h), dict(pos=pos + 1, doc_start=doc_start, layers=layers)


def _sample(logits, rng, temperature, top_k):
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "temperature", "top_k"))
def _generate(graphdef, state, prompt, rng, *, max_new_tokens, max_len, temperature, top_k):
  model = nnx.merge(graphdef, state)
  logits, cache = prefill(model, prompt, max_len=max_len)
  rng, sub = jax.random.split(rng)
  first = _sample(logits[:, -1], sub, temperature, top_k)

  def body(carry, _):
    tok, cache, rng = carry
    rng, sub = jax.random.split(rng)
    logits, cache = decode_step(model, tok, cache)
    nxt = _sample(logits, sub, temperature, top_k)
    return (nxt, cache, rng), nxt

  _, rest = jax.lax.scan(body, (first, cache, rng), None, length=max_new_tokens - 1)
  return jnp.concatenate([prompt.astype(jnp.int32), first[:, None], rest.T], axis=1)


def generate(model: LM, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array, temperature: float = 1.0,
             top_k: int | None = None) -> jax.Array:
  """Samples `max_new_tokens` tokens after `prompt` (int [B, P], P >= 1) -> int32 [B, P + N].

  The prompt is prefilled in parallel, then tokens are decoded one at a time from the cache
  (one jitted program). temperature 0 is greedy; top_k keeps the k most likely tokens.
  """
  _check_tokens("generate", prompt, 2)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"generate: argument `max_new_tokens` must be an int >= 0, got {max_new_tokens!r}")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"generate: argument `temperature` must be a float >= 0 (0 = greedy), got {temperature!r}")
  V = model.cfg.vocab_size
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= V):
    raise ValueError(f"generate: argument `top_k` must be None or an int in [1, {V}], got {top_k!r}")
  P = prompt.shape[1]
  if max_new_tokens == 0:
    return jnp.asarray(prompt, jnp.int32)
  max_len = P + max_new_tokens
  if "attention" in model.cfg.mixer_kinds and max_len > model.cfg.max_seq_len:
    raise ValueError(f"generate: prompt length + max_new_tokens = {max_len} exceeds the attention model's "
                     f"max_seq_len={model.cfg.max_seq_len}")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt), rng, max_new_tokens=max_new_tokens, max_len=max_len,
                   temperature=float(temperature), top_k=top_k)


# -- layouts --------------------------------------------------------------------------------------


def convert_blocks(blocks: dict, n_layers: int, *, scan_layers: bool) -> dict:
  """A pure dict of the blocks' variables in one layout -> the other.

  unrolled {0: tree, 1: tree, ...} <-> stacked tree (each leaf [n_layers, ...]); a dict already in
  the requested layout is returned as is.
  """
  stacked = not all(isinstance(k, int) for k in blocks)
  if stacked == scan_layers:
    return blocks
  if scan_layers:
    if sorted(blocks) != list(range(n_layers)):
      raise ValueError(f"convert_blocks: argument `blocks` must hold layers 0..{n_layers - 1}, got {sorted(blocks)}")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(n_layers)])
  for x in jax.tree.leaves(blocks):
    if x.shape[:1] != (n_layers,):
      raise ValueError(f"convert_blocks: argument `blocks` must have a leading axis of n_layers={n_layers} on "
                       f"every leaf, got a leaf of shape {x.shape}")
  return {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n_layers)}


def convert_layout(model: LM, *, scan_layers: bool) -> LM:
  """The same model (the same parameters, the same function) with `cfg.scan_layers` set as asked:
  the blocks stacked for a scan, or one module per layer. Nothing is initialised at random."""
  cfg = model.cfg
  if cfg.scan_layers == scan_layers:
    return model
  graphdef, target = nnx.split(abstract_model(cfg.replace(scan_layers=scan_layers)))
  state = nnx.to_pure_dict(nnx.state(model))
  P, L = len(cfg.pattern), cfg.n_layers
  if P == 1:
    state["blocks"] = convert_blocks(state["blocks"], L, scan_layers=scan_layers)
  elif scan_layers:  # layer r * P + p -> position p, repeat r
    state["blocks"] = {p: convert_blocks({r: state["blocks"][r * P + p] for r in range(L // P)}, L // P,
                                         scan_layers=True) for p in range(P)}
  else:
    per = {p: convert_blocks(state["blocks"][p], L // P, scan_layers=False) for p in range(P)}
    state["blocks"] = {r * P + p: per[p][r] for r in range(L // P) for p in range(P)}
  nnx.replace_by_pure_dict(target, state)
  return nnx.merge(graphdef, target)


# -- parameter counts ----------------------------------------------------------------------------


def abstract_model(cfg: ModelConfig) -> LM:
  """The model with shape-only parameters (`nnx.eval_shape`): nothing is allocated or computed."""
  return nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))


def _param_sizes(model: LM):
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    keys = [getattr(p, "key", getattr(p, "idx", getattr(p, "name", None))) for p in path]
    yield [k for k in keys if k is not None], math.prod(leaf.shape)


def _kind(keys) -> tuple[str, str]:
  """(module kind, finer name) of a parameter path."""
  if keys[0] != "blocks":
    return ("norm" if keys[0] == "norm" else keys[0]), keys[0]
  rest = keys[2:] if isinstance(keys[1], int) else keys[1:]  # blocks, [i,] sub, ...  (i absent when stacked)
  sub = rest[0]
  if sub in ("mixer_norm", "mlp_norm"):
    return "norm", sub
  return sub, f"{sub}.{rest[1]}"


def param_count(model: LM) -> dict[str, int]:
  """Parameters per module kind ("embed", "mixer", "mlp", "norm", "head" when untied) and "total".

  Works on an abstract model (`abstract_model(cfg)`), so a 1.3B count costs no memory.
  """
  counts: dict[str, int] = {}
  for keys, n in _param_sizes(model):
    kind = _kind(keys)[0]
    counts[kind] = counts.get(kind, 0) + n
  counts["total"] = sum(counts.values())
  return counts


def mixer_param_count(model: LM) -> dict[str, int]:
  """Token-mixer parameters per mixer kind, e.g. {"carve": ..., "attention": ...} of a hybrid."""
  cfg = model.cfg
  blocks = list(model.blocks) if not cfg.scan_layers else _positions(model)
  kinds = list(cfg.layer_mixers) if not cfg.scan_layers else list(cfg.pattern)
  counts: dict[str, int] = {}
  for kind, block in zip(kinds, blocks):
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(block.mixer, nnx.Param)))
    counts[kind] = counts.get(kind, 0) + n
  return counts


def param_breakdown(model: LM) -> dict[str, int]:
  """Parameters per named submodule summed over layers, e.g. "mixer.w_proj", "mlp.up_proj", "embed"."""
  counts: dict[str, int] = {}
  for keys, n in _param_sizes(model):
    name = _kind(keys)[1]
    counts[name] = counts.get(name, 0) + n
  return counts
