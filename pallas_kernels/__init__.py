"""Pallas (Triton) chunk kernels of the gated delta-rule family: CARVE, GDN-2, KDA, GDN.

`pallas_gated_delta` is the one entry point (`carve_jax.ops` dispatches to it for impl="pallas");
`TuningConfig` holds its block sizes and launch parameters; `supported` says whether a shape and
dtype should go to the kernels under impl="auto".
"""

from pallas_kernels.chunk import pallas_gated_delta, supported
from pallas_kernels.config import TuningConfig

__all__ = ["TuningConfig", "pallas_gated_delta", "supported"]
