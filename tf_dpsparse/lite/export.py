"""`export_client`: a Keras model as a self-training, DP, sparse-uploading .tflite.

The exported flatbuffer holds the device's whole state as resource variables
(the model weights, the *public* model it last synced with, its upload
residual, and the gradient sum of the DP-SGD step in progress) and ten
signatures, each a `tf.function` that calls `tds.core`:

* `accumulate(x, y, mask) -> loss_sum`: adds the clipped per-example
  gradients of one chunk of `max_batch` examples to the accumulator
  (`core.clipped_sum`; rows whose `mask` is False are padding and add
  nothing). Per-example gradients come from one backward pass against
  per-example copies of the weights (see `layers`).
* `step() -> size`: closes the DP-SGD step: adds N(0, (noise_multiplier *
  l2_norm_clip)^2) once to the accumulated sum (`core.add_gaussian_noise`),
  divides by the exported `batch_size`, applies SGD and zeroes the
  accumulator.
* `config() -> batch_size, l2_norm_clip, noise_multiplier`: the privacy
  settings baked in, so the runtime wrapper accounts with the exported ones.
* `infer(x) -> logits` (any batch size).
* `get_update() -> indices, values`: the `core.sparse_upload` stage on
  the update `core.model_update(public, weights)` = public - weights
  (initial - trained, TFF's sign: every front's) plus the residual, which
  therefore has the same sign. With `update_l2_norm_clip`, the sent
  values are clipped by `core.clip_by_l2_norm` and what clipping removed goes
  back into the residual (client-level DP). With `value_bits=8` the values
  are rounded on the device to what the wire carries, the error kept too.
  The weights then return to the public model: the delta is consumed, now
  either uploaded or in the residual.
* `apply_download(indices, values) -> num_applied`: adds a server download
  to the public model and makes it the weights.
* `get_weights() -> weights` (the model's flat weights), `get_coordinates()
  -> coordinates` (what is trained and synced: the weights, or z),
  `set_weights(weights) -> size` (a dense sync of the coordinates: it sets
  them and the public ones), and `save() -> weights, public, residual` /
  `restore(...)` (coordinates) to persist the state across app restarts.

A public random subspace (issue 18, `subspace=`): the device trains z of
theta = origin + P z (`core.subspace`: a count sketch around the model's
current weights, rebuilt from `subspace_seed` by the server). The model is
written as origin + P z by a GATHER, each example's gradient row is pulled
back to z by an UNSORTED_SEGMENT_SUM (both TFLite builtins: measured), and
every state vector above (public, residual, accumulator, upload, download)
is of z. The order is the TFF client work's: per-example rows -> pullback
-> clip -> noise, so DP-SGD's sensitivity is the clip in z-space and its
noise has `dims` dimensions. Only the buckets and signs of P are baked in
(O(d) constants), never a d x s matrix.

Every state-changing signature returns a value: the converter silently
drops a signature without outputs, side effects included (measured).

Poisson sampling (what the accountant assumes, `tds.privacy.compute_epsilon`
at q = batch_size / n): the batch of a step is a Poisson sample of the
device's n examples, so its size varies and may exceed any static shape.
Overflow is made impossible rather than truncated: `LiteClient.train_step`
samples, cuts the sample into padded chunks of `max_batch`
(`core.padded_chunks`) and calls `accumulate` once per chunk, then `step`
once. A large sample takes more chunks; `max_batch` changes cost, never the
result. `step` divides by `batch_size`, the *expected* batch size q * n, never
by the realized count (which is data-dependent). The sampling itself happens
in the wrapper, not in the flatbuffer (see `LiteClient`).

Privacy (example-level): the upload is a function of DP-SGD's noised steps
and the residual of earlier noised steps, so choosing its top-k is
post-processing; the residual and the accumulator never leave the device.
With `update_l2_norm_clip` (client-level) the upload is clipped but not
noised: the server must be trusted to add noise to the aggregate
(`tds.deploy.DeploymentServer` with a `tds.privacy.ClientLevelDP`).

Noise: `core.add_gaussian_noise` is called unseeded, which lowers to the
RANDOM_STANDARD_NORMAL builtin. Without `seed` its seed attributes are 0 and
LiteRT seeds the generator itself, so every interpreter draws different noise
(tested), even if the exporting program called `tf.random.set_seed`. With
`seed`, the draws repeat across interpreters built from the same bytes:
for tests only. (`core`'s own stateless `seed=` path needs Flex ops.)
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, List, NamedTuple, Optional

import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.python.convert import ConverterError

from tf_dpsparse import core
from tf_dpsparse.deploy.parametrization import deployed_subspace
from tf_dpsparse.lite import layers

SIGNATURES = ('accumulate', 'step', 'config', 'infer', 'get_update',
              'apply_download', 'get_weights', 'get_coordinates',
              'set_weights', 'save', 'restore')


def per_example_loss(logits, labels, num_classes: int):
  """Softmax cross-entropy per example, written with log_softmax (no Flex)."""
  return -tf.reduce_sum(
      tf.one_hot(labels, num_classes) * tf.nn.log_softmax(logits), axis=-1)


class _Coordinates(NamedTuple):
  """What the device trains, and how that reaches the model (as the TFF
  client work's `_Parametrization`).

  Plain: the model's weights, as variables. In a subspace: z alone is a
  variable; the model's parameters are origin + P z, recomputed (a GATHER)
  wherever they are read, and gradient rows are pulled back to z.
  """
  variables: list  # the tf.Variables the optimizer steps
  params: Callable[[], list]  # the model's parameters, in `layers.lower` order
  pullback: Callable  # model gradient rows [n, d] -> coordinate rows [n, size]


def _coordinates(variables, subspace) -> _Coordinates:
  """The device's `_Coordinates` around the Keras `variables`' values."""
  if subspace is None:
    params = [tf.Variable(v.read_value(), name=v.name.split(':')[0])
              for v in variables]
    return _Coordinates(params, lambda: params, lambda rows: rows)
  z = tf.Variable(tf.zeros([subspace.dims]), name='subspace_z')
  return _Coordinates(
      [z], lambda: core.unflatten(subspace.expand(z), variables),
      subspace.pullback)


class _ClientModule(tf.Module):
  """The device's computation and state; see the module docstring."""

  def __init__(self, keras_model, *, batch_size, max_batch, l2_norm_clip,
               noise_multiplier, density, learning_rate, num_classes,
               update_l2_norm_clip, value_bits, seed, subspace,
               subspace_seed):
    super().__init__()
    self._forward, variables = layers.lower(keras_model)
    self._coords = _coordinates(variables, subspace)
    self._params = self._coords.variables  # what is trained: weights, or z
    self._subspace = (0, 0) if subspace is None else (subspace.dims,
                                                      subspace_seed)
    flat = core.flatten(self._params)
    self._size = int(flat.shape[0])
    self._k = core.k_for_density(self._size, density)
    self._public = tf.Variable(flat, name='public')
    self._residual = tf.Variable(tf.zeros([self._size]), name='residual')
    self._accumulator = tf.Variable(tf.zeros([self._size]),
                                    name='accumulator')
    self._batch_size, self._max_batch = batch_size, max_batch
    self._clip, self._noise_multiplier = l2_norm_clip, noise_multiplier
    self._learning_rate, self._num_classes = learning_rate, num_classes
    self._update_clip, self._value_bits = update_l2_norm_clip, value_bits
    self._clip_feedback = core.default_clip_feedback(subspace)  # as TFF's
    self._seed = seed
    self.functions = self._functions(list(keras_model.input_shape[1:]))

  def _functions(self, x_shape):
    """Each signature as a `tf.function` with its static input shapes."""
    rows, vector = self._max_batch, tf.TensorSpec([self._size], tf.float32)
    specs = {
        'accumulate': [tf.TensorSpec([rows] + x_shape, tf.float32),
                       tf.TensorSpec([rows], tf.int32),
                       tf.TensorSpec([rows], tf.bool)],
        'infer': [tf.TensorSpec([None] + x_shape, tf.float32)],
        'apply_download': [tf.TensorSpec([None], tf.int32),
                           tf.TensorSpec([None], tf.float32)],
        'set_weights': [vector],
        'restore': [vector, vector, vector],
    }
    return {name: tf.function(getattr(self, '_' + name),
                              input_signature=specs.get(name, []))
            for name in SIGNATURES}

  def _seed_graph(self):
    # The seed of the traced function's graph only; None leaves RNG seeds 0.
    tf.compat.v1.get_default_graph().seed = self._seed

  def _assign_weights(self, flat_weights):
    for p, value in zip(self._params,
                        core.unflatten(flat_weights, self._params)):
      p.assign(value)

  def _accumulate(self, x, y, mask):
    self._seed_graph()  # dropout
    rows = self._max_batch
    with tf.GradientTape() as tape:
      copies = [tf.tile(tf.expand_dims(p, 0), [rows] + [1] * p.shape.rank)
                for p in self._coords.params()]
      tape.watch(copies)
      losses = per_example_loss(self._forward(copies, x, True), y,
                                self._num_classes)
      total = tf.reduce_sum(losses)
    grads = tf.concat([tf.reshape(g, [rows, -1])
                       for g in tape.gradient(total, copies)], axis=1)
    # In a subspace each row is pulled back to z *before* the clip, so the
    # clip bounds one example's contribution to what is trained (z).
    clipped_sum, _ = core.clipped_sum(self._coords.pullback(grads),
                                      self._clip, mask)
    self._accumulator.assign_add(clipped_sum)
    # Not private: for the device's own display.
    return {'loss_sum': tf.reduce_sum(tf.where(mask, losses, 0.0))}

  def _step(self):
    self._seed_graph()  # noise
    mean = core.noised_average(  # over the expected batch size, q * n
        self._accumulator.read_value(), self._clip, self._noise_multiplier,
        self._batch_size)
    for p, g in zip(self._params, core.unflatten(mean, self._params)):
      p.assign_sub(self._learning_rate * g)
    self._accumulator.assign(tf.zeros([self._size]))
    return {'size': tf.size(mean)}

  def _config(self):
    return {'batch_size': tf.constant(self._batch_size, tf.int32),
            'l2_norm_clip': tf.constant(self._clip, tf.float32),
            'noise_multiplier': tf.constant(self._noise_multiplier,
                                            tf.float32),
            'subspace_dims': tf.constant(self._subspace[0], tf.int32),
            'subspace_seed': tf.constant(self._subspace[1], tf.int64)}

  def _infer(self, x):
    return {'logits': self._forward(self._coords.params(), x, False)}

  def _get_update(self):
    update = core.model_update(self._public, self._params)  # initial - trained
    upload = core.sparse_upload(self._k, l2_norm_clip=self._update_clip,
                                value_bits=self._value_bits,
                                clip_feedback=self._clip_feedback)
    sparse, state, _ = upload.update(update,
                                     core.UploadState(self._residual))
    self._residual.assign(state.residual)
    self._assign_weights(self._public)
    return {'indices': sparse.indices, 'values': sparse.values}

  def _apply_download(self, indices, values):
    public = self._public + core.densify(
        core.SparseUpdate(indices, values, self._size))
    self._public.assign(public)
    self._assign_weights(public)
    return {'num_applied': tf.size(indices)}

  def _get_weights(self):
    return {'weights': core.flatten(self._coords.params())}

  def _get_coordinates(self):
    return {'coordinates': core.flatten(self._params)}

  def _set_weights(self, weights):
    self._public.assign(weights)
    self._assign_weights(weights)
    return {'size': tf.size(weights)}

  def _save(self):
    return {'weights': core.flatten(self._params),
            'public': self._public.read_value(),
            'residual': self._residual.read_value()}

  def _restore(self, weights, public, residual):
    self._assign_weights(weights)
    self._public.assign(public)
    self._residual.assign(residual)
    return {'size': tf.size(weights)}


def _checked(keras_model, *, batch_size, l2_norm_clip, noise_multiplier,
             learning_rate, num_classes, density=None, max_batch=None,
             update_l2_norm_clip=None, value_bits=32, seed=None,
             subspace=None, subspace_seed=0):
  """Validates `export_client`'s arguments; returns them as keywords (the
  subspace built: `deploy.deployed_subspace`, as the server builds it)."""
  subspace = deployed_subspace(
      core.flatten(keras_model.trainable_variables), subspace, subspace_seed)
  if density is None and subspace is None:
    raise ValueError('density is required (the fraction of the weights '
                     'uploaded), unless training in a subspace.')
  if max_batch is None:
    max_batch = core.default_max_batch(batch_size)
  for name, value in (('batch_size', batch_size), ('max_batch', max_batch)):
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value}.')
  if not l2_norm_clip > 0:
    raise ValueError(f'l2_norm_clip must be > 0, got {l2_norm_clip}.')
  if not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate}.')
  if update_l2_norm_clip is not None and not update_l2_norm_clip > 0:
    raise ValueError('update_l2_norm_clip must be > 0 or None, got '
                     f'{update_l2_norm_clip}.')
  if value_bits not in (32, 8):
    raise ValueError(
        f'value_bits must be 32 or 8 on the device, got {value_bits} (float16 '
        'rounding toward zero needs ops LiteRT lacks without Flex).')
  outputs = keras_model.output_shape
  if not isinstance(outputs, tuple) or outputs[1:] != (num_classes,):
    raise ValueError(f'the model outputs shape {outputs}; expected '
                     f'(None, {num_classes}) for num_classes={num_classes}.')
  return dict(batch_size=int(batch_size), max_batch=int(max_batch),
              l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
              density=1.0 if density is None else density,
              learning_rate=learning_rate, num_classes=num_classes,
              update_l2_norm_clip=update_l2_norm_clip, value_bits=value_bits,
              seed=seed, subspace=subspace, subspace_seed=int(subspace_seed))


def client_module(keras_model: tf.keras.Model, **kwargs) -> tf.Module:
  """The device computation as a `tf.Module`, before conversion.

  Its `functions` maps each name in `SIGNATURES` to a `tf.function`: the
  exact computation `export_client` converts, runnable in TensorFlow (to
  compare with LiteRT, or to simulate devices without it). Keyword
  arguments as for `export_client`.
  """
  return _ClientModule(keras_model, **_checked(keras_model, **kwargs))


def export_client(keras_model: tf.keras.Model, *, batch_size: int,
                  l2_norm_clip: float, noise_multiplier: float,
                  density: Optional[float] = None,
                  learning_rate: float, num_classes: int,
                  max_batch: Optional[int] = None,
                  update_l2_norm_clip: Optional[float] = None,
                  value_bits: int = 32,
                  seed: Optional[int] = None, subspace=None,
                  subspace_seed: int = 0) -> bytes:
  """Converts `keras_model` into an on-device DP-SGD client (.tflite bytes).

  Args:
    keras_model: a built `tf.keras.Sequential` of supported layers
      (`tds.lite.SUPPORTED_LAYERS`) whose output is `num_classes` logits (or
      a final softmax). Its current weights are the client's initial weights
      and must equal the server's (`tds.deploy.DeploymentServer`). The model
      itself is not modified.
    batch_size: the expected batch size q * n of a Poisson-sampled step (a
      device with n examples samples each with q = batch_size / n), and the
      denominator of every step; a fixed-size `LiteClient.train` batch has
      exactly this many examples.
    l2_norm_clip, noise_multiplier: DP-SGD's per-example clip C and noise
      std / C (0 turns noise off, e.g. for client-level DP or tests).
    density: fraction of the coordinates (the parameters, or z) uploaded by
      `get_update` (k is fixed). Required without a subspace; in one,
      default 1.0: all of z, no index bytes.
    learning_rate: the SGD step size of `step`.
    num_classes: labels are int32 in [0, num_classes).
    max_batch: the static number of rows of `accumulate` (default
      `tds.core.default_max_batch(batch_size)`). A sample larger than it takes more calls: it trades
      padding against calls, never changes a step or its privacy.
    update_l2_norm_clip: clip the uploaded vector to this L2 norm
      (client-level DP; the server adds the noise). None: no clip.
    value_bits: 32, or 8 to round uploaded values on the device to the
      wire's 8 bits (`tds.wire.to_wire_precision`), keeping the rounding error in
      the residual; create the `LiteClient` with the same `value_bits`.
    seed: makes the exported noise and dropout reproducible (tests only).
      None: LiteRT seeds them itself, so no two interpreters share noise.
    subspace: train z of theta = origin + P z (see the module docstring),
      origin the model's current weights: a fraction in (0, 1) of the
      weights or a number of dimensions, built as `core.count_sketch` from
      `subspace_seed`, or that `core.Subspace` (refused, with the reason,
      unless it is the seed's sketch around these weights:
      `tds.deploy.deployed_subspace`, the server's own check). Build the
      server with the same `subspace` and `subspace_seed`
      (`LiteClient.subspace_dims`, `LiteClient.subspace_seed`).
    subspace_seed: the seed of P.

  Returns the flatbuffer, converted with TFLITE_BUILTINS only (no Flex, no
  custom ops). Raises `tds.lite.UnsupportedModelError` for a layer or
  option it cannot train, before converting anything, and for a program
  the converter cannot lower to builtins (the converter's reason in the
  message).
  """
  module = client_module(
      keras_model, batch_size=batch_size, max_batch=max_batch,
      l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      density=density, learning_rate=learning_rate, num_classes=num_classes,
      update_l2_norm_clip=update_l2_norm_clip, value_bits=value_bits,
      seed=seed, subspace=subspace, subspace_seed=subspace_seed)
  with tempfile.TemporaryDirectory() as saved_model_dir:
    tf.saved_model.save(module, saved_model_dir, signatures=module.functions)
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=list(SIGNATURES))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    try:
      return converter.convert()
    except ConverterError as e:
      raise layers.UnsupportedModelError(
          'the device program needs operations outside TFLITE_BUILTINS (the '
          'plain LiteRT runtime has no Flex or custom ops), so it is not '
          f'exported: {e}') from e


def export_client_to_file(keras_model: tf.keras.Model, path: str,
                          **kwargs) -> str:
  """`export_client`, written to `path` (a .tflite file); returns `path`."""
  model_bytes = export_client(keras_model, **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(model_bytes)
  return path


def operator_names(model_bytes: bytes) -> List[str]:
  """The distinct operators a .tflite flatbuffer uses, read from its op codes.

  Builtins by name ('FULLY_CONNECTED'); custom ops, including Flex ops, as
  'CUSTOM:<name>' (e.g. 'CUSTOM:FlexReluGrad'). What a deployment checks
  before shipping a model to a runtime without Flex.
  """
  model = schema.Model.GetRootAs(bytearray(model_bytes), 0)
  builtin_names = {value: name for name, value in vars(schema.BuiltinOperator)
                   .items() if not name.startswith('_')}
  names = set()
  for i in range(model.OperatorCodesLength()):
    code = model.OperatorCodes(i)
    # Codes past 127 live only in BuiltinCode; DeprecatedBuiltinCode saturates.
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == schema.BuiltinOperator.CUSTOM:
      names.add('CUSTOM:' + code.CustomCode().decode())
    else:
      names.add(builtin_names[builtin])
  return sorted(names)
