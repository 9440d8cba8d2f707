"""Keeps TFF's C++ `worker_binary` bounded: stopped at exit, one executor stack.

TFF 0.87's local execution context launches `worker_binary` as a child and
relies on a `__del__` to stop it, which does not run reliably at interpreter
exit: the orphan keeps the parent's stdout/stderr open, so `cmd | tee log` or
CI hangs until its time limit. Importing `tf_dpsparse.federated` calls `install()`, which registers
`stop_workers` with `atexit` and on SIGTERM, so no worker outlives the Python
process that started it.

The worker also builds an executor stack, with its own copy of the loaded
computations, for every number of clients it is called with, and frees none:
with Poisson sampling that number changes every round, and over a 1,000-client
MNIST bench the worker grew to 22 GB. `LatestCardinality` disposes of the
previous round's stack when the count changes.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from typing import List, Optional

_WORKER_NAME = 'worker_binary'


def _children(parent: int) -> List[int]:
  """PIDs of `parent`'s direct children (Linux /proc)."""
  children = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', 'rb') as f:
        stat = f.read().decode(errors='replace')
    except OSError:
      continue
    # Field 4 (ppid) follows the parenthesized command name.
    fields = stat[stat.rfind(')') + 2:].split()
    if len(fields) > 1 and int(fields[1]) == parent:
      children.append(int(entry))
  return children


def _is_worker(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return _WORKER_NAME.encode() in f.read()
  except OSError:
    return False


def worker_pids(parent: Optional[int] = None) -> List[int]:
  """TFF worker processes that are children of `parent` (default: this one)."""
  if not os.path.isdir('/proc'):
    return []
  parent = os.getpid() if parent is None else parent
  return [pid for pid in _children(parent) if _is_worker(pid)]


def stop_workers(timeout: float = 5.0) -> bool:
  """SIGINT, then SIGKILL after `timeout`, every TFF worker child; reaps them.

  Returns True when no worker child remains. Safe to call more than once.
  """
  pids = worker_pids()
  for sig in (signal.SIGINT, signal.SIGKILL):
    for pid in pids:
      try:
        os.kill(pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
      for pid in list(pids):
        try:
          done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
          done = pid
        if done:
          pids.remove(pid)
      time.sleep(0.05)
    if not pids:
      break
  return len(worker_pids()) == 0


class LatestCardinality:
  """Keeps only the latest client count's executor stack in TFF's worker.

  Call `use(num_clients)` after each federated call: when the count differs
  from the previous call's, the previous stack is closed (TFF's public
  `ExecutorFactory.clean_up_executor`). Values already returned to Python are
  unaffected; a later call with that count builds a fresh stack.
  """

  def __init__(self):
    self._last = None

  def use(self, num_clients: int) -> None:
    if self._last is not None and self._last != num_clients:
      import tensorflow_federated as tff  # only processes that run TFF get here
      context = tff.framework.get_context_stack().current
      factory = getattr(context, 'executor_factory', None)
      if factory is not None:
        factory.clean_up_executor({tff.CLIENTS: self._last})
    self._last = num_clients


def _on_sigterm(signum, frame):
  stop_workers()
  raise SystemExit(128 + signum)


def install() -> None:
  """Registers `stop_workers` at exit and on SIGTERM (main thread only)."""
  atexit.register(stop_workers)
  try:
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      signal.signal(signal.SIGTERM, _on_sigterm)
  except ValueError:  # not the main thread
    pass
