"""nnx building blocks of the language models: token mixers, SwiGLU MLP, norms, short conv."""

from carve_jax.layers.attention import Attention, rope
from carve_jax.layers.conv import ShortConv
from carve_jax.layers.delta import DeltaMixer
from carve_jax.layers.dense import compute_dtype, dense
from carve_jax.layers.mlp import SwiGLU
from carve_jax.layers.norms import GatedRMSNorm, RMSNorm, l2norm

__all__ = ["Attention", "DeltaMixer", "GatedRMSNorm", "RMSNorm", "ShortConv", "SwiGLU", "compute_dtype",
           "dense", "l2norm", "rope"]
