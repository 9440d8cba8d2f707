"""LiteRT client benchmark: .tflite size and one DP-SGD train step, LiteRT vs TF.

The model is the package's HAPT model (`tds.models.build_model((128, 6), 6)`,
a 1-D CNN). It is exported with `tds.lite.export_client`; one step on a
fixed batch (`LiteClient.train`: `accumulate` once, then `step`) is timed
against the same computation, `accumulate` then `step` of
`tds.lite.client_module(...).functions`, in the same run in TensorFlow as
`tf.function`s and eagerly. For context, the
step written the usual TF way is timed too: the Keras model, per-example
gradients by `GradientTape.jacobian` (pfor), `core.gaussian_average`, SGD, in
a `tf.function` (it does not convert to builtins). Inputs are random arrays
of HAPT's shape (timings do not depend on the values). Every latency is the
median over `--steps` calls after warm-up. Also reported: one
Poisson-sampled `train_step` over a device of `--device-examples` windows
(a HAPT user holds about 330; the sample, and so the time, varies by step),
and one `upload()` (get_update + encode) and its bytes. Writes `benchmarks/results/lite_bench.json`.
With `--subspace 0.02` the client trains z of a public random subspace
(issue 18: a GATHER writes the model, an UNSORTED_SEGMENT_SUM pulls each
example's gradient back to z) and uploads all of z.

Run: `python benchmarks/lite_bench.py` (`--quick` for fewer steps).
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import tensorflow as tf

import tf_dpsparse as tds
from tf_dpsparse import models

NUM_CLASSES = 6
INPUT_SHAPE = (128, 6)


def _median_s(fn, steps, warmup=2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _keras_jacobian_step(model, clip, noise_multiplier, learning_rate):
  variables = model.trainable_variables

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      losses = tf.keras.losses.sparse_categorical_crossentropy(
          y, model(x, training=True), from_logits=True)
    rows = tf.concat([tf.reshape(j, [tf.shape(x)[0], -1])
                      for j in tape.jacobian(losses, variables)], axis=1)
    mean, _ = tds.core.gaussian_average(rows, clip, noise_multiplier)
    for v, g in zip(variables, tds.core.unflatten(mean, variables)):
      v.assign_sub(learning_rate * g)

  return step


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--device-examples', type=int, default=330,
                      help='windows on the device of the Poisson step')
  parser.add_argument('--density', type=float, default=None,
                      help='default 0.01 (all of z with --subspace)')
  parser.add_argument('--subspace', type=float, default=None,
                      help='train z of this fraction of the weights')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--eager-steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=None,
                      help='LiteRT interpreter threads (default: runtime)')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results', 'lite_bench.json'))
  return parser.parse_args()


def _tf_step(model, settings):
  """The exported fixed-batch step (`accumulate`, then `step`) in TF."""
  functions = tds.lite.client_module(model, **settings).functions
  # One chunk of `max_batch` rows, the batch padded, as `LiteClient.train`.
  rows = functions['accumulate'].input_signature[0].shape[0]
  pad = rows - settings['batch_size']
  mask = tf.range(rows) < settings['batch_size']

  def step(x, y):
    functions['accumulate'](tf.pad(x, [[0, pad], [0, 0], [0, 0]]),
                            tf.pad(y, [[0, pad]]), mask)
    functions['step']()

  return step


def _measure(args, settings, steps, eager_steps):
  """Every timing and size of the module docstring, as one JSON row."""
  model = models.build_model(INPUT_SHAPE, NUM_CLASSES)
  start = time.perf_counter()
  model_bytes = tds.lite.export_client(model, **settings)
  export_s = time.perf_counter() - start
  client = tds.lite.LiteClient(model_bytes, num_threads=args.threads)
  rng = np.random.default_rng(0)
  n = args.device_examples
  x_all = rng.normal(size=(n, *INPUT_SHAPE)).astype(np.float32)
  y_all = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  x, y = x_all[:args.batch_size], y_all[:args.batch_size]
  train = _tf_step(model, settings)
  x_tf, y_tf = tf.constant(x), tf.constant(y)
  row = {
      'parameters': client.model_size,
      'coordinates': client.size,  # the parameters, or z
      'k': client.k,
      'tflite_bytes': len(model_bytes),
      'operators': tds.lite.operator_names(model_bytes),
      'export_s': export_s,
      'litert_s': _median_s(lambda: client.train(x, y), steps),
      'litert_poisson_step_s': _median_s(
          lambda: client.train_step(x_all, y_all), steps),
      'tf_function_s': _median_s(lambda: train(x_tf, y_tf), steps),
  }
  tf.config.run_functions_eagerly(True)
  try:
    row['tf_eager_s'] = _median_s(lambda: train(x_tf, y_tf), eager_steps,
                                  warmup=1)
  finally:
    tf.config.run_functions_eagerly(False)
  keras_step = _keras_jacobian_step(model, 1.0, 1.1, 0.05)
  row['keras_jacobian_tf_function_s'] = _median_s(
      lambda: keras_step(x_tf, y_tf), steps)
  row['upload_s'] = _median_s(client.upload, steps)
  row['upload_bytes'] = len(client.upload())
  row['dense_bytes'] = tds.codec.dense_nbytes(client.model_size)
  return row


def _report(row, args):
  custom = [op for op in row['operators'] if op.startswith('CUSTOM')]
  subspace = ('' if row['coordinates'] == row['parameters'] else
              f' (trained in a subspace of {row["coordinates"]:,})')
  print(f'HAPT model: {row["parameters"]:,} parameters{subspace}, .tflite '
        f'{row["tflite_bytes"] / 1e6:.2f} MB, {len(row["operators"])} operator '
        f'types, custom/Flex: {custom or "none"}; exported in '
        f'{row["export_s"]:.1f} s')
  print(f'one DP-SGD train step, batch {args.batch_size} (load average '
        f'{row["load_average_1m"]:.1f} on {os.cpu_count()} cores):')
  base = row['litert_s']
  for name, key in (('LiteRT (ai_edge_litert)', 'litert_s'),
                    ('TF tf.function, same step', 'tf_function_s'),
                    ('TF eager, same step', 'tf_eager_s'),
                    ('TF tf.function, Keras + jacobian',
                     'keras_jacobian_tf_function_s')):
    print(f'  {name:<34} {1e3 * row[key]:>9.2f} ms   x{row[key] / base:>6.2f} '
          'of LiteRT')
  print(f'LiteRT Poisson-sampled step over {args.device_examples} examples '
        f'(q = {args.batch_size}/{args.device_examples}, chunks of '
        f'{args.batch_size}): {1e3 * row["litert_poisson_step_s"]:.2f} ms')
  print(f'upload (get_update + encode, k={row["k"]:,}): '
        f'{1e3 * row["upload_s"]:.2f} ms, {row["upload_bytes"]:,} bytes '
        f'({100 * row["upload_bytes"] / row["dense_bytes"]:.2f} % of dense)')


def main():
  args = _parse_args()
  steps, eager_steps = (5, 2) if args.quick else (args.steps, args.eager_steps)
  density = args.density or (None if args.subspace else 0.01)
  settings = dict(batch_size=args.batch_size, l2_norm_clip=1.0,
                  noise_multiplier=1.1, density=density,
                  learning_rate=0.05, num_classes=NUM_CLASSES,
                  subspace=args.subspace)
  row = _measure(args, settings, steps, eager_steps)
  row.update(settings, device_examples=args.device_examples,
             litert_threads=args.threads,
             machine=f'{platform.machine()}, {os.cpu_count()} cores',
             load_average_1m=os.getloadavg()[0], tensorflow=tf.__version__)
  _report(row, args)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(row, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
