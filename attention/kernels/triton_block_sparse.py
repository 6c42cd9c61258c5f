"""Block-sparse flash attention in Triton: launch code, custom ops and autograd.

Same signature and semantics as ``reference.block_sparse_attention``. The kernels are wrapped
with ``torch.library.triton_op`` so that torch.compile sees them without graph breaks, and an
``autograd.Function`` ties forward and backward together. Importing this module needs Triton.

Tile choice: autotuned per (head dim, block size, pooled?, ragged tail?, dtype) over a few
configs; set T2V_ATTN_AUTOTUNE=0 to use the first config of each list (fast compile, used
by the correctness checks, which also run every config explicitly).
"""

import math
import os
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .triton_block_sparse_bwd import bsa_bwd_dkdv_kernel, bsa_bwd_dq_kernel, bsa_bwd_pooled_kernel
from .triton_block_sparse_fwd import LOG2E, bsa_fwd_kernel
from .triton_delta import attention_delta

# (BLOCK_M, BLOCK_N, num_warps, num_stages); tiles larger than the block size are dropped.
# Picked from sm_90 compiler reports (no register spills at D=128); the first of each list is
# the fastest measured on an H100 (see docs/kernel_notes.md) and needs ~225 KB shared memory.
FWD_CONFIGS = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
               (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3)]
# dq: (BLOCK_M, BLOCK_N, ...); dk/dv, fused and pooled: (BLOCK_N keys, BLOCK_M queries, ...).
DQ_CONFIGS = [(128, 32, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]
DKDV_CONFIGS = [(128, 32, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)]
FUSED_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
POOLED_CONFIG = (64, 64, 8, 2)

_AUTOTUNE = os.environ.get("T2V_ATTN_AUTOTUNE", "1") != "0"
_KEY = ["HEAD_DIM", "BS", "HAS_POOL", "HAS_TAIL", "USE_TMA", "TAIL_BRANCH"]
# Forward K/V loads through tensor descriptors (TMA) on Hopper and newer; False = pointer loads.
FWD_TMA = os.environ.get("T2V_ATTN_TMA", "1") != "0"
# Mask logits only in the key tile that crosses the sequence end (False: mask every tile).
FWD_TAIL_BRANCH = True
# Backward: "split" (a dq pass and a dk/dv pass, no atomics) or "fused" (one pass, dq added atomically).
BWD_MODE = os.environ.get("T2V_ATTN_BWD", "split")
_KERNELS = {"fwd": bsa_fwd_kernel, "dq": bsa_bwd_dq_kernel, "dkdv": bsa_bwd_dkdv_kernel, "fused": bsa_bwd_dkdv_kernel}


def _fits(cfg, bs):
    return cfg[0] <= bs and cfg[1] <= bs and bs % cfg[0] == 0 and bs % cfg[1] == 0


def _as_triton_configs(cfgs, bs, names):
    # Small blocks (below every listed tile) get one tile of the block's own size.
    fitting = [c for c in cfgs if _fits(c, bs)] or [(bs, bs, 4, 2)]
    return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s)
            for a, b, w, s in fitting]


_tuned = {}


def _kernel(which, bs):
    """The autotuned launcher for a kernel and block size (cached)."""
    key = (which, bs)
    if key not in _tuned:
        cfgs, keys = {
            "fwd": (FWD_CONFIGS, _KEY),
            "dq": (DQ_CONFIGS, _KEY[:4] + ["LISTED"]),
            "dkdv": (DKDV_CONFIGS, ["HEAD_DIM", "BS"]),
            "fused": (FUSED_CONFIGS, ["HEAD_DIM", "BS"]),  # the dk/dv kernel with FUSE_DQ
        }[which]
        configs = _as_triton_configs(cfgs, bs, _tile_names(which))
        if not _AUTOTUNE:
            configs = configs[:1]
        # Trials of the fused kernel add into its dq buffer: zero it before each.
        reset = ["DQACC"] if which == "fused" else None
        _tuned[key] = triton.autotune(configs=configs, key=keys, reset_to_zero=reset)(_KERNELS[which])
    return _tuned[key]


def _tile_names(which):
    return ("BLOCK_N", "BLOCK_M") if which in ("dkdv", "fused") else ("BLOCK_M", "BLOCK_N")


def _launch(which, bs, grid, args, config=None, **const):
    """Run a kernel: autotuned, or with an explicit (tile_a, tile_b, warps, stages) config."""
    if config is None:
        wrap_triton(_kernel(which, bs))[grid](*args, **const)
        return
    a, b, w, s = config
    names = _tile_names(which)
    meta = {names[0]: a, names[1]: b}
    wrap_triton(_KERNELS[which])[grid(meta)](*args, **const, **meta, num_warps=w, num_stages=s)


def _tma_alloc(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(*ts):
    """Descriptor rules: 16-byte aligned base and leading strides (allocations are aligned)."""
    if not FWD_TMA or not ts[0].is_cuda or torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    return all((t.storage_offset() * t.element_size()) % 16 == 0
               and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) for t in ts)


def _s3(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _pool_args(q, pooled_k, pooled_v, pooled_log_weight):
    if pooled_k is None:
        return q, q, q, (0, 0, 0), (0, 0, 0), 1
    return (pooled_k, pooled_v, pooled_log_weight, _s3(pooled_k), _s3(pooled_v), pooled_k.shape[2])


# Hooks for the correctness checks: per-kernel config override {"fwd": cfg, ...}, and NaN
# poisoning of every output buffer so that an unwritten element shows.
_forced_configs = {}
_poison_outputs = False


def _empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _poison_outputs else t


@triton_op("t2v::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(q: Tensor, k: Tensor, v: Tensor, kv_block_index: Tensor,
                          kv_block_count: Tensor, pooled_k: Optional[Tensor],
                          pooled_v: Optional[Tensor], pooled_log_weight: Optional[Tensor],
                          block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    B, H, N, D = q.shape
    M = k.shape[2]
    out = _empty((B, H, N, D), q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    pk, pv, plw, spk, spv, P = _pool_args(q, pooled_k, pooled_v, pooled_log_weight)
    nqb = kv_block_index.shape[2]
    args = (q, k, v, pk, pv, plw, kv_block_index, kv_block_count, out, lse,
            *_s3(q), *_s3(k), *_s3(v), *spk, *spv,
            H, N, M, P, nqb, kv_block_index.shape[3], scale * LOG2E)
    use_tma = _tma_ok(k, v)
    if use_tma:
        triton.set_allocator(_tma_alloc)  # descriptors built in the kernel need a little scratch
    const = dict(HEAD_DIM=D, BS=block_size, HAS_POOL=pooled_k is not None, HAS_TAIL=M % block_size != 0,
                 USE_TMA=use_tma, TAIL_BRANCH=FWD_TAIL_BRANCH)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _launch("fwd", block_size, grid, args, _forced_configs.get("fwd"), **const)
    return out, lse


def transpose_block_index(kv_block_index, kv_block_count, n_k_blocks):
    """Per key block, the query blocks that list it: (index (B, H, NKB, NQB), count (B, H, NKB))."""
    B, H, nqb, maxk = kv_block_index.shape
    valid = torch.arange(maxk, device=kv_block_index.device) < kv_block_count[..., None]
    # Invalid entries go to a spare column so that they never overwrite a real one.
    cols = torch.where(valid, kv_block_index.long(), n_k_blocks)
    mask = torch.zeros((B, H, nqb, n_k_blocks + 1), dtype=torch.uint8, device=kv_block_index.device)
    mask.scatter_(-1, cols, 1)
    mask_t = mask[..., :n_k_blocks].transpose(-1, -2)
    count = mask_t.sum(-1, dtype=torch.int32)
    index = torch.sort(mask_t, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return index.contiguous(), count.contiguous()


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton_op("t2v::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                          delta: Tensor, kv_block_index: Tensor, kv_block_count: Tensor,
                          pooled_k: Optional[Tensor], pooled_v: Optional[Tensor],
                          pooled_log_weight: Optional[Tensor], block_size: int,
                          scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    M = k.shape[2]
    nqb, nkb = kv_block_index.shape[2], triton.cdiv(M, block_size)
    dk = _empty((B, H, M, D), k.dtype, q.device)
    dv = _empty((B, H, M, D), v.dtype, q.device)
    pk, pv, plw, spk, spv, P = _pool_args(q, pooled_k, pooled_v, pooled_log_weight)
    has_pool = pooled_k is not None
    qk_scale = scale * LOG2E

    q_index, q_count = transpose_block_index(kv_block_index, kv_block_count, nkb)
    strides = (*_s3(q), *_s3(k), *_s3(v), *_s3(do))
    key_grid = lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), B * H)  # noqa: E731
    fused = BWD_MODE == "fused"
    dq = None if fused and not has_pool else _empty((B, H, N, D), q.dtype, q.device)
    dq_acc = torch.zeros((B, H, N, D), dtype=torch.float32, device=q.device) if fused else dq
    # The dk/dv pass (with dq added atomically when fused) first: the dq pass then adds the pooled terms to it.
    _launch("fused" if fused else "dkdv", block_size, key_grid,
            (q, k, v, do, lse, delta, q_index, q_count, dk, dv, dq_acc, *strides, H, N, M, nqb, nkb, qk_scale, scale),
            _forced_configs.get("fused" if fused else "dkdv"), HEAD_DIM=D, BS=block_size, FUSE_DQ=fused)
    if not fused or has_pool:
        args = (q, k, v, do, lse, delta, pk, pv, plw, kv_block_index, kv_block_count, dq, dq_acc,
                *strides, *spk, *spv, H, N, M, P, nqb, kv_block_index.shape[3], qk_scale, scale)
        _launch("dq", block_size, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H), args,
                _forced_configs.get("dq"), HEAD_DIM=D, BS=block_size, HAS_POOL=has_pool,
                HAS_TAIL=M % block_size != 0, LISTED=not fused)
    else:
        dq = dq_acc.to(q.dtype)

    if not has_pool:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    bn, bm, w, s = POOLED_CONFIG
    bm = min(bm, block_size)
    n_p, n_m = triton.cdiv(P, bn), triton.cdiv(N, bm)
    # Enough query slices to give every multiprocessor two programs.
    split = max(1, min(n_m, triton.cdiv(2 * _num_sms(q.device), n_p * B * H)))
    per_split = triton.cdiv(n_m, split)
    split = triton.cdiv(n_m, per_split)
    part_k = _empty((split, B * H, P, D), torch.float32, q.device)
    part_v = _empty((split, B * H, P, D), torch.float32, q.device)
    wrap_triton(bsa_bwd_pooled_kernel)[(n_p, B * H, split)](
        q, pk, pv, do, lse, delta, plw, part_k, part_v,
        *_s3(q), *spk, *spv, *_s3(do), H, N, P, nqb, per_split, qk_scale,
        HEAD_DIM=D, BS=block_size, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    dpk = (part_k.sum(0) * scale).view(B, H, P, D).to(pooled_k.dtype)
    dpv = part_v.sum(0).view(B, H, P, D).to(pooled_v.dtype)
    return dq, dk, dv, dpk, dpv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, count, pooled_k, pooled_v, pooled_log_weight, block_size, scale):
        out, lse = torch.ops.t2v.block_sparse_attn_fwd(
            q, k, v, index, count, pooled_k, pooled_v, pooled_log_weight, block_size, scale)
        ctx.save_for_backward(q, k, v, index, count, pooled_k, pooled_v, pooled_log_weight, out, lse)
        ctx.block_size, ctx.scale = block_size, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, index, count, pk, pv, plw, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        # delta_i = dO_i . O_i, minus the lse gradient: a Triton pre-pass, without float32 copies of dO and O.
        delta = attention_delta(dout, out, dlse)
        dq, dk, dv, dpk, dpv = torch.ops.t2v.block_sparse_attn_bwd(
            dout, q, k, v, lse, delta, index, count, pk, pv, plw, ctx.block_size, ctx.scale)
        has_pool = pk is not None
        return (dq, dk, dv, None, None, dpk if has_pool else None, dpv if has_pool else None,
                None, None, None)


def _last_contiguous(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def block_sparse_attention(q, k, v, kv_block_index, kv_block_count, *, block_size=64,
                           pooled_k=None, pooled_v=None, pooled_log_weight=None, scale=None):
    """Triton block-sparse attention; see ``reference.block_sparse_attention`` for semantics."""
    B, H, N, D = q.shape
    M = k.shape[2]
    nqb = math.ceil(N / block_size)
    if k.shape != (B, H, M, D) or v.shape != k.shape:
        raise ValueError(f"k, v must be (B, H, M, {D}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if kv_block_index.shape[:3] != (B, H, nqb) or kv_block_count.shape != (B, H, nqb):
        raise ValueError(f"block index/count must start with (B, H, NQB) = {(B, H, nqb)}")
    if block_size < 16 or block_size & (block_size - 1) or D < 16 or D & (D - 1):
        raise ValueError("block_size and head dim must be powers of two, at least 16")
    if pooled_k is not None:
        if pooled_v is None or pooled_log_weight is None:
            raise ValueError("pooled_k needs pooled_v and pooled_log_weight")
        pooled_log_weight = pooled_log_weight.to(torch.float32).contiguous()
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v, pooled_k, pooled_v = map(_last_contiguous, (q, k, v, pooled_k, pooled_v))
    index = kv_block_index.to(torch.int32).contiguous()
    count = kv_block_count.to(torch.int32).contiguous()
    return _BlockSparseAttention.apply(q, k, v, index, count, pooled_k, pooled_v,
                                       pooled_log_weight, block_size, scale)
