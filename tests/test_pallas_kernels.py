"""The Pallas chunk kernels against the pure-JAX chunk reference: forward, every gradient, bf16.

On CPU the kernels run in Pallas interpret mode (tiny shapes, a few seconds each); the `gpu` tests
run the compiled Triton kernels at head size 128 and are skipped where no GPU is present.
"""

import jax
import jax.numpy as jnp
import pytest

from carve_jax.ops import gates
from carve_jax.ops.sample_inputs import family_inputs, run_family
from pallas_kernels import TuningConfig, pallas_gated_delta, supported
from pallas_kernels import intra
from conftest import GPU_KERNEL_TOL, TOL, rel_err

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def _loss_fn(family, impl, chunk_size, ct_o, ct_s):
  def loss(inputs):
    o, S = run_family(family, impl=impl, chunk_size=chunk_size, **inputs)
    return jnp.sum(o.astype(ct_o.dtype) * ct_o) + jnp.sum(S * ct_s)
  return loss


def _check(family, *, B, T, H, K, V, chunk_size, dtype=jnp.float32, tol=None, grads=True, seed=0,
           decay_scale=1.0):
  """Kernels vs the chunk path: {name: rel_err} of o, S and every gradient. tol: one bound for all of
  them; default TOL[dtype].out for o and S, TOL[dtype].grad for the gradients."""
  out_tol, grad_tol = (TOL[dtype].out, TOL[dtype].grad) if tol is None else (tol, tol)
  inp = family_inputs(jax.random.PRNGKey(seed), family, B=B, T=T, H=H, K=K, V=V, dtype=dtype,
                      initial_state=True, decay_scale=decay_scale)
  wide = jnp.float64 if dtype == jnp.float64 else jnp.float32  # the reference's dtype and the state's
  ref_inp = {n: x.astype(wide) for n, x in inp.items()}
  with jax.default_matmul_precision("highest"):  # the XLA reference: no TF32 on the GPU
    o_ref, s_ref = run_family(family, impl="chunk", chunk_size=chunk_size, **ref_inp)
  o, s = run_family(family, impl="pallas", chunk_size=chunk_size, **inp)
  assert o.dtype == dtype and s.dtype == wide
  errs = {"o": rel_err(o, o_ref), "S": rel_err(s, s_ref)}
  if grads:
    kc = jax.random.split(jax.random.PRNGKey(seed + 100))
    ct_o = jax.random.normal(kc[0], o.shape, wide)
    ct_s = jax.random.normal(kc[1], s.shape, wide)
    with jax.default_matmul_precision("highest"):
      g_ref = jax.grad(_loss_fn(family, "chunk", chunk_size, ct_o, ct_s))(ref_inp)
    g = jax.grad(_loss_fn(family, "pallas", chunk_size, ct_o, ct_s))(inp)
    for name in g_ref:
      assert g[name].dtype == inp[name].dtype, name
      errs["d" + name] = rel_err(g[name], g_ref[name])
  bad = {n: e for n, e in errs.items() if not e <= (grad_tol if n.startswith("d") else out_tol)}
  assert not bad, f"{family} {dtype.__name__}: errors over {out_tol:g} / {grad_tol:g}: {bad} (all: {errs})"
  return errs


@pytest.mark.parametrize("family", ["carve", "gdn2"])  # kda = gdn2 with b = w = beta: GPU test below
def test_fwd_and_grads_fp32_interpret(family):
  # T = 72: not a multiple of the chunk (padding); chunk 32 = two 16-row decay groups.
  _check(family, B=1, T=72, H=2, K=16, V=32, chunk_size=32)


@pytest.mark.parametrize("family, chunk_size", [("kda", 16), ("gdn", 128)])
def test_one_and_eight_decay_groups(family, chunk_size):
  """chunk 16: the diagonal part alone; chunk 128: eight groups, seven off-diagonal parts."""
  _check(family, B=1, T=150, H=1, K=16, V=16, chunk_size=chunk_size, seed=2)


def test_float64_interpret(x64):
  """In float64 the kernels agree with the chunk reference to rounding (forward and every gradient)."""
  for family in ("carve", "gdn2"):
    _check(family, B=1, T=40, H=1, K=16, V=16, chunk_size=16, dtype=jnp.float64,
           tol=TOL[jnp.float64].rounding, seed=5)


def test_four_groups_and_content_block_spanning_chunks():
  inp = family_inputs(jax.random.PRNGKey(3), "carve", B=1, T=130, H=1, K=16, V=16, initial_state=True)
  o_ref, s_ref = run_family("carve", impl="chunk", chunk_size=32, content_block=128, **inp)
  o, s = run_family("carve", impl="pallas", chunk_size=64, content_block=128, **inp)
  assert rel_err((o, s), (o_ref, s_ref)) < TOL[jnp.float32].out


def _assert_configs_agree(cfg_a, cfg_b, *, K, V, chunk_size, seed):
  """Loss and every gradient of the kernel entry point agree under two TuningConfigs (gdn2 and carve)."""
  for family in ("gdn2", "carve"):
    inp = family_inputs(jax.random.PRNGKey(seed), family, B=1, T=40, H=1, K=K, V=V, initial_state=True)
    gamma = inp.get("gamma")
    b = inp["erase_logits"] if gamma is not None else inp["b"]
    w = inp["beta"] if gamma is not None else inp["w"]
    args = (inp["q"], inp["k"], inp["v"], inp["g"], b, w, gamma)
    kw = dict(scale=0.25, initial_state=inp["initial_state"], chunk_size=chunk_size, content_block=chunk_size)

    def loss(args, config):
      o, S = pallas_gated_delta(*args, **kw, config=config)
      return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)
    (l1, g1) = jax.value_and_grad(loss)(args, cfg_a)
    (l2, g2) = jax.value_and_grad(loss)(args, cfg_b)
    assert abs(float(l1 - l2)) <= TOL[jnp.float32].out * abs(float(l2)), family
    assert rel_err(g1, g2) < TOL[jnp.float32].grad, family


def test_value_tiles_fwd_and_bwd():
  """The state passes tiled over V (gamma-free forward, every backward) equal the untiled ones."""
  _assert_configs_agree(TuningConfig(state_block_v=16), TuningConfig(state_block_v=None), K=16, V=32,
                        chunk_size=16, seed=4)


def test_key_blocks_match_whole_key_axis():
  """block_k < K (per-channel math in key blocks; the gradient kernel's grid over key blocks) gives the
  same forward and gradients as one block over the whole key axis."""
  _assert_configs_agree(TuningConfig(block_k=16, grad_block_k=16, carve_block_k=16),
                        TuningConfig(block_k=32, grad_block_k=32, carve_block_k=32), K=32, V=16,
                        chunk_size=32, seed=6)


@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_unit_lower_inverse_float64(x64, n):
  """(I + L)^{-1} of `intra.block_unit_lower_inv` (16 x 16 diagonal blocks by doubling, then the merge)
  against numpy's inverse in float64, for a strictly lower L with entries of a real chunk's size."""
  import numpy as np  # noqa: PLC0415
  L = jnp.tril(jax.random.uniform(jax.random.PRNGKey(n), (n, n), jnp.float64, -1.0, 1.0) / 4, -1)
  A_np = np.linalg.inv(np.eye(n) + np.asarray(L))
  assert rel_err(intra.block_unit_lower_inv(L, jnp.float64), A_np) < 1e-12


def test_strong_decay_stays_finite_and_exact():
  """Mean log decay ~ -6 per token (e^-90 over a 16-row group): no overflow, matches the reference."""
  _check("gdn2", B=1, T=32, H=1, K=16, V=16, chunk_size=32, decay_scale=8.0, seed=7)


def test_strong_decay_four_groups_carve():
  """Chunk 64 (four decay groups) with mean log decay ~ -4.5 per token: forward and every gradient."""
  _check("carve", B=1, T=70, H=1, K=16, V=16, chunk_size=64, decay_scale=6.0, seed=8,
         tol=2 * TOL[jnp.float32].out)  # decay ranges of e^-90 inside a group: twice the float32 bound


def test_bf16_forward_interpret():
  errs = _check("carve", B=1, T=48, H=1, K=16, V=16, chunk_size=16, dtype=jnp.bfloat16, grads=False)
  assert errs["o"] > 0  # bf16 matmul operands really were used


def test_reference_backward_is_the_chunk_paths_vjp():
  """kernel_bwd="reference": kernel forward, the chunk path's gradients (to rounding); a bad value is named."""
  family = "carve"
  inp = family_inputs(jax.random.PRNGKey(9), family, B=1, T=40, H=2, K=16, V=16, initial_state=True)
  ct = jax.random.normal(jax.random.PRNGKey(10), (1, 40, 2, 16))

  def loss(impl, kernel_bwd="kernels"):
    return lambda x: jnp.sum(run_family(family, impl=impl, chunk_size=16, content_block=16, kernel_bwd=kernel_bwd,
                                        **x)[0] * ct)
  g_ref = jax.grad(loss("chunk"))(inp)
  g = jax.grad(loss("pallas", "reference"))(inp)
  assert rel_err(g, g_ref) < TOL[jnp.float32].rounding
  # the mechanism: the backward is the VJP of the function given, not the kernels' (twice it: twice the grads)
  args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["erase_logits"], inp["beta"], inp["gamma"])
  kw = dict(scale=0.25, initial_state=inp["initial_state"], chunk_size=16, content_block=16)
  twice = lambda *a: jax.tree.map(lambda x: 2 * x, pallas_gated_delta(*a[:7], **{**kw, "initial_state": a[7]}))
  lossk = lambda a, ref: jnp.sum(pallas_gated_delta(*a, **kw, reference=ref)[0] * ct)
  g1 = jax.grad(lossk)(args, None)
  g2 = jax.grad(lossk)(args, twice)
  assert rel_err(g2, jax.tree.map(lambda x: 2 * x, g1)) < TOL[jnp.float32].rounding
  with pytest.raises(ValueError, match="kernel_bwd"):
    run_family(family, impl="pallas", chunk_size=16, content_block=16, kernel_bwd="xla", **inp)


def test_content_grad_full_is_refused():
  inp = family_inputs(jax.random.PRNGKey(0), "carve", B=1, T=16, H=1, K=16, V=16)
  with pytest.raises(ValueError, match="impl='chunk'"):
    run_family("carve", impl="pallas", chunk_size=16, content_block=16, content_grad="full", **inp)


@pytest.mark.parametrize("field, value", [("state_block_v", 8), ("state_block_v", 48), ("num_warps", 3),
                                          ("grad_num_warps", 0), ("carve_num_warps", 6), ("num_stages", 0),
                                          ("block_k", 8), ("grad_block_k", 12), ("carve_block_k", 48),
                                          ("mosaic_inverse", "tf32"), ("mosaic_ax", "fp8"),
                                          ("mosaic_approx_math", 1), ("mosaic_w", "yes")])
def test_tuning_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=field):
    TuningConfig(**{field: value})


def test_bad_head_size_is_refused():
  inp = family_inputs(jax.random.PRNGKey(0), "gdn2", B=1, T=16, H=1, K=24, V=16)
  with pytest.raises(ValueError, match="head size K"):
    run_family("gdn2", impl="pallas", chunk_size=16, **inp)


def test_supported():
  assert supported(K=128, V=128, chunk_size=64, dtype=jnp.bfloat16)
  assert not supported(K=96, V=128, chunk_size=64, dtype=jnp.bfloat16)
  assert not supported(K=128, V=128, chunk_size=48, dtype=jnp.bfloat16)
  assert not supported(K=128, V=128, chunk_size=8, dtype=jnp.bfloat16)
  assert not supported(K=128, V=128, chunk_size=64, dtype=jnp.float32)


def test_content_eps_matches_reference():
  assert intra.CONTENT_EPS == gates.CONTENT_EPS


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family, dtype, D", [
    ("carve", jnp.bfloat16, 128), ("kda", jnp.bfloat16, 128), ("gdn2", jnp.bfloat16, 128),
    # float32 (TF32x3 dots on the GPU) compiles slowly at head size 128: head size 32.
    ("carve", jnp.float32, 32)])
def test_gpu_compiled(family, dtype, D):
  errs = _check(family, B=2, T=300, H=4, K=D, V=D, chunk_size=64, dtype=dtype, tol=GPU_KERNEL_TOL[dtype], seed=11)
  print(f"GPU max errors {family} {dtype.__name__}: {errs}")
