"""Core transforms: clip bound, conservation, top-k, noise, flatten."""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import tf_dpsparse as tds

# TF flushes subnormals to zero on CPU; numpy does not.
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(1, 300), elements=finite)


@settings(max_examples=60, deadline=None)
@given(vectors, st.floats(1e-3, 1e3))
def test_clip_bounds_norm_and_keeps_direction(x, clip):
  clipped, norm = tds.core.clip_by_l2_norm(tf.constant(x), clip)
  norm_x = np.linalg.norm(x.astype(np.float64))
  assert norm.numpy() == pytest.approx(norm_x, rel=1e-5, abs=1e-5)
  assert np.linalg.norm(clipped.numpy()) <= clip * (1 + 1e-5)
  if norm_x <= clip:
    np.testing.assert_allclose(clipped.numpy(), x, rtol=1e-6)
  else:
    np.testing.assert_allclose(clipped.numpy(), x * (clip / norm_x),
                               rtol=1e-4, atol=1e-6)


def test_clip_structure_uses_global_norm():
  structure = {'a': tf.fill([3], 3.0), 'b': [tf.fill([2, 2], 4.0)]}
  clipped, norm = tds.core.clip_by_l2_norm(structure, 1.0)
  assert norm.numpy() == pytest.approx(np.sqrt(27 + 64))
  total = tds.core.flatten(clipped)
  assert np.linalg.norm(total.numpy()) == pytest.approx(1.0, rel=1e-6)
  with pytest.raises(ValueError, match='clip'):
    tds.core.clip_by_l2_norm(structure, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_topk_conservation_is_exact(data):
  flat = data.draw(vectors)
  residual = data.draw(hnp.arrays(np.float32, flat.shape, elements=finite))
  k = data.draw(st.integers(1, flat.size))
  sent, new_residual = tds.core.topk_with_error_feedback(
      tf.constant(flat), k, tf.constant(residual))
  total = tds.core.densify(sent) + new_residual
  # Compared with TF's own sum: TF flushes subnormals, numpy does not.
  np.testing.assert_array_equal(total.numpy(),
                                (tf.constant(flat) + residual).numpy())
  assert len(set(sent.indices.numpy().tolist())) == k
  # The kept coordinates are the largest in magnitude.
  kept = np.abs((flat + residual)[sent.indices.numpy()])
  dropped = np.abs(new_residual.numpy())
  assert kept.min() >= dropped.max()
  # Top-k never raises the L2 norm (so clip -> top-k keeps the bound).
  assert (np.linalg.norm(tds.core.densify(sent).numpy()) <=
          np.linalg.norm(flat + residual) * (1 + 1e-6))


def test_error_feedback_loses_nothing_over_rounds():
  rng = np.random.default_rng(0)
  residual = tf.zeros([500])
  sent_total = np.zeros(500, np.float64)
  input_total = np.zeros(500, np.float64)
  for _ in range(20):
    update = rng.normal(size=500).astype(np.float32)
    sparse, residual = tds.core.topk_with_error_feedback(update, 5, residual)
    sent_total += tds.core.densify(sparse).numpy()
    input_total += update
  np.testing.assert_allclose(sent_total + residual.numpy(), input_total,
                             atol=1e-4)


def test_topk_inside_tf_function_and_validation():
  fn = tf.function(lambda x, r: tds.core.topk_with_error_feedback(x, 3, r))
  sparse, residual = fn(tf.constant([1., -5., 2., 7., 0.]), tf.zeros([5]))
  assert sorted(sparse.indices.numpy().tolist()) == [1, 2, 3]
  np.testing.assert_array_equal(residual.numpy(), [1., 0., 0., 0., 0.])
  with pytest.raises(ValueError, match='k must be'):
    tds.core.topk_with_error_feedback(tf.zeros([4]), 5)
  with pytest.raises(ValueError, match='vector'):
    tds.core.topk_with_error_feedback(tf.zeros([2, 2]), 1)


def test_noise_stddev_over_a_million_draws():
  """Tolerance 2 % on the stddev (the sampling error is ~0.07 %), seed fixed."""
  x = tf.zeros([1_000_000])
  noised = tds.core.add_gaussian_noise(x, 2.5, seed=1234).numpy()
  assert np.std(noised) == pytest.approx(2.5, rel=0.02)
  assert abs(np.mean(noised)) < 0.01


def test_noise_seeded_is_reproducible_unseeded_is_not():
  x = {'w': tf.zeros([64]), 'b': tf.zeros([8])}
  a = tds.core.add_gaussian_noise(x, 1.0, seed=7)
  b = tds.core.add_gaussian_noise(x, 1.0, seed=7)
  np.testing.assert_array_equal(a['w'], b['w'])
  assert not np.array_equal(a['w'][:8], a['b'])  # leaves get distinct noise
  c = tds.core.add_gaussian_noise(x, 1.0)
  d = tds.core.add_gaussian_noise(x, 1.0)
  assert not np.array_equal(c['w'], d['w'])
  fresh = tds.core.fold_in_seed(7, 1)
  e = tds.core.add_gaussian_noise(x, 1.0, seed=fresh)
  assert not np.array_equal(a['w'], e['w'])
  with pytest.raises(ValueError, match='stddev'):
    tds.core.add_gaussian_noise(x, -1.0)


def test_unseeded_noise_differs_across_processes():
  import subprocess, sys
  code = ('import tensorflow as tf, tf_dpsparse as tds;'
          'print(tds.core.add_gaussian_noise(tf.zeros([4]), 1.0).numpy()[0])')
  outs = {subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, check=True).stdout.strip()
          for _ in range(2)}
  assert len(outs) == 2


def test_flatten_unflatten_roundtrip():
  model = tf.keras.Sequential([
      tf.keras.layers.Dense(4, input_shape=(3,)), tf.keras.layers.Dense(2)])
  weights = model.trainable_weights
  flat = tds.core.flatten(weights)
  assert flat.shape == (3 * 4 + 4 + 4 * 2 + 2,)
  back = tds.core.unflatten(flat, weights)
  for w, b in zip(weights, back):
    np.testing.assert_array_equal(w.numpy(), b.numpy())
  specs = [tf.TensorSpec(w.shape, w.dtype) for w in weights]
  assert [t.shape for t in tds.core.unflatten(flat, specs)] == [
      w.shape for w in weights]
  with pytest.raises(ValueError, match='expected a vector of'):
    tds.core.unflatten(flat[:-1], weights)


def test_k_for_density():
  assert tds.core.k_for_density(1_000_000, 0.01) == 10_000
  assert tds.core.k_for_density(10, 0.001) == 1
  assert tds.core.k_for_density(10, 1.0) == 10
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match='density'):
      tds.core.k_for_density(10, bad)


def test_clip_rows_and_gaussian_average():
  rows = tf.constant([[3., 4.], [0.3, 0.4], [0., 0.]])
  clipped, norms = tds.core.clip_rows_by_l2_norm(rows, 1.0)
  np.testing.assert_allclose(norms.numpy(), [5., 0.5, 0.], rtol=1e-6)
  np.testing.assert_allclose(clipped.numpy(), [[.6, .8], [.3, .4], [0., 0.]],
                             rtol=1e-6)
  mean, _ = tds.core.gaussian_average(rows, 1.0, 0.0)
  np.testing.assert_allclose(mean.numpy(), [0.3, 0.4], rtol=1e-6)


def test_gaussian_average_noise_scale():
  """stddev of the noised mean is z * C / n; tolerance 2 %, seed fixed."""
  n, d, z, clip = 8, 200_000, 1.3, 0.5
  mean, _ = tds.core.gaussian_average(tf.zeros([n, d]), clip, z, seed=3)
  assert np.std(mean.numpy()) == pytest.approx(z * clip / n, rel=0.02)


@pytest.mark.parametrize('value_bits, rounds, seed',
                         [(32, 15, 0), (16, 10, 1), (8, 10, 2)])
def test_upload_error_feedback_conserves_and_clips(value_bits, rounds, seed):
  """The client-level upload: sent norm <= clip, nothing lost over rounds.

  At 16 and 8 bits the values are exactly what the wire carries and, rounded
  toward zero, stay within the clip with no slack.
  """
  rng = np.random.default_rng(seed)
  residual = tf.zeros([300])
  sent_total, update_total = np.zeros(300), np.zeros(300)
  for _ in range(rounds):
    update = rng.normal(size=300).astype(np.float32)
    sparse, residual, _ = tds.core.clipped_topk_with_error_feedback(
        update, 10, residual, 0.5, value_bits=value_bits)
    values = sparse.values.numpy()
    if value_bits != 32:
      assert np.linalg.norm(values.astype(np.float64)) <= 0.5
      np.testing.assert_array_equal(
          tds.wire.to_wire_precision(values, value_bits).numpy(), values)
    else:
      assert np.linalg.norm(values) <= 0.5 * (1 + 1e-6)
    sent_total += tds.core.densify(sparse).numpy()
    update_total += update
  np.testing.assert_allclose(sent_total + residual.numpy(), update_total,
                             atol=1e-4)


def test_shared_indices_sent_first_then_own_topk():
  x = np.array([5., -4., 3., 0.5, -0.1, 2., 0.2, 9.], np.float32)
  residual = np.full(8, 0.25, np.float32)
  shared = np.array([6, 3], np.int32)  # small coordinates, sent anyway
  sparse, new_residual = tds.core.topk_with_error_feedback(
      x, 5, residual, shared_indices=shared)
  indices = sparse.indices.numpy()
  np.testing.assert_array_equal(indices[:2], shared)
  assert sorted(indices[2:]) == [0, 1, 7]  # top 3 of x + residual elsewhere
  np.testing.assert_array_equal(
      tds.core.densify(sparse).numpy() + new_residual.numpy(), x + residual)
  with pytest.raises(ValueError, match='shared'):
    tds.core.topk_with_error_feedback(x, 2, None, shared_indices=[0, 1])


def test_to_wire_precision_never_grows_a_magnitude():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=100_000) * 10.0**rng.integers(-9, 7, 100_000)).astype(
      np.float32)
  wire = tds.wire.to_wire_precision(x, 16).numpy()
  assert np.all(np.abs(wire) <= np.abs(x))
  assert np.all(np.isfinite(wire)) and np.abs(wire).max() == 65504
  # Exactly representable: encoding at 16 bits and decoding changes nothing.
  np.testing.assert_array_equal(wire.astype(np.float16).astype(np.float32), wire)
  normal = (np.abs(x) > 1e-4) & (np.abs(x) < 65504)
  assert np.all(np.abs(wire - x)[normal] <= 2**-10 * np.abs(x[normal]))
  np.testing.assert_array_equal(tds.wire.to_wire_precision(x, 32).numpy(), x)


def test_eight_bit_values_share_one_power_of_two_and_never_grow():
  """8 bits: q * 2**e with |q| <= 127 and 7 bits on the largest value.

  Tolerance: truncation loses less than one step 2**e <= max|x| / 63.5.
  """
  rng = np.random.default_rng(5)
  for scale in (1e-30, 1e-6, 1.0, 1e6, 1e30):
    x = (rng.normal(size=1000) * scale).astype(np.float32)
    q, exponent = tds.wire.int8_block(x)
    q, step = q.numpy(), 2.0 ** int(exponent)
    np.testing.assert_array_equal(q, np.trunc(q))
    assert 63 <= np.abs(q).max() <= 127
    assert np.abs(x).max() <= 127 * step < 2 * np.abs(x).max()
    wire = tds.wire.to_wire_precision(x, 8).numpy()
    np.testing.assert_array_equal(wire, (q * step).astype(np.float32))
    assert np.all(np.abs(wire) <= np.abs(x))
    assert np.all(np.abs(x - wire) < step)
    # Quantizing what the receiver decoded gives it back bit for bit.
    np.testing.assert_array_equal(tds.wire.to_wire_precision(wire, 8), wire)
  for empty_or_zero in (np.zeros(0, np.float32), np.zeros(3, np.float32)):
    np.testing.assert_array_equal(
        tds.wire.to_wire_precision(empty_or_zero, 8), empty_or_zero)
  with pytest.raises(ValueError, match='value_bits'):
    tds.wire.to_wire_precision(np.ones(2, np.float32), 4)


@pytest.mark.parametrize('value_bits', [32, 16, 8])
def test_sparse_sync_moves_the_view_by_the_largest_differences(value_bits):
  rng = np.random.default_rng(4)
  view = rng.normal(size=300).astype(np.float32)
  target = view.copy()
  target[:40] += rng.normal(size=40).astype(np.float32)  # 40 entries differ
  sent, new_view = tds.core.sparse_sync(target, view, 25, value_bits)
  diff = target - view
  largest = np.argsort(-np.abs(diff))[:25]
  assert set(np.asarray(sent.indices)) == set(largest)
  values = np.asarray(sent.values)
  np.testing.assert_array_equal(values, tds.wire.to_wire_precision(
      diff[np.asarray(sent.indices)], value_bits))
  expected = view.copy()
  expected[np.asarray(sent.indices)] += values  # what a receiver computes
  np.testing.assert_array_equal(new_view, expected)
  # Fewer differences than k: the rest of the k are zeros, and the view
  # reaches the target (up to float32 rounding of view + (target - view)).
  sent, new_view = tds.core.sparse_sync(target, view, 60)
  assert np.count_nonzero(sent.values) == 40
  np.testing.assert_allclose(new_view, target, rtol=1e-6, atol=1e-7)


def test_poisson_sample_is_per_example_bernoulli():
  """Each example joins independently with probability q.

  5,000 draws of 200 examples at q = 0.1, fixed seeds. Per-example inclusion
  frequencies: each within 5 sd of q (sd = sqrt(q(1-q)/5000) = 0.0042), and
  their spread that of a binomial (chi-square-like, within 20 %). Batch
  sizes: mean n q within 1 %, variance n q (1 - q) within 10 % (a fixed-size
  batch would have variance 0). Pairs: two examples co-occur at q^2 within
  5 sd, as independence requires.
  """
  n, q, draws = 200, 0.1, 5000
  masks = np.zeros((draws, n), bool)
  for i in range(draws):
    masks[i, tds.core.poisson_sample(n, q, seed=[i, 3]).numpy()] = True
  freq = masks.mean(0)
  sd = np.sqrt(q * (1 - q) / draws)
  assert np.all(np.abs(freq - q) < 5 * sd)
  assert np.std(freq) == pytest.approx(sd, rel=0.2)
  sizes = masks.sum(1)
  assert sizes.mean() == pytest.approx(n * q, rel=0.01)
  assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)
  together = np.mean(masks[:, 0] & masks[:, 1])
  assert abs(together - q * q) < 5 * np.sqrt(q * q * (1 - q * q) / draws)


def test_poisson_sample_without_seed_differs_between_calls():
  a = tds.core.poisson_sample(1000, 0.5).numpy()
  b = tds.core.poisson_sample(1000, 0.5).numpy()
  assert not np.array_equal(a, b)


@pytest.mark.parametrize('count, max_batch', [(0, 4), (3, 4), (8, 4), (9, 4)])
def test_padded_chunks_keep_every_index_once(count, max_batch):
  indices = tf.range(10, 10 + count)
  chunks, valid = tds.core.padded_chunks(indices, max_batch)
  assert chunks.shape[1] == max_batch
  assert chunks.shape[0] == max(1, -(-count // max_batch))
  np.testing.assert_array_equal(chunks.numpy()[valid.numpy()],
                                np.arange(10, 10 + count))


def test_poisson_average_divides_by_the_expected_batch_size():
  """Noise off: the sum of the sampled rows, each clipped, over q n."""
  rows = tf.random.stateless_normal([300, 5], seed=[1, 2]) * 3.0
  clip, q, seed = 2.0, 0.2, tf.constant([4, 6], tf.int64)
  average, count = tds.core.poisson_gaussian_average(
      lambda idx: tf.gather(rows, idx), num_examples=300, sampling_rate=q,
      size=5, l2_norm_clip=clip, noise_multiplier=0.0, seed=seed)
  sample_seed = tf.random.experimental.stateless_split(seed, 2)[0]
  sampled = tf.gather(rows, tds.core.poisson_sample(300, q, sample_seed))
  clipped, _ = tds.core.clip_rows_by_l2_norm(sampled, clip)
  assert int(count) == sampled.shape[0] != q * 300
  np.testing.assert_allclose(average, tf.reduce_sum(clipped, 0) / (q * 300),
                             rtol=1e-5)


def test_an_empty_poisson_sample_still_releases_the_noise():
  """The accountant charges every step, so an empty one is noise alone."""
  step = tf.function(lambda: tds.core.poisson_gaussian_average(
      lambda idx: tf.ones([tf.size(idx), 3]), num_examples=10,
      sampling_rate=1e-9, size=3, l2_norm_clip=1.0, noise_multiplier=2.0))
  average, count = step()
  assert int(count) == 0
  assert np.all(average.numpy() != 0)  # N(0, 4) / 1e-8, never exactly 0


def test_poisson_average_takes_a_clipped_sum_fn_as_it_takes_rows():
  """A caller's `clipped_sum_fn(indices, clip)` (ghost norms) is released
  exactly as the rows' clipped sum: the same sample, the clip passed in,
  the same noise from the same seed; an empty sample still releases the
  noise (the fn is never called then); exactly one source is accepted."""
  rows = tf.random.stateless_normal([300, 5], seed=[1, 2]) * 3.0
  clip, q, seed = 2.0, 0.2, tf.constant([4, 6], tf.int64)
  seen = []

  def clipped_sum_fn(idx, l2_norm_clip):
    seen.append(l2_norm_clip)
    return tds.core.clipped_sum(tf.gather(rows, idx), l2_norm_clip)[0]

  common = dict(num_examples=300, sampling_rate=q, size=5, l2_norm_clip=clip,
                noise_multiplier=1.5, seed=seed)
  by_rows, _ = tds.core.poisson_gaussian_average(
      lambda idx: tf.gather(rows, idx), **common)
  by_sum, _ = tds.core.poisson_gaussian_average(
      clipped_sum_fn=clipped_sum_fn, **common)
  assert seen == [clip]
  np.testing.assert_allclose(by_sum, by_rows, rtol=0, atol=1e-6)
  empty = tf.function(lambda: tds.core.poisson_gaussian_average(
      clipped_sum_fn=lambda idx, c: tf.fill([3], 1e6), num_examples=10,
      sampling_rate=1e-9, size=3, l2_norm_clip=1.0, noise_multiplier=0.0))
  average, count = empty()
  assert int(count) == 0 and np.all(average.numpy() == 0)
  for sources in ({}, dict(rows_fn=lambda idx: rows,
                           clipped_sum_fn=clipped_sum_fn)):
    with pytest.raises(ValueError, match='exactly one'):
      tds.core.poisson_gaussian_average(**sources, **common)


def test_gaussian_average_denominator_and_clipped_sum_row_mask():
  rows = tf.constant([[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]])
  mask = tf.constant([True, True, False])
  total, _ = tds.core.clipped_sum(rows, 1.0, mask)
  np.testing.assert_allclose(total, [0.6 + 1.0, 0.8], rtol=1e-6)
  average, _ = tds.core.gaussian_average(rows[:2], 1.0, 0.0, denominator=4)
  np.testing.assert_allclose(average, [(0.6 + 1.0) / 4, 0.8 / 4], rtol=1e-6)


def test_default_max_batch_overflows_one_step_in_twenty():
  rng = np.random.default_rng(0)
  for b in (4, 16, 64):
    chunk = tds.core.default_max_batch(b)
    counts = rng.poisson(b, 100_000)  # batch sizes, ~Binomial(n, b / n)
    overflow = np.mean(counts > chunk)
    assert b < chunk and overflow <= 0.05 + 0.005  # 0.005: 7 sd of the mean
    assert np.mean(counts > chunk - 1) > 0.05 - 0.005  # the smallest such


CONVOLUTIONS = [  # input shape, kernel shape, strides, padding, dilations
    ((1, 12, 3), (3, 3, 4), [1], 'VALID', [1]),
    ((1, 12, 3), (4, 3, 2), [2], 'SAME', [1]),
    ((1, 13, 2), (3, 2, 2), [1], 'SAME', [2]),
    ((1, 9, 8, 2), (3, 2, 2, 3), [1, 1], 'VALID', [1, 1]),
    ((1, 9, 8, 2), (3, 3, 2, 3), [2, 3], 'SAME', [1, 1]),
    ((1, 9, 8, 2), (2, 3, 2, 3), [1, 1], 'SAME', [2, 1]),
]


@pytest.mark.parametrize('x_shape,w_shape,strides,padding,dilations',
                         CONVOLUTIONS)
def test_convolution_matches_tf_nn_and_its_gradients(x_shape, w_shape, strides,
                                                     padding, dilations):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=x_shape), tf.float32)
  w = tf.constant(rng.normal(size=w_shape), tf.float32)
  args = dict(strides=strides, padding=padding, dilations=dilations)
  results = []
  for conv in (tf.nn.convolution, tds.core.convolution):
    with tf.GradientTape() as tape:
      tape.watch((x, w))
      y = conv(x, w, **args)
      loss = tf.reduce_sum(tf.sin(y))
    results.append([y, *tape.gradient(loss, (x, w))])
  for ours, theirs in zip(results[1], results[0]):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_per_example_gradients_equal_the_jacobian_rows():
  """Parity with the jacobian path on a small pure-TF conv + dense model."""
  rng = np.random.default_rng(1)
  kernel = tf.Variable(rng.normal(size=(3, 2, 4)), dtype=tf.float32)
  dense = tf.Variable(rng.normal(size=(4, 3)), dtype=tf.float32)
  unused = tf.Variable([1.0, 2.0])
  variables = [kernel, dense, unused]
  x = tf.constant(rng.normal(size=(6, 10, 2)), tf.float32)
  y = tf.constant(rng.integers(0, 3, 6), tf.int32)

  def losses(batch):
    features = tf.nn.relu(tds.core.convolution(
        batch[0], kernel, strides=[1], padding='VALID', dilations=[1]))
    logits = tf.reduce_mean(features, axis=1) @ dense
    return tf.nn.sparse_softmax_cross_entropy_with_logits(batch[1], logits)

  rows = tf.function(tds.core.per_example_gradients)(losses, variables, (x, y))
  with tf.GradientTape() as tape:
    loss_vector = losses((x, y))
  jacobians = tape.jacobian(loss_vector, variables,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
  expected = tf.concat([tf.reshape(j, [6, -1]) for j in jacobians], 1)
  assert rows.shape == (6, 24 + 12 + 2)
  np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-5)
  assert np.all(rows[:, -2:] == 0)  # unconnected: zeros


def test_robust_norm_and_bound_never_overflow_or_pass_non_finite():
  huge = tf.constant([3e37, 4e37])
  assert float(tds.core.robust_l2_norm(huge)) == pytest.approx(5e37)
  assert np.isinf(float(tf.norm(huge)))  # what the naive norm gives
  for bad in ([np.nan, 1.0], [np.inf, 1.0], [-np.inf, np.nan]):
    assert np.isinf(float(tds.core.robust_l2_norm(tf.constant(bad))))
    for policy in tds.core.BOUND_POLICIES:
      bounded, metrics = tds.core.bound_update(tf.constant(bad), 1.0, policy)
      np.testing.assert_array_equal(bounded, [0.0, 0.0])
      assert bool(metrics.non_finite) and not bool(metrics.over_bound)
  zeroed, metrics = tds.core.bound_update(huge, 1.0, 'zero')
  np.testing.assert_array_equal(zeroed, [0.0, 0.0])
  assert bool(metrics.over_bound)
  clipped, _ = tds.core.bound_update(huge, 1.0, 'clip')
  np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
  kept, metrics = tds.core.bound_update(tf.constant([0.3, 0.4]), 1.0)
  np.testing.assert_array_equal(kept, np.float32([0.3, 0.4]))
  assert not bool(metrics.over_bound) and not bool(metrics.non_finite)
  with pytest.raises(ValueError, match='policy'):
    tds.core.bound_update(huge, 1.0, 'drop')


@pytest.mark.parametrize('value_bits', [32, 16, 8])
def test_error_feedback_uploads_stay_within_the_gain(value_bits):
  """Adversarially aligned updates of norm 1: every upload (update +
  residual, sent part) stays below error_feedback_gain."""
  size, k = 400, 8
  gain = tds.core.error_feedback_gain(k, size, value_bits)
  rng = np.random.default_rng(value_bits)
  residual = tf.zeros([size])
  direction = rng.normal(size=size).astype(np.float32)
  worst = 0.0
  for _ in range(300):
    x = direction + 0.1 * rng.normal(size=size).astype(np.float32)
    x /= np.linalg.norm(x)
    sent, residual, _ = tds.core.clipped_topk_with_error_feedback(
        x, k, residual, value_bits=value_bits)
    # x + e before top-k: what the sent part of this upload comes from.
    worst = max(worst, float(tf.norm(tds.core.densify(sent) + residual)))
  assert worst <= gain
  assert math.isinf(tds.core.error_feedback_gain(5000, 10_000, 8))
