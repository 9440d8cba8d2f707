"""`tf-dpsparse bench` (tf_dpsparse.baselines.paper_table) and the DSSGD baseline."""

import csv
import json
import os

import numpy as np
import pytest

import tf_dpsparse as tds

pytest.importorskip('tensorflow_federated')
from tf_dpsparse import cli  # noqa: E402
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
  from tf_dpsparse.federated import simulation
  mnist = simulation.RunConfig(**paper_table.SETUPS['mnist'])
  config, _ = paper_table._method('ours-2%-topk-3%', mnist)
  assert (config.catch_up, config.upload_density, config.download_density,
          config.catch_up_density) == ('topk', 0.02, 0.02, 0.03)
  assert paper_table._method('ours-2%', mnist)[0].catch_up == 'union'
  hapt = simulation.RunConfig(**paper_table.SETUPS['hapt'])  # all, every round
  assert 'same run' in paper_table._method('ours-2%-topk', hapt)
  assert 'no example-level' in paper_table._method('compress-dp', hapt)


def test_zero_clip_reaches_the_builder_error(tmp_path):
  with pytest.raises(ValueError, match='l2_norm_clip'):
    cli.main(['bench', '--quick', '--rounds', '1', '--methods', 'ours-1%',
              '--l2-norm-clip', '0', '--out', str(tmp_path), '--no-progress'])
