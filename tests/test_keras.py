"""Keras front: DP-SGD equivalences, error feedback, noise, checkpoints, ε."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

import tf_dpsparse as tds

NONE = tf.keras.losses.Reduction.NONE
OPTIMIZERS = {
    'sgd_momentum': lambda: tf.keras.optimizers.SGD(0.1, momentum=0.9),
    'adam': lambda: tf.keras.optimizers.Adam(0.01),
    'legacy_sgd': lambda: tf.keras.optimizers.legacy.SGD(0.1),
    'legacy_adam': lambda: tf.keras.optimizers.legacy.Adam(0.01),
}


def _data(n=16, shape=(8, 2), classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, *shape)).astype(np.float32),
          rng.integers(0, classes, n).astype(np.int32))


def _model(seed=1):
  """Conv1D + two Dense layers, identical weights for equal seeds."""
  init = tf.keras.initializers.GlorotUniform(seed=seed)
  return tf.keras.Sequential([
      tf.keras.layers.Conv1D(4, 3, activation='tanh', input_shape=(8, 2),
                             kernel_initializer=init),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(5, activation='tanh', kernel_initializer=init),
      tf.keras.layers.Dense(3, kernel_initializer=init),
  ])


def _loss(reduction=NONE):
  return tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=reduction)


def _dp(inner, **kwargs):
  args = dict(l2_norm_clip=1.0, noise_multiplier=0.0, density=1.0, seed=0)
  args.update(kwargs)
  return tds.keras.DPSparseOptimizer(inner, **args)


def _weights(model):
  return tds.core.flatten(model.trainable_variables).numpy()


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_density_one_no_noise_equals_inner_step_on_mean_gradient(name):
  x, y = _data()
  dp_model, plain_model = _model(), _model()
  dp_model.compile(optimizer=_dp(OPTIMIZERS[name](), l2_norm_clip=1e6),
                   loss=_loss())
  plain_model.compile(optimizer=OPTIMIZERS[name](), loss=_loss('auto'))
  start = _weights(dp_model)
  for batch in (slice(0, 8), slice(8, 16)):  # two steps: inner state too
    dp_model.train_on_batch(x[batch], y[batch])
    plain_model.train_on_batch(x[batch], y[batch])
  assert np.abs(_weights(dp_model) - start).max() > 1e-3  # it did move
  np.testing.assert_allclose(_weights(dp_model), _weights(plain_model),
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_microbatches', [None, 4])
def test_clipped_gradients_equal_tf_privacy(num_microbatches):
  x, y = _data(n=8)
  clip = 0.05  # below every per-example norm here, so clipping is active
  ours, theirs, unclipped = _model(), _model(), _model()
  ours.compile(optimizer=_dp(tf.keras.optimizers.SGD(1.0), l2_norm_clip=clip,
                             num_microbatches=num_microbatches),
               loss=_loss())
  theirs.compile(
      optimizer=dp_optimizer_keras.DPKerasSGDOptimizer(
          l2_norm_clip=clip, noise_multiplier=0.0,
          num_microbatches=num_microbatches, learning_rate=1.0),
      loss=_loss())
  unclipped.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss=_loss('auto'))
  for model in (ours, theirs, unclipped):
    model.train_on_batch(x, y)
  np.testing.assert_allclose(_weights(ours), _weights(theirs), rtol=0,
                             atol=1e-6)
  assert np.abs(_weights(ours) - _weights(unclipped)).max() > 1e-2


def test_error_feedback_conserves_noised_gradients_and_counts_bytes():
  x, y = _data(n=32)
  model = _model()
  optimizer = _dp(tf.keras.optimizers.SGD(1.0), noise_multiplier=1.0,
                  density=0.05, seed=3)
  loss_fn = _loss()

  @tf.function
  def step(xb, yb):
    with tf.GradientTape() as tape:
      loss = loss_fn(yb, model(xb, training=True))
    grads_and_vars = optimizer.compute_gradients(
        loss, model.trainable_variables, tape)
    optimizer.apply_gradients(grads_and_vars)
    return tds.core.flatten([g for g, _ in grads_and_vars])

  start = previous = _weights(model)
  noised_total = np.zeros_like(start, np.float64)
  encoded_bytes = 0
  for i in range(8):
    noised_total += step(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]).numpy()
    current = _weights(model)
    sent = previous - current  # SGD(1.0): the weights move by the slice
    indices = np.flatnonzero(sent)
    assert indices.size == optimizer.k
    encoded_bytes += len(tds.codec.encode(
        tds.core.SparseUpdate(indices, sent[indices], optimizer.size)))
    previous = current
  residual = optimizer.residual.numpy()
  assert np.linalg.norm(residual) > 1.0  # much was held back
  # The residual is exactly the noised gradients not sent yet.
  np.testing.assert_allclose((start - previous) + residual, noised_total,
                             rtol=0, atol=1e-4)
  assert int(optimizer.wire_bytes) == encoded_bytes
  assert int(optimizer.iterations) == 8 and int(optimizer.examples) == 32


@pytest.mark.parametrize('fmt', ['checkpoint', 'keras'])
def test_residual_and_state_restore_with_the_model(tmp_path, fmt):
  x, y = _data(n=32)

  def compiled():
    model = _model()
    model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1, momentum=0.9),
                                density=0.1), loss=_loss())
    return model

  original = compiled()
  original.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0)
  if fmt == 'checkpoint':  # TF format: save_weights / ModelCheckpoint
    path = str(tmp_path / 'ckpt')
    original.save_weights(path)
    names = [n for n, _ in tf.train.list_variables(path)]
    assert not [n for n in names if '_generator' in n]  # noise never replays
    restored = compiled()
    restored.load_weights(path)
  else:  # the whole model, compiled optimizer included
    path = str(tmp_path / 'model.keras')
    original.save(path)
    restored = tf.keras.models.load_model(path)
  for model in (original, restored):  # noise 0: the next step is determined
    model.train_on_batch(x[24:], y[24:])
  a, b = original.optimizer, restored.optimizer
  assert np.abs(a.residual.numpy()).max() > 0
  np.testing.assert_array_equal(a.residual.numpy(), b.residual.numpy())
  np.testing.assert_array_equal(_weights(original), _weights(restored))
  for counter in ('iterations', 'examples', 'wire_bytes'):
    assert int(getattr(a, counter)) == int(getattr(b, counter))
  assert int(b.iterations) == 4


class _ZeroLoss(tf.keras.losses.Loss):
  """A per-example loss with zero gradient: the update is pure noise."""

  def call(self, y_true, y_pred):
    return 0.0 * tf.reduce_sum(y_pred, axis=-1)


def _noise_deltas(seed, steps=25, batch=8, clip=0.7, noise=1.3):
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(200, input_shape=(10,), kernel_initializer='zeros')
  ])
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(1.0), l2_norm_clip=clip,
                              noise_multiplier=noise, seed=seed),
                loss=_ZeroLoss(reduction=NONE))
  x = np.ones((batch, 10), np.float32)  # 2,200 parameters
  deltas, previous = [], _weights(model)
  for _ in range(steps):
    model.train_on_batch(x, np.zeros(batch))
    deltas.append(previous - _weights(model))
    previous = _weights(model)
  return np.array(deltas)


def test_noise_stddev_is_noise_multiplier_times_clip_over_batch():
  deltas = _noise_deltas(seed=11)  # 25 steps x 2,200 coordinates
  expected = 1.3 * 0.7 / 8
  # 55,000 draws: the sample std is within 0.4 % (1 sigma) of the truth, so
  # the 5 % tolerance of the issue is never hit by chance at this seed.
  assert np.std(deltas) == pytest.approx(expected, rel=0.05)
  assert abs(np.mean(deltas)) < 0.02 * expected
  correlation = np.corrcoef(deltas[:-1].ravel(), deltas[1:].ravel())[0, 1]
  assert abs(correlation) < 0.05  # fresh noise every step


def test_noise_seed_reproduces_and_default_draws_os_entropy():
  np.testing.assert_array_equal(_noise_deltas(5, steps=2),
                                _noise_deltas(5, steps=2))
  assert not np.allclose(_noise_deltas(None, steps=2),
                         _noise_deltas(None, steps=2))


def test_callback_epsilon_matches_accountant_and_budget_stops():
  x, y = _data(n=64)
  noise, delta = 1.0, 1e-5

  def fit(model, budget, epochs):
    callback = tds.keras.PrivacyCallback(delta, dataset_size=64, batch_size=16,
                                         epsilon_budget=budget)
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                     callbacks=[callback]).history

  def compiled():
    model = _model()
    model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1),
                                noise_multiplier=noise, density=0.1),
                  loss=_loss(), metrics=['accuracy'])
    return model

  history = fit(compiled(), None, epochs=3)
  assert history['epsilon'] == [
      tds.privacy.compute_epsilon(noise, 0.25, 4 * e, delta) for e in (1, 2, 3)
  ]

  budget = tds.privacy.compute_epsilon(noise, 0.25, 6, delta)
  assert tds.privacy.compute_epsilon(noise, 0.25, 7, delta) > budget
  model = compiled()
  history = fit(model, budget, epochs=5)
  assert int(model.optimizer.iterations) == 6  # stopped mid-epoch 2
  assert history['epsilon'] == [
      tds.privacy.compute_epsilon(noise, 0.25, s, delta) for s in (4, 6)
  ]
  with pytest.raises(tds.privacy.BudgetExhaustedError):
    fit(model, budget, epochs=1)  # not even one more step fits
  assert int(model.optimizer.iterations) == 6


def test_callback_rejects_batches_larger_than_declared():
  x, y = _data(n=32)
  model = _model()
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1)), loss=_loss())
  callback = tds.keras.PrivacyCallback(1e-5, dataset_size=32, batch_size=8)
  with pytest.raises(ValueError, match='under-reported'):
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])


def test_conv2d_under_jit_compile_matches_graph_mode():

  def trained(jit_compile):
    init = tf.keras.initializers.GlorotUniform(seed=2)
    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(3, 3, activation='relu', input_shape=(6, 6, 1),
                               kernel_initializer=init),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(3, kernel_initializer=init),
    ])
    model.compile(optimizer=_dp(tf.keras.optimizers.Adam(0.01), density=0.2,
                                l2_norm_clip=0.1),
                  loss=_loss(), jit_compile=jit_compile)
    x, y = _data(n=16, shape=(6, 6, 1))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return model

  jit, graph = trained(True), trained(False)
  np.testing.assert_allclose(_weights(jit), _weights(graph), atol=1e-5)
  np.testing.assert_allclose(jit.optimizer.residual.numpy(),
                             graph.optimizer.residual.numpy(), atol=1e-5)
  assert int(jit.optimizer.wire_bytes) == int(graph.optimizer.wire_bytes) > 0


def test_clear_errors():
  x, y = _data()
  sgd = tf.keras.optimizers.SGD(0.1)
  for bad in (dict(density=0.0), dict(density=1.5), dict(l2_norm_clip=-1.0),
              dict(noise_multiplier=-0.1), dict(num_microbatches=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      _dp(sgd, **bad)
  with pytest.raises(TypeError, match='optimizer'):
    _dp('sgd')

  model = _model()
  model.compile(optimizer=_dp(sgd), loss=_loss('auto'))
  with pytest.raises(ValueError, match='reduction is NONE'):
    model.fit(x, y, batch_size=8, verbose=0)

  model = _model()
  model.compile(optimizer=_dp(sgd, num_microbatches=3), loss=_loss())
  with pytest.raises(ValueError, match='divisible'):  # static batch size
    model.fit(x, y, batch_size=8, verbose=0)
  unknown_batch = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
  with pytest.raises(tf.errors.InvalidArgumentError, match='divisible'):
    model.fit(unknown_batch, verbose=0)

  optimizer = _dp(sgd)
  with pytest.raises(ValueError, match='raw gradients'):
    optimizer.apply_gradients([(tf.zeros([2]), tf.Variable(tf.zeros([2])))])

  model = _model()
  model.compile(optimizer=sgd, loss=_loss())
  with pytest.raises(TypeError, match='DPSparseOptimizer'):
    model.fit(x, y, batch_size=8, verbose=0,
              callbacks=[tds.keras.PrivacyCallback(1e-5, 16, 8)])


def test_config_round_trip_and_learning_rate_delegation():
  optimizer = _dp(tf.keras.optimizers.legacy.Adam(0.01), l2_norm_clip=0.5,
                  noise_multiplier=1.2, density=0.03, num_microbatches=4,
                  seed=9)
  config = optimizer.get_config()
  assert 'seed' not in config  # a re-created optimizer draws fresh noise
  clone = tds.keras.DPSparseOptimizer.from_config(config)
  assert (clone.get_config()['optimizer']['config'] ==
          config['optimizer']['config'])
  assert {**clone.get_config(), 'optimizer': None} == {**config,
                                                      'optimizer': None}
  assert isinstance(clone.inner_optimizer, tf.keras.optimizers.legacy.Adam)
  clone.learning_rate = 0.05
  assert float(clone.inner_optimizer.learning_rate) == pytest.approx(0.05)
