"""Multi-process training under ``torchrun``: process group, DDP / FSDP wrapper, data shards,
cross-process averages, gathering sharded state for checkpoints.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), :func:`setup` joins the
process group (NCCL on GPUs, gloo on CPU); everything else asks ``torch.distributed`` and is a
no-op in a single process, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """True in a process started by ``torchrun`` with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, timeout_s: float) -> str:
    """Join the job's process group if launched by ``torchrun``; return this process's device
    (``cuda`` becomes the GPU of its ``LOCAL_RANK``). A collective that waits longer than
    ``timeout_s`` (e.g. on a process that died) fails instead of hanging."""
    if not launched():
        return device
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"under torchrun the device must be cpu or cuda (each process takes its LOCAL_RANK GPU), "
                         f"got {device!r}")  # fmt: skip
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The process that writes checkpoints, logs and progress."""
    return rank() == 0


def local_rows(batch_size: int) -> slice:
    """This process's rows of a global batch of ``batch_size`` rows per process."""
    return slice(rank() * batch_size, (rank() + 1) * batch_size)


def wrap(model: nn.Module, fsdp: bool = False, find_unused: bool = False) -> nn.Module:
    """With several processes: ``model`` in DDP (rank 0's weights are broadcast;
    ``find_unused``: some parameters may get no gradient in a step, e.g. layer dropout), or
    with ``fsdp`` sharded in place by FSDP2 (the optimizer must be built afterwards)."""
    if world_size() == 1:
        return model
    if fsdp:
        # One unit for the whole model: reversible blocks re-run f and g inside their backward
        # without module hooks, so per-block units would leave those parameters sharded there.
        return fully_shard(model)
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=find_unused
    )


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def sync_gradients(net: nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward: gradients are averaged across
    processes only when ``sync`` (the last micro-batch of an optimizer step)."""
    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(sync)
    if isinstance(net, DistributedDataParallel) and not sync:
        with net.no_sync():
            yield
    else:
        yield


def gathered(state):
    """A state dict (nested dicts / lists) with FSDP's shards gathered into full CPU tensors.
    A collective under FSDP: every process calls it, in the same order."""
    if isinstance(state, DTensor):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    return state


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimizer state dict (as :func:`gathered` makes) cut to this process's shards of
    the optimizer's FSDP parameters, ready for ``optimizer.load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(param, value):
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    per_param = {i: {k: cut(params[i], v) for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": per_param}


def mean(value: float | torch.Tensor) -> float:
    """The average of ``value`` over all processes (every process gets the same number)."""
    if world_size() == 1:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=_collective_device()).clone()
    dist.all_reduce(t)  # gloo has no AVG
    return t.item() / world_size()


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (so all stop at the same step)."""
    return mean(float(flag)) > 0


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
