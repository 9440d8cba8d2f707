"""The `tf-dpsparse` command.

`run`'s flags are generated from `tf_dpsparse.config.RunConfig` and
`JobOptions`, so the config is the one place their defaults, help and valid
ranges live. This module imports only that config at load time (each command
imports what it needs when it runs), so `--help` and `--version` answer
without importing TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Optional, Sequence

import tf_dpsparse
from tf_dpsparse import config as run_config


def _epsilon(args) -> int:
  from tf_dpsparse import privacy
  eps = privacy.compute_epsilon(args.noise_multiplier, args.sampling_rate,
                                args.steps, args.delta, args.accountant)
  print(f'ε = {eps:.4f} at δ = {args.delta:g} ({args.accountant}; σ = '
        f'{args.noise_multiplier}, q = {args.sampling_rate}, '
        f'steps = {args.steps})')
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
  """Trains as `args` say. Only the flags given reach `RunConfig`, which
  holds every default and refuses a bad or ignored flag before any work."""
  given = vars(args)
  config = run_config.RunConfig.from_flags(
      {f.name: given[f.name] for f in _fields(run_config.RunConfig)
       if f.name in given})
  job = run_config.JobOptions(**{f.name: given[f.name] for f in _fields(
      run_config.JobOptions) if f.name in given})
  return _train(config, job)


def _train(config: run_config.RunConfig, job: run_config.JobOptions) -> int:
  """Runs `config` (and its dense-DP baseline unless `job` says not to),
  saves the results and prints the table.

  Each run checkpoints every round under `job.out` and resumes from there
  when the same command runs again. Every run's checkpoint is checked (a
  different config there is refused) or, with `job.restart`, deleted before
  the first trains, so neither a refusal nor a restart comes after an hour
  of training, and a restarted job never mixes in an older baseline.
  """
  from tf_dpsparse.federated import checkpoint  # imports TensorFlow
  from tf_dpsparse.federated import simulation
  runs = [(config, f'dp-subspace {config.subspace:g}' if config.subspace
             else f'dp-sparse ↑{config.upload_density:g} '
             f'↓{config.download_density:g}')]
  if job.baseline:
    runs.append((config.dense(), 'dense (same privacy)'))
  for planned, label in runs:
    if job.restart:
      checkpoint.discard(job.out, label)
    else:
      checkpoint.check(job.out, label, planned)
  results = [simulation.run(c, progress=job.progress, label=label,
                            out=job.out) for c, label in runs]
  paths = simulation.save(results, job.out)
  print()
  print(simulation.summary_table(results))
  print(f'\nwrote {paths["rounds.json"]}, {paths["summary.md"]}, '
        f'{paths["accuracy.png"]}')
  return 0


def _bench(args, rest) -> int:
  """Runs the paper table, `tf_dpsparse.baselines.paper_table`: a research
  module shipped in the package, so a plain `pip install .` runs it."""
  del args
  from tf_dpsparse.baselines import paper_table  # pylint: disable=import-outside-toplevel
  return paper_table.main(rest, prog='tf-dpsparse bench')


def _fields(cls):
  return dataclasses.fields(cls)


def _cli_choice(choice) -> str:
  return 'none' if choice is None else str(choice)


def _cli_value(field: dataclasses.Field) -> Callable[[str], object]:
  """Converts a flag's text to the field's value ('none' is `None` where
  `None` is a choice)."""
  kind = run_config.field_type(field)

  def convert(text: str):
    if text == 'none' and None in field.metadata.get('choices', ()):
      return None
    return kind(text)

  convert.__name__ = kind.__name__  # argparse names the type in errors
  return convert


def _add_field(group, field: dataclasses.Field) -> None:
  """One flag from a config field: `--name-with-dashes` (and any aliases),
  its type, choices and help with the field's default. The parser's default
  is SUPPRESS, so the namespace holds only the flags given and the config
  supplies the rest: its defaults are the only ones."""
  meta, dashed = field.metadata, field.name.replace('_', '-')
  text = meta['help']
  if run_config.field_type(field) is bool:
    flag = f'--no-{dashed}' if field.default else f'--{dashed}'
    group.add_argument(flag, dest=field.name, default=argparse.SUPPRESS,
                       action='store_false' if field.default else
                       'store_true', help=(text + (
                           f' (on by default; {flag} turns it off)' if
                           field.default else ' (off by default)')).replace(
                               '%', '%%'))
    return
  default = meta.get('default_text', _cli_choice(field.default))
  choices = meta.get('choices')
  group.add_argument(
      f'--{dashed}', *meta.get('aliases', ()), dest=field.name,
      default=argparse.SUPPRESS, type=_cli_value(field), choices=choices,
      metavar=meta.get('metavar', run_config.field_type(
          field).__name__.upper()) if choices is None else
      '{' + ','.join(map(_cli_choice, choices)) + '}',
      help=f'{text} (default: {default})'.replace('%', '%%'))


def _add_run(sub) -> None:
  """`run`'s flags, generated from `RunConfig` and `JobOptions` fields."""
  run = sub.add_parser(
      'run', help='the main job: DP-sparse federated training on real data '
      'beside its dense-DP baseline',
      formatter_class=_Formatter,
      description='Federated training with DP uploads and top-k sparse '
      'updates in both directions, and the same job dense beside it; writes '
      'rounds.json (with the resolved config), summary.md and accuracy.png '
      'to --out. Every default below is RunConfig\'s '
      '(tf_dpsparse.config).')
  group = run.add_argument_group('run configuration (saved with the results)')
  for field in _fields(run_config.RunConfig):
    _add_field(group, field)
  group = run.add_argument_group('job options')
  for field in _fields(run_config.JobOptions):
    _add_field(group, field)
  run.add_argument('--baseline', action=_Removed, help=argparse.SUPPRESS,
                   dest='removed', default=argparse.SUPPRESS, nargs=0,
                   const='the dense-DP baseline runs by default now '
                   '(--no-baseline skips it)')
  run.set_defaults(func=_run)


class _Removed(argparse.Action):
  """A removed flag: refused with what replaced it (`const`), not as an
  unknown argument."""

  def __call__(self, parser, namespace, values, option_string=None):
    parser.error(f'{option_string} was removed: {self.const}.')


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
      'audit', formatter_class=_Formatter,
      help='empirical privacy audit: canaries, ε lower bounds, membership '
      'inference',
      description='Trains HAPT (example level) and MNIST (client level) at '
      'ε = 8, at a large ε and without DP, with canaries, and measures the '
      'leakage: the one-run ε lower bound (Steinke et al. 2023), the '
      'one-shot ε estimate (Andrew et al. 2024), membership inference. '
      'Writes audit.json, audit.md and canaries.png to --out.')
  audit.add_argument('--quick', action='store_true',
                     help='shorter runs, smaller MNIST population (minutes)')
  audit.add_argument('--units', nargs='+', choices=('example', 'client'),
                     default=['example', 'client'], help='units of privacy')
  audit.add_argument('--large-epsilon', type=float, default=100.0,
                     help='the large ε row that shows the audit\'s power')
  audit.add_argument('--seed', type=int, default=0,
                     help='data split, sampling and initial models')
  audit.add_argument('--out', default='runs/audit', help='output directory')
  audit.add_argument('--no-progress', action='store_true',
                     help='no progress bars')
  audit.set_defaults(func=_audit)


def _add_schedule(parser) -> None:
  parser.add_argument('--sampling-rate', '-q', type=float, required=True,
                      help='Poisson sampling rate per step (batch/dataset, or '
                      'clients per round / total clients)')
  parser.add_argument('--steps', type=int, required=True,
                      help='number of steps (or rounds)')
  parser.add_argument('--delta', type=float, default=1e-5, help='δ')
  parser.add_argument('--accountant', choices=('rdp', 'pld'), default='rdp',
                      help='dp_accounting accountant')


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each flag's default, except `None` (its help says what it means)."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def _run_defaults() -> str:
  """`run`'s defaults in one line, from `RunConfig` (for `tf-dpsparse -h`)."""
  fields = [*_fields(run_config.RunConfig), *_fields(run_config.JobOptions)]
  return 'run defaults: ' + '; '.join(
      f'--{f.name.replace("_", "-")} '
      f'{f.metadata.get("default_text", _cli_choice(f.default))}'
      for f in fields if not isinstance(f.default, bool)) + (
          '; the dense-DP baseline runs beside it (--no-baseline skips it).')


def _add_data(sub) -> None:
  data = sub.add_parser(
      'data', help='load a shipped data set and summarize its clients',
      formatter_class=_Formatter)
  data.add_argument('name', choices=run_config.DATASETS, help='data set')
  data.add_argument('--partition', choices=run_config.PARTITIONS,
                    help="default: 'natural' for hapt (its users), else 'iid'")
  data.add_argument('--num-clients', '-n', type=int,
                    help='clients of an iid or dirichlet partition (default: '
                    + ', '.join(f'{name} {n}' for name, n in
                                run_config.DEFAULT_NUM_CLIENTS.items()) + ')')
  data.add_argument('--alpha', type=float, default=0.5,
                    help='Dirichlet concentration')
  data.add_argument('--seed', type=int, default=0, help='split seed')
  data.add_argument('--test-users', type=int,
                    help='hapt: hold out this many users as the test set '
                    '(default: a per-user split)')
  data.set_defaults(func=_data)


def _worker_launcher():
  """`tf_dpsparse/federated/_workers.py` alone, loaded from its file:
  importing it as `tf_dpsparse.federated._workers` would first run
  `tf_dpsparse.federated`, i.e. import TFF (9 s, 580 MB here) into a
  process that only waits on TFF's C++ binary. It imports only the
  standard library."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(tf_dpsparse.__file__), 'federated',
                      '_workers.py')
  spec = importlib.util.spec_from_file_location('_tf_dpsparse_workers', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _worker(args) -> int:
  """Serves TFF's executor service on `--port` until SIGINT/SIGTERM."""
  return _worker_launcher().serve(
      args.port,
      max_concurrent_computation_calls=args.max_concurrent_computation_calls,
      announce=lambda line: print(line, flush=True))


def _add_worker(sub) -> None:
  worker = sub.add_parser(
      'worker', formatter_class=_Formatter,
      help='serve one TFF executor worker for `run --workers` elsewhere',
      description='Starts TFF\'s C++ executor service (worker_binary) on '
      '--port, listening on every interface, and stops it on SIGINT or '
      'SIGTERM. Drivers reach it with `tf-dpsparse run --workers '
      'host:port,...` or `tds.federated.use_workers([...])`; the port must '
      'be reachable from the driver, and the worker runs the TFF and '
      'TensorFlow versions the driver runs.')
  worker.add_argument('--port', type=int, required=True,
                      help='TCP port to serve on')
  worker.add_argument('--max-concurrent-computation-calls', type=int,
                      default=-1, help='TFF\'s limit on concurrent calls '
                      '(<= 0: none)')
  worker.set_defaults(func=_worker)


def build_parser() -> argparse.ArgumentParser:
  """The `tf-dpsparse` parser; building it imports nothing heavy."""
  parser = argparse.ArgumentParser(
      prog='tf-dpsparse', formatter_class=_Formatter,
      description='Differentially private, top-k sparse federated learning. '
      '`tf-dpsparse <command> --help` lists a command\'s flags and defaults.',
      epilog=_run_defaults().replace('%', '%%'))
  parser.add_argument('--version', action='version',
                      version=f'tf-dpsparse {tf_dpsparse.__version__}')
  sub = parser.add_subparsers(dest='command', required=True)
  _add_run(sub)

  eps = sub.add_parser('epsilon', help='ε of a sampled-Gaussian schedule',
                       formatter_class=_Formatter)
  eps.add_argument('--noise-multiplier', '-z', type=float, required=True)
  _add_schedule(eps)
  eps.set_defaults(func=_epsilon)

  cal = sub.add_parser('calibrate', formatter_class=_Formatter,
                       help='noise multiplier that spends a target ε')
  cal.add_argument('--target-epsilon', '-e', type=float, required=True)
  _add_schedule(cal)
  cal.set_defaults(func=_calibrate)

  _add_data(sub)
  _add_audit(sub)
  _add_worker(sub)
  sub.add_parser(  # flags parsed by tf_dpsparse.baselines.paper_table; see main()
      'bench', add_help=False,
      help='the paper table: ours vs FedAvg, DP-FedAvg, 8-bit, DSSGD, '
      'upload-only (tf-dpsparse bench --help)')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs a command; a ValueError (a refused request) or a refused privacy
  budget becomes one line on stderr and exit code 2, as argparse's own
  errors do."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if args.command == 'bench':  # its flags are paper_table's
    return _bench(args, rest)
  if rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  # After parsing, so --help never loads dp_accounting.
  from tf_dpsparse.privacy.ledger import BudgetExhaustedError  # pylint: disable=import-outside-toplevel
  try:
    return args.func(args)
  except (ValueError, BudgetExhaustedError) as e:
    print(f'tf-dpsparse {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
