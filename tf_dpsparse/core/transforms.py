"""The update transforms every front composes: clip, noise, top-k, densify.

Pure TensorFlow: each function works eagerly, inside `tf.function` and inside
TFF's TensorFlow computations. State is explicit (the error-feedback residual
is passed in and returned), in the style of optax's transforms, so a caller
decides where it lives: on the device, in a TFF client-state store, or in a
Keras optimizer slot.

The privacy reasoning of a pipeline is the caller's, and it rests on order:
`clip_by_l2_norm` bounds sensitivity, `add_gaussian_noise` privatizes, and only
then may `topk_with_error_feedback` choose indices (post-processing of noised
values). Top-k never raises the L2 norm, so clip -> top-k keeps the bound.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import tensorflow as tf

from tf_dpsparse.core.sparse import SparseUpdate
from tf_dpsparse.core.sparse import densify
from tf_dpsparse.wire.formats import to_wire_precision

SeedLike = Union[None, int, tf.Tensor]


def flatten(structure) -> tf.Tensor:
  """Concatenates a `tf.nest` structure of tensors into one float32 vector."""
  leaves = tf.nest.flatten(structure)
  if not leaves:
    raise ValueError('flatten: the structure has no tensors.')
  return tf.concat(
      [tf.reshape(tf.cast(t, tf.float32), [-1]) for t in leaves], axis=0)


def unflatten(flat: tf.Tensor, like):
  """Inverse of `flatten`: splits `flat` into tensors shaped and typed as `like`.

  `like` is a structure of tensors, variables or `tf.TensorSpec`s with fully
  defined shapes.
  """
  flat = tf.convert_to_tensor(flat)
  leaves = tf.nest.flatten(like)
  shapes = [tf.TensorShape(t.shape) for t in leaves]
  for shape in shapes:
    if not shape.is_fully_defined():
      raise ValueError(f'unflatten: shape {shape} is not fully defined.')
  sizes = [shape.num_elements() for shape in shapes]
  expected = sum(sizes)
  if flat.shape.rank != 1 or (flat.shape[0] is not None and
                              flat.shape[0] != expected):
    raise ValueError(
        f'unflatten: expected a vector of {expected} elements, got shape '
        f'{flat.shape}.')
  parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
  tensors = [
      tf.cast(tf.reshape(p, shape), t.dtype)
      for p, shape, t in zip(parts, shapes, leaves)
  ]
  return tf.nest.pack_sequence_as(like, tensors)


def clip_by_l2_norm(tensor, clip) -> Tuple[Any, tf.Tensor]:
  """Scales `tensor` (a tensor or a structure) to global L2 norm <= `clip`.

  Returns `(clipped, global_norm)` where `global_norm` is the norm *before*
  clipping (what DP-FedAvg reports as the fraction clipped). This is the step
  that bounds the sensitivity of everything computed afterwards.
  """
  if isinstance(clip, (int, float)) and not clip > 0:
    raise ValueError(f'clip must be > 0, got {clip}.')
  leaves = tf.nest.flatten(tensor)
  clipped, norm = tf.clip_by_global_norm(leaves, clip)
  return tf.nest.pack_sequence_as(tensor, clipped), norm


def robust_l2_norm(flat: tf.Tensor) -> tf.Tensor:
  """The L2 norm of a vector without overflow: max|x| * ||x / max|x|||.

  `tf.norm` squares first, so finite values above ~1.8e19 give `inf` and a
  clip then turns them into NaN. Scaling by the largest magnitude first
  keeps every square <= 1. Any non-finite value (NaN included) gives `inf`,
  so `norm <= bound` is False for it.
  """
  flat = tf.convert_to_tensor(flat, tf.float32)
  is_finite = tf.math.is_finite(flat)
  finite_values = tf.where(is_finite, flat, 0.0)
  peak = tf.reduce_max(tf.concat([tf.abs(finite_values), [0.0]], 0))
  safe = tf.where(peak > 0, peak, 1.0)
  norm = safe * tf.norm(finite_values / safe)
  return tf.where(tf.reduce_all(is_finite), norm, float('inf'))


class BoundMetrics(NamedTuple):
  """What `bound_update` did to one update (bool scalars) and its norm."""
  non_finite: tf.Tensor  # a NaN or inf: zeroed
  over_bound: tf.Tensor  # finite, norm above the bound: zeroed or clipped
  norm: tf.Tensor  # robust_l2_norm before bounding (inf if non-finite)


BOUND_POLICIES = ('zero', 'clip')


def bound_update(flat: tf.Tensor, max_norm: Optional[float] = None,
                 policy: str = 'zero') -> Tuple[tf.Tensor, BoundMetrics]:
  """What a server lets one received update contribute, at most.

  A non-finite update becomes zeros. A finite one whose L2 norm exceeds
  `max_norm` becomes zeros (`policy='zero'`, TFF's `zeroing_factory`: an
  honest update never gets there, a hostile one contributes nothing) or is
  scaled to `max_norm` (`'clip'`, DP-FedAvg's sensitivity bound). The norm
  is `robust_l2_norm`, and clipping scales by the peak first, so values near
  the float32 limit are bounded, never turned into NaN. Returns `(bounded,
  BoundMetrics)`.
  """
  if policy not in BOUND_POLICIES:
    raise ValueError(f'policy must be one of {BOUND_POLICIES}, got {policy!r}.')
  if max_norm is not None and not max_norm > 0:
    raise ValueError(f'max_norm must be > 0, got {max_norm}.')
  flat = tf.convert_to_tensor(flat, tf.float32)
  norm = robust_l2_norm(flat)
  non_finite = tf.logical_not(tf.math.is_finite(norm))
  over = tf.constant(False) if max_norm is None else tf.logical_and(
      tf.logical_not(non_finite), norm > max_norm)
  zeros = tf.zeros_like(flat)
  if policy == 'clip' and max_norm is not None:
    peak = tf.reduce_max(tf.concat([tf.abs(tf.where(non_finite, zeros,
                                                    flat)), [1.0]], 0))
    clipped = (flat / peak) * (max_norm / (norm / peak))
    bounded = tf.where(over, clipped, flat)
  else:
    bounded = tf.where(over, zeros, flat)
  return tf.where(non_finite, zeros, bounded), BoundMetrics(non_finite, over,
                                                            norm)


def clip_rows_by_l2_norm(rows: tf.Tensor, clip) -> Tuple[tf.Tensor, tf.Tensor]:
  """Clips each row of a [n, d] matrix (one flat gradient per example) to L2 <= clip.

  Vectorized per-example clipping for DP-SGD. Returns `(clipped, norms)` with
  the norms before clipping.
  """
  if isinstance(clip, (int, float)) and not clip > 0:
    raise ValueError(f'clip must be > 0, got {clip}.')
  rows = tf.convert_to_tensor(rows)
  norms = tf.sqrt(tf.reduce_sum(tf.square(rows), axis=1))
  scale = tf.minimum(1.0, clip / tf.maximum(norms, 1e-12))
  return rows * scale[:, tf.newaxis], norms


def gaussian_average(rows: tf.Tensor, l2_norm_clip, noise_multiplier,
                     seed: SeedLike = None, *, denominator=None
                     ) -> Tuple[tf.Tensor, tf.Tensor]:
  """DP-SGD's private mean of per-example (or per-microbatch) flat gradients.

  Clips every row to `l2_norm_clip`, sums, and `noised_average`s the sum:
  the sampled Gaussian mechanism with sensitivity `l2_norm_clip` under
  add/remove of one row. `denominator` defaults to the number of rows, the
  public size of a fixed-size batch; under Poisson sampling pass the
  expected batch size. Returns `(average, norms)`.
  """
  if isinstance(noise_multiplier, (int, float)) and noise_multiplier < 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
  total, norms = clipped_sum(rows, l2_norm_clip)
  if denominator is None:
    denominator = tf.shape(rows)[0]
  return noised_average(total, l2_norm_clip, noise_multiplier, denominator,
                        seed), norms


def noised_average(clipped_total: tf.Tensor, l2_norm_clip, noise_multiplier,
                   denominator, seed: SeedLike = None) -> tf.Tensor:
  """Adds N(0, (noise_multiplier * l2_norm_clip)^2) once to a clipped sum and
  divides by `denominator`.

  The denominator must not depend on the data: the number of rows of a
  fixed-size batch, or the *expected* batch size q * n under Poisson
  sampling, never the realized count of a Poisson batch (data-dependent, it
  would leak through the scale).
  """
  noised = add_gaussian_noise(clipped_total, noise_multiplier * l2_norm_clip,
                              seed)
  return noised / tf.cast(denominator, noised.dtype)


def clipped_sum(rows: tf.Tensor, l2_norm_clip,
                row_mask: Optional[tf.Tensor] = None
                ) -> Tuple[tf.Tensor, tf.Tensor]:
  """The sum of the rows, each clipped to `l2_norm_clip`, masked rows left out.

  Returns `(sum, norms)`: the DP-SGD sum before noise; its sensitivity is
  `l2_norm_clip` under add/remove of one row.
  """
  clipped, norms = clip_rows_by_l2_norm(rows, l2_norm_clip)
  if row_mask is not None:
    clipped *= tf.cast(row_mask, clipped.dtype)[:, tf.newaxis]
  return tf.reduce_sum(clipped, axis=0), norms


def poisson_sample(num_examples, sampling_rate,
                   seed: SeedLike = None) -> tf.Tensor:
  """Indices (int32, ascending) of a Poisson sample of `range(num_examples)`.

  Each example joins independently with probability `sampling_rate`: the
  sampling that `PoissonSampledDpEvent` accounts for. The sample may be
  empty or larger than its mean. Without `seed` the draw is from OS entropy.
  """
  shape = tf.reshape(tf.cast(num_examples, tf.int32), [1])
  if seed is None:
    draws = tf.random.uniform(shape)
  else:
    draws = tf.random.stateless_uniform(shape, seed=_stateless_seed(seed))
  return tf.cast(tf.where(draws < sampling_rate)[:, 0], tf.int32)


def padded_chunks(indices: tf.Tensor,
                  max_batch: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """Splits a vector of indices into rows of a static `max_batch` columns.

  Returns `(chunks, valid)`, int32 and bool [m, max_batch] with m =
  max(1, ceil(len / max_batch)): every index once, the tail padded with 0
  marked invalid. Nothing is dropped, so a batch larger than `max_batch`
  costs one more chunk, never a truncation that the accountant would not
  know about.
  """
  if not max_batch >= 1:
    raise ValueError(f'max_batch must be >= 1, got {max_batch}.')
  count = tf.size(indices)
  chunks = tf.maximum(1, (count + max_batch - 1) // max_batch)
  padding = chunks * max_batch - count
  padded = tf.concat([indices, tf.zeros([padding], indices.dtype)], 0)
  valid = tf.range(chunks * max_batch) < count
  return (tf.reshape(padded, [chunks, max_batch]),
          tf.reshape(valid, [chunks, max_batch]))


def default_max_batch(batch_size: int) -> int:
  """Rows per padded chunk of a Poisson batch at static shapes (TFLite).

  A Poisson batch of expected size b holds about Poisson(b) examples. Each
  chunk costs a vectorized pass of its rows plus a fixed overhead, so the
  chunk is the 95 % quantile of Poisson(b) (23 at b = 16): padding stays
  moderate and a larger sample, 1 step in 20, takes one more chunk. It
  changes cost only, never privacy (`padded_chunks` never truncates).
  """
  if not batch_size >= 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  count, pmf = 0, math.exp(-batch_size)
  cdf = pmf
  while cdf < 0.95:
    count += 1
    pmf *= batch_size / count
    cdf += pmf
  return count


def poisson_gaussian_average(rows_fn=None, *, clipped_sum_fn=None,
                             num_examples, sampling_rate, size: int,
                             l2_norm_clip, noise_multiplier,
                             seed: SeedLike = None
                             ) -> Tuple[tf.Tensor, tf.Tensor]:
  """One DP-SGD step on a Poisson-sampled batch.

  Samples each of `num_examples` examples with probability `sampling_rate`
  (`poisson_sample`), clips each sampled example's gradient to
  `l2_norm_clip`, sums, adds N(0, (noise_multiplier * l2_norm_clip)^2) once
  and divides by the expected batch size `sampling_rate * num_examples`.
  An empty sample still releases the noise (the accountant charges every
  step). Nothing is truncated, so the release is exactly the
  Poisson-sampled Gaussian mechanism of `tds.privacy.sampled_gaussian_event`.

  The clipped sum comes from exactly one of:
  - `rows_fn(indices int32[count]) -> float32[count, size]`, the sampled
    examples' per-example gradients, clipped and summed here
    (`clipped_sum`);
  - `clipped_sum_fn(indices, l2_norm_clip) -> float32[size]`, the clipped
    sum computed by the caller without the [count, size] rows (ghost norms,
    `tds.keras.per_example.ghost_clipped_sum`), which is cheaper where it
    applies. Privacy assumption: it is the sum over the sampled examples of
    each one's own gradient scaled to L2 <= `l2_norm_clip` (w_i = min(1,
    clip / its exact norm)), so one example's contribution is bounded by the
    clip exactly as with the rows, and the same mechanism is released.
  The clip is passed in, so the mechanism's clip is the only one.

  The batch dimension is dynamic, which TensorFlow graphs (and TFF's) allow
  at no padding cost; where shapes must be static (TFLite), pad with
  `padded_chunks` instead (the LiteRT client). Returns `(average,
  batch_count)`; the count is data-dependent, for the caller's own metrics
  only, never to be released.
  """
  sum_fn = _sampled_clipped_sum(rows_fn, clipped_sum_fn)
  sample_seed = noise_seed = None
  if seed is not None:
    sample_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(_stateless_seed(seed), 2))
  indices = poisson_sample(num_examples, sampling_rate, sample_seed)
  total = tf.cond(tf.size(indices) > 0,
                  lambda: sum_fn(indices, l2_norm_clip),
                  lambda: tf.zeros([size]))
  expected = sampling_rate * tf.cast(num_examples, tf.float32)
  return noised_average(total, l2_norm_clip, noise_multiplier, expected,
                        noise_seed), tf.size(indices)


def _sampled_clipped_sum(rows_fn, clipped_sum_fn):
  """`clipped_sum_fn`, or the clipped sum of `rows_fn`'s rows: exactly one
  of them must be given (see `poisson_gaussian_average`)."""
  if (rows_fn is None) == (clipped_sum_fn is None):
    raise ValueError('pass exactly one of rows_fn and clipped_sum_fn.')
  if clipped_sum_fn is not None:
    return clipped_sum_fn
  return lambda indices, clip: clipped_sum(rows_fn(indices), clip)[0]


def _stateless_seed(seed) -> tf.Tensor:
  if isinstance(seed, int):
    return tf.constant([seed, 0], dtype=tf.int64)
  seed = tf.convert_to_tensor(seed)
  if seed.shape != (2,):
    raise ValueError(f'seed must be an int or a shape-[2] tensor, got {seed}.')
  return seed


def add_gaussian_noise(tensor, stddev, seed: SeedLike = None):
  """Adds i.i.d. N(0, stddev^2) noise to a tensor or a structure of tensors.

  Without `seed` the noise comes from TensorFlow's stateful RNG, which draws
  its seed from OS entropy (unless the program called `tf.random.set_seed`),
  so two runs never share noise. A `seed` (int or shape-[2] tensor) makes the
  draw stateless and reproducible: for tests, or for a caller that advances
  the seed itself (see `fold_in_seed`). Never reuse a seed across releases:
  identical noise on two releases cancels in their difference.
  """
  if isinstance(stddev, (int, float)) and stddev < 0:
    raise ValueError(f'stddev must be >= 0, got {stddev}.')
  leaves = tf.nest.flatten(tensor)
  if seed is not None:
    seeds = tf.random.experimental.stateless_split(
        _stateless_seed(seed), num=len(leaves))
  noised = []
  for i, t in enumerate(leaves):
    t = tf.convert_to_tensor(t)
    if seed is None:
      noise = tf.random.normal(tf.shape(t), stddev=stddev, dtype=t.dtype)
    else:
      noise = tf.random.stateless_normal(
          tf.shape(t), seed=seeds[i], stddev=stddev, dtype=t.dtype)
    noised.append(t + noise)
  return tf.nest.pack_sequence_as(tensor, noised)


def fold_in_seed(seed, data) -> tf.Tensor:
  """A fresh stateless seed derived from `seed` and a counter (round, step)."""
  return tf.random.experimental.stateless_fold_in(_stateless_seed(seed), data)


def k_for_density(size: int, density: float) -> int:
  """Number of coordinates kept at `density` in (0, 1]: ceil(density * size)."""
  if not 0.0 < density <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density}.')
  if size < 1:
    raise ValueError(f'size must be >= 1, got {size}.')
  return min(size, max(1, math.ceil(density * size - 1e-9)))


def error_feedback_gain(k: int, size: int, value_bits: int = 32) -> float:
  """How much larger than the largest update an error-feedback upload gets.

  Top-k keeps at least k/size of ||x + e||^2, and rounding toward zero at
  `value_bits` gives back at most a fraction c of the sent norm (c = 0 at
  32 bits, 2^-10 at 16, sqrt(k)/63.5 at 8: each int8 value is off by less
  than its block's scale, itself < peak/63.5). So ||e'||^2 <= (1 - delta)
  ||x + e||^2 with delta = (k/size)(1 - c^2), and by induction every
  upload obeys ||x + e|| <= max ||x|| / (1 - sqrt(1 - delta)). Returns that
  factor, or inf when rounding can undo the contraction (c >= 1).
  """
  c = {32: 0.0, 16: 2.0**-10, 8: math.sqrt(k) / 63.5}[value_bits]
  delta = (k / size) * (1 - c * c)
  if delta <= 0:
    return math.inf
  return 1 / (1 - math.sqrt(1 - delta))


def topk_with_error_feedback(
    flat: tf.Tensor, k, residual: Optional[tf.Tensor] = None, *,
    shared_indices: Optional[tf.Tensor] = None
) -> Tuple[SparseUpdate, tf.Tensor]:
  """Keeps the k largest-magnitude coordinates of `flat + residual`.

  Error feedback: whatever is not sent stays in `new_residual` and is added to
  the next update, so nothing is lost over time. Conservation is exact,
  `densify(sent) + new_residual == flat + residual`, because each coordinate
  of the sum goes, unchanged, to exactly one of the two.

  `shared_indices` (s distinct indices every sender knows, s < k) are always
  sent, first, and the top k - s of the other coordinates follow: time-
  correlated sparsification (Ozfatura et al., ISIT 2021). When many devices
  send values on the same coordinates, their independent DP noise averages
  out there instead of each device's top-k chasing its own noise; the shared
  part costs no index bytes.

  Privacy: the choice of indices is a function of `flat + residual` (and of
  `shared_indices`, which must be public, e.g. the last broadcast's). It is
  private only if both are (functions of) already-noised values, or if the
  result is never released except inside a noised aggregate. Callers state
  which; this function adds no privacy.
  """
  flat = tf.convert_to_tensor(flat, tf.float32)
  if flat.shape.rank != 1:
    raise ValueError(f'flat must be a vector, got shape {flat.shape}.')
  size = flat.shape[0]
  if size is None:
    raise ValueError('flat must have a static length.')
  if isinstance(k, int) and not 0 < k <= size:
    raise ValueError(f'k must be in [1, {size}], got {k}.')
  accumulated = flat if residual is None else flat + residual
  if shared_indices is None:
    _, indices = tf.math.top_k(tf.abs(accumulated), k=k, sorted=False)
  else:
    shared_indices = tf.convert_to_tensor(shared_indices, tf.int32)
    num_shared = shared_indices.shape[0]
    if num_shared is None or isinstance(k, int) and not num_shared < k:
      raise ValueError(f'need a static number of shared indices < k={k}, '
                       f'got shape {shared_indices.shape}.')
    # Magnitudes are >= 0, so -1 keeps the shared coordinates out of the rest.
    others = tf.tensor_scatter_nd_update(
        tf.abs(accumulated), shared_indices[:, tf.newaxis],
        -tf.ones([num_shared]))
    _, own = tf.math.top_k(others, k=k - num_shared, sorted=False)
    indices = tf.concat([shared_indices, own], 0)
  values = tf.gather(accumulated, indices)
  new_residual = tf.tensor_scatter_nd_update(
      accumulated, indices[:, tf.newaxis], tf.zeros_like(values))
  return SparseUpdate(indices, values, size), new_residual


def clipped_topk_with_error_feedback(
    flat: tf.Tensor, k, residual: Optional[tf.Tensor],
    l2_norm_clip=None, *, shared_indices: Optional[tf.Tensor] = None,
    value_bits: int = 32, clip_feedback: bool = True
) -> Tuple[SparseUpdate, tf.Tensor, tf.Tensor]:
  """Top-k of `flat + residual`, then the *sent* values clipped to `l2_norm_clip`.

  This is the device side of a client-level DP upload. Clipping what is sent,
  not the update before error feedback, is what bounds each round's
  sensitivity: the residual carries earlier rounds' data, so `clip(update) +
  residual` could exceed the clip. What clipping removes goes back into the
  residual (it stays on the device), so nothing is lost:
  `densify(sent) + new_residual == flat + residual` up to float rounding.
  The sent values are then rounded to the wire's `value_bits`
  (`to_wire_precision`, never growing a magnitude), the rounding error also
  kept in the residual. With `l2_norm_clip=None` and 32 bits this is
  `topk_with_error_feedback` (which explains `shared_indices`).
  `clip_feedback=False` drops what clipping removes instead, as DP-FedAvg
  does (top-k's and rounding's errors are still kept): when every device is
  clipped every visit, the kept excess grows by about (norm - clip) a visit
  and comes to outweigh the new update. Returns `(sent, new_residual,
  was_clipped)`.
  """
  sparse, new_residual = topk_with_error_feedback(
      flat, k, residual, shared_indices=shared_indices)
  values, clipped = sparse.values, tf.constant(False)
  if l2_norm_clip is not None:
    values, norm = clip_by_l2_norm(values, l2_norm_clip)
    clipped = norm > l2_norm_clip
  kept_from = sparse.values if clip_feedback else values
  values = to_wire_precision(values, value_bits)
  if l2_norm_clip is not None or value_bits != 32:
    new_residual += densify(sparse._replace(values=kept_from - values))
  return sparse._replace(values=values), new_residual, clipped


def sparse_sync(target, view, k: int, value_bits: int = 32):
  """Moves `view` toward `target` by the top-k of their difference.

  Returns `(sent, new_view)`: `sent` holds the k largest-magnitude entries of
  (target - view) rounded to the wire's `value_bits` (toward zero), and
  `new_view = view + sent` in float32, which is exactly what a receiver
  computes from the decoded bytes (`tds.wire.apply_broadcast`). What
  is not sent, rounding included, stays in (target - new_view): error
  feedback. `sent` has a static k, so it may carry zeros when fewer than k
  entries differ. The server's broadcast (view: the public model) and a
  device's lossy catch-up (view: that device's model) are both this.

  Privacy: post-processing when `target` and `view` are.
  """
  sent, _ = topk_with_error_feedback(target - view, k)
  sent = sent._replace(values=to_wire_precision(sent.values, value_bits))
  return sent, tf.tensor_scatter_nd_add(view, sent.indices[:, None],
                                        sent.values)
