"""Parity: the TFF front and tds.deploy's server are one pipeline (issue 15).

The same uploads, taken from a seeded TFF process, go through
`tds.deploy.DeploymentServer` as wire bytes, with the same privacy
parameters and seed: both give the same global model, the same public
model and the same download bytes, in each privacy unit.

In a public random subspace (issue 18) the same holds for z: devices upload
changes of z, both servers aggregate, noise and broadcast z, and both
expand it to the same origin + P z.

One offset: TFF's distributor runs at the *start* of a round (it hands the
devices the model they train from), the server broadcasts when it
*finishes* one. So TFF's broadcast of round r is the server's download of
round r - 1 (TFF's first broadcast carries no change), and the public model
after TFF's round r is the server's after round r - 1.
"""

import numpy as np
import pytest

import tf_dpsparse as tds

tff = pytest.importorskip('tensorflow_federated')
from tf_dpsparse import federated  # noqa: E402  (after the skip)
from tf_dpsparse.federated.learning import AuditHooks  # noqa: E402
from test_federated import clients  # noqa: E402,F401  (the digits devices)
from test_federated import model_fn  # noqa: E402  (the same digits MLP)

SEED, ROUNDS, DENSITY, SERVER_LR = 7, 3, 0.1, 0.7
# z's updates are smaller than the weights': a smaller power-of-two clip.
SUB_DIMS, SUB_SEED, SUB_CLIP = 60, 3, 2**-8
# A power-of-two clip: the query's clip scales an update within it by
# exactly 1. At client level every device clips (its update's norm > CLIP).
CLIP, Z = 0.125, 0.8


def _flat(weights):
  return tds.core.flatten(list(weights.trainable)).numpy()


def _process(value_bits, **privacy):
  return federated.build_dp_sparse_fed_avg(
      model_fn, tff.learning.optimizers.build_sgdm(learning_rate=0.1),
      tff.learning.optimizers.build_sgdm(learning_rate=SERVER_LR),
      upload_density=DENSITY, download_density=DENSITY, value_bits=value_bits,
      seed=SEED, audit=AuditHooks(return_uploads=True), **privacy)


def _subspace_process(value_bits, **privacy):
  """`_process` in a subspace of SUB_DIMS: all of z each way (the default)."""
  return federated.build_dp_sparse_fed_avg(
      model_fn, tff.learning.optimizers.build_sgdm(learning_rate=0.1),
      tff.learning.optimizers.build_sgdm(learning_rate=SERVER_LR),
      subspace=SUB_DIMS, subspace_seed=SUB_SEED, value_bits=value_bits,
      seed=SEED, audit=AuditHooks(return_uploads=True), **privacy)


def _server_for(process, value_bits, privacy):
  """The deploy server of `process`'s settings, from its public initial
  model (in a subspace: the same P, rebuilt from the seed)."""
  subspace = {} if process.subspace is None else dict(
      subspace=process.subspace.dims, subspace_seed=SUB_SEED)
  density = {} if subspace else dict(upload_density=DENSITY,
                                     download_density=DENSITY)
  return tds.deploy.DeploymentServer(
      process.get_public_weights(process.initialize()), value_bits=value_bits,
      privacy=privacy, server_learning_rate=SERVER_LR, **density, **subspace)


def _payloads(client_states, size, value_bits):
  """What each device sends: its upload, encoded (lossless: wire-rounded)."""
  return [tds.wire.encode(tds.core.SparseUpdate(
      state['upload_indices'], state['upload_values'], size), value_bits)
          for state in client_states]


def _tff_download(state, size, value_bits):
  """TFF's broadcast of this round, as the bytes a device would receive."""
  broadcast = state['distributor']
  return tds.wire.encode(tds.core.SparseUpdate(
      broadcast['last_indices'], broadcast['last_values'], size), value_bits)


def _run_both(process, server, devices, value_bits):
  """ROUNDS rounds of `process`, its uploads through `server`, compared.

  Returns how many uploads the devices clipped (TFF's metric) and how many
  the server's query clipped again.
  """
  state = process.initialize()
  size = process.size
  np.testing.assert_array_equal(server.global_weights,
                                _flat(process.get_model_weights(state)))
  store = federated.ClientStateStore(len(devices), size)
  ids = list(range(len(devices)))
  downloads, device_clipped, server_clipped = [], 0, 0
  for round_num in range(1, ROUNDS + 1):
    out = process.next(state, devices, store.get(ids))
    store.put(out.client_states)
    state = out.state
    np.testing.assert_array_equal(process.get_public_weights(state),
                                  server.public_weights)
    # What is broadcast: the weights, or z (the same without a subspace).
    np.testing.assert_array_equal(process.get_public_coordinates(state),
                                  server.public_coordinates)
    if downloads:  # TFF broadcast at the start of this round
      assert _tff_download(state, size, value_bits) == downloads[-1]
      assert out.metrics['bytes_broadcast'] == len(downloads[-1])
    for cid, payload in enumerate(_payloads(out.client_states, size,
                                            value_bits)):
      assert server.submit(cid, payload)
    result = server.finish_round()
    assert result.round_num == round_num and not result.rejected
    downloads.append(result.download)
    device_clipped += round(out.metrics['clipped_fraction'] * len(devices))
    server_clipped += result.num_clipped
    np.testing.assert_allclose(server.global_weights,
                               _flat(process.get_model_weights(state)),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(server.global_coordinates,
                               _flat(state['global_model_weights']),
                               rtol=1e-6, atol=1e-7)
  assert len(set(downloads)) == ROUNDS  # the model moved every round
  return device_clipped, server_clipped


@pytest.mark.parametrize('value_bits', [32, 8])
def test_client_level_same_model_and_downloads(clients, value_bits):
  n = len(clients)
  process = _process(value_bits, privacy='client', l2_norm_clip=CLIP,
                     noise_multiplier=Z, clients_per_round=n,
                     total_clients=n)
  server = _server_for(process, value_bits,
                       tds.privacy.ClientLevelDP(CLIP, Z, n, n, seed=SEED))
  device_clipped, server_clipped = _run_both(process, server, clients,
                                            value_bits)
  assert device_clipped == n * ROUNDS  # the clip was exercised, on devices:
  assert server_clipped == 0  # the server's clip leaves honest uploads alone
  assert server.ledger.epsilon == pytest.approx(process.ledger.epsilon,
                                                rel=1e-9)


def test_example_level_same_model_and_downloads(clients):
  batch, steps, value_bits = 10, 2, 8
  process = _process(value_bits, privacy='example', l2_norm_clip=CLIP,
                     noise_multiplier=Z, batch_size=batch, local_steps=steps,
                     min_client_examples=120)
  server = _server_for(process, value_bits, tds.privacy.ExampleLevelDP(
      CLIP, Z, batch, steps, 120))
  assert _run_both(process, server, clients, value_bits) == (0, 0)
  assert server.ledger.epsilon == pytest.approx(process.ledger.epsilon,
                                                rel=1e-9)


def test_subspace_client_level_same_z_and_downloads(clients):
  n, value_bits = len(clients), 32
  process = _subspace_process(value_bits, privacy='client',
                              l2_norm_clip=SUB_CLIP, noise_multiplier=Z,
                              clients_per_round=n, total_clients=n)
  server = _server_for(process, value_bits, tds.privacy.ClientLevelDP(
      SUB_CLIP, Z, n, n, seed=SEED))
  assert (server.size, server.model_size) == (process.size,
                                              process.model_size)
  device_clipped, _ = _run_both(process, server, clients, value_bits)
  # Every device clipped. The server may count some of those again (a
  # norm one float32 rounding above the clip): scaling by 1 - 1e-7 moves
  # nothing past the 1e-6 the models are compared at.
  assert device_clipped == n * ROUNDS
  assert server.ledger.epsilon == pytest.approx(process.ledger.epsilon,
                                                rel=1e-9)


def test_subspace_example_level_same_z_and_downloads(clients):
  batch, steps, value_bits = 10, 2, 8
  process = _subspace_process(value_bits, privacy='example',
                              l2_norm_clip=CLIP, noise_multiplier=Z,
                              batch_size=batch, local_steps=steps,
                              min_client_examples=120)
  server = _server_for(process, value_bits, tds.privacy.ExampleLevelDP(
      CLIP, Z, batch, steps, 120))
  assert _run_both(process, server, clients, value_bits) == (0, 0)
  assert server.ledger.epsilon == pytest.approx(process.ledger.epsilon,
                                                rel=1e-9)
