"""`tf-dpsparse audit`: empirical privacy audits of real training runs.

Each set-up trains with the real TFF process (`build_dp_sparse_fed_avg`:
the same sampling, DP-SGD or clipping and noise, top-k with error feedback,
wire rounding and download) with canaries inserted, then measures what an
observer learns about them (statistics in `tf_dpsparse.privacy.audit`):

- Example level (each device runs DP-SGD; the server is not trusted).
  Canaries are examples: windows of i.i.d. N(0, scale²) values (outliers:
  the data are standardized), canary i on device i mod D with label
  (i // D) mod C, each added with probability 1/2 before training. The
  observer is the untrusted server, which sees every device's upload: a
  canary's score is its largest per-round projection of its device's upload
  on the canary's loss gradient at the public model the device trained
  from. Steinke, Nasr & Jagielski's one-run bound turns the scores into
  ε >= bound at 95 % confidence. (Scoring the final model alone, e.g. by the
  canaries' losses, found nothing even without DP on HAPT: a canary's step
  is averaged over 30 devices and cut to the top 1 % both ways.)
- Client level (DP-FedAvg, trusted aggregator). Canaries are canary clients
  (`learning.AuditHooks`): a fixed random direction of norm `scale` (the
  clip) in place of a trained update, on as many coordinates as the upload
  sends, so top-k passes it whole. Each canary joins the population with
  probability 1/2 and is then sampled every round like a device. The
  observer sees the final model only: scores are cosines of (initial -
  final) with each direction. Andrew et al.'s one-shot estimate (Gaussian
  fits of inserted vs held-out cosines) and the one-run bound on the same
  cosines.
- Membership inference on real data (TF Privacy's loss-threshold attack,
  `privacy.audit.membership_inference`): training examples vs the test
  set, on the final global model.

Canaries are test instruments: the accounted ε is the ledger's for the
set-up's schedule (canary examples only add to a device's n, so its
sampling rate stays below the accounted one; canary clients are sampled at
the devices' rate).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from tf_dpsparse.privacy import audit as stats

CONFIDENCE = 0.95
LARGE_EPSILON = 100.0
MIA_EXAMPLES = 2000  # real training and test examples scored by the attack


@dataclasses.dataclass
class AuditSetup:
  """One row of the audit: a run configuration and its canaries."""
  name: str
  unit: str  # 'example' or 'client'
  config: object  # tf_dpsparse.federated.simulation.RunConfig
  num_canaries: Optional[int]  # example level: None = devices x classes
  canary_scale: float  # example: canary input std; client: update norm


def default_setups(quick: bool = False, large_epsilon: float = LARGE_EPSILON,
                   seed: int = 0) -> List[AuditSetup]:
  """HAPT example level and MNIST client level, each at ε = 8, at
  `large_epsilon` and non-private (the set-ups of the paper table; `quick`
  shortens the runs and shrinks MNIST's population to finish in minutes)."""
  from tf_dpsparse.config import RunConfig
  # The operating point the README's audit tables were measured at (1 %
  # each way, 16-bit values), pinned so a change of the main job's defaults
  # does not silently change what the audit measures.
  sparse = dict(upload_density=0.01, download_density=0.01, value_bits=16)
  hapt = RunConfig(dataset='hapt', rounds=15 if quick else 90, local_steps=2,
                   privacy='example', seed=seed, **sparse)
  mnist = RunConfig(
      dataset='mnist', rounds=20 if quick else 100, local_steps=5, **sparse,
      num_clients=200 if quick else 1000, clients_per_round=20 if quick
      else 50, partition='dirichlet', alpha=0.5, privacy='client',
      l2_norm_clip=0.3, seed=seed)
  setups = []
  for base, unit, m, scale in ((hapt, 'example', None, 10.0),
                               (mnist, 'client', 200 if quick else 1000,
                                mnist.l2_norm_clip)):
    for eps in (8.0, large_epsilon, None):
      config = dataclasses.replace(
          base, target_epsilon=eps, privacy=base.privacy if eps else None)
      label = f'ε={eps:g}' if eps else 'non-private'
      setups.append(AuditSetup(f'{base.dataset} {unit} {label}', unit, config,
                               m, scale))
  return setups


def _device_dataset(x, y, config, rng):
  """A device's arrays as `simulation.run` passes a device's data."""
  import tensorflow as tf
  from tf_dpsparse.federated import simulation
  return simulation.device_dataset(tf.data.Dataset.from_tensor_slices((x, y)),
                                   len(y), config, rng)


def _train(process, config, num_states: int, sample: Callable,
           datasets: Callable, on_round: Optional[Callable], label: str,
           progress: bool):
  """Runs `config.rounds` rounds of `process`; returns the final state.

  `sample(round)` gives the round's client ids (indices into the state
  store), `datasets(ids)` their data; `on_round(ids, out)` sees each
  round's output. An empty Poisson sample is charged and skipped.
  """
  from tf_dpsparse.federated.client_states import ClientStateStore
  state = process.initialize()
  store = ClientStateStore(num_states, process.size)
  rounds = range(config.rounds)
  if progress:
    from tqdm.auto import tqdm
    rounds = tqdm(rounds, desc=label, unit='round', leave=False)
  for round_num in rounds:
    ids = sample(round_num)
    if not ids:
      process.skip_round()
      continue
    out = process.next(state, datasets(ids), store.get(ids))
    store.put(out.client_states)
    state = out.state
    if on_round is not None:
      on_round(ids, out)
  return state


def _losses(keras_model, x, y, batch: int = 512) -> np.ndarray:
  """Per-example cross-entropy of `keras_model` on (x, y)."""
  import tensorflow as tf
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
  return np.concatenate([
      loss(y[i:i + batch], keras_model(x[i:i + batch], training=False)).numpy()
      for i in range(0, len(y), batch)])


def _real_data_mia(keras_model, fed, rng) -> tuple:
  """Loss-threshold MIA, training vs test examples, and test accuracy."""
  x_train, y_train = fed.train_arrays()
  x_test, y_test = fed.test_arrays()
  train = rng.choice(len(y_train), min(MIA_EXAMPLES, len(y_train)), False)
  test = rng.choice(len(y_test), min(MIA_EXAMPLES, len(y_test)), False)
  mia = stats.membership_inference(_losses(keras_model, x_train[train],
                                           y_train[train]),
                                   _losses(keras_model, x_test[test],
                                           y_test[test]))
  logits = keras_model.predict(x_test, batch_size=1024, verbose=0)
  return mia, float(np.mean(np.argmax(logits, 1) == y_test))


def _canary_examples(fed, num: int, scale: float, rng):
  """Outlier canaries: inputs of i.i.d. N(0, scale²) values, canary i on
  device i mod D with label (i // D) mod C, each included with probability
  1/2. Up to D * C canaries a device's canaries have distinct labels: two
  outliers of one label have similar gradients, so one's step would show
  in the other's score."""
  shape = fed.element_spec[0].shape
  devices = len(fed.client_ids)
  x = (scale * rng.standard_normal((num, *shape))).astype(np.float32)
  y = ((np.arange(num) // devices) % fed.num_classes).astype(np.int32)
  included = rng.random(num) < 0.5
  return x, y, included, np.arange(num) % devices


def _gradient_fn(keras_model):
  """Per-example loss gradients of `keras_model`, flat: [n, size]."""
  import tensorflow as tf
  loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)

  @tf.function
  def gradients(x, y):
    def one(example):
      with tf.GradientTape() as tape:
        value = loss(example[1][None], keras_model(example[0][None]))
      return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(
          value, keras_model.trainable_weights)], 0)
    return tf.vectorized_map(one, (x, y))

  return gradients


def _upload_scorer(keras_model, process, canaries):
  """Scores example canaries from the uploads, as the untrusted server can.

  Each round projects, for every canary, the upload of its device on the
  unit gradient of the canary's loss at the public model the device trained
  from (an upload is initial - trained weights, so a device that took a
  step on the canary moves along that gradient), standardized over the
  canaries. A canary acts only in the rounds that sample it, so its score
  is its largest standardized projection. The public model and the
  canaries are known to the server; inclusion is not.
  """
  from tf_dpsparse import core
  x, y, _, owner = canaries
  gradients = _gradient_fn(keras_model)
  scores = np.full(len(y), -np.inf)

  def on_round(ids, out):
    public = core.unflatten(process.get_public_weights(out.state),
                            keras_model.trainable_weights)
    for variable, value in zip(keras_model.trainable_weights, public):
      variable.assign(value)
    uploads = np.zeros((max(ids) + 1, process.size), np.float32)
    for device, state in zip(ids, out.client_states):
      uploads[device, np.asarray(state['upload_indices'])] = np.asarray(
          state['upload_values'])
    grads = gradients(x, y).numpy()
    norms = np.maximum(np.linalg.norm(grads, axis=1), 1e-12)
    projections = np.sum(grads * uploads[owner], axis=1) / norms
    scale = np.std(projections)
    if scale > 0:
      np.maximum(scores, projections / scale, out=scores)

  return scores, on_round


def _example_audit(setup: AuditSetup, progress: bool) -> dict:
  """Steinke et al.'s one-run audit of example-level DP (module docstring)."""
  from tf_dpsparse.federated import simulation
  from tf_dpsparse.federated.learning import AuditHooks
  config = setup.config
  rng = np.random.default_rng(config.seed + 1)
  fed = simulation.load_data(config)
  ids = fed.client_ids
  canaries = _canary_examples(
      fed, setup.num_canaries or len(ids) * fed.num_classes,
      setup.canary_scale, rng)
  cx, cy, included, owner = canaries
  keras_model, model_fn = simulation.model_fns(fed, config.seed)
  process = simulation.build_process(
      config, model_fn, total_clients=len(ids),
      min_client_examples=min(fed.client_sizes.values()),
      audit=AuditHooks(return_uploads=True))
  arrays = []
  for device, cid in enumerate(ids):
    x, y = fed.client_arrays(cid)
    mine = included & (owner == device)
    arrays.append((np.concatenate([x, cx[mine]]), np.concatenate([y, cy[mine]])))
  per_round = config.clients_per_round or len(ids)
  scorer = keras_model()
  scores, on_round = _upload_scorer(scorer, process, canaries)
  state = _train(
      process, config, len(ids),
      lambda r: sorted(rng.choice(len(ids), per_round, replace=False).tolist()),
      lambda chosen: [_device_dataset(*arrays[d], config, rng) for d in chosen],
      on_round, setup.name, progress)
  seen = np.isfinite(scores)  # a canary whose device never took part
  scores[~seen] = np.min(scores[seen], initial=0.0)
  final = keras_model()
  process.get_model_weights(state).assign_weights_to(final)
  return _result(setup, process, final, fed, rng, scores, included)


def _client_audit(setup: AuditSetup, progress: bool) -> dict:
  """Andrew et al.'s canary clients for client-level DP (module docstring).

  Devices and included canaries are Poisson-sampled at clients_per_round /
  devices in every row, the non-private one too, so canaries take part as
  they do under DP-FedAvg's accounting.
  """
  from tf_dpsparse import core
  from tf_dpsparse.federated import simulation
  from tf_dpsparse.federated.learning import AuditHooks
  from tf_dpsparse.federated.learning import canary_direction
  config = setup.config
  rng = np.random.default_rng(config.seed + 1)
  fed = simulation.load_data(config)
  ids, m = fed.client_ids, setup.num_canaries
  included = rng.random(m) < 0.5
  keras_model, model_fn = simulation.model_fns(fed, config.seed)
  initial = core.flatten(keras_model().trainable_weights).numpy()
  seed, k = int(rng.integers(2**31)), core.k_for_density(
      initial.size, config.upload_density)
  hooks = AuditHooks(canary_from=len(ids), canary_seed=seed,
                     canary_norm=setup.canary_scale, canary_k=k)
  process = simulation.build_process(config, model_fn, total_clients=len(ids),
                                     min_client_examples=None, audit=hooks)
  population = np.concatenate([np.arange(len(ids)),
                               len(ids) + np.flatnonzero(included)])
  rate = (config.clients_per_round or len(ids)) / len(ids)
  empty = _device_dataset(*fed.client_arrays(ids[0]), config, rng).take(0)

  def datasets(chosen):
    return [empty if c >= len(ids) else _device_dataset(
        *fed.client_arrays(ids[c]), config, rng) for c in chosen]

  state = _train(process, config, len(ids) + m,
                 lambda r: population[rng.random(len(population)) < rate]
                 .tolist(), datasets, None, setup.name, progress)
  final = keras_model()
  process.get_model_weights(state).assign_weights_to(final)
  delta = initial - core.flatten(final.trainable_weights).numpy()
  scores = np.array([stats.cosines(delta, canary_direction(
      len(ids) + i, process.size, seed, k).numpy()[None])[0]
                     for i in range(m)])
  return _result(setup, process, final, fed, rng, scores, included)


def _result(setup, process, final_model, fed, rng, scores, included) -> dict:
  """The row of one set-up: accounting, audits, MIA, accuracy, scores."""
  config = setup.config
  one_run = stats.one_run_audit(scores, included, config.delta, CONFIDENCE)
  canary_mia = stats.membership_inference(-scores[included],
                                          -scores[~included])
  one_shot = None
  if setup.unit == 'client':
    inserted, held_out = scores[included], scores[~included]
    one_shot = dataclasses.asdict(stats.one_shot_epsilon(
        inserted, held_out, config.delta))
    one_shot['interval_90'] = stats.one_shot_interval(inserted, held_out,
                                                      config.delta)
  mia, accuracy = _real_data_mia(final_model, fed, rng)
  return {
      'name': setup.name, 'unit': setup.unit, 'dataset': config.dataset,
      'config': dataclasses.asdict(config),
      'num_canaries': len(scores), 'canary_scale': setup.canary_scale,
      'accounted_epsilon': (None if process.ledger is None else
                            process.ledger.epsilon),
      'delta': config.delta, 'noise_multiplier': process.noise_multiplier,
      'one_run': dataclasses.asdict(one_run), 'one_shot': one_shot,
      'canary_auc': canary_mia.auc, 'mia': dataclasses.asdict(mia),
      'accuracy': accuracy,
      'scores': {'inserted': scores[included].tolist(),
                 'held_out': scores[~included].tolist()},
  }


def run_setup(setup: AuditSetup, progress: bool = True) -> dict:
  """Trains one set-up with its canaries and audits it (a table row)."""
  if setup.unit not in ('example', 'client'):
    raise ValueError(f"unit must be 'example' or 'client', got {setup.unit!r}.")
  start = time.perf_counter()
  run = _example_audit if setup.unit == 'example' else _client_audit
  result = run(setup, progress)
  result['seconds'] = time.perf_counter() - start
  return result


def _epsilon_cell(result) -> str:
  eps = result['accounted_epsilon']
  return '∞ (non-private)' if eps is None else (
      f'{eps:.2f} ({result["delta"]:g})')


def summary_table(results: Sequence[dict]) -> str:
  """Markdown: set-up, unit, accounted ε (δ), empirical ε, AUCs, accuracy."""
  lines = [
      '| set-up | privacy unit | accounted ε (δ) | ε lower bound '
      f'({100 * CONFIDENCE:g} %, one run) | one-shot ε estimate [90 % '
      'bootstrap] | canary AUC '
      '| MIA AUC / advantage (real data) | test accuracy |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    one_run = r['one_run']
    bound = (f'{one_run["epsilon_lower_bound"]:.2f} ({one_run["num_correct"]}'
             f'/{one_run["num_guesses"]} of {one_run["num_canaries"]})')
    shot = '—'
    if r['one_shot'] is not None:
      low, high = r['one_shot']['interval_90']
      shot = f'{r["one_shot"]["epsilon"]:.2f} [{low:.2f}, {high:.2f}]'
    lines.append(
        f'| {r["name"]} | {r["unit"]} | {_epsilon_cell(r)} | {bound} | {shot} '
        f'| {r["canary_auc"]:.3f} | {r["mia"]["auc"]:.3f} / '
        f'{r["mia"]["advantage"]:.3f} | {r["accuracy"]:.3f} |')
  return '\n'.join(lines)


def plot(results: Sequence[dict], path: str) -> None:
  """Histograms of canary scores, inserted vs held out, one panel per row."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  cols = min(3, len(results))
  rows = -(-len(results) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows),
                           squeeze=False)
  for ax, r in zip(axes.ravel(), results):
    inserted, held_out = r['scores']['inserted'], r['scores']['held_out']
    bins = np.histogram_bin_edges(inserted + held_out, bins=30)
    ax.hist(held_out, bins=bins, alpha=0.6, label='held out')
    ax.hist(inserted, bins=bins, alpha=0.6, label='inserted')
    ax.set(title=r['name'], xlabel='upload projection' if r['unit'] ==
           'example' else 'cosine with final delta', ylabel='canaries')
    ax.legend(fontsize=8)
  for ax in axes.ravel()[len(results):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save(results: Sequence[dict], out_dir: str, command: str = '') -> dict:
  """Writes audit.json, audit.md (table, command, date) and canaries.png."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name)
           for name in ('audit.json', 'audit.md', 'canaries.png')}
  with open(paths['audit.json'], 'w') as f:
    json.dump(list(results), f, indent=1)
  with open(paths['audit.md'], 'w') as f:
    f.write(f'`{command}` ({datetime.date.today().isoformat()})\n\n'
            f'{summary_table(results)}\n')
  plot(results, paths['canaries.png'])
  return paths


def run_audit(setups: Sequence[AuditSetup], out_dir: Optional[str] = None,
              progress: bool = True, command: str = '') -> List[dict]:
  """Runs every set-up (a progress bar each) and saves to `out_dir` if given."""
  results = []
  for setup in setups:
    results.append(run_setup(setup, progress))
  if out_dir is not None:
    save(results, out_dir, command)
  return results
