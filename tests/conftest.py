"""Shared test configuration: slow marker, and no TFF worker left behind."""

import pytest

from tf_dpsparse import _workers


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
  """Fails the session if a TFF worker started by the tests is still alive."""
  leftover = _workers.worker_pids()
  if leftover:
    _workers.stop_workers()
    session.exitstatus = 1
    print(f'\nFAILED: TFF worker_binary processes outlived the tests: {leftover}')
