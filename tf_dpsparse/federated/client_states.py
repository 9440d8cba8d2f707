"""Simulation-side storage of per-device state, keyed by client id.

A real device keeps its own residual. A simulation of thousands of devices
keeps them here, optionally float16 and/or memory-mapped so 10,000 clients of
a 100k-parameter model fit in 2 GB, and passes only the sampled clients'
states into each round. float16 storage rounds the residual (documented
trade-off); float32 keeps error feedback exact. With 'topk' catch-up each
device also has its own view of the model, always float32: the server's
catch-up is computed against it and must match the device bit for bit.
"""

from __future__ import annotations

import collections
from typing import Iterable, List, Optional

import numpy as np


class ClientStateStore:
  """Residuals [num_clients, size] and last-sync rounds, by integer client id.

  `initial_view` (flat float32[size], the initial public model) adds a view
  per device, for `catch_up='topk'`; `path` memory-maps the residuals there
  and the views beside them (`<path>.views.npy`). Those files are the
  store's working memory, changed in place every round, not a checkpoint.

  The store remembers which devices changed since the last checkpoint
  (`changed`, cleared by `mark_saved`), so a run's checkpoint writes only
  those rows — a round's sampled devices, not all of them — and restores
  with `set_rows` (`tf_dpsparse.federated.checkpoint.DeviceJournal`).
  Writing into `state_dict()`'s arrays directly bypasses that record.
  """

  def __init__(self, num_clients: int, size: int, *, dtype=np.float32,
               path: Optional[str] = None,
               initial_view: Optional[np.ndarray] = None):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
      raise ValueError(f'dtype must be float32 or float16, got {dtype}.')
    shape = (int(num_clients), int(size))

    def array(path, dtype):
      if path is None:
        return np.zeros(shape, dtype)
      return np.lib.format.open_memmap(path, 'w+', dtype, shape)

    self._residuals = array(path, dtype)
    self._views = None
    if initial_view is not None:
      initial_view = np.asarray(initial_view, np.float32)
      if initial_view.shape != (shape[1],):
        raise ValueError(f'initial_view must have shape ({size},), got '
                         f'{initial_view.shape}.')
      self._views = array(None if path is None else f'{path}.views.npy',
                          np.float32)
      self._views[:] = initial_view
    self._last_sync = np.zeros(num_clients, np.int32)
    self._changed = np.zeros(num_clients, bool)

  @property
  def num_clients(self) -> int:
    return self._residuals.shape[0]

  def get(self, client_ids: Iterable[int]) -> List[collections.OrderedDict]:
    states = []
    for i in client_ids:
      state = collections.OrderedDict(
          residual=self._residuals[i].astype(np.float32))
      if self._views is not None:
        state['view'] = np.array(self._views[i])
      state.update(last_sync_round=np.int32(self._last_sync[i]),
                   client_id=np.int32(i))
      states.append(state)
    return states

  def put(self, states) -> None:
    for state in states:
      i = int(state['client_id'])
      self._residuals[i] = state['residual']
      if self._views is not None:
        self._views[i] = state['view']
      self._last_sync[i] = state['last_sync_round']
      self._changed[i] = True

  def flush(self) -> None:
    """Writes a memory-mapped store's pending changes to its files (a no-op
    in memory), for a reader of the files; checkpoints do not need it (they
    keep their own copy)."""
    for array in (self._residuals, self._views):
      if isinstance(array, np.memmap):
        array.flush()

  def state_dict(self) -> collections.OrderedDict:
    """Every device's state as arrays (the store itself, not copies): what
    a checkpoint saves and `load_state_dict` takes back."""
    state = collections.OrderedDict(residuals=self._residuals)
    if self._views is not None:
      state['views'] = self._views
    state['last_sync'] = self._last_sync
    return state

  def load_state_dict(self, state) -> None:
    """Overwrites every device's state with `state_dict()`'s (of a store of
    the same shape, dtype and views), in place: a memory-mapped store keeps
    its files, then flushed."""
    mine = self.state_dict()
    if list(state) != list(mine):
      raise ValueError(f'state has {list(state)}, this store keeps '
                       f'{list(mine)}.')
    for name, array in mine.items():
      value = np.asarray(state[name])
      if value.shape != array.shape or value.dtype != array.dtype:
        raise ValueError(f'{name}: {value.dtype}{list(value.shape)} does not '
                         f'fit this store\'s {array.dtype}{list(array.shape)}.')
      array[...] = value
    self._changed[:] = True
    self.flush()

  def residual(self, client_id: int) -> np.ndarray:
    return self._residuals[client_id].astype(np.float32)

  def view(self, client_id: int) -> np.ndarray:
    """The model device `client_id` holds ('topk' catch-up only)."""
    if self._views is None:
      raise ValueError('this store keeps no views (no initial_view given).')
    return np.array(self._views[client_id])

  def changed(self) -> np.ndarray:
    """The ids (sorted) of the devices whose state changed since the last
    `mark_saved`: all an incremental checkpoint has to write."""
    return np.flatnonzero(self._changed)

  def mark_saved(self, client_ids=None) -> None:
    """Forgets the changes of `client_ids` (all by default), once a
    checkpoint holds them durably; call it only then, or a crash loses
    them."""
    self._changed[slice(None) if client_ids is None else client_ids] = False

  def set_rows(self, client_ids, rows) -> None:
    """Writes `{name: rows}` under `state_dict()`'s names (one row per id,
    or one row broadcast to all) into those devices' rows; they count as
    changed until `mark_saved`."""
    ids = np.asarray(client_ids, np.int64)
    mine = self.state_dict()
    if list(rows) != list(mine):
      raise ValueError(f'rows have {list(rows)}, this store keeps '
                       f'{list(mine)}.')
    for name, array in mine.items():
      array[ids] = rows[name]
    self._changed[ids] = True
