"""`export_client`: a Keras model as a self-training, DP, sparse-uploading .tflite.

The exported flatbuffer holds the device's whole state as resource variables
(the model weights, the *public* model it last synced with, and its upload
residual) and eight signatures, each a `tf.function` that calls `tds.core`:

* `train(x, y) -> loss`: one DP-SGD step on a fixed-size batch. Per-example
  gradients (one backward pass against per-example copies of the weights,
  see `layers`), then `core.gaussian_average` (per-example clipping, one
  Gaussian draw on the sum, division by the batch size), then SGD. The
  returned loss is not private: it is for the device's own display.
* `infer(x) -> logits` (any batch size).
* `get_update() -> indices, values`: `core.topk_with_error_feedback` of
  (weights - public) plus the residual. With `update_l2_norm_clip`, the sent
  values are clipped by `core.clip_by_l2_norm` and what clipping removed goes
  back into the residual (client-level DP). With `value_bits=8` the values
  are rounded on the device to what the wire carries, the error kept too.
  The weights then return to the public model: the delta is consumed, now
  either uploaded or in the residual.
* `apply_download(indices, values) -> num_applied`: adds a server download
  to the public model and makes it the weights.
* `get_weights() -> weights`, `set_weights(weights) -> size` (a dense sync: it
  sets weights and public model), and `save() -> weights, public, residual`
  / `restore(...)` to persist the state across app restarts.

Every state-changing signature returns a value: the converter silently
drops a signature without outputs, side effects included (measured).

Privacy (example-level): the upload is a function of DP-SGD's noised steps
and the residual of earlier noised steps, so choosing its top-k is
post-processing; the residual never leaves the device. With
`update_l2_norm_clip` (client-level) the upload is clipped but not noised:
the server must be trusted to add noise to the aggregate (`tds.server`).

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
from typing import List, Optional

import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

from tf_dpsparse import core
from tf_dpsparse.lite import layers

SIGNATURES = ('train', 'infer', 'get_update', 'apply_download', 'get_weights',
              'set_weights', 'save', 'restore')


def per_example_loss(logits, labels, num_classes: int):
  """Softmax cross-entropy per example, written with log_softmax (no Flex)."""
  return -tf.reduce_sum(
      tf.one_hot(labels, num_classes) * tf.nn.log_softmax(logits), axis=-1)


class _ClientModule(tf.Module):
  """The device's computation and state; see the module docstring."""

  def __init__(self, keras_model, *, batch_size, l2_norm_clip,
               noise_multiplier, density, learning_rate, num_classes,
               update_l2_norm_clip, value_bits, seed):
    super().__init__()
    forward, variables = layers.lower(keras_model)
    self._params = [tf.Variable(v.read_value(), name=v.name.split(':')[0])
                    for v in variables]
    flat = core.flatten(self._params)
    size = int(flat.shape[0])
    k = core.k_for_density(size, density)
    self._public = tf.Variable(flat, name='public')
    self._residual = tf.Variable(tf.zeros([size]), name='residual')
    x_shape = list(keras_model.input_shape[1:])
    params = self._params

    def assign_weights(flat_weights):
      for p, value in zip(params, core.unflatten(flat_weights, params)):
        p.assign(value)

    def train(x, y):
      # The seed of this function's graph only; None leaves RNG seeds at 0.
      tf.compat.v1.get_default_graph().seed = seed
      with tf.GradientTape() as tape:
        copies = [tf.tile(tf.expand_dims(p, 0),
                          [batch_size] + [1] * p.shape.rank) for p in params]
        tape.watch(copies)
        losses = per_example_loss(forward(copies, x, True), y, num_classes)
        total = tf.reduce_sum(losses)
      rows = tf.concat([tf.reshape(g, [batch_size, -1])
                        for g in tape.gradient(total, copies)], axis=1)
      mean, _ = core.gaussian_average(rows, l2_norm_clip, noise_multiplier)
      for p, g in zip(params, core.unflatten(mean, params)):
        p.assign_sub(learning_rate * g)
      return {'loss': tf.reduce_mean(losses)}

    def infer(x):
      return {'logits': forward(params, x, False)}

    def get_update():
      delta = core.flatten(params) - self._public
      sparse, residual, _ = core.clipped_topk_with_error_feedback(
          delta, k, self._residual, update_l2_norm_clip,
          value_bits=value_bits)
      self._residual.assign(residual)
      assign_weights(self._public)
      return {'indices': sparse.indices, 'values': sparse.values}

    def apply_download(indices, values):
      public = self._public + core.densify(core.SparseUpdate(indices, values,
                                                             size))
      self._public.assign(public)
      assign_weights(public)
      return {'num_applied': tf.size(indices)}

    def get_weights():
      return {'weights': core.flatten(params)}

    def set_weights(weights):
      self._public.assign(weights)
      assign_weights(weights)
      return {'size': tf.size(weights)}

    def save():
      return {'weights': core.flatten(params),
              'public': self._public.read_value(),
              'residual': self._residual.read_value()}

    def restore(weights, public, residual):
      assign_weights(weights)
      self._public.assign(public)
      self._residual.assign(residual)
      return {'size': tf.size(weights)}

    vector = tf.TensorSpec([size], tf.float32)
    specs = {
        'train': [tf.TensorSpec([batch_size] + x_shape, tf.float32),
                  tf.TensorSpec([batch_size], tf.int32)],
        'infer': [tf.TensorSpec([None] + x_shape, tf.float32)],
        'get_update': [],
        'apply_download': [tf.TensorSpec([None], tf.int32),
                           tf.TensorSpec([None], tf.float32)],
        'get_weights': [],
        'set_weights': [vector],
        'save': [],
        'restore': [vector, vector, vector],
    }
    fns = {'train': train, 'infer': infer, 'get_update': get_update,
           'apply_download': apply_download, 'get_weights': get_weights,
           'set_weights': set_weights, 'save': save, 'restore': restore}
    self.functions = {
        name: tf.function(fns[name], input_signature=specs[name])
        for name in SIGNATURES}


def _checked(keras_model, *, batch_size, l2_norm_clip, noise_multiplier,
             density, learning_rate, num_classes, update_l2_norm_clip=None,
             value_bits=32, seed=None):
  """Validates `export_client`'s arguments; returns them as keywords."""
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(
        f'batch_size must be a positive integer, got {batch_size}.')
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
  return dict(batch_size=int(batch_size), l2_norm_clip=l2_norm_clip,
              noise_multiplier=noise_multiplier, density=density,
              learning_rate=learning_rate, num_classes=num_classes,
              update_l2_norm_clip=update_l2_norm_clip, value_bits=value_bits,
              seed=seed)


def client_module(keras_model: tf.keras.Model, **kwargs) -> tf.Module:
  """The device computation as a `tf.Module`, before conversion.

  Its `functions` maps each name in `SIGNATURES` to a `tf.function`: the
  exact computation `export_client` converts, runnable in TensorFlow (to
  compare with LiteRT, or to simulate devices without it). Keyword
  arguments as for `export_client`.
  """
  return _ClientModule(keras_model, **_checked(keras_model, **kwargs))


def export_client(keras_model: tf.keras.Model, *, batch_size: int,
                  l2_norm_clip: float, noise_multiplier: float, density: float,
                  learning_rate: float, num_classes: int,
                  update_l2_norm_clip: Optional[float] = None,
                  value_bits: int = 32,
                  seed: Optional[int] = None) -> bytes:
  """Converts `keras_model` into an on-device DP-SGD client (.tflite bytes).

  Args:
    keras_model: a built `tf.keras.Sequential` of supported layers
      (`tds.lite.SUPPORTED_LAYERS`) whose output is `num_classes` logits (or
      a final softmax). Its current weights are the client's initial weights
      and must equal the server's (`tds.server.PayloadRound`). The model
      itself is not modified.
    batch_size: the fixed number of examples of every `train` call.
    l2_norm_clip, noise_multiplier: DP-SGD's per-example clip C and noise
      std / C (0 turns noise off, e.g. for client-level DP or tests).
    density: fraction of parameters uploaded by `get_update` (k is fixed).
    learning_rate: the SGD step size of `train`.
    num_classes: labels are int32 in [0, num_classes).
    update_l2_norm_clip: clip the uploaded vector to this L2 norm
      (client-level DP; the server adds the noise). None: no clip.
    value_bits: 32, or 8 to round uploaded values on the device to the
      wire's 8 bits (`core.to_wire_precision`), keeping the rounding error in
      the residual; create the `LiteClient` with the same `value_bits`.
    seed: makes the exported noise and dropout reproducible (tests only).
      None: LiteRT seeds them itself, so no two interpreters share noise.

  Returns the flatbuffer, converted with TFLITE_BUILTINS only (no Flex, no
  custom ops). Raises `tds.lite.UnsupportedModelError` for a layer or
  option it cannot train, before converting anything.
  """
  module = client_module(
      keras_model, batch_size=batch_size, l2_norm_clip=l2_norm_clip,
      noise_multiplier=noise_multiplier, density=density,
      learning_rate=learning_rate, num_classes=num_classes,
      update_l2_norm_clip=update_l2_norm_clip, value_bits=value_bits,
      seed=seed)
  with tempfile.TemporaryDirectory() as saved_model_dir:
    tf.saved_model.save(module, saved_model_dir, signatures=module.functions)
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=list(SIGNATURES))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    return converter.convert()


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
