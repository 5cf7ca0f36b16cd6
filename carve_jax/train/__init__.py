"""Training: config (`config.py`), its flags (`flags.py`), optimizer (`optim.py`), the data-parallel step (`step.py`),
mesh and hosts (`distributed.py`), verified orbax checkpoints (`checkpoint.py`), one run per output
folder (`runlock.py`), metrics (`metrics.py`),
the loop (`loop.py`), and the command lines `carve-train` (`cli.py`), `carve-eval` (`eval.py`),
`carve-generate` (`generate.py`).

    from carve_jax.train import TrainConfig, train
    summary = train(TrainConfig(steps=200))
"""

from carve_jax.train.checkpoint import (CheckpointCorruptError, CheckpointError, Checkpointer,
                                        CheckpointIncompleteError, CheckpointMismatchError,
                                        CheckpointNotFoundError)
from carve_jax.train.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from carve_jax.train.flags import parse_train_args
from carve_jax.train.loop import TrainingDivergedError, format_summary, train
from carve_jax.train.optim import decay_mask, lr_schedule, make_optimizer
from carve_jax.train.runlock import RunDirError, RunLock, RunLockedError
from carve_jax.train.step import TrainState, init_state, lm_loss, make_eval_step, make_train_step

__all__ = [
    "CheckpointConfig", "CheckpointCorruptError", "CheckpointError", "CheckpointIncompleteError",
    "CheckpointMismatchError", "CheckpointNotFoundError", "Checkpointer", "DataConfig", "OptimConfig",
    "RunDirError", "RunLock", "RunLockedError", "TrainConfig", "TrainState",
    "TrainingDivergedError", "decay_mask", "format_summary", "init_state", "lm_loss", "lr_schedule",
    "make_eval_step", "make_optimizer", "make_train_step", "parse_train_args", "train",
]
