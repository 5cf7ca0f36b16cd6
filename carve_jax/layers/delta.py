r"""The delta-rule token mixer: one nnx layer for GDN, KDA, GDN-2 and CARVE (the row `variant` is static).

Structure of flash-linear-attention 0.6.0's `GatedDeltaNet2` layer (spec, CARVE.md):

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))    short causal conv, width 4
    q, k    = l2norm(q), l2norm(k)                                        per head
    g       = -exp(A_log_h) * softplus(f(x) + dt_bias)                   log decay, float32
    o       = delta_rule(q, k, v, g, erase, write)                        `carve_jax.ops`
    y       = W_o [ rmsnorm(o) * sigmoid(W_g2 W_g1 x + b_g) ]             per head, then heads joined
              (cfg.output_gate "full_swish" / "full_sigmoid": rmsnorm(o) * act(W_g x), FLA's GatedDeltaNet)

with, per variant (H heads, K = V = head_dim, x in R^d; the rows of `carve_jax.ops.variants`, whose
fields `decay`, `erase`, `write`, `extra_params` this layer reads):

| variant | decay f(x)                  | erase b                          | write w                 |
|---------|-----------------------------|----------------------------------|-------------------------|
| gdn     | W_a x in R^H (per head)     | beta = sigmoid(W_beta x) in R^H  | beta                    |
| kda     | W_f2 W_f1 x in R^{HK}       | beta                             | beta                    |
| gdn2    | W_f2 W_f1 x                 | sigmoid(W_b x) in R^{HK}         | sigmoid(W_w x) in R^{HV}|
| carve   | W_f2 W_f1 x                 | sigmoid(W_b x + gamma_h c_n)     | beta                    |

CARVE keeps GDN-2's erase projection and replaces the d x HV write projection by beta (d x H) and
gamma [H] (init 0), and hands the erase *logits* to `carve_jax.ops.carve`. W_f1, W_g1 have rank
`cfg.rank` (head_dim by default; FLA uses head_v_dim). GDN's decay follows FLA's GatedDeltaNet
(a full d x H projection, dt_bias per head); its output gate is the family's sigmoid gate.
The decay g is float32; the gates are sigmoids taken in float32 and stored in the compute dtype
(FLA keeps them in the activation dtype), so with float32 compute CARVE at gamma = 0 hands the
kernel exactly GDN-2's gates.

`op_inputs` and `project_output` are the stages around the recurrence (public, for probes). Three
entry points share them: `__call__` (parallel, from position 0),
`prefill` (parallel, also returns the decode cache) and `step` (one token from the cache).

Packed documents: `__call__(x, segment_ids)` resets everything at a document start (the short
convs see no taps across it, `carve_jax.ops` resets the state and CARVE's content blocks); `step`
takes each row's position inside its document and starts from a fresh state where it is 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from carve_jax import ops
from carve_jax.configs import ModelConfig
from carve_jax.layers.conv import ShortConv
from carve_jax.layers.dense import compute_dtype, dense
from carve_jax.layers.norms import GatedRMSNorm, l2norm
from carve_jax.ops.gates import content_signal
from carve_jax.ops.segments import document_positions
from carve_jax.ops.step import carve_step, gated_delta_step
from carve_jax.ops.variants import Variant, variant

_F32 = jnp.float32


def _dt_bias_init(key, n: int) -> jax.Array:
  """softplus^-1 of dt ~ logUniform(1e-3, 1e-1) clamped at 1e-4 (FLA's init)."""
  u = jax.random.uniform(key, (n,), _F32)
  dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(0.001)) + math.log(0.001)), 1e-4)
  return dt + jnp.log(-jnp.expm1(-dt))


class DeltaMixer(nnx.Module):
  """Token mixer of the delta-rule family; `cfg.mixer` names a row of `carve_jax.ops.variants.VARIANTS`.

  `variant` is that row (static); its fields pick the parameters, the gates and the op.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.variant: Variant = variant(cfg.mixer, "DeltaMixer", "cfg.mixer")
    row = self.variant
    d, H, K = cfg.d_model, cfg.n_heads, cfg.head_k
    V, HK, HV = K, H * K, H * K
    cdt = compute_dtype(cfg)
    self.q_proj = dense(d, HK, cfg, rngs=rngs)
    self.k_proj = dense(d, HK, cfg, rngs=rngs)
    self.v_proj = dense(d, HV, cfg, rngs=rngs)
    self.q_conv = ShortConv(HK, cfg.conv_size, std=cfg.init_std, dtype=cdt, rngs=rngs)
    self.k_conv = ShortConv(HK, cfg.conv_size, std=cfg.init_std, dtype=cdt, rngs=rngs)
    self.v_conv = ShortConv(HV, cfg.conv_size, std=cfg.init_std, dtype=cdt, rngs=rngs)
    # Decay: A_log per head, dt_bias per decay channel.
    a_lo = 0.0 if row.decay == "scalar" else 1.0  # FLA: GDN uniform(0, 16), KDA / GDN-2 uniform(1, 16)
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), _F32, a_lo, 16.0)))
    if row.decay == "scalar":
      self.a_proj = dense(d, H, cfg, rngs=rngs)
      self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), H))
    else:
      self.f_proj1 = dense(d, cfg.rank, cfg, rngs=rngs)
      self.f_proj2 = dense(cfg.rank, HK, cfg, rngs=rngs)
      self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), HK))
    # Erase / write gates (created in this order: the parameter init draws depend on it).
    if row.erase != "beta":  # "gate" / "content_gate": W_b, d x HK
      self.b_proj = dense(d, HK, cfg, rngs=rngs)
    if row.write == "gate":
      self.w_proj = dense(d, HV, cfg, rngs=rngs)
    if row.uses_beta:
      self.beta_proj = dense(d, H, cfg, rngs=rngs)
    for name in row.extra_params:  # CARVE's gamma [H], 0 at init
      setattr(self, name, nnx.Param(jnp.zeros((H,), _F32)))
    # Output: gated RMSNorm per head, then projection.
    if cfg.output_gate == "lowrank_sigmoid":
      self.g_proj1 = dense(d, cfg.rank, cfg, rngs=rngs)
      self.g_proj2 = dense(cfg.rank, HV, cfg, rngs=rngs, bias=True)
    else:
      self.g_proj = dense(d, HV, cfg, rngs=rngs)
    self.o_norm = GatedRMSNorm(V, eps=cfg.norm_eps, dtype=cdt)
    self.o_proj = dense(HV, d, cfg, rngs=rngs)

  # -- shared pieces ---------------------------------------------------------------------------

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.cfg.n_heads, -1)

  def op_inputs(self, x, tails=None, positions=None):
    """x: [B, T, d] -> (dict of the `carve_jax.ops` inputs, each [B, T, H, .], the new conv tails).

    positions: optional int [B, T], each token's position inside its document (packed rows).
    Public so probes and experiments can see exactly what the recurrence receives.
    """
    cfg = self.cfg
    tails = tails or {}
    q, tq = self.q_conv(self.q_proj(x), tails.get("q"), positions)
    k, tk = self.k_conv(self.k_proj(x), tails.get("k"), positions)
    v, tv = self.v_conv(self.v_proj(x), tails.get("v"), positions)
    A = jnp.exp(self.A_log[...])
    row = self.variant
    if row.decay == "scalar":
      g = -A * jax.nn.softplus(self.a_proj(x).astype(_F32) + self.dt_bias[...])  # [B, T, H]
    else:
      f = self.f_proj2(self.f_proj1(x)).astype(_F32) + self.dt_bias[...]
      g = -A[:, None] * jax.nn.softplus(self._heads(f))  # [B, T, H, K]
    inp = dict(q=l2norm(self._heads(q)), k=l2norm(self._heads(k)), v=self._heads(v), g=g)
    cdt = compute_dtype(cfg)
    gate = lambda z: jax.nn.sigmoid(z.astype(_F32)).astype(cdt)  # sigmoid in float32, stored like FLA's gates
    if row.erase == "gate":
      inp["b"] = gate(self._heads(self.b_proj(x)))
    elif row.erase == "content_gate":  # the logits: `ops.carve` adds gamma c_n before the sigmoid
      inp["erase_logits"] = self._heads(self.b_proj(x))
    if row.write == "gate":
      inp["w"] = gate(self._heads(self.w_proj(x)))
    if row.uses_beta:
      inp["beta"] = gate(self.beta_proj(x))
    return inp, dict(q=tq, k=tk, v=tv)

  def _mix(self, inp, initial_state=None, output_final_state=False, segment_ids=None):
    """Runs `carve_jax.ops` on [B, T, H, .] inputs: (o [B, T, H, V], final state or None)."""
    cfg = self.cfg
    kw = dict(initial_state=initial_state, output_final_state=output_final_state, impl=cfg.impl,
              chunk_size=cfg.chunk_size, segment_ids=segment_ids)
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["g"]
    row = self.variant
    if row.content_aware:
      return ops.carve(q, k, v, g, inp["erase_logits"], inp["beta"], self.gamma[...],
                       content_block=cfg.content_block, content_grad=cfg.content_grad, **kw)
    if row.erase == "gate":  # and write "gate" (`Variant` admits no other)
      return ops.gated_delta(q, k, v, g, inp["b"], inp["w"], **kw)
    beta_rule = ops.gdn if row.decay == "scalar" else ops.kda  # b = w = beta
    return beta_rule(q, k, v, g, inp["beta"], **kw)

  def project_output(self, x, o):
    """The layer output from the recurrence output. x: [B, T, d]; o: [B, T, H, V] -> y: [B, T, d]."""
    if self.cfg.output_gate == "lowrank_sigmoid":
      y = self.o_norm(o, self._heads(self.g_proj2(self.g_proj1(x))))
    else:
      z = self._heads(self.g_proj(x)).astype(_F32)
      act = jax.nn.silu(z) if self.cfg.output_gate == "full_swish" else jax.nn.sigmoid(z)
      y = (self.o_norm.normalize(o) * act).astype(self.o_norm.dtype)
    return self.o_proj(y.reshape(*y.shape[:-2], -1))

  # -- entry points ----------------------------------------------------------------------------

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Parallel form from position 0. x: [B, T, d_model] -> [B, T, d_model].

    segment_ids: optional int [B, T], packed documents (`carve_jax.ops.segments`): every part of
    the layer restarts where the id changes.
    """
    positions = None if segment_ids is None else document_positions(segment_ids)
    inp, _ = self.op_inputs(x, positions=positions)
    o, _ = self._mix(inp, segment_ids=segment_ids)
    return self.project_output(x, o)

  def init_cache(self, batch_size: int) -> dict:
    """Cache before any token: state [B, H, K, V] float32 zeros, conv tails [B, W-1, H*K] zeros,
    and for CARVE the content vector [B, H, K]."""
    H, K = self.cfg.n_heads, self.cfg.head_k
    cache = dict(state=jnp.zeros((batch_size, H, K, K), _F32),
                 conv=dict(q=self.q_conv.empty_tail(batch_size), k=self.k_conv.empty_tail(batch_size),
                           v=self.v_conv.empty_tail(batch_size)))
    if self.variant.content_aware:
      cache["content"] = content_signal(cache["state"])
    return cache

  def prefill(self, x: jax.Array) -> tuple[jax.Array, dict]:
    """Parallel form from position 0 that also returns the cache after the T tokens.

    x: [B, T, d_model] -> (y [B, T, d_model], cache). For CARVE the sequence is split at the
    last content-block boundary nG <= T: the state there gives the content vector of the open
    block, and `ops.carve` resumes from it (its first token starts a block, as nG does).
    """
    inp, tails = self.op_inputs(x)
    T = x.shape[1]
    if not self.variant.content_aware:
      o, S = self._mix(inp, output_final_state=True)
      return self.project_output(x, o), dict(state=S, conv=tails)
    split = (T // self.cfg.content_block) * self.cfg.content_block
    if split in (0, T):
      o, S = self._mix(inp, output_final_state=True)
      S_open = jnp.zeros_like(S) if split == 0 else S
    else:
      o1, S_open = self._mix({n: a[:, :split] for n, a in inp.items()}, output_final_state=True)
      o2, S = self._mix({n: a[:, split:] for n, a in inp.items()}, initial_state=S_open,
                        output_final_state=True)
      o = jnp.concatenate([o1, o2], axis=1)
    return self.project_output(x, o), dict(state=S, conv=tails, content=content_signal(S_open))

  def step(self, x: jax.Array, cache: dict, pos: jax.Array, doc_pos: jax.Array | None = None
           ) -> tuple[jax.Array, dict]:
    """One token. x: [B, d_model]; pos: int32 scalar, tokens before this one.

    doc_pos: optional int32 [B], the token's position inside its document (default pos); where
    it is 0 the row starts from a fresh state and its conv reaches no earlier token.
    Returns (y [B, d_model], new cache).
    """
    if doc_pos is not None:
      fresh = doc_pos == 0
      cache = dict(cache, state=jnp.where(fresh[:, None, None, None], jnp.zeros_like(cache["state"]), cache["state"]))
      pos = doc_pos
    positions = None if doc_pos is None else doc_pos[:, None]
    inp, tails = self.op_inputs(x[:, None], cache["conv"], positions)
    t = {n: a[:, 0] for n, a in inp.items()}  # drop the time axis
    q, k, v = t["q"], t["k"], t["v"]
    row = self.variant
    g = t["g"] if row.decay == "per_channel" else jnp.broadcast_to(t["g"][..., None], q.shape)
    new = dict(conv=tails)
    if row.content_aware:
      o, new["state"], new["content"] = carve_step(
          cache["state"], cache["content"], pos, q, k, v, g, t["erase_logits"], t["beta"], self.gamma[...],
          content_block=self.cfg.content_block)
    else:
      b = t["b"] if row.erase == "gate" else jnp.broadcast_to(t["beta"][..., None], q.shape)
      w = t["w"] if row.write == "gate" else jnp.broadcast_to(t["beta"][..., None], v.shape)
      o, new["state"] = gated_delta_step(cache["state"], q, k, v, g, b, w)
    return self.project_output(x, o), new
