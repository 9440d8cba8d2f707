"""`PrivacyCallback`: ε per epoch into the logs, and a stop at a budget."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_dpsparse import privacy
from tf_dpsparse.keras.optimizer import DPSparseOptimizer


class PrivacyCallback(tf.keras.callbacks.Callback):
  """Logs ε after each epoch and stops training before it exceeds a budget.

  ε is `tds.privacy.compute_epsilon(noise_multiplier, batch_size /
  dataset_size, steps, delta)` where `steps` is the model's
  `DPSparseOptimizer.iterations` (every step it ever took, across `fit` calls
  and checkpoint restores). It goes into the epoch logs as 'epsilon', hence
  into `History`. The accountant assumes Poisson sampling at rate
  batch_size / dataset_size; `model.fit` shuffles and cuts fixed-size batches
  instead, the standard approximation that TF Privacy makes too.

  With `epsilon_budget`, training stops after the last step that keeps ε
  within it (checked after every batch); if not even one more step fits,
  `fit` raises `tds.privacy.BudgetExhaustedError` before any step. A batch
  larger than `batch_size` would make the reported ε too small, so the
  optimizer's example count is checked against it each epoch.
  """

  def __init__(self,
               delta: float,
               dataset_size: int,
               batch_size: int,
               epsilon_budget: Optional[float] = None,
               accountant: str = 'rdp'):
    super().__init__()
    if not 0 < delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {delta}.')
    if not 0 < batch_size <= dataset_size:
      raise ValueError(
          f'need 0 < batch_size <= dataset_size, got {batch_size} and '
          f'{dataset_size}.')
    if epsilon_budget is not None and not epsilon_budget > 0:
      raise ValueError(f'epsilon_budget must be > 0, got {epsilon_budget}.')
    privacy.make_accountant(accountant)  # validates the name
    self.delta = delta
    self.batch_size = batch_size
    self.sampling_rate = batch_size / dataset_size
    self.epsilon_budget = epsilon_budget
    self.accountant = accountant
    self.epsilon = None

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

  def on_train_begin(self, logs=None):
    self._start = self._counts()
    self._last_steps = self._start[0]
    if self.epsilon_budget is None:
      return
    self._max_steps = privacy.max_steps(self._optimizer().noise_multiplier,
                                 self.sampling_rate, self.delta,
                                 self.epsilon_budget, self.accountant)
    if self._last_steps + 1 > self._max_steps:
      raise privacy.BudgetExhaustedError(
          f'one more step would spend more than ε={self.epsilon_budget:g} at '
          f'δ={self.delta:g} ({self._last_steps} steps taken, at most '
          f'{self._max_steps} fit).')

  def on_train_batch_end(self, batch, logs=None):
    if self.epsilon_budget is None:
      return
    steps = int(self._optimizer().iterations.numpy())
    stride = max(1, steps - self._last_steps)  # steps per execution
    self._last_steps = steps
    if steps + stride > self._max_steps:
      tf.get_logger().warning(
          'PrivacyCallback: stopping after step %d: the next would spend '
          'more than ε=%g at δ=%g.', steps, self.epsilon_budget, self.delta)
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    steps, examples = self._counts()
    if examples - self._start[1] > self.batch_size * (steps - self._start[0]):
      raise ValueError(
          f'the optimizer saw {examples - self._start[1]} examples in '
          f'{steps - self._start[0]} steps, more than batch_size='
          f'{self.batch_size} per step: ε would be under-reported.')
    self.epsilon = privacy.compute_epsilon(
        self._optimizer().noise_multiplier, self.sampling_rate, steps,
        self.delta, self.accountant)
    if logs is not None:
      logs['epsilon'] = self.epsilon
