"""The TFF process in a subspace: devices train z, the model is origin + P z."""

import numpy as np
import pytest
import tensorflow as tf

import tf_dpsparse as tds

tff = pytest.importorskip('tensorflow_federated')
from tf_dpsparse import federated  # noqa: E402  (after the skip)
from test_federated import digits_clients  # noqa: E402
from test_federated import keras_model  # noqa: E402
from test_federated import model_fn  # noqa: E402  (the same digits MLP)

LR = 0.5
DIMS = 40


def _build(privacy=None, **kwargs):
  return federated.build_dp_sparse_fed_avg(
      model_fn, tff.learning.optimizers.build_sgdm(LR),
      tff.learning.optimizers.build_sgdm(1.0), privacy=privacy,
      subspace=DIMS, subspace_seed=5, **kwargs)


def _reference_z(x, y, steps: int) -> np.ndarray:
  """`steps` full-batch SGD steps on z from 0, eagerly, by the chain rule
  through an explicit P: what one device's round must compute."""
  model = keras_model()
  origin = tds.core.flatten(model.trainable_variables).numpy()
  sub = tds.core.count_sketch(origin, DIMS, seed=5)
  p = np.zeros((sub.size, DIMS), np.float32)
  p[np.arange(sub.size), sub.buckets] = sub.coefs
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  z = np.zeros(DIMS, np.float32)
  for _ in range(steps):
    for v, t in zip(model.trainable_variables, tds.core.unflatten(
        origin + p @ z, model.trainable_variables)):
      v.assign(t)
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x))
    g = tds.core.flatten(tape.gradient(loss, model.trainable_variables))
    z = z - LR * (g.numpy() @ p)
  return z


def _one_round(process, data):
  state = process.initialize()
  state, _, metrics = process.next(state, [data],
                                   [process.initial_client_state(0)])
  return state, metrics


def test_a_round_trains_z_by_the_chain_rule_through_p():
  data = digits_clients(1)[0]  # 120 digits in 4 batches of 30
  x, y = (np.concatenate(a) for a in zip(*data.as_numpy_iterator()))
  state, metrics = _one_round(_build(), data.unbatch().batch(120))
  z = state['global_model_weights'].trainable[0]
  np.testing.assert_allclose(z, _reference_z(x, y, steps=1), atol=2e-6)
  # the upload is all of z, no index bytes: a 'all' header and 40 floats
  assert metrics['bytes_up'] < 4 * DIMS + 16


def test_example_level_clips_and_noises_the_pulled_back_rows():
  """Rate 1 (batch = the device's 120), no noise, a clip no row reaches:
  DP-SGD's mean of per-example rows pulled back to z is the full-batch z
  gradient, so one step lands where plain SGD does."""
  data = digits_clients(1)[0]
  x, y = (np.concatenate(a) for a in zip(*data.as_numpy_iterator()))
  process = _build('example', l2_norm_clip=1e6, noise_multiplier=1e-9,
                   batch_size=120, local_steps=1, min_client_examples=120,
                   seed=0)
  state, _ = _one_round(process, data)
  np.testing.assert_allclose(state['global_model_weights'].trainable[0],
                             _reference_z(x, y, steps=1), atol=1e-4)


def test_the_server_model_is_origin_plus_p_z():
  process = _build('client', l2_norm_clip=1.0, noise_multiplier=0.5,
                   clients_per_round=2, total_clients=4, seed=1)
  state = process.initialize()
  clients = digits_clients(2)
  states = [process.initial_client_state(i) for i in range(2)]
  for _ in range(2):
    state, states, metrics = process.next(state, clients, states)
  z = state['global_model_weights'].trainable[0]
  weights = process.get_model_weights(state)
  flat = tds.core.flatten(list(weights.trainable)).numpy()
  np.testing.assert_array_equal(flat, process.subspace.expand(z).numpy())
  assert [w.shape for w in weights.trainable] == [
      tuple(v.shape) for v in keras_model().trainable_variables]
  assert metrics['dense_bytes_up'] == 2 * 4 * process.model_size
  assert process.size == DIMS and metrics['epsilon'] > 0


def test_a_subspace_refuses_topk_catch_up():
  with pytest.raises(ValueError, match='exactly with z'):
    _build(catch_up='topk')


def test_without_a_subspace_the_densities_are_required():
  with pytest.raises(ValueError, match='upload_density is required'):
    federated.build_dp_sparse_fed_avg(
        model_fn, tff.learning.optimizers.build_sgdm(LR), privacy=None,
        download_density=1.0)


def test_a_clipped_subspace_device_keeps_no_excess():
  """Client level in a subspace drops what the clip removes
  (`core.default_clip_feedback`): at 32 bits and density 1 the residual
  stays zero; top-k of the weights keeps it."""
  clients = digits_clients(2)
  for subspace, kept in ((DIMS, False), (None, True)):
    process = federated.build_dp_sparse_fed_avg(
        model_fn, tff.learning.optimizers.build_sgdm(LR), privacy='client',
        l2_norm_clip=1e-3, noise_multiplier=0.5, clients_per_round=2,
        total_clients=4, seed=1, subspace=subspace,
        **({} if subspace else dict(upload_density=1.0,
                                    download_density=1.0)))
    _, states, metrics = process.next(
        process.initialize(), clients,
        [process.initial_client_state(i) for i in range(2)])
    assert metrics['clipped_fraction'] == 1.0
    norms = [np.linalg.norm(s['residual']) for s in states]
    assert (min(norms) > 0.01) if kept else max(norms) == 0.0, norms
