"""ε for a schedule and σ for a target ε, both by `dp_accounting`.

The mechanism everywhere in tf_dpsparse is the sampled Gaussian: each step
(a DP-SGD step, or a DP-FedAvg round) samples records or clients with
probability `sampling_rate` (Poisson sampling, as the accountant assumes) and
adds N(0, (noise_multiplier * l2_norm_clip)^2) to the clipped sum. Nothing is
computed by hand: the events below are what `dp_accounting` composes.
"""

from __future__ import annotations

import math
from typing import Callable

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

ACCOUNTANTS = ('rdp', 'pld')
# The noise multipliers calibration searches between. Below 0.1 a Gaussian
# step spends ε ≳ 40 at δ = 1e-5 even at sampling rate 1e-6: no privacy
# worth the name. Above 1000 the noise is 1000× the clipped contribution,
# beyond the largest cohorts and batches in use; past it RDP cannot certify
# much less anyway (ε ≈ 0.0035 at δ = 1e-5 is its floor with default orders).
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1000.0
# Steps `max_steps` looks at, at most (~1M): past it PLD scores take seconds.
MAX_STEPS = 2**20


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


def compute_epsilon_shuffled(noise_multiplier: float, epochs: float,
                             delta: float, used_microbatching: bool = False,
                             accountant: str = 'rdp') -> float:
  """ε of `epochs` passes of DP-SGD on shuffled fixed-size batches.

  The honest bound when batches are not Poisson-sampled (a plain
  `model.fit`, `tf.data` `shuffle().batch()`): `shuffled_batches_event`,
  a partial pass counted whole. TF Privacy's `num_epochs` argument.
  """
  if not noise_multiplier >= 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
  if epochs == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  return epsilon_of(
      shuffled_batches_event(noise_multiplier, epochs, used_microbatching),
      delta, accountant)


def _bracket(gap, low: float, high: float) -> tuple:
  """σ values (a, b) with gap(a) > 0 >= gap(b), given gap(high) <= 0.

  Doubles (or halves) from σ = 1, where most schedules land, so the costly
  ends are rarely scored: RDP slows at large σ and PLD at small σ. At most
  log2(high / low) + 1 scores. Raises ValueError if even `low` is enough.
  """
  b = min(max(1.0, low), high)
  if gap(b) > 0:
    a = b
    while True:
      b = min(2 * a, high)
      if b == high or gap(b) <= 0:
        return a, b
      a = b
  while True:
    a = max(b / 2, low)
    gap_a = gap(a)
    if gap_a > 0:
      return a, b
    if a == low:
      raise ValueError(
          f'target ε={gap.target:g} is looser than what noise_multiplier='
          f'{low:g} (MIN_NOISE_MULTIPLIER) already spends, '
          f'ε={gap_a + gap.target:.4g}: no meaningful privacy. Give '
          'noise_multiplier directly instead.')
    b = a


class _EpsilonGap:
  """ε(σ) - target for one schedule: the function the search brackets."""

  def __init__(self, target, delta, sampling_rate, steps, accountant):
    self.target, self._delta, self._accountant = target, delta, accountant
    self._rate, self._steps = sampling_rate, steps

  def event(self, sigma: float) -> dp_accounting.DpEvent:
    return sampled_gaussian_event(sigma, self._rate, self._steps)

  def __call__(self, sigma: float) -> float:
    return epsilon_of(self.event(sigma), self._delta,
                      self._accountant) - self.target


def calibrate_noise_multiplier(target_epsilon: float,
                               delta: float,
                               sampling_rate: float,
                               steps: int,
                               accountant: str = 'rdp',
                               tol: float = 1e-5,
                               max_noise_multiplier: float = (
                                   MAX_NOISE_MULTIPLIER)) -> float:
  """The smallest noise multiplier whose schedule spends at most `target_epsilon`.

  Searches only [MIN_NOISE_MULTIPLIER, max_noise_multiplier], so an
  unreachable target fails in a few scores instead of an unbounded search:
  ε at the ceiling is checked first (ValueError, with that ε, if it is still
  over the target), then a bracket is found by doubling or halving from 1,
  then `dp_accounting.calibrate_dp_mechanism` (Brent search, each candidate
  scored by a fresh accountant) narrows it; `tol` is the tolerance on σ.
  A target looser than what MIN_NOISE_MULTIPLIER spends is refused too.
  PLD scores slowly at small σ (seconds at σ ≈ 0.1), RDP at large σ with
  q = 0.5 (about 1 s at the ceiling).
  """
  if not target_epsilon > 0 or math.isinf(target_epsilon):
    raise ValueError(f'target_epsilon must be finite and > 0, got {target_epsilon}.')
  if not max_noise_multiplier > MIN_NOISE_MULTIPLIER:
    raise ValueError(f'max_noise_multiplier must be > {MIN_NOISE_MULTIPLIER}, '
                     f'got {max_noise_multiplier}.')
  _check_delta(delta)
  _check_schedule(1.0, sampling_rate, steps)
  if steps < 1:
    raise ValueError('steps must be >= 1 to calibrate noise.')
  gap = _EpsilonGap(target_epsilon, delta, sampling_rate, steps, accountant)
  ceiling_gap = gap(max_noise_multiplier)
  if ceiling_gap > 0:
    raise ValueError(
        f'target ε={target_epsilon:g} at δ={delta:g} is out of reach: it needs '
        f'noise_multiplier > {max_noise_multiplier:g} (the ceiling, '
        f'MAX_NOISE_MULTIPLIER), which still spends '
        f'ε={ceiling_gap + target_epsilon:.4g} over {steps} steps at sampling '
        f'rate {sampling_rate:g} ({accountant}). Ask for a larger ε or δ, '
        'fewer steps or a lower sampling rate.')
  low, high = _bracket(gap, MIN_NOISE_MULTIPLIER, max_noise_multiplier)
  return float(
      dp_accounting.calibrate_dp_mechanism(
          lambda: make_accountant(accountant), gap.event, target_epsilon,
          delta,
          bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
          tol=tol))


def largest_within(epsilon_fn: Callable[[int], float],
                   epsilon_budget: float, limit: int = MAX_STEPS) -> int:
  """The largest count n <= `limit` with `epsilon_fn(n) <= epsilon_budget`.

  0 if not even 1 fits. `epsilon_fn` must grow with n (steps, passes,
  rounds). Doubling then bisection; `limit` bounds the doubling, as a huge
  noise multiplier (or budget) would otherwise double for long, and PLD
  scores of millions of steps take minutes.
  """
  if not epsilon_budget > 0:
    raise ValueError(f'epsilon_budget must be > 0, got {epsilon_budget}.')
  if int(limit) != limit or limit < 1:
    raise ValueError(f'limit must be a positive integer, got {limit}.')

  def within(n):
    return epsilon_fn(n) <= epsilon_budget

  if not within(1):
    return 0
  low, high = 1, None
  while high is None:  # double, up to `limit`
    if low >= limit:
      return low
    step = min(2 * low, int(limit))
    low, high = (step, None) if within(step) else (low, step)
  while high - low > 1:  # within(low) and not within(high)
    mid = (low + high) // 2
    low, high = (mid, high) if within(mid) else (low, mid)
  return low


def max_steps(noise_multiplier: float, sampling_rate: float, delta: float,
              epsilon_budget: float, accountant: str = 'rdp',
              limit: int = MAX_STEPS) -> int:
  """The most Poisson-sampled steps, up to `limit`, within `epsilon_budget`."""
  return largest_within(
      lambda steps: compute_epsilon(noise_multiplier, sampling_rate, steps,
                                    delta, accountant), epsilon_budget, limit)
