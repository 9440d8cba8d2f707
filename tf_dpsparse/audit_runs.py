"""`tf-dpsparse audit`: empirical privacy audits of real training runs.

Each set-up trains with the real TFF process (`build_dp_sparse_fed_avg`:
the same sampling, DP-SGD or clipping and noise, top-k with error feedback,
wire rounding and download) with canaries inserted, then measures what an
observer learns about them (statistics in `tf_dpsparse.privacy.audit`):

- Example level (each device runs DP-SGD; the server is not trusted).
  Canaries are Dirac gradient canaries (`CanaryHead`): the set-up's model
  gets one audit-only weight per canary, which only canary i's (flagged)
  input reaches, so canary i's gradient is a fixed direction, one
  coordinate, as the white-box audits of Nasr et al. ("Tight Auditing of
  Differentially Private Machine Learning", USENIX Security 2023) and
  Steinke et al. insert gradients, but computed by the device's own DP-SGD
  code (Poisson sampling, per-example clip, noise), then top-k with error
  feedback and wire rounding. Canary i sits on device i mod D and is added
  with probability 1/2 before training. The observer is the untrusted
  server, which sees every upload: a canary's score is the sum over rounds
  of its device's uploads at its coordinate. Steinke, Nasr & Jagielski's
  one-run bound turns the scores into ε >= bound at 95 % confidence.
  (Input canaries, outlier windows or mislabeled examples, scored by the
  projection of the uploads on their gradients, found nothing under DP even
  at ε = 100 and 90 rounds, AUC <= 0.6: a convolution spreads an input's
  gradient over thousands of coordinates, of which a 1 % top-k keeps about
  1 %, and the data's own gradients cover the rest.)
- Client level (DP-FedAvg, trusted aggregator). Canaries are canary clients
  (`learning.AuditHooks`): a fixed random direction of norm `scale` (the
  clip) in place of a trained update, on as many coordinates as the upload
  sends, so top-k passes it whole. Each canary joins the population with
  probability 1/2 and is then sampled every round like a device. The
  observer sees the final model only: scores are cosines of (initial -
  final) with each direction. Andrew et al.'s one-shot estimate (Gaussian
  fits of inserted vs held-out cosines) and the one-run bound on the same
  cosines.
- Each row reports, on its canary scores, the one-run bound (sound at 95 %
  for any scores) and the equal-width Gaussian fit
  (`privacy.audit.gaussian_fit_epsilon`: an estimate with a 90 % bootstrap
  interval, whose lower end is compared with the accounted ε); client rows
  also keep Andrew et al.'s two-width fit, which overstates ε when canaries
  take part only a few times. For example-level scores (sums of the few
  values a top-k upload sends, mostly 0) the Gaussian shape is rough: the
  bound is the number to trust there.
- Membership inference on real data (TF Privacy's loss-threshold attack,
  `privacy.audit.membership_inference`): training examples vs the test
  set, on the final global model.

Canaries are test instruments: the accounted ε is the ledger's for the
set-up's schedule (canary examples only add to a device's n, so its
sampling rate stays below the accounted one; canary clients are sampled at
the devices' rate). The example-level model carries the canaries' weights
(`CanaryHead`); its outputs and gradients on real data are the set-up's.
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
EXAMPLE_CANARIES = 1000  # Dirac canaries of an example-level row
CANARY_FLAG = 1e4  # first input value of a canary (real data are standardized)


@dataclasses.dataclass
class AuditSetup:
  """One row of the audit: a run configuration and its canaries."""
  name: str
  unit: str  # 'example' or 'client'
  config: object  # tf_dpsparse.federated.simulation.RunConfig
  num_canaries: Optional[int]  # example level: None = EXAMPLE_CANARIES
  # example: a canary's gradient norm before the device's clip (the
  # CanaryHead's scale); client: a canary client's update norm
  canary_scale: float


def default_setups(quick: bool = False, large_epsilon: float = LARGE_EPSILON,
                   seed: int = 0) -> List[AuditSetup]:
  """HAPT example level and MNIST client level, each at ε = 8, at
  `large_epsilon` and non-private (the set-ups of the paper table; `quick`
  shortens the runs and shrinks MNIST's population to finish in minutes).

  HAPT rows carry EXAMPLE_CANARIES Dirac canaries; MNIST rows 1,000 canary
  clients, 400 when quick (about 20 inserted ones sampled a round beside
  20 devices; 200 gave the ε = 8 estimate a 1.6x wider interval).
  """
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
                               (mnist, 'client', 400 if quick else 1000,
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


class CanaryHead:
  """Builds the audit's model: the set-up's model plus one scalar per canary.

  A Dirac gradient canary (Nasr et al. 2021; Steinke et al. 2023, Sec. 7)
  realized in the model, so that the device's real DP-SGD code computes it:
  canary i is an input flagged with `CANARY_FLAG` in its first value and i
  in its second. Its logits are (scale * w_i - margin) on its label and 0
  elsewhere, so its loss gradient is -scale (1 - p) on w_i (p about
  e^-margin: the canary stays wrong) and exactly 0 on every other weight,
  before the device clips it. Real inputs are never flagged (the data are
  standardized), reach the unchanged model and give w exactly 0 gradient,
  so the model's outputs on real data and their gradients are those of the
  set-up. What changes: the process has `num_canaries` more coordinates,
  which get DP noise and compete for the top-k (1 % of them adds to k).
  DP-SGD's guarantee holds for any per-example gradient, so the accounted
  ε covers the canaries as any example.
  """

  def __init__(self, num_canaries: int, num_classes: int,
               scale: float = 10.0, margin: float = 20.0):
    self.num_canaries, self.num_classes = num_canaries, num_classes
    self.scale, self.margin = scale, margin

  def inputs(self, shape) -> np.ndarray:
    """The canaries' inputs, [num_canaries, *shape]: flag, then the index."""
    x = np.zeros((self.num_canaries, int(np.prod(shape))), np.float32)
    x[:, 0], x[:, 1] = CANARY_FLAG, np.arange(self.num_canaries)
    return x.reshape(self.num_canaries, *shape)

  def labels(self) -> np.ndarray:
    return (np.arange(self.num_canaries) % self.num_classes).astype(np.int32)

  def wrap(self, base):
    """`base` (a Keras model, logits out) with the canary weights, built."""
    import tensorflow as tf
    head = self

    class Headed(tf.keras.Model):

      def __init__(self):
        super().__init__()
        self.base = base
        self.canary_weights = self.add_weight(
            name='canary_weights', shape=[head.num_canaries],
            initializer='zeros', trainable=True)

      def call(self, x, training=None):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        flag = flat[:, 0] >= CANARY_FLAG / 2
        # A canary reaches `base` as zeros, so its (unused) branch is finite.
        real = self.base(tf.where(tf.reshape(flag, [-1] + [1] * (
            len(x.shape) - 1)), tf.zeros_like(x), x), training=training)
        index = tf.clip_by_value(tf.cast(flat[:, 1], tf.int32), 0,
                                 head.num_canaries - 1)
        logit = (head.scale * tf.gather(self.canary_weights, index) -
                 head.margin)
        canary = tf.one_hot(index % head.num_classes,
                            head.num_classes) * logit[:, None]
        return tf.where(flag[:, None], canary, real)

    model = Headed()
    model(tf.zeros([1, *base.input_shape[1:]]))
    return model


def canary_offset(keras_model) -> int:
  """Where the canary weights start in the flat (process) weight vector."""
  offset = 0
  for variable in keras_model.trainable_weights:
    if variable is keras_model.canary_weights:
      return offset
    offset += variable.shape.num_elements()
  raise ValueError('the model has no canary weights.')


def _headed_model_fns(fed, seed: int, head: CanaryHead):
  """`(keras_model, model_fn)` as `simulation.model_fns`, with `head`."""
  from tf_dpsparse.federated import simulation
  return simulation.model_fns(fed, seed, wrap=head.wrap)


def _dirac_scorer(offset: int, owner: np.ndarray):
  """Scores Dirac canaries from the uploads, as the untrusted server can.

  Canary i's score is minus the sum, over rounds, of what its device
  uploaded at canary i's coordinate (an upload is initial - trained, and
  the canary pushes w_i up). A sum, not a maximum: error feedback sends a
  canary's step in a later round than the one that sampled it. Only its
  own device's uploads count; the others' carry only noise there. The
  coordinates and owners are public; inclusion is not.
  """
  scores = np.zeros(len(owner))

  def on_round(ids, out):
    for device, state in zip(ids, out.client_states):
      indices = np.asarray(state['upload_indices']) - offset
      values = np.asarray(state['upload_values'], np.float64)
      mine = (indices >= 0) & (indices < len(owner))
      mine[mine] = owner[indices[mine]] == device
      np.subtract.at(scores, indices[mine], values[mine])

  return scores, on_round


def _example_audit(setup: AuditSetup, progress: bool) -> dict:
  """Steinke et al.'s one-run audit of example-level DP with Dirac canaries
  (`CanaryHead`), scored from the uploads (module docstring)."""
  from tf_dpsparse.federated import simulation
  from tf_dpsparse.federated.learning import AuditHooks
  config = setup.config
  rng = np.random.default_rng(config.seed + 1)
  fed = simulation.load_data(config)
  ids = fed.client_ids
  head = CanaryHead(setup.num_canaries or EXAMPLE_CANARIES, fed.num_classes,
                    scale=setup.canary_scale)
  keras_model, model_fn = _headed_model_fns(fed, config.seed, head)
  # Canary i on device i mod D, each included with probability 1/2.
  included = rng.random(head.num_canaries) < 0.5
  owner = np.arange(head.num_canaries) % len(ids)
  process = simulation.build_process(
      config, model_fn, total_clients=len(ids),
      min_client_examples=min(fed.client_sizes.values()),
      audit=AuditHooks(return_uploads=True))
  cx, cy = head.inputs(fed.element_spec[0].shape), head.labels()
  arrays = []
  for device, cid in enumerate(ids):
    x, y = fed.client_arrays(cid)
    mine = included & (owner == device)
    arrays.append((np.concatenate([x, cx[mine]]),
                   np.concatenate([y, cy[mine]]).astype(np.int32)))
  per_round = config.clients_per_round or len(ids)
  final = keras_model()
  scores, on_round = _dirac_scorer(canary_offset(final), owner)
  state = _train(
      process, config, len(ids),
      lambda r: sorted(rng.choice(len(ids), per_round, replace=False).tolist()),
      lambda chosen: [_device_dataset(*arrays[d], config, rng) for d in chosen],
      on_round, setup.name, progress)
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
  """The row of one set-up: accounting, audits, MIA, accuracy, scores.

  Two empirical numbers per row, on the same canary scores: the one-run
  lower bound (sound at 95 % for any scores) and the equal-width Gaussian
  fit (`estimate`: an estimate with a 90 % bootstrap interval, whose lower
  end is the one-sided 95 % limit compared with the accounted ε); client
  level also keeps Andrew et al.'s two-width fit (`one_shot`).
  """
  config = setup.config
  inserted, held_out = scores[included], scores[~included]
  one_run = stats.one_run_audit(scores, included, config.delta, CONFIDENCE)
  canary_mia = stats.membership_inference(-inserted, -held_out)
  estimate = stats.gaussian_fit_epsilon(inserted, held_out, config.delta,
                                        level=2 * CONFIDENCE - 1)
  one_shot = None
  if setup.unit == 'client':
    one_shot = dataclasses.asdict(stats.one_shot_epsilon(
        inserted, held_out, config.delta))
    one_shot['interval_90'] = stats.one_shot_interval(inserted, held_out,
                                                      config.delta)
  mia, accuracy = _real_data_mia(final_model, fed, rng)
  result = {
      'name': setup.name, 'unit': setup.unit, 'dataset': config.dataset,
      'config': dataclasses.asdict(config),
      'num_canaries': len(scores), 'canary_scale': setup.canary_scale,
      'accounted_epsilon': (None if process.ledger is None else
                            process.ledger.epsilon),
      'delta': config.delta, 'noise_multiplier': process.noise_multiplier,
      'one_run': dataclasses.asdict(one_run),
      'estimate': dataclasses.asdict(estimate), 'one_shot': one_shot,
      'canary_auc': canary_mia.auc, 'mia': dataclasses.asdict(mia),
      'accuracy': accuracy,
      'scores': {'inserted': inserted.tolist(), 'held_out': held_out.tolist()},
  }
  result['verdict'] = verdict(result)
  return result


def verdict(result: dict) -> str:
  """The issue's targets for one row, as a word.

  Private: 'within ε' when the one-run bound and the estimate's lower end
  (one-sided 95 %) are both <= the accounted ε, else 'ABOVE ε' (the
  evidence of a leak). Non-private: 'leak detected' when the bound is > 1
  or a membership AUC (canaries or real data) is >= 0.6.
  """
  bound = result['one_run']['epsilon_lower_bound']
  if result['accounted_epsilon'] is not None:
    within = max(bound, result['estimate']['low']) <= (
        result['accounted_epsilon'])
    return 'within ε' if within else 'ABOVE ε'
  detected = (bound > 1 or result['canary_auc'] >= 0.6 or
              result['mia']['auc'] >= 0.6)
  return 'leak detected' if detected else 'leak NOT detected'


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


def _number(value: float) -> str:
  return '∞' if value == float('inf') else f'{value:.2f}'


def _interval_cell(value: float, low: float, high: float) -> str:
  return f'{_number(value)} [{_number(low)}, {_number(high)}]'


def _ratio_cell(r: dict) -> str:
  """Bound and estimate over the accounted ε: how tight the accountant is."""
  eps = r['accounted_epsilon']
  if eps is None:
    return '—'
  return (f'{r["one_run"]["epsilon_lower_bound"] / eps:.2f}, '
          f'{r["estimate"]["epsilon"] / eps:.2f}')


def summary_table(results: Sequence[dict]) -> str:
  """Markdown: set-up, unit, accounted ε (δ), the one-run bound, the
  estimates, their ratios to the accounted ε, AUCs, accuracy, verdict."""
  lines = [
      '| set-up | privacy unit | accounted ε (δ) | ε lower bound '
      f'({100 * CONFIDENCE:g} %, one run): a bound | ε estimate [90 % CI]: '
      'equal-width Gaussian fit, not a bound | Andrew et al. two-width fit '
      '[90 % CI] | bound, estimate / accounted ε | canary AUC '
      '| MIA AUC / advantage (real data) | test accuracy | target |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    one_run, est = r['one_run'], r['estimate']
    bound = (f'{one_run["epsilon_lower_bound"]:.2f} ({one_run["num_correct"]}'
             f'/{one_run["num_guesses"]} of {one_run["num_canaries"]})')
    shot = '—'
    if r['one_shot'] is not None:
      shot = _interval_cell(r['one_shot']['epsilon'],
                            *r['one_shot']['interval_90'])
    lines.append(
        f'| {r["name"]} | {r["unit"]} | {_epsilon_cell(r)} | {bound} | '
        f'{_interval_cell(est["epsilon"], est["low"], est["high"])} | {shot} '
        f'| {_ratio_cell(r)} | {r["canary_auc"]:.3f} | {r["mia"]["auc"]:.3f} '
        f'/ {r["mia"]["advantage"]:.3f} | {r["accuracy"]:.3f} | '
        f'{r["verdict"]} |')
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
    ax.set(title=r['name'], xlabel='sum of uploads at its weight' if r['unit'] ==
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
