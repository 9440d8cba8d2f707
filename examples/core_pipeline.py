"""The core pipeline on a real update: clip -> noise -> top-k -> encode.

A 1.07M-parameter MLP takes one gradient step on a batch of real handwritten
digits (scikit-learn's 8x8 digits, shipped with the package). The update is
clipped, noised as one DP release, sparsified to 1 % with error feedback, and
encoded; the script prints its bytes against the dense update and the entropy
bound. Run: `python examples/core_pipeline.py` (or `make demo`).
"""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_dpsparse as tds

L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
DENSITY = 0.01


def main():
  digits = load_digits()
  x = (digits.data[:64] / 16.0).astype(np.float32)
  y = digits.target[:64]
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(1000, activation='relu', input_shape=(64,)),
      tf.keras.layers.Dense(1000, activation='relu'),
      tf.keras.layers.Dense(10),
  ])
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  with tf.GradientTape() as tape:
    loss = loss_fn(y, model(x))
  grads = tape.gradient(loss, model.trainable_variables)

  update = tds.core.flatten(grads)
  size = int(update.shape[0])
  clipped, norm = tds.core.clip_by_l2_norm(update, L2_NORM_CLIP)
  noised = tds.core.add_gaussian_noise(clipped, NOISE_MULTIPLIER * L2_NORM_CLIP)
  k = tds.core.k_for_density(size, DENSITY)
  residual = tf.zeros_like(noised)  # a device keeps this between rounds
  sparse, residual = tds.core.topk_with_error_feedback(noised, k, residual)

  print(f'model: {size:,} parameters; update norm {float(norm):.3f} '
        f'clipped to {L2_NORM_CLIP}; noise σ = {NOISE_MULTIPLIER * L2_NORM_CLIP}')
  print(f'top-k: k = {k:,} ({DENSITY:.0%}); residual kept on device: '
        f'{float(tf.norm(residual)):.2f} (L2)')
  dense = tds.codec.dense_nbytes(size)
  print(f'{"values":>8} {"bytes":>10} {"% of dense":>11} {"x entropy bound":>16}')
  for value_bits in (32, 16):
    payload = tds.codec.encode(sparse, value_bits=value_bits)
    bound = tds.codec.entropy_bound_bits(size, k, value_bits) / 8
    print(f'{"f" + str(value_bits):>8} {len(payload):>10,} '
          f'{100 * len(payload) / dense:>10.3f}% {len(payload) / bound:>16.4f}')
  print(f'{"dense":>8} {dense:>10,} {100.0:>10.3f}%')

  received = tds.codec.decode(tds.codec.encode(sparse), size)
  exact = np.array_equal(tds.core.densify(received).numpy(),
                         tds.core.densify(sparse).numpy())
  print(f'server decodes the exact sparse update: {exact}')


if __name__ == '__main__':
  main()
