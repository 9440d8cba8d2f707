"""A privacy budget ledger: the DpEvents released so far, and a hard stop.

The ledger stores `dp_accounting` events, not ε values: ε is recomputed from
the composition of everything recorded, so it is always what the accountant
says of the whole history. Consecutive identical events are merged into one
self-composition, which keeps ε cheap to recompute over thousands of rounds.
"""

from __future__ import annotations

import json
import math
from typing import List, NamedTuple, Optional

import attr
import dp_accounting

from tf_dpsparse.privacy import accounting


class BudgetExhaustedError(RuntimeError):
  """Recording the next event would spend more than the ε budget."""


class LedgerEntry(NamedTuple):
  event: dp_accounting.DpEvent
  count: int


# Event types a ledger may (de)serialize. An allow-list: JSON from elsewhere
# must not name arbitrary classes to construct.
_EVENT_TYPES = {
    cls.__name__: cls for cls in (
        dp_accounting.NoOpDpEvent, dp_accounting.NonPrivateDpEvent,
        dp_accounting.GaussianDpEvent, dp_accounting.LaplaceDpEvent,
        dp_accounting.PoissonSampledDpEvent,
        dp_accounting.SampledWithoutReplacementDpEvent,
        dp_accounting.SampledWithReplacementDpEvent,
        dp_accounting.SelfComposedDpEvent, dp_accounting.ComposedDpEvent)
}


def event_to_dict(event: dp_accounting.DpEvent) -> dict:
  """A JSON-ready dict of a DpEvent (nested events become nested dicts)."""
  name = type(event).__name__
  if _EVENT_TYPES.get(name) is not type(event):
    raise TypeError(f'cannot serialize DpEvent type {name}.')
  fields = {}
  for key, value in attr.asdict(event, recurse=False).items():
    if isinstance(value, dp_accounting.DpEvent):
      value = event_to_dict(value)
    elif isinstance(value, (list, tuple)):
      value = [event_to_dict(v) for v in value]
    fields[key] = value
  return {'type': name, **fields}


def event_from_dict(data: dict) -> dp_accounting.DpEvent:
  """Inverse of `event_to_dict`, restricted to known DpEvent types."""
  data = dict(data)
  name = data.pop('type', None)
  if name not in _EVENT_TYPES:
    raise ValueError(f'unknown DpEvent type {name!r}.')
  for key, value in data.items():
    if isinstance(value, dict):
      data[key] = event_from_dict(value)
    elif isinstance(value, list):
      data[key] = [event_from_dict(v) for v in value]
  return _EVENT_TYPES[name](**data)


class PrivacyLedger:
  """Records DpEvents and refuses any that would exceed `epsilon_budget`.

  Typical use: before each round, `ledger.record(event)`; it raises
  `BudgetExhaustedError` *before* recording (so before the round's data is
  touched, if called first) when ε would exceed the budget.
  """

  def __init__(self,
               delta: float,
               epsilon_budget: Optional[float] = None,
               accountant: str = 'rdp'):
    accounting.make_accountant(accountant)  # validates the name
    if not 0 < delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {delta}.')
    if epsilon_budget is not None and not epsilon_budget > 0:
      raise ValueError(f'epsilon_budget must be > 0, got {epsilon_budget}.')
    self.delta = float(delta)
    self.epsilon_budget = epsilon_budget
    self.accountant = accountant
    self._entries: List[LedgerEntry] = []
    self._epsilon = 0.0

  @property
  def entries(self) -> tuple:
    return tuple(self._entries)

  @property
  def event(self) -> dp_accounting.DpEvent:
    """Everything recorded, as one composed DpEvent."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(e.event, e.count)
        for e in self._entries
    ])

  @property
  def epsilon(self) -> float:
    """ε spent so far at `delta`."""
    return self._epsilon

  @property
  def remaining(self) -> float:
    return math.inf if self.epsilon_budget is None else max(
        0.0, self.epsilon_budget - self._epsilon)

  def _merged(self, event, count) -> List[LedgerEntry]:
    entries = list(self._entries)
    if entries and entries[-1].event == event:
      entries[-1] = LedgerEntry(event, entries[-1].count + count)
    else:
      entries.append(LedgerEntry(event, count))
    return entries

  def _epsilon_of(self, entries) -> float:
    if not entries:
      return 0.0
    composed = dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(e.event, e.count) for e in entries])
    return accounting.epsilon_of(composed, self.delta, self.accountant)

  def epsilon_if(self, event: dp_accounting.DpEvent, count: int = 1) -> float:
    """ε that recording `event` `count` times would bring the total to."""
    return self._epsilon_of(self._merged(event, count))

  def record(self, event: dp_accounting.DpEvent, count: int = 1) -> float:
    """Records `event` (`count` times) and returns ε spent so far.

    Raises `BudgetExhaustedError` and records nothing if that would exceed
    the budget.
    """
    if int(count) != count or count < 1:
      raise ValueError(f'count must be a positive integer, got {count}.')
    entries = self._merged(event, int(count))
    epsilon = self._epsilon_of(entries)
    if self.epsilon_budget is not None and epsilon > self.epsilon_budget:
      raise BudgetExhaustedError(
          f'refused: recording this event would spend ε={epsilon:.4g} at '
          f'δ={self.delta:g}, over the budget ε={self.epsilon_budget:g} '
          f'(spent {self._epsilon:.4g}, remaining {self.remaining:.4g}); '
          'nothing was recorded.')
    self._entries, self._epsilon = entries, epsilon
    return epsilon

  def to_dict(self) -> dict:
    return {
        'delta': self.delta,
        'epsilon_budget': self.epsilon_budget,
        'accountant': self.accountant,
        'epsilon': self._epsilon,
        'entries': [{'event': event_to_dict(e.event), 'count': e.count}
                    for e in self._entries],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, data: dict) -> 'PrivacyLedger':
    ledger = cls(data['delta'], data.get('epsilon_budget'),
                 data.get('accountant', 'rdp'))
    ledger._entries = [
        LedgerEntry(event_from_dict(e['event']), int(e['count']))
        for e in data['entries']
    ]
    ledger._epsilon = ledger._epsilon_of(ledger._entries)
    return ledger

  @classmethod
  def from_json(cls, text: str) -> 'PrivacyLedger':
    return cls.from_dict(json.loads(text))

  def __repr__(self) -> str:
    budget = '' if self.epsilon_budget is None else f'/{self.epsilon_budget:g}'
    return (f'PrivacyLedger(ε={self._epsilon:.4g}{budget}, δ={self.delta:g}, '
            f'{sum(e.count for e in self._entries)} events)')


class RoundPrivacy(NamedTuple):
  """The privacy plan of a run of rounds: noise, one round's event, a ledger."""
  noise_multiplier: float
  round_event: dp_accounting.DpEvent
  ledger: PrivacyLedger


def round_privacy(*, sampling_rate: float, delta: float,
                  steps_per_round: int = 1,
                  noise_multiplier: Optional[float] = None,
                  target_epsilon: Optional[float] = None,
                  rounds: Optional[int] = None,
                  accountant: str = 'rdp') -> RoundPrivacy:
  """Plans `rounds` rounds of `steps_per_round` sampled Gaussian steps.

  Give `noise_multiplier`, or `target_epsilon` and `rounds` to calibrate it;
  with a target, the ledger's budget is that ε, so a run cannot go past the
  rounds it was calibrated for.
  """
  if (noise_multiplier is None) == (target_epsilon is None):
    raise ValueError(
        'give exactly one of noise_multiplier and target_epsilon (got '
        f'{noise_multiplier} and {target_epsilon}): the noise is either fixed '
        'or calibrated to the target, never both, so the ε reported is that '
        'of the noise used.')
  if target_epsilon is not None:
    if not rounds:
      raise ValueError('target_epsilon needs rounds to calibrate for.')
    noise_multiplier = accounting.calibrate_noise_multiplier(
        target_epsilon, delta, sampling_rate, rounds * steps_per_round,
        accountant)
  elif noise_multiplier < 0:
    raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
  return RoundPrivacy(
      noise_multiplier,
      accounting.sampled_gaussian_event(noise_multiplier, sampling_rate,
                                        steps_per_round),
      PrivacyLedger(delta, target_epsilon, accountant))
