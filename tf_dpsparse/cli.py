"""The `tf-dpsparse` command."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence


def _epsilon(args) -> int:
  from tf_dpsparse import privacy
  eps = privacy.compute_epsilon(args.noise_multiplier, args.sampling_rate,
                                args.steps, args.delta, args.accountant)
  print(f'ε = {eps:.4f} at δ = {args.delta:g} ({args.accountant}; σ = '
        f'{args.noise_multiplier}, q = {args.sampling_rate}, steps = {args.steps})')
  return 0


def _calibrate(args) -> int:
  from tf_dpsparse import privacy
  sigma = privacy.calibrate_noise_multiplier(args.target_epsilon, args.delta,
                                             args.sampling_rate, args.steps,
                                             args.accountant)
  eps = privacy.compute_epsilon(sigma, args.sampling_rate, args.steps,
                                args.delta, args.accountant)
  print(f'noise_multiplier = {sigma:.5f} (spends ε = {eps:.4f} at δ = '
        f'{args.delta:g}; q = {args.sampling_rate}, steps = {args.steps})')
  return 0


def _run(args) -> int:
  """Trains as `args` say; `RunConfig` alone decides ε vs noise (and refuses
  both), so the flags mean what the config means."""
  from tf_dpsparse.federated import simulation
  privacy = None if args.privacy == 'none' else args.privacy
  config = simulation.RunConfig(
      dataset=args.dataset, rounds=args.rounds,
      clients_per_round=args.clients_per_round, num_clients=args.num_clients,
      partition=args.partition, alpha=args.alpha,
      upload_density=args.upload_density, download_density=args.download_density,
      shared_fraction=args.shared_fraction, catch_up=args.catch_up,
      catch_up_density=args.catch_up_density, privacy=privacy,
      target_epsilon=args.target_epsilon,
      noise_multiplier=args.noise_multiplier,
      l2_norm_clip=args.l2_norm_clip, delta=args.delta,
      batch_size=args.batch_size, local_steps=args.local_steps,
      client_learning_rate=args.client_lr,
      server_learning_rate=args.server_lr, value_bits=args.value_bits,
      seed=args.seed)
  progress = not args.no_progress
  results = [simulation.run(config, progress=progress, label=(
      f'dp-sparse ↑{config.upload_density:g} ↓{config.download_density:g}'))]
  if args.baseline:
    results.append(simulation.run(config.dense(), progress=progress,
                                  label='dense (same privacy)'))
  paths = simulation.save(results, args.out)
  print()
  print(simulation.summary_table(results))
  print(f'\nwrote {paths["rounds.json"]}, {paths["summary.md"]}, '
        f'{paths["accuracy.png"]}')
  return 0


def _bench(args, rest) -> int:
  """Runs benchmarks/paper_table.py from the repository checkout.

  The baselines (DSSGD above all) are research reproductions, not package
  API, so they stay in benchmarks/; an editable install (`make venv`) finds
  them next to the package.
  """
  bench_dir = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'
  if not (bench_dir / 'paper_table.py').is_file():
    print(f'tf-dpsparse bench: error: needs the repository checkout with '
          f'benchmarks/ (looked in {bench_dir}); install with `pip install -e '
          '.` from a clone.', file=sys.stderr)
    return 2
  sys.path.insert(0, str(bench_dir))
  import paper_table  # pylint: disable=import-outside-toplevel
  return paper_table.main(rest, prog='tf-dpsparse bench')


def _add_run(sub) -> None:
  run = sub.add_parser(
      'run', help='the main job: DP-sparse federated training on real data',
      description='Federated training with DP uploads and top-k sparse '
      'updates in both directions; writes rounds.json, summary.md and '
      'accuracy.png to --out.')
  run.add_argument('--dataset', default='hapt',
                   choices=('hapt', 'digits', 'mnist', 'fashion_mnist'))
  run.add_argument('--rounds', type=int, default=90)
  run.add_argument('--clients-per-round', type=int, default=None,
                   help='devices per round (expected number under Poisson '
                   'sampling for --privacy client); default: all')
  run.add_argument('--num-clients', type=int, default=None,
                   help='image datasets: devices to partition into (default 100)')
  run.add_argument('--partition', choices=('iid', 'dirichlet'),
                   default='dirichlet', help='image datasets only')
  run.add_argument('--alpha', type=float, default=0.5,
                   help='Dirichlet label-skew concentration')
  run.add_argument('--upload-density', type=float, default=0.01)
  run.add_argument('--download-density', type=float, default=0.01)
  run.add_argument('--shared-fraction', type=float, default=0.0,
                   help='part of each upload spent on the coordinates of the '
                   'last broadcast, shared by all devices (no index bytes)')
  run.add_argument('--catch-up', choices=('union', 'topk'), default='union',
                   help='how a device that missed rounds catches up: union '
                   '(exact; cheap when devices take part in most rounds) or '
                   'topk (each device its own view, top-k of what it missed: '
                   'bounded bytes under sparse client sampling)')
  run.add_argument('--catch-up-density', type=float, default=None,
                   help='topk: fraction of parameters per catch-up '
                   '(default: --download-density)')
  run.add_argument('--privacy', choices=('example', 'client', 'none'),
                   default='example',
                   help='example: local DP-SGD on each device (untrusted '
                   'server); client: DP-FedAvg (trusted aggregator); none')
  run.add_argument('--target-epsilon', type=float, default=None,
                   help='calibrate the noise to spend this ε over --rounds '
                   '(default 8 unless --noise-multiplier is given)')
  run.add_argument('--noise-multiplier', type=float, default=None,
                   help='fixed noise instead of a target ε (not both)')
  run.add_argument('--l2-norm-clip', type=float, default=1.0)
  run.add_argument('--delta', type=float, default=1e-5)
  run.add_argument('--batch-size', type=int, default=16)
  run.add_argument('--local-steps', type=int, default=2,
                   help='local SGD / DP-SGD steps per device per round')
  run.add_argument('--client-lr', type=float, default=0.1)
  run.add_argument('--server-lr', type=float, default=1.0)
  run.add_argument('--value-bits', type=int, choices=(32, 16, 8), default=16,
                   help='wire precision of the values sent each way')
  run.add_argument('--seed', type=int, default=0,
                   help='data split, sampling and init (noise stays random)')
  run.add_argument('--baseline', action='store_true',
                   help='also run the same job at densities 1.0')
  run.add_argument('--out', default='runs/latest', help='output directory')
  run.add_argument('--no-progress', action='store_true')
  run.set_defaults(func=_run)


def _data(args) -> int:
  from tf_dpsparse import data
  try:
    fd = data.load(args.name, num_clients=args.num_clients,
                   partition=args.partition, alpha=args.alpha, seed=args.seed,
                   test_users=args.test_users)
  except data.MissingDataError as e:
    print(f'tf-dpsparse data: error: {e}', file=sys.stderr)
    return 2
  print(fd.summary())
  return 0


def _audit(args) -> int:
  from tf_dpsparse import audit_runs
  setups = [s for s in audit_runs.default_setups(
      quick=args.quick, large_epsilon=args.large_epsilon, seed=args.seed)
            if s.unit in args.units]
  command = ' '.join(['tf-dpsparse audit', *(['--quick'] if args.quick else
                                             []), '--out', args.out])
  results = audit_runs.run_audit(setups, args.out,
                                 progress=not args.no_progress,
                                 command=command)
  print(audit_runs.summary_table(results))
  print(f'\nwrote {args.out}/audit.json, audit.md, canaries.png')
  return 0


def _add_audit(sub) -> None:
  audit = sub.add_parser(
      'audit', help='empirical privacy audit: canaries, ε lower bounds, '
      'membership inference',
      description='Trains HAPT (example level) and MNIST (client level) at '
      'ε = 8, at a large ε and without DP, with canaries, and measures the '
      'leakage: the one-run ε lower bound (Steinke et al. 2023), the '
      'one-shot ε estimate (Andrew et al. 2024), membership inference. '
      'Writes audit.json, audit.md and canaries.png to --out.')
  audit.add_argument('--quick', action='store_true',
                     help='shorter runs, smaller MNIST population (minutes)')
  audit.add_argument('--units', nargs='+', choices=('example', 'client'),
                     default=['example', 'client'])
  audit.add_argument('--large-epsilon', type=float, default=100.0,
                     help='the large ε row that shows the audit\'s power')
  audit.add_argument('--seed', type=int, default=0)
  audit.add_argument('--out', default='runs/audit', help='output directory')
  audit.add_argument('--no-progress', action='store_true')
  audit.set_defaults(func=_audit)


def _add_schedule(parser) -> None:
  parser.add_argument('--sampling-rate', '-q', type=float, required=True,
                      help='Poisson sampling rate per step (batch/dataset, or '
                      'clients per round / total clients)')
  parser.add_argument('--steps', type=int, required=True,
                      help='number of steps (or rounds)')
  parser.add_argument('--delta', type=float, default=1e-5, help='δ (default 1e-5)')
  parser.add_argument('--accountant', choices=('rdp', 'pld'), default='rdp')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='tf-dpsparse',
      description='Differentially private, top-k sparse federated learning.')
  sub = parser.add_subparsers(dest='command', required=True)
  _add_run(sub)

  eps = sub.add_parser('epsilon', help='ε of a sampled-Gaussian schedule')
  eps.add_argument('--noise-multiplier', '-z', type=float, required=True)
  _add_schedule(eps)
  eps.set_defaults(func=_epsilon)

  cal = sub.add_parser('calibrate',
                       help='noise multiplier that spends a target ε')
  cal.add_argument('--target-epsilon', '-e', type=float, required=True)
  _add_schedule(cal)
  cal.set_defaults(func=_calibrate)

  data = sub.add_parser(
      'data', help='load a shipped data set and summarize its clients')
  data.add_argument('name', help="'digits', 'mnist', 'fashion_mnist' or 'hapt'")
  data.add_argument('--partition', choices=('natural', 'iid', 'dirichlet'),
                    help="default: 'natural' for hapt (its users), else 'iid'")
  data.add_argument('--num-clients', '-n', type=int,
                    help='clients of an iid or dirichlet partition')
  data.add_argument('--alpha', type=float, default=0.5,
                    help='Dirichlet concentration (default 0.5)')
  data.add_argument('--seed', type=int, default=0)
  data.add_argument('--test-users', type=int,
                    help='hapt: hold out this many users as the test set '
                    '(default: a per-user split)')
  data.set_defaults(func=_data)

  _add_audit(sub)
  sub.add_parser(  # flags parsed by benchmarks/paper_table.py; see main()
      'bench', add_help=False,
      help='the paper table: ours vs FedAvg, DP-FedAvg, 8-bit, DSSGD, '
      'upload-only (tf-dpsparse bench --help)')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if args.command == 'bench':  # its flags are paper_table's
    return _bench(args, rest)
  if rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  try:
    return args.func(args)
  except ValueError as e:
    print(f'tf-dpsparse {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
