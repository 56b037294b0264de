"""Machinery: split-K in one launch. The last program to finish a tile adds up the partial sums.

Programs that share an output tile (same tile, different slices of the reduction) each write
their fp32 partial sum to partial[split, M, C] and then increment the tile's arrival counter
(an atomic add with acquire-release order, after a barrier so the whole program's stores are
done). The program that sees count == num_splits - 1 arrived last: it reads all partials (in
split order, so the result is deterministic), resets the counter to 0 for the next launch,
and writes the output. No second kernel, no atomics on the data, no zero-filled buffer.

The counters live in a workspace the caller keeps zeroed (ops.py: one per device and stream);
concurrent launches on one stream are ordered, so they never share a counter.
"""
import triton
import triton.language as tl


@triton.jit
def split_k_combine(acc, partial_ptr, counter_ptr, pid_s, num_splits, offs_m, offs_c, M, C):
    """(total, last): `acc` is this program's [BM, BC] partial for split pid_s of tile
    (offs_m, offs_c) of an (M, C) output. last is True in exactly one program per tile, and
    there total is the sum over all splits (elsewhere total is acc)."""
    ok = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    tile = offs_m[:, None] * C + offs_c[None, :]
    tl.store(partial_ptr + pid_s * M * C + tile, acc, mask=ok)
    tl.debug_barrier()                                  # every thread's partial is stored
    count = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = count == num_splits - 1
    total = acc
    if last:
        total = tl.full(acc.shape, 0.0, tl.float32)
        for s in range(0, num_splits):                  # split order: deterministic
            total += tl.load(partial_ptr + s * M * C + tile, mask=ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")   # ready for the next launch
    return total, last
