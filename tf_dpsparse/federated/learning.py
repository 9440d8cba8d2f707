"""`build_dp_sparse_fed_avg`: bidirectional DP-sparse federated averaging.

One round, in TFF's vocabulary:

1. distribute: `build_sparse_distributor` broadcasts the top-k change of the
   global model; devices reconstruct the *public* model and train from it.
   A device that missed rounds catches up (`catch_up`): exactly, with the
   union of what it missed ('union', counted from the broadcast history), or
   within a byte budget ('topk': each device keeps its own view, downloads
   the top-k of (global - view) and trains from its view).
2. client work: local training (DP-SGD in example-level mode), then the
   update (initial - trained, TFF's sign) goes through
   `core.clipped_topk_with_error_feedback`: top-k with the device's
   residual (optionally on the last broadcast's largest coordinates first:
   `shared_fraction`), the sent values clipped in client-level mode and
   rounded to the wire's `value_bits`.
3. aggregate: `DPSparseAggregatorFactory` (mean; server noise in client-level
   mode).
4. finalize: the server optimizer applies the mean to the global model.

Error-feedback residuals are per-device state. The process is a
`tff.templates.IterativeProcess` whose `next(state, client_data,
client_states)` returns `(state, client_states, metrics)`, so the caller
decides where device state lives (`ClientStateStore` in simulation, the
device itself in deployment). `DPSparseFedAvg` wraps it with the privacy
ledger, which refuses a round over budget before any work is done.
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse.federated import _workers
from tf_dpsparse import core
from tf_dpsparse import privacy as privacy_lib
from tf_dpsparse.wire import codec
from tf_dpsparse.wire.downloads import catch_up_nbytes
from tf_dpsparse.federated.aggregator import DPSparseAggregatorFactory
from tf_dpsparse.federated.aggregator import sparse_type
from tf_dpsparse.federated.distributor import build_sparse_distributor
from tf_dpsparse.federated.distributor import topk_catch_up
from tf_dpsparse.keras import per_example as keras_per_example

CATCH_UPS = ('union', 'topk')


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


def _shared_indices(dist_state, k_shared):
  """The largest-magnitude k_shared coordinates of the last broadcast.

  Public: every up-to-date device has just decoded that broadcast, and the
  global model it came from is DP (post-processing).
  """
  _, order = tf.math.top_k(tf.abs(dist_state.last_values), k=k_shared)
  return tf.gather(dist_state.last_indices, order)


class AuditHooks(NamedTuple):
  """Instruments for `tf-dpsparse audit` (`tf_dpsparse.audit_runs`), not devices.

  - Canary clients (Andrew et al., "One-shot Empirical Privacy Estimation
    for Federated Learning", ICLR 2024): a client whose id is >=
    `canary_from` is a test instrument, not a device. Its trained update is
    replaced by `canary_norm` * `canary_direction(id, size, canary_seed,
    canary_k)` *before* error feedback, top-k, the client-level clip and
    wire rounding, so the canary takes every path a real update takes.
    `canary_k` coordinates (None: all) make a canary that top-k passes
    whole, the strongest for a sparse upload. Client level or non-private
    only (example-level canaries are examples in device data).
  - `return_uploads`: each device's returned state also holds its upload
    (`upload_indices`, `upload_values`), exactly what the server receives.
    Under example-level DP the server is not trusted, so this grants the
    auditor nothing the threat model does not.
  Neither changes what a real device computes or sends.
  """
  canary_from: Optional[int] = None
  canary_seed: int = 0
  canary_norm: float = 1.0
  canary_k: Optional[int] = None
  return_uploads: bool = False


def canary_direction(canary_id, size: int, seed: int,
                     k: Optional[int] = None) -> tf.Tensor:
  """Canary `canary_id`'s fixed direction: uniform on the unit sphere of R^size
  (or of k random coordinates), from the stateless seed (seed, id), so the
  auditor regenerates it after training, as Andrew et al. do."""
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(canary_id, tf.int64)])
  v = tf.random.stateless_normal([size], seed=key)
  if k is not None and k < size:
    keep = tf.math.top_k(tf.random.stateless_uniform([size], seed=key + 1),
                         k=k).indices
    v = tf.scatter_nd(keep[:, None], tf.gather(v, keep), [size])
  return v / tf.norm(v)


def _split_batch(batch):
  if isinstance(batch, Mapping):
    return batch['x'], batch['y']
  return batch[0], batch[1]


def _all_examples(data):
  """The device's whole dataset as two tensors `(x, y)` (any batching in).

  Poisson sampling draws from every example each step, so the device holds
  its (small: hundreds of sensor windows) dataset in memory.
  """
  return _split_batch(data.unbatch().batch(2**31 - 1).get_single_element())


def _build_client_update(model_fn, optimizer, *, privacy, k, l2_norm_clip,
                         noise_multiplier, batch_size, local_steps,
                         per_example_loss_fn, value_bits, seed,
                         audit=AuditHooks()):
  """The device's round as a tf.function (builds its own model, as TFF does).

  It trains from `initial_weights` and returns the client state with the new
  residual, every other field unchanged. Example level: `local_steps`
  DP-SGD steps, each on a Poisson sample of the device's n examples at rate
  batch_size / n (`core.poisson_gaussian_average`: every example joins
  independently, the noised sum is divided by the expected batch size
  batch_size, and nothing is truncated). n is treated as public, as TF
  Privacy and Opacus do; the process refuses devices below
  `min_client_examples`, so every device's rate is at most the accounted
  batch_size / min_client_examples. Other modes take the caller's batches,
  `local_steps` of them at most.
  """
  model = model_fn()

  # No Python control flow depends on tensors here: skipping autograph
  # avoids its closure-mismatch warnings on the nested functions.
  @tf.function(autograph=False)
  def client_update(initial_weights, data, client_state, round_num,
                    shared_indices):
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    trainable = tuple(weights.trainable)
    client_seed = None if seed is None else core.fold_in_seed(
        core.fold_in_seed(seed, round_num), client_state.client_id)
    if privacy == 'example':
      x_all, y_all = _all_examples(data)
      gradients = _poisson_dp_gradients(
          model, trainable, x_all, y_all, per_example_loss_fn,
          batch_size=batch_size, l2_norm_clip=l2_norm_clip,
          noise_multiplier=noise_multiplier, client_seed=client_seed)
      steps = tf.data.Dataset.range(local_steps)
      data = tf.data.Dataset.from_tensors((x_all, y_all))  # for the metric
    else:
      gradients, steps = _batch_gradients(model, trainable), data
    _train(optimizer, trainable, steps, gradients)
    update = _canary_or(audit, client_state.client_id,
                        core.flatten(initial_weights.trainable) -
                        core.flatten(weights.trainable))
    # Example level: `update` is DP-SGD output and the shared indices are the
    # last broadcast's, so every index chosen here is post-processing.
    # Client level: the clipped upload is only released inside the noised sum.
    sparse, residual, clipped = core.clipped_topk_with_error_feedback(
        update, k, client_state.residual,
        l2_norm_clip if privacy == 'client' else None,
        shared_indices=shared_indices if shared_indices.shape[0] else None,
        value_bits=value_bits)
    upload = collections.OrderedDict(indices=sparse.indices,
                                     values=sparse.values)
    new_state = tff.structure.to_odict(client_state)
    new_state['residual'] = residual
    if audit.return_uploads:
      new_state['upload_indices'] = sparse.indices
      new_state['upload_values'] = sparse.values
    metrics = collections.OrderedDict(
        loss=_training_loss(model, data),
        clipped=tf.cast(clipped, tf.float32),
        residual_norm=tf.norm(residual))
    return upload, new_state, metrics

  return client_update


def _train(optimizer, trainable, steps: tf.data.Dataset, gradients) -> None:
  """One optimizer step per element of `steps` (a batch, or a step index)."""

  @tf.autograph.experimental.do_not_convert
  def reduce_fn(loop_state, element):
    step, opt_state = loop_state
    grads = gradients(element, step)
    opt_state, updated = optimizer.next(opt_state, trainable, tuple(grads))
    tf.nest.map_structure(lambda v, t: v.assign(t), trainable, updated)
    return step + 1, opt_state

  specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
  steps.reduce((tf.constant(0, tf.int64), optimizer.initialize(specs)),
               reduce_fn)


def _canary_or(audit: AuditHooks, client_id, update):
  """`update`, or for an audit's canary client its fixed direction."""
  if audit.canary_from is None:
    return update
  return tf.where(
      client_id >= audit.canary_from, audit.canary_norm *
      canary_direction(client_id, update.shape[0], audit.canary_seed,
                       audit.canary_k), update)


def _batch_gradients(model, trainable):
  """Plain (non-private at the device) gradients of the caller's batches."""

  def gradients(batch, step):
    del step
    with tf.GradientTape() as tape:
      output = model.forward_pass(batch, training=True)
    return tape.gradient(output.loss, trainable)

  return gradients


def _poisson_dp_gradients(model, trainable, x_all, y_all, per_example_loss_fn,
                          *, batch_size, l2_norm_clip, noise_multiplier,
                          client_seed):
  """DP-SGD gradients of one Poisson-sampled step (see `_build_client_update`).

  Each sampled example's gradient comes from the model run on that example
  alone (`tds.core.per_example_gradients`, vectorized), so clipping a row
  bounds exactly one example's contribution. A model from
  `tff.learning.models.from_keras_model` goes through the Keras front's
  `per_example_gradients` (its convolutions' kernel gradients vectorized);
  its `predict_on_batch` is that Keras model's call.
  """
  num_examples = tf.shape(y_all)[0]
  size = sum(v.shape.num_elements() for v in trainable)
  # TFF's Keras wrapper exposes no public accessor for its Keras model.
  keras_model = getattr(model, '_keras_model', None)

  def rows_fn(indices):
    x, y = tf.gather(x_all, indices), tf.gather(y_all, indices)
    if keras_model is not None:
      return keras_per_example.per_example_gradients(
          keras_model, per_example_loss_fn, trainable, x, y)
    return core.per_example_gradients(
        lambda batch: per_example_loss_fn(
            batch[1], model.predict_on_batch(batch[0], training=True)),
        trainable, (x, y))

  def gradients(step_element, step):
    del step_element
    step_seed = None if client_seed is None else core.fold_in_seed(
        client_seed, step)
    mean, _ = core.poisson_gaussian_average(
        rows_fn, num_examples=num_examples,
        sampling_rate=batch_size / tf.cast(num_examples, tf.float32),
        size=size, l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier, seed=step_seed)
    return core.unflatten(mean, trainable)

  return gradients


def _training_loss(model, data):
  """Mean loss of the trained model on the device's data: a diagnostic.

  Computed from raw data and not covered by ε: simulations report it; a
  deployed device sends only its upload (`tds.server`).
  """
  def add(total, batch):
    output = model.forward_pass(batch, training=False)
    n = tf.cast(output.num_examples, tf.float32)
    return total[0] + output.loss * n, total[1] + n

  loss_sum, count = data.reduce((0.0, 0.0), add)
  return loss_sum / tf.maximum(count, 1.0)


def build_dp_sparse_fed_avg_process(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_optimizer: tff.learning.optimizers.Optimizer,
    server_optimizer: tff.learning.optimizers.Optimizer,
    *, upload_density: float, download_density: float, privacy: Optional[str],
    l2_norm_clip: Optional[float], noise_multiplier: Optional[float],
    clients_per_round: Optional[int], batch_size: Optional[int],
    local_steps: Optional[int], per_example_loss_fn, value_bits: int,
    history: int, shared_fraction: float, catch_up: str,
    catch_up_density: float,
    seed: Optional[int],
    audit: AuditHooks = AuditHooks()) -> tff.templates.IterativeProcess:
  """The TFF iterative process; see `build_dp_sparse_fed_avg` for arguments."""
  with tf.Graph().as_default():
    model = model_fn()
    element_type = tff.types.tensorflow_to_type(model.input_spec)
    weights_type = tff.learning.models.weights_type_from_model(model)
  size = sum(int(np.prod(t.shape))
             for t in tff.structure.flatten(weights_type.trainable))
  k_up = core.k_for_density(size, upload_density)
  k_shared = num_shared(size, upload_density, download_density, shared_fraction)
  data_type = tff.SequenceType(element_type)
  from_view = catch_up == 'topk'
  k_catch_up = core.k_for_density(size, catch_up_density)
  state_type = client_state_type(size, with_view=from_view)

  @tff.tensorflow.computation
  def initial_weights():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  @tff.federated_computation
  def initial_weights_fn():
    return tff.federated_eval(initial_weights, tff.SERVER)

  distributor = build_sparse_distributor(
      initial_weights_fn, density=download_density, value_bits=value_bits,
      history=history)
  aggregator = DPSparseAggregatorFactory(
      size, mode=privacy, l2_norm_clip=l2_norm_clip,
      noise_multiplier=noise_multiplier, clients_per_round=clients_per_round,
      num_shared=k_shared, value_bits=value_bits,
      seed=seed).create(sparse_type(k_up))
  shared_type = tff.TensorType(np.int32, [k_shared])

  @tff.tensorflow.computation(weights_type, data_type, state_type, np.int32,
                              shared_type)
  def client_update(weights, data, client_state, round_num, shared_indices):
    if from_view:  # the device's own model, not the public one
      weights = tff.learning.models.ModelWeights(
          trainable=list(core.unflatten(client_state.view, weights.trainable)),
          non_trainable=weights.non_trainable)
    return _build_client_update(
        model_fn, client_optimizer, privacy=privacy, k=k_up,
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        batch_size=batch_size, local_steps=local_steps,
        per_example_loss_fn=per_example_loss_fn, value_bits=value_bits,
        seed=seed, audit=audit)(
            weights, data, client_state, round_num, shared_indices)

  dist_state_type = distributor.state_type.member

  @tff.tensorflow.computation(dist_state_type)
  def shared_of(dist_state):
    return _shared_indices(dist_state, k_shared)

  def sync_client(dist_state, client_state, shared_indices, global_weights):
    synced = tff.structure.to_odict(client_state)
    synced['last_sync_round'] = dist_state.round_num
    if from_view:
      synced['view'], nbytes = topk_catch_up(
          core.flatten(global_weights.trainable), client_state.view,
          k_catch_up, value_bits)
    else:
      nbytes = catch_up_nbytes(dist_state.history_indices,
                               dist_state.history_rounds,
                               client_state.last_sync_round,
                               dist_state.round_num, size, value_bits)
    if k_shared:  # a device that missed the last broadcast needs the indices
      shared_index_nbytes = codec.index_nbytes(shared_indices, size)
      stale = dist_state.round_num - client_state.last_sync_round > 1
      nbytes += tf.where(stale, shared_index_nbytes, tf.constant(0, tf.int64))
    return synced, nbytes

  # Only the 'topk' catch-up reads the global model: 'union' is not handed it.
  download_types = (dist_state_type, state_type, shared_type)
  if from_view:
    download = tff.tensorflow.computation(*download_types, weights_type)(
        sync_client)
  else:
    download = tff.tensorflow.computation(*download_types)(
        lambda dist_state, client_state, shared_indices: sync_client(
            dist_state, client_state, shared_indices, None))

  @tff.tensorflow.computation
  def server_init():
    weights = tff.learning.models.ModelWeights.from_model(model_fn())
    specs = tuple(tf.TensorSpec(t.shape, t.dtype) for t in weights.trainable)
    return collections.OrderedDict(
        global_weights=weights,
        optimizer_state=server_optimizer.initialize(specs))

  server_type = server_init.type_signature.result

  @tff.tensorflow.computation(server_type, tff.TensorType(np.float32, [size]))
  def server_update(server, mean_update):
    weights = server['global_weights']
    trainable = tuple(weights.trainable)
    gradient = tuple(core.unflatten(mean_update, trainable))
    opt_state, updated = server_optimizer.next(server['optimizer_state'],
                                               trainable, gradient)
    return collections.OrderedDict(
        global_weights=tff.learning.models.ModelWeights(
            trainable=list(updated), non_trainable=weights.non_trainable),
        optimizer_state=opt_state)

  @tff.tensorflow.computation(np.float32, np.int32)
  def safe_mean(total, count):
    return total / tf.maximum(tf.cast(count, tf.float32), 1.0)

  @tff.tensorflow.computation
  def one():
    return np.int32(1)

  @tff.federated_computation
  def init_fn():
    return tff.federated_zip(collections.OrderedDict(
        server=tff.federated_eval(server_init, tff.SERVER),
        distributor=distributor.initialize(),
        aggregator=aggregator.initialize()))

  @tff.tensorflow.computation(dist_state_type)
  def round_of(dist_state):
    return dist_state.round_num

  @tff.federated_computation(init_fn.type_signature.result,
                             tff.FederatedType(data_type, tff.CLIENTS),
                             tff.FederatedType(state_type, tff.CLIENTS))
  def next_fn(state, client_data, client_states):
    server_weights = tff.federated_map(
        _field('global_weights', server_type), state.server)
    distributed = distributor.next(state.distributor, server_weights)
    shared_indices = tff.federated_broadcast(
        tff.federated_map(shared_of, distributed.state))
    # The per-device download is a server computation placed at CLIENTS
    # (where the device's state is); devices get only what it counts.
    download_args = (tff.federated_broadcast(distributed.state), client_states,
                     shared_indices)
    if from_view:
      download_args += (tff.federated_broadcast(server_weights),)
    client_states, download_nbytes = tff.federated_map(download, download_args)
    round_num = tff.federated_broadcast(
        tff.federated_map(round_of, distributed.state))
    uploads, client_states, client_metrics = tff.federated_map(
        client_update, (distributed.result, client_data, client_states,
                        round_num, shared_indices))
    aggregated = aggregator.next(state.aggregator, uploads)
    server = tff.federated_map(server_update, (state.server, aggregated.result))
    count = tff.federated_sum(tff.federated_value(one(), tff.CLIENTS))

    def mean_of(name):
      return tff.federated_map(safe_mean, (
          tff.federated_sum(client_metrics[name]), count))

    metrics = tff.federated_zip(collections.OrderedDict(
        loss=mean_of('loss'),
        clipped_fraction=mean_of('clipped'),
        upload_residual_norm=mean_of('residual_norm'),
        bytes_up=aggregated.measurements.bytes_up,
        bytes_down=tff.federated_sum(download_nbytes),
        bytes_broadcast=distributed.measurements.bytes_broadcast,
        server_residual_norm=distributed.measurements.residual_norm,
        num_clients=count))
    new_state = tff.federated_zip(collections.OrderedDict(
        server=server, distributor=distributed.state,
        aggregator=aggregated.state))
    return new_state, client_states, metrics

  return tff.templates.IterativeProcess(init_fn, next_fn,
                                        next_is_multi_arg=True)


def _field(name, struct_type):
  @tff.tensorflow.computation(struct_type)
  def get(value):
    return value[name]
  return get


def num_examples(dataset: tf.data.Dataset) -> int:
  """Examples in a client dataset of (x, y) batches, as TFF models take."""
  return int(_count_examples(dataset))


@tf.function
def _count_examples(dataset):
  # A tf.function traces once per dataset structure: an eager `reduce` would
  # trace anew for every device of every round.
  return dataset.reduce(np.int64(0), lambda n, batch: n + tf.shape(
      _split_batch(batch)[1], out_type=tf.int64)[0])


def _check_client_sizes(client_data, min_client_examples: int) -> None:
  """Refuses devices below `min_client_examples`, before any work.

  Their Poisson sampling rate batch_size / n would exceed the accounted one,
  so the ledger's ε would understate what they spend.
  """
  for i, dataset in enumerate(client_data):
    n = num_examples(dataset)
    if n < min_client_examples:
      raise ValueError(
          f'client {i} holds {n} examples, fewer than min_client_examples='
          f'{min_client_examples} that the privacy accounting assumes; '
          'nothing was run.')


class RoundOutput(NamedTuple):
  state: object
  client_states: list
  metrics: dict


class DPSparseFedAvg:
  """A DP-sparse FedAvg learning process with its privacy ledger.

  `initialize()`, `next(state, client_data, client_states)` and
  `get_model_weights(state)`, plus `initial_client_state(client_id)` for new
  devices. `next` records the round's DpEvent in `ledger` first and raises
  `tds.privacy.BudgetExhaustedError` (doing no work) past the budget.
  """

  def __init__(self, process, *, size, upload_k, download_k, catch_up,
               privacy, noise_multiplier, round_event, ledger,
               min_client_examples=None):
    self.iterative_process = process
    self.size = size
    self.catch_up = catch_up
    self.upload_k = upload_k
    self.download_k = download_k
    self.privacy = privacy
    self.noise_multiplier = noise_multiplier
    self.round_event = round_event
    self.ledger = ledger
    self.min_client_examples = min_client_examples
    self._executors = _workers.LatestCardinality()

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
      client_state['view'] = self.get_public_weights(state)
    client_state.update(last_sync_round=np.int32(0),
                        client_id=np.int32(client_id))
    return client_state

  def next(self, state, client_data, client_states) -> RoundOutput:
    if len(client_data) != len(client_states):
      raise ValueError(f'{len(client_data)} client datasets but '
                       f'{len(client_states)} client states.')
    if self.min_client_examples is not None:
      _check_client_sizes(client_data, self.min_client_examples)
    if self.ledger is not None:
      self.ledger.record(self.round_event)  # raises before any work
    state, client_states, metrics = self.iterative_process.next(
        state, client_data, client_states)
    self._executors.use(len(client_data))
    metrics = dict(metrics)
    metrics['epsilon'] = 0.0 if self.ledger is None else self.ledger.epsilon
    metrics['dense_bytes_up'] = metrics['dense_bytes_down'] = (
        int(metrics['num_clients']) * self.size * 4)
    return RoundOutput(state, list(client_states), metrics)

  def skip_round(self) -> None:
    """Accounts for a round whose Poisson sample was empty.

    Nothing is released, but the accountant's sampled-Gaussian event assumes
    every round happens, so the round is still charged (conservative).
    """
    if self.ledger is not None:
      self.ledger.record(self.round_event)

  @staticmethod
  def get_model_weights(state):
    """The server's global model."""
    return state['server']['global_weights']

  @staticmethod
  def get_public_weights(state) -> np.ndarray:
    """The flat trainable weights up-to-date devices hold (the public model)."""
    return np.asarray(state['distributor']['public'])


def _accounted_sampling(privacy: str, *, batch_size, local_steps,
                        min_client_examples, clients_per_round,
                        total_clients) -> tuple:
  """`(sampling_rate, steps_per_round)` that the accountant charges.

  Example level: `local_steps` Poisson steps at the largest rate any
  admitted device uses, batch_size / min_client_examples. Client level: one
  release per round, devices Poisson-sampled at clients_per_round /
  total_clients.
  """
  if privacy == 'example':
    for name, value in (('batch_size', batch_size),
                        ('local_steps', local_steps),
                        ('min_client_examples', min_client_examples)):
      if value is None or value < 1:
        raise ValueError(f"privacy='example' needs {name} >= 1.")
    if min_client_examples < batch_size:
      raise ValueError(
          f'min_client_examples={min_client_examples} is below batch_size='
          f'{batch_size}: the sampling rate batch_size / n must be <= 1.')
    return batch_size / min_client_examples, local_steps
  if not clients_per_round or not total_clients:
    raise ValueError("privacy='client' needs clients_per_round and "
                     'total_clients.')
  if clients_per_round > total_clients:
    raise ValueError('clients_per_round exceeds total_clients.')
  return clients_per_round / total_clients, 1


def build_dp_sparse_fed_avg(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_optimizer_fn: tff.learning.optimizers.Optimizer,
    server_optimizer_fn: Optional[tff.learning.optimizers.Optimizer] = None,
    *,
    upload_density: float,
    download_density: float,
    privacy: Optional[str],
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
    audit: Optional[AuditHooks] = None) -> DPSparseFedAvg:
  """Builds bidirectional top-k federated averaging, DP at example or client level.

  Args:
    model_fn: no-arg callable returning a `tff.learning.models.VariableModel`
      (e.g. `tff.learning.models.from_keras_model`), built from scratch.
    client_optimizer_fn, server_optimizer_fn: `tff.learning.optimizers`
      optimizers (server default: SGD with learning rate 1, i.e. FedAvg).
    upload_density, download_density: fraction of parameters sent each way.
    privacy: None, 'example' (local DP-SGD on each device: `local_steps`
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
    audit: `AuditHooks` for `tf-dpsparse audit` only (canary clients, uploads
      returned in the client states); None in every real run.

  Example-level accounting is per device, worst case: a device taking part
  in every round, `local_steps` Poisson-sampled steps per round at rate
  batch_size / min_client_examples. Each device samples at batch_size / n
  for its own n >= min_client_examples (n treated as public, as in TF
  Privacy and Opacus), so its ε is at most the one reported.
  """
  if privacy not in privacy_lib.PRIVACY_MODES:
    raise ValueError(f'privacy mode must be one of {privacy_lib.PRIVACY_MODES}, '
                     f'got {privacy!r}.')
  for name, density in (('upload_density', upload_density),
                        ('download_density', download_density)):
    if not 0 < density <= 1:
      raise ValueError(f'{name} must be in (0, 1], got {density}.')
  audit = audit or AuditHooks()
  if audit.canary_from is not None and privacy == 'example':
    raise ValueError('canary clients audit client-level DP; at example level '
                     'the canaries are examples in device data.')
  if catch_up not in CATCH_UPS:
    raise ValueError(f'catch_up must be one of {CATCH_UPS}, got {catch_up!r}.')
  if catch_up_density is None:
    catch_up_density = download_density
  elif catch_up != 'topk':
    raise ValueError("catch_up_density applies to catch_up='topk' only.")
  elif not 0 < catch_up_density <= 1:
    raise ValueError(
        f'catch_up_density must be in (0, 1], got {catch_up_density}.')
  if server_optimizer_fn is None:
    server_optimizer_fn = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
  round_event, ledger = None, None
  if privacy is not None:
    if l2_norm_clip is None or not l2_norm_clip > 0:
      raise ValueError(f'privacy={privacy!r} needs l2_norm_clip > 0.')
    rate, steps_per_round = _accounted_sampling(
        privacy, batch_size=batch_size, local_steps=local_steps,
        min_client_examples=min_client_examples,
        clients_per_round=clients_per_round, total_clients=total_clients)
    noise_multiplier, round_event, ledger = privacy_lib.round_privacy(
        sampling_rate=rate, delta=delta, steps_per_round=steps_per_round,
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
        rounds=rounds, accountant=accountant)
  if per_example_loss_fn is None:
    per_example_loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  process = build_dp_sparse_fed_avg_process(
      model_fn, client_optimizer_fn, server_optimizer_fn,
      upload_density=upload_density, download_density=download_density,
      privacy=privacy, l2_norm_clip=l2_norm_clip,
      noise_multiplier=noise_multiplier, clients_per_round=clients_per_round,
      batch_size=batch_size, local_steps=local_steps,
      per_example_loss_fn=per_example_loss_fn, value_bits=value_bits,
      history=history, shared_fraction=shared_fraction, catch_up=catch_up,
      catch_up_density=catch_up_density, seed=seed, audit=audit)
  size = process.next.type_signature.parameter[2].member.residual.shape[0]
  return DPSparseFedAvg(
      process, size=size, upload_k=core.k_for_density(size, upload_density),
      download_k=core.k_for_density(size, download_density),
      catch_up=catch_up, privacy=privacy,
      noise_multiplier=noise_multiplier, round_event=round_event,
      ledger=ledger, min_client_examples=(
          min_client_examples if privacy == 'example' else None))
