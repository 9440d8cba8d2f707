"""tds.deploy: the server on wire bytes, its checks, its ledger, no TFF.

Parity with the TFF front is tests/test_parity.py; LiteRT devices against
this server are in tests/test_lite.py.
"""

import subprocess
import sys

import numpy as np
import pytest

import tf_dpsparse as tds
from tf_dpsparse.wire import codec as codec_impl

DELTA = 1e-5


def _sparse(indices, values, size):
  return tds.core.SparseUpdate(np.asarray(indices),
                               np.asarray(values, np.float32), size)


def _malformed_payloads(size):
  """One payload per defect class of the codec, with the reason to expect."""
  good = codec_impl.encode(_sparse([1, 4, 9], [1., -2., 3.], size))
  raw = lambda indices: (codec_impl.MAGIC + bytes([1, 2 << 2]) +
                         codec_impl._put_varint(size) +
                         codec_impl._put_varint(len(indices)) +
                         np.array(indices, '<u4').tobytes() +
                         np.ones(len(indices), '<f4').tobytes())
  nan = bytearray(good)
  nan[-4:] = np.array([np.nan], '<f4').tobytes()
  return {
      'empty': (b'', 'empty'),
      'truncated': (good[:-3], 'truncated'),
      'bad magic': (b'XX' + good[2:], 'magic'),
      'bad version': (good[:2] + bytes([9]) + good[3:], 'version'),
      'size mismatch': (codec_impl.encode(_sparse([1], [1.], size + 1)),
                        'size mismatch'),
      'out of range': (raw([2, size]), 'out of range'),
      'duplicate': (raw([5, 5]), 'duplicate'),
      'unsorted': (raw([7, 5]), 'not sorted'),
      'k > size': (codec_impl.MAGIC + bytes([1, 2 << 2]) +
                   codec_impl._put_varint(size) +
                   codec_impl._put_varint(size + 1), 'exceeds size'),
      'nan': (bytes(nan), 'NaN or Inf'),
      'trailing garbage': (good + b'\x00', 'trailing garbage'),
      'not bytes': ('DS', 'must be bytes'),
      'k > upload k': (codec_impl.encode(_sparse(np.arange(6), np.ones(6),
                                                 size)), 'oversized upload'),
  }


def test_rejects_malformed_oversized_and_duplicate_uploads():
  size = 40
  initial = np.random.default_rng(0).normal(size=size).astype(np.float32)
  server = tds.deploy.DeploymentServer(initial, upload_density=0.125,
                                       download_density=0.25)
  assert (server.upload_k, server.k) == (5, 10)
  rng = np.random.default_rng(1)
  valid = {}
  for cid in ('a', 'b', 'c'):
    update = _sparse(rng.choice(size, 5, replace=False), rng.normal(size=5),
                     size)
    valid[cid] = tds.core.densify(update).numpy()
    assert server.submit(cid, codec_impl.encode(update))
  malformed = _malformed_payloads(size)
  for cid, (payload, _) in malformed.items():
    assert not server.submit(cid, payload)
  assert not server.submit('a', codec_impl.encode(update))  # twice: refused
  result = server.finish_round()
  assert result.accepted == ('a', 'b', 'c') and result.round_num == 1
  for cid, (_, reason) in malformed.items():
    assert reason in result.rejected[cid], (cid, result.rejected[cid])
  assert 'duplicate upload' in result.rejected['a']
  assert server.rejected_total == len(malformed) + 1
  assert result.rejected_by_reason == {
      'malformed': len(malformed) - 2, 'wrong size': 1, 'oversized': 1,
      'duplicate': 1}
  assert server.rejected_by_reason == result.rejected_by_reason
  assert result.skipped is None and result.zeroed == {}
  # An update is initial - trained: the server steps against the mean.
  np.testing.assert_allclose(server.global_weights,
                             initial - np.mean(list(valid.values()), axis=0),
                             atol=1e-6)
  decoded = tds.wire.decode(result.download, size)
  assert len(decoded.indices) == server.k
  np.testing.assert_array_equal(
      tds.wire.apply_broadcast(initial, result.download), server.public_weights)
  # The next round starts clean.
  assert server.submit('a', codec_impl.encode(update))
  assert server.finish_round().rejected == {}


def test_plain_mean_with_learning_rate_and_an_empty_round():
  size = 8
  server = tds.deploy.DeploymentServer(
      np.ones(size, np.float32), upload_density=0.5, download_density=1.0,
      server_learning_rate=0.5)
  server.submit(0, tds.wire.encode(_sparse([0, 1], [2., 4.], size)))
  server.submit(1, tds.wire.encode(_sparse([1, 2], [2., 2.], size)))
  result = server.finish_round()
  expected = np.ones(size, np.float32)
  expected[:3] -= 0.5 * np.array([1., 3., 1.])
  np.testing.assert_array_equal(server.global_weights, expected)
  np.testing.assert_array_equal(server.public_weights, expected)  # dense
  assert result.num_clipped == 0 and result.epsilon == float('inf')
  assert server.ledger is None
  result = server.finish_round()  # nobody came: the model stays
  np.testing.assert_array_equal(server.global_weights, expected)
  assert result.accepted == () and result.round_num == 2


def test_client_level_clips_and_adds_calibrated_noise():
  size, clip, z, cpr = 20_000, 2.0, 1.5, 4
  huge = _sparse(np.arange(10), np.full(10, 100.), size)
  server = tds.deploy.DeploymentServer(
      np.zeros(size, np.float32), upload_density=0.01, download_density=1.0,
      privacy=tds.privacy.ClientLevelDP(clip, 0.0, cpr, total_clients=cpr))
  server.submit(0, tds.wire.encode(huge))
  result = server.finish_round()
  assert result.num_clipped == 1
  expected = -tds.core.clip_by_l2_norm(tds.core.densify(huge), clip)[0] / cpr
  np.testing.assert_allclose(server.global_weights, expected, atol=1e-6)

  def noise(seed):
    noisy = tds.deploy.DeploymentServer(
        np.zeros(size, np.float32), upload_density=0.01, download_density=0.01,
        privacy=tds.privacy.ClientLevelDP(clip, z, cpr, total_clients=40,
                                          seed=seed))
    noisy.finish_round()  # no uploads: the release is pure noise
    first = noisy.global_weights
    noisy.finish_round()  # the query's release counter moves the seed on
    return first, noisy.global_weights - first

  first, second = noise(3)
  # N(0, (zC/cpr)^2); 20k draws: the sample std is within 3 % (6 std errors).
  assert np.std(first) == pytest.approx(z * clip / cpr, rel=0.03)
  assert abs(np.corrcoef(first, second)[0, 1]) < 0.05
  np.testing.assert_array_equal(noise(3)[0], first)  # seeded: repeats
  assert not np.allclose(noise(None)[0], noise(None)[0])  # OS entropy


def test_ledger_charges_each_round_and_refuses_past_the_budget():
  size, clip, z, cpr, total = 50, 1.0, 1.2, 5, 50
  privacy = tds.privacy.ClientLevelDP(clip, z, cpr, total_clients=total,
                                      seed=1)
  two_rounds = tds.privacy.compute_epsilon(z, cpr / total, 2, DELTA)
  server = tds.deploy.DeploymentServer(
      np.zeros(size, np.float32), upload_density=0.2, download_density=0.2,
      privacy=privacy, delta=DELTA, epsilon_budget=two_rounds * 1.001)
  payload = tds.wire.encode(_sparse([1, 2], [0.1, 0.2], size))
  for round_num in (1, 2):
    server.submit('a', payload)
    result = server.finish_round()
    assert result.epsilon == pytest.approx(tds.privacy.compute_epsilon(
        z, cpr / total, round_num, DELTA), rel=1e-9)  # dp_accounting's ε
  global_before, spent = server.global_weights, server.ledger.epsilon
  with pytest.raises(tds.privacy.BudgetExhaustedError):
    server.open_round()  # before any device is invited
  with pytest.raises(tds.privacy.BudgetExhaustedError):
    server.submit('a', payload)  # refused before the upload is read
  with pytest.raises(tds.privacy.BudgetExhaustedError):
    server.finish_round()  # nothing is released
  assert server.ledger.epsilon == spent and server.round_num == 2
  np.testing.assert_array_equal(server.global_weights, global_before)
  # Charged once per round, at its first upload, whatever else arrives.
  ledger = tds.privacy.PrivacyLedger(DELTA)
  server = tds.deploy.DeploymentServer(
      np.zeros(size, np.float32), upload_density=0.2, download_density=0.2,
      privacy=privacy, ledger=ledger)
  server.submit('a', b'junk')
  one_round = tds.privacy.compute_epsilon(z, cpr / total, 1, DELTA)
  assert ledger.epsilon == pytest.approx(one_round, rel=1e-9)
  assert server.open_round() == ledger.epsilon  # already paid
  server.submit('b', payload)
  server.finish_round()
  assert sum(entry.count for entry in ledger.entries) == 1
  assert server.open_round() > one_round  # the next round


def test_example_level_ledger_is_the_worst_case_device():
  privacy = tds.privacy.ExampleLevelDP(
      l2_norm_clip=1.0, noise_multiplier=1.1, batch_size=8, local_steps=3,
      min_client_examples=100)
  server = tds.deploy.DeploymentServer(
      np.zeros(10, np.float32), upload_density=0.5, download_density=0.5,
      privacy=privacy)
  server.submit(0, tds.wire.encode(_sparse([3], [1.], 10)))
  result = server.finish_round()
  assert result.num_clipped == 0  # uploads are DP already: no server clip
  np.testing.assert_array_equal(server.global_weights[3], -1.0)
  assert result.epsilon == pytest.approx(
      tds.privacy.compute_epsilon(1.1, 0.08, 3, DELTA), rel=1e-9)


@pytest.mark.parametrize('kwargs, match', [
    (dict(epsilon_budget=1.0), 'needs a privacy mechanism'),
    (dict(ledger=tds.privacy.PrivacyLedger(DELTA)), 'needs a privacy'),
    (dict(privacy=tds.privacy.ClientLevelDP(1.0, 1.0, 2, 4),
          ledger=tds.privacy.PrivacyLedger(DELTA), epsilon_budget=1.0),
     'not both'),
    (dict(value_bits=12), 'value_bits'),
    (dict(download_density=0.0), 'density'),
    (dict(privacy=tds.privacy.ClientLevelDP(1.0, 1.0, 2, 4),
          max_update_norm=5.0), 'clips every update'),
    (dict(max_update_norm=0.0), 'max_norm'),
    (dict(min_clients=-1), 'min_clients'),
])
def test_constructor_errors(kwargs, match):
  args = {'upload_density': 0.5, 'download_density': 0.5, **kwargs}
  with pytest.raises(ValueError, match=match):
    tds.deploy.DeploymentServer(np.zeros(10, np.float32), **args)
  with pytest.raises(ValueError, match='flat vector'):
    tds.deploy.DeploymentServer(np.zeros((2, 5)), upload_density=0.5,
                                download_density=0.5)


@pytest.mark.parametrize('value_bits', [32, 8])
def test_catch_up_lands_a_returning_device_on_the_public_model(value_bits):
  size = 60
  rng = np.random.default_rng(2)
  server = tds.deploy.DeploymentServer(
      rng.normal(size=size).astype(np.float32), upload_density=0.1,
      download_density=0.1, value_bits=value_bits, history=3)
  views = {0: server.public_weights}  # round synced at -> the device's view
  for _ in range(5):
    for cid in range(3):
      server.submit(cid, tds.wire.encode(_sparse(
          rng.choice(size, 6, replace=False), rng.normal(size=6), size)))
    download = server.finish_round().download
    views[server.round_num] = tds.deploy.apply_broadcast(
        views[server.round_num - 1], download)
    np.testing.assert_array_equal(views[server.round_num],
                                  server.public_weights)
  for last_sync in range(server.round_num + 1):
    payload = server.catch_up(last_sync)
    if last_sync < server.round_num - 3:  # out of the kept history
      assert payload is None
      continue
    np.testing.assert_array_equal(
        tds.deploy.apply_catch_up(views[last_sync], payload),
        server.public_weights)
  assert len(tds.wire.decode(server.catch_up(server.round_num), size).indices) \
      == 0  # up to date: nothing to send
  with pytest.raises(ValueError, match='last_sync_round'):
    server.catch_up(server.round_num + 1)


def test_deploy_runs_without_tensorflow_federated():
  """A deployment imports no TFF: not on import, not in a client-level round."""
  code = '''
import sys
import numpy as np
import tf_dpsparse as tds
server = tds.deploy.DeploymentServer(
    np.zeros(10, np.float32), upload_density=0.2, download_density=0.2,
    privacy=tds.privacy.ClientLevelDP(1.0, 1.0, 2, 4, seed=0),
    epsilon_budget=10.0)
server.submit(0, tds.wire.encode(tds.core.SparseUpdate(
    np.array([1]), np.array([1.], np.float32), 10)))
server.finish_round()
tds.deploy.apply_catch_up(np.zeros(10, np.float32), server.catch_up(0))
loaded = [m for m in sys.modules if m.startswith('tensorflow_federated')]
assert not loaded, loaded
print('ok')
'''
  done = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr


HUGE = 3e37  # finite float32; 50 of them overflowed tf.norm and the model


def _huge_payload(size, indices, value=HUGE):
  return tds.wire.encode(_sparse(indices, np.full(len(indices), value), size))


def test_huge_finite_uploads_are_bounded_and_the_model_stays_finite():
  """Issue 16's attack: finite values near the float32 limit, every unit."""
  size = 200
  privacies = {
      'none': dict(max_update_norm=10.0),
      'example': dict(privacy=tds.privacy.ExampleLevelDP(1.0, 1.0, 8, 2, 100),
                      max_update_norm=10.0),
      'client': dict(privacy=tds.privacy.ClientLevelDP(1.0, 0.0, 4, 4)),
  }
  honest = _sparse([3, 7], [0.3, -0.4], size)
  for unit, kwargs in privacies.items():
    server = tds.deploy.DeploymentServer(
        np.zeros(size, np.float32), upload_density=0.25, download_density=0.1,
        **kwargs)
    assert server.submit('huge', _huge_payload(size, np.arange(50)))
    assert server.submit('overflow', _huge_payload(  # norm > float32 max
        size, np.arange(50), 3.3e38))
    assert server.submit('honest', tds.wire.encode(honest))
    result = server.finish_round()
    assert result.skipped is None and not result.rejected, unit
    assert 'overflows float32: zeroed' in result.zeroed['overflow']
    assert server.zeroed_total == len(result.zeroed)
    if unit == 'client':  # clipped to the clip, then the query's mean
      assert result.num_clipped == 1 and set(result.zeroed) == {'overflow'}
      expected = -tds.core.densify(honest).numpy() / 4
      expected[:50] -= 1 / np.sqrt(50) / 4  # 50 equal values, norm 1
      np.testing.assert_allclose(server.global_weights, expected, atol=1e-6)
    else:  # zeroed above max_update_norm, counted in the mean, as TFF's
      assert 'above max_update_norm=10' in result.zeroed['huge']
      np.testing.assert_allclose(server.global_weights,
                                 -tds.core.densify(honest).numpy() / 3,
                                 atol=1e-7)
    assert np.isfinite(server.public_weights).all()


def test_without_a_bound_overflow_is_refused_or_the_round_skipped():
  """No max_update_norm: only non-finite norms are zeroed, so huge updates
  reach the sum; one that would overflow it is refused, and a mean that
  would push the model out of range is not applied."""
  size = 100
  initial = np.ones(size, np.float32)
  server = tds.deploy.DeploymentServer(initial, upload_density=0.5,
                                       download_density=0.5, min_clients=1)
  for cid in range(20):  # 20 * 3e37 > float32 max at index 0
    server.submit(cid, _huge_payload(size, [0, 1], 3e37 if cid % 2 else -1e38))
  result = server.finish_round()
  assert result.rejected_by_reason.get('sum overflow', 0) > 0
  assert all(np.isfinite(w).all() and np.abs(w).max() <=
             tds.deploy.MAX_WEIGHT_MAGNITUDE
             for w in (server.global_weights, server.public_weights))
  skipped = 0
  for _ in range(12):  # the same push, round after round
    for cid in range(3):
      server.submit(cid, _huge_payload(size, [5], -3e37))
    result = server.finish_round()
    skipped += result.skipped is not None
    assert np.isfinite(server.global_weights).all()
    assert np.isfinite(server.public_weights).all()
  assert skipped and 'out of the finite range' in result.skipped
  assert server.skipped_by_reason['model out of range'] == skipped
  assert tds.wire.decode(result.download, size).indices.size == 0


def test_round_tags_refuse_uploads_for_another_round():
  size = 20
  server = tds.deploy.DeploymentServer(np.zeros(size, np.float32),
                                       upload_density=0.1,
                                       download_density=0.1)
  payload = tds.wire.encode(_sparse([1], [1.], size))
  assert server.current_round == 1
  assert not server.submit('a', payload, round_num=0)
  assert not server.submit('a', payload, round_num=2)
  assert server.submit('a', payload, round_num=1)  # a stale tag burns no slot
  assert server.submit('b', payload)  # untagged: not checked
  result = server.finish_round()
  assert result.accepted == ('a', 'b')
  assert 'stale round' in result.rejected['a']
  assert result.rejected_by_reason == {'stale round': 2}
  assert not server.submit('c', payload, round_num=1)  # replayed next round
  assert server.submit('c', payload, round_num=2)
  server.finish_round()
  assert server.rejected_by_reason == {'stale round': 3}
  assert server.rejected_total == 3


def test_a_round_below_min_clients_is_skipped_and_charged_once():
  size, clip, z, cpr, total = 30, 1.0, 1.0, 3, 30
  privacy = tds.privacy.ClientLevelDP(clip, z, cpr, total, seed=4)
  initial = np.random.default_rng(0).normal(size=size).astype(np.float32)
  server = tds.deploy.DeploymentServer(
      initial, upload_density=0.1, download_density=0.1, privacy=privacy,
      min_clients=2, delta=DELTA)
  payload = tds.wire.encode(_sparse([1, 2], [0.1, 0.2], size))
  server.open_round()
  server.submit('a', payload, round_num=1)  # 'b' drops out
  result = server.finish_round()
  assert result.skipped == 'only 1 of min 2 devices reported'
  assert result.accepted == ('a',) and result.round_num == 0
  np.testing.assert_array_equal(server.global_weights, initial)
  np.testing.assert_array_equal(server.public_weights, initial)
  np.testing.assert_array_equal(
      tds.wire.apply_broadcast(initial, result.download), initial)
  one_round = tds.privacy.compute_epsilon(z, cpr / total, 1, DELTA)
  assert result.epsilon == pytest.approx(one_round, rel=1e-9)  # stays charged
  assert server.skipped_by_reason == {'too few devices': 1}
  # The retry is a new round: charged once, its number the skipped one's.
  assert server.current_round == 1
  for cid in ('a', 'b'):
    assert server.submit(cid, payload, round_num=1)
  result = server.finish_round()
  assert result.skipped is None and result.round_num == 1
  assert sum(entry.count for entry in server.ledger.entries) == 2
  assert result.epsilon == pytest.approx(
      tds.privacy.compute_epsilon(z, cpr / total, 2, DELTA), rel=1e-9)
  # Noise: the skipped round drew none, so this round's is the seed's first.
  fresh = tds.deploy.DeploymentServer(
      initial, upload_density=0.1, download_density=0.1, privacy=privacy)
  for cid in ('a', 'b'):
    fresh.submit(cid, payload)
  fresh.finish_round()
  np.testing.assert_array_equal(server.global_weights, fresh.global_weights)


def test_budget_refusal_states_spent_and_remaining():
  privacy = tds.privacy.ClientLevelDP(1.0, 1.0, 5, 50, seed=0)
  one_round = tds.privacy.compute_epsilon(1.0, 0.1, 1, DELTA)
  server = tds.deploy.DeploymentServer(
      np.zeros(10, np.float32), upload_density=0.2, download_density=0.2,
      privacy=privacy, delta=DELTA, epsilon_budget=one_round * 1.001)
  server.finish_round()
  with pytest.raises(tds.privacy.BudgetExhaustedError) as refused:
    server.open_round()
  message = str(refused.value)
  assert 'round 2 refused' in message
  assert 'spent' in message and 'remaining' in message, message
  assert f'{one_round:.4g}' in message


def _uploads(rng, size, rounds, clients=3, k=4):
  return [[tds.wire.encode(_sparse(np.sort(rng.choice(size, k, replace=False)),
                                   rng.normal(size=k) * 0.5, size), 8)
           for _ in range(clients)] for _ in range(rounds)]


def _play(server, uploads):
  downloads = []
  for payloads in uploads:
    server.open_round()
    for cid, payload in enumerate(payloads):
      server.submit(cid, payload, round_num=server.current_round)
    server.submit('junk', b'DS\x01junk')
    downloads.append(server.finish_round().download)
  return downloads


@pytest.mark.parametrize('unit', ['client', 'example'])
def test_save_and_load_resume_exactly(tmp_path, unit):
  size = 64
  privacy = {
      'client': tds.privacy.ClientLevelDP(0.5, 1.1, 3, 30, seed=11),
      'example': tds.privacy.ExampleLevelDP(1.0, 1.1, 8, 2, 100),
  }[unit]
  extra = {} if unit == 'client' else {'max_update_norm': 1.5}
  server = tds.deploy.DeploymentServer(
      np.random.default_rng(5).normal(size=size).astype(np.float32),
      upload_density=0.1, download_density=0.1, value_bits=8, history=3,
      privacy=privacy, delta=DELTA, epsilon_budget=50.0, min_clients=2,
      server_learning_rate=0.7, **extra)
  uploads = _uploads(np.random.default_rng(6), size, 5)
  _play(server, uploads[:3])
  path = tmp_path / 'server.npz'
  server.save(path)
  assert [p.name for p in tmp_path.iterdir()] == ['server.npz']  # no temp
  loaded = tds.deploy.DeploymentServer.load(path)
  assert loaded.round_num == 3 and loaded.config == server.config
  assert loaded.privacy == privacy
  assert loaded.rejected_by_reason == {'malformed': 3}
  assert loaded.ledger.to_dict() == server.ledger.to_dict()
  for name in server.broadcast_state._fields:
    np.testing.assert_array_equal(getattr(loaded.broadcast_state, name),
                                  getattr(server.broadcast_state, name))
  assert _play(loaded, uploads[3:]) == _play(server, uploads[3:])
  np.testing.assert_array_equal(loaded.global_weights, server.global_weights)
  np.testing.assert_array_equal(loaded.public_weights, server.public_weights)
  assert loaded.ledger.epsilon == server.ledger.epsilon
  assert loaded.rejected_total == server.rejected_total == 5
  for last_sync in (3, 4):
    assert loaded.catch_up(last_sync) == server.catch_up(last_sync)


def test_save_keeps_an_open_round_charge_and_refuses_mid_round(tmp_path):
  privacy = tds.privacy.ClientLevelDP(1.0, 1.0, 2, 20, seed=0)
  server = tds.deploy.DeploymentServer(
      np.zeros(10, np.float32), upload_density=0.2, download_density=0.2,
      privacy=privacy)
  path = str(tmp_path / 'server.npz')
  server.open_round()  # devices invited: the round is charged
  server.save(path)
  loaded = tds.deploy.DeploymentServer.load(path)
  assert loaded.open_round() == server.ledger.epsilon  # not charged twice
  loaded.finish_round()
  assert sum(entry.count for entry in loaded.ledger.entries) == 1
  server.submit('a', b'junk')
  with pytest.raises(RuntimeError, match='received 1 upload'):
    server.save(path)
  # The failed save left the checkpoint as it was, and no temporary file.
  assert tds.deploy.DeploymentServer.load(path).round_num == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['server.npz']
  (tmp_path / 'other.npz').write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError):
    tds.deploy.DeploymentServer.load(tmp_path / 'other.npz')


# ---------------------------------------------------- a public subspace ---

MODEL_SIZE, DIMS, SUB_SEED = 300, 30, 4


def _origin():
  return np.random.default_rng(7).normal(size=MODEL_SIZE).astype(np.float32)


def _z_uploads(rng, rounds, clients=3, k=DIMS):
  """Encoded z updates: k of the DIMS coordinates each (all of z by default)."""
  return [[tds.wire.encode(_sparse(np.sort(rng.choice(DIMS, k, replace=False)),
                                   rng.normal(size=k) * 0.3, DIMS))
           for _ in range(clients)] for _ in range(rounds)]


def test_a_subspace_server_trains_z_and_expands_the_model():
  origin = _origin()
  server = tds.deploy.DeploymentServer(origin, subspace=DIMS / MODEL_SIZE,
                                       subspace_seed=SUB_SEED)
  sub = tds.core.count_sketch(origin, DIMS, SUB_SEED)
  assert (server.size, server.model_size) == (DIMS, MODEL_SIZE)
  assert (server.upload_k, server.k) == (DIMS, DIMS)  # all of z each way
  for name in sub._fields[:3]:
    np.testing.assert_array_equal(getattr(server.subspace, name),
                                  getattr(sub, name))
  np.testing.assert_array_equal(server.public_coordinates, np.zeros(DIMS))
  np.testing.assert_array_equal(server.public_weights, origin)
  uploads = _z_uploads(np.random.default_rng(0), 1)[0]
  for cid, payload in enumerate(uploads):
    assert server.submit(cid, payload)
  of_the_model = tds.wire.encode(_sparse([0], [1.], MODEL_SIZE))
  assert not server.submit('d', of_the_model)  # uploads are of z
  result = server.finish_round()
  assert result.rejected_by_reason == {'wrong size': 1}
  assert result.bytes_up == sum(map(len, uploads)) + len(of_the_model)
  mean = np.mean([tds.wire.decode(p, DIMS).values for p in uploads], axis=0)
  np.testing.assert_allclose(server.global_coordinates, -mean, atol=1e-6)
  np.testing.assert_array_equal(server.global_weights,
                                sub.expand(server.global_coordinates))
  np.testing.assert_array_equal(server.public_weights,
                                sub.expand(server.public_coordinates))
  # The same subspace given as an object; one P the seed does not rebuild,
  # or around another origin, is refused with the reason.
  same = tds.deploy.DeploymentServer(origin, subspace=sub,
                                     subspace_seed=SUB_SEED)
  assert same.config == tds.deploy.DeploymentServer(
      origin, subspace=DIMS, subspace_seed=SUB_SEED).config
  with pytest.raises(ValueError, match='rebuild P from the seed'):
    tds.deploy.DeploymentServer(origin, subspace=sub, subspace_seed=5)
  with pytest.raises(ValueError, match='origin is not the initial weights'):
    tds.deploy.DeploymentServer(origin + 1, subspace=sub,
                                subspace_seed=SUB_SEED)
  with pytest.raises(ValueError, match='upload_density is required'):
    tds.deploy.DeploymentServer(origin, download_density=0.1)


@pytest.mark.parametrize('download_density, value_bits', [
    (1.0, 32), (1.0, 8), (0.3, 16)])
def test_subspace_catch_up_lands_on_the_public_z_after_any_missed_rounds(
    download_density, value_bits):
  """A device synced at round r applies the catch-up bytes (or, one round
  behind, the broadcast) and holds the server's public z bit for bit, and
  so the same origin + P z, for 0, 1, 5 and 40 (> history) missed rounds;
  every byte counted is a byte of a payload."""
  rounds, history = 45, 8
  server = tds.deploy.DeploymentServer(
      _origin(), download_density=download_density, value_bits=value_bits,
      history=history, subspace=DIMS, subspace_seed=SUB_SEED,
      privacy=tds.privacy.ClientLevelDP(0.5, 0.8, 3, 30, seed=2))
  whole = tds.wire.dense_nbytes(DIMS)  # z, raw float32
  views = {0: server.public_coordinates}  # round synced at -> the device's z
  for payloads in _z_uploads(np.random.default_rng(1), rounds):
    for cid, payload in enumerate(payloads):
      assert server.submit(cid, payload)
    result = server.finish_round()
    assert result.bytes_up == sum(map(len, payloads))
    assert result.bytes_down == len(result.download) == int(
        tds.wire.encoded_nbytes(tds.wire.decode(result.download, DIMS).indices,
                                DIMS, value_bits))
    views[result.round_num] = tds.deploy.apply_broadcast(
        views[result.round_num - 1], result.download)
    np.testing.assert_array_equal(views[result.round_num],
                                  server.public_coordinates)
  if download_density == 1.0:  # no index bytes: a 6-byte header, s values
    assert len(result.download) == 6 + tds.wire.values_nbytes(DIMS,
                                                              value_bits)
  for missed in (0, 1, 5, 40):
    view = views[rounds - missed]
    payload = server.catch_up(rounds - missed)
    if payload is None:  # z itself, raw float32: what TFF counts
      assert missed > history or download_density == 1.0
      caught_up, nbytes = server.public_coordinates, whole
    else:
      caught_up, nbytes = tds.deploy.apply_catch_up(view, payload), len(payload)
      sent = tds.wire.decode(payload, DIMS)
      assert len(payload) == int(tds.wire.encoded_nbytes(sent.indices, DIMS))
      assert missed > 0 or len(sent.indices) == 0
    np.testing.assert_array_equal(caught_up, server.public_coordinates)
    np.testing.assert_array_equal(server.subspace.expand(caught_up),
                                  server.public_weights)
    assert nbytes <= whole  # never more than z itself
    assert nbytes == int(tds.wire.catch_up_nbytes(
        server.broadcast_state.history_indices,
        server.broadcast_state.history_rounds,
        rounds - missed, rounds, DIMS, value_bits)) or missed in (0, 1)
  np.testing.assert_array_equal(
      tds.deploy.apply_broadcast(views[rounds - 1], result.download),
      server.public_coordinates)


def test_subspace_save_and_load_resume_exactly(tmp_path):
  server = tds.deploy.DeploymentServer(
      _origin(), download_density=0.5, value_bits=8, history=3,
      subspace=DIMS, subspace_seed=SUB_SEED,
      privacy=tds.privacy.ClientLevelDP(0.5, 1.1, 3, 30, seed=11),
      epsilon_budget=50.0, server_learning_rate=0.7)
  uploads = _z_uploads(np.random.default_rng(6), 5, k=5)
  _play(server, uploads[:3])
  path = tmp_path / 'server.npz'
  server.save(path)
  with np.load(path) as saved:  # P is rebuilt from origin and seed
    assert {'subspace_origin', 'public'} <= set(saved.files)
    assert all(saved[name].size <= MODEL_SIZE for name in saved.files)
  loaded = tds.deploy.DeploymentServer.load(path)
  assert loaded.config == server.config and loaded.size == DIMS
  for name in ('origin', 'buckets', 'coefs'):
    np.testing.assert_array_equal(getattr(loaded.subspace, name),
                                  getattr(server.subspace, name))
  assert _play(loaded, uploads[3:]) == _play(server, uploads[3:])
  np.testing.assert_array_equal(loaded.global_weights, server.global_weights)
  np.testing.assert_array_equal(loaded.public_weights, server.public_weights)
  assert loaded.ledger.epsilon == server.ledger.epsilon
  for last_sync in range(loaded.round_num + 1):
    assert loaded.catch_up(last_sync) == server.catch_up(last_sync)
