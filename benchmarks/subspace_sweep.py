"""Sweep: DP federated training in a public random subspace (issue 18, step 1).

The model is theta = theta0 + P z: theta0 is the public seeded initial model
(`tds.models.build_model`), P a public random projection from s to d
dimensions generated from a seed, and only z (s values) is trained, clipped,
noised, uploaded and broadcast. P is never stored as a d x s matrix:

- `sketch`: count sketch. Each of the d coordinates is hashed to one of s
  buckets (balanced: a random permutation modulo s) with a random sign, and
  each column is scaled to unit norm: (P z)_i = sign_i z[bucket_i] / sqrt(n_b).
  Autodiff turns the gather into the segment sum P^T g.
- `layer`: the same, per layer: each layer gets s_l ~ s n_l / d buckets of its
  own, scaled by the layer's initialization scale (std of its Glorot kernel;
  biases take their layer's), normalized so the mean squared column norm is 1.
- `srht`: subsampled randomized Hadamard transform: z is scattered into s of
  D = 2^ceil(log2 d) slots, a fast Walsh-Hadamard transform (in TF, log2 D
  butterfly stages), random signs, the first d coordinates, scaled so columns
  have unit norm on average.
- `dense`: P = I (s = d): dense DP-FedAvg / DP-SGD, the same-run baselines.

Set-ups (the data and models of the package):

- mnist: 1,000 Dirichlet(0.5) clients, Poisson sampling q = 0.05, client-level
  DP: each device runs `steps` SGD steps (batch 16) on z, clips its z-update at
  `clip`, the server adds N(0, (sigma clip)^2) to the sum and divides by the
  expected cohort 50; sigma = calibrate(8, 1e-5, 0.05, rounds).
- hapt: 30 users, every device every round, example-level DP: each device runs
  `steps` DP-SGD steps on z, Poisson batches q_i = 16 / n_i, per-example clip in
  z-space, noise on the sum, divided by the expected batch 16;
  sigma = calibrate(8, 1e-5, 16 / min n_i, rounds * steps).

The server optimizer acts on the noised aggregate of z-updates (post-
processing): sgd, momentum 0.9, adam (TFF's defaults, epsilon 1e-7).
Bytes are float32 values: a sampled device uploads s and downloads s (z, or
its change since the device's last sync: exact at any staleness); dense
FedAvg sends d each way. Noise and sampling are seeded here (benchmark
reproducibility); tuning is not charged to epsilon.

Usage:
  python benchmarks/subspace_sweep.py run --dataset mnist --rounds 50 \
      --grid proj=sketch s=0.02 server=sgd:1,adam:0.03 clr=0.3,1 steps=5 \
      clip=0.3
  python benchmarks/subspace_sweep.py report
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import pathlib
import platform
import sys
import time
from typing import Dict, List

import numpy as np
import tensorflow as tf

import tf_dpsparse as tds
from tf_dpsparse import models

RESULTS = pathlib.Path(__file__).resolve().parent / 'results'
JSON_PATH = RESULTS / 'subspace_sweep.json'
MD_PATH = RESULTS / 'subspace_sweep.md'
PNG_PATH = RESULTS / 'subspace_sweep.png'
DELTA = 1e-5
EPSILON = 8.0
BATCH = 16
DEFAULTS = dict(proj='sketch', s='0.02', server='sgd:1', clr='0.1',
                steps='5', clip='0.3', seed='0', noise='1')


class FlatModel:
  """`tds.models.build_model` as a function of flat weights [G, d].

  Every one of G weight sets is applied to its own batch: x is [G, B, ...].
  Convolutions are written as patches @ kernel (batched matmul), so G clients
  (or G examples, for per-example gradients) run as one computation.
  """

  def __init__(self, input_shape, num_classes: int, seed: int = 0):
    keras_model = models.build_model(input_shape, num_classes, seed=seed)
    variables = keras_model.trainable_variables
    self.keras_model = keras_model
    self.shapes = [tuple(v.shape) for v in variables]
    self.sizes = [int(np.prod(s)) for s in self.shapes]
    self.theta0 = np.concatenate(
        [v.numpy().ravel() for v in variables]).astype(np.float32)
    self.d = int(self.theta0.size)
    self.conv1d = len(input_shape) == 2

  def unflatten(self, theta):
    out, offset = [], 0
    for shape, size in zip(self.shapes, self.sizes):
      out.append(tf.reshape(theta[:, offset:offset + size], [-1, *shape]))
      offset += size
    return out

  def logits(self, theta, x):
    """Logits [G, B, classes] of weights theta [G, d] on inputs x [G, B, ...].

    The G weight sets run as one grouped convolution: channels of group g
    are g's, activations laid out [B, ..., G * channels].
    """
    w = self.unflatten(theta)
    g, b = tf.shape(x)[0], tf.shape(x)[1]
    spatial = list(x.shape[2:-1])
    perm = [1, *range(2, 2 + len(spatial)), 0, 2 + len(spatial)]
    h = tf.transpose(x, perm)  # [B, ..., G, C]
    h = tf.reshape(h, tf.concat([[b], spatial, [-1]], 0))
    for i in (0, 2):
      h = tf.nn.relu(_grouped_conv(h, w[i], w[i + 1], self.conv1d))
      if self.conv1d:
        h = tf.nn.max_pool1d(h, 2, 2, 'VALID')
      else:
        h = tf.nn.max_pool2d(h, 2, 2, 'VALID')
    if self.conv1d:
      h = tf.reduce_mean(h, axis=1)  # [B, G * C]
    cout = self.shapes[2][-1]
    rank = h.shape.rank
    h = tf.reshape(h, tf.concat([[b], tf.shape(h)[1:-1], [g, cout]], 0))
    h = tf.transpose(h, [rank - 1, 0, *range(1, rank - 1), rank])
    h = tf.reshape(h, [g, b, -1])
    h = tf.nn.relu(tf.matmul(h, w[4]) + w[5][:, None, :])
    return tf.matmul(h, w[6]) + w[7][:, None, :]


def _grouped_conv(h, kernel, bias, conv1d: bool):
  """'valid' stride-1 convolution, kernel [G, ..., C, Cout] per group."""
  rank = kernel.shape.rank
  perm = [*range(1, rank - 1), 0, rank - 1]  # [..., C, G, Cout]
  filters = tf.transpose(kernel, perm)
  filters = tf.reshape(filters, [*kernel.shape[1:-1], -1])
  if conv1d:
    out = tf.nn.conv1d(h, filters, 1, 'VALID')
  else:
    out = tf.nn.conv2d(h, filters, 1, 'VALID')
  return out + tf.reshape(bias, [-1])


class Projection:
  """theta - theta0 = P z for z [G, s]; memory O(d)."""

  def __init__(self, kind: str, model: FlatModel, s: int, seed: int):
    self.kind, self.d = kind, model.d
    rng = np.random.default_rng([seed, 7])
    if kind == 'dense':
      self.s = model.d
    elif kind == 'sketch':
      self.s = s
      self._sketch(rng, [(model.d, s, 1.0)])
    elif kind == 'layer':
      self.s = s
      self._sketch(rng, _layer_blocks(model, s))
    elif kind == 'srht':
      self.s = s
      self._srht(rng, s)
    else:
      raise ValueError(f'unknown projection {kind!r}')

  def _sketch(self, rng, blocks):
    """Count sketch over consecutive blocks (size, buckets, scale)."""
    buckets, scales, first = [], [], 0
    for size, s_b, scale in blocks:
      b = rng.permutation(size) % s_b
      counts = np.bincount(b, minlength=s_b)
      buckets.append(b + first)
      scales.append(scale / np.sqrt(counts[b]))
      first += s_b
    signs = rng.choice([-1.0, 1.0], size=self.d)
    self.bucket = tf.constant(np.concatenate(buckets).astype(np.int32))
    self.coef = tf.constant(
        (signs * np.concatenate(scales)).astype(np.float32))

  def _srht(self, rng, s):
    self.padded = 1 << int(math.ceil(math.log2(self.d)))
    slots = rng.choice(self.padded, size=s, replace=False)
    where = np.full(self.padded, s, np.int32)  # s: the appended zero
    where[slots] = np.arange(s, dtype=np.int32)
    self.where = tf.constant(where)
    signs = rng.choice([-1.0, 1.0], size=self.d)
    self.coef = tf.constant((signs / math.sqrt(self.d)).astype(np.float32))

  def up(self, z):
    """P z for z [G, s] -> [G, d]."""
    if self.kind == 'dense':
      return z
    if self.kind == 'srht':
      padded = tf.concat([z, tf.zeros_like(z[:, :1])], 1)
      v = fwht(tf.gather(padded, self.where, axis=1), self.padded)
      return v[:, :self.d] * self.coef
    return tf.gather(z, self.bucket, axis=1) * self.coef


def fwht(v, n: int):
  """Unnormalized fast Walsh-Hadamard transform of the rows of v [G, n]."""
  h = 1
  while h < n:
    x = tf.reshape(v, [-1, n // (2 * h), 2, h])
    a, b = x[:, :, 0, :], x[:, :, 1, :]
    v = tf.reshape(tf.stack([a + b, a - b], axis=2), [-1, n])
    h *= 2
  return v


def _layer_blocks(model: FlatModel, s: int):
  """(size, buckets, scale) per layer: buckets ~ size, scale ~ init std."""
  sizes = np.array([k + b for k, b in zip(model.sizes[0::2],
                                          model.sizes[1::2])])
  share = np.maximum(1, np.floor(s * sizes / sizes.sum())).astype(int)
  share[np.argmax(sizes)] += s - share.sum()
  stds, offset = [], 0
  for k, b in zip(model.sizes[0::2], model.sizes[1::2]):
    stds.append(model.theta0[offset:offset + k].std())
    offset += k + b
  stds = np.array(stds)
  stds /= np.sqrt((share * stds**2).sum() / s)
  return list(zip(sizes, share, stds))


class ServerOptimizer:
  """sgd / momentum 0.9 / adam on z, fed the noised mean update u.

  `adamc` is adam whose learning rate decays over the run (cosine, to 0).
  """

  def __init__(self, spec: str, s: int, rounds: int):
    self.kind, lr = spec.split(':')
    self.lr0, self.rounds = float(lr), rounds
    self.m = np.zeros(s, np.float64)
    self.v = np.zeros(s, np.float64)
    self.t = 0

  def step(self, z, u):
    self.t += 1
    self.lr = self.lr0
    if self.kind == 'adamc':
      self.lr *= 0.5 * (1 + math.cos(math.pi * (self.t - 1) / self.rounds))
    if self.kind == 'sgd':
      return z + self.lr * u
    if self.kind == 'mom':
      self.m = 0.9 * self.m + u
      return z + self.lr * self.m
    if self.kind in ('adam', 'adamc'):
      g = -u
      self.m = 0.9 * self.m + 0.1 * g
      self.v = 0.999 * self.v + 0.001 * g * g
      m_hat = self.m / (1 - 0.9**self.t)
      v_hat = self.v / (1 - 0.999**self.t)
      return z - self.lr * m_hat / (np.sqrt(v_hat) + 1e-7)
    raise ValueError(f'unknown server optimizer {self.kind!r}')


class Setup:
  """A data set as a training pool on the TF side, and its clients' rows."""

  def __init__(self, name: str, seed: int = 0):
    if name == 'mnist':
      fd = tds.data.load('mnist', num_clients=1000, partition='dirichlet',
                         alpha=0.5, seed=seed)
    else:
      fd = tds.data.load('hapt')
    self.name = name
    x, y = fd.train_arrays()
    sizes = [fd.client_sizes[c] for c in fd.client_ids]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    self.rows = [np.arange(offsets[i], offsets[i + 1]) for i in
                 range(len(sizes))]
    self.sizes = np.array(sizes)
    self.x, self.y = tf.constant(x), tf.constant(y.astype(np.int32))
    self.test_x, self.test_y = fd.test_arrays()
    self.model = FlatModel(x.shape[1:], fd.num_classes, seed=seed)

  def accuracy(self, theta: np.ndarray, chunk: int = 1000) -> float:
    theta = tf.constant(theta[None].astype(np.float32))
    hits = 0
    for i in range(0, len(self.test_y), chunk):
      x = tf.constant(self.test_x[i:i + chunk][None])
      pred = tf.argmax(self.model.logits(theta, x)[0], -1).numpy()
      hits += int((pred == self.test_y[i:i + chunk]).sum())
    return hits / len(self.test_y)


def _loss(model, proj, z, x, y):
  """Sum over the G rows of each row's mean cross-entropy."""
  theta = model.theta0 + proj.up(z)
  logits = model.logits(theta, x)
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
  return tf.reduce_sum(tf.reduce_mean(ce, axis=1))


def _clip_rows(v, clip: float):
  norms = tf.norm(v, axis=1)
  return v * tf.minimum(1.0, clip / (norms + 1e-12))[:, None], norms


def client_fn(setup: Setup, proj: Projection, steps: int, lr: float,
              clip: float):
  """(z, rows [m, steps, B]) -> (sum of clipped z-updates, their norms)."""
  model = setup.model

  @tf.function(input_signature=[
      tf.TensorSpec([proj.s], tf.float32),
      tf.TensorSpec([None, steps, BATCH], tf.int32)])
  def run(z, rows):
    zc = tf.tile(z[None], [tf.shape(rows)[0], 1])
    for t in range(steps):
      x, y = tf.gather(setup.x, rows[:, t]), tf.gather(setup.y, rows[:, t])
      with tf.GradientTape() as tape:
        tape.watch(zc)
        loss = _loss(model, proj, zc, x, y)
      zc = zc - lr * tape.gradient(loss, zc)
    clipped, norms = _clip_rows(zc - z[None], clip)
    return tf.reduce_sum(clipped, 0), norms

  return run


def dpsgd_fn(setup: Setup, proj: Projection, clip: float):
  """(z per device, rows, owner) -> per device sum of clipped per-example
  z-gradients (each example gets its own copy of its device's z)."""
  model, devices = setup.model, len(setup.sizes)

  @tf.function(input_signature=[
      tf.TensorSpec([devices, proj.s], tf.float32),
      tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)])
  def run(zc, rows, owner):
    ze = tf.gather(zc, owner)
    x = tf.gather(setup.x, rows)[:, None]
    y = tf.gather(setup.y, rows)[:, None]
    with tf.GradientTape() as tape:
      tape.watch(ze)
      loss = _loss(model, proj, ze, x, y)
    clipped, norms = _clip_rows(tape.gradient(loss, ze), clip)
    return tf.math.unsorted_segment_sum(clipped, owner, devices), norms

  return run


def _batches(setup: Setup, cohort, steps: int, rng) -> np.ndarray:
  """Each device's rows for `steps` batches: its data in a random order,
  cycled (devices with fewer than steps * B examples repeat some)."""
  out = np.empty((len(cohort), steps, BATCH), np.int32)
  for j, c in enumerate(cohort):
    order = rng.permutation(setup.rows[c])
    out[j] = np.resize(order, steps * BATCH).reshape(steps, BATCH)
  return out


def _evals(rounds: int):
  return {max(1, rounds * k // 4) for k in (1, 2, 3, 4)}


def run_mnist(setup: Setup, cfg: Dict, rounds: int) -> Dict:
  """Cross-device client-level DP-FedAvg on z; returns the run's record."""
  q, expected = 0.05, 50
  seed = cfg['seed']
  proj = Projection(cfg['proj'], setup.model, _dims(cfg, setup), seed)
  sigma = tds.privacy.calibrate_noise_multiplier(EPSILON, DELTA, q, rounds)
  sigma *= cfg['noise']  # 1 unless a diagnostic run (0: no noise)
  rng_sample = np.random.default_rng([seed, 1])
  rng_batch = np.random.default_rng([seed, 2])
  rng_noise = np.random.default_rng([seed, 3])
  fn = client_fn(setup, proj, cfg['steps'], cfg['clr'], cfg['clip'])
  opt = ServerOptimizer(cfg['server'], proj.s, rounds)
  z, devices, curve, clipped = np.zeros(proj.s), 0, {}, []
  start = time.time()
  for r in range(1, rounds + 1):
    cohort = np.flatnonzero(rng_sample.random(len(setup.sizes)) < q)
    total = np.zeros(proj.s)
    if cohort.size:
      rows = _batches(setup, cohort, cfg['steps'], rng_batch)
      total, norms = fn(tf.constant(z, tf.float32), tf.constant(rows))
      total = total.numpy().astype(np.float64)
      clipped.append(float(np.mean(norms.numpy() > cfg['clip'])))
    noised = total + rng_noise.normal(0.0, sigma * cfg['clip'], proj.s)
    z = opt.step(z, noised / expected)
    devices += cohort.size
    if r in _evals(rounds):
      curve[r] = _theta_accuracy(setup, proj, z)
  eps = (tds.privacy.compute_epsilon(sigma, q, rounds, DELTA) if sigma
         else math.inf)
  return _record(cfg, setup, proj, rounds, sigma, eps, curve, devices,
                 float(np.mean(clipped)), time.time() - start)


def run_hapt(setup: Setup, cfg: Dict, rounds: int) -> Dict:
  """Example-level DP: each device DP-SGD on z, all devices every round."""
  seed, steps, n = cfg['seed'], cfg['steps'], len(setup.sizes)
  proj = Projection(cfg['proj'], setup.model, _dims(cfg, setup), seed)
  q_max = BATCH / setup.sizes.min()
  sigma = tds.privacy.calibrate_noise_multiplier(EPSILON, DELTA, q_max,
                                                 rounds * steps)
  sigma *= cfg['noise']  # 1 unless a diagnostic run (0: no noise)
  rng_batch = np.random.default_rng([seed, 2])
  rng_noise = np.random.default_rng([seed, 3])
  fn = dpsgd_fn(setup, proj, cfg['clip'])
  opt = ServerOptimizer(cfg['server'], proj.s, rounds)
  owner_all = np.concatenate([np.full(k, i, np.int32)
                              for i, k in enumerate(setup.sizes)])
  rows_all = np.concatenate(setup.rows).astype(np.int32)
  q_all = BATCH / setup.sizes[owner_all]
  z, curve, clipped = np.zeros(proj.s), {}, []
  start = time.time()
  for r in range(1, rounds + 1):
    zc = np.tile(z, (n, 1))
    for _ in range(steps):
      pick = rng_batch.random(len(rows_all)) < q_all
      gsum, norms = fn(tf.constant(zc, tf.float32),
                       tf.constant(rows_all[pick]),
                       tf.constant(owner_all[pick]))
      clipped.append(float(np.mean(norms.numpy() > cfg['clip'])))
      noise = rng_noise.normal(0.0, sigma * cfg['clip'], zc.shape)
      zc = zc - cfg['clr'] * (gsum.numpy() + noise) / BATCH
    z = opt.step(z, (zc - z).mean(axis=0))
    if r in _evals(rounds):
      curve[r] = _theta_accuracy(setup, proj, z)
  eps = (tds.privacy.compute_epsilon(sigma, q_max, rounds * steps, DELTA)
         if sigma else math.inf)
  return _record(cfg, setup, proj, rounds, sigma, eps, curve, n * rounds,
                 float(np.mean(clipped)), time.time() - start)


def _dims(cfg: Dict, setup: Setup) -> int:
  return max(1, int(round(cfg['s'] * setup.model.d)))


def _theta_accuracy(setup: Setup, proj: Projection, z) -> float:
  delta = proj.up(tf.constant(z[None], tf.float32))[0].numpy()
  return setup.accuracy(setup.model.theta0 + delta)


def _record(cfg, setup, proj, rounds, sigma, eps, curve, devices, clipped,
            seconds) -> Dict:
  up = down = 4 * proj.s * devices
  dense = 4 * setup.model.d * devices
  return dict(
      cfg, dataset=setup.name, rounds=rounds, d=setup.model.d, dims=proj.s,
      noise_multiplier=sigma, epsilon=None if math.isinf(eps) else eps,
      delta=DELTA,
      accuracy=curve[rounds], curve={str(k): v for k, v in curve.items()},
      device_rounds=devices, bytes_up=up, bytes_down=down,
      bytes_pct_of_dense=100.0 * (up + down) / (2 * dense),
      frac_clipped=clipped, seconds=seconds, s_per_round=seconds / rounds,
      date=datetime.date.today().isoformat())


def expand(grid: List[str]) -> List[Dict]:
  """key=v1,v2 ... -> the cartesian product of configs (DEFAULTS fill in)."""
  spec = dict(DEFAULTS)
  for item in grid:
    key, values = item.split('=', 1)
    if key not in DEFAULTS:
      raise ValueError(f'unknown grid key {key!r}; keys: {list(DEFAULTS)}')
    spec[key] = values
  keys = list(spec)
  configs = []
  for combo in itertools.product(*(spec[k].split(',') for k in keys)):
    cfg = dict(zip(keys, combo))
    for key in ('s', 'clr', 'clip', 'noise'):
      cfg[key] = float(cfg[key])
    cfg['steps'], cfg['seed'] = int(cfg['steps']), int(cfg['seed'])
    if cfg['proj'] == 'dense':
      cfg['s'] = 1.0
    if cfg not in configs:
      configs.append(cfg)
  return configs


def load_results() -> List[Dict]:
  if not JSON_PATH.exists():
    return []
  runs = json.loads(JSON_PATH.read_text())['runs']
  for r in runs:
    r.setdefault('noise', 1.0)
  return runs


def save_results(runs: List[Dict]) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  meta = dict(script='benchmarks/subspace_sweep.py',
              python=platform.python_version(), tensorflow=tf.__version__,
              epsilon=EPSILON, delta=DELTA,
              note='tuning is not charged to epsilon; noise and sampling '
              'seeded')
  JSON_PATH.write_text(json.dumps(dict(meta=meta, runs=runs), indent=1))


def _same(a: Dict, b: Dict) -> bool:
  keys = ('dataset', 'rounds', *DEFAULTS)
  return all(a.get(k) == b.get(k) for k in keys)


def cmd_run(args) -> None:
  setup = Setup(args.dataset)
  runner = run_mnist if args.dataset == 'mnist' else run_hapt
  deadline = time.time() + 60 * args.minutes if args.minutes else None
  for cfg in expand(args.grid):
    runs = load_results()
    probe = dict(cfg, dataset=args.dataset, rounds=args.rounds)
    if any(_same(probe, r) for r in runs):
      print('skip (done)', cfg, flush=True)
      continue
    if deadline and time.time() > deadline:
      print('time box reached; stopping', flush=True)
      return
    record = runner(setup, cfg, args.rounds)
    record['command'] = ' '.join(sys.argv)
    runs = load_results() + [record]
    save_results(runs)
    print(f"{record['accuracy']:.4f} {record['bytes_pct_of_dense']:.2f}% "
          f"{record['s_per_round']:.2f}s/r clipped {record['frac_clipped']:.2f}"
          f' {cfg}', flush=True)


def cmd_check(args) -> None:
  """The flat model matches the Keras model; projections have ~unit columns."""
  setup = Setup(args.dataset)
  model = setup.model
  x = setup.test_x[:8]
  want = model.keras_model(x).numpy()
  got = model.logits(tf.constant(model.theta0[None]), tf.constant(x[None]))
  print('max |flat - keras| logits:', np.abs(got[0].numpy() - want).max())
  rng = np.random.default_rng(0)
  thetas = model.theta0 + 0.05 * rng.normal(size=(3, model.d))
  xs = np.stack([setup.test_x[8 * i:8 * i + 8] for i in range(3)])
  many = model.logits(tf.constant(thetas, tf.float32), tf.constant(xs))
  one = [model.logits(tf.constant(thetas[i:i + 1], tf.float32),
                      tf.constant(xs[i:i + 1]))[0] for i in range(3)]
  print('max |grouped - one by one|:', np.abs(many - np.stack(one)).max())
  for kind in ('sketch', 'layer', 'srht'):
    proj = Projection(kind, model, int(0.02 * model.d), 0)
    eye = tf.one_hot(np.arange(0, proj.s, max(1, proj.s // 50)), proj.s)
    cols = proj.up(eye).numpy()
    norms = np.linalg.norm(cols, axis=1)
    gram = cols @ cols.T
    off = np.abs(gram - np.diag(np.diag(gram))).max()
    print(f'{kind}: s={proj.s} column norms {norms.mean():.3f} +- '
          f'{norms.std():.3f}, max |off-diagonal| {off:.3f}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='cmd', required=True)
  run = sub.add_parser('run', help='run a grid, appending to the json')
  run.add_argument('--dataset', choices=('mnist', 'hapt'), required=True)
  run.add_argument('--rounds', type=int, required=True)
  run.add_argument('--grid', nargs='*', default=[],
                   help=f'key=v1,v2 with keys {list(DEFAULTS)}')
  run.add_argument('--minutes', type=float, default=None,
                   help='start no new run after this many minutes')
  check = sub.add_parser('check', help='sanity checks of model/projections')
  check.add_argument('--dataset', choices=('mnist', 'hapt'), default='mnist')
  report = sub.add_parser('report', help='write the markdown from the json')
  report.add_argument('--notes', help='markdown to put above the tables')
  args = parser.parse_args(argv)
  {'run': cmd_run, 'check': cmd_check, 'report': cmd_report}[args.cmd](args)


def _cfg_text(r: Dict) -> str:
  return (f"{r['proj']}, {r['server']}, client lr {r['clr']:g}, "
          f"{r['steps']} steps, clip {r['clip']:g}")


def _row(r: Dict, refs: Dict) -> str:
  gaps = ' / '.join(f"{100 * (r['accuracy'] - v['accuracy']):+.1f}"
                    for v in refs.values()) or '—'
  return (f"| {100 * r['s']:g} % ({r['dims']}) | {_cfg_text(r)} | "
          f"{r['accuracy']:.4f} | {gaps} | "
          f"{r['bytes_pct_of_dense']:.2f} % | {r['noise_multiplier']:.3f} | "
          f"{_eps(r)} | {r['s_per_round']:.2f} |")


def _eps(r: Dict) -> str:
  return '∞ (no noise)' if r['epsilon'] is None else f"{r['epsilon']:.2f}"


def _best(runs: List[Dict], key) -> List[Dict]:
  best = {}
  for r in runs:
    k = key(r)
    if k not in best or r['accuracy'] > best[k]['accuracy']:
      best[k] = r
  return [best[k] for k in sorted(best)]


def _group_tables(runs: List[Dict]) -> List[str]:
  """Baselines, best per s / projection / server optimizer, all runs."""
  dense_runs = [r for r in runs if r['proj'] == 'dense' and r['noise'] == 1]
  refs = {}
  sgd = [r for r in dense_runs if r['server'] == 'sgd:1']
  if sgd:
    best = max(sgd, key=lambda r: r['accuracy'])
    refs[f'best dense SGD lr 1 (client lr {best["clr"]:g})'] = best
  if dense_runs:
    best = max(dense_runs, key=lambda r: r['accuracy'])
    refs[f'best dense ({best["server"]})'] = best
  private = [r for r in runs if r['proj'] != 'dense' and r['noise'] == 1]
  head = ['| s (dims) | setting | accuracy | points vs ' + ' / '.join(refs) +
          ' | bytes vs dense FedAvg | σ | ε | s/round |',
          '| --- | --- | --- | --- | --- | --- | --- | --- |']
  out = ['Dense DP baselines (same ε, rounds, sampling, seed):', ''] + head
  out += [_row(r, refs) for r in dense_runs]
  sections = [
      ('Best per s (the frontier)', lambda r: r['s']),
      ('Best per projection and s', lambda r: (r['proj'], r['s'])),
      ('Best per server optimizer and s',
       lambda r: (r['server'].split(':')[0], r['s'])),
  ]
  for title, key in sections:
    out += ['', f'{title}:', ''] + head
    out += [_row(r, refs) for r in _best(private, key)]
  out += ['', f'All {len(runs)} runs, best first (σ = 0: a no-noise '
          'diagnostic, not private):', ''] + head
  out += [_row(r, refs) for r in sorted(runs, key=lambda r: -r['accuracy'])]
  return out


def write_plot(runs: List[Dict], path: pathlib.Path) -> None:
  """Accuracy vs bytes (% of dense FedAvg): best per projection and s."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  groups = sorted({(r['dataset'], r['rounds']) for r in runs},
                  key=lambda g: (g[0] != 'mnist', -g[1]))
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4),
                           squeeze=False)
  for ax, (dataset, rounds) in zip(axes[0], groups):
    group = [r for r in runs if (r['dataset'], r['rounds']) == (dataset,
                                                                  rounds)
             and r['noise'] == 1.0]
    for proj in sorted({r['proj'] for r in group} - {'dense'}):
      best = _best([r for r in group if r['proj'] == proj], lambda r: r['s'])
      ax.plot([r['bytes_pct_of_dense'] for r in best],
              [r['accuracy'] for r in best], 'o-', label=f'subspace {proj}')
    dense = _best([r for r in group if r['proj'] == 'dense'],
                  lambda r: r['server'])
    for r, style in zip(dense, ('--', ':', '-.', '--', ':')):
      ax.axhline(r['accuracy'], ls=style, color='gray',
                 label=f"dense DP {r['server']} (100 %)")
    ax.set_xscale('log')
    ax.set_xlabel('bytes, % of dense FedAvg')
    ax.set_ylabel('test accuracy')
    ax.set_title(f'{dataset}, {rounds} rounds, ε = 8')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)

def cmd_report(args) -> None:
  """Writes the markdown tables (and notes, if given) from the json."""
  runs = load_results()
  lines = ['# Subspace sweep (issue 18, step 1)', '']
  if args.notes:
    lines += [pathlib.Path(args.notes).read_text().rstrip(), '']
  groups = sorted({(r['dataset'], r['rounds']) for r in runs},
                  key=lambda g: (g[0] != 'mnist', -g[1]))
  for dataset, rounds in groups:
    group = [r for r in runs if (r['dataset'], r['rounds']) == (dataset,
                                                                  rounds)]
    dates = sorted({r['date'] for r in group})
    lines += [f'## {dataset}, {rounds} rounds ({", ".join(dates)})', '']
    lines += _group_tables(group) + ['']
  commands = sorted({r['command'] for r in runs})
  lines += ['## Commands', '', '```'] + commands + ['```', '']
  write_plot(runs, PNG_PATH)
  lines += [f'![accuracy vs bytes]({PNG_PATH.name})', '']
  MD_PATH.write_text('\n'.join(lines))
  print(f'wrote {MD_PATH}')


if __name__ == '__main__':
  main()
