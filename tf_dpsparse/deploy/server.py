"""`DeploymentServer`: the long-lived server of a deployment without TFF.

Devices (e.g. `tds.lite.LiteClient`) upload `tds.wire` payloads; the server
runs the same stages as the TFF front, on bytes and eagerly:

  decode/validate (`tds.wire.decode`) -> aggregate (the privacy object's
  `DPQuery`, or the plain mean) -> `core.apply_update` -> `core.sparse_broadcast`
  -> encode (`tds.wire.encode`): one download for every up-to-date device.

An update is `initial - trained` (`core.model_update`, TFF's sign), so the
server steps against the mean update: `global - server_learning_rate * mean`.

Privacy is an object, the one the TFF front nests (`tds.privacy`):

- `None`: the plain mean of the accepted uploads; nothing is private.
- `ExampleLevelDP` (untrusted server): every upload is DP-SGD output made
  on the device, so the mean, the update and the download's top-k are
  post-processing. The ledger charges `round_event()` each round: the
  worst-case device, one that took part in every round.
- `ClientLevelDP` (trusted server): the mechanism's `aggregation_query()`,
  a TF Privacy `DPQuery`, runs here: each decoded update is clipped to
  `l2_norm_clip` again (a device cannot raise its own sensitivity), the sum
  is noised once and divided by the public `clients_per_round`. The server
  sees every device's indices and values and must be trusted to release
  only the noised global model and what is computed from it. The ledger
  charges `round_event()`, which assumes the operator invites each device
  independently with probability clients_per_round / total_clients every
  round (Poisson sampling); the server does not check who it is sent.

The ledger charges a round when it opens: at `open_round()`, or else at
its first upload, or at `finish_round` if none came.
`tds.privacy.BudgetExhaustedError` is raised before the round touches any
upload, so nothing is released past the budget. Call `open_round()` before
inviting devices: under example-level DP a device spends its privacy when
it trains, before it uploads, so the refusal should reach it first.
"""

from __future__ import annotations

import math
from typing import Dict, Hashable, List, NamedTuple, Optional, Tuple

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_privacy as tfp

from tf_dpsparse import core
from tf_dpsparse import wire
from tf_dpsparse.privacy.ledger import PrivacyLedger


class RoundResult(NamedTuple):
  """What `DeploymentServer.finish_round` returns.

  download: the encoded sparse download, the same bytes for every device
    that applied every earlier download (`tds.wire.apply_broadcast`).
  round_num: the round just finished (1 for the first); a device that
    applies `download` is synced at this round.
  accepted: client ids whose upload was aggregated, in arrival order.
  rejected: client id -> reason, for the uploads refused this round.
  bytes_up: bytes received this round, rejected payloads included.
  bytes_down: `len(download)` (per device).
  num_clipped: accepted updates the server's query clipped (client level).
  residual_norm: L2 norm of global - public after this download.
  epsilon: ε spent so far at the ledger's δ (inf without privacy).
  """

  download: bytes
  round_num: int
  accepted: Tuple[Hashable, ...]
  rejected: Dict[Hashable, str]
  bytes_up: int
  bytes_down: int
  num_clipped: int
  residual_norm: float
  epsilon: float


class _PlainMean(tfp.NoPrivacyAverageQuery):
  """TF Privacy's average of the records, 0 for a round with none.

  No clip, no noise: the server's query when uploads are DP already
  (example level: post-processing) or nothing is private. The count of
  uploads it divides by is then no secret either.
  """

  def get_noised_result(self, sample_state, global_state):
    total, count = sample_state
    return (total / tf.maximum(count, 1.0), global_state,
            dp_accounting.NonPrivateDpEvent())


def _aggregation_query(privacy) -> tfp.DPQuery:
  """The query the server runs: the mechanism's own, else the plain mean."""
  query = None if privacy is None else privacy.aggregation_query()
  return _PlainMean() if query is None else query


def _ledger_of(privacy, ledger, delta, epsilon_budget, accountant):
  """The given ledger, or a new one for `privacy`; None without privacy."""
  if privacy is None:
    if ledger is not None or epsilon_budget is not None:
      raise ValueError('a ledger or epsilon_budget needs a privacy mechanism: '
                       'without one nothing is private to account for.')
    return None
  if ledger is not None:
    if epsilon_budget is not None:
      raise ValueError('give a ledger or an epsilon_budget, not both.')
    return ledger
  return PrivacyLedger(delta, epsilon_budget, accountant)


class _Round:
  """One open round: the query's running sum and who sent what."""

  def __init__(self, query: tfp.DPQuery, params, size: int):
    self.sample_state = query.initial_sample_state(
        tf.TensorSpec([size], tf.float32))
    self.params = params
    self.accepted: List[Hashable] = []
    self.rejected: Dict[Hashable, str] = {}
    self.seen = set()
    self.bytes_up = 0
    self.num_clipped = 0
    self.charged = False


class DeploymentServer:
  """Aggregates device payloads round after round; keeps global and public models.

  Per round: `open_round()` (the ledger's charge) before inviting devices,
  `submit(client_id, payload)` for each upload as it arrives, then
  `finish_round()`, whose `RoundResult.download` every up-to-date
  device applies. A device that missed rounds asks `catch_up`.

  Args:
    initial_weights: the flat float32 model every device starts from (e.g.
      `LiteClient.get_weights()` or `tds.core.flatten` of the Keras model's
      trainable variables).
    upload_density: fraction of parameters in a device's upload; an upload
      with more coordinates is rejected.
    download_density: fraction of parameters in each download.
    value_bits: wire precision of download values (32, 16 or 8).
    history: downloads whose index sets are kept for exact catch-ups.
    privacy: None, `tds.privacy.ExampleLevelDP` or `tds.privacy.ClientLevelDP`
      (see the module docstring); the same object as the TFF front's.
    server_learning_rate: global -= rate * mean update.
    delta, epsilon_budget, accountant: the `PrivacyLedger` built for
      `privacy` (no budget: it only counts).
    ledger: a ledger to charge instead (e.g. one restored from JSON).
  """

  def __init__(self, initial_weights, *, upload_density: float,
               download_density: float, value_bits: int = 32,
               history: int = 32, privacy=None,
               server_learning_rate: float = 1.0, delta: float = 1e-5,
               epsilon_budget: Optional[float] = None,
               accountant: str = 'rdp',
               ledger: Optional[PrivacyLedger] = None):
    weights = np.asarray(initial_weights, np.float32)
    if weights.ndim != 1 or not weights.size:
      raise ValueError('initial_weights must be a non-empty flat vector, got '
                       f'shape {weights.shape}.')
    if value_bits not in wire.VALUE_BITS:
      raise ValueError(f'value_bits must be one of {wire.VALUE_BITS}, got '
                       f'{value_bits}.')
    self.size = weights.size
    self.upload_k = core.k_for_density(self.size, upload_density)
    self.k = core.k_for_density(self.size, download_density)
    self._broadcast = core.sparse_broadcast(self.k, value_bits, history)
    self._state = self._broadcast.init(weights)
    self._global = tf.constant(weights)
    self._value_bits = value_bits
    self._learning_rate = float(server_learning_rate)
    self._privacy = privacy
    self._ledger = _ledger_of(privacy, ledger, delta, epsilon_budget,
                              accountant)
    self._query = _aggregation_query(privacy)
    self._query_state = self._query.initial_global_state()
    self.rejected_total = 0
    self._new_round()

  @property
  def global_weights(self) -> np.ndarray:
    """The server's model (private: DP, but never sent as it is)."""
    return self._global.numpy().copy()

  @property
  def public_weights(self) -> np.ndarray:
    """What every device that applied all downloads holds."""
    return self._state.public.numpy().copy()

  @property
  def broadcast_state(self) -> core.BroadcastState:
    """The download stage's state (public: post-processing of the model)."""
    return self._state

  @property
  def ledger(self) -> Optional[PrivacyLedger]:
    return self._ledger

  @property
  def round_num(self) -> int:
    """Rounds finished (downloads sent) so far."""
    return int(self._state.round_num)

  def _new_round(self):
    self._round = _Round(self._query,
                         self._query.derive_sample_params(self._query_state),
                         self.size)

  def open_round(self) -> float:
    """Charges this round's DpEvent to the ledger (once); returns ε so far.

    Raises `tds.privacy.BudgetExhaustedError`, recording nothing, if the
    round would exceed the budget: invite no device then.
    """
    if self._round.charged:
      return self._epsilon()
    if self._ledger is not None:
      self._ledger.record(self._privacy.round_event())  # may refuse
    self._round.charged = True
    return self._epsilon()

  def _epsilon(self) -> float:
    return math.inf if self._ledger is None else self._ledger.epsilon

  def submit(self, client_id: Hashable, payload: bytes) -> bool:
    """Validates and adds one upload; False (and counted) if rejected.

    Rejected, never touching the model: a second upload from the same
    client id this round, a payload `tds.wire.decode` refuses, or one with
    more coordinates than `upload_k`. Raises
    `tds.privacy.BudgetExhaustedError` if the round cannot be paid for.
    """
    self.open_round()
    if isinstance(payload, (bytes, bytearray, memoryview)):
      self._round.bytes_up += len(payload)
    if client_id in self._round.seen:
      return self._reject(client_id, 'duplicate upload from this client in '
                          'this round')
    self._round.seen.add(client_id)
    try:
      update = wire.decode(payload, self.size)
    except wire.DecodeError as e:
      return self._reject(client_id, f'malformed payload: {e}')
    if len(update.indices) > self.upload_k:
      return self._reject(client_id, f'oversized upload: k={len(update.indices)}'
                          f' exceeds the upload k={self.upload_k}')
    self._accumulate(core.densify(update))
    self._round.accepted.append(client_id)
    return True

  def _accumulate(self, dense: tf.Tensor) -> None:
    """Adds one update through the query (which clips it at client level)."""
    clip = getattr(self._privacy, 'upload_clip', None)
    if clip is not None and float(tf.norm(dense)) > clip:
      self._round.num_clipped += 1
    record = self._query.preprocess_record(self._round.params, dense)
    self._round.sample_state = self._query.accumulate_preprocessed_record(
        self._round.sample_state, record)

  def _reject(self, client_id, reason: str) -> bool:
    self._round.rejected.setdefault(client_id, reason)
    self.rejected_total += 1
    return False

  def finish_round(self) -> RoundResult:
    """Releases the round: mean update, server step, encoded download.

    Raises `tds.privacy.BudgetExhaustedError` (nothing released, the round
    stays open) if the round was not paid for and the budget cannot pay.
    """
    self.open_round()
    mean, self._query_state, _ = self._query.get_noised_result(
        self._round.sample_state, self._query_state)
    self._global = core.apply_update(self._global, mean, self._learning_rate)
    sent, self._state, metrics = self._broadcast.update(self._global,
                                                        self._state)
    download = wire.encode(sent, value_bits=self._value_bits)  # lossless
    done = self._round
    result = RoundResult(
        download=download, round_num=self.round_num,
        accepted=tuple(done.accepted), rejected=dict(done.rejected),
        bytes_up=done.bytes_up, bytes_down=len(download),
        num_clipped=done.num_clipped,
        residual_norm=float(metrics.residual_norm),
        epsilon=self._epsilon())
    self._new_round()
    return result

  def catch_up(self, last_sync_round: int) -> Optional[bytes]:
    """The download of a device last synced at `last_sync_round`, or None.

    Current public values at every index broadcast since then
    (`tds.wire.catch_up_payload`): the device overwrites them with
    `tds.wire.apply_catch_up` and holds `public_weights`. None: those
    rounds left the history, or dense is smaller; send `public_weights`.
    Post-processing of public downloads: no privacy cost.
    """
    if not 0 <= int(last_sync_round) <= self.round_num:
      raise ValueError(f'last_sync_round must be in [0, {self.round_num}], '
                       f'got {last_sync_round}.')
    return wire.catch_up_payload(self._state, int(last_sync_round))
