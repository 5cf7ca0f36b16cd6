"""Statistics of the experiments: a log-log least-squares power-law fit, mean and sample std."""

from __future__ import annotations

import math

import numpy as np


def fit_power_law(x, y) -> dict:
  """Least-squares fit of log y = a + p log x: {"exponent": p, "prefactor": e^a, "r2": R^2,
  "exponent_stderr": standard error of p}. Needs >= 3 positive points."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
    raise ValueError(f"fit_power_law: arguments `x`, `y` must be 1-D of equal length >= 3, got {x.shape}, {y.shape}")
  if not (np.all(x > 0) and np.all(y > 0)):
    raise ValueError("fit_power_law: arguments `x`, `y` must be positive (log-log fit)")
  lx, ly = np.log(x), np.log(y)
  A = np.stack([np.ones_like(lx), lx], axis=1)
  (a, p), *_ = np.linalg.lstsq(A, ly, rcond=None)
  resid = ly - A @ np.array([a, p])
  ss_tot = float(((ly - ly.mean()) ** 2).sum())
  r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
  dof = len(x) - 2
  se = math.sqrt(float((resid ** 2).sum()) / dof / float(((lx - lx.mean()) ** 2).sum())) if dof > 0 else float("nan")
  return {"exponent": float(p), "prefactor": float(math.exp(a)), "r2": r2, "exponent_stderr": se}


def mean_std(xs) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for one value)."""
  xs = np.asarray(list(xs), np.float64)
  return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0
