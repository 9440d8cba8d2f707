"""Keeps TFF's C++ `worker_binary` bounded: dies with its parent, one stack.

TFF 0.87's local execution context launches `worker_binary` as a child and
relies on a `__del__` to stop it, which does not run reliably at interpreter
exit: the orphan keeps the parent's stdout/stderr open, so `cmd | tee log` or
CI hangs until its time limit. Importing `tf_dpsparse.federated` calls
`install()`, which registers `stop_workers` with `atexit` and on SIGTERM, so a
clean exit stops the worker gracefully (SIGINT, then SIGKILL).

No Python code runs when the parent is SIGKILLed (OOM killer, CI timeout,
`kill -9`), so `install()` also asks the kernel to kill the worker then: it
gives TFF's worker launcher a `Popen` that sets `PR_SET_PDEATHSIG` to SIGKILL
in the child (Linux `prctl`; inherited across exec), only for `worker_binary`.
This is the least invasive fix that survives SIGKILL: TFF keeps choosing the
port, starting, restarting and stopping its worker; the only change is one
flag on one child. Starting the worker ourselves would mean rebuilding TFF's
private executor factory and context. The kernel sends that signal when the
*thread* that forked the child exits, and TFF forks from its event-loop
thread (an async context forks from whatever thread runs the loop), so the
fork is done on a daemon thread of ours that lives until the process exits.
A worker TFF started before `install()` is not covered (atexit/SIGTERM still
are); nor are non-Linux systems.

The worker also builds an executor stack, with its own copy of the loaded
computations, for every number of clients it is called with, and frees none:
with Poisson sampling that number changes every round, and over a 1,000-client
MNIST bench the worker grew to 22 GB. `LatestCardinality` disposes of the
previous round's stack when the count changes.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types
from typing import Callable, List, Optional

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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
  """libc's `prctl`, resolved before any fork, or None off Linux."""
  if not sys.platform.startswith('linux'):
    return None
  try:
    return ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None


def _die_with(parent: int, prctl) -> Callable[[], None]:
  """A `preexec_fn` (runs in the forked child) that dies with `parent`.

  Checks `getppid` after `prctl`: a parent that died between fork and prctl
  would never signal, and the child must not outlive it.
  """

  def preexec():
    prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
          ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if os.getppid() != parent:
      os.kill(os.getpid(), signal.SIGKILL)

  return preexec


class _Spawner:
  """One daemon thread, alive until the process exits, that does the forks.

  PR_SET_PDEATHSIG fires when the forking thread exits, not the process, so
  forking on TFF's event-loop thread would kill the worker with that loop.
  """

  def __init__(self):
    self._requests = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._thread = None

  def call(self, fn: Callable[[], object]) -> object:
    if threading.current_thread() is self._thread:
      return fn()
    with self._lock:
      if self._thread is None:
        self._thread = threading.Thread(
            target=self._serve, name='tf_dpsparse-worker-spawner', daemon=True)
        self._thread.start()
    done = concurrent.futures.Future()
    self._requests.put((fn, done))
    return done.result()

  def _serve(self):
    while True:
      fn, done = self._requests.get()
      try:
        done.set_result(fn())
      except BaseException as e:  # pylint: disable=broad-except
        done.set_exception(e)


_SPAWNER = _Spawner()


class WorkerPopen(subprocess.Popen):
  """`subprocess.Popen` whose `worker_binary` child dies with this process.

  Any other command is started unchanged. The child is forked on `_SPAWNER`'s
  thread so that its parent-death signal outlives TFF's threads.
  """

  def __init__(self, args, *rest, **kwargs):
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else args
    prctl = _prctl()
    is_worker = bool(argv) and os.path.basename(
        os.fsdecode(argv[0])) == _WORKER_NAME
    if not is_worker or prctl is None or kwargs.get('preexec_fn'):
      super().__init__(args, *rest, **kwargs)
      return
    kwargs['preexec_fn'] = _die_with(os.getpid(), prctl)
    _SPAWNER.call(lambda: super(WorkerPopen, self).__init__(
        args, *rest, **kwargs))


def _subprocess_with_worker_popen() -> types.ModuleType:
  """A stand-in for the `subprocess` module whose `Popen` is `WorkerPopen`."""
  module = types.ModuleType('subprocess', 'subprocess, with WorkerPopen')
  module.__dict__.update(vars(subprocess))
  module.Popen = WorkerPopen
  return module


def _make_workers_die_with_parent() -> bool:
  """Points TFF's worker launcher at `WorkerPopen`; True when it is in place.

  Only the `subprocess` name inside TFF's executor_factory module changes (it
  uses it for the worker alone); the process's `subprocess` is untouched.
  """
  try:
    from tensorflow_federated.python.core.impl.executor_stacks import executor_factory  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  current = getattr(executor_factory, 'subprocess', None)
  if current is None or getattr(current, 'Popen', None) is WorkerPopen:
    return current is not None
  if current is not subprocess:  # someone else's patch: leave it alone
    return False
  executor_factory.subprocess = _subprocess_with_worker_popen()
  return True


def install() -> None:
  """Workers die with this process: at exit, on SIGTERM, and on SIGKILL.

  Call after importing TFF and before its first computation runs.
  """
  _make_workers_die_with_parent()
  atexit.register(stop_workers)
  try:
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      signal.signal(signal.SIGTERM, _on_sigterm)
  except ValueError:  # not the main thread
    pass


# `tf-dpsparse worker`: one TFF executor service, for `use_workers` on other
# processes or machines. It is TFF's own `worker_binary`, started as TFF's
# local factory starts it, as a child that dies with this process.

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def worker_binary_path() -> str:
  """TFF's `worker_binary`, where TFF's local factory looks for it.

  That is `tensorflow_federated/data/worker_binary` (executor_factory.py:
  four levels up from itself, then `data`), found here without importing
  TFF, which would load TensorFlow into a process that only waits.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('tensorflow_federated')
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError('tensorflow_federated is not installed.')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data',
                      _WORKER_NAME)
  if not os.path.isfile(path):
    raise RuntimeError(f'Expected a TFF worker binary at {path}.')
  return path


def _listening(port: int) -> bool:
  """Whether something accepts TCP connections on 127.0.0.1:`port`."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.settimeout(0.2)
    return s.connect_ex(('127.0.0.1', port)) == 0


def _stop(child: subprocess.Popen, timeout: float) -> int:
  """SIGINT (how TFF stops its worker), then SIGKILL after `timeout`."""
  for sig in (signal.SIGINT, signal.SIGKILL):
    if child.poll() is None:
      child.send_signal(sig)
    try:
      return child.wait(timeout)
    except subprocess.TimeoutExpired:
      continue
  return child.wait()


def serve(port: int, *, max_concurrent_computation_calls: int = -1,
          timeout: float = 5.0,
          announce: Callable[[str], None] = print) -> int:
  """Runs one TFF executor service on `port` until SIGINT or SIGTERM.

  The service is a child (`WorkerPopen`: killed by the kernel if this
  process is SIGKILLed); a stop signal stops it (SIGINT, then SIGKILL after
  `timeout`) and returns 0. Returns the service's own exit code if it ends
  first (a port in use, say). `announce` gets one line once it listens.
  """
  stop, previous, child = threading.Event(), {}, None
  # Before the fork: a handled signal is reset to the default in the exec'd
  # child, while one ignored here (`cmd &` ignores SIGINT) would stay ignored.
  for sig in _STOP_SIGNALS:
    previous[sig] = signal.signal(sig, lambda *_: stop.set())
  calls = max_concurrent_computation_calls
  try:
    child = WorkerPopen([worker_binary_path(), f'--port={port}',
                         f'--max_concurrent_computation_calls={calls}'])
    announced = False
    while child.poll() is None and not stop.wait(0.1):
      if not announced and _listening(port):
        announce(f'tf-dpsparse worker: TFF executor service on port {port} '
                 f'(pid {child.pid}); SIGINT or SIGTERM stops it')
        announced = True
    return 0 if child.poll() is None else child.returncode
  finally:
    if child is not None and child.poll() is None:
      _stop(child, timeout)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
