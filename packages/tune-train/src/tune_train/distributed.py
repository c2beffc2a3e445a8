"""Devices, process groups and FSDP2 sharding. The model code never imports torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    """The device a config or command names: cpu, cuda, cuda:N, or auto (cuda if there is one).

    Raises:
        RecipeError: If a GPU is asked for and none is visible.
    """
    from tune_train.errors import RecipeError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device is '{name}' but no CUDA GPU is visible; set device: cpu "
                          "(or auto)")
    return device


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (env:// rendezvous); without torchrun, none.

    Under torchrun even one process gets a group, so FSDP (with CPU offload, say) works on a
    single GPU too.

    nccl on GPU, gloo on CPU. The timeout is short enough that ranks waiting on a dead peer
    give up in minutes rather than the default half hour (torchrun also tears the job down as
    soon as one rank exits non-zero).
    """
    if "WORLD_SIZE" not in os.environ:  # plain `python recipe.py` or `tune run` in place
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=int(os.environ.get("TUNE_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    initialized=True)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in this run's group (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights in CPU memory, gathered on the processes that
    ``keep`` them (empty elsewhere). Under FSDP every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return state if keep else {}


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place), a no-op in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shard_model(
    model: nn.Module,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, norm, output).

    Per-block units let the next block's all-gather overlap this block's compute and keep at
    most a couple of blocks unsharded at a time.

    Args:
        model: A tune_models.Decoder (any module with a ``layers`` ModuleList).
        param_dtype: Compute dtype the parameters are all-gathered in (mixed precision).
        reduce_dtype: Dtype gradients are reduced in.
        cpu_offload: Keep sharded parameters, gradients and optimizer state in CPU memory.

    Returns:
        The same module, sharded in place.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                   reduce_dtype=reduce_dtype)
    if cpu_offload:
        # Pinned host memory speeds up the copies to and from a GPU; without one it cannot
        # be allocated at all (and offloading from CPU to CPU is only a cheap no-op).
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for i, block in enumerate(model.layers):
        # The last block is gathered again right away by backward: keep it unsharded.
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model
