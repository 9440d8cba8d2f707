"""Empirical privacy audits: the statistics, in numpy and scipy (no TFF).

Accounting gives an upper bound on ε; an audit measures the leakage of the
code that actually ran, so a bug that skips noise, clips in the wrong place
or mis-samples shows up as an empirical ε above the accounted one. Four
instruments, each for the question it answers:

- `one_run_audit`: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
  Training Run" (NeurIPS 2023). m canaries, each included independently
  with probability 1/2; the auditor guesses "in" for the k+ highest scores,
  "out" for the k- lowest and abstains on the rest. If the mechanism is
  (ε, δ)-DP in each canary, the number of correct guesses is stochastically
  dominated (up to the δ term) by Binomial(r, e^ε / (1 + e^ε)), so a high
  count is a lower bound on ε at a stated confidence. Sound for any scores.
- `gaussian_fit_epsilon`: the headline *estimate*, for both units. The
  inserted canaries' statistics are fitted as the held-out ones (the noise)
  shifted by a mean: a Gaussian mechanism, whose ε at δ is reported with a
  percentile-bootstrap interval over canaries. Not a bound; its lower end is
  what may be compared with the accounted ε (its docstring says why).
- `one_shot_epsilon`: Andrew et al., "One-shot Empirical Privacy Estimation
  for Federated Learning" (ICLR 2024), their fit as published: a Gaussian
  of its own width for each set, and the ε of that pair at δ. Reported
  beside the estimate above; it overstates ε when canaries take part in
  only a few rounds (see `gaussian_fit_epsilon`).
- `membership_inference`: the loss-threshold attack of TF Privacy's
  `privacy_tests.membership_inference_attack` (AUC and attacker advantage,
  its definitions). TF Privacy 0.9.0's wheel leaves `privacy_tests` out
  (its setup.py excludes it; tensorflow/privacy#555), so the attack is
  computed here the same way, with scikit-learn's ROC curve.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import optimize
from scipy import stats
from sklearn import metrics

# Guess counts the one-run audit tries (fractions of the m canaries guessed,
# half "in" and half "out", then "in" only); Bonferroni-corrected.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _check_counts(m: int, r: int, v: int) -> None:
  if not 0 <= v <= r <= m:
    raise ValueError(f'need 0 <= correct <= guesses <= canaries, got v={v}, '
                     f'r={r}, m={m}.')


def one_run_p_value(m: int, r: int, v: int, epsilon: float,
                    delta: float) -> float:
  """P-value of >= v correct guesses out of r if the mechanism is (ε, δ)-DP.

  Steinke, Nasr & Jagielski (NeurIPS 2023), Theorem 3.1 / their Algorithm
  for `p_value_DP_audit`: with q = e^ε / (1 + e^ε) (the accuracy of ε-DP
  randomized response), p = P[Binomial(r, q) >= v] + 2 m δ · max_{1<=i<=v}
  P[v - i <= Binomial(r, q) < v] / i, capped at 1. m canaries each included
  independently with probability 1/2; r guesses (abstentions excluded).
  """
  _check_counts(m, r, v)
  if not epsilon >= 0 or not 0 <= delta <= 1:
    raise ValueError(f'need epsilon >= 0 and delta in [0, 1], got {epsilon}, '
                     f'{delta}.')
  q = 1 / (1 + math.exp(-epsilon))
  beta = stats.binom.sf(v - 1, r, q)
  alpha = 0.0
  if v > 0:  # the paper's running maximum of sum_i / i, vectorized
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
  return float(min(beta + alpha * delta * 2 * m, 1.0))


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                                confidence: float = 0.95) -> float:
  """The largest ε that v correct guesses of r reject at `confidence`.

  Steinke, Nasr & Jagielski (NeurIPS 2023), `get_eps_audit`: ε_max grows by
  1 until its p-value reaches p = 1 - confidence, then 30 bisection steps
  keep p_value(ε_min) < p <= p_value(ε_max); returns ε_min (0 when nothing
  is rejected). With probability >= `confidence` over the canaries'
  inclusion, an (ε, δ)-DP mechanism does not yield a bound above ε.
  """
  _check_counts(m, r, v)
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  p = 1 - confidence
  eps_min, eps_max = 0.0, 1.0
  while one_run_p_value(m, r, v, eps_max, delta) < p:
    eps_max += 1
  for _ in range(30):
    eps = (eps_min + eps_max) / 2
    if one_run_p_value(m, r, v, eps, delta) < p:
      eps_min = eps
    else:
      eps_max = eps
  return eps_min


def one_run_guesses(scores, k_plus: int, k_minus: int) -> np.ndarray:
  """+1 ("in") for the k+ highest scores, -1 for the k- lowest, else 0.

  Ties are broken by canary index (public, independent of inclusion).
  """
  scores = np.asarray(scores, np.float64)
  if k_plus < 0 or k_minus < 0 or k_plus + k_minus > scores.size:
    raise ValueError(f'need k+ + k- <= m with both >= 0, got {k_plus}, '
                     f'{k_minus} for m={scores.size}.')
  order = np.argsort(-scores, kind='stable')
  guesses = np.zeros(scores.size, np.int8)
  guesses[order[:k_plus]] = 1
  guesses[order[scores.size - k_minus:]] = -1
  return guesses


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
  """A one-run audit's result: ε >= `epsilon_lower_bound` at `confidence`."""
  epsilon_lower_bound: float
  confidence: float
  delta: float
  num_canaries: int  # m
  num_guesses: int  # r, at the best guess counts
  num_correct: int  # v
  k_plus: int
  k_minus: int
  num_tried: int  # guess counts tried (the Bonferroni factor)


def default_guess_counts(m: int) -> Tuple[Tuple[int, int], ...]:
  """(k+, k-) pairs for m canaries: two-sided at `GUESS_FRACTIONS`, then
  one-sided ("in" guesses only) at the same sizes."""
  pairs = []
  for f in GUESS_FRACTIONS:
    r = max(1, int(round(f * m)))
    pairs += [(r - r // 2, r // 2), (r, 0)]
  return tuple(dict.fromkeys(pairs))


def one_run_audit(scores, included, delta: float, confidence: float = 0.95,
                  guess_counts: Optional[Sequence[Tuple[int, int]]] = None
                  ) -> OneRunAudit:
  """ε lower bound from canary scores (higher = more likely included).

  Steinke, Nasr & Jagielski (NeurIPS 2023), Algorithm 1 with the bound of
  `one_run_epsilon_lower_bound`. Assumes each canary was included
  independently with probability 1/2, chosen before training, and that the
  scores depend on the training output only (not on `included`). The
  best of several (k+, k-) is valid because each is bounded at confidence
  1 - (1 - confidence) / (number tried) (Bonferroni); pass one pair to skip
  that correction.
  """
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  if scores.shape != included.shape or scores.ndim != 1:
    raise ValueError('scores and included must be 1-D of the same length.')
  m = scores.size
  pairs = default_guess_counts(m) if guess_counts is None else tuple(
      guess_counts)
  each = 1 - (1 - confidence) / len(pairs)
  truth = np.where(included, 1, -1)
  best = None
  for k_plus, k_minus in pairs:
    guesses = one_run_guesses(scores, k_plus, k_minus)
    r, v = int(np.sum(guesses != 0)), int(np.sum(guesses == truth))
    bound = one_run_epsilon_lower_bound(m, r, v, delta, each)
    if best is None or bound > best.epsilon_lower_bound:
      best = OneRunAudit(bound, confidence, delta, m, r, v, k_plus, k_minus,
                         len(pairs))
  return best


def _gaussian_mass(mu: float, std: float, lo: float, hi: float) -> float:
  """P[lo < N(mu, std^2) < hi], accurate in either tail."""
  if lo > mu:
    return stats.norm.sf(lo, mu, std) - stats.norm.sf(hi, mu, std)
  return stats.norm.cdf(hi, mu, std) - stats.norm.cdf(lo, mu, std)


def _privacy_loss_region(mu1, std1, mu2, std2, epsilon):
  """Intervals where log p1(y) - log p2(y) > ε, for Gaussians p1, p2."""
  a = 0.5 / std2**2 - 0.5 / std1**2
  b = mu1 / std1**2 - mu2 / std2**2
  c = (math.log(std2 / std1) - 0.5 * (mu1 / std1)**2 +
       0.5 * (mu2 / std2)**2 - epsilon)
  if a == 0:  # equal variances: a half-line (or nothing when b == 0)
    if b == 0:
      return [(-math.inf, math.inf)] if c > 0 else []
    root = -c / b
    return [(root, math.inf)] if b > 0 else [(-math.inf, root)]
  disc = b * b - 4 * a * c
  if disc <= 0:
    return [(-math.inf, math.inf)] if a > 0 else []
  r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a),
                   (-b + math.sqrt(disc)) / (2 * a)))
  return [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]


def _delta_one_way(mu1, std1, mu2, std2, epsilon) -> float:
  """sup_S P1(S) - e^ε P2(S), attained on the privacy-loss region."""
  region = _privacy_loss_region(mu1, std1, mu2, std2, epsilon)
  p1 = sum(_gaussian_mass(mu1, std1, lo, hi) for lo, hi in region)
  p2 = sum(_gaussian_mass(mu2, std2, lo, hi) for lo, hi in region)
  if p2 <= 0:
    return p1
  log_term = epsilon + math.log(p2)  # e^ε P2, without overflowing e^ε
  return 0.0 if log_term > 0 else max(p1 - math.exp(log_term), 0.0)


def gaussians_delta(mu1: float, std1: float, mu2: float, std2: float,
                    epsilon: float) -> float:
  """The smallest δ for which N(mu1, std1²) and N(mu2, std2²) are (ε, δ)-close
  (both directions): the δ(ε) curve of the pair."""
  if not std1 > 0 or not std2 > 0:
    raise ValueError(f'standard deviations must be > 0, got {std1}, {std2}.')
  return max(_delta_one_way(mu1, std1, mu2, std2, epsilon),
             _delta_one_way(mu2, std2, mu1, std1, epsilon))


def epsilon_two_gaussians(mu1: float, std1: float, mu2: float, std2: float,
                          delta: float) -> float:
  """ε at `delta` between two Gaussians (the pair's privacy profile).

  As in Andrew et al. (ICLR 2024; google-research/federated one_shot_epe):
  δ(ε) = max over both orders of P1(L > ε) - e^ε P2(L > ε), where the
  privacy loss L = log p1/p2 is quadratic in y, so each region is one or two
  intervals; ε is the root of δ(ε) = delta (0 when δ(0) <= delta).
  """
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}.')

  def excess(eps):
    return gaussians_delta(mu1, std1, mu2, std2, eps) - delta

  if excess(0.0) <= 0:
    return 0.0
  hi = 1.0
  while excess(hi) > 0:
    hi *= 2
  return float(optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi,
                               xtol=1e-10))


@dataclasses.dataclass(frozen=True)
class OneShotEstimate:
  """Andrew et al.'s estimate and the Gaussians it came from."""
  epsilon: float
  delta: float
  inserted_mean: float
  inserted_std: float
  held_out_mean: float
  held_out_std: float
  num_inserted: int
  num_held_out: int


def one_shot_epsilon(inserted, held_out, delta: float) -> OneShotEstimate:
  """ε estimate from canary statistics (e.g. cosines), inserted vs held out.

  Andrew et al., "One-shot Empirical Privacy Estimation for Federated
  Learning" (ICLR 2024): fit N(mean, std²) to each set (sample mean and
  standard deviation) and return the ε of that pair at `delta`. Assumes the
  statistics are close to Gaussian (true for cosines of a Gaussian
  mechanism's output in high dimension); the estimate carries no confidence.
  """
  inserted = np.asarray(inserted, np.float64)
  held_out = np.asarray(held_out, np.float64)
  if inserted.size < 2 or held_out.size < 2:
    raise ValueError('need at least two inserted and two held-out canaries.')
  fit = (float(np.mean(inserted)), float(np.std(inserted, ddof=1)),
         float(np.mean(held_out)), float(np.std(held_out, ddof=1)))
  eps = epsilon_two_gaussians(fit[2], fit[3], fit[0], fit[1], delta)
  return OneShotEstimate(eps, delta, *fit, inserted.size, held_out.size)


def one_shot_interval(inserted, held_out, delta: float, level: float = 0.9,
                      resamples: int = 200, seed: int = 0
                      ) -> Tuple[float, float]:
  """Percentile bootstrap interval of `one_shot_epsilon` at `level`.

  Resamples the inserted and the held-out statistics (each with
  replacement, sizes kept) `resamples` times: the spread of the estimate
  that comes from having finitely many canaries. Not a privacy guarantee.
  """
  inserted = np.asarray(inserted, np.float64)
  held_out = np.asarray(held_out, np.float64)
  rng = np.random.default_rng(seed)
  estimates = [one_shot_epsilon(rng.choice(inserted, inserted.size),
                                rng.choice(held_out, held_out.size),
                                delta).epsilon for _ in range(resamples)]
  tail = 50 * (1 - level)
  low, high = np.percentile(estimates, [tail, 100 - tail])
  return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class GaussianFitEstimate:
  """An ε estimate (not a bound) and its percentile-bootstrap interval.

  `low` is the interval's lower end: at `level` 0.9 a one-sided 95 % lower
  confidence limit of the estimate, the number to compare with the
  accounted ε. `shift` is the fitted Gaussian mechanism's sensitivity over
  its noise, (mean inserted - mean held out) / sd held out.
  """
  epsilon: float
  low: float
  high: float
  level: float
  shift: float
  delta: float
  num_inserted: int
  num_held_out: int
  resamples: int


def _shifts(inserted: np.ndarray, held_out: np.ndarray) -> np.ndarray:
  """(mean inserted - mean held out) / sd held out, along the last axis
  (+inf for a positive gap over a held-out spread of 0)."""
  gap = np.mean(inserted, -1) - np.mean(held_out, -1)
  spread = np.std(held_out, -1, ddof=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(spread > 0, gap / np.where(spread > 0, spread, 1),
                    np.where(gap > 0, np.inf, 0.0))


def gaussian_mechanism_epsilon(shift: float, delta: float) -> float:
  """ε at `delta` of N(0, 1) against N(shift, 1); 0 for shift <= 0, where
  inserted canaries look no more inserted than held-out ones."""
  if not shift > 0:
    return 0.0
  if math.isinf(shift):
    return math.inf
  return epsilon_two_gaussians(0.0, 1.0, float(shift), 1.0, delta)


def gaussian_fit_epsilon(inserted, held_out, delta: float, level: float = 0.9,
                         resamples: int = 1000, seed: int = 0
                         ) -> GaussianFitEstimate:
  """ε estimate of canary statistics (higher = more inserted) as a Gaussian
  mechanism: the held-out statistics are the noise, the inserted ones the
  same noise shifted by (mean inserted - mean held out).

  Why equal widths: a canary is sampled K ~ Binomial(T, q) times, so its
  inserted statistic is the noise plus K times its signal, wider than the
  held-out one by the spread of K. Andrew et al.'s fit (`one_shot_epsilon`)
  gives it its own wider Gaussian, whose privacy loss is quadratic and
  unbounded in both tails; the real mixture's loss is at most linear, and
  at δ = 1e-5 that tail sets ε. In the scalar game of
  tests/test_audit.py (a canary's projection after T Poisson-sampled
  Gaussian steps, exactly the accounted ε) their fit exceeds the accounted
  ε in up to 65 % of seeds; this one's estimand, q sqrt(T) / σ for that
  linear statistic, is below the mechanism's μ-GDP (CLT: q sqrt(T (e^(1 /
  σ²) - 1)), Dong, Roth & Su 2022), so below the accounted ε.

  Privacy assumption and how to read it: inclusion was drawn at random
  before training, and the statistics are computed from what the observer
  sees and public canary data only. The estimate is not a bound; the sound
  comparison is one-sided: if the code matched its accountant, the
  interval's `low` end (at `level` 0.9, a 95 % lower confidence limit;
  percentile bootstrap over canaries, `resamples` times, ε being monotone
  in the shift) would exceed the accounted ε with probability about 5 % at
  most, so a `low` above it is evidence of a leak.
  """
  inserted = np.asarray(inserted, np.float64).ravel()
  held_out = np.asarray(held_out, np.float64).ravel()
  if inserted.size < 2 or held_out.size < 2:
    raise ValueError('need at least two inserted and two held-out canaries.')
  if not 0 < level < 1 or resamples < 1:
    raise ValueError(f'need level in (0, 1) and resamples >= 1, got {level}, '
                     f'{resamples}.')
  rng = np.random.default_rng(seed)
  boot = _shifts(
      inserted[rng.integers(0, inserted.size, (resamples, inserted.size))],
      held_out[rng.integers(0, held_out.size, (resamples, held_out.size))])
  tail = 50 * (1 - level)
  # Order statistics, not interpolation: a resample may give an infinite
  # shift, and the ends stay conservative.
  low = np.percentile(boot, tail, method='lower')
  high = np.percentile(boot, 100 - tail, method='higher')
  shift = float(_shifts(inserted, held_out))
  return GaussianFitEstimate(
      gaussian_mechanism_epsilon(shift, delta),
      gaussian_mechanism_epsilon(low, delta),
      gaussian_mechanism_epsilon(high, delta), level, shift, delta,
      inserted.size, held_out.size, resamples)


def cosines(vector, directions) -> np.ndarray:
  """Cosine of `vector` with each row of `directions` (0 for a zero vector)."""
  vector = np.asarray(vector, np.float64).ravel()
  directions = np.asarray(directions, np.float64)
  norms = np.linalg.norm(directions, axis=1) * np.linalg.norm(vector)
  return np.divide(directions @ vector, norms, out=np.zeros(len(directions)),
                   where=norms > 0)


@dataclasses.dataclass(frozen=True)
class MembershipInference:
  """Loss-threshold membership inference: AUC and attacker advantage."""
  auc: float
  advantage: float
  num_train: int
  num_test: int


def membership_inference(loss_train, loss_test) -> MembershipInference:
  """TF Privacy's threshold attack on per-example losses.

  As `membership_inference_attack._run_threshold_attack`: the ROC curve of
  "member if -loss >= t" over all t, its AUC, and the advantage
  max_t |TPR - FPR| (Yeom et al. 2018, Definition 4, maximized over
  thresholds). Training examples are the positives.
  """
  loss_train = np.asarray(loss_train, np.float64).ravel()
  loss_test = np.asarray(loss_test, np.float64).ravel()
  if not loss_train.size or not loss_test.size:
    raise ValueError('need at least one training and one held-out loss.')
  labels = np.concatenate([np.ones(loss_train.size), np.zeros(loss_test.size)])
  fpr, tpr, _ = metrics.roc_curve(labels,
                                  -np.concatenate([loss_train, loss_test]))
  return MembershipInference(float(metrics.auc(fpr, tpr)),
                             float(np.max(np.abs(tpr - fpr))),
                             loss_train.size, loss_test.size)
