"""Simulation driver: runs `build_dp_sparse_fed_avg` on a `tds.data` dataset.

This is what `tf-dpsparse run` (and `make demo`) executes: sample devices,
pass their data and state through the learning process, evaluate the global
model on the centralized test set, and record every round (accuracy, bytes
each way against dense, ε so far) to JSON and a plot.

Client sampling follows the accountant: client-level DP samples each device
independently with probability clients_per_round / total_clients (Poisson);
the other modes take a uniform sample of fixed size (all devices by default,
as with HAPT's 30 users).

`RunConfig` lives in `tf_dpsparse.config` (no TensorFlow, so the command line
can read its defaults cheaply) and is re-exported here.
"""

from __future__ import annotations

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
from tf_dpsparse.config import DEFAULT_TARGET_EPSILON  # noqa: F401 re-export
from tf_dpsparse.config import RunConfig
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
  `extra` keywords pass through (e.g. the audit's hooks)."""
  private = config.privacy is not None
  return builder(
      model_fn,
      tff.learning.optimizers.build_sgdm(config.client_learning_rate),
      tff.learning.optimizers.build_sgdm(config.server_learning_rate),
      upload_density=config.upload_density,
      download_density=config.download_density,
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
      catch_up_density=config.catch_up_density, **extra)


def model_fns(fed, seed: int):
  """`(keras_model, model_fn)`: the data set's model (`tds.models`), seeded,
  as a Keras model and as the TFF model `build_dp_sparse_fed_avg` takes."""
  input_shape = fed.element_spec[0].shape

  def keras_model():
    return models.build_model(input_shape, fed.num_classes, seed=seed)

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


def _train(config: RunConfig, fed, process, scorer: _Scorer, bar):
  """Runs the rounds; returns (final state, rows, cumulative bytes).

  A round whose Poisson sample is empty releases nothing: it is skipped
  (`process.skip_round()` still charges its ε) and leaves no row.
  """
  client_ids = list(fed.client_ids)
  per_round = config.clients_per_round or len(client_ids)
  rng = np.random.default_rng(config.seed)
  state = process.initialize()
  own_views = getattr(process, 'catch_up', None) == 'topk'
  store = ClientStateStore(
      len(client_ids), process.size,
      initial_view=process.get_public_weights(state) if own_views else None)
  rounds: List[dict] = []
  cumulative = {'up': 0, 'down': 0, 'dense': 0}
  for round_num in range(1, config.rounds + 1):
    sampled = _sample(config, client_ids, per_round, rng)
    if not sampled:  # Poisson sampling drew nobody: nothing is released
      process.skip_round()
      if bar is not None:
        bar.update(1)
      continue
    start = time.perf_counter()
    out = process.next(
        state, [device_dataset(fed.client_dataset(c), fed.client_sizes[c],
                               config, rng) for c in sampled],
        store.get([client_ids.index(c) for c in sampled]))
    seconds = time.perf_counter() - start
    store.put(out.client_states)
    state = out.state
    test_loss, accuracy = scorer.server(process, state)
    device_accuracy = scorer.devices(process, state, out.client_states,
                                     round_num == config.rounds, accuracy)
    rounds.append(_record(round_num, out.metrics,
                          (test_loss, accuracy, device_accuracy),
                          len(sampled), cumulative, seconds))
    if bar is not None:
      bar.set_postfix(acc=f'{accuracy:.3f}', device=f'{device_accuracy:.3f}',
                      eps=f'{rounds[-1]["epsilon"]:.2f}',
                      MB=f'{rounds[-1]["cumulative_mb"]:.2f}')
      bar.update(1)
  return state, rounds, cumulative


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
      'parameters': process.size,
  }


def run(config: RunConfig, *, progress: bool = True,
        label: Optional[str] = None,
        builder: Callable = build_dp_sparse_fed_avg) -> dict:
  """Runs `config` and returns {'label', 'config', 'rounds', 'summary',
  'ledger'}; 'config' is `config.resolved()`, the values that ran.

  `builder` takes `build_dp_sparse_fed_avg`'s arguments and returns a process
  with its interface (`initialize`, `next` -> `RoundOutput`, `skip_round`,
  `get_model_weights`, `ledger`, `noise_multiplier`, `size`): baselines run on
  the same data, sampling and evaluation through it (benchmarks/).

  If no round ran (client-level Poisson sampling drew nobody in every
  round), the final accuracies are the initial model's, `rounds` is empty,
  `summary['rounds_completed']` is 0 and ε still counts the skipped rounds
  (each is a release of nothing, charged by `process.skip_round()`); a note
  goes to stderr, and `summary_table` marks the row.
  """
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
  state, rounds, cumulative = _train(config, fed, process, scorer, bar)
  if bar is not None:
    bar.close()
  if rounds:
    final = rounds[-1]['accuracy'], rounds[-1]['device_accuracy']
  else:
    print(f'{label or config.dataset}: no round ran: client sampling drew no '
          f'device in any of the {config.rounds} rounds; the accuracy is the '
          'initial model\'s.', file=sys.stderr)
    accuracy = scorer.server(process, state)[1]
    final = accuracy, scorer.devices(process, state, [], True, accuracy)
  return {'label': label or 'dp-sparse',
          'config': dataclasses.asdict(config.resolved()), 'rounds': rounds,
          'summary': _summary(config, process, rounds, cumulative, final),
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
  """Writes rounds.json, summary.md and accuracy.png under `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name)
           for name in ('rounds.json', 'summary.md', 'accuracy.png')}
  with open(paths['rounds.json'], 'w') as f:
    json.dump(results, f, indent=1)
  with open(paths['summary.md'], 'w') as f:
    f.write(summary_table(results) + '\n')
  plot(results, paths['accuracy.png'])
  return paths
