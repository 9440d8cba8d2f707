"""TFF front: DP-sparse upload aggregation, sparse download, the learning process.

Importing it imports TensorFlow Federated and makes sure the TFF worker
process it may start is stopped when Python exits.
"""

import tensorflow_federated as tff  # noqa: F401  (the front's dependency)

from tf_dpsparse.federated import _workers
from tf_dpsparse.federated.aggregator import DPSparseAggregatorFactory
from tf_dpsparse.federated.aggregator import sparse_type
from tf_dpsparse.federated.client_states import ClientStateStore
from tf_dpsparse.federated.distributor import build_sparse_distributor
from tf_dpsparse.federated.distributor import topk_catch_up_payload
from tf_dpsparse.federated.learning import DPSparseFedAvg
from tf_dpsparse.federated.learning import build_dp_sparse_fed_avg
from tf_dpsparse.federated.learning import num_shared
from tf_dpsparse.federated.remote import use_workers

_workers.install()

__all__ = [
    'ClientStateStore', 'DPSparseAggregatorFactory', 'DPSparseFedAvg',
    'build_dp_sparse_fed_avg', 'build_sparse_distributor', 'num_shared',
    'sparse_type', 'topk_catch_up_payload', 'use_workers'
]
