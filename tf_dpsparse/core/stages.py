"""The stages every front composes, as optax-style `(init, update)` pairs.

Each stage is a `Stage(init, update)`: `init` builds a small NamedTuple
state, `update` maps a value and that state to `(output, new_state,
metrics)`, pure TensorFlow, so the same stage runs in a TFF computation, a
Keras optimizer, a TFLite graph and a numpy server. Where its state lives
(a device, a client-state store, a server) is the caller's business.

- `sparse_upload`: a device's model update -> the values it sends (top-k
  with error feedback, the sent values clipped for client-level DP, rounded
  to the wire); state: the residual, which never leaves the device.
- `sparse_broadcast`: the global model -> the server's download (top-k of
  global - public); state: the public model, what up-to-date devices hold.
- `topk_catch_up`: the global model -> one device's bounded catch-up;
  state: that device's view.

One sign convention, decided here: an *update* is `initial - trained`
(`model_update`), TFF's pseudo-gradient, so the server's optimizer steps
along it like a gradient and `apply_update` with learning rate 1 is FedAvg.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from tf_dpsparse.core import transforms
from tf_dpsparse.core.sparse import SparseUpdate
from tf_dpsparse.wire import codec


class Stage(NamedTuple):
  """`init(...) -> state`; `update(value, state, ...) -> (out, state, metrics)`."""
  init: Callable[..., Any]
  update: Callable[..., Any]


def model_update(initial, trained) -> tf.Tensor:
  """The flat update a device uploads: initial - trained (TFF's sign)."""
  return transforms.flatten(initial) - transforms.flatten(trained)


def apply_update(weights: tf.Tensor, update: tf.Tensor,
                 learning_rate: float = 1.0) -> tf.Tensor:
  """`weights - learning_rate * update`: a server SGD step on the mean update."""
  return weights - learning_rate * tf.convert_to_tensor(update, weights.dtype)


class UploadState(NamedTuple):
  residual: tf.Tensor  # float32[size]: what earlier rounds did not send


class UploadMetrics(NamedTuple):
  clipped: tf.Tensor  # bool: the sent values were clipped this round
  residual_norm: tf.Tensor


def sparse_upload(k: int, *, l2_norm_clip: Optional[float] = None,
                  value_bits: int = 32, clip_feedback: bool = True) -> Stage:
  """A device's upload: top-k of update + residual, clipped, wire-rounded.

  `update(flat_update, state, shared_indices=None)` returns `(sent,
  UploadState, UploadMetrics)` (`transforms.clipped_topk_with_error_feedback`
  explains the clip, the shared indices and `clip_feedback`). Nothing is
  lost: what is not sent, clipped away (unless `clip_feedback=False`) or
  rounded off stays in the residual.

  Privacy: the indices are chosen from the update and the residual. Under
  example-level DP both are DP-SGD output (post-processing); under
  client-level DP the upload is released only inside the noised aggregate
  of a trusted aggregator, which clips it again. Raw data never picks them
  otherwise.
  """

  def init(size: int) -> UploadState:
    return UploadState(tf.zeros([size], tf.float32))

  def update(flat_update, state: UploadState, shared_indices=None):
    sent, residual, clipped = transforms.clipped_topk_with_error_feedback(
        flat_update, k, state.residual, l2_norm_clip,
        shared_indices=shared_indices, value_bits=value_bits,
        clip_feedback=clip_feedback)
    return sent, UploadState(residual), UploadMetrics(clipped,
                                                      tf.norm(residual))

  return Stage(init, update)


def default_clip_feedback(subspace) -> bool:
  """Whether a device keeps what the client-level clip removes (`clip_feedback`
  of `sparse_upload`), by default: yes for top-k of the model's weights (the
  package's behaviour all along), no in a subspace (`core.Subspace`, None
  otherwise), where every device was clipped on every visit and the kept
  excess outgrew the updates: MNIST cross-device, 2 %, 100 rounds, ε = 8,
  float32: 0.896 kept against 0.939 dropped (issue 18's closing note)."""
  return subspace is None


class BroadcastState(NamedTuple):
  """The server's download state; every field is public (post-processing).

  public: float32[size], the model up-to-date devices hold.
  round_num: int32, broadcasts made so far.
  history_indices, history_rounds: int32 [history, k] and [history], the
    index sets of the last `history` broadcasts and their rounds (-1:
    none), from which a returning device's exact catch-up is built.
  last: the last broadcast (`SparseUpdate` fields `indices`, `values`).
  """
  public: tf.Tensor
  round_num: tf.Tensor
  history_indices: tf.Tensor
  history_rounds: tf.Tensor
  last_indices: tf.Tensor
  last_values: tf.Tensor


class BroadcastMetrics(NamedTuple):
  residual_norm: tf.Tensor  # L2 of global - public: not yet broadcast


def sparse_broadcast(k: int, value_bits: int = 32, history: int = 32) -> Stage:
  """The server's download: top-k of (global - public), wire-rounded.

  `init(initial_flat_weights)`; `update(global_flat, state)` returns
  `(sent, BroadcastState, BroadcastMetrics)`. The new public model is the
  old one plus `sent` in float32, exactly what a device computes from the
  decoded bytes (`tds.wire.apply_broadcast`). Error feedback is implicit:
  what was not sent is still in global - public. The last `history` index
  sets are kept for exact catch-ups (`tds.wire.catch_up_payload`).

  Privacy: the global model is DP (noised aggregate, or a mean of DP
  uploads), so its top-k is post-processing.
  """

  def init(weights) -> BroadcastState:
    return BroadcastState(
        public=tf.convert_to_tensor(weights, tf.float32),
        round_num=tf.constant(0, tf.int32),
        history_indices=tf.fill([history, k], -1),
        history_rounds=tf.fill([history], -1),
        last_indices=tf.zeros([k], tf.int32),
        last_values=tf.zeros([k], tf.float32))

  def update(global_weights, state: BroadcastState):
    global_weights = tf.convert_to_tensor(global_weights, tf.float32)
    sent, public = transforms.sparse_sync(global_weights, state.public, k,
                                          value_bits)
    round_num = state.round_num + 1
    slot = tf.math.floormod(round_num, history)
    new_state = BroadcastState(
        public=public, round_num=round_num,
        history_indices=tf.tensor_scatter_nd_update(
            state.history_indices, [[slot]], sent.indices[None]),
        history_rounds=tf.tensor_scatter_nd_update(
            state.history_rounds, [[slot]], [round_num]),
        last_indices=sent.indices, last_values=sent.values)
    return sent, new_state, BroadcastMetrics(tf.norm(global_weights - public))

  return Stage(init, update)


class ViewState(NamedTuple):
  view: tf.Tensor  # float32[size]: the model this device holds


def topk_catch_up(k: int, value_bits: int = 32) -> Stage:
  """A returning device's bounded catch-up: top-k of (global - its view).

  `update(global_flat, state)` returns `(sent, ViewState, nbytes)`: the
  same operation as the broadcast (`transforms.sparse_sync`), zero entries
  not sent (a device with nothing to learn downloads nothing), the rest
  kept in global - view for its next visit. Post-processing of the DP
  global model; which rounds a device syncs is decided by sampling, not data.
  """
  def init(view) -> ViewState:
    return ViewState(tf.convert_to_tensor(view, tf.float32))

  def update(global_weights, state: ViewState):
    sent, view = transforms.sparse_sync(
        tf.convert_to_tensor(global_weights, tf.float32), state.view, k,
        value_bits)
    indices = nonzero(sent).indices
    nbytes = tf.where(tf.size(indices) > 0,
                      codec.encoded_nbytes(indices, int(sent.size), value_bits),
                      tf.constant(0, tf.int64))
    return sent, ViewState(view), nbytes

  return Stage(init, update)


def nonzero(sent: SparseUpdate) -> SparseUpdate:
  """`sent` without its zero values: a static-k download's padding."""
  keep = tf.not_equal(sent.values, 0.0)
  return sent._replace(indices=tf.boolean_mask(sent.indices, keep),
                       values=tf.boolean_mask(sent.values, keep))
