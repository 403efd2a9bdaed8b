"""Running on one process or many: torchrun setup and teardown, collectives, FSDP2 sharding, full state dicts.

`python train.py` runs one process with no process group; `torchrun --nproc_per_node=N` starts N, each
with WORLD_SIZE/RANK/LOCAL_RANK set: gloo on CPU, nccl on CUDA. Only rank 0 prints and writes files.
Every helper here is a no-op (or the identity) on a single process, so the scripts call them
unconditionally.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from nano_gtalign.errors import UsageError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False  # whether we own (and must destroy) the process group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup_distributed(device: str = "auto") -> Dist:
    """This process's rank and device. device: auto | cpu | cuda | cuda:N (under torchrun "cuda" means
    cuda:LOCAL_RANK); starts the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local}"
    d = Dist(rank, world, local, torch.device(device))
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if d.device.type == "cuda" else "gloo")
        d.initialized_here = True
    return d


def teardown(d: Dist) -> None:
    if d.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def exit_after_torchrun(code: int = 0) -> None:
    """End the process with `code`; a torchrun worker without interpreter finalization.

    Under torchrun (gloo) a worker thread of torch's process group can still be releasing the last
    collective's tensors when Python finalizes, which aborts the process ("terminate called without an
    active exception", about 1 run in 10). Everything is written and flushed by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)
    sys.exit(code)


def print0(d: Dist, *parts) -> None:
    """print on rank 0 only, flushed (torchrun buffers the workers' output otherwise)."""
    if d.main:
        print(*parts, flush=True)


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (fp64 so counts and sums stay exact)."""
    if not d.on:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather(d: Dist, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if not d.on:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def gather_lists(d: Dist, items: list) -> list:
    """Every rank's list, concatenated in rank order."""
    return [x for part in all_gather(d, items) for x in part]


def broadcast_module(d: Dist, module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if d.on:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


# -----------------------------------------------------------------------------
# DDP and FSDP2


def fsdp_api():
    """fully_shard and FSDPModule: public in torch>=2.6, which FSDPModule.set_reshard_after_forward needs."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        raise UsageError("--fsdp needs torch>=2.6 (FSDPModule.set_reshard_after_forward, used for generation)") \
            from None
    return fully_shard, FSDPModule


def shard(module: nn.Module, blocks: nn.ModuleList, d: Dist) -> nn.Module:
    """FSDP2: one shard group per transformer block (gathered just before it runs) plus the root
    (embeddings, final norm, head)."""
    fully_shard, _ = fsdp_api()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def wrap_ddp(module: nn.Module, d: Dist) -> nn.Module:
    # The only buffer is the RoPE table, the same on every rank: no need to broadcast it each forward.
    return nn.parallel.DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda"
                                               else None, broadcast_buffers=False)


def wrap_for_training(module: nn.Module, fsdp: bool, d: Dist) -> nn.Module:
    """A Policy or Critic (`.model` is the Transformer) ready for torchrun: FSDP2-sharded (frozen modules too:
    each rank then holds 1/world of a KL reference), DDP-wrapped when it has trainable parameters, or as it is
    on a single process."""
    if fsdp:
        return shard(module, module.model.model.layers, d)
    return wrap_ddp(module, d) if d.on and any(p.requires_grad for p in module.parameters()) else module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own module)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def generation_mode(module: nn.Module, fsdp: bool):
    """Eval mode; under FSDP2 also gather every parameter once and keep it gathered.

    Generation stops when every row has finished, which differs between ranks; with the parameters held
    unsharded no decode step needs a collective, so ranks may run different numbers of steps. The sampler
    calls the FSDP root so the root's hooks see every forward. Memory: one full copy of the weights per
    rank while generating, as in any RL trainer that samples from the model it trains.
    """
    was_training = module.training
    module.eval()
    sharded = []
    if fsdp:
        _, FSDPModule = fsdp_api()
        sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
        module.set_reshard_after_forward(False, recurse=True)
        for m in sharded:
            m.unshard()
    try:
        yield module
    finally:
        if fsdp:
            module.set_reshard_after_forward(True, recurse=True)
            for m in sharded:
                m.reshard()
        module.train(was_training)


def grad_sync(model: nn.Module, sync: bool, fsdp: bool):
    """Gradient accumulation: skip DDP's all-reduce (FSDP2's reduce-scatter) on all but the last micro-batch."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def full_model_state(model: nn.Module, fsdp: bool) -> dict:
    """Full (unsharded) parameters on CPU. Under FSDP every rank must call this; rank 0 gets the tensors."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict,
                    fsdp: bool) -> None:
    """The inverse of full_model_state / full_optimizer_state (every rank calls it with the full state)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)
    else:
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
