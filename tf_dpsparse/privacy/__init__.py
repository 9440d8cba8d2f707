"""Privacy on `dp_accounting`: ε, calibration, a budget ledger, mechanisms.

The mechanisms (`ExampleLevelDP`, `ClientLevelDP`, `calibrated`) import
TensorFlow and TF Privacy, so they load on first use: `tf-dpsparse
epsilon` and `calibrate` need only dp_accounting.
"""

import importlib

from tf_dpsparse.privacy.accounting import calibrate_noise_multiplier
from tf_dpsparse.privacy.accounting import compute_epsilon
from tf_dpsparse.privacy.accounting import compute_epsilon_shuffled
from tf_dpsparse.privacy.accounting import epsilon_of
from tf_dpsparse.privacy.accounting import make_accountant
from tf_dpsparse.privacy.accounting import largest_within
from tf_dpsparse.privacy.accounting import max_steps
from tf_dpsparse.privacy.accounting import sampled_gaussian_event
from tf_dpsparse.privacy.accounting import shuffled_batches_event
from tf_dpsparse.privacy.ledger import BudgetExhaustedError
from tf_dpsparse.privacy.ledger import PrivacyLedger
from tf_dpsparse.privacy.ledger import RoundPrivacy
from tf_dpsparse.privacy.ledger import round_privacy

_MECHANISMS = ('ClientLevelDP', 'ExampleLevelDP', 'GaussianSumQuery',
               'calibrated')

__all__ = [
    'BudgetExhaustedError', 'PrivacyLedger',
    'calibrate_noise_multiplier',
    'compute_epsilon', 'compute_epsilon_shuffled', 'epsilon_of',
    'largest_within', 'make_accountant', 'max_steps',
    'RoundPrivacy', 'round_privacy', 'sampled_gaussian_event',
    'shuffled_batches_event', *_MECHANISMS
]


def __getattr__(name):
  if name in _MECHANISMS:
    return getattr(importlib.import_module('tf_dpsparse.privacy.mechanisms'),
                   name)
  raise AttributeError(f'module tf_dpsparse.privacy has no attribute {name!r}')
