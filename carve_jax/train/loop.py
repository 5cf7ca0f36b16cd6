"""The training loop: build, restore if a checkpoint exists, step, log, evaluate, checkpoint.

    train(cfg) -> summary dict

1. (`cfg.distributed`) `jax.distributed.initialize()`; a 1-D `data` mesh over all devices.
2. Tokens from `carve_jax.data` (this process's shard), the `LM`, AdamW, the initial `TrainState`.
0. `<out_dir>/run.lock` (and `<ckpt_dir>/run.lock` if it lies elsewhere) is held for the whole
   run: a second run on the same folder is refused (`runlock.RunLockedError`).
3. If `<ckpt_dir>` holds a checkpoint (or `restore_step` names one): restore the state and the
   data iterator's position and go on from there, so a killed run resumed reproduces the losses
   of an uninterrupted one exactly. A checkpoint of a different configuration is refused; a latest
   step that fails verification is moved aside and the newest one that verifies is used.
   `metrics.jsonl` is cut back to the restored step, so no step is logged twice. Run again once
   finished, it trains nothing and reports the logged results.
4. Each step: the next global batch -> `step.make_train_step` (NaN/Inf steps are skipped and
   counted; `max_consecutive_skips` in a row abort the run, keeping every checkpoint).
   Every `log_every` steps: one JSONL/TensorBoard record per step, tokens/s and peak memory.
   Every `eval_every` steps and at the end: validation loss and perplexity over `eval_batches`
   fixed batches. Every `ckpt_every` steps and at the end: an async checkpoint.
   `time_limit_s` stops early enough for the final evaluation to fit (see `_eval_reserve_s`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from carve_jax.model import LM, param_count
from carve_jax.train import compile_cache
from carve_jax.train import distributed as dist
from carve_jax.train.checkpoint import Checkpointer, CheckpointNotFoundError, abstract_like
from carve_jax.train.config import DataConfig, TrainConfig
from carve_jax.train.meter import ThroughputMeter
from carve_jax.train.metrics import MetricsLogger, format_bytes, mfu, read_jsonl, truncate_jsonl
from carve_jax.train.runlock import RunLock
from carve_jax.train.optim import lr_schedule, make_optimizer
from carve_jax.train.step import METRICS, FlatTrainStep, LossFn, init_state, lm_loss, make_eval_step, unpack_metrics


class TrainingDivergedError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def load_tokens(data: DataConfig):
  """(tokenizer, train tokens, val tokens) as 1-D int32 arrays (the whole split, every process)."""
  from carve_jax.data import pipeline
  from carve_jax.data.tokenizer import get_tokenizer
  tok = get_tokenizer(data.tokenizer)
  if data.tokens_dir:  # an export folder (python -m carve_jax.data export): no corpus or apt needed
    corpus = data.tokens_dir
  else:
    from carve_jax.data.corpus import prepare_corpus
    corpus = prepare_corpus(data.corpus, root=data.data_root)
  return tok, pipeline.load_tokens(corpus, tok, "train"), pipeline.load_tokens(corpus, tok, "val")


def batch_iterator(tokens, data: DataConfig, batch_size: int, *, shuffle: bool = True, seed: int | None = None):
  """This process's batches of `batch_size` rows (shard `process_index` of `process_count`), with
  per-token document ids when `data.reset_documents`."""
  from carve_jax.data.pipeline import make_batches
  from carve_jax.data.tokenizer import get_tokenizer
  eos_id = get_tokenizer(data.tokenizer).eos_id if data.reset_documents else None
  return make_batches(tokens, seq_len=data.seq_len, batch_size=batch_size,
                      seed=data.data_seed if seed is None else seed, shard_index=jax.process_index(),
                      shard_count=jax.process_count(), shuffle=shuffle, eos_id=eos_id)


def evaluate(eval_fn, params, mesh, val_tokens, data: DataConfig, local_batch: int, n_batches: int) -> float:
  """Mean validation loss over the first `n_batches` batches of the unshuffled validation split."""
  it = batch_iterator(val_tokens, data, local_batch, shuffle=False, seed=0)
  total = 0.0
  for _ in range(n_batches):
    total += float(eval_fn(params, dist.global_batch(mesh, next(it))))
  return total / n_batches


def build_model(cfg: TrainConfig) -> LM:
  return LM(cfg.model, rngs=nnx.Rngs(cfg.seed))


def init_on(cfg: TrainConfig) -> str:
  """Where a fresh run draws its parameters (`TrainConfig.init_on`): "auto" is "host" in a single process on an
  accelerator (init's small eager compiles then run on the CPU backend instead of queueing behind the train
  step's compile on the accelerator), else "device"."""
  if cfg.init_on != "auto":
    return cfg.init_on
  return "host" if jax.process_count() == 1 and jax.default_backend() != "cpu" else "device"


def abstract_batch(cfg: TrainConfig, mesh) -> dict:
  """The shapes, dtypes and sharding of a global training batch (`batch_iterator` rows through
  `dist.global_batch`): inputs and targets int32 [batch_size, seq_len], and segment_ids with reset_documents."""
  keys = ("inputs", "targets") + (("segment_ids",) if cfg.data.reset_documents else ())
  sds = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), np.int32, sharding=dist.batch_sharding(mesh))
  return {k: sds for k in keys}


def step_compiled_ahead(cfg: TrainConfig, mesh, optimizer, *, schedule=None, loss_fn: LossFn = lm_loss,
                        batch=None, ahead: bool = True) -> FlatTrainStep:
  """The train step of `cfg`, built from the model's shapes alone (`nnx.eval_shape`: no parameter is made)
  and, if `ahead`, compiled in a background thread (`FlatTrainStep.compile_ahead`) for replicated state and
  the batch of `abstract_batch` (or `batch`'s), while the caller loads data, builds the model and restores a
  checkpoint. (On the H200, v11, the 50m preset's first step was 7.1 s of eager init, then 3.8 s of trace and
  lower and 11.3 s of compile, one after the other. On an H100, with init on the device, the overlap saved 2 s of
  25.6: init's eager compiles queue behind the step's on the GPU compiler, hence `TrainConfig.init_on`. On a
  2-core CPU it gains nothing: the eager init's small compiles wait for cores.)"""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param, ...)
  rep = dist.replicated(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                       jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed), params))
  step = FlatTrainStep(graphdef, rest, optimizer, mesh, state, loss_fn=loss_fn, grad_accum=cfg.grad_accum,
                       schedule=schedule)
  if ahead and not jax.tree.leaves(rest):  # (non-parameter model state would be a constant of the step: none)
    step.compile_ahead(step.flatten(state), abstract_batch(cfg, mesh) if batch is None else batch)
  return step


def train(cfg: TrainConfig, *args, **kwargs) -> dict:
  """Runs (or resumes) `cfg`; returns a summary (losses, perplexity, tokens/s, memory, paths).

  loss_fn: the loss (default `lm_loss`).
  tokens: optional (tokenizer, train tokens, val tokens) instead of loading `cfg.data`.
  on_step: called after every step with (step, host metrics of that step) once they are fetched
    (at log points); tests use it to stop a run abruptly.
  Raises runlock.RunLockedError if another live run holds `cfg.out_dir` (or its checkpoint dir).
  """
  dist.maybe_initialize(cfg.distributed)
  compile_cache.enable(cfg.compile_cache)
  with _run_locks(cfg):
    return _train(cfg, *args, **kwargs)


@contextlib.contextmanager
def _run_locks(cfg: TrainConfig):
  """Process 0 holds the lock of the out_dir, and of the checkpoint dir if it lies outside it."""
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      out = os.path.abspath(cfg.out_dir)
      stack.enter_context(RunLock(out, flag="--out_dir"))
      ck = os.path.abspath(cfg.checkpoint_dir)
      if os.path.commonpath([out, ck]) != out:
        stack.enter_context(RunLock(ck, flag="--ckpt_dir"))
    yield


def _restore(ckpt: Checkpointer, abstract, cfg: TrainConfig):
  """(state, data state, meta) of `--restore_step`, or of the newest step that verifies (a newer one
  that fails is moved aside); None if the only steps there are saves that did not finish."""
  try:
    return ckpt.restore(abstract, cfg.ckpt.restore_step, quarantine=True)
  except CheckpointNotFoundError as e:
    if cfg.ckpt.restore_step is not None:
      raise
    print(f"{e}: starting from step 0", file=sys.stderr)
    return None


def _will_train(cfg: TrainConfig, ckpt: Checkpointer) -> bool:
  """Whether this run will take a training step, as far as the checkpoint folder says without restoring: no
  checkpoint, or one before `steps` written by this configuration (a finished run, or one whose resume will
  be refused, compiles nothing ahead)."""
  from carve_jax.train.config import identity_diff  # noqa: PLC0415
  step = cfg.ckpt.restore_step if cfg.ckpt.restore_step is not None else ckpt.latest_step()
  if step is None:
    return True
  try:
    saved = ckpt.read_meta(step).get("config")
  except Exception:  # noqa: BLE001 - an unreadable step: the restore says what is wrong, or falls back
    return True
  return step < cfg.steps and not (saved and identity_diff(saved, cfg.to_dict()))


def _eval_reserve_s(last_eval_s: float | None, step_s: float | None, compile_s: float | None,
                    eval_batches: int) -> float:
  """Seconds to keep free under `time_limit_s` for the final evaluation: the last evaluation's
  duration, or before any, `eval_batches` training-step times plus half the first step's setup and
  compile time (the evaluation program still has to compile)."""
  if last_eval_s is not None:
    return last_eval_s
  return eval_batches * (step_s or 0.0) + 0.5 * (compile_s or 0.0)


def _logged_results(path: str) -> dict:
  """{"train_loss", "tokens_per_s"}: the last logged values of a finished run (NaN if absent)."""
  out = {"train_loss": math.nan, "tokens_per_s": math.nan}
  if not os.path.exists(path):
    return out
  for r in read_jsonl(path):
    if r["split"] == "train" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]):
      out["train_loss"] = float(r["loss"])
    elif r["split"] == "perf" and isinstance(r.get("tokens_per_s"), (int, float)):
      out["tokens_per_s"] = float(r["tokens_per_s"])
  return out


class _StepLog:
  """The one host sync of the hot loop: `flush` fetches the pending steps' metrics (still on the
  device until then), logs one train record per step and a perf record, and counts non-finite
  steps in a row (`max_consecutive_skips` of them raise TrainingDivergedError)."""

  def __init__(self, cfg: TrainConfig, logger: MetricsLogger, meter: ThroughputMeter, bar, *, has_lr: bool,
               on_step, latest_checkpoint: Callable[[], int | None]):
    self.cfg, self.logger, self.meter, self.bar = cfg, logger, meter, bar
    self.has_lr, self.on_step, self.latest_checkpoint = has_lr, on_step, latest_checkpoint
    self.pending: list[tuple[int, jax.Array]] = []  # (step, packed metrics on the device)
    self.consecutive = 0
    self.last_train = math.nan  # mean finite loss of the last flushed steps

  def flush(self, step_now: int) -> None:
    if not self.pending:
      return
    host = np.asarray(jax.device_get([m for _, m in self.pending])).reshape(len(self.pending), len(METRICS))
    host_ms = self.meter.lap()
    losses = []
    for (s, _), vec in zip(self.pending, host):
      rec = unpack_metrics(vec)
      if not self.has_lr:
        del rec["lr"]
      self.consecutive = 0 if rec["finite"] else self.consecutive + 1
      self.logger.log(s, "train", **rec)
      losses.append(rec["loss"])
      if self.on_step is not None:
        self.on_step(s, rec)
      if self.consecutive >= self.cfg.max_consecutive_skips:
        raise TrainingDivergedError(
            f"{self.consecutive} consecutive steps up to step {s} had a non-finite loss or gradient; stopping. "
            f"Checkpoints under {self.cfg.checkpoint_dir} are kept (latest: {self.latest_checkpoint()}).")
    self.pending.clear()
    finite = [x for x in losses if math.isfinite(x)]
    self.last_train = float(np.mean(finite)) if finite else math.nan
    tps = self.meter.tokens_per_s
    self.logger.log(step_now, "perf", tokens_per_s=tps, peak_device_bytes=dist.peak_memory_bytes() or 0,
                    host_peak_rss_bytes=dist.host_peak_rss_bytes(), host_ms_per_step=host_ms)
    self.bar.set_postfix(loss=f"{self.last_train:.3f}", tok_s=f"{tps:,.0f}", refresh=False)


def _restored_state(cfg: TrainConfig, ckpt: Checkpointer, state, train_iter, mesh):
  """(state, start step, whether a checkpoint was restored); moves `train_iter` to its position."""
  restore_step = cfg.ckpt.restore_step if cfg.ckpt.restore_step is not None else ckpt.latest_step()
  restored = _restore(ckpt, abstract_like(state, dist.replicated(mesh)), cfg) if restore_step is not None else None
  if restored is None:
    return state, 0, False
  state, data_state, _ = restored
  train_iter.set_state(data_state)
  if jax.process_index() == 0:
    print(f"resumed from {cfg.checkpoint_dir} step {int(state.step)}")
  return state, int(state.step), True


def _train(cfg: TrainConfig, *, loss_fn: LossFn = lm_loss, tokens=None,
           on_step: Callable[[int, dict], None] | None = None) -> dict:
  t_start = time.time()
  mesh = dist.make_mesh()
  local_bs = dist.process_batch_size(cfg.data.batch_size, mesh, cfg.grad_accum)
  schedule = lr_schedule(cfg.optim, cfg.steps)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  ckpt = Checkpointer(cfg.checkpoint_dir, config=cfg.to_dict(), every=cfg.ckpt.ckpt_every,
                      keep=cfg.ckpt.ckpt_keep, async_save=cfg.ckpt.ckpt_async)
  # compiled while the data loads, the model is built and the checkpoint restored (for a run that will train)
  step_fn = step_compiled_ahead(cfg, mesh, optimizer, schedule=schedule, loss_fn=loss_fn,
                                ahead=cfg.compile_ahead and _will_train(cfg, ckpt))
  t_phase = time.perf_counter()
  tok, train_tokens, val_tokens = tokens if tokens is not None else load_tokens(cfg.data)
  setup = {"data_s": time.perf_counter() - t_phase}
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"TrainConfig: model.vocab_size must be >= the {tok.name} tokenizer's vocab_size "
                     f"{tok.vocab_size}, got {cfg.model.vocab_size}")
  main = jax.process_index() == 0

  t_phase = time.perf_counter()
  where_init = init_on(cfg)
  on_host = where_init == "host"
  with jax.default_device(jax.devices("cpu")[0]) if on_host else contextlib.nullcontext():
    model = build_model(cfg)
    counts = param_count(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fresh = init_state(params, optimizer, cfg.seed)
  state = dist.replicate(mesh, fresh)
  if on_host:
    rest = dist.replicate(mesh, rest)
  del model, params, fresh
  if graphdef != step_fn.graphdef:  # (not expected: the step was built from the same config's shapes)
    step_fn = FlatTrainStep(graphdef, rest, optimizer, mesh, state, loss_fn=loss_fn, grad_accum=cfg.grad_accum,
                            schedule=schedule)

  train_iter = batch_iterator(train_tokens, cfg.data, local_bs)
  state, start, resumed = _restored_state(cfg, ckpt, state, train_iter, mesh)
  leaves = step_fn.flatten(state)
  setup["init_s"] = time.perf_counter() - t_phase  # model, optimizer state, placement, restore
  del state  # the loop holds the flat leaves; `step_fn.unflatten` where a TrainState is needed
  eval_fn = make_eval_step(graphdef, rest, mesh, loss_fn=loss_fn)
  if main:
    truncate_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), start)  # drop steps the restored state has not done
  logger = MetricsLogger(cfg.out_dir)
  finished = start >= cfg.steps  # run again once done: evaluate, report the logged results, train nothing
  logged = _logged_results(logger.path) if finished and main else None
  if logged is not None:
    print(f"the run under {cfg.out_dir} already finished its {cfg.steps} steps: nothing to train "
          "(to train for more steps, see carve-train --help)")
  if main:
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as fh:
      fh.write(cfg.to_json())
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), unit="step",
             dynamic_ncols=True)
  meter = ThroughputMeter(tokens_per_step)  # steps after the first (which includes compilation)
  log = _StepLog(cfg, logger, meter, bar, has_lr=schedule is not None, on_step=on_step,
                 latest_checkpoint=ckpt.latest_step)
  val_loss, compile_s, last_eval_s = None, None, None

  # The hot loop has no host sync but `log.flush` (every log_every steps): the next batch is read
  # and sent to the device while the current step runs (one batch ahead), checkpoint decisions are
  # arithmetic (no orbax query per step), metrics stay on the device until a log point.
  next_batch = dist.global_batch(mesh, next(train_iter)) if start < cfg.steps else None
  try:
    for step in range(start, cfg.steps):
      t_body = time.perf_counter()
      leaves, metrics = step_fn(leaves, next_batch)
      done = step + 1
      out_of_time = cfg.time_limit_s is not None and time.time() - t_start + _eval_reserve_s(
          last_eval_s, meter.step_s, compile_s, cfg.eval_batches) > cfg.time_limit_s
      save_now = done % cfg.ckpt.ckpt_every == 0 or done == cfg.steps or out_of_time
      data_state = train_iter.get_state() if save_now else None  # the position after batch `done`
      next_batch = dist.global_batch(mesh, next(train_iter)) if done < cfg.steps and not out_of_time else None
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.time() - t_start
        setup["compile_wait_s"] = step_fn.ahead_wait_s
        meter.start()
      else:
        meter.count(time.perf_counter() - t_body)
      log.pending.append((done, metrics))
      bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.steps:
        log.flush(done)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        log.flush(done)
        t_eval = time.time()
        val_loss = evaluate(eval_fn, step_fn.unflatten(leaves).params, mesh, val_tokens, cfg.data, local_bs,
                            cfg.eval_batches)
        logger.log(done, "val", loss=val_loss, ppl=math.exp(min(val_loss, 50.0)))
        if main:
          bar.write(f"step {done}: val loss {val_loss:.4f}  ppl {math.exp(min(val_loss, 50.0)):.2f}")
        meter.start()  # evaluation time is not training time
        last_eval_s = time.time() - t_eval
      if save_now:
        ckpt.save(done, step_fn.unflatten(leaves), data_state, force=True)
      if out_of_time and done < cfg.steps:
        log.flush(done)
        if main:
          bar.write(f"time limit of {cfg.time_limit_s:.0f}s reached at step {done}: checkpoint saved; "
                    "run the same command again to continue")
        break
    if log.pending:
      log.flush(int(log.pending[-1][0]))
    state = step_fn.unflatten(leaves)
    val_loss = evaluate(eval_fn, state.params, mesh, val_tokens, cfg.data, local_bs, cfg.eval_batches)
    if not finished:
      logger.log(int(state.step), "val", loss=val_loss, ppl=math.exp(min(val_loss, 50.0)))
    ckpt.wait()
  finally:
    bar.close()
    logger.close()
    latest = ckpt.latest_step()
    failing = sys.exc_info()[0] is not None
    try:
      ckpt.close()  # waits for pending saves: the last good checkpoint is kept, even on failure
    except Exception:
      if not failing:
        raise

  tps = logged["tokens_per_s"] if logged is not None else meter.tokens_per_s
  return {
      "steps": int(state.step), "resumed_from": start if resumed else None,
      "train_loss": logged["train_loss"] if logged is not None else log.last_train,
      "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
      "skipped_steps": int(state.skipped), "tokens_per_s": tps, "tokens_per_step": tokens_per_step,
      "mfu": mfu(tps, cfg.model, cfg.data.seq_len, mesh.devices.size),
      "compile_s": compile_s, "setup": setup, "init_on": where_init, "wall_s": time.time() - t_start,
      "peak_device_bytes": dist.peak_memory_bytes(), "host_peak_rss_bytes": dist.host_peak_rss_bytes(),
      "devices": mesh.devices.size, "processes": jax.process_count(), "backend": jax.default_backend(),
      "params": counts, "checkpoint_dir": os.path.abspath(cfg.checkpoint_dir),
      "latest_checkpoint": latest,
      "out_dir": os.path.abspath(cfg.out_dir), "state": state,
  }


def _setup_text(s: dict) -> str:
  """': data 0.4 s, init on host 4.9 s, waited 9.1 s for the step compiled ahead' (what is known of it)."""
  st = s.get("setup") or {}
  parts = [f"data {st['data_s']:.1f} s"] if "data_s" in st else []
  if "init_s" in st:
    parts.append(f"init on {s.get('init_on', 'device')} {st['init_s']:.1f} s")
  if st.get("compile_wait_s") is not None:
    parts.append(f"waited {st['compile_wait_s']:.1f} s for the step compiled ahead")
  return ": " + ", ".join(parts) if parts else ""


def format_summary(s: dict) -> str:
  p = s["params"]
  lines = [
      f"steps              {s['steps']}" + (f" (resumed from {s['resumed_from']})" if s.get("resumed_from") else ""),
      f"parameters         {p['total']:,}",
      f"train loss         {s['train_loss']:.4f}",
      f"val loss / ppl     {s['val_loss']:.4f} / {s['val_ppl']:.2f}",
      f"skipped steps      {s['skipped_steps']}",
      f"throughput         {s['tokens_per_s']:,.0f} tokens/s on {s['devices']} {s['backend']} device(s); MFU "
      + (f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a (no bf16 peak known for this device)"),
      f"peak memory        device {format_bytes(s['peak_device_bytes'])}, host RSS {format_bytes(s['host_peak_rss_bytes'])}",
      f"first step after   {s['compile_s'] or 0:.1f} s (setup + compile{_setup_text(s)});  wall {s['wall_s']:.1f} s",
      f"checkpoint         {s['checkpoint_dir']} (step {s['latest_checkpoint']})",
      f"metrics            {s['out_dir']}/metrics.jsonl, TensorBoard: {s['out_dir']}/tb",
  ]
  return "\n".join(lines)
