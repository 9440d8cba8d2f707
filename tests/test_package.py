"""Packaging contracts: lazy TFF, no orphaned TFF worker, the CLI."""

import os
import signal
import subprocess
import sys
import textwrap
import time

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


def _fake_worker(tmp_path):
  """An executable named worker_binary that ignores SIGINT and sleeps 300 s.

  One process (not a shell with a `sleep` child, which would be orphaned when
  the shell is killed), so killing it leaves nothing behind.
  """
  fake = tmp_path / 'worker_binary'
  fake.write_text(f'#!{sys.executable} -I\nimport signal, time\n'
                  'signal.signal(signal.SIGINT, signal.SIG_IGN)\n'
                  'time.sleep(300)\n')
  fake.chmod(0o755)
  return fake


def test_stop_workers_stops_a_child_named_worker_binary(tmp_path):
  # In a child interpreter: stop_workers stops every worker child, which here
  # would include the real TFF worker other tests are using.
  fake = _fake_worker(tmp_path)
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


def _alive(pid):
  """True while `pid` runs; a zombie (dead, not yet reaped) counts as gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _gone_by(pids, deadline):
  """True once every pid is gone, False if one is still alive at `deadline`."""
  while any(_alive(pid) for pid in pids):
    if time.monotonic() > deadline:
      return False
    time.sleep(0.01)
  return True


def _sigkill_and_check_workers_die(proc, workers):
  """SIGKILLs `proc` by PID; its `workers` must be gone within 5 s.

  Whatever survives is killed by the PIDs recorded here (the workers, then
  `proc`'s own session), so a failure leaves nothing behind.
  """
  try:
    assert workers and all(_alive(pid) for pid in workers)
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone_by(workers, start + 5.0), (
        f'worker {workers} outlived its SIGKILLed parent by 5 s')
    return time.monotonic() - start
  finally:
    for pid in workers:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session)
      proc.wait()


def test_tff_launches_its_worker_through_worker_popen():
  """Importing the TFF front points TFF's worker launcher at WorkerPopen."""
  from tensorflow_federated.python.core.impl.executor_stacks import executor_factory  # pylint: disable=g-import-not-at-top
  assert executor_factory.subprocess.Popen is _workers.WorkerPopen
  assert subprocess.Popen is not _workers.WorkerPopen  # nowhere else


def test_worker_dies_with_sigkilled_parent_after_its_forking_thread_exits(
    tmp_path):
  """A `worker_binary` started from a short-lived thread outlives that thread
  (the kernel's parent-death signal follows the forking thread) and dies when
  its process is SIGKILLed."""
  fake = _fake_worker(tmp_path)
  code = textwrap.dedent(f"""
      import subprocess, threading, time
      from tf_dpsparse.federated import _workers
      started = []
      thread = threading.Thread(target=lambda: started.append(
          _workers.WorkerPopen([{str(fake)!r}], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)))
      thread.start()
      thread.join()
      time.sleep(0.5)
      print(started[0].pid, started[0].poll() is None, flush=True)
      time.sleep(300)
  """)
  proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
  with proc.stdout:
    line = proc.stdout.readline().split()  # the child prints, then sleeps
  workers = [int(line[0])] if line else []
  # Checks (and cleans up) first: the worker must be alive, then die.
  _sigkill_and_check_workers_die(proc, workers)
  assert line[1:] == ['True']  # alive after the thread that forked it ended


def test_sigkilled_run_takes_its_tff_worker_with_it(tmp_path):
  """Issue 16, item 5: `tf-dpsparse run` killed by SIGKILL (OOM killer, CI
  timeout) leaves no TFF worker behind holding its port and pipes."""
  script = os.path.join(os.path.dirname(sys.executable), 'tf-dpsparse')
  command = [script] if os.path.exists(script) else [
      sys.executable, '-c',
      'import sys; from tf_dpsparse import cli; sys.exit(cli.main())']
  proc = subprocess.Popen(
      command + ['run', '--dataset', 'digits', '--rounds', '50',
                 '--no-baseline', '--no-progress', '--out', str(tmp_path)],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      start_new_session=True)
  workers, deadline = [], time.monotonic() + 50
  while not workers and proc.poll() is None and time.monotonic() < deadline:
    workers = _workers.worker_pids(proc.pid)
    time.sleep(0.05)
  time.sleep(1.0)  # let it run with its worker
  elapsed = _sigkill_and_check_workers_die(proc, workers)
  print(f'worker {workers} gone {elapsed:.3f} s after SIGKILL of run')


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
