"""LiteRT devices and a payload server, without TFF: what a deployment runs.

Several HAPT users (real accelerometer + gyroscope windows, 6 activities)
each get the same .tflite client, exported once from the package's HAPT
model. Every round each device runs Poisson-sampled DP-SGD steps on its own
windows inside LiteRT (`LiteClient.train_step`: each window joins each step's
batch independently with probability q = batch size / the device's number of
windows), uploads the encoded top-k of its update (initial - trained; its residual
stays on the device), and the server (`tds.deploy.DeploymentServer`)
validates, averages and answers with one encoded top-k download that every
device applies. All of it runs in this one process; only bytes pass between
devices and server. In round 2 one device's upload is cut short in transit:
the server rejects it and the round goes on.

Privacy is example-level (the server is not trusted): a
`tds.privacy.ExampleLevelDP` built from the settings read off the .tflite,
at the largest q any device uses (the device with the fewest windows). The
server's ledger charges its DpEvent every round and reports ε (the
worst-case device's, taking part in every round); with `--epsilon-budget`
it refuses the round that would exceed it, before any device trains for
it, and the run stops there.
Prints the test accuracy of the model the devices hold, the bytes each way
and ε.

With `--subspace 0.02` the devices train in a public random subspace
(issue 18): theta = origin + P z with z 2 % of the weights, P a count
sketch every device and the server rebuild from `--subspace-seed`; uploads,
downloads and the DP noise are of z (all of it each way, no index bytes).

Run: `python examples/lite_devices.py` (`--devices 3 --rounds 5` is quicker).
"""

import argparse
import time

import numpy as np

import tf_dpsparse as tds
from tf_dpsparse import models

DELTA = 1e-5


def accuracy(client, x, y, chunk=512):
  logits = np.concatenate([client.infer(x[i:i + chunk])
                           for i in range(0, len(x), chunk)])
  return float(np.mean(np.argmax(logits, axis=1) == y))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=5, help='3 to 10')
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--local-steps', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=32,
                      help='expected batch size q * n of a Poisson step')
  parser.add_argument('--learning-rate', type=float, default=0.5)
  parser.add_argument('--l2-norm-clip', type=float, default=1.0)
  parser.add_argument('--noise-multiplier', type=float, default=1.0)
  parser.add_argument('--upload-density', type=float, default=None,
                      help='default 0.02 (all of z with --subspace)')
  parser.add_argument('--download-density', type=float, default=None,
                      help='default 0.1 (all of z with --subspace)')
  parser.add_argument('--subspace', type=float, default=None,
                      help='train z of a public random subspace of this '
                      'fraction of the weights (the densities then apply '
                      'to z, default all of it)')
  parser.add_argument('--subspace-seed', type=int, default=0)
  parser.add_argument('--epsilon-budget', type=float, default=None,
                      help=f'stop before a round would spend more (δ={DELTA:g})')
  parser.add_argument('--seed', type=int, default=0,
                      help='picks the users; sampling and noise are unseeded')
  args = parser.parse_args()
  if not 3 <= args.devices <= 10:
    parser.error('--devices must be in [3, 10].')
  if args.subspace is None:  # top-k of the weights
    args.upload_density = args.upload_density or 0.02
    args.download_density = args.download_density or 0.1
  return args


def device_privacy(device, local, local_steps):
  """The devices' DP-SGD as the ledger's mechanism: settings from the .tflite,
  the accounted rate batch_size / (the fewest windows of any device)."""
  return tds.privacy.ExampleLevelDP(
      l2_norm_clip=device.l2_norm_clip,
      noise_multiplier=device.noise_multiplier,
      batch_size=device.batch_size, local_steps=local_steps,
      min_client_examples=min(len(y) for _, y in local.values()))


def run_round(round_num, args, devices, local, server, users):
  """Every device trains and uploads; the server answers; all apply it."""
  server.open_round()  # the ledger's charge, before any device trains
  for cid, device in devices.items():
    x, y = local[cid]
    for _ in range(args.local_steps):
      device.train_step(x, y)  # a Poisson sample of the device's windows
    payload = device.upload()
    if round_num == 2 and cid == users[0]:
      payload = payload[:len(payload) // 2]  # a link drops the tail
    server.submit(cid, payload)
  result = server.finish_round()
  for device in devices.values():
    device.apply_download(result.download)
  return result


def describe(args, users, local, test_y, model_bytes, devices, server):
  device = devices[users[0]]
  rates = [device.sampling_rate(len(y)) for _, y in local.values()]
  budget = ('' if args.epsilon_budget is None else
            f', budget ε={args.epsilon_budget:g}')
  print(f'{args.devices} HAPT users {users}: '
        f'{sum(len(y) for _, y in local.values()):,} training windows; '
        f'test set {len(test_y):,} windows')
  subspace = ('' if server.subspace is None else
              f', trained in a subspace of {server.size:,} dimensions')
  print(f'model: {server.model_size:,} parameters{subspace}, .tflite '
        f'{len(model_bytes):,} bytes; upload k = {device.k:,}, download k = '
        f'{server.k:,} (dense update: '
        f'{tds.codec.dense_nbytes(server.model_size):,} bytes)')
  print(f'sampling: Poisson, each window joins each DP-SGD step with q = '
        f'{device.batch_size} / (the device\'s windows), q in '
        f'[{min(rates):.3f}, {max(rates):.3f}]; ε is the Poisson-subsampled '
        f'Gaussian\'s at the largest q (noise multiplier '
        f'{device.noise_multiplier:g}), at δ={DELTA:g}{budget}')


def main():
  args = parse_args()
  data = tds.data.load('hapt')
  rng = np.random.default_rng(args.seed)
  users = sorted(rng.choice(data.client_ids, args.devices, replace=False))
  local = {cid: data.client_arrays(cid) for cid in users}
  test_x, test_y = data.test_arrays()
  model = models.build_model(data.element_spec[0].shape, data.num_classes)
  model_bytes = tds.lite.export_client(
      model, batch_size=args.batch_size, l2_norm_clip=args.l2_norm_clip,
      noise_multiplier=args.noise_multiplier, density=args.upload_density,
      learning_rate=args.learning_rate, num_classes=data.num_classes,
      subspace=args.subspace, subspace_seed=args.subspace_seed)
  devices = {cid: tds.lite.LiteClient(model_bytes) for cid in users}
  first = devices[users[0]]
  server = tds.deploy.DeploymentServer(
      first.get_weights(), upload_density=args.upload_density,
      download_density=args.download_density,
      privacy=device_privacy(first, local, args.local_steps),
      delta=DELTA, epsilon_budget=args.epsilon_budget,
      subspace=first.subspace_dims, subspace_seed=args.subspace_seed)
  describe(args, users, local, test_y, model_bytes, devices, server)
  print(f'initial accuracy {accuracy(devices[users[0]], test_x, test_y):.3f}')
  print(f'{"round":>5} {"accuracy":>8} {"accepted":>8} {"rejected":>8} '
        f'{"bytes up":>9} {"bytes down":>10} {"% dense":>8} {"ε":>7} '
        f'{"s":>5}')
  dense_round_bytes = 2 * args.devices * tds.codec.dense_nbytes(
      server.model_size)
  total_bytes, rounds = 0, 0
  for round_num in range(1, args.rounds + 1):
    start = time.perf_counter()
    try:
      result = run_round(round_num, args, devices, local, server, users)
    except tds.privacy.BudgetExhaustedError as e:
      print(f'round {round_num} refused, nothing released: {e}')
      break
    rounds = round_num
    bytes_down = result.bytes_down * args.devices
    total_bytes += result.bytes_up + bytes_down
    print(f'{round_num:>5} {accuracy(devices[users[0]], test_x, test_y):>8.3f} '
          f'{len(result.accepted):>8} {len(result.rejected):>8} '
          f'{result.bytes_up:>9,} {bytes_down:>10,} '
          f'{100 * (result.bytes_up + bytes_down) / dense_round_bytes:>7.2f}% '
          f'{result.epsilon:>7.2f} {time.perf_counter() - start:>5.1f}')
    for cid, reason in result.rejected.items():
      print(f'      rejected {cid}: {reason}')
  if not rounds:
    return
  print(f'total {total_bytes:,} bytes over {rounds} rounds '
        f'({100 * total_bytes / (rounds * dense_round_bytes):.2f} % of '
        f'dense both ways); ε {server.ledger.epsilon:.2f} at δ={DELTA:g} '
        '(the ledger\'s: every round charged); the server residual holds '
        'what downloads have not sent yet (L2 '
        f'{result.residual_norm:.3f}).')


if __name__ == '__main__':
  main()
