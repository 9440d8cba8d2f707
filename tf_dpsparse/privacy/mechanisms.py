"""DP as an object: each mechanism owns its noise and the DpEvent it spends.

A front is handed one of these (or None, no privacy) and nests it; nothing
branches on a mode string. Two units of privacy:

- `ExampleLevelDP`: DP-SGD on the device (untrusted server). Each step
  Poisson-samples the device's examples, clips each example's gradient and
  adds Gaussian noise once (`private_gradient`); a round is `local_steps`
  such steps (`round_event`). The upload is DP before it leaves the device.
- `ClientLevelDP`: DP-FedAvg (McMahan et al., ICLR 2018) with a trusted
  aggregator. Its `query()` is a TF Privacy `DPQuery` (each device's update
  clipped to `l2_norm_clip`, the sum noised, divided by the expected cohort
  `clients_per_round`): the TFF front nests it in TFF's
  `DifferentiallyPrivateFactory`, the deployment server runs it eagerly, and
  `round_event` is the event that same query emits, Poisson-sampled over
  devices. Devices must be sampled independently at rate
  clients_per_round / total_clients, as the accountant assumes.

`calibrated(mechanism, target_epsilon, rounds, delta)` sets the noise
multiplier that spends the target over `rounds` rounds.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar, Optional

import dp_accounting
import tensorflow as tf
import tensorflow_privacy as tfp

from tf_dpsparse import core
from tf_dpsparse.privacy import accounting


class GaussianSumQuery(tfp.GaussianSumQuery):
  """TF Privacy's Gaussian sum query, its noise from `core.add_gaussian_noise`.

  With `seed` (tests, parity checks) release r's noise comes from the
  stateless seed (seed, r), r counted in the global state; without, from OS
  entropy. The event is tfp's: a Gaussian of noise multiplier stddev/clip.
  """

  _GlobalState = collections.namedtuple(
      '_GlobalState', ['l2_norm_clip', 'stddev', 'release'])

  def __init__(self, l2_norm_clip: float, stddev: float,
               seed: Optional[int] = None):
    super().__init__(l2_norm_clip, stddev)
    self._seed = seed

  def make_global_state(self, l2_norm_clip, stddev):
    return self._GlobalState(tf.cast(l2_norm_clip, tf.float32),
                             tf.cast(stddev, tf.float32),
                             tf.constant(0, tf.int64))

  def get_noised_result(self, sample_state, global_state):
    seed = None if self._seed is None else core.fold_in_seed(
        self._seed, global_state.release)
    result = core.add_gaussian_noise(sample_state, global_state.stddev, seed)
    event = dp_accounting.GaussianDpEvent(self._stddev / self._l2_norm_clip)
    return result, global_state._replace(
        release=global_state.release + 1), event


def _check_positive(**values) -> None:
  for name, value in values.items():
    if value is None or not value > 0:
      raise ValueError(f'{name} must be > 0, got {value}.')


def _check_noise_multiplier(noise_multiplier) -> None:
  if noise_multiplier is None or noise_multiplier < 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')


@dataclasses.dataclass(frozen=True)
class ClientLevelDP:
  """DP-FedAvg: clip each device's update, noise the sum once, trusted server.

  The aggregator sees every device's update (and its top-k indices) and is
  trusted to release only the noised aggregate. Devices clip what they
  send (`upload_clip`); the query clips again on arrival, so a device
  cannot raise its own sensitivity.
  """
  l2_norm_clip: float
  noise_multiplier: float
  clients_per_round: float  # expected cohort: the public denominator
  total_clients: int
  seed: Optional[int] = None
  unit: ClassVar[str] = 'client'
  steps_per_round: ClassVar[int] = 1

  def __post_init__(self):
    _check_positive(l2_norm_clip=self.l2_norm_clip,
                    clients_per_round=self.clients_per_round,
                    total_clients=self.total_clients)
    _check_noise_multiplier(self.noise_multiplier)
    if self.clients_per_round > self.total_clients:
      raise ValueError(f'clients_per_round={self.clients_per_round} exceeds '
                       f'total_clients={self.total_clients}.')

  @property
  def sampling_rate(self) -> float:
    return self.clients_per_round / self.total_clients

  @property
  def upload_clip(self) -> float:
    """The norm a device clips its sent values to."""
    return self.l2_norm_clip

  def query(self) -> tfp.DPQuery:
    """The mean query: clipped sum + N(0, (z C)^2), / clients_per_round."""
    return tfp.NormalizedQuery(
        GaussianSumQuery(self.l2_norm_clip,
                         self.noise_multiplier * self.l2_norm_clip, self.seed),
        denominator=float(self.clients_per_round))

  def aggregation_query(self) -> tfp.DPQuery:
    """What the (trusted) aggregator runs: this mechanism's query."""
    return self.query()

  def round_event(self) -> dp_accounting.DpEvent:
    """One round: the event the query emits, Poisson-sampled over devices."""
    query = self.query()
    _, _, event = query.get_noised_result(
        query.initial_sample_state(tf.TensorSpec([1], tf.float32)),
        query.initial_global_state())
    if self.sampling_rate < 1:
      event = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)
    return event


@dataclasses.dataclass(frozen=True)
class ExampleLevelDP:
  """DP-SGD on each device: Poisson-sampled steps, per-example clip, noise.

  A device holding n examples samples each at rate batch_size / n. n is
  treated as public (as TF Privacy and Opacus do) and must be at least
  `min_client_examples` (`check_num_examples`), so every device's rate is
  at most the accounted batch_size / min_client_examples.
  """
  l2_norm_clip: float
  noise_multiplier: float
  batch_size: int
  local_steps: int
  min_client_examples: int
  seed: Optional[int] = None
  unit: ClassVar[str] = 'example'
  upload_clip: ClassVar[None] = None  # uploads are DP already

  def __post_init__(self):
    _check_positive(l2_norm_clip=self.l2_norm_clip, batch_size=self.batch_size,
                    local_steps=self.local_steps,
                    min_client_examples=self.min_client_examples)
    _check_noise_multiplier(self.noise_multiplier)
    if self.min_client_examples < self.batch_size:
      raise ValueError(
          f'min_client_examples={self.min_client_examples} is below '
          f'batch_size={self.batch_size}: the sampling rate batch_size / n '
          'must be <= 1.')

  @property
  def sampling_rate(self) -> float:
    """The accounted (largest) rate: batch_size / min_client_examples."""
    return self.batch_size / self.min_client_examples

  @property
  def steps_per_round(self) -> int:
    return self.local_steps

  def check_num_examples(self, num_examples: int, who: str = 'a device') -> None:
    """Refuses a device below `min_client_examples`: its rate would exceed
    the accounted one and the ledger would understate its ε."""
    if num_examples < self.min_client_examples:
      raise ValueError(
          f'{who} holds {num_examples} examples, fewer than '
          f'min_client_examples={self.min_client_examples} that the privacy '
          'accounting assumes; nothing was run.')

  def update_norm_bound(self, size: int, learning_rate: float,
                        momentum: float = 0.0) -> float:
    """A bound an honest device's round update exceeds w.p. < e^-25 a step.

    A step's noised mean has norm at most C (1 + 10 / sqrt(B)) (a Poisson
    batch above B + 10 sqrt(B) examples has probability < e^-25 for B >= 16,
    Bernstein) plus the noise's z C (sqrt(size) + 10) / B (Gaussian norm
    concentration, < e^-50); SGD
    moves by the learning rate times that, momentum by 1 / (1 - momentum)
    at most, `local_steps` times. The server zeroes any update above it: a
    hostile device gains nothing, an honest one is never touched.
    """
    b, c = self.batch_size, self.l2_norm_clip
    step = c * (1 + 10 / b**0.5) + (
        self.noise_multiplier * c * (size**0.5 + 10) / b)
    return self.local_steps * learning_rate * step / (1 - momentum)

  def private_gradient(self, rows_fn=None, *, clipped_sum_fn=None,
                       num_examples, size: int, seed=None):
    """One DP-SGD step's noised mean gradient (flat), see
    `core.poisson_gaussian_average`: the sampled examples' flat gradients
    from `rows_fn(indices)`, or their sum clipped to this mechanism's
    `l2_norm_clip` from `clipped_sum_fn(indices, l2_norm_clip)` (ghost
    norms; each example's contribution bounded by the clip exactly as with
    the rows, so `step_event` is unchanged)."""
    rate = self.batch_size / tf.cast(num_examples, tf.float32)
    mean, _ = core.poisson_gaussian_average(
        rows_fn, clipped_sum_fn=clipped_sum_fn, num_examples=num_examples,
        sampling_rate=rate, size=size, l2_norm_clip=self.l2_norm_clip,
        noise_multiplier=self.noise_multiplier, seed=seed)
    return mean

  def aggregation_query(self) -> None:
    """None: uploads are DP already, the server takes their plain mean."""
    return None

  def step_event(self) -> dp_accounting.DpEvent:
    return accounting.sampled_gaussian_event(self.noise_multiplier,
                                             self.sampling_rate, 1).event

  def round_event(self) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(self.step_event(),
                                             self.local_steps)


def calibrated(mechanism, target_epsilon: float, *, rounds: int,
               delta: float, accountant: str = 'rdp'):
  """`mechanism` with the smallest noise multiplier that spends at most
  `target_epsilon` at `delta` over `rounds` rounds."""
  if not rounds or rounds < 1:
    raise ValueError('target_epsilon needs rounds >= 1 to calibrate for.')
  z = accounting.calibrate_noise_multiplier(
      target_epsilon, delta, mechanism.sampling_rate,
      rounds * mechanism.steps_per_round, accountant)
  return dataclasses.replace(mechanism, noise_multiplier=z)
