"""The public subspace a deployment trains in, built or checked the same way
by the server (`DeploymentServer`) and the device export (`tds.lite`).

A deployed subspace (`core.count_sketch`) must be rebuildable from what the
server and the devices already share: the public initial model (the origin)
and a seed. Nothing of P is ever sent or stored: a checkpoint keeps the
origin, the dimension and the seed, and a device's .tflite bakes in the
same sketch. So a `core.Subspace` passed in is accepted only if it is the
sketch of those three; a fraction (or a number of dimensions) builds it.

Privacy: the origin is the seeded initialization every device ships with
and the seed is chosen before any data is seen, so neither choosing nor
rebuilding the subspace releases anything.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np

from tf_dpsparse import core


def deployed_subspace(initial_weights, subspace: Union[None, float, int,
                                                       core.Subspace],
                      seed: int = 0) -> Optional[core.Subspace]:
  """The count sketch around `initial_weights` (flat float32), or None.

  `subspace`: None (train the weights themselves), a fraction in (0, 1) of
  the weights or a number of dimensions (`core.subspace_dims`), or a
  `core.Subspace` that must equal `core.count_sketch(initial_weights,
  dims, seed)`: devices and a resumed server rebuild P from the seed alone.
  Raises ValueError, naming what differs, otherwise.
  """
  if subspace is None:
    return None
  if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
      or seed < 0):
    raise ValueError(f'subspace_seed must be an integer >= 0, got {seed!r}.')
  origin = np.asarray(initial_weights, np.float32).reshape(-1)
  if not isinstance(subspace, core.Subspace):
    return core.count_sketch(origin, core.subspace_dims(origin.size, subspace),
                             int(seed))
  if subspace.origin.shape != origin.shape or not np.array_equal(
      subspace.origin, origin):
    raise ValueError('the subspace\'s origin is not the initial weights: '
                     'theta = origin + P z must start at the public initial '
                     'model every device ships with.')
  rebuilt = core.count_sketch(origin, subspace.dims, int(seed))
  if not (np.array_equal(rebuilt.buckets, subspace.buckets) and
          np.array_equal(rebuilt.coefs, subspace.coefs)):
    raise ValueError(
        f'the subspace is not core.count_sketch(initial_weights, '
        f'{subspace.dims}, seed={seed}): devices and a resumed server rebuild '
        'P from the seed, so pass the seed it was built with.')
  return subspace
