"""`carve-train`'s first step, as a user meets it (issue 12's target: <= 20 s for the 50m preset).

Each row is one `carve-train` run (`carve_jax.train.loop.train`, the CLI's function) in a fresh process with no
persistent compile cache, and reports what its summary says: the first step's time from the start of `train`
(data, model init, checkpoint restore, the train step's trace + lower + compile, one step), split into data s,
init s (model, optimizer state, placement) and the wait for the step compiled ahead; and the run's tokens/s
(steps after the first), MFU and peak memory. `import s` is the process's time before `train` (jax, the package).

A row is MIXER[:INIT_ON[:RESETS[:AHEAD]]]: INIT_ON auto / device / host (`--init_on`), RESETS on / off
(`--reset_documents`: on is carve-train's default, the packed kernels), AHEAD on / off (`--compile_ahead`).

    python -m experiments.first_step --tiny                                  # CPU, a tiny model
    python -m experiments.first_step --rows carve,carve:device,gdn2,attention --tokens_dir .data/gpu   # GPU
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()


def _argv(spec: dict, out_dir: str) -> list[str]:
  """carve-train's flags of a row."""
  argv = ["--preset", spec["preset"], "--model", spec["mixer"], "--batch_size", str(spec["batch"]),
          "--seq_len", str(spec["seq_len"]), "--max_seq_len", str(max(spec["seq_len"], 2048)),
          "--steps", str(spec["steps"]), "--log_every", str(spec["steps"]), "--eval_every", "0", "--eval_batches", "1",
          "--compile_cache", "none", "--no-progress", "--init_on", spec["init_on"], "--out_dir", out_dir]
  argv += ["--compute_dtype", "bfloat16"] if not spec["tiny"] else ["--d_model", "32", "--n_layers", "2"]
  argv += [] if spec["resets"] else ["--no-reset_documents"]
  argv += [] if spec["ahead"] else ["--no-compile_ahead"]
  argv += ["--tokens_dir", spec["tokens_dir"]] if spec["tokens_dir"] else []
  return argv


def worker(spec: dict) -> dict:
  """One row: a carve-train run in this process; its summary's first-step and throughput fields."""
  from carve_jax.train.flags import parse_train_args  # noqa: PLC0415
  from carve_jax.train.loop import train  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as out:
    cfg = parse_train_args(_argv(spec, out))
    tokens = None
    if not spec["tokens_dir"]:  # the bundled fixture corpus, repeated to the run's length
      from experiments.bench_train import text_tokens  # noqa: PLC0415
      tokens = text_tokens(None, (spec["steps"] + 2) * spec["batch"] * (spec["seq_len"] + 1))
    import_s = time.perf_counter() - T_PROCESS
    s = train(cfg, tokens=tokens)
  return dict(spec, argv=_argv(spec, "OUT"), import_s=import_s, first_step_s=s["compile_s"], init_on_used=s["init_on"],
              **s["setup"], tokens_per_s=s["tokens_per_s"], mfu=s["mfu"], peak_device_bytes=s["peak_device_bytes"],
              backend=s["backend"])


def parse_row(term: str, args) -> dict:
  parts = (term.split(":") + ["", "", ""])[:4]
  init_on, resets, ahead = parts[1] or "auto", parts[2] or "on", parts[3] or "on"
  if not parts[0] or init_on not in ("auto", "device", "host") or resets not in ("on", "off") or ahead not in ("on", "off"):
    raise SystemExit(f"first_step: a --rows term is MIXER[:INIT_ON[:RESETS[:AHEAD]]] with INIT_ON auto, device or "
                     f"host and RESETS, AHEAD on or off; got {term!r}")
  return dict(mixer=parts[0], init_on=init_on, resets=resets == "on", ahead=ahead == "on", preset=args.preset,
              batch=args.batch, seq_len=args.seq_len, steps=args.steps, tokens_dir=args.tokens_dir, tiny=args.tiny)


def _line(r: dict) -> str:
  name = f"{r['mixer']}:{r['init_on']}:{'on' if r['resets'] else 'off'}:{'on' if r['ahead'] else 'off'}"
  if r.get("error"):
    return f"{name}: {r['error'][-600:]}"
  wait = r.get("compile_wait_s")
  return (f"{name}: first step {r['first_step_s']:.1f} s (data {r['data_s']:.1f}, init on {r['init_on_used']} "
          f"{r['init_s']:.1f}" + (f", waited {wait:.1f} for the compile" if wait is not None else "")
          + f"), import {r['import_s']:.1f} s; {r['tokens_per_s']:,.0f} tokens/s")


def error_line(error: str, width: int = 160) -> str:
  """The last line of a row's error that names an exception ("...Error: ..."), else its last line; cut to
  `width` characters and made safe for a markdown cell."""
  lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
  named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", ln)]
  line = (named or lines or [""])[-1]
  return line[:width].replace("|", "/")


def markdown(results: list[dict]) -> str:
  from carve_jax.train.metrics import format_bytes  # noqa: PLC0415
  from experiments.report import md_table  # noqa: PLC0415
  head = ["mixer", "init on", "document resets", "compile ahead", "first step s", "data s", "init s",
          "waited for the compile s", "import s", "tokens/s", "MFU", "peak memory"]
  rows = []
  for r in results:
    key = [r["mixer"], r["init_on"], "on" if r["resets"] else "off", "on" if r["ahead"] else "off"]
    if r.get("error"):
      rows.append(key + ["failed: " + error_line(r["error"])] + [""] * 7)
      continue
    wait = r.get("compile_wait_s")
    rows.append(key[:1] + [r["init_on_used"] + (" (auto)" if r["init_on"] == "auto" else "")] + key[2:] + [
        f"{r['first_step_s']:.1f}", f"{r['data_s']:.2f}", f"{r['init_s']:.2f}", "" if wait is None else f"{wait:.2f}",
        f"{r['import_s']:.1f}", f"{r['tokens_per_s']:,.0f}", "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        format_bytes(r["peak_device_bytes"])])
  spec = results[0] if results else {}
  return (md_table(head, rows) + f"\n\n{spec.get('preset')} preset, {spec.get('batch')} x {spec.get('seq_len')} tokens a "
          f"step, {spec.get('steps')} steps, no persistent compile cache; first step s: from the start of `train` to "
          "the first step's metrics on the host (carve-train's `first step after`); import s comes before it.\n")


@dataclasses.dataclass
class FirstStepFlags:
  """Flags of the first-step benchmark.

  Attributes:
    worker: internal: one row's JSON spec, run in this process.
    tiny: CPU-sized rows (the tiny preset at d 32, 2 layers, 4 x 64 tokens, 3 steps).
    rows: comma list of MIXER[:INIT_ON[:RESETS[:AHEAD]]] terms (module docstring).
    preset: carve-train's --preset.
    batch: sequences a step.
    seq_len: tokens a sequence.
    steps: steps a run (the first is the one timed; tokens/s is of the rest).
    tokens_dir: carve-train's --tokens_dir (an export, `python -m carve_jax.data export`); none: the bundled
      fixture corpus, repeated.
    row_timeout_s: a row's time limit.
    out_dir: where first_step<tag>.{json,md} go.
    tag: suffix of the result file names.
  """
  worker: str | None = None
  tiny: bool = False
  rows: str = "carve,carve:device,gdn2,attention"
  preset: str = "50m"
  batch: int = 8
  seq_len: int = 4096
  steps: int = 12
  tokens_dir: str | None = None
  row_timeout_s: float = 240
  out_dir: str = str(Path(__file__).resolve().parent / "results" / "first_step")
  tag: str = ""


def run(args) -> list[dict]:
  from experiments.runtime import run_worker  # noqa: PLC0415
  results = []
  for term in [t for t in args.rows.split(",") if t]:
    res = run_worker("experiments.first_step", parse_row(term, args), args.row_timeout_s)
    results.append(res)
    print(f"[first_step] {_line(res)}", flush=True)
  return results


def _tiny(args) -> None:
  args.preset, args.batch, args.seq_len, args.steps, args.tag = "tiny", 4, 64, 3, args.tag or "_tiny"


def main(argv=None) -> int:
  from experiments.runtime import rows_main  # noqa: PLC0415
  return rows_main(FirstStepFlags, argv, module="experiments.first_step", doc=__doc__, worker=worker, run=run,
                   markdown=markdown, tiny=_tiny, need_all=True)


if __name__ == "__main__":
  sys.exit(main())
