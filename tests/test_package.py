"""Packaging contracts: lazy TFF, no orphaned TFF worker, the CLI."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tf_dpsparse.federated import _workers


def _python(code, timeout=240):
  """Runs `code` in a fresh interpreter with piped output.

  `communicate` waits for EOF on the pipes, so an orphaned TFF worker that
  holds them open turns into a TimeoutExpired here, as it would hang CI.
  """
  proc = subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    orphans = _workers.worker_pids(proc.pid)  # before they lose their parent
    proc.kill()
    for pid in orphans:
      os.kill(pid, signal.SIGKILL)
    pytest.fail('a child process held the pipes open past exit '
                '(orphaned TFF worker?)')
  assert proc.returncode == 0, err
  return out


def test_import_does_not_load_tff():
  out = _python("""
      import sys, tf_dpsparse as tds
      tds.core, tds.codec, tds.privacy
      print(any(m.startswith('tensorflow_federated') for m in sys.modules))
  """)
  assert out.strip().splitlines()[-1] == 'False'


def test_tff_worker_does_not_outlive_python_and_core_runs_in_tff():
  out = _python("""
      import numpy as np
      import tf_dpsparse as tds
      tff = tds.federated.tff
      from tf_dpsparse.federated import _workers

      @tff.tensorflow.computation(tff.TensorType(np.float32, [6]))
      def sparsify(x):
        sparse, residual = tds.core.topk_with_error_feedback(x, 2)
        return tds.core.densify(sparse) + residual

      print(list(sparsify([1., -4., 2., 0., 3., 5.])))
      print('workers', *_workers.worker_pids())
  """)
  lines = out.strip().splitlines()
  assert lines[-2] == '[1.0, -4.0, 2.0, 0.0, 3.0, 5.0]'
  workers = [int(pid) for pid in lines[-1].split()[1:]]
  assert len(workers) == 1  # it did start one ...
  # ... communicate() returned, so nothing held the pipes after exit, and
  # the worker process is gone.
  for pid in workers:
    assert not os.path.exists(f'/proc/{pid}')


def test_stop_workers_stops_a_child_named_worker_binary(tmp_path):
  # In a child interpreter: stop_workers stops every worker child, which here
  # would include the real TFF worker other tests are using.
  fake = tmp_path / 'worker_binary'
  fake.write_text('#!/bin/sh\ntrap "" INT\nsleep 300\n')
  fake.chmod(0o755)
  out = _python(f"""
      import os, subprocess
      from tf_dpsparse.federated import _workers
      proc = subprocess.Popen([{str(fake)!r}], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      try:
        print(proc.pid in _workers.worker_pids())
        print(_workers.stop_workers(timeout=1.0))
        print(proc.pid in _workers.worker_pids(),
              os.path.exists(f'/proc/{{proc.pid}}'))
      finally:
        if os.path.exists(f'/proc/{{proc.pid}}'):
          proc.kill()
  """)
  assert out.strip().splitlines()[-3:] == ['True', 'True', 'False False']


def test_cli_help():
  out = _python("""
      import sys
      from tf_dpsparse import cli
      try:
        cli.main(['--help'])
      except SystemExit as e:
        assert e.code == 0
  """)
  assert 'tf-dpsparse' in out and 'calibrate' in out


def test_run_command_writes_results_and_leaves_no_worker(tmp_path):
  """`tf-dpsparse run` end to end on digits (tiny), with piped output; the
  dense baseline runs beside it by default."""
  out_dir = tmp_path / 'run'
  _python(f"""
      import sys
      from tf_dpsparse import cli
      sys.exit(cli.main(['run', '--dataset', 'digits', '--num-clients', '10',
                         '--clients-per-round', '5', '--rounds', '2',
                         '--privacy', 'example', '--target-epsilon', '4',
                         '--local-steps', '2', '--no-progress',
                         '--out', {str(out_dir)!r}]))
  """, timeout=600)
  import json
  results = json.loads((out_dir / 'rounds.json').read_text())
  assert [r['label'] for r in results][1] == 'dense (same privacy)'
  sparse, dense = results
  assert len(sparse['rounds']) == 2
  assert sparse['summary']['epsilon'] <= 4.0
  assert sparse['summary']['percent_of_dense'] < 100
  assert 100 <= dense['summary']['percent_of_dense'] < 100.1  # + headers
  assert (out_dir / 'accuracy.png').stat().st_size > 1000
  assert '| run |' in (out_dir / 'summary.md').read_text()
  assert 0 <= sparse['rounds'][-1]['device_accuracy'] <= 1


def test_run_flags_default_to_run_config(monkeypatch):
  """`tf-dpsparse run` with no flags is `RunConfig()`: one source of defaults
  (the generated parser holds none of its own)."""
  import dataclasses
  from tf_dpsparse import cli
  from tf_dpsparse import config
  seen = []
  monkeypatch.setattr(cli, '_train',
                      lambda run_config, job: seen.append(run_config) or 0)
  assert cli.main(['run']) == 0
  assert seen == [config.RunConfig()]
  args = cli.build_parser().parse_args(['run'])
  assert not {f.name for f in dataclasses.fields(config.RunConfig)} & set(
      vars(args))

def test_latest_cardinality_closes_the_previous_client_counts_executor():
  """The worker keeps one executor stack per client count unless told."""
  import numpy as np
  import tensorflow_federated as tff

  @tff.federated_computation(tff.FederatedType(tff.TensorType(np.float32),
                                               tff.CLIENTS))
  def total(values):
    return tff.federated_sum(values)

  factory = tff.framework.get_context_stack().current.executor_factory
  executors = _workers.LatestCardinality()
  assert total([1.0, 2.0, 3.0]) == 6.0
  executors.use(3)
  three = factory.create_executor({tff.CLIENTS: 3})
  assert factory.create_executor({tff.CLIENTS: 3}) is three  # TFF caches it
  assert total([1.0, 2.0]) == 3.0
  executors.use(2)
  two = factory.create_executor({tff.CLIENTS: 2})
  assert factory.create_executor({tff.CLIENTS: 3}) is not three  # closed
  executors.use(2)  # same count again: its stack is kept
  assert factory.create_executor({tff.CLIENTS: 2}) is two
  assert total([4.0, 5.0, 6.0]) == 15.0  # a closed count works again
