"""TFF front. Importing it imports TensorFlow Federated and makes sure the TFF
worker process it may start is stopped when Python exits."""

import tensorflow_federated as tff  # noqa: F401  (the front's dependency)

from tf_dpsparse import _workers

_workers.install()
