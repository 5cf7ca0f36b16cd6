r"""Do FLA 0.6.0's own model classes compute our exported models' function? (GPU; issue 14.)

For each mixer (GDN-2, KDA, Gated DeltaNet) a carve_jax LM with random weights (every norm weight,
bias and gate parameter perturbed too, so a misplaced tensor shows) is exported with
`carve_jax.interop.save_hf`, loaded with flash-linear-attention's `AutoModelForCausalLM` and run on
the same random tokens. Figures per (mixer, T, FLA dtype), against our float32 logits:

    rel   = ||logits_fla - logits_ours||_F / ||logits_ours||_F,   max_abs,   top-1 agreement

and, as the bf16 yardstick, our own bfloat16-compute model against our float32 one. FLA runs its
`fused_recurrent` kernels for T <= 64 and `chunk` kernels above (eval mode, no grad). Pass:
float32 rel < 1e-4; bfloat16 rel < max(3 x our bf16 rel, 1e-2).

FLA 0.6.0 has the GatedDeltaNet2 layer but no GDN-2 model class: the script builds FLA's KDA model
with every `attn` replaced by `fla.layers.GatedDeltaNet2` (the layout we export) and loads our
tensors into it with a key check (`gdn2_model`).
FLA guards `chunk_gated_delta_rule` on Triton < 3.7.1 on Hopper, so Gated DeltaNet is checked at T <= 64.

    python3 -m experiments.interop_fla_check --out $OUT/interop_fla_check.md     # GPU, carry .peers
    python -m experiments.interop_fla_check --export_only --d_model 64 --n_heads 2 --n_layers 1 --lengths 8

The FLA wheels (flash_linear_attention-0.6.0, fla_core-0.6.0) are taken from --wheels (default
.peers/) and pip-installed into /tmp/fla_site unless `import fla` already works; the Triton
autotune seed (--autotune_seed, default .peers/fla_autotune_h200.tgz when present) saves FLA's
chunk-kernel autotuning at H=16, K=V=128, bf16.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIXERS = ("gdn2", "kda", "gdn")
WHEELS = ("flash_linear_attention-0.6.0-*.whl", "fla_core-0.6.0-*.whl")


@dataclasses.dataclass
class InteropFlags:
  """Flags of the FLA interop check.

  Attributes:
    models: which of our mixers to export and check (comma list).
    lengths: sequence lengths T (comma list).
    batch: rows of random tokens.
    d_model: model width.
    n_heads: heads (head size d_model / n_heads).
    n_layers: blocks.
    vocab_size: vocabulary.
    seed: parameter and token seed.
    wheels: folder holding the two FLA wheels.
    autotune_seed: tgz of Triton *.autotune.json (default: <wheels>/fla_autotune_h200.tgz if present).
    out: the results file (markdown).
    export_only: export and compute our logits only (CPU check).
  """
  models: tuple[str, ...] = MIXERS
  lengths: tuple[int, ...] = (64, 512)
  batch: int = 2
  d_model: int = 2048
  n_heads: int = 16
  n_layers: int = 2
  vocab_size: int = 256
  seed: int = 0
  wheels: str = os.path.join(ROOT, ".peers")
  autotune_seed: str | None = None
  out: str = os.path.join(ROOT, "experiments", "results", "interop", "interop_fla_check.md")
  export_only: bool = False


def _bad(msg: str):
  """Exit 2 with the message on stderr, as a bad flag does."""
  print(f"interop_fla_check: {msg}", file=sys.stderr)
  raise SystemExit(2)


def parse_args(argv=None) -> InteropFlags:
  from carve_jax.train import flags as train_flags  # noqa: PLC0415
  argv = sys.argv[1:] if argv is None else list(argv)
  a = train_flags.cli(InteropFlags, train_flags.normalise_argv(argv), prog="python -m experiments.interop_fla_check",
                      description=__doc__)
  if not a.models or any(m not in MIXERS for m in a.models):
    _bad(f"--models must be a non-empty comma list from {MIXERS}, got {a.models}")
  if not a.lengths or min(a.lengths) < 1:
    _bad(f"--lengths must be positive ints, got {a.lengths}")
  for name in ("batch", "d_model", "n_heads", "n_layers", "vocab_size"):
    if getattr(a, name) < 1:
      _bad(f"--{name} must be >= 1, got {getattr(a, name)}")
  if a.d_model % a.n_heads:
    _bad(f"--n_heads must divide --d_model={a.d_model}, got {a.n_heads}")
  if a.autotune_seed is None:
    seed = os.path.join(a.wheels, "fla_autotune_h200.tgz")
    a.autotune_seed = seed if os.path.isfile(seed) else ""
  return a


def install_fla(wheels: str) -> str:
  """Makes `import fla` work: installs the two wheels into /tmp/fla_site if needed; returns fla's path."""
  try:
    import fla
    return os.path.dirname(fla.__file__)
  except ImportError:
    pass
  found = [sorted(glob.glob(os.path.join(wheels, w))) for w in WHEELS]
  missing = [w for w, f in zip(WHEELS, found) if not f]
  if missing:
    _bad(f"--wheels {wheels} lacks {missing} (pip download --no-deps "
                     "flash-linear-attention==0.6.0 fla-core==0.6.0 -d .peers)")
  site = "/tmp/fla_site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", site,
                  *[f[-1] for f in found]], check=True)
  sys.path.insert(0, site)
  import fla
  return os.path.dirname(fla.__file__)


def seed_autotune(path: str) -> None:
  if not path:
    return
  cache = os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-"))
  with tarfile.open(path) as tf:
    for m in tf.getmembers():
      if m.isfile() and m.name.endswith(".autotune.json"):
        m.name = os.path.join(*m.name.split("/")[-2:])
        tf.extract(m, cache)


def make_model(mixer: str, a):
  """A carve_jax LM with random weights, every 1-D parameter perturbed away from its init."""
  import jax
  import numpy as np
  from flax import nnx
  from carve_jax.configs import ModelConfig
  from carve_jax.model import LM
  cfg = ModelConfig(mixer=mixer, vocab_size=a.vocab_size, d_model=a.d_model, n_layers=a.n_layers,
                    n_heads=a.n_heads, output_gate="full_swish" if mixer == "gdn" else "lowrank_sigmoid",
                    compute_dtype="float32", impl="chunk", max_seq_len=max(2048, max(a.lengths)))
  model = LM(cfg, rngs=nnx.Rngs(a.seed))
  rng = np.random.default_rng(a.seed + 1)
  graphdef, params = nnx.split(model, nnx.Param)
  def perturb(path, x):
    name = str(path[-1])
    if x.ndim != 1 or "A_log" in name or "dt_bias" in name:
      return x
    return x + jax.numpy.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype)
  params = jax.tree_util.tree_map_with_path(perturb, params)
  return nnx.merge(graphdef, params)


def gdn2_model(hf_dir: str, conf: dict, dtype):
  """`hf_dir`'s GDN-2 model (its config.json read as `conf`) in FLA 0.6.0, which has no GDN-2 model
  class: FLA's KDA model with every `attn` replaced by
  `fla.layers.GatedDeltaNet2` (the layout we export), our tensors loaded with a strict key check.
  (A `KDAConfig` subclass registered as "gdn2" does not work under transformers 5: its fields are
  not set on the subclass, "'GDN2Config' object has no attribute 'num_hidden_layers'".)"""
  from fla.layers import GatedDeltaNet2
  from fla.models import KDAConfig, KDAForCausalLM
  from safetensors.torch import load_file
  conf = {k: v for k, v in conf.items() if k not in ("model_type", "architectures", "carve_jax")}
  config = KDAConfig(**conf)
  model = KDAForCausalLM(config)
  for i, block in enumerate(model.model.layers):
    block.attn = GatedDeltaNet2(mode=config.attn_mode, hidden_size=config.hidden_size, expand_v=config.expand_v,
                                head_dim=config.head_dim, num_heads=config.num_heads,
                                num_v_heads=config.num_v_heads, use_short_conv=config.use_short_conv,
                                allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size,
                                norm_eps=config.norm_eps, layer_idx=i)
  state = load_file(os.path.join(hf_dir, "model.safetensors"))
  missing, unexpected = model.load_state_dict(state, strict=False)
  if config.tie_word_embeddings:
    missing = [k for k in missing if k != "lm_head.weight"]
  info = {"missing_keys": missing, "unexpected_keys": unexpected}
  return model.to(dtype), info


def fla_logits(hf_dir: str, tokens, dtype: str):
  import torch
  import fla  # noqa: F401  (registers FLA's classes with transformers)
  from transformers import AutoModelForCausalLM
  tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  with open(os.path.join(hf_dir, "config.json")) as fh:
    conf = json.load(fh)
  if conf["model_type"] == "gdn2":
    model, info = gdn2_model(hf_dir, conf, tdt)
  else:
    try:
      model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=tdt, output_loading_info=True)
    except TypeError:
      model, info = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=tdt, output_loading_info=True)
  bad = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
  if bad:  # transformers would silently initialise a missing tensor at random
    raise RuntimeError(f"FLA's {type(model).__name__} does not take our tensors as they are: {bad}")
  model = model.to("cuda").eval()
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long, device="cuda"), use_cache=False).logits
  return out.float().cpu().numpy()


def compare(a, b) -> dict:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return {"rel": float(np.linalg.norm(a - b) / np.linalg.norm(b)), "max_abs": float(np.max(np.abs(a - b))),
          "top1": float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))}


def main(argv=None) -> int:
  a = parse_args(argv)
  if not a.export_only:
    seed_autotune(a.autotune_seed)  # before triton is imported
    fla_dir = install_fla(a.wheels)
  import jax
  import numpy as np
  from flax import nnx
  from carve_jax.interop.fla_layout import from_fla_tensors, to_fla_tensors
  jax.config.update("jax_default_matmul_precision", "highest")  # a float32 reference, no TF32

  def forward(m, tokens):
    graphdef, state = nnx.split(m)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jax.numpy.asarray(tokens)))
  from carve_jax.interop.hf_folder import save_hf
  work = tempfile.mkdtemp(prefix="interop-fla-")
  rows, ok = [], True
  t_start = time.time()

  def write(done: bool) -> None:  # after every row: a run cut at its time limit keeps what it measured
    lines = ["# FLA 0.6.0 logits vs carve_jax (experiments/interop_fla_check.py)", "",
             f"Models: d_model {a.d_model}, {a.n_heads} heads x {a.d_model // a.n_heads}, {a.n_layers} layers, vocab "
             f"{a.vocab_size}, batch {a.batch}, seed {a.seed}; reference: our float32 logits (impl chunk). "
             f"{'Export only (FLA not run).' if a.export_only else f'FLA from {fla_dir}.'} "
             f"Device: {jax.devices()[0].device_kind}. Wall: {time.time() - t_start:.0f} s"
             f"{'' if done else ' (incomplete: the run stopped before its last row)'}.", "",
             "| mixer | T | logits of | rel | max_abs | top-1 agree | verdict |", "|---|---|---|---|---|---|---|"]
    for mixer, T, who, verdict, m in rows:
      figs = ("", "", "") if m is None else (f"{m['rel']:.2e}", f"{m['max_abs']:.2e}", f"{m['top1']:.4f}")
      lines.append(f"| {mixer} | {T} | {who} | {figs[0]} | {figs[1]} | {figs[2]} | {verdict} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
      fh.write("\n".join(lines) + "\n")
    if rows:
      print(f"[{time.time() - t_start:.0f} s] {lines[-1]}", flush=True)
  for mixer in a.models:
    model = make_model(mixer, a)
    hf_dir = save_hf(model, os.path.join(work, mixer), tokenizer="byte", eos_id=0)
    bf16 = from_fla_tensors(model.cfg.replace(compute_dtype="bfloat16"), to_fla_tensors(model))
    for T in a.lengths:
      if mixer == "gdn" and T > 64 and not a.export_only:
        rows.append((mixer, T, "-", "skipped: FLA refuses chunk_gated_delta_rule on Hopper with Triton < 3.7.1", None))
        continue
      tokens = np.asarray(jax.random.randint(jax.random.key(a.seed + T), (a.batch, T), 0, a.vocab_size), np.int32)
      ours = forward(model, tokens)
      yard = compare(forward(bf16, tokens), ours)
      rows.append((mixer, T, "ours bf16", "yardstick", yard))
      write(done=False)
      if a.export_only:
        continue
      for dtype in ("bfloat16", "float32") if T <= 64 else ("bfloat16",):
        t0 = time.time()
        try:
          got = compare(fla_logits(hf_dir, tokens, dtype), ours)
        except Exception as e:  # report, keep going
          rows.append((mixer, T, f"FLA {dtype}", f"error: {type(e).__name__}: {str(e)[:200]}", None))
          ok = False
          write(done=False)
          continue
        limit = 1e-4 if dtype == "float32" else max(3 * yard["rel"], 1e-2)
        passed = got["rel"] < limit
        ok &= passed
        rows.append((mixer, T, f"FLA {dtype}", f"{'PASS' if passed else 'FAIL'} (rel < {limit:.1e}), "
                     f"{time.time() - t0:.1f} s", got))
        write(done=False)
  write(done=True)
  print(open(a.out).read())
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
