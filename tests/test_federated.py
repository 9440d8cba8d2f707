"""TFF front: parity with TFF FedAvg, DP noise, error feedback, bytes, ε."""

import collections

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_dpsparse as tds

tff = pytest.importorskip('tensorflow_federated')
from tf_dpsparse import federated  # noqa: E402  (after the skip)

SPEC = (tf.TensorSpec([None, 64], tf.float32), tf.TensorSpec([None], tf.int32))


def keras_model():
  init = tf.keras.initializers.GlorotUniform(seed=1)
  return tf.keras.Sequential([
      tf.keras.layers.Dense(16, activation='relu', input_shape=(64,),
                            kernel_initializer=init),
      tf.keras.layers.Dense(10, kernel_initializer=init)])


def model_fn():
  return tff.learning.models.from_keras_model(
      keras_model(), input_spec=SPEC,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.fixture(scope='module')
def clients():
  digits = load_digits()
  x = (digits.data / 16).astype(np.float32)
  y = digits.target.astype(np.int32)
  return [tf.data.Dataset.from_tensor_slices(
      (x[i * 120:(i + 1) * 120], y[i * 120:(i + 1) * 120])).batch(30)
          for i in range(4)]


def sgd(lr):
  return tff.learning.optimizers.build_sgdm(learning_rate=lr)


def _flat(weights):
  return tds.core.flatten(list(weights.trainable)).numpy()


def _build(privacy=None, density=1.0, **kwargs):
  return federated.build_dp_sparse_fed_avg(
      model_fn, sgd(0.1), sgd(1.0), upload_density=density,
      download_density=density, privacy=privacy, **kwargs)


def _run(process, clients, rounds, ids=None):
  ids = list(range(len(clients))) if ids is None else ids
  store = federated.ClientStateStore(len(clients), process.size)
  state = process.initialize()
  outputs = []
  for _ in range(rounds):
    out = process.next(state, [clients[i] for i in ids], store.get(ids))
    store.put(out.client_states)
    state = out.state
    outputs.append(out)
  return state, outputs, store


def test_dense_nonprivate_equals_tff_unweighted_fed_avg(clients):
  reference = tff.learning.algorithms.build_unweighted_fed_avg(
      model_fn, client_optimizer_fn=sgd(0.1), server_optimizer_fn=sgd(1.0))
  ref_state = reference.initialize()
  for _ in range(3):
    ref_state = reference.next(ref_state, clients).state
  expected = _flat(reference.get_model_weights(ref_state))

  process = _build()
  state, _, _ = _run(process, clients, 3)
  got = _flat(process.get_model_weights(state))
  assert not np.allclose(expected, _flat(
      reference.get_model_weights(reference.initialize())))  # it trained
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_client_level_noise_matches_tff_gaussian_fixed():
  """Server noise stddev within 5 % of TFF's (sampling error ~0.5 % at d=2e4)."""
  size, z, clip, n = 20_000, 1.2, 0.5, 4
  ours = federated.DPSparseAggregatorFactory(
      size, mode='client', l2_norm_clip=clip, noise_multiplier=z,
      clients_per_round=n, seed=11).create(federated.sparse_type(size))
  zero_uploads = [collections.OrderedDict(
      indices=np.arange(size, dtype=np.int32),
      values=np.zeros(size, np.float32))] * n
  our_noise = ours.next(ours.initialize(), zero_uploads).result

  theirs = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
      noise_multiplier=z, clients_per_round=n, clip=clip).create(
          tff.TensorType(np.float32, [size]))
  their_noise = theirs.next(theirs.initialize(),
                            [np.zeros(size, np.float32)] * n).result
  assert np.std(our_noise) == pytest.approx(np.std(their_noise), rel=0.05)
  assert np.std(our_noise) == pytest.approx(z * clip / n, rel=0.05)


@pytest.mark.parametrize('value_bits', [32, 16])
def test_download_error_feedback_and_device_reconstruction(clients, value_bits):
  process = _build(density=0.05, value_bits=value_bits)
  state = process.initialize()
  store = federated.ClientStateStore(len(clients), process.size)
  ids = list(range(len(clients)))
  public0 = state['distributor']['public']
  global0 = _flat(process.get_model_weights(state))
  np.testing.assert_array_equal(public0, global0)
  device_view = public0.copy()  # a device that syncs every round
  broadcast_total = np.zeros(process.size)
  for _ in range(4):
    global_before = _flat(process.get_model_weights(state))
    out = process.next(state, clients, store.get(ids))
    store.put(out.client_states)
    state = out.state
    sent = tds.core.SparseUpdate(state['distributor']['last_indices'],
                                 state['distributor']['last_values'],
                                 process.size)
    payload = tds.codec.encode(sent, value_bits)
    assert out.metrics['bytes_broadcast'] == len(payload)
    assert out.metrics['bytes_down'] == len(payload) * len(clients)
    device_view = federated.apply_broadcast(device_view, payload)
    # Bit-exact: what the device decodes is what the server thinks it has.
    np.testing.assert_array_equal(device_view, state['distributor']['public'])
    broadcast_total += tds.core.densify(sent).numpy()
    # The residual measured is what this round's broadcast left unsent.
    assert out.metrics['server_residual_norm'] == pytest.approx(np.linalg.norm(
        global_before - state['distributor']['public']), rel=1e-4)
  global_now = _flat(process.get_model_weights(state))
  server_residual = global_now - state['distributor']['public']
  np.testing.assert_allclose(public0 + broadcast_total + server_residual,
                             global_now, atol=1e-5)


def test_device_that_skipped_rounds_catches_up_exactly(clients):
  """Device 3 sits out rounds 2-4; its catch-up bytes rebuild the public model."""
  process = _build(density=0.05)
  state = process.initialize()
  store = federated.ClientStateStore(len(clients), process.size)
  stale_view = np.array(state['distributor']['public'])
  for round_num in range(1, 6):
    ids = [0, 1, 2, 3] if round_num in (1, 5) else [0, 1, 2]
    out = process.next(state, [clients[i] for i in ids], store.get(ids))
    store.put(out.client_states)
    state = out.state
    if round_num == 1:
      stale_view = np.array(state['distributor']['public'])
  payload = federated.catch_up_payload(state['distributor'], 1)
  view = federated.apply_catch_up(stale_view, payload)
  np.testing.assert_array_equal(view, state['distributor']['public'])
  # Round 5 charged device 3 exactly that payload, the others one broadcast.
  broadcast = int(out.metrics['bytes_broadcast'])
  assert out.metrics['bytes_down'] == 3 * broadcast + len(payload)
  assert len(payload) < tds.codec.dense_nbytes(process.size)


def test_catch_up_bytes_union_or_dense():
  size, k, history = 1000, 10, 4
  rounds = np.array([5, 6, 3, 4], np.int32)  # slots hold rounds 3..6
  indices = np.stack([np.arange(k) * 7 + r for r in rounds]).astype(np.int32)

  def nbytes(last_sync):
    return int(federated.catch_up_nbytes(indices, rounds, last_sync, 6, size))

  assert nbytes(6) == 0
  assert nbytes(5) == len(tds.codec.encode(tds.core.SparseUpdate(
      indices[1], np.zeros(k, np.float32), size)))
  union = np.unique(indices[[0, 1, 3]])  # rounds 4, 5, 6
  assert nbytes(3) == len(tds.codec.encode(tds.core.SparseUpdate(
      union, np.zeros(union.size, np.float32), size)))
  assert nbytes(1) == tds.codec.dense_nbytes(size)  # round 2 fell out
  state = dict(history_indices=indices, history_rounds=rounds, round_num=6,
               public=np.arange(size, dtype=np.float32))
  assert len(federated.catch_up_payload(state, 3)) == nbytes(3)
  assert federated.catch_up_payload(state, 1) is None


@pytest.mark.parametrize('k', [12, 500])  # sparse (Rice), dense ('all')
def test_upload_bytes_equal_encoded_payloads(k):
  size = 500
  rng = np.random.default_rng(1)
  uploads = [collections.OrderedDict(
      indices=rng.choice(size, k, replace=False).astype(np.int32),
      values=rng.normal(size=k).astype(np.float32)) for _ in range(3)]
  for value_bits in (32, 16):
    agg = federated.DPSparseAggregatorFactory(
        size, value_bits=value_bits).create(federated.sparse_type(k))
    out = agg.next(agg.initialize(), uploads)
    expected = sum(len(tds.codec.encode(
        tds.core.SparseUpdate(u['indices'], u['values'], size), value_bits))
                   for u in uploads)
    assert out.measurements['bytes_up'] == expected
    np.testing.assert_allclose(
        out.result, sum(tds.core.densify(tds.core.SparseUpdate(
            u['indices'], u['values'], size)).numpy() for u in uploads) / 3,
        rtol=1e-6)


def test_shared_upload_counts_values_only_for_shared_indices():
  size, k, shared = 500, 12, 4
  rng = np.random.default_rng(2)
  uploads = [collections.OrderedDict(
      indices=rng.choice(size, k, replace=False).astype(np.int32),
      values=rng.normal(size=k).astype(np.float32)) for _ in range(3)]
  agg = federated.DPSparseAggregatorFactory(
      size, num_shared=shared, value_bits=16).create(federated.sparse_type(k))
  out = agg.next(agg.initialize(), uploads)
  expected = sum(shared * 2 + len(tds.codec.encode(tds.core.SparseUpdate(
      u['indices'][shared:], u['values'][shared:], size), 16)) for u in uploads)
  assert out.measurements['bytes_up'] == expected
  with pytest.raises(ValueError, match='num_shared'):
    federated.DPSparseAggregatorFactory(size, num_shared=k).create(
        federated.sparse_type(k))


def test_devices_upload_the_last_broadcasts_largest_coordinates(clients):
  process = _build(density=0.05, shared_fraction=0.5)
  k_shared = federated.num_shared(process.size, 0.05, 0.05, 0.5)
  assert 0 < k_shared < process.upload_k
  state = process.initialize()
  store = federated.ClientStateStore(len(clients), process.size)
  ids = list(range(len(clients)))
  for _ in range(3):
    out = process.next(state, clients, store.get(ids))
    store.put(out.client_states)
    state = out.state
    last = state['distributor']
    shared = np.asarray(last['last_indices'])[
        np.argsort(-np.abs(last['last_values']), kind='stable')[:k_shared]]
    for client_state in out.client_states:  # sent, so nothing left there
      np.testing.assert_array_equal(client_state['residual'][shared], 0.0)


def test_epsilon_and_budget_stop_example_level(clients):
  process = _build('example', density=0.1, l2_norm_clip=1.0,
                   target_epsilon=5.0, rounds=2, batch_size=10,
                   local_steps=3, min_client_examples=120, delta=1e-5)
  z = process.noise_multiplier
  state, outputs, _ = _run(process, clients, 2)
  expected = tds.privacy.compute_epsilon(z, 10 / 120, 2 * 3, 1e-5)
  assert outputs[-1].metrics['epsilon'] == pytest.approx(expected, rel=1e-9)
  assert expected <= 5.0
  store = federated.ClientStateStore(len(clients), process.size)
  spent = process.ledger.epsilon
  with pytest.raises(tds.privacy.BudgetExhaustedError):
    process.next(state, clients, store.get(range(len(clients))))
  assert process.ledger.epsilon == spent


def test_epsilon_client_level(clients):
  process = _build('client', density=0.1, l2_norm_clip=0.5,
                   noise_multiplier=1.1, clients_per_round=4,
                   total_clients=40, delta=1e-6)
  _, outputs, _ = _run(process, clients, 2)
  expected = tds.privacy.compute_epsilon(1.1, 0.1, 2, 1e-6)
  assert outputs[-1].metrics['epsilon'] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('kwargs, match', [
    (dict(privacy='local'), 'privacy mode must be'),
    (dict(privacy=None, upload_density=0.0), 'upload_density'),
    (dict(privacy='client', l2_norm_clip=1.0, noise_multiplier=1.0),
     'clients_per_round'),
    (dict(privacy='example', l2_norm_clip=1.0, noise_multiplier=1.0),
     'batch_size'),
    (dict(privacy='client', l2_norm_clip=1.0, clients_per_round=2,
          total_clients=10), 'exactly one'),
])
def test_builder_errors(kwargs, match):
  args = dict(upload_density=0.1, download_density=0.1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    federated.build_dp_sparse_fed_avg(model_fn, sgd(0.1), **args)


@pytest.mark.parametrize('dtype', [np.float32, np.float16])
def test_client_state_store_round_trip(tmp_path, dtype):
  store = federated.ClientStateStore(
      1000, 64, dtype=dtype, path=str(tmp_path / 'residuals.npy'))
  states = store.get([3, 999])
  assert [int(s['client_id']) for s in states] == [3, 999]
  assert all(not s['residual'].any() for s in states)
  states[1]['residual'] = np.linspace(-1, 1, 64, dtype=np.float32)
  states[1]['last_sync_round'] = np.int32(7)
  store.put(states)
  back = store.get([999])[0]
  tolerance = 0 if dtype == np.float32 else 1e-3  # float16 rounds residuals
  np.testing.assert_allclose(back['residual'], states[1]['residual'],
                             atol=tolerance)
  assert back['last_sync_round'] == 7
  assert (tmp_path / 'residuals.npy').stat().st_size >= 1000 * 64 * np.dtype(
      dtype).itemsize
  with pytest.raises(ValueError, match='float32 or float16'):
    federated.ClientStateStore(2, 2, dtype=np.int8)
