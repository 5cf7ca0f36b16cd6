"""Training throughput, measured the same way by `carve-train` and the experiments.

    tokens/s = tokens_per_step * timed steps / timed seconds

The first step is not timed (it includes compilation); time is taken between host syncs (the
steps counted since the last sync are then done), and pauses (evaluation) are left out.
"""

from __future__ import annotations

import math
import time


class ThroughputMeter:
  """Tokens/s over the timed steps.

      m = ThroughputMeter(tokens_per_step)
      ...first step, block on it...;  m.start()
      for each later step:  dispatch;  m.count(host_s)   # host_s: host time of its loop body
      at a host sync:        m.lap()                      # -> host ms per step of this lap
      after an evaluation:   m.start()                    # its time is not counted
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.steps = 0  # timed steps so far
    self.seconds = 0.0  # their wall time
    self._mark: float | None = None
    self._lap_steps = 0
    self._lap_host_s = 0.0

  def start(self) -> None:
    """Time from now (after the first step, or after a pause)."""
    self._mark = time.perf_counter()

  def count(self, host_s: float = 0.0) -> None:
    """One more step dispatched since the last lap; `host_s` of host time spent on it."""
    self._lap_steps += 1
    self._lap_host_s += host_s

  def lap(self) -> float:
    """At a host sync: adds the steps counted since the last lap (or start) and the time since;
    returns their mean host milliseconds per step (NaN if none)."""
    now = time.perf_counter()
    if self._mark is not None and self._lap_steps:
      self.steps += self._lap_steps
      self.seconds += now - self._mark
    host_ms = 1e3 * self._lap_host_s / self._lap_steps if self._lap_steps else math.nan
    self._mark, self._lap_steps, self._lap_host_s = now, 0, 0.0
    return host_ms

  @property
  def step_s(self) -> float | None:
    """Mean seconds per timed step (None before any)."""
    return self.seconds / self.steps if self.steps else None

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_per_step * self.steps / self.seconds if self.seconds > 0 else math.nan
