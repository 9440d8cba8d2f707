"""`LiteClient`: a device's side of a round, on the LiteRT interpreter.

A thin wrapper: the math runs in the exported flatbuffer's signatures; this
class moves numpy arrays in and out and turns the fixed-k update into wire
bytes with `tds.codec`, and a download's bytes back into indices and values
(validated: a malformed download raises `tds.codec.DecodeError` and leaves
the state untouched).
"""

from __future__ import annotations

import numpy as np

from tf_dpsparse.core import codec
from tf_dpsparse.core.transforms import SparseUpdate

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
  """

  def __init__(self, model_bytes: bytes, *, value_bits: int = 32,
               num_threads=None):
    self._interpreter = Interpreter(model_content=model_bytes,
                                    num_threads=num_threads)
    self._runners = {key: self._interpreter.get_signature_runner(key)
                     for key in self._interpreter.get_signature_list()}
    train_inputs = self._runners['train'].get_input_details()
    self.batch_size = int(train_inputs['y']['shape'][0])
    self.input_shape = tuple(int(d) for d in train_inputs['x']['shape'][1:])
    self.k = int(self._runners['get_update'].get_output_details()['indices']
                 ['shape'][0])
    self.size = int(self._runners['set_weights'].get_input_details()['weights']
                    ['shape'][0])
    self.value_bits = value_bits

  def train(self, x, y) -> float:
    """One DP-SGD step on a batch of exactly `batch_size` examples; its loss."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    if x.shape != (self.batch_size, *self.input_shape) or y.shape != (
        self.batch_size,):
      raise ValueError(
          f'train expects x {(self.batch_size, *self.input_shape)} and y '
          f'({self.batch_size},), got {x.shape} and {y.shape}.')
    return float(self._runners['train'](x=x, y=y)['loss'])

  def infer(self, x) -> np.ndarray:
    """Logits for a batch of any size."""
    return self._runners['infer'](x=np.asarray(x, np.float32))['logits']

  def get_update(self) -> SparseUpdate:
    """The top-k update since the last sync (consumes it; residual kept)."""
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

  def get_weights(self) -> np.ndarray:
    """The flat float32 weights, in `tds.core.flatten` order."""
    return self._runners['get_weights']()['weights']

  def set_weights(self, weights) -> None:
    """A dense sync: weights and public model both become `weights`."""
    self._runners['set_weights'](weights=self._vector(weights))

  def save(self, path: str) -> None:
    """Writes weights, public model and residual to a .npz file."""
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
