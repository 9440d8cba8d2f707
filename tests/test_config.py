"""`tf_dpsparse.config`: RunConfig holds every default and refuses bad runs.

Without TensorFlow (the module imports none), except the one test that holds
its per-dataset defaults to `tds.data.load`'s.
"""

import dataclasses

import pytest

from tf_dpsparse import config
from tf_dpsparse.config import JobOptions
from tf_dpsparse.config import RunConfig


def test_every_field_says_what_it_is():
  """The CLI's help is generated from these: none may be missing."""
  for cls in (RunConfig, JobOptions):
    for field in dataclasses.fields(cls):
      assert field.metadata['help'], field.name
      if field.default is None:
        assert field.metadata['default_text'], field.name  # what None means


def test_defaults_are_the_readmes_operating_point():
  default = RunConfig()
  assert (default.upload_density, default.download_density,
          default.value_bits) == (0.02, 0.02, 8)
  assert (default.dataset, default.num_clients, default.partition) == (
      'hapt', 30, 'natural')
  assert default.target_epsilon == config.DEFAULT_TARGET_EPSILON
  assert JobOptions().baseline  # the dense-DP baseline runs beside it


@pytest.mark.parametrize('dataset,clients,partition', [
    ('digits', 10, 'iid'), ('mnist', 100, 'iid'),
    ('fashion_mnist', 100, 'iid'), ('hapt', 30, 'natural')])
def test_per_dataset_defaults_resolve_in_one_place(dataset, clients,
                                                   partition):
  resolved = RunConfig(dataset=dataset)
  assert (resolved.num_clients, resolved.partition) == (clients, partition)
  assert resolved.resolved().clients_per_round == clients  # all devices


def test_defaults_agree_with_tds_data_load():
  """The run splits a data set as `tds.data.load` does by default (digits
  over 100 clients used to fail: fewer examples than a batch)."""
  data = pytest.importorskip('tf_dpsparse.data')
  assert config.DEFAULT_NUM_CLIENTS == data.DEFAULT_NUM_CLIENTS
  assert set(config.DATASETS) == set(data.NAMES)
  assert config.PARTITIONS == data.PARTITIONS
  run = RunConfig(dataset='digits')
  default = data.load('digits')
  explicit = data.load('digits', num_clients=run.num_clients,
                       partition=run.partition, alpha=run.alpha)
  assert default.client_sizes == explicit.client_sizes
  assert min(default.client_sizes.values()) >= run.batch_size


@pytest.mark.parametrize('kwargs,message', [
    (dict(rounds=0), 'rounds must be >= 1, got 0'),
    (dict(rounds=2.5), 'rounds must be int'),
    (dict(num_clients=0), 'num_clients must be >= 1'),
    (dict(clients_per_round=0), 'clients_per_round must be >= 1'),
    (dict(clients_per_round=31), 'exceeds the 30 devices of hapt'),
    (dict(dataset='digits', clients_per_round=11), 'exceeds the 10 devices'),
    (dict(dataset='cifar'), "dataset must be one of 'hapt'"),
    (dict(upload_density=0.0), 'upload_density must be in (0, 1]'),
    (dict(download_density=2.0), 'download_density must be in (0, 1]'),
    (dict(value_bits=12), 'value_bits must be one of 32, 16, 8'),
    (dict(privacy='none'), "privacy must be one of 'example', 'client', None"),
    (dict(privacy=None, target_epsilon=3.0), 'non-private run given a '
     'privacy parameter: target_epsilon=3.0'),
    (dict(privacy=None, noise_multiplier=1.0), 'non-private run given'),
    (dict(noise_multiplier=0.0), 'noise_multiplier must be > 0'),
    (dict(dataset='hapt', num_clients=10), "hapt's devices are its 30 users"),
    (dict(dataset='hapt', partition='iid'), "hapt's devices are its 30 users"),
    (dict(dataset='mnist', partition='natural'), 'mnist has no natural users'),
    (dict(catch_up_density=0.1), "catch_up_density applies to catch_up="),
    (dict(batch_size=None), 'batch_size must be given, got None'),
    (dict(subspace=1.0), 'subspace must be in (0, 1)'),
    (dict(subspace=0.02, catch_up='topk', privacy='client',
          clients_per_round=5), "catch_up 'topk' has nothing to bound"),
    (dict(server_optimizer='yogi'), "server_optimizer must be one of 'sgd'"),
])
def test_invalid_values_are_refused_with_one_line(kwargs, message):
  with pytest.raises(ValueError) as e:
    RunConfig(**kwargs)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_a_flag_the_run_would_ignore_is_refused():
  """Python callers may set any field; a user's flag must change the run."""
  assert RunConfig(privacy=None, l2_norm_clip=0.3).l2_norm_clip == 0.3
  with pytest.raises(ValueError, match='non-private run given a privacy '
                     'parameter: --l2-norm-clip'):
    RunConfig.from_flags({'privacy': None, 'l2_norm_clip': 0.3})
  with pytest.raises(ValueError, match='--alpha would be ignored'):
    RunConfig.from_flags({'dataset': 'digits', 'alpha': 0.1})
  assert RunConfig.from_flags({'dataset': 'digits', 'partition': 'dirichlet',
                               'alpha': 0.1}).alpha == 0.1


def test_a_subspace_run_refuses_the_top_k_flags_it_would_ignore():
  with pytest.raises(ValueError, match='--upload-density would be ignored: a '
                     'subspace run sends all of its coordinates'):
    RunConfig.from_flags({'subspace': 0.02, 'upload_density': 0.01})
  config = RunConfig.from_flags({'subspace': 0.02, 'value_bits': 16})
  dense = config.dense()  # the baseline: the model's own weights, float32
  assert (dense.subspace, dense.value_bits, dense.upload_density) == (
      None, 32, 1.0)


def test_replace_and_dense_keep_a_valid_resolved_config():
  """Resolved values pass validation again (`dataclasses.replace`), and the
  Nones that stand for something keep their meaning until `resolved()`."""
  topk = RunConfig(dataset='digits', catch_up='topk', privacy='client',
                   clients_per_round=5)
  dense = topk.dense()
  assert (dense.upload_density, dense.download_density, dense.value_bits,
          dense.catch_up_density) == (1.0, 1.0, 32, None)
  assert dense.resolved().catch_up_density == 1.0
  assert topk.resolved().catch_up_density == 0.02
  assert RunConfig(dataset='digits').resolved().catch_up_density is None
  assert dataclasses.replace(RunConfig(), rounds=3).num_clients == 30


def test_job_options_refuse_an_out_path_that_cannot_be_a_directory(tmp_path):
  (tmp_path / 'file').write_text('')
  assert JobOptions(out=str(tmp_path / 'new' / 'dir')).out  # created later
  for out in (tmp_path / 'file', tmp_path / 'file' / 'sub'):
    with pytest.raises(ValueError, match='is a file'):
      JobOptions(out=str(out))
