"""The paged KV cache: how many blocks fit, and the per-layer K and V tensors.

Per layer, K and V are each ``[num_blocks, block_size, num_kv_heads, head_dim]``; all layers
share one allocation so the cache is a single contiguous region of device memory. With a draft
model, the draft has a cache of its own with the same number of blocks (the same block tables
index both), so one block costs the target's bytes plus the draft's.
"""

from __future__ import annotations

import torch

from engine.config import EngineArgs
from engine.model_config import ModelConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def kv_block_bytes(config: ModelConfig, block_size: int) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


def num_blocks_from_cpu_budget(block_bytes: int, args: EngineArgs) -> int:
    """Blocks of ``block_bytes`` (every model's KV of one block) that fit in ``cpu_kv_cache_gb``."""
    num_blocks = int(args.cpu_kv_cache_gb * 2**30) // block_bytes
    if num_blocks < 1:
        raise ValueError(f"cpu_kv_cache_gb={args.cpu_kv_cache_gb} does not fit one KV block")
    return num_blocks


def num_blocks_from_gpu_memory(block_bytes: int, args: EngineArgs, device: torch.device, peak_bytes: int) -> int:
    """Blocks of ``block_bytes`` (every model's KV of one block) that fit in
    ``gpu_memory_utilization`` of the device, given the peak memory this process's tensors
    reached in a profiling forward (weights + activations)."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = (total - free) - torch.cuda.memory_reserved(device)
    budget = int(total * args.gpu_memory_utilization) - used_by_others - peak_bytes
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"no memory left for the KV cache: {total * args.gpu_memory_utilization / 2**30:.1f} GiB "
            f"allowed, {(used_by_others + peak_bytes) / 2**30:.1f} GiB used; raise gpu_memory_utilization"
        )
    return num_blocks


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int) -> KVCaches:
    """Zeroed (k_cache, v_cache) per layer, so that never-written slots hold finite values."""
    shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    cache = torch.zeros(shape, dtype=config.dtype, device=config.device)
    return [(cache[i, 0], cache[i, 1]) for i in range(config.num_layers)]
