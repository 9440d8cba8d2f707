"""`SparseUpdate`, the one value every stage passes on: k values of a flat vector.

It lives apart from the transforms so that the wire format (`tds.wire`)
can name it without importing them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf


class SparseUpdate(NamedTuple):
  """A sparse slice of a flat update: `values` at `indices` of a vector of `size`.

  `indices` are int32[k] and distinct; `values` are float32[k]. Fields may be
  `tf.Tensor`s (from the transforms) or numpy arrays (from `tds.codec.decode`);
  `densify` accepts both. `size` is a Python int (static, like a dense shape).
  """

  indices: Any
  values: Any
  size: int


def densify(sparse: SparseUpdate) -> tf.Tensor:
  """The dense float32[size] vector a `SparseUpdate` stands for."""
  indices = tf.convert_to_tensor(sparse.indices, tf.int32)
  values = tf.convert_to_tensor(sparse.values, tf.float32)
  return tf.scatter_nd(indices[:, tf.newaxis], values, [int(sparse.size)])
