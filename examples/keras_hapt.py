"""DP-SGD with a 1 % top-k update in plain `model.fit`, on real sensor data.

A small Conv1D learns the six UCI HAPT activities (30 people's phone
accelerometer and gyroscope, 2.56 s windows) centrally with
`tds.keras.DPSparseOptimizer`: per-example clipping and Gaussian noise
(example-level DP), then only the top 1 % of the noised update, with error
feedback, is applied: exactly what a device would upload. Batches are
Poisson-sampled (`tds.keras.poisson_batches`: each window joins each step
with probability q = 64 / n), the sampling the amplified ε assumes, and the
optimizer divides by the expected batch size. `PrivacyCallback` adds that ε
to every epoch's logs and would stop training at the budget. Prints the test
accuracy, ε at δ (and what the same steps would cost on shuffled fixed-size
batches), and the bytes of an update against a dense one.

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
      density=DENSITY,
      expected_batch_size=BATCH_SIZE)  # q * n, never the realized size
  model.compile(
      optimizer=optimizer,
      # One loss per example: the optimizer clips each example's gradient.
      loss=tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
      metrics=['accuracy'])
  privacy = tds.keras.PrivacyCallback(
      DELTA, dataset_size=len(x), batch_size=BATCH_SIZE,
      epsilon_budget=EPSILON_BUDGET, sampling='poisson')
  model.fit(tds.keras.poisson_batches(x, y, BATCH_SIZE), epochs=args.epochs,
            steps_per_epoch=len(x) // BATCH_SIZE, callbacks=[privacy],
            verbose=2)

  _, accuracy = model.evaluate(x_test, y_test, verbose=0)
  steps = int(optimizer.iterations)
  wire = int(optimizer.wire_bytes) / steps
  dense = tds.codec.dense_nbytes(optimizer.size)
  print(f'\n{len(x):,} training windows, {len(x_test):,} test windows '
        f'(held-out runs of the same 30 users)')
  print(f'test accuracy: {accuracy:.3f}')
  shuffled = tds.privacy.compute_epsilon_shuffled(
      NOISE_MULTIPLIER, steps * BATCH_SIZE / len(x), DELTA)
  print(f'privacy: ε = {privacy.epsilon:.2f} at δ = {DELTA:g} after {steps} '
        f'steps (σ = {NOISE_MULTIPLIER}, RDP, {privacy.assumption}); the '
        f'same steps on shuffled fixed-size batches: ε = {shuffled:.2f}')
  print(f'update: k = {optimizer.k:,} of {optimizer.size:,} parameters, '
        f'{wire:,.0f} bytes on the wire vs {dense:,} dense '
        f'({100 * wire / dense:.2f} %)')


if __name__ == '__main__':
  main()
