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

  Defaults, from the H200 runs in experiments/results/bench_kernel/bench_kernel.md (B=8 T=2048 H=16 K=V=128 bf16):
  the chunk-parallel kernels take the end-to-end best (`pallas_carve_nw4`: key blocks of 32, 4 warps,
  the gradient kernel one program per key block at 8 warps); the sequential passes take the best
  per-kernel times (CARVE's state pass over the whole key axis at 8 warps: 3.0-3.2 ms against 4.2 ms
  with key blocks of 64; the gamma-free state passes at 4 warps). Together, end to end (run 4): CARVE
  9.67 ms fwd+bwd, 4.28 ms forward, the fastest configuration measured.

  Attributes:
    state_block_v: value-axis tile of the sequential state passes of the gamma-free forward and of
      every backward (None = all of V): more programs for small batches. CARVE's forward state pass
      always keeps the whole state in one program (its content signal is a row norm over V).
    block_k: key-axis block of the per-channel math (decay factors, gates) in the chunk-parallel
      preparation and output kernels; a power of two >= 16 (the whole of K when larger). Smaller
      blocks need fewer registers per thread.
    grad_block_k: the same for the gradient kernel, which runs one program per key block (offline
      compile at K=V=128, 8 warps: it spills 1.8 KB per thread at 64, 0.3 KB at 32; 32 measured
      2.2x faster than one program per chunk).
    carve_block_k: the same for CARVE's sequential forward state pass.
    num_warps: Triton warps of the chunk-parallel preparation and output kernels.
    grad_num_warps: warps of the chunk-parallel gradient kernel.
    state_num_warps: warps of the gamma-free state passes (forward and backward).
    carve_num_warps: warps of CARVE's forward state pass (gate, WY solve and state in the loop).
    carve_state_kernel: "auto" (the Mosaic GPU kernel where it runs and has passed the GPU tests: compiled,
      16-bit inputs, K = V = 128 or 64 and chunk 64, packed documents or not (`mosaic_state.GPU_CHECKED_SIZES`,
      `GPU_CHECKED_PACKED_SIZES`); else
      Triton), "triton" (`forward.carve_state_pass`) or "mosaic" (`mosaic_state.carve_state_pass_mosaic`,
      any size it `fits`; on the H200 ~2x faster than the Triton loop at B2 T8192 and B8 T2048: NOTES v9).
    mosaic_inverse: the Mosaic kernel's in-chunk inverse products: "f16" (one float16 wgmma each, 11-bit
      significand like the Triton kernel's TF32; operands below 6.5e4: `mosaic_state.inverse`) or "bf16x3"
      (three bfloat16 wgmmas of hi / lo halves, ~16 bits).
    mosaic_ax: the Mosaic kernel's V_new = A X: "f16" (X stored once in float16, one wgmma; X's entries
      below 6.5e4; on the H200 -0.25 ms fwd+bwd at B2 T8192: NOTES v10) or "bf16x3" (X's and A's hi / lo
      halves, three wgmmas).
    mosaic_w: the Mosaic kernel also writes the backward's W = A (gate k e^G) (two more wgmmas a chunk on the
      solve warpgroup, off the chain), so `backward.bprep` does not form it from A and the gate (-0.11 ms
      fwd+bwd at B2 T8192: NOTES v10); a forward with no backward after it never writes W.
    mosaic_approx_math: the Mosaic kernel's exp, rsqrt and sqrt as single approximate instructions
      (relative error ~2^-22; the gate's sigmoid as rsqrt(1 + e^-x)^2).
    num_stages: Triton software-pipelining stages of every kernel.
  """
  state_block_v: int | None = 64
  block_k: int = 32
  grad_block_k: int = 32
  carve_block_k: int = 128
  num_warps: int = 4
  grad_num_warps: int = 8
  state_num_warps: int = 4
  carve_num_warps: int = 8
  carve_state_kernel: str = "auto"
  mosaic_inverse: str = "f16"
  mosaic_ax: str = "f16"
  mosaic_w: bool = True
  mosaic_approx_math: bool = True
  num_stages: int = 1

  def __post_init__(self):
    x = self.state_block_v
    if x is not None and (not isinstance(x, int) or x < 16 or not _pow2(x)):
      raise ValueError(f"TuningConfig: `state_block_v` must be None or a power of two >= 16, got {x!r}")
    for name in ("block_k", "grad_block_k", "carve_block_k"):
      x = getattr(self, name)
      if not isinstance(x, int) or x < 16 or not _pow2(x):
        raise ValueError(f"TuningConfig: `{name}` must be a power of two >= 16, got {x!r}")
    for name in ("num_warps", "grad_num_warps", "state_num_warps", "carve_num_warps"):
      x = getattr(self, name)
      if not isinstance(x, int) or x not in (1, 2, 4, 8, 16):
        raise ValueError(f"TuningConfig: `{name}` must be one of 1, 2, 4, 8, 16, got {x!r}")
    if self.carve_state_kernel not in ("auto", "triton", "mosaic"):
      raise ValueError(f"TuningConfig: `carve_state_kernel` must be 'auto', 'triton' or 'mosaic', got "
                       f"{self.carve_state_kernel!r}")
    if self.mosaic_inverse not in ("f16", "bf16x3"):
      raise ValueError(f"TuningConfig: `mosaic_inverse` must be 'f16' or 'bf16x3', got {self.mosaic_inverse!r}")
    if self.mosaic_ax not in ("f16", "bf16x3"):
      raise ValueError(f"TuningConfig: `mosaic_ax` must be 'f16' or 'bf16x3', got {self.mosaic_ax!r}")
    if not isinstance(self.mosaic_w, bool):
      raise ValueError(f"TuningConfig: `mosaic_w` must be a bool, got {self.mosaic_w!r}")
    if not isinstance(self.mosaic_approx_math, bool):
      raise ValueError(f"TuningConfig: `mosaic_approx_math` must be a bool, got {self.mosaic_approx_math!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"TuningConfig: `num_stages` must be a positive int, got {self.num_stages!r}")

  def value_tile(self, V: int) -> int:
    """Value-axis tile of the state passes that tile V (`state_block_v`, at most V; all of V for None)."""
    return V if self.state_block_v is None else min(self.state_block_v, V)

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
