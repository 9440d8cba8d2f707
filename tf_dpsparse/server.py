"""`PayloadRound`: the server of a deployment without TFF, on wire bytes.

Devices (e.g. `tds.lite.LiteClient`) upload `tds.codec` payloads; the server
decodes and validates each one, rejects and counts malformed ones (the round
goes on with the valid ones), averages, adds Gaussian noise in client-level
mode, applies the result to its global model and returns one encoded
download for every device.

Download compression, as in the TFF front's distributor: the server keeps
the *public model*, what every up-to-date device has reconstructed, and
sends the top-k of (global - public) (`core.topk_with_error_feedback`).
The server residual is global - public: what was not sent stays there and
competes for the next download. The server applies its own payload, decoded,
to the public model, so it tracks the devices bit for bit, float16 values
included.

Privacy. Example-level mode: uploads are DP already (DP-SGD on the device),
so averaging and the download's top-k are post-processing. Client-level mode
(trusted aggregator): the server re-clips every decoded update to
`l2_norm_clip` (a device cannot raise its own sensitivity), adds N(0, (z *
C)^2) once to the sum and divides by the fixed, public `clients_per_round`.
The server sees each device's indices and values, so it must be trusted;
only the noised global model, and downloads computed from it, are released.
A client id may contribute once per round; a second upload is rejected.
"""

from __future__ import annotations

from typing import Dict, Hashable, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_dpsparse import core
from tf_dpsparse import privacy
from tf_dpsparse.wire import codec


class RoundResult(NamedTuple):
  """What `PayloadRound.finish` returns.

  download: the encoded sparse download, the same bytes for every device.
  accepted: client ids whose upload was aggregated, in arrival order.
  rejected: client id -> reason, for the uploads refused this round.
  bytes_up: bytes received this round, rejected payloads included.
  bytes_down: `len(download)` (per device).
  num_clipped: accepted updates the server had to clip (client-level mode).
  residual_norm: L2 norm of global - public after this download.
  """

  download: bytes
  accepted: Tuple[Hashable, ...]
  rejected: Dict[Hashable, str]
  bytes_up: int
  bytes_down: int
  num_clipped: int
  residual_norm: float


class PayloadRound:
  """Aggregates device payloads round by round; keeps global and public models.

  Per round: `submit(client_id, payload)` for every upload as it arrives,
  then `finish()`, which aggregates and returns the `RoundResult` whose
  `download` every device applies.

  Args:
    initial_weights: the flat float32 model every device starts from (e.g.
      `LiteClient.get_weights()` or `tds.core.flatten` of the Keras model's
      trainable variables).
    density: fraction of parameters in each download.
    mode: None or 'example' (plain mean of the accepted updates) or 'client'
      (clipped sum + server noise, divided by `clients_per_round`).
    l2_norm_clip, noise_multiplier, clients_per_round: client-level mode.
    server_learning_rate: global += rate * aggregate (devices upload
      trained - public).
    value_bits: wire precision of download values (32, 16 or 8).
    seed: fixes the server noise (tests); OS entropy when None.
  """

  def __init__(self, initial_weights, *, density: float,
               mode: Optional[str] = None,
               l2_norm_clip: Optional[float] = None,
               noise_multiplier: Optional[float] = None,
               clients_per_round: Optional[int] = None,
               server_learning_rate: float = 1.0, value_bits: int = 32,
               seed: Optional[int] = None):
    privacy.check_privacy_mode(mode, l2_norm_clip=l2_norm_clip,
                               noise_multiplier=noise_multiplier,
                               clients_per_round=clients_per_round)
    weights = np.asarray(initial_weights, np.float32)
    if weights.ndim != 1 or not weights.size:
      raise ValueError('initial_weights must be a non-empty flat vector, got '
                       f'shape {weights.shape}.')
    self.size = weights.size
    self.k = core.k_for_density(self.size, density)
    self._global = weights.copy()
    self._public = weights.copy()
    self._mode, self._clip, self._z = mode, l2_norm_clip, noise_multiplier
    self._clients_per_round = clients_per_round
    self._server_learning_rate = float(server_learning_rate)
    self._value_bits = value_bits
    self._seed = seed
    self.round_num = 0
    self.rejected_total = 0
    self._start_round()

  @property
  def global_weights(self) -> np.ndarray:
    return self._global.copy()

  @property
  def public_weights(self) -> np.ndarray:
    """What every device that applied all downloads holds."""
    return self._public.copy()

  def _start_round(self):
    self._total = np.zeros(self.size, np.float32)
    self._accepted = []
    self._rejected = {}
    self._seen = set()
    self._bytes_up = 0
    self._num_clipped = 0

  def submit(self, client_id: Hashable, payload: bytes) -> bool:
    """Validates and adds one upload; False (and counted) if rejected."""
    self._bytes_up += len(payload) if isinstance(
        payload, (bytes, bytearray, memoryview)) else 0
    if client_id in self._seen:
      return self._reject(client_id, 'duplicate upload from this client in '
                          'this round')
    self._seen.add(client_id)
    try:
      update = codec.decode(payload, self.size)
    except codec.DecodeError as e:
      return self._reject(client_id, f'malformed payload: {e}')
    dense = core.densify(update)
    if self._mode == 'client':
      dense, norm = core.clip_by_l2_norm(dense, self._clip)
      self._num_clipped += int(norm > self._clip)
    self._total += dense.numpy()
    self._accepted.append(client_id)
    return True

  def _reject(self, client_id, reason: str) -> bool:
    self._rejected.setdefault(client_id, reason)
    self.rejected_total += 1
    return False

  def finish(self) -> RoundResult:
    """Aggregates the accepted uploads and returns the round's download."""
    if self._mode == 'client':
      seed = None if self._seed is None else core.fold_in_seed(
          self._seed, self.round_num)
      noised = core.add_gaussian_noise(tf.constant(self._total),
                                       self._z * self._clip, seed)
      aggregate = noised.numpy() / self._clients_per_round
    else:
      aggregate = self._total / max(len(self._accepted), 1)
    self._global += np.float32(self._server_learning_rate) * aggregate
    sent, public = core.sparse_sync(self._global, self._public, self.k,
                                    self._value_bits)
    download = codec.encode(sent, value_bits=self._value_bits)  # lossless
    self._public = public.numpy()  # what devices get from `download`
    result = RoundResult(
        download=download, accepted=tuple(self._accepted),
        rejected=dict(self._rejected), bytes_up=self._bytes_up,
        bytes_down=len(download), num_clipped=self._num_clipped,
        residual_norm=float(np.linalg.norm(self._global - self._public)))
    self.round_num += 1
    self._start_round()
    return result
