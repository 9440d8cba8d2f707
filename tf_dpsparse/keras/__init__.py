"""Keras front: a DP-SGD optimizer whose update is a top-k sparse slice.

`DPSparseOptimizer` wraps any `tf.keras` optimizer for `model.compile` /
`model.fit`; `poisson_batches` feeds `fit` the Poisson-sampled batches that
the amplified ε assumes; `PrivacyCallback` reports ε per epoch (Poisson or
shuffled-batch accounting, matching the data) and stops training at a
budget, refusing with the ε spent and remaining when not one more step fits;
`check_model` refuses layers that learn outside the noised gradient;
`ghost_clipped_sum` (where `supports_ghost`) and `per_example_gradients`
are the per-example clipping both fronts use (the optimizer's `model.fit`
path and the TFF client work), ghost norms wherever they apply. A run
cut short and resumed by `tf.keras.callbacks.BackupAndRestore` continues the
optimizer's residual, counters and slots, and so its ε, from the backup.
All call `tf_dpsparse.core`, `tf_dpsparse.codec` and `tf_dpsparse.privacy`;
nothing here re-implements clipping, noise, sampling or top-k.
"""

from tf_dpsparse.keras.callbacks import PrivacyCallback
from tf_dpsparse.keras.model_check import check_model
from tf_dpsparse.keras.optimizer import DPSparseOptimizer
from tf_dpsparse.keras.per_example import ghost_clipped_sum
from tf_dpsparse.keras.per_example import per_example_gradients
from tf_dpsparse.keras.per_example import supports_ghost
from tf_dpsparse.keras.sampling import poisson_batches

__all__ = ['DPSparseOptimizer', 'PrivacyCallback', 'check_model',
           'ghost_clipped_sum', 'per_example_gradients', 'poisson_batches',
           'supports_ghost']
