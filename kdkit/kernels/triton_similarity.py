"""Fused Triton kernels for the SPKD Gram matrices, forward and backward.

Everything reduces to one differentiable operation, :func:`stacked_gram`: for features
``S`` (``B×Cs×N``, the student, with gradient) and optionally ``T`` (``B×Ct×N``, the teacher,
none), the Gram ``G = H Hᵀ`` of the stacked ``H = [T; S]`` (``B×R×R``, ``R = Ct + Cs``),
of the raw features and/or of the position-normalised ones (each position's stacked
channel vector of T and of S divided by its own ``‖·‖₂ + 1e-7``). The losses then work on
these ``C×C`` blocks in PyTorch (:mod:`kdkit.kernels.factored` for the algebra).

Kernels (each one program per tile; every offset in int64; every load masked; inputs
upcast to the accumulation dtype right after loading). The rows of H are laid out with T's
padded to whole blocks, so a row block lies in one tensor and is one load; tile sizes and
warps come from :func:`launch_settings` (checked for spills by
:mod:`kdkit.kernels.resources`):

    _inverse_norms   B×C×N → B×N: 1 / (‖f[:, n]‖₂ + ε), one read of the features
    _gram            upper-triangular R×R blocks of H Hᵀ over a slice of positions; the
                     normalised and raw Grams share the loads (the fused spatial+channel
                     loss reads each feature map once); split over N, partials summed after
    _gram_grad       g = W Ĥ for the student rows: the Gram's backward, (dG + dGᵀ) Ĥ,
                     stored in float32 (float64 for a float64 student)
    _normalise_grad  back through the position normalisation, plus the raw-Gram gradient,
                     written in the student's dtype

Float64 accumulation (``accumulate="fp64"``, and ``"auto"`` for the normalised Gram, whose
spatial identity cancels) makes ``_gram`` and ``_gram_grad`` multiply and accumulate in
float64 (exact products of the float32 values), which keeps the loss accurate when the
student is near the teacher; float32 (``"fp32"``, and ``"auto"`` for raw Grams alone) is
IEEE float32 (never TF32). Layers with fewer positions than about their channels go to
:mod:`kdkit.kernels.factored`, whose ``N×N`` forms are the cheaper ones there.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kdkit.errors import KernelFailure
from kdkit.kernels import describe_error, factored
from kdkit.kernels.common import (
    DEFAULT_ACCUMULATE,
    EPS,
    accumulation_dtype,
    batch_map_from_gram,
    channel_map_from_gram,
    result_dtype,
    spatial_loss_from_grams,
)

__all__ = [
    "stacked_gram",
    "batch_similarity",
    "spatial_similarity",
    "channel_similarity",
    "spatial_channel_similarity",
]


# Triton before 3.9 cannot compile a float64 tl.dot whose operands were loaded as 16-bit
# values ("fp64 don't support largeK MMA"; fixed upstream in 3.9). Seen for sm_80/sm_90 with
# 3.6.0, 3.7.1 and 3.8.0 by `python -m kdkit.kernels.resources --inputs bf16`.
NARROW_FP64_DOT_BROKEN = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9)


def launch_dtype(dtype: torch.dtype, acc_dtype: torch.dtype) -> torch.dtype:
    """The dtype that feature maps of ``dtype`` reach the kernels in: float32 for 16-bit
    maps with float64 accumulation where Triton cannot compile that, else ``dtype``."""
    narrow = dtype in (torch.float16, torch.bfloat16)
    if narrow and acc_dtype == torch.float64 and NARROW_FP64_DOT_BROKEN:
        return torch.float32
    return dtype


def _block(size: int, cap: int) -> int:
    """A power-of-two tile edge ≥ 16 (tl.dot's minimum on the GPU), ≤ ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


@triton.jit
def _inverse_norms(
    x_ptr, out_ptr, C, N, stride_b, stride_c, stride_n, eps,
    ACC64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, n] = 1 / (‖x[b, :, n]‖₂ + eps); grid (B, cdiv(N, BLOCK_N))."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_type = tl.float64 if ACC64 else tl.float32
    total = tl.zeros([BLOCK_N], dtype=acc_type)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        ptrs = x_ptr + b * stride_b + offs_c[:, None] * stride_c + offs_n[None, :] * stride_n
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(acc_type)
        total += tl.sum(x * x, axis=0)
    inverse = 1.0 / (tl.sqrt(total) + eps)
    tl.store(out_ptr + b * N + offs_n, inverse, mask=mask_n)


@triton.jit
def _load_rows(
    x_ptr, inv_ptr, b, rows, offs_n, C, N, sb, sc, sn,
    acc_type: tl.constexpr, NORMALISE: tl.constexpr,
):
    """Rows ``rows`` × positions ``offs_n`` of one feature map, raw and (if asked) each
    position divided by its norm (``inv_ptr``: ``B×N`` inverse norms); zero outside."""
    mask_n = offs_n < N
    mask = (rows[:, None] < C) & mask_n[None, :]
    raw = tl.load(x_ptr + b * sb + rows[:, None] * sc + offs_n[None, :] * sn,
                  mask=mask, other=0.0).to(acc_type)
    if NORMALISE:
        inverse = tl.load(inv_ptr + b * N + offs_n, mask=mask_n, other=0.0).to(acc_type)
        scaled = raw * inverse[None, :]
    else:
        scaled = raw
    return raw, scaled


@triton.jit
def _block_source(
    t_ptr, s_ptr, rt_ptr, rs_ptr, block, t_blocks, Ct, Cs,
    t_sb, t_sc, t_sn, s_sb, s_sc, s_sn, BLOCK_R: tl.constexpr,
):
    """Row block ``block`` of H = [T; S], laid out with T's rows padded to whole blocks so
    that a block lies in one tensor: that tensor (pointer, inverse norms, rows, strides)
    and the block's rows in it and in H (−1 past the tensor's end). Scalar selects, no
    branch, so the loads that follow can be pipelined."""
    is_t = block < t_blocks
    x_ptr = tl.where(is_t, t_ptr, s_ptr)
    inv_ptr = tl.where(is_t, rt_ptr, rs_ptr)
    C = tl.where(is_t, Ct, Cs)
    sb = tl.where(is_t, t_sb, s_sb)
    sc = tl.where(is_t, t_sc, s_sc)
    sn = tl.where(is_t, t_sn, s_sn)
    rows = (block - tl.where(is_t, 0, t_blocks)).to(tl.int64) * BLOCK_R
    rows += tl.arange(0, BLOCK_R).to(tl.int64)
    index = tl.where(rows < C, rows + tl.where(is_t, 0, Ct), -1)
    return x_ptr, inv_ptr, C, sb, sc, sn, rows, index


@triton.jit
def _gram(
    t_ptr, s_ptr, rt_ptr, rs_ptr, gn_ptr, gr_ptr,
    Ct, Cs, N, positions_per_split, t_blocks, num_blocks,
    t_sb, t_sc, t_sn, s_sb, s_sc, s_sn,
    NORMALISE: tl.constexpr, RAW: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial Grams over one slice of positions: grid (num_blocks², splits, B); blocks
    below the diagonal return at once. Writes gn/gr[split, b, R, R] (normalised / raw)."""
    block = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bi = block // num_blocks
    bj = block % num_blocks
    if bi > bj:
        return
    acc_type = tl.float64 if ACC64 else tl.float32
    xi, inv_i, ci, sb_i, sc_i, sn_i, rows_i, index_i = _block_source(
        t_ptr, s_ptr, rt_ptr, rs_ptr, bi, t_blocks, Ct, Cs,
        t_sb, t_sc, t_sn, s_sb, s_sc, s_sn, BLOCK_R)
    xj, inv_j, cj, sb_j, sc_j, sn_j, rows_j, index_j = _block_source(
        t_ptr, s_ptr, rt_ptr, rs_ptr, bj, t_blocks, Ct, Cs,
        t_sb, t_sc, t_sn, s_sb, s_sc, s_sn, BLOCK_R)
    acc_n = tl.zeros([BLOCK_R, BLOCK_R], dtype=acc_type)
    acc_r = tl.zeros([BLOCK_R, BLOCK_R], dtype=acc_type)
    start = split * positions_per_split
    for n0 in range(0, positions_per_split, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        offs_n = tl.where(offs_n < start + positions_per_split, offs_n, N)  # mask: past N
        raw_i, scaled_i = _load_rows(xi, inv_i, b, rows_i, offs_n, ci, N, sb_i, sc_i, sn_i,
                                     acc_type, NORMALISE)
        raw_j, scaled_j = _load_rows(xj, inv_j, b, rows_j, offs_n, cj, N, sb_j, sc_j, sn_j,
                                     acc_type, NORMALISE)
        if NORMALISE:
            acc_n += tl.dot(scaled_i, tl.trans(scaled_j), input_precision="ieee",
                            out_dtype=acc_type)
        if RAW:
            acc_r += tl.dot(raw_i, tl.trans(raw_j), input_precision="ieee", out_dtype=acc_type)
    R = Ct + Cs
    out = ((split * tl.num_programs(2) + b) * R + index_i[:, None]) * R + index_j[None, :]
    mask = (index_i[:, None] >= 0) & (index_j[None, :] >= 0)
    if NORMALISE:
        tl.store(gn_ptr + out, acc_n, mask=mask)
    if RAW:
        tl.store(gr_ptr + out, acc_r, mask=mask)


@triton.jit
def _gram_grad_part(
    acc_n, acc_r, x_ptr, inv_ptr, wn_ptr, wr_ptr, b, offs_c, offs_n, C, Cs, N, R, first,
    sb, sc, sn,
    NORMALISE: tl.constexpr, RAW: tl.constexpr, acc_type: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += W[:, first:first+C] · X over one tensor X (``C`` rows) of H."""
    for k0 in range(0, C, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        raw, scaled = _load_rows(x_ptr, inv_ptr, b, rows, offs_n, C, N, sb, sc, sn,
                                 acc_type, NORMALISE)
        w_offs = (b * Cs + offs_c[:, None]) * R + first + rows[None, :]
        w_mask = (offs_c[:, None] < Cs) & (rows[None, :] < C)
        if NORMALISE:
            w = tl.load(wn_ptr + w_offs, mask=w_mask, other=0.0).to(acc_type)
            acc_n += tl.dot(w, scaled, input_precision="ieee", out_dtype=acc_type)
        if RAW:
            w = tl.load(wr_ptr + w_offs, mask=w_mask, other=0.0).to(acc_type)
            acc_r += tl.dot(w, raw, input_precision="ieee", out_dtype=acc_type)
    return acc_n, acc_r


@triton.jit
def _gram_grad(
    t_ptr, s_ptr, rt_ptr, rs_ptr, wn_ptr, wr_ptr, gn_ptr, gr_ptr,
    Ct, Cs, N,
    t_sb, t_sc, t_sn, s_sb, s_sc, s_sn,
    NORMALISE: tl.constexpr, RAW: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """g[b, c, n] = Σ_r W[b, c, r] Ĥ[b, r, n] for the student rows c; grid
    (cdiv(Cs, BLOCK_C), cdiv(N, BLOCK_N), B). W is ``B×Cs×R`` contiguous, g ``B×Cs×N``."""
    offs_c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(2).to(tl.int64)
    acc_type = tl.float64 if ACC64 else tl.float32
    acc_n = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_type)
    acc_r = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_type)
    R = Ct + Cs
    acc_n, acc_r = _gram_grad_part(acc_n, acc_r, t_ptr, rt_ptr, wn_ptr, wr_ptr, b, offs_c,
                                   offs_n, Ct, Cs, N, R, 0, t_sb, t_sc, t_sn,
                                   NORMALISE, RAW, acc_type, BLOCK_K)
    acc_n, acc_r = _gram_grad_part(acc_n, acc_r, s_ptr, rs_ptr, wn_ptr, wr_ptr, b, offs_c,
                                   offs_n, Cs, Cs, N, R, Ct, s_sb, s_sc, s_sn,
                                   NORMALISE, RAW, acc_type, BLOCK_K)
    out = (b * Cs + offs_c[:, None]) * N + offs_n[None, :]
    mask = (offs_c[:, None] < Cs) & (offs_n[None, :] < N)
    if NORMALISE:
        tl.store(gn_ptr + out, acc_n, mask=mask)
    if RAW:
        tl.store(gr_ptr + out, acc_r, mask=mask)


@triton.jit
def _normalise_grad(
    s_ptr, rs_ptr, gn_ptr, gr_ptr, out_ptr, Cs, N, s_sb, s_sc, s_sn, eps,
    NORMALISE: tl.constexpr, RAW: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """∂L/∂f = g/d − f̂ (f̂ᵀg)/‖f‖ (d = ‖f‖ + eps, f̂ = f/d) per position, plus the raw
    gradient; grid (B, cdiv(N, BLOCK_N)). Output ``B×Cs×N`` contiguous in the student's
    dtype; it may be the raw gradient's buffer (each element is read, then written, by
    the same program)."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_type = tl.float64 if ACC64 else tl.float32
    if NORMALISE:
        inverse = tl.load(rs_ptr + b * N + offs_n, mask=mask_n, other=1.0).to(acc_type)
        norm = 1.0 / inverse - eps
        dot = tl.zeros([BLOCK_N], dtype=acc_type)
        for c0 in range(0, Cs, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = (offs_c[:, None] < Cs) & mask_n[None, :]
            f = tl.load(s_ptr + b * s_sb + offs_c[:, None] * s_sc + offs_n[None, :] * s_sn,
                        mask=mask, other=0.0).to(acc_type)
            g = tl.load(gn_ptr + (b * Cs + offs_c[:, None]) * N + offs_n[None, :], mask=mask,
                        other=0.0).to(acc_type)
            dot += tl.sum(f * inverse[None, :] * g, axis=0)
        # f̂ (f̂ᵀg)/‖f‖ = f · inverse · dot / ‖f‖; an all-zero position has f = 0 and no term
        coefficient = tl.where(norm > 0, dot * inverse / tl.where(norm > 0, norm, 1.0), 0.0)
    for c0 in range(0, Cs, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < Cs) & mask_n[None, :]
        flat = (b * Cs + offs_c[:, None]) * N + offs_n[None, :]
        grad = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_type)
        if NORMALISE:
            f = tl.load(s_ptr + b * s_sb + offs_c[:, None] * s_sc + offs_n[None, :] * s_sn,
                        mask=mask, other=0.0).to(acc_type)
            g = tl.load(gn_ptr + flat, mask=mask, other=0.0).to(acc_type)
            grad += g * inverse[None, :] - f * coefficient[None, :]
        if RAW:
            grad += tl.load(gr_ptr + flat, mask=mask, other=0.0).to(acc_type)
        if out_ptr.dtype.element_ty != tl.float64:
            # through float32: Triton's interpreter converts float64 to bfloat16 wrongly
            # (3.9); the cost is at most a double rounding of a half-precision gradient
            grad = grad.to(tl.float32)
        tl.store(out_ptr + flat, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _flat(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → a ``B×C×N`` view when the strides allow (channels_last does), else a
    copy; the kernels take any strides."""
    return f.flatten(2) if f.dim() > 3 else f


# Tile caps and launch options, keyed by (float64 accumulation, normalised and raw Grams
# both): the largest tiles with which no variant spills registers when compiled for sm_80
# and sm_90 (`python -m kdkit.kernels.resources` compiles them all and reports; a test
# checks it). Chosen from static resource use, not yet from GPU timings.
_GRAM_TILES = {  # BLOCK_R cap, BLOCK_N, num_warps, num_stages
    (True, True): (32, 32, 8, 3),
    (True, False): (64, 32, 8, 3),
    (False, True): (32, 32, 8, 3),
    (False, False): (64, 16, 8, 3),
}
_GRAM_GRAD_TILES = {  # BLOCK_C cap, BLOCK_K cap, BLOCK_N, num_warps, num_stages
    (True, True): (32, 16, 64, 8, 3),
    (True, False): (64, 32, 64, 8, 3),
    (False, True): (32, 32, 32, 8, 3),
    (False, False): (32, 16, 64, 8, 3),
}
KERNELS = ("_inverse_norms", "_gram", "_gram_grad", "_normalise_grad")


def launch_settings(kernel: str, ct: int, cs: int, acc64: bool, both: bool) -> dict:
    """Tile sizes (constexprs) plus ``num_warps``, ``num_stages`` and FMA contraction of
    one launch of ``kernel`` for ``ct`` teacher and ``cs`` student channels (``cs``: the
    channels of the one map for ``_inverse_norms``); ``both``: normalised and raw Grams
    at once."""
    if kernel == "_gram":
        cap, block_n, warps, stages = _GRAM_TILES[acc64, both]
        tiles = dict(BLOCK_R=_block(max(ct, cs), cap), BLOCK_N=block_n)
    elif kernel == "_gram_grad":
        cap_c, cap_k, block_n, warps, stages = _GRAM_GRAD_TILES[acc64, both]
        tiles = dict(BLOCK_C=_block(cs, cap_c), BLOCK_K=_block(max(ct, cs), cap_k),
                     BLOCK_N=block_n)
    elif kernel in ("_inverse_norms", "_normalise_grad"):
        tiles, warps, stages = dict(BLOCK_C=_block(cs, 32), BLOCK_N=64), 4, 3
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    # multiply-adds contracted to FMAs (one rounding), asked for explicitly: Triton 3.10
    # stops doing it by default
    return dict(tiles, num_warps=warps, num_stages=stages, enable_fp_fusion=True)


def _inverse_position_norms(f: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    batch, channels, n = f.shape
    out = torch.empty(batch, n, device=f.device, dtype=acc_dtype)
    acc64 = acc_dtype == torch.float64
    settings = launch_settings("_inverse_norms", 0, channels, acc64, False)
    _inverse_norms[(batch, triton.cdiv(n, settings["BLOCK_N"]))](
        f, out, channels, n, *f.stride(), EPS, ACC64=acc64, **settings)
    return out


PARTIAL_GRAM_BYTES = 64 << 20  # what the per-slice partial Grams may take


def _splits(batch: int, blocks: int, rows: int, n: int, block_n: int,
            acc_dtype: torch.dtype, device: torch.device) -> int:
    """Slices of positions per Gram block pair: enough programs for about two waves on a
    GPU (one slice elsewhere), each slice at least 8 tiles long, and the partial Grams
    (slices × B × R² in ``acc_dtype``) within :data:`PARTIAL_GRAM_BYTES`. Few block pairs
    over many positions (the batch Gram: R = B rows over C·N) get many slices."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    useful = max(1, blocks * (blocks + 1) // 2 * batch)
    partial_bytes = batch * rows * rows * torch.finfo(acc_dtype).bits // 8
    by_memory = max(1, PARTIAL_GRAM_BYTES // partial_bytes)
    return max(1, min(triton.cdiv(target, useful), triton.cdiv(n, 8 * block_n), by_memory))


def _explained(stage: str):
    """Re-raise a kernel's failure (not an out-of-memory) as a :class:`KernelFailure` that
    names the cause in one line and the backend to use meanwhile."""

    def wrap(function):
        @functools.wraps(function)
        def run(*args):
            try:
                return function(*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:
                raise KernelFailure(
                    f"the Triton similarity kernels failed in the {stage} (Triton "
                    f"{triton.__version__}; {describe_error(error)}). Meanwhile use "
                    "the PyTorch backend, which computes the same losses: set "
                    "KDKIT_SIMILARITY_BACKEND=factored, or backend: factored in the term's "
                    "args") from error

        return run

    return wrap


class _StackedGram(torch.autograd.Function):
    """(student ``B×Cs×N``, teacher ``B×Ct×N`` or None) → (normalised Gram, raw Gram) of
    the stacked [teacher; student], each ``B×R×R`` or an empty tensor when not asked."""

    @staticmethod
    @_explained("forward pass")
    def forward(ctx, student, teacher, normalise, raw, acc_dtype):
        batch, cs, n = student.shape
        ct = 0 if teacher is None else teacher.shape[1]
        t = student if teacher is None else teacher  # any valid pointer when Ct = 0
        r = ct + cs
        acc64 = acc_dtype == torch.float64
        rs = _inverse_position_norms(student, acc_dtype) if normalise else student.new_empty(0)
        rt = (
            _inverse_position_norms(teacher, acc_dtype)
            if normalise and teacher is not None else rs
        )
        settings = launch_settings("_gram", ct, cs, acc64, normalise and raw)
        block_r, block_n = settings["BLOCK_R"], settings["BLOCK_N"]
        t_blocks = triton.cdiv(ct, block_r)
        blocks = t_blocks + triton.cdiv(cs, block_r)
        splits = _splits(batch, blocks, r, n, block_n, acc_dtype, student.device)
        per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
        splits = triton.cdiv(n, per_split) if n > 0 else 1
        shape = (splits, batch, r, r)
        dev = student.device
        gn = torch.zeros(shape, device=dev, dtype=acc_dtype) if normalise else rs
        gr = torch.zeros(shape, device=dev, dtype=acc_dtype) if raw else rs
        if n > 0:
            # block pairs vary fastest: programs running together read the same image and
            # positions, so each tile comes from DRAM once and from L2 for the other pairs
            _gram[(blocks * blocks, splits, batch)](
                t, student, rt, rs, gn, gr, ct, cs, n, per_split, t_blocks, blocks,
                *t.stride(), *student.stride(),
                NORMALISE=normalise, RAW=raw, ACC64=acc64, **settings,
            )
        upper = torch.ones(r, r, dtype=torch.bool, device=dev).triu()
        outputs = []
        for wanted, partial in ((normalise, gn), (raw, gr)):
            if wanted:
                gram = partial.sum(0)
                outputs.append(torch.where(upper, gram, gram.mT))
            else:
                outputs.append(student.new_empty(0, dtype=acc_dtype))
        ctx.save_for_backward(student, teacher if teacher is not None else student, rs, rt)
        ctx.settings = (ct, normalise, raw, acc_dtype, teacher is None)
        return tuple(outputs)

    @staticmethod
    @_explained("backward pass")
    def backward(ctx, grad_normalised, grad_raw):
        student, teacher, rs, rt = ctx.saved_tensors
        ct, normalise, raw, acc_dtype, no_teacher = ctx.settings
        t = student if no_teacher else teacher
        batch, cs, n = student.shape
        acc64 = acc_dtype == torch.float64

        def student_rows(grad):  # (dG + dGᵀ) restricted to the student's rows, B×Cs×R
            grad = grad.to(acc_dtype)
            return (grad + grad.mT)[:, ct:, :].contiguous()

        wn = student_rows(grad_normalised) if normalise else rs
        wr = student_rows(grad_raw) if raw else rs
        dev = student.device
        # g = W Ĥ is formed in the accumulation dtype inside the kernel, but once formed
        # needs only the result's precision
        store_dtype = result_dtype(student.dtype)
        grad_student = torch.empty(batch, cs, n, device=dev, dtype=student.dtype)
        gn = torch.empty(batch, cs, n, device=dev, dtype=store_dtype) if normalise else rs
        if not raw:
            gr = rs
        elif grad_student.dtype == store_dtype:
            gr = grad_student  # _normalise_grad adds the normalised part in place
        else:
            gr = torch.empty(batch, cs, n, device=dev, dtype=store_dtype)
        both = normalise and raw
        settings = launch_settings("_gram_grad", ct, cs, acc64, both)
        # channel blocks fastest: programs running together share the tiles of H they read
        grid = (triton.cdiv(cs, settings["BLOCK_C"]), triton.cdiv(n, settings["BLOCK_N"]), batch)
        if n > 0:
            _gram_grad[grid](
                t, student, rt, rs, wn, wr, gn, gr, ct, cs, n,
                *t.stride(), *student.stride(),
                NORMALISE=normalise, RAW=raw, ACC64=acc64, **settings,
            )
        settings = launch_settings("_normalise_grad", ct, cs, acc64, both)
        if n > 0:
            _normalise_grad[(batch, triton.cdiv(n, settings["BLOCK_N"]))](
                student, rs, gn, gr, grad_student, cs, n,
                *student.stride(), EPS,
                NORMALISE=normalise, RAW=raw, ACC64=acc64, **settings,
            )
        return grad_student, None, None, None, None


def stacked_gram(
    student: torch.Tensor,
    teacher: torch.Tensor | None = None,
    normalise: bool = True,
    raw: bool = False,
    accumulate: str = DEFAULT_ACCUMULATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised Gram, raw Gram) of ``H = [teacher; student]``: each ``B×R×R`` in the
    accumulation dtype (empty when not asked for). Differentiable in ``student`` only.
    ``"auto"``: float64 when the normalised Gram is asked for (the spatial identity
    cancels), else the result dtype (raw Grams become channel and batch maps directly)."""
    student = _flat(student)
    teacher = None if teacher is None else _flat(teacher.detach())
    # one pointer reads a block of either tensor, so both come in one dtype
    dtype = student.dtype if teacher is None else torch.promote_types(teacher.dtype,
                                                                      student.dtype)
    acc_dtype = accumulation_dtype(accumulate, cancels=normalise, dtype=dtype)
    dtype = launch_dtype(dtype, acc_dtype)
    student = student.to(dtype)
    teacher = None if teacher is None else teacher.to(dtype)
    return _StackedGram.apply(student, teacher, normalise, raw, acc_dtype)


def _spatial_from_gram(gram: torch.Tensor, ct: int, n: int) -> torch.Tensor:
    """The spatial loss from the normalised Gram of the stacked ``[teacher; student]``."""
    return spatial_loss_from_grams(gram[:, :ct, :ct], gram[:, ct:, ct:], gram[:, :ct, ct:], n)


def _channel_from_grams(student_gram: torch.Tensor, teacher_gram: torch.Tensor):
    diff = channel_map_from_gram(student_gram) - channel_map_from_gram(teacher_gram)
    return diff.square().mean()


def _spatial_by_grams(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether the spatial loss of this layer is cheaper through the ``C×C`` Grams, which
    the kernels compute, than through the ``N×N`` maps (:func:`factored.gram_is_cheaper`)."""
    n = _flat(student).shape[2]
    return factored.gram_is_cheaper(n, student.shape[1], teacher.shape[1])


def _channel_by_maps(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether the channel loss of this layer is cheaper through the ``C×C`` maps, which
    the kernels compute, than through the ``N×N`` Grams (the positions as channels)."""
    ns, nt = _flat(student).shape[2], _flat(teacher).shape[2]
    return not factored.gram_is_cheaper(student.shape[1], ns, nt)


def spatial_similarity(student, teacher, accumulate=DEFAULT_ACCUMULATE):
    """MSE between the ``B×N×N`` spatial maps from one normalised stacked Gram; layers
    with ``N`` below about ``C`` go to :func:`factored.spatial_similarity` (its ``N×N``
    maps, small there)."""
    if not _spatial_by_grams(student, teacher):
        return factored.spatial_similarity(student, teacher, accumulate)
    gram, _ = stacked_gram(student, teacher, normalise=True, accumulate=accumulate)
    n = _flat(student).shape[2]
    return _spatial_from_gram(gram, teacher.shape[1], n).to(result_dtype(student.dtype))


def channel_similarity(student, teacher, accumulate=DEFAULT_ACCUMULATE):
    """MSE between the ``B×C×C`` channel maps from the raw Grams of each side; layers with
    ``N`` below about ``C`` go to :func:`factored.channel_similarity` (the ``N×N`` Grams)."""
    if not _channel_by_maps(student, teacher):
        return factored.channel_similarity(student, teacher, accumulate)
    _, student_gram = stacked_gram(student, None, normalise=False, raw=True,
                                   accumulate=accumulate)
    with torch.no_grad():
        _, teacher_gram = stacked_gram(teacher, None, normalise=False, raw=True,
                                       accumulate=accumulate)
    return _channel_from_grams(student_gram, teacher_gram).to(result_dtype(student.dtype))


def spatial_channel_similarity(student, teacher, accumulate=DEFAULT_ACCUMULATE):
    """Spatial plus channel loss from one pass over both feature maps (same C and N), in
    the precision the spatial Grams need (both Grams share the loads and the MMA loop);
    layers with ``N`` below about ``C`` take the two losses separately."""
    if not (_spatial_by_grams(student, teacher) and _channel_by_maps(student, teacher)):
        return (spatial_similarity(student, teacher, accumulate)
                + channel_similarity(student, teacher, accumulate))
    normalised, raw = stacked_gram(student, teacher, normalise=True, raw=True,
                                   accumulate=accumulate)
    c, n = teacher.shape[1], _flat(student).shape[2]
    spatial = _spatial_from_gram(normalised, c, n)
    channel = _channel_from_grams(raw[:, c:, c:], raw[:, :c, :c])
    return (spatial + channel).to(result_dtype(student.dtype))


def batch_similarity(student, teacher, accumulate=DEFAULT_ACCUMULATE):
    """MSE between the row-normalised ``B×B`` batch Grams: the Gram kernel run on the
    batch as the rows of a single ``1×B×(C·N)`` matrix."""
    _, student_gram = stacked_gram(student.reshape(1, student.shape[0], -1), None,
                                   normalise=False, raw=True, accumulate=accumulate)
    with torch.no_grad():
        _, teacher_gram = stacked_gram(teacher.reshape(1, teacher.shape[0], -1), None,
                                       normalise=False, raw=True, accumulate=accumulate)
    s, t = batch_map_from_gram(student_gram[0]), batch_map_from_gram(teacher_gram[0])
    return (s - t).square().mean().to(result_dtype(student.dtype))
