"""Where a main-job round's time goes (issue 17), measured, not guessed.

`tf-dpsparse run`'s round is `DPSparseFedAvg.next`: a pre-round count of
every device's examples in Python (`learning._readable`), then one TFF call
that runs the distributor, each device's download and client work, the
aggregator and the finalizer in TFF's C++ worker. Two views, one run:

1. Pieces (`--pieces`): the pre-round count, and the client work's parts
   as tf.functions run eagerly in this process (TensorFlow's runtime, not
   TFF's): the materialized device data, one step's per-example gradients
   (vectorized, and the old jacobian), one DP-SGD step, the diagnostic
   loss (now, and as the old `Dataset.reduce`), the upload, and one
   device's whole client work, old and current; then each TFF stage called
   alone in TFF's worker (the distributor, the devices' downloads and
   client work, the aggregator over the round's uploads, the finalizer).
2. Rounds: the TFF round's wall time of the main job on the old path
   (`fed_bench.old_client_work`), with its pieces swapped one at a time
   into the current client work (a 2 x 2 of jacobian or vectorized rows,
   `Dataset.reduce` or in-graph loops), then the current path with one
   piece switched off at a time (the diagnostic loss, the per-example
   gradients, all local training), and the same job without privacy.
   Variants are built first, then their rounds run interleaved (round r of
   every variant before round r+1 of any), so a busy machine slows all of
   them alike; medians are reported. A switched-off piece is a profiling
   stand-in, never a configuration anyone runs.

Differences between variants are the cost of what differs.

Run: `python benchmarks/round_profile.py [--rounds 4] [--pieces] [--out
F.json]`; prints a table (and writes the numbers to `--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import fed_bench  # benchmarks/, beside this file

MAIN = 'current path (the main job)'


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=4,
                      help='timed rounds per variant, after one warm-up')
  parser.add_argument('--pieces', action='store_true',
                      help='also time the pieces alone (eagerly, and each '
                           'TFF stage alone)')
  parser.add_argument('--out', help='write the numbers to this JSON file')
  return parser


def _median_ms(fn, repeats: int = 7) -> float:
  """Median wall time of `fn()` in ms, after one untimed call (tracing)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


class Job:
  """The main job's data, model and process inputs (RunConfig defaults)."""

  def __init__(self, **flags):
    from tf_dpsparse import config as run_config  # pylint: disable=import-outside-toplevel
    from tf_dpsparse.federated import simulation  # pylint: disable=import-outside-toplevel
    self.simulation = simulation
    self.config = run_config.RunConfig.from_flags({'noise_seed': 0, **flags})
    self.fed = simulation.load_data(self.config)
    self.keras_model, self.model_fn = simulation.model_fns(self.fed,
                                                           self.config.seed)

  @property
  def non_private(self):
    """The same job without privacy."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    return dataclasses.replace(self.config, privacy=None, target_epsilon=None,
                               noise_seed=None)

  def process(self, private: bool = True):
    """`tf-dpsparse run`'s process, or the same job's without privacy."""
    config = self.config if private else self.non_private
    return self.simulation.build_process(
        config, self.model_fn, total_clients=len(self.fed.client_ids),
        min_client_examples=min(self.fed.client_sizes.values()))

  def datasets(self, seed: int = 0, process=None):
    """Every device's data as a round of `process` (default: the main
    job's) passes it: all of a device's examples under example-level DP,
    else `local_steps` shuffled batches; all devices, as HAPT's main job
    takes every device every round."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    config = self.config
    if process is not None and process.privacy is None:
      config = self.non_private
    return [self.simulation.device_dataset(
        self.fed.client_dataset(c), self.fed.client_sizes[c], config,
        rng) for c in self.fed.client_ids]


def _variants():
  """{variant: client_work attributes}: the old path and its loops alone,
  then today's client work with one piece switched off at a time."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def no_loss(*args, **kwargs):
    del args, kwargs
    return tf.constant(0.0)

  def zero_gradients(dp_sgd, model, params, *args, **kwargs):
    del dp_sgd, model, args, kwargs
    return lambda *step: [tf.zeros_like(v) for v in params.trainable]

  def no_training(*args, **kwargs):
    del args, kwargs
    return tf.constant(0, tf.int64)  # the step count the loss waits on

  old = fed_bench.old_client_work()
  old_loops = {k: v for k, v in old.items() if k != '_per_example_rows'}
  return {
      fed_bench.OLD: old,
      'old Dataset.reduce loops, vectorized rows': old_loops,
      fed_bench.JACOBIAN: dict(_per_example_rows=old['_per_example_rows'],
                               _ghost_model=fed_bench.no_ghost),
      MAIN: {},
      'current, no diagnostic loss': dict(_training_loss=no_loss),
      'current, per-example gradients zeroed, no loss': dict(
          _dp_sgd_gradients=zero_gradients, _training_loss=no_loss),
      'current, no local training, no loss': dict(_train=no_training,
                                                  _training_loss=no_loss),
  }


def build_variants(job: Job) -> dict:
  """{name: DPSparseFedAvg}: the main job's `_variants`, and the same job
  without privacy."""
  from tf_dpsparse.federated import client_work  # pylint: disable=import-outside-toplevel
  variants = {}
  for name, attributes in _variants().items():
    with fed_bench.patched(client_work, **attributes):
      variants[name] = job.process()
  variants['non-private (privacy none)'] = job.process(private=False)
  return variants


def time_rounds(job: Job, variants: dict, rounds: int) -> dict:
  """{name: {'seconds': [...], 'readable': [...]}}: each variant's round
  wall time (`process.next`, the pre-round count included) and the
  count's own time, rounds interleaved across variants."""
  from tf_dpsparse.federated import client_states  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import learning  # pylint: disable=import-outside-toplevel
  runs = {}
  for name, process in variants.items():
    runs[name] = dict(process=process, state=process.initialize(),
                      store=client_states.ClientStateStore(
                          len(job.fed.client_ids), process.size),
                      seconds=[], readable=[])
  ids = list(range(len(job.fed.client_ids)))
  for r in range(rounds + 1):
    for name, run in runs.items():
      datasets = job.datasets(seed=r, process=run['process'])
      start = time.perf_counter()
      learning._readable(datasets)  # pylint: disable=protected-access
      readable = time.perf_counter() - start
      start = time.perf_counter()
      out = run['process'].next(run['state'], datasets, run['store'].get(ids))
      seconds = time.perf_counter() - start
      run['state'] = out.state
      run['store'].put(out.client_states)
      if r:  # round 0 warms up (TFF loads the computation)
        run['seconds'].append(seconds)
        run['readable'].append(readable)
      print(f'round {r} {name}: {seconds:.3f} s', file=sys.stderr, flush=True)
  return {name: {k: run[k] for k in ('seconds', 'readable')}
          for name, run in runs.items()}


def time_pieces(job: Job) -> dict:
  """{piece: ms}: the client work's parts run eagerly, one device (the
  median-sized one), with the main job's mechanism, old and current; and
  the pre-round count of every device's examples."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tf_dpsparse import core  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import client_work as cw  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import learning  # pylint: disable=import-outside-toplevel
  process, datasets = job.process(), job.datasets()
  data = sorted(datasets, key=learning.num_examples)[len(datasets) // 2]
  model = job.model_fn()
  materialize = tf.function(cw._all_examples)  # pylint: disable=protected-access
  x, y = materialize(data)
  old_loss = fed_bench.old_client_work()['_training_loss']
  upload = core.sparse_upload(process.upload_k,
                              value_bits=job.config.value_bits)
  update = tf.random.stateless_normal([process.size], seed=[0, 1])
  return {
      f'pre-round count, {len(datasets)} devices (learning._readable)':
          _median_ms(lambda: learning._readable(datasets)),  # pylint: disable=protected-access
      'materialize device data': _median_ms(lambda: materialize(data)),
      **_gradient_pieces(job, process.privacy, model, x, y),
      'diagnostic loss, all examples, one forward pass': _median_ms(
          tf.function(lambda: cw._training_loss(model, x, y))),  # pylint: disable=protected-access
      'diagnostic loss, old Dataset.reduce': _median_ms(
          tf.function(lambda: old_loss(model, x, y))),
      'upload stage (top-k, 8 bit)': _median_ms(tf.function(
          lambda: upload.update(update, core.UploadState(update)))),
      'client work, one device, old path': _median_ms(
          one_device_client_work(job, process, data,
                                 fed_bench.old_client_work())),
      'client work, one device, current': _median_ms(
          one_device_client_work(job, process, data)),
  }


def _gradient_pieces(job: Job, privacy, model, x, y) -> dict:
  """{piece: ms}: one step's per-example gradients, vectorized and by the
  old jacobian, and one whole DP-SGD step (sample, rows, clip, noise)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import client_work as cw  # pylint: disable=import-outside-toplevel
  variables = model.trainable_variables
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  batch = x[:job.config.batch_size], y[:job.config.batch_size]
  vectorized = tf.function(cw._per_example_rows(model, variables, loss_fn))  # pylint: disable=protected-access
  jacobian = tf.function(fed_bench.old_client_work()['_per_example_rows'](
      model, variables, loss_fn))
  step = tf.function(lambda: cw._dp_sgd_gradients(  # pylint: disable=protected-access
      privacy, model, cw._parametrization(model, None), x, y, loss_fn,  # pylint: disable=protected-access
      tf.constant([0, 1], tf.int64))(tf.constant(0, tf.int64)))
  return {
      f'per-example gradients, vectorized, batch {len(batch[1])}':
          _median_ms(lambda: vectorized(*batch)),
      f'per-example gradients, jacobian, batch {len(batch[1])}':
          _median_ms(lambda: jacobian(*batch)),
      'one DP-SGD step (Poisson sample, vectorized rows, clip, noise)':
          _median_ms(step),
  }


def one_device_client_work(job: Job, process, data, attributes=None):
  """A no-argument callable running the main job's client work (as
  `build_client_work` makes it, with `client_work` `attributes` patched
  in while it is traced) on `data`, eagerly, outside TFF; traced here."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_federated as tff  # pylint: disable=import-outside-toplevel
  from tf_dpsparse import core  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import client_work as cw  # pylint: disable=import-outside-toplevel
  config = job.config
  work = cw.build_client_work(
      job.model_fn, tff.learning.optimizers.build_sgdm(
          config.client_learning_rate),
      upload=core.sparse_upload(
          process.upload_k, value_bits=config.value_bits,
          l2_norm_clip=process.privacy.upload_clip),
      dp_sgd=process.privacy, local_steps=config.local_steps,
      per_example_loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
      seed=0)
  weights = tf.nest.map_structure(tf.constant, process.get_model_weights(
      process.initialize()))

  @tf.function(autograph=False)
  def call(residual):
    state = tff.structure.Struct.named(
        residual=residual, last_sync_round=tf.constant(0),
        client_id=tf.constant(0))
    return work.python_function(weights, data, state, tf.constant(1),
                                tf.zeros([0], tf.int32))

  residual = tf.zeros([process.size])
  with fed_bench.patched(cw, **(attributes or {})):
    call(residual)
  return lambda: call(residual)


def time_stages(job: Job) -> dict:
  """{stage: ms}: each TFF stage of the main job called alone in TFF's
  worker with round 1's inputs, every device's part for all the round's
  devices (`learning.compose` is wrapped while the process is built, to
  keep its stages)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tf_dpsparse.federated import learning  # pylint: disable=import-outside-toplevel
  kept = {}
  learning_compose = learning.compose

  def compose(stages, *args):
    kept['stages'] = stages
    return learning_compose(stages, *args)

  with fed_bench.patched(learning, compose=compose):
    process = job.process()
  stages, state, data = kept['stages'], process.initialize(), job.datasets()
  at_clients = _at_clients(stages)
  client_states = [process.initial_client_state(i) for i in range(len(data))]
  download = at_clients['distributor'](state['distributor'],
                                       state['global_model_weights'])
  synced = at_clients['device_download']([download] * len(data),
                                         client_states)
  weights, client_states = [s[0] for s in synced], [s[1] for s in synced]
  work_args = (weights, data, client_states, [np.int32(1)] * len(data),
               [download['shared_indices']] * len(data))
  uploads = [out[0] for out in at_clients['client_work'](*work_args)]
  aggregated = stages.aggregator.next(state['aggregator'], uploads)
  n = len(data)
  return {
      'distributor.next': _median_ms(lambda: at_clients['distributor'](
          state['distributor'], state['global_model_weights'])),
      f'device_download, {n} devices': _median_ms(
          lambda: at_clients['device_download']([download] * n,
                                                client_states)),
      f'client_work, {n} devices': _median_ms(
          lambda: at_clients['client_work'](*work_args), repeats=3),
      'client_work, one device': _median_ms(lambda: stages.client_work(
          *[a[0] for a in work_args])),
      f'aggregator.next, {n} uploads': _median_ms(
          lambda: stages.aggregator.next(state['aggregator'], uploads)),
      'finalizer.next': _median_ms(lambda: stages.finalizer.next(
          state['finalizer'], state['global_model_weights'],
          _as_trainable(aggregated.result, state))),
  }


def _at_clients(stages) -> dict:
  """TFF computations that run one stage alone: the distributor's download
  (returned unplaced), and the per-device stages mapped over CLIENTS."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_federated as tff  # pylint: disable=import-outside-toplevel
  next_type = stages.distributor.next.type_signature

  @tff.federated_computation(*next_type.parameter,
                             tff.FederatedType(np.int32, tff.CLIENTS))
  def distributor(state, weights, devices):  # devices: the cardinality
    del devices
    return stages.distributor.next(state, weights).result

  def mapped(computation):
    @tff.federated_computation(tff.StructType(
        [tff.FederatedType(t, tff.CLIENTS)
         for t in computation.type_signature.parameter]))
    def run(args):
      return tff.federated_map(computation, tff.federated_zip(args))
    return lambda *args: run(args)

  return {'distributor': lambda *a: distributor(*a, [np.int32(0)]),
          'device_download': mapped(stages.device_download),
          'client_work': mapped(stages.client_work)}


def _as_trainable(flat, state) -> list:
  """The flat update as the finalizer takes it (one array per variable)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  shapes = [np.shape(v) for v in state['global_model_weights'].trainable]
  ends = np.cumsum([int(np.prod(s)) for s in shapes])
  return [np.reshape(part, s).astype(np.float32) for part, s in
          zip(np.split(np.asarray(flat), ends[:-1]), shapes)]


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  job = Job()
  result = {'rounds': args.rounds}
  if args.pieces:
    result['pieces_ms'] = time_pieces(job)
    result['stages_ms'] = time_stages(job)
  timed = time_rounds(job, build_variants(job), args.rounds)
  base = statistics.median(timed[MAIN]['seconds'])
  lines = ['| variant | s/round (median) | of main job | pre-round count s |',
           '| --- | --- | --- | --- |']
  for name, t in timed.items():
    s = statistics.median(t['seconds'])
    lines.append(f'| {name} | {s:.3f} | {s / base:.2f} | '
                 f'{statistics.median(t["readable"]):.3f} |')
  result['round_seconds'] = {name: dict(t, median=statistics.median(
      t['seconds'])) for name, t in timed.items()}
  for section in ('pieces_ms', 'stages_ms'):
    for name, ms in result.get(section, {}).items():
      print(f'{section} {name}: {ms:.1f} ms')
  print('\n'.join(lines))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
