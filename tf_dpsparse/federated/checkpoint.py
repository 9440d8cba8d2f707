"""Checkpoints of a simulated run, one per round, so a crash costs one round.

A 90-round `tf-dpsparse run` or a 40-minute `tf-dpsparse bench` whose
process dies (OOM killer, CI timeout, `kill -9`) resumes after its last completed round when the same command runs
again with the same `--out`, and ends exactly where an uninterrupted run
would have: same rounds, same privacy ledger, and with seeded noise
(`RunConfig.noise_seed`) the same model.

Layout, one directory per run (`directory(out, label)`):

  <out>/checkpoint/<label>/run.json      what ran: label, resolved config and
                                         versions; another config is refused
  <out>/checkpoint/<label>/round_<r>/    everything after round r, written
                                         by TFF's FileProgramStateManager
                                         (a SavedModel in a temporary
                                         directory, then one rename)
  <out>/checkpoint/<label>/result.json   the finished run's result

Round r's directory holds all the run carries from round to round: the
process state `next` returns (global model, distributor, aggregator and
finalizer states, with seeded noise's release counter), every device's
state (`ClientStateStore`: residuals, views, last-sync rounds), and one JSON
string with the privacy ledger, the sampling RNG's state, the rounds recorded
so far and the cumulative byte counts. It appears by a rename, so it is
complete or absent: a crash while writing it leaves round r-1's, which the
manager deletes only after round r's is in place. A finished run keeps its
last checkpoint and `result.json` (written last, atomically): running the
command again says so and rewrites the outputs without training;
`--restart` deletes the directory.

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

from tf_dpsparse._atomic import write_text_atomically
from tf_dpsparse.config import RunConfig

CHECKPOINT_DIR = 'checkpoint'
_PREFIX = 'round_'
_RUN, _RESULT = 'run.json', 'result.json'


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
    if not self.existed:
      write_text_atomically(os.path.join(self.path, _RUN),
                       json.dumps(identity(label, config), indent=1))
    import tensorflow_federated as tff  # pylint: disable=import-outside-toplevel
    self._manager = tff.program.FileProgramStateManager(
        self.path, prefix=_PREFIX, keep_total=1, keep_first=False)

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
    """Checkpoints round `progress.done` (flushing a memory-mapped store)."""
    progress.store.flush()
    _wait(self._manager.save(_structure(progress, json.dumps({
        'done': progress.done, 'rounds': progress.rounds,
        'cumulative': progress.cumulative,
        'rng': progress.rng.bit_generator.state,
        'ledger': None if ledger is None else ledger.to_dict()})),
                             progress.done))

  def restore(self, progress: Progress, process) -> bool:
    """Loads the last checkpoint into `progress` (a fresh run's, which gives
    the structure to load into) and `process.ledger`; False if none."""
    version = self.latest()
    if version is None:
      return False
    value = _wait(self._manager.load(version, _structure(progress, '')))
    saved = json.loads(value['progress'])
    if saved['done'] != version:
      raise ValueError(f'{self.path}: checkpoint {version} says round '
                       f'{saved["done"]}; rerun with --restart.')
    progress.done, progress.state = version, value['process']
    progress.store.load_state_dict(value['client_states'])
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
  """The program state saved for a round (and the structure it loads into)."""
  return {'process': progress.state,
          'client_states': progress.store.state_dict(), 'progress': text}


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
  nested containers and numpy leaves (for inspection and tests)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  versions = [int(e[len(_PREFIX):]) for e in os.listdir(path)
              if e.startswith(_PREFIX) and e[len(_PREFIX):].isdigit()]
  if not versions:
    raise FileNotFoundError(f'no checkpoint in {path}.')
  value = tf.saved_model.load(os.path.join(path, f'{_PREFIX}{max(versions)}'))()
  return tf.nest.map_structure(
      lambda t: t.read_value().numpy() if isinstance(t, tf.Variable)
      else np.asarray(t), value)
