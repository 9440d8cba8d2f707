"""Shared test configuration: slow marker, and no TFF worker left behind."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', default=False,
                   help='also run tests marked slow')


def pytest_collection_modifyitems(config, items):
  if config.getoption('--runslow'):
    return
  skip = pytest.mark.skip(reason='slow: run with --runslow (make test-all)')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
  """Stops the TFF worker the tests started; fails if one cannot be stopped.

  (That the package stops it by itself at exit is tested in a subprocess,
  test_package.py, where pipes would hang on an orphan.)
  Only sessions that imported the TFF front can have started a worker.
  """
  if 'tensorflow_federated' not in sys.modules:
    return
  from tf_dpsparse.federated import _workers  # pylint: disable=import-outside-toplevel
  if not _workers.stop_workers():
    session.exitstatus = 1
    print('\nFAILED: TFF worker_binary processes outlived the tests: '
          f'{_workers.worker_pids()}')
