"""One experiment process at a time on a shared GPU, so each measures tokens/s with the GPU to itself
while the others compile on the CPU.

    lock = GpuLock.from_env()      # CARVE_GPU_LOCK=<file>, CARVE_GPU_PRIORITY=<int> (default 0)
    lock.announce()                # compiled, only setting up: lower priorities wait for me
    with lock.hold() as waited:    # exclusive; yields the seconds waited
        ...timed steps...

A waiting (or announced) process of higher priority goes first: it leaves a marker file
`<file>.wait.<priority>.<pid>` while it waits, and a holder of the flock gives it back while a live
process of higher priority has a marker. Without CARVE_GPU_LOCK, `from_env()` is a lock that
never waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import time
from pathlib import Path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class GpuLock:
  """An exclusive flock on `path` with priorities (see the module docstring); path None: no lock."""

  def __init__(self, path: str | None, priority: int = 0):
    self.path, self.priority = path, priority

  @classmethod
  def from_env(cls) -> "GpuLock":
    return cls(os.environ.get("CARVE_GPU_LOCK") or None, int(os.environ.get("CARVE_GPU_PRIORITY", "0")))

  @property
  def _marker(self) -> str:
    return f"{self.path}.wait.{self.priority}.{os.getpid()}"

  def announce(self) -> None:
    """Marks this process as about to ask for `hold`; `hold` clears the mark."""
    if self.path:
      Path(self._marker).touch()

  def _higher_waiting(self) -> bool:
    for m in glob.glob(self.path + ".wait.*"):
      _, p, pid = m.rsplit(".", 2)
      if int(p) > self.priority and _pid_alive(int(pid)):
        return True
    return False

  @contextlib.contextmanager
  def hold(self):
    """Exclusive use among the processes sharing the lock file; yields the seconds waited."""
    if not self.path:
      yield 0.0
      return
    marker = self._marker
    Path(marker).touch()
    t0 = time.time()
    f = open(self.path, "a")
    try:
      while True:
        fcntl.flock(f, fcntl.LOCK_EX)
        if not self._higher_waiting():
          break
        fcntl.flock(f, fcntl.LOCK_UN)
        time.sleep(0.05)
      os.remove(marker)
      yield time.time() - t0
    finally:
      if os.path.exists(marker):
        os.remove(marker)
      fcntl.flock(f, fcntl.LOCK_UN)
      f.close()
