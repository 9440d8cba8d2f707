"""A round over several workers runs each device's work once (issue 19).

TFF's mergeable form re-ran every device's work after the merge to get the
devices' new states: twice the device work, and unseeded DP-SGD noise had
to be refused. `DPSparseFedAvg.next` now runs the round there as
`learning.SplitRound`: the devices' computation on each worker's slice,
the server's (download; aggregate and finalizer) on the first worker.

Runs are counted where they happen: the client work, wrapped, writes one
empty file per run into a directory named `<client>-<round>-<time>` (the
workers share this machine's disk), so a second run of a device's work
shows as a second file whatever its randomness.
"""

import collections
import os

import numpy as np
import pytest

tff = pytest.importorskip('tensorflow_federated')
pytest.importorskip('portpicker')
import tensorflow as tf  # noqa: E402

from tf_dpsparse import federated  # noqa: E402
from tf_dpsparse.federated import learning  # noqa: E402
from tf_dpsparse.federated import remote  # noqa: E402
from test_federated import digits_clients  # noqa: E402
from test_remote import _process  # noqa: E402  (the same digits process)
from test_remote import _rounds  # noqa: E402
from test_remote import workers  # noqa: E402,F401  (two workers, stopped)

ROUNDS = ([0, 1, 2, 3, 4], [0, 2, 3, 4])  # devices of each round


@pytest.fixture(scope='module')
def clients():
  return digits_clients(5)


def _counting(stages, directory: str):
  """`stages` whose client work writes `directory/<client>-<round>-<time>`
  each time it runs (a control dependency of its residual input)."""
  work = stages.client_work

  @tff.tensorflow.computation(*work.type_signature.parameter)
  def counted(weights, data, client_state, round_num, shared_indices):
    name = tf.strings.join([
        directory, '/', tf.strings.as_string(client_state.client_id), '-',
        tf.strings.as_string(round_num), '-',
        tf.strings.as_string(tf.timestamp(), precision=6)])
    state = tff.structure.to_odict(client_state)
    with tf.control_dependencies([tf.io.write_file(name, '')]):
      state['residual'] = tf.identity(state['residual'])
    return work(weights, data, state, round_num, shared_indices)

  return stages._replace(client_work=counted)


def _counted_process(monkeypatch, directory, privacy, seed):
  compose = learning.compose
  os.makedirs(directory)
  monkeypatch.setattr(learning, 'compose', lambda stages, *rest: compose(
      _counting(stages, str(directory)), *rest))
  process = _process(privacy, seed)
  monkeypatch.setattr(learning, 'compose', compose)
  return process


def _runs(directory) -> dict:
  """{round: {client: how many times its client work ran}}."""
  runs = collections.defaultdict(collections.Counter)
  for name in os.listdir(directory):
    client, round_num, _ = name.split('-', 2)
    runs[int(round_num)][int(client)] += 1
  return dict(runs)


def _run_rounds(process, clients, next_fn):
  store = federated.ClientStateStore(5, process.size)
  state, losses = process.initialize(), []
  for ids in ROUNDS:
    state, new_states, loss = next_fn(
        state, [clients[i] for i in ids], store.get(ids))
    store.put(new_states)
    losses.append(loss)
  return store.state_dict()['residuals'].copy(), losses


def _through_process(process):
  def next_fn(state, data, states):
    out = process.next(state, data, states)
    return out.state, out.client_states, float(out.metrics['loss'])
  return next_fn


def test_unseeded_example_level_runs_each_device_once(
    workers, clients, tmp_path, monkeypatch):  # noqa: F811
  directory = tmp_path / 'runs'
  process = _counted_process(monkeypatch, directory, 'example', None)
  with federated.use_workers([w.address for w in workers]):
    residuals, losses = _run_rounds(process, clients,
                                    _through_process(process))
  assert np.all(np.isfinite(losses))
  assert np.count_nonzero(np.abs(residuals).sum(axis=1)) == 5
  runs = _runs(directory)
  assert [sorted(runs[r]) for r in sorted(runs)] == list(ROUNDS)
  assert {n for r in runs.values() for n in r.values()} == {1}, runs


def test_the_count_sees_the_mergeable_forms_second_run(
    workers, clients, tmp_path, monkeypatch):  # noqa: F811
  # The whole round computation called directly still takes TFF's
  # mergeable form (seeded, so it is not refused): every device twice.
  directory = tmp_path / 'runs'
  process = _counted_process(monkeypatch, directory, 'client', 7)

  def whole(state, data, states):
    state, states, measurements = process.iterative_process.next(
        state, data, states)
    return state, states, float(measurements['client_work']['loss'])

  with federated.use_workers([w.address for w in workers]):
    _run_rounds(process, clients, whole)
  runs = _runs(directory)
  assert [sorted(runs[r]) for r in sorted(runs)] == list(ROUNDS)
  assert {n for r in runs.values() for n in r.values()} == {2}, runs


@pytest.mark.parametrize('privacy', ['client', 'example'])
def test_two_workers_equal_one_process_bit_for_bit(workers, clients,
                                                   privacy):  # noqa: F811
  # The server's parts are not split: the sums run in one process's order.
  local = _rounds(clients, 2, privacy)
  with federated.use_workers([w.address for w in workers]):
    spread = _rounds(clients, 2, privacy)
  np.testing.assert_array_equal(spread[0], local[0])
  np.testing.assert_array_equal(spread[1], local[1])
  assert spread[2] == local[2]


def test_split_round_is_the_one_computation_bit_for_bit(clients):
  # In the local context, with the server's parts run in place.
  process = _process('client', 7)
  store = federated.ClientStateStore(5, process.size)
  state, states = process.initialize(), store.get(range(5))
  whole = process.iterative_process.next(state, clients, states)
  split = process.iterative_process.split(state, clients, states)
  flat_whole, flat_split = tf.nest.flatten(whole), tf.nest.flatten(split)
  assert len(flat_whole) == len(flat_split)
  for a, b in zip(flat_whole, flat_split):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  split_round = process.iterative_process.split
  assert remote._per_device(split_round.devices)  # pylint: disable=protected-access
  for comp in (split_round.distribute, split_round.finish,
               process.iterative_process.next):
    assert not remote._per_device(comp)  # pylint: disable=protected-access
