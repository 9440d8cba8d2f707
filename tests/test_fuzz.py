"""Fuzzing with a budget (issue 16, item 2): hostile payloads, seeded.

Plain seeded mutation (numpy, one fixed seed): 10,000+ payloads in ten
classes, from valid payloads broken at random (bit flips, truncation,
appended bytes), random bytes, and valid headers carrying hostile values
(huge finite floats, NaN/inf bit patterns, k above the round's, indices out
of range, unsorted or repeated, another model's size), plus uploads replayed
or tagged for another round. Each goes through `tds.wire.decode`, which may
only raise `DecodeError` or return a valid `SparseUpdate`, and through a
`DeploymentServer` (no privacy and no bound, example level with a bound,
client level), whose `submit` never raises and whose global and public
models stay finite, round after round. Refusals are counted by class and
printed (`pytest -s`).

Cost: decode is numpy; a server's accepted upload is a few eager TF ops and
a round's finish one TF call, so many uploads share a round.
"""

import collections
import time

import numpy as np
import pytest

import tf_dpsparse as tds
from tf_dpsparse.wire import codec

SEED, SIZE, UPLOAD_DENSITY = 20261129, 300, 0.05
UPLOAD_K = tds.core.k_for_density(SIZE, UPLOAD_DENSITY)  # 15
PER_CLASS = {'bit flip': 2500, 'truncation': 1000, 'appended bytes': 1000,
             'random bytes': 1500, 'huge values': 1000, 'NaN/inf values': 800,
             'k > allowed': 600, 'bad indices': 900, 'size mismatch': 400,
             'replay or stale round': 400}
PER_ROUND = 300  # uploads per round and server
F32_MAX = float(np.finfo(np.float32).max)
# Refused at decode, whatever the server: every payload of these classes.
ALWAYS_MALFORMED = ('truncation', 'appended bytes', 'NaN/inf values',
                    'bad indices')


def _header(value_bits, index_code, size, k):
  flags = codec._VALUE_CODE[value_bits] | (index_code << 2)
  return (codec.MAGIC + bytes([codec.VERSION, flags]) + codec._put_varint(size)
          + codec._put_varint(k))


def _valid(rng, k=None, size=SIZE, values=None, value_bits=None):
  """A payload an honest device could send (k <= UPLOAD_K unless given)."""
  k = int(rng.integers(1, UPLOAD_K + 1)) if k is None else k
  indices = np.sort(rng.choice(size, k, replace=False))
  values = rng.normal(size=k) * 0.1 if values is None else values
  value_bits = value_bits or int(rng.choice(tds.wire.VALUE_BITS))
  coding = 'all' if k == size else str(rng.choice(['rice', 'bitmap', 'raw']))
  return tds.wire.encode(tds.core.SparseUpdate(indices, values, size),
                         value_bits, index_coding=coding)


def _flip_bits(rng, payload):
  data = bytearray(payload)
  for _ in range(int(rng.integers(1, 5))):
    # Half the flips hit the header, where one bit changes the most.
    end = min(len(data), 10) if rng.random() < 0.5 else len(data)
    pos = int(rng.integers(0, end))
    data[pos] ^= 1 << int(rng.integers(0, 8))
  return bytes(data)


def _random_bytes(rng):
  body = rng.integers(0, 256, int(rng.integers(0, 200)), np.uint8).tobytes()
  if rng.random() < 0.5:
    return body  # no structure at all
  # A plausible header (magic, version, any flags, the right size, any k):
  # the index and value decoders see the random bytes.
  flags = int(rng.integers(0, 16))
  return (codec.MAGIC + bytes([codec.VERSION, flags]) + codec._put_varint(SIZE)
          + codec._put_varint(int(rng.integers(0, 2 * UPLOAD_K))) + body)


def _huge(rng):
  """Well-formed, finite, near the float32 (or float16) limit."""
  k = int(rng.integers(1, UPLOAD_K + 1))
  sign = rng.choice([-1.0, 1.0], k)
  kind = int(rng.integers(0, 3))
  if kind == 0:  # float32, 1e37 to the largest finite value
    return _valid(rng, k, values=sign * rng.uniform(1e37, F32_MAX, k),
                  value_bits=32)
  if kind == 1:  # float16's largest finite values
    return _valid(rng, k, values=sign * 65504.0, value_bits=16)
  # 8 bits at the largest scale the decoder admits, any q: up to 127 * 2**122.
  indices = np.sort(rng.choice(SIZE, k, replace=False))
  q = (sign * rng.integers(1, 128, k)).astype('i1')
  exponent = int(rng.choice([121, 122]))
  return (_header(8, codec._INDEX_CODES['raw'], SIZE, k) +
          indices.astype('<u4').tobytes() + np.int8(exponent).tobytes() +
          q.tobytes())


_NON_FINITE_32 = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                  0x7FFFFFFF]
_NON_FINITE_16 = [0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7FFF]


def _non_finite(rng):
  """A valid payload whose values carry NaN/inf bit patterns (or, at 8 bits,
  the code -128 the format excludes)."""
  value_bits = int(rng.choice(tds.wire.VALUE_BITS))
  k = int(rng.integers(1, UPLOAD_K + 1))
  data = bytearray(_valid(rng, k, value_bits=value_bits))
  width = value_bits // 8
  start = len(data) - k * width
  for slot in rng.choice(k, int(rng.integers(1, k + 1)), replace=False):
    pos = start + int(slot) * width
    if value_bits == 32:
      pattern = int(rng.choice(_NON_FINITE_32))
      data[pos:pos + 4] = pattern.to_bytes(4, 'little')
    elif value_bits == 16:
      pattern = int(rng.choice(_NON_FINITE_16))
      data[pos:pos + 2] = pattern.to_bytes(2, 'little')
    else:
      data[pos] = 0x80  # int8 -128
  return bytes(data)


def _bad_indices(rng):
  """Valid headers and values, indices out of range, unsorted or repeated."""
  k = int(rng.integers(2, UPLOAD_K + 1))
  values = np.ones(k, '<f4').tobytes()
  indices = np.sort(rng.choice(SIZE, k, replace=False))
  kind = int(rng.integers(0, 5))
  if kind == 0:  # raw, one index >= size
    indices[int(rng.integers(0, k))] = int(rng.integers(SIZE, 2**32))
    indices = np.sort(indices)
  elif kind == 1:  # raw, two swapped
    indices[[0, 1]] = indices[[1, 0]]
  elif kind == 2:  # raw, one repeated
    indices[1] = indices[0]
  if kind <= 2:
    return (_header(32, codec._INDEX_CODES['raw'], SIZE, k) +
            indices.astype('<u4').tobytes() + values)
  if kind == 3:  # bitmap, padding bits past the size set
    bitmap = bytearray(np.packbits(np.isin(np.arange(SIZE), indices)))
    bitmap[-1] |= 1 << int(rng.integers(0, 8 - SIZE % 8))
    return _header(32, codec._INDEX_CODES['bitmap'], SIZE, k) + \
        bytes(bitmap) + values
  # Rice: indices coded for a larger model, the header says SIZE.
  big = 2 * SIZE  # its varint has the same length
  indices = np.sort(rng.choice(np.arange(SIZE, big), k, replace=False))
  payload = tds.wire.encode(tds.core.SparseUpdate(indices, np.ones(k), big),
                            index_coding='rice')
  return payload.replace(codec._put_varint(big), codec._put_varint(SIZE), 1)


def _payloads(rng):
  """(class, payload) pairs, PER_CLASS of each, shuffled."""
  seeds = [_valid(rng) for _ in range(200)]
  pick = lambda: seeds[int(rng.integers(len(seeds)))]
  make = {
      'bit flip': lambda: _flip_bits(rng, pick()),
      'truncation': lambda: (lambda p: p[:int(rng.integers(0, len(p)))])(
          pick()),
      'appended bytes': lambda: pick() + rng.integers(
          0, 256, int(rng.integers(1, 33)), np.uint8).tobytes(),
      'random bytes': lambda: _random_bytes(rng),
      'huge values': lambda: _huge(rng),
      'NaN/inf values': lambda: _non_finite(rng),
      'k > allowed': lambda: _valid(rng, int(rng.integers(UPLOAD_K + 1,
                                                          SIZE + 1))),
      'bad indices': lambda: _bad_indices(rng),
      'size mismatch': lambda: _valid(rng, size=SIZE + int(rng.choice(
          [-SIZE + 20, -1, 1, 7, SIZE]))),
      'replay or stale round': pick,
  }
  items = [(name, make[name]()) for name, count in PER_CLASS.items()
           for _ in range(count)]
  return [items[i] for i in rng.permutation(len(items))]


def _check_decode(name, payload, counts):
  """`decode`'s contract: DecodeError, or a valid, finite SparseUpdate."""
  try:
    update = tds.wire.decode(payload, SIZE)
  except tds.wire.DecodeError:
    counts[name]['decode refused'] += 1
    return
  indices, values = np.asarray(update.indices), np.asarray(update.values)
  assert update.size == SIZE and indices.dtype == np.int32, name
  assert values.dtype == np.float32 and len(values) == len(indices) <= SIZE
  assert (np.diff(indices) > 0).all() and (indices >= 0).all(), name
  assert (indices < SIZE).all(), name
  assert np.isfinite(values).all(), name
  counts[name]['decode ok'] += 1


def _servers():
  initial = np.random.default_rng(SEED).normal(size=SIZE).astype(np.float32)
  args = dict(upload_density=UPLOAD_DENSITY, download_density=0.05)
  example = tds.privacy.ExampleLevelDP(1.0, 1.0, 8, 2, 100)
  return {
      'no privacy, no bound': tds.deploy.DeploymentServer(initial, **args),
      'example level, bound': tds.deploy.DeploymentServer(
          initial, privacy=example, max_update_norm=example.update_norm_bound(
              SIZE, learning_rate=0.1), **args),
      'client level': tds.deploy.DeploymentServer(
          initial, privacy=tds.privacy.ClientLevelDP(1.0, 0.5, 20, 1000,
                                                     seed=SEED), **args),
  }


def _submit(rng, server, name, payload, cid, honest_id):
  """One upload: tagged for the open round, untagged, or (replay class)
  repeated by a client that already sent or tagged for another round.
  Returns 'accepted' or the refusal's `REFUSALS` key."""
  tag = server.current_round if rng.random() < 0.5 else None
  if name == 'replay or stale round':
    if rng.random() < 0.5:
      cid = honest_id
    else:
      tag = server.current_round + int(rng.choice([-3, -1, 1, 2]))
  before = dict(server.rejected_by_reason)
  accepted = server.submit(cid, payload, round_num=tag)
  assert isinstance(accepted, bool)
  if accepted:
    return 'accepted'
  rose = [reason for reason, count in server.rejected_by_reason.items()
          if count > before.get(reason, 0)]
  assert len(rose) == 1 and rose[0] in tds.deploy.REFUSALS, rose
  return rose[0]


def _finish(server, views):
  """Ends a round; the models stay finite and a device following the
  downloads holds the public model."""
  result = server.finish_round()
  for weights in (server.global_weights, server.public_weights):
    assert np.isfinite(weights).all()
    assert np.abs(weights).max() <= tds.deploy.MAX_WEIGHT_MAGNITUDE
  views[id(server)] = tds.wire.apply_broadcast(views[id(server)],
                                               result.download)
  np.testing.assert_array_equal(views[id(server)], server.public_weights)
  return result


def _run_servers(rng, items, counts):
  """Every payload through one of the servers, PER_ROUND to a round."""
  servers = _servers()
  views = {id(s): s.public_weights for s in servers.values()}
  rounds = 0
  for start in range(0, len(items), PER_ROUND * len(servers)):
    batch = items[start:start + PER_ROUND * len(servers)]
    for s_index, server in enumerate(servers.values()):
      honest_id = ('honest', rounds)
      assert server.submit(honest_id, _valid(rng))
      sent = []
      for i, (name, payload) in enumerate(batch[s_index::len(servers)]):
        cid = (start + i, s_index)
        sent.append((name, cid, _submit(rng, server, name, payload, cid,
                                        honest_id)))
      result = _finish(server, views)
      for name, cid, outcome in sent:
        counts[name]['zeroed' if cid in result.zeroed else outcome] += 1
    rounds += 1
  return servers, rounds


def _summary(items, counts, servers, rounds, seconds):
  lines = [f'fuzz: {len(items):,} payloads, decode {seconds[0]:.1f} s, '
           f'servers {seconds[1]:.1f} s ({rounds} rounds x {len(servers)} '
           f'servers, {PER_ROUND} uploads a round)']
  lines += [f'  {name:<22} {dict(sorted(counts[name].items()))}'
            for name in PER_CLASS]
  lines += [f'  server {label}: refused {dict(s.rejected_by_reason)}, zeroed '
            f'{s.zeroed_total}, skipped {dict(s.skipped_by_reason)}'
            for label, s in servers.items()]
  return '\n'.join(lines)


def test_fuzz_decode_and_server(capsys):
  began = time.perf_counter()
  rng = np.random.default_rng(SEED)
  items = _payloads(rng)
  assert len(items) >= 10_000
  counts = collections.defaultdict(collections.Counter)
  for name, payload in items:
    _check_decode(name, payload, counts)
  decoded = time.perf_counter()
  servers, rounds = _run_servers(rng, items, counts)
  seconds = (decoded - began, time.perf_counter() - decoded)
  with capsys.disabled():
    print('\n' + _summary(items, counts, servers, rounds, seconds))
  for name in ALWAYS_MALFORMED:
    assert counts[name]['decode refused'] == PER_CLASS[name], name
    assert counts[name]['malformed'] == PER_CLASS[name], name
  assert counts['size mismatch']['wrong size'] == PER_CLASS['size mismatch']
  assert counts['k > allowed']['oversized'] == PER_CLASS['k > allowed']
  replayed = counts['replay or stale round']
  assert replayed['duplicate'] + replayed['stale round'] == \
      PER_CLASS['replay or stale round']
  huge = counts['huge values']
  # Valid finite float32 decodes; an 8-bit scale past float32 is refused.
  assert huge['decode ok'] + huge['decode refused'] == PER_CLASS['huge values']
  assert huge['decode ok'] > 0
  assert (huge['zeroed'] + huge['accepted'] + huge['sum overflow'] +
          huge['malformed'] == PER_CLASS['huge values'])
  assert counts['bit flip']['decode refused'] > 0  # flips do break payloads
  assert counts['bit flip']['decode ok'] > 0  # and some still decode


def test_decode_refuses_an_int8_scale_that_overflows_float32():
  """127 * 2**122 exceeds float32: decode refuses it (it once gave inf)."""
  payload = (_header(8, codec._INDEX_CODES['raw'], SIZE, 1) +
             np.array([3], '<u4').tobytes() + np.int8(122).tobytes() +
             np.array([127], 'i1').tobytes())
  with pytest.raises(tds.wire.DecodeError), np.errstate(over='ignore'):
    tds.wire.decode(payload, SIZE)
