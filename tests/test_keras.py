"""Keras front: DP-SGD equivalences, error feedback, noise, checkpoints, ε."""

import re

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib
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


def _save(model, fmt, directory) -> str:
  """Saves `model` in `fmt`: weights (with the optimizer) or the whole model."""
  if fmt in ('checkpoint', 'weights.h5'):  # save_weights / ModelCheckpoint
    path = str(directory / ('ckpt' if fmt == 'checkpoint' else 'w.weights.h5'))
    model.save_weights(path)
  else:
    path = str(directory / f'model.{fmt}')
    model.save(path)
  return path


def _load(path, fmt, compiled):
  if fmt in ('checkpoint', 'weights.h5'):
    model = compiled()
    model.load_weights(path)  # into an optimizer that is not built yet
    return model
  return tf.keras.models.load_model(path)


@pytest.mark.parametrize('inner', ['sgd_momentum', 'legacy_adam'])
@pytest.mark.parametrize('fmt', ['checkpoint', 'weights.h5', 'keras', 'h5'])
def test_every_save_format_keeps_the_dp_state(tmp_path, fmt, inner):
  x, y = _data(n=40)

  def compiled():
    model = _model()
    model.compile(optimizer=_dp(OPTIMIZERS[inner](), density=0.1,
                                noise_multiplier=1.0), loss=_loss())
    return model

  original = compiled()
  original.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0)  # 3 steps
  path = _save(original, fmt, tmp_path)
  if fmt == 'checkpoint':
    names = [n for n, _ in tf.train.list_variables(path)]
    assert not [n for n in names if '_generator' in n]  # noise never replays

  restored = _load(path, fmt, compiled)
  restored.optimizer.build(restored.trainable_variables)  # no-op if built
  saved, got = original.optimizer.variables, restored.optimizer.variables
  assert len(got) == len(saved) > 5  # steps, examples, bytes, residual, inner
  for a, b in zip(saved, got):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
  assert np.abs(restored.optimizer.residual.numpy()).max() > 0
  np.testing.assert_array_equal(_weights(original), _weights(restored))

  resumed, seen = _load(path, fmt, compiled), []
  counts = tf.keras.callbacks.LambdaCallback(
      on_train_begin=lambda _: seen.append(int(resumed.optimizer.iterations)))
  callback = tds.keras.PrivacyCallback(1e-5, dataset_size=40, batch_size=8)
  resumed.fit(x[24:], y[24:], batch_size=8, verbose=0,
              callbacks=[callback, counts])
  assert seen == [3]  # the callback's budget sees the restored steps
  optimizer = resumed.optimizer
  assert (int(optimizer.iterations), int(optimizer.examples)) == (5, 40)
  assert int(optimizer.inner_optimizer.iterations) == 5
  assert callback.epsilon == callback.epsilon_at(5, 40)


def test_savedmodel_refuses_to_save_the_optimizer(tmp_path):
  x, y = _data()
  model = _model()
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1)), loss=_loss())
  model.fit(x, y, batch_size=8, verbose=0)
  with pytest.raises(ValueError, match='SavedModel format.*privacy spent'):
    model.save(str(tmp_path / 'savedmodel'))
  model.save(str(tmp_path / 'inference'), include_optimizer=False)
  restored = tf.keras.models.load_model(str(tmp_path / 'inference'))
  assert restored.optimizer is None  # not compiled: no DP state to lose
  np.testing.assert_array_equal(_weights(model), _weights(restored))


class _Interrupted(Exception):
  """Raised by a callback to cut a `fit` short, as a crash would."""


def _interrupt_at(epoch, batch=None):
  """A callback raising when `epoch` begins, or after its `batch`."""

  def at_epoch(e, logs):
    if e == epoch:
      raise _Interrupted()

  def at_batch(b, logs):
    if b == batch and at_batch.epoch == epoch:
      raise _Interrupted()

  if batch is None:
    return tf.keras.callbacks.LambdaCallback(on_epoch_begin=at_epoch)
  at_batch.epoch = None
  return tf.keras.callbacks.LambdaCallback(
      on_epoch_begin=lambda e, logs: setattr(at_batch, 'epoch', e),
      on_train_batch_end=at_batch)


@pytest.mark.parametrize('inner,batch,same_model', [
    ('sgd_momentum', None, True),  # at an epoch's start, fit the model again
    ('legacy_adam', 1, False),  # mid-epoch; a new process: a new model
])
def test_backup_and_restore_resumes_exactly(tmp_path, inner, batch,
                                            same_model):
  """Interrupted at epoch 2 and resumed = never interrupted; ε continues.

  Noise is seeded (a function of seed and step) and batches unshuffled, so
  the two runs must agree. Steps of a cut epoch are rolled back with it.
  """
  x, y = _data(n=32)
  fit = dict(x=x, y=y, batch_size=8, epochs=4, shuffle=False, verbose=0)

  def compiled():
    model = _model()
    model.compile(optimizer=_dp(OPTIMIZERS[inner](), density=0.1,
                                noise_multiplier=1.0, seed=3), loss=_loss())
    return model

  def privacy():
    return tds.keras.PrivacyCallback(1e-5, dataset_size=32, batch_size=8)

  whole, whole_privacy = compiled(), privacy()
  whole_history = whole.fit(**fit, callbacks=[whole_privacy]).history
  backup = tf.keras.callbacks.BackupAndRestore(str(tmp_path / 'backup'))
  model = compiled()
  with pytest.raises(_Interrupted):
    model.fit(**fit, callbacks=[backup, privacy(), _interrupt_at(2, batch)])
  assert int(model.optimizer.iterations) == 8 + (batch or -1) + 1

  model = model if same_model else compiled()
  resumed_privacy, seen = privacy(), []
  counts = tf.keras.callbacks.LambdaCallback(
      on_train_begin=lambda _: seen.append(
          (int(model.optimizer.iterations), int(model.optimizer.examples))))
  history = model.fit(**fit, callbacks=[resumed_privacy, backup, counts])
  assert seen == [(8, 64)]  # the backup at the end of epoch 1
  assert int(model.optimizer.iterations) == 16
  np.testing.assert_allclose(_weights(model), _weights(whole), atol=1e-6)
  np.testing.assert_allclose(model.optimizer.residual.numpy(),
                             whole.optimizer.residual.numpy(), atol=1e-6)
  assert np.abs(whole.optimizer.residual.numpy()).max() > 0
  for a, b in zip(whole.optimizer.variables, model.optimizer.variables):
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-6,
                               err_msg=a.name)  # counters, inner slots
  assert resumed_privacy.epsilon == whole_privacy.epsilon
  assert history.history['epsilon'] == whole_history['epsilon'][2:]


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


def _dense_model(features=4, classes=2):
  """A tiny model for schedules of many steps (accounting tests)."""
  init = tf.keras.initializers.GlorotUniform(seed=3)
  return tf.keras.Sequential([
      tf.keras.layers.Dense(classes, input_shape=(features,),
                            kernel_initializer=init)
  ])


def _fit_private(sampling, n, batch, epochs, noise, *, budget=None,
                 num_microbatches=None, model=None):
  """`model.fit` on n examples with a PrivacyCallback: Poisson or shuffled."""
  x, y = _data(n=n, shape=(4,), classes=2)
  if model is None:
    model = _dense_model()
    expected = batch if sampling == 'poisson' else None
    model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1),
                                noise_multiplier=noise, density=0.5,
                                num_microbatches=num_microbatches,
                                expected_batch_size=expected),
                  loss=_loss())
  callback = tds.keras.PrivacyCallback(1e-5, dataset_size=n, batch_size=batch,
                                       epsilon_budget=budget,
                                       sampling=sampling)
  if sampling == 'poisson':
    data = dict(x=tds.keras.poisson_batches(x, y, batch, seed=0),
                steps_per_epoch=n // batch)
  else:
    data = dict(x=x, y=y, batch_size=batch)
  history = model.fit(**data, epochs=epochs, verbose=0, callbacks=[callback])
  return model, callback, history.history


def _tf_privacy_statement(sampling, used_microbatching):
  """TF Privacy's two lines for n=640, batch 64, 3 epochs, z=1.1, δ=1e-5."""
  lib = compute_dp_sgd_privacy_lib
  statement = lib.compute_dp_sgd_privacy_statement(
      640, 64, 3, 1.1, 1e-5, used_microbatching=used_microbatching)
  once_per_epoch, poisson = [
      float(line.split()[-1]) for line in statement.splitlines()
      if line.strip().startswith('Epsilon')]
  exact = lib._compute_dp_sgd_example_privacy(  # the unrounded number
      3, 1.1, 1e-5, used_microbatching,
      poisson_subsampling_probability=(0.1 if sampling == 'poisson' else None))
  return (poisson if sampling == 'poisson' else once_per_epoch), exact


@pytest.mark.parametrize('sampling,num_microbatches', [
    ('shuffled', None), ('poisson', None), ('shuffled', 32)])
def test_epsilon_matches_tf_privacy_statement(sampling, num_microbatches):
  printed, exact = _tf_privacy_statement(sampling, num_microbatches is not None)
  model, callback, history = _fit_private(
      sampling, n=640, batch=64, epochs=3, noise=1.1,
      num_microbatches=num_microbatches)
  assert int(model.optimizer.iterations) == 30
  assert history['epsilon'][-1] == pytest.approx(exact, rel=1e-9)
  assert round(callback.epsilon, 3) == printed  # 8.039 / 4.025 / 18.950


def _direct_epsilon(sampling, noise, count, delta=1e-5):
  """ε straight from dp_accounting: `count` steps at q=0.25, or passes."""
  event = dp_accounting.GaussianDpEvent(noise)
  if sampling == 'poisson':
    event = dp_accounting.PoissonSampledDpEvent(0.25, event)
  return dp_accounting.rdp.RdpAccountant().compose(
      dp_accounting.SelfComposedDpEvent(event, count)).get_epsilon(delta)


@pytest.mark.parametrize('sampling', ['shuffled', 'poisson'])
def test_budget_stop_uses_the_reported_accounting(sampling):
  # 64 examples in batches of 16: 4 steps per epoch, q = 0.25.
  noise = 1.0
  charged = {'shuffled': lambda steps: -(-steps // 4),  # passes
             'poisson': lambda steps: steps}[sampling]
  _, _, history = _fit_private(sampling, 64, 16, epochs=2, noise=noise)
  assert history['epsilon'] == [
      pytest.approx(_direct_epsilon(sampling, noise, charged(s)), rel=1e-9)
      for s in (4, 8)]

  stop = {'shuffled': 8, 'poisson': 6}[sampling]  # mid-epoch for Poisson
  budget = _direct_epsilon(sampling, noise, charged(stop)) * (1 + 1e-9)
  assert _direct_epsilon(sampling, noise, charged(stop + 1)) > budget
  model, callback, history = _fit_private(sampling, 64, 16, epochs=5,
                                          noise=noise, budget=budget)
  assert int(model.optimizer.iterations) == stop
  assert callback.epsilon <= budget
  assert history['epsilon'][-1] == pytest.approx(
      _direct_epsilon(sampling, noise, charged(stop)), rel=1e-9)
  with pytest.raises(tds.privacy.BudgetExhaustedError) as refusal:
    _fit_private(sampling, 64, 16, epochs=1, noise=noise, budget=budget,
                 model=model)  # not even one more step fits
  assert int(model.optimizer.iterations) == stop
  spent = _direct_epsilon(sampling, noise, charged(stop))
  assert _spent_and_remaining(refusal.value) == (
      pytest.approx(spent, rel=1e-3), pytest.approx(budget - spent, rel=1e-3))


def _spent_and_remaining(refusal):
  """(spent, remaining) ε as a budget refusal states them (4 digits)."""
  found = re.search(r'refuses to train: ε spent (\S+), remaining (\S+) of '
                    r'the budget', str(refusal))
  assert found, str(refusal)
  return float(found.group(1)), float(found.group(2))


@pytest.mark.parametrize('restore_first', [True, False])
def test_budget_refusal_after_a_restore_states_spent_and_remaining(
    tmp_path, restore_first):
  """A run restored at its budget is refused before any step.

  Whatever the callbacks' order: `BackupAndRestore` listed after the
  `PrivacyCallback` restores the optimizer after the callback's
  `on_train_begin` (before the fix, one step over budget was taken).
  """
  noise, x, y = 1.0, *_data(n=64, shape=(4,), classes=2)
  budget = _direct_epsilon('shuffled', noise, 2) * 1.01  # 2 passes, 8 steps

  def compiled():
    model = _dense_model()
    model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1),
                                noise_multiplier=noise, density=0.5),
                  loss=_loss())
    return model

  fit = dict(x=x, y=y, batch_size=16, epochs=3, verbose=0)
  backup = tf.keras.callbacks.BackupAndRestore(str(tmp_path / 'backup'))
  with pytest.raises(_Interrupted):
    compiled().fit(**fit, callbacks=[backup, _interrupt_at(2)])
  model = compiled()
  callbacks = [tds.keras.PrivacyCallback(1e-5, dataset_size=64, batch_size=16,
                                         epsilon_budget=budget), backup]
  spent = _direct_epsilon('shuffled', noise, 2)
  with pytest.raises(tds.privacy.BudgetExhaustedError) as refusal:
    model.fit(**fit, callbacks=callbacks[::-1] if restore_first else callbacks)
  assert int(model.optimizer.iterations) == 8  # restored, and no more
  assert _spent_and_remaining(refusal.value) == (
      pytest.approx(spent, rel=1e-3), pytest.approx(budget - spent, rel=1e-3))
  after = _direct_epsilon('shuffled', noise, 3)  # a step into a third pass
  assert f'one more step would bring ε to {after:.4g}' in str(refusal.value)


def _inclusions(dataset, n):
  """[steps, n] 0/1 matrix: which examples (labels = indices) each step used."""
  rows = []
  for _, labels, weights in dataset:
    row = np.zeros(n)
    row[labels.numpy()[weights.numpy() > 0]] = 1
    rows.append(row)
  return np.array(rows)


def test_poisson_batches_sample_each_example_bernoulli_q():
  n, q, steps = 50, 0.2, 2000
  x = np.arange(n, dtype=np.float32)[:, None]
  y = np.arange(n)
  taken = _inclusions(
      tds.keras.poisson_batches(x, y, int(q * n), steps=steps, seed=0), n)
  assert taken.shape == (steps, n)
  # Each example: Binomial(2000, 0.2), mean 400, sd 17.9; 5 sd = 89.
  per_example = taken.sum(axis=0)
  sd = np.sqrt(steps * q * (1 - q))
  assert np.abs(per_example - steps * q).max() < 5 * sd
  # Independent joins: batch sizes vary as Binomial(50, 0.2), variance 8
  # (fixed-size batches would have variance 0); the sample variance of
  # 2000 draws is within 20 % (6 sd) of it.
  assert np.var(taken.sum(axis=1)) == pytest.approx(n * q * (1 - q), rel=0.2)
  # No memory between steps or examples: correlations near 0 (sd ~0.005).
  after = np.corrcoef(taken[:-1].ravel(), taken[1:].ravel())[0, 1]
  beside = np.corrcoef(taken[:, :-1].ravel(), taken[:, 1:].ravel())[0, 1]
  assert abs(after) < 0.03 and abs(beside) < 0.03


def test_poisson_batches_empty_draws_still_step_and_epochs_redraw():
  n, steps = 20, 1000
  x, y = np.ones((n, 3), np.float32), np.arange(n)
  dataset = tds.keras.poisson_batches(x, y, 1, steps=steps, seed=1)
  first, second = (_inclusions(dataset.take(50), n) for _ in range(2))
  assert not np.array_equal(first, second)  # a new epoch draws anew
  again = tds.keras.poisson_batches(x, y, 1, steps=steps, seed=1)
  np.testing.assert_array_equal(_inclusions(again.take(50), n), first)
  sizes, empty = [], 0
  for x_batch, labels, weights in dataset:
    sizes.append(int(tf.size(labels)))
    if not weights.numpy().any():  # an empty draw: one example at weight 0
      assert x_batch.shape == (1, 3)
      empty += 1
  assert len(sizes) == steps  # every step is there for the accountant
  expected = steps * 0.95**n  # 358.5, sd 15.2
  assert abs(empty - expected) < 5 * np.sqrt(expected * (1 - 0.95**n))


def test_expected_batch_size_divides_the_noised_sum():
  x, y = _data(n=5)
  weights = np.array([1, 1, 1, 0, 1], np.float32)  # one padding example
  model = _model()
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(1.0), l2_norm_clip=1e6,
                              expected_batch_size=8), loss=_loss())
  loss_fn = _loss('sum')
  total = np.zeros_like(_weights(model))
  for i in np.flatnonzero(weights):  # the per-example gradients, by hand
    with tf.GradientTape() as tape:
      loss = loss_fn(y[i:i + 1], model(x[i:i + 1]))
    total += tds.core.flatten(
        tape.gradient(loss, model.trainable_variables)).numpy()
  start = _weights(model)
  model.train_on_batch(x, y, sample_weight=weights)
  np.testing.assert_allclose(start - _weights(model), total / 8, atol=1e-6)
  assert np.abs(total / 4 - total / 8).max() > 1e-3  # not the row count


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
              dict(noise_multiplier=-0.1), dict(num_microbatches=0),
              dict(expected_batch_size=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      _dp(sgd, **bad)
  with pytest.raises(TypeError, match='optimizer'):
    _dp('sgd')
  with pytest.raises(ValueError, match='num_microbatches'):
    _dp(sgd, expected_batch_size=8, num_microbatches=4)
  with pytest.raises(ValueError, match='sampling'):
    tds.keras.PrivacyCallback(1e-5, 16, 8, sampling='uniform')
  with pytest.raises(ValueError, match='batch_size <= len'):
    tds.keras.poisson_batches(x, y, 17)

  model = _model()
  model.compile(optimizer=_dp(sgd), loss=_loss())  # divides by the row count
  with pytest.raises(ValueError, match='expected_batch_size'):
    model.fit(tds.keras.poisson_batches(x, y, 8), steps_per_epoch=2,
              verbose=0, callbacks=[tds.keras.PrivacyCallback(
                  1e-5, 16, 8, sampling='poisson')])

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
  poisson = _dp(tf.keras.optimizers.SGD(0.1), expected_batch_size=64)
  assert tds.keras.DPSparseOptimizer.from_config(
      poisson.get_config()).expected_batch_size == 64
  assert 'seed' not in config  # a re-created optimizer draws fresh noise
  clone = tds.keras.DPSparseOptimizer.from_config(config)
  assert (clone.get_config()['optimizer']['config'] ==
          config['optimizer']['config'])
  assert {**clone.get_config(), 'optimizer': None} == {**config,
                                                      'optimizer': None}
  assert isinstance(clone.inner_optimizer, tf.keras.optimizers.legacy.Adam)
  clone.learning_rate = 0.05
  assert float(clone.inner_optimizer.learning_rate) == pytest.approx(0.05)


def _normalization(**kwargs):
  layer = tf.keras.layers.Normalization(**kwargs)
  if not kwargs:
    layer.adapt(_data(shape=(8, 2))[0])  # statistics of the raw data
  return layer


def _frozen(layer):
  layer.trainable = False
  return layer


REFUSED = {
    'batch_norm': (tf.keras.layers.BatchNormalization, 'moving mean'),
    'adapted_normalization': (_normalization, 'Normalization.adapt'),
    'stateful_rnn': (lambda: tf.keras.layers.SimpleRNN(
        4, stateful=True, return_sequences=True), 'stateful'),
}
ACCEPTED = {
    'frozen_batch_norm': lambda: _frozen(tf.keras.layers.BatchNormalization()),
    'constant_normalization': lambda: _normalization(mean=0.0, variance=1.0),
    'layer_norm': tf.keras.layers.LayerNormalization,
}


def _model_with(layer):  # batch size 8: a stateful RNN needs a static one
  return tf.keras.Sequential([
      tf.keras.Input((8, 2), batch_size=8), layer, tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(3)])


@pytest.mark.parametrize('name', sorted(REFUSED))
def test_layers_that_learn_outside_the_gradient_are_refused(name):
  make, reason = REFUSED[name]
  x, y = _data()
  model = _model_with(make())
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1)), loss=_loss())
  start = [w.copy() for w in model.get_weights()]
  with pytest.raises(ValueError, match=f'cannot train this model.*{reason}'):
    model.fit(x, y, batch_size=8, verbose=0)  # no callback: the optimizer
  assert int(model.optimizer.iterations) == 0
  for before, after in zip(start, model.get_weights()):
    np.testing.assert_array_equal(before, after)  # not even BN's statistics


@pytest.mark.parametrize('name', sorted(ACCEPTED))
def test_stateless_or_frozen_layers_train(name):
  x, y = _data()
  model = _model_with(ACCEPTED[name]())
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.1)), loss=_loss())
  tds.keras.check_model(model)
  model.fit(x, y, batch_size=8, verbose=0)
  assert int(model.optimizer.iterations) == 2


def _parity_model(kind, seed=3):
  """Dense, Conv1D and Conv2D models with pooling, 'same' padding, strides."""
  init = tf.keras.initializers.GlorotUniform(seed=seed)
  layers = tf.keras.layers
  bodies = {
      'dense': ((6,), [layers.Dense(5, 'tanh', kernel_initializer=init)]),
      'conv1d': ((16, 3), [
          layers.Conv1D(4, 3, activation='relu', kernel_initializer=init),
          layers.MaxPool1D(2),
          layers.Conv1D(5, 3, padding='same', dilation_rate=2,
                        activation='tanh', kernel_initializer=init),
          layers.GlobalAveragePooling1D()]),
      'conv2d': ((10, 9, 2), [
          layers.Conv2D(4, 3, activation='relu', kernel_initializer=init),
          layers.MaxPool2D(2),
          layers.Conv2D(3, 2, strides=2, padding='same', activation='tanh',
                        kernel_initializer=init),
          layers.AveragePooling2D(1),
          layers.Flatten()]),
  }
  shape, body = bodies[kind]
  model = tf.keras.Sequential([layers.InputLayer(input_shape=shape), *body,
                               layers.Dense(3, kernel_initializer=init)])
  return model, shape


class _JacobianPathModel(tf.keras.Sequential):
  """Keras's train_step verbatim, but not Keras's: takes the jacobian path."""

  def train_step(self, data):
    x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      loss = self.compute_loss(x, y, y_pred, sample_weight)
    self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
    return self.compute_metrics(x, y, y_pred, sample_weight)


def _jacobian_rows(model, x, y, weights):
  with tf.GradientTape() as tape:
    losses = _loss()(y, model(x, training=True), weights)
  jacobians = tape.jacobian(losses, model.trainable_variables)
  return tf.concat([tf.reshape(j, [len(x), -1]) for j in jacobians], 1)


@pytest.mark.parametrize('kind', ['dense', 'conv1d', 'conv2d'])
def test_fast_per_example_gradients_and_clipped_mean_equal_the_jacobian(kind):
  model, shape = _parity_model(kind)
  x, y = _data(n=8, shape=shape)
  weights = np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float32)
  fast = tf.function(tds.keras.per_example_gradients)(
      model, _loss(), model.trainable_variables, x, y, weights)
  slow = _jacobian_rows(model, x, y, weights)
  np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5)
  assert np.all(fast[2] == 0)  # weight 0: nothing from that example
  clip = 0.5 * float(np.median(np.linalg.norm(slow, axis=1)))  # clip active
  means = [tds.core.gaussian_average(rows, clip, 0.0)[0]
           for rows in (fast, slow)]
  np.testing.assert_allclose(means[0], means[1], rtol=0, atol=1e-5)
  assert all('convolution_op' not in vars(layer) for layer in model.layers)


def _count_fast_paths(monkeypatch):
  """{'rows': [...], 'ghost': [...]}: one entry per trace of each path."""
  calls = {'rows': [], 'ghost': []}
  module = tds.keras.optimizer.per_example
  for key, name in (('rows', 'per_example_gradients'),
                    ('ghost', 'ghost_clipped_sum')):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, _o=original, _k=key, **kw:
                        calls[_k].append(1) or _o(*args, **kw))
  return calls


@pytest.mark.parametrize('kind', ['dense', 'conv1d', 'conv2d'])
@pytest.mark.parametrize('num_microbatches', [None, 2])
@pytest.mark.parametrize('ghost', [True, False])
def test_fit_fast_path_equals_the_jacobian_path(kind, num_microbatches, ghost,
                                                monkeypatch):
  calls = _count_fast_paths(monkeypatch)
  monkeypatch.setattr(tds.keras.DPSparseOptimizer, '_ghost_norms', ghost)
  x, y = _data(n=16, shape=_parity_model(kind)[1])
  trained = []
  for model_class in (tf.keras.Sequential, _JacobianPathModel):
    model = model_class(_parity_model(kind)[0].layers)
    model.compile(optimizer=_dp(tf.keras.optimizers.SGD(0.5), l2_norm_clip=0.1,
                                num_microbatches=num_microbatches),
                  loss=_loss())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    trained.append(_weights(model))
    if model_class is tf.keras.Sequential:
      # Ghost norms for one row per example; microbatches take the rows.
      took = 'ghost' if ghost and num_microbatches is None else 'rows'
      assert calls[took], 'model.fit did not take the fast path'
      assert not calls[{'ghost': 'rows', 'rows': 'ghost'}[took]]
      calls['rows'].clear()
      calls['ghost'].clear()
  assert not any(calls.values())  # an overridden train_step: the jacobian
  start = _weights(_parity_model(kind)[0])
  assert np.abs(trained[0] - start).max() > 1e-3  # it did move
  np.testing.assert_allclose(trained[0], trained[1], rtol=0, atol=1e-5)


CLIP = 0.05


def _fit_one_step(kind, ghost, monkeypatch, **fit_kwargs):
  """A model after one seeded `fit` step, noise off, the clip active; ghost
  norms on or the rows forced on. Returns (trained, start) flat weights."""
  monkeypatch.setattr(tds.keras.DPSparseOptimizer, '_ghost_norms', ghost)
  model = _parity_model(kind)[0]
  start = _weights(model)
  x, y = _data(n=16, shape=_parity_model(kind)[1], seed=5)
  model.compile(optimizer=_dp(tf.keras.optimizers.SGD(1.0), l2_norm_clip=CLIP,
                              expected_batch_size=fit_kwargs.pop(
                                  'expected_batch_size', None)),
                loss=_loss())
  model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
            **fit_kwargs)
  return _weights(model), start


@pytest.mark.parametrize('kind', ['dense', 'conv1d', 'conv2d'])
@pytest.mark.parametrize('weighted', [False, True])
def test_fit_step_by_ghost_norms_equals_the_rows(kind, weighted,
                                                 monkeypatch):
  """Issue 17 parity: one full `fit` step with noise off is the same clipped
  mean by ghost norms as by the vectorized rows (forced on), with sample
  weights (a weight-0 example, as an empty Poisson draw's placeholder) and
  the Poisson denominator too."""
  calls = _count_fast_paths(monkeypatch)
  kwargs = {}
  if weighted:
    kwargs = dict(sample_weight=np.array([0., 1., 2., 1.] * 4, np.float32),
                  expected_batch_size=12.0)
  ghost, start = _fit_one_step(kind, True, monkeypatch, **dict(kwargs))
  assert calls['ghost'] and not calls['rows']
  rows, _ = _fit_one_step(kind, False, monkeypatch, **dict(kwargs))
  assert calls['rows']
  model = _parity_model(kind)[0]
  norms = np.linalg.norm(tds.keras.per_example_gradients(
      model, _loss(), model.trainable_variables,
      *_data(n=16, shape=_parity_model(kind)[1], seed=5)), axis=1)
  assert np.mean(norms > CLIP) > 0.5  # the clip is active
  assert np.abs(rows - start).max() > 1e-3  # SGD at 1: the mean moved them
  np.testing.assert_allclose(ghost, rows, rtol=0, atol=1e-5)
