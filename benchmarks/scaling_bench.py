"""Memory and time of rounds as the population grows, on 0, 1 or 2 workers.

Issue 19, item 3: with the client-state store memory-mapped on disk
(`ClientStateStore(path=...)`, `tf-dpsparse run --client-state-path`), the
resident memory of the driver and of TFF's workers must grow with the
devices *per round*, not with the devices that exist. This runs a few
client-level DP rounds (Poisson sampling at rate per_round / total) on MNIST
for each population size and worker count, each in a fresh process, and
records every process's peak resident memory and the seconds per round.

Why not `tf-dpsparse run`: `tds.data.load` splits MNIST's 60,000 training
images without overlap and redraws any split leaving a device empty, which
at 10,000 devices (6 images each on average) never succeeds. Here device i
is drawn lazily from (seed, i) when it is sampled: its label mix p_i ~
Dirichlet(alpha), 1 + Poisson(60,000 / total - 1) images drawn from the
classes by p_i (devices may share images). Nothing is kept per device but
its row in the store, so only the store can grow with the population: that
is what is measured. A round otherwise does what `simulation.run` does
(its `build_process` and `device_dataset`).

Memory is read from /proc: VmHWM (peak resident) of the driver and of each
TFF `worker_binary` (the local one, or the services behind `tf-dpsparse
worker`), and the driver's anonymous memory sampled every 0.1 s apart from
its file-backed pages (a memory-mapped store's touched rows count as
resident file pages, which the kernel can drop; anonymous memory cannot).

Each row also has the wire bytes per round (the upload and download the
devices would send, from the round's metrics) and the ratio of its seconds
per round to the fewest workers measured for the same setting (issue 19,
item 4: 50, 200 and 1,000 devices per round on 1 vs 2 workers).

`--modes breakdown` times one round's parts alone on TFF's local worker, to
say on paper where the time of N hosts would go: the whole round, the
devices' client work (TFF's stage alone, every sampled device), the
aggregator over their uploads, and the driver serializing the round's
device data and states (the bytes a remote worker receives). Each is the
second call of the same computation with the same client count.

`--modes checkpoint` runs `simulation.run` with a checkpoint every round
and records, per `RunCheckpoint.save`, its seconds, the bytes it wrote
(/proc/self/io write_bytes: write() calls and pages dirtied through a
memory map) and the checkpoint's size on disk: the cost of checkpointing
the device states, before and after checkpoints became incremental.

Run: `python benchmarks/scaling_bench.py` (defaults: totals 1,000 and
10,000, 50 devices per round, 4 rounds, 0 and 2 workers); results to
benchmarks/results/scaling_bench.{json,md} (`--name`).
"""

# TensorFlow is imported only by the process that measures.
# pylint: disable=import-outside-toplevel

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
MB = 1024 * 1024


def _status(pid) -> dict:
  """/proc/<pid>/status memory lines, in bytes (empty once it is gone)."""
  values = {}
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        name, _, rest = line.partition(':')
        if name in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
          values[name] = int(rest.split()[0]) * 1024
  except OSError:
    pass
  return values


class Sampler:
  """Peaks of RssAnon / RssFile of `pids()` every `interval` s (a thread)."""

  def __init__(self, pids, interval: float = 0.1):
    self._pids, self._interval = pids, interval
    self.peaks = {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(self._interval):
      self.sample()

  def sample(self):
    for pid in self._pids():
      peak = self.peaks.setdefault(pid, {})
      for name, value in _status(pid).items():
        peak[name] = max(peak.get(name, 0), value)

  def stop(self) -> dict:
    self._stop.set()
    self._thread.join()
    self.sample()
    return self.peaks


def device_examples(pools, device: int, *, total: int, seed: int,
                    alpha: float, num_examples: int):
  """Device `device`'s image indices, drawn from (seed, device) alone: a
  Dirichlet(alpha) label mix, 1 + Poisson(num_examples / total - 1)
  images. `pools[c]` holds class c's indices."""
  import numpy as np
  rng = np.random.default_rng([seed, device])
  mix = rng.dirichlet(np.full(len(pools), alpha))
  size = 1 + rng.poisson(max(num_examples / total - 1, 0))
  labels = rng.choice(len(pools), size, p=mix)
  return np.array([pools[c][rng.integers(len(pools[c]))] for c in labels])


def _start_workers(count: int, log_dir: str):
  """`count` `tf-dpsparse worker` processes on free ports, once listening."""
  import portpicker
  procs = []
  for _ in range(count):
    port = portpicker.pick_unused_port()
    log = open(os.path.join(log_dir, f'worker-{port}.log'), 'wb')
    procs.append((f'127.0.0.1:{port}', log.name, subprocess.Popen(
        [sys.executable, '-m', 'tf_dpsparse.cli', 'worker', '--port',
         str(port)], stdout=log, stderr=subprocess.STDOUT)))
  deadline = time.monotonic() + 120
  for _, name, proc in procs:
    while b'executor service on port' not in open(name, 'rb').read():
      if proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f'worker did not start: {open(name).read()}')
      time.sleep(0.1)
  return procs


def _stop_workers(procs) -> None:
  for _, _, proc in procs:
    proc.terminate()
  for _, _, proc in procs:
    try:
      proc.wait(15)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _setup(args, store_path: str):
  """(config, fed, process, store, pools) for one measurement."""
  import numpy as np
  from tf_dpsparse import config as config_lib
  from tf_dpsparse import data
  from tf_dpsparse.federated import ClientStateStore
  from tf_dpsparse.federated import simulation
  config = config_lib.RunConfig(
      dataset='mnist', rounds=args.rounds, num_clients=args.total,
      partition='iid', privacy='client', clients_per_round=args.per_round,
      noise_multiplier=1.0, seed=args.seed, client_state_path=store_path)
  fed = data.load('mnist', num_clients=10, partition='iid', seed=args.seed)
  _, model_fn = simulation.model_fns(fed, args.seed)
  process = simulation.build_process(config, model_fn,
                                     total_clients=args.total,
                                     min_client_examples=None)
  store = ClientStateStore(args.total, process.size, path=store_path)
  labels = fed.train_arrays()[1]
  pools = [np.flatnonzero(labels == c) for c in range(fed.num_classes)]
  return config, fed, process, store, pools


def _sampled_round(args, config, fed, pools, rng):
  """(sampled devices, their datasets) for one round, as `_rounds` draws
  them: Poisson sampling at per_round / total, lazy Dirichlet devices."""
  import tensorflow as tf
  from tf_dpsparse import data
  from tf_dpsparse.federated import simulation
  x, y = fed.train_arrays()
  sampled = data.sample_clients(list(range(args.total)), rng=rng,
                                rate=args.per_round / args.total)
  datasets = []
  for device in sampled:
    idx = device_examples(pools, device, total=args.total, seed=args.seed,
                          alpha=args.alpha, num_examples=len(y))
    datasets.append(simulation.device_dataset(
        tf.data.Dataset.from_tensor_slices((x[idx], y[idx])), len(idx),
        config, rng))
  return sampled, datasets


def _rounds(args, config, fed, process, store, pools) -> list:
  """Runs the rounds; returns one {'devices', 'seconds', 'bytes_up',
  'bytes_down'} per round run (bytes: the wire format's, every device)."""
  import numpy as np
  rng, state, rows = np.random.default_rng(args.seed), process.initialize(), []
  for _ in range(args.rounds):
    sampled, datasets = _sampled_round(args, config, fed, pools, rng)
    if not sampled:
      process.skip_round()
      continue
    start = time.perf_counter()
    out = process.next(state, datasets, store.get(sampled))
    rows.append({'devices': len(sampled),
                 'seconds': time.perf_counter() - start,
                 'bytes_up': int(out.metrics['bytes_up']),
                 'bytes_down': int(out.metrics['bytes_down'])})
    store.put(out.client_states)
    state = out.state
  return rows


def _written() -> int:
  """Bytes this process has dirtied for storage (/proc/self/io
  write_bytes): write() calls and pages written through a memory map."""
  with open('/proc/self/io') as f:
    return next(int(line.split()[1]) for line in f
                if line.startswith('write_bytes'))


def _disk_usage(path: str) -> int:
  """Bytes allocated on disk under `path` (sparse files count their data)."""
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512
             for d, _, files in os.walk(path) for f in files)


@contextlib.contextmanager
def _timed_saves(saves: list):
  """Times every `RunCheckpoint.save` and records the bytes it wrote and
  the checkpoint's size on disk after it: one dict per round in `saves`.
  Works on any version of the checkpoint (it wraps the public method)."""
  from tf_dpsparse.federated import checkpoint
  save = checkpoint.RunCheckpoint.save

  def timed(self, progress, ledger):
    before, start = _written(), time.perf_counter()
    save(self, progress, ledger)
    saves.append({'round': progress.done,
                  'seconds': time.perf_counter() - start,
                  'bytes_written': _written() - before,
                  'on_disk': _disk_usage(self.path)})

  checkpoint.RunCheckpoint.save = timed
  try:
    yield
  finally:
    checkpoint.RunCheckpoint.save = save


def _through_run(args, store_path: str, tmp: str):
  """`simulation.run` itself (what `tf-dpsparse run` runs), on MNIST split
  IID (`tds.data.load`; its Dirichlet split cannot make 10,000 devices),
  checkpointing every round under `tmp` with `args.mode == 'checkpoint'`:
  (parameters, rows as `_rounds` gives them, checkpoint saves)."""
  from tf_dpsparse import config as config_lib
  from tf_dpsparse.federated import simulation
  config = config_lib.RunConfig(
      dataset='mnist', rounds=args.rounds, num_clients=args.total,
      partition='iid', privacy='client', clients_per_round=args.per_round,
      noise_multiplier=1.0, seed=args.seed, client_state_path=store_path,
      workers=args.addresses, catch_up=args.catch_up)
  saves = []
  with _timed_saves(saves):
    result = simulation.run(config, progress=False, out=os.path.join(
        tmp, 'out') if args.mode == 'checkpoint' else None)
  return result['summary']['parameters'], [
      {'devices': r['clients'], 'seconds': r['seconds'],
       'bytes_up': r['bytes_up'], 'bytes_down': r['bytes_down']}
      for r in result['rounds']], saves


def _stages_setup(args, store_path: str):
  """`_setup`, keeping the stages `learning.compose` composed the process
  from, so each can be timed alone (`breakdown`)."""
  import fed_bench  # pylint: disable=g-import-not-at-top
  from tf_dpsparse.federated import learning
  kept, compose = {}, learning.compose

  def keep(stages, *rest):
    kept['stages'] = stages
    return compose(stages, *rest)

  with fed_bench.patched(learning, compose=keep):
    setup = _setup(args, store_path)
  return setup, kept['stages']


def _timed(fn):
  """(result, seconds) of `fn()`, run twice: the first call loads the
  computation into TFF's worker, the second is timed."""
  fn()
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def breakdown(args, store_path: str) -> dict:
  """Where one round's time goes at `per_round` devices, on TFF's local
  worker: the whole round; the driver serializing the round's device data
  and states (what a remote worker receives, and its size); the devices'
  client work alone, all of them (TFF's `round_profile` stages); and the
  aggregator over their uploads. Each timed on a second call."""
  import numpy as np
  import round_profile  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.executors import (
      value_serialization)
  (config, fed, process, store, pools), stages = _stages_setup(
      args, store_path)
  state = process.initialize()
  sampled, data = _sampled_round(args, config, fed, pools,
                                 np.random.default_rng(args.seed))
  states = store.get(sampled)
  _, whole = _timed(lambda: process.next(state, data, states))
  parameter = process.iterative_process.next.type_signature.parameter
  protos, serialize = _timed(lambda: [
      value_serialization.serialize_value(value, kind)[0]
      for value, kind in ((data, parameter[1]), (states, parameter[2]))])
  at = round_profile._at_clients(stages)  # pylint: disable=protected-access
  download = at['distributor'](state['distributor'],
                               state['global_model_weights'])
  synced = at['device_download']([download] * len(data), states)
  work = ([s[0] for s in synced], data, [s[1] for s in synced],
          [np.int32(1)] * len(data), [download['shared_indices']] * len(data))
  outs, client_work = _timed(lambda: at['client_work'](*work))
  _, aggregate = _timed(lambda: stages.aggregator.next(
      state['aggregator'], [o[0] for o in outs]))
  return {'devices': len(sampled), 'round_seconds': whole,
          'serialize_seconds': serialize,
          'serialized_bytes': sum(p.ByteSize() for p in protos),
          'client_work_seconds': client_work,
          'aggregate_seconds': aggregate, 'parameters': process.size}


def measure(args) -> dict:
  """One measurement in this process: the rounds, peaks, seconds."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  saves = []
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    procs = _start_workers(args.workers, tmp) if args.workers else []
    try:
      from tf_dpsparse.federated import _workers
      from tf_dpsparse.federated import remote
      services = lambda: [os.getpid(), *_workers.worker_pids(), *[  # noqa: E731
          pid for _, _, p in procs for pid in _workers.worker_pids(p.pid)]]
      sampler = Sampler(services)
      store_path = os.path.join(tmp, 'residuals.npy')
      args.addresses = ','.join(a for a, _, _ in procs) or None
      if args.mode == 'breakdown':
        return dict(mode='breakdown', total_devices=args.total,
                    per_round=args.per_round, **breakdown(args, store_path),
                    load_average=os.getloadavg())
      if args.mode != 'rounds':
        size, rows, saves = _through_run(args, store_path, tmp)
      else:
        setup = _setup(args, store_path)
        size = setup[2].size
        with remote.use_workers(args.addresses.split(',')) if procs else (
            contextlib.nullcontext()):
          rows = _rounds(args, *setup)
      peaks = sampler.stop()
      on_disk = os.stat(store_path)
    finally:
      _stop_workers(procs)
  return _row(args, size, rows, peaks, on_disk, saves)


def _mean(values) -> float:
  values = list(values)
  return sum(values) / len(values) if values else 0.0


def _row(args, size: int, rows, peaks, on_disk, saves) -> dict:
  """The JSON row of one measurement (means leave out the first round,
  which traces and loads the computations)."""
  driver = peaks.pop(os.getpid())
  later = rows[1:] or rows
  return {
      'mode': args.mode, 'total_devices': args.total,
      'per_round': args.per_round, 'catch_up': args.catch_up,
      'workers': args.workers, 'parameters': size,
      'devices_per_round': [r['devices'] for r in rows],
      'seconds_per_round': [round(r['seconds'], 3) for r in rows],
      'mean_seconds_after_first': _mean(r['seconds'] for r in later),
      'bytes_per_round': _mean(r['bytes_up'] + r['bytes_down'] for r in rows),
      'bytes_up_per_round': _mean(r['bytes_up'] for r in rows),
      'checkpoints': saves,
      'checkpoint_seconds': _mean(c['seconds'] for c in saves[1:] or saves),
      'checkpoint_bytes_written': _mean(
          c['bytes_written'] for c in saves[1:] or saves),
      'checkpoint_on_disk': saves[-1]['on_disk'] if saves else 0,
      'driver_peak_mb': driver.get('VmHWM', 0) / MB,
      'driver_peak_anon_mb': driver.get('RssAnon', 0) / MB,
      'driver_peak_file_mb': driver.get('RssFile', 0) / MB,
      'worker_peak_mb': [p.get('VmHWM', 0) / MB for p in peaks.values()],
      'worker_peak_anon_mb': [p.get('RssAnon', 0) / MB
                              for p in peaks.values()],
      'store_file_mb': on_disk.st_size / MB,
      'store_on_disk_mb': on_disk.st_blocks * 512 / MB,
      'load_average': os.getloadavg(),  # other jobs on the same cores
  }


def _ratio(row, rows) -> str:
  """Seconds per round over the same measurement's on the fewest workers
  measured (1 worker, or the local one): above 1 is slower."""
  same = [r for r in rows if r.get('mode') == row.get('mode') and all(
      r[k] == row[k] for k in ('total_devices', 'per_round'))]
  base = min(same, key=lambda r: r['workers'])
  seconds = 'mean_seconds_after_first'
  return f'{row[seconds] / base[seconds]:.2f}'


def table(rows) -> str:
  """A markdown table of the round measurements (`rounds`, `run`,
  `checkpoint` modes)."""
  lines = ['| mode | devices | per round (sampled) | workers | s/round '
           '(after 1st) | ratio | MB/round (wire, up+down) | driver peak MB '
           '(anon) | worker peak MB | store file MB (on disk) |',
           '|' + ' --- |' * 10]
  for r in rows:
    workers = ' + '.join(f'{m:.0f}' for m in r['worker_peak_mb'])
    lines.append(
        f'| {r.get("mode", "rounds")} | {r["total_devices"]:,} | '
        f'{r["per_round"]} '
        f'({", ".join(map(str, r["devices_per_round"]))}) | '
        f'{r["workers"] or "local"} | {r["mean_seconds_after_first"]:.2f} | '
        f'{_ratio(r, rows)} | {r.get("bytes_per_round", 0) / 1e6:.2f} | '
        f'{r["driver_peak_mb"]:.0f} ({r["driver_peak_anon_mb"]:.0f}) | '
        f'{workers} | {r["store_file_mb"]:.0f} '
        f'({r["store_on_disk_mb"]:.0f}) |')
  return '\n'.join(lines)


def checkpoint_table(rows) -> str:
  """Per-round checkpoint cost (`checkpoint` mode): seconds of `save`,
  bytes it wrote, the checkpoint's size on disk at the end (means leave out
  the first round's save)."""
  lines = ['| devices | per round | catch-up | checkpoint s/round | MB '
           'written/round | checkpoint on disk MB | driver peak MB |',
           '|' + ' --- |' * 7]
  for r in rows:
    if r.get('mode') == 'checkpoint':
      lines.append(
          f'| {r["total_devices"]:,} | {r["per_round"]} | {r["catch_up"]} | '
          f'{r["checkpoint_seconds"]:.2f} | '
          f'{r["checkpoint_bytes_written"] / MB:.1f} | '
          f'{r["checkpoint_on_disk"] / MB:.0f} | {r["driver_peak_mb"]:.0f} |')
  return '\n'.join(lines) if len(lines) > 2 else ''


def breakdown_table(rows) -> str:
  """`breakdown` mode: one round's parts, on TFF's local worker."""
  lines = ['| devices | per round (sampled) | round s | client work s | '
           'aggregation s | serialize s | serialized MB |', '|' + ' --- |' * 7]
  for r in rows:
    lines.append(
        f'| {r["total_devices"]:,} | {r["per_round"]} ({r["devices"]}) | '
        f'{r["round_seconds"]:.2f} | {r["client_work_seconds"]:.2f} | '
        f'{r["aggregate_seconds"]:.2f} | {r["serialize_seconds"]:.2f} | '
        f'{r["serialized_bytes"] / 1e6:.1f} |')
  return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--totals', type=int, nargs='+', default=[1000, 10000],
                      help='simulated devices that exist')
  parser.add_argument('--per-round', type=int, nargs='+', default=[50],
                      help='expected devices per round (Poisson)')
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2],
                      help='0: TFF\'s local worker; n: n `tf-dpsparse '
                      'worker` processes on 127.0.0.1')
  parser.add_argument('--modes', nargs='+', default=['rounds'],
                      choices=('rounds', 'run', 'checkpoint', 'breakdown'),
                      help='rounds: the lazy Dirichlet devices above; run: '
                      '`simulation.run` on tds.data\'s IID split; checkpoint: '
                      'the same with a checkpoint every round (--out); '
                      'breakdown: one round\'s parts timed alone (local '
                      'worker)')
  parser.add_argument('--catch-up', default='union',
                      choices=('union', 'topk'),
                      help='run / checkpoint modes: topk keeps a view per '
                      'device (twice the device state)')
  parser.add_argument('--mode', default='rounds', help=argparse.SUPPRESS)
  parser.add_argument('--alpha', type=float, default=0.5,
                      help='Dirichlet concentration of a device\'s labels')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tmp', default=None,
                      help='where the memory-mapped store goes')
  parser.add_argument('--timeout', type=float, default=1800,
                      help='seconds per measurement')
  parser.add_argument('--out', default=RESULTS)
  parser.add_argument('--name', default='scaling_bench',
                      help='results go to OUT/NAME.json and OUT/NAME.md')
  parser.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--total', type=int, help=argparse.SUPPRESS)
  return parser


def _child(args, mode: str, total: int, per_round: int, workers: int) -> dict:
  """`measure` in a fresh process, so each peak is its own."""
  argv = [sys.executable, os.path.abspath(__file__), '--one', '--mode', mode,
          '--total', str(total), '--workers', str(workers), '--per-round',
          str(per_round), '--rounds', str(args.rounds), '--alpha',
          str(args.alpha), '--seed', str(args.seed), '--catch-up',
          args.catch_up, *(['--tmp', args.tmp] if args.tmp else [])]
  done = subprocess.run(argv, stdout=subprocess.PIPE, timeout=args.timeout,
                        check=True)
  return json.loads(done.stdout.decode().strip().splitlines()[-1])


def _measurements(args):
  """(mode, total, per round, workers) to measure, in order: the worker
  counts of one setting side by side; `breakdown` on the local worker."""
  for mode in args.modes:
    for per_round in args.per_round:
      for total in args.totals:
        if per_round > total:
          continue
        for workers in [0] if mode == 'breakdown' else args.workers:
          yield mode, total, per_round, workers


def _tables(rows) -> str:
  rounds = [r for r in rows if r['mode'] != 'breakdown']
  parts = [table(rounds) if rounds else '', checkpoint_table(rounds),
           breakdown_table([r for r in rows if r['mode'] == 'breakdown'])
           if len(rounds) < len(rows) else '']
  return '\n\n'.join(p for p in parts if p)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.one:
    args.workers, args.per_round = args.workers[0], args.per_round[0]
    print(json.dumps(measure(args)), flush=True)
    return 0
  rows = []
  for measurement in _measurements(args):
    rows.append(_child(args, *measurement))
    print(json.dumps(rows[-1]), flush=True)
  when = datetime.date.today().isoformat()
  command = 'python benchmarks/scaling_bench.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'{args.name}.json'), 'w') as f:
    json.dump({'date': when, 'command': command, 'rows': rows}, f, indent=1)
  text = (f'{_tables(rows)}\n\n`{command.strip()}`, {when}, '
          f'{os.cpu_count()} cores\n')
  with open(os.path.join(args.out, f'{args.name}.md'), 'w') as f:
    f.write(text)
  print('\n' + text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
