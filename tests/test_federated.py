"""TFF front: parity with TFF FedAvg, DP noise, error feedback, bytes, ε."""

import collections
import dataclasses

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


def digits_clients(count: int):
  """`count` devices of 120 real digits each, in batches of 30."""
  digits = load_digits()
  x = (digits.data / 16).astype(np.float32)
  y = digits.target.astype(np.int32)
  return [tf.data.Dataset.from_tensor_slices(
      (x[i * 120:(i + 1) * 120], y[i * 120:(i + 1) * 120])).batch(30)
          for i in range(count)]


@pytest.fixture(scope='module')
def clients():
  return digits_clients(4)


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
      size, privacy=tds.privacy.ClientLevelDP(
          clip, z, clients_per_round=n, total_clients=n, seed=11)).create(
              federated.sparse_type(size))
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


@pytest.mark.parametrize('value_bits', [32, 16, 8])
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
    device_view = tds.wire.apply_broadcast(device_view, payload)
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


@pytest.mark.parametrize('value_bits', [32, 8])
def test_device_that_skipped_rounds_catches_up_exactly(clients, value_bits):
  """Device 3 sits out rounds 2-4; its catch-up bytes rebuild the public model.

  Whatever the broadcast's value bits, the catch-up carries float32 public
  weights, and that is what is counted.
  """
  process = _build(density=0.05, value_bits=value_bits)
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
  payload = tds.wire.catch_up_payload(state['distributor'], 1)
  view = tds.wire.apply_catch_up(stale_view, payload)
  np.testing.assert_array_equal(view, state['distributor']['public'])
  # Round 5 charged device 3 exactly that payload, the others one broadcast.
  broadcast = int(out.metrics['bytes_broadcast'])
  assert out.metrics['bytes_down'] == 3 * broadcast + len(payload)
  assert len(payload) < tds.codec.dense_nbytes(process.size)


def test_topk_catch_up_is_bounded_and_bit_exact(clients):
  """Device 3 sits out rounds 2-4, then gets at most k entries of what it missed."""
  process = _build(density=0.05, catch_up='topk', value_bits=16)
  state = process.initialize()
  store = federated.ClientStateStore(
      len(clients), process.size,
      initial_view=process.get_public_weights(state))
  for round_num in range(1, 6):
    ids = [0, 1, 2, 3] if round_num in (1, 5) else [0, 1, 2]
    global_before = _flat(process.get_model_weights(state))
    stale_view = store.view(3)
    out = process.next(state, [clients[i] for i in ids], store.get(ids))
    store.put(out.client_states)
    state = out.state
    if round_num == 1:  # nobody has anything to learn yet
      assert out.metrics['bytes_down'] == 0
  public = process.get_public_weights(state)
  for i in range(3):  # devices that never missed a round hold the public model
    np.testing.assert_array_equal(store.view(i), public)
  payload = federated.topk_catch_up_payload(global_before, stale_view,
                                            process.download_k, 16)
  assert tds.codec.decode(payload, process.size).indices.size == (
      process.download_k)
  # Bit-exact: the bytes turn the device's old view into the one it trained from.
  np.testing.assert_array_equal(
      tds.wire.apply_broadcast(stale_view, payload), store.view(3))
  assert not np.array_equal(store.view(3), public)  # lossy: 3 rounds > k
  broadcast = int(out.metrics['bytes_broadcast'])
  assert out.metrics['bytes_down'] == 3 * broadcast + len(payload)
  assert out.client_states[3]['last_sync_round'] == 5


def test_topk_catch_up_device_trains_from_its_view(clients):
  """The update is FedAvg's from the device's view, not from the global model."""
  process = _build(density=1.0, catch_up='topk', catch_up_density=0.05)
  state = process.initialize()
  store = federated.ClientStateStore(
      1, process.size, initial_view=process.get_public_weights(state))
  for _ in range(2):
    global_before = _flat(process.get_model_weights(state))
    out = process.next(state, clients[:1], store.get([0]))
    store.put(out.client_states)
    state = out.state
  view = store.view(0)
  assert not np.allclose(view, global_before, atol=1e-4)  # it lags
  reference = tff.learning.algorithms.build_unweighted_fed_avg(
      model_fn, client_optimizer_fn=sgd(0.1), server_optimizer_fn=sgd(1.0))
  ref_state = reference.initialize()
  ref_weights = reference.get_model_weights(ref_state)
  ref_state = reference.set_model_weights(ref_state, ref_weights._replace(
      trainable=[w.numpy() for w in tds.core.unflatten(
          view, ref_weights.trainable)]))
  ref_state = reference.next(ref_state, clients[:1]).state
  np.testing.assert_allclose(
      _flat(process.get_model_weights(state)) - global_before,
      _flat(reference.get_model_weights(ref_state)) - view, atol=1e-5)


def test_simulation_with_topk_catch_up_scores_device_views():
  """Sparse sampling: the bounded catch-up downloads less than the union."""
  from tf_dpsparse.federated import simulation
  config = simulation.RunConfig(
      dataset='digits', num_clients=20, clients_per_round=5, rounds=4,
      local_steps=1, privacy='client', target_epsilon=None,
      noise_multiplier=0.5, upload_density=0.05, download_density=0.05)
  union = simulation.run(config, progress=False)
  topk = simulation.run(dataclasses.replace(config, catch_up='topk'),
                        progress=False)
  assert topk['config']['catch_up'] == 'topk'
  assert ([r['clients'] for r in topk['rounds']] ==
          [r['clients'] for r in union['rounds']])  # same sampling
  assert 0 < topk['summary']['mb_down'] < union['summary']['mb_down']
  assert all(0 <= r['device_accuracy'] <= 1 for r in topk['rounds'])


def test_catch_up_bytes_union_or_dense():
  size, k, history = 1000, 10, 4
  rounds = np.array([5, 6, 3, 4], np.int32)  # slots hold rounds 3..6
  indices = np.stack([np.arange(k) * 7 + r for r in rounds]).astype(np.int32)

  def nbytes(last_sync, value_bits=32):
    return int(tds.wire.catch_up_nbytes(indices, rounds, last_sync, 6, size,
                                         value_bits))

  assert nbytes(6) == 0
  assert nbytes(5) == len(tds.codec.encode(tds.core.SparseUpdate(
      indices[1], np.zeros(k, np.float32), size)))
  union = np.unique(indices[[0, 1, 3]])  # rounds 4, 5, 6
  assert nbytes(3) == len(tds.codec.encode(tds.core.SparseUpdate(
      union, np.zeros(union.size, np.float32), size)))
  assert nbytes(1) == tds.codec.dense_nbytes(size)  # round 2 fell out
  # One round behind is the broadcast, at its bits; more is float32 weights.
  assert nbytes(5, 8) == len(tds.codec.encode(tds.core.SparseUpdate(
      indices[1], np.zeros(k, np.float32), size), 8))
  assert nbytes(3, 8) == nbytes(3) and nbytes(1, 8) == nbytes(1)
  state = dict(history_indices=indices, history_rounds=rounds, round_num=6,
               public=np.arange(size, dtype=np.float32))
  assert len(tds.wire.catch_up_payload(state, 3)) == nbytes(3)
  assert tds.wire.catch_up_payload(state, 1) is None


@pytest.mark.parametrize('k', [12, 500])  # sparse (Rice), dense ('all')
def test_upload_bytes_equal_encoded_payloads(k):
  size = 500
  rng = np.random.default_rng(1)
  uploads = [collections.OrderedDict(
      indices=rng.choice(size, k, replace=False).astype(np.int32),
      values=rng.normal(size=k).astype(np.float32)) for _ in range(3)]
  for value_bits in (32, 16, 8):
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


def _per_example_grads(weights, x, y):
  """Per-example flat gradients of the test model at `weights` (eager)."""
  model = keras_model()
  for v, w in zip(model.trainable_weights, weights):
    v.assign(w)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  with tf.GradientTape() as tape:
    losses = loss_fn(y, model(x))
  jac = tape.jacobian(losses, model.trainable_weights)
  return tf.concat([tf.reshape(j, [len(y), -1]) for j in jac], 1).numpy()


def _client_arrays(dataset):
  x, y = zip(*dataset.unbatch().as_numpy_iterator())
  return np.stack(x), np.array(y)


def test_example_level_step_is_a_poisson_dp_sgd_step(clients):
  """One device, one step, noise 0: the global change is lr times the sum of
  the clipped gradients of exactly the examples `core.poisson_sample` draws
  at the process's seed, over the expected batch size (not the count)."""
  lr, clip, batch, seed = 0.1, 0.5, 10, 7
  process = federated.build_dp_sparse_fed_avg(
      model_fn, sgd(lr), sgd(1.0), upload_density=1.0, download_density=1.0,
      privacy='example', l2_norm_clip=clip, noise_multiplier=0.0,
      batch_size=batch, local_steps=1, min_client_examples=120,
      seed=seed)
  state = process.initialize()
  before = _flat(process.get_model_weights(state))
  store = federated.ClientStateStore(1, process.size)
  out = process.next(state, [clients[0]], store.get([0]))
  change = before - _flat(process.get_model_weights(out.state))
  # The seeds the device derives: (seed, round 1, client 0, int64 step 0),
  # split into the sampling seed and the noise seed.
  step_seed = tds.core.fold_in_seed(tds.core.fold_in_seed(
      tds.core.fold_in_seed(seed, 1), 0), tf.constant(0, tf.int64))
  sample_seed = tf.random.experimental.stateless_split(step_seed, 2)[0]
  x, y = _client_arrays(clients[0])
  sampled = tds.core.poisson_sample(len(y), batch / len(y), sample_seed).numpy()
  assert len(sampled) not in (0, batch)  # a realized count != expected
  rows = _per_example_grads(
      process.get_model_weights(state).trainable, x[sampled], y[sampled])
  clipped = rows * np.minimum(1, clip / np.linalg.norm(rows, axis=1))[:, None]
  expected = lr * clipped.sum(0) / batch
  np.testing.assert_allclose(change, expected, atol=1e-5)


def test_devices_below_min_client_examples_are_refused(clients):
  process = _build('example', density=0.1, l2_norm_clip=1.0,
                   noise_multiplier=1.0, batch_size=10, local_steps=1,
                   min_client_examples=120, delta=1e-5)
  state = process.initialize()
  small = clients[0].unbatch().take(40).batch(30)
  store = federated.ClientStateStore(2, process.size)
  with pytest.raises(ValueError, match='40 examples, fewer than '
                     'min_client_examples=120'):
    process.next(state, [clients[1], small], store.get([0, 1]))
  assert process.ledger.epsilon == 0.0 and not process.ledger.entries


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
    (dict(privacy=None, catch_up='all'), 'catch_up must be'),
    (dict(privacy=None, catch_up_density=0.1), "'topk' only"),
    (dict(privacy=None, catch_up='topk', catch_up_density=2.0),
     'catch_up_density'),
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


def test_client_state_store_keeps_views(tmp_path):
  initial = np.linspace(-1, 1, 64, dtype=np.float32)
  path = tmp_path / 'residuals.npy'
  store = federated.ClientStateStore(1000, 64, path=str(path),
                                     initial_view=initial)
  states = store.get([5])
  np.testing.assert_array_equal(states[0]['view'], initial)
  assert list(states[0]) == ['residual', 'view', 'last_sync_round',
                             'client_id']  # client_state_type's order
  states[0]['view'] = states[0]['view'] + np.float32(0.25)
  store.put(states)
  np.testing.assert_array_equal(store.view(5), initial + np.float32(0.25))
  np.testing.assert_array_equal(store.view(6), initial)
  assert (tmp_path / 'residuals.npy.views.npy').stat().st_size >= 1000 * 64 * 4
  with pytest.raises(ValueError, match='no views'):
    federated.ClientStateStore(2, 64).view(0)
  with pytest.raises(ValueError, match='initial_view'):
    federated.ClientStateStore(2, 64, initial_view=np.zeros(3))


def test_initial_client_state_of_topk_needs_the_state():
  process = _build(density=0.1, catch_up='topk')
  with pytest.raises(ValueError, match='initialized state'):
    process.initial_client_state(0)
  state = process.initialize()
  client_state = process.initial_client_state(7, state)
  np.testing.assert_array_equal(client_state['view'],
                                process.get_public_weights(state))
  assert list(client_state) == ['residual', 'view', 'last_sync_round',
                                'client_id']


def test_client_level_nests_tff_dp_factory_and_ledger_records_its_event(
    clients):
  """The noise is TFF's DifferentiallyPrivateFactory running the mechanism's
  query; the event it reports is the one the ledger charged."""
  process = _build('client', density=0.1, l2_norm_clip=0.5,
                   noise_multiplier=1.1, clients_per_round=4,
                   total_clients=40, seed=5)
  state, outputs, _ = _run(process, clients, 1)
  reported = state['aggregator'].dp_event
  assert reported.class_name == b'GaussianDpEvent'
  assert reported.noise_multiplier == pytest.approx(1.1)
  entry, = process.ledger.entries
  assert entry.event.event.noise_multiplier == pytest.approx(
      float(reported.noise_multiplier))
  # Measurements nest per stage, TFF's DP metrics under the aggregator's.
  measurements = outputs[0].metrics['measurements']
  assert set(measurements) == {'distributor', 'client_work', 'bytes_down',
                               'aggregator', 'finalizer'}
  assert 'dp_query_metrics' in measurements['aggregator']['inner']['inner']


def test_a_non_finite_update_is_zeroed_and_counted_by_the_server(clients):
  """One device's NaN update contributes nothing; the round completes with
  the others' and the model stays finite (the bound is a nested stage)."""
  process = _build(density=1.0)
  state = process.initialize()
  poisoned = clients[0].map(lambda x, y: (x * np.float32(np.inf), y))
  store = federated.ClientStateStore(2, process.size)
  out = process.next(state, [poisoned, clients[1]], store.get([0, 1]))
  assert int(out.metrics['non_finite']) == 1
  assert int(out.metrics['over_bound']) == 0
  assert int(out.metrics['update_non_finite']) == 0  # never reached it
  honest = process.next(state, [clients[1]], store.get([1])).state
  new = _flat(process.get_model_weights(out.state))
  assert np.all(np.isfinite(new))
  # The mean of (0, honest) is half the honest update.
  before = _flat(process.get_model_weights(state))
  np.testing.assert_allclose(
      new - before, (_flat(process.get_model_weights(honest)) - before) / 2,
      atol=1e-6)


def test_example_level_server_zeroes_an_update_above_its_bound(clients):
  process = _build('example', density=1.0, l2_norm_clip=1.0,
                   noise_multiplier=0.0, batch_size=10, local_steps=1,
                   min_client_examples=120, max_update_norm=1e-6)
  store = federated.ClientStateStore(2, process.size)
  state = process.initialize()
  out = process.next(state, clients[:2], store.get([0, 1]))
  assert int(out.metrics['over_bound']) == 2
  np.testing.assert_array_equal(_flat(process.get_model_weights(out.state)),
                                _flat(process.get_model_weights(state)))


def test_example_level_default_bound_never_touches_honest_updates(clients):
  """The default bound (`ExampleLevelDP.update_norm_bound`, read off the
  devices' SGD) is loose enough for real DP-SGD noise: nothing zeroed."""
  process = _build('example', density=0.1, l2_norm_clip=1.0,
                   noise_multiplier=1.5, batch_size=10, local_steps=3,
                   min_client_examples=120)
  _, outputs, _ = _run(process, clients, 2)
  assert [int(o.metrics['over_bound']) for o in outputs] == [0, 0]
  bound = process.privacy.update_norm_bound(process.size, 0.1)
  assert 0 < bound < 10  # finite: a hostile update above it is zeroed


def test_a_device_whose_data_raises_is_dropped_and_the_round_goes_on(clients):
  corrupt = clients[0].map(
      lambda x, y: (tf.debugging.check_numerics(x / 0.0, 'corrupt'), y))
  process = _build('client', density=0.1, l2_norm_clip=0.5,
                   noise_multiplier=1.0, clients_per_round=3,
                   total_clients=40, min_clients=2)
  store = federated.ClientStateStore(3, process.size)
  state = process.initialize()
  before = store.get([0, 1, 2])
  out = process.next(state, [corrupt, clients[1], clients[2]], before)
  assert out.metrics['dropped'] == 1 and out.metrics['skipped'] is None
  assert int(out.metrics['num_clients']) == 2
  np.testing.assert_array_equal(out.client_states[0]['residual'],
                                before[0]['residual'])  # untouched
  assert len(process.ledger.entries) == 1  # charged once

  # Below min_clients: skipped, state unchanged, still charged once.
  skipped = process.next(out.state, [corrupt, clients[1]], store.get([0, 1]))
  assert 'only 1 of the min_clients=2' in skipped.metrics['skipped']
  assert skipped.state is out.state
  assert process.ledger.entries[0].count == 2


def _trained_keras(flat_weights):
  model = keras_model()
  for v, w in zip(model.trainable_weights,
                  tds.core.unflatten(flat_weights, model.trainable_weights)):
    v.assign(w)
  return model


def _mean_loss(flat_weights, x, y):
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  return float(loss_fn(y, _trained_keras(flat_weights)(x)))


def test_example_level_local_steps_are_seeded_dp_sgd_steps_one_by_one(
    clients):
  """The local steps run as one loop in the client work's graph: with the
  noise on and seeded, the device's update equals DP-SGD's steps taken one
  at a time (step s's seed folded from (seed, round 1, client 0, int64 s),
  its rows at the weights step s - 1 wrote), and the loss metric is the
  trained model's mean loss over all the device's examples."""
  lr, seed, steps = 0.1, 11, 3
  process = federated.build_dp_sparse_fed_avg(
      model_fn, sgd(lr), sgd(1.0), upload_density=1.0, download_density=1.0,
      privacy='example', l2_norm_clip=0.5, noise_multiplier=1.0,
      batch_size=10, local_steps=steps, min_client_examples=120, seed=seed)
  state = process.initialize()
  store = federated.ClientStateStore(1, process.size)
  out = process.next(state, [clients[0]], store.get([0]))
  x, y = _client_arrays(clients[0])
  weights = _flat(process.get_model_weights(state))
  device_seed = tds.core.fold_in_seed(tds.core.fold_in_seed(seed, 1), 0)
  for step in range(steps):
    now = tds.core.unflatten(weights, keras_model().trainable_weights)
    mean = process.privacy.private_gradient(
        lambda i, now=now: tf.constant(_per_example_grads(
            now, x[i.numpy()], y[i.numpy()])),
        num_examples=tf.constant(len(y)), size=process.size,
        seed=tds.core.fold_in_seed(device_seed, tf.constant(step, tf.int64)))
    weights = weights - lr * mean.numpy()
  # One device, density 1, server SGD at 1: the new global model is its own.
  np.testing.assert_allclose(_flat(process.get_model_weights(out.state)),
                             weights, atol=1e-5)
  assert abs(float(out.metrics['loss']) - _mean_loss(weights, x, y)) < 1e-5


def _two_passes(data, flat_weights, lr):
  """SGD over one pass of `data`, then the trained model's mean loss over
  a second pass (a shuffle reshuffles): `(trained, loss)`."""
  model = _trained_keras(flat_weights)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  for x, y in data:
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x))
    for v, g in zip(model.trainable_weights,
                    tape.gradient(loss, model.trainable_weights)):
      v.assign_sub(lr * g)
  trained = tds.core.flatten(model.trainable_weights).numpy()
  return trained, np.mean([_mean_loss(trained, x, y) for x, y in data])


def test_nonprivate_local_steps_and_loss_pass_over_the_data_in_order(clients):
  """Without DP a device trains on one pass over its shuffled batches and
  the loss metric reads a second pass, as two `Dataset.reduce`s did: the
  same batches as iterating the dataset twice. Eight devices at once, so a
  second pass that raced the first (they share the shuffle's seeds) would
  show as a wrong or varying loss."""
  lr, devices = 0.1, 8
  arrays = [_client_arrays(c) for c in clients]

  def data(i):
    return tf.data.Dataset.from_tensor_slices(arrays[i % 4]).shuffle(
        120, seed=i).repeat().batch(30).take(3)

  process = federated.build_dp_sparse_fed_avg(
      model_fn, sgd(lr), sgd(1.0), upload_density=1.0, download_density=1.0,
      privacy=None)
  state = process.initialize()
  initial = _flat(process.get_model_weights(state))
  expected = [_two_passes(data(i), initial, lr) for i in range(devices)]
  store = federated.ClientStateStore(devices, process.size)
  for _ in range(2):
    out = process.next(state, [data(i) for i in range(devices)],
                       store.get(range(devices)))
    # Density 1, server SGD at 1: the new global model is the devices' mean.
    np.testing.assert_allclose(_flat(process.get_model_weights(out.state)),
                               np.mean([t for t, _ in expected], 0), atol=1e-5)
    assert abs(float(out.metrics['loss']) -
               np.mean([loss for _, loss in expected])) < 1e-5


CONV_SPEC = (tf.TensorSpec([None, 16, 3], tf.float32),
             tf.TensorSpec([None], tf.int32))


def conv_model_fn():
  """A small 1-D CNN (Conv1D, pooling, Dense): ghost norms cover it."""
  init = tf.keras.initializers.GlorotUniform(seed=2)
  layers = tf.keras.layers
  model = tf.keras.Sequential([
      layers.InputLayer(input_shape=(16, 3)),
      layers.Conv1D(4, 3, activation='relu', kernel_initializer=init),
      layers.MaxPool1D(2),
      layers.Conv1D(6, 3, padding='same', activation='tanh',
                    kernel_initializer=init),
      layers.GlobalAveragePooling1D(),
      layers.Dense(3, kernel_initializer=init)])
  return tff.learning.models.from_keras_model(
      model, input_spec=CONV_SPEC,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _conv_clients(count=2, n=40):
  rng = np.random.default_rng(3)
  return [tf.data.Dataset.from_tensor_slices(
      (rng.normal(size=(n, 16, 3)).astype(np.float32),
       rng.integers(0, 3, n).astype(np.int32))).batch(20)
          for _ in range(count)]


def _count_ghost_traces(monkeypatch):
  calls = []
  module = federated.client_work.keras_per_example
  original = module.ghost_clipped_sum
  monkeypatch.setattr(module, 'ghost_clipped_sum', lambda *args, **kwargs:
                      calls.append(1) or original(*args, **kwargs))
  return calls


def _conv_round(noise, **kwargs):
  """Global weights before and after one seeded example-level round of the
  conv model on two devices (client and server SGD at 1, density 1)."""
  process = federated.build_dp_sparse_fed_avg(
      conv_model_fn, sgd(1.0), sgd(1.0), upload_density=1.0,
      download_density=1.0, privacy='example', l2_norm_clip=0.05,
      noise_multiplier=noise, batch_size=10, local_steps=2,
      min_client_examples=40, seed=5, **kwargs)
  state, _, _ = _run(process, _conv_clients(), 1)
  return (_flat(process.get_model_weights(process.initialize())),
          _flat(process.get_model_weights(state)))


@pytest.mark.parametrize('noise', [0.0, 1.0])
def test_example_level_ghost_norms_equal_the_rows(noise, monkeypatch):
  """Issue 17 parity: the client work's DP-SGD by ghost norms gives the
  global model the rows path (forced on) gives, within 1e-5, on a Conv1D
  model: noise off, and on with the same seed (the same Poisson samples and
  noise, so only the clipped sums could differ)."""
  calls = _count_ghost_traces(monkeypatch)
  start, ghost = _conv_round(noise)
  assert calls, 'the client work did not take ghost norms'
  calls.clear()
  monkeypatch.setattr(federated.client_work, '_ghost_model',
                      lambda model, params: None)
  _, rows = _conv_round(noise)
  assert not calls
  assert np.abs(rows - start).max() > 1e-3  # the round moved the model
  np.testing.assert_allclose(ghost, rows, rtol=0, atol=1e-5)


def test_example_level_subspace_keeps_the_rows(monkeypatch):
  """In a subspace each example's row is pulled back to z before the clip:
  ghost norms of the model's weights would bound the wrong norm, so the
  client work takes the rows there, even for a model ghost norms cover."""
  calls = _count_ghost_traces(monkeypatch)
  _conv_round(0.0, subspace=20, subspace_seed=1)
  assert not calls
  keras_model = conv_model_fn()._keras_model  # pylint: disable=protected-access
  assert tds.keras.per_example.supports_ghost(keras_model)
