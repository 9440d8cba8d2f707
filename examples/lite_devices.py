"""LiteRT devices and a payload server, without TFF: what a deployment runs.

Several HAPT users (real accelerometer + gyroscope windows, 6 activities)
each get the same .tflite client, exported once from the package's HAPT
model. Every round each device runs DP-SGD steps on its own windows inside
LiteRT, uploads the encoded top-k of its update (its residual stays on the
device), and the server (`tds.server.PayloadRound`) validates, averages and
answers with one encoded top-k download that every device applies. All of it
runs in this one process; only bytes pass between devices and server. In
round 2 one device's upload is cut short in transit: the server rejects it
and the round goes on. Prints the test accuracy of the model the devices
hold, the bytes each way, and each device's ε (example-level DP).

Run: `python examples/lite_devices.py` (`--devices 3 --rounds 5` is quicker).
"""

import argparse
import time

import numpy as np

import tf_dpsparse as tds
from tf_dpsparse import models
from tf_dpsparse.server import PayloadRound

DELTA = 1e-5


def accuracy(client, x, y, chunk=512):
  logits = np.concatenate([client.infer(x[i:i + chunk])
                           for i in range(0, len(x), chunk)])
  return float(np.mean(np.argmax(logits, axis=1) == y))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=5, help='3 to 10')
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--local-steps', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--learning-rate', type=float, default=0.5)
  parser.add_argument('--l2-norm-clip', type=float, default=1.0)
  parser.add_argument('--noise-multiplier', type=float, default=1.0)
  parser.add_argument('--upload-density', type=float, default=0.02)
  parser.add_argument('--download-density', type=float, default=0.1)
  parser.add_argument('--seed', type=int, default=0,
                      help='picks the users and batches; DP noise is unseeded')
  args = parser.parse_args()
  if not 3 <= args.devices <= 10:
    parser.error('--devices must be in [3, 10].')

  data = tds.data.load('hapt')
  rng = np.random.default_rng(args.seed)
  users = sorted(rng.choice(data.client_ids, args.devices, replace=False))
  local = {cid: data.client_arrays(cid) for cid in users}
  test_x, test_y = data.test_arrays()

  model = models.build_model(data.element_spec[0].shape, data.num_classes)
  model_bytes = tds.lite.export_client(
      model, batch_size=args.batch_size, l2_norm_clip=args.l2_norm_clip,
      noise_multiplier=args.noise_multiplier, density=args.upload_density,
      learning_rate=args.learning_rate, num_classes=data.num_classes)
  devices = {cid: tds.lite.LiteClient(model_bytes) for cid in users}
  server = PayloadRound(devices[users[0]].get_weights(),
                        density=args.download_density, mode='example')
  size = server.size
  print(f'{args.devices} HAPT users {users}: '
        f'{sum(len(y) for _, y in local.values()):,} training windows; '
        f'test set {len(test_y):,} windows')
  print(f'model: {size:,} parameters, .tflite {len(model_bytes):,} bytes; '
        f'upload k = {devices[users[0]].k:,}, download k = {server.k:,} '
        f'(dense update: {tds.codec.dense_nbytes(size):,} bytes)')
  print(f'initial accuracy {accuracy(devices[users[0]], test_x, test_y):.3f}')
  print(f'{"round":>5} {"accuracy":>8} {"accepted":>8} {"rejected":>8} '
        f'{"bytes up":>9} {"bytes down":>10} {"% dense":>8} {"max ε":>7} '
        f'{"s":>5}')

  dense_round_bytes = 2 * args.devices * tds.codec.dense_nbytes(size)
  total_bytes = 0
  for round_num in range(1, args.rounds + 1):
    start = time.perf_counter()
    for cid, device in devices.items():
      x, y = local[cid]
      for _ in range(args.local_steps):
        # Uniform fixed-size batches: TF Privacy's stand-in for the Poisson
        # sampling the accountant assumes.
        batch = rng.choice(len(y), args.batch_size, replace=False)
        device.train(x[batch], y[batch])
      payload = device.upload()
      if round_num == 2 and cid == users[0]:
        payload = payload[:len(payload) // 2]  # a link drops the tail
      server.submit(cid, payload)
    result = server.finish()
    for device in devices.values():
      device.apply_download(result.download)
    epsilon = max(
        tds.privacy.compute_epsilon(
            args.noise_multiplier, args.batch_size / len(y),
            round_num * args.local_steps, DELTA)
        for _, y in local.values())
    bytes_down = result.bytes_down * args.devices
    total_bytes += result.bytes_up + bytes_down
    print(f'{round_num:>5} {accuracy(devices[users[0]], test_x, test_y):>8.3f} '
          f'{len(result.accepted):>8} {len(result.rejected):>8} '
          f'{result.bytes_up:>9,} {bytes_down:>10,} '
          f'{100 * (result.bytes_up + bytes_down) / dense_round_bytes:>7.2f}% '
          f'{epsilon:>7.2f} {time.perf_counter() - start:>5.1f}')
    for cid, reason in result.rejected.items():
      print(f'      rejected {cid}: {reason}')
  print(f'total {total_bytes:,} bytes over {args.rounds} rounds '
        f'({100 * total_bytes / (args.rounds * dense_round_bytes):.2f} % of '
        f'dense both ways); ε at δ={DELTA} for the device with the fewest '
        'windows; the server residual holds what downloads have not sent yet '
        f'(L2 {result.residual_norm:.3f}).')


if __name__ == '__main__':
  main()
