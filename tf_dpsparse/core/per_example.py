"""Per-example gradients at close to the cost of one batched backward pass.

DP-SGD clips each example's gradient, so it needs them one by one. The
jacobian of a batch's loss vector (`tape.jacobian`, TF Privacy's path) runs a
backward pass of the *whole batch* per example: O(batch^2). Here the model's
forward and backward run on one example at a time under `tf.vectorized_map`,
which turns them into batched ops: O(batch), exactly the same numbers.

Privacy assumption: row i depends on example i only. That holds when the
loss of a batch of one does not read other examples, which is what running
each example alone guarantees (and why layers that mix a batch, such as
BatchNormalization, are refused by the fronts before this is reached).
Clipping row i then bounds example i's contribution exactly.

Pure TensorFlow; the Keras and TFF fronts adapt their models to `loss_fn`.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import tensorflow as tf

from tf_dpsparse.core.transforms import flatten


def per_example_gradients(loss_fn: Callable, variables: Sequence[tf.Variable],
                          examples) -> tf.Tensor:
  """Flat gradient of each example's loss: float32 [n, size].

  `loss_fn(batch)` returns the per-example losses [1] of a batch of one
  (every tensor of the `tf.nest` structure `examples` with axis 0 of size
  1); `examples` holds n examples on axis 0 (n may be dynamic). Row i is
  the gradient of example i's loss with respect to `variables`, flattened
  in their order (`tds.core.flatten`), zeros for an unconnected variable.
  Ops without a vectorized form run in a loop inside the graph: slower,
  never different.
  """
  variables = list(variables)

  def one(example):
    batch = tf.nest.map_structure(lambda t: t[tf.newaxis], example)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(loss_fn(batch))
    return flatten(tape.gradient(
        loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO))

  return tf.vectorized_map(one, examples)


def convolution(inputs, kernel, *, strides: Sequence[int], padding: str,
                dilations: Sequence[int]) -> tf.Tensor:
  """`tf.nn.convolution` (channels last, 'VALID' or 'SAME') with a kernel
  gradient that `tf.vectorized_map` keeps batched.

  TensorFlow 2.14's vectorizer loops over examples for the kernel gradient
  of a convolution whose input differs per example (Conv2DBackpropFilter),
  which made per-example gradients of a CNN 5-10x slower than the rest. The
  gradient here is the same sum written as kernel-offset slices of the
  input contracted with the output gradient (an einsum), which vectorizes.
  """
  spatial = inputs.shape.rank - 2
  strides, dilations = list(strides), list(dilations)

  @tf.custom_gradient
  def forward(x, w):
    y = tf.nn.convolution(x, w, strides=strides, padding=padding,
                          dilations=dilations)

    def grad(dy):
      dx = tf.nn.conv_transpose(dy, w, tf.shape(x), strides=strides,
                                padding=padding, dilations=dilations)
      return dx, _kernel_gradient(x, dy, w.shape, strides, padding, dilations,
                                  spatial)

    return y, grad

  return forward(inputs, kernel)


def _kernel_gradient(x, dy, kernel_shape, strides, padding, dilations,
                     spatial: int) -> tf.Tensor:
  """dL/dkernel = sum over output positions of input window x output grad."""
  kernel_size = list(kernel_shape[:spatial])
  out_size = list(dy.shape[1:1 + spatial])
  if padding == 'SAME':
    pads = [[0, 0]]
    for n, o, k, s, d in zip(x.shape[1:1 + spatial], out_size, kernel_size,
                             strides, dilations):
      total = max((o - 1) * s + (k - 1) * d + 1 - n, 0)
      pads.append([total // 2, total - total // 2])
    x = tf.pad(x, pads + [[0, 0]])
  windows = []
  for offset in itertools.product(*[range(k) for k in kernel_size]):
    index = [slice(None)]
    for i, o, s, d in zip(offset, out_size, strides, dilations):
      index.append(slice(i * d, i * d + (o - 1) * s + 1, s))
    windows.append(x[tuple(index + [slice(None)])])
  patches = tf.stack(windows, axis=-2)  # [b, *out, offsets, in_channels]
  axes = 'hwd'[:spatial]
  dw = tf.einsum(f'b{axes}ki,b{axes}o->kio', patches, dy)
  return tf.reshape(dw, kernel_shape)
