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

Failure model: devices are not trusted. An upload is refused, counted by
reason and never touches the model when it is tagged for another round,
repeats a client this round, does not decode (`tds.wire.decode`: truncated,
garbled, non-finite, a model of another size) or carries more coordinates
than the upload k. Every accepted update is bounded by `core.bound_update`,
the call the TFF front's `BoundedUpdateFactory` makes: non-finite (its norm
overflows float32) -> zeroed; client level -> clipped to the mechanism's
clip (the DP query then clips again); otherwise zeroed above
`max_update_norm`. A zeroed update still counts in the plain mean's
denominator, as in TFF's `zeroing_factory`. An upload that would overflow
the round's float32 sum is refused. A round with fewer accepted uploads than
`min_clients` is skipped, and so is one whose result would leave the global
or public model non-finite or above half the float32 range: the model stays
as it was, the round's charge stays on the ledger (conservative) and the
next round is charged once, as any other. `save(path)` / `load(path)` keep
the whole state on disk, written atomically; resuming is exact.

A public random subspace (issue 18; `core.subspace`): with `subspace=`, the
model is theta = origin + P z and everything above runs on z, as if z were
the model's weights: uploads decode to `dims` values, the client-level
noise has `dims` dimensions, the broadcast and the catch-up are of z, the
ledger is unchanged. Only `global_weights` / `public_weights` expand z.
Choosing the subspace releases nothing (`deploy.parametrization`), and
every index choice above stays what it was: post-processing of DP values,
or inside the trusted aggregator.
"""

from __future__ import annotations

import collections
import math
from typing import Dict, Hashable, List, NamedTuple, Optional, Tuple

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_privacy as tfp

from tf_dpsparse import core
from tf_dpsparse import wire
from tf_dpsparse.deploy import checkpoint
from tf_dpsparse.deploy.parametrization import deployed_subspace
from tf_dpsparse.privacy.ledger import BudgetExhaustedError
from tf_dpsparse.privacy.ledger import PrivacyLedger

# The largest magnitude a global or public weight may take. A download is
# top-k of (global - public), and the public model moves toward the global
# one without overshooting it, so within half the float32 range every
# difference and every sum a device or the server computes stays finite.
MAX_WEIGHT_MAGNITUDE = float(np.finfo(np.float32).max) / 2

# Short reasons an upload is refused, the keys of `rejected_by_reason`.
REFUSALS = ('stale round', 'duplicate', 'malformed', 'wrong size',
            'oversized', 'sum overflow')
# Short reasons a round is skipped (model untouched), `skipped_by_reason`.
SKIPS = ('too few devices', 'model out of range')


class RoundResult(NamedTuple):
  """What `DeploymentServer.finish_round` returns.

  download: the encoded sparse download, the same bytes for every device
    that applied every earlier download (`tds.wire.apply_broadcast`); an
    empty update when the round was skipped.
  round_num: the round just finished (1 for the first); a device that
    applies `download` is synced at this round. A skipped round leaves it
    where it was: the next round has the number this one had.
  accepted: client ids whose upload was aggregated, in arrival order
    (zeroed ones included: they count as a zero update).
  rejected: client id -> reason, for the uploads refused this round (the
    first refusal of each client).
  bytes_up: bytes received this round, rejected payloads included.
  bytes_down: `len(download)` (per device).
  num_clipped: accepted updates clipped to the upload clip (client level).
  residual_norm: L2 norm of global - public after this download.
  epsilon: ε spent so far at the ledger's δ (inf without privacy).
  rejected_by_reason: refusals this round, counted by `REFUSALS` key.
  zeroed: client id -> why its accepted update was replaced by zeros
    (non-finite norm, or above `max_update_norm`).
  skipped: why the round changed nothing (too few devices, or a result
    out of the finite range), or None when it was applied.
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
  rejected_by_reason: Dict[str, int]
  zeroed: Dict[Hashable, str]
  skipped: Optional[str]


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


def _server_bound(privacy, max_update_norm) -> Tuple[Optional[float], str]:
  """`core.bound_update`'s (max_norm, policy), as the TFF front picks them.

  Client level clips at the mechanism's upload clip (its sensitivity);
  a second, different bound would be ignored, so it is refused.
  """
  clip = getattr(privacy, 'upload_clip', None)
  if clip and max_update_norm is not None:
    raise ValueError('max_update_norm is for uploads that are DP already '
                     '(example level) or not private: client level clips '
                     f'every update at l2_norm_clip={clip} instead.')
  max_norm, policy = (clip, 'clip') if clip else (max_update_norm, 'zero')
  core.bound_update(np.zeros(1, np.float32), max_norm, policy)  # validates
  return max_norm, policy


def _coordinates(initial_weights, subspace, seed):
  """`(core.Subspace or None, the initial coordinates)`: the checked initial
  weights themselves, or z = 0 (theta = origin) in a subspace around them.

  Every weight of origin + P z stays finite when z and the origin are
  within `MAX_WEIGHT_MAGNITUDE` (|P z|_i <= max |z|: unit columns, one
  nonzero per row), so the server's range checks on z suffice.
  """
  weights = np.asarray(initial_weights, np.float32)
  if weights.ndim != 1 or not weights.size:
    raise ValueError('initial_weights must be a non-empty flat vector, got '
                     f'shape {weights.shape}.')
  if not in_range(weights):
    raise ValueError('initial_weights must be finite, within '
                     f'±{MAX_WEIGHT_MAGNITUDE:.3g}.')
  sub = deployed_subspace(weights, subspace, seed)
  return sub, weights if sub is None else np.zeros(sub.dims, np.float32)


def _densities(subspace, upload_density, download_density):
  """The densities, required without a subspace; in one, default 1.0: all
  of z each way, whose index set is implied (no index bytes)."""
  densities = []
  for name, density in (('upload_density', upload_density),
                        ('download_density', download_density)):
    if density is None and subspace is None:
      raise ValueError(f'{name} is required (the fraction of the weights '
                       'sent), unless training in a subspace.')
    densities.append(1.0 if density is None else density)
  return densities


def in_range(weights) -> bool:
  """Whether every weight is finite and within `MAX_WEIGHT_MAGNITUDE`."""
  weights = tf.convert_to_tensor(weights, tf.float32)
  return bool(tf.reduce_all(tf.abs(weights) <= MAX_WEIGHT_MAGNITUDE))


def _all_finite(structure) -> bool:
  return all(bool(tf.reduce_all(tf.math.is_finite(tf.cast(leaf, tf.float32))))
             for leaf in tf.nest.flatten(structure))


class _Round:
  """One open round: the query's running sum and who sent what."""

  def __init__(self, query: tfp.DPQuery, params, size: int):
    self.sample_state = query.initial_sample_state(
        tf.TensorSpec([size], tf.float32))
    self.params = params
    self.accepted: List[Hashable] = []
    self.rejected: Dict[Hashable, str] = {}
    self.rejected_by_reason: Dict[str, int] = collections.Counter()
    self.zeroed: Dict[Hashable, str] = {}
    self.seen = set()
    self.received = 0
    self.bytes_up = 0
    self.num_clipped = 0
    self.charged = False


class DeploymentServer:
  """Aggregates device payloads round after round; keeps global and public models.

  Per round: `open_round()` (the ledger's charge) before inviting devices,
  `submit(client_id, payload, round_num)` for each upload as it arrives,
  then `finish_round()`, whose `RoundResult.download` every up-to-date
  device applies. A device that missed rounds asks `catch_up`. Between
  rounds, `save(path)` writes the whole state; `DeploymentServer.load`
  resumes it exactly.

  Args:
    initial_weights: the flat float32 model every device starts from (e.g.
      `LiteClient.get_weights()` or `tds.core.flatten` of the Keras model's
      trainable variables).
    upload_density: fraction of the coordinates (the parameters, or z) in a
      device's upload; an upload with more is rejected. Required without a
      subspace; in one, default 1.0 (all of z, no index bytes).
    download_density: fraction of the coordinates in each download (as
      `upload_density`).
    value_bits: wire precision of download values (32, 16 or 8).
    history: downloads whose index sets are kept for exact catch-ups.
    privacy: None, `tds.privacy.ExampleLevelDP` or `tds.privacy.ClientLevelDP`
      (see the module docstring); the same object as the TFF front's.
    server_learning_rate: global -= rate * mean update.
    delta, epsilon_budget, accountant: the `PrivacyLedger` built for
      `privacy` (no budget: it only counts).
    ledger: a ledger to charge instead (e.g. one restored from JSON).
    max_update_norm: example level or no privacy: an accepted update whose
      L2 norm exceeds it is zeroed (TFF's `zeroing_factory`). None: only
      non-finite updates are. For devices running DP-SGD with SGD (a
      `LiteClient`), the TFF front's default is `privacy.update_norm_bound(
      size, learning_rate, momentum) * core.error_feedback_gain(upload_k,
      size, value_bits)`: one round's update bound, times what the device's
      residual can add to an upload.
      Client level clips at `privacy.l2_norm_clip` instead: refused there.
    min_clients: a round with fewer accepted uploads is skipped (model
      untouched). Privacy: the skip depends on how many devices reported,
      which the accounting treats as public, as deployed DP-FedAvg does;
      under example level the server is untrusted and sees it anyway.
    subspace: train in a public random subspace, theta = origin + P z with
      origin = `initial_weights` (`core.subspace`): None (the weights
      themselves), a fraction in (0, 1) of the weights or a number of
      dimensions, from which `core.count_sketch` is built with
      `subspace_seed`, or that `core.Subspace` itself (it must be the
      seed's: `deploy.parametrization.deployed_subspace`). The server's
      state, uploads, downloads and catch-ups are then z (`size` = dims).
    subspace_seed: the seed devices rebuild P from.
  """

  def __init__(self, initial_weights, *,
               upload_density: Optional[float] = None,
               download_density: Optional[float] = None, value_bits: int = 32,
               history: int = 32, privacy=None,
               server_learning_rate: float = 1.0, delta: float = 1e-5,
               epsilon_budget: Optional[float] = None,
               accountant: str = 'rdp',
               ledger: Optional[PrivacyLedger] = None,
               max_update_norm: Optional[float] = None,
               min_clients: int = 0, subspace=None, subspace_seed: int = 0):
    self._subspace, weights = _coordinates(initial_weights, subspace,
                                           subspace_seed)
    upload_density, download_density = _densities(
        self._subspace, upload_density, download_density)
    if value_bits not in wire.VALUE_BITS:
      raise ValueError(f'value_bits must be one of {wire.VALUE_BITS}, got '
                       f'{value_bits}.')
    if int(min_clients) != min_clients or min_clients < 0:
      raise ValueError(f'min_clients must be an integer >= 0, got '
                       f'{min_clients}.')
    self.size = weights.size  # what is trained and sent: the weights, or z
    self.upload_k = core.k_for_density(self.size, upload_density)
    self.k = core.k_for_density(self.size, download_density)
    self._bound_norm, self._bound_policy = _server_bound(privacy,
                                                         max_update_norm)
    self._config = dict(
        upload_density=upload_density, download_density=download_density,
        value_bits=value_bits, history=history,
        server_learning_rate=float(server_learning_rate),
        max_update_norm=max_update_norm, min_clients=int(min_clients),
        subspace=None if self._subspace is None else self._subspace.dims,
        subspace_seed=int(subspace_seed))
    self._broadcast = core.sparse_broadcast(self.k, value_bits, history)
    self._state = self._broadcast.init(weights)
    self._global = tf.constant(weights)
    self._privacy = privacy
    self._ledger = _ledger_of(privacy, ledger, delta, epsilon_budget,
                              accountant)
    self._query = _aggregation_query(privacy)
    self._query_state = self._query.initial_global_state()
    self.rejected_by_reason: Dict[str, int] = collections.Counter()
    self.skipped_by_reason: Dict[str, int] = collections.Counter()
    self.zeroed_total = 0
    self._new_round()

  @property
  def global_coordinates(self) -> np.ndarray:
    """The server's model as it is trained: its weights, or z in a
    subspace (DP, but never sent as it is)."""
    return self._global.numpy().copy()

  @property
  def public_coordinates(self) -> np.ndarray:
    """What every device that applied all downloads holds: the public
    weights, or the public z in a subspace (downloads apply to it)."""
    return self._state.public.numpy().copy()

  @property
  def global_weights(self) -> np.ndarray:
    """The server's flat model (in a subspace origin + P z)."""
    return self._expand(self._global)

  @property
  def public_weights(self) -> np.ndarray:
    """The flat model of an up-to-date device (in a subspace origin + P z
    of the public z)."""
    return self._expand(self._state.public)

  def _expand(self, coordinates: tf.Tensor) -> np.ndarray:
    if self._subspace is None:
      return coordinates.numpy().copy()
    return self._subspace.expand(coordinates).numpy()

  @property
  def subspace(self) -> Optional[core.Subspace]:
    """The public subspace trained in (None: the weights themselves)."""
    return self._subspace

  @property
  def model_size(self) -> int:
    """The model's number of weights (`size` unless in a subspace)."""
    return self.size if self._subspace is None else self._subspace.size

  @property
  def broadcast_state(self) -> core.BroadcastState:
    """The download stage's state (public: post-processing of the model)."""
    return self._state

  @property
  def ledger(self) -> Optional[PrivacyLedger]:
    return self._ledger

  @property
  def privacy(self):
    """The privacy mechanism (None: nothing is private)."""
    return self._privacy

  @property
  def config(self) -> dict:
    """The constructor's settings besides the model and the privacy."""
    return dict(self._config)

  @property
  def round_num(self) -> int:
    """Rounds finished (downloads sent) so far."""
    return int(self._state.round_num)

  @property
  def current_round(self) -> int:
    """The open round's number: what `submit`'s `round_num` tag must be."""
    return self.round_num + 1

  @property
  def rejected_total(self) -> int:
    """Uploads refused since the server started (all rounds, all reasons)."""
    return sum(self.rejected_by_reason.values())

  def _new_round(self):
    self._round = _Round(self._query,
                         self._query.derive_sample_params(self._query_state),
                         self.size)

  def open_round(self) -> float:
    """Charges this round's DpEvent to the ledger (once); returns ε so far.

    Raises `tds.privacy.BudgetExhaustedError`, recording nothing, if the
    round would exceed the budget: invite no device then. Its message
    states the ε spent and remaining.
    """
    if self._round.charged:
      return self._epsilon()
    if self._ledger is not None:
      try:
        self._ledger.record(self._privacy.round_event())
      except BudgetExhaustedError as e:
        raise BudgetExhaustedError(
            f'round {self.current_round} refused before any upload is '
            f'read, invite no device: {e}') from e
    self._round.charged = True
    return self._epsilon()

  def _epsilon(self) -> float:
    return math.inf if self._ledger is None else self._ledger.epsilon

  def submit(self, client_id: Hashable, payload: bytes,
             round_num: Optional[int] = None) -> bool:
    """Validates, bounds and adds one upload; False (and counted) if refused.

    Refused, never touching the model (`REFUSALS`): a `round_num` tag other
    than `current_round` (an upload trained for another round; without a
    tag none is checked), a second upload from the same client id this
    round, a payload `tds.wire.decode` refuses (a model of another size
    apart), one with more coordinates than `upload_k`, and one that would
    overflow the round's sum. An accepted update is bounded (see the
    module docstring). Raises only `tds.privacy.BudgetExhaustedError`, if
    the round cannot be paid for.
    """
    self.open_round()
    self._round.received += 1
    if isinstance(payload, (bytes, bytearray, memoryview)):
      self._round.bytes_up += len(payload)
    if round_num is not None and round_num != self.current_round:
      return self._reject(client_id, 'stale round',
                          f'stale round: the upload is for round {round_num}, '
                          f'the open round is {self.current_round}')
    if client_id in self._round.seen:
      return self._reject(client_id, 'duplicate', 'duplicate upload from '
                          'this client in this round')
    self._round.seen.add(client_id)
    try:
      update = wire.decode(payload, self.size)
    except wire.DecodeError as e:
      reason = ('wrong size' if str(e).startswith('size mismatch')
                else 'malformed')
      return self._reject(client_id, reason, f'malformed payload: {e}')
    if len(update.indices) > self.upload_k:
      return self._reject(client_id, 'oversized', 'oversized upload: '
                          f'k={len(update.indices)} exceeds the upload '
                          f'k={self.upload_k}')
    return self._accumulate(client_id, core.densify(update))

  def _accumulate(self, client_id, dense: tf.Tensor) -> bool:
    """Bounds one update (`core.bound_update`) and adds it through the query
    (which clips it again at client level); refuses a sum overflow."""
    bounded, metrics = core.bound_update(dense, self._bound_norm,
                                         self._bound_policy)
    record = self._query.preprocess_record(self._round.params, bounded)
    sample_state = self._query.accumulate_preprocessed_record(
        self._round.sample_state, record)
    if not _all_finite(sample_state):
      return self._reject(client_id, 'sum overflow', 'sum overflow: adding '
                          'this update would overflow the round\'s float32 '
                          'sum')
    self._round.sample_state = sample_state
    self._round.accepted.append(client_id)
    norm = float(metrics.norm)
    if bool(metrics.non_finite):
      self._round.zeroed[client_id] = 'norm overflows float32: zeroed'
    elif bool(metrics.over_bound) and self._bound_policy == 'zero':
      self._round.zeroed[client_id] = (
          f'norm {norm:.4g} above max_update_norm={self._bound_norm:g}: '
          'zeroed')
    elif bool(metrics.over_bound):
      self._round.num_clipped += 1
    return True

  def _reject(self, client_id, reason: str, message: str) -> bool:
    self._round.rejected.setdefault(client_id, message)
    self._round.rejected_by_reason[reason] += 1
    self.rejected_by_reason[reason] += 1
    return False

  def finish_round(self) -> RoundResult:
    """Releases the round: mean update, server step, encoded download.

    A round with fewer accepted uploads than `min_clients`, or whose result
    would leave the model out of range (`MAX_WEIGHT_MAGNITUDE`), is skipped:
    global and public models untouched, an empty download, the reason in
    `RoundResult.skipped`; its charge stays on the ledger. Raises
    `tds.privacy.BudgetExhaustedError` (nothing released, the round stays
    open) if the round was not paid for and the budget cannot pay.
    """
    self.open_round()
    done = self._round
    download, skipped = None, None
    if len(done.accepted) < self._config['min_clients']:
      skipped = ('too few devices', f'only {len(done.accepted)} of min '
                 f'{self._config["min_clients"]} devices reported')
    else:
      download, skipped = self._release(done)
    if skipped is not None:
      self.skipped_by_reason[skipped[0]] += 1
      download = wire.encode(core.SparseUpdate(
          np.zeros(0, np.int32), np.zeros(0, np.float32), self.size),
                             value_bits=self._config['value_bits'])
    self.zeroed_total += len(done.zeroed)
    self._new_round()
    return RoundResult(
        download=download, round_num=self.round_num,
        accepted=tuple(done.accepted), rejected=dict(done.rejected),
        bytes_up=done.bytes_up, bytes_down=len(download),
        num_clipped=done.num_clipped,
        residual_norm=float(core.robust_l2_norm(self._global -
                                                self._state.public)),
        epsilon=self._epsilon(),
        rejected_by_reason=dict(done.rejected_by_reason),
        zeroed=dict(done.zeroed),
        skipped=None if skipped is None else skipped[1])

  def _release(self, done: _Round):
    """The round's mean, applied and broadcast if the model stays in range.

    Returns `(download, None)`, or `(None, (reason, message))` with nothing
    applied. The query's state moves on either way (a seeded noise draw is
    never reused). Checking the noised result is post-processing.
    """
    mean, self._query_state, _ = self._query.get_noised_result(
        done.sample_state, self._query_state)
    new_global = core.apply_update(self._global, mean,
                                   self._config['server_learning_rate'])
    sent, state, _ = self._broadcast.update(new_global, self._state)
    if not (in_range(new_global) and in_range(state.public)):
      return None, ('model out of range', 'the mean update would take the '
                    'model out of the finite range (non-finite or above '
                    f'±{MAX_WEIGHT_MAGNITUDE:.3g}): not applied')
    self._global, self._state = new_global, state
    return wire.encode(sent, value_bits=self._config['value_bits']), None

  def save(self, path) -> None:
    """Writes the whole server state to `path`, atomically (`checkpoint`).

    Global and public models, the broadcast state with its history, the DP
    query's state (its release counter: seeded noise continues), the
    ledger, the round number, the refusal counters and the configuration.
    In a subspace the models are z, and of P only what rebuilds it: the
    origin, with the dimension and the seed in the configuration (never a
    d x s matrix, nor the buckets). Between rounds only: after `finish_round`, or after `open_round` (the
    charge is saved, so a resumed server does not charge that round
    again). Saving after both keeps every charge across a crash. Refused
    once the open round has received an upload: a checkpoint holds no
    device's upload.
    """
    if self._round.received:
      raise RuntimeError(
          f'round {self.current_round} has received {self._round.received} '
          'upload(s): save before the first upload or after finish_round.')
    state = self._state
    arrays = dict(
        global_weights=self._global.numpy(), public=state.public.numpy(),
        round_num=state.round_num.numpy(),
        history_indices=state.history_indices.numpy(),
        history_rounds=state.history_rounds.numpy(),
        last_indices=state.last_indices.numpy(),
        last_values=state.last_values.numpy(),
        **checkpoint.query_state_arrays(self._query_state))
    if self._subspace is not None:
      arrays['subspace_origin'] = self._subspace.origin
    checkpoint.save(path, dict(
        config=self._config,
        privacy=checkpoint.privacy_to_dict(self._privacy),
        ledger=None if self._ledger is None else self._ledger.to_dict(),
        round_charged=self._round.charged,
        rejected_by_reason=dict(self.rejected_by_reason),
        skipped_by_reason=dict(self.skipped_by_reason),
        zeroed_total=self.zeroed_total), arrays)

  @classmethod
  def load(cls, path) -> 'DeploymentServer':
    """The server `save` wrote to `path`, exactly as it was.

    Its ledger is restored from the file (`PrivacyLedger.from_dict`); a
    ledger object shared with other code before the save is not re-linked.
    """
    meta, arrays = checkpoint.load(path)
    ledger = meta['ledger']
    # The initial weights only size the server (`_restore` puts the state
    # in place); in a subspace they are the origin P is rebuilt around.
    server = cls(arrays.get('subspace_origin', arrays['public']),
                 privacy=checkpoint.privacy_from_dict(meta['privacy']),
                 ledger=None if ledger is None else
                 PrivacyLedger.from_dict(ledger), **meta['config'])
    server._restore(meta, arrays)  # pylint: disable=protected-access
    return server

  def _restore(self, meta: dict, arrays: dict) -> None:
    """Puts a checkpoint's models, states and counters in place."""
    state = core.BroadcastState(
        public=tf.constant(arrays['public'], tf.float32),
        round_num=tf.constant(arrays['round_num'], tf.int32),
        history_indices=tf.constant(arrays['history_indices'], tf.int32),
        history_rounds=tf.constant(arrays['history_rounds'], tf.int32),
        last_indices=tf.constant(arrays['last_indices'], tf.int32),
        last_values=tf.constant(arrays['last_values'], tf.float32))
    like = self._state
    for name, value in zip(state._fields, state):
      if value.shape != getattr(like, name).shape:
        raise ValueError(f'checkpoint field {name} has shape {value.shape}, '
                         f'expected {getattr(like, name).shape}.')
    global_weights = tf.constant(arrays['global_weights'], tf.float32)
    if global_weights.shape != like.public.shape or not in_range(
        global_weights):
      raise ValueError('checkpoint global model: wrong size or out of range.')
    self._global, self._state = global_weights, state
    self._query_state = checkpoint.query_state_from_arrays(
        self._query_state, arrays)
    self.rejected_by_reason.update(meta['rejected_by_reason'])
    self.skipped_by_reason.update(meta['skipped_by_reason'])
    self.zeroed_total = int(meta['zeroed_total'])
    self._new_round()
    self._round.charged = bool(meta['round_charged'])

  def catch_up(self, last_sync_round: int) -> Optional[bytes]:
    """The download of a device last synced at `last_sync_round`, or None.

    Current public values at every index broadcast since then
    (`tds.wire.catch_up_payload`): the device overwrites them with
    `tds.wire.apply_catch_up` and holds `public_coordinates`. None: those
    rounds left the history, or dense is smaller; send the device
    `public_coordinates` as raw float32 (4 bytes a value, exactly what
    `tds.wire.catch_up_nbytes` and the TFF front count). In a subspace that
    is z itself, exact at any staleness (a device sets it with
    `LiteClient.set_coordinates`); with the weights, the dense model.
    Post-processing of public downloads: no privacy cost.
    """
    if not 0 <= int(last_sync_round) <= self.round_num:
      raise ValueError(f'last_sync_round must be in [0, {self.round_num}], '
                       f'got {last_sync_round}.')
    return wire.catch_up_payload(self._state, int(last_sync_round))
