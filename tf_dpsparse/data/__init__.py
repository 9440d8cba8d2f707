"""Real data sets shipped by packages, as federated clients.

`load(name)` returns a `FederatedData`: client ids, each client's training
data (numpy or `tf.data`), a centralized test set, the element spec and the
classes. 'hapt' has 30 natural clients (its users); the image sets are split
IID or with Dirichlet label skew. `sample_clients` draws a round's clients.
Every pickle is read with an allow-listed unpickler (`safe_pickle`).
"""

from tf_dpsparse.data.federated_data import DEFAULT_NUM_CLIENTS
from tf_dpsparse.data.federated_data import FederatedData
from tf_dpsparse.data.federated_data import NAMES
from tf_dpsparse.data.federated_data import PARTITIONS
from tf_dpsparse.data.federated_data import load
from tf_dpsparse.data.partition import dirichlet as partition_dirichlet
from tf_dpsparse.data.partition import iid as partition_iid
from tf_dpsparse.data.partition import sample_clients
from tf_dpsparse.data.safe_pickle import RefusedPickleError
from tf_dpsparse.data.sources import CorruptDataError
from tf_dpsparse.data.sources import MissingDataError

__all__ = [
    'CorruptDataError', 'DEFAULT_NUM_CLIENTS', 'FederatedData',
    'MissingDataError', 'NAMES', 'PARTITIONS', 'RefusedPickleError', 'load',
    'partition_dirichlet', 'partition_iid', 'sample_clients'
]
