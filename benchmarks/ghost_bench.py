"""Ghost clipping against materialized per-example gradients, by measurement.

Issue 17 asks to pick, per layer or per model, between the vectorized
per-example gradients every front uses today (`tds.keras.per_example`:
an [n, d] matrix of rows, then `tds.core.clip_rows_by_l2_norm` and a sum)
and ghost norms (Lee & Kifer 2021; Opacus' ghost clipping; TF Privacy's
`fast_gradient_clipping`, which registers Dense but not convolutions):
each example's gradient norm from the layer inputs `a` and the gradients of
the summed loss with respect to the pre-activations `g`, without the rows,
then one weighted backward pass with weights min(1, C / norm_i).

Norms per layer (n examples, T output positions, D = kernel taps x input
channels, p = filters):
  Dense on [n, d] inputs: ||a_i||^2 ||g_i||^2 (+ ||g_i||^2 for the bias).
  Conv1D/Conv2D: with the unfolded inputs P_i [T, D] (one strided slice
  per kernel tap), the kernel gradient is P_i^T G_i. Its squared norm is
  either <P_i P_i^T, G_i G_i^T> (the Gram trick, ~T^2 (D + p) per example)
  or ||P_i^T G_i||^2 computed directly (the unfold form, ~T D p); the
  cheaper count is taken per layer. The bias adds ||sum_t G_i,t||^2.
The weighted backward pass reuses the first: the kernel gradient of a layer
is linear in g, so the clipped sum is each layer's kernel gradient with
g_i scaled by w_i (no second forward or backward through the network).
That function, `ghost_clipped_sum`, lives in `tf_dpsparse.keras.per_example`
(moved there because this benchmark measured it >= 1.3x faster than the
rows at batch 64); `ghost_tape` times the textbook variant instead (the persistent tape's
second backward with output gradients w), to show what reuse buys.

Timed, inside `tf.function`, warmed up, in interleaved rounds (times are
medians over rounds, ratios medians of the rounds' paired ratios):
  sgd        gradient of the mean loss (one forward/backward, no privacy)
  vectorized today's path: rows, clip_rows_by_l2_norm, sum
  ghost      ghost norms + the reused weighted backward
  ghost_tape ghost norms + the tape's second weighted backward
on the HAPT 1-D CNN and the MNIST 2-D CNN of `tf_dpsparse.models` at batch
16, 64 and 256. Inputs are Gaussian with the data sets' shapes (times do
not depend on the values). Before timing, ghost's norms and clipped sum are
asserted equal to the vectorized path's within 1e-5 relative, with the clip
at the median norm so that half the examples are clipped.

Run: `python benchmarks/ghost_bench.py` (`--quick`: fewer rounds, a couple
of minutes on 2 cores). Prints a table and writes
`benchmarks/results/ghost_bench.json`.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import tensorflow as tf

from tf_dpsparse import core
from tf_dpsparse import models
from tf_dpsparse.keras import per_example

L2_NORM_CLIP = 1.0
# HAPT as the package loads it: 6 activities (the transitions are dropped).
MODELS = {'hapt_conv1d': ((128, 6), 6), 'mnist_conv2d': ((28, 28, 1), 10)}
BATCHES = (16, 64, 256)
METHODS = ('sgd', 'vectorized', 'ghost', 'ghost_tape')
TOLERANCE = 1e-5
ghost_clipped_sum = per_example.ghost_clipped_sum


def ghost_tape_clipped_sum(keras_model, per_example_loss_fn, x, y,
                           l2_norm_clip):
  """`ghost_clipped_sum` with the textbook second pass: the tape's backward
  of the losses weighted by the clip weights (what Opacus and TF Privacy
  do, minus their second forward). For timing only: same result."""
  # pylint: disable=protected-access
  records, dzs, (tape, losses) = per_example._ghost_backward(
      keras_model, per_example_loss_fn, x, y, persistent=True)
  norms, _ = per_example._ghost_norms(records, dzs)
  weights = tf.minimum(1.0, l2_norm_clip / tf.maximum(norms, 1e-12))
  grads = tape.gradient(losses, keras_model.trainable_variables,
                        output_gradients=weights)
  del tape
  return core.flatten(grads), norms


def _loss_fn():
  return tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)


def _vectorized_clipped_sum(model, loss_fn, x, y, l2_norm_clip):
  """Today's path: materialized rows, clipped, summed."""
  rows = per_example.per_example_gradients(
      model, loss_fn, model.trainable_variables, x, y)
  clipped, norms = core.clip_rows_by_l2_norm(rows, l2_norm_clip)
  return tf.reduce_sum(clipped, axis=0), norms


def _functions(model, loss_fn, clip):
  """One `tf.function` per method, each returning a flat [d] gradient."""
  def sgd(x, y):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
    return core.flatten(tape.gradient(loss, model.trainable_variables))

  paths = {'vectorized': _vectorized_clipped_sum, 'ghost': ghost_clipped_sum,
           'ghost_tape': ghost_tape_clipped_sum}
  functions = {'sgd': tf.function(sgd)}
  for name, path in paths.items():
    functions[name] = tf.function(
        lambda x, y, path=path: path(model, loss_fn, x, y, clip)[0])
  return functions


def _relative_error(got, want):
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_parity(model, loss_fn, x, y):
  """Asserts ghost's norms and clipped sums equal the vectorized path's
  (clip at the median norm: half the examples clipped). Returns the errors."""
  _, norms = tf.function(
      lambda: _vectorized_clipped_sum(model, loss_fn, x, y, 1.0))()
  clip = float(np.median(norms.numpy()))
  want_sum, want_norms = tf.function(
      lambda: _vectorized_clipped_sum(model, loss_fn, x, y, clip))()
  errors = {}
  for name, path in (('ghost', ghost_clipped_sum),
                     ('ghost_tape', ghost_tape_clipped_sum)):
    got_sum, got_norms = tf.function(
        lambda path=path: path(model, loss_fn, x, y, clip))()
    errors[name] = {
        'sum': _relative_error(got_sum.numpy(), want_sum.numpy()),
        'norms': _relative_error(got_norms.numpy(), want_norms.numpy())}
    for what, error in errors[name].items():
      assert error <= TOLERANCE, (name, what, error)
  return errors


def _inputs(input_shape, classes, batch, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, *input_shape)).astype(np.float32)
  return tf.constant(x), tf.constant(rng.integers(0, classes, batch),
                                     dtype=tf.int32)


def time_methods(input_shape, classes, batch, rounds, calls):
  """Per method, the ms per call in each of the interleaved rounds."""
  model = models.build_model(input_shape, classes, seed=0)
  x, y = _inputs(input_shape, classes, batch)
  functions = _functions(model, _loss_fn(), L2_NORM_CLIP)
  for fn in functions.values():
    fn(x, y).numpy()  # trace
    fn(x, y).numpy()  # warm up
  samples = {name: [] for name in functions}
  for _ in range(rounds):
    for name, fn in functions.items():
      start = time.perf_counter()
      for _ in range(calls):
        fn(x, y).numpy()
      samples[name].append(1e3 * (time.perf_counter() - start) / calls)
  return samples


def _ratios(samples):
  """Medians over rounds of per-round ratios: a round's methods run back to
  back, so a paired ratio cancels the other load on the shared machine
  better than a ratio of medians."""
  def paired(a, b):
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))
  return {'ghost_over_vectorized': paired('ghost', 'vectorized'),
          'ghost_tape_over_vectorized': paired('ghost_tape', 'vectorized'),
          'vectorized_over_sgd': paired('vectorized', 'sgd'),
          'ghost_over_sgd': paired('ghost', 'sgd'),
          'ghost_tape_over_sgd': paired('ghost_tape', 'sgd')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='fewer rounds (a couple of minutes on 2 cores)')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results', 'ghost_bench.json'))
  args = parser.parse_args()
  rounds, calls = (7, 3) if args.quick else (41, 5)
  results, parity = {}, {}
  for model_name, (input_shape, classes) in MODELS.items():
    model = models.build_model(input_shape, classes, seed=0)
    parity[model_name] = check_parity(
        model, _loss_fn(), *_inputs(input_shape, classes, 64, seed=1))
    print(f'{model_name}: parity with the vectorized path {parity[model_name]}'
          f' (<= {TOLERANCE})', flush=True)
  print(f'{"model":>13} {"batch":>5} ' +
        ' '.join(f'{m + " ms":>13}' for m in METHODS) +
        f' {"ghost/vec":>9} {"vec/sgd":>8} {"ghost/sgd":>9} {"gtape/sgd":>9}')
  for model_name, (input_shape, classes) in MODELS.items():
    for batch in BATCHES:
      samples = time_methods(input_shape, classes, batch, rounds, calls)
      ms = {name: statistics.median(s) for name, s in samples.items()}
      r = _ratios(samples)
      results.setdefault(model_name, {})[str(batch)] = {'ms': ms, **r}
      print(f'{model_name:>13} {batch:>5} ' +
            ' '.join(f'{ms[m]:>13.2f}' for m in METHODS) +
            f' {r["ghost_over_vectorized"]:>9.2f}'
            f' {r["vectorized_over_sgd"]:>8.2f} {r["ghost_over_sgd"]:>9.2f}'
            f' {r["ghost_tape_over_sgd"]:>9.2f}', flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'quick': args.quick, 'rounds': rounds, 'calls': calls,
               'l2_norm_clip': L2_NORM_CLIP, 'cores': os.cpu_count(),
               'tolerance': TOLERANCE, 'parity': parity,
               'results': results}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
