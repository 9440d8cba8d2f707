"""Exact resume of `tf-dpsparse run` and `tf-dpsparse bench` (issue 16, item 4).

A run checkpoints after every round; killed, it resumes after its last
completed round and ends where an uninterrupted run ends: every round once in
rounds.json, the same ε per round and the same ledger (no event counted
twice or lost), and with seeded noise the same model and device states.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip('tensorflow_federated')
import tensorflow as tf  # noqa: E402

from tf_dpsparse import cli  # noqa: E402
from tf_dpsparse import privacy  # noqa: E402
from tf_dpsparse.config import RunConfig  # noqa: E402
from tf_dpsparse.federated import _workers  # noqa: E402
from tf_dpsparse.federated import checkpoint  # noqa: E402
from tf_dpsparse.federated import simulation  # noqa: E402
from tf_dpsparse.federated.client_states import ClientStateStore  # noqa: E402

LABEL = 'dp-sparse ↑0.02 ↓0.02'  # tf-dpsparse run's label at its densities
RUN = ['run', '--dataset', 'digits', '--rounds', '8', '--no-baseline',
       '--no-progress', '--noise-seed', '7']


class _Interrupted(Exception):
  """Stands for a crash after a round's checkpoint."""


def _stop_after(round_num):
  def hook(done):
    if done == round_num:
      raise _Interrupted(done)
  return hook


def _rows(result):
  """The rounds without their wall-clock seconds (the one field that may
  differ between two runs)."""
  return [{k: v for k, v in row.items() if k != 'seconds'}
          for row in result['rounds']]


def _assert_same_final_state(a: str, b: str):
  """The last checkpoints of two runs hold the same process state (model,
  public model, server residual, history, optimizer) and device states,
  bit for bit."""
  first, second = checkpoint.read_state(a), checkpoint.read_state(b)
  for part in ('process', 'client_states'):
    left, right = tf.nest.flatten(first[part]), tf.nest.flatten(second[part])
    assert len(left) == len(right) > 0
    for x, y in zip(left, right):
      if x.dtype.kind in 'OSU':  # names in TFF's DP query state
        assert x == y
      else:  # bit for bit
        np.testing.assert_array_equal(x, y)


def test_interrupted_run_resumes_to_the_uninterrupted_run(tmp_path, capfd,
                                                          monkeypatch):
  config = RunConfig(dataset='digits', rounds=5, noise_seed=3)
  resumed, whole = str(tmp_path / 'resumed'), str(tmp_path / 'whole')
  with pytest.raises(_Interrupted):
    simulation.run(config, progress=False, out=resumed,
                   after_round=_stop_after(3))
  path = checkpoint.directory(resumed, 'dp-sparse')
  assert checkpoint.read_state(path)['progress']  # round 3's
  result = simulation.run(config, progress=False, out=resumed)
  assert 'resuming dp-sparse after round 3 of 5' in capfd.readouterr().err
  expected = simulation.run(config, progress=False, out=whole)
  assert [r['round'] for r in result['rounds']] == [1, 2, 3, 4, 5]
  assert _rows(result) == _rows(expected)
  assert result['ledger'] == expected['ledger']
  assert sum(e['count'] for e in result['ledger']['entries']) == 5
  assert result['summary']['epsilon'] == expected['summary']['epsilon']
  _assert_same_final_state(path, checkpoint.directory(whole, 'dp-sparse'))

  def no_training(*args):
    raise AssertionError('a finished run trained again')

  monkeypatch.setattr(simulation, 'load_data', no_training)
  again = simulation.run(config, progress=False, out=resumed)
  assert 'already complete' in capfd.readouterr().err
  assert again == result


def test_client_level_run_with_skipped_rounds_resumes_exactly(tmp_path,
                                                              capfd):
  """Poisson sampling at 1 of 10 devices a round skips rounds (charged,
  no row); topk catch-up keeps a view per device. Interrupted after a
  skipped round or not, the resumed run records the same rows, charges every
  round once and ends with the same device views."""
  config = RunConfig(dataset='digits', rounds=6, privacy='client',
                     clients_per_round=1, catch_up='topk', noise_seed=5,
                     seed=1)
  resumed, whole = str(tmp_path / 'resumed'), str(tmp_path / 'whole')
  with pytest.raises(_Interrupted):
    simulation.run(config, progress=False, out=resumed,
                   after_round=_stop_after(3))
  result = simulation.run(config, progress=False, out=resumed)
  assert 'after round 3 of 6' in capfd.readouterr().err
  expected = simulation.run(config, progress=False, out=whole)
  assert _rows(result) == _rows(expected)
  assert len(result['rounds']) < 6  # some rounds drew nobody
  assert result['ledger'] == expected['ledger']
  assert sum(e['count'] for e in result['ledger']['entries']) == 6
  _assert_same_final_state(checkpoint.directory(resumed, 'dp-sparse'),
                           checkpoint.directory(whole, 'dp-sparse'))


def _progress(seed: int, done: int = 0) -> checkpoint.Progress:
  rng = np.random.default_rng(seed)
  store = ClientStateStore(3, 4, initial_view=np.zeros(4, np.float32))
  store.put([dict(residual=rng.normal(size=4), view=rng.normal(size=4),
                  last_sync_round=done, client_id=1)])
  state = {'weights': [rng.normal(size=(2, 2)).astype(np.float32)],
           'round_num': np.int32(done)}
  return checkpoint.Progress(done, state, store, rng,
                             [{'round': r} for r in range(1, done + 1)],
                             {'up': done, 'down': 0, 'dense': 0})


class _Process:

  def __init__(self):
    self.ledger = privacy.PrivacyLedger(1e-5)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
  """Round 3's checkpoint half-written (its temporary directory, as a kill
  during TFF's SavedModel write leaves it): round 2's is loaded, the debris
  removed, and every piece comes back: state, devices, RNG, rows, ledger."""
  config = RunConfig(dataset='digits', rounds=4)
  out = str(tmp_path)
  process = _Process()
  event = privacy.sampled_gaussian_event(1.0, 0.1, 2)
  store = checkpoint.RunCheckpoint(out, 'x', config)
  for done in (1, 2):
    process.ledger.record(event)
    saved = _progress(done, done)
    store.save(saved, process.ledger)
  debris = os.path.join(store.path, 'round_3_temp1234')
  os.makedirs(debris)
  ledger = process.ledger.to_dict()
  process.ledger = privacy.PrivacyLedger(1e-5)
  reopened = checkpoint.RunCheckpoint(out, 'x', config)
  assert reopened.existed and not os.path.exists(debris)
  assert reopened.latest() == 2 and reopened.completed() is None
  fresh = _progress(0)
  assert reopened.restore(fresh, process)
  assert process.ledger.to_dict() == ledger
  assert (fresh.done, fresh.rounds, fresh.cumulative) == (
      2, saved.rounds, saved.cumulative)
  np.testing.assert_array_equal(fresh.state['weights'][0],
                                saved.state['weights'][0])
  for name, array in saved.store.state_dict().items():
    np.testing.assert_array_equal(fresh.store.state_dict()[name], array)
  assert fresh.rng.random() == saved.rng.random()


def _changing(store, rng, ids, round_num):
  """Gives devices `ids` new states, as a round that sampled them does."""
  store.put([dict(residual=rng.normal(size=store.state_dict()[
      'residuals'].shape[1]), view=rng.normal(size=store.state_dict()[
          'views'].shape[1]), last_sync_round=round_num, client_id=i)
             for i in ids])


def _same_store(a, b):
  for name, array in a.state_dict().items():
    np.testing.assert_array_equal(b.state_dict()[name], array)


@pytest.mark.parametrize('crash', ['before_commit', 'before_fold',
                                   'mid_fold'])
def test_a_crash_at_any_step_of_a_device_checkpoint_loses_at_most_the_round(
    tmp_path, monkeypatch, crash):
  """Round 3's device delta is written, then its program state commits the
  round, then the delta is folded into the base. Cut off before the commit,
  the run resumes from round 2 (round 3's delta is dropped); after it, from
  round 3 (folding again, also over a half-folded base, gives the same
  rows). Device 2 is never sampled: it comes back as the initial row, also
  into a store whose row 2 was overwritten."""
  config = RunConfig(dataset='digits', rounds=4)
  rng, process = np.random.default_rng(0), _Process()
  run = checkpoint.RunCheckpoint(str(tmp_path), 'x', config)
  progress = _progress(0)
  expected = {}
  for done in (1, 2, 3):
    _changing(progress.store, rng, [0, 1][::(-1) ** done], done)
    progress.done = done
    expected[done] = {k: np.array(v) for k, v in
                      progress.store.state_dict().items()}
    if done < 3:
      run.save(progress, process.ledger)
  if crash == 'before_commit':
    run.devices.write(3, progress.store)
  else:
    if crash == 'mid_fold':  # the base gets round 3's first row, then dies
      monkeypatch.setattr(checkpoint, '_delta_chunks', _cut_after_one_row)
    else:
      monkeypatch.setattr(checkpoint.DeviceJournal, 'fold',
                          lambda self, version: _raise())
    with pytest.raises(_Interrupted):
      run.save(progress, process.ledger)
    monkeypatch.undo()
  fresh = _progress(9)
  fresh.store.set_rows([2], {'residuals': 5, 'views': 5, 'last_sync': 7})
  assert checkpoint.RunCheckpoint(str(tmp_path), 'x', config).restore(
      fresh, process)
  done = 2 if crash == 'before_commit' else 3
  assert fresh.done == done and not len(fresh.store.changed())
  for name, array in expected[done].items():
    np.testing.assert_array_equal(fresh.store.state_dict()[name], array)
  assert not [e for e in os.listdir(os.path.join(run.path, 'devices'))
              if e.startswith('delta_')]  # dropped or folded


_all_delta_chunks = checkpoint._delta_chunks  # pylint: disable=protected-access


def _cut_after_one_row(folder, meta):
  """A delta's first row, then the crash (a fold cut off midway)."""
  for ids, rows in _all_delta_chunks(folder, meta):
    yield ids[:1], {name: values[:1] for name, values in rows.items()}
    _raise()


def _raise():
  raise _Interrupted()


def test_a_checkpoint_grows_with_the_devices_per_round_not_all_devices(
    tmp_path, monkeypatch):
  """At 100 and at 20,000 devices (with views: 160 MB of state at the
  larger), four rounds changing 5 devices each write the same bytes per
  round, about 5 devices' rows twice (delta, base), and the checkpoint
  takes about the rows written so far on disk."""
  config, size = RunConfig(dataset='digits', rounds=4), 1000
  row = size * 4 * 2  # residual and view, float32
  written = {}
  fold = checkpoint.DeviceJournal.fold

  def measured(self, version):
    written[total].append(_allocated(os.path.join(
        self.path, f'delta_{version}')))
    fold(self, version)

  monkeypatch.setattr(checkpoint.DeviceJournal, 'fold', measured)
  for total in (100, 20_000):
    rng, written[total] = np.random.default_rng(0), []
    store = ClientStateStore(total, size, initial_view=np.ones(size,
                                                               np.float32))
    run = checkpoint.RunCheckpoint(str(tmp_path / str(total)), 'x', config)
    for done in range(1, 5):
      _changing(store, rng, rng.choice(total, 5, replace=False), done)
      run.save(checkpoint.Progress(done, {'w': np.zeros(2, np.float32)},
                                   store, rng, [], {}), _Process().ledger)
    on_disk = _allocated(os.path.join(run.path, 'devices'))
    assert on_disk < 20 * row + 1e6, (total, on_disk)  # sparse base
  assert written[100] == written[20_000]
  assert all(5 * row <= w < 5 * row + 64 * 1024 for w in written[20_000])


def _allocated(folder: str) -> int:
  """Bytes allocated on disk under `folder` (a sparse file counts only its
  data)."""
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512
             for d, _, files in os.walk(folder) for f in files)


def test_another_config_is_refused_and_discard_starts_over(tmp_path):
  out = str(tmp_path)
  checkpoint.RunCheckpoint(out, 'x', RunConfig(dataset='digits', rounds=4))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"rounds 4 there, 5 now.*--restart"):
    checkpoint.check(out, 'x', RunConfig(dataset='digits', rounds=5))
  checkpoint.check(out, 'y', RunConfig(dataset='digits', rounds=5))  # own dir
  assert checkpoint.discard(out, 'x') and not checkpoint.discard(out, 'x')
  checkpoint.check(out, 'x', RunConfig(dataset='digits', rounds=5))


def test_labels_become_distinct_safe_directory_names():
  names = {os.path.basename(checkpoint.directory('o', label)) for label in (
      LABEL, 'dp-sparse ↓0.02 ↑0.02', 'dense (same privacy)', 'ours-2%',
      'fedavg', '../up')}
  assert len(names) == 6 and 'fedavg' in names
  assert all(set(n) <= set('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
                           '0123456789._-') and not n.startswith('.')
             for n in names)


def test_a_process_keeping_state_outside_its_state_is_not_resumed():

  class Hidden:
    resumable = False
    ledger = None

  class PureLedger:
    ledger = type('Basic', (), {})()

  assert checkpoint.resumable(_Process()) is None
  assert 'keeps state outside' in checkpoint.resumable(Hidden())
  assert 'cannot be restored' in checkpoint.resumable(PureLedger())


@pytest.mark.parametrize('with_views', [False, True])
def test_memory_mapped_store_round_trips_its_state(tmp_path, with_views):
  view = np.arange(64, dtype=np.float32) if with_views else None
  store = ClientStateStore(5, 64, path=str(tmp_path / 'r.npy'),
                           dtype=np.float16, initial_view=view)
  rng = np.random.default_rng(0)
  store.put([dict(residual=rng.normal(size=64), view=rng.normal(size=64),
                  last_sync_round=4, client_id=2)])
  saved = {k: np.array(v) for k, v in store.state_dict().items()}
  other = ClientStateStore(5, 64, path=str(tmp_path / 's.npy'),
                           dtype=np.float16, initial_view=view)
  other.load_state_dict(saved)
  for name, array in other.state_dict().items():
    np.testing.assert_array_equal(array, saved[name])
  on_disk = np.load(tmp_path / 's.npy')  # flushed to its file
  np.testing.assert_array_equal(on_disk, saved['residuals'])
  with pytest.raises(ValueError, match='does not fit'):
    ClientStateStore(5, 63, initial_view=view if view is None else view[:63]
                     ).load_state_dict(saved)


def test_bench_reruns_no_finished_method_and_resumes_the_interrupted_one(
    tmp_path, capfd, monkeypatch):
  """Interrupted after the first method's table row and round 1 of the
  second (TFF's own FedAvg: its state is TFF's LearningAlgorithmState), the
  same command trains only the rest of the second."""
  out = str(tmp_path / 'bench')
  argv = ['bench', '--quick', '--rounds', '2', '--methods', 'ours-1%',
          'fedavg', '--out', out, '--no-progress']
  run = simulation.run

  def interrupted(config, **kwargs):
    if kwargs['label'] == 'fedavg':
      kwargs['after_round'] = _stop_after(1)
    return run(config, **kwargs)

  monkeypatch.setattr(simulation, 'run', interrupted)
  with pytest.raises(_Interrupted):
    cli.main(argv)
  monkeypatch.setattr(simulation, 'run', run)
  loaded = []
  load = simulation.load_data
  monkeypatch.setattr(simulation, 'load_data',
                      lambda config: loaded.append(config) or load(config))
  capfd.readouterr()
  assert cli.main(argv) == 0
  err = capfd.readouterr().err
  assert 'ours-1%: already complete' in err
  assert 'resuming fedavg after round 1 of 2' in err
  assert len(loaded) == 1  # only fedavg's data: ours-1% did not train
  results = json.loads(open(os.path.join(out, 'rounds.json')).read())
  assert [r['label'] for r in results] == ['ours-1%', 'fedavg']
  assert [[row['round'] for row in r['rounds']] for r in results] == [
      [1, 2], [1, 2]]
  assert sum(e['count'] for e in results[0]['ledger']['entries']) == 2


def _kill_with_workers(proc):
  """SIGKILLs `proc` and, by PID, the TFF workers it started (found before
  the kill, while they are still its children)."""
  workers = _workers.worker_pids(proc.pid)
  os.kill(proc.pid, signal.SIGKILL)
  for pid in workers:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it died with its parent
      pass
  proc.wait(timeout=30)


def _latest(path: str) -> int:
  """The last round checkpointed under `path` (0 if none yet)."""
  names = os.listdir(path) if os.path.isdir(path) else []
  return max([int(n[len('round_'):]) for n in names
              if n.startswith('round_') and n[len('round_'):].isdigit()],
             default=0)


def _command(out):
  code = 'import sys; from tf_dpsparse import cli; sys.exit(cli.main())'
  return [sys.executable, '-c', code, *RUN, '--out', str(out)]


def test_sigkill_mid_training_then_the_same_command_resumes_exactly(tmp_path):
  """`tf-dpsparse run` SIGKILLed in a subprocess once round 3's checkpoint
  exists, then run again: every round once, the uninterrupted run's ε per
  round and ledger, and its final model and device states."""
  killed, whole = tmp_path / 'killed', tmp_path / 'whole'
  path = checkpoint.directory(str(killed), LABEL)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  with open(tmp_path / 'first.log', 'w') as log:
    proc = subprocess.Popen(_command(killed), stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 180
    while _latest(path) < 3:  # round_3 gives way to round_4: poll for >= 3
      assert proc.poll() is None, (tmp_path / 'first.log').read_text()
      assert time.monotonic() < deadline, 'no round 3 checkpoint in 180 s'
      time.sleep(0.02)
    _kill_with_workers(proc)
  assert not os.path.exists(os.path.join(path, 'result.json'))  # mid-run
  second = subprocess.run(_command(killed), capture_output=True, text=True,
                          env=env, timeout=300)
  assert second.returncode == 0, second.stderr
  done = int(second.stderr.split(f'resuming {LABEL} after round ')[1].split()[0])
  assert 3 <= done < 8 and 'of 8' in second.stderr
  assert cli.main([*RUN, '--out', str(whole)]) == 0
  result, = json.loads((killed / 'rounds.json').read_text())
  expected, = json.loads((whole / 'rounds.json').read_text())
  assert [r['round'] for r in result['rounds']] == list(range(1, 9))
  assert [r['epsilon'] for r in result['rounds']] == [
      r['epsilon'] for r in expected['rounds']]
  assert result['ledger'] == expected['ledger']
  assert sum(e['count'] for e in result['ledger']['entries']) == 8
  assert _rows(result) == _rows(expected)
  _assert_same_final_state(path, checkpoint.directory(str(whole), LABEL))


def test_dropouts_below_min_clients_skip_rounds_charged_once():
  """Half the sampled devices never report; rounds below min_clients are
  skipped without a row, each round charged exactly once either way."""
  config = RunConfig(dataset='digits', rounds=6, privacy='client',
                     clients_per_round=5, l2_norm_clip=1.0, dropout_rate=0.5,
                     min_clients=3, seed=1)
  result = simulation.run(config, progress=False)
  ran = [r['round'] for r in result['rounds']]
  assert 0 < len(ran) < 6  # some rounds ran, some were skipped
  assert all(r['clients'] >= 3 for r in result['rounds'])
  counts = sum(entry['count'] for entry in result['ledger']['entries'])
  assert counts == 6  # every round charged once, skipped ones included
