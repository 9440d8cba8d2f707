"""DSSGD: selective parameter sharing (Shokri & Shmatikov, CCS 2015), as a baseline.

Each participant keeps its own model. In its turn (round robin over the
round's sampled participants, the paper's sequential mode) it:

1. downloads the θd·d global parameters updated most often so far (ties
   broken at random) and overwrites its local copies;
2. trains locally (the same steps, batch size and optimizer as ours);
3. uploads c = θu·d coordinates of its update Δw, chosen and released by the
   sparse vector technique (`select_and_release`); the server adds them to
   the global parameters.

Privacy (the paper's DP variant, as we read it; the paper is not available
here): per upload, ε is split into ε1 = 8ε/9 for selection and ε2 = ε/9 for
release. Coordinates are bounded to [-γ, γ], so Δf = 2γ, and σ(ε) = 2cΔf/ε.
The threshold τ gets Lap(σ(ε1)) once, each visited coordinate's |Δw_i|
Lap(2σ(ε1)); a coordinate that passes is released as bound(Δw_i +
Lap(σ(ε2)), γ). Coordinates are visited in random order until c pass (one
sweep: fewer may pass). This is pure ε-DP for the participant's update with
respect to any change that moves each coordinate within [-γ, γ], not
(ε, δ)-DP per example; the run's total ε is `rounds` × the per-upload ε by
basic composition (worst case: a participant in every round). That is a
stronger guarantee than the (ε, δ) of the other private methods, and the
table says so.

Bytes: indices and values coded by `tds.codec` both ways, so DSSGD is
charged exactly what our codec would charge the same index sets.

A research reproduction for the paper table (`tf_dpsparse.baselines`), not
package API: DESIGN.md's contract does not cover it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dpsparse import core
from tf_dpsparse.wire import codec
from tf_dpsparse.federated.learning import RoundOutput

GAMMA = 0.01  # coordinate bound γ
TAU = 1e-4  # selection threshold τ


def svt_scales(epsilon: float, c: int, gamma: float):
  """Laplace scales (threshold, query, release) of one upload spending `epsilon`."""
  sensitivity = 2 * gamma
  sigma_select = 2 * c * sensitivity / (8 / 9 * epsilon)
  sigma_release = 2 * c * sensitivity / (1 / 9 * epsilon)
  return sigma_select, 2 * sigma_select, sigma_release


def select_and_release(delta_w: np.ndarray, c: int, epsilon: float,
                       gamma: float, tau: float, rng: np.random.Generator):
  """The sparse vector technique on one update: at most `c` noised coordinates.

  Returns (sorted int32 indices, float32 values in [-γ, γ]).
  """
  threshold_scale, query_scale, release_scale = svt_scales(epsilon, c, gamma)
  bounded = np.clip(delta_w, -gamma, gamma)
  order = rng.permutation(len(bounded))
  noisy_threshold = tau + rng.laplace(scale=threshold_scale)
  noisy_query = np.abs(bounded[order]) + rng.laplace(scale=query_scale,
                                                     size=len(order))
  chosen = np.sort(order[noisy_query >= noisy_threshold][:c])
  values = np.clip(bounded[chosen] + rng.laplace(scale=release_scale,
                                                 size=len(chosen)),
                   -gamma, gamma)
  return chosen.astype(np.int32), values.astype(np.float32)


class PureEpsilonLedger:
  """ε of `rounds_charged` uploads by basic composition (pure ε-DP, δ = 0)."""

  def __init__(self, epsilon_per_round: float):
    self.epsilon_per_round = epsilon_per_round
    self.rounds_charged = 0

  @property
  def epsilon(self) -> float:
    return self.rounds_charged * self.epsilon_per_round

  def to_dict(self) -> dict:
    return {'composition': 'basic', 'delta': 0.0,
            'epsilon_per_round': self.epsilon_per_round,
            'rounds': self.rounds_charged, 'epsilon': self.epsilon}


class DSSGD:
  """DSSGD with the `simulation.run` process interface.

  The state is the server's global parameters and update counts; the
  participants' local models live in this object, as on their devices.
  """

  def __init__(self, model_fn, client_optimizer, *, upload_density,
               download_density, epsilon_per_round, batch_size, local_steps,
               gamma, tau, value_bits, seed):
    self._model = model_fn()
    self._variables = self._model.trainable_variables
    self._initial = core.flatten(self._variables).numpy()
    self.size = len(self._initial)
    self.upload_k = core.k_for_density(self.size, upload_density)
    self.download_k = core.k_for_density(self.size, download_density)
    self.noise_multiplier = None
    self.ledger = PureEpsilonLedger(epsilon_per_round)
    self._gamma, self._tau, self._value_bits = gamma, tau, value_bits
    self._rng = np.random.default_rng(seed)
    self._local = {}
    self._train = self._build_train(client_optimizer, batch_size, local_steps)

  def _build_train(self, optimizer, batch_size, local_steps):
    variables = self._variables
    specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables)

    @tf.function
    def train(data, seed):
      data = data.unbatch().shuffle(1024, seed=seed).repeat().batch(
          batch_size, drop_remainder=True).take(local_steps)

      def step(opt_state, batch):
        with tf.GradientTape() as tape:
          loss = self._model.forward_pass(batch, training=True).loss
        grads = tape.gradient(loss, variables)
        opt_state, updated = optimizer.next(opt_state, tuple(variables),
                                            tuple(grads))
        for v, u in zip(variables, updated):
          v.assign(u)
        return opt_state

      data.reduce(optimizer.initialize(specs), step)

    return train

  def _nbytes(self, indices) -> int:
    return int(codec.encoded_nbytes(indices, self.size, self._value_bits))

  def initialize(self):
    return {'global': self._initial.copy(), 'counts': np.zeros(self.size)}

  def next(self, state, client_data, client_states) -> RoundOutput:
    self.ledger.rounds_charged += 1
    weights, counts = state['global'].copy(), state['counts'].copy()
    bytes_up = bytes_down = 0
    for data, client_state in zip(client_data, client_states):
      cid = int(client_state['client_id'])
      local = self._local.get(cid, self._initial).copy()
      most_updated = np.argsort(-(counts + self._rng.random(self.size)),
                                kind='stable')[:self.download_k]
      local[most_updated] = weights[most_updated]
      bytes_down += self._nbytes(np.sort(most_updated).astype(np.int32))
      for v, t in zip(self._variables,
                      core.unflatten(tf.constant(local), self._variables)):
        v.assign(t)
      self._train(data, tf.constant(self._rng.integers(2**31)))
      trained = core.flatten(self._variables).numpy()
      indices, values = select_and_release(
          trained - local, self.upload_k, self.ledger.epsilon_per_round,
          self._gamma, self._tau, self._rng)
      weights[indices] += values
      counts[indices] += 1
      bytes_up += self._nbytes(indices)
      self._local[cid] = trained
    dense = len(client_data) * codec.dense_nbytes(self.size)
    metrics = {'loss': np.nan, 'epsilon': self.ledger.epsilon,
               'bytes_up': bytes_up, 'bytes_down': bytes_down,
               'dense_bytes_up': dense, 'dense_bytes_down': dense,
               'clipped_fraction': np.nan, 'server_residual_norm': 0.0}
    return RoundOutput({'global': weights, 'counts': counts},
                       list(client_states), metrics)

  def skip_round(self) -> None:
    self.ledger.rounds_charged += 1

  def get_model_weights(self, state):
    return tff.learning.models.ModelWeights(
        trainable=core.unflatten(tf.constant(state['global']),
                                 self._variables),
        non_trainable=[])


def build_dssgd(model_fn, client_optimizer_fn, server_optimizer_fn=None, *,
                upload_density: float, download_density: float,
                target_epsilon: Optional[float], rounds: int, batch_size: int,
                local_steps: int, value_bits: int = 32, gamma: float = GAMMA,
                tau: float = TAU, seed: Optional[int] = None,
                **unused) -> DSSGD:
  """DSSGD spending `target_epsilon` over `rounds` (basic composition).

  Takes `build_dp_sparse_fed_avg`'s keyword arguments; θu, θd are the upload
  and download densities. There is no server optimizer: the server adds the
  released values (the paper's rule). Noise from OS entropy unless `seed`.
  """
  del server_optimizer_fn, unused
  return DSSGD(model_fn, client_optimizer_fn, upload_density=upload_density,
               download_density=download_density,
               epsilon_per_round=target_epsilon / rounds,
               batch_size=batch_size, local_steps=local_steps, gamma=gamma,
               tau=tau, value_bits=value_bits, seed=seed)
