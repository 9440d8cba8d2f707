"""DP-sparse FedAvg against the same job at densities 1.0, in one run.

Measures the issue's targets on the main job (`tf-dpsparse run`'s defaults:
HAPT, 30 users, example-level DP): total bytes (up + down) as a % of dense,
final-accuracy gap to the dense run at the same ε, and the round-time ratio.
Writes benchmarks/results/fed_bench.{json,md,png}.

Round time (issue 17): seconds per round of the main job on the old path
(as when issue 17 was filed: per-example gradients from the jacobian of the
loss vector, the local steps and the diagnostic loss as `Dataset.reduce`s),
with only the jacobian rows swapped into today's client work, with the
vectorized rows (today's client work before ghost norms), on today's path
(ghost norms where they apply), and without privacy, rounds interleaved in
one run; the medians and their ratios go to fed_bench.json's
`round_seconds` (issue 17's target: the old path's over today's >= 2;
`rows_over_current` is what ghost norms gained). benchmarks/round_profile.py
breaks a round down.

Every flag left out is `RunConfig`'s default (the flags only override it),
so this benchmark measures what `tf-dpsparse run` runs and cannot drift from
it; a bad value is refused by `RunConfig` before any training.

Run: `python benchmarks/fed_bench.py` (`--rounds`, `--dataset`,
`--privacy`, `--density`, ... as in `tf-dpsparse run`; `--quick` for a few
rounds of everything, about a minute on 2 cores; the full bench takes
about 4 minutes).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

from tf_dpsparse import config as run_config

RunConfig = run_config.RunConfig
QUICK_ROUNDS = 3
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def jacobian_rows(predict, loss_fn, variables, x, y):
  """The old path's per-example gradients (before issue 17): the jacobian
  of the batch's loss vector, one backward pass of the whole batch per
  example; rows [n, size] as `core.per_example_gradients` returns them.
  `predict(x)` is the model's training-mode output."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with tf.GradientTape() as tape:
    losses = loss_fn(y, predict(x))
  jacobians = tape.jacobian(losses, variables, experimental_use_pfor=True)
  return tf.concat([tf.reshape(j, [tf.shape(losses)[0], -1])
                    for j in jacobians], 1)


def old_client_work() -> dict:
  """The client work's pieces as they were when issue 17 was filed, by
  `client_work` attribute: jacobian rows (`jacobian_rows`), the local steps
  as a `Dataset.reduce`, the diagnostic loss as another. Patched in
  (`patched`) to time the old path's round beside the current one; the
  same steps, seeds and numbers, only slower."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def per_example_rows(model, trainable, loss_fn):
    return lambda x, y: jacobian_rows(
        lambda x: model.predict_on_batch(x, training=True), loss_fn,
        trainable, x, y)

  def train(optimizer, trainable, steps, gradients):
    @tf.autograph.experimental.do_not_convert
    def reduce_fn(loop_state, element):
      count, opt_state = loop_state
      opt_state, updated = optimizer.next(opt_state, trainable,
                                          tuple(gradients(element)))
      tf.nest.map_structure(lambda v, t: v.assign(t), trainable, updated)
      return count + 1, opt_state

    specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
    return steps.reduce((tf.constant(0, tf.int64),
                         optimizer.initialize(specs)), reduce_fn)[0]

  def training_loss(model, x_all, y_all):
    def add(total, batch):
      output = model.forward_pass(batch, training=False)
      n = tf.cast(output.num_examples, tf.float32)
      return total[0] + output.loss * n, total[1] + n

    loss_sum, count = tf.data.Dataset.from_tensors((x_all, y_all)).reduce(
        (0.0, 0.0), add)
    return loss_sum / tf.maximum(count, 1.0)

  return dict(_per_example_rows=per_example_rows, _train=train,
              _training_loss=training_loss, _ghost_model=no_ghost)


def no_ghost(model, params):  # pylint: disable=unused-argument
  """`client_work._ghost_model` that always takes the rows."""
  return None


@contextlib.contextmanager
def patched(module, **attributes):
  """`module`'s attributes replaced while a process is built (its TFF
  computations are traced then), restored after; a name the module lacks
  raises, so a renamed piece cannot be silently left unpatched."""
  saved = {name: getattr(module, name) for name in attributes}
  try:
    for name, value in attributes.items():
      setattr(module, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(module, name, value)


OLD, JACOBIAN, ROWS, CURRENT, PLAIN = (
    'old path (jacobian rows, Dataset.reduce loops)',
    'jacobian rows in the current client work',
    'vectorized rows in the current client work (no ghost norms)',
    'current path', 'plain FedAvg (same job, privacy none)')


def round_processes(config: RunConfig, simulation, fed) -> dict:
  """{variant: (config, process)} of the job `config` describes: the old
  path, the jacobian rows alone in today's client work, the vectorized rows
  there (ghost norms off), today's, and (for a private job) the same job
  without privacy, which takes other data (`simulation.device_dataset`:
  `local_steps` batches, not all examples). The old path's variants exist
  for example-level DP only, the one privacy they differ in."""
  from tf_dpsparse.federated import client_work  # pylint: disable=import-outside-toplevel
  _, model_fn = simulation.model_fns(fed, config.seed)

  def build(config):
    return config, simulation.build_process(
        config, model_fn, total_clients=len(fed.client_ids),
        min_client_examples=min(fed.client_sizes.values()))

  processes = {}
  if config.privacy == 'example':
    old = old_client_work()
    with patched(client_work, **old):
      processes[OLD] = build(config)
    with patched(client_work, _per_example_rows=old['_per_example_rows'],
                 _ghost_model=no_ghost):
      processes[JACOBIAN] = build(config)
    with patched(client_work, _ghost_model=no_ghost):
      processes[ROWS] = build(config)
  processes[CURRENT] = build(config)
  if config.privacy is not None:
    processes[PLAIN] = build(dataclasses.replace(
        config, privacy=None, target_epsilon=None, noise_multiplier=None,
        noise_seed=None))
  return processes


def time_rounds(config: RunConfig, rounds: int) -> dict:
  """{variant: [seconds]}: `rounds` rounds of each `round_processes`
  variant after one warm-up (TFF loads its computations), interleaved:
  round r of every variant, on the same devices, before round r + 1 of
  any, so a busy machine slows them alike. A round's time is
  `process.next`'s wall time, what `tf-dpsparse run` records."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import client_states  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import simulation  # pylint: disable=import-outside-toplevel
  # The budget (and the noise calibrated to it) covers the timed rounds.
  config = dataclasses.replace(config, rounds=rounds + 1)
  fed = simulation.load_data(config)
  ids = list(fed.client_ids)
  runs = {name: dict(config=variant_config, process=process,
                     state=process.initialize(), seconds=[],
                     store=client_states.ClientStateStore(len(ids),
                                                          process.size))
          for name, (variant_config, process) in round_processes(
              config, simulation, fed).items()}
  sampling = np.random.default_rng(config.seed)
  for r in range(rounds + 1):
    sampled = simulation._sample(  # pylint: disable=protected-access
        config, ids, config.clients_per_round or len(ids), sampling)
    for name, run in runs.items():
      rng = np.random.default_rng([config.seed, r])  # the same data for all
      data = [simulation.device_dataset(fed.client_dataset(c),
                                        fed.client_sizes[c], run['config'],
                                        rng) for c in sampled]
      start = time.perf_counter()
      out = run['process'].next(run['state'], data,
                                run['store'].get([ids.index(c)
                                                  for c in sampled]))
      run['seconds'].append(time.perf_counter() - start)
      run['state'] = out.state
      run['store'].put(out.client_states)
      print(f'round time {r}/{rounds} {name}: {run["seconds"][-1]:.2f} s',
            file=sys.stderr, flush=True)
  return {name: run['seconds'][1:] for name, run in runs.items()}


def round_seconds(config: RunConfig, rounds: int) -> dict:
  """The `round_seconds` section: each variant's rounds and median, the
  devices per round, and the ratios of the medians."""
  seconds = time_rounds(config, rounds)
  median = {name: statistics.median(s) for name, s in seconds.items()}
  ratios = {}
  if OLD in median:
    ratios['old_over_current'] = median[OLD] / median[CURRENT]
    ratios['jacobian_rows_over_current'] = median[JACOBIAN] / median[CURRENT]
    ratios['rows_over_current'] = median[ROWS] / median[CURRENT]
  if PLAIN in median:
    ratios['current_over_plain'] = median[CURRENT] / median[PLAIN]
  return {'rounds': rounds,
          'clients_per_round': config.resolved().clients_per_round,
          'seconds': seconds, 'median': median, **ratios}


def round_time_lines(section: dict) -> str:
  """The printed round-time lines: each variant's median, then the ratios."""
  lines = [f'round time, median of {section["rounds"]} interleaved rounds:']
  lines += [f'  {name}: {m:.3f} s/round'
            for name, m in section['median'].items()]
  if 'old_over_current' in section:
    lines.append(f'  old path / current: {section["old_over_current"]:.2f}x '
                 '(target >= 2x); jacobian rows alone / current: '
                 f'{section["jacobian_rows_over_current"]:.2f}x; vectorized '
                 'rows (no ghost norms) / current: '
                 f'{section["rows_over_current"]:.2f}x')
  if 'current_over_plain' in section:
    lines.append('  current / plain FedAvg: '
                 f'{section["current_over_plain"]:.2f}x')
  return '\n'.join(lines)


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
  parser.add_argument('--timing-rounds', type=int, default=10, help=(
      'rounds of each variant in the round-time comparison (default: 10, '
      f'{QUICK_ROUNDS} with --quick)'))
  parser.add_argument('--quick', action='store_true', help=(
      f'{QUICK_ROUNDS} rounds everywhere (the runs, unless --rounds is '
      'given, and the round-time comparison): about a minute on 2 cores'))
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
  if args.quick:
    given.setdefault('rounds', QUICK_ROUNDS)
  return RunConfig.from_flags(given)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    config = config_of(args)
    run_config.JobOptions(out=args.out)  # an --out it cannot write, now
    timing_rounds = QUICK_ROUNDS if args.quick else args.timing_rounds
    if timing_rounds < 1:
      raise ValueError(f'--timing-rounds must be >= 1, got {timing_rounds}.')
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
  timing = round_seconds(config, timing_rounds)
  print('\n' + round_time_lines(timing))
  write_results(args.out, simulation, [sparse, dense], {
      'runs': [sparse, dense], 'ratios': ratios, 'round_seconds': timing},
                table + '\n\n' + round_time_lines(timing))
  return 0


def write_results(out: str, simulation, runs, result: dict, text: str):
  """fed_bench.{png,json,md} under `out`."""
  os.makedirs(out, exist_ok=True)
  simulation.plot(runs, os.path.join(out, 'fed_bench.png'))
  with open(os.path.join(out, 'fed_bench.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, 'fed_bench.md'), 'w') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  sys.exit(main())
