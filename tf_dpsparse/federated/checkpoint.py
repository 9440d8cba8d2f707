"""Checkpoints of a simulated run, one per round, so a crash costs one round.

A 90-round `tf-dpsparse run` or a 40-minute `tf-dpsparse bench` whose
process dies (OOM killer, CI timeout, `kill -9`) resumes after its last
completed round when the same command runs again with the same `--out`,
and ends exactly where an uninterrupted run would have: same rounds, same
privacy ledger, and with seeded noise (`RunConfig.noise_seed`) the same
model and device states, bit for bit.

Layout, one directory per run (`directory(out, label)`):

  <out>/checkpoint/<label>/run.json      what ran: label, resolved config and
                                         versions; another config is refused
  <out>/checkpoint/<label>/round_<r>/    the program state after round r,
                                         written by TFF's
                                         FileProgramStateManager (a
                                         SavedModel in a temporary
                                         directory, then one rename)
  <out>/checkpoint/<label>/devices/      every device's state, written
                                         incrementally (`DeviceJournal`)
  <out>/checkpoint/<label>/result.json   the finished run's result

Round r's directory holds all the run carries from round to round but the
devices: the process state `next` returns (global model, distributor,
aggregator and finalizer states, with seeded noise's release counter), and
one JSON string with the privacy ledger, the sampling RNG's state, the
rounds recorded so far and the cumulative byte counts. It appears by a
rename, so it is complete or absent: a crash while writing it leaves round
r-1's, which the manager deletes only after round r's is in place. That
rename is the commit point of round r's checkpoint. A finished run keeps its
last checkpoint and `result.json` (written last, atomically): running the
command again says so and rewrites the outputs without training;
`--restart` deletes the directory.

Devices. Copying every device's state each round (residuals, and views
with 'topk' catch-up) cost 10 GB of memory at 10,000 devices, though a
round changes only the devices it sampled. The store marks the devices a
round changes (`ClientStateStore.changed`), and a checkpoint writes only
those: (1) their rows go to `devices/delta_<r>/` (each file fsynced), (2)
round r's program state is renamed into place, (3) the delta is folded into
`devices/`'s base, one memory-mapped row per device, and deleted. Resuming
from round v deletes deltas after v (their round never committed), folds
the rest, and copies the base into the new run's store. A crash at any step
leaves either round r-1's checkpoint (before step 2: its delta is
discarded) or round r's (after: folding again writes the same rows), so a
crash costs at most the round in flight. A checkpoint writes the sampled
devices' rows twice (delta, then base) plus the program state: its size
grows with the devices per round, not with the devices that exist.

Privacy across a crash. The ledger records a round's event at the start of
`next`, before the round's noise is drawn; the checkpoint holds the ledger as
of the last completed round. A crash during round r+1 therefore loses that
round's charge together with everything else of it, and the resumed run
charges round r+1 once, when it runs it again: no event is counted twice, and
none is missing from the final ledger. Dropping the in-flight charge is
sound only because nothing of the lost round left the process: in this
simulation the devices, the server and the noise are all inside it, and its
outputs are written when the run ends. A deployment that publishes a model
(or sends a download) before its checkpoint is written must checkpoint the
ledger first. With OS-entropy noise, the rerun round draws fresh noise for a
release that was never published; with `noise_seed` it draws the same noise.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
from typing import Any, Optional

import numpy as np

from tf_dpsparse._atomic import write_atomically
from tf_dpsparse._atomic import write_text_atomically
from tf_dpsparse.config import RunConfig

CHECKPOINT_DIR = 'checkpoint'
_PREFIX = 'round_'
_RUN, _RESULT = 'run.json', 'result.json'
_DEVICES, _BASE, _DELTA = 'devices', 'base.json', 'delta_'


class CheckpointMismatchError(ValueError):
  """`--out` holds a checkpoint of another run under the same label."""


def directory(out: str, label: str) -> str:
  """The run's checkpoint directory: `<out>/checkpoint/<label>`, the label
  made a safe file name (with a short hash of it when that changed it, so
  two labels cannot share a directory)."""
  name = re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_.') or 'run'
  if name != label:
    name += '-' + hashlib.sha1(label.encode()).hexdigest()[:8]
  return os.path.join(out, CHECKPOINT_DIR, name)


def identity(label: str, config: RunConfig) -> dict:
  """What must be equal for a checkpoint to be resumed: the label, the
  resolved config and the versions of the code that wrote it (TFF's
  program state is only meant to be restored by the same version)."""
  versions = {}
  for name in ('tf-dpsparse', 'tensorflow-federated', 'tensorflow'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return json.loads(json.dumps({
      'label': label, 'config': dataclasses.asdict(config.resolved()),
      'versions': versions}))


def _differences(saved: dict, wanted: dict) -> str:
  """The fields that differ, `name: saved -> wanted`, config fields first."""
  flat = lambda d: {**{k: v for k, v in d.items() if not isinstance(v, dict)},
                    **d.get('config', {}), **d.get('versions', {})}
  old, new = flat(saved), flat(wanted)
  return ', '.join(f'{name} {old.get(name)!r} there, {new.get(name)!r} now'
                   for name in sorted(old.keys() | new.keys(), key=str)
                   if old.get(name) != new.get(name))


def check(out: str, label: str, config: RunConfig) -> None:
  """Raises CheckpointMismatchError when `out` holds a checkpoint of `label`
  run with another config: resuming it would splice two different runs."""
  path = os.path.join(directory(out, label), _RUN)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  wanted = identity(label, config)
  if saved != wanted:
    raise CheckpointMismatchError(
        f'{os.path.dirname(path)} holds a checkpoint of another run of '
        f'{label!r} ({_differences(saved, wanted)}): rerun with --restart to '
        'delete it and start over, or choose another --out.')


def discard(out: str, label: str) -> bool:
  """Deletes `label`'s checkpoint (`--restart`); True if there was one."""
  path = directory(out, label)
  if not os.path.isdir(path):
    return False
  shutil.rmtree(path)
  return True


def _wait(coroutine):
  """Runs one of the manager's coroutines to its end, also from code that
  already runs an event loop (a notebook), where `asyncio.run` refuses."""
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return asyncio.run(coroutine)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(asyncio.run, coroutine).result()


@dataclasses.dataclass
class Progress:
  """Everything a simulated run carries from one round to the next, beside
  the process's ledger: `done` rounds completed, the process `state`, the
  devices' `store`, the sampling `rng`, the `rounds` recorded and the
  `cumulative` byte counts."""
  done: int
  state: Any
  store: Any  # a ClientStateStore
  rng: np.random.Generator
  rounds: list
  cumulative: dict


class RunCheckpoint:
  """One run's checkpoints (module docstring): `save` after each round,
  `restore` at start, `complete` at the end.

  Opening one refuses a directory that holds another config's run
  (`check`), writes `run.json` for a new one and removes what a crash left
  half-written.
  """

  def __init__(self, out: str, label: str, config: RunConfig):
    check(out, label, config)
    self.path = directory(out, label)
    self.existed = os.path.exists(os.path.join(self.path, _RUN))
    os.makedirs(self.path, exist_ok=True)
    for entry in os.listdir(self.path):  # a rename the crash interrupted
      if entry.startswith(_PREFIX) and '_temp' in entry:
        shutil.rmtree(os.path.join(self.path, entry), ignore_errors=True)
    _remove_partial_writes(os.path.join(self.path, _DEVICES))
    if not self.existed:
      write_text_atomically(os.path.join(self.path, _RUN),
                       json.dumps(identity(label, config), indent=1))
    import tensorflow_federated as tff  # pylint: disable=import-outside-toplevel
    self._manager = tff.program.FileProgramStateManager(
        self.path, prefix=_PREFIX, keep_total=1, keep_first=False)
    self.devices = DeviceJournal(os.path.join(self.path, _DEVICES))

  def completed(self) -> Optional[dict]:
    """The finished run's result, or None if it has not finished."""
    path = os.path.join(self.path, _RESULT)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def latest(self) -> Optional[int]:
    """The last round with a complete checkpoint, or None."""
    versions = _wait(self._manager.get_versions())
    return max(versions) if versions else None

  def save(self, progress: Progress, ledger) -> None:
    """Checkpoints round `progress.done`: the devices changed since the
    last checkpoint (their delta, durable first), then the program state
    (its rename commits the round), then the delta folded into the base."""
    ids = self.devices.write(progress.done, progress.store)
    _wait(self._manager.save(_structure(progress, json.dumps({
        'done': progress.done, 'rounds': progress.rounds,
        'cumulative': progress.cumulative,
        'rng': progress.rng.bit_generator.state,
        'ledger': None if ledger is None else ledger.to_dict()})),
                             progress.done))
    progress.store.mark_saved(ids)
    self.devices.fold(progress.done)

  def restore(self, progress: Progress, process) -> bool:
    """Loads the last checkpoint into `progress` (a fresh run's, which gives
    the structure to load into) and `process.ledger`; False if none."""
    version = self.latest()
    if version is None:  # a crash before the first round's commit
      shutil.rmtree(self.devices.path, ignore_errors=True)
      return False
    self.devices.recover(version)
    value = _wait(self._manager.load(version, _structure(progress, '')))
    saved = json.loads(value['progress'])
    if saved['done'] != version:
      raise ValueError(f'{self.path}: checkpoint {version} says round '
                       f'{saved["done"]}; rerun with --restart.')
    progress.done, progress.state = version, value['process']
    self.devices.load_into(progress.store)
    progress.rng.bit_generator.state = saved['rng']
    progress.rounds, progress.cumulative = saved['rounds'], saved['cumulative']
    if (saved['ledger'] is None) != (process.ledger is None):
      raise ValueError(f'{self.path}: the checkpoint\'s ledger does not fit '
                       'the process; rerun with --restart.')
    if saved['ledger'] is not None:
      process.ledger = type(process.ledger).from_dict(saved['ledger'])
    return True

  def complete(self, result: dict) -> None:
    """Records the finished run's result, last and atomically."""
    write_text_atomically(os.path.join(self.path, _RESULT),
                     json.dumps(result, indent=1))


def _structure(progress: Progress, text: str) -> dict:
  """The program state saved for a round (and the structure it loads into):
  the devices' states are not in it, they are in the `DeviceJournal`."""
  return {'process': progress.state, 'progress': text}


class DeviceJournal:
  """Every device's state as of the last checkpoint, written incrementally.

  A round changes only its sampled devices, so a checkpoint writes only
  those (module docstring, "Devices"). Under `<run>/devices/`:

    base.json            written last when the base is made, then after
                         each fold: {'applied': m, 'names', 'template'}
    base_<name>.npy      one memory-mapped row per device as of round m
                         (`ClientStateStore.state_dict()`'s names), made
                         as sparse files: a row never written takes no disk
    written.npy          which base rows hold data; the others are still
                         the initial row
    template_<name>.npy  the initial row (a device never sampled)
    delta_<r>/           ids.npy and <name>.npy: the rows changed since the
                         previous checkpoint, written before round r's
                         program state; folded into the base after it

  The deltas and base.json are fsynced, but TFF's program-state manager
  does not fsync round r's directory: like the rest of the checkpoint, this
  survives the process dying, not a power cut (after which `recover`
  refuses a base newer than the last program state, naming --restart).
  """

  def __init__(self, path: str):
    self.path = path

  def _file(self, *parts) -> str:
    return os.path.join(self.path, *parts)

  def meta(self) -> Optional[dict]:
    """base.json, or None before the base exists."""
    if not os.path.exists(self._file(_BASE)):
      return None
    with open(self._file(_BASE)) as f:
      return json.load(f)

  def _create(self, store) -> None:
    """An empty base (sparse files) and the initial row, taken from a
    device that has not changed since the store was made; base.json last,
    so a crash here leaves no base."""
    shutil.rmtree(self.path, ignore_errors=True)
    os.makedirs(self.path)
    arrays = store.state_dict()
    size = len(arrays['last_sync'])
    untouched = np.setdiff1d(np.arange(size), store.changed())
    for name, array in arrays.items():
      np.lib.format.open_memmap(self._file(f'base_{name}.npy'), 'w+',
                                array.dtype, array.shape).flush()
      if len(untouched):
        row = np.asarray(array[untouched[0]])
        write_atomically(self._file(f'template_{name}.npy'),
                         lambda f, row=row: np.save(f, row))
    np.lib.format.open_memmap(self._file('written.npy'), 'w+', bool,
                              (size,)).flush()
    write_text_atomically(self._file(_BASE), json.dumps({
        'applied': 0, 'names': list(arrays),
        'template': bool(len(untouched))}))

  def write(self, round_num: int, store) -> np.ndarray:
    """Round `round_num`'s delta: the rows changed since the last
    checkpoint, each file written atomically. Returns their ids."""
    if self.meta() is None:
      self._create(store)
    folder = self._file(f'{_DELTA}{round_num}')
    shutil.rmtree(folder, ignore_errors=True)  # an attempt a crash cut off
    os.makedirs(folder)
    ids = store.changed()
    write_atomically(os.path.join(folder, 'ids.npy'),
                     lambda f: np.save(f, ids))
    for name, array in store.state_dict().items():
      write_atomically(os.path.join(folder, f'{name}.npy'),
                       lambda f, array=array: _write_rows(f, array, ids))
    return ids

  def _deltas(self) -> list:
    """The rounds that have a delta directory, in order."""
    return sorted(int(e[len(_DELTA):]) for e in os.listdir(self.path)
                  if e.startswith(_DELTA) and e[len(_DELTA):].isdigit())

  def fold(self, version: int) -> None:
    """Writes the deltas of rounds up to `version` (whose program state is
    in place) into the base, in order, then deletes them. A crash midway
    is harmless: base.json still names the old round, and folding the same
    deltas again gives the same rows."""
    meta = self.meta()
    pending = [r for r in self._deltas() if meta['applied'] < r <= version]
    if pending:
      base = {n: np.load(self._file(f'base_{n}.npy'), mmap_mode='r+')
              for n in meta['names']}
      written = np.load(self._file('written.npy'), mmap_mode='r+')
      for r in pending:
        for ids, rows in _delta_chunks(self._file(f'{_DELTA}{r}'), meta):
          for name, values in rows.items():
            base[name][ids] = values
          written[ids] = True
      for array in (*base.values(), written):
        array.flush()
      del base, written
    write_text_atomically(self._file(_BASE), json.dumps(
        dict(meta, applied=max(meta['applied'], version))))
    for r in self._deltas():
      if r <= version:
        shutil.rmtree(self._file(f'{_DELTA}{r}'))

  def recover(self, version: int) -> None:
    """Brings the base to round `version`, the last complete checkpoint:
    deletes the deltas of rounds after it (written before a crash cut off
    their program state) and folds the rest."""
    meta = self.meta()
    if meta is None or meta['applied'] > version:
      raise ValueError(f'{self.path} does not hold the device states of '
                       f'checkpoint {version} (a checkpoint written before '
                       'incremental device checkpoints?); rerun with '
                       '--restart.')
    for r in self._deltas():
      if r > version:
        shutil.rmtree(self._file(f'{_DELTA}{r}'))
    self.fold(version)

  def load_into(self, store) -> None:
    """Copies the base into `store` (a store of the same shape and dtypes),
    a chunk of rows at a time, never-written rows from the initial row;
    then the store has nothing left to save."""
    meta = self.meta()
    mine = store.state_dict()
    base = {n: np.load(self._file(f'base_{n}.npy'), mmap_mode='r')
            for n in meta['names']}
    if list(base) != list(mine) or any(
        base[n].shape != a.shape or base[n].dtype != a.dtype
        for n, a in mine.items()):
      raise ValueError(f'{self.path}: the saved device states do not fit '
                       'this run\'s store; rerun with --restart.')
    written = np.load(self._file('written.npy'))
    template = self._template(meta)
    for ids in _chunks(np.flatnonzero(written), mine):
      store.set_rows(ids, {n: base[n][ids] for n in base})
    for ids in _chunks(np.flatnonzero(~written), mine):
      # A fresh run's store already holds the initial rows: rewriting them
      # would fill a memory-mapped store's sparse file for nothing.
      ids = ids[_differs({n: mine[n][ids] for n in mine}, template)]
      store.set_rows(ids, template)
    store.mark_saved()

  def _template(self, meta) -> Optional[dict]:
    """The initial row by name, or None if every device had changed by the
    first checkpoint (then every base row is written)."""
    if not meta['template']:
      return None
    return {n: np.load(self._file(f'template_{n}.npy'))
            for n in meta['names']}

  def snapshot(self, version: int) -> collections.OrderedDict:
    """Every device's state at checkpoint `version`, in memory, without
    changing any file (for inspection and tests; small runs)."""
    meta = self.meta()
    template = self._template(meta)
    written = np.load(self._file('written.npy'))
    state = collections.OrderedDict()
    for name in meta['names']:
      state[name] = np.array(np.load(self._file(f'base_{name}.npy')))
      if template is not None:
        state[name][~written] = template[name]
    for r in self._deltas():
      if meta['applied'] < r <= version:
        for ids, rows in _delta_chunks(self._file(f'{_DELTA}{r}'), meta):
          for name, values in rows.items():
            state[name][ids] = values
    return state


def _remove_partial_writes(folder: str) -> None:
  """Deletes the temporary files of atomic writes a crash cut off
  (`tf_dpsparse._atomic`: `.<name>.<hex>.partial`) under `folder`."""
  for root, _, files in os.walk(folder):
    for name in files:
      if name.startswith('.') and name.endswith('.partial'):
        os.remove(os.path.join(root, name))


def _differs(rows: dict, template: dict) -> np.ndarray:
  """Which rows differ from the template in any bit (so -0.0 differs from
  0.0, and a NaN from itself does not)."""
  def bits(x):
    x = np.ascontiguousarray(x)
    return x.view(f'u{x.dtype.itemsize}')
  differs = np.zeros(len(next(iter(rows.values()))), bool)
  for name, values in rows.items():
    unequal = bits(values) != bits(np.asarray(template[name], values.dtype))
    differs |= unequal.any(axis=tuple(range(1, unequal.ndim)))
  return differs


def _chunks(ids: np.ndarray, arrays) -> list:
  """`ids` in runs of about 64 MB of rows, so a checkpoint of many devices
  never holds them all in memory at once."""
  row = sum(np.asarray(a[:1]).nbytes for a in arrays.values()) or 1
  step = max(1, (64 << 20) // row)
  return [ids[i:i + step] for i in range(0, len(ids), step)]


def _write_rows(f, array, ids: np.ndarray) -> None:
  """`array[ids]` as one .npy file, written a chunk of rows at a time."""
  np.lib.format.write_array_header_1_0(f, {
      'descr': np.lib.format.dtype_to_descr(array.dtype),
      'fortran_order': False, 'shape': (len(ids), *array.shape[1:])})
  for chunk in _chunks(ids, {'': array}):
    f.write(np.ascontiguousarray(array[chunk]).tobytes())


def _delta_chunks(folder: str, meta: dict):
  """(ids, {name: rows}) of one delta, a chunk of rows at a time."""
  ids = np.load(os.path.join(folder, 'ids.npy'))
  if not len(ids):
    return
  rows = {n: np.load(os.path.join(folder, f'{n}.npy'), mmap_mode='r')
          for n in meta['names']}
  start = 0
  for chunk in _chunks(ids, rows):
    end = start + len(chunk)
    yield chunk, {n: np.asarray(r[start:end]) for n, r in rows.items()}
    start = end


def resumable(process) -> Optional[str]:
  """Why `process` cannot resume mid-run, or None when it can.

  A process resumes when all it carries between rounds is the state `next`
  returns, the client states and a ledger that can be rebuilt from its dict
  (`from_dict`). A process keeping more inside itself says so with
  `resumable = False` (DSSGD: its participants' local models and its RNG);
  such a run checkpoints only its result and restarts from round 1.
  """
  if getattr(process, 'resumable', True) is False:
    return (f'{type(process).__name__} keeps state outside its process '
            'state')
  ledger = getattr(process, 'ledger', None)
  if ledger is not None and not hasattr(type(ledger), 'from_dict'):
    return f'its ledger ({type(ledger).__name__}) cannot be restored'
  return None


def read_state(path: str) -> dict:
  """The last checkpoint under `path` (a run's directory) as saved, without
  the process's structure: {'process', 'client_states', 'progress'} with
  nested containers and numpy leaves, every device's state in memory (for
  inspection and tests; no file is changed)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  versions = [int(e[len(_PREFIX):]) for e in os.listdir(path)
              if e.startswith(_PREFIX) and e[len(_PREFIX):].isdigit()]
  if not versions:
    raise FileNotFoundError(f'no checkpoint in {path}.')
  value = tf.saved_model.load(os.path.join(path, f'{_PREFIX}{max(versions)}'))()
  value = tf.nest.map_structure(
      lambda t: t.read_value().numpy() if isinstance(t, tf.Variable)
      else np.asarray(t), value)
  value['client_states'] = DeviceJournal(
      os.path.join(path, _DEVICES)).snapshot(max(versions))
  return value
