"""carve_jax: CARVE and the gated delta-rule family (GDN, KDA, GDN-2) in JAX.

The math lives in `carve_jax.ops`; see `../shared/spec/CARVE.md` (mirrored in docs/) for the
reading of the paper this package implements.
"""

__version__ = "0.1.0"
