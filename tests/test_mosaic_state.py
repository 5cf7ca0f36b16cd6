"""WORK IN PROGRESS (branch `mgpu`): the Mosaic GPU state pass against the Triton one, in Mosaic GPU's
interpret mode on the CPU (bf16 inputs; both keep h and V_new in bf16, so they agree to bf16 rounding)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import forward as fw
from pallas_kernels.config import DEFAULT
from pallas_kernels.mosaic_state import state_pass_mosaic
from conftest import rel_err


@pytest.mark.parametrize("B, T, H, K, V, C", [(1, 128, 1, 128, 128, 64), (2, 256, 2, 128, 64, 64),
                                              (1, 256, 1, 64, 128, 128)])
def test_mosaic_state_pass_matches_triton(B, T, H, K, V, C):
  ks = jax.random.split(jax.random.PRNGKey(B * T + K), 5)
  bf = jnp.bfloat16
  W = (0.1 * jax.random.normal(ks[0], (B, T, H, K))).astype(bf)
  U = jax.random.normal(ks[1], (B, T, H, V)).astype(bf)
  kd = (0.1 * jax.random.normal(ks[2], (B, T, H, K))).astype(bf)
  gc = -jax.random.uniform(ks[3], (B, H, T // C, K))
  S0 = jax.random.normal(ks[4], (B, H, K, V))
  ref = fw.state_pass(W, U, kd, gc, S0, C=C, cfg=DEFAULT, dt=fw.Dtypes(W, True), interpret=True)
  out = state_pass_mosaic(W, U, kd, gc, S0, C=C, interpret=True)
  for name, a, r in zip(("h", "V_new", "S_final"), out, ref):
    assert a.shape == r.shape and a.dtype == r.dtype, name
    assert rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) < 1e-2, name
