"""The gated delta-rule family: public API (`api.py`), references (`recurrent.py`, `chunk.py`),
one-token decoding steps (`step.py`), the table of variants (`variants.py`)."""

from carve_jax.ops.api import Impl, carve, gated_delta, gdn, kda, pallas_available, resolve_impl
from carve_jax.ops.gates import content_erase_gate, content_signal
from carve_jax.ops.segments import (document_numbers, document_positions, document_starts,
                                    segment_ids_from_cu_seqlens)
from carve_jax.ops.step import carve_step, gated_delta_step
from carve_jax.ops.transition import chunk_transition, kronecker_rank
from carve_jax.ops.variants import VARIANTS, Variant, variant

__all__ = [
    "Impl", "carve", "gated_delta", "gdn", "kda", "pallas_available", "resolve_impl",
    "content_erase_gate", "content_signal", "chunk_transition", "kronecker_rank", "gated_delta_step",
    "carve_step", "document_numbers", "document_positions", "document_starts", "segment_ids_from_cu_seqlens",
    "VARIANTS", "Variant", "variant",
]
