"""Ghost clipping equals the materialized per-example path (issue 17).

Ghost norms never build the [n, d] rows, so their privacy rests on one
claim: each example's clip weight comes from its exact gradient norm. These
tests check `tds.keras.per_example.ghost_clipped_sum`'s norms and clipped
sum against the vectorized rows of `per_example_gradients` +
`clip_rows_by_l2_norm` on tiny seeded Dense, Conv1D and Conv2D models
covering both conv norm forms (Gram and unfold), 'same' padding, strides,
dilation, a bias-free layer and sample weights; and that layers which could
mix the batch are refused.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_dpsparse import core
from tf_dpsparse.keras import per_example

layers = tf.keras.layers
_init = tf.keras.initializers.GlorotUniform


def _dense():
  return [layers.InputLayer(input_shape=(5,)),
          layers.Dense(4, activation='relu', kernel_initializer=_init(0)),
          layers.Dense(3, use_bias=False, kernel_initializer=_init(1))]


def _conv1d():
  return [layers.InputLayer(input_shape=(10, 3)),
          # T=10, D=9, p=4: the unfold form (T D p < T^2 (D + p)).
          layers.Conv1D(4, 3, padding='same', dilation_rate=2,
                        activation='tanh', kernel_initializer=_init(0)),
          layers.MaxPool1D(2),
          # T=2, D=8, p=6: the Gram form.
          layers.Conv1D(6, 2, strides=2, kernel_initializer=_init(1)),
          layers.GlobalAveragePooling1D(),
          layers.Dense(3, kernel_initializer=_init(2))]


def _conv2d():
  return [layers.InputLayer(input_shape=(7, 7, 2)),
          # T=16, D=18, p=4: the unfold form.
          layers.Conv2D(4, 3, strides=2, padding='same', activation='relu',
                        kernel_initializer=_init(0)),
          # T=4, D=36, p=16: the Gram form.
          layers.Conv2D(16, 3, use_bias=False, kernel_initializer=_init(1)),
          layers.Flatten(),
          layers.Dense(3, kernel_initializer=_init(2))]


def _loss():
  return tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _data(input_shape, n=12):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, *input_shape)).astype(np.float32)
  return tf.constant(x), tf.constant(rng.integers(0, 3, n), dtype=tf.int32)


def _relative(got, want):
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize('body', [_dense, _conv1d, _conv2d])
@pytest.mark.parametrize('weighted', [False, True])
def test_ghost_norms_and_clipped_sum_equal_the_vectorized_rows(body,
                                                               weighted):
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential(body())
  x, y = _data(model.input_shape[1:])
  # Weight-0 placeholders and a weight 2 (as the TFF client work pads).
  weight = tf.constant([0., 1., 2.] * 4) if weighted else None
  rows = per_example.per_example_gradients(
      model, _loss(), model.trainable_variables, x, y, weight).numpy()
  norms = np.linalg.norm(rows, axis=1)
  clip = float(np.median(norms))  # half the examples clipped
  want = core.clip_rows_by_l2_norm(rows, clip)[0].numpy().sum(axis=0)
  got_sum, got_norms = tf.function(lambda: per_example.ghost_clipped_sum(
      model, _loss(), x, y, clip, sample_weight=weight))()
  assert _relative(got_norms.numpy(), norms) < 1e-5
  assert _relative(got_sum.numpy(), want) < 1e-5


def test_both_conv_norm_forms_are_exercised(monkeypatch):
  chosen = []
  pick = per_example._gram_is_cheaper  # pylint: disable=protected-access
  monkeypatch.setattr(per_example, '_gram_is_cheaper',
                      lambda *counts: chosen.append(pick(*counts)) or
                      chosen[-1])
  for body in (_conv1d, _conv2d):
    model = tf.keras.Sequential(body())
    per_example.ghost_clipped_sum(model, _loss(), *_data(
        model.input_shape[1:]), 1.0)
  assert chosen == [False, True, False, True]


def test_a_layer_that_may_mix_the_batch_is_refused():
  x, y = _data((5,))
  for body in ([layers.BatchNormalization(), layers.Dense(3)],
               [layers.Lambda(lambda t: t - tf.reduce_mean(t, axis=0)),
                layers.Dense(3)]):
    model = tf.keras.Sequential([layers.InputLayer(input_shape=(5,)), *body])
    with pytest.raises(ValueError, match='unsupported layer'):
      per_example.ghost_clipped_sum(model, _loss(), x, y, 1.0)


def test_a_model_that_is_not_a_plain_sequential_is_refused():
  inputs = tf.keras.Input((5,))
  model = tf.keras.Model(inputs, layers.Dense(3)(inputs))
  with pytest.raises(ValueError, match='Sequential'):
    per_example.ghost_clipped_sum(model, _loss(), *_data((5,)), 1.0)


@pytest.mark.parametrize('body', [_conv1d, _conv2d])
def test_one_trace_serves_every_batch_size(body):
  # Poisson-sampled batches have a dynamic size (`core.poisson_gaussian_
  # average` traces its rows once); the ghost sum must trace the same way.
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential(body())
  shape = model.input_shape[1:]
  ghost = tf.function(
      lambda x, y: per_example.ghost_clipped_sum(model, _loss(), x, y, 0.5)[0],
      input_signature=[tf.TensorSpec([None, *shape]),
                       tf.TensorSpec([None], tf.int32)])
  for n in (1, 7):
    x, y = _data(shape, n)
    rows = per_example.per_example_gradients(
        model, _loss(), model.trainable_variables, x, y)
    want = core.clipped_sum(rows, 0.5)[0].numpy()
    assert _relative(ghost(x, y).numpy(), want) < 1e-5


def test_supports_ghost_says_what_ghost_clipped_sum_accepts():
  """The fronts decide once by `supports_ghost`; it must agree with what
  `ghost_clipped_sum` accepts, and refuse what it cannot know."""
  from tf_dpsparse import models  # pylint: disable=import-outside-toplevel
  for body in (_dense, _conv1d, _conv2d):
    model = tf.keras.Sequential(body())
    assert per_example.supports_ghost(model, model.trainable_variables)
    assert not per_example.supports_ghost(  # another order: another sum
        model, model.trainable_variables[::-1])
  for shape in ((128, 6), (28, 28, 1), (64,)):  # the shipped models
    assert per_example.supports_ghost(models.build_model(shape, 6))
  inputs = tf.keras.Input((5,))
  refused = {
      'batch norm': tf.keras.Sequential([layers.InputLayer(input_shape=(5,)),
                                         layers.BatchNormalization(),
                                         layers.Dense(3)]),
      'functional': tf.keras.Model(inputs, layers.Dense(3)(inputs)),
      'not built': tf.keras.Sequential([layers.Dense(3)]),
      # Dense on [n, T, c]: its kernel gradient sums over T per example.
      'dense on rank 3': tf.keras.Sequential([
          layers.InputLayer(input_shape=(4, 5)), layers.Dense(3),
          layers.Flatten(), layers.Dense(2)]),
      'causal': tf.keras.Sequential([
          layers.InputLayer(input_shape=(6, 2)),
          layers.Conv1D(3, 2, padding='causal'), layers.Flatten(),
          layers.Dense(2)]),
  }
  for name, model in refused.items():
    assert not per_example.supports_ghost(model), name
  with pytest.raises(ValueError, match='rank-3'):
    model = refused['dense on rank 3']
    per_example.ghost_clipped_sum(model, _loss(), *_data((4, 5)), 1.0)


def test_losses_with_several_entries_per_example_sum_as_the_rows_do():
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential(_conv1d())
  x, y = _data(model.input_shape[1:])
  loss = lambda y, logits: tf.stack(  # noqa: E731
      [_loss()(y, logits), 0.5 * _loss()(y, 2 * logits)], axis=1)
  rows = per_example.per_example_gradients(
      model, loss, model.trainable_variables, x, y)
  want = core.clipped_sum(rows, 0.3)[0].numpy()
  got, _ = per_example.ghost_clipped_sum(model, loss, x, y, 0.3)
  assert _relative(got.numpy(), want) < 1e-5


def test_integer_inputs_are_cast_as_the_model_casts_them():
  # uint8 images reach `fit` as they are; the model casts them to its
  # Input's dtype, and so must the ghost pass.
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential(_conv2d())
  rng = np.random.default_rng(1)
  x = tf.constant(rng.integers(0, 4, (6, 7, 7, 2)), dtype=tf.uint8)
  y = tf.constant(rng.integers(0, 3, 6), dtype=tf.int32)
  rows = per_example.per_example_gradients(
      model, _loss(), model.trainable_variables, x, y)
  want = core.clipped_sum(rows, 0.5)[0].numpy()
  got, _ = per_example.ghost_clipped_sum(model, _loss(), x, y, 0.5)
  assert _relative(got.numpy(), want) < 1e-5
