"""`tds.deploy`: a deployment without TFF, the server and what devices apply.

`DeploymentServer` is the long-lived server on wire bytes: it validates
uploads, aggregates them through the same privacy object and core stages
as the TFF front (`tds.federated`), keeps its `PrivacyLedger` and refuses a
round past the budget, and answers with one encoded download per round.
A device applies a download with `apply_broadcast` and a catch-up with
`apply_catch_up` (both `tds.wire`, numpy only); `tds.lite.LiteClient` does
the former itself. Nothing here imports TensorFlow Federated.

Devices are not trusted: every upload is validated, bounded with the TFF
front's `core.bound_update`, or refused and counted by reason
(`RoundResult.rejected_by_reason`, `DeploymentServer.rejected_by_reason`);
a round below `min_clients`, or one that would leave the model non-finite,
is skipped. `DeploymentServer.save` / `load` resume a server exactly, its
ledger included (`tds.deploy.checkpoint`: one file, written atomically).

In a public random subspace (`subspace=`, issue 18) the server trains,
noises and broadcasts z of theta = origin + P z; `deployed_subspace` builds
(or checks) the count sketch the server and the devices rebuild from the
initial model and a seed.

Sign: an update is `initial - trained` (`tds.core.model_update`); the
server applies the mean with `tds.core.apply_update`.
"""

from tf_dpsparse.deploy import checkpoint
from tf_dpsparse.deploy.parametrization import deployed_subspace
from tf_dpsparse.deploy.server import MAX_WEIGHT_MAGNITUDE
from tf_dpsparse.deploy.server import REFUSALS
from tf_dpsparse.deploy.server import SKIPS
from tf_dpsparse.deploy.server import DeploymentServer
from tf_dpsparse.deploy.server import RoundResult
from tf_dpsparse.wire.downloads import apply_broadcast
from tf_dpsparse.wire.downloads import apply_catch_up

__all__ = ['DeploymentServer', 'MAX_WEIGHT_MAGNITUDE', 'REFUSALS', 'SKIPS',
           'RoundResult', 'apply_broadcast', 'apply_catch_up', 'checkpoint',
           'deployed_subspace']
