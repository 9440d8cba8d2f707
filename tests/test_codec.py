"""Wire codec: round trips, size near the entropy bound, strict validation."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tf_dpsparse as tds
from tf_dpsparse.wire import codec as codec_impl

DecodeError = tds.codec.DecodeError


def _random_update(size, k, seed=0):
  rng = np.random.default_rng(seed)
  indices = rng.choice(size, k, replace=False).astype(np.int32)
  values = rng.normal(size=k).astype(np.float32)
  return tds.core.SparseUpdate(indices, values, size)


@st.composite
def updates(draw):
  size = draw(st.integers(1, 5000))
  k = draw(st.integers(0, size))
  indices = draw(st.permutations(range(size)))[:k]
  values = draw(st.lists(st.floats(-6e4, 6e4, width=32), min_size=k,
                         max_size=k))
  return tds.core.SparseUpdate(np.array(indices, np.int32),
                               np.array(values, np.float32), size)


@settings(max_examples=150, deadline=None)
@given(updates(), st.sampled_from([32, 16, 8]),
       st.sampled_from(['auto', 'rice', 'bitmap', 'raw']))
def test_roundtrip(sparse, value_bits, index_coding):
  payload = tds.codec.encode(sparse, value_bits, index_coding)
  decoded = tds.codec.decode(payload, sparse.size)
  order = np.argsort(sparse.indices)
  np.testing.assert_array_equal(decoded.indices, sparse.indices[order])
  expected = sparse.values[order]
  if value_bits == 16:
    expected = expected.astype(np.float16).astype(np.float32)
  if value_bits == 8:
    expected = tds.wire.to_wire_precision(expected, 8).numpy()
    # what a device sends is already at wire precision: encoding it again
    # loses nothing (the bytes may differ: 63 * 2**-6 is also 126 * 2**-7)
    again = tds.codec.decode(tds.codec.encode(decoded, 8, index_coding),
                             sparse.size)
    np.testing.assert_array_equal(again.values, decoded.values)
  np.testing.assert_array_equal(decoded.values, expected)
  assert decoded.indices.dtype == np.int32
  assert decoded.values.dtype == np.float32
  assert decoded.size == sparse.size


def test_roundtrip_from_topk_tensors():
  import tensorflow as tf
  flat = tf.random.stateless_normal([10_000], seed=[1, 2])
  sparse, _ = tds.core.topk_with_error_feedback(flat, 100)
  decoded = tds.codec.decode(tds.codec.encode(sparse), 10_000)
  np.testing.assert_array_equal(
      tds.core.densify(decoded).numpy(), tds.core.densify(sparse).numpy())


def test_index_code_within_ten_percent_of_entropy_bound():
  size, k = 1_000_000, 10_000
  payload = tds.codec.encode(_random_update(size, k), 32)
  index_bits = (len(payload) - 4 * k) * 8  # header and index section
  bound = tds.codec.entropy_bound_bits(size, k, 0)
  assert index_bits <= 1.10 * bound, index_bits / bound
  assert len(payload) * 8 <= 1.10 * tds.codec.entropy_bound_bits(size, k, 32)


def test_dense_update_costs_values_and_header_only():
  dense = _random_update(1000, 1000)
  payload = tds.codec.encode(dense)
  assert len(payload) == 4 + 2 + 2 + 4 * 1000  # magic+version+flags, 2 varints
  np.testing.assert_array_equal(tds.codec.decode(payload, 1000).indices,
                                np.arange(1000))
  with pytest.raises(ValueError, match='k == size'):
    tds.codec.encode(_random_update(1000, 999), index_coding='all')
  forged = bytearray(tds.codec.encode(_random_update(1000, 999), index_coding='raw'))
  forged[3] = 3 << 2  # claims 'all' with k=999
  with pytest.raises(DecodeError, match="'all' needs k == size"):
    tds.codec.decode(bytes(forged), 1000)


def test_auto_chooses_the_shorter_index_code():
  dense_ish = _random_update(4000, 2000)
  sparse = _random_update(4000, 20)
  for update in (dense_ish, sparse):
    auto = len(tds.codec.encode(update))
    assert auto == min(len(tds.codec.encode(update, index_coding=c))
                       for c in ('rice', 'bitmap'))
  assert len(tds.codec.encode(dense_ish)) == len(
      tds.codec.encode(dense_ish, index_coding='bitmap'))


def test_entropy_bound_values():
  assert tds.codec.entropy_bound_bits(10, 0, 32) == 0
  assert tds.codec.entropy_bound_bits(10, 10, 32) == pytest.approx(320)
  assert tds.codec.entropy_bound_bits(4, 2, 0) == pytest.approx(math.log2(6))
  with pytest.raises(ValueError):
    tds.codec.entropy_bound_bits(3, 4, 32)


def test_encode_rejects_invalid_updates():
  S = tds.core.SparseUpdate
  with pytest.raises(ValueError, match='distinct'):
    tds.codec.encode(S(np.array([1, 1]), np.ones(2, np.float32), 5))
  with pytest.raises(ValueError, match='finite'):
    tds.codec.encode(S(np.array([1]), np.array([np.nan], np.float32), 5))
  with pytest.raises(ValueError, match='finite'):
    tds.codec.encode(S(np.array([1]), np.array([1e6], np.float32), 5), 16)
  with pytest.raises(ValueError, match=r'\[0, 5\)'):
    tds.codec.encode(S(np.array([5]), np.ones(1, np.float32), 5))
  with pytest.raises(ValueError, match='value_bits'):
    tds.codec.encode(S(np.array([1]), np.ones(1, np.float32), 5), 4)
  with pytest.raises(ValueError, match='finite'):
    tds.codec.encode(S(np.array([1]), np.array([np.inf], np.float32), 5), 8)


# ------------------------------------------------ one test per defect class ---

SIZE = 1000


def _payload(coding='rice', value_bits=32, k=10):
  return tds.codec.encode(_random_update(SIZE, k, seed=3), value_bits, coding)


def _header(size, k, flags):
  return (codec_impl.MAGIC + bytes([codec_impl.VERSION, flags]) +
          codec_impl._put_varint(size) + codec_impl._put_varint(k))


def test_empty_payload():
  with pytest.raises(DecodeError, match='empty'):
    tds.codec.decode(b'', SIZE)


@pytest.mark.parametrize('coding', ['rice', 'bitmap', 'raw'])
def test_truncated_payload_at_every_length(coding):
  payload = _payload(coding)
  for cut in range(1, len(payload)):
    with pytest.raises(DecodeError):
      tds.codec.decode(payload[:cut], SIZE)


def test_bad_magic_and_version_and_flags():
  payload = _payload()
  with pytest.raises(DecodeError, match='magic'):
    tds.codec.decode(b'XX' + payload[2:], SIZE)
  with pytest.raises(DecodeError, match='version'):
    tds.codec.decode(payload[:2] + bytes([99]) + payload[3:], SIZE)
  with pytest.raises(DecodeError, match='flags'):
    tds.codec.decode(payload[:3] + bytes([0xF0]) + payload[4:], SIZE)


def test_size_mismatch():
  with pytest.raises(DecodeError, match='size mismatch'):
    tds.codec.decode(_payload(), SIZE + 1)


def test_k_larger_than_size():
  payload = _header(SIZE, SIZE + 1, flags=2 << 2) + bytes(4 * (SIZE + 1) * 2)
  with pytest.raises(DecodeError, match='exceeds size'):
    tds.codec.decode(payload, SIZE)


def test_index_out_of_range_raw_and_rice():
  raw = (_header(SIZE, 1, flags=2 << 2) +
         np.array([SIZE], '<u4').tobytes() + np.ones(1, '<f4').tobytes())
  with pytest.raises(DecodeError, match='out of range'):
    tds.codec.decode(raw, SIZE)
  # A single Rice gap of SIZE: b = 0, quotient SIZE in unary (SIZE zeros, a 1).
  unary = np.zeros(SIZE + 1, np.uint8)
  unary[-1] = 1
  unary_bytes = np.packbits(unary).tobytes()
  rice = (_header(SIZE, 1, flags=0) + bytes([0]) +
          codec_impl._put_varint(len(unary_bytes)) + unary_bytes +
          np.ones(1, '<f4').tobytes())
  with pytest.raises(DecodeError, match='out of range'):
    tds.codec.decode(rice, SIZE)


def test_duplicate_indices():
  raw = (_header(SIZE, 2, flags=2 << 2) + np.array([5, 5], '<u4').tobytes() +
         np.ones(2, '<f4').tobytes())
  with pytest.raises(DecodeError, match='duplicate'):
    tds.codec.decode(raw, SIZE)


def test_unsorted_indices():
  raw = (_header(SIZE, 2, flags=2 << 2) + np.array([7, 5], '<u4').tobytes() +
         np.ones(2, '<f4').tobytes())
  with pytest.raises(DecodeError, match='not sorted'):
    tds.codec.decode(raw, SIZE)


@pytest.mark.parametrize('value_bits', [32, 16])
@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nan_inf_values(value_bits, bad):
  dtype = '<f4' if value_bits == 32 else '<f2'
  payload = bytearray(_payload(value_bits=value_bits, k=10))
  width = np.dtype(dtype).itemsize
  payload[-width:] = np.array([bad], dtype).tobytes()
  with pytest.raises(DecodeError, match='NaN or Inf'):
    tds.codec.decode(bytes(payload), SIZE)


@pytest.mark.parametrize('exponent', [-127, 123])
def test_eight_bit_exponent_out_of_range(exponent):
  payload = bytearray(_payload(value_bits=8, k=10))
  payload[-11] = np.int8(exponent).view(np.uint8)
  with pytest.raises(DecodeError, match='exponent'):
    tds.codec.decode(bytes(payload), SIZE)


def test_eight_bit_value_minus_128():
  payload = bytearray(_payload(value_bits=8, k=10))
  payload[-1] = 0x80
  with pytest.raises(DecodeError, match=r'\[-127, 127\]'):
    tds.codec.decode(bytes(payload), SIZE)


def test_eight_bit_payload_truncated_before_its_values():
  payload = _payload('raw', value_bits=8, k=10)
  for cut in (11, 1):  # at the exponent byte, and inside the values
    with pytest.raises(DecodeError, match='truncated'):
      tds.codec.decode(payload[:-cut], SIZE)


@pytest.mark.parametrize('coding', ['rice', 'bitmap', 'raw'])
def test_trailing_garbage(coding):
  with pytest.raises(DecodeError, match='trailing garbage'):
    tds.codec.decode(_payload(coding) + b'\x00', SIZE)


def test_count_mismatch_in_index_sections():
  bitmap = bytearray(_payload('bitmap', k=10))
  bitmap[8] ^= 0xFF  # flips index bits: count no longer matches k
  with pytest.raises(DecodeError):
    tds.codec.decode(bytes(bitmap), SIZE)


def test_non_bytes_payload():
  with pytest.raises(DecodeError, match='bytes'):
    tds.codec.decode('DS', SIZE)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(['rice', 'bitmap', 'raw', 'all']), st.data())
def test_fuzzed_payloads_raise_only_decode_error(coding, data):
  """Random corruption either decodes to a valid update or raises DecodeError."""
  k = SIZE if coding == 'all' else data.draw(st.integers(0, 40))
  payload = bytearray(_payload(coding, data.draw(st.sampled_from([32, 16, 8])),
                               k=k))
  for _ in range(data.draw(st.integers(1, 4))):
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload[pos] = data.draw(st.integers(0, 255))
  if data.draw(st.booleans()):
    payload = payload[:data.draw(st.integers(0, len(payload)))]
  try:
    decoded = tds.codec.decode(bytes(payload), SIZE)
  except DecodeError:
    return
  indices = decoded.indices.astype(np.int64)
  assert indices.size == decoded.values.size <= SIZE
  assert ((indices >= 0) & (indices < SIZE)).all()
  assert (np.diff(indices) > 0).all()
  assert np.isfinite(decoded.values).all()


@settings(max_examples=100, deadline=None)
@given(updates(), st.sampled_from([32, 16, 8]))
def test_encoded_nbytes_in_tf_equals_len_encode(sparse, value_bits):
  import tensorflow as tf
  expected = len(tds.codec.encode(sparse, value_bits))
  got = tds.codec.encoded_nbytes(tf.constant(sparse.indices), sparse.size,
                                 value_bits)
  assert int(got) == expected


def test_encoded_nbytes_large_and_in_tf_function():
  import tensorflow as tf
  for size, k in ((1_000_000, 10_000), (200_000, 60_000), (300, 299)):
    sparse = _random_update(size, k, seed=size)
    fn = tf.function(lambda i: tds.codec.encoded_nbytes(i, size))
    assert int(fn(tf.constant(sparse.indices))) == len(tds.codec.encode(sparse))
