"""Tuning knobs of the Pallas (Triton) chunk kernels, in one frozen dataclass.

The math does not depend on any of these; they trade registers, parallelism and pipelining.
"""

from __future__ import annotations

import dataclasses


def _pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Block sizes and launch parameters.

  Attributes:
    sub_chunk: rows of one triangular sub-block (the unit of the blocked forward substitution); a
      power of two >= 16 dividing the chunk size. Decay references stay per 16 rows whatever
      this is, so numerics do not depend on it. 16 is the measured default; 32 halves the
      barriers per chunk (offline compile) but is not yet timed on the GPU; 64's backward needs
      ~400 KB of shared memory in the offline compile (over the H100's 227 KB).
    block_v: value-axis tile of the gamma-free forward (None = all of V). CARVE's forward always
      keeps the whole state in one program (its content signal is a row norm over V).
    bwd_block_v: value-axis tile of the backward (None = all of V); partial key-side gradients of
      the tiles are summed outside the kernel. CARVE's backward tiles too (c is saved by the forward).
    num_warps, num_stages: Triton launch parameters of the forward.
    bwd_num_warps, bwd_num_stages: the same for the backward.
  """
  sub_chunk: int = 16
  block_v: int | None = None
  bwd_block_v: int | None = 64
  num_warps: int = 8
  num_stages: int = 1
  bwd_num_warps: int = 8
  bwd_num_stages: int = 1

  def __post_init__(self):
    if not isinstance(self.sub_chunk, int) or self.sub_chunk < 16 or not _pow2(self.sub_chunk):
      raise ValueError(f"TuningConfig: `sub_chunk` must be a power of two >= 16, got {self.sub_chunk!r}")
    for name in ("block_v", "bwd_block_v"):
      x = getattr(self, name)
      if x is not None and (not isinstance(x, int) or x < 16 or not _pow2(x)):
        raise ValueError(f"TuningConfig: `{name}` must be None or a power of two >= 16, got {x!r}")
    for name in ("num_warps", "bwd_num_warps"):
      x = getattr(self, name)
      if not isinstance(x, int) or x not in (1, 2, 4, 8, 16):
        raise ValueError(f"TuningConfig: `{name}` must be one of 1, 2, 4, 8, 16, got {x!r}")
    for name in ("num_stages", "bwd_num_stages"):
      x = getattr(self, name)
      if not isinstance(x, int) or x < 1:
        raise ValueError(f"TuningConfig: `{name}` must be a positive int, got {x!r}")

  def check_shapes(self, *, chunk_size: int, K: int, V: int) -> None:
    """Raises ValueError when the chunk or head sizes cannot be tiled by this config."""
    if chunk_size % self.sub_chunk or not _pow2(chunk_size):
      raise ValueError(f"pallas_gated_delta: argument `chunk_size` must be a power of two and a multiple "
                       f"of TuningConfig.sub_chunk={self.sub_chunk}, got {chunk_size}")
    for name, d in (("K", K), ("V", V)):
      if d < 16 or not _pow2(d):
        raise ValueError(f"pallas_gated_delta: head size {name} must be a power of two >= 16 for the "
                         f"Triton kernels, got {d} (use impl='chunk')")


DEFAULT = TuningConfig()
