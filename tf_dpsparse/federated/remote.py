"""Rounds spread over TFF executor workers (`tf-dpsparse worker`) over gRPC.

Nothing here speaks a protocol of its own: each worker is TFF's C++
`worker_binary` executor service, reached the way TFF's local context
reaches its own worker (`RemoteExecutorGrpcStub` on a gRPC channel, a
`RemoteExecutor` per client count, TFF's native compiler). TFF 0.87 has no
`set_remote_cpp_execution_context`: its only factory over a stub,
`local_cpp_executor_factory`, also starts the worker, so the same few lines
are written here for an address that is already serving.

One worker runs the whole round there (TFF's sync context). With several,
what runs where:

- the driver (`DPSparseFedAvg.next`) holds the device states, samples the
  round and runs it as `learning.SplitRound`, three TFF computations;
- `distribute` (the distributor's download) runs on the first worker;
- `devices` (each device's download sync and client work: training,
  DP-SGD noise, clip, top-k and residual) runs on every worker at once,
  each on its contiguous slice of the sampled devices with their data and
  states, and returns their uploads, new states and metrics;
- `finish` (the aggregator with its DP query, the finalizer, the round's
  measurements) runs on the first worker over every upload, in device order.

Why three computations and not TFF's mergeable form of the round
(`create_mergeable_comp_execution_context`, which this context still is
for any other computation): the mergeable compiler cuts a round at its
aggregation, and `after_merge` sees only the round's arguments and the
merged aggregate, so the devices' work ran a second time there to give
their new states. That doubled the device work (2 workers: 7.7 s/round
against 4-5 s on one) and refused unseeded device randomness (DP-SGD noise
from OS entropy), since the second run would draw other noise than the
upload sent (`RecomputedRandomnessError`, still raised for a computation
given whole). Per device nothing is aggregated, so splitting `devices`
needs no merge and each device's work runs once; the server's parts are
not split, so the sums run in the one-process order and a round through k
workers equals the one-process round bit for bit. What is sent: the
download once per worker, each slice's data and states, and the uploads,
states and metrics back to the driver, which passes the uploads to
`finish`. A context marks that it runs devices apart by offering
`on_server`; TFF's local context and one worker run the round as one
computation.

For a computation given whole, two changes to TFF's mergeable context,
both about order, keep the result equal to the one-process one: TFF
concatenates the slices' client-placed results in the order the workers
*finish*, and merges the partial aggregates in that order too; `_InOrder`
keeps the slices' order for both. What the mergeable form requires (at
most one level of aggregation, no aggregate feeding another) is checked by
TFF when the computation is first compiled.

Per worker the client count changes with Poisson sampling; as
`_workers.LatestCardinality` does for the local worker, each worker keeps
only its latest counts' executor stacks (`_LatestStack`).
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
from tensorflow_federated.python.core.impl.computation import function_utils
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
  """TFF's executor factory, keeping the latest client counts' stacks only.

  The worker holds a copy of the computations per stack and frees none
  (DESIGN: 22 GB over a Poisson-sampled run), so stacks of counts not used
  lately are closed: the latest `keep`. A split round (`learning.SplitRound`)
  calls the first of several workers with three counts a round (the
  download's one client, its slice of the devices, all of them for the
  aggregate), so that one keeps 3 and the one-client stack is not rebuilt
  every round; every other worker keeps 1 (3 would hold 3 copies of the
  whole round's computations: 340 -> 480 MB on one worker). The count-free
  stack (merges, `initialize`) stays.
  """

  def __init__(self, stack_fn, keep: int = 1):
    super().__init__(stack_fn)
    self._recent, self._keep = [], keep

  def create_executor(self, cardinalities):
    if cardinalities.get(tff.CLIENTS):
      key = tuple(sorted(cardinalities.items(), key=lambda kv: str(kv[0])))
      if key in self._recent:
        self._recent.remove(key)
      self._recent.append(key)
      while len(self._recent) > self._keep:
        self.clean_up_executor(dict(self._recent.pop(0)))
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


def _factory(address: str, timeout: float, keep: int) -> _LatestStack:
  """TFF's executor factory for a worker already serving at `address`."""
  stub = _stub(address, timeout)

  def stack_fn(cardinalities):
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return _LatestStack(stack_fn, keep)


def _context_kwargs(address: str, timeout: float, keep: int = 1) -> dict:
  return dict(executor_fn=_factory(address, timeout, keep),
              compiler_fn=compiler.desugar_and_transform_to_native,
              transform_args=tensorflow_computation.transform_args,
              transform_result=tensorflow_computation.transform_result)


async def _gather(coros) -> list:
  return list(await asyncio.gather(*coros))


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
        'this computation cannot be spread whole over several workers: '
        'TFF\'s mergeable form runs the devices\' work twice (before the '
        'merge for the aggregate, after it for their new states), and that '
        f'work draws unseeded random numbers ({", ".join(ops)}), so a device '
        'would keep a residual of another draw than the update it sent. Run '
        'the round through DPSparseFedAvg.next (it splits the round, '
        'learning.SplitRound, and runs each device once), use one worker, or '
        'seed the noise (build_dp_sparse_fed_avg(seed=...), --noise-seed: '
        'tests only, not private).')
  return form


def _takes_clients(comp) -> bool:
  parameter = comp.type_signature.parameter
  return parameter is not None and type_analysis.contains(
      parameter, lambda t: isinstance(t, tff.FederatedType) and (
          t.placement is tff.CLIENTS))


def _per_device(comp) -> bool:
  """Whether `comp` computes each device's results alone: every result is
  placed at CLIENTS (not all equal) and nothing is aggregated, so a device's
  results depend on its own arguments and the server's only, and running
  any split of the devices apart gives the same results (a split round's
  `devices`)."""
  result = comp.type_signature.result
  leaves = (tff.structure.flatten(result)
            if isinstance(result, tff.StructType) else [result])
  if not leaves or not all(
      isinstance(t, tff.FederatedType) and t.placement is tff.CLIENTS and
      not t.all_equal for t in leaves):
    return False
  return not tree_analysis.contains(
      comp.to_building_block(), lambda block: isinstance(
          block, building_blocks.Intrinsic) and (
              block.intrinsic_def().aggregation_kind is not None))


class _InOrder(mergeable.MergeableCompExecutionContext):
  """TFF's mergeable context with one slice per worker, kept in order, that
  runs per-device computations apart and server ones on the first worker."""

  def __init__(self, async_contexts):
    super().__init__(async_contexts, compiler_fn=_mergeable_form,
                     transform_result=tensorflow_computation.transform_result)

  def _run(self, coro):
    return self._async_runner.run_coro_and_return_result(coro)

  def invoke(self, comp, arg=None):
    """Runs `comp` over the workers. Without client-placed arguments
    (`initialize`) there is nothing to split: whole on the first worker. A
    per-device computation (`_per_device`) runs once on each worker's slice
    of the devices. Any other goes through TFF's mergeable form."""
    contexts = self._async_execution_contexts
    if not _takes_clients(comp):
      return self._run(contexts[0].invoke(comp, arg))
    if _per_device(comp):
      return self._run_per_device(comp, arg)
    comp = self._compiler_pipeline.compile(comp)
    arg = tensorflow_computation.transform_args(arg)
    arg_list = mergeable.MergeableCompExecutionContextValue(
        arg, comp.up_to_merge.type_signature.parameter,
        len(contexts)).value()
    result = self._run(_in_order(comp, arg_list, contexts[:len(arg_list)]))
    return self._transform_result(tff.types.type_to_py_container(
        result, comp.after_merge.type_signature.result))

  def _run_per_device(self, comp, arg):
    """Slice i of the devices on worker i, concurrently; the results
    concatenated in slice order (TFF's own partitioning and repackaging)."""
    contexts = self._async_execution_contexts
    arg = tensorflow_computation.transform_args(arg)
    arg_list = mergeable.MergeableCompExecutionContextValue(
        arg, comp.type_signature.parameter, len(contexts)).value()
    results = self._run(_gather([
        context.invoke(comp, a) for a, context in zip(arg_list, contexts)]))
    result_type = comp.type_signature.result
    # pylint: disable-next=protected-access
    result = mergeable._repackage_partitioned_values(
        list(results), result_type_spec=result_type)
    return self._transform_result(
        tff.types.type_to_py_container(result, result_type))

  def on_server(self, comp, *args):
    """Runs `comp(*args)` whole on the first worker: the server's parts of
    a `learning.SplitRound` (the download; the aggregate and the
    finalizer over every device's upload, summed in device order as in
    one process)."""
    arg = function_utils.pack_args(comp.type_signature.parameter, args, {})
    return self._run(self._async_execution_contexts[0].invoke(comp, arg))


def create_remote_context(addresses: Sequence[str], *, timeout: float = 30.0):
  """TFF's execution context over the workers at `addresses` (host:port).

  One address: TFF's sync context on that worker. Several: `_InOrder`, the
  sampled devices split into one slice per worker (`DPSparseFedAvg` rounds
  as `learning.SplitRound`, other computations in TFF's mergeable form).
  Raises WorkerUnreachableError when a worker does not answer within
  `timeout`.
  """
  addresses = list(addresses)
  if not addresses:
    raise ValueError('no worker address given.')
  if len(addresses) == 1:
    return sync_execution_context.SyncExecutionContext(
        **_context_kwargs(addresses[0], timeout))
  return _InOrder([async_execution_context.AsyncExecutionContext(
      **_context_kwargs(a, timeout, keep=3 if i == 0 else 1))
                   for i, a in enumerate(addresses)])


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
