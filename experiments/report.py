"""Result files of an experiment: `<out_dir>/<name>.json` (all numbers, the environment and the exact
command), `<name>.md` (tables) and `<name>.png` (plot); `out_dir` defaults to
`experiments/results/<experiment>/` (`results_dir`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


def results_dir(experiment: str) -> str:
  """experiments/results/<experiment> (the current results of that experiment)."""
  return str(RESULTS / experiment)


def env_info() -> dict:
  """Device, library versions, git commit, time and the exact command line."""
  import flax
  import jax
  import optax

  def _git(*args):
    try:
      return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  dev = jax.devices()[0]
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  prog = (["-m", spec.name] if spec is not None and spec.name else
          [os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "?"])
  return {
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}",
      "device_count": jax.device_count(),
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
      "python": platform.python_version(), "host": platform.node(),
      # CARVE_COMMIT first: the GPU machine's copy of the tree has a stale HEAD (device README)
      "git_commit": os.environ.get("CARVE_COMMIT") or _git("rev-parse", "--short", "HEAD"),
      "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "command": " ".join(shlex.quote(a) for a in ["python", *prog] + sys.argv[1:]),
  }


def fmt_bytes(n) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024


def md_table(header: list[str], rows: list[list]) -> str:
  def cell(v):
    if isinstance(v, float):
      return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def write_results(name: str, out_dir: str, payload: dict, markdown: str, fig=None) -> dict[str, str]:
  """Writes <out_dir>/<name>.json (payload + env), .md (title, env, command, markdown), .png (fig)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  env = payload.setdefault("env", env_info())
  paths = {"json": str(out / f"{name}.json"), "md": str(out / f"{name}.md")}
  (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
  head = (f"# {name}\n\nDevice `{env['device']}`; jax {env['jax']}, flax {env['flax']}, optax {env['optax']}; "
          f"commit {env['git_commit']}; {env['utc']}.\n\nCommand: `{env['command']}`\n\n")
  (out / f"{name}.md").write_text(head + markdown.rstrip() + "\n")
  if fig is not None:
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    paths["png"] = str(out / f"{name}.png")
  return paths


def _jsonable(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def plt():
  """matplotlib.pyplot on the Agg backend (no display)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
