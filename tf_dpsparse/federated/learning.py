"""`build_dp_sparse_fed_avg`: bidirectional DP-sparse federated averaging.

The process is composed from stages, each doing one job, the way TFF's
`compose_learning_process` composes FedAvg:

1. distributor (`build_sparse_distributor`): broadcasts the top-k change of
   the global model (`core.sparse_broadcast`), and `build_device_download`
   syncs each device from it (exact 'union' catch-up, or the bounded
   'topk' one from the device's own view).
2. client work (`client_work.build_client_work`): local training (DP-SGD
   with an `ExampleLevelDP`), then the update (initial - trained) through
   `core.sparse_upload` with the device's residual.
3. aggregator (`DPSparseAggregatorFactory`): densify, then a nested TFF
   factory (a plain mean, or `DifferentiallyPrivateFactory` around a
   `ClientLevelDP`'s query).
4. finalizer: TFF's `build_apply_optimizer_finalizer` (the server optimizer;
   it also refuses a non-finite update).

TFF's composer cannot carry per-device state (the residual, a device's
view), so `compose` does exactly that and nothing else; measurements nest
per stage. Its process also holds the same round as three computations
(`SplitRound`: download; devices; aggregate and finalizer), which a context
running the devices apart from the server (several workers, `remote`) runs
so that each device's work runs once. `DPSparseFedAvg` wraps the process
with the privacy ledger, which refuses a round over budget before any work
is done.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse import privacy as privacy_lib
from tf_dpsparse.deploy.parametrization import deployed_subspace
from tf_dpsparse.federated import _workers
from tf_dpsparse.federated.aggregator import DPSparseAggregatorFactory
from tf_dpsparse.federated.aggregator import sparse_type
from tf_dpsparse.federated.client_work import AuditHooks
from tf_dpsparse.federated.client_work import build_client_work
from tf_dpsparse.federated.client_work import canary_direction
from tf_dpsparse.federated.client_work import split_batch
from tf_dpsparse.federated.distributor import CATCH_UPS
from tf_dpsparse.federated.distributor import build_device_download
from tf_dpsparse.federated.distributor import build_sparse_distributor

__all__ = ['AuditHooks', 'DPSparseFedAvg', 'SplitRound', 'Stages',
           'build_dp_sparse_fed_avg', 'canary_direction', 'client_state_type',
           'compose', 'num_shared']


def client_state_type(size: int, with_view: bool = False) -> tff.StructType:
  """Per-device state: the upload residual, the round it last synced, its id.

  With `with_view` ('topk' catch-up) also the device's own model weights,
  which may lag the public model.
  """
  return tff.StructType([
      ('residual', tff.TensorType(np.float32, [size])),
      *([('view', tff.TensorType(np.float32, [size]))] if with_view else []),
      ('last_sync_round', tff.TensorType(np.int32)),
      ('client_id', tff.TensorType(np.int32)),
  ])


def num_shared(size: int, upload_density: float, download_density: float,
               shared_fraction: float) -> int:
  """How many of a device's k uploaded coordinates are the shared, public ones.

  `shared_fraction` of the upload's k, at most the broadcast's k and always
  leaving at least one coordinate the device picks itself (without which the
  shared set could never move).
  """
  if not 0 <= shared_fraction < 1:
    raise ValueError(f'shared_fraction must be in [0, 1), got {shared_fraction}.')
  k_up = core.k_for_density(size, upload_density)
  k_down = core.k_for_density(size, download_density)
  return min(round(shared_fraction * k_up), k_up - 1, k_down)


class Stages(NamedTuple):
  """What `compose` composes (TFF computations and processes)."""
  initial_weights: tff.Computation  # federated: ModelWeights at SERVER
  distributor: tff.templates.MeasuredProcess
  device_download: tff.Computation  # (download, client state) at CLIENTS
  client_work: tff.Computation  # (weights, data, state, round, shared)
  aggregator: tff.templates.AggregationProcess
  finalizer: tff.templates.MeasuredProcess


def _call(comp, *args):
  return comp(*args)


class SplitRound(NamedTuple):
  """The round of `compose` as three TFF computations, for a context that
  runs the devices apart from the server (`remote`, several workers).

  One computation cannot be split there without cost: TFF's mergeable form
  cuts it at the aggregation, and its `after_merge` sees only the round's
  arguments and the aggregate, so it runs the devices' work again for
  their new states. Here the devices' results leave `devices` once, and
  `finish` takes them as arguments:

  - `distribute(state, one_client)`: the distributor's download, new state
    and measurements (at the server; the download at CLIENTS, all equal).
    `one_client` is `[0]`: TFF returns a value placed at CLIENTS only from
    a call with clients.
  - `devices(download, client_data, client_states)`: each device's sync and
    client work, results at CLIENTS and no aggregation, so any split of the
    devices into slices gives the same per-device results.
  - `finish(state, distributor_state, distributor_measurements, devices)`:
    the aggregator (with its DP query) and the finalizer, over the uploads
    in device order, as in the one-computation round: the same TF
    computations in the same order, so the same numbers bit for bit.
  """
  distribute: tff.Computation
  devices: tff.Computation
  finish: tff.Computation

  def __call__(self, state, client_data, client_states, on_server=_call):
    """`(state, client_states, measurements)` as `compose`'s `next`.

    `on_server(comp, *args)` runs the server's computations (by default in
    the current context); `devices` always runs in the current context,
    which may split the devices over workers.
    """
    distributed = on_server(self.distribute, state, [np.int32(0)])
    devices = self.devices(distributed['download'], client_data,
                           client_states)
    new_state, measurements = on_server(
        self.finish, state, distributed['state'],
        distributed['measurements'], devices)
    return new_state, devices['client_states'], measurements


class _Composed(tff.templates.IterativeProcess):
  """`compose`'s process; `split` builds the same round as a `SplitRound`
  on first use (only contexts with several workers need it)."""

  def __init__(self, init_fn, next_fn, split_fn):
    super().__init__(init_fn, next_fn, next_is_multi_arg=True)
    self._split_fn, self._split = split_fn, None

  @property
  def split(self) -> SplitRound:
    if self._split is None:
      self._split = self._split_fn()
    return self._split


def _device_round(stages: Stages, download, client_data, client_states):
  """Each device's sync and client work (traced into a federated
  computation): every result at CLIENTS, nothing aggregated."""
  weights, client_states, bytes_down = tff.federated_map(
      stages.device_download, (download, client_states))
  uploads, client_states, client_metrics = tff.federated_map(
      stages.client_work, (weights, client_data, client_states,
                           download.round_num, download.shared_indices))
  return collections.OrderedDict(
      uploads=uploads, client_states=client_states,
      client_metrics=client_metrics, bytes_down=bytes_down)


def _server_round(stages: Stages, as_trainable, state, distributor_state,
                  distributor_measurements, devices):
  """The aggregate of the devices' uploads, the finalizer's step and the
  round's measurements (traced into a federated computation)."""
  aggregated = stages.aggregator.next(state.aggregator, devices['uploads'])
  finalized = stages.finalizer.next(
      state.finalizer, state.global_model_weights,
      tff.federated_map(as_trainable, aggregated.result))
  new_state = tff.federated_zip(collections.OrderedDict(
      global_model_weights=finalized.result,
      distributor=distributor_state, aggregator=aggregated.state,
      finalizer=finalized.state))
  measurements = tff.federated_zip(collections.OrderedDict(
      distributor=distributor_measurements,
      client_work=tff.federated_mean(devices['client_metrics']),
      bytes_down=tff.federated_sum(devices['bytes_down']),
      aggregator=aggregated.measurements,
      finalizer=finalized.measurements))
  return new_state, measurements


def _as_trainable_fn(stages: Stages):
  """The aggregate (flat) as the trainables the finalizer takes."""
  weights_type = stages.initial_weights.type_signature.result.member
  flat_type = stages.aggregator.next.type_signature.result.result.member

  @tff.tensorflow.computation(flat_type)
  def as_trainable(flat):
    specs = [tf.TensorSpec(t.shape, t.dtype)
             for t in tff.structure.flatten(weights_type.trainable)]
    return core.unflatten(flat, specs)

  return as_trainable


def compose(stages: Stages, data_type, state_type) -> tff.templates.IterativeProcess:
  """One round from the stages, client states carried through.

  `next(state, client_data, client_states) -> (state, client_states,
  measurements)`, the measurements nested per stage. The stages only meet
  through their results: the distributor's download is all the devices
  read of the server. The process's `split` is the same round as three
  computations (`SplitRound`), traced from the same functions.
  """
  as_trainable = _as_trainable_fn(stages)

  @tff.federated_computation
  def init_fn():
    return tff.federated_zip(collections.OrderedDict(
        global_model_weights=stages.initial_weights(),
        distributor=stages.distributor.initialize(),
        aggregator=stages.aggregator.initialize(),
        finalizer=stages.finalizer.initialize()))

  server_state_type = init_fn.type_signature.result
  client_data_type = tff.FederatedType(data_type, tff.CLIENTS)
  client_states_type = tff.FederatedType(state_type, tff.CLIENTS)

  @tff.federated_computation(server_state_type, client_data_type,
                             client_states_type)
  def next_fn(state, client_data, client_states):
    distributed = stages.distributor.next(state.distributor,
                                          state.global_model_weights)
    devices = _device_round(stages, distributed.result, client_data,
                            client_states)
    new_state, measurements = _server_round(
        stages, as_trainable, state, distributed.state,
        distributed.measurements, devices)
    return new_state, devices['client_states'], measurements

  return _Composed(init_fn, next_fn, lambda: _split_round(
      stages, as_trainable, server_state_type, client_data_type,
      client_states_type))


def _split_round(stages: Stages, as_trainable, server_state_type,
                 client_data_type, client_states_type) -> SplitRound:
  """`compose`'s round as a `SplitRound`, from the same traced functions."""

  @tff.federated_computation(server_state_type,
                             tff.FederatedType(np.int32, tff.CLIENTS))
  def distribute(state, one_client):
    del one_client  # it only makes the download (at CLIENTS) returnable
    distributed = stages.distributor.next(state.distributor,
                                          state.global_model_weights)
    return collections.OrderedDict(
        state=distributed.state, download=distributed.result,
        measurements=distributed.measurements)

  download_type = distribute.type_signature.result.download

  @tff.federated_computation(download_type, client_data_type,
                             client_states_type)
  def devices(download, client_data, client_states):
    return _device_round(stages, download, client_data, client_states)

  result = distribute.type_signature.result

  @tff.federated_computation(server_state_type, result.state,
                             result.measurements,
                             devices.type_signature.result)
  def finish(state, distributor_state, distributor_measurements, devices):
    return _server_round(stages, as_trainable, state, distributor_state,
                         distributor_measurements, devices)

  return SplitRound(distribute, devices, finish)


def num_examples(dataset: tf.data.Dataset) -> int:
  """Examples in a client dataset of (x, y) batches, as TFF models take."""
  return int(_count_examples(dataset))


@tf.function
def _count_examples(dataset):
  # A tf.function traces once per dataset structure: an eager `reduce` would
  # trace anew for every device of every round.
  return dataset.reduce(np.int64(0), lambda n, batch: n + tf.shape(
      split_batch(batch)[1], out_type=tf.int64)[0])


def _readable(client_data) -> tuple:
  """`({index: num_examples}, {index: reason})`: the devices whose data
  reads to the end, and why each other one failed."""
  sizes, dropped = {}, {}
  for i, dataset in enumerate(client_data):
    try:
      sizes[i] = num_examples(dataset)
    except (tf.errors.OpError, ValueError, TypeError) as e:
      dropped[i] = f'{type(e).__name__}: {e}'.splitlines()[0]
  return sizes, dropped


class RoundOutput(NamedTuple):
  state: object
  client_states: list
  metrics: dict


def _flat_metrics(m) -> dict:
  """The nested measurements under the names runs record."""
  return {
      'loss': m['client_work']['loss'],
      'clipped_fraction': m['client_work']['clipped'],
      'upload_residual_norm': m['client_work']['residual_norm'],
      'bytes_up': m['aggregator']['bytes_up'],
      'bytes_down': m['bytes_down'],
      'bytes_broadcast': m['distributor']['bytes_broadcast'],
      'server_residual_norm': m['distributor']['residual_norm'],
      'num_clients': m['aggregator']['num_clients'],
      'non_finite': m['aggregator']['inner']['counts']['non_finite'],
      'over_bound': m['aggregator']['inner']['counts']['over_bound'],
      'update_non_finite': m['finalizer']['update_non_finite'],
      'measurements': m,
  }


class DPSparseFedAvg:
  """A DP-sparse FedAvg learning process with its privacy ledger.

  `initialize()`, `next(state, client_data, client_states)` and
  `get_model_weights(state)`, plus `initial_client_state(client_id)` for new
  devices. `next` records the round's DpEvent (the mechanism's
  `round_event`) in `ledger` first and raises
  `tds.privacy.BudgetExhaustedError` (doing no work) past the budget.
  """

  def __init__(self, process, *, size, upload_k, download_k, catch_up,
               privacy, ledger, min_clients: int = 1,
               subspace: Optional[core.Subspace] = None, model_shapes=()):
    if not min_clients >= 1:
      raise ValueError(f'min_clients must be >= 1, got {min_clients}.')
    self.min_clients = min_clients
    self.iterative_process = process
    self.size = size  # what is trained and sent: the weights, or z
    self.subspace = subspace
    self.model_shapes = [tuple(shape) for shape in model_shapes]
    # The model's trainable weights: what dense FedAvg would send.
    self.model_size = size if subspace is None else subspace.size
    self.catch_up = catch_up
    self.upload_k = upload_k
    self.download_k = download_k
    self.privacy = privacy  # a tds.privacy mechanism, or None
    # The mechanism is frozen: its round's DpEvent is computed once.
    self.round_event = None if privacy is None else privacy.round_event()
    self.ledger = ledger
    self._executors = _workers.LatestCardinality()

  @property
  def noise_multiplier(self) -> Optional[float]:
    return None if self.privacy is None else self.privacy.noise_multiplier


  def initialize(self):
    return self.iterative_process.initialize()

  def initial_client_state(self, client_id: int, state=None):
    """A device that ships with the initial model and an empty residual.

    With 'topk' catch-up the state holds the device's view, so pass the
    initialized `state` it is read from.
    """
    client_state = collections.OrderedDict(
        residual=np.zeros(self.size, np.float32))
    if self.catch_up == 'topk':
      if state is None:
        raise ValueError("catch_up='topk': pass the initialized state, the "
                         "device's view starts as its public model.")
      client_state['view'] = self.get_public_coordinates(state)
    client_state.update(last_sync_round=np.int32(0),
                        client_id=np.int32(client_id))
    return client_state

  def next(self, state, client_data, client_states) -> RoundOutput:
    """One round. Before any work: a device whose data cannot be read (it
    raises) is dropped and counted (`dropped`), example-level devices
    below `min_client_examples` are refused, and the round's DpEvent is
    recorded (refused past the budget). With fewer than `min_clients`
    devices left the round is skipped: nothing is released, the state is
    unchanged, and the one charge already made stays (conservative)."""
    if len(client_data) != len(client_states):
      raise ValueError(f'{len(client_data)} client datasets but '
                       f'{len(client_states)} client states.')
    sizes, dropped = _readable(client_data)
    check = getattr(self.privacy, 'check_num_examples', None)
    for i, n in sizes.items() if check else ():
      check(n, who=f'client {i}')
    if self.ledger is not None:
      self.ledger.record(self.round_event)  # raises before any work
    epsilon = 0.0 if self.ledger is None else self.ledger.epsilon
    if len(sizes) < self.min_clients:
      return RoundOutput(state, list(client_states), {
          'skipped': f'only {len(sizes)} of the min_clients={self.min_clients}'
                     f' devices reported ({len(dropped)} dropped)',
          'dropped': len(dropped), 'epsilon': epsilon})
    keep = sorted(sizes)
    state, kept_states, measurements = self._round(
        state, [client_data[i] for i in keep],
        [client_states[i] for i in keep])
    self._executors.use(len(keep))
    new_states = list(client_states)  # a dropped device keeps its state
    for i, kept in zip(keep, kept_states):
      new_states[i] = kept
    metrics = _flat_metrics(measurements)
    metrics.update(epsilon=epsilon, dropped=len(dropped), skipped=None)
    metrics['dense_bytes_up'] = metrics['dense_bytes_down'] = (
        int(metrics['num_clients']) * self.model_size * 4)
    return RoundOutput(state, new_states, metrics)

  def _round(self, state, client_data, client_states):
    """The round's TFF work: the process's one `next` computation, or its
    `SplitRound` in a context that runs the devices apart from the server
    (`remote`'s with several workers, which offers `on_server`), so each
    device's work runs once there instead of twice."""
    on_server = getattr(tff.framework.get_context_stack().current,
                        'on_server', None)
    split = getattr(self.iterative_process, 'split', None)
    if on_server is None or split is None:
      return self.iterative_process.next(state, client_data, client_states)
    return split(state, client_data, client_states, on_server=on_server)

  def skip_round(self) -> None:
    """Accounts for a round whose Poisson sample was empty.

    Nothing is released, but the accountant's sampled-Gaussian event assumes
    every round happens, so the round is still charged (conservative).
    """
    if self.ledger is not None:
      self.ledger.record(self.round_event)

  def get_model_weights(self, state) -> tff.learning.models.ModelWeights:
    """The server's global model (in a subspace: origin + P z, as
    `ModelWeights` shaped like the model's)."""
    weights = state['global_model_weights']
    if self.subspace is None:
      return weights
    specs = [tf.TensorSpec(shape, tf.float32) for shape in self.model_shapes]
    return weights._replace(trainable=[t.numpy() for t in core.unflatten(
        self.subspace.expand(weights.trainable[0]), specs)])

  def get_public_weights(self, state) -> np.ndarray:
    """The flat trainable weights up-to-date devices hold (the public
    model; in a subspace origin + P z of the public z)."""
    public = np.asarray(state['distributor']['public'])
    if self.subspace is None:
      return public
    return self.subspace.expand(public).numpy()

  def get_public_coordinates(self, state) -> np.ndarray:
    """What the distributor broadcast: the public model, or the public z."""
    return np.asarray(state['distributor']['public'])


def build_dp_sparse_fed_avg_process(
    model_fn, client_optimizer, server_optimizer, *, upload_density: float,
    download_density: float, privacy, local_steps: Optional[int],
    per_example_loss_fn, value_bits: int, history: int,
    shared_fraction: float, catch_up: str, catch_up_density: float,
    seed: Optional[int], audit: AuditHooks = AuditHooks(),
    max_update_norm: Optional[float] = None,
    subspace: Optional[core.Subspace] = None
) -> tff.templates.IterativeProcess:
  """The TFF process composed from its stages; see `build_dp_sparse_fed_avg`.

  With a `subspace` the server's model weights are `[z]` (and the model's
  non-trainable weights): every stage sees a model of `subspace.dims`
  trainable values, and only the client work knows what z means.
  """
  with tf.Graph().as_default():
    model = model_fn()
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))

  @tff.tensorflow.computation
  def initial_weights():
    weights = tff.learning.models.ModelWeights.from_model(model_fn())
    if subspace is None:
      return weights
    return weights._replace(trainable=[tf.zeros([subspace.dims])])

  weights_type = initial_weights.type_signature.result
  size = sum(int(np.prod(t.shape))
             for t in tff.structure.flatten(weights_type.trainable))
  k_up = core.k_for_density(size, upload_density)
  k_shared = num_shared(size, upload_density, download_density, shared_fraction)
  state_type = client_state_type(size, with_view=catch_up == 'topk')

  @tff.federated_computation
  def initial_weights_fn():
    return tff.federated_eval(initial_weights, tff.SERVER)

  distributor = build_sparse_distributor(
      initial_weights_fn, density=download_density, value_bits=value_bits,
      history=history, num_shared=k_shared, catch_up=catch_up)
  device_download = build_device_download(
      distributor.next.type_signature.result.result.member, state_type,
      catch_up=catch_up, catch_up_density=catch_up_density,
      value_bits=value_bits)
  upload = core.sparse_upload(k_up, value_bits=value_bits, l2_norm_clip=(
      None if privacy is None else privacy.upload_clip),
                              clip_feedback=core.default_clip_feedback(subspace))
  dp_sgd = privacy if isinstance(privacy, privacy_lib.ExampleLevelDP) else None

  @tff.tensorflow.computation(weights_type, data_type, state_type, np.int32,
                              tff.TensorType(np.int32, [k_shared]))
  def client_work(weights, data, client_state, round_num, shared_indices):
    return build_client_work(
        model_fn, client_optimizer, upload=upload, dp_sgd=dp_sgd,
        local_steps=local_steps, per_example_loss_fn=per_example_loss_fn,
        seed=seed, audit=audit, subspace=subspace)(
            weights, data, client_state, round_num, shared_indices)

  aggregator = DPSparseAggregatorFactory(
      size, privacy=privacy, num_shared=k_shared, value_bits=value_bits,
      max_update_norm=_update_norm_bound(
          privacy, client_optimizer, weights_type, k=k_up, size=size,
          value_bits=value_bits, max_update_norm=max_update_norm)
  ).create(sparse_type(k_up))
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, weights_type)
  return compose(Stages(initial_weights_fn, distributor, device_download,
                        client_work, aggregator, finalizer),
                 data_type, state_type)


def _update_norm_bound(privacy, client_optimizer, weights_type, *, k: int,
                       size: int, value_bits: int,
                       max_update_norm: Optional[float]) -> Optional[float]:
  """The server's bound on an example-level upload: `max_update_norm`, or
  by default the round update's bound (`ExampleLevelDP.update_norm_bound`,
  when the devices train with TFF's SGD: its learning rate and momentum
  read from its hparams) times `core.error_feedback_gain`, since an upload
  also carries the device's residual. Other
  optimizers get no default (pass `max_update_norm`); client level clips.
  """
  if max_update_norm is not None or not isinstance(
      privacy, privacy_lib.ExampleLevelDP):
    return max_update_norm
  specs = [tf.TensorSpec(t.shape, t.dtype)
           for t in tff.structure.flatten(weights_type.trainable)]
  hparams = client_optimizer.get_hparams(client_optimizer.initialize(specs))
  gain = core.error_feedback_gain(k, size, value_bits)
  if not set(hparams) <= {'learning_rate', 'momentum'} or math.isinf(gain):
    return None
  return gain * privacy.update_norm_bound(
      size, float(hparams['learning_rate']),
      float(hparams.get('momentum', 0.0)))


def _mechanism(privacy, *, seed, **params):
  """The privacy mechanism `build_dp_sparse_fed_avg` was asked for, or None.

  The one place a privacy name becomes an object: 'example' and 'client'
  build `ExampleLevelDP` / `ClientLevelDP` from the scalar arguments (the
  noise calibrated when a target ε is given); a mechanism passes through.
  """
  given = {k: v for k, v in params.items() if v is not None}
  if privacy is None or not isinstance(privacy, str):
    if privacy is not None and given.keys() & {
        'l2_norm_clip', 'noise_multiplier', 'target_epsilon'}:
      raise ValueError('privacy is a mechanism object: its clip and noise '
                       'are its own; do not pass them again.')
    if privacy is not None and seed is not None:
      privacy = dataclasses.replace(privacy, seed=seed)
    return privacy
  if privacy not in ('example', 'client'):
    raise ValueError("privacy mode must be one of None, 'example', 'client' "
                     f'or a tds.privacy mechanism, got {privacy!r}.')
  target = given.pop('target_epsilon', None)
  if (target is None) == ('noise_multiplier' not in given):
    raise ValueError(
        'give exactly one of noise_multiplier and target_epsilon (got '
        f'{params.get("noise_multiplier")} and {target}): the noise is either '
        'fixed or calibrated to the target, never both, so the ε reported is '
        'that of the noise used.')
  rounds, delta, accountant = (given.pop(k, None) for k in
                               ('rounds', 'delta', 'accountant'))
  given.setdefault('noise_multiplier', 0.0)  # calibrated below
  mechanism = _mechanism_of(privacy, given, seed)
  if target is not None:
    mechanism = privacy_lib.calibrated(mechanism, target, rounds=rounds,
                                       delta=delta, accountant=accountant)
  return mechanism


def _mechanism_of(name: str, given: dict, seed):
  fields = {'example': ('l2_norm_clip', 'noise_multiplier', 'batch_size',
                        'local_steps', 'min_client_examples'),
            'client': ('l2_norm_clip', 'noise_multiplier',
                       'clients_per_round', 'total_clients')}[name]
  for field in fields:
    if given.get(field) is None:
      raise ValueError(f'privacy={name!r} needs {field}.')
  cls = (privacy_lib.ExampleLevelDP if name == 'example' else
         privacy_lib.ClientLevelDP)
  return cls(**{f: given[f] for f in fields}, seed=seed)


def _check_densities(**densities) -> None:
  for name, density in densities.items():
    if density is not None and not 0 < density <= 1:
      raise ValueError(f'{name} must be in (0, 1], got {density}.')


def build_dp_sparse_fed_avg(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_optimizer_fn: tff.learning.optimizers.Optimizer,
    server_optimizer_fn: Optional[tff.learning.optimizers.Optimizer] = None,
    *,
    upload_density: Optional[float] = None,
    download_density: Optional[float] = None,
    privacy,
    l2_norm_clip: Optional[float] = None,
    noise_multiplier: Optional[float] = None,
    target_epsilon: Optional[float] = None,
    delta: float = 1e-5,
    clients_per_round: Optional[int] = None,
    total_clients: Optional[int] = None,
    rounds: Optional[int] = None,
    batch_size: Optional[int] = None,
    local_steps: Optional[int] = None,
    min_client_examples: Optional[int] = None,
    per_example_loss_fn=None,
    value_bits: int = 32,
    history: int = 32,
    shared_fraction: float = 0.0,
    catch_up: str = 'union',
    catch_up_density: Optional[float] = None,
    accountant: str = 'rdp',
    seed: Optional[int] = None,
    max_update_norm: Optional[float] = None,
    min_clients: int = 1,
    subspace: Optional[float] = None,
    subspace_seed: int = 0,
    audit: Optional[AuditHooks] = None) -> DPSparseFedAvg:
  """Builds bidirectional top-k federated averaging, DP at example or client level.

  Args:
    model_fn: no-arg callable returning a `tff.learning.models.VariableModel`
      (e.g. `tff.learning.models.from_keras_model`), built from scratch.
    client_optimizer_fn, server_optimizer_fn: `tff.learning.optimizers`
      optimizers (server default: SGD with learning rate 1, i.e. FedAvg).
    upload_density, download_density: fraction of parameters sent each way
      (required; with a `subspace`, fractions of its z, default 1.0: all of
      z, no index bytes).
    privacy: a `tds.privacy.ExampleLevelDP` or `ClientLevelDP` (the noise
      is then the mechanism's, and the scalar privacy arguments below must
      be left out), None, or by name: 'example' (local DP-SGD on each device: `local_steps`
      steps per round, each on a Poisson sample of the device's examples at
      rate batch_size / n, per-example clipping to `l2_norm_clip` and
      noise; needs `batch_size`, `local_steps`, `min_client_examples`) or
      'client' (DP-FedAvg: sent update clipped to
      `l2_norm_clip`, server noise; needs `clients_per_round`,
      `total_clients`, and clients sampled by Poisson sampling at rate
      clients_per_round / total_clients, which the accountant assumes).
    noise_multiplier / target_epsilon: give one; with `target_epsilon` the
      noise is calibrated (`tds.privacy`) for `rounds` rounds at `delta` and
      the ledger's budget is `target_epsilon`.
    min_client_examples: example mode: the fewest examples a device may
      hold. It sets the accounted sampling rate batch_size /
      min_client_examples, the largest any device uses, and `next` refuses
      a device holding fewer, before any work.
    per_example_loss_fn: (y_true, y_pred) -> per-example losses, for example
      mode; default sparse categorical cross-entropy on logits.
    value_bits: 32, 16 or 8, the wire precision of values both ways: values are
      rounded toward zero to it (the error kept in the residuals).
    history: broadcast rounds kept for devices catching up ('union').
    catch_up: how a device that missed rounds gets the current model.
      'union' (exact): the union of the broadcasts it missed, or the dense
      model once they leave the history. Cheap when devices take part in
      most rounds (HAPT's 30 users); with sparse sampling (50 of 1,000) a
      returning device has missed ~20 broadcasts and the download nears
      20 % of dense. 'topk' (bounded): each device keeps its own view and
      downloads the top-k of (global - view) at `catch_up_density`, the rest
      kept for its next visit (error feedback per device); it trains from
      that view, which may lag the public model. The state then holds a
      float32 view per device.
    catch_up_density: 'topk' only; default `download_density`.
    shared_fraction: part of each upload spent on the coordinates of the
      last broadcast with the largest magnitudes (`num_shared`): every device
      sends values there, no indices, so their independent noise averages
      out; the rest is the device's own top-k. 0 is plain top-k.
    seed: fixes all noise (tests); OS entropy when None.
    max_update_norm: the server zeroes a device's update above this L2 norm
      (and any non-finite one); default for example level with TFF's SGD on
      the devices: `ExampleLevelDP.update_norm_bound` times
      `core.error_feedback_gain` (an upload carries the residual too), which
      an honest upload reaches with probability < e^-25 per step. Client
      level clips at `l2_norm_clip` instead.
    min_clients: a round with fewer devices whose data reads is skipped
      (charged once, nothing released); see `DPSparseFedAvg.next`.
    subspace: train in a public random subspace (`core.subspace`): the
      model is origin + P z, origin the initial model of `model_fn` and P a
      count sketch from `subspace_seed` to z of this fraction of the
      trainable weights (or this many dimensions, an int >= 1; or a
      `core.Subspace`, checked to be that sketch of that origin). Only z is
      trained, clipped, noised, uploaded and broadcast, so a device that
      missed any number of rounds catches up exactly with z itself, and the
      noise has dims dimensions. `catch_up='topk'` is refused (there is
      nothing to bound). None: the model's own weights.
    subspace_seed: the seed P is generated from; devices rebuild P from it.
    audit: `AuditHooks` for `tf-dpsparse audit` only (canary clients, uploads
      returned in the client states); None in every real run.

  Example-level accounting is per device, worst case: a device taking part
  in every round, `local_steps` Poisson-sampled steps per round at rate
  batch_size / min_client_examples. Each device samples at batch_size / n
  for its own n >= min_client_examples (n treated as public, as in TF
  Privacy and Opacus), so its ε is at most the one reported.
  """
  audit = audit or AuditHooks()
  if subspace is not None:
    if catch_up != 'union':
      raise ValueError("a subspace catches up exactly with z (dims values): "
                       "catch_up='topk' has nothing to bound; drop it.")
    upload_density = 1.0 if upload_density is None else upload_density
    download_density = 1.0 if download_density is None else download_density
  for name, density in (('upload_density', upload_density),
                        ('download_density', download_density)):
    if density is None:
      raise ValueError(f'{name} is required (the fraction of the weights '
                       'sent), unless training in a subspace.')
  _check_densities(upload_density=upload_density,
                   download_density=download_density,
                   catch_up_density=catch_up_density)
  if catch_up not in CATCH_UPS:
    raise ValueError(f'catch_up must be one of {CATCH_UPS}, got {catch_up!r}.')
  if catch_up_density is not None and catch_up != 'topk':
    raise ValueError("catch_up_density applies to catch_up='topk' only.")
  mechanism = _mechanism(
      privacy, seed=seed, l2_norm_clip=l2_norm_clip,
      noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
      delta=delta, rounds=rounds, accountant=accountant,
      clients_per_round=clients_per_round, total_clients=total_clients,
      batch_size=batch_size, local_steps=local_steps,
      min_client_examples=min_client_examples)
  if audit.canary_from is not None and isinstance(
      mechanism, privacy_lib.ExampleLevelDP):
    raise ValueError('canary clients audit client-level DP; at example level '
                     'the canaries are examples in device data.')
  sub, shapes = _subspace(model_fn, subspace, subspace_seed)
  process = build_dp_sparse_fed_avg_process(
      model_fn, client_optimizer_fn, server_optimizer_fn or
      tff.learning.optimizers.build_sgdm(learning_rate=1.0),
      upload_density=upload_density, download_density=download_density,
      privacy=mechanism, local_steps=getattr(mechanism, 'local_steps',
                                             local_steps),
      per_example_loss_fn=per_example_loss_fn or
      tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
      value_bits=value_bits, history=history, shared_fraction=shared_fraction,
      catch_up=catch_up, catch_up_density=catch_up_density or download_density,
      seed=seed, audit=audit, max_update_norm=max_update_norm, subspace=sub)
  size = process.next.type_signature.parameter[2].member.residual.shape[0]
  ledger = None if mechanism is None else privacy_lib.PrivacyLedger(
      delta, target_epsilon, accountant)
  return DPSparseFedAvg(
      process, size=size, upload_k=core.k_for_density(size, upload_density),
      download_k=core.k_for_density(size, download_density),
      catch_up=catch_up, privacy=mechanism, ledger=ledger,
      min_clients=min_clients, subspace=sub, model_shapes=shapes)


def _subspace(model_fn, subspace, seed: int):
  """`(core.Subspace or None, the model's trainable shapes)`: the count
  sketch around `model_fn`'s initial weights, which are public (a seeded
  initialization every device ships with), as the origin; built (or, given
  a `core.Subspace`, checked) as the deployment server and the LiteRT
  export build it (`deploy.deployed_subspace`)."""
  if subspace is None:
    return None, ()
  trainable = model_fn().trainable_variables
  origin = core.flatten([v.numpy() for v in trainable]).numpy()
  return (deployed_subspace(origin, subspace, seed),
          [tuple(v.shape) for v in trainable])
