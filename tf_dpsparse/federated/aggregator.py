"""Upload aggregation: `DPSparseAggregatorFactory`, a `tff.aggregators` factory.

Each device uploads a `SparseUpdate` (k indices and values of a flat update
of `size` parameters): this is what travels on the wire. The factory does
one job, the sparse part: it densifies the uploads, counts their exact
bytes (the codec's size of every payload), and hands the dense updates to
an inner `tff.aggregators` factory, nested the way TFF nests its own:

- no privacy, or example-level DP (uploads are DP already): TFF's
  `UnweightedMeanFactory`;
- client-level DP: TFF's `DifferentiallyPrivateFactory` around the
  mechanism's own `DPQuery` (`tds.privacy.ClientLevelDP.query`), which
  clips every update again (a device cannot raise its own sensitivity),
  adds N(0, (z C)^2) once to the sum and divides by the public expected
  cohort. The noise and the DpEvent the ledger records come from that one
  query.

Privacy (client level): the indices a device picks are seen by this
aggregator, so it must be trusted; only the noised aggregate is released
(DESIGN.md, trusted aggregator). The top-k and the residual happen on the
device (`core.sparse_upload`): an aggregation process cannot return
per-client state, and the residual must never leave the device.
"""

from __future__ import annotations

import collections
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse.wire import codec


def sparse_type(k: int) -> tff.StructType:
  """The TFF type of one upload: k int32 indices and k float32 values."""
  return tff.StructType([('indices', tff.TensorType(np.int32, [k])),
                         ('values', tff.TensorType(np.float32, [k]))])


def inner_factory(privacy) -> tff.aggregators.UnweightedAggregationFactory:
  """The dense aggregation `privacy` calls for (see the module docstring)."""
  query = None if privacy is None else privacy.aggregation_query()
  if query is None:
    return tff.aggregators.UnweightedMeanFactory()
  return tff.aggregators.DifferentiallyPrivateFactory(query)


class BoundedUpdateFactory(tff.aggregators.UnweightedAggregationFactory):
  """Bounds every client's dense update before an inner factory sees it.

  `core.bound_update` per client: a non-finite update is zeroed; one whose
  L2 norm exceeds `max_norm` is zeroed (`policy='zero'`, TFF's
  `zeroing_factory`) or clipped (`'clip'`). The norm is overflow-free, so a
  payload of finite values near the float32 limit cannot turn the model
  into inf or NaN. Nested like TFF's robust factories; measurements: the
  counts `non_finite`, `over_bound`, and the inner factory's under `inner`.
  """

  def __init__(self, inner: tff.aggregators.UnweightedAggregationFactory, *,
               max_norm: Optional[float] = None, policy: str = 'zero'):
    core.bound_update(np.zeros(1, np.float32), max_norm, policy)  # validates
    self._inner, self._max_norm, self._policy = inner, max_norm, policy

  def create(self, value_type) -> tff.templates.AggregationProcess:
    value_type = tff.types.to_type(value_type)
    inner = self._inner.create(value_type)
    max_norm, policy = self._max_norm, self._policy

    @tff.tensorflow.computation(value_type)
    def bound(update):
      bounded, metrics = core.bound_update(update, max_norm, policy)
      return bounded, collections.OrderedDict(
          non_finite=tf.cast(metrics.non_finite, tf.int32),
          over_bound=tf.cast(metrics.over_bound, tf.int32))

    @tff.federated_computation(inner.state_type,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, updates):
      bounded, counts = tff.federated_map(bound, updates)
      aggregated = inner.next(state, bounded)
      measurements = tff.federated_zip(collections.OrderedDict(
          counts=tff.federated_sum(counts), inner=aggregated.measurements))
      return tff.templates.MeasuredProcessOutput(
          aggregated.state, aggregated.result, measurements)

    return tff.templates.AggregationProcess(inner.initialize, next_fn)


class DPSparseAggregatorFactory(tff.aggregators.UnweightedAggregationFactory):
  """Averages sparse uploads through a nested dense factory.

  Args:
    size: the number of parameters of the flat update.
    privacy: None, a `tds.privacy.ExampleLevelDP` (plain mean) or a
      `tds.privacy.ClientLevelDP` (its DP query, nested in TFF's
      `DifferentiallyPrivateFactory`). Ignored when `inner` is given.
    inner: any unweighted `tff.aggregators` factory of float32[size].
    num_shared: the first `num_shared` indices of every upload are public
      and known to the server (`topk_with_error_feedback`'s
      `shared_indices`), so only their values travel and are counted.
    value_bits: 32, 16 or 8, the wire precision of values, for byte counts
      (devices round what they send to it: `tds.wire.to_wire_precision`).
    max_update_norm: the server's bound on one update (`BoundedUpdateFactory`,
      zeroing above it). Client level always clips at the mechanism's clip
      instead. Non-finite updates are zeroed in every case.

  Measurements: `bytes_up`, `num_clients`, and the nested factories' under
  `inner` (`counts` of bounded updates, then the dense aggregation's).
  """

  def __init__(self, size: int, *, privacy=None,
               inner: Optional[tff.aggregators.UnweightedAggregationFactory]
               = None, num_shared: int = 0, value_bits: int = 32,
               max_update_norm: Optional[float] = None):
    self._size = int(size)
    clip = None if privacy is None else privacy.upload_clip
    self._inner = BoundedUpdateFactory(
        inner if inner is not None else inner_factory(privacy),
        max_norm=clip or max_update_norm, policy='clip' if clip else 'zero')
    self._num_shared = int(num_shared)
    self._value_bits = value_bits

  def create(self, value_type) -> tff.templates.AggregationProcess:
    value_type = tff.types.to_type(value_type)
    k = value_type.indices.shape[0]
    if value_type != sparse_type(k):
      raise TypeError(f'expected uploads of type {sparse_type(k)}, got '
                      f'{value_type}.')
    if not 0 <= self._num_shared < k:
      raise ValueError(f'num_shared must be in [0, {k}), got {self._num_shared}.')
    size, value_bits, num_shared = self._size, self._value_bits, self._num_shared
    inner = self._inner.create(tff.TensorType(np.float32, [size]))

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

    @tff.federated_computation(inner.state_type,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, uploads):
      aggregated = inner.next(state, tff.federated_map(densify, uploads))
      measurements = tff.federated_zip(collections.OrderedDict(
          bytes_up=tff.federated_sum(tff.federated_map(upload_nbytes, uploads)),
          num_clients=tff.federated_sum(
              tff.federated_value(one(), tff.CLIENTS)),
          inner=aggregated.measurements))
      return tff.templates.MeasuredProcessOutput(
          aggregated.state, aggregated.result, measurements)

    return tff.templates.AggregationProcess(inner.initialize, next_fn)
