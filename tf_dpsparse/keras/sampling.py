"""`poisson_batches`: the Poisson-sampled batches DP-SGD's accountant assumes.

`model.fit(x, y, batch_size=b)` shuffles and cuts fixed-size batches, so each
example is in exactly one batch per epoch: no amplification by sampling can
be claimed, and ε is the larger shuffled bound. The Poisson line (TF
Privacy's "assuming Poisson sampling", `tds.privacy.compute_epsilon`) holds
only if every step's batch is a fresh Poisson sample of the whole data set.
This module feeds `model.fit` exactly that.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_dpsparse import core


def poisson_batches(x, y, batch_size: int, *, steps: Optional[int] = None,
                    seed: Optional[int] = None) -> tf.data.Dataset:
  """A `tf.data.Dataset` of Poisson-sampled batches, one element per step.

  For every step each of the `n = len(x)` examples joins independently with
  probability q = batch_size / n (`tds.core.poisson_sample`), so batch sizes
  vary around `batch_size`: the sampling of `PoissonSampledDpEvent`. An
  empty draw still yields a step, one example at sample weight 0 (its
  gradient is zero), because the accountant charges every step and the
  optimizer must still add its noise there. Elements are `(x_batch, y_batch,
  sample_weight)` with weights 1 for sampled examples.

  Use with `DPSparseOptimizer(..., expected_batch_size=batch_size)`, which
  divides the noised sum by q * n instead of the data-dependent realized
  count, and `PrivacyCallback(..., sampling='poisson')`:

      batches = poisson_batches(x, y, 64)
      model.fit(batches, epochs=5, steps_per_epoch=len(x) // 64, ...)

  Each step's sample is drawn from a fresh seed of `tf.data.Dataset.random`,
  rerandomized on every iteration, so epochs never replay a draw. Without
  `seed` the draws come from OS entropy (unless the program fixed
  `tf.random.set_seed`); a `seed` is for tests.

  Args:
    x: features, an array (or a `tf.nest` structure of arrays) with the
      examples on axis 0.
    y: labels, with `len(y) == len(x)`.
    batch_size: expected batch size q * n, in [1, n].
    steps: number of batches; None repeats forever (give `fit` its
      `steps_per_epoch`).
    seed: fixes the sampling (tests only).
  """
  data = (x, y)
  sizes = {int(t.shape[0]) for t in tf.nest.flatten(
      tf.nest.map_structure(tf.convert_to_tensor, data))}
  if len(sizes) != 1:
    raise ValueError(f'x and y must have the same number of examples, got '
                     f'sizes {sorted(sizes)}.')
  num_examples = sizes.pop()
  if not 0 < batch_size <= num_examples:
    raise ValueError(f'need 0 < batch_size <= len(x), got {batch_size} and '
                     f'{num_examples}.')
  if steps is not None and not (int(steps) == steps and steps >= 1):
    raise ValueError(f'steps must be a positive integer or None, got {steps}.')
  sampling_rate = batch_size / num_examples
  seeds = tf.data.Dataset.random(seed, rerandomize_each_iteration=True)
  seeds = seeds.batch(2, drop_remainder=True)
  if steps is not None:
    seeds = seeds.take(steps)

  def batch(step_seed, examples):
    indices, weights = _poisson_indices(num_examples, sampling_rate, step_seed)
    x_batch, y_batch = tf.nest.map_structure(
        lambda t: tf.gather(t, indices), examples)
    return x_batch, y_batch, weights

  examples = tf.data.Dataset.from_tensors(data).repeat()
  return tf.data.Dataset.zip((seeds, examples)).map(batch)


def _poisson_indices(num_examples: int, sampling_rate: float, seed):
  """A Poisson sample's indices and sample weights; never an empty batch.

  An empty sample becomes example 0 at weight 0: a step that contributes
  nothing to the clipped sum but still gets its noise.
  """
  indices = core.poisson_sample(num_examples, sampling_rate, seed)
  empty = tf.cast(tf.equal(tf.size(indices), 0), tf.int32)
  indices = tf.concat([indices, tf.zeros([empty], tf.int32)], 0)
  weights = tf.fill(tf.shape(indices), 1.0 - tf.cast(empty, tf.float32))
  return indices, weights
