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

tff = pytest.importorskip('tensorflow_federated')
from tf_dpsparse import audit_runs  # noqa: E402  (after the skip)
from tf_dpsparse import cli  # noqa: E402
from tf_dpsparse import core  # noqa: E402
from tf_dpsparse.federated import ClientStateStore  # noqa: E402
from tf_dpsparse.federated import learning  # noqa: E402
from tf_dpsparse.federated.simulation import RunConfig  # noqa: E402
from test_federated import model_fn  # noqa: E402  (the same digits MLP)

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


def _digits_setups(rounds, epsilons):
  """Small set-ups on digits: example level (10 devices, so 100 canaries:
  devices x classes) and client level (20 devices, 60 canary clients)."""
  example = RunConfig(dataset='digits', rounds=rounds, local_steps=2,
                      num_clients=10, partition='iid', privacy='example',
                      upload_density=0.1, download_density=0.1)
  client = RunConfig(dataset='digits', rounds=rounds, local_steps=2,
                     num_clients=20, clients_per_round=5, partition='iid',
                     privacy='client', l2_norm_clip=0.3, upload_density=0.1,
                     download_density=0.1)
  setups = []
  for eps in epsilons:
    for unit, base, m, scale in (('example', example, None, 10.0),
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
  """Noise off: clear leakage. DP on: no bound above the accounted ε."""
  results = audit_runs.run_audit(_digits_setups(30, [None, 2.0]),
                                 progress=False)
  for r in results[:2]:  # non-private
    assert (r['one_run']['epsilon_lower_bound'] > 1.0 or
            r['canary_auc'] >= 0.75), r['name']
  for r in results[2:]:  # ε = 2
    assert r['one_run']['epsilon_lower_bound'] <= r['accounted_epsilon']
