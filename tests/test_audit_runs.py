"""The audit's instruments in the TFF process, and `tf-dpsparse audit` itself.

The hooks must leave real devices untouched and send a canary client's
direction through the real upload path; the runner must produce its table,
JSON and plot, detect leakage without noise and stay below the accounted ε
with it.
"""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_dpsparse as tds

tff = pytest.importorskip('tensorflow_federated')
from tf_dpsparse import audit_runs  # noqa: E402  (after the skip)
from tf_dpsparse import cli  # noqa: E402
from tf_dpsparse import core  # noqa: E402
from tf_dpsparse.federated import ClientStateStore  # noqa: E402
from tf_dpsparse.federated import learning  # noqa: E402
from tf_dpsparse.federated.simulation import RunConfig  # noqa: E402
from test_federated import keras_model  # noqa: E402  (the same digits MLP)
from test_federated import model_fn  # noqa: E402

NUM_REAL = 4  # canary clients have ids >= NUM_REAL


@pytest.fixture(scope='module')
def clients():
  digits = load_digits()
  x = (digits.data / 16).astype(np.float32)
  y = digits.target.astype(np.int32)
  real = [tf.data.Dataset.from_tensor_slices(
      (x[i * 60:(i + 1) * 60], y[i * 60:(i + 1) * 60])).batch(20)
          for i in range(NUM_REAL)]
  return real + [real[0].take(0)]  # the canary client's (empty) data


def _process(privacy=None, audit=None, value_bits=32):
  sgd = tff.learning.optimizers.build_sgdm
  return learning.build_dp_sparse_fed_avg(
      model_fn, sgd(0.1), sgd(1.0), upload_density=0.1,
      download_density=0.1, privacy=privacy, value_bits=value_bits,
      l2_norm_clip=0.3 if privacy else None,
      noise_multiplier=0.0 if privacy else None,
      clients_per_round=2, total_clients=NUM_REAL, seed=0, audit=audit)


def _round(process, clients, ids):
  store = ClientStateStore(len(clients), process.size)
  out = process.next(process.initialize(), [clients[i] for i in ids],
                     store.get(ids))
  return out


def test_canary_direction_is_unit_sparse_and_reproducible():
  v = learning.canary_direction(5, 1000, seed=3, k=10).numpy()
  assert np.count_nonzero(v) == 10
  assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_array_equal(v, learning.canary_direction(5, 1000, 3, 10))
  assert not np.array_equal(v, learning.canary_direction(6, 1000, 3, 10))
  dense = learning.canary_direction(5, 1000, 3).numpy()
  assert np.count_nonzero(dense) == 1000


@pytest.mark.parametrize('privacy,value_bits', [(None, 32), ('client', 16)])
def test_canary_client_uploads_its_direction(clients, privacy, value_bits):
  k = core.k_for_density(_process().size, 0.1)
  hooks = learning.AuditHooks(canary_from=NUM_REAL, canary_seed=7,
                              canary_norm=0.3, canary_k=k,
                              return_uploads=True)
  process = _process(privacy, hooks, value_bits)
  out = _round(process, clients, [0, NUM_REAL])
  canary = out.client_states[1]
  sent = np.zeros(process.size, np.float32)
  sent[np.asarray(canary['upload_indices'])] = canary['upload_values']
  expected = 0.3 * learning.canary_direction(NUM_REAL, process.size, 7,
                                             k).numpy()
  # Top-k passes the k-sparse canary whole; clip 0.3 and float16 rounding
  # toward zero keep it within float16 precision.
  np.testing.assert_allclose(sent, expected, rtol=1e-3, atol=1e-7)
  assert np.sum(np.abs(sent)) <= np.sum(np.abs(expected)) + 1e-6


def test_hooks_leave_real_devices_untouched(clients):
  hooks = learning.AuditHooks(canary_from=NUM_REAL, canary_seed=7,
                              canary_norm=0.3, return_uploads=True)
  plain_process, audited_process = _process('client'), _process('client',
                                                                 hooks)
  plain = _round(plain_process, clients, [0, 1])
  audited = _round(audited_process, clients, [0, 1])
  np.testing.assert_array_equal(
      core.flatten(plain_process.get_model_weights(plain.state).trainable),
      core.flatten(audited_process.get_model_weights(audited.state).trainable))
  np.testing.assert_array_equal(plain.client_states[1]['residual'],
                                audited.client_states[1]['residual'])


def test_canary_clients_are_refused_at_example_level():
  with pytest.raises(ValueError, match='canary clients'):
    learning.build_dp_sparse_fed_avg(
        model_fn, tff.learning.optimizers.build_sgdm(0.1),
        upload_density=0.1, download_density=0.1, privacy='example',
        l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, local_steps=1,
        min_client_examples=40,
        audit=learning.AuditHooks(canary_from=NUM_REAL))


def _per_example(model, x, y):
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  return tds.keras.per_example_gradients(model, loss, model.trainable_weights,
                                         tf.constant(x), tf.constant(y))


def test_canary_head_is_a_dirac_gradient_and_leaves_real_data_alone():
  head = audit_runs.CanaryHead(num_canaries=7, num_classes=10, scale=10.0)
  base = keras_model()
  model = head.wrap(base)
  offset = audit_runs.canary_offset(model)
  assert offset == core.flatten(base.trainable_weights).shape[0]
  real_x = (load_digits().data[:5] / 16).astype(np.float32)
  real_y = load_digits().target[:5].astype(np.int32)
  np.testing.assert_array_equal(model(real_x), base(real_x))
  real = _per_example(model, real_x, real_y).numpy()
  np.testing.assert_allclose(real[:, :offset],
                             _per_example(base, real_x, real_y).numpy(),
                             rtol=1e-6, atol=1e-7)
  assert not np.any(real[:, offset:])  # real data never reach w
  x, y = head.inputs((64,)), head.labels()
  canary = _per_example(model, x, y).numpy()
  # Canary i: -scale (1 - p), p = e^-20 / (e^-20 + 9), on its own weight;
  # exactly 0 everywhere else (base included).
  expected = np.zeros_like(canary)
  expected[np.arange(7), offset + np.arange(7)] = -10.0
  np.testing.assert_allclose(canary, expected, rtol=1e-6, atol=0)
  assert x[0].max() >= audit_runs.CANARY_FLAG > 100 * np.abs(real_x).max()


def test_dirac_scorer_sums_each_canarys_own_device_uploads():
  # Canaries 0..3 at coordinates 10..13, owned by devices 0, 1, 0, 1.
  scores, on_round = audit_runs._dirac_scorer(10, np.array([0, 1, 0, 1]))

  def upload(indices, values):
    return {'upload_indices': np.array(indices, np.int32),
            'upload_values': np.array(values, np.float32)}

  class Out:
    client_states = [upload([3, 10, 11, 12], [9.0, -0.5, 7.0, 0.25]),
                     upload([11, 13, 14], [-1.0, 2.0, 5.0])]

  on_round([0, 1], Out)
  on_round([1], type('Out', (), {'client_states': [upload([11], [-0.5])]}))
  # Device 0's value at 11 (canary 1, device 1's) and anything outside the
  # canaries' coordinates are ignored; an upload is initial - trained, so a
  # canary's step upward shows as a negative value and a positive score.
  np.testing.assert_allclose(scores, [0.5, 1.5, -0.25, -2.0])


def _digits_setups(rounds, epsilons):
  """Small set-ups on digits: example level (10 devices, 200 Dirac
  canaries) and client level (20 devices, 60 canary clients)."""
  example = RunConfig(dataset='digits', rounds=rounds, local_steps=2,
                      num_clients=10, partition='iid', privacy='example',
                      upload_density=0.1, download_density=0.1)
  client = RunConfig(dataset='digits', rounds=rounds, local_steps=2,
                     num_clients=20, clients_per_round=5, partition='iid',
                     privacy='client', l2_norm_clip=0.3, upload_density=0.1,
                     download_density=0.1)
  setups = []
  for eps in epsilons:
    for unit, base, m, scale in (('example', example, 200, 10.0),
                                 ('client', client, 60, 0.3)):
      config = dataclasses.replace(base, target_epsilon=eps,
                                   privacy=base.privacy if eps else None)
      setups.append(audit_runs.AuditSetup(f'{unit} {eps}', unit, config, m,
                                          scale))
  return setups


def test_audit_on_digits_writes_table_json_and_plot(tmp_path):
  results = audit_runs.run_audit(_digits_setups(3, [8.0]), str(tmp_path),
                                 progress=False, command='test')
  table = (tmp_path / 'audit.md').read_text()
  assert table.startswith('`test` (') and table.count('\n| ') == 4
  saved = json.loads((tmp_path / 'audit.json').read_text())
  assert [r['unit'] for r in saved] == ['example', 'client']
  assert (tmp_path / 'canaries.png').stat().st_size > 10_000
  for r in results:
    assert r['accounted_epsilon'] == pytest.approx(8.0, rel=0.01)
    assert r['verdict'] == 'within ε'
    assert 0 <= r['estimate']['low'] <= r['estimate']['epsilon'] <= (
        r['estimate']['high'])
    assert len(r['scores']['inserted']) + len(r['scores']['held_out']) == (
        r['num_canaries'])
    assert 0 <= r['one_run']['epsilon_lower_bound'] <= 8.0
    assert 0 <= r['mia']['auc'] <= 1 and 0 <= r['canary_auc'] <= 1
  assert results[0]['one_shot'] is None and results[1]['one_shot'] is not None


def test_cli_audit_parses_and_selects_units(monkeypatch):
  seen = {}

  def fake_run_audit(setups, out_dir, progress, command):
    seen.update(units={s.unit for s in setups}, out=out_dir, command=command,
                rounds={s.config.rounds for s in setups})
    return []

  monkeypatch.setattr(audit_runs, 'run_audit', fake_run_audit)
  assert cli.main(['audit', '--quick', '--units', 'client', '--out', 'x',
                   '--no-progress']) == 0
  assert seen == {'units': {'client'}, 'out': 'x', 'rounds': {20},
                  'command': 'tf-dpsparse audit --quick --out x'}


@pytest.mark.slow
def test_audit_has_power_and_is_sound_on_digits():
  """Noise off: clear leakage. DP on: nothing above the accounted ε.

  30 rounds on digits (about 200 s). Measured: non-private bounds 3.56
  (example) and 1.62 (client); example level with the noise dropped
  (σ = 0.01, clip kept: the bug the audit must catch) 3.01; at ε = 100,
  1.96; at ε = 2 bounds 0.16 and 0.00, estimates' lower ends 0.83 and 0.
  """
  setups = _digits_setups(30, [None, 2.0, 100.0])[:5]
  no_noise = dataclasses.replace(setups[0], name='example σ=0.01',
                                 config=dataclasses.replace(
                                     setups[0].config, privacy='example',
                                     noise_multiplier=0.01))
  results = audit_runs.run_audit(setups + [no_noise], progress=False)
  for r in results[:2]:  # non-private
    assert (r['one_run']['epsilon_lower_bound'] > 1.0 or
            r['canary_auc'] >= 0.75), r['name']
    assert r['verdict'] == 'leak detected'
  for r in results[2:4]:  # ε = 2
    assert r['one_run']['epsilon_lower_bound'] <= r['accounted_epsilon']
    assert r['estimate']['low'] <= r['accounted_epsilon'], r['name']
    assert r['verdict'] == 'within ε'
  # Power at example level, through per-example clipping, noise and top-k.
  assert results[4]['one_run']['epsilon_lower_bound'] > 1.0
  assert results[5]['one_run']['epsilon_lower_bound'] > 2.0
