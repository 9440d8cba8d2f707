"""The `tf-dpsparse` command: flags, defaults, refusals, help.

Through `cli.main`, mostly without training: a bad request ends with exit
code 2 and one line saying why, before any data is touched (the `refusals`
fixture fails a test that reaches training), and `--help` answers without
importing TensorFlow.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

import tf_dpsparse as tds
from tf_dpsparse import cli
from tf_dpsparse import config as run_config


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


@pytest.fixture
def refusals(monkeypatch):
  """Makes reaching training (and its TensorFlow import) a test failure."""

  def train(config, job):
    pytest.fail(f'trained {config} ({job}) instead of refusing')

  monkeypatch.setattr(cli, '_train', train)


@pytest.fixture
def trains(monkeypatch):
  """The (config, job) pairs `tf-dpsparse run` would train, without TF."""
  seen = []
  monkeypatch.setattr(cli, '_train',
                      lambda config, job: seen.append((config, job)) or 0)
  return seen


def _refused(argv, capsys) -> str:
  """The one error line of a refused command (exit code 2)."""
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith('tf-dpsparse run: error: '), lines[0]
  return lines[0]


@pytest.mark.parametrize('flags,message', [
    (['--rounds', '0'], 'rounds must be >= 1, got 0'),
    (['--rounds', '0', '--privacy', 'none'], 'rounds must be >= 1'),
    (['--num-clients', '0'], 'num_clients must be >= 1, got 0'),
    (['--clients-per-round', '0'], 'clients_per_round must be >= 1, got 0'),
    (['--clients-per-round', '11'], 'clients_per_round=11 exceeds the 10'),
    (['--batch-size', '0'], 'batch_size must be >= 1'),
    (['--batch-size', '-16'], 'batch_size must be >= 1'),
    (['--local-steps', '0'], 'local_steps must be >= 1'),
    (['--upload-density', '0'], 'upload_density must be in (0, 1]'),
    (['--download-density', '1.5'], 'download_density must be in (0, 1]'),
    (['--catch-up', 'topk', '--catch-up-density', '0'], 'catch_up_density'),
    (['--shared-fraction', '1'], 'shared_fraction must be in [0, 1)'),
    (['--delta', '1'], 'delta must be in (0, 1)'),
    (['--l2-norm-clip', '0'], 'l2_norm_clip must be > 0'),
    (['--target-epsilon', '-1'], 'target_epsilon must be > 0'),
    (['--client-lr', '0'], 'client_learning_rate must be > 0'),
    (['--seed', '-1'], 'seed must be >= 0'),
    (['--partition', 'natural'], 'digits has no natural users'),
    (['--alpha', '0.1'], '--alpha would be ignored: the partition is iid'),
    (['--catch-up-density', '0.1'], "catch_up_density applies to catch_up="),
])
def test_run_refuses_an_invalid_flag_before_any_work(refusals, capsys, flags,
                                                     message):
  """Zero or negative counts used to be replaced by defaults (while the saved
  config said 0) or to fail after training; now each is one clear line."""
  del refusals
  assert message in _refused([*RUN, *flags], capsys)


@pytest.mark.parametrize('flag', [
    ['--target-epsilon', '3'], ['--noise-multiplier', '1.1'],
    ['--l2-norm-clip', '0.5'], ['--delta', '1e-6']])
def test_run_refuses_privacy_parameters_of_a_non_private_run(
    refusals, capsys, flag):
  """`--privacy none --target-epsilon 3` used to run non-private silently."""
  del refusals
  line = _refused([*RUN, '--privacy', 'none', *flag], capsys)
  assert 'non-private run given a privacy parameter' in line


@pytest.mark.parametrize('flags', [
    ['--num-clients', '10'], ['--num-clients', '30'],
    ['--partition', 'dirichlet'], ['--partition', 'natural'],
    ['--alpha', '0.1']])
def test_run_refuses_a_split_of_hapts_natural_users(refusals, capsys, flags):
  """HAPT's devices are its 30 users: a split flag used to be recorded in the
  config and ignored."""
  del refusals
  line = _refused(['run', '--dataset', 'hapt', *flags], capsys)
  assert "hapt's devices are its 30 users" in line


def test_run_refuses_an_out_path_that_is_a_file(refusals, capsys, tmp_path):
  """It used to train, then lose the results to a FileExistsError."""
  del refusals
  out = tmp_path / 'results'
  out.write_text('keep me')
  assert 'is a file, not a directory' in _refused(
      [*RUN, '--out', str(out)], capsys)
  assert 'is a file' in _refused([*RUN, '--out', str(out / 'sub')], capsys)
  assert out.read_text() == 'keep me'


def test_run_defaults_are_run_configs(trains):
  """No flag: exactly `RunConfig()` and `JobOptions()` (baseline on); the
  parser holds no defaults of its own that could drift."""
  assert cli.main(['run']) == 0
  assert trains == [(run_config.RunConfig(), run_config.JobOptions())]
  config, job = trains[0]
  assert (config.upload_density, config.download_density,
          config.value_bits) == (0.02, 0.02, 8)
  assert job.baseline and job.progress and job.out == 'runs/latest'
  fields = {f.name for f in dataclasses.fields(run_config.RunConfig)}
  assert not fields & set(vars(cli.build_parser().parse_args(['run'])))


def test_run_flags_are_the_config_fields(trains):
  """Every field is a flag (with its old aliases); --no-baseline and
  --no-progress turn the job's options off."""
  argv = ['run', '--dataset', 'mnist', '--rounds', '7',
          '--clients-per-round', '5', '--num-clients', '50', '--partition',
          'dirichlet', '--alpha', '0.3', '--upload-density', '0.05',
          '--download-density', '0.1', '--shared-fraction', '0.2',
          '--catch-up', 'topk', '--catch-up-density', '0.04', '--privacy',
          'client', '--noise-multiplier', '1.2', '--l2-norm-clip', '0.3',
          '--delta', '1e-6', '--batch-size', '8', '--local-steps', '3',
          '--client-lr', '0.05', '--server-learning-rate', '0.5',
          '--value-bits', '16', '--seed', '4', '--out', 'x', '--no-baseline',
          '--no-progress']
  assert cli.main(argv) == 0
  (config, job), = trains
  assert config == run_config.RunConfig(
      dataset='mnist', rounds=7, clients_per_round=5, num_clients=50,
      partition='dirichlet', alpha=0.3, upload_density=0.05,
      download_density=0.1, shared_fraction=0.2, catch_up='topk',
      catch_up_density=0.04, privacy='client', noise_multiplier=1.2,
      l2_norm_clip=0.3, delta=1e-6, batch_size=8, local_steps=3,
      client_learning_rate=0.05, server_learning_rate=0.5, value_bits=16,
      seed=4)
  assert job == run_config.JobOptions(out='x', baseline=False, progress=False)
  assert cli.main(['run', '--privacy', 'none']) == 0
  assert trains[-1][0].privacy is None


def test_run_refuses_the_old_baseline_flag(refusals, capsys):
  """The baseline runs by default; `--baseline` is gone (--no-baseline)."""
  del refusals
  with pytest.raises(SystemExit) as e:
    cli.main([*RUN, '--baseline'])
  assert e.value.code == 2
  assert ('--baseline was removed: the dense-DP baseline runs by default '
          'now (--no-baseline skips it)') in capsys.readouterr().err


def test_bench_flags_are_not_parsed_by_the_run_parser(monkeypatch):
  seen = []
  monkeypatch.setattr(cli, '_bench', lambda args, rest: seen.append(rest) or 0)
  flags = ['--quick', '--rounds', '0', '--methods', 'fedavg', '--out', 'x']
  assert cli.main(['bench', *flags]) == 0
  assert seen == [flags]


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['--version'])
  assert e.value.code == 0
  assert capsys.readouterr().out == f'tf-dpsparse {tds.__version__}\n'


def test_help_lists_every_default_without_importing_tensorflow():
  """--help used to cost 5-9 s of TensorFlow import; it lists run's defaults
  (from RunConfig) both in `run --help` and in `tf-dpsparse --help`."""
  code = textwrap.dedent("""
      import contextlib, io, sys
      from tf_dpsparse import cli
      for argv in (['--help'], ['run', '--help'], ['--version']):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
          try:
            cli.main(argv)
          except SystemExit as e:
            assert e.code == 0, (argv, e.code)
        print(out.getvalue())
        print('=====')
      print(sorted(m for m in sys.modules if m.split('.')[0] in
                   ('tensorflow', 'tensorflow_federated', 'numpy')))
  """)
  env = dict(os.environ, COLUMNS='10000')  # no wrapping inside a flag name
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=120, check=True, env=env)
  top, run, version, modules = proc.stdout.split('=====\n')
  assert modules.strip() == '[]'
  assert version.strip() == f'tf-dpsparse {tds.__version__}'
  run, top = ' '.join(run.split()), ' '.join(top.split())  # one line each
  for field in dataclasses.fields(run_config.RunConfig):
    flag = '--' + field.name.replace('_', '-')
    default = field.metadata.get('default_text', field.default)
    default = 'none' if default is None else str(default)
    assert f'(default: {default})' in run and flag in run, field.name
    assert f'{flag} {default}' in top, field.name
  assert '--no-baseline' in run and '--client-lr' in run
  assert '--no-baseline skips it' in top


def test_client_run_whose_poisson_samples_are_all_empty(tmp_path, capfd):
  """Every round's Poisson sample empty (this seed): the run used to end in
  an IndexError. It reports the initial model, charges the skipped round's
  ε, and saves the resolved config."""
  _simulation()
  out = tmp_path / 'run'
  assert cli.main(['run', '--privacy', 'client', '--clients-per-round', '1',
                   '--seed', '6', '--rounds', '1', '--dataset', 'digits',
                   '--num-clients', '10', '--no-baseline', '--no-progress',
                   '--out', str(out)]) == 0
  captured = capfd.readouterr()  # fd level: TFF's worker wants a fileno
  assert 'no round ran' in captured.err
  assert '(no round ran: initial model)' in captured.out
  result, = json.loads((out / 'rounds.json').read_text())
  summary = result['summary']
  assert result['rounds'] == [] and summary['rounds_completed'] == 0
  assert 0 <= summary['final_accuracy'] <= 1
  assert 0 < summary['epsilon'] <= 8.0  # the skipped round is charged
  assert (result['config']['clients_per_round'], result['config'][
      'num_clients'], result['config']['partition']) == (1, 10, 'iid')


def test_run_passes_restart_and_noise_seed(trains):
  assert cli.main([*RUN, '--restart', '--noise-seed', '3']) == 0
  (config, job), = trains
  assert job.restart and config.noise_seed == 3
  assert cli.main(RUN) == 0
  assert not trains[-1][1].restart and trains[-1][0].noise_seed is None


def test_run_refuses_a_noise_seed_without_noise(refusals, capsys):
  del refusals
  assert '--noise-seed would be ignored: the run is not private' in _refused(
      [*RUN, '--privacy', 'none', '--noise-seed', '1'], capsys)


def _checkpoint_of_another_config(out, label):
  from tf_dpsparse.federated import checkpoint  # needs TFF
  checkpoint.RunCheckpoint(str(out), label, run_config.RunConfig(
      dataset='digits', rounds=9))
  return checkpoint.directory(str(out), label)


def test_run_refuses_a_checkpoint_of_another_config_before_training(
    runs, tmp_path, capsys):
  """The baseline's checkpoint is checked before the main run trains, and
  the refusal names --restart (exit 2, one line)."""
  out = tmp_path / 'run'
  _checkpoint_of_another_config(out, 'dense (same privacy)')
  assert cli.main([*RUN, '--out', str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(
      'tf-dpsparse run: error: ')
  assert 'rounds 9 there, 2 now' in err and '--restart' in err
  assert runs == []


def test_restart_deletes_every_runs_checkpoint_before_the_first_trains(
    monkeypatch, tmp_path):
  out = tmp_path / 'run'
  paths = [_checkpoint_of_another_config(out, label) for label in (
      'dp-sparse ↑0.02 ↓0.02', 'dense (same privacy)')]
  simulation = _simulation()
  seen = []

  def run(config, **kwargs):
    seen.append([os.path.exists(p) for p in paths])
    raise _Stop

  monkeypatch.setattr(simulation, 'run', run)
  with pytest.raises(_Stop):
    cli.main([*RUN, '--out', str(out), '--restart'])
  assert seen == [[False, False]]


def test_a_refused_budget_is_one_line_and_exit_2(monkeypatch, capsys):
  from tf_dpsparse import privacy

  def refuse(args):
    del args
    raise privacy.BudgetExhaustedError('refused: spent 8, remaining 0')

  monkeypatch.setattr(cli, '_epsilon', refuse)
  assert cli.main(['epsilon', '-z', '1', '-q', '0.1', '--steps', '1']) == 2
  assert 'error: refused: spent 8, remaining 0' in capsys.readouterr().err


def test_a_subspace_run_sends_its_coordinates_and_nothing_else(tmp_path):
  """`run --subspace`: every round's bytes are all of z each way (8-bit
  values, no index bytes) and its ε is the calibrated target's; the dense
  baseline beside it trains the model's own weights."""
  _simulation()
  out = tmp_path / 'run'
  assert cli.main(['run', '--dataset', 'digits', '--rounds', '2',
                   '--subspace', '0.05', '--server-optimizer', 'adam',
                   '--server-lr', '0.1', '--no-progress', '--out',
                   str(out)]) == 0
  sub, dense = json.loads((out / 'rounds.json').read_text())
  assert sub['label'] == 'dp-subspace 0.05' and sub['config']['subspace'] == 0.05
  assert dense['config']['subspace'] is None
  dims = round(0.05 * sub['summary']['parameters'])
  for record in sub['rounds']:  # 'all' header: a few bytes per device
    per_device = record['bytes_up'] / record['clients']
    assert dims <= per_device <= dims + 16, record
  assert sub['summary']['epsilon'] == pytest.approx(8.0, abs=0.05)
