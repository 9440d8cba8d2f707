"""`tf-dpsparse bench` (`tf_dpsparse.baselines.paper_table`) and DSSGD."""

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tf_dpsparse as tds

pytest.importorskip('tensorflow_federated')
from tf_dpsparse import cli  # noqa: E402
from tf_dpsparse import config as run_config  # noqa: E402
from tf_dpsparse import data  # noqa: E402
from tf_dpsparse.baselines import dssgd  # noqa: E402
from tf_dpsparse.baselines import paper_table  # noqa: E402


def test_svt_selects_at_most_c_coordinates_bounded_by_gamma():
  rng = np.random.default_rng(0)
  update = rng.normal(scale=0.05, size=10_000)
  c = 100  # θu = 1 %
  indices, values = dssgd.select_and_release(update, c, 0.5, 0.01, 1e-4, rng)
  assert len(indices) <= c and len(set(indices.tolist())) == len(indices)
  assert np.all(np.diff(indices) > 0) and np.all(np.abs(values) <= 0.01)


def test_svt_release_noise_scale_matches_its_epsilon():
  # Large ε keeps the release noise far inside [-γ, γ], so the bound does not
  # truncate it: mean |noise| of Laplace(b) is b. Tolerance 3 % (n = 2,000).
  rng = np.random.default_rng(1)
  c, epsilon, gamma = 2_000, 9e5, 0.01
  _, _, release_scale = dssgd.svt_scales(epsilon, c, gamma)
  assert release_scale == pytest.approx(2 * c * 2 * gamma / (epsilon / 9))
  _, values = dssgd.select_and_release(np.zeros(50_000), c, epsilon, gamma,
                                       0.0, rng)
  assert len(values) == c
  assert np.mean(np.abs(values)) == pytest.approx(release_scale, rel=0.03)


def test_quick_bench_writes_table_csv_json_png_and_accountant_epsilon(tmp_path):
  out = tmp_path / 'bench'
  assert cli.main(['bench', '--quick', '--rounds', '2', '--methods', 'fedavg',
                   'ours-1%', '--l2-norm-clip', '0.7', '--value-bits', '8',
                   '--out', str(out), '--no-progress']) == 0
  for name in ('table.md', 'rounds.csv', 'rounds.json', 'accuracy.png'):
    assert os.path.getsize(out / name) > 0
  results = json.loads((out / 'rounds.json').read_text())
  assert [r['label'] for r in results] == ['fedavg', 'ours-1%']
  with open(out / 'rounds.csv') as f:
    assert len(list(csv.DictReader(f))) == 4
  ours = results[1]
  config, summary = ours['config'], ours['summary']
  assert config['l2_norm_clip'] == 0.7 and config['value_bits'] == 8
  fed = data.load('digits', num_clients=config['num_clients'],
                  partition=config['partition'], seed=config['seed'])
  epsilon = tds.privacy.compute_epsilon(
      summary['noise_multiplier'],
      config['batch_size'] / min(fed.client_sizes.values()),
      config['rounds'] * config['local_steps'], config['delta'])
  assert summary['epsilon'] == pytest.approx(epsilon, rel=1e-9)
  assert f'{epsilon:.2f} ({config["delta"]:g})' in (out / 'table.md').read_text()


def test_topk_catch_up_row_runs_only_where_devices_miss_rounds():
  mnist = run_config.RunConfig(**paper_table.SETUPS['mnist'])
  config, _ = paper_table._method('ours-2%-topk-3%', mnist)
  assert (config.catch_up, config.upload_density, config.download_density,
          config.catch_up_density) == ('topk', 0.02, 0.02, 0.03)
  assert paper_table._method('ours-2%', mnist)[0].catch_up == 'union'
  hapt = run_config.RunConfig(**paper_table.SETUPS['hapt'])  # all, every round
  assert 'same run' in paper_table._method('ours-2%-topk', hapt)
  assert 'no example-level' in paper_table._method('compress-dp', hapt)


def test_subspace_rows_and_the_adam_baseline_take_each_setups_tuning():
  """The sweep's winners (benchmarks/results/subspace_sweep.md) per set-up;
  dense-Adam stays dense (TFF's DP-FedAvg at client level)."""
  mnist = run_config.RunConfig(**paper_table.SETUPS['mnist'])
  config, builder = paper_table._method('ours-subspace-2%', mnist)
  assert (config.subspace, config.server_optimizer, config.server_learning_rate,
          config.client_learning_rate, builder) == (0.02, 'adam', 0.1, 1.0,
                                                    'ours')
  config, builder = paper_table._method('dp-dense-adam', mnist)
  assert (config.subspace, config.server_optimizer, builder) == (
      None, 'adam', 'tff')
  hapt = run_config.RunConfig(**paper_table.SETUPS['hapt'])
  config, _ = paper_table._method('dp-dense-adam', hapt)
  assert (config.upload_density, config.server_learning_rate,
          config.client_learning_rate) == (1.0, 0.03, 0.3)


def test_subspace_verdicts_compare_with_the_best_dense_row():
  def result(accuracy, mb):
    return {'summary': {'final_accuracy': accuracy, 'mb_up': mb,
                        'mb_down': mb}}
  by = {'fedavg': result(0.97, 100), 'dp-dense': result(0.95, 100),
        'dp-dense-adam': result(0.96, 100),
        'ours-subspace-2%': result(0.945, 1.5)}
  lines = paper_table.subspace_verdicts(
      by, {k: 100 * r['summary']['final_accuracy'] for k, r in by.items()})
  assert lines == [
      'ours-subspace-2%: 1.50 % of dense FedAvg bytes, catch-ups included '
      '(target ≤ 2 %): met',
      'ours-subspace-2%: -1.50 points against the best dense DP row '
      '(dp-dense-adam; target ≥ −1): NOT met']


def _refused(capsys, monkeypatch, argv):
  """Runs `tf-dpsparse bench argv` with training replaced by a failure, and
  returns its one line of stderr: a refused flag must stop before any
  method runs."""
  def no_training(*args, **kwargs):
    raise AssertionError('a method ran before the flags were checked')

  monkeypatch.setattr(paper_table, 'run_methods', no_training)
  assert cli.main(['bench', *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(
      'tf-dpsparse bench: error: '), err
  return err


def test_negative_epsilon_fails_before_fedavg_runs(capsys, monkeypatch):
  err = _refused(capsys, monkeypatch, ['--quick', '--methods', 'fedavg',
                                       'dp-dense', '--target-epsilon', '-1'])
  assert '--target-epsilon must be > 0' in err


def test_zero_rounds_is_refused_not_replaced_by_the_setups(capsys, monkeypatch):
  assert '--rounds must be >= 1' in _refused(capsys, monkeypatch,
                                             ['--quick', '--rounds', '0'])


@pytest.mark.parametrize('argv, message', [
    (['--l2-norm-clip', '0'], '--l2-norm-clip must be > 0'),
    (['--seed', '-1'], '--seed must be >= 0'),
    (['--dataset', 'mnist'], 'drop --quick or --dataset mnist'),
    (['--methods', 'fedavg', 'fedavg'], 'fedavg more than once'),
    (['--methods', 'fedavg', 'compress', '--target-epsilon', '3'],
     '--target-epsilon would be ignored'),
    (['--methods', 'fedavg', 'dssgd', '--l2-norm-clip', '0.5'],
     '--l2-norm-clip would be ignored'),
    (['--methods', 'fedavg', 'dp-dense', '--value-bits', '16'],
     '--value-bits would be ignored'),
    (['--methods', 'compress-dp'], 'no method of --methods applies'),
])
def test_every_bad_flag_fails_before_any_method(capsys, monkeypatch, argv,
                                                message):
  assert message in _refused(capsys, monkeypatch, ['--quick', *argv])


def test_an_out_that_is_a_file_fails_before_training(capsys, monkeypatch,
                                                     tmp_path):
  (tmp_path / 'taken').write_text('')
  err = _refused(capsys, monkeypatch, ['--quick', '--out',
                                       str(tmp_path / 'taken')])
  assert 'is a file' in err


def test_unset_flags_take_runconfigs_defaults_and_set_ones_override():
  parse = paper_table.build_parser().parse_args
  quick = paper_table.base_config(parse(['--quick']))
  defaults = run_config.RunConfig(dataset='digits')
  for name in ('target_epsilon', 'value_bits', 'seed', 'l2_norm_clip',
               'batch_size', 'client_learning_rate'):
    assert getattr(quick, name) == getattr(defaults, name), name
  assert quick.rounds == paper_table.SETUPS['digits']['rounds']
  hapt = paper_table.base_config(parse(['--rounds', '3', '--seed', '2']))
  assert (hapt.dataset, hapt.rounds, hapt.seed, hapt.local_steps) == (
      'hapt', 3, 2, run_config.RunConfig.local_steps)


def test_help_and_a_refused_flag_answer_without_tensorflow():
  code = textwrap.dedent("""
      import contextlib, io, sys
      from tf_dpsparse.baselines import paper_table
      with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
          paper_table.main(['--help'], prog='tf-dpsparse bench')
        except SystemExit as e:
          assert e.code == 0
      assert '--quick' in out.getvalue()
      assert paper_table.main(['--rounds', '0']) == 2
      print(sorted(m for m in sys.modules if m.split('.')[0] in
                   ('tensorflow', 'tensorflow_federated')))
  """)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=120, check=True)
  assert proc.stdout.strip() == '[]'


def _run(argv, cwd, env, timeout=900) -> subprocess.CompletedProcess:
  """Runs `argv`, killing it and any TFF worker it started on a timeout."""
  proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    from tf_dpsparse.federated import _workers  # pylint: disable=import-outside-toplevel
    orphans = _workers.worker_pids(proc.pid)
    proc.kill()
    for pid in orphans:
      os.kill(pid, signal.SIGKILL)
    pytest.fail(f'{argv} did not finish in {timeout} s')
  return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.slow
def test_bench_runs_from_a_non_editable_install(tmp_path):
  """Issue 15's done-when: after a plain `pip install .`, `tf-dpsparse bench`
  runs. The copy is installed with --target and put first on the path; the
  run starts from an empty directory, so neither the checkout nor the
  editable install's finder (which comes after the path) can serve it."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  src, site, cwd = tmp_path / 'src', tmp_path / 'site', tmp_path / 'cwd'
  shutil.copytree(repo / 'tf_dpsparse', src / 'tf_dpsparse',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('setup.py', 'README.md'):
    shutil.copy(repo / name, src / name)
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site))
  installed = _run([sys.executable, '-m', 'pip', 'install', '--quiet',
                    '--no-deps', '--no-build-isolation', '--target', str(site),
                    str(src)], cwd, env)
  assert installed.returncode == 0, installed.stderr
  where = _run([sys.executable, '-c', 'from tf_dpsparse.baselines import '
                'paper_table; print(paper_table.__file__)'], cwd, env)
  assert where.stdout.strip().startswith(str(site)), where
  bench = [str(site / 'bin' / 'tf-dpsparse'), 'bench']
  helped = _run([*bench, '--help'], cwd, env)
  assert helped.returncode == 0 and '--quick' in helped.stdout, helped.stderr
  ran = _run([*bench, '--quick', '--rounds', '1', '--methods', 'fedavg',
              'ours-2%', '--out', str(tmp_path / 'out'), '--no-progress'],
             cwd, env)
  assert ran.returncode == 0, ran.stderr[-3000:]
  table = (tmp_path / 'out' / 'table.md').read_text()
  assert '| fedavg |' in table and '| ours-2% |' in table
