"""The download stage: `build_sparse_distributor` and each device's catch-up.

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
`core.topk_catch_up` bounds it instead: the device gets the top-k of (global -
its own view), the same operation as the broadcast (`core.sparse_sync`), and
what is not sent stays in (global - view) for its next visit. In simulation
devices receive the reconstructed public weights directly; `tds.wire.apply_broadcast`
is what a real device does with the bytes, and the tests check the two agree
bit for bit.

Privacy: the global model is a function of DP uploads (example-level) or of
the noised aggregate (client-level), so choosing its top-k is post-processing.
So is a device's view: a function of the global models at the rounds the
server sampled it, and sampling does not depend on any data.

The distributor owns the download and every catch-up: its broadcast result
carries what a device needs to sync (the public model, the round, the index
history, the shared indices of the next upload, and for 'topk' the global
model), and `build_device_download` is the per-device sync. No other stage
reads the distributor's state.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse import wire
from tf_dpsparse.wire import codec

CATCH_UPS = ('union', 'topk')


def topk_catch_up_payload(target, view, k: int, value_bits: int = 32):
  """The bytes of a device's 'topk' catch-up, or None when nothing differs.

  A device applies them with `tds.wire.apply_broadcast` (they are deltas).
  """
  sent, _, _ = core.topk_catch_up(k, value_bits).update(
      tf.constant(target, tf.float32),
      core.ViewState(tf.constant(view, tf.float32)))
  sent = core.stages.nonzero(sent)
  if not int(tf.size(sent.indices)):
    return None
  return codec.encode(sent, value_bits=value_bits)


def _state_of(state: dict) -> core.BroadcastState:
  return core.BroadcastState(**state)


def _shared_indices(state: core.BroadcastState, num_shared: int):
  """The largest-magnitude `num_shared` coordinates of the last broadcast.

  Public: every up-to-date device has just decoded that broadcast, and the
  global model it came from is DP (post-processing).
  """
  _, order = tf.math.top_k(tf.abs(state.last_values), k=num_shared)
  return tf.gather(state.last_indices, order)


def build_sparse_distributor(
    initial_weights_fn: tff.Computation, *, density: float,
    value_bits: int = 32, history: int = 32, num_shared: int = 0,
    catch_up: str = 'union') -> tff.learning.templates.DistributionProcess:
  """A DistributionProcess that broadcasts the top-k change of the model.

  Args:
    initial_weights_fn: a no-arg TFF computation returning the initial
      `tff.learning.models.ModelWeights` at the server (devices ship with it).
    density: the fraction of trainable parameters broadcast each round.
    value_bits: wire precision of values (32, 16 or 8): the broadcast values
      are rounded to it, so the public model is what devices decode.
    history: how many rounds of broadcast index sets the server keeps for
      devices that catch up; older devices get the dense model.
    num_shared: how many of the last broadcast's largest coordinates every
      device's next upload starts with (`learning.num_shared`).
    catch_up: 'union' or 'topk' (then the global model goes to the
      per-device sync, which runs at the server in deployment).

  The state is a `core.BroadcastState` (as a dict); `next(state,
  global_weights@SERVER)` runs `core.sparse_broadcast` and returns at
  CLIENTS the download `build_device_download` syncs each device from. It
  measures `bytes_broadcast` (one up-to-date device's download this round)
  and `residual_norm` (L2 of global - public). Non-trainable weights, if
  any, are sent dense and counted.
  """
  if catch_up not in CATCH_UPS:
    raise ValueError(f'catch_up must be one of {CATCH_UPS}, got {catch_up!r}.')
  weights_type = initial_weights_fn.type_signature.result.member
  size = sum(int(np.prod(t.shape))
             for t in tff.structure.flatten(weights_type.trainable))
  non_trainable_nbytes = sum(
      int(np.prod(t.shape)) * value_bits // 8
      for t in tff.structure.flatten(weights_type.non_trainable))
  broadcast = core.sparse_broadcast(core.k_for_density(size, density),
                                    value_bits, history)

  @tff.tensorflow.computation(weights_type)
  def init_state(weights):
    return broadcast.init(core.flatten(weights.trainable))._asdict()

  @tff.federated_computation
  def init_fn():
    return tff.federated_map(init_state, initial_weights_fn())

  @tff.tensorflow.computation(init_state.type_signature.result, weights_type)
  def next_tf(state, weights):
    global_flat = core.flatten(weights.trainable)
    sent, new_state, metrics = broadcast.update(global_flat, _state_of(state))
    download = collections.OrderedDict(
        weights=tff.learning.models.ModelWeights(
            trainable=core.unflatten(new_state.public, weights.trainable),
            non_trainable=weights.non_trainable),
        round_num=new_state.round_num,
        history_indices=new_state.history_indices,
        history_rounds=new_state.history_rounds,
        shared_indices=_shared_indices(new_state, num_shared))
    if catch_up == 'topk':
      download['global_weights'] = global_flat
    measurements = collections.OrderedDict(
        bytes_broadcast=codec.encoded_nbytes(sent.indices, size, value_bits)
        + non_trainable_nbytes,
        residual_norm=metrics.residual_norm)
    return new_state._asdict(), download, measurements

  @tff.federated_computation(
      tff.FederatedType(init_state.type_signature.result, tff.SERVER),
      tff.FederatedType(weights_type, tff.SERVER))
  def next_fn(state, weights):
    new_state, download, measurements = tff.federated_map(
        next_tf, (state, weights))
    return tff.templates.MeasuredProcessOutput(
        new_state, tff.federated_broadcast(download), measurements)

  return tff.learning.templates.DistributionProcess(init_fn, next_fn)


def build_device_download(download_type, client_state_type, *, catch_up: str,
                          catch_up_density: float, value_bits: int = 32):
  """Each device's sync: `(download, client_state) -> (weights, client_state,
  nbytes)`, a server computation placed where the device's state is.

  'union': the device lands on the public model; `nbytes` is its exact
  catch-up (`tds.wire.catch_up_nbytes`). 'topk': its view moves toward the
  global model by `core.topk_catch_up`, and it trains from that view. A
  device that missed the last broadcast also needs the shared indices.
  """
  size = download_type.global_weights.shape[0] if catch_up == 'topk' else sum(
      int(np.prod(t.shape))
      for t in tff.structure.flatten(download_type.weights.trainable))
  num_shared = download_type.shared_indices.shape[0]
  view_sync = core.topk_catch_up(core.k_for_density(size, catch_up_density),
                                 value_bits)

  @tff.tensorflow.computation(download_type, client_state_type)
  def device_download(download, client_state):
    synced = tff.structure.to_odict(client_state)
    synced['last_sync_round'] = download['round_num']
    weights = download['weights']
    if catch_up == 'topk':
      _, view, nbytes = view_sync.update(download['global_weights'],
                                         core.ViewState(client_state.view))
      synced['view'] = view.view
      weights = tff.learning.models.ModelWeights(
          trainable=list(core.unflatten(view.view, weights.trainable)),
          non_trainable=weights.non_trainable)
    else:
      nbytes = wire.catch_up_nbytes(
          download['history_indices'], download['history_rounds'],
          client_state.last_sync_round, download['round_num'], size, value_bits)
    if num_shared:
      stale = download['round_num'] - client_state.last_sync_round > 1
      nbytes += tf.where(stale, codec.index_nbytes(download['shared_indices'],
                                                   size),
                         tf.constant(0, tf.int64))
    return weights, synced, nbytes

  return device_download
