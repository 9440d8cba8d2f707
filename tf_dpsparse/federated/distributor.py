"""Download compression: `build_sparse_distributor`, a TFF DistributionProcess.

The server keeps the *public model*: what every up-to-date device has
reconstructed from all broadcasts so far. Each round it broadcasts the top-k
of (global - public) and adds it to the public model. Error feedback is
implicit and exact: whatever was not sent is still in (global - public), the
server residual, and competes for the next broadcast.

A device that skipped rounds catches up with the union of the index sets
broadcast since it last synced (values read off the current public model, in
float32), or with the dense model when that is smaller or older than the kept
history; its exact bytes are `tds.wire.catch_up_nbytes`. That exact catch-up is cheap
only when devices take part in most rounds; with sparse client sampling a
returning device has missed so many broadcasts that the union nears the dense
model.
`topk_catch_up` bounds it instead: the device gets the top-k of (global -
its own view), the same operation as the broadcast (`core.sparse_sync`), and
what is not sent stays in (global - view) for its next visit. In simulation
devices receive the reconstructed public weights directly; `tds.wire.apply_broadcast`
is what a real device does with the bytes, and the tests check the two agree
bit for bit.

Privacy: the global model is a function of DP uploads (example-level) or of
the noised aggregate (client-level), so choosing its top-k is post-processing.
So is a device's view: a function of the global models at the rounds the
server sampled it, and sampling does not depend on any data.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse.wire import codec


def _state_type(size, k, history):
  return tff.StructType([
      ('public', tff.TensorType(np.float32, [size])),
      ('round_num', tff.TensorType(np.int32)),
      ('history_indices', tff.TensorType(np.int32, [history, k])),
      ('history_rounds', tff.TensorType(np.int32, [history])),
      ('last_indices', tff.TensorType(np.int32, [k])),
      ('last_values', tff.TensorType(np.float32, [k])),
  ])


def _nonzero(sent: core.SparseUpdate) -> core.SparseUpdate:
  keep = tf.not_equal(sent.values, 0.0)
  return sent._replace(indices=tf.boolean_mask(sent.indices, keep),
                       values=tf.boolean_mask(sent.values, keep))


def topk_catch_up(target, view, k: int, value_bits: int = 32):
  """A device's lossy catch-up: `(new_view, nbytes)`.

  `core.sparse_sync` of its view toward `target` (the global model), the zero
  entries dropped so a device with nothing to learn downloads nothing. A
  device that synced last round holds the public model, and its catch-up is
  then exactly that round's broadcast; one that missed rounds gets the k
  largest of everything it missed, and the rest waits for its next visit.
  """
  sent, new_view = core.sparse_sync(target, view, k, value_bits)
  indices = _nonzero(sent).indices
  nbytes = tf.where(tf.size(indices) > 0,
                    codec.encoded_nbytes(indices, int(sent.size), value_bits),
                    tf.constant(0, tf.int64))
  return new_view, nbytes


def topk_catch_up_payload(target, view, k: int, value_bits: int = 32):
  """The bytes of `topk_catch_up`, or None when there is nothing to send.

  A device applies them with `tds.wire.apply_broadcast` (they are deltas).
  """
  sent, _ = core.sparse_sync(tf.constant(target, tf.float32),
                             tf.constant(view, tf.float32), k, value_bits)
  sent = _nonzero(sent)
  if not int(tf.size(sent.indices)):
    return None
  return codec.encode(sent, value_bits=value_bits)


def build_sparse_distributor(
    initial_weights_fn: tff.Computation, *, density: float,
    value_bits: int = 32, history: int = 32) -> tff.learning.templates.DistributionProcess:
  """A DistributionProcess that broadcasts the top-k change of the model.

  Args:
    initial_weights_fn: a no-arg TFF computation returning the initial
      `tff.learning.models.ModelWeights` at the server (devices ship with it).
    density: the fraction of trainable parameters broadcast each round.
    value_bits: wire precision of values (32, 16 or 8): the broadcast values
      are rounded to it, so the public model is what devices decode.
    history: how many rounds of broadcast index sets the server keeps for
      devices that catch up; older devices get the dense model.

  The process's `next(state, global_weights@SERVER)` returns the public
  model weights at CLIENTS and measures `bytes_broadcast` (one up-to-date
  device's download this round) and `residual_norm` (L2 of global - public).
  Non-trainable weights, if any, are sent dense and counted.
  """
  weights_type = initial_weights_fn.type_signature.result.member
  trainable_type = weights_type.trainable
  size = sum(int(np.prod(t.shape)) for t in tff.structure.flatten(trainable_type))
  non_trainable_nbytes = sum(
      int(np.prod(t.shape)) * value_bits // 8
      for t in tff.structure.flatten(weights_type.non_trainable))
  k = core.k_for_density(size, density)
  state_type = _state_type(size, k, history)

  @tff.tensorflow.computation(weights_type)
  def init_state(weights):
    return collections.OrderedDict(
        public=core.flatten(weights.trainable),
        round_num=tf.constant(0, tf.int32),
        history_indices=tf.fill([history, k], -1),
        history_rounds=tf.fill([history], -1),
        last_indices=tf.zeros([k], tf.int32),
        last_values=tf.zeros([k], tf.float32))

  @tff.federated_computation
  def init_fn():
    return tff.federated_map(init_state, initial_weights_fn())

  @tff.tensorflow.computation(state_type, weights_type)
  def broadcast(state, weights):
    sparse, public = core.sparse_sync(core.flatten(weights.trainable),
                                      state.public, k, value_bits)
    round_num = state.round_num + 1
    slot = tf.math.floormod(round_num, history)
    new_state = collections.OrderedDict(
        public=public,
        round_num=round_num,
        history_indices=tf.tensor_scatter_nd_update(
            state.history_indices, [[slot]], sparse.indices[None]),
        history_rounds=tf.tensor_scatter_nd_update(
            state.history_rounds, [[slot]], [round_num]),
        last_indices=sparse.indices,
        last_values=sparse.values)
    public_weights = tff.learning.models.ModelWeights(
        trainable=core.unflatten(public, weights.trainable),
        non_trainable=weights.non_trainable)
    measurements = collections.OrderedDict(
        bytes_broadcast=codec.encoded_nbytes(sparse.indices, size, value_bits)
        + non_trainable_nbytes,
        residual_norm=tf.norm(core.flatten(weights.trainable) - public))
    return new_state, public_weights, measurements

  @tff.federated_computation(tff.FederatedType(state_type, tff.SERVER),
                             tff.FederatedType(weights_type, tff.SERVER))
  def next_fn(state, weights):
    new_state, public_weights, measurements = tff.federated_map(
        broadcast, (state, weights))
    return tff.templates.MeasuredProcessOutput(
        new_state, tff.federated_broadcast(public_weights), measurements)

  return tff.learning.templates.DistributionProcess(init_fn, next_fn)
