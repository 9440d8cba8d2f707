"""DP-sparse FedAvg against the same job at densities 1.0, in one run.

Measures the issue's targets on HAPT (30 users, example-level DP by default):
total bytes (up + down) as a % of dense, final-accuracy gap to the dense run
at the same ε, and the round-time ratio. Writes
benchmarks/results/fed_bench.{json,md,png}.

Run: `python benchmarks/fed_bench.py` (`--rounds`, `--dataset`,
`--privacy` as in `tf-dpsparse run`).
"""

import argparse
import json
import os

from tf_dpsparse.federated import simulation


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='hapt')
  parser.add_argument('--rounds', type=int,
                      default=simulation.RunConfig.rounds)
  parser.add_argument('--privacy', default='example',
                      choices=('example', 'client', 'none'))
  parser.add_argument('--density', type=float, default=0.01)
  parser.add_argument('--target-epsilon', type=float, default=8.0)
  parser.add_argument('--clients-per-round', type=int, default=None)
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results'))
  args = parser.parse_args()
  privacy = None if args.privacy == 'none' else args.privacy
  config = simulation.RunConfig(
      dataset=args.dataset, rounds=args.rounds, privacy=privacy,
      upload_density=args.density, download_density=args.density,
      target_epsilon=args.target_epsilon if privacy else None,
      clients_per_round=args.clients_per_round)
  sparse = simulation.run(config, label=f'dp-sparse {args.density:g}')
  dense = simulation.run(config.dense(), label='dense (same privacy)')
  s, d = sparse['summary'], dense['summary']
  ratios = {
      'percent_of_dense_bytes': s['percent_of_dense'],
      'accuracy_gap_points': 100 * (d['final_accuracy'] - s['final_accuracy']),
      'device_accuracy_gap_points': 100 * (d['final_device_accuracy'] -
                                           s['final_device_accuracy']),
      'round_time_ratio': s['seconds_per_round'] / d['seconds_per_round'],
  }
  table = simulation.summary_table([sparse, dense])
  print('\n' + table)
  print(f'\nbytes: {ratios["percent_of_dense_bytes"]:.2f} % of dense '
        f'(target <= 2 %); accuracy gap: {ratios["accuracy_gap_points"]:+.2f} '
        f'points (target <= 2; on devices '
        f'{ratios["device_accuracy_gap_points"]:+.2f}); round time: '
        f'{ratios["round_time_ratio"]:.2f}x '
        f'dense (target <= 1.5x)')
  os.makedirs(args.out, exist_ok=True)
  simulation.plot([sparse, dense], os.path.join(args.out, 'fed_bench.png'))
  with open(os.path.join(args.out, 'fed_bench.json'), 'w') as f:
    json.dump({'runs': [sparse, dense], 'ratios': ratios}, f, indent=1)
  with open(os.path.join(args.out, 'fed_bench.md'), 'w') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  main()
