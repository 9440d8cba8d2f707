"""Client work: what a device does in a round, as one TFF computation.

Local training (plain SGD on the caller's batches, or DP-SGD with an
`ExampleLevelDP`), then the update (`core.model_update`: initial -
trained) through the `core.sparse_upload` stage with the device's
residual. The residual is per-device state that never leaves the device:
TFF's client-work template cannot return it, so the composer
(`learning.compose`) carries client states through this computation.

`AuditHooks` instrument it for `tf-dpsparse audit` only.
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, NamedTuple, Optional

import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse.keras import per_example as keras_per_example


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


def split_batch(batch):
  if isinstance(batch, Mapping):
    return batch['x'], batch['y']
  return batch[0], batch[1]


def _all_examples(data):
  """The device's whole dataset as two tensors `(x, y)` (any batching in).

  Poisson sampling draws from every example each step, so the device holds
  its (small: hundreds of sensor windows) dataset in memory.
  """
  return split_batch(data.unbatch().batch(2**31 - 1).get_single_element())


class _Parametrization(NamedTuple):
  """What a device's optimizer steps, and how that reaches the model.

  Plain: the model's trainable variables themselves. In a subspace
  (`core.Subspace`): the coordinates z, the model written as origin + P z
  before every gradient, which is pulled back to z (P^T g). Gradients are
  always taken of the model's variables, so every per-example path works
  unchanged; only what they are turned into differs.
  """
  trainable: tuple  # the variables the optimizer steps
  model_trainable: tuple  # the model's, of which gradients are taken
  load: Callable  # (initial ModelWeights) -> None: the round's start
  write_model: Callable  # () -> None: the model from `trainable`
  pullback: Callable  # flat model gradient(s) -> flat gradient(s) of trainable

  @property
  def in_model_weights(self) -> bool:
    """True when the optimizer steps the model's own variables (no subspace)."""
    return self.trainable is self.model_trainable


def _parametrization(model, subspace) -> _Parametrization:
  """The device's `_Parametrization` (variables made once, outside tracing)."""
  weights = tff.learning.models.ModelWeights.from_model(model)
  model_trainable = tuple(weights.trainable)
  if subspace is None:
    load = lambda initial: tf.nest.map_structure(  # noqa: E731
        lambda v, t: v.assign(t), weights, initial)
    return _Parametrization(model_trainable, model_trainable, load,
                            lambda: None, lambda flat: flat)
  z = tf.Variable(tf.zeros([subspace.dims]), trainable=False, name='subspace_z')

  def load(initial):
    z.assign(initial.trainable[0])
    tf.nest.map_structure(lambda v, t: v.assign(t), weights.non_trainable,
                          initial.non_trainable)

  def write_model():
    for v, t in zip(model_trainable, core.unflatten(subspace.expand(z),
                                                    model_trainable)):
      v.assign(t)

  return _Parametrization((z,), model_trainable, load, write_model,
                          subspace.pullback)


def build_client_work(model_fn, optimizer, *, upload: core.Stage,
                      dp_sgd=None, local_steps: Optional[int],
                      per_example_loss_fn, seed, audit=AuditHooks(),
                      subspace: Optional[core.Subspace] = None):
  """The device's round as a tf.function (builds its own model, as TFF does).

  `client_work(weights, data, client_state, round_num, shared_indices)`
  trains from `weights`, turns the update (`core.model_update`, initial -
  trained) into its upload with the `upload` stage (`core.sparse_upload`:
  top-k with the device's residual, clipped for client-level DP, rounded to
  the wire) and returns `(upload, client_state, metrics)`, the state's
  residual replaced and every other field unchanged.

  With `dp_sgd` (a `tds.privacy.ExampleLevelDP`) training is `local_steps`
  DP-SGD steps, each on a Poisson sample of the device's n examples at rate
  batch_size / n (`dp_sgd.private_gradient`); otherwise the caller's
  batches, `local_steps` of them at most.

  With a `subspace`, `weights.trainable` is `[z]` and the device trains z
  (`_Parametrization`): each example's gradient is pulled back to z before
  it is clipped and noised, so DP-SGD's noise has `subspace.dims`
  dimensions, and the update is a change of z.
  """
  model = model_fn()
  params = _parametrization(model, subspace)

  # No Python control flow depends on tensors here: skipping autograph
  # avoids its closure-mismatch warnings on the nested functions.
  @tf.function(autograph=False)
  def client_work(initial_weights, data, client_state, round_num,
                  shared_indices):
    params.load(initial_weights)
    client_seed = None if seed is None else core.fold_in_seed(
        core.fold_in_seed(seed, round_num), client_state.client_id)
    if dp_sgd is not None:
      x_all, y_all = _all_examples(data)
      steps = _train(optimizer, params.trainable,
                     tf.data.Dataset.range(local_steps),
                     _dp_sgd_gradients(dp_sgd, model, params, x_all, y_all,
                                       per_example_loss_fn, client_seed))
      trained_loss = lambda: _training_loss(model, x_all, y_all)  # noqa: E731
    else:
      steps = _train(optimizer, params.trainable, data,
                     _batch_gradients(model, params))
      trained_loss = lambda: _batches_loss(model, data)  # noqa: E731
    # After training: the loss reads the trained weights, and a second pass
    # over `data` must start after the first (a shuffle draws its order when
    # a pass starts), as Dataset.reduce's passes did.
    with tf.control_dependencies([steps]):
      params.write_model()
      loss = trained_loss()
    update = _canary_or(audit, client_state.client_id, core.model_update(
        initial_weights.trainable, params.trainable))
    # Example level: `update` is DP-SGD output and the shared indices are the
    # last broadcast's, so every index chosen here is post-processing.
    # Client level: the upload is only released inside the noised aggregate.
    sent, upload_state, upload_metrics = upload.update(
        update, core.UploadState(client_state.residual),
        shared_indices if shared_indices.shape[0] else None)
    return (collections.OrderedDict(indices=sent.indices, values=sent.values),
            _new_client_state(client_state, upload_state, sent, audit),
            collections.OrderedDict(
                loss=loss,
                clipped=tf.cast(upload_metrics.clipped, tf.float32),
                residual_norm=upload_metrics.residual_norm))

  return client_work


def _new_client_state(client_state, upload_state, sent, audit):
  """The client state with its new residual (and, for an audit, the upload)."""
  new_state = tff.structure.to_odict(client_state)
  new_state['residual'] = upload_state.residual
  if audit.return_uploads:
    new_state['upload_indices'] = sent.indices
    new_state['upload_values'] = sent.values
  return new_state


def _train(optimizer, trainable, steps: tf.data.Dataset,
           gradients) -> tf.Tensor:
  """One optimizer step per element of `steps` (a batch, or a step index),
  on `gradients(element)`; returns the number of steps, ready once the
  weights are trained (a later pass over the same data waits on it)."""

  def step_fn(loop_state, element):
    count, opt_state = loop_state
    opt_state, updated = optimizer.next(opt_state, trainable,
                                        tuple(gradients(element)))
    assigned = [v.assign(t) for v, t in zip(trainable, updated)]
    with tf.control_dependencies(assigned):  # the next step reads them
      return count + 1, tf.nest.map_structure(tf.identity, opt_state)

  specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
  return _fold(steps, (tf.constant(0, tf.int64), optimizer.initialize(specs)),
               step_fn)[0]


def _fold(dataset: tf.data.Dataset, initial, fn):
  """`dataset.reduce(initial, fn)`, as a `tf.while_loop` over an iterator.

  The same elements in the same order, so the same result, without
  `Dataset.reduce`'s cost: tf.data instantiates a reduce function anew
  each time the client work runs, and for DP-SGD's vectorized per-example
  gradients (a graph of thousands of nodes) that took ~0.2 s per device,
  most of a main-job round (benchmarks/round_profile.py). A loop in the
  client work's own graph is instantiated once.
  """
  iterator = iter(dataset)

  def body(state, element):
    return fn(state, element.get_value()), iterator.get_next_as_optional()

  state, _ = tf.while_loop(lambda _, element: element.has_value(), body,
                           (initial, iterator.get_next_as_optional()))
  return state


def _canary_or(audit: AuditHooks, client_id, update):
  """`update`, or for an audit's canary client its fixed direction."""
  if audit.canary_from is None:
    return update
  return tf.where(
      client_id >= audit.canary_from, audit.canary_norm *
      canary_direction(client_id, update.shape[0], audit.canary_seed,
                       audit.canary_k), update)


def _batch_gradients(model, params: _Parametrization):
  """Plain (non-private at the device) gradients of the caller's batches,
  of the variables `params` trains."""

  def gradients(batch):
    params.write_model()
    with tf.GradientTape() as tape:
      output = model.forward_pass(batch, training=True)
    grads = tape.gradient(output.loss, params.model_trainable)
    if params.in_model_weights:
      return grads
    return core.unflatten(params.pullback(core.flatten(grads)),
                          params.trainable)

  return gradients


def _dp_sgd_gradients(dp_sgd, model, params: _Parametrization, x_all, y_all,
                      per_example_loss_fn, client_seed):
  """`gradients(step)`: DP-SGD's gradients of local step `step` (int64), one
  Poisson-sampled step (`dp_sgd.private_gradient`) of the sampled
  examples' clipped gradients (`_per_example_source`: ghost norms or rows),
  its seed folded from the step."""
  size = sum(v.shape.num_elements() for v in params.trainable)
  source = _per_example_source(model, params, x_all, y_all,
                               per_example_loss_fn)

  def gradients(step):
    params.write_model()
    step_seed = None if client_seed is None else core.fold_in_seed(
        client_seed, step)
    mean = dp_sgd.private_gradient(num_examples=tf.shape(y_all)[0],
                                   size=size, seed=step_seed, **source)
    return core.unflatten(mean, params.trainable)

  return gradients


def _per_example_source(model, params: _Parametrization, x_all, y_all,
                        per_example_loss_fn) -> dict:
  """What `private_gradient` clips, decided once per trace: `clipped_sum_fn`
  by ghost norms where `_ghost_model` gives a Keras model (no [n, size]
  rows: one HAPT device's client work measured 1.14x faster than with the
  rows, median of 80 interleaved calls; the main job's round, now mostly
  TFF's own cost, 1.00x over 12 rounds of `benchmarks/fed_bench.py`),
  else `rows_fn`: the
  rows (`_per_example_rows`) pulled back to what `params` trains, clipped
  and noised there. Either way each sampled example's contribution is its
  own gradient clipped to the mechanism's clip."""
  keras_model = _ghost_model(model, params)
  if keras_model is not None:
    def clipped_sum_fn(indices, l2_norm_clip):
      return keras_per_example.ghost_clipped_sum(
          keras_model, per_example_loss_fn, tf.gather(x_all, indices),
          tf.gather(y_all, indices), l2_norm_clip)[0]

    return dict(clipped_sum_fn=clipped_sum_fn)
  rows = _per_example_rows(model, params.model_trainable, per_example_loss_fn)

  def rows_fn(indices):
    return params.pullback(rows(tf.gather(x_all, indices),
                                tf.gather(y_all, indices)))

  return dict(rows_fn=rows_fn)


def _ghost_model(model, params: _Parametrization):
  """The Keras model to take ghost norms of, or None for the rows.

  Ghost norms apply to a `tff.learning.models.from_keras_model` model that
  `tds.keras.per_example.supports_ghost` covers, trained in its own
  weights. Not in a subspace: there each example's row is pulled back to z
  (P^T g) *before* it is clipped, so the clip bounds the norm of z's
  gradient, which ghost norms of the model's weights do not give; the rows
  path keeps that order. (benchmarks/fed_bench.py and the parity tests
  patch this to None to run the rows.)
  """
  if not params.in_model_weights:
    return None
  # TFF's Keras wrapper exposes no public accessor for its Keras model.
  keras_model = getattr(model, '_keras_model', None)
  if keras_model is None or not keras_per_example.supports_ghost(
      keras_model, params.model_trainable):
    return None
  return keras_model


def _per_example_rows(model, trainable, per_example_loss_fn):
  """`rows(x, y)`: each example's flat gradient, [n, size].

  Each comes from the model run on that example alone
  (`tds.core.per_example_gradients`, vectorized), so clipping a row bounds
  exactly one example's contribution. A model from
  `tff.learning.models.from_keras_model` goes through the Keras front's
  `per_example_gradients` (its convolutions' kernel gradients vectorized);
  its `predict_on_batch` is that Keras model's call. Used where ghost
  norms do not apply (`_ghost_model`). (benchmarks/fed_bench.py swaps this
  for the old jacobian path to time a round of each.)
  """
  # TFF's Keras wrapper exposes no public accessor for its Keras model.
  keras_model = getattr(model, '_keras_model', None)
  if keras_model is not None:
    return lambda x, y: keras_per_example.per_example_gradients(
        keras_model, per_example_loss_fn, trainable, x, y)
  return lambda x, y: core.per_example_gradients(
      lambda batch: per_example_loss_fn(
          batch[1], model.predict_on_batch(batch[0], training=True)),
      trainable, (x, y))


def _training_loss(model, x_all, y_all):
  """Mean loss of the trained model on all of the device's examples: a
  diagnostic, in one forward pass of the examples already in memory.

  Computed from raw data and not covered by ε: simulations report it; a
  deployed device sends only its upload (`tds.deploy`).
  """
  return model.forward_pass((x_all, y_all), training=False).loss


def _batches_loss(model, batches: tf.data.Dataset):
  """Mean loss of the trained model on the caller's batches: the same
  diagnostic when training took the caller's batches (non-private at the
  device; not covered by ε)."""
  def add(total, batch):
    output = model.forward_pass(batch, training=False)
    n = tf.cast(output.num_examples, tf.float32)
    return total[0] + output.loss * n, total[1] + n

  loss_sum, count = _fold(batches, (0.0, 0.0), add)
  return loss_sum / tf.maximum(count, 1.0)
