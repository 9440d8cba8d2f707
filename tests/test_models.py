"""The reference models: seeded, BatchNorm-free, small enough for DP."""

import numpy as np
import tensorflow as tf

from tf_dpsparse import models


def test_hapt_model_is_small_seeded_and_exportable():
  model = models.build_model((128, 6), 6, seed=3)
  again = models.build_model((128, 6), 6, seed=3)
  # Global average pooling, not Flatten: ~16k parameters (DP noise is per
  # coordinate, so the parameter count sets the per-coordinate SNR).
  assert model.count_params() == 15_846
  assert all(np.array_equal(a, b)
             for a, b in zip(model.get_weights(), again.get_weights()))
  allowed = (tf.keras.layers.Conv1D, tf.keras.layers.MaxPool1D,
             tf.keras.layers.GlobalAveragePooling1D, tf.keras.layers.Dense)
  assert all(isinstance(layer, allowed) for layer in model.layers)
  assert model(np.zeros((2, 128, 6), np.float32)).shape == (2, 6)
