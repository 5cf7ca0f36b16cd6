"""The XLA chunk path is a float32-accurate reference on the GPU too, gradients included.

On the GPU, XLA runs float32 matmuls in TF32 unless told otherwise; a reference path must not. The
chunk path's outputs and the gradients of every input (through A = (I + L)^{-1} too: erase logits,
gamma, b) are compared with the same path in float64. On the CPU float32 matmuls are exact, so the
test means something only on the GPU (marked gpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carve_jax.ops.sample_inputs import family_inputs, run_family
from conftest import TOL


def _grads(family, inputs, co, cs):
  def loss(inp):
    o, S = run_family(family, impl="chunk", chunk_size=32, content_block=64, **inp)
    return jnp.sum(o * co.astype(o.dtype)) + jnp.sum(S * cs.astype(S.dtype))
  return jax.jit(jax.grad(loss))(inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["carve", "gdn2"])
def test_chunk_path_float32_gradients_on_gpu(family):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU (float32 matmuls are exact on the CPU)")
  with jax.enable_x64(True):
    inputs64 = family_inputs(jax.random.PRNGKey(21), family, B=2, T=256, H=2, K=64, V=64, dtype=jnp.float64,
                             initial_state=True)
    ko, ks = jax.random.split(jax.random.PRNGKey(22))
    co = jax.random.normal(ko, inputs64["v"].shape, jnp.float64)                          # cotangent of o
    cs = jax.random.normal(ks, inputs64["q"].shape[:1] + (2, 64, 64), jnp.float64)          # of the final state
    ref = jax.tree.map(np.asarray, _grads(family, inputs64, co, cs))
    inputs32, co32, cs32 = jax.tree.map(lambda x: np.asarray(x, np.float32), (inputs64, co, cs))
  got = _grads(family, inputs32, co32, cs32)
  errs = {n: float(np.linalg.norm(np.asarray(got[n], np.float64) - ref[n]) / np.linalg.norm(ref[n])) for n in ref}
  print(f"chunk path float32 on GPU, gradient errors vs float64 ({family}): {errs}")
  assert max(errs.values()) < 2 * TOL[jnp.float32].grad, errs  # T = 256, K = 64 on the GPU: twice the bound
