"""DP-sparse FedAvg against the same job at densities 1.0, in one run.

Measures the issue's targets on the main job (`tf-dpsparse run`'s defaults:
HAPT, 30 users, example-level DP): total bytes (up + down) as a % of dense,
final-accuracy gap to the dense run at the same ε, and the round-time ratio.
Writes benchmarks/results/fed_bench.{json,md,png}.

Every flag left out is `RunConfig`'s default (the flags only override it),
so this benchmark measures what `tf-dpsparse run` runs and cannot drift from
it; a bad value is refused by `RunConfig` before any training.

Run: `python benchmarks/fed_bench.py` (`--rounds`, `--dataset`,
`--privacy`, `--density`, ... as in `tf-dpsparse run`).
"""

import argparse
import json
import os
import sys

from tf_dpsparse import config as run_config

RunConfig = run_config.RunConfig
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def build_parser() -> argparse.ArgumentParser:
  """The flags, each `None` unless given: RunConfig supplies the defaults,
  which --help shows."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', choices=run_config.DATASETS,
                      help=f'default: {RunConfig.dataset}')
  parser.add_argument('--rounds', type=int,
                      help=f'default: {RunConfig.rounds}')
  parser.add_argument('--privacy', choices=('example', 'client', 'none'),
                      help=f'default: {RunConfig.privacy}')
  parser.add_argument('--density', type=float, help=(
      'upload and download density of the sparse run (default: '
      f'{RunConfig.upload_density:g} up, {RunConfig.download_density:g} '
      'down)'))
  parser.add_argument('--target-epsilon', type=float, help=(
      f'default: {run_config.DEFAULT_TARGET_EPSILON:g} for a private run'))
  parser.add_argument('--clients-per-round', type=int,
                      help='default: all devices, every round')
  parser.add_argument('--out', default=RESULTS, help=f'default: {RESULTS}')
  return parser


def config_of(args: argparse.Namespace) -> RunConfig:
  """The sparse run's config: RunConfig's defaults and the flags given."""
  given = {name: getattr(args, name) for name in (
      'dataset', 'rounds', 'target_epsilon', 'clients_per_round')
           if getattr(args, name) is not None}
  if args.privacy is not None:
    given['privacy'] = None if args.privacy == 'none' else args.privacy
  if args.density is not None:
    given.update(upload_density=args.density, download_density=args.density)
  return RunConfig.from_flags(given)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    config = config_of(args)
    run_config.JobOptions(out=args.out)  # an --out it cannot write, now
  except ValueError as e:
    print(f'fed_bench: error: {e}', file=sys.stderr)
    return 2
  from tf_dpsparse.federated import simulation  # pylint: disable=import-outside-toplevel
  label = f'dp-sparse {config.upload_density:g}/{config.download_density:g}'
  sparse = simulation.run(config, label=label)
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
  return 0


if __name__ == '__main__':
  sys.exit(main())
