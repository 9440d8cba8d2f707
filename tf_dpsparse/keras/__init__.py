"""Keras front: a DP-SGD optimizer whose update is a top-k sparse slice.

`DPSparseOptimizer` wraps any `tf.keras` optimizer for `model.compile` /
`model.fit`; `PrivacyCallback` reports ε per epoch and stops training at a
budget. Both call `tf_dpsparse.core`, `tf_dpsparse.codec` and
`tf_dpsparse.privacy`; nothing here re-implements clipping, noise or top-k.
"""

from tf_dpsparse.keras.callbacks import PrivacyCallback
from tf_dpsparse.keras.optimizer import DPSparseOptimizer

__all__ = ['DPSparseOptimizer', 'PrivacyCallback']
