"""Tuning knobs of the Pallas (Triton) chunk kernels, in one frozen dataclass.

The math does not depend on any of these; they trade registers, parallelism and pipelining.
"""

from __future__ import annotations

import dataclasses


def _pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Launch parameters of the kernels (`forward.py`, `backward.py`).

  Attributes:
    state_block_v: value-axis tile of the sequential state passes of the gamma-free forward and of
      every backward (None = all of V): more programs for small batches. CARVE's forward state pass
      always keeps the whole state in one program (its content signal is a row norm over V).
    block_k: key-axis block of the per-channel math (decay factors, gates) in the chunk-parallel
      kernels; the gradient kernel also runs one program per key block. A power of two >= 16 (the
      whole of K when larger). Smaller blocks need fewer registers (offline compile at K=V=128,
      8 warps: the gradient kernel spills 1.8 KB per thread at 64, 0.3 KB at 32).
    carve_block_k: the same for CARVE's sequential forward state pass.
    num_warps: Triton warps of the chunk-parallel preparation and output kernels.
    grad_num_warps: warps of the chunk-parallel gradient kernel (the largest live set).
    state_num_warps: warps of the gamma-free state passes (forward and backward).
    carve_num_warps: warps of CARVE's forward state pass (gate, WY solve and state in the loop).
    num_stages: Triton software-pipelining stages of every kernel.
  """
  state_block_v: int | None = 64
  block_k: int = 32
  carve_block_k: int = 64
  num_warps: int = 8
  grad_num_warps: int = 8
  state_num_warps: int = 8
  carve_num_warps: int = 8
  num_stages: int = 1

  def __post_init__(self):
    x = self.state_block_v
    if x is not None and (not isinstance(x, int) or x < 16 or not _pow2(x)):
      raise ValueError(f"TuningConfig: `state_block_v` must be None or a power of two >= 16, got {x!r}")
    for name in ("block_k", "carve_block_k"):
      x = getattr(self, name)
      if not isinstance(x, int) or x < 16 or not _pow2(x):
        raise ValueError(f"TuningConfig: `{name}` must be a power of two >= 16, got {x!r}")
    for name in ("num_warps", "grad_num_warps", "state_num_warps", "carve_num_warps"):
      x = getattr(self, name)
      if not isinstance(x, int) or x not in (1, 2, 4, 8, 16):
        raise ValueError(f"TuningConfig: `{name}` must be one of 1, 2, 4, 8, 16, got {x!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"TuningConfig: `num_stages` must be a positive int, got {self.num_stages!r}")

  @staticmethod
  def check_shapes(*, chunk_size: int, K: int, V: int) -> None:
    """Raises ValueError when the chunk or head sizes cannot be tiled by the kernels."""
    if chunk_size < 16 or not _pow2(chunk_size):
      raise ValueError(f"pallas_gated_delta: argument `chunk_size` must be a power of two >= 16 (whole-chunk "
                       f"tiles, 16-row decay groups), got {chunk_size}")
    for name, d in (("K", K), ("V", V)):
      if d < 16 or not _pow2(d):
        raise ValueError(f"pallas_gated_delta: head size {name} must be a power of two >= 16 for the "
                         f"Triton kernels, got {d} (use impl='chunk')")


DEFAULT = TuningConfig()
