"""Privacy accounting on `dp_accounting`: ε, calibration, and a budget ledger."""

from tf_dpsparse.privacy.accounting import calibrate_noise_multiplier
from tf_dpsparse.privacy.accounting import compute_epsilon
from tf_dpsparse.privacy.accounting import epsilon_of
from tf_dpsparse.privacy.accounting import make_accountant
from tf_dpsparse.privacy.accounting import sampled_gaussian_event
from tf_dpsparse.privacy.ledger import BudgetExhaustedError
from tf_dpsparse.privacy.ledger import PrivacyLedger

__all__ = [
    'BudgetExhaustedError', 'PrivacyLedger', 'calibrate_noise_multiplier',
    'compute_epsilon', 'epsilon_of', 'make_accountant',
    'sampled_gaussian_event'
]
