"""Pure-TensorFlow core shared by every front: the update transforms.

The wire format (value rounding, codec) is `tds.wire`."""

from tf_dpsparse.core.per_example import convolution
from tf_dpsparse.core.per_example import per_example_gradients
from tf_dpsparse.core.sparse import SparseUpdate
from tf_dpsparse.core.sparse import densify
from tf_dpsparse.core import stages
from tf_dpsparse.core import subspace
from tf_dpsparse.core.subspace import Subspace
from tf_dpsparse.core.subspace import count_sketch
from tf_dpsparse.core.subspace import subspace_dims
from tf_dpsparse.core.stages import BroadcastState
from tf_dpsparse.core.stages import Stage
from tf_dpsparse.core.stages import UploadState
from tf_dpsparse.core.stages import ViewState
from tf_dpsparse.core.stages import apply_update
from tf_dpsparse.core.stages import default_clip_feedback
from tf_dpsparse.core.stages import model_update
from tf_dpsparse.core.stages import sparse_broadcast
from tf_dpsparse.core.stages import sparse_upload
from tf_dpsparse.core.stages import topk_catch_up
from tf_dpsparse.core.transforms import BOUND_POLICIES
from tf_dpsparse.core.transforms import BoundMetrics
from tf_dpsparse.core.transforms import add_gaussian_noise
from tf_dpsparse.core.transforms import bound_update
from tf_dpsparse.core.transforms import clip_by_l2_norm
from tf_dpsparse.core.transforms import clip_rows_by_l2_norm
from tf_dpsparse.core.transforms import clipped_sum
from tf_dpsparse.core.transforms import clipped_topk_with_error_feedback
from tf_dpsparse.core.transforms import default_max_batch
from tf_dpsparse.core.transforms import error_feedback_gain
from tf_dpsparse.core.transforms import flatten
from tf_dpsparse.core.transforms import fold_in_seed
from tf_dpsparse.core.transforms import gaussian_average
from tf_dpsparse.core.transforms import k_for_density
from tf_dpsparse.core.transforms import noised_average
from tf_dpsparse.core.transforms import padded_chunks
from tf_dpsparse.core.transforms import poisson_gaussian_average
from tf_dpsparse.core.transforms import poisson_sample
from tf_dpsparse.core.transforms import robust_l2_norm
from tf_dpsparse.core.transforms import sparse_sync
from tf_dpsparse.core.transforms import topk_with_error_feedback
from tf_dpsparse.core.transforms import unflatten

__all__ = [
    'BOUND_POLICIES', 'BoundMetrics', 'bound_update', 'robust_l2_norm',
    'BroadcastState', 'SparseUpdate', 'Stage', 'UploadState', 'ViewState',
    'apply_update', 'default_clip_feedback', 'model_update',
    'sparse_broadcast', 'sparse_upload',
    'stages', 'subspace', 'Subspace', 'count_sketch', 'subspace_dims',
    'topk_catch_up', 'add_gaussian_noise', 'clip_by_l2_norm',
    'clip_rows_by_l2_norm', 'clipped_sum', 'clipped_topk_with_error_feedback',
    'convolution', 'default_max_batch', 'error_feedback_gain', 'densify', 'flatten',
    'fold_in_seed', 'gaussian_average', 'k_for_density',
    'noised_average', 'padded_chunks', 'per_example_gradients',
    'poisson_gaussian_average', 'poisson_sample', 'sparse_sync',
    'topk_with_error_feedback', 'unflatten'
]
