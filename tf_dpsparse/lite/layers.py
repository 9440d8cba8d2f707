"""Keras layers re-expressed with ops whose gradients are TFLite builtins.

Why not call the Keras model inside the exported module: its gradients need
ops the plain LiteRT runtime lacks (measured with TF 2.14 and
TFLITE_BUILTINS: `ReluGrad`, `Conv2DBackpropFilter`, `MaxPoolGrad`,
`StridedSliceGrad`), so the converter demands Flex. Each supported layer is
rewritten here from its config and weights so that both its forward pass and
its gradient lower to builtins: convolutions as patches (SLICE, CONCAT) times
a matrix (BATCH_MATMUL), strided windows by SLICE + RESHAPE, pooling as
REDUCE_MAX / MEAN over stacked windows, and activations with their gradient
written out by `tf.custom_gradient`.

Per-example parameters: every function takes its parameters either as the
variable's shape (one model for the whole batch) or with a leading batch axis
(one copy per example). Differentiating the summed loss with respect to the
copies yields every example's gradient in one backward pass, which DP-SGD
clips one by one.

Supported, in a `tf.keras.Sequential` of float32 layers without regularizers
or constraints: InputLayer, Dense (on [batch, features]), Conv1D and Conv2D
(channels_last, padding 'valid' or 'same', any strides, no dilation or
groups), MaxPooling1D/2D and AveragePooling1D/2D (padding 'valid'),
GlobalAverage/GlobalMaxPooling1D/2D, Flatten, Reshape, Dropout, Activation
and ReLU (default arguments). Activations: linear, relu, sigmoid, tanh, and
softmax on the last layer only (it becomes the loss's softmax: the exported
model outputs logits). BatchNormalization is refused on purpose: it mixes the
examples of a batch, so per-example gradients, and DP-SGD's sensitivity, are
undefined.
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

import tensorflow as tf

# forward(params, x, training) -> logits; params follow `variables` order.
Forward = Callable[[Sequence[tf.Tensor], tf.Tensor, bool], tf.Tensor]


class UnsupportedModelError(ValueError):
  """The Keras model uses a layer or option the TFLite client cannot train."""


@tf.custom_gradient
def _relu(x):
  return tf.nn.relu(x), lambda dy: dy * tf.cast(x > 0, dy.dtype)


@tf.custom_gradient
def _sigmoid(x):
  y = tf.sigmoid(x)
  return y, lambda dy: dy * y * (1.0 - y)


@tf.custom_gradient
def _tanh(x):
  y = tf.tanh(x)
  return y, lambda dy: dy * (1.0 - y * y)


_ACTIVATIONS = {'linear': tf.identity, 'relu': _relu, 'sigmoid': _sigmoid,
                'tanh': _tanh}


def _activation(layer, is_last: bool):
  name = tf.keras.activations.serialize(layer.activation)
  if name == 'softmax' and is_last:
    return tf.identity  # the loss applies log_softmax to the logits
  if name not in _ACTIVATIONS:
    where = 'last layer' if is_last else 'hidden layer'
    raise UnsupportedModelError(
        f'{layer.name}: activation {name!r} on a {where} is not supported '
        f'(use one of {sorted(_ACTIVATIONS)}; softmax only on the last layer).')
  return _ACTIVATIONS[name]


def _windows(x, axis: int, start: int, count: int, stride: int):
  """x[start : start + stride * count : stride] along `axis`, builtins only.

  A strided slice's gradient (`StridedSliceGrad`) is not a builtin; a slice
  (gradient: PAD) followed by a reshape and a second slice is.
  """
  span = stride * count
  length = x.shape[axis]
  if start + span > length:  # the padded tail is never selected
    paddings = [[0, 0]] * x.shape.rank
    paddings[axis] = [0, start + span - length]
    x = tf.pad(x, paddings)
  begin = [0] * x.shape.rank
  size = [-1] * x.shape.rank
  begin[axis], size[axis] = start, span
  x = tf.slice(x, begin, size)
  if stride == 1:
    return x
  # [.., count * stride, ..] -> [.., count, stride, ..]; keep offset 0.
  shape = [-1] + x.shape.as_list()[1:]
  split = shape[:axis] + [count, stride] + shape[axis + 1:]
  size = [-1] * len(split)
  size[axis + 1] = 1
  x = tf.slice(tf.reshape(x, split), [0] * len(split), size)
  return tf.reshape(x, shape[:axis] + [count] + shape[axis + 1:])


def _same_padding(x, kernel, strides):
  """Zero-pads the spatial axes as Keras 'same' padding does."""
  paddings = [[0, 0]]
  for axis, (k, s) in enumerate(zip(kernel, strides), start=1):
    length = x.shape[axis]
    total = max((math.ceil(length / s) - 1) * s + k - length, 0)
    paddings.append([total // 2, total - total // 2])
  return tf.pad(x, paddings + [[0, 0]])


def _output_length(length, k, s):
  return (length - k) // s + 1


def _patches(x, kernel, strides):
  """[batch, *spatial, channels] -> [batch, *out_spatial, prod(kernel) * channels].

  The last axis is ordered (kernel offsets..., channel), matching a Keras
  kernel reshaped to [prod(kernel) * in_channels, out_channels].
  """
  pieces = [x]
  for axis, (k, s) in enumerate(zip(kernel, strides), start=1):
    count = _output_length(x.shape[axis], k, s)
    pieces = [_windows(p, axis, i, count, s) for p in pieces for i in range(k)]
  return tf.concat(pieces, axis=-1)


def _bias(bias, rank: int, per_example: bool):
  if not per_example:
    return bias
  return tf.reshape(bias, [-1] + [1] * (rank - 2) + [bias.shape[-1]])


def _matmul_last(x, kernel):
  """x [batch, ..., n] times kernel [n, m] (or [batch, n, m]) -> [batch, ..., m]."""
  inner = x.shape.as_list()[1:-1]
  flat = tf.reshape(x, [-1, math.prod(inner), x.shape[-1]])
  out = tf.matmul(flat, kernel)  # per-example: [b, p, n] @ [b, n, m]
  return tf.reshape(out, [-1] + inner + [kernel.shape[-1]])


def _check_attrs(layer, **expected):
  for attr, allowed in expected.items():
    value = getattr(layer, attr)
    if value not in allowed:
      raise UnsupportedModelError(
          f'{layer.name}: {attr}={value!r} is not supported (expected one of '
          f'{list(allowed)}).')


def _dense(layer, is_last):
  if len(layer.input_shape) != 2:
    raise UnsupportedModelError(
        f'{layer.name}: Dense on inputs of shape {layer.input_shape} is not '
        'supported; add a Flatten before it.')
  act = _activation(layer, is_last)

  def forward(params, x, per_example, training):
    del training
    out = _matmul_last(tf.expand_dims(x, 1), params[0])
    out = tf.reshape(out, [-1, layer.units])
    if layer.use_bias:
      out += _bias(params[1], 2, per_example)
    return act(out)

  return forward


def _conv(layer, is_last):
  _check_attrs(layer, padding=('valid', 'same'),
               data_format=('channels_last',), groups=(1,))
  if any(d != 1 for d in layer.dilation_rate):
    raise UnsupportedModelError(f'{layer.name}: dilated convolutions are not '
                                'supported.')
  act = _activation(layer, is_last)
  kernel_size, strides = tuple(layer.kernel_size), tuple(layer.strides)

  def forward(params, x, per_example, training):
    del training
    if layer.padding == 'same':
      x = _same_padding(x, kernel_size, strides)
    patches = _patches(x, kernel_size, strides)
    kernel = params[0]  # [(batch,) *kernel_size, in, out]
    lead = kernel.shape.as_list()[:kernel.shape.rank - len(kernel_size) - 2]
    out = _matmul_last(patches, tf.reshape(kernel, lead + [-1, layer.filters]))
    if layer.use_bias:
      out += _bias(params[1], out.shape.rank, per_example)
    return act(out)

  return forward


def _pool(layer, reduce_fn):
  _check_attrs(layer, padding=('valid',), data_format=('channels_last',))
  pool_size, strides = tuple(layer.pool_size), tuple(layer.strides)

  def forward(params, x, per_example, training):
    del params, per_example, training
    for axis, (k, s) in enumerate(zip(pool_size, strides), start=1):
      count = _output_length(x.shape[axis], k, s)  # separable: axis by axis
      x = reduce_fn(tf.stack([_windows(x, axis, i, count, s)
                              for i in range(k)]), axis=0)
    return x

  return forward


def _global_pool(layer, reduce_fn):
  _check_attrs(layer, data_format=('channels_last',), keepdims=(False,))

  def forward(params, x, per_example, training):
    del params, per_example, training
    return reduce_fn(x, axis=list(range(1, x.shape.rank - 1)))

  return forward


def _flatten(layer):
  _check_attrs(layer, data_format=('channels_last',))
  return _reshape([math.prod(layer.output_shape[1:])])


def _reshape(target):
  def forward(params, x, per_example, training):
    del params, per_example, training
    return tf.reshape(x, [-1] + list(target))

  return forward


def _dropout(layer):
  if layer.noise_shape is not None:
    raise UnsupportedModelError(f'{layer.name}: Dropout noise_shape is not '
                                'supported.')
  rate = float(layer.rate)

  def forward(params, x, per_example, training):
    del params, per_example
    if not training or rate == 0.0:
      return x
    keep = tf.cast(tf.random.uniform(tf.shape(x)) >= rate, x.dtype)
    return x * keep / (1.0 - rate)

  return forward


def _apply_activation(act):
  def forward(params, x, per_example, training):
    del params, per_example, training
    return act(x)

  return forward


def _relu_layer(layer, is_last):
  if (layer.max_value is not None or float(layer.negative_slope) != 0.0 or
      float(layer.threshold) != 0.0):
    raise UnsupportedModelError(f'{layer.name}: ReLU with max_value, '
                                'negative_slope or threshold is not supported.')
  del is_last
  return _apply_activation(_relu)


_K = tf.keras.layers
_LOWERINGS = {
    _K.Dense: _dense,
    _K.Conv1D: _conv,
    _K.Conv2D: _conv,
    _K.MaxPooling1D: lambda l, _: _pool(l, tf.reduce_max),
    _K.MaxPooling2D: lambda l, _: _pool(l, tf.reduce_max),
    _K.AveragePooling1D: lambda l, _: _pool(l, tf.reduce_mean),
    _K.AveragePooling2D: lambda l, _: _pool(l, tf.reduce_mean),
    _K.GlobalAveragePooling1D: lambda l, _: _global_pool(l, tf.reduce_mean),
    _K.GlobalAveragePooling2D: lambda l, _: _global_pool(l, tf.reduce_mean),
    _K.GlobalMaxPooling1D: lambda l, _: _global_pool(l, tf.reduce_max),
    _K.GlobalMaxPooling2D: lambda l, _: _global_pool(l, tf.reduce_max),
    _K.Flatten: lambda l, _: _flatten(l),
    _K.Reshape: lambda l, _: _reshape(l.target_shape),
    _K.Dropout: lambda l, _: _dropout(l),
    _K.Activation: lambda l, last: _apply_activation(_activation(l, last)),
    _K.ReLU: _relu_layer,
}
SUPPORTED_LAYERS = tuple(sorted(cls.__name__ for cls in _LOWERINGS))

_REFUSED = {
    'BatchNormalization': 'it mixes the examples of a batch, so per-example '
                          'gradients (and DP-SGD sensitivity) are undefined',
}


def _check_layer(layer) -> None:
  name = type(layer).__name__
  if name in _REFUSED:
    raise UnsupportedModelError(f'{layer.name}: {name} is not supported: '
                                f'{_REFUSED[name]}.')
  if type(layer) not in _LOWERINGS:
    raise UnsupportedModelError(
        f'{layer.name}: layer type {name} is not supported by the TFLite '
        f'client; supported: {", ".join(SUPPORTED_LAYERS)}.')
  if layer.dtype != 'float32' or layer.compute_dtype != 'float32':
    raise UnsupportedModelError(f'{layer.name}: dtype {layer.compute_dtype} '
                                '(only float32 is supported).')
  if not layer.trainable or layer.non_trainable_weights:
    raise UnsupportedModelError(f'{layer.name}: frozen or non-trainable '
                                'weights are not supported.')
  for attr in ('kernel_regularizer', 'bias_regularizer', 'activity_regularizer',
               'kernel_constraint', 'bias_constraint'):
    if getattr(layer, attr, None) is not None:
      raise UnsupportedModelError(f'{layer.name}: {attr} is not supported '
                                  '(the exported loss is plain cross-entropy).')


def lower(model: tf.keras.Model):
  """Validates `model` and returns `(forward, variables)`.

  `variables` is `model.trainable_variables` (the order of `tds.core.flatten`
  everywhere); `forward(params, x, training)` computes the logits from
  tensors in that order, each either shaped as its variable or with a
  leading per-example axis. Raises `UnsupportedModelError` naming the first
  layer or option that cannot be trained with TFLite builtins.
  """
  if not isinstance(model, tf.keras.Sequential):
    raise UnsupportedModelError(
        f'only tf.keras.Sequential models are supported, got '
        f'{type(model).__name__}.')
  if not model.built or any(d is None for d in model.input_shape[1:]):
    raise UnsupportedModelError(
        'the model must be built with a fully defined input shape '
        '(e.g. pass input_shape= to its first layer).')
  layers = [l for l in model.layers if not isinstance(l, _K.InputLayer)]
  steps: List = []
  variables: List[tf.Variable] = []
  for i, layer in enumerate(layers):
    _check_layer(layer)
    weights = list(layer.trainable_weights)
    steps.append((_LOWERINGS[type(layer)](layer, i == len(layers) - 1),
                  slice(len(variables), len(variables) + len(weights))))
    variables.extend(weights)
  if [id(v) for v in variables] != [id(v) for v in model.trainable_variables]:
    raise UnsupportedModelError('the model has shared or nested weights.')

  def forward(params, x, training):
    per_example = params[0].shape.rank == variables[0].shape.rank + 1
    for step, where in steps:
      x = step(params[where], x, per_example, training)
    return x

  return forward, variables
