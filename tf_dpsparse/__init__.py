"""tf_dpsparse: differentially private, top-k sparse federated learning.

Every submodule loads on first use (`tds.core`, `tds.privacy`, ...), so
`import tf_dpsparse` costs nothing and the command line answers `--help`
without importing TensorFlow. `federated` imports TensorFlow Federated,
which is slow to import and starts a worker process.
"""

import importlib
import os

# TF's C++ INFO lines (grappler, CPU features) drown progress bars; a user
# who wants them sets TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

__version__ = '0.1.0'

_LAZY_SUBMODULES = ('codec', 'config', 'core', 'data', 'deploy', 'federated',
                    'keras', 'lite', 'privacy', 'wire')


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    module = importlib.import_module(f'tf_dpsparse.{name}')
    globals()[name] = module
    return module
  raise AttributeError(f'module tf_dpsparse has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_LAZY_SUBMODULES))


__all__ = list(_LAZY_SUBMODULES)
