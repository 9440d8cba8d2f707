"""Training in a public random subspace: theta = origin + P z.

Li et al. ("Measuring the Intrinsic Dimension of Objective Landscapes",
2018) train a model's d weights through s << d coordinates z of a random
subspace. Here that subspace is what federated learning trains, uploads,
noises and broadcasts (issue 18): a device's model is `origin + P z`, its
update is a change of z (s values, no index bytes), the DP noise lives in s
dimensions (its norm shrinks by sqrt(s / d) at the same ε), and a device
that missed any number of rounds catches up exactly with z itself.

P is a count sketch (FetchSGD's projection, balanced): each of the d
weights is hashed to one of s buckets, evenly (a random permutation modulo
s), with a random sign; column j is scaled to unit norm, so
`(P z)_i = sign_i z[bucket_i] / sqrt(n_bucket_i)`. It is a gather (P z) and
a segment sum (P^T g), O(d) memory, builtins in TFLite. The sweep
(benchmarks/subspace_sweep.py) chose it over per-layer blocks and SRHT.

Privacy: origin and P are public (the seeded initial model and a seeded
hash; neither depends on data), so choosing the subspace is not a release.
Gradients pulled back to z (`pullback`) are clipped and noised in z-space,
and the sensitivity argument is unchanged: one example (or one device)
changes the clipped sum by at most the clip, whatever the coordinates.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Union

import numpy as np
import tensorflow as tf


class Subspace(NamedTuple):
  """The public parametrization theta = origin + P z (P a count sketch).

  origin: float32[size], the public initial model (flat trainable weights).
  buckets: int32[size], the bucket (coordinate of z) of each weight.
  coefs: float32[size], sign / sqrt(bucket population) of each weight.
  dims: s, the number of coordinates trained.
  """
  origin: np.ndarray
  buckets: np.ndarray
  coefs: np.ndarray
  dims: int

  @property
  def size(self) -> int:
    """d, the model's number of trainable weights."""
    return int(self.origin.size)

  def expand(self, z) -> tf.Tensor:
    """The flat model origin + P z of coordinates z (float32[dims])."""
    return self.origin + tf.gather(z, self.buckets) * self.coefs

  def pullback(self, gradient) -> tf.Tensor:
    """P^T g: a gradient of the weights (float32[size], or rows [n, size])
    as the gradient of z (float32[dims], or [n, dims]), by the chain rule."""
    gradient = tf.convert_to_tensor(gradient, tf.float32)
    scaled = gradient * self.coefs
    if gradient.shape.rank == 1:
      return tf.math.unsorted_segment_sum(scaled, self.buckets, self.dims)
    return tf.transpose(tf.math.unsorted_segment_sum(
        tf.transpose(scaled), self.buckets, self.dims))


def subspace_dims(size: int, subspace: Union[float, int]) -> int:
  """s for a model of `size` weights: a fraction in (0, 1) of it, or a
  number of dimensions (an int in [1, size])."""
  if isinstance(subspace, bool) or not isinstance(subspace, numbers.Real):
    raise ValueError(f'subspace must be a fraction in (0, 1) or a number of '
                     f'dimensions, got {subspace!r}.')
  if isinstance(subspace, numbers.Integral) or subspace >= 1:
    if subspace != int(subspace) or not 1 <= subspace <= size:
      raise ValueError(f'subspace of {subspace} dimensions: must be an '
                       f'integer in [1, {size}] (the model has {size} '
                       'trainable weights), or a fraction in (0, 1).')
    return int(subspace)
  if not subspace > 0:
    raise ValueError(f'subspace must be a fraction in (0, 1) or a number of '
                     f'dimensions, got {subspace}.')
  return max(1, int(round(subspace * size)))


def count_sketch(origin, dims: int, seed: int = 0) -> Subspace:
  """The count-sketch subspace of `dims` coordinates around `origin`.

  Generated from `seed` by numpy's PCG64 (the same on every platform), so
  a device rebuilds the server's P from the seed alone; nothing of P is
  ever sent. Buckets are balanced (populations differ by at most one).
  """
  origin = np.asarray(origin, np.float32).reshape(-1)
  size = origin.size
  if not 1 <= dims <= size:
    raise ValueError(f'dims must be in [1, {size}], got {dims}.')
  rng = np.random.default_rng([seed, 7])
  buckets = rng.permutation(size) % dims
  population = np.bincount(buckets, minlength=dims)
  signs = rng.choice([-1.0, 1.0], size=size)
  coefs = (signs / np.sqrt(population[buckets])).astype(np.float32)
  return Subspace(origin, buckets.astype(np.int32), coefs, int(dims))
