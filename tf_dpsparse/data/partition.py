"""Federated partitions of a pooled data set, and per-round client sampling.

Partitions return one index array per client; together they cover every
example exactly once, and the same seed gives the same partition.

Client sampling, and which front uses which:
- Poisson (`rate=q`): each client joins a round independently with
  probability q, so the number of clients varies and may be zero. This is the
  sampling the privacy accountant assumes (`tds.privacy` composes
  `PoissonSampledDpEvent`s), so the TFF front uses it for every DP run. A
  round that samples no client must still happen (noise on an empty sum):
  redrawing until someone is sampled would change the mechanism.
- Uniform without replacement (`clients_per_round=m`): exactly m clients a
  round. The TFF front uses it for the non-private baselines; it is *not*
  what the accountant's ε describes.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def _check_counts(num_examples: int, num_clients: int) -> None:
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(
        f'num_clients must be a positive integer, got {num_clients}.')
  if num_clients > num_examples:
    raise ValueError(f'cannot split {num_examples} examples over {num_clients} '
                     'clients: every client needs at least one example.')


def iid(num_examples: int, num_clients: int,
        rng: np.random.Generator) -> List[np.ndarray]:
  """A uniformly random split into `num_clients` near-equal parts."""
  _check_counts(num_examples, num_clients)
  parts = np.array_split(rng.permutation(num_examples), num_clients)
  return [np.sort(p) for p in parts]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
              rng: np.random.Generator,
              max_attempts: int = 100) -> List[np.ndarray]:
  """Label skew: each class is spread over clients in Dirichlet(α) shares.

  For every class, shares p ~ Dir(α·1) over the clients split its (shuffled)
  examples (Hsu et al. 2019, "Measuring the effects of non-identical data
  distribution"). Small α gives each client few classes; large α tends to
  IID. A draw that leaves a client empty is redrawn, up to `max_attempts`.
  """
  labels = np.asarray(labels)
  _check_counts(len(labels), num_clients)
  if not alpha > 0:
    raise ValueError(f'alpha must be > 0, got {alpha}.')
  for _ in range(max_attempts):
    chunks = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
      members = rng.permutation(np.flatnonzero(labels == label))
      shares = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = np.rint(np.cumsum(shares)[:-1] * len(members)).astype(int)
      for chunk, piece in zip(chunks, np.split(members, cuts)):
        chunk.append(piece)
    parts = [np.sort(np.concatenate(c)) for c in chunks]
    if min(map(len, parts)) > 0:
      return parts
  raise ValueError(
      f'Dirichlet(alpha={alpha}) left some of {num_clients} clients empty in '
      f'{max_attempts} draws; use a larger alpha or fewer clients.')


def sample_clients(client_ids: Sequence[str], *, rng: np.random.Generator,
                   clients_per_round: Optional[int] = None,
                   rate: Optional[float] = None) -> List[str]:
  """The clients of one round, in the order of `client_ids`.

  Give exactly one of `clients_per_round` (uniform, without replacement) or
  `rate` (Poisson; may return an empty list). See the module docstring for
  which one the privacy accounting needs.
  """
  if (clients_per_round is None) == (rate is None):
    raise ValueError('give exactly one of clients_per_round (uniform) or rate '
                     '(Poisson).')
  n = len(client_ids)
  if rate is not None:
    if not 0 < rate <= 1:
      raise ValueError(f'rate must be in (0, 1], got {rate}.')
    chosen = np.flatnonzero(rng.random(n) < rate)
  else:
    if int(clients_per_round) != clients_per_round or not (
        0 < clients_per_round <= n):
      raise ValueError(f'clients_per_round must be an integer in [1, {n}], '
                       f'got {clients_per_round}.')
    chosen = np.sort(rng.choice(n, int(clients_per_round), replace=False))
  return [client_ids[i] for i in chosen]
