"""The Mosaic GPU CARVE state pass (`pallas_kernels.mosaic_state`, opt-in) against the
Triton one, in Mosaic GPU's interpret mode on the CPU (bf16 inputs; both keep h and V_new in bf16); the
GPU test compiles both and times them."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import forward as fw
from pallas_kernels.config import DEFAULT, TuningConfig
from conftest import rel_err


def _carve_inputs(B, T, H, K, V, C, seed=0, seg=None):
  """(logits, beta, v, prep's dict, gamma, S0) of random CARVE inputs (bf16); seg: packed documents' `Segments`."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (B, T, H, K), bf)
  k = jax.random.normal(ks[1], (B, T, H, K))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(bf)
  v = jax.random.normal(ks[2], (B, T, H, V), bf)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 4.0) / 16
  logits = jax.random.normal(ks[4], (B, T, H, K), bf)
  beta = jax.random.uniform(ks[5], (B, T, H), bf)
  gamma = 0.5 * jax.random.normal(ks[6], (H,))
  S0 = 0.1 * jax.random.normal(ks[7], (B, H, K, V))
  interpret = jax.default_backend() != "gpu"
  pre = fw.prep(q, k, g, None, None, None, seg, C=C, cfg=DEFAULT, dt=fw.Dtypes(q, interpret), interpret=interpret)
  return logits, beta, v, pre, gamma, S0


def _time_ms(f, reps=10):
  """Mean ms of f() over reps calls after one warm-up call (each synchronised)."""
  import time  # noqa: PLC0415
  jax.block_until_ready(f())
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(f())
  return (time.perf_counter() - t) / reps * 1e3


def _wy_w(st, logits, ke, gamma, C):
  """W = A (gate ke) [B, T, H, K] per chunk from a state pass's A and c (float32), gate = sigmoid(logits +
  gamma c_n): what the backward forms from them (`backward.bprep`)."""
  B, T, H, K = logits.shape
  c = jnp.repeat(jnp.swapaxes(st.c, 1, 2), C, axis=1)  # [B, T, H, K]
  gke = jax.nn.sigmoid(logits.astype(jnp.float32) + gamma[None, None, :, None] * c) * ke.astype(jnp.float32)
  A = st.A.astype(jnp.float32).reshape(B, T // C, C, H, C)
  return jnp.einsum("bnihj,bnjhk->bnihk", A, gke.reshape(B, T // C, C, H, K)).reshape(B, T, H, K)


@pytest.mark.parametrize("C", [64, 128])
def test_mask_codes_give_the_kernels_masks(C):
  """`mask_codes` -> the masks `_Masks` forms: within level p == strictly lower and `intra.part_masks(C)[p]`,
  across == strictly lower outside the 16-row diagonal blocks, the diagonal == the identity."""
  from pallas_kernels import intra  # noqa: PLC0415
  from pallas_kernels.mosaic_state import mask_codes  # noqa: PLC0415
  code = mask_codes(C, intra.DECAY_GROUP, jnp.bfloat16).astype(jnp.float32)
  _, strict = intra.lower_masks(C)
  for p, part in enumerate(intra.part_masks(C)):
    want = strict if part is None else strict & part
    assert bool(jnp.all(((code >= 2) & (code <= 2 + p)) == want)), p
  assert bool(jnp.all((code >= 3) == (strict & ~intra.part_masks(C)[0])))
  assert bool(jnp.all((code == 1) == jnp.eye(C, dtype=bool)))
  assert bool(jnp.all((code >= 2) == strict))


@pytest.mark.parametrize("B, T, H, K, V, C, cb, kind, ax, emit_w", [
    (1, 128, 1, 128, 128, 64, 64, "f16", "f16", True), (2, 256, 2, 128, 64, 64, 128, "f16", "f16", True),
    (1, 256, 1, 64, 128, 128, 128, "f16", "f16", True), (1, 128, 1, 128, 128, 64, 64, "bf16x3", "bf16x3", True),
    (1, 128, 1, 128, 128, 64, 64, "f16", "bf16x3", False)])  # the default at every shape, the other kinds at one
def test_mosaic_carve_state_pass_matches_triton(B, T, H, K, V, C, cb, kind, ax, emit_w):
  """CARVE's state loop in Mosaic GPU (interpret mode) == the Triton one: h, V_new, c, A, S_final (the Mosaic
  inverse's products in float16, ~2^-11 relative, or split bfloat16, ~2^-16; A X split bfloat16, or float16
  with X stored once; the Triton ones exact float32 in interpret mode), and its W (emit_w) == A (gate ke)
  from the Triton pass's A and c."""
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic  # noqa: PLC0415
  logits, beta, v, pre, gamma, S0 = _carve_inputs(B, T, H, K, V, C)
  ref = fw.carve_state_pass(logits, beta, v, pre, gamma, S0, cb=cb, C=C, cfg=DEFAULT, dt=fw.Dtypes(logits, True),
                            interpret=True)
  out = carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, C=C, cb=cb, interpret=True, inverse_kind=kind,
                                ax_kind=ax, emit_w=emit_w)
  names = ("h", "V_new", "c", "A", "S_final")
  errs = {n: rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) for n, a, r in zip(names, out, ref)}
  if emit_w:
    errs["W"] = rel_err(out.W.astype(jnp.float32), _wy_w(ref, logits, pre["ke"], gamma, C))
  print(kind, ax, errs)
  for name, a, r, tol in zip(names, out, ref, (1e-2, 1e-2, 1e-3, 1e-3, 1e-2)):
    want = jnp.float16 if name == "A" and kind == "f16" else r.dtype  # (A in float16: TF32's significand)
    assert a.shape == r.shape and a.dtype == want, name
    assert errs[name] < tol, name
  assert ref.W is None and (out.W is None) == (not emit_w)
  if emit_w:
    assert out.W.shape == pre["ke"].shape and out.W.dtype == jnp.bfloat16
    assert errs["W"] < 1e-2  # bf16 storage (measured 2.5e-3 to 2.9e-3)


# Packed rows at chunk = content block = 64 (T = 320, 5 chunks). Row 0: starts at 64 (chunk edge), 65, 66
# (length 1 each), 96 (mid-chunk; 100 long: its next block begins at 160, row 32 of chunk 2), 196 (chunk 3;
# next block at 260, row 4 of chunk 4). Row 1: starts at 70, 73, 273; the 200-long document's blocks begin
# mid-chunk in chunks 2 and 3 (two passes in a row), and the first one's at 64 is on a chunk edge.
PACKED_LENGTHS = [(64, 1, 1, 30, 100, 124), (70, 3, 200, 47)]


def _packed_inputs(D, T=320, B=2, H=1, seed=3):
  import numpy as np  # noqa: PLC0415
  from pallas_kernels.segments import segments  # noqa: PLC0415
  ids = jnp.asarray([np.repeat(np.arange(len(ls)), ls)[:T] for ls in PACKED_LENGTHS[:B]], jnp.int32)
  seg = segments(ids, Tp=T, chunk_size=64, content_block=64)
  logits, beta, v, pre, gamma, S0 = _carve_inputs(B, T, H, D, D, 64, seed=seed, seg=seg)
  return logits, beta, v, pre, 2.0 + gamma, 10 * S0, seg  # gamma ~2 and a large S0: the signals matter


def _packed_wy_w(st, logits, ke, gamma, seg, C):
  """W = A (gate ke) of packed documents from a state pass's A, c, c2: each row's signal by its content class."""
  from pallas_kernels.segments import AT_START, MID  # noqa: PLC0415
  from pallas_kernels.intra import CONTENT_EPS  # noqa: PLC0415
  B, T, H, K = logits.shape
  per_token = lambda x: jnp.repeat(jnp.swapaxes(x, 1, 2), C, axis=1)  # [B, H, N, K] -> [B, T, H, K]
  blk = seg.blk[:, :, None, None]
  c = jnp.where(blk == MID, per_token(st.c2), jnp.where(blk == AT_START, CONTENT_EPS**0.5, per_token(st.c)))
  gke = jax.nn.sigmoid(logits.astype(jnp.float32) + gamma[None, None, :, None] * c) * ke.astype(jnp.float32)
  A = st.A.astype(jnp.float32).reshape(B, T // C, C, H, C)
  return jnp.einsum("bnihj,bnjhk->bnihk", A, gke.reshape(B, T // C, C, H, K)).reshape(B, T, H, K)


def _packed_errors(out, ref, logits, pre, gamma, seg):
  """Relative errors of a packed state pass against the Triton one (c2 where it is read: chunks with a
  mid-chunk block; W against A (gate ke) from the Triton pass's A, c, c2)."""
  from pallas_kernels.segments import MID  # noqa: PLC0415
  B, T = seg.blk.shape
  mid = jnp.any(seg.blk.reshape(B, T // 64, 64) == MID, axis=-1)[:, None, :, None]  # [B, 1, N, 1]
  f = lambda x: x.astype(jnp.float32)
  errs = {n: rel_err(f(getattr(out, n)), f(getattr(ref, n))) for n in ("h", "vn", "c", "A", "S")}
  errs["c2"] = rel_err(jnp.where(mid, out.c2, 0.0), jnp.where(mid, ref.c2, 0.0))
  errs["W"] = rel_err(f(out.W), _packed_wy_w(ref, logits, pre["ke"], gamma, seg, 64))
  return errs


@pytest.mark.parametrize("D", [64])
def test_mosaic_packed_state_pass_matches_triton(D):
  """Packed documents in the Mosaic loop (interpret mode) == the Triton loop's packed pass: h, V_new, c, A,
  S_final, c2 of the chunks with a mid-chunk block (two passes each, some in a row), and its W == A (gate ke)
  with each row's signal; the documents change the result (a reset state differs from the carried one)."""
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic, packed_schedule  # noqa: PLC0415
  logits, beta, v, pre, gamma, S0, seg = _packed_inputs(D)
  sch = packed_schedule(seg.blk, 64)
  assert sch.npass.tolist() == [7, 8]  # the layout is as described: chunks 2, 4 / 2, 3, 4 take two passes
  assert sch.kind[0, :7].tolist() == [0, 0, 1, 2, 0, 1, 2] and sch.chunk[1, :8].tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
  ref = fw.carve_state_pass(logits, beta, v, pre, gamma, S0, seg, cb=64, C=64, cfg=DEFAULT,
                            dt=fw.Dtypes(logits, True), interpret=True)
  out = carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, seg, C=64, cb=64, interpret=True)
  errs = _packed_errors(out, ref, logits, pre, gamma, seg)
  print("packed Mosaic against Triton:", errs)  # measured h 1.8e-3, vn 1.5e-3, c 1.1e-4, A 1.9e-4, c2 1.5e-4
  tol = dict(h=1e-2, vn=1e-2, c=1e-3, A=1e-3, S=1e-2, c2=1e-3, W=1e-2)
  assert all(errs[n] < tol[n] for n in tol), errs
  assert out.c2.shape == ref.c2.shape == out.c.shape
  # without the documents' masks and signals the same inputs give another state: the check can fail
  unpacked = carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, C=64, cb=64, interpret=True)
  assert rel_err(unpacked.S, ref.S) > 0.1


def test_mosaic_packed_through_the_kernels_fwd_and_grads():
  """carve_state_kernel='mosaic' with segment ids through `pallas_gated_delta` (interpret mode, bf16 inputs):
  the loss and every gradient against the float32 chunk path with the same segment ids are as close as the
  Triton loop's (both at bf16 rounding: gamma's gradient is itself bf16, one ulp 4e-3)."""
  from pallas_kernels import pallas_gated_delta  # noqa: PLC0415
  from carve_jax.ops import carve  # noqa: PLC0415
  from carve_jax.ops.sample_inputs import family_inputs  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  inp = family_inputs(jax.random.PRNGKey(22), "carve", B=1, T=200, H=1, K=64, V=64, dtype=jnp.bfloat16,
                      initial_state=True)
  seg = jnp.asarray(np.repeat(np.arange(4), (30, 1, 120, 49))[None], jnp.int32)  # blocks begin mid-chunk
  args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["erase_logits"], inp["beta"], 1.0 + inp["gamma"])
  S0 = inp["initial_state"]
  kw = dict(initial_state=S0, chunk_size=64, content_block=64, segment_ids=seg)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)

  def loss(o, S):
    return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(S**2)
  with jax.default_matmul_precision("highest"):
    l_ref, g_ref = jax.value_and_grad(
        lambda a: loss(*carve(*a, output_final_state=True, impl="chunk", **kw)))(f32(args))
  errs = {}
  for name in ("mosaic", "triton"):
    cfg = TuningConfig(carve_state_kernel=name)
    l, g = jax.value_and_grad(lambda a: loss(*pallas_gated_delta(*a, scale=0.125, **kw, config=cfg)))(args)
    errs[name] = [abs(float(l - l_ref)) / abs(float(l_ref))] + [rel_err(x, y) for x, y in zip(f32(g), g_ref)]
  print("packed through the kernels, errors (loss, d args) against float32:", errs)
  # measured: loss 9e-4 / 1.1e-3, grads <= 6.0e-3 both; dgamma 2.1e-3 / 8.7e-3 (bf16 ulps)
  assert all(e < 1e-2 for e in errs["mosaic"]), errs
  assert all(m <= 1.5 * t + 1e-3 for m, t in zip(errs["mosaic"], errs["triton"])), errs


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [128, 64])  # head 64: the 50m preset's (in `GPU_CHECKED_SIZES` since 4b8108a passed)
def test_gpu_mosaic_carve_state_pass(D):
  """On the GPU: the compiled Mosaic kernel == the compiled Triton one (bf16, head D), its W == A (gate ke)
  from the Triton pass's A and c, and their times."""
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic  # noqa: PLC0415
  logits, beta, v, pre, gamma, S0 = _carve_inputs(2, 2048, 16, D, D, 64)
  kw = dict(C=64, cfg=TuningConfig(carve_state_kernel="triton"), dt=fw.Dtypes(logits, False), interpret=False)
  triton = jax.jit(lambda: fw.carve_state_pass(logits, beta, v, pre, gamma, S0, cb=64, **kw))
  mosaic = jax.jit(lambda: carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, C=64, cb=64, interpret=False))
  ref, out = triton(), mosaic()
  for name, a, r in zip(("h", "V_new", "c", "A", "S_final"), out, ref):
    assert rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) < 2e-2, name
  w_err = rel_err(out.W.astype(jnp.float32), _wy_w(ref, logits, pre["ke"], gamma, 64))
  print(f"head {D}: W error {w_err:.2e}")
  assert w_err < 2e-2
  for name, f in (("triton", triton), ("mosaic", mosaic)):
    print(f"CARVE state pass B2 T2048 H16 head {D}: {name} {_time_ms(f):.3f} ms")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [128, 64])  # head 64: the Triton loop and the default only
def test_gpu_mosaic_kernels_match_reference(D):
  """On the GPU, bf16, head D: `pallas_gated_delta` with the Mosaic state loop (each inverse kind) and with
  the Triton one (and the default's A X in float16 and W from the loop against split A X and W formed in the
  backward), forward and every gradient, against the float32 "highest" chunk path, within the kernels'
  GPU tolerance; prints each path's errors (the Mosaic ones should match the Triton ones')."""
  from pallas_kernels import pallas_gated_delta  # noqa: PLC0415
  from carve_jax.ops import carve  # noqa: PLC0415
  from carve_jax.ops.sample_inputs import family_inputs  # noqa: PLC0415
  from conftest import GPU_KERNEL_TOL  # noqa: PLC0415
  inp = family_inputs(jax.random.PRNGKey(11), "carve", B=2, T=300, H=4, K=D, V=D, dtype=jnp.bfloat16,
                      initial_state=True)
  names = ("q", "k", "v", "g", "erase_logits", "beta", "gamma", "initial_state")
  kc = jax.random.split(jax.random.PRNGKey(111))
  ct_o = jax.random.normal(kc[0], inp["v"].shape, jnp.float32)
  ct_s = jax.random.normal(kc[1], inp["initial_state"].shape, jnp.float32)

  def loss(out):
    o, S = out
    return jnp.sum(o.astype(jnp.float32) * ct_o) + jnp.sum(S.astype(jnp.float32) * ct_s), out

  def ref(x):
    *a, S0 = (x[n] for n in names)
    return loss(carve(*a, initial_state=S0, output_final_state=True, impl="chunk", chunk_size=64))

  def ours(x, cfg):
    *a, S0 = (x[n] for n in names)
    return loss(pallas_gated_delta(*a, scale=D**-0.5, initial_state=S0, chunk_size=64, content_block=64,
                                   config=cfg))
  wide = {n: inp[n].astype(jnp.float32) for n in names}
  with jax.default_matmul_precision("highest"):
    (_, out_ref), g_ref = jax.jit(jax.value_and_grad(ref, has_aux=True))(wide)
  configs = (("triton", TuningConfig(carve_state_kernel="triton")),
             ("mosaic f16", TuningConfig(carve_state_kernel="mosaic")),
             ("mosaic bf16x3", TuningConfig(carve_state_kernel="mosaic", mosaic_inverse="bf16x3")),
             ("mosaic, A X bf16x3, W in bprep", TuningConfig(carve_state_kernel="mosaic", mosaic_ax="bf16x3",
                                                             mosaic_w=False)))
  for label, cfg in configs[:2] if D == 64 else configs:
    (_, out), g = jax.jit(jax.value_and_grad(lambda x: ours(x, cfg), has_aux=True))({n: inp[n] for n in names})
    errs = {n: rel_err(a.astype(jnp.float32), r) for n, a, r in zip("oS", out, out_ref)}
    errs |= {"d" + n: rel_err(g[n].astype(jnp.float32), g_ref[n]) for n in names}
    print(f"GPU errors, head {D}, {label}: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    assert max(errs.values()) < GPU_KERNEL_TOL[jnp.bfloat16], (label, errs)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [128, 64])
def test_gpu_mosaic_packed(D):
  """On the GPU, packed documents: the compiled Mosaic loop == the compiled Triton one (state pass, W), and
  `pallas_gated_delta` with each loop, forward and every gradient against the float32 chunk path (documents
  of random lengths, content block = chunk = 64: most chunks take two passes); prints errors and times."""
  import numpy as np  # noqa: PLC0415
  from pallas_kernels import pallas_gated_delta  # noqa: PLC0415
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic  # noqa: PLC0415
  from pallas_kernels.segments import segments  # noqa: PLC0415
  from carve_jax.ops import carve  # noqa: PLC0415
  from carve_jax.ops.sample_inputs import family_inputs  # noqa: PLC0415
  from conftest import GPU_KERNEL_TOL  # noqa: PLC0415
  B, T, H = 2, 2048, 16
  rng = np.random.default_rng(5)
  ids = jnp.asarray([np.repeat(np.arange(60), rng.integers(1, 200, size=60))[:T] for _ in range(B)], jnp.int32)
  seg = segments(ids, Tp=T, chunk_size=64, content_block=64)
  logits, beta, v, pre, gamma, S0 = _carve_inputs(B, T, H, D, D, 64, seg=seg)
  kw = dict(C=64, cfg=TuningConfig(carve_state_kernel="triton"), dt=fw.Dtypes(logits, False), interpret=False)
  triton = jax.jit(lambda: fw.carve_state_pass(logits, beta, v, pre, gamma, S0, seg, cb=64, **kw))
  mosaic = jax.jit(lambda: carve_state_pass_mosaic(logits, beta, v, pre, gamma, S0, seg, C=64, cb=64,
                                                   interpret=False))
  errs = _packed_errors(mosaic(), triton(), logits, pre, gamma, seg)
  print(f"GPU packed state pass, head {D}, Mosaic against Triton: "
        + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
  assert max(errs.values()) < 2e-2, errs
  for name, f in (("triton", triton), ("mosaic", mosaic)):
    print(f"packed CARVE state pass B{B} T{T} H{H} head {D}: {name} {_time_ms(f):.3f} ms")
  # through the kernels, forward and gradients, against float32
  inp = family_inputs(jax.random.PRNGKey(12), "carve", B=2, T=700, H=4, K=D, V=D, dtype=jnp.bfloat16,
                      initial_state=True)
  names = ("q", "k", "v", "g", "erase_logits", "beta", "gamma", "initial_state")
  seg2 = ids[:, :700]
  ct = jax.random.normal(jax.random.PRNGKey(13), inp["v"].shape, jnp.float32)

  def loss(x, f):
    *a, S0_ = (x[n] for n in names)
    o, S = f(a, S0_)
    return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(S.astype(jnp.float32) ** 2)
  ref = lambda a, S0_: carve(*a, initial_state=S0_, output_final_state=True, impl="chunk", chunk_size=64,
                             content_block=64, segment_ids=seg2)
  with jax.default_matmul_precision("highest"):
    g_ref = jax.jit(jax.grad(lambda x: loss(x, ref)))({n: inp[n].astype(jnp.float32) for n in names})
  for label in ("triton", "mosaic"):
    cfg = TuningConfig(carve_state_kernel=label)
    ours = lambda a, S0_, cfg=cfg: pallas_gated_delta(*a, scale=D**-0.5, initial_state=S0_, chunk_size=64,
                                                      content_block=64, segment_ids=seg2, config=cfg)
    gr = jax.jit(jax.grad(lambda x: loss(x, ours)))({n: inp[n] for n in names})
    e = {"d" + n: rel_err(gr[n].astype(jnp.float32), g_ref[n]) for n in names}
    print(f"GPU packed errors, head {D}, {label}: " + ", ".join(f"{n} {x:.2e}" for n, x in e.items()))
    assert max(e.values()) < GPU_KERNEL_TOL[jnp.bfloat16], (label, e)


def test_mosaic_carve_through_the_kernels_fwd_and_grads():
  """carve_state_kernel='mosaic' through `pallas_gated_delta` (interpret mode, bf16): the forward and every
  gradient (the Triton backward on the Mosaic forward's residuals) == the Triton forward's, to bf16 rounding."""
  from pallas_kernels import pallas_gated_delta  # noqa: PLC0415
  from carve_jax.ops.sample_inputs import family_inputs  # noqa: PLC0415
  inp = family_inputs(jax.random.PRNGKey(21), "carve", B=1, T=100, H=2, K=64, V=64, dtype=jnp.bfloat16,
                      initial_state=True)
  args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["erase_logits"], inp["beta"], inp["gamma"])
  kw = dict(scale=0.125, initial_state=inp["initial_state"], chunk_size=64, content_block=64)

  def loss(args, cfg):
    o, S = pallas_gated_delta(*args, **kw, config=cfg)
    return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(S**2)
  l1, g1 = jax.value_and_grad(loss)(args, TuningConfig(carve_state_kernel="mosaic"))
  assert float(loss(args, TuningConfig(carve_state_kernel="mosaic"))) == float(l1)  # the primal (no W written)
  l2, g2 = jax.value_and_grad(loss)(args, TuningConfig(carve_state_kernel="triton"))
  g_err = rel_err(jax.tree.map(lambda x: x.astype(jnp.float32), g1), jax.tree.map(lambda x: x.astype(jnp.float32), g2))
  assert abs(float(l1 - l2)) <= 1e-4 * abs(float(l2))  # measured 1.6e-5 (float16 inverse; split bf16: 3e-7)
  assert g_err < 3e-3  # measured 1.1e-3 (split bf16: 6e-5)
  with pytest.raises(ValueError, match="carve_state_kernel"):
    TuningConfig(carve_state_kernel="cuda")


def test_auto_picks_the_mosaic_kernel_where_it_runs():
  """carve_state_kernel="auto": Mosaic GPU when compiled with 16-bit inputs, unpacked, at the GPU-checked sizes
  (heads 128 and 64, chunk 64: SMEM 218 KB of 227 at 128), else Triton; explicit choices stand."""
  from pallas_kernels import TuningConfig  # noqa: PLC0415
  from pallas_kernels.mosaic_state import SMEM_LIMIT, smem_bytes  # noqa: PLC0415
  pick = lambda dtype=jnp.bfloat16, K=128, C=64, packed=False, interpret=False, cfg=DEFAULT: fw.carve_state_kernel(
      cfg, dtype, K=K, V=K, C=C, packed=packed, interpret=interpret)
  assert DEFAULT.carve_state_kernel == "auto"
  assert pick() == "mosaic" and pick(jnp.float16) == "mosaic"
  assert smem_bytes(128, 128, 64) == 222848 < SMEM_LIMIT
  assert pick(packed=True) == "mosaic" and pick(K=64, packed=True) == "mosaic"  # packed: GPU-checked at e9d2b3c
  for kw in (dict(dtype=jnp.float32), dict(packed=True, interpret=True), dict(interpret=True), dict(K=256), dict(K=96),
             dict(C=128), dict(C=32), dict(cfg=TuningConfig(carve_state_kernel="triton"))):
    assert pick(**kw) == "triton", kw
  assert pick(jnp.float32, cfg=TuningConfig(carve_state_kernel="mosaic")) == "mosaic"
  from pallas_kernels.mosaic_state import fits  # noqa: PLC0415
  assert pick(K=64) == "mosaic"  # head 64 (the 50m preset's): GPU-checked too
  assert fits(K=64, V=64, C=64) and not fits(K=256, V=256, C=64) and not fits(K=96, V=96, C=64)


@pytest.mark.parametrize("kind, ax, emit_w, D", [("f16", "f16", True, 128), ("bf16x3", "bf16x3", True, 128),
                                               ("f16", "bf16x3", False, 128), ("f16", "f16", False, 128),
                                               ("f16", "f16", True, 64)])  # head 64 (the 50m preset's)
def test_mosaic_carve_lowers_for_cuda(kind, ax, emit_w, D):
  """The kernel lowers for CUDA on a CPU-only machine at head size 128 (`jax.export`): Mosaic GPU's own
  checks pass (wgmma operand dtypes and majorness, no select with an implicit broadcast, shared memory
  within the H100/H200's 227 KB). Compiling and running it needs the GPU test above."""
  from jax import export  # noqa: PLC0415
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic  # noqa: PLC0415
  B, T, H, K, V, C, P = 1, 256, 2, D, D, 64, 3
  sd = jax.ShapeDtypeStruct
  x = sd((B, T, H, K), jnp.bfloat16)
  args = (x, sd((B, T, H), jnp.bfloat16), sd((B, T, H, V), jnp.bfloat16), sd((P, B, T, H, K), jnp.bfloat16),
          sd((P, B, T, H, K), jnp.bfloat16), x, x, sd((B, H, T // C, K), jnp.float32), sd((H,), jnp.float32),
          sd((B, H, K, V), jnp.float32))
  f = lambda l, beta, v, kr, kc, ke, kd, gc, gam, S0: carve_state_pass_mosaic(
      l, beta, v, dict(kr=kr, kc=kc, ke=ke, kd=kd, gc=gc), gam, S0, C=C, cb=64, interpret=False, inverse_kind=kind,
      ax_kind=ax, emit_w=emit_w)
  assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
  # the on-device profiler (its trace leaves through a host callback: GPU only, not lowered here) refuses
  # interpret mode and more chunks than its SMEM buffer holds
  for T_, interpret in ((64 * 13, False), (128, True)):
    with pytest.raises(ValueError, match="profile_dir"):
      jax.eval_shape(lambda x: carve_state_pass_mosaic(
          x, x[..., 0], x, dict(kr=x[None], kc=x[None], ke=x, kd=x, gc=x[:, :1, 0].T[None]), jnp.zeros((1,)),
          jnp.zeros((1, 1, 64, 64)), C=64, cb=64, interpret=interpret, profile_dir="/tmp/unused"),
          jax.ShapeDtypeStruct((1, T_, 1, 64), jnp.bfloat16))


@pytest.mark.parametrize("D, emit_w", [(128, True), (64, True), (128, False)])
def test_mosaic_packed_lowers_for_cuda(D, emit_w):
  """The packed loop (document masks, per-row signals, the pass schedule's while loop and two-pass chunks)
  lowers for CUDA on the CPU (`jax.export`): Mosaic GPU's layout inference and SMEM checks pass."""
  from jax import export  # noqa: PLC0415
  from pallas_kernels.mosaic_state import carve_state_pass_mosaic, fits, smem_bytes  # noqa: PLC0415
  from pallas_kernels.segments import Segments  # noqa: PLC0415
  B, T, H, C, P = 1, 256, 2, 64, 3
  sd = jax.ShapeDtypeStruct
  x = sd((B, T, H, D), jnp.bfloat16)
  vec = sd((B, H, T // C, D), jnp.float32)
  ids = sd((B, T), jnp.int32)
  args = (x, sd((B, T, H), jnp.bfloat16), x, sd((P, B, T, H, D), jnp.bfloat16), sd((P, B, T, H, D), jnp.bfloat16),
          x, x, vec, sd((H,), jnp.float32), sd((B, H, D, D), jnp.float32), x, vec, ids, ids)
  f = lambda l, beta, v, kr, kc, ke, kd, gc, gam, S0, kj, gj, doc, blk: carve_state_pass_mosaic(
      l, beta, v, dict(kr=kr, kc=kc, ke=ke, kd=kd, gc=gc, kj=kj, gj=gj), gam, S0, Segments(ids=doc, doc=doc, blk=blk),
      C=C, cb=64, interpret=False, emit_w=emit_w)
  assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
  assert fits(K=D, V=D, C=C, packed=True) and smem_bytes(D, D, C, packed=True) - smem_bytes(D, D, C) == 3 * 128 + 4 * D


def test_mosaic_step_probe_lowers_for_cuda():
  """Every variant of `experiments.mosaic_step_probe` (the per-step cost the v8 notes leave open) lowers for
  CUDA on the CPU, so its device call runs them."""
  from jax import export  # noqa: PLC0415
  from experiments.mosaic_step_probe import VARIANTS, step_kernel  # noqa: PLC0415
  for variant in VARIANTS:
    assert "mosaic_gpu" in export.export(step_kernel(variant, steps=4, programs=2), platforms=["cuda"])().mlir_module()
  with pytest.raises(ValueError, match="variant"):
    step_kernel("split2", 4, 2)


def test_summarize_trace_pairs_begins_with_ends_per_thread():
  """The step probe's trace summary: durations pair B / E per (pid, tid, name), nested and interleaved
  across warpgroups; an unmatched end is an error."""
  from experiments.mosaic_step_probe import summarize_trace  # noqa: PLC0415
  ev = lambda name, ph, ts, tid: dict(name=name, ph=ph, ts=ts, pid=1, tid=tid)
  trace = {"traceEvents": [ev("a", "B", 0.0, 1), ev("b", "B", 0.5, 2), ev("c", "B", 1.0, 1), ev("c", "E", 1.5, 1),
                           ev("a", "E", 2.0, 1), ev("b", "E", 4.5, 2), ev("a", "B", 5.0, 1), ev("a", "E", 9.0, 1)]}
  out = summarize_trace(trace)
  assert out["a"] == dict(count=2, mean_us=3.0, median_us=3.0)
  assert out["b"]["mean_us"] == 4.0 and out["c"]["count"] == 1 and out["c"]["mean_us"] == 0.5
  with pytest.raises(ValueError, match="end without a begin"):
    summarize_trace({"traceEvents": [ev("a", "E", 1.0, 1)]})
