"""The composed pieces: core stages, privacy mechanisms, their nesting in TFF."""

import dataclasses

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

import tf_dpsparse as tds
from tf_dpsparse.core import stages


def test_sparse_upload_conserves_and_clips_what_it_sends():
  rng = np.random.default_rng(0)
  update = tf.constant(rng.normal(size=200).astype(np.float32))
  upload = stages.sparse_upload(20, l2_norm_clip=0.5, value_bits=8)
  state = upload.init(200)
  sent, state2, metrics = upload.update(update, state)
  assert float(tf.norm(sent.values)) <= 0.5
  assert bool(metrics.clipped)
  np.testing.assert_allclose(tds.core.densify(sent) + state2.residual, update,
                             atol=1e-6)
  assert float(metrics.residual_norm) == pytest.approx(
      float(tf.norm(state2.residual)))


def test_without_clip_feedback_the_clipped_excess_is_dropped_not_kept():
  """`clip_feedback=False`: the residual holds what top-k left and what the
  wire rounded off, never what the clip removed (DP-FedAvg's clip)."""
  update = tf.constant([3.0, -4.0, 0.5, 0.25])  # top-2: norm 5, clip to 1
  kept = stages.sparse_upload(2, l2_norm_clip=1.0, value_bits=8)
  dropped = stages.sparse_upload(2, l2_norm_clip=1.0, value_bits=8,
                                 clip_feedback=False)
  state = stages.UploadState(tf.zeros([4]))
  sent, kept_state, _ = kept.update(update, state)
  sent_too, dropped_state, metrics = dropped.update(update, state)
  np.testing.assert_array_equal(sent.values, sent_too.values)
  assert bool(metrics.clipped)
  clipped = np.array([0.6, -0.8, 0.0, 0.0], np.float32)
  sent_dense = tds.core.densify(sent).numpy()
  np.testing.assert_allclose(dropped_state.residual,
                             clipped - sent_dense + [0, 0, 0.5, 0.25],
                             atol=1e-7)
  np.testing.assert_allclose(kept_state.residual,
                             update.numpy() - sent_dense, atol=1e-6)


def test_sparse_broadcast_tracks_public_model_and_history():
  rng = np.random.default_rng(1)
  size, k, history = 50, 5, 3
  broadcast = stages.sparse_broadcast(k, value_bits=16, history=history)
  state = broadcast.init(np.zeros(size, np.float32))
  target = tf.constant(rng.normal(size=size).astype(np.float32))
  for round_num in range(1, 5):
    sent, state, metrics = broadcast.update(target, state)
    assert int(state.round_num) == round_num
    slot = round_num % history
    np.testing.assert_array_equal(state.history_indices[slot], sent.indices)
    assert int(state.history_rounds[slot]) == round_num
    assert float(metrics.residual_norm) == pytest.approx(
        float(tf.norm(target - state.public)))
  # The round that fell out of the history makes an old device go dense.
  assert tds.wire.catch_up_payload(state, 0) is None
  payload = tds.wire.catch_up_payload(state, 2)
  view = tds.wire.apply_catch_up(np.zeros(size, np.float32), payload)
  missed = np.unique(np.asarray(state.history_indices)[
      np.asarray(state.history_rounds) > 2])
  np.testing.assert_array_equal(view[missed], np.asarray(state.public)[missed])


def test_broadcast_bytes_reconstruct_the_public_model_bit_for_bit():
  rng = np.random.default_rng(2)
  broadcast = stages.sparse_broadcast(7, value_bits=8)
  state = broadcast.init(np.zeros(40, np.float32))
  device = np.zeros(40, np.float32)
  for _ in range(3):
    target = tf.constant(rng.normal(size=40).astype(np.float32))
    sent, state, _ = broadcast.update(target, state)
    device = tds.wire.apply_broadcast(device, tds.wire.encode(sent, 8))
  np.testing.assert_array_equal(device, state.public)


def test_one_sign_convention():
  initial, trained = tf.constant([1.0, 2.0]), tf.constant([0.5, 3.0])
  update = stages.model_update(initial, trained)
  np.testing.assert_allclose(update, [0.5, -1.0])
  # FedAvg: the server steps along the mean update like a gradient, lr 1.
  np.testing.assert_allclose(stages.apply_update(initial, update), trained)


def test_topk_catch_up_sends_nothing_to_an_up_to_date_view():
  sync = stages.topk_catch_up(3)
  view = tf.constant([1.0, 2.0, 3.0, 4.0])
  _, state, nbytes = sync.update(view, sync.init(view))
  assert int(nbytes) == 0
  np.testing.assert_array_equal(state.view, view)


@pytest.mark.parametrize('steps', [1, 3])
def test_example_level_event_is_dp_sgd_steps(steps):
  dp = tds.privacy.ExampleLevelDP(1.0, 1.1, batch_size=16, local_steps=steps,
                                  min_client_examples=200)
  rounds = 30
  spent = tds.privacy.epsilon_of(
      dp_accounting.SelfComposedDpEvent(dp.round_event(), rounds), 1e-5)
  assert spent == pytest.approx(tds.privacy.compute_epsilon(
      1.1, 16 / 200, steps * rounds, 1e-5), rel=1e-9)


def test_client_level_event_is_the_querys_own():
  dp = tds.privacy.ClientLevelDP(0.5, 0.9, clients_per_round=10,
                                 total_clients=200)
  event = dp.round_event()
  assert isinstance(event, dp_accounting.PoissonSampledDpEvent)
  assert event.sampling_probability == pytest.approx(0.05)
  assert event.event.noise_multiplier == pytest.approx(0.9)
  spent = tds.privacy.epsilon_of(
      dp_accounting.SelfComposedDpEvent(event, 100), 1e-5)
  assert spent == pytest.approx(tds.privacy.compute_epsilon(
      0.9, 0.05, 100, 1e-5), rel=1e-6)


def test_calibrated_mechanism_spends_the_target():
  dp = tds.privacy.calibrated(
      tds.privacy.ExampleLevelDP(1.0, 0.0, batch_size=16, local_steps=2,
                                 min_client_examples=200),
      8.0, rounds=90, delta=1e-5)
  spent = tds.privacy.compute_epsilon(dp.noise_multiplier, 0.08, 180, 1e-5)
  assert spent <= 8.0
  assert spent == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize('mechanism, match', [
    (lambda: tds.privacy.ClientLevelDP(0.0, 1.0, 10, 100), 'l2_norm_clip'),
    (lambda: tds.privacy.ClientLevelDP(1.0, -1.0, 10, 100), 'noise_multiplier'),
    (lambda: tds.privacy.ClientLevelDP(1.0, 1.0, 200, 100), 'exceeds'),
    (lambda: tds.privacy.ExampleLevelDP(1.0, 1.0, 16, 2, 8), 'below batch_size'),
    (lambda: tds.privacy.ExampleLevelDP(1.0, 1.0, 16, 0, 80), 'local_steps'),
])
def test_mechanisms_refuse_bad_parameters(mechanism, match):
  with pytest.raises(ValueError, match=match):
    mechanism()


def test_seeded_query_noise_is_fixed_per_release_and_fresh_across_releases():
  dp = tds.privacy.ClientLevelDP(1.0, 1.0, 2, 10, seed=4)
  query = dp.query()
  spec = tf.TensorSpec([1000], tf.float32)
  global_state = query.initial_global_state()
  sample = query.initial_sample_state(spec)
  first, global_state, _ = query.get_noised_result(sample, global_state)
  second, _, _ = query.get_noised_result(sample, global_state)
  again, _, _ = dp.query().get_noised_result(sample,
                                             query.initial_global_state())
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, second)
  # N(0, (z C)^2) / clients_per_round, within 10 % at d = 1000.
  assert float(tf.math.reduce_std(first)) == pytest.approx(0.5, rel=0.1)


def test_a_mechanism_object_passes_through_the_builder_with_its_seed():
  federated = tds.federated
  dp = tds.privacy.ClientLevelDP(1.0, 0.5, clients_per_round=2,
                                 total_clients=4)
  mechanism = federated.learning._mechanism(dp, seed=3, delta=1e-5)
  assert mechanism == dataclasses.replace(dp, seed=3)
  with pytest.raises(ValueError, match='mechanism object'):
    federated.learning._mechanism(dp, seed=None, noise_multiplier=1.0)
