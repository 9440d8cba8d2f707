"""Upload aggregation: `DPSparseAggregatorFactory`, a `tff.aggregators` factory.

Each device uploads a `SparseUpdate` (k indices and values of a flat update of
`size` parameters); this is what travels on the wire. The factory densifies,
sums, averages and, in client-level DP mode, adds Gaussian noise at the
server, reporting the exact upload bytes (the codec's size of every payload).

Client-side top-k with the device's residual and clipping happen on the
device (`core.clipped_topk_with_error_feedback`): a TFF aggregation process
cannot return per-client state, and the residual must never leave the device.

Privacy (client-level mode): the sum's sensitivity is `l2_norm_clip` because
every device clips the sparse update it sends; the noise N(0, (z * C)^2) is
added once to the sum, and the mean divides by the fixed, public
`clients_per_round` (as TFF's `DifferentiallyPrivateFactory.gaussian_fixed`).
The indices a device picks are seen by this aggregator, so it must be
trusted: only the noised aggregate is released (DESIGN.md, trusted
aggregator). Example-level mode adds nothing here: uploads are already DP.
"""

from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse import privacy
from tf_dpsparse.wire import codec


def sparse_type(k: int) -> tff.StructType:
  """The TFF type of one upload: k int32 indices and k float32 values."""
  return tff.StructType([('indices', tff.TensorType(np.int32, [k])),
                         ('values', tff.TensorType(np.float32, [k]))])


class DPSparseAggregatorFactory(tff.aggregators.UnweightedAggregationFactory):
  """Averages sparse uploads; in client-level mode adds server Gaussian noise.

  Args:
    size: the number of parameters of the flat update.
    mode: None (plain mean over participants), 'example' (uploads are DP
      already: plain mean) or 'client' (noised sum / `clients_per_round`).
    l2_norm_clip, noise_multiplier, clients_per_round: client-level DP only.
    num_shared: the first `num_shared` indices of every upload are public and
      known to the server (`topk_with_error_feedback`'s `shared_indices`),
      so only their values travel and are counted.
    value_bits: 32, 16 or 8, the wire precision of values, for byte counts (the
      devices round what they send to it: `to_wire_precision`).
    seed: fixes the server noise (tests); OS entropy when None.
  """

  def __init__(self, size: int, *, mode: Optional[str] = None,
               l2_norm_clip: Optional[float] = None,
               noise_multiplier: Optional[float] = None,
               clients_per_round: Optional[int] = None, num_shared: int = 0,
               value_bits: int = 32, seed: Optional[int] = None):
    privacy.check_privacy_mode(mode, l2_norm_clip=l2_norm_clip,
                               noise_multiplier=noise_multiplier,
                               clients_per_round=clients_per_round)
    self._size = int(size)
    self._mode = mode
    self._clip = l2_norm_clip
    self._noise_multiplier = noise_multiplier
    self._clients_per_round = clients_per_round
    self._num_shared = int(num_shared)
    self._value_bits = value_bits
    self._seed = seed

  def create(self, value_type) -> tff.templates.AggregationProcess:
    value_type = tff.types.to_type(value_type)
    k = value_type.indices.shape[0]
    if value_type != sparse_type(k):
      raise TypeError(f'expected uploads of type {sparse_type(k)}, got '
                      f'{value_type}.')
    if not 0 <= self._num_shared < k:
      raise ValueError(f'num_shared must be in [0, {k}), got {self._num_shared}.')
    size, value_bits, num_shared = self._size, self._value_bits, self._num_shared

    @tff.tensorflow.computation(value_type)
    def densify(sparse):
      return core.densify(core.SparseUpdate(sparse.indices, sparse.values, size))

    @tff.tensorflow.computation(value_type)
    def upload_nbytes(sparse):
      return (codec.encoded_nbytes(sparse.indices[num_shared:], size, value_bits)
              + num_shared * value_bits // 8)

    @tff.tensorflow.computation
    def one():
      return np.int32(1)

    @tff.tensorflow.computation
    def init():
      return np.int64(0)  # rounds aggregated: keys seeded noise

    mode, clip, z = self._mode, self._clip, self._noise_multiplier
    clients_per_round, seed = self._clients_per_round, self._seed

    @tff.tensorflow.computation(init.type_signature.result,
                                tff.TensorType(np.float32, [size]),
                                np.int32)
    def finalize(round_num, total, count):
      if mode != 'client':
        return total / tf.maximum(tf.cast(count, tf.float32), 1.0)
      noise_seed = None if seed is None else core.fold_in_seed(seed, round_num)
      noised = core.add_gaussian_noise(total, z * clip, noise_seed)
      return noised / float(clients_per_round)

    @tff.federated_computation(
        tff.FederatedType(init.type_signature.result, tff.SERVER),
        tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, uploads):
      total = tff.federated_sum(tff.federated_map(densify, uploads))
      count = tff.federated_sum(tff.federated_value(one(), tff.CLIENTS))
      mean = tff.federated_map(finalize, (state, total, count))
      measurements = tff.federated_zip(collections.OrderedDict(
          bytes_up=tff.federated_sum(tff.federated_map(upload_nbytes, uploads)),
          num_clients=count))
      new_state = tff.federated_map(_increment, state)
      return tff.templates.MeasuredProcessOutput(new_state, mean, measurements)

    @tff.federated_computation
    def init_fn():
      return tff.federated_eval(init, tff.SERVER)

    return tff.templates.AggregationProcess(init_fn, next_fn)


@tff.tensorflow.computation(np.int64)
def _increment(round_num):
  return round_num + 1
