"""TFLite/LiteRT front: export a Keras model as an on-device DP-SGD client.

`export_client` turns a Keras model into a .tflite flatbuffer (builtin ops
only, so it runs on the plain LiteRT runtime) that trains with DP-SGD, keeps
its upload residual and public model, emits the top-k update and applies the
sparse download; `LiteClient` drives it from numpy and speaks `tds.codec`.
`LiteClient.train_step` is a Poisson-sampled DP-SGD step over the device's
examples (each joins with probability q = batch_size / n), the sampling
`tds.privacy.compute_epsilon` accounts for. An uploaded update is
public - trained weights (initial - trained, `tds.core.model_update`, the
sign of every front). The server side of a deployment without TFF is
`tds.deploy.DeploymentServer`.

`export_client(subspace=...)` exports a device that trains z of a public
random subspace, theta = origin + P z (issue 18): GATHER writes the model,
UNSORTED_SEGMENT_SUM pulls each example's gradient back to z before the
clip and the noise, and everything the device keeps or sends is of z.
"""

from tf_dpsparse.lite.client import LiteClient
from tf_dpsparse.lite.export import SIGNATURES
from tf_dpsparse.lite.export import client_module
from tf_dpsparse.lite.export import export_client
from tf_dpsparse.lite.export import export_client_to_file
from tf_dpsparse.lite.export import operator_names
from tf_dpsparse.lite.export import per_example_loss
from tf_dpsparse.lite.layers import SUPPORTED_LAYERS
from tf_dpsparse.lite.layers import UnsupportedModelError

__all__ = [
    'LiteClient', 'SIGNATURES', 'SUPPORTED_LAYERS', 'UnsupportedModelError',
    'client_module', 'export_client', 'export_client_to_file', 'operator_names',
    'per_example_loss'
]
