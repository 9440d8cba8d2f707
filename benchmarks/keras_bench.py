"""Keras benchmark: DP-SGD step time against plain SGD, on the shipped CNNs.

Five optimizers run `model.fit` in one process on the same models and
batches: plain `tf.keras.optimizers.SGD` (mean loss), TF Privacy's
`DPKerasSGDOptimizer`, and `tds.keras.DPSparseOptimizer` (density 1 %) on
its old path (the jacobian of the loss vector, which a model overriding
`train_step` still takes), on its rows path (Keras's own `train_step` with
ghost norms off: per-example forward/backward under `tf.vectorized_map`,
the fast path before ghost norms) and on its fast path (ghost norms: one
forward, one weighted backward). Models: the HAPT
1-D CNN and the MNIST 2-D CNN of `tf_dpsparse.models`, at batch 16, 64 and
256. Inputs are Gaussian with the data sets' shapes (step time does not
depend on their values). Rounds interleave the optimizers and the best
round counts, which damps other load on the shared machine; only ratios
measured in this run are reported, never absolute targets.

Prints step times and ratios and writes `benchmarks/results/keras_bench.json`
with, for each model and batch size, `dp_over_sgd`: the fast path's step
time over plain SGD's, and `rows_over_fast`: the rows path's over the
fast path's (what ghost norms gained). The issue's targets are checked at
batch 64: fast path <= 3x SGD (stretch 2x) and <= 0.3x TF Privacy.

Run: `python benchmarks/keras_bench.py` (`--quick`: fewer steps, and the two
O(batch^2) paths skipped at batch 256; a few minutes on 2 cores).
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
DENSITY = 0.01
MODELS = {'hapt_conv1d': ((128, 6), 6), 'mnist_conv2d': ((28, 28, 1), 10)}
BATCHES = (16, 64, 256)
SLOW = ('tf_privacy', 'jacobian_path')  # O(batch^2) per step


class JacobianPathModel(tf.keras.Sequential):
  """Keras's `train_step` verbatim in an override: `DPSparseOptimizer` then
  has only the loss vector and takes its jacobian (the path before issue 17)."""

  def train_step(self, data):
    x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      loss = self.compute_loss(x, y, y_pred, sample_weight)
    self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
    return self.compute_metrics(x, y, y_pred, sample_weight)


class RowsPathOptimizer(tds.keras.DPSparseOptimizer):
  """The fast path with ghost norms off: the vectorized per-example rows."""
  _ghost_norms = False


def _variants():
  dp = dict(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER)
  sparse = lambda cls=tds.keras.DPSparseOptimizer: cls(  # noqa: E731
      tf.keras.optimizers.SGD(LEARNING_RATE), density=DENSITY, **dp)
  return {  # name: (model class, optimizer, loss reduction)
      'sgd': (tf.keras.Sequential,
              lambda: tf.keras.optimizers.SGD(LEARNING_RATE), 'auto'),
      'tf_privacy': (tf.keras.Sequential,
                     lambda: dp_optimizer_keras.DPKerasSGDOptimizer(
                         learning_rate=LEARNING_RATE, **dp), 'none'),
      'jacobian_path': (JacobianPathModel, sparse, 'none'),
      'rows_path': (tf.keras.Sequential,
                    lambda: sparse(RowsPathOptimizer), 'none'),
      'fast_path': (tf.keras.Sequential, sparse, 'none'),
  }


def _compiled(model_class, make_optimizer, reduction, input_shape, classes):
  model = model_class(models.build_model(input_shape, classes).layers)
  model.compile(optimizer=make_optimizer(),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction=reduction))
  return model


def _step_ms(input_shape, classes, batch, names, steps, rounds):
  """Best-of-rounds ms per `fit` step for each variant in `names`."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(max(steps.values()) * batch, *input_shape))
  x = x.astype(np.float32)
  y = rng.integers(0, classes, len(x)).astype(np.int32)
  compiled = {}
  for name in names:
    model_class, make, reduction = _variants()[name]
    compiled[name] = _compiled(model_class, make, reduction, input_shape,
                               classes)
    compiled[name].fit(x[:batch], y[:batch], batch_size=batch,
                       verbose=0)  # trace
  best = {name: float('inf') for name in names}
  for _ in range(rounds):
    for name, model in compiled.items():
      n = steps[name] * batch
      start = time.perf_counter()
      model.fit(x[:n], y[:n], batch_size=batch, shuffle=False, verbose=0)
      best[name] = min(best[name],
                       1e3 * (time.perf_counter() - start) / steps[name])
  return best


def _over(a, b):
  return None if a is None or b is None else a / b


def _ratios(ms):
  fast, sgd = ms['fast_path'], ms['sgd']
  tfp, jac = ms.get('tf_privacy'), ms.get('jacobian_path')
  return {
      'dp_over_sgd': fast / sgd,
      'jacobian_over_sgd': _over(jac, sgd),
      'tf_privacy_over_sgd': _over(tfp, sgd),
      'fast_over_tf_privacy': _over(fast, tfp),
      'jacobian_over_fast': _over(jac, fast),
      'rows_over_sgd': _over(ms.get('rows_path'), sgd),
      'rows_over_fast': _over(ms.get('rows_path'), fast),
  }


def _cell(value, digits=1):
  return f'{"-":>8}' if value is None else f'{value:>8.{digits}f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results', 'keras_bench.json'))
  args = parser.parse_args()
  fast_steps, slow_steps, rounds = (16, 2, 3) if args.quick else (30, 5, 3)
  print(f'{"model":>13} {"batch":>5} {"sgd ms":>7} {"tfp ms":>8} '
        f'{"jac ms":>8} {"rows ms":>7} {"fast ms":>7} {"fast/sgd":>8} '
        f'{"fast/tfp":>8} {"jac/fast":>8} {"rows/fast":>9}')
  results = {}
  for model_name, (input_shape, classes) in MODELS.items():
    for batch in BATCHES:
      names = [n for n in _variants()
               if not (args.quick and batch == BATCHES[-1] and n in SLOW)]
      steps = {n: slow_steps if n in SLOW else fast_steps for n in names}
      ms = _step_ms(input_shape, classes, batch, names, steps, rounds)
      r = _ratios(ms)
      results.setdefault(model_name, {})[str(batch)] = {
          'step_ms': ms, **r}
      print(f'{model_name:>13} {batch:>5} {ms["sgd"]:>7.1f} '
            f'{_cell(ms.get("tf_privacy"))} {_cell(ms.get("jacobian_path"))} '
            f'{ms["rows_path"]:>7.1f} {ms["fast_path"]:>7.1f} '
            f'{r["dp_over_sgd"]:>8.2f} '
            f'{_cell(r["fast_over_tf_privacy"], 3)} '
            f'{_cell(r["jacobian_over_fast"])} '
            f'{r["rows_over_fast"]:>9.2f}', flush=True)
  for model_name, by_batch in results.items():
    r = by_batch['64']
    print(f'{model_name} at batch 64: DP step {r["dp_over_sgd"]:.2f}x SGD '
          f'(target <= 3x, stretch 2x), {r["fast_over_tf_privacy"]:.3f}x TF '
          'Privacy (target <= 0.3x); rows path (no ghost norms) '
          f'{r["rows_over_fast"]:.2f}x the fast path')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'quick': args.quick, 'density': DENSITY, 'rounds': rounds,
               'steps': {'fast': fast_steps, 'slow': slow_steps},
               'cores': os.cpu_count(), 'results': results}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
