"""The deployment server's state on disk: one file, written atomically.

A checkpoint is an `.npz` of plain arrays (no pickles: `np.load` reads it
with `allow_pickle=False`) and one JSON document: the configuration, the
privacy mechanism (an allow-listed type and its fields), the ledger
(`PrivacyLedger.to_dict`), the refusal counters and whether the open round
was already charged. It is written to a temporary file in the same
directory, flushed and fsynced, then `os.replace`d over the target, so a
crash leaves the old checkpoint or the new one, never half of one.

Privacy: a checkpoint holds what the server holds between rounds, the
global model (DP: noised aggregate, or a mean of DP uploads), the public
model and the query's state. It never holds a device's upload: saving is
refused while a round has received any.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Tuple

import numpy as np
import tensorflow as tf

from tf_dpsparse._atomic import write_atomically

FORMAT = 'tf_dpsparse.DeploymentServer'
VERSION = 1


def _mechanisms() -> Dict[str, type]:
  """Privacy types a checkpoint may name (an allow-list, as the ledger's)."""
  from tf_dpsparse.privacy import mechanisms  # pylint: disable=g-import-not-at-top
  return {cls.__name__: cls for cls in (mechanisms.ClientLevelDP,
                                        mechanisms.ExampleLevelDP)}


def privacy_to_dict(privacy) -> dict:
  """A JSON-ready dict of a privacy mechanism (None: no privacy)."""
  if privacy is None:
    return None
  name = type(privacy).__name__
  if _mechanisms().get(name) is not type(privacy):
    raise TypeError(f'cannot save privacy mechanism of type {name}: only '
                    f'{sorted(_mechanisms())}.')
  return {'type': name, **dataclasses.asdict(privacy)}


def privacy_from_dict(data):
  """Inverse of `privacy_to_dict`, restricted to the known mechanisms."""
  if data is None:
    return None
  data = dict(data)
  cls = _mechanisms().get(data.pop('type', None))
  if cls is None:
    raise ValueError('unknown privacy mechanism in the checkpoint.')
  return cls(**data)


def query_state_arrays(state) -> Dict[str, np.ndarray]:
  """A DP query's global state (e.g. its release counter) as named arrays."""
  return {f'query_{i}': np.asarray(leaf)
          for i, leaf in enumerate(tf.nest.flatten(state))}


def query_state_from_arrays(like, arrays) -> object:
  """The query state saved by `query_state_arrays`, in `like`'s structure."""
  leaves = tf.nest.flatten(like)
  saved = sorted((k for k in arrays if k.startswith('query_')),
                 key=lambda k: int(k.split('_')[1]))
  if len(saved) != len(leaves):
    raise ValueError(f'the checkpoint holds {len(saved)} query state values, '
                     f'this privacy mechanism\'s query has {len(leaves)}.')
  return tf.nest.pack_sequence_as(like, [
      tf.constant(arrays[key], dtype=tf.as_dtype(leaf.dtype))
      for key, leaf in zip(saved, leaves)])


def save(path: str, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
  """Writes `meta` (JSON) and `arrays` to `path`, atomically."""
  document = json.dumps({'format': FORMAT, 'version': VERSION, **meta})
  write_atomically(path, lambda f: np.savez(f, meta=np.array(document),
                                            **arrays))


def load(path: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  """Reads a checkpoint written by `save`: `(meta, arrays)`."""
  with np.load(os.fspath(path), allow_pickle=False) as data:
    arrays = {key: data[key] for key in data.files}
  meta = json.loads(str(arrays.pop('meta', np.array('{}'))))
  if meta.get('format') != FORMAT or meta.get('version') != VERSION:
    raise ValueError(f'{path} is not a {FORMAT} checkpoint of version '
                     f'{VERSION}.')
  return meta, arrays
