"""A restricted unpickler, and old pandas frames rebuilt without pandas.

Unpickling runs whatever callables the pickle names, so a data file that is
unpickled naively can run `os.system`. Here every global a pickle names must
be in an allow-list that maps it to a known-harmless callable; anything else
raises `RefusedPickleError` before it is called.

The HAPT pickle holds pandas DataFrames from an old pandas. Instead of
importing pandas (not a dependency, and today's cannot read them anyway),
their class names map to tiny stand-ins that only record the state pickle
hands them; `frame_columns` then reads the numpy blocks out of that state.
"""

from __future__ import annotations

import pickle
from typing import BinaryIO, Callable, Dict, Mapping, Tuple

import numpy as np
from numpy.core import multiarray

Allowed = Mapping[Tuple[str, str], Callable]


class RefusedPickleError(pickle.UnpicklingError):
  """The pickle names a global that is not in the allow-list."""


class _Unpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, allowed: Allowed):
    # latin1 reads Python 2 `str` payloads (numpy buffers) byte for byte.
    super().__init__(file, encoding='latin1')
    self._allowed = allowed

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise RefusedPickleError(
          f'refusing to load global {module}.{name}: not in the allow-list of '
          'this data file (a tampered or unexpected pickle)') from None


def restricted_load(file: BinaryIO, allowed: Allowed):
  """Unpickles `file`, resolving globals only through `allowed`.

  `allowed` maps `(module, name)` exactly as written in the pickle (Python 2
  pickles say `__builtin__`, `copy_reg`) to the callable to use instead.
  """
  return _Unpickler(file, allowed).load()


def _latin1_encode(text, encoding):
  """`_codecs.encode` as protocol-2 pickles use it for bytes, and only that."""
  if encoding != 'latin1' or not isinstance(text, str):
    raise RefusedPickleError(f'refusing _codecs.encode(..., {encoding!r})')
  return text.encode('latin1')


def _reconstruct_array(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise RefusedPickleError(f'refusing to build an array of type {subtype}')
  return multiarray._reconstruct(subtype, shape, dtype)


NUMPY_ARRAYS: Dict[Tuple[str, str], Callable] = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', '_reconstruct'): _reconstruct_array,
    ('_codecs', 'encode'): _latin1_encode,
}


class _Stub:
  """Stands in for a pandas class: keeps the state pickle passes it, no more."""

  def __setstate__(self, state):
    self.state = state


class _DataFrame(_Stub):
  pass


class _BlockManager(_Stub):
  pass


class _Index:
  pass


class _RangeIndex:
  pass


def _reconstructor(cls, base, state):
  """`copy_reg._reconstructor`, limited to the pandas stand-ins."""
  if cls not in (_DataFrame, _BlockManager) or base is not object or state:
    raise RefusedPickleError(f'refusing to reconstruct {cls!r} from {base!r}')
  return cls.__new__(cls)


def _new_index(cls, data):
  """pandas' `_new_Index`: an index becomes the plain array of its labels."""
  if cls is _RangeIndex:
    return np.arange(data['start'], data['stop'], data['step'])
  if cls is _Index:
    return np.asarray(data['data'])
  raise RefusedPickleError(f'refusing to build an index of type {cls!r}')


OLD_PANDAS_FRAMES: Dict[Tuple[str, str], Callable] = {
    **NUMPY_ARRAYS,
    ('copy_reg', '_reconstructor'): _reconstructor,
    ('__builtin__', 'object'): object,
    ('__builtin__', 'slice'): slice,
    ('pandas.core.frame', 'DataFrame'): _DataFrame,
    ('pandas.core.internals.managers', 'BlockManager'): _BlockManager,
    ('pandas.core.indexes.base', 'Index'): _Index,
    ('pandas.core.indexes.base', '_new_Index'): _new_index,
    ('pandas.core.indexes.range', 'RangeIndex'): _RangeIndex,
}


def frame_columns(frame) -> Dict[str, np.ndarray]:
  """The columns of an unpickled (stand-in) DataFrame, by name.

  A BlockManager's state is `(axes, block_values, block_items, extra)`: each
  block is a 2-D array whose rows are the columns named by its items.
  """
  if not isinstance(frame, _DataFrame):
    raise ValueError(
        f'expected a pickled DataFrame, got {type(frame).__name__}')
  manager = frame.state['_data']
  if not isinstance(manager, _BlockManager):
    raise ValueError('the DataFrame holds no BlockManager')
  axes, block_values, block_items, _ = manager.state
  num_rows = len(axes[1])
  columns = {}
  for values, items in zip(block_values, block_items):
    values = np.asarray(values)
    if values.shape != (len(items), num_rows):
      raise ValueError(f'block of shape {values.shape} does not hold '
                       f'{len(items)} columns of {num_rows} rows')
    columns.update(zip(map(str, items), values))
  return columns
