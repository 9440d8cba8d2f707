"""`DPSparseOptimizer`: DP-SGD whose applied update is a top-k sparse slice.

How the per-example losses reach the optimizer in `model.fit`: Keras 2's
`train_step` computes `compiled_loss` under a `GradientTape` and calls
`optimizer.minimize(loss, trainable_variables, tape=tape)`. With a loss of
reduction NONE, `loss` is the per-example vector [batch], not its mean, so the
optimizer can differentiate each entry. Under Keras's own `train_step`,
`minimize` reads that step's `x, y, sample_weight` and clips each
example's gradient by ghost norms (`per_example.ghost_clipped_sum`: one
forward and one backward of the batch, for Sequential Dense/Conv models)
or computes it with the model run on that example alone, vectorized
(`tds.keras.per_example_gradients`, about 2x a plain SGD step); elsewhere
`compute_gradients` re-enters the tape and takes one vectorized (pfor)
`tape.jacobian` of the loss vector, as TF Privacy's `DPKerasSGDOptimizer`
does (30-60x). No custom `Model` is needed for either.
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import tensorflow as tf

from tf_dpsparse import codec
from tf_dpsparse import core
from tf_dpsparse.keras import model_check
from tf_dpsparse.keras import per_example

_OPTIMIZER_TYPES = (tf.keras.optimizers.Optimizer,
                    tf.keras.optimizers.legacy.Optimizer)


@tf.keras.utils.register_keras_serializable(package='tf_dpsparse')
class DPSparseOptimizer(tf.keras.optimizers.Optimizer):
  """Wraps any `tf.keras` optimizer: private gradients, then a sparse step.

  One step: per-example (or per-microbatch) gradients of the loss vector;
  `tds.core.gaussian_average` clips each to `l2_norm_clip`, sums, adds
  N(0, (noise_multiplier * l2_norm_clip)^2) and divides by the number of rows
  of a fixed-size batch, or by `expected_batch_size` under Poisson sampling
  (DP-SGD); the upload stage `tds.core.sparse_upload` keeps the `density` fraction
  of largest coordinates of that noised mean plus the residual; the inner
  optimizer applies the densified slice. The slice is exactly what a device
  would upload, and `wire_bytes` adds up its `tds.codec` encoded size.

  Privacy (example-level, sampled Gaussian mechanism): indices are chosen on
  the noised mean and the residual holds only noised values (the noised means
  minus what was sent), so the sparse step is post-processing and ε is that of
  DP-SGD with the same noise (see `PrivacyCallback`). A stateful inner
  optimizer (momentum, Adam) moves every weight, but only from sent slices.
  Which ε applies depends on how batches are drawn: Poisson-sampled batches
  (`tds.keras.poisson_batches` with `expected_batch_size`) earn the amplified
  Poisson ε; `model.fit(x, y, batch_size)` shuffles into fixed-size batches
  and gets the shuffled bound. Layers that learn outside the gradient
  (BatchNormalization, stateful RNNs, adapted Normalization) are refused
  when `model.fit` first calls `minimize` (`tds.keras.check_model`).

  Saving: `.keras` files, `.h5` files, `save_weights` checkpoints (TF format
  and `.weights.h5`) and `tf.train.Checkpoint`s of the model (what
  `tf.keras.callbacks.BackupAndRestore` writes every epoch) keep the step
  count, example count, residual and the inner optimizer's state: all are
  variables tracked by this optimizer, restored when `build` creates them
  after a restore too. So a run resumed by `BackupAndRestore` continues the
  error feedback, and `PrivacyCallback` its ε, from the backup. A SavedModel
  directory cannot restore optimizer state (Keras re-creates the optimizer
  from its config), so saving one with this optimizer raises; save with
  `include_optimizer=False` to export.

  WARNING: the loss must be per-example: compile with a `tf.keras.losses.Loss`
  whose `reduction` is NONE (a scalar loss raises). Noise comes from a
  `tf.random.Generator` seeded from OS entropy, its state kept out of
  checkpoints so a restored run never replays noise. With `seed` (tests,
  reproductions) each step's noise is a function of the seed and the step
  count instead, so a resumed run draws what an uninterrupted one would.
  Not for `tf.distribute` strategies with several replicas.

  Cost: under `model.fit` (Keras's `train_step`) a step costs about two
  plain SGD steps or less (`minimize`'s fast path: ghost norms for a
  Sequential of Dense/Conv1D/Conv2D layers, else per-example
  forward/backward under `tf.vectorized_map`). Where only the loss vector
  is at hand (an overridden `train_step`, a custom loop calling
  `minimize`), the jacobian does about one backward pass of the whole
  batch per row (as in TF Privacy), O(rows x batch); `num_microbatches` then trades cost against
  noise (σC / rows on the mean).

  Args:
    optimizer: the inner `tf.keras` optimizer (new or legacy) that applies the
      sparse update; its state (momentum, Adam moments) is checkpointed here.
    l2_norm_clip: L2 bound on each example's (microbatch's) gradient, > 0.
    noise_multiplier: noise stddev over `l2_norm_clip`, >= 0.
    density: fraction of coordinates applied per step, in (0, 1].
    num_microbatches: rows per batch (it must divide the batch size); each
      row's gradient is the mean over its examples. None: one per example.
    expected_batch_size: divide the noised sum by this data-independent
      number (q * n for Poisson sampling at rate q over n examples) instead
      of the batch's row count, which under Poisson sampling is itself
      data-dependent. Required for `PrivacyCallback(sampling='poisson')`;
      not with `num_microbatches` (variable-size batches cannot be split
      into a fixed number of microbatches).
    seed: fixes the noise: step t draws from `fold_in_seed(seed, t)`. Tests
      and reproductions only: whoever knows the seed can subtract the noise,
      and a step redone after a restore redraws the noise of the attempt it
      replaces. None draws from OS entropy.
    name: the optimizer's name.
  """

  def __init__(self,
               optimizer,
               *,
               l2_norm_clip: float,
               noise_multiplier: float,
               density: float,
               num_microbatches: Optional[int] = None,
               expected_batch_size: Optional[float] = None,
               seed: Optional[int] = None,
               name: str = 'DPSparseOptimizer'):
    if (not isinstance(optimizer, _OPTIMIZER_TYPES) or
        isinstance(optimizer, DPSparseOptimizer)):
      raise TypeError(
          'optimizer must be a tf.keras optimizer (new or legacy) other than '
          f'a DPSparseOptimizer, got {optimizer!r}.')
    if not l2_norm_clip > 0:
      raise ValueError(f'l2_norm_clip must be > 0, got {l2_norm_clip}.')
    if not noise_multiplier >= 0:
      raise ValueError(
          f'noise_multiplier must be >= 0, got {noise_multiplier}.')
    if not 0 < density <= 1:
      raise ValueError(f'density must be in (0, 1], got {density}.')
    if num_microbatches is not None and (
        int(num_microbatches) != num_microbatches or num_microbatches < 1):
      raise ValueError(
          f'num_microbatches must be a positive integer or None, got '
          f'{num_microbatches}.')
    if expected_batch_size is not None and not expected_batch_size > 0:
      raise ValueError(f'expected_batch_size must be > 0 or None, got '
                       f'{expected_batch_size}.')
    if expected_batch_size is not None and num_microbatches is not None:
      raise ValueError(
          'expected_batch_size (Poisson-sampled, variable-size batches) does '
          'not go with num_microbatches: use one row per example.')
    super().__init__(name=name, jit_compile=False)
    self._inner = optimizer
    self.l2_norm_clip = float(l2_norm_clip)
    self.noise_multiplier = float(noise_multiplier)
    self.density = float(density)
    self.num_microbatches = num_microbatches
    self.expected_batch_size = (None if expected_batch_size is None else
                                float(expected_batch_size))
    self._examples = self.add_variable([], tf.int64, name='examples')
    self._wire_bytes = self.add_variable([], tf.int64, name='wire_bytes')
    self._seed_generator(seed)
    self._set_pending_state(None)
    self._set_trained(())
    self._dp_gradients_computed = False

  def _create_iteration_variable(self):
    """The step count, named apart from the inner optimizer's 'iteration'.

    `.h5` files key optimizer variables by name, and `variables` holds
    both optimizers' counters.
    """
    with tf.init_scope():
      self._iterations = tf.Variable(0, name='dp_iteration', dtype=tf.int64,
                                     trainable=False)
    self._variables.append(self._iterations)

  @tf.__internal__.tracking.no_automatic_dependency_tracking
  def _seed_generator(self, seed):
    """The noise source; never in a checkpoint.

    Without a seed: an RNG from OS entropy, outside checkpoints, so that
    restoring a checkpoint never replays noise already drawn. With a seed:
    no RNG state at all, the noise of step t derives from (seed, t), and t
    is checkpointed, so a resumed run equals an uninterrupted one.
    """
    self._seed = None if seed is None else int(seed)
    self._generator = (tf.random.Generator.from_non_deterministic_state()
                       if seed is None else None)

  def _noise_seed(self):
    """This step's stateless noise seed (see `_seed_generator`)."""
    if self._seed is None:
      return self._generator.make_seeds(1)[:, 0]
    return core.fold_in_seed(self._seed, self._iterations.read_value())

  @tf.__internal__.tracking.no_automatic_dependency_tracking
  def _set_trained(self, var_list):
    """The model variables this optimizer trains (not its own state)."""
    self._trained = tuple(var_list)

  @tf.__internal__.tracking.no_automatic_dependency_tracking
  def _set_pending_state(self, values):
    """Loaded values waiting for `build` to create the variables they fill."""
    self._pending_state = values

  @property
  def inner_optimizer(self):
    return self._inner

  @property
  def learning_rate(self):
    return self._inner.learning_rate

  @learning_rate.setter
  def learning_rate(self, learning_rate):
    self._inner.learning_rate = learning_rate

  @property
  def residual(self) -> tf.Variable:
    """float32[size]: noised mass not sent yet (error feedback); after build."""
    return self._residual

  @property
  def size(self) -> int:
    """Parameters in the flat update (all trained variables); after build."""
    return self._size

  @property
  def k(self) -> int:
    """Coordinates sent per step: `ceil(density * size)`; after build."""
    return self._k

  @property
  def wire_bytes(self) -> tf.Variable:
    """int64: total `tds.codec` bytes of the sparse updates applied so far."""
    return self._wire_bytes

  @property
  def restore_pending(self) -> bool:
    """True while loaded values wait for `build` (see `load_own_variables`)."""
    return self._pending_state is not None

  @property
  def examples(self) -> tf.Variable:
    """int64: examples in all steps so far (`iterations` counts the steps).

    For shuffled-batch accounting `PrivacyCallback` counts passes over the
    data from it and checks it against the declared batch size. (An empty
    Poisson draw counts its one weight-0 placeholder; Poisson accounting
    uses the steps only.)
    """
    return self._examples

  @property
  def variables(self):
    """This optimizer's variables, then the inner optimizer's.

    All the state a save must keep: steps, examples, bytes, residual, and
    the inner optimizer's iterations and slots (what `.h5` files store).
    A legacy inner optimizer lists its slots in creation order, which a
    checkpoint restore changes, so they are listed here by variable.
    """
    if isinstance(self._inner, tf.keras.optimizers.Optimizer):
      inner = list(self._inner.variables)
    else:
      names = self._inner.get_slot_names()
      inner = [self._inner.iterations] + [
          self._inner.get_slot(v, name)
          for v in self._trained for name in names]
    return list(self._variables) + inner

  def build(self, var_list):
    """Creates the residual and the inner slots; fills in a pending load.

    The residual is one flat vector over `var_list`, in that order.
    """
    super().build(var_list)
    if getattr(self, '_built', False):
      return
    self._var_keys = tuple(self._var_key(v) for v in var_list)
    self._set_trained(var_list)
    self._size = sum(v.shape.num_elements() for v in var_list)
    self._k = core.k_for_density(self._size, self.density)
    self._residual = self.add_variable([self._size], tf.float32,
                                       name='residual')
    if isinstance(self._inner, tf.keras.optimizers.Optimizer):
      self._inner.build(var_list)
    else:
      self._inner._create_all_weights(var_list)  # as Keras's .h5 loader does
    self._built = True
    if self._pending_state is not None:
      pending = self._pending_state
      self._set_pending_state(None)
      self.set_weights(pending)

  def set_weights(self, weights):
    """Assigns `variables` from `weights`; any mismatch raises, never skips."""
    if not getattr(self, '_built', False):
      raise ValueError('DPSparseOptimizer.set_weights before build: call '
                       'optimizer.build(model.trainable_variables) first.')
    variables = self.variables
    if len(weights) != len(variables):
      raise ValueError(
          f'DPSparseOptimizer has {len(variables)} variables (its own, then '
          f'the inner optimizer\'s), got {len(weights)} values: refusing to '
          'restore a partial state (it would reset the privacy spent).')
    for variable, value in zip(variables, weights):
      if tuple(variable.shape) != np.shape(value):
        raise ValueError(f'{variable.name}: shape {variable.shape} cannot '
                         f'take a value of shape {np.shape(value)}.')
      variable.assign(value)

  def load_own_variables(self, store):
    """Restores from a `.keras` / `.weights.h5` store, before build too.

    Keras's default skips an optimizer that is not built yet (a compiled
    model that has not trained), which would silently restart the privacy
    count: the values are kept here and assigned by `build`.
    """
    values = [np.array(store[str(i)]) for i in range(len(store.keys()))]
    if getattr(self, '_built', False):
      self.set_weights(values)
    else:
      self._set_pending_state(values)

  def _trackable_children(self, save_type='checkpoint', **kwargs):
    """Refuses the Keras SavedModel format, which would lose the DP state.

    `tf.keras.models.load_model` of a SavedModel directory re-creates the
    optimizer from its config: steps, examples and residual restart at 0
    and ε would be reported too low.
    """
    if save_type == 'savedmodel':
      raise ValueError(
          'DPSparseOptimizer cannot be saved in the SavedModel format: '
          'loading it would reset the steps, examples and residual, hence '
          'the privacy spent. Save a .keras file (model.save("m.keras")), a '
          'checkpoint (model.save_weights), or export the model without its '
          'optimizer: model.save(path, include_optimizer=False).')
    return super()._trackable_children(save_type, **kwargs)

  def _microbatch_losses(self, loss):
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank == 0:
      raise ValueError(
          'DPSparseOptimizer needs the per-example loss vector, got a scalar: '
          'compile with a loss whose reduction is NONE, e.g. '
          'tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, '
          'reduction=tf.keras.losses.Reduction.NONE).')
    if self.num_microbatches is None:
      return tf.reduce_mean(tf.reshape(loss, [tf.shape(loss)[0], -1]), axis=1)
    batch = loss.shape[0]
    message = (f'the batch size must be divisible by num_microbatches='
               f'{self.num_microbatches}')
    if batch is not None and batch % self.num_microbatches:
      raise ValueError(f'{message}, got {batch}.')
    check = tf.debugging.assert_equal(
        tf.shape(loss)[0] % self.num_microbatches, 0, message=message)
    with tf.control_dependencies([check]):
      return tf.reduce_mean(
          tf.reshape(loss, [self.num_microbatches, -1]), axis=1)

  def compute_gradients(self, loss, var_list, tape=None):
    """DP-SGD gradients: the clipped, noised mean of per-example gradients.

    `loss` is the per-example loss vector recorded on `tape`, or a callable
    returning it. Each microbatch's gradient is its examples' mean (TF
    Privacy's convention); there are `num_microbatches` rows, or one per
    example. Returns `(gradient, variable)` pairs. They are already private:
    what is done with them afterwards (top-k, upload) is post-processing.

    This is the jacobian path, for callers that hold only the loss vector
    and its tape (a custom `train_step`, a custom loop): it costs about one
    backward pass of the batch per row. `minimize` under Keras's own
    `train_step` takes the fast path instead (see `minimize`).
    """
    if not callable(loss) and tape is None:
      raise ValueError('`tape` is required when a `Tensor` loss is passed.')
    tape = tf.GradientTape() if tape is None else tape
    with tape:
      if callable(loss):
        if not callable(var_list):
          tape.watch(var_list)
        loss = loss()
      microbatch_losses = self._microbatch_losses(loss)
    var_list = list(var_list() if callable(var_list) else var_list)
    jacobians = tape.jacobian(
        microbatch_losses, var_list,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    rows = tf.vectorized_map(core.flatten, jacobians)  # [microbatches, size]
    return self._private_gradients(rows, loss, var_list)

  def _private_gradients(self, rows, loss, var_list, clipped_total=None):
    """The noised mean of the rows (one per example or microbatch), or of
    `clipped_total`, their clipped sum (ghost norms, one row per example:
    `rows` is then None). The denominator is the number of rows, or
    `expected_batch_size`."""
    if clipped_total is None:
      clipped_total, _ = core.clipped_sum(rows, self.l2_norm_clip)
      count = tf.shape(rows)[0]
    else:
      count = tf.shape(loss)[0]
    denominator = (count if self.expected_batch_size is None else
                   self.expected_batch_size)
    mean = core.noised_average(clipped_total, self.l2_norm_clip,
                               self.noise_multiplier, denominator,
                               self._noise_seed())
    self._examples.assign_add(tf.shape(loss, out_type=tf.int64)[0])
    self._dp_gradients_computed = True
    return list(zip(core.unflatten(mean, var_list), var_list))

  def _microbatch_rows(self, rows):
    """Per-example rows [batch, size] -> their microbatch means (linear, so
    the gradient of a microbatch's mean loss, as on the jacobian path)."""
    if self.num_microbatches is None:
      return rows
    return tf.reduce_mean(
        tf.reshape(rows, [self.num_microbatches, -1, rows.shape[1]]), axis=1)

  def minimize(self, loss, var_list, tape=None):
    """DP-SGD step; first refuses a model that learns outside the gradient.

    Under `model.fit` with Keras's own `train_step` (any model that does not
    override it), the step takes the fast path: that `train_step`'s inputs
    `x, y, sample_weight` go through `per_example.ghost_clipped_sum` where
    `_takes_ghost_norms` (each example's exact gradient norm from one
    forward and one backward, the clipped sum from one weighted backward:
    a `fit` step of the shipped CNNs measured 1.05-1.46x faster than the
    rows at batch 64 in three `benchmarks/keras_bench.py --quick` runs on
    a loaded machine) or else `tds.keras.per_example_gradients`
    (the model's forward and backward on one example at a time,
    vectorized), at about 2x a plain SGD step instead of the jacobian's
    30-60x. Same clipped sum (each example's contribution bounded by the
    clip either way), same noise. The jacobian path (`compute_gradients`)
    remains where the inputs are not Keras's: an overridden `train_step` or
    `compute_loss`, several outputs or loss weights, a masked output, or a
    direct call; the model is the one whose `train_step` calls this (see
    `tds.keras.check_model` for what is refused and why).
    """
    model, step = _calling_train_step(self, loss)
    if model is not None:
      model_check.check_model(model)
    if step is None or callable(var_list):
      return super().minimize(loss, var_list, tape)
    # Validates the loss vector and the batch; the control dependency runs
    # the divisibility check before the rows are reshaped into microbatches.
    checked = self._microbatch_losses(loss)
    var_list = list(var_list)
    if self._takes_ghost_norms(model, var_list):
      total, _ = per_example.ghost_clipped_sum(
          model, model.loss, step['x'], step['y'], self.l2_norm_clip,
          step['sample_weight'])
      self.apply_gradients(self._private_gradients(None, loss, var_list,
                                                   total))
      return
    rows = per_example.per_example_gradients(
        model, model.loss, var_list, step['x'], step['y'],
        step['sample_weight'])
    with tf.control_dependencies([checked]):
      rows = self._microbatch_rows(rows)
    self.apply_gradients(self._private_gradients(rows, loss, var_list))

  # Benchmarks and parity tests set this False to time / compare the rows.
  _ghost_norms = True

  def _takes_ghost_norms(self, model, var_list) -> bool:
    """Whether `minimize`'s fast path clips by ghost norms, decided once
    when Keras traces the step: one row per example (a microbatch's
    gradient is a sum of examples' gradients, whose norm per-example ghost
    norms do not give) and a model `per_example.supports_ghost` covers for
    `var_list` (a Sequential of Dense/Conv1D/Conv2D and per-example
    layers). Elsewhere the rows: the same clipped sum, slower."""
    return (self._ghost_norms and self.num_microbatches is None and
            per_example.supports_ghost(model, var_list))

  def apply_gradients(self, grads_and_vars, name=None):
    """Applies the top-k of gradients + residual with the inner optimizer.

    The gradients must come from `compute_gradients` (as in `minimize`):
    sparsifying raw gradients would not be private. Returns `iterations`.
    """
    if not self._dp_gradients_computed:
      raise ValueError(
          'DPSparseOptimizer.apply_gradients takes the private gradients of '
          'compute_gradients (or use minimize / model.fit); raw gradients '
          'would be released without noise.')
    grads, var_list = zip(*grads_and_vars)
    with tf.init_scope():
      self.build(var_list)
    if tuple(self._var_key(v) for v in var_list) != self._var_keys:
      raise ValueError(
          'DPSparseOptimizer was built for other variables (or another '
          'order): the residual is one flat vector over them.')
    with tf.name_scope(name or self.name):
      sparse, upload_state, _ = core.sparse_upload(self._k).update(
          core.flatten(grads), core.UploadState(self._residual))
      self._residual.assign(upload_state.residual)
      self._wire_bytes.assign_add(codec.encoded_nbytes(sparse.indices,
                                                       self._size))
      update = core.unflatten(core.densify(sparse), list(var_list))
      self._inner.apply_gradients(zip(update, var_list))
      return self._iterations.assign_add(1)

  def finalize_variable_values(self, var_list):
    if isinstance(self._inner, tf.keras.optimizers.Optimizer):
      self._inner.finalize_variable_values(var_list)

  def get_config(self):
    """Config without the seed: a re-created optimizer draws fresh noise."""
    return {
        'name': self.name,
        'optimizer': tf.keras.optimizers.serialize(self._inner),
        'l2_norm_clip': self.l2_norm_clip,
        'noise_multiplier': self.noise_multiplier,
        'density': self.density,
        'num_microbatches': self.num_microbatches,
        'expected_batch_size': self.expected_batch_size,
    }

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    config['optimizer'] = tf.keras.optimizers.deserialize(
        config['optimizer'], custom_objects=custom_objects)
    return cls(**config)


def _calling_train_step(optimizer, loss):
  """`(model, inputs)`: the Keras model whose `train_step` calls `optimizer`.

  Keras 2 hands an optimizer only variables and the loss; `Model.train_step`
  (or an override) calls `self.optimizer.minimize`, so the model is the
  `self` of a frame up the stack. `inputs` (the frame's `x, y,
  sample_weight`) are given only when that frame is Keras's own
  `Model.train_step` computing exactly this `loss` with Keras's
  `compute_loss` and a single per-example `Loss` on one unmasked output:
  then the per-example losses are `model.loss(y_i, model(x_i))` times the
  weights, which the fast path recomputes example by example. Otherwise
  `inputs` is None. Runs when Keras traces the step (every step under
  `run_eagerly`). `(None, None)` outside `fit`.
  """
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None:
    model = frame.f_locals.get('self')
    if (isinstance(model, tf.keras.Model) and
        getattr(model, 'optimizer', None) is optimizer):
      return model, _keras_step_inputs(model, frame, loss)
    frame = frame.f_back
  return None, None


def _keras_step_inputs(model, frame, loss):
  found = frame.f_locals
  y_pred = found.get('y_pred')
  if (frame.f_code is not tf.keras.Model.train_step.__code__ or
      found.get('loss') is not loss or found.get('y') is None or
      type(model).compute_loss is not tf.keras.Model.compute_loss or
      not isinstance(model.loss, tf.keras.losses.Loss) or
      model.compiled_loss._user_loss_weights is not None or  # pylint: disable=protected-access
      not tf.is_tensor(y_pred) or
      getattr(y_pred, '_keras_mask', None) is not None):
    return None
  return {name: found[name] for name in ('x', 'y', 'sample_weight')}
