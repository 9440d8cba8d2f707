"""Codec benchmark: size against the entropy bound and a zlib baseline.

For each (size, k) a random k-subset with Gaussian values is encoded by
`tds.codec` and by the baseline measured in the same run: int32 indices +
float32 values, zlib-compressed (level 6). Prints bits per non-zero, the ratio
to the entropy bound log2 C(size, k) + 32k, and encode/decode throughput, then
writes `benchmarks/results/codec_bench.json`.

Run: `python benchmarks/codec_bench.py` (add `--quick` for a smaller grid).
"""

import argparse
import json
import os
import time
import zlib

import numpy as np

import tf_dpsparse as tds


def _best_time(fn, repeats):
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def run_case(size, k, repeats, seed=0):
  rng = np.random.default_rng(seed)
  indices = rng.choice(size, k, replace=False).astype(np.int32)
  values = rng.normal(size=k).astype(np.float32)
  sparse = tds.core.SparseUpdate(indices, values, size)

  payload = tds.codec.encode(sparse)
  baseline = zlib.compress(indices.tobytes() + values.tobytes(), 6)
  bound_bytes = tds.codec.entropy_bound_bits(size, k, 32) / 8
  index_bound_bits = tds.codec.entropy_bound_bits(size, k, 0)

  def baseline_decode():
    raw = zlib.decompress(baseline)
    return (np.frombuffer(raw[:4 * k], np.int32),
            np.frombuffer(raw[4 * k:], np.float32))

  times = {
      'encode_s': _best_time(lambda: tds.codec.encode(sparse), repeats),
      'decode_s': _best_time(lambda: tds.codec.decode(payload, size), repeats),
      'zlib_encode_s': _best_time(
          lambda: zlib.compress(indices.tobytes() + values.tobytes(), 6),
          repeats),
      'zlib_decode_s': _best_time(baseline_decode, repeats),
  }
  return {
      'size': size, 'k': k, 'bytes': len(payload),
      'zlib_bytes': len(baseline), 'dense_bytes': tds.codec.dense_nbytes(size),
      'bound_bytes': bound_bytes,
      'bits_per_nonzero': 8 * len(payload) / k,
      'zlib_bits_per_nonzero': 8 * len(baseline) / k,
      'ratio_to_bound': len(payload) / bound_bytes,
      'index_ratio_to_bound': (8 * len(payload) - 32 * k) / index_bound_bits,
      'ratio_to_zlib': len(payload) / len(baseline),
      **times,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'results', 'codec_bench.json'))
  args = parser.parse_args()
  grid = ([(100_000, 1_000), (1_000_000, 10_000)] if args.quick else
          [(100_000, 1_000), (1_000_000, 1_000), (1_000_000, 10_000),
           (1_000_000, 100_000), (1_000_000, 300_000), (10_000_000, 100_000)])
  repeats = 3 if args.quick else 5
  rows = [run_case(size, k, repeats) for size, k in grid]

  print(f'{"size":>10} {"k":>8} {"bytes":>10} {"bits/nz":>8} {"x bound":>8} '
        f'{"idx x bnd":>9} {"zlib bits/nz":>12} {"x zlib":>7} '
        f'{"enc MB/s":>9} {"dec MB/s":>9} {"enc x zlib":>10} {"dec x zlib":>10}')
  for r in rows:
    mb = 8 * r['k'] / 1e6  # throughput in MB of (int32 index, float32 value)
    print(f'{r["size"]:>10,} {r["k"]:>8,} {r["bytes"]:>10,} '
          f'{r["bits_per_nonzero"]:>8.2f} {r["ratio_to_bound"]:>8.4f} '
          f'{r["index_ratio_to_bound"]:>9.4f} {r["zlib_bits_per_nonzero"]:>12.2f} '
          f'{r["ratio_to_zlib"]:>7.3f} {mb / r["encode_s"]:>9.1f} '
          f'{mb / r["decode_s"]:>9.1f} '
          f'{r["encode_s"] / r["zlib_encode_s"]:>10.2f} '
          f'{r["decode_s"] / r["zlib_decode_s"]:>10.2f}')
  target = next(r for r in rows if (r['size'], r['k']) == (1_000_000, 10_000))
  verdict = 'meets' if target['ratio_to_bound'] <= 1.10 else 'MISSES'
  print(f'\nsize=1e6, k=1e4: {target["ratio_to_bound"]:.4f}x the entropy bound '
        f'({verdict} the 1.10x target); {target["ratio_to_zlib"]:.3f}x the '
        f'bytes of int32+float32+zlib.')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
