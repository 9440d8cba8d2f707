"""Which Keras models DP-SGD can train privately, and why the others cannot.

DP-SGD's guarantee covers what the noised sum of clipped per-example
gradients releases. A layer that learns from the data any other way leaks
outside that sum: its state is released with the model and no ε covers it,
or it couples the examples of a batch so that one example's "per-example"
gradient carries the others' data and the clip no longer bounds one
example's influence. `check_model` refuses such layers:

- `BatchNormalization` (trainable): normalizes by the batch's statistics
  (coupling) and learns its moving mean and variance from raw activations.
  A frozen one (`trainable=False`) runs in inference mode in Keras 2: its
  statistics are constants, like pretrained weights, and it is accepted.
- recurrent layers with `stateful=True`: the state carries one batch's raw
  data into the next step's forward pass.
- any other layer holding variables created non-trainable, e.g. an adapted
  `tf.keras.layers.Normalization` (mean, variance and count computed by
  `adapt` from the data, with no noise): pass public (or separately
  privatized) statistics to its constructor, `Normalization(mean=...,
  variance=...)`, which creates no state.

Dropout, GaussianNoise and `LayerNormalization`/`GroupNormalization` (per
example, no state) are fine. (Regularization losses, `activity_regularizer`
included, cannot reach the optimizer at all: Keras 2 fails to add a scalar
loss to the per-example loss vector.)
"""

from __future__ import annotations

from typing import List, Optional

import tensorflow as tf


def check_model(model: tf.keras.Model) -> None:
  """Raises ValueError naming every layer DP-SGD cannot train privately.

  `DPSparseOptimizer` calls this for the model whose `train_step` calls it
  (`model.fit`), `PrivacyCallback` when training begins; call it yourself in
  a custom training loop. (A plain ValueError: it is raised while Keras
  traces the train step, and autograph re-raises only built-in types.)
  """
  problems = [f'{layer.name} ({type(layer).__name__}): {reason}'
              for layer, reason in _refusals(model)]
  if problems:
    raise ValueError(
        'DPSparseOptimizer cannot train this model privately: '
        + '; '.join(problems) + '.')


def _refusals(model: tf.keras.Model) -> List[tuple]:
  layers = [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)
            and not isinstance(m, tf.keras.Model)]
  return [(layer, reason) for layer in layers
          if (reason := _refusal(layer)) is not None]


def _refusal(layer: tf.keras.layers.Layer) -> Optional[str]:
  """Why `layer` learns from data outside the noised gradient, or None."""
  if isinstance(layer, tf.keras.layers.BatchNormalization):
    if not layer.trainable:
      return None  # inference mode: constant statistics, no coupling
    return ('batch statistics couple the examples of a batch (a per-example '
            'gradient is no longer one example\'s) and its moving mean and '
            'variance learn from raw data without noise; use '
            'LayerNormalization or GroupNormalization, or freeze it')
  if getattr(layer, 'stateful', False):
    return ('stateful=True carries one batch\'s raw data into the next '
            'step outside the noised gradient')
  state = [v.name for v in layer.non_trainable_weights if not v.trainable]
  if state:
    return (f'non-trainable state {state} is computed from data outside the '
            'noised gradient (e.g. Normalization.adapt); give public '
            'statistics to the constructor instead, e.g. '
            'Normalization(mean=..., variance=...)')
  return None
