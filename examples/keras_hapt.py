"""DP-SGD with a 1 % top-k update in plain `model.fit`, on real sensor data.

A small Conv1D learns the six UCI HAPT activities (30 people's phone
accelerometer and gyroscope, 2.56 s windows) centrally with
`tds.keras.DPSparseOptimizer`: per-example clipping and Gaussian noise
(example-level DP), then only the top 1 % of the noised update, with error
feedback, is applied: exactly what a device would upload. `PrivacyCallback`
adds ε to every epoch's logs and would stop training at the budget. Prints
the test accuracy, ε at δ, and the bytes of an update against a dense one.

Run: `python examples/keras_hapt.py` (about 40 s per epoch on 2 cores).
"""

import argparse

import tensorflow as tf

import tf_dpsparse as tds
from tf_dpsparse import models

L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
DENSITY = 0.01
LEARNING_RATE = 0.1
BATCH_SIZE = 64
DELTA = 1e-5  # below 1 / (number of training windows)
EPSILON_BUDGET = 3.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=5)
  args = parser.parse_args()

  data = tds.data.load('hapt')
  x, y = data.train_arrays()
  x_test, y_test = data.test_arrays()
  model = models.build_model(x.shape[1:], data.num_classes)
  optimizer = tds.keras.DPSparseOptimizer(
      tf.keras.optimizers.SGD(LEARNING_RATE),
      l2_norm_clip=L2_NORM_CLIP,
      noise_multiplier=NOISE_MULTIPLIER,
      density=DENSITY)
  model.compile(
      optimizer=optimizer,
      # One loss per example: the optimizer clips each example's gradient.
      loss=tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
      metrics=['accuracy'])
  privacy = tds.keras.PrivacyCallback(
      DELTA, dataset_size=len(x), batch_size=BATCH_SIZE,
      epsilon_budget=EPSILON_BUDGET)
  model.fit(x, y, batch_size=BATCH_SIZE, epochs=args.epochs,
            callbacks=[privacy], verbose=2)

  _, accuracy = model.evaluate(x_test, y_test, verbose=0)
  steps = int(optimizer.iterations)
  wire = int(optimizer.wire_bytes) / steps
  dense = tds.codec.dense_nbytes(optimizer.size)
  print(f'\n{len(x):,} training windows, {len(x_test):,} test windows '
        f'(held-out runs of the same 30 users)')
  print(f'test accuracy: {accuracy:.3f}')
  print(f'privacy: ε = {privacy.epsilon:.2f} at δ = {DELTA:g} after {steps} '
        f'steps (σ = {NOISE_MULTIPLIER}, q = {BATCH_SIZE}/{len(x)}, RDP, '
        f'Poisson-sampling approximation)')
  print(f'update: k = {optimizer.k:,} of {optimizer.size:,} parameters, '
        f'{wire:,.0f} bytes on the wire vs {dense:,} dense '
        f'({100 * wire / dense:.2f} %)')


if __name__ == '__main__':
  main()
