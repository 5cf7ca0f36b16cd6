r"""The delta-rule variants: one frozen row per model, read by the layer, the configs and the samplers.

Every variant is the gated delta rule S_t = (I - k_t (b_t * k_t)^T) Diag(exp g_t) S_{t-1} + k_t (w_t * v_t)^T
(`carve_jax.ops.api`); a row says how its decay g, erase gate b and write gate w are made:

| name  | decay         | erase          | write | extra params | public op                  |
|-------|---------------|----------------|-------|--------------|----------------------------|
| carve | per_channel   | content_gate   | beta  | gamma        | `carve`                    |
| gdn2  | per_channel   | gate           | gate  |              | `gated_delta`              |
| kda   | per_channel   | beta           | beta  |              | `kda`                      |
| gdn   | scalar        | beta           | beta  |              | `gdn`                      |

decay: "scalar" one g per token and head, [B, T, H] (GDN); "per_channel" one per key channel,
  [B, T, H, K] (KDA, GDN-2, CARVE).
erase: "beta" b = beta 1_K, beta in (0, 1)^{[B, T, H]} one scalar per token and head;
  "gate" b = sigmoid(W_b x) in (0, 1)^K; "content_gate" b = sigmoid(W_b x + gamma_h c_n), c_n the
  per-key-row RMS of the state entering content block n (`carve_jax.ops.gates`).
write: "beta" w = beta 1_V (the same beta); "gate" w = sigmoid(W_w x) in (0, 1)^V.
extra_params: per-head scalar parameters [H] of the row's math, 0 at init (CARVE's gamma).

A new variant is one row here (its name also in `VariantName`, checked below) plus its math where a
field takes a new value. `Variant.__post_init__` admits the combinations `carve_jax.ops` has an
entry point for.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

DecayKind = Literal["scalar", "per_channel"]
EraseKind = Literal["beta", "gate", "content_gate"]
WriteKind = Literal["beta", "gate"]
VariantName = Literal["carve", "gdn2", "kda", "gdn"]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model of the family (module docstring): how g, b and w are made, and its extra parameters."""

  name: str
  decay: DecayKind
  erase: EraseKind
  write: WriteKind
  extra_params: tuple[str, ...] = ()

  def __post_init__(self):
    for field, kind in (("decay", DecayKind), ("erase", EraseKind), ("write", WriteKind)):
      if getattr(self, field) not in get_args(kind):
        raise _fail(self.name, field, f"one of {get_args(kind)}", getattr(self, field))
    # The combinations the public ops take (`carve_jax.ops.api`).
    if self.erase == "beta" and self.write != "beta":
      raise _fail(self.name, "write", "'beta' with erase='beta' (ops.gdn / ops.kda: b = w = beta)", self.write)
    if self.erase != "beta" and self.decay != "per_channel":
      raise _fail(self.name, "decay", f"'per_channel' with erase={self.erase!r} (g [B, T, H, K])", self.decay)
    if self.erase == "gate" and self.write != "gate":
      raise _fail(self.name, "write", "'gate' with erase='gate' (ops.gated_delta: b [.., K], w [.., V])", self.write)
    if self.erase == "content_gate" and (self.write, self.extra_params) != ("beta", ("gamma",)):
      raise _fail(self.name, "write, extra_params", "'beta', ('gamma',) with erase='content_gate' (ops.carve)",
                  (self.write, self.extra_params))
    if self.erase != "content_gate" and self.extra_params:
      raise _fail(self.name, "extra_params", "() unless erase='content_gate'", self.extra_params)

  @property
  def content_aware(self) -> bool:
    """The erase gate reads the state (CARVE): the model has a content block G and a content cache."""
    return self.erase == "content_gate"

  @property
  def uses_beta(self) -> bool:
    """One scalar gate per token and head (projection d -> H) serves as erase and/or write gate."""
    return "beta" in (self.erase, self.write)


def _fail(name: str, field: str, expected: str, got) -> ValueError:
  return ValueError(f"Variant {name!r}: field `{field}` must be {expected}, got {got!r}")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("carve", decay="per_channel", erase="content_gate", write="beta", extra_params=("gamma",)),
    Variant("gdn2", decay="per_channel", erase="gate", write="gate"),
    Variant("kda", decay="per_channel", erase="beta", write="beta"),
    Variant("gdn", decay="scalar", erase="beta", write="beta"),
)}
VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS)
if get_args(VariantName) != VARIANT_NAMES:
  raise AssertionError(f"VariantName {get_args(VariantName)} must list the rows of VARIANTS {VARIANT_NAMES} in order")


def variant(name: str, fn: str = "variant", arg: str = "name") -> Variant:
  """The row of `name`; a ValueError naming the caller's argument `arg` for an unknown name."""
  if name not in VARIANTS:
    raise ValueError(f"{fn}: argument `{arg}` must be one of {VARIANT_NAMES}, got {name!r}")
  return VARIANTS[name]
