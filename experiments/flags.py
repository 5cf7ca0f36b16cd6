"""The flags every experiment has, and parsing an experiment's flags dataclass with tyro.

An experiment's flags are a frozen dataclass deriving from `CommonFlags` (its docstring's
`Attributes:` section is the `--help` text). `--tiny` replaces the size flags with the experiment's
CPU sizes (given or not: a tiny run is always the same size, for tests and CI).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from carve_jax.train import flags as train_flags


@dataclasses.dataclass(frozen=True)
class CommonFlags:
  """Flags of every experiment.

  Attributes:
    tiny: CPU-sized run (< 60 s), for tests and CI.
    out_dir: where <name>.{json,md,png} go (default: experiments/results/<experiment>).
    impl: carve_jax.ops implementation; "auto" is carve_jax.ops.resolve_impl's choice (Pallas on a
      GPU, else chunk).
    tag: suffix of the result file names (e.g. '_cpu').
  """
  tiny: bool = False
  out_dir: str | None = None
  impl: Literal["auto", "chunk", "pallas", "recurrent"] = "auto"
  tag: str = ""


def parse(cls, argv, *, prog: str, description: str, tiny: dict):
  """argv (default sys.argv[1:]) -> an instance of `cls`; with --tiny, `tiny`'s values replace the parsed ones."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = train_flags.cli(cls, train_flags.normalise_argv(argv), prog=prog, description=description)
  return dataclasses.replace(args, **tiny) if args.tiny else args

