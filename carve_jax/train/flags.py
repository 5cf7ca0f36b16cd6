"""Command lines over config dataclasses, with tyro: `carve-train`'s flags and the shared pieces.

Every field of every `TrainConfig` section is a flag of its own name (`--d_model 512 --lr 1e-3
--seq_len 512 --ckpt_every 200`; field names are unique across sections); the dotted form
`--model.d_model 512` and hyphens (`--d-model`) are accepted too. Booleans are `--X` / `--no-X`,
optional fields take `none`, tuples take `a,b,c` (or `a b c`). `--model NAME` is an alias of
`--mixer`; `--preset NAME` picks the `carve_jax.configs.PRESETS` model that the model flags then
override; `--config FILE` starts from a saved TrainConfig JSON (e.g. a run's `config.json`).
The model's `vocab_size` follows `--tokenizer` (or a `--preset`) unless `--vocab_size` is given.
A bad flag or value exits with status 2 and a message naming the flag (tyro's, or
`prog: error: ...` for what is checked after parsing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Annotated, Literal

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from carve_jax import configs as model_configs
from carve_jax.train.config import TrainConfig, check_before_loading

SECTIONS = ("model", "optim", "data", "ckpt")
ALIASES = {"model": "mixer"}  # old flag name -> field name

REGISTRY = ConstructorRegistry()


@REGISTRY.primitive_rule
def _none_any_case(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
  """`none` as well as `None` for an optional field (the flags' documented spelling)."""
  if info.type is not type(None):
    return None
  return PrimitiveConstructorSpec(nargs=1, metavar="{none}", choices=("None", "none"),
                                  instance_from_str=lambda args: None, is_instance=lambda x: x is None,
                                  str_from_instance=lambda _: ["none"])


@REGISTRY.primitive_rule
def _comma_tuple(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
  """tuple[str, ...] or tuple[int, ...] from `a,b,c` or `a b c`."""
  item = {tuple[str, ...]: str, tuple[int, ...]: int}.get(info.type)
  if item is None:
    return None
  return PrimitiveConstructorSpec(
      nargs="*", metavar="A,B,...",
      instance_from_str=lambda args: tuple(item(x) for a in args for x in a.split(",") if x),
      is_instance=lambda x: isinstance(x, tuple), str_from_instance=lambda t: [",".join(map(str, t))])


def normalise_argv(argv: list[str], sections=(), aliases=None) -> list[str]:
  """`--section.field` -> `--field` (for `sections`), hyphens -> underscores, `--no-X` -> `--no_X`,
  `aliases` (old flag name -> field name)."""
  aliases = aliases or {}
  out = []
  for a in argv:
    if not a.startswith("--") or a == "--":
      out.append(a)
      continue
    name, eq, value = a[2:].partition("=")
    head, dot, tail = name.partition(".")
    if dot and head in sections:
      name = tail
    name = name.replace("-", "_")
    neg = name.startswith("no_") and name[3:] not in aliases
    base = name[3:] if neg else name
    name = ("no_" if neg else "") + aliases.get(base, base)
    out.append(f"--{name}{eq}{value}")
  return out


def given(argv: list[str], name: str) -> bool:
  """Whether `--name` appears in (normalised) argv."""
  return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def usage_error(prog: str, message: str) -> None:
  """argparse's form: a usage line and `prog: error: message` on stderr, exit status 2."""
  print(f"usage: {prog} [-h] [OPTIONS]\n{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def cli(cls, argv: list[str], *, prog: str, default=None, description: str | None = None):
  """tyro.cli over `cls` with flat, underscore flag names and this module's registry."""
  return tyro.cli(cls, args=argv, prog=prog, default=default, description=description, use_underscores=True,
                  config=(tyro.conf.OmitArgPrefixes,), registry=REGISTRY)


def _start(config: str | None, preset: str | None, base: TrainConfig | None) -> TrainConfig:
  """The config the flags override: `--config`'s file (or `base`, or the defaults), its model
  replaced by `--preset`'s."""
  if config:
    try:
      with open(config) as fh:
        base = TrainConfig.from_dict(json.load(fh))
    except OSError as e:
      raise ValueError(f"--config {config}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"--config {config}: not a JSON file ({e})") from None
  base = base or TrainConfig()
  return dataclasses.replace(base, model=model_configs.preset(preset)) if preset else base


def _flags_class(extra):
  """The parsed object: the TrainConfig (flat flags), --config, --preset, and `extra`'s flags."""
  presets = Literal[tuple(sorted(model_configs.PRESETS))]
  config_t = Annotated[str | None, tyro.conf.arg(help="a TrainConfig JSON file to start from (e.g. a run's "
                       "<out_dir>/config.json; give a new --out_dir to start a new run with its settings)")]
  preset_t = Annotated[presets | None, tyro.conf.arg(help="model preset (carve_jax.configs.PRESETS) that the "
                       "model flags override; default: the --config file's model, else 'tiny'. --model NAME "
                       "is an alias of --mixer NAME")]
  spec = [("train", TrainConfig), ("config", config_t, dataclasses.field(default=None)),
          ("preset", preset_t, dataclasses.field(default=None))]
  if extra is not None:
    spec.insert(1, ("extra", extra))
  return dataclasses.make_dataclass("Flags", spec, frozen=True)


def parse_train_flags(argv=None, *, prog="carve-train", base: TrainConfig | None = None,
                      description: str | None = None, extra=None):
  """argv -> (TrainConfig, the `extra` dataclass's values or None). See the module docstring.

  base: the config the flags override (default: TrainConfig()); extra: a dataclass (all fields
  defaulted) whose fields are more flags, e.g. the demo's `--gpu`.
  """
  argv = normalise_argv(list(sys.argv[1:] if argv is None else argv), SECTIONS, ALIASES)
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config", default=None)
  pre.add_argument("--preset", default=None)
  known, _ = pre.parse_known_args(argv)
  if known.preset is not None and known.preset not in model_configs.PRESETS:
    usage_error(prog, f"argument --preset: invalid choice: {known.preset!r} (choose from "
                f"{', '.join(sorted(model_configs.PRESETS))})")
  try:
    start = _start(known.config, known.preset, base)
  except ValueError as e:
    usage_error(prog, str(e))
  cls = _flags_class(extra)
  kw = {"extra": extra()} if extra is not None else {}
  flags = cli(cls, argv, prog=prog, description=description,
              default=cls(train=start, config=known.config, preset=known.preset, **kw))
  cfg = flags.train
  try:
    if not given(argv, "vocab_size") and (known.preset or given(argv, "tokenizer")):
      from carve_jax.data.tokenizer import get_tokenizer
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(
          cfg.model, vocab_size=get_tokenizer(cfg.data.tokenizer).vocab_size))
    check_before_loading(cfg)
  except (ValueError, TypeError) as e:
    usage_error(prog, str(e))
  return cfg, (flags.extra if extra is not None else None)


def parse_train_args(argv=None, *, prog="carve-train", base: TrainConfig | None = None,
                     description: str | None = None) -> TrainConfig:
  """argv -> TrainConfig; unknown flags and rejected values exit with a usage error (status 2)."""
  return parse_train_flags(argv, prog=prog, base=base, description=description)[0]
