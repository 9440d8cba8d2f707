"""Downloads, device side: apply a broadcast or a catch-up, and count its bytes.

A device needs only numpy and `tds.wire` to apply what the server sends
(no TFF, no Keras): a broadcast carries deltas of the public model, added
in float32 exactly as the server adds them; an exact catch-up carries
current public values, which overwrite. `catch_up_nbytes` is the same
choice counted inside a TensorFlow graph (the TFF distributor's metrics).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_dpsparse.core.sparse import SparseUpdate
from tf_dpsparse.wire import codec


def catch_up_nbytes(history_indices, history_rounds, last_sync_round,
                    round_num, size: int, value_bits: int = 32):
  """Bytes a device synced at `last_sync_round` downloads to reach `round_num`.

  Zero if up to date; the broadcast (at `value_bits`) if one round behind.
  Otherwise the union of the index sets broadcast in rounds
  (last_sync_round, round_num], coded by `tds.codec`, or the dense model if
  that is smaller or if some of those rounds fell out of the kept history.
  Those values are float32 whatever `value_bits`: they are public weights,
  float32 sums of rounded changes, which no narrower format holds exactly.
  """
  last_sync_round = tf.cast(last_sync_round, tf.int32)
  needed = history_rounds > last_sync_round
  missing = round_num - last_sync_round
  covered = tf.reduce_sum(tf.cast(needed, tf.int32)) >= missing
  union, _ = tf.unique(tf.reshape(tf.boolean_mask(history_indices, needed), [-1]))
  union_nbytes = codec.encoded_nbytes(union, size)  # float32 values
  # One round behind: the broadcast, the same index set at `value_bits`.
  broadcast_nbytes = codec.encoded_nbytes(union, size, value_bits)
  dense = tf.constant(codec.dense_nbytes(size), tf.int64)
  nbytes = tf.where(covered, tf.minimum(union_nbytes, dense), dense)
  nbytes = tf.where(tf.equal(missing, 1), broadcast_nbytes, nbytes)
  return tf.where(missing > 0, nbytes, tf.constant(0, tf.int64))


def catch_up_payload(state, last_sync_round: int):
  """The catch-up download of a device synced at `last_sync_round`, or None.

  Carries the *current* public values at the union of the indices broadcast
  since then (a device overwrites them: `tds.wire.apply_catch_up`), so the device
  lands exactly on the public model. None means the device needs the dense
  model: some of those rounds fell out of the history, or dense is smaller
  (`tds.wire.catch_up_nbytes` counts the same choice). `state` is the distributor's.
  Values are float32 (see `tds.wire.catch_up_nbytes`); a device one round behind
  needs only the broadcast (`tds.wire.apply_broadcast`).
  """
  field = state.get if isinstance(state, dict) else state._asdict().get
  rounds = np.asarray(field('history_rounds'))
  needed = rounds > last_sync_round
  if needed.sum() < int(field('round_num')) - last_sync_round:
    return None
  public = np.asarray(field('public'), np.float32)
  union = np.unique(np.asarray(field('history_indices'))[needed])
  payload = codec.encode(SparseUpdate(union, public[union], public.size))
  return None if len(payload) > codec.dense_nbytes(public.size) else payload


def apply_catch_up(view: np.ndarray, payload: bytes) -> np.ndarray:
  """A device's side of `catch_up_payload`: overwrite the listed weights."""
  update = codec.decode(payload, view.size)
  view = np.array(view, dtype=np.float32, copy=True)
  view[update.indices] = update.values
  return view


def apply_broadcast(public_view: np.ndarray, payload: bytes) -> np.ndarray:
  """What a device does with a broadcast: decode, validate, overwrite deltas.

  The payload carries deltas of the public model; adding them in float32 is
  the same operation the server performs, so the result is bit-exact.
  """
  update = codec.decode(payload, public_view.size)
  view = np.array(public_view, dtype=np.float32, copy=True)
  view[update.indices] = view[update.indices] + update.values
  return view
