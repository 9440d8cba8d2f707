"""Rounds spread over TFF executor workers (`tf-dpsparse worker`) over gRPC.

Nothing here speaks a protocol of its own: each worker is TFF's C++
`worker_binary` executor service, reached the way TFF's local context
reaches its own worker (`RemoteExecutorGrpcStub` on a gRPC channel, a
`RemoteExecutor` per client count, TFF's native compiler). TFF 0.87 has no
`set_remote_cpp_execution_context`: its only factory over a stub,
`local_cpp_executor_factory`, also starts the worker, so the same few lines
are written here for an address that is already serving.

One worker runs the whole round there (TFF's sync context). Several workers
run TFF's mergeable context (`create_mergeable_comp_execution_context`): TFF
compiles the round into `up_to_merge` (broadcast, device work, the partial
aggregate), `merge` and `after_merge` (the server's noise and optimizer, the
devices' new states), splits the sampled devices into one contiguous slice
per worker and runs the slices concurrently. Two changes to TFF's context,
both about order, make a round through k workers equal to the one-process
round: TFF concatenates the slices' client-placed results (the devices' new
states) in the order the workers *finish*, and merges the partial
aggregates in that order too; `_InOrder` keeps the slices' order for both.
What the mergeable form requires of a round (at most one level of
aggregation, no aggregate feeding another) is checked by TFF when the round
is first compiled, and refused with its own error. Its price: `after_merge`
sees only the round's arguments and the merged aggregate, so the devices'
work runs a second time there to give their new states. That doubles the
device work, and a round whose device work draws unseeded random numbers
(DP-SGD noise from OS entropy) is refused (`_mergeable_form`). A
computation without client data (`initialize`) runs whole on one worker.

Per worker the client count changes with Poisson sampling; as
`_workers.LatestCardinality` does for the local worker, each worker keeps
only its latest count's executor stack (`_LatestStack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator, Sequence

import grpc
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import tree_analysis
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mergeable
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.types import type_analysis
from tensorflow_federated.python.tensorflow_libs import serialization_utils

# TFF's own channel options for its worker (executor_factory.py): values of
# up to 2 GB each way.
_GRPC_MAX_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = (('grpc.max_message_length', _GRPC_MAX_BYTES),
                ('grpc.max_receive_message_length', _GRPC_MAX_BYTES),
                ('grpc.max_send_message_length', _GRPC_MAX_BYTES))


class WorkerUnreachableError(ConnectionError):
  """A worker address did not answer within the timeout."""


def parse_workers(text: str) -> list:
  """`host:port,host:port` -> ['host:port', ...]; refuses a malformed one."""
  addresses = [a.strip() for a in text.split(',') if a.strip()]
  for address in addresses:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f'worker address {address!r} is not host:port.')
  if not addresses:
    raise ValueError('no worker address given (host:port,host:port).')
  return addresses


class _LatestStack(python_executor_stacks.ResourceManagingExecutorFactory):
  """TFF's executor factory, keeping one client count's stack on the worker.

  The worker holds a copy of the computations per stack and frees none
  (DESIGN: 22 GB over a Poisson-sampled run); a new client count closes the
  previous one's stack. The count-free stack (merges, `initialize`) stays.
  """

  def __init__(self, stack_fn):
    super().__init__(stack_fn)
    self._last = None

  def create_executor(self, cardinalities):
    if cardinalities.get(tff.CLIENTS):
      if self._last is not None and self._last != cardinalities:
        self.clean_up_executor(self._last)
      self._last = dict(cardinalities)
    return super().create_executor(cardinalities)


def _stub(address: str, timeout: float):
  """A ready stub for the worker at `address`, or WorkerUnreachableError."""
  channel = grpc.insecure_channel(address, list(GRPC_OPTIONS))
  stub = tff.framework.RemoteExecutorGrpcStub(channel)
  deadline, port = time.monotonic() + timeout, address.rpartition(':')[2]
  while not stub.is_ready:
    if time.monotonic() > deadline:
      channel.close()
      raise WorkerUnreachableError(
          f'no TFF worker answered at {address} within {timeout:g} s (start '
          f'one there with `tf-dpsparse worker --port {port}` and check the '
          'port is reachable).')
    time.sleep(0.1)
  return stub


def _factory(address: str, timeout: float) -> _LatestStack:
  """TFF's executor factory for a worker already serving at `address`."""
  stub = _stub(address, timeout)

  def stack_fn(cardinalities):
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return _LatestStack(stack_fn)


def _context_kwargs(address: str, timeout: float) -> dict:
  return dict(executor_fn=_factory(address, timeout),
              compiler_fn=compiler.desugar_and_transform_to_native,
              transform_args=tensorflow_computation.transform_args,
              transform_result=tensorflow_computation.transform_result)


# pylint: disable=protected-access  (TFF 0.87's helpers, pinned)
async def _in_order(comp, arg_list, contexts):
  """TFF's `_invoke_mergeable_comp_form`, keeping the slices' order.

  Slice i runs on `contexts[i]`, all concurrently; the partial aggregates
  are merged left to right and the client-placed results concatenated in
  slice order, whichever worker finishes first.
  """
  partials = await asyncio.gather(*[
      context.invoke(comp.up_to_merge, arg)
      for arg, context in zip(arg_list, contexts)])
  merged = partials[0]
  for partial in partials[1:]:
    merged = await mergeable._merge_results(
        comp, merged, partial, contexts[0])
  result_type = comp.after_merge.type_signature.result
  if type_analysis.contains_only(result_type, lambda t: not isinstance(
      t, tff.FederatedType) or t.all_equal):
    return await mergeable._compute_after_merged(
        comp, arg_list[0], merged, contexts[0])
  results = await asyncio.gather(*[
      mergeable._compute_after_merged(comp, arg, merged, context)
      for arg, context in zip(arg_list, contexts)])
  return mergeable._repackage_partitioned_values(
      list(results), result_type_spec=result_type)
# pylint: enable=protected-access


# TensorFlow ops that draw from OS entropy (stateful, unseeded): running a
# computation with one of them twice gives two different draws.
_UNSEEDED_RANDOM_OPS = frozenset({
    'RandomUniform', 'RandomUniformInt', 'RandomStandardNormal',
    'TruncatedNormal', 'ParameterizedTruncatedNormal', 'RandomShuffle',
    'RandomGamma', 'RandomPoisson', 'RandomPoissonV2', 'Multinomial',
    'NonDeterministicInts', 'RngReadAndSkip', 'RngSkip',
    'StatefulStandardNormalV2', 'StatefulUniform', 'StatefulUniformInt',
    'StatefulUniformFullInt', 'StatefulTruncatedNormal'})


class RecomputedRandomnessError(ValueError):
  """A round whose device work TFF's mergeable form would run twice, with
  two different random draws."""


def _unseeded_work(comp) -> dict:
  """{serialized TF computation: its unseeded random ops} within `comp`."""
  found = {}

  def visit(block):
    if isinstance(block, building_blocks.CompiledComputation) and (
        block.proto.WhichOneof('computation') == 'tensorflow'):
      graph = serialization_utils.unpack_graph_def(
          block.proto.tensorflow.graph_def)
      ops = {n.op for n in graph.node}
      for function in graph.library.function:
        ops.update(n.op for n in function.node_def)
      if ops & _UNSEEDED_RANDOM_OPS:
        found[block.proto.SerializeToString()] = ops & _UNSEEDED_RANDOM_OPS
    return False

  tree_analysis.contains(comp.to_building_block(), visit)
  return found


def _mergeable_form(comp):
  """TFF's mergeable form of `comp`, refused when a computation drawing
  unseeded random numbers runs both before and after the merge.

  TFF splits a round at its one aggregation: `after_merge` gets only the
  round's arguments and the merged aggregate, so a device's new state (its
  residual) is computed again there, by the same device work that produced
  its upload before the merge. With seeded randomness both runs agree; with
  OS entropy (DP-SGD noise and example sampling on the device) the kept
  residual would belong to another noise draw than the upload sent, and a
  second noised view of the device's data would reach later rounds.
  """
  form = mergeable_comp_compiler.compile_to_mergeable_comp_form(comp)
  before = _unseeded_work(form.up_to_merge)
  twice = before.keys() & _unseeded_work(form.after_merge).keys()
  if twice:
    ops = sorted(set().union(*(before[k] for k in twice)))
    raise RecomputedRandomnessError(
        'this round cannot be spread over several workers: TFF\'s mergeable '
        'form runs the devices\' work twice (before the merge for the '
        'aggregate, after it for their new states), and that work draws '
        f'unseeded random numbers ({", ".join(ops)}), so a device would keep '
        'a residual of another draw than the update it sent. Use one '
        'worker, or seed the noise (build_dp_sparse_fed_avg(seed=...), '
        '--noise-seed: tests only, not private).')
  return form


def _takes_clients(comp) -> bool:
  parameter = comp.type_signature.parameter
  return parameter is not None and type_analysis.contains(
      parameter, lambda t: isinstance(t, tff.FederatedType) and (
          t.placement is tff.CLIENTS))


class _InOrder(mergeable.MergeableCompExecutionContext):
  """TFF's mergeable context with one slice per worker, kept in order."""

  def __init__(self, async_contexts):
    super().__init__(async_contexts, compiler_fn=_mergeable_form,
                     transform_result=tensorflow_computation.transform_result)

  def invoke(self, comp, arg=None):
    """Runs `comp` over the workers; one without client-placed arguments
    (`initialize`) has nothing to split and runs whole on the first."""
    contexts = self._async_execution_contexts
    if not _takes_clients(comp):
      return self._async_runner.run_coro_and_return_result(
          contexts[0].invoke(comp, arg))
    comp = self._compiler_pipeline.compile(comp)
    arg = tensorflow_computation.transform_args(arg)
    arg_list = mergeable.MergeableCompExecutionContextValue(
        arg, comp.up_to_merge.type_signature.parameter,
        len(contexts)).value()
    result = self._async_runner.run_coro_and_return_result(
        _in_order(comp, arg_list, contexts[:len(arg_list)]))
    return self._transform_result(tff.types.type_to_py_container(
        result, comp.after_merge.type_signature.result))


def create_remote_context(addresses: Sequence[str], *, timeout: float = 30.0):
  """TFF's execution context over the workers at `addresses` (host:port).

  One address: TFF's sync context on that worker. Several: the mergeable
  context, the sampled devices split into one slice per worker. Raises
  WorkerUnreachableError when a worker does not answer within `timeout`.
  """
  addresses = list(addresses)
  if not addresses:
    raise ValueError('no worker address given.')
  if len(addresses) == 1:
    return sync_execution_context.SyncExecutionContext(
        **_context_kwargs(addresses[0], timeout))
  return _InOrder([async_execution_context.AsyncExecutionContext(
      **_context_kwargs(a, timeout)) for a in addresses])


@contextlib.contextmanager
def use_workers(addresses: Sequence[str], *, timeout: float = 30.0
                ) -> Iterator[object]:
  """Runs TFF computations on the workers at `addresses` inside the block.

  `with tds.federated.use_workers(['10.0.0.2:8000', '10.0.0.3:8000']):`
  then build and run a process as usual; the local context is back on exit
  (also on an exception). The context is this thread's, as TFF's context
  stack is. A `str` is read as `host:port,host:port`.
  """
  if isinstance(addresses, str):
    addresses = parse_workers(addresses)
  context = create_remote_context(addresses, timeout=timeout)
  with context_stack_impl.context_stack.install(context):
    yield context
