"""`LiteClient`: a device's side of a round, on the LiteRT interpreter.

A thin wrapper: the math runs in the exported flatbuffer's signatures; this
class moves numpy arrays in and out, draws the Poisson sample of each DP-SGD
step, turns the fixed-k update into wire bytes with `tds.codec`, and a
download's bytes back into indices and values (validated: a malformed
download raises `tds.codec.DecodeError` and leaves the state untouched).

Sampling: `train_step` puts each of the device's n examples in the step's
batch independently with probability q = batch_size / n, the sampling of
`core.poisson_sample` and of the accountant's `PoissonSampledDpEvent`
(`tds.privacy.compute_epsilon`). n is treated as public, as TF Privacy and
Opacus do. The draw is numpy's (`Generator.random(n) < q`, the same rule as
`core.poisson_sample`), from OS entropy unless `sampling_seed` is given:
numpy rather than TensorFlow's global generator, which `tf.random.set_seed`
would make repeat across runs. (The wrapper still imports TensorFlow through
`tds.core`, for the codec and `core.padded_chunks`; the flatbuffer itself
needs only the LiteRT runtime.)

In a public random subspace (`export_client(subspace=...)`) the device
trains, uploads and downloads z: `size` is the number of coordinates
(`subspace_dims`), `get_coordinates` returns z and `get_weights` the model
origin + P z, and `apply_catch_up` lands a returning device on the server's
public z exactly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from tf_dpsparse.wire import codec
from tf_dpsparse.wire import downloads
from tf_dpsparse.core.sparse import SparseUpdate
from tf_dpsparse.core.transforms import padded_chunks

try:  # the standalone runtime a device ships with
  from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - TensorFlow's bundled copy
  from tensorflow.lite.python.interpreter import Interpreter


class LiteClient:
  """One device: an interpreter over `tds.lite.export_client` bytes.

  Args:
    model_bytes: the .tflite flatbuffer.
    value_bits: wire precision of uploaded values (32, 16 or 8). Use the
      `value_bits` the client was exported with: the device then rounds and
      keeps the error; otherwise the encoder rounds and the error is lost.
    num_threads: interpreter threads (None: the runtime's default).
    sampling_seed: seeds the Poisson sampling of `train_step` (tests only).
      None: OS entropy. The DP noise is the flatbuffer's (`export_client`'s
      `seed`).

  Attributes read from the flatbuffer: `batch_size` (the expected batch
  size, every step's denominator), `max_batch` (rows per `accumulate`
  call), `l2_norm_clip` and `noise_multiplier` (for the accountant),
  `input_shape`, `k`, `size` (the coordinates trained and sent: the
  weights, or z), `model_size` (the weights), and `subspace_dims` /
  `subspace_seed` (None without a subspace; what the server is built with).
  """

  def __init__(self, model_bytes: bytes, *, value_bits: int = 32,
               num_threads=None, sampling_seed: Optional[int] = None):
    self._interpreter = Interpreter(model_content=model_bytes,
                                    num_threads=num_threads)
    self._runners = {key: self._interpreter.get_signature_runner(key)
                     for key in self._interpreter.get_signature_list()}
    chunk = self._runners['accumulate'].get_input_details()
    self.max_batch = int(chunk['y']['shape'][0])
    self.input_shape = tuple(int(d) for d in chunk['x']['shape'][1:])
    config = self._runners['config']()
    self.batch_size = int(config['batch_size'])
    self.l2_norm_clip = float(config['l2_norm_clip'])
    self.noise_multiplier = float(config['noise_multiplier'])
    self.k = int(self._runners['get_update'].get_output_details()['indices']
                 ['shape'][0])
    self.size = int(self._runners['set_weights'].get_input_details()['weights']
                    ['shape'][0])
    self.model_size = int(self._runners['get_weights'].get_output_details()
                          ['weights']['shape'][0])
    dims = int(config.get('subspace_dims', 0))  # 0: no subspace
    self.subspace_dims = dims or None
    self.subspace_seed = int(config['subspace_seed']) if dims else None
    self.value_bits = value_bits
    self._rng = np.random.default_rng(sampling_seed)

  def sampling_rate(self, num_examples: int) -> float:
    """q = batch_size / num_examples: what `train_step` samples with."""
    if num_examples < self.batch_size:
      raise ValueError(f'Poisson sampling needs at least batch_size='
                       f'{self.batch_size} examples, got {num_examples}.')
    return self.batch_size / num_examples

  def sample(self, num_examples: int) -> np.ndarray:
    """Ascending indices of one Poisson sample: each joins with probability q.

    Draws from this client's generator, exactly as `train_step` does.
    """
    q = self.sampling_rate(num_examples)
    return np.flatnonzero(self._rng.random(num_examples) < q).astype(np.int32)

  def train_step(self, x, y) -> float:
    """One Poisson-sampled DP-SGD step over all of the device's examples.

    `x`, `y`: the device's n >= batch_size examples. Each joins the batch
    with probability q = batch_size / n (`sample`); their clipped gradients
    are summed in chunks of `max_batch` (as many as the sample needs), noised
    once and divided by batch_size = q * n. The privacy of `steps` such steps
    is `tds.privacy.compute_epsilon(noise_multiplier, sampling_rate(n),
    steps, delta)`. Returns the mean loss of the sampled examples (0.0 if
    none): data-dependent and not private, for the device's own display.
    """
    x, y = self._examples(x, y)
    return self._dp_step(x, y, self.sample(len(y)))

  def train(self, x, y) -> float:
    """One DP-SGD step on exactly these `batch_size` examples; their mean loss.

    For callers that batch by themselves. The step is the same as
    `train_step`'s, but its ε is *not* the Poisson one: for shuffled
    fixed-size batches, use `tds.privacy.compute_epsilon_shuffled` (no
    amplification by sampling); prefer `train_step`.
    """
    x, y = self._examples(x, y)
    if len(y) != self.batch_size:
      raise ValueError(f'train expects exactly batch_size={self.batch_size} '
                       f'examples, got {len(y)}.')
    return self._dp_step(x, y, np.arange(len(y), dtype=np.int32))

  def _dp_step(self, x, y, indices) -> float:
    """`accumulate` over padded chunks of `indices` (none dropped), `step`."""
    chunks, valid = padded_chunks(indices, self.max_batch)
    loss_sum = 0.0
    for chunk, mask in zip(chunks.numpy(), valid.numpy()):
      loss_sum += float(self._runners['accumulate'](
          x=x[chunk], y=y[chunk], mask=mask)['loss_sum'])
    self._runners['step']()
    return loss_sum / max(1, len(indices))

  def _examples(self, x, y):
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    if x.shape[1:] != self.input_shape or y.shape != x.shape[:1]:
      raise ValueError(
          f'expected x of shape (n, {", ".join(map(str, self.input_shape))}) '
          f'and y of shape (n,), got {x.shape} and {y.shape}.')
    return x, y

  def infer(self, x) -> np.ndarray:
    """Logits for a batch of any size."""
    return self._runners['infer'](x=np.asarray(x, np.float32))['logits']

  def get_update(self) -> SparseUpdate:
    """The top-k update since the last sync (consumes it; residual kept).

    An update is public - weights: initial - trained, the sign
    `tds.core.model_update` fixes for every front, which the server applies
    with `tds.core.apply_update` (weights - rate * mean).
    """
    out = self._runners['get_update']()
    return SparseUpdate(out['indices'], out['values'], self.size)

  def upload(self) -> bytes:
    """`get_update`, encoded for the wire by `tds.codec.encode`."""
    return codec.encode(self.get_update(), value_bits=self.value_bits)

  def apply_download(self, payload: bytes) -> None:
    """Decodes (validating) a server download and applies it to the model."""
    update = codec.decode(payload, self.size)
    self._runners['apply_download'](indices=update.indices,
                                    values=update.values)

  def apply_catch_up(self, payload: bytes) -> None:
    """Applies a catch-up (`DeploymentServer.catch_up`: current public
    values, which overwrite, `tds.wire.apply_catch_up`); the device then
    holds the server's public coordinates exactly. Validated as a download."""
    public = self._runners['save']()['public']
    self.set_coordinates(downloads.apply_catch_up(public, payload))

  def get_weights(self) -> np.ndarray:
    """The model's flat float32 weights, in `tds.core.flatten` order (in a
    subspace origin + P z)."""
    return self._runners['get_weights']()['weights']

  def get_coordinates(self) -> np.ndarray:
    """What the device trains and syncs: the weights, or z in a subspace."""
    if 'get_coordinates' not in self._runners:  # exported before subspaces
      return self.get_weights()
    return self._runners['get_coordinates']()['coordinates']

  def set_weights(self, weights) -> None:
    """A dense sync: weights and public model both become `weights`.

    In a subspace the weights are origin + P z and P has no inverse: sync
    z with `set_coordinates` (refused here, with that reason)."""
    if self.subspace_dims is not None:
      raise ValueError('this device trains in a subspace: its weights are '
                       'origin + P z, which set_weights cannot invert; '
                       'sync z with set_coordinates (the server\'s '
                       'public_coordinates).')
    self.set_coordinates(weights)

  def set_coordinates(self, coordinates) -> None:
    """A dense sync of what is trained (the weights, or z): it and the
    public coordinates both become `coordinates`; the residual is kept."""
    self._runners['set_weights'](weights=self._vector(coordinates))

  def save(self, path: str) -> None:
    """Writes weights, public model and residual (each of the coordinates:
    z in a subspace) to a .npz file."""
    np.savez(path, **self._runners['save']())

  def restore(self, path: str) -> None:
    """Reads back what `save` wrote."""
    with np.load(path) as state:
      self._runners['restore'](**{key: self._vector(state[key])
                                  for key in ('weights', 'public', 'residual')})

  def _vector(self, values) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if values.shape != (self.size,):
      raise ValueError(f'expected a vector of {self.size} float32, got shape '
                       f'{values.shape}.')
    return values
