"""`PrivacyCallback`: ε per epoch into the logs, and a stop at a budget."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_dpsparse import privacy
from tf_dpsparse.keras import model_check
from tf_dpsparse.keras.optimizer import DPSparseOptimizer

SAMPLINGS = ('shuffled', 'poisson')


class PrivacyCallback(tf.keras.callbacks.Callback):
  """Logs ε after each epoch and stops training before it exceeds a budget.

  ε is that of the mechanism the data feeds the optimizer, told by
  `sampling`:

  - 'shuffled' (default; `model.fit(x, y, batch_size)` or a
    `shuffle(n).batch(b)` pipeline without `drop_remainder`): each pass over
    the data puts every example in exactly one fixed-size batch, so no
    amplification by sampling is claimed. ε is that of one Gaussian release
    per pass, for ⌈examples seen / dataset_size⌉ passes
    (`tds.privacy.shuffled_batches_event`, TF Privacy's "each example
    occurring once per epoch"); with `num_microbatches` and more than one
    example per microbatch the sensitivity doubles (`used_microbatching`).
    Counting passes by examples seen keeps a partial last batch from being
    charged as an extra epoch.
  - 'poisson' (`tds.keras.poisson_batches`): every step is a Poisson sample
    at q = batch_size / dataset_size, and ε is the amplified
    `tds.privacy.compute_epsilon(noise_multiplier, q, steps, delta)`. The
    optimizer must divide by `expected_batch_size`, never by a Poisson
    batch's realized (data-dependent) size.

  Steps and examples come from the model's `DPSparseOptimizer` (every step
  it ever took, across `fit` calls and checkpoint restores). ε goes into the
  epoch logs as 'epsilon', hence into `History`.

  Resume: this callback keeps no count of its own. Its accounting state is
  the optimizer's step and example counters, which every checkpoint of the
  optimizer keeps, `tf.keras.callbacks.BackupAndRestore`'s included, so a
  resumed `fit` continues ε from the backup, never from zero. The counters
  are read again when the first epoch begins, after every callback's
  `on_train_begin`, so a restore listed after this callback is seen before
  any step. Privacy assumption: steps after the last backup are rolled back
  with the model and not charged; that is right only if nothing computed in
  them left the process (a mid-epoch `ModelCheckpoint`, logged weights or
  gradients), else ε is under-reported.

  With `epsilon_budget`, training stops after the last step that keeps ε
  within it, by the same accounting (checked after every batch, assuming
  full batches of `batch_size` for 'shuffled'); if not even one more step
  fits, `fit` raises `tds.privacy.BudgetExhaustedError` before any step,
  its message stating the ε spent and the ε remaining.
  Under 'shuffled' a batch larger than `batch_size` would make ε too small,
  so the optimizer's example count is checked against it each epoch.

  Args:
    delta: δ of the reported (ε, δ).
    dataset_size: examples training draws from (after any validation split).
    batch_size: the fixed batch size ('shuffled') or the expected one q * n
      ('poisson').
    epsilon_budget: stop training before ε exceeds this; None never stops.
    accountant: 'rdp' or 'pld' (`dp_accounting`).
    sampling: 'shuffled' or 'poisson', as above.
  """

  def __init__(self,
               delta: float,
               dataset_size: int,
               batch_size: int,
               epsilon_budget: Optional[float] = None,
               accountant: str = 'rdp',
               sampling: str = 'shuffled'):
    super().__init__()
    if not 0 < delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {delta}.')
    if not 0 < batch_size <= dataset_size:
      raise ValueError(
          f'need 0 < batch_size <= dataset_size, got {batch_size} and '
          f'{dataset_size}.')
    if epsilon_budget is not None and not epsilon_budget > 0:
      raise ValueError(f'epsilon_budget must be > 0, got {epsilon_budget}.')
    if sampling not in SAMPLINGS:
      raise ValueError(
          f'sampling must be one of {SAMPLINGS}, got {sampling!r}.')
    privacy.make_accountant(accountant)  # validates the name
    self.delta = delta
    self.dataset_size = dataset_size
    self.batch_size = batch_size
    self.sampling_rate = batch_size / dataset_size
    self.epsilon_budget = epsilon_budget
    self.accountant = accountant
    self.sampling = sampling
    self.epsilon = None

  @property
  def assumption(self) -> str:
    """The sampling the reported ε assumes, in words."""
    if self.sampling == 'poisson':
      return (f'Poisson-sampled batches at q = {self.batch_size}/'
              f'{self.dataset_size}')
    return ('shuffled fixed-size batches, each example once per pass (no '
            'amplification by sampling)')

  def epsilon_at(self, steps: int, examples: int) -> float:
    """ε after `steps` steps that used `examples` examples, under `sampling`."""
    return self._epsilon(self._charged(steps, examples))

  def _charged(self, steps: int, examples: int) -> int:
    """What the accountant composes: steps (Poisson) or passes (shuffled)."""
    if self.sampling == 'poisson':
      return steps
    return -(-examples // self.dataset_size)

  def _epsilon(self, charged: int) -> float:
    optimizer = self._optimizer()
    z = optimizer.noise_multiplier
    if self.sampling == 'poisson':
      return privacy.compute_epsilon(z, self.sampling_rate, charged,
                                     self.delta, self.accountant)
    used_microbatching = (optimizer.num_microbatches is not None and
                          self.batch_size > optimizer.num_microbatches)
    return privacy.compute_epsilon_shuffled(z, charged, self.delta,
                                            used_microbatching,
                                            self.accountant)

  def _most_charged_within_budget(self) -> int:
    """The most steps / passes whose ε stays within the budget (0: none)."""
    return privacy.largest_within(self._epsilon, self.epsilon_budget)

  def _optimizer(self) -> DPSparseOptimizer:
    optimizer = self.model.optimizer
    if not isinstance(optimizer, DPSparseOptimizer):
      raise TypeError(
          'PrivacyCallback needs a model compiled with '
          f'tds.keras.DPSparseOptimizer, got {type(optimizer).__name__}.')
    return optimizer

  def _counts(self):
    optimizer = self._optimizer()
    return int(optimizer.iterations.numpy()), int(optimizer.examples.numpy())

  def _check_setup(self) -> None:
    optimizer = self._optimizer()
    model_check.check_model(self.model)
    if self.sampling == 'poisson' and optimizer.expected_batch_size is None:
      raise ValueError(
          "sampling='poisson' needs DPSparseOptimizer(..., "
          'expected_batch_size=batch_size): dividing by a Poisson batch\'s '
          'realized size would release that data-dependent size.')
    if optimizer.restore_pending and self.model.built:
      optimizer.build(self.model.trainable_variables)  # counts before step 1

  def _next_charged(self, steps: int, examples: int, stride: int) -> int:
    """Charged units after `stride` more steps of at most `batch_size`."""
    return self._charged(steps + stride, examples + stride * self.batch_size)

  def _budget_words(self, steps: int, examples: int, stride: int) -> str:
    """Spent and remaining ε, and where `stride` more steps would take it."""
    spent = self.epsilon_at(steps, examples)
    after = self._epsilon(self._next_charged(steps, examples, stride))
    more = 'one more step' if stride == 1 else f'{stride} more steps'
    remaining = max(0.0, self.epsilon_budget - spent)
    return (f'ε spent {spent:.4g}, remaining {remaining:.4g} '
            f'of the budget ε={self.epsilon_budget:g} at δ={self.delta:g}; '
            f'{more} would bring ε to {after:.4g} ({steps} steps taken, '
            f'{self.sampling} sampling)')

  def _begin(self) -> None:
    """Counts at the start of this `fit`; refuses if not one more step fits."""
    self._start = self._counts()
    self._last_steps = self._start[0]
    if (self.epsilon_budget is not None and
        self._next_charged(*self._start, stride=1) > self._max_charged):
      raise privacy.BudgetExhaustedError(
          'PrivacyCallback refuses to train: '
          f'{self._budget_words(*self._start, stride=1)}.')

  def on_train_begin(self, logs=None):
    self._check_setup()
    tf.get_logger().info('PrivacyCallback: ε assumes %s.', self.assumption)
    self._max_charged = (None if self.epsilon_budget is None else
                         self._most_charged_within_budget())
    self._begin()
    self._counts_reread = False

  def on_epoch_begin(self, epoch, logs=None):
    """Re-reads the counts before the first step of this `fit`.

    A callback listed after this one (`BackupAndRestore`) restores the
    optimizer in its own `on_train_begin`, after ours: the budget and the
    batch-size check must start from the restored counts.
    """
    if not self._counts_reread:
      self._counts_reread = True
      self._begin()

  def on_train_batch_end(self, batch, logs=None):
    if self.epsilon_budget is None:
      return
    steps, examples = self._counts()
    stride = max(1, steps - self._last_steps)  # steps per execution
    self._last_steps = steps
    if self._next_charged(steps, examples, stride) > self._max_charged:
      tf.get_logger().warning('PrivacyCallback: stopping after step %d: %s.',
                              steps,
                              self._budget_words(steps, examples, stride))
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    steps, examples = self._counts()
    if (self.sampling == 'shuffled' and examples - self._start[1] >
        self.batch_size * (steps - self._start[0])):
      raise ValueError(
          f'the optimizer saw {examples - self._start[1]} examples in '
          f'{steps - self._start[0]} steps, more than batch_size='
          f'{self.batch_size} per step: ε would be under-reported.')
    self.epsilon = self.epsilon_at(steps, examples)
    if logs is not None:
      logs['epsilon'] = self.epsilon
