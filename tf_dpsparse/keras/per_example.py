"""A Keras model's per-example gradients through `tds.core.per_example_gradients`.

Used by `DPSparseOptimizer` under `model.fit` and by the TFF client work
(whose `tff.learning` model wraps a Keras model), so every front clips the
same rows. Keras convolutions are routed through `tds.core.convolution`
while the per-example pass is traced, so their kernel gradients stay
vectorized; the weights, the outputs and the gradients are unchanged.

`ghost_clipped_sum` is the same clipped sum without the [n, d] rows (ghost
norms), for Sequential models of Dense/Conv1D/Conv2D and weightless
per-example layers (`supports_ghost` says which); measured 1.3-1.45x faster
than the rows on the shipped CNNs at batch 64, 1.6x at 256
(`benchmarks/ghost_bench.py`). Both fronts take it wherever it applies
(`DPSparseOptimizer`'s `model.fit` path, the TFF client work) and the rows
elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import math
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


# Ghost clipping: per-example gradient norms without per-example gradients.

_GHOST_LAYERS = (tf.keras.layers.Dense, tf.keras.layers.Conv1D,
                 tf.keras.layers.Conv2D)
# Weightless layers that compute each example's output from its input only.
_PER_EXAMPLE_LAYERS = (
    tf.keras.layers.InputLayer, tf.keras.layers.Flatten,
    tf.keras.layers.Reshape, tf.keras.layers.Activation,
    tf.keras.layers.ReLU, tf.keras.layers.Dropout,
    tf.keras.layers.MaxPooling1D, tf.keras.layers.MaxPooling2D,
    tf.keras.layers.AveragePooling1D, tf.keras.layers.AveragePooling2D,
    tf.keras.layers.GlobalAveragePooling1D,
    tf.keras.layers.GlobalAveragePooling2D,
    tf.keras.layers.GlobalMaxPooling1D, tf.keras.layers.GlobalMaxPooling2D)


def ghost_clipped_sum(keras_model: tf.keras.Sequential, per_example_loss_fn,
                      x, y, l2_norm_clip,
                      sample_weight: Optional[tf.Tensor] = None):
  """`(clipped_sum float32[d], norms float32[n])` without per-example rows.

  The same numbers as `core.clipped_sum(per_example_gradients(model,
  loss_fn, model.trainable_variables, x, y, sample_weight), clip)` (within
  float rounding, 1e-5 relative in the tests): the flat sum, in
  `trainable_variables` order, of each example's gradient clipped to L2 <=
  `l2_norm_clip`, and the norms before clipping. Why: the rows are an
  [n, d] matrix written and read once per step; ghost norms (Lee & Kifer
  2021) get each norm from a layer's inputs and pre-activation gradients
  (Dense: ||a_i|| ||g_i||; convolutions: the Gram trick or the unfold form,
  whichever costs less), and the clipped sum is each layer's gradient with
  example i's g scaled by w_i = min(1, C / norm_i): one forward, one
  backward. Measured 1.3-1.4x (HAPT 1-D CNN) and 1.4-1.45x (MNIST 2-D
  CNN) faster than the rows at batch 64, 1.6x at batch 256
  (`benchmarks/ghost_bench.py`, paired medians over 41 rounds).

  Privacy: w_i comes from example i's exact gradient norm, so example i's
  contribution is bounded by the clip exactly as on the materialized path,
  provided no layer mixes the batch. Hence only Sequential models (not
  subclassed `call`) of Dense (on [n, d]), Conv1D/Conv2D (channels last,
  one group, 'valid'/'same') and the weightless per-example layers above
  are accepted; anything else raises ValueError (`supports_ghost` says so
  beforehand; use the rows). Call it inside `tf.function`;
  `per_example_loss_fn(y, logits)` returns [n] (or [n, ...], summed per
  example as the rows path does).
  """
  records, dzs, _ = _ghost_backward(keras_model, per_example_loss_fn, x, y,
                                    sample_weight)
  norms, unfolded = _ghost_norms(records, dzs)
  weights = tf.minimum(1.0, l2_norm_clip / tf.maximum(norms, 1e-12))
  grads = {}  # the same scale as `core.clip_rows_by_l2_norm`'s
  for (layer, a, _), dz, per in zip(records, dzs, unfolded):
    for v, g in zip(layer.trainable_variables,
                    _weighted_layer_grads(layer, a, dz, per, weights)):
      grads[id(v)] = g
  return core.flatten([grads[id(v)] for v in
                       keras_model.trainable_variables]), norms


def supports_ghost(keras_model: tf.keras.Model, variables=None) -> bool:
  """Whether `ghost_clipped_sum` covers `keras_model` (and `variables`).

  The fronts ask this once, when they build their step, and take the rows
  (`per_example_gradients`) where it is False: a model whose layers could
  mix the batch or that ghost norms do not cover, a model whose input shape
  is not known yet, or `variables` other than the model's
  `trainable_variables` in their order (the order of the flat sum). The
  same checks as `ghost_clipped_sum` makes, walked over the layers' static
  output shapes, so the two cannot disagree.
  """
  try:
    _check_ghost_model(keras_model)
    shape = tf.TensorShape(keras_model.input_shape)
    for layer in keras_model.layers:
      _check_ghost_layer(layer, shape.rank)
      shape = tf.TensorShape(layer.compute_output_shape(shape))
  except (ValueError, AttributeError, NotImplementedError, TypeError):
    return False
  return variables is None or [id(v) for v in variables] == [
      id(v) for v in keras_model.trainable_variables]


def _check_ghost_model(model) -> None:
  """Raises ValueError unless `model` is a plain Sequential of layers that
  compute each example's output from that example alone, its trainable
  variables all in trainable Dense/Conv1D/Conv2D layers."""
  if (not isinstance(model, tf.keras.Sequential) or
      type(model).call is not tf.keras.Sequential.call):
    raise ValueError('ghost clipping needs a tf.keras.Sequential model.')
  for layer in model.layers:
    if type(layer) not in _GHOST_LAYERS + _PER_EXAMPLE_LAYERS:
      raise ValueError(f'ghost clipping: unsupported layer {layer.name} '
                       f'({type(layer).__name__}); use the rows.')
  covered = {id(v) for layer in model.layers
             if type(layer) in _GHOST_LAYERS and layer.trainable
             for v in layer.trainable_variables}
  if covered != {id(v) for v in model.trainable_variables}:
    raise ValueError('ghost clipping: a trainable variable is outside the '
                     "model's Dense/Conv1D/Conv2D layers.")


def _check_ghost_layer(layer, input_rank) -> None:
  """Raises ValueError unless ghost norms cover the (supported, see
  `_check_ghost_model`) `layer` on inputs of rank `input_rank`: a trainable
  Dense on [n, d] only, a trainable Conv1D/2D channels last, one group,
  'valid'/'same'. Frozen and weightless layers are run as they are."""
  if type(layer) not in _GHOST_LAYERS or not layer.trainable:
    return
  if isinstance(layer, tf.keras.layers.Dense):
    if input_rank != 2:
      raise ValueError(f'ghost clipping: Dense {layer.name} on rank-'
                       f'{input_rank} inputs (only [n, d] is supported).')
  elif (layer.groups != 1 or layer.data_format != 'channels_last' or
        layer.padding not in ('valid', 'same')):
    raise ValueError(f'ghost clipping: {layer.name} needs channels_last, '
                     "groups=1 and 'valid' or 'same' padding.")


def _ghost_backward(model, loss_fn, x, y, sample_weight=None,
                    persistent=False):
  """One forward, and one backward to the pre-activations only.

  Returns the (layer, input, pre-activation) records of the Dense/Conv
  layers, the gradients of the summed losses with respect to each
  pre-activation (row i is example i's, as no layer mixes the batch), and
  (tape, losses); `persistent` keeps the tape for a second, weighted
  backward (the textbook variant `benchmarks/ghost_bench.py` times).
  Example i's loss is the sum of `loss_fn`'s entries for it, times its
  weight: what `per_example_gradients` differentiates per example.
  """
  _check_ghost_model(model)
  # As a Sequential's call does: inputs cast to its Input's dtype (uint8
  # images, say), which the Dense/Conv kernels below expect.
  x = tf.convert_to_tensor(x)
  if getattr(model, 'inputs', None):
    x = tf.cast(x, model.inputs[0].dtype)
  with tf.GradientTape(persistent=persistent) as tape:
    records, a = [], x
    for layer in model.layers:
      _check_ghost_layer(layer, a.shape.rank)
      if type(layer) in _GHOST_LAYERS and layer.trainable:
        z = _pre_activation(layer, a)
        records.append((layer, a, z))
        a = layer.activation(z)
      else:
        a = layer(a, training=True)  # frozen or weightless, per example
    losses = loss_fn(y, a)
    if losses.shape.rank == 0:
      raise ValueError('ghost clipping needs per-example losses, got a '
                       'scalar (use a loss with reduction NONE).')
    losses = tf.reduce_sum(losses, axis=list(range(1, losses.shape.rank)))
    if sample_weight is not None:
      losses *= tf.reshape(tf.cast(sample_weight, losses.dtype), [-1])
    total = tf.reduce_sum(losses)
  return records, tape.gradient(total, [z for _, _, z in records]), (
      tape, losses)


def _pre_activation(layer, a):
  """The layer's output before its activation, computed as Keras does."""
  if isinstance(layer, tf.keras.layers.Dense):
    z = tf.matmul(a, layer.kernel)
  else:
    z = layer.convolution_op(a, layer.kernel)
  return z + layer.bias if layer.use_bias else z


def _ghost_norms(records, dzs):
  """Per-example gradient norms [n] over all layers, and per conv layer its
  per-example kernel gradients when the unfold form was chosen (else
  None), which the weighted pass then reuses.

  Dense on [n, d]: the kernel gradient a_i g_i^T has norm ||a_i|| ||g_i||,
  the bias adds ||g_i||^2.
  """
  squares, unfolded = [], []
  for (layer, a, _), dz in zip(records, dzs):
    if isinstance(layer, tf.keras.layers.Dense):
      g2 = tf.reduce_sum(tf.square(dz), axis=1)
      sq = tf.reduce_sum(tf.square(a), axis=1) * g2
      squares.append(sq + g2 if layer.use_bias else sq)
      unfolded.append(None)
      continue
    sq, per = _conv_squared_norms(layer, a, dz)
    squares.append(sq)
    unfolded.append(per)
  return tf.sqrt(tf.add_n(squares)), unfolded


def _conv_squared_norms(layer, a, dz):
  """Squared per-example gradient norms of a Conv1D/Conv2D layer.

  With the unfolded inputs P_i [T, D] (T output positions, D = taps x
  input channels) and G_i [T, p], the kernel gradient is P_i^T G_i. Its
  squared norm is <P_i P_i^T, G_i G_i^T> (the Gram trick, ~T^2 (D + p)
  multiply-adds) or ||P_i^T G_i||^2 with P_i^T G_i built (the unfold form,
  ~T D p, an [n, D, p] tensor kept for the weighted pass); the cheaper
  count is taken per layer (on the shipped CNNs it picks the unfold form
  everywhere, which measured as fast or faster than the Gram trick).
  The bias adds ||sum_t G_i,t||^2.
  """
  patches = _patches(layer, a, dz.shape[1:-1])  # [n, T, D]
  positions, taps = patches.shape[1], patches.shape[2]
  g = tf.reshape(dz, [tf.shape(dz)[0], positions, dz.shape[-1]])
  per = None
  if _gram_is_cheaper(positions, taps, g.shape[-1]):
    gram_a = tf.einsum('ntd,nsd->nts', patches, patches)
    gram_g = tf.einsum('ntp,nsp->nts', g, g)
    sq = tf.reduce_sum(gram_a * gram_g, axis=[1, 2])
  else:
    per = tf.einsum('ntd,ntp->ndp', patches, g)
    sq = tf.reduce_sum(tf.square(per), axis=[1, 2])
  if layer.use_bias:
    sq += tf.reduce_sum(tf.square(tf.reduce_sum(g, axis=1)), axis=1)
  return sq, per


def _gram_is_cheaper(positions, taps, filters) -> bool:
  """T^2 (D + p) < T D p: multiply-adds per example of the two forms."""
  return positions * (taps + filters) < taps * filters


def _patches(layer, a, out_size):
  """Unfolded inputs [n, T, D], D ordered as the kernel's (taps, channels).

  Strided slices of the (padded) input, one per kernel tap, stacked: 3-4x
  faster on this CPU than `tf.image.extract_patches` (measured: 2.7 vs
  12 ms for MNIST's first layer at batch 64), which made ghost norms lose.
  """
  spatial = a.shape.rank - 2
  kernel, strides = layer.kernel_size, layer.strides
  dilations = layer.dilation_rate
  if layer.padding == 'same':
    pads = [[0, 0]]
    for size, o, k, s, d in zip(a.shape[1:1 + spatial], out_size, kernel,
                                strides, dilations):
      total = max((o - 1) * s + (k - 1) * d + 1 - size, 0)
      pads.append([total // 2, total - total // 2])
    a = tf.pad(a, pads + [[0, 0]])
  windows = []
  for offset in itertools.product(*[range(k) for k in kernel]):
    index = [slice(None)]
    for i, o, s, d in zip(offset, out_size, strides, dilations):
      index.append(slice(i * d, i * d + (o - 1) * s + 1, s))
    windows.append(a[tuple(index + [slice(None)])])
  patches = tf.stack(windows, axis=-2)  # [n, *out, taps, channels]
  return tf.reshape(patches, [-1, math.prod(out_size),
                              math.prod(kernel) * a.shape[-1]])


def _weighted_layer_grads(layer, a, dz, per, weights):
  """The layer's gradients of sum_i w_i loss_i, from its inputs and g.

  Linear in g, so scaling row i of g by w_i gives exactly the gradient of
  the weighted loss: the second backward pass, without re-running the
  network. Uses the per-example kernel gradients `per` when present.
  """
  wdz = dz * tf.reshape(weights, [-1] + [1] * (dz.shape.rank - 1))
  if isinstance(layer, tf.keras.layers.Dense):
    kernel = tf.matmul(a, wdz, transpose_a=True)
  elif per is not None:
    kernel = tf.reshape(tf.einsum('n,ndp->dp', weights, per),
                        layer.kernel.shape)
  else:
    kernel = _conv_kernel_gradient(layer, a, wdz)
  if not layer.use_bias:
    return [kernel]
  return [kernel, tf.reduce_sum(wdz, axis=list(range(dz.shape.rank - 1)))]


def _conv_kernel_gradient(layer, a, dz):
  """A convolution's kernel gradient for output gradient dz (TF's op)."""
  strides, rates = list(layer.strides), list(layer.dilation_rate)
  shape = layer.kernel.shape
  if isinstance(layer, tf.keras.layers.Conv1D):
    a, dz = a[:, tf.newaxis], dz[:, tf.newaxis]
    strides, rates, shape = [1, *strides], [1, *rates], [1, *shape]
  kernel = tf.compat.v1.nn.conv2d_backprop_filter(
      a, shape, dz, strides=[1, *strides, 1], padding=layer.padding.upper(),
      dilations=[1, *rates, 1])
  return tf.reshape(kernel, layer.kernel.shape)
