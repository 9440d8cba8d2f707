"""Simulation driver: runs `build_dp_sparse_fed_avg` on a `tds.data` dataset.

This is what `tf-dpsparse run` (and `make demo`) executes: sample devices,
pass their data and state through the learning process, evaluate the global
model on the centralized test set, and record every round (accuracy, bytes
each way against dense, ε so far) to JSON and a plot. Given an output
directory, a run checkpoints after every round and the same call resumes
after a crash (`tf_dpsparse.federated.checkpoint`).

Client sampling follows the accountant: client-level DP samples each device
independently with probability clients_per_round / total_clients (Poisson);
the other modes take a uniform sample of fixed size (all devices by default,
as with HAPT's 30 users).

`RunConfig` lives in `tf_dpsparse.config` (no TensorFlow, so the command line
can read its defaults cheaply) and is re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse import data as data_lib
from tf_dpsparse import models
from tf_dpsparse._atomic import write_text_atomically
from tf_dpsparse.config import DEFAULT_TARGET_EPSILON  # noqa: F401 re-export
from tf_dpsparse.config import RunConfig
from tf_dpsparse.federated import checkpoint as checkpoint_lib
from tf_dpsparse.federated.client_states import ClientStateStore
from tf_dpsparse.federated.learning import build_dp_sparse_fed_avg


DEVICES_SCORED = 5  # views scored per round with catch_up='topk'


def load_data(config: RunConfig):
  """The run's federated data set: `tds.data.load` with the config's
  (resolved) split; natural users take no device count."""
  kwargs = {} if config.partition == 'natural' else dict(
      num_clients=config.num_clients, alpha=config.alpha)
  return data_lib.load(config.dataset, partition=config.partition,
                       seed=config.seed, **kwargs)


def device_dataset(examples: tf.data.Dataset, num_examples: int,
                   config: RunConfig, rng) -> tf.data.Dataset:
  """A device's (unbatched) examples as the process takes them: all of them
  for example level, where the device Poisson-samples each step, else
  `local_steps` shuffled batches."""
  if config.dp_sgd_on_device:
    return examples.batch(config.batch_size)
  return examples.shuffle(max(num_examples, 1),
                          seed=int(rng.integers(2**31))).repeat().batch(
                              config.batch_size).take(config.local_steps)


def build_process(config: RunConfig, model_fn, *, total_clients: int,
                  min_client_examples: Optional[int],
                  builder: Callable = build_dp_sparse_fed_avg, **extra):
  """`builder` (`build_dp_sparse_fed_avg`'s arguments) with the config's;
  `extra` keywords pass through (e.g. the audit's hooks). A config's
  `noise_seed` is the builder's `seed` (all noise fixed: tests only)."""
  private = config.privacy is not None
  if config.noise_seed is not None:
    extra.setdefault('seed', config.noise_seed)
  return builder(
      model_fn,
      tff.learning.optimizers.build_sgdm(config.client_learning_rate),
      server_optimizer(config),
      upload_density=None if config.subspace else config.upload_density,
      download_density=None if config.subspace else config.download_density,
      privacy=config.privacy,
      l2_norm_clip=config.l2_norm_clip if private else None,
      noise_multiplier=config.noise_multiplier if private else None,
      target_epsilon=config.target_epsilon if private else None,
      delta=config.delta,
      clients_per_round=config.clients_per_round or total_clients,
      total_clients=total_clients, rounds=config.rounds,
      batch_size=config.batch_size, local_steps=config.local_steps,
      min_client_examples=min_client_examples, value_bits=config.value_bits,
      shared_fraction=config.shared_fraction, catch_up=config.catch_up,
      catch_up_density=config.catch_up_density,
      **({'subspace': config.subspace} if config.subspace else {}), **extra)


def server_optimizer(config: RunConfig) -> tff.learning.optimizers.Optimizer:
  """The config's server optimizer, TFF's (Adam with its defaults but the
  learning rate). It steps on the noised aggregate: post-processing."""
  if config.server_optimizer == 'adam':
    return tff.learning.optimizers.build_adam(config.server_learning_rate)
  return tff.learning.optimizers.build_sgdm(config.server_learning_rate)


def model_fns(fed, seed: int, wrap: Callable = lambda model: model):
  """`(keras_model, model_fn)`: the data set's model (`tds.models`), seeded
  (and passed through `wrap`: the audit's canary head), as a Keras model and
  as the TFF model `build_dp_sparse_fed_avg` takes."""
  input_shape = fed.element_spec[0].shape

  def keras_model():
    return wrap(models.build_model(input_shape, fed.num_classes, seed=seed))

  input_spec = (tf.TensorSpec([None, *input_shape], tf.float32),
                tf.TensorSpec([None], tf.int32))

  def model_fn():
    return tff.learning.models.from_keras_model(
        keras_model(), input_spec=input_spec,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

  return keras_model, model_fn


class _Scorer:
  """Test-set accuracy of the server's model or of flat weights (a device's
  public model or view), on one compiled Keras model."""

  def __init__(self, keras_model, test_arrays):
    self.model = keras_model
    self.model.compile(
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'])
    self.x, self.y = test_arrays

  def server(self, process, state):
    """(test loss, accuracy) of the server's global model."""
    process.get_model_weights(state).assign_weights_to(self.model)
    return self.model.evaluate(self.x, self.y, batch_size=1024, verbose=0)

  def flat(self, flat_weights) -> float:
    for variable, value in zip(self.model.trainable_weights, core.unflatten(
        flat_weights, self.model.trainable_weights)):
      variable.assign(value)
    return self.model.evaluate(self.x, self.y, batch_size=1024, verbose=0)[1]

  def devices(self, process, state, client_states, last: bool,
              server_accuracy: float) -> float:
    """Accuracy on the devices. With a compressed download, devices hold the
    public model, not the server's: score that (it is what users of the
    devices get). With their own views, score the round's devices'
    (DEVICES_SCORED of them, all of them in the last round); before any
    round, a device's view is the public model."""
    if getattr(process, 'catch_up', None) == 'topk' and client_states:
      scored = client_states[:None if last else DEVICES_SCORED]
      return float(np.mean([self.flat(s['view']) for s in scored]))
    if hasattr(process, 'get_public_weights'):
      return self.flat(process.get_public_weights(state))
    return server_accuracy


def _sample(config: RunConfig, client_ids: List[str], per_round: int, rng):
  """A round's devices as the accountant assumes them: Poisson at rate
  per_round / total for client-level DP, else a uniform fixed-size sample."""
  if config.poisson_clients:
    return data_lib.sample_clients(client_ids, rng=rng,
                                   rate=per_round / len(client_ids))
  return data_lib.sample_clients(client_ids, rng=rng,
                                 clients_per_round=per_round)


def _record(round_num: int, metrics, accuracies, clients: int,
            cumulative: dict, seconds: float) -> dict:
  """One round's row of rounds.json; adds its bytes to `cumulative`."""
  m = metrics
  test_loss, accuracy, device_accuracy = accuracies
  cumulative['up'] += int(m['bytes_up'])
  cumulative['down'] += int(m['bytes_down'])
  cumulative['dense'] += int(m['dense_bytes_up']) + int(m['dense_bytes_down'])
  return {
      'round': round_num, 'accuracy': float(accuracy),
      'device_accuracy': float(device_accuracy),
      'test_loss': float(test_loss), 'train_loss': float(m['loss']),
      'epsilon': float(m['epsilon']), 'clients': clients,
      'bytes_up': int(m['bytes_up']), 'bytes_down': int(m['bytes_down']),
      'dense_bytes_up': int(m['dense_bytes_up']),
      'dense_bytes_down': int(m['dense_bytes_down']),
      'cumulative_mb': (cumulative['up'] + cumulative['down']) / 1e6,
      'cumulative_dense_mb': cumulative['dense'] / 1e6,
      'clipped_fraction': float(m['clipped_fraction']),
      'server_residual_norm': float(m['server_residual_norm']),
      'seconds': seconds,
  }


def _progress_bar(config: RunConfig, progress: bool, label: Optional[str]):
  if not progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=config.rounds, desc=label or config.dataset, unit='round')


def _start(config: RunConfig, fed, process) -> checkpoint_lib.Progress:
  """Round 0: the initial state, every device's initial state, the seeded
  sampling RNG."""
  state = process.initialize()
  own_views = getattr(process, 'catch_up', None) == 'topk'
  store = ClientStateStore(
      len(fed.client_ids), process.size, path=config.client_state_path,
      initial_view=process.get_public_weights(state) if own_views else None)
  return checkpoint_lib.Progress(
      done=0, state=state, store=store, rng=np.random.default_rng(config.seed),
      rounds=[], cumulative={'up': 0, 'down': 0, 'dense': 0})


def _round(config: RunConfig, fed, process, scorer: _Scorer,
           progress: checkpoint_lib.Progress) -> Optional[dict]:
  """Runs round `progress.done + 1` and advances `progress`; returns its row,
  or None for a round whose Poisson sample is empty: it releases nothing, is
  skipped (`process.skip_round()` still charges its ε) and leaves no row;
  so does a round with fewer than `min_clients` devices reporting (after
  the simulated `dropout_rate`, or with data that cannot be read)."""
  client_ids = list(fed.client_ids)
  round_num, rng = progress.done + 1, progress.rng
  sampled = _sample(config, client_ids,
                    config.clients_per_round or len(client_ids), rng)
  if config.dropout_rate:  # devices that never report
    sampled = [c for c in sampled if rng.random() >= config.dropout_rate]
  if len(sampled) < config.min_clients:  # nothing is released
    process.skip_round()
    progress.done = round_num
    return None
  start = time.perf_counter()
  out = process.next(
      progress.state,
      [device_dataset(fed.client_dataset(c), fed.client_sizes[c], config, rng)
       for c in sampled],
      progress.store.get([client_ids.index(c) for c in sampled]))
  seconds = time.perf_counter() - start
  if out.metrics.get('skipped'):  # too few could be read; charged once
    print(f'round {round_num} skipped: {out.metrics["skipped"]}',
          file=sys.stderr)
    progress.done = round_num
    return None
  progress.store.put(out.client_states)
  progress.state = out.state
  test_loss, accuracy = scorer.server(process, out.state)
  device_accuracy = scorer.devices(process, out.state, out.client_states,
                                   round_num == config.rounds, accuracy)
  progress.rounds.append(_record(round_num, out.metrics,
                                 (test_loss, accuracy, device_accuracy),
                                 len(sampled), progress.cumulative, seconds))
  progress.done = round_num
  return progress.rounds[-1]


def _train(config: RunConfig, fed, process, scorer: _Scorer, bar, *,
           checkpoint: Optional[checkpoint_lib.RunCheckpoint] = None,
           label: str = '', after_round: Optional[Callable[[int], None]] = None
           ) -> checkpoint_lib.Progress:
  """Runs the rounds not done yet; returns the run's final progress.

  With `checkpoint`, starts from its last round (saying so on stderr) and
  checkpoints after every round, skipped ones too (they charge ε and draw
  from the sampling RNG). `after_round(r)` is called once round r's
  checkpoint is written (tests interrupt a run there).
  """
  progress = _start(config, fed, process)
  if checkpoint is not None and checkpoint.restore(progress, process):
    print(f'resuming {label} after round {progress.done} of {config.rounds} '
          f'({checkpoint.path})', file=sys.stderr)
  if bar is not None:
    bar.update(progress.done)
  while progress.done < config.rounds:
    row = _round(config, fed, process, scorer, progress)
    if checkpoint is not None:
      checkpoint.save(progress, process.ledger)
    if bar is not None:
      if row is not None:
        bar.set_postfix(acc=f'{row["accuracy"]:.3f}',
                        device=f'{row["device_accuracy"]:.3f}',
                        eps=f'{row["epsilon"]:.2f}',
                        MB=f'{row["cumulative_mb"]:.2f}')
      bar.update(1)
    if after_round is not None:
      after_round(progress.done)
  return progress


def _summary(config: RunConfig, process, rounds: List[dict],
             cumulative: dict, final_accuracies) -> dict:
  """The run's summary: final accuracies, ε spent, bytes against dense."""
  total_bytes = cumulative['up'] + cumulative['down']
  return {
      'final_accuracy': float(final_accuracies[0]),
      'final_device_accuracy': float(final_accuracies[1]),
      'rounds_completed': len(rounds),
      'epsilon': 0.0 if process.ledger is None else process.ledger.epsilon,
      'delta': config.delta,
      'noise_multiplier': process.noise_multiplier,
      'mb_up': cumulative['up'] / 1e6, 'mb_down': cumulative['down'] / 1e6,
      'dense_mb': cumulative['dense'] / 1e6,
      'percent_of_dense': 100 * total_bytes / max(cumulative['dense'], 1),
      'seconds_per_round': float(np.mean([r['seconds'] for r in rounds]))
                           if rounds else 0.0,
      'parameters': getattr(process, 'model_size', process.size),
  }


def _open_checkpoint(config: RunConfig, label: str, out: Optional[str],
                     restart: bool):
  """(checkpoint, finished result): the run's checkpoint under `out` (None
  without `out`), and its stored result if it already finished."""
  if out is None:
    return None, None
  if restart:
    checkpoint_lib.discard(out, label)
  checkpoint = checkpoint_lib.RunCheckpoint(out, label, config)
  result = checkpoint.completed()
  if result is not None:
    print(f'{label}: already complete ({config.rounds} rounds, '
          f'{checkpoint.path}); rewriting its outputs (--restart runs it '
          'again)', file=sys.stderr)
  return checkpoint, result


def _mid_run(checkpoint, process, label: str):
  """The checkpoint to save rounds to: None when `process` cannot resume
  mid-run (`checkpoint.resumable`); its result is still recorded."""
  if checkpoint is None:
    return None
  why = checkpoint_lib.resumable(process)
  if why is None:
    return checkpoint
  if checkpoint.existed:
    print(f'{label}: cannot resume mid-run ({why}); starting again from '
          'round 1', file=sys.stderr)
  return None


def _execution_context(config: RunConfig):
  """Where the rounds run: on `config.workers` (TFF's remote executors,
  `tf_dpsparse.federated.remote`), else in TFF's local worker."""
  if config.workers is None:
    return contextlib.nullcontext()
  from tf_dpsparse.federated import remote  # pylint: disable=g-import-not-at-top
  return remote.use_workers(config.workers)


def run(config: RunConfig, *, progress: bool = True,
        label: Optional[str] = None,
        builder: Callable = build_dp_sparse_fed_avg,
        out: Optional[str] = None, restart: bool = False,
        after_round: Optional[Callable[[int], None]] = None) -> dict:
  """Runs `config` and returns {'label', 'config', 'rounds', 'summary',
  'ledger'}; 'config' is `config.resolved()`, the values that ran.

  `builder` takes `build_dp_sparse_fed_avg`'s arguments and returns a process
  with its interface (`initialize`, `next` -> `RoundOutput`, `skip_round`,
  `get_model_weights`, `ledger`, `noise_multiplier`, `size`): baselines run on
  the same data, sampling and evaluation through it (benchmarks/).

  With `out`, the run checkpoints every round under
  `checkpoint.directory(out, label)` and, called again with the same `out`,
  label and config, resumes after its last completed round; a finished run
  returns its stored result without training. Another config there is
  refused (`CheckpointMismatchError`, a ValueError); `restart` deletes the
  checkpoint first. A process that keeps state outside the state `next`
  returns (`resumable = False`, e.g. DSSGD) records only its result. See
  `tf_dpsparse.federated.checkpoint`, also for what a crash does to the
  privacy ledger. `after_round(r)` runs after round r's checkpoint.

  If no round ran (client-level Poisson sampling drew nobody in every
  round), the final accuracies are the initial model's, `rounds` is empty,
  `summary['rounds_completed']` is 0 and ε still counts the skipped rounds
  (each is a release of nothing, charged by `process.skip_round()`); a note
  goes to stderr, and `summary_table` marks the row.
  """
  name = label or 'dp-sparse'
  checkpoint, result = _open_checkpoint(config, name, out, restart)
  if result is not None:
    return result
  fed = load_data(config)
  total = len(fed.client_ids)
  if (config.clients_per_round or total) > total:
    raise ValueError(f'clients_per_round={config.clients_per_round} but the '
                     f'dataset has {total} clients.')
  keras_model, model_fn = model_fns(fed, config.seed)
  process = build_process(config, model_fn, total_clients=total,
                          min_client_examples=min(fed.client_sizes.values()),
                          builder=builder)
  scorer = _Scorer(keras_model(), fed.test_arrays())
  bar = _progress_bar(config, progress, label)
  with _execution_context(config):
    done = _train(config, fed, process, scorer, bar, label=name,
                  checkpoint=_mid_run(checkpoint, process, name),
                  after_round=after_round)
  if bar is not None:
    bar.close()
  result = _result(config, name, process, scorer, done)
  if checkpoint is not None:
    checkpoint.complete(result)
  return result


def _result(config: RunConfig, label: str, process, scorer: _Scorer,
            done: checkpoint_lib.Progress) -> dict:
  """The run's result from its final progress (`run`'s return value)."""
  rounds = done.rounds
  if rounds:
    final = rounds[-1]['accuracy'], rounds[-1]['device_accuracy']
  else:
    print(f'{label}: no round ran: client sampling drew no device in any of '
          f'the {config.rounds} rounds; the accuracy is the initial '
          'model\'s.', file=sys.stderr)
    accuracy = scorer.server(process, done.state)[1]
    final = accuracy, scorer.devices(process, done.state, [], True, accuracy)
  return {'label': label,
          'config': dataclasses.asdict(config.resolved()), 'rounds': rounds,
          'summary': _summary(config, process, rounds, done.cumulative, final),
          'ledger': None if process.ledger is None else
                    process.ledger.to_dict()}


def summary_table(results: List[dict]) -> str:
  """A markdown table of runs: method, ε, accuracy, MB each way, % of dense."""
  lines = ['| run | ε (δ) | final accuracy (server) | on devices | MB up | '
           'MB down | % of dense | s/round |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    s = r['summary']
    eps = '∞ (non-private)' if r['config']['privacy'] is None else (
        f'{s["epsilon"]:.2f} ({s["delta"]:g})')
    label = r['label'] if s.get('rounds_completed', 1) else (
        f'{r["label"]} (no round ran: initial model)')
    lines.append(f'| {label} | {eps} | {s["final_accuracy"]:.4f} | '
                 f'{s["final_device_accuracy"]:.4f} | '
                 f'{s["mb_up"]:.3f} | {s["mb_down"]:.3f} | '
                 f'{s["percent_of_dense"]:.2f} % | '
                 f'{s["seconds_per_round"]:.2f} |')
  return '\n'.join(lines)


def plot(results: List[dict], path: str) -> None:
  """Accuracy vs round and vs cumulative MB (log x): per run, the server's
  model (solid) and the public model devices hold (dashed)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (by_round, by_mb) = plt.subplots(1, 2, figsize=(11, 4))
  for r in results:
    rounds = [x['round'] for x in r['rounds']]
    mb = [x['cumulative_mb'] for x in r['rounds']]
    for ax, xs in ((by_round, rounds), (by_mb, mb)):
      line, = ax.plot(xs, [x['accuracy'] for x in r['rounds']],
                      label=f'{r["label"]} (server)')
      ax.plot(xs, [x.get('device_accuracy', x['accuracy']) for x in r['rounds']],
              linestyle='--', color=line.get_color(),
              label=f'{r["label"]} (on devices)')
  by_round.set(xlabel='round', ylabel='test accuracy', title='accuracy vs round')
  by_mb.set(xlabel='cumulative MB sent (up + down)', ylabel='test accuracy',
            xscale='log', title='accuracy vs communication')
  for ax in (by_round, by_mb):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def save(results: List[dict], out_dir: str) -> dict:
  """Writes rounds.json, summary.md and accuracy.png under `out_dir`, each
  replaced atomically, so a crash while writing them (after a resumed run
  finished, say) leaves the previous files, not half of new ones."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name)
           for name in ('rounds.json', 'summary.md', 'accuracy.png')}
  write_text_atomically(paths['rounds.json'], json.dumps(results, indent=1))
  write_text_atomically(paths['summary.md'], summary_table(results) + '\n')
  partial = os.path.join(out_dir, '.accuracy.partial.png')
  plot(results, partial)
  os.replace(partial, paths['accuracy.png'])
  return paths
