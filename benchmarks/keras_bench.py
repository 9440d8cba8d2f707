"""Keras benchmark: steps/s of SGD, TF Privacy DP-SGD and DPSparseOptimizer.

All four run `model.fit` in the same process on the same model (the HAPT
Conv1D of `tf_dpsparse.models`, ~16k parameters) and the same batches:
plain `tf.keras.optimizers.SGD` (mean loss), TF Privacy's
`DPKerasSGDOptimizer`, and `tds.keras.DPSparseOptimizer` around SGD at
density 1 % and 100 % (per-example losses). Inputs are Gaussian with HAPT's
shape, since step time does not depend on their values. Rounds interleave the
optimizers and the best round counts, which damps other load on the machine.
Prints steps/s and the ratios, checks the target (DPSparseOptimizer at 1 % no
slower than 1.2x TF Privacy's step time) and writes
`benchmarks/results/keras_bench.json`.

Run: `python benchmarks/keras_bench.py` (add `--quick` for fewer steps).
"""

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf
from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras

import tf_dpsparse as tds
from tf_dpsparse import models

L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.1
TARGET = 1.2


def _optimizers():
  dp = dict(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER)
  sparse = lambda density: lambda: tds.keras.DPSparseOptimizer(  # noqa: E731
      tf.keras.optimizers.SGD(LEARNING_RATE), density=density, **dp)
  return {
      'sgd': (lambda: tf.keras.optimizers.SGD(LEARNING_RATE), 'auto'),
      'tf_privacy': (lambda: dp_optimizer_keras.DPKerasSGDOptimizer(
          learning_rate=LEARNING_RATE, **dp), 'none'),
      'dpsparse_1%': (sparse(0.01), 'none'),
      'dpsparse_100%': (sparse(1.0), 'none'),
  }


def _compiled(make_optimizer, reduction, input_shape, num_classes):
  model = models.build_model(input_shape, num_classes)
  model.compile(optimizer=make_optimizer(),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction=reduction))
  return model


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results', 'keras_bench.json'))
  args = parser.parse_args()
  steps, rounds = (10, 2) if args.quick else (30, 3)
  input_shape, num_classes = (128, 6), 6
  rng = np.random.default_rng(0)
  x = rng.normal(size=(steps * args.batch_size, *input_shape))
  x = x.astype(np.float32)
  y = rng.integers(0, num_classes, len(x)).astype(np.int32)

  compiled = {}
  for name, (make, reduction) in _optimizers().items():
    compiled[name] = _compiled(make, reduction, input_shape, num_classes)
    compiled[name].fit(x[:2 * args.batch_size], y[:2 * args.batch_size],
                       batch_size=args.batch_size, verbose=0)  # trace
  best = {name: float('inf') for name in compiled}
  for _ in range(rounds):
    for name, model in compiled.items():
      start = time.perf_counter()
      model.fit(x, y, batch_size=args.batch_size, shuffle=False, verbose=0)
      best[name] = min(best[name], time.perf_counter() - start)

  rows = {
      name: {'steps_per_s': steps / seconds, 'step_ms': 1e3 * seconds / steps}
      for name, seconds in best.items()
  }
  size = compiled['dpsparse_1%'].optimizer.size
  for density in ('1%', '100%'):
    optimizer = compiled[f'dpsparse_{density}'].optimizer
    rows[f'dpsparse_{density}'].update(
        k=optimizer.k,
        wire_bytes_per_step=(int(optimizer.wire_bytes) /
                             int(optimizer.iterations)),
        dense_bytes=tds.codec.dense_nbytes(size))
  tfp = rows['tf_privacy']['step_ms']
  sgd = rows['sgd']['step_ms']
  print(f'model: {size:,} parameters, batch {args.batch_size}, best of '
        f'{rounds} x {steps} steps, {os.cpu_count()} cores')
  print(f'{"optimizer":>14} {"steps/s":>8} {"ms/step":>8} {"x sgd":>7} '
        f'{"x tf_privacy":>12} {"bytes/step":>11}')
  for name, r in rows.items():
    r['time_vs_sgd'] = r['step_ms'] / sgd
    r['time_vs_tf_privacy'] = r['step_ms'] / tfp
    wire = (f'{r["wire_bytes_per_step"]:>11,.0f}' if 'wire_bytes_per_step' in r
            else f'{"":>11}')
    print(f'{name:>14} {r["steps_per_s"]:>8.1f} {r["step_ms"]:>8.1f} '
          f'{r["time_vs_sgd"]:>7.2f} {r["time_vs_tf_privacy"]:>12.2f} {wire}')
  ratio = rows['dpsparse_1%']['time_vs_tf_privacy']
  verdict = 'meets' if ratio <= TARGET else 'MISSES'
  print(f'\nDPSparseOptimizer at 1 %: {ratio:.2f}x the step time of TF '
        f'Privacy ({verdict} the {TARGET}x target).')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'parameters': size, 'batch_size': args.batch_size,
               'steps': steps, 'rounds': rounds, 'target': TARGET,
               'results': rows}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
