"""LiteRT client benchmark: .tflite size and one DP-SGD train step, LiteRT vs TF.

The model is the package's HAPT model (`tds.models.build_model((128, 6), 6)`,
a 1-D CNN). It is exported with `tds.lite.export_client`; the same
computation, `tds.lite.client_module(...).functions['train']`, is timed in
the same run in TensorFlow as a `tf.function` and eagerly. For context, the
step written the usual TF way is timed too: the Keras model, per-example
gradients by `GradientTape.jacobian` (pfor), `core.gaussian_average`, SGD, in
a `tf.function` (it does not convert to builtins). Inputs are random arrays
of HAPT's shape (timings do not depend on the values). Every latency is the
median over `--steps` calls after warm-up. Also reported: one `upload()`
(get_update + encode) and its bytes. Writes `benchmarks/results/lite_bench.json`.

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--density', type=float, default=0.01)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--eager-steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=None,
                      help='LiteRT interpreter threads (default: runtime)')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results', 'lite_bench.json'))
  args = parser.parse_args()
  steps, eager_steps = (5, 2) if args.quick else (args.steps, args.eager_steps)
  settings = dict(batch_size=args.batch_size, l2_norm_clip=1.0,
                  noise_multiplier=1.1, density=args.density,
                  learning_rate=0.05, num_classes=NUM_CLASSES)

  model = models.build_model(INPUT_SHAPE, NUM_CLASSES)
  start = time.perf_counter()
  model_bytes = tds.lite.export_client(model, **settings)
  export_s = time.perf_counter() - start
  client = tds.lite.LiteClient(model_bytes, num_threads=args.threads)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch_size, *INPUT_SHAPE)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32)

  train = tds.lite.client_module(model, **settings).functions['train']
  x_tf, y_tf = tf.constant(x), tf.constant(y)
  row = {
      'parameters': client.size,
      'k': client.k,
      'tflite_bytes': len(model_bytes),
      'operators': tds.lite.operator_names(model_bytes),
      'export_s': export_s,
      'litert_s': _median_s(lambda: client.train(x, y), steps),
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
  row['dense_bytes'] = tds.codec.dense_nbytes(client.size)
  row.update(settings, litert_threads=args.threads,
             machine=f'{platform.machine()}, {os.cpu_count()} cores',
             load_average_1m=os.getloadavg()[0], tensorflow=tf.__version__)
  custom = [op for op in row['operators'] if op.startswith('CUSTOM')]

  print(f'HAPT model: {row["parameters"]:,} parameters, .tflite '
        f'{row["tflite_bytes"] / 1e6:.2f} MB, {len(row["operators"])} operator '
        f'types, custom/Flex: {custom or "none"}; exported in {export_s:.1f} s')
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
  print(f'upload (get_update + encode, k={row["k"]:,}): '
        f'{1e3 * row["upload_s"]:.2f} ms, {row["upload_bytes"]:,} bytes '
        f'({100 * row["upload_bytes"] / row["dense_bytes"]:.2f} % of dense)')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(row, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
