"""The pure training step: data-parallel gradients with `jax.shard_map`, one optimizer update.

    loss_d, g_d = value_and_grad(loss_fn)(params, rows of device d)   (mean over micro-batches)
    loss, g     = pmean_d loss_d, pmean_d g_d                          (lax.pmean over `data`)
    ok          = isfinite(loss) and isfinite(|g|)
    params, opt = AdamW update if ok else unchanged;  step += 1;  skipped += not ok

Every device holds the parameters (replicated, `P()`) and its slice of the global batch
(`P("data")`); each device's rows are split into `grad_accum` equal micro-batches whose gradients
are averaged by a `lax.scan`, so the result equals one step on the whole global batch (up to
floating-point summation order). Since every row holds `T` tokens, the mean of per-device means
is the global per-token mean.

Precision: parameters (the master copy) and optimizer state are float32; the model computes in
its `ModelConfig.compute_dtype` (bfloat16 on GPU runs) and casts to float32 for the loss, so the
gradients and the update are float32.

The model is an `nnx.Module` split once into (graphdef, params, rest) with `nnx.split(model,
nnx.Param, ...)`; the step merges them inside the trace. `rest` (non-parameter state) is a
constant of the step.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from carve_jax.train.distributed import DATA_AXIS

LossFn = Callable[[nnx.Module, dict, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """Everything a resumed run needs besides the data iterator's position.

  step: int32 [] optimizer steps taken (skipped ones included).
  params: nnx.State of the model's nnx.Param leaves (float32).
  opt_state: the optax state.
  rng: uint32 [2] raw key data (`jax.random.key_data`); step t uses fold_in(key, t).
  skipped: int32 [] steps whose loss or gradient was NaN/Inf (not applied).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


def lm_loss(model: nnx.Module, batch: dict, rng: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy; batch {"inputs","targets"}: int32 [B, T], and "segment_ids"
  int32 [B, T] when the data packs documents with resets (`DataConfig.reset_documents`)."""
  del rng
  seg = batch.get("segment_ids")
  logits = (model(batch["inputs"]) if seg is None else model(batch["inputs"], seg)).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Fresh state: step 0, optimizer initialised on `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32))


def _split_micro(batch: dict, n: int) -> dict:
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"grad_accum={n} must divide the per-device batch of {x.shape[0]} rows")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.tree.map(split, batch)


def _tree_where(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_grad_fn(graphdef, rest, mesh, *, loss_fn: LossFn = lm_loss, grad_accum: int = 1):
  """(params, batch, rng) -> (loss, grads), both averaged over the mesh's `data` axis.

  params replicated, batch sharded on its leading axis. Runs under `jax.shard_map` with
  `check_vma=False`, so the gradient of each device's loss is local and `lax.pmean` averages it.
  """

  def local(params, batch, rng):
    rng = jax.random.fold_in(rng, lax.axis_index(DATA_AXIS))

    def loss_of(p, mb, key):
      return loss_fn(nnx.merge(graphdef, p, rest), mb, key)

    if grad_accum == 1:
      loss, grads = jax.value_and_grad(loss_of)(params, batch, rng)
    else:
      micro = _split_micro(batch, grad_accum)

      def body(carry, xs):
        mb, i = xs
        l, g = jax.value_and_grad(loss_of)(params, mb, jax.random.fold_in(rng, i))
        return (carry[0] + l, jax.tree.map(jnp.add, carry[1], g)), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = lax.scan(body, zero, (micro, jnp.arange(grad_accum)))
      loss, grads = loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
    return lax.pmean(loss, DATA_AXIS), lax.pmean(grads, DATA_AXIS)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()),
                       check_vma=False)


def _step_fn(graphdef, rest, optimizer, mesh, *, loss_fn, grad_accum, schedule):
  """The pure step `(state, batch) -> (state, metrics)` that the jitted forms below wrap."""
  grad_fn = make_grad_fn(graphdef, rest, mesh, loss_fn=loss_fn, grad_accum=grad_accum)

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = grad_fn(state.params, batch, key)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    new = TrainState(step=state.step + 1, params=_tree_where(ok, params, state.params),
                     opt_state=_tree_where(ok, opt_state, state.opt_state), rng=state.rng, skipped=skipped)
    metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok, "skipped": skipped}
    if schedule is not None:
      metrics["lr"] = schedule(state.step - state.skipped)
    return new, metrics

  return step


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation, mesh, *,
                    loss_fn: LossFn = lm_loss, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None, donate: bool = True):
  """Returns jitted `step(state, batch) -> (state, metrics)`.

  metrics: loss, grad_norm (before clipping), finite (bool: update applied), lr, skipped (total).
  A non-finite loss or gradient leaves params and optimizer state unchanged; the step counter
  still advances (the batch is consumed) and `skipped` counts it.
  """
  step = _step_fn(graphdef, rest, optimizer, mesh, loss_fn=loss_fn, grad_accum=grad_accum, schedule=schedule)
  return jax.jit(step, donate_argnums=(0,) if donate else ())


# The packed metrics vector of `make_flat_train_step`, in this order (float32; lr is NaN without a schedule).
METRICS = ("loss", "grad_norm", "finite", "skipped", "lr")


def unpack_metrics(vec) -> dict:
  """A host copy of the packed metrics vector [len(METRICS)] -> {"loss": float, ..., "finite": bool,
  "skipped": int} (skipped is exact below 2**24 steps)."""
  rec = {k: float(v) for k, v in zip(METRICS, vec)}
  rec["finite"], rec["skipped"] = bool(rec["finite"]), int(rec["skipped"])
  return rec


def signature(tree) -> list:
  """(shape, dtype, sharding) of every leaf: what a compiled program was compiled for."""
  return [(tuple(x.shape), jax.numpy.dtype(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(tree)]


class FlatTrainStep:
  """The training loop's form of the step: the state as a flat list of arrays, the metrics packed.

      step = FlatTrainStep(graphdef, rest, optimizer, mesh, state, ...)
      step.compile_ahead(abstract_leaves, abstract_batch)   # optional: compile in the background
      leaves = step.flatten(state)
      leaves, metrics = step(leaves, batch)      # metrics: float32 [len(METRICS)] on the device
      state = step.unflatten(leaves)             # only where a TrainState is needed (checkpoint, eval)

  Same computation as `make_train_step` (bit for bit). Why: each call of a jitted function flattens
  its pytree arguments and unflattens its results on the host. `nnx.State` flattens in Python
  (~40 us per node), so a TrainState of a 12-layer model (842 leaves) costs milliseconds per step
  in dispatch; a list of arrays flattens in C++. One packed metrics array instead of five is one
  buffer to create per step and one device-to-host copy per step at a log point.
  `state` may be abstract (`jax.ShapeDtypeStruct` leaves): only its structure is used.
  `step.jitted` is the jitted function itself (for `.lower(...)`).

  `compile_ahead` traces, lowers and compiles the step for arguments of given shapes, dtypes and shardings
  in a background thread, so the compile overlaps what the caller does meanwhile (data, model init,
  checkpoint restore: `loop.train`); the first call waits for it and runs the compiled program from then
  on, as long as the arguments match what it was compiled for (else the jitted function takes over).
  """

  def __init__(self, graphdef, rest, optimizer, mesh, state: TrainState, *, loss_fn: LossFn = lm_loss,
               grad_accum: int = 1, schedule: optax.Schedule | None = None, donate: bool = True):
    self.treedef = jax.tree.structure(state)
    self.graphdef = graphdef
    step = _step_fn(graphdef, rest, optimizer, mesh, loss_fn=loss_fn, grad_accum=grad_accum, schedule=schedule)
    treedef = self.treedef

    def flat(leaves, batch):
      new, m = step(jax.tree.unflatten(treedef, leaves), batch)
      vec = jnp.stack([jnp.asarray(m.get(k, jnp.nan), jnp.float32) for k in METRICS])
      return jax.tree.leaves(new), vec

    self.jitted = jax.jit(flat, donate_argnums=(0,) if donate else ())
    self._ahead: concurrent.futures.Future | None = None
    self._ahead_signature = None
    self.compiled = None  # the program compiled ahead, once the first call has taken it
    self.ahead_wait_s: float | None = None  # how long the first call waited for it (None: nothing compiled ahead)

  def compile_ahead(self, leaves, batch) -> None:
    """Starts compiling the step for arguments like `leaves` (flat state) and `batch` (arrays or
    `jax.ShapeDtypeStruct`s with their shardings) in a background thread."""
    self._ahead_signature = signature((leaves, batch))

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
    self._ahead = pool.submit(lambda: self.jitted.lower(leaves, batch).compile())
    pool.shutdown(wait=False)

  def flatten(self, state: TrainState) -> list:
    leaves, treedef = jax.tree.flatten(state)
    if treedef != self.treedef:
      raise ValueError(f"FlatTrainStep: argument `state` has a different structure than the one the step was "
                       f"built for ({treedef.num_leaves} vs {self.treedef.num_leaves} leaves)")
    return leaves

  def unflatten(self, leaves) -> TrainState:
    return jax.tree.unflatten(self.treedef, leaves)

  def __call__(self, leaves, batch):
    if self._ahead is not None:  # the first call: take the program compiled ahead (its error, if any, is raised)
      ahead, self._ahead = self._ahead, None
      t = time.perf_counter()
      compiled = ahead.result()
      self.ahead_wait_s = time.perf_counter() - t
      if signature((leaves, batch)) == self._ahead_signature:
        self.compiled = compiled
    if self.compiled is not None:
      try:
        return self.compiled(leaves, batch)
      except TypeError:  # arguments of other shapes or shardings than compiled for (raised before running)
        self.compiled = None
    return self.jitted(leaves, batch)


def make_eval_step(graphdef, rest, mesh, *, loss_fn: LossFn = lm_loss):
  """Returns jitted `eval(params, batch) -> mean loss` over the global batch."""

  def local(params, batch):
    return lax.pmean(loss_fn(nnx.merge(graphdef, params, rest), batch, None), DATA_AXIS)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(), check_vma=False)
  return jax.jit(f)
