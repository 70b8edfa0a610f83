"""What DeepSpeed 0.19.8 allocates per rank for ZeRO 0-3 and ZeRO-Offload, derived from its code.

    deepspeed_bytes_per_rank(groups, world=2, rank=0, stage=2)   # params / grads / optimizer bytes

Beside the ZeRO paper's formulas (labs_lib.estimates.memory.zero_bytes_per_rank), this counts what DeepSpeed's
flat, aligned partitions really hold; benchmarks/memory.py holds every DeepSpeed run to it within 1 %.
"""

from __future__ import annotations


def _zero12_partition(numels: list[int], world: int, rank: int) -> tuple[int, int, int]:
    """One parameter group of DeepSpeed's ZeRO-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py), fp32, no
    round_robin_gradients, no parameter_alignment: returns (partition_size, whole, pad). Line numbers: 0.19.8.

    The group is flattened and padded to a multiple of ``alignment = nccl_start_alignment_factor (2) * world``
    (``__init__`` l.441-446, ``flatten_dense_tensors_aligned`` l.1390); each rank owns ``partition_size = padded //
    world`` elements (l.587). ``whole``: the elements of every parameter that overlaps this rank's partition, counted
    whole (``get_partition_info`` l.2579: a parameter straddling a boundary is in both ranks' ``params_in_partition``).
    ``pad``: the zeros ``_get_flat_partition_unpadded`` (l.2890) appends where the partition runs past the group's
    last element (the alignment padding, on the last rank; ``get_flat_partition`` l.2728 when no parameter is in it)."""
    total = sum(numels)
    alignment = 2 * world
    partition_size = -(-total // alignment) * alignment // world
    start, end, offset, whole = rank * partition_size, (rank + 1) * partition_size, 0, 0
    for numel in numels:
        if start <= offset < end or offset < start < offset + numel:
            whole += numel
        offset += numel
    return partition_size, whole, partition_size - min(partition_size, max(0, total - start))


def deepspeed_bytes_per_rank(groups: list[list[int]], world: int, rank: int, stage: int,
                             offload: bool = False) -> dict[str, int]:
    """Bytes rank ``rank`` holds in DeepSpeed 0.19.8, fp32 weights and torch's AdamW, as ``deepspeed_held_bytes`` reads
    them (the gradients right after backward at the accumulation boundary, before the step), derived from
    DeepSpeed's code rather than the ZeRO paper. ``groups``: the numel of each parameter of each optimizer group,
    in order (:func:`labs_lib.train.optim.param_groups`). Beside the paper's 4/4/12 bytes per parameter over the ranks:

    - optimizer: fp32 master partition + Adam's m and v (3 x 4 bytes a partition element, alignment padding included)
      plus AdamW's 4-byte ``step`` tensor per tensor it updates (one per flat group from stage 1 on, one per parameter
      at stage 0, where DeepSpeed hands the model's parameters to AdamW itself; none with ZeRO-Offload, whose
      DeepSpeedCPUAdam keeps the step count in a Python int);
    - ZeRO-1 and ZeRO-2 gradients (the same code path in 0.19.8 with ``contiguous_gradients``, its default): at the
      boundary ``reduce_ipg_grads`` (l.2205, l.2270-2274) copies the reduced gradient of every parameter in
      ``params_in_partition`` -- the whole parameter, also the part that belongs to the neighbouring rank -- into
      one buffer ``grads_in_partition`` (``copy_grads_in_partition`` l.2184-2196: ``total_size +=
      param_in_partition.numel()``); ``independent_gradient_partition_epilogue`` (l.1016-1068) keeps views of it in
      ``averaged_gradients`` (``get_flat_partition(..., return_tensor_list=True)``) plus the zero padding, and frees
      every ``param.grad`` (``_clear_param_grad_only``). The ipg bucket (``reduce_bucket_size`` elements,
      ``setup_buckets`` l.3256) is freed at the end of that epilogue (``_release_ipg_buffers`` l.924), so it is not
      held at this point: it is backward-time memory;
    - ZeRO-Offload (stage 1/2, ``offload_optimizer``): the gradient partition is the fp32 master's ``.grad``
      (``initialize_optimizer_states`` l.934 allocates ``partition_size`` elements and keeps it when offloading); the
      gradient reaches it through two scratch buffers of the largest parameter's size (``temp_grad_buffer_for_*``,
      l.651-659), which ``deepspeed_held_bytes`` and this count leave out: staging space, not gradients;
    - ZeRO-3: each parameter is padded to a multiple of the ranks (partition_parameters.py ``_aligned_size``,
      ``_partition_param`` l.1816) and split: ceil(numel/R) elements of weight, of gradient and of master, m and v
      per parameter.
    """
    numels = [n for g in groups for n in g]
    if stage == 0:
        return {"params": 4 * sum(numels), "grads": 4 * sum(numels), "optimizer": 8 * sum(numels) + 4 * len(numels)}
    if stage == 3:
        part = sum(-(-n // world) for n in numels)
        return {"params": 4 * part, "grads": 4 * part, "optimizer": 12 * part + 4 * len(groups)}
    parts = [_zero12_partition(g, world, rank) for g in groups]
    partition = sum(p for p, _, _ in parts)
    grads = partition if offload else sum(whole + pad for _, whole, pad in parts)
    steps = 0 if offload else 4 * len(groups)  # DeepSpeedCPUAdam counts its steps in a Python int, no tensor
    return {"params": 4 * sum(numels), "grads": 4 * grads, "optimizer": 12 * partition + steps}
