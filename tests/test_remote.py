"""Rounds on TFF executor workers equal the one-process rounds (issue 19).

Two `tf-dpsparse worker --port P` processes on 127.0.0.1 serve TFF's C++
executor service; the same seeded rounds run through them and in the
local worker, and must agree. Every worker is stopped at the end, and each
process (the command and its `worker_binary` child) is checked gone by PID.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tf_dpsparse as tds

tff = pytest.importorskip('tensorflow_federated')
portpicker = pytest.importorskip('portpicker')
from tf_dpsparse import config as config_lib  # noqa: E402
from tf_dpsparse import federated  # noqa: E402
from tf_dpsparse.federated import _workers  # noqa: E402
from tf_dpsparse.federated import remote  # noqa: E402
from tf_dpsparse.federated import simulation  # noqa: E402
from test_federated import digits_clients  # noqa: E402
from test_federated import model_fn  # noqa: E402  (the same digits MLP)

START_TIMEOUT = 60.0  # seconds for a worker to listen (2 busy cores)
STOP_TIMEOUT = 15.0


def _gone(pid: int) -> bool:
  """No process `pid`, or only its zombie (reaped by its parent soon)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rpartition(')')[2].split()[0] == 'Z'
  except OSError:
    return True


class Worker:
  """`tf-dpsparse worker --port P` in a subprocess, its output in files."""

  def __init__(self, tmp_path, port: int):
    self.port = port
    self.log = tmp_path / f'worker-{port}.log'
    with open(self.log, 'wb') as log:
      self.proc = subprocess.Popen(
          [sys.executable, '-m', 'tf_dpsparse.cli', 'worker', '--port',
           str(port)], stdout=log, stderr=subprocess.STDOUT)
    self.service_pids = []

  @property
  def address(self) -> str:
    return f'127.0.0.1:{self.port}'

  def wait_ready(self) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while b'executor service on port' not in self.log.read_bytes():
      assert self.proc.poll() is None, self.log.read_text()
      assert time.monotonic() < deadline, 'worker did not start in time'
      time.sleep(0.1)
    self.service_pids = _workers.worker_pids(self.proc.pid)
    assert len(self.service_pids) == 1, self.service_pids

  def pids(self):
    return [self.proc.pid, *self.service_pids]

  def kill(self) -> None:
    """Last resort, by PID: the service first (it would die with us anyway)."""
    for pid in reversed(self.pids()):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    self.proc.wait(STOP_TIMEOUT)


@pytest.fixture(scope='module')
def workers(tmp_path_factory):
  """Two workers for the module; stopped (SIGTERM, SIGINT) and checked gone."""
  tmp = tmp_path_factory.mktemp('workers')
  pool = []
  try:
    for _ in range(2):
      pool.append(Worker(tmp, portpicker.pick_unused_port()))
    for worker in pool:
      worker.wait_ready()
    yield pool
    for worker, sig in zip(pool, (signal.SIGTERM, signal.SIGINT)):
      worker.proc.send_signal(sig)
    for worker in pool:
      assert worker.proc.wait(STOP_TIMEOUT) == 0, worker.log.read_text()
  finally:
    for worker in pool:
      if worker.proc.poll() is None:
        worker.kill()
  left = [pid for worker in pool for pid in worker.pids() if not _gone(pid)]
  assert not left, f'processes left behind: {left}'


@pytest.fixture(scope='module')
def clients():
  return digits_clients(5)


def _rounds(clients, rounds: int, privacy: str):
  """`rounds` seeded rounds of 5 digits devices (4 of them in round 2):
  (flat weights, residuals, each round's metrics)."""
  process = _process(privacy, seed=7)
  store = federated.ClientStateStore(5, process.size)
  state, metrics = process.initialize(), []
  for r in range(rounds):
    ids = [0, 2, 3, 4] if r == 1 else [0, 1, 2, 3, 4]
    out = process.next(state, [clients[i] for i in ids], store.get(ids))
    store.put(out.client_states)
    state = out.state
    metrics.append({k: float(out.metrics[k]) for k in (
        'loss', 'bytes_up', 'bytes_down', 'server_residual_norm',
        'epsilon')})
  weights = tds.core.flatten(list(process.get_model_weights(state).trainable))
  return weights.numpy(), store.state_dict()['residuals'].copy(), metrics


@pytest.mark.parametrize('privacy', ['client', 'example'])
def test_two_workers_run_the_same_rounds(workers, clients, privacy):
  local = _rounds(clients, 3, privacy)
  with federated.use_workers([w.address for w in workers]) as context:
    spread = _rounds(clients, 3, privacy)
  assert tff.framework.get_context_stack().current is not context
  np.testing.assert_allclose(spread[0], local[0], atol=1e-6)
  np.testing.assert_allclose(spread[1], local[1], atol=1e-6)
  for got, want in zip(spread[2], local[2]):
    assert got == pytest.approx(want, abs=1e-6)


def _process(privacy, seed):
  sgd = tff.learning.optimizers.build_sgdm
  kwargs = dict(clients_per_round=5) if privacy == 'client' else dict(
      batch_size=30, local_steps=1, min_client_examples=120)
  return federated.build_dp_sparse_fed_avg(
      model_fn, sgd(0.1), sgd(1.0), upload_density=0.1, download_density=0.1,
      privacy=privacy, l2_norm_clip=1.0, noise_multiplier=0.5,
      total_clients=5, seed=seed, **kwargs)


def test_one_worker_runs_the_whole_round(workers, clients):
  # No split, no recomputation: unseeded example level runs there too.
  local = _rounds(clients, 2, 'example')
  with federated.use_workers(workers[0].address) as context:
    remote_rounds = _rounds(clients, 2, 'example')
    process = _process('example', None)
    out = process.next(process.initialize(), clients, federated.
                       ClientStateStore(5, process.size).get(range(5)))
  assert context.executor_factory is not None  # TFF's sync context
  np.testing.assert_allclose(remote_rounds[0], local[0], atol=1e-6)
  np.testing.assert_allclose(remote_rounds[1], local[1], atol=1e-6)
  assert np.isfinite(out.metrics['loss'])


def test_unseeded_device_noise_is_not_drawn_twice(workers, clients):
  # TFF's mergeable form recomputes the device work after the merge: with
  # DP-SGD noise from OS entropy a device would keep another draw's residual.
  # `process.next` splits the round instead (test_remote_split); the whole
  # round computation, called directly, still takes the mergeable form.
  process = _process('example', None)
  store = federated.ClientStateStore(5, process.size)
  with federated.use_workers([w.address for w in workers]):
    state = process.initialize()  # no client data: runs whole on one worker
    with pytest.raises(remote.RecomputedRandomnessError, match='twice'):
      process.iterative_process.next(state, clients, store.get(range(5)))
    # Client level draws its noise once, on the server, after the merge.
    process = _process('client', None)
    out = process.next(process.initialize(), clients, store.get(range(5)))
  assert np.isfinite(out.metrics['loss'])


def test_run_with_workers_runs_the_local_runs_rounds(workers):
  # Only what does not depend on local training is compared: two identical
  # seeded client-level `simulation.run`s differ already in one process
  # (round 1's train loss; not the workers'), so bit-equality is checked
  # on the process above.
  config = config_lib.RunConfig(
      dataset='digits', rounds=2, privacy='client', clients_per_round=4,
      noise_multiplier=0.5, noise_seed=3, local_steps=1)
  local = simulation.run(config, progress=False)
  spread = simulation.run(dataclasses.replace(
      config, workers=','.join(w.address for w in workers)), progress=False)
  assert spread['config']['workers'] == ','.join(w.address for w in workers)
  assert [r['clients'] for r in spread['rounds']] == [
      r['clients'] for r in local['rounds']]
  for got, want in zip(spread['rounds'], local['rounds']):
    assert got['epsilon'] == pytest.approx(want['epsilon'], abs=1e-9)
    assert np.isfinite(got['test_loss']) and 0 <= got['accuracy'] <= 1


def test_unreachable_worker_is_refused_in_time():
  port = portpicker.pick_unused_port()
  start = time.monotonic()
  with pytest.raises(remote.WorkerUnreachableError, match=str(port)):
    with federated.use_workers([f'127.0.0.1:{port}'], timeout=1.0):
      pass
  assert time.monotonic() - start < 10


def test_workers_flag_is_parsed_and_checked():
  from tf_dpsparse import cli  # pylint: disable=g-import-not-at-top
  args = cli.build_parser().parse_args(
      ['run', '--workers', 'a:1,b:2', '--client-state-path', '/tmp/x'])
  assert (args.workers, args.client_state_path) == ('a:1,b:2', '/tmp/x')
  with pytest.raises(ValueError, match='host:port'):
    config_lib.RunConfig(workers='a:1,b')
  assert remote.parse_workers(' a:1, b:2 ') == ['a:1', 'b:2']


def test_worker_dies_with_its_command_even_when_killed(tmp_path):
  worker = Worker(tmp_path, portpicker.pick_unused_port())
  try:
    worker.wait_ready()
    os.kill(worker.proc.pid, signal.SIGKILL)  # no handler runs
    worker.proc.wait(STOP_TIMEOUT)
    deadline = time.monotonic() + STOP_TIMEOUT
    while not all(_gone(pid) for pid in worker.pids()):
      assert time.monotonic() < deadline, f'left behind: {worker.pids()}'
      time.sleep(0.1)
  finally:
    if worker.proc.poll() is None or not all(map(_gone, worker.pids())):
      worker.kill()


class _Stop(Exception):
  pass


def test_run_keeps_device_states_in_the_memory_mapped_file(tmp_path):
  path, out = tmp_path / 'states.npy', str(tmp_path / 'out')
  config = config_lib.RunConfig(
      dataset='digits', rounds=2, privacy=None, clients_per_round=3,
      client_state_path=str(path))

  def stop(done):
    if done == 1:
      raise _Stop

  with pytest.raises(_Stop):  # a crash after round 1's checkpoint ...
    simulation.run(config, progress=False, out=out, after_round=stop)
  result = simulation.run(config, progress=False, out=out)  # ... resumed
  assert [r['round'] for r in result['rounds']] == [1, 2]
  states = np.load(path, mmap_mode='r')
  assert states.shape == (10, result['summary']['parameters'])
  # Only devices that took part carry a residual (density 0.02 < 1).
  touched = int((np.abs(states).sum(axis=1) > 0).sum())
  assert 3 <= touched <= 6
