"""ε for a schedule and σ for a target ε, both by `dp_accounting`.

The mechanism everywhere in tf_dpsparse is the sampled Gaussian: each step
(a DP-SGD step, or a DP-FedAvg round) samples records or clients with
probability `sampling_rate` (Poisson sampling, as the accountant assumes) and
adds N(0, (noise_multiplier * l2_norm_clip)^2) to the clipped sum. Nothing is
computed by hand: the events below are what `dp_accounting` composes.
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

ACCOUNTANTS = ('rdp', 'pld')
# Units of privacy every front offers: none, per record (DP-SGD on the
# device), per device (DP-FedAvg with a trusted aggregator).
PRIVACY_MODES = (None, 'example', 'client')


def check_privacy_mode(mode, *, l2_norm_clip=None, noise_multiplier=None,
                       clients_per_round=None) -> None:
  """Raises ValueError unless `mode` is known and, for 'client', fully set."""
  if mode not in PRIVACY_MODES:
    raise ValueError(f'privacy mode must be one of {PRIVACY_MODES}, got {mode!r}.')
  if mode == 'client':
    for name, value in (('l2_norm_clip', l2_norm_clip),
                        ('noise_multiplier', noise_multiplier),
                        ('clients_per_round', clients_per_round)):
      if value is None or value < 0 or (name != 'noise_multiplier' and
                                        value == 0):
        raise ValueError(f'client-level DP needs {name} > 0, got {value}.')


def make_accountant(accountant: str = 'rdp') -> dp_accounting.PrivacyAccountant:
  """A fresh `dp_accounting` accountant: 'rdp' (default orders) or 'pld'."""
  if accountant == 'rdp':
    return rdp.RdpAccountant()
  if accountant == 'pld':
    return pld.PLDAccountant()
  raise ValueError(f'accountant must be one of {ACCOUNTANTS}, got {accountant!r}.')


def _check_schedule(noise_multiplier, sampling_rate, steps) -> None:
  if not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
  if not 0 < sampling_rate <= 1:
    raise ValueError(f'sampling_rate must be in (0, 1], got {sampling_rate}.')
  if int(steps) != steps or steps < 0:
    raise ValueError(f'steps must be a non-negative integer, got {steps}.')


def _check_delta(delta) -> None:
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}.')


def sampled_gaussian_event(noise_multiplier: float,
                           sampling_rate: float,
                           steps: int = 1) -> dp_accounting.DpEvent:
  """The DpEvent of `steps` Poisson-sampled Gaussian releases."""
  _check_schedule(noise_multiplier, sampling_rate, steps)
  event = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
  return dp_accounting.SelfComposedDpEvent(event, int(steps))


def epsilon_of(event: dp_accounting.DpEvent, delta: float,
               accountant: str = 'rdp') -> float:
  """ε at `delta` of any DpEvent, from a fresh accountant."""
  _check_delta(delta)
  return float(make_accountant(accountant).compose(event).get_epsilon(delta))


def compute_epsilon(noise_multiplier: float,
                    sampling_rate: float,
                    steps: int,
                    delta: float,
                    accountant: str = 'rdp') -> float:
  """ε of `steps` Poisson-sampled Gaussian steps at `delta`.

  Returns `inf` for `noise_multiplier == 0` with `steps > 0` (no privacy) and
  0 for `steps == 0`.
  """
  _check_schedule(noise_multiplier, sampling_rate, steps)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  return epsilon_of(
      sampled_gaussian_event(noise_multiplier, sampling_rate, steps), delta,
      accountant)


def shuffled_batches_event(noise_multiplier: float, epochs: float,
                           used_microbatching: bool = False
                           ) -> dp_accounting.DpEvent:
  """The DpEvent of DP-SGD on shuffled, fixed-size batches, for `epochs` passes.

  Each example is in exactly one batch per epoch, so a pass over the data is
  at most one Gaussian release of that example (no amplification by
  sampling is claimed: shuffling is not Poisson sampling, and the amplified
  number can badly understate the leakage, Chua et al., ICML 2024). A
  partial epoch counts as a whole one. Microbatching (several examples per
  clipped row) doubles the sensitivity under add/remove of one example,
  which halves the effective noise multiplier. This is TF Privacy's
  `compute_dp_sgd_privacy_statement` line "each example occurring once per
  epoch", composed by `dp_accounting`.
  """
  if not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
  if not epochs >= 0:
    raise ValueError(f'epochs must be >= 0, got {epochs}.')
  z = noise_multiplier / 2 if used_microbatching else noise_multiplier
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(z), int(math.ceil(epochs - 1e-12)))


def compute_epsilon_shuffled(noise_multiplier: float, dataset_size: int,
                             batch_size: int, steps: int, delta: float,
                             used_microbatching: bool = False,
                             accountant: str = 'rdp') -> float:
  """ε of `steps` DP-SGD steps on shuffled fixed-size batches (no sampling).

  The honest bound when batches are not Poisson-sampled (a plain
  `model.fit`, `tf.data` `shuffle().batch()`): `steps * batch_size /
  dataset_size` epochs of `shuffled_batches_event`.
  """
  if not 0 < batch_size <= dataset_size:
    raise ValueError(f'need 0 < batch_size <= dataset_size, got {batch_size} '
                     f'and {dataset_size}.')
  _check_schedule(noise_multiplier, 1.0, steps)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  epochs = steps * batch_size / dataset_size
  return epsilon_of(
      shuffled_batches_event(noise_multiplier, epochs, used_microbatching),
      delta, accountant)


def calibrate_noise_multiplier(target_epsilon: float,
                               delta: float,
                               sampling_rate: float,
                               steps: int,
                               accountant: str = 'rdp',
                               tol: float = 1e-5) -> float:
  """The smallest noise multiplier whose schedule spends at most `target_epsilon`.

  Uses `dp_accounting.calibrate_dp_mechanism` (Brent search over σ, each
  candidate scored by a fresh accountant); `tol` is the tolerance on σ.
  """
  if not target_epsilon > 0 or math.isinf(target_epsilon):
    raise ValueError(f'target_epsilon must be finite and > 0, got {target_epsilon}.')
  _check_delta(delta)
  _check_schedule(1.0, sampling_rate, steps)
  if steps < 1:
    raise ValueError('steps must be >= 1 to calibrate noise.')
  return float(
      dp_accounting.calibrate_dp_mechanism(
          lambda: make_accountant(accountant),
          lambda sigma: sampled_gaussian_event(sigma, sampling_rate, steps),
          target_epsilon,
          delta,
          bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
          tol=tol))


def max_steps(noise_multiplier: float, sampling_rate: float, delta: float,
              epsilon_budget: float, accountant: str = 'rdp') -> int:
  """The most steps whose ε stays within `epsilon_budget` (0 if not even one).

  Doubling then bisection on `compute_epsilon`, which grows with steps.
  """

  def within(steps):
    return compute_epsilon(noise_multiplier, sampling_rate, steps, delta,
                           accountant) <= epsilon_budget

  if not within(1):
    return 0
  low = 1
  while within(2 * low):
    low *= 2
  high = 2 * low  # within(low) and not within(high)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if within(mid) else (low, mid)
  return low
