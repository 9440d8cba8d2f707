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
  if config.privacy == 'example':
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


def run(config: RunConfig, *, progress: bool = True,
        label: Optional[str] = None,
        builder: Callable = build_dp_sparse_fed_avg) -> dict:
  """Runs `config` and returns {'config', 'rounds', 'ledger', 'summary'}.

  `builder` takes `build_dp_sparse_fed_avg`'s arguments and returns a process
  with its interface (`initialize`, `next` -> `RoundOutput`, `skip_round`,
  `get_model_weights`, `ledger`, `noise_multiplier`, `size`): baselines run on
  the same data, sampling and evaluation through it (benchmarks/).
  """
  fed = load_data(config)
  client_ids = list(fed.client_ids)
  total = len(client_ids)
  per_round = config.clients_per_round or total
  if per_round > total:
    raise ValueError(f'clients_per_round={per_round} but the dataset has '
                     f'{total} clients.')
  x_test, y_test = fed.test_arrays()
  min_examples = min(fed.client_sizes.values())
  keras_model, model_fn = model_fns(fed, config.seed)

  process = build_process(config, model_fn, total_clients=total,
                          min_client_examples=min_examples, builder=builder)
  evaluator = keras_model()
  evaluator.compile(
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=['accuracy'])
  rng = np.random.default_rng(config.seed)
  state = process.initialize()
  own_views = getattr(process, 'catch_up', None) == 'topk'
  store = ClientStateStore(
      total, process.size,
      initial_view=process.get_public_weights(state) if own_views else None)

  def accuracy_of(flat_weights) -> float:
    for variable, value in zip(evaluator.trainable_weights, core.unflatten(
        flat_weights, evaluator.trainable_weights)):
      variable.assign(value)
    return evaluator.evaluate(x_test, y_test, batch_size=1024, verbose=0)[1]

  rounds: List[dict] = []
  cumulative = {'up': 0, 'down': 0, 'dense': 0}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.rounds, desc=label or config.dataset, unit='round')
  for round_num in range(1, config.rounds + 1):
    if config.privacy == 'client':
      sampled = data_lib.sample_clients(client_ids, rng=rng,
                                        rate=per_round / total)
    else:
      sampled = data_lib.sample_clients(client_ids, rng=rng,
                                        clients_per_round=per_round)
    if not sampled:  # Poisson sampling drew nobody: nothing is released
      process.skip_round()
      if bar is not None:
        bar.update(1)
      continue
    indices = [client_ids.index(c) for c in sampled]
    start = time.perf_counter()
    out = process.next(
        state, [device_dataset(fed.client_dataset(c), fed.client_sizes[c],
                               config, rng) for c in sampled],
        store.get(indices))
    seconds = time.perf_counter() - start
    store.put(out.client_states)
    state = out.state
    process.get_model_weights(state).assign_weights_to(evaluator)
    test_loss, accuracy = evaluator.evaluate(x_test, y_test, batch_size=1024,
                                             verbose=0)
    # With a compressed download, devices hold the public model, not the
    # server's: score that too (it is what users of the devices get). With
    # their own views, score the round's devices' (DEVICES_SCORED of them,
    # all of them in the last round).
    device_accuracy = accuracy
    if own_views:
      scored = out.client_states[:None if round_num == config.rounds
                                 else DEVICES_SCORED]
      device_accuracy = np.mean([accuracy_of(s['view']) for s in scored])
    elif hasattr(process, 'get_public_weights'):
      device_accuracy = accuracy_of(process.get_public_weights(state))
    m = out.metrics
    cumulative['up'] += int(m['bytes_up'])
    cumulative['down'] += int(m['bytes_down'])
    cumulative['dense'] += int(m['dense_bytes_up']) + int(m['dense_bytes_down'])
    record = {
        'round': round_num, 'accuracy': float(accuracy),
        'device_accuracy': float(device_accuracy),
        'test_loss': float(test_loss), 'train_loss': float(m['loss']),
        'epsilon': float(m['epsilon']), 'clients': len(sampled),
        'bytes_up': int(m['bytes_up']), 'bytes_down': int(m['bytes_down']),
        'dense_bytes_up': int(m['dense_bytes_up']),
        'dense_bytes_down': int(m['dense_bytes_down']),
        'cumulative_mb': (cumulative['up'] + cumulative['down']) / 1e6,
        'cumulative_dense_mb': cumulative['dense'] / 1e6,
        'clipped_fraction': float(m['clipped_fraction']),
        'server_residual_norm': float(m['server_residual_norm']),
        'seconds': seconds,
    }
    rounds.append(record)
    if bar is not None:
      bar.set_postfix(acc=f'{accuracy:.3f}', device=f'{device_accuracy:.3f}', eps=f'{record["epsilon"]:.2f}',
                      MB=f'{record["cumulative_mb"]:.2f}')
      bar.update(1)
  if bar is not None:
    bar.close()
  total_bytes = cumulative['up'] + cumulative['down']
  summary = {
      'final_accuracy': rounds[-1]['accuracy'],
      'final_device_accuracy': rounds[-1]['device_accuracy'],
      'epsilon': 0.0 if process.ledger is None else process.ledger.epsilon,
      'delta': config.delta,
      'noise_multiplier': process.noise_multiplier,
      'mb_up': cumulative['up'] / 1e6, 'mb_down': cumulative['down'] / 1e6,
      'dense_mb': cumulative['dense'] / 1e6,
      'percent_of_dense': 100 * total_bytes / max(cumulative['dense'], 1),
      'seconds_per_round': float(np.mean([r['seconds'] for r in rounds])),
      'parameters': process.size,
  }
  return {'label': label or 'dp-sparse', 'config': dataclasses.asdict(config),
          'rounds': rounds, 'summary': summary,
          'ledger': None if process.ledger is None else process.ledger.to_dict()}


def summary_table(results: List[dict]) -> str:
  """A markdown table of runs: method, ε, accuracy, MB each way, % of dense."""
  lines = ['| run | ε (δ) | final accuracy (server) | on devices | MB up | '
           'MB down | % of dense | s/round |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    s = r['summary']
    eps = '∞ (non-private)' if r['config']['privacy'] is None else (
        f'{s["epsilon"]:.2f} ({s["delta"]:g})')
    lines.append(f'| {r["label"]} | {eps} | {s["final_accuracy"]:.4f} | '
                 f'{s["final_device_accuracy"]:.4f} | '
                 f'{s["mb_up"]:.3f} | {s["mb_down"]:.3f} | '
                 f'{s["percent_of_dense"]:.2f} % | {s["seconds_per_round"]:.2f} |')
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
