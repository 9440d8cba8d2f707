"""Simulation-side storage of per-device state, keyed by client id.

A real device keeps its own residual. A simulation of thousands of devices
keeps them here, optionally float16 and/or memory-mapped so 10,000 clients of
a 100k-parameter model fit in 2 GB, and passes only the sampled clients'
states into each round. float16 storage rounds the residual (documented
trade-off); float32 keeps error feedback exact.
"""

from __future__ import annotations

import collections
from typing import Iterable, List, Optional

import numpy as np


class ClientStateStore:
  """Residuals [num_clients, size] and last-sync rounds, by integer client id."""

  def __init__(self, num_clients: int, size: int, *, dtype=np.float32,
               path: Optional[str] = None):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
      raise ValueError(f'dtype must be float32 or float16, got {dtype}.')
    shape = (int(num_clients), int(size))
    if path is None:
      self._residuals = np.zeros(shape, dtype)
    else:
      self._residuals = np.lib.format.open_memmap(path, 'w+', dtype, shape)
    self._last_sync = np.zeros(num_clients, np.int32)

  @property
  def num_clients(self) -> int:
    return self._residuals.shape[0]

  def get(self, client_ids: Iterable[int]) -> List[collections.OrderedDict]:
    return [collections.OrderedDict(
        residual=self._residuals[i].astype(np.float32),
        last_sync_round=np.int32(self._last_sync[i]),
        client_id=np.int32(i)) for i in client_ids]

  def put(self, states) -> None:
    for state in states:
      i = int(state['client_id'])
      self._residuals[i] = state['residual']
      self._last_sync[i] = state['last_sync_round']

  def residual(self, client_id: int) -> np.ndarray:
    return self._residuals[client_id].astype(np.float32)
