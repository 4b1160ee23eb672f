"""Data-parallel training under torchrun, one code path: NCCL on GPUs, gloo on CPU
(docs/design.md §5.3, docs/scale-out.md).

Every rank trains the same draft on its own micro-batches. The objective is already normalised by
the global target count (trainer.py), so gradients are *summed* across ranks, never averaged: plain
DDP with a sum hook, or FSDP2 (`train.fsdp`) with sum reductions, sharding parameters, gradients and
optimizer state. The frozen target embedding stays out of both: every rank holds it, nothing syncs it.
Checkpoints hold full (unsharded) tensors whichever way the run was laid out, so a run resumes and
exports the same under any world size or sharding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank of world, and the device it computes on."""

    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all ranks (a new tensor on this rank's device)."""
        out = tensor.to(self.device, copy=True)
        if self.world > 1:
            dist.all_reduce(out)
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a choice only rank 0 may make, e.g. which checkpoint)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> Dist:
    """Join the run torchrun started (WORLD_SIZE > 1), or run alone. cuda:LOCAL_RANK when there is CUDA."""
    env = os.environ
    world, local_rank = int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(int(env.get("RANK", 0)), world, int(env.get("LOCAL_WORLD_SIZE", 1)), device)


def _sum_hook(state, bucket):  # no annotations: DDP checks them, and postponed ones are strings
    """DDP's all-reduce without its division by the world size."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def parallelize(module: nn.Module, ctx: Dist, fsdp: bool, param_dtype: torch.dtype | None) -> nn.Module:
    """`module` ready for data-parallel training: itself alone, DDP, or FSDP2-sharded in place.

    FSDP2 shards only the root: the TTT unroll calls the draft's parts directly, not their
    forward, so their own hooks would never run. `param_dtype` is FSDP2's all-gather / compute
    dtype (bf16 runs); gradients are reduced in float32. Build the optimizer after this: FSDP2
    replaces the parameters with sharded DTensors.
    """
    if ctx.world == 1:
        return module
    if fsdp:
        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        frozen = {p for p in module.parameters() if not p.requires_grad}  # the target embedding: every rank has it
        fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=frozen)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        return module
    ddp = DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                  forward_sync_buffers=False)  # d2t / t2d never change
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def grad_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP reduces only the last accumulation micro-batch's backward (the sum of all of them).
    FSDP2 reduce-scatters every one, so unsharded gradients never accumulate."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Unsharded parameters for code that calls the draft directly (evaluation): one all-gather."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (FSDP2's gradient norm) as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainable weights, buffers and optimizer state as full CPU tensors keyed by parameter name.
    Collective under FSDP2 (every rank calls it); only rank 0 gets the tensors then."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optim: dict[str, Any]) -> None:
    """The inverse of `full_state`, on every rank from its own copy (each shards what it holds)."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)


def in_turn(features: Callable[[torch.Tensor, torch.Tensor], Any], ctx: Dist) -> Callable[[Any], Any]:
    """A feature source that is one model sharded over all ranks (tensor parallel) for batches that
    differ per rank: each forward is a collective, so every rank's micro-batch goes through it in
    turn, at its own shape, and its rank keeps the result. `features(input_ids, attention_mask)`."""

    def each(batch) -> Any:
        shapes: list[Any] = [None] * ctx.world
        dist.all_gather_object(shapes, tuple(batch.input_ids.shape))
        mine = None
        for src, shape in enumerate(shapes):
            if src == ctx.rank:
                pair = torch.stack([batch.input_ids, batch.attention_mask]).to(ctx.device)
            else:
                pair = torch.empty(2, *shape, dtype=torch.long, device=ctx.device)
            dist.broadcast(pair, src)
            out = features(pair[0], pair[1])
            mine = out if src == ctx.rank else mine
        return mine

    return each
