"""TFF's own FedAvg baselines behind the `simulation.run` process interface.

`build_tff_fed_avg` has `build_dp_sparse_fed_avg`'s signature, so
`simulation.run(config, builder=...)` runs TFF's `build_unweighted_fed_avg`
on the same data, sampling, rounds and evaluation as ours. Three aggregators:

- dense mean (FedAvg; the accuracy ceiling and the dense byte count);
- `DifferentiallyPrivateFactory.gaussian_fixed` (DP-FedAvg, client level,
  trusted aggregator, Poisson-sampled clients), noise calibrated and ε
  recorded exactly as ours (`tds.privacy`, one sampled Gaussian per round);
- `tff.learning.compression_aggregator(weighted=False)`: 8-bit uniform
  quantization of every tensor with more than 20,000 values (TFF's fixed
  threshold; smaller tensors go as float32), with TFF's adaptive zeroing and
  clipping. With `privacy='client'` the same quantizer is the DP factory's
  record aggregator. That composes in TFF's API but not in the proof:
  quantizing a clipped record can raise its L2 norm above the clip, so the
  printed ε is nominal (TFF's own docstring leaves it to the user).

Example-level DP has no TFF counterpart here (TFF's FedAvg client is not
DP-SGD): the example-level dense baseline is ours at densities 1.0.

Bytes: dense float32 each way, 4·d per client per direction. Quantized
uploads: what TFF's encoder sends, the 8-bit values bit-packed into int32
words plus the tensor's float32 min and max; each adaptive zeroing / clipping
estimator adds one float32 per client.

A research module for the paper table (`tf_dpsparse.baselines`), not package
API: DESIGN.md's contract does not cover it.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from tf_dpsparse.federated import _workers
from tf_dpsparse import privacy as privacy_lib
from tf_dpsparse.federated.learning import RoundOutput

QUANTIZATION_BITS = 8
QUANTIZATION_THRESHOLD = 20000  # compression_aggregator's, not ours
ADAPTIVE_ESTIMATORS = 2  # compression_aggregator's zeroing and clipping


def quantized_upload_nbytes(tensor_sizes, adaptive: bool = True) -> int:
  """Bytes one client uploads through TFF's 8-bit quantizing aggregator."""
  nbytes = 0
  for n in tensor_sizes:
    if n > QUANTIZATION_THRESHOLD:
      nbytes += 4 * math.ceil(n * QUANTIZATION_BITS / 32) + 2 * 4
    else:
      nbytes += 4 * n
  return nbytes + (4 * ADAPTIVE_ESTIMATORS if adaptive else 0)


class TffFedAvg:
  """A TFF `LearningProcess` with `DPSparseFedAvg`'s interface.

  Client states are passed through untouched (TFF's FedAvg has none).
  """

  def __init__(self, process, *, size, upload_nbytes, noise_multiplier,
               round_event, ledger):
    self.process = process
    self.size = size
    self.upload_nbytes = upload_nbytes
    self.noise_multiplier = noise_multiplier
    self.round_event = round_event
    self.ledger = ledger
    self._executors = _workers.LatestCardinality()

  def initialize(self):
    return self.process.initialize()

  def next(self, state, client_data, client_states) -> RoundOutput:
    if self.ledger is not None:
      self.ledger.record(self.round_event)
    out = self.process.next(state, client_data)
    self._executors.use(len(client_data))
    n, dense = len(client_data), 4 * self.size
    metrics = {
        'loss': out.metrics['client_work']['train']['loss'],
        'epsilon': 0.0 if self.ledger is None else self.ledger.epsilon,
        'bytes_up': n * self.upload_nbytes, 'bytes_down': n * dense,
        'dense_bytes_up': n * dense, 'dense_bytes_down': n * dense,
        'clipped_fraction': math.nan, 'server_residual_norm': 0.0,
    }
    return RoundOutput(out.state, client_states, metrics)

  def skip_round(self) -> None:
    if self.ledger is not None:
      self.ledger.record(self.round_event)

  def get_model_weights(self, state):
    return self.process.get_model_weights(state)


def build_tff_fed_avg(model_fn, client_optimizer_fn, server_optimizer_fn, *,
                      quantize: bool = False, privacy: Optional[str] = None,
                      l2_norm_clip: Optional[float] = None,
                      noise_multiplier: Optional[float] = None,
                      target_epsilon: Optional[float] = None,
                      delta: float = 1e-5,
                      clients_per_round: Optional[int] = None,
                      total_clients: Optional[int] = None,
                      rounds: Optional[int] = None, accountant: str = 'rdp',
                      **unused) -> TffFedAvg:
  """TFF's unweighted FedAvg, dense or 8-bit, non-private or client-level DP.

  Takes `build_dp_sparse_fed_avg`'s keyword arguments (`unused`: densities,
  batch size, ... which TFF's FedAvg has no use for).
  """
  del unused
  if privacy == 'example':
    raise ValueError("TFF's FedAvg has no example-level DP; run ours at "
                     'densities 1.0 for that baseline.')
  sizes = [int(np.prod(v.shape)) for v in model_fn().trainable_variables]
  round_event = ledger = None
  if privacy is None:
    aggregator = (tff.learning.compression_aggregator(weighted=False)
                  if quantize else tff.aggregators.UnweightedMeanFactory())
    upload = quantized_upload_nbytes(sizes) if quantize else 4 * sum(sizes)
  else:
    noise_multiplier, round_event, ledger = privacy_lib.round_privacy(
        sampling_rate=clients_per_round / total_clients, delta=delta,
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
        rounds=rounds, accountant=accountant)
    if quantize:  # gaussian_fixed's query, records summed by the quantizer
      query = tfp.NormalizedQuery(
          tfp.GaussianSumQuery(l2_norm_clip, l2_norm_clip * noise_multiplier),
          denominator=float(clients_per_round))
      aggregator = tff.aggregators.DifferentiallyPrivateFactory(
          query, tff.aggregators.EncodedSumFactory.quantize_above_threshold(
              QUANTIZATION_BITS, QUANTIZATION_THRESHOLD))
    else:
      aggregator = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
          noise_multiplier, clients_per_round, l2_norm_clip)
    upload = (quantized_upload_nbytes(sizes, adaptive=False) if quantize
              else 4 * sum(sizes))
  process = tff.learning.algorithms.build_unweighted_fed_avg(
      model_fn, client_optimizer_fn=client_optimizer_fn,
      server_optimizer_fn=server_optimizer_fn, model_aggregator=aggregator)
  return TffFedAvg(process, size=sum(sizes), upload_nbytes=upload,
                   noise_multiplier=noise_multiplier, round_event=round_event,
                   ledger=ledger)
