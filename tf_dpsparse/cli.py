"""The `tf-dpsparse` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _epsilon(args) -> int:
  from tf_dpsparse import privacy
  eps = privacy.compute_epsilon(args.noise_multiplier, args.sampling_rate,
                                args.steps, args.delta, args.accountant)
  print(f'ε = {eps:.4f} at δ = {args.delta:g} ({args.accountant}; σ = '
        f'{args.noise_multiplier}, q = {args.sampling_rate}, steps = {args.steps})')
  return 0


def _calibrate(args) -> int:
  from tf_dpsparse import privacy
  sigma = privacy.calibrate_noise_multiplier(args.target_epsilon, args.delta,
                                             args.sampling_rate, args.steps,
                                             args.accountant)
  eps = privacy.compute_epsilon(sigma, args.sampling_rate, args.steps,
                                args.delta, args.accountant)
  print(f'noise_multiplier = {sigma:.5f} (spends ε = {eps:.4f} at δ = '
        f'{args.delta:g}; q = {args.sampling_rate}, steps = {args.steps})')
  return 0


def _add_schedule(parser) -> None:
  parser.add_argument('--sampling-rate', '-q', type=float, required=True,
                      help='Poisson sampling rate per step (batch/dataset, or '
                      'clients per round / total clients)')
  parser.add_argument('--steps', type=int, required=True,
                      help='number of steps (or rounds)')
  parser.add_argument('--delta', type=float, default=1e-5, help='δ (default 1e-5)')
  parser.add_argument('--accountant', choices=('rdp', 'pld'), default='rdp')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='tf-dpsparse',
      description='Differentially private, top-k sparse federated learning.')
  sub = parser.add_subparsers(dest='command', required=True)

  eps = sub.add_parser('epsilon', help='ε of a sampled-Gaussian schedule')
  eps.add_argument('--noise-multiplier', '-z', type=float, required=True)
  _add_schedule(eps)
  eps.set_defaults(func=_epsilon)

  cal = sub.add_parser('calibrate',
                       help='noise multiplier that spends a target ε')
  cal.add_argument('--target-epsilon', '-e', type=float, required=True)
  _add_schedule(cal)
  cal.set_defaults(func=_calibrate)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except ValueError as e:
    print(f'tf-dpsparse {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
