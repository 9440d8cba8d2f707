"""A Keras model's per-example gradients through `tds.core.per_example_gradients`.

Used by `DPSparseOptimizer` under `model.fit` and by the TFF client work
(whose `tff.learning` model wraps a Keras model), so every front clips the
same rows. Keras convolutions are routed through `tds.core.convolution`
while the per-example pass is traced, so their kernel gradients stay
vectorized; the weights, the outputs and the gradients are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import tensorflow as tf

from tf_dpsparse import core


def per_example_gradients(model: tf.keras.Model, loss_fn: Callable,
                          variables, x, y,
                          sample_weight: Optional[tf.Tensor] = None
                          ) -> tf.Tensor:
  """Rows [n, size]: the gradient of `loss_fn(y_i, model(x_i))` per example.

  `loss_fn(y, y_pred)` returns per-example losses (e.g. a Keras loss with
  reduction NONE); each is multiplied by its `sample_weight` when given (a
  weight-0 placeholder example then has a zero row). The forward pass runs
  with `training=True`, one example at a time, so no example's row reads
  another example (see `tds.core.per_example_gradients`).
  """
  examples = (x, y) if sample_weight is None else (x, y, sample_weight)

  def loss(batch):
    losses = loss_fn(batch[1], model(batch[0], training=True))
    losses = tf.reshape(losses, [1, -1])
    if sample_weight is not None:
      losses *= tf.cast(batch[2], losses.dtype)[:, tf.newaxis]
    return losses

  with vectorizable_convolutions(model):
    return core.per_example_gradients(loss, variables, examples)


@contextlib.contextmanager
def vectorizable_convolutions(model: tf.keras.Model):
  """Routes the model's plain convolutions through `tds.core.convolution`.

  Applies to Conv1D/2D/3D layers with channels last, one group and 'valid'
  or 'same' padding ('causal' is 'valid' after Keras's own padding); others
  keep Keras's op, which `tf.vectorized_map` still computes exactly, in a
  loop. Restored on exit, so nothing outside the trace sees the change.
  """
  layers = [layer for layer in _all_layers(model) if _routable(layer)]
  for layer in layers:
    layer.convolution_op = _routed(layer)
  try:
    yield
  finally:
    for layer in layers:
      del layer.convolution_op


_CONVOLUTIONS = (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D,
                 tf.keras.layers.Conv3D)


def _all_layers(model):
  return [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]


def _routable(layer) -> bool:
  return (type(layer) in _CONVOLUTIONS and layer.groups == 1 and
          layer.data_format == 'channels_last' and
          layer.padding in ('valid', 'same', 'causal'))


def _routed(layer):
  padding = 'SAME' if layer.padding == 'same' else 'VALID'

  def convolution_op(inputs, kernel):
    if not inputs.shape[1:].is_fully_defined():
      return tf.nn.convolution(inputs, kernel, strides=list(layer.strides),
                               padding=padding,
                               dilations=list(layer.dilation_rate))
    return core.convolution(inputs, kernel, strides=layer.strides,
                            padding=padding, dilations=layer.dilation_rate)

  return convolution_op
