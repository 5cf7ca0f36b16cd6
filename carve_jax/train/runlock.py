"""One run per output folder: `<out_dir>/run.lock`, held for the life of a training run.

    with RunLock(out_dir):   # raises RunLockedError if a live run holds it
      ...

The lock is an exclusive `fcntl.flock` on the file (the kernel drops it when the process dies,
`kill -9` included), and the file says who holds it: {"host", "pid", "started", "argv"}. A second
run on a live lock gets `RunLockedError` naming the holder. A lock file left by a dead process (its
flock is gone with it) is taken over, saying whose it was. The file is removed when the run ends.
Not covered: filesystems where flock is not enforced across hosts (some NFS setups).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable

LOCK_NAME = "run.lock"


class RunDirError(RuntimeError):
  """The output folder cannot be created or written."""


class RunLockedError(RuntimeError):
  """Another live run holds the output folder."""


class RunLock:
  """Holds `<folder>/run.lock` from `acquire()` (or `with`) to `release()`.

  Args:
    folder: the run's output folder (created if absent); `flag` names it in errors (`--out_dir`).
    log: where the take-over message goes (default: stderr).
  """

  def __init__(self, folder: str, *, flag: str = "--out_dir", log: Callable[[str], None] | None = None):
    self.folder = os.path.abspath(os.fspath(folder))
    self.path = os.path.join(self.folder, LOCK_NAME)
    self.flag = flag
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    try:
      os.makedirs(self.folder, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise RunDirError(f"{self.flag} {self.folder}: cannot create or write it ({e.strerror})") from e
    try:
      while True:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
          if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
          raise RunLockedError(self._held_message(self._read(fd))) from None
        # The holder may have removed the file between our open and flock: lock the file at the path.
        try:
          same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
          same = False
        if same:
          break
        os.close(fd)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      previous = self._read(fd)
      if previous.get("pid") is not None:  # its holder died without removing it (kill -9, power loss)
        self.log(f"{self.flag} {self.folder}: taking over the stale lock of pid {previous['pid']} on "
                 f"{previous.get('host', '?')} (started {_when(previous)}; that run is no longer running)")
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                "argv": sys.argv}).encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)  # closing drops the flock
    self._fd = None

  def _read(self, fd: int) -> dict:
    try:
      raw = os.pread(fd, 1 << 16, 0)
      return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
      return {}

  def _held_message(self, holder: dict) -> str:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {_when(holder)}"
           if holder else "another process")
    return (f"{self.flag} {self.folder} is in use by a running training run ({who}; lock file {self.path}). "
            f"Wait for it to finish, or use another {self.flag}.")

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _when(holder: dict) -> str:
  t = holder.get("started")
  return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"
