"""The `tf-dpsparse` privacy flags: the ε printed is the ε of what runs.

Through `cli.main`, without training: a bad request ends with exit code 2 and
a message saying why, before any data is touched.
"""

import pytest

import tf_dpsparse as tds
from tf_dpsparse import cli


class _Stop(Exception):
  """Raised in place of training, to look at the config `run` was given."""


def _simulation():
  pytest.importorskip('tensorflow_federated')
  from tf_dpsparse.federated import simulation  # needs TFF
  return simulation


@pytest.fixture
def runs(monkeypatch):
  """The configs `tf-dpsparse run` hands to training, which is replaced by
  a stop."""
  seen = []

  def run(config, **kwargs):
    del kwargs
    seen.append(config)
    raise _Stop

  monkeypatch.setattr(_simulation(), 'run', run)
  return seen


RUN = ['run', '--dataset', 'digits', '--num-clients', '10', '--rounds', '2',
       '--no-progress']


def test_calibrate_refuses_an_unreachable_target(capsys):
  """It used to search without output for minutes."""
  assert cli.main(['calibrate', '-e', '0.001', '-q', '0.5', '--steps',
                   '5']) == 2
  err = capsys.readouterr().err
  assert err.startswith('tf-dpsparse calibrate: error: target ε=0.001')
  assert 'out of reach' in err and 'noise_multiplier > 1000' in err


def test_calibrate_prints_noise_that_spends_the_target(capsys):
  assert cli.main(['calibrate', '-e', '2', '-q', '0.01', '--steps',
                   '1000']) == 0
  out = capsys.readouterr().out
  sigma = float(out.split('noise_multiplier = ')[1].split()[0])
  assert sigma == pytest.approx(tds.privacy.calibrate_noise_multiplier(
      2.0, 1e-5, 0.01, 1000), abs=1e-5)
  spent = float(out.split('spends ε = ')[1].split()[0])
  assert 0.99 * 2 <= spent <= 2


def test_epsilon_prints_the_accountants_value(capsys):
  assert cli.main(['epsilon', '-z', '1.1', '-q', '0.1', '--steps', '30']) == 0
  eps = tds.privacy.compute_epsilon(1.1, 0.1, 30, 1e-5)
  assert capsys.readouterr().out.startswith(f'ε = {eps:.4f} at δ = 1e-05')


def test_run_refuses_a_target_and_a_noise_multiplier(runs, tmp_path, capsys):
  """Both used to be accepted: the target was dropped and ε = 18.65 printed."""
  out = tmp_path / 'run'
  assert cli.main([*RUN, '--noise-multiplier', '0.5', '--target-epsilon', '3',
                   '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('tf-dpsparse run: error: give target_epsilon (3.0) '
                        'or noise_multiplier (0.5), not both')
  assert runs == [] and not out.exists()  # nothing trained


@pytest.mark.parametrize('flags,target,noise', [
    ([], 8.0, None),
    (['--target-epsilon', '3'], 3.0, None),
    (['--noise-multiplier', '0.5'], None, 0.5),
    (['--privacy', 'none'], None, None),
])
def test_run_passes_the_privacy_flags_to_run_config(runs, flags, target,
                                                    noise):
  """No flag: RunConfig's default target; one flag: that one, alone."""
  with pytest.raises(_Stop):
    cli.main([*RUN, *flags])
  config, = runs
  assert (config.target_epsilon, config.noise_multiplier) == (target, noise)


def test_run_config_resolves_the_target_in_one_place():
  simulation = _simulation()
  run_config = simulation.RunConfig
  assert run_config().target_epsilon == simulation.DEFAULT_TARGET_EPSILON
  fixed = run_config(noise_multiplier=1.0)  # invalid while the default was 8
  assert (fixed.target_epsilon, fixed.noise_multiplier) == (None, 1.0)
  assert run_config(target_epsilon=2.0).target_epsilon == 2.0
  assert run_config(privacy=None).target_epsilon is None
  assert fixed.dense().target_epsilon is None  # replace() keeps it resolved
  for privacy in ('example', 'client', None):
    with pytest.raises(ValueError, match='not both'):
      run_config(privacy=privacy, target_epsilon=3.0, noise_multiplier=0.5)


def test_builder_refuses_a_target_and_a_noise_multiplier():
  """The same rule below RunConfig: `round_privacy` takes exactly one."""
  pytest.importorskip('tensorflow_federated')
  with pytest.raises(ValueError, match='exactly one'):
    tds.federated.build_dp_sparse_fed_avg(
        None, None, upload_density=0.1, download_density=0.1,
        privacy='client', l2_norm_clip=1.0, noise_multiplier=0.5,
        target_epsilon=3.0, clients_per_round=5, total_clients=10, rounds=2)
