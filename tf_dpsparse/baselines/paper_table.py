"""The paper's comparison on one data set: ours against FedAvg, DP-FedAvg, TFF's
8-bit compression, DSSGD and upload-only top-k, on the same data and schedule.

A research module (`tf_dpsparse.baselines`), not package API. Every method
runs through `simulation.run` (same seed, data split, client sampling,
rounds, local steps and evaluation); TFF's algorithms and DSSGD plug in as
process builders (`tf_dpsparse.baselines.tff_baselines`,
`tf_dpsparse.baselines.dssgd`). Private methods get the same target ε: ours
and DP-FedAvg are calibrated by `tds.privacy` and their ε is recomputed by
the accountant from the recorded events; DSSGD spends the same ε as pure
ε-DP by basic composition.

Set-ups: hapt (the main job, `tf-dpsparse run`'s defaults: 30 users,
example-level DP, the IoT case), mnist (1,000 Dirichlet(0.5) clients, 50 per
round, client-level DP, the large-scale case), digits (10 clients,
example-level; `--quick`, a few minutes). Whatever a set-up or a flag does
not name is `RunConfig`'s default, so the table cannot drift from the run.

Every method's config is made, and so checked, before the first one trains:
a bad flag fails in a second with one line and exit code 2, not after an
hour of training.

Writes to --out: table.md (the table, the targets met or not, the command
and date), rounds.json and rounds.csv (every round of every method),
accuracy.png (accuracy vs round and vs cumulative MB, log x), and each
method's checkpoints in checkpoint/<method>/ (`simulation.run`): the same
command again reruns no finished method and resumes an interrupted one after
its last completed round; --restart runs the chosen methods again.

Run: `tf-dpsparse bench --quick` or
`python -m tf_dpsparse.baselines.paper_table ...`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import os
import shlex
import sys
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

# Only the config here: it imports no TensorFlow, so `--help` and a refused
# flag answer at once; the methods' modules load when they run (`_builder`).
from tf_dpsparse import config as run_config
from tf_dpsparse.config import RunConfig

PROG = 'python -m tf_dpsparse.baselines.paper_table'
# Not JobOptions.out ('runs/latest'): a table must not overwrite the main
# job's results.
DEFAULT_OUT = 'runs/bench'
# Each set-up names only what it changes from RunConfig's defaults, and why.
SETUPS = {
    # The main job as `tf-dpsparse run` runs it: RunConfig's rounds, local
    # steps, clip, batch size and learning rates, at example level (each
    # method then sets its own densities).
    'hapt': dict(dataset='hapt', privacy='example'),
    # Client level clips whole model deltas, far smaller than HAPT's
    # per-example gradients: 0.3 was best for DP-FedAvg and ours among
    # {0.1, 0.3, 1} (README; tuning is not charged to ε, as is usual). 1,000
    # Dirichlet devices at 50 a round is the large-scale case, where devices
    # miss rounds; 100 rounds of 5 steps are the README table's schedule.
    'mnist': dict(dataset='mnist', rounds=100, local_steps=5, num_clients=1000,
                  partition='dirichlet', alpha=0.5, clients_per_round=50,
                  privacy='client', l2_norm_clip=0.3),
    # --quick: 10 IID devices of ~144 digits; fewer, longer rounds than the
    # main job's (15 of 5 steps) learn digits with every method in a few
    # minutes on 2 cores.
    'digits': dict(dataset='digits', rounds=15, local_steps=5, num_clients=10,
                   partition='iid', privacy='example'),
}
QUICK_SETUP = 'digits'
# The RunConfig fields the flags of the same name set (None: not given).
FLAG_FIELDS = ('rounds', 'target_epsilon', 'l2_norm_clip', 'value_bits',
               'seed')
# name: (density both ways, catch-up of devices that missed rounds, and its
# density for 'topk')
OURS = {'ours-2%': (0.02, 'union', None), 'ours-1%': (0.01, 'union', None),
        'ours-0.5%': (0.005, 'union', None),
        'ours-2%-topk': (0.02, 'topk', 0.02),
        'ours-2%-topk-3%': (0.02, 'topk', 0.03)}
# Training in a public random subspace (issue 18): name -> fraction of the
# weights. Its hyperparameters, and the dense baseline's with the server
# optimizer that beat server SGD, are each set-up's best of the subspace
# sweep (benchmarks/results/subspace_sweep.md; tuning is not charged to ε,
# as for every row): server Adam on z with lr ~ 0.1 sqrt(0.02 / s);
# client SGD lr 1 at client level, 3 at example level (10 at 1 %: the
# pulled-back per-example gradients are small).
SUBSPACE = {'ours-subspace-1%': 0.01, 'ours-subspace-2%': 0.02,
            'ours-subspace-3%': 0.03, 'ours-subspace-4%': 0.04}


def _adam(server_learning_rate: float, client_learning_rate: float) -> dict:
  return dict(server_optimizer='adam', client_learning_rate=client_learning_rate,
              server_learning_rate=server_learning_rate)


TUNED = {
    'mnist': {'dp-dense-adam': dict(server_optimizer='adam',
                                    server_learning_rate=0.01),
              'ours-subspace-1%': _adam(0.2, 1.0),
              'ours-subspace-2%': _adam(0.1, 1.0),
              'ours-subspace-3%': _adam(0.08, 1.0),
              'ours-subspace-4%': _adam(0.05, 1.0)},
    'hapt': {'dp-dense-adam': _adam(0.03, 0.3),
             'ours-subspace-1%': dict(client_learning_rate=10.0),  # server SGD
             'ours-subspace-2%': _adam(0.1, 3.0),
             'ours-subspace-3%': _adam(0.1, 3.0),
             'ours-subspace-4%': _adam(0.1, 3.0)},
}
TUNED['digits'] = TUNED['hapt']  # --quick: example level, as HAPT
METHODS = ('fedavg', 'dp-dense', 'dp-dense-adam', 'compress', 'compress-dp',
           'dssgd', 'upload-only', *OURS, *SUBSPACE)
# The methods that send their values at --value-bits (dense ones: float32).
SPARSE_VALUES = ('dssgd', 'upload-only', *OURS, *SUBSPACE)
NOTES = {
    'fedavg': "TFF build_unweighted_fed_avg, dense, non-private",
    'dp-dense': 'same privacy, dense both ways (example level: ours at '
                'densities 1.0; client level: TFF gaussian_fixed)',
    'compress': 'TFF compression_aggregator: 8-bit, tensors > 20,000 values '
                'only; non-private',
    'compress-dp': 'gaussian_fixed with the 8-bit quantizer as record '
                   'aggregator; ε nominal (quantization can exceed the clip)',
    'dssgd': 'Shokri & Shmatikov 2015, θu = θd = 1 %, values counted at '
             'the same bits as ours; pure ε-DP (δ = 0) by basic composition, '
             'per-coordinate bound γ',
    'upload-only': 'ours, top-1 % upload with error feedback, dense download',
    'dp-dense-adam': 'dp-dense with server Adam (its sweep-tuned learning '
                     'rates): the strongest dense baseline',
    **{name: f'ours in a public random subspace of {100 * fraction:g} % of '
             'the weights (count sketch): all of z each way, exact catch-up; '
             'sweep-tuned server Adam / client lr'
       for name, fraction in SUBSPACE.items()},
    **{name: f'ours, {100 * density:g} % both ways' + (
        '' if catch_up == 'union' else
        f', bounded catch-up: each device its own view, the top '
        f'{100 * catch_up_density:g} % of what it missed')
       for name, (density, catch_up, catch_up_density) in OURS.items()},
}


class Method(NamedTuple):
  """One row of the table: its config (made, so checked) and its builder's
  key in `_builder` (a key, not the builder: importing it imports TFF)."""
  name: str
  config: RunConfig
  builder: str


def _builder(key: str):
  """The process builder of `key`, imported only when its method runs."""
  # pylint: disable=import-outside-toplevel
  if key == 'dssgd':
    return _build_dssgd
  if key in ('tff', 'tff-8bit'):
    from tf_dpsparse.baselines import tff_baselines
    return functools.partial(tff_baselines.build_tff_fed_avg,
                             quantize=key == 'tff-8bit')
  from tf_dpsparse.federated import build_dp_sparse_fed_avg
  return build_dp_sparse_fed_avg


def _build_dssgd(*args, **kwargs):
  """DSSGD, marked as not resumable mid-run: its participants' local models
  and its RNG live in the process object, not in the state a checkpoint
  saves, so an interrupted DSSGD row starts again from round 1 (a finished
  one is still not rerun)."""
  from tf_dpsparse.baselines import dssgd  # pylint: disable=import-outside-toplevel
  process = dssgd.build_dssgd(*args, **kwargs)
  process.resumable = False
  return process


def _method(name: str, base: RunConfig) -> Union[Tuple[RunConfig, str], str]:
  """(config, builder key) of one method, or why it does not apply here.

  Each config is a `dataclasses.replace` of `base`, which validates it.
  """
  replace = functools.partial(dataclasses.replace, base)
  non_private = replace(privacy=None, target_epsilon=None,
                        noise_multiplier=None)
  example = base.privacy == 'example'
  if name == 'fedavg':
    return non_private, 'tff'
  if name in ('dp-dense', 'dp-dense-adam'):
    tuned = replace(**TUNED[base.dataset].get(name, {}))
    return (tuned.dense(), 'ours') if example else (tuned, 'tff')
  if name in SUBSPACE:
    return replace(subspace=SUBSPACE[name],
                   **TUNED[base.dataset][name]), 'ours'
  if name == 'compress':
    return non_private, 'tff-8bit'
  if name == 'compress-dp':
    if example:
      return ('TFF has no example-level DP client for its quantizer to '
              'compose with')
    return base, 'tff-8bit'
  if name == 'dssgd':
    return replace(upload_density=0.01, download_density=0.01), 'dssgd'
  if name == 'upload-only':
    return replace(upload_density=0.01, download_density=1.0), 'ours'
  density, catch_up, catch_up_density = OURS[name]
  if catch_up == 'topk' and base.clients_per_round is None:
    return ('every device takes part in every round, so no device has a '
            'round to catch up on: the same run as union catch-up')
  return (replace(upload_density=density, download_density=density,
                  catch_up=catch_up, catch_up_density=catch_up_density),
          'ours')


def base_config(args: argparse.Namespace) -> RunConfig:
  """The set-up's config with the flags given; RunConfig fills the rest
  (and refuses a bad value, e.g. --rounds 0 or --target-epsilon -1)."""
  if args.quick and args.dataset not in (None, QUICK_SETUP):
    raise ValueError(f'--quick is the {QUICK_SETUP} set-up: drop --quick or '
                     f'--dataset {args.dataset}.')
  setup = SETUPS[QUICK_SETUP if args.quick else args.dataset or
                 RunConfig.dataset]
  given = {name: getattr(args, name) for name in FLAG_FIELDS
           if getattr(args, name) is not None}
  try:
    return RunConfig(**{**setup, **given})
  except ValueError as e:  # name the flag, where a flag set the field
    name = str(e).split(' ', 1)[0]
    if name not in given:
      raise
    raise ValueError(f'--{name.replace("_", "-")}{str(e)[len(name):]}') from e


def _check_flags_used(args: argparse.Namespace, methods: List[Method]) -> None:
  """Refuses a flag no chosen method reads: it would be recorded in the
  command while changing nothing."""
  private = [m.name for m in methods if m.config.privacy is not None]
  readers = {
      'target_epsilon': private,
      'l2_norm_clip': [name for name in private if name != 'dssgd'],
      'value_bits': [m.name for m in methods if m.name in SPARSE_VALUES],
  }
  for name, used_by in readers.items():
    if getattr(args, name) is not None and not used_by:
      raise ValueError(f'--{name.replace("_", "-")} would be ignored: no '
                       'method of --methods uses it.')


def plan(args: argparse.Namespace) -> Tuple[List[Method], List[str]]:
  """Every chosen method's config, made and checked before any trains, and
  a line for each method that does not apply to the set-up.

  Raises ValueError (one line) for anything the flags get wrong, so that a
  bad value cannot surface after the first methods have run.
  """
  duplicates = sorted({m for m in args.methods if args.methods.count(m) > 1})
  if duplicates:
    raise ValueError(f'--methods lists {", ".join(duplicates)} more than once.')
  run_config.JobOptions(out=args.out)  # refuses an --out it cannot write
  base = base_config(args)
  methods, skipped = [], []
  for name in args.methods:
    method = _method(name, base)
    if isinstance(method, str):
      skipped.append(f'{name}: {method}')
    else:
      methods.append(Method(name, *method))
  if not methods:
    raise ValueError(f'no method of --methods applies to the {base.dataset} '
                     'set-up (' + '; '.join(skipped) + ').')
  _check_flags_used(args, methods)
  return methods, skipped


def prepare_checkpoints(methods: Sequence[Method], out: str,
                        restart: bool) -> None:
  """Before any method trains: deletes every method's checkpoint in `out`
  (`restart`), or refuses one left by another config of that method (a
  ValueError naming --restart), so neither comes after a method's training.
  """
  from tf_dpsparse.federated import checkpoint  # pylint: disable=import-outside-toplevel
  for method in methods:
    if restart:
      checkpoint.discard(out, method.name)
    else:
      checkpoint.check(out, method.name, method.config)


def run_methods(methods: Sequence[Method], progress: bool = True,
                out: Optional[str] = None) -> list:
  """Runs each planned method through `simulation.run`, in order; with
  `out`, each checkpoints in its own directory there and a finished one
  returns its stored result (`simulation.run`)."""
  from tf_dpsparse.federated import simulation  # pylint: disable=import-outside-toplevel
  results = []
  for method in methods:
    result = simulation.run(method.config, progress=progress,
                            label=method.name, builder=_builder(method.builder),
                            out=out)
    if method.name == 'dssgd':
      result['summary']['delta'] = 0.0  # pure ε-DP
    results.append(result)
  return results


def _total_mb(result) -> float:
  return result['summary']['mb_up'] + result['summary']['mb_down']


def verdicts(results) -> list:
  """The issue's targets, each line saying met or NOT met."""
  by = {r['label']: r for r in results}
  acc = {k: 100 * r['summary']['final_accuracy'] for k, r in by.items()}
  lines = []
  for ours in OURS:
    if ours not in by:
      continue
    if 'fedavg' in by:
      pct = 100 * _total_mb(by[ours]) / _total_mb(by['fedavg'])
      lines.append(f'{ours}: {pct:.2f} % of dense FedAvg bytes (target ≤ 2 %, '
                   f'stretch ≤ 1 %): {"met" if pct <= 2 else "NOT met"}')
    if 'dp-dense' in by:
      gap = acc['dp-dense'] - acc[ours]
      lines.append(f'{ours}: {gap:+.2f} points below dense DP (target ≤ 2): '
                   f'{"met" if gap <= 2 else "NOT met"}')
      device_gap = 100 * (by['dp-dense']['summary']['final_device_accuracy'] -
                          by[ours]['summary']['final_device_accuracy'])
      lines.append(f'{ours}: the model devices hold is '
                   f'{device_gap:+.2f} points below dense DP\'s')
    if 'dssgd' in by:
      lead = acc[ours] - acc['dssgd']
      lines.append(f'{ours}: {lead:+.2f} points over DSSGD at the same ε and '
                   f'bytes (target ≥ +10 on one data set): '
                   f'{"met" if lead >= 10 else "NOT met"} here')
  return lines + subspace_verdicts(by, acc)


def subspace_verdicts(by: dict, acc: dict) -> list:
  """Issue 18's targets for each subspace row: total bytes (every catch-up
  included) ≤ 2 % of dense FedAvg's, and accuracy ≥ the best dense DP row
  (server SGD or Adam, whichever ended higher) − 1 point."""
  dense = [name for name in ('dp-dense', 'dp-dense-adam') if name in by]
  best = max(dense, key=acc.get) if dense else None
  lines = []
  for name in (n for n in SUBSPACE if n in by):
    if 'fedavg' in by:
      pct = 100 * _total_mb(by[name]) / _total_mb(by['fedavg'])
      lines.append(f'{name}: {pct:.2f} % of dense FedAvg bytes, catch-ups '
                   f'included (target ≤ 2 %): '
                   f'{"met" if pct <= 2 else "NOT met"}')
    if best:
      gap = acc[name] - acc[best]
      verdict = ('met, above it (stretch)' if gap > 0 else
                 'met' if gap >= -1 else 'NOT met')
      lines.append(f'{name}: {gap:+.2f} points against the best dense DP row '
                   f'({best}; target ≥ −1): {verdict}')
  return lines


def write_csv(results, path: str) -> None:
  """Every round of every method, one row each (a method none of whose
  rounds drew a device has no row)."""
  records = [record for r in results for record in r['rounds']]
  fields = ['method', *(records[0] if records else ())]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fields)
    writer.writeheader()
    for r in results:
      for record in r['rounds']:
        writer.writerow({'method': r['label'], **record})


def report(results, command: str) -> str:
  """table.md: the command and date (to rerun it), the table, the targets
  met or not, and what each row is."""
  from tf_dpsparse.federated import simulation  # pylint: disable=import-outside-toplevel
  date = datetime.date.today().isoformat()
  notes = [f'- {r["label"]}: {NOTES[r["label"]]}' for r in results]
  return '\n'.join([
      f'`{command}` ({date})', '', simulation.summary_table(results), '',
      *[f'- {line}' for line in verdicts(results)], '', 'Methods:', *notes,
      '- % of dense: bytes against dense float32 exchange with the same '
      'clients, both ways.'])


def write_outputs(results, out: str, command: str) -> None:
  """Writes table.md, rounds.csv, rounds.json and accuracy.png to `out` and
  prints the table."""
  from tf_dpsparse.federated import simulation  # pylint: disable=import-outside-toplevel
  paths = simulation.save(results, out)
  write_csv(results, os.path.join(out, 'rounds.csv'))
  text = report(results, command)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(text + '\n')
  print('\n' + text)
  print(f'\nwrote {out}/table.md, rounds.csv, {paths["rounds.json"]}, '
        f'{paths["accuracy.png"]}')


def _per_setup(name: str) -> str:
  """`name`'s default in each set-up, for --help: the set-up's own value or
  RunConfig's."""
  return ', '.join(f'{setup} {values.get(name, getattr(RunConfig, name)):g}'
                   for setup, values in SETUPS.items())


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
  """The bench's flags. Their defaults are None ("not given"): the set-up
  and RunConfig supply the values, and --help says which."""
  fields = {f.name: f for f in dataclasses.fields(RunConfig)}
  parser = argparse.ArgumentParser(prog=prog or PROG,
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', choices=tuple(SETUPS), help=(
      f'the set-up (default: RunConfig\'s data set, {RunConfig.dataset})'))
  parser.add_argument('--quick', action='store_true', help=(
      f'the {QUICK_SETUP} set-up ({SETUPS[QUICK_SETUP]["rounds"]} rounds): a '
      'few minutes'))
  parser.add_argument('--rounds', type=int, help=(
      f'federated rounds (default: the set-up\'s: {_per_setup("rounds")})'))
  parser.add_argument('--methods', nargs='+', choices=METHODS,
                      default=list(METHODS), metavar='METHOD', help=(
                          'rows of the table, in order, of: ' +
                          ', '.join(METHODS).replace('%', '%%') +
                          ' (default: all)'))
  parser.add_argument('--target-epsilon', type=float, help=(
      'ε every private method spends over the run (default: RunConfig\'s, '
      f'{run_config.DEFAULT_TARGET_EPSILON:g})'))
  parser.add_argument('--l2-norm-clip', type=float, help=(
      'clip of ours and DP-FedAvg (default: the set-up\'s: '
      f'{_per_setup("l2_norm_clip")})'))
  parser.add_argument('--value-bits', type=int,
                      choices=fields['value_bits'].metadata['choices'], help=(
                          'wire precision of the values ours, upload-only and '
                          'DSSGD send; dense baselines stay float32 (default: '
                          f'RunConfig\'s, {RunConfig.value_bits})'))
  parser.add_argument('--seed', type=int, help=(
      'data split, client sampling and initial model of every method; DP '
      f'noise comes from OS entropy (default: RunConfig\'s, {RunConfig.seed})'))
  parser.add_argument('--out', default=DEFAULT_OUT, help=(
      f'output directory (default: {DEFAULT_OUT})'))
  parser.add_argument('--no-progress', action='store_true',
                      help='no progress bars')
  parser.add_argument('--restart', action='store_true', help=(
      'start over: delete the chosen methods\' checkpoints in --out (by '
      'default a finished method is not rerun and an interrupted one '
      'resumes after its last completed round)'))
  return parser


def main(argv: Optional[Sequence[str]] = None,
         prog: Optional[str] = None) -> int:
  """Plans every method, runs them and writes the table.

  A flag the plan refuses, or a checkpoint in --out of another config,
  ends here with one line and exit code 2, before any training (argparse's
  own errors exit 2 too). `prog` names the command
  in errors, --help and table.md (`tf-dpsparse bench` from the CLI).
  """
  args = build_parser(prog).parse_args(argv)
  try:
    methods, skipped = plan(args)
    prepare_checkpoints(methods, args.out, args.restart)
  except ValueError as e:
    print(f'{prog or PROG}: error: {e}', file=sys.stderr)
    return 2
  for line in skipped:
    print(f'skipping {line}')
  results = run_methods(methods, progress=not args.no_progress, out=args.out)
  argv = sys.argv[1:] if argv is None else argv
  write_outputs(results, args.out,
                ' '.join([prog or PROG, *map(shlex.quote, argv)]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
