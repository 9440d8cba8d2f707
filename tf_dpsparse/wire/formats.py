"""Value formats of the wire: how a float32 value travels at 32, 16 or 8 bits.

Every rounding to the wire happens here, in TensorFlow, so the device (in
TFF, Keras or a TFLite graph) and the server round identically and the
codec (`tds.wire.codec`) stores exactly what was rounded.
"""

from __future__ import annotations

from typing import Tuple

import tensorflow as tf

VALUE_BITS = (32, 16, 8)
_INT8_MAX = 127
INT8_EXPONENT_RANGE = (-126, 122)  # 2**e and 2**-e both stay normal float32


def _power_of_two(exponent: tf.Tensor) -> tf.Tensor:
  """2.0 ** exponent as float32, exactly (built from its exponent bits)."""
  return tf.bitcast((tf.cast(exponent, tf.int32) + 127) * (1 << 23), tf.float32)


def int8_block(values) -> Tuple[tf.Tensor, tf.Tensor]:
  """`values` as integers in [-127, 127] times one power of two: `(q, exponent)`.

  The exponent is the smallest with max|values| <= 127 * 2**exponent, so the
  largest value keeps 7 bits. q = values / 2**exponent truncated toward zero
  (a float32 tensor of integers), so no magnitude grows. A power-of-two scale
  makes both the division and `q * 2**exponent` exact: quantizing the decoded
  values again gives them back bit for bit, which the codec relies on.
  """
  values = tf.convert_to_tensor(values, tf.float32)
  magnitudes = tf.abs(values)
  peak = tf.reduce_max(tf.concat([magnitudes, [0.0]], 0))
  # peak in [2**E, 2**(E+1)) puts the exponent at E - 6 or E - 5.
  top_exponent = tf.bitwise.right_shift(tf.bitcast(peak, tf.int32), 23) - 127
  low, high = INT8_EXPONENT_RANGE
  candidate = tf.clip_by_value(top_exponent - 6, low, high)
  exponent = tf.where(peak <= _INT8_MAX * _power_of_two(candidate), candidate,
                      candidate + 1)
  q = tf.minimum(tf.floor(magnitudes * _power_of_two(-exponent)), _INT8_MAX)
  return tf.sign(values) * q, exponent


def to_wire_precision(values: tf.Tensor, value_bits: int = 32) -> tf.Tensor:
  """`values` as the receiver decodes them at `value_bits` (32, 16 or 8) bits.

  Rounding is toward zero, so no magnitude grows and a clipped update stays
  within its clip (round-to-nearest could exceed it). 16 bits: float16,
  values beyond its range become its largest finite value. 8 bits:
  `int8_block`, one shared power-of-two scale per payload; what rounding
  removes is kept by the caller's error feedback.
  """
  values = tf.convert_to_tensor(values, tf.float32)
  if value_bits == 32:
    return values
  if value_bits == 8:
    q, exponent = int8_block(values)
    return q * _power_of_two(exponent)
  if value_bits != 16:
    raise ValueError(f'value_bits must be one of {VALUE_BITS}, got {value_bits}.')
  half = tf.cast(values, tf.float16)
  rounded_up = tf.abs(tf.cast(half, tf.float32)) > tf.abs(values)
  # float16 is sign-magnitude: one less in the bit pattern is one ulp
  # closer to zero, for either sign (and inf steps down to the largest finite).
  toward_zero = tf.bitcast(tf.bitcast(half, tf.int16) - 1, tf.float16)
  return tf.cast(tf.where(rounded_up, toward_zero, half), tf.float32)
