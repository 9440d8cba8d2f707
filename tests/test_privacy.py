"""Accounting: every ε is recomputed directly with dp_accounting."""

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

import tf_dpsparse as tds


def _direct(noise_multiplier, q, steps, delta, accountant):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
  acc = (rdp.RdpAccountant() if accountant == 'rdp' else pld.PLDAccountant())
  return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
@pytest.mark.parametrize('z,q,steps', [(1.1, 0.01, 1000), (0.8, 0.1, 50),
                                       (4.0, 0.5, 20)])
def test_epsilon_matches_dp_accounting(accountant, z, q, steps):
  delta = 1e-5
  ours = tds.privacy.compute_epsilon(z, q, steps, delta, accountant=accountant)
  assert ours == pytest.approx(_direct(z, q, steps, delta, accountant),
                               rel=1e-6)


def test_full_participation_is_plain_gaussian():
  ours = tds.privacy.compute_epsilon(2.0, 1.0, 10, 1e-5)
  direct = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(2.0), 10)).get_epsilon(1e-5)
  assert ours == pytest.approx(direct, rel=1e-6)


def test_edge_cases_and_validation():
  assert tds.privacy.compute_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
  assert math.isinf(tds.privacy.compute_epsilon(0.0, 0.1, 5, 1e-5))
  for kwargs in (dict(sampling_rate=0.0), dict(sampling_rate=1.5),
                 dict(noise_multiplier=-1.0), dict(steps=-1),
                 dict(delta=0.0), dict(steps=2.5)):
    args = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError):
      tds.privacy.compute_epsilon(**args)
  with pytest.raises(ValueError, match='accountant'):
    tds.privacy.compute_epsilon(1.0, 0.1, 10, 1e-5, accountant='moments')


@pytest.mark.parametrize('target,q,steps', [(1.0, 0.01, 1000), (3.0, 0.05, 200),
                                            (8.0, 1.0, 30)])
def test_calibration_hits_target_within_one_percent(target, q, steps):
  delta = 1e-5
  z = tds.privacy.calibrate_noise_multiplier(target, delta, q, steps)
  eps = _direct(z, q, steps, delta, 'rdp') if q < 1 else (
      tds.privacy.compute_epsilon(z, q, steps, delta))
  assert 0.99 * target <= eps <= target * (1 + 1e-9)


def test_ledger_matches_direct_composition_and_refuses_past_budget():
  delta = 1e-5
  ledger = tds.privacy.PrivacyLedger(delta, epsilon_budget=2.0)
  first = tds.privacy.sampled_gaussian_event(1.1, 0.01, 100)
  second = tds.privacy.sampled_gaussian_event(2.0, 0.1, 10)
  schedule = [first] * 3 + [second] * 2
  for event in schedule:
    ledger.record(event)
  direct = rdp.RdpAccountant()
  for event in schedule:
    direct.compose(event)
  assert ledger.epsilon == pytest.approx(direct.get_epsilon(delta), rel=1e-6)
  assert len(ledger.entries) == 2  # consecutive identical events merged

  spent = ledger.epsilon
  with pytest.raises(tds.privacy.BudgetExhaustedError, match='budget'):
    for _ in range(100):
      ledger.record(first)
  assert ledger.epsilon <= 2.0
  assert ledger.epsilon > spent
  refused = ledger.epsilon
  with pytest.raises(tds.privacy.BudgetExhaustedError) as error:
    ledger.record(first)
  assert ledger.epsilon == refused  # a refused event is not recorded
  message = str(error.value)
  assert f'spent {refused:.4g}' in message
  assert f'remaining {2.0 - refused:.4g}' in message
  assert ledger.epsilon_if(first) > 2.0


def test_ledger_json_roundtrip():
  ledger = tds.privacy.PrivacyLedger(1e-6, epsilon_budget=10.0, accountant='pld')
  ledger.record(tds.privacy.sampled_gaussian_event(1.5, 0.02, 50), count=3)
  ledger.record(tds.privacy.sampled_gaussian_event(1.0, 1.0, 1))
  text = ledger.to_json()
  back = tds.privacy.PrivacyLedger.from_json(text)
  assert back.entries == ledger.entries
  assert back.epsilon == pytest.approx(ledger.epsilon, rel=1e-12)
  assert json.loads(text)['epsilon'] == pytest.approx(ledger.epsilon)


def test_ledger_json_refuses_unknown_event_types():
  data = json.loads(tds.privacy.PrivacyLedger(1e-5).to_json())
  data['entries'] = [{'event': {'type': 'os.system', 'command': 'true'},
                      'count': 1}]
  with pytest.raises(ValueError, match='unknown DpEvent'):
    tds.privacy.PrivacyLedger.from_dict(data)


@pytest.mark.parametrize('budget', [1.5, 4.0, 8.0])
def test_max_steps_is_the_last_step_within_budget(budget):
  z, q, delta = 1.1, 0.02, 1e-5
  steps = tds.privacy.max_steps(z, q, delta, budget)
  assert steps >= 1
  assert tds.privacy.compute_epsilon(z, q, steps, delta) <= budget
  assert tds.privacy.compute_epsilon(z, q, steps + 1, delta) > budget
  assert tds.privacy.max_steps(0.3, 1.0, delta, 0.01) == 0


def test_round_privacy_calibrates_and_budgets():
  plan = tds.privacy.round_privacy(sampling_rate=0.1, delta=1e-5,
                                   steps_per_round=3, target_epsilon=4.0,
                                   rounds=10)
  assert plan.ledger.epsilon_budget == 4.0
  for _ in range(10):
    plan.ledger.record(plan.round_event)
  assert plan.ledger.epsilon == pytest.approx(tds.privacy.compute_epsilon(
      plan.noise_multiplier, 0.1, 30, 1e-5), rel=1e-9)
  assert 0.99 * 4.0 <= plan.ledger.epsilon <= 4.0
  with pytest.raises(tds.privacy.BudgetExhaustedError):
    plan.ledger.record(plan.round_event)
  fixed = tds.privacy.round_privacy(sampling_rate=0.1, delta=1e-5,
                                    noise_multiplier=1.3)
  assert fixed.noise_multiplier == 1.3 and fixed.ledger.epsilon_budget is None
  for kwargs, match in ((dict(), 'exactly one'),
                        (dict(noise_multiplier=1.0, target_epsilon=1.0),
                         'exactly one'),
                        (dict(target_epsilon=1.0), 'rounds'),
                        (dict(noise_multiplier=-1.0), '>= 0')):
    with pytest.raises(ValueError, match=match):
      tds.privacy.round_privacy(sampling_rate=0.1, delta=1e-5, **kwargs)


# TF Privacy's own statement of a DP-SGD schedule, for parity: its Poisson
# line is our sampled Gaussian, its "once per epoch" line our shuffled bound.
_TFP = pytest.importorskip(
    'tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib')


@pytest.mark.parametrize('n,batch,epochs,z', [(640, 64, 3, 1.1),
                                              (60000, 250, 15, 1.1),
                                              (1000, 100, 2.5, 0.7),
                                              (50000, 500, 1, 4.0)])
def test_epsilon_matches_tf_privacy_statement(n, batch, epochs, z):
  delta = 1e-5
  steps = round(epochs * n / batch)  # whole steps covering exactly `epochs`
  assert steps * batch == epochs * n
  poisson = _TFP._compute_dp_sgd_example_privacy(
      epochs, z, delta, used_microbatching=False,
      poisson_subsampling_probability=batch / n)
  per_epoch = _TFP._compute_dp_sgd_example_privacy(
      epochs, z, delta, used_microbatching=False)
  assert tds.privacy.compute_epsilon(z, batch / n, steps, delta) == (
      pytest.approx(poisson, rel=1e-9))
  assert tds.privacy.compute_epsilon_shuffled(z, epochs, delta) == (
      pytest.approx(per_epoch, rel=1e-9))
  microbatched = _TFP._compute_dp_sgd_example_privacy(
      epochs, z, delta, used_microbatching=True)
  assert tds.privacy.compute_epsilon_shuffled(
      z, epochs, delta, used_microbatching=True) == pytest.approx(
          microbatched, rel=1e-9)


def test_epsilon_matches_tf_privacy_printed_statement():
  """640 examples, batch 64, 3 epochs, z = 1.1, δ = 1e-5: 4.02 and 8.04."""
  import re
  text = _TFP.compute_dp_sgd_privacy_statement(640, 64, 3, 1.1, 1e-5,
                                                used_microbatching=False)
  per_epoch = float(re.search(r'once per epoch:\s+([\d.]+)', text).group(1))
  poisson = float(re.search(r'Poisson sampling \(\*\):\s+([\d.]+)',
                            text).group(1))
  ours_poisson = tds.privacy.compute_epsilon(1.1, 64 / 640, 30, 1e-5)
  ours_per_epoch = tds.privacy.compute_epsilon_shuffled(1.1, 3, 1e-5)
  assert (f'{ours_poisson:.3f}', f'{ours_per_epoch:.3f}') == (
      f'{poisson:.3f}', f'{per_epoch:.3f}')
  assert (round(ours_poisson, 2), round(ours_per_epoch, 2)) == (4.02, 8.04)


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
def test_calibration_refuses_a_target_past_the_noise_ceiling(accountant):
  """ε = 0.001 over 5 steps at q = 0.5 would need σ > 1000: refused at once
  (it used to search σ up to 2**30 for minutes)."""
  ceiling = tds.privacy.accounting.MAX_NOISE_MULTIPLIER
  at_ceiling = tds.privacy.compute_epsilon(ceiling, 0.5, 5, 1e-5, accountant)
  assert at_ceiling > 0.001
  with pytest.raises(ValueError, match='out of reach') as raised:
    tds.privacy.calibrate_noise_multiplier(0.001, 1e-5, 0.5, 5, accountant)
  message = str(raised.value)
  assert f'{ceiling:g}' in message and 'MAX_NOISE_MULTIPLIER' in message
  assert f'ε={at_ceiling:.4g}' in message
  # A caller may raise the ceiling, and is then held to the new one.
  with pytest.raises(ValueError, match='noise_multiplier > 50 '):
    tds.privacy.calibrate_noise_multiplier(0.05, 1e-5, 0.5, 5, accountant,
                                           max_noise_multiplier=50.0)


def test_calibration_refuses_a_target_looser_than_the_noise_floor():
  floor = tds.privacy.accounting.MIN_NOISE_MULTIPLIER
  at_floor = tds.privacy.compute_epsilon(floor, 0.5, 5, 1e-5)
  with pytest.raises(ValueError, match='MIN_NOISE_MULTIPLIER') as raised:
    tds.privacy.calibrate_noise_multiplier(2 * at_floor, 1e-5, 0.5, 5)
  assert f'ε={at_floor:.4g}' in str(raised.value)
  for target in (0.0, -1.0, math.inf, math.nan):
    with pytest.raises(ValueError, match='target_epsilon'):
      tds.privacy.calibrate_noise_multiplier(target, 1e-5, 0.5, 5)


@pytest.mark.parametrize('target,q,steps', [(0.05, 0.01, 100),
                                            (30.0, 0.5, 50)])
def test_calibration_near_the_bounds_hits_target(target, q, steps):
  """Targets whose σ is far from 1 (≈ 25 and ≈ 0.2) are still found."""
  z = tds.privacy.calibrate_noise_multiplier(target, 1e-5, q, steps)
  eps = tds.privacy.compute_epsilon(z, q, steps, 1e-5)
  assert 0.99 * target <= eps <= target * (1 + 1e-9)


def test_max_steps_is_capped_by_its_limit():
  # σ = 50 at q = 0.01 would fit millions of steps in ε = 8.
  assert tds.privacy.max_steps(50.0, 0.01, 1e-5, 8.0, limit=1000) == 1000
  assert tds.privacy.max_steps(1.1, 0.02, 1e-5, math.inf,
                               limit=77) == 77
  uncapped = tds.privacy.max_steps(1.1, 0.02, 1e-5, 1.5)
  assert tds.privacy.max_steps(1.1, 0.02, 1e-5, 1.5,
                               limit=uncapped + 3) == uncapped
  assert tds.privacy.max_steps(1.1, 0.02, 1e-5, 1.5,
                               limit=uncapped - 1) == uncapped - 1
  for budget, limit in ((0.0, 10), (math.nan, 10), (1.0, 0)):
    with pytest.raises(ValueError):
      tds.privacy.max_steps(1.1, 0.02, 1e-5, budget, limit=limit)
