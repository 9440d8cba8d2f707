"""Privacy accounting on `dp_accounting`: ε, calibration, and a budget ledger."""

from tf_dpsparse.privacy.accounting import PRIVACY_MODES
from tf_dpsparse.privacy.accounting import calibrate_noise_multiplier
from tf_dpsparse.privacy.accounting import check_privacy_mode
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

__all__ = [
    'BudgetExhaustedError', 'PRIVACY_MODES', 'PrivacyLedger',
    'calibrate_noise_multiplier', 'check_privacy_mode',
    'compute_epsilon', 'compute_epsilon_shuffled', 'epsilon_of',
    'largest_within', 'make_accountant', 'max_steps',
    'RoundPrivacy', 'round_privacy', 'sampled_gaussian_event',
    'shuffled_batches_event'
]
