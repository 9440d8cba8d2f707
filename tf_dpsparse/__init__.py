"""tf_dpsparse: differentially private, top-k sparse federated learning.

`core`, `codec` and `privacy` load eagerly (TensorFlow and dp_accounting
only). The fronts load on first use: `federated` imports TensorFlow
Federated, which is slow to import and starts a worker process, so
`import tf_dpsparse` never pulls it in.
"""

import importlib
import os

# TF's C++ INFO lines (grappler, CPU features) drown progress bars; a user
# who wants them sets TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from tf_dpsparse import codec  # noqa: E402
from tf_dpsparse import core  # noqa: E402
from tf_dpsparse import privacy  # noqa: E402

__version__ = '0.1.0'

_LAZY_SUBMODULES = ('data', 'federated', 'keras', 'lite', 'server')


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    module = importlib.import_module(f'tf_dpsparse.{name}')
    globals()[name] = module
    return module
  raise AttributeError(f'module tf_dpsparse has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_LAZY_SUBMODULES))


__all__ = ['codec', 'core', 'privacy', *_LAZY_SUBMODULES]
