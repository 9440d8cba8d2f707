"""core.subspace: the public count-sketch parametrization theta = origin + P z."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dpsparse import core


def _subspace(size=1000, dims=37, seed=3):
  origin = np.random.default_rng(0).normal(size=size).astype(np.float32)
  return core.count_sketch(origin, dims, seed=seed)


def _dense_p(sub):
  """P as a dense [size, dims] matrix, from its definition."""
  p = np.zeros((sub.size, sub.dims), np.float32)
  p[np.arange(sub.size), sub.buckets] = sub.coefs
  return p


def test_columns_have_unit_norm_and_buckets_are_balanced():
  sub = _subspace()
  np.testing.assert_allclose(np.linalg.norm(_dense_p(sub), axis=0), 1.0,
                             rtol=1e-6)
  counts = np.bincount(sub.buckets, minlength=sub.dims)
  assert counts.max() - counts.min() <= 1


def test_expand_is_origin_plus_p_z_and_pullback_its_transpose():
  sub = _subspace()
  p = _dense_p(sub)
  rng = np.random.default_rng(1)
  z = rng.normal(size=sub.dims).astype(np.float32)
  g = rng.normal(size=(5, sub.size)).astype(np.float32)
  np.testing.assert_allclose(sub.expand(z), sub.origin + p @ z, atol=1e-5)
  np.testing.assert_allclose(sub.pullback(g), g @ p, atol=1e-4)
  np.testing.assert_allclose(sub.pullback(g[0]), g[0] @ p, atol=1e-4)


def test_pullback_is_the_chain_rule():
  sub = _subspace(size=200, dims=9)
  target = tf.constant(np.arange(200, dtype=np.float32))
  z = tf.Variable(tf.random.stateless_normal([9], seed=[1, 2]))
  with tf.GradientTape(persistent=True) as tape:
    theta = sub.expand(z)
    loss = tf.reduce_sum(tf.sin(theta) * target)
  np.testing.assert_allclose(sub.pullback(tape.gradient(loss, theta)),
                             tf.convert_to_tensor(tape.gradient(loss, z)),
                             rtol=1e-5, atol=1e-4)


def test_the_seed_alone_rebuilds_p_and_another_seed_changes_it():
  a, b, c = _subspace(seed=3), _subspace(seed=3), _subspace(seed=4)
  np.testing.assert_array_equal(a.buckets, b.buckets)
  np.testing.assert_array_equal(a.coefs, b.coefs)
  assert not np.array_equal(a.buckets, c.buckets)


@pytest.mark.parametrize('subspace, dims', [(0.02, 20), (0.5, 500), (37, 37),
                                            (1000, 1000), (0.0001, 1)])
def test_subspace_dims(subspace, dims):
  assert core.subspace_dims(1000, subspace) == dims


@pytest.mark.parametrize('bad', [0, 0.0, -0.1, 1001, 2.5, True, '0.02', None])
def test_subspace_dims_refuses_what_is_not_a_fraction_or_a_count(bad):
  with pytest.raises(ValueError, match='subspace'):
    core.subspace_dims(1000, bad)
