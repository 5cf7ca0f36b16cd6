"""Model configurations: one frozen dataclass, validated on construction, and named presets.

A `ModelConfig` fixes the function a model computes (sizes, mixer, content block G) and how it is
computed (compute dtype, ops implementation, chunk tile). Parameters are always float32;
`compute_dtype` only sets the dtype of activations and matmuls.

    preset("tiny")                       # CI-sized, seconds on CPU
    preset("1.3b", mixer="gdn2")         # d_model 2048, 16 heads x 128, 24 layers
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from carve_jax.ops.validate import CONTENT_GRADS, IMPLS, ContentGrad, Impl
from carve_jax.ops.variants import VARIANTS, VariantName

Mixer = Literal[VariantName, "attention"]  # the delta-rule variants (`carve_jax.ops.variants`) and softmax attention
MIXERS: tuple[str, ...] = get_args(Mixer)
DELTA_MIXERS: tuple[str, ...] = tuple(VARIANTS)
COMPUTE_DTYPES = ("float32", "bfloat16")
OUTPUT_GATES = ("lowrank_sigmoid", "full_swish", "full_sigmoid")
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_mixer_outputs", "save_dots_and_mixer")


def _fail(name: str, expected: str, got: Any) -> ValueError:
  return ValueError(f"ModelConfig: field `{name}` must be {expected}, got {got!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder LM: embeddings, `n_layers` pre-norm blocks (mixer + SwiGLU MLP), final norm, head.

  Attributes:
    mixer: token mixer of every block: "carve", "gdn2", "kda", "gdn" (delta-rule family) or
      "attention" (softmax, causal, RoPE).
    layer_pattern: a hybrid stack: the mixers of consecutive blocks, repeated to n_layers (its length
      must divide n_layers), e.g. ("carve", "carve", "carve", "attention"); or one name per layer.
      None: every block uses `mixer`. With scan_layers, the scan runs over the pattern's repeats.
    vocab_size, d_model, n_layers, n_heads: the usual sizes.
    head_dim: K = V per head; None means d_model // n_heads. n_heads * head_dim must equal d_model.
    conv_size: kernel of the short causal depthwise conv on q, k, v (delta mixers).
    content_block: CARVE's G, tokens per content block (changes the function; CARVE only).
    content_grad: "stop" or "full", gradient through the content signal into the state (CARVE).
    chunk_size: chunk tile of the "chunk"/"pallas" implementations; must divide content_block (CARVE).
    mlp_hidden: SwiGLU hidden width; None means mlp_ratio * d_model * 2/3 rounded up to mlp_multiple
      (flash-linear-attention's GatedMLP rule).
    gate_rank: bottleneck of the low-rank decay (f) and output-gate (g) projections; None = head_dim.
    output_gate: the delta mixers' output gate z in y = W_o[rmsnorm(o) * act(z)]:
      "lowrank_sigmoid" z = W_g2 W_g1 x + b_g, act = sigmoid (FLA's KDA / GatedDeltaNet2 gate, the default);
      "full_swish" / "full_sigmoid" z = W_g x (d x HV, no bias), act = swish / sigmoid (FLA's GatedDeltaNet
      gate, `output_gate_activation`; needed to import / export an FLA `gated_deltanet` model).
    tie_embeddings: share the embedding matrix with the output head.
    compute_dtype: "float32" or "bfloat16" activations; params stay float32; logits are float32.
    impl: `carve_jax.ops` implementation ("auto" -> Pallas on GPU when available, else "chunk").
    norm_eps: epsilon of every RMSNorm (block norms and the gated output norm).
    init_std: std of the normal init of linear and embedding weights.
    max_seq_len: longest sequence the attention KV cache and RoPE are sized for.
    rope_theta: RoPE base (attention only).
    attention_window: sliding window of attention layers in tokens (each token sees itself and the
      W - 1 before it; the decode cache keeps W positions); None = full causal attention.
    remat: the old on/off switch: True is `remat_policy="full"` (kept so old configs and flags work).
    remat_policy: what each block keeps for the backward pass (`carve_jax.model.remat_policy`):
      "none" everything (no rematerialisation); "full" only the block's input, the rest recomputed;
      "dots_saveable" the matmul outputs without batch dimensions (projections, MLP), the rest
      recomputed; "save_mixer_outputs" the outputs of the mixer kernels (the Pallas recurrence with
      the residuals its backward needs, cuDNN attention) and each mixer's output, while the
      projections, short conv, gates, norms and MLP are recomputed; "save_dots_and_mixer" both the
      matmul outputs and the mixer kernels' outputs, so only elementwise work (norms, short conv,
      gates, SiLU) is recomputed: one GDN-2 block at d 1024, T 8192 saves 1509 -> ~520 MiB (CPU trace,
      `jax.ad_checkpoint.print_saved_residuals`), without a second pass of any matmul or kernel.
    scan_layers: keep the blocks' parameters stacked ([n_layers, ...] per leaf; the same initial values as unrolled) and run
      them with one `lax.scan`, so compile time does not grow with depth (maxtext's `scan_layers`).
      Changes the parameter layout (`carve_jax.model.convert_layout` converts a model); the same
      function either way. On in the training presets (20m, 50m, 1.3b).
  """

  mixer: Mixer = "carve"
  layer_pattern: tuple[str, ...] | None = None
  vocab_size: int = 256
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  head_dim: int | None = None
  conv_size: int = 4
  content_block: int = 64
  content_grad: ContentGrad = "stop"
  chunk_size: int = 64
  mlp_hidden: int | None = None
  mlp_ratio: float = 4.0
  mlp_multiple: int = 256
  gate_rank: int | None = None
  output_gate: str = "lowrank_sigmoid"
  tie_embeddings: bool = False
  compute_dtype: str = "float32"
  impl: Impl = "auto"
  norm_eps: float = 1e-6
  init_std: float = 0.02
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  remat: bool = False
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_window: int | None = None

  def __post_init__(self):
    if self.mixer not in MIXERS:
      raise _fail("mixer", f"one of {MIXERS}", self.mixer)
    if self.layer_pattern is not None:
      lp = self.layer_pattern
      if isinstance(lp, str) or not isinstance(lp, (tuple, list)) or not lp:
        raise _fail("layer_pattern", "None or a non-empty tuple of mixer names", lp)
      bad = [m for m in lp if m not in MIXERS]
      if bad:
        raise _fail("layer_pattern", f"a tuple of names from {MIXERS} (unknown: {bad})", lp)
      if isinstance(self.n_layers, int) and self.n_layers > 0 and self.n_layers % len(lp):
        raise _fail("layer_pattern", f"a pattern whose length divides n_layers={self.n_layers} (it is repeated "
                    f"to n_layers), length {len(lp)} does not", lp)
      object.__setattr__(self, "layer_pattern", tuple(lp))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "conv_size", "content_block", "chunk_size",
                 "mlp_multiple", "max_seq_len"):
      _check_positive_int(name, getattr(self, name))
    for name in ("head_dim", "mlp_hidden", "gate_rank", "attention_window"):
      if getattr(self, name) is not None:
        _check_positive_int(name, getattr(self, name))
    if self.head_dim is None and self.d_model % self.n_heads != 0:
      raise _fail("n_heads", f"a divisor of d_model={self.d_model} (head_dim=None derives d_model // n_heads)",
                  self.n_heads)
    if self.n_heads * self.head_k != self.d_model:
      raise _fail("head_dim", f"d_model / n_heads = {self.d_model} / {self.n_heads} (n_heads * head_dim must "
                  f"equal d_model)", self.head_dim)
    if self.content_grad not in CONTENT_GRADS:
      raise _fail("content_grad", f"one of {CONTENT_GRADS}", self.content_grad)
    if self.content_aware and self.content_block % self.chunk_size != 0:
      raise _fail("chunk_size", f"a divisor of content_block={self.content_block} (CARVE's content signal is "
                  "taken at content-block boundaries)", self.chunk_size)
    if self.output_gate not in OUTPUT_GATES:
      raise _fail("output_gate", f"one of {OUTPUT_GATES}", self.output_gate)
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise _fail("compute_dtype", f"one of {COMPUTE_DTYPES}", self.compute_dtype)
    if self.impl not in IMPLS:
      raise _fail("impl", f"one of {IMPLS}", self.impl)
    for name in ("mlp_ratio", "norm_eps", "init_std", "rope_theta"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise _fail(name, "a positive number", v)
    if "attention" in self.mixer_kinds and self.head_k % 2 != 0:
      raise _fail("head_dim", "even for attention (RoPE rotates channel pairs)", self.head_k)
    if self.remat_policy not in REMAT_POLICIES:
      raise _fail("remat_policy", f"one of {REMAT_POLICIES}", self.remat_policy)
    if self.remat is True and self.remat_policy not in ("none", "full"):
      raise _fail("remat", f"False when remat_policy is given (remat=True means remat_policy='full'; "
                  f"remat_policy={self.remat_policy!r} was given too)", self.remat)
    for name in ("tie_embeddings", "remat", "scan_layers"):
      if not isinstance(getattr(self, name), bool):
        raise _fail(name, "a bool", getattr(self, name))

  @property
  def head_k(self) -> int:
    """Per-head key and value width K = V."""
    return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

  @property
  def rank(self) -> int:
    """Bottleneck width of the low-rank decay and output-gate projections."""
    return self.head_k if self.gate_rank is None else self.gate_rank

  @property
  def pattern(self) -> tuple[str, ...]:
    """The repeating unit of the stack: `layer_pattern`, or (mixer,) for a plain model."""
    return (self.mixer,) if self.layer_pattern is None else self.layer_pattern

  @property
  def content_aware(self) -> bool:
    """Some block's erase gate reads the state (CARVE): content_block and content_grad matter."""
    return any(VARIANTS[m].content_aware for m in self.mixer_kinds if m in VARIANTS)

  @property
  def mixer_kinds(self) -> tuple[str, ...]:
    """The distinct mixers of the stack, in order of first use."""
    return tuple(dict.fromkeys(self.pattern))

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer of each of the n_layers blocks."""
    return self.pattern * (self.n_layers // len(self.pattern))

  def layer_config(self, mixer: str) -> "ModelConfig":
    """The config one block of `mixer` is built from (a plain, non-hybrid config)."""
    return self.replace(mixer=mixer, layer_pattern=None)

  @property
  def remat_mode(self) -> str:
    """The rematerialisation policy in effect: `remat_policy`, or "full" for the old `remat=True`."""
    return "full" if self.remat and self.remat_policy == "none" else self.remat_policy

  @property
  def mlp_dim(self) -> int:
    """SwiGLU hidden width."""
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    m = self.mlp_multiple
    return m * ((int(self.d_model * self.mlp_ratio * 2 / 3) + m - 1) // m)

  def replace(self, **overrides) -> "ModelConfig":
    """A copy with fields replaced (validated again)."""
    return dataclasses.replace(self, **overrides)


def _check_positive_int(name: str, v: Any) -> None:
  if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
    raise _fail(name, "a positive int", v)


PRESETS: dict[str, ModelConfig] = {
    # CI: a forward + backward in well under a second on CPU.
    "tiny": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, content_block=16, chunk_size=16,
                        mlp_multiple=32, max_seq_len=256),
    # The README demo: a few minutes of CPU training at byte level.
    "demo": ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=2, content_block=32, chunk_size=32,
                        mlp_multiple=64, max_seq_len=512),
    # Training presets scan over their layers (compile time independent of depth).
    "20m": ModelConfig(vocab_size=256, d_model=384, n_layers=8, n_heads=6, mlp_multiple=128, scan_layers=True),
    "50m": ModelConfig(vocab_size=256, d_model=512, n_layers=12, n_heads=8, mlp_multiple=128, scan_layers=True),
    # The paper's scale (flash-linear-attention's 1.3B layout: llama vocabulary, untied head).
    "1.3b": ModelConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, head_dim=128,
                        compute_dtype="bfloat16", scan_layers=True),
}
# Hybrids: three delta-rule blocks, then one attention block, repeated.
for _m in ("carve", "gdn2"):
  for _size in ("50m", "1.3b"):
    PRESETS[f"{_m}-hybrid-{_size}"] = PRESETS[_size].replace(mixer=_m, layer_pattern=(_m, _m, _m, "attention"))


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset with fields overridden, e.g. `preset("1.3b", mixer="gdn2", vocab_size=50304)`."""
  if name not in PRESETS:
    raise ValueError(f"preset: argument `name` must be one of {tuple(PRESETS)}, got {name!r}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"preset: unknown ModelConfig field(s) {unknown}; known fields: {sorted(fields)}")
  return PRESETS[name].replace(**overrides)
