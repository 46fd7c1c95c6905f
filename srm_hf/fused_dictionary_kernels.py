"""The Triton kernels of stage 1 (the dictionary step) behind `srm_hf.fused_dictionary`, which launches them and
documents the maths: the sparse codes (from a projection, or projecting the features themselves), the codes'
gradient and the MSE as elementwise passes, and the whole of stage 1 for one tap in one forward and one backward
kernel over pixels; built on the blocks of `srm_hf.fused_kernels` (the same layouts and strides).
"""

import triton
import triton.language as tl

from .fused_kernels import (codes_from_top, finish_sum, load_block, project_block, running_top_k, sparse_codes,
                            weight_block)


@triton.jit
def codes_kernel(a_ptr, out_ptr, num_active, o_n, o_k, o_s, S, K, s_n, s_k, s_s, per_program,
                 BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # λ per pixel, written in the layout and dtype of `out`
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, ok, a = load_block(a_ptr, n, start, S, K, s_n, s_k, s_s, BLOCK_S, BLOCK_K)
        codes = sparse_codes(a, ok, num_active, BLOCK_K)
        tl.store(out_ptr + n * o_n + rows[:, None] * o_s + cols[None, :] * o_k,
                 codes.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def projected_codes_kernel(t_ptr, d_ptr, b_ptr, out_ptr, num_active, o_n, o_k, o_s, K, d_c, d_k, S, C, s_n, s_c, s_s,
                           per_program, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    # codes_kernel from the features t, D and b (project_block): λ per pixel, written in the layout and dtype of out
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    bias = tl.load(b_ptr).to(tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, a = project_block(t_ptr, d_ptr, n, start, S, C, K, s_n, s_c, s_s, d_c, d_k, PRECISION, BLOCK_S,
                                      BLOCK_C, BLOCK_K)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        codes = sparse_codes(a + bias, ok, num_active, BLOCK_K)
        tl.store(out_ptr + n * o_n + rows[:, None] * o_s + cols[None, :] * o_k,
                 codes.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def codes_grad_kernel(g_ptr, c_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    # dL/da = dL/dλ · λ(1-λ), one pass over dense tensors of the same strides (0 where an atom was not kept)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    g = tl.load(g_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (g * c * (1.0 - c)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def squared_error_kernel(a_ptr, b_ptr, part_ptr, out_ptr, count_ptr, scale, numel, BLOCK: tl.constexpr):
    # MSE(a, b) into out_ptr (0-dim, float32): scale × Σ (a - b)² over each program's BLOCK elements, summed over the
    # programs by `finish_sum` through part_ptr; scale = 1 / numel
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    d = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32) - tl.load(b_ptr + offsets, mask=ok, other=0.0)
    finish_sum(part_ptr, out_ptr, count_ptr, tl.program_id(0), tl.sum(d * d, axis=0) * scale)


@triton.jit
def squared_error_grad_kernel(g_ptr, a_ptr, b_ptr, out_ptr, scale, numel, BLOCK: tl.constexpr):
    # d MSE(a, b) / da = g · scale · (a - b), scale = 2 / numel, g the loss's gradient (a device scalar)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    d = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32) - tl.load(b_ptr + offsets, mask=ok, other=0.0)
    g = tl.load(g_ptr).to(tl.float32) * scale
    tl.store(out_ptr + offsets, (d * g).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def reconstruct_block(codes, d_ptr, c, C, K, d_c, d_k, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # t̂ = D λ for channels c .. c + BLOCK_C of a block's codes λ [BLOCK_S, BLOCK_K]: (channel indices, the D block
    # [BLOCK_C, BLOCK_K] read, t̂ [BLOCK_S, BLOCK_C]); 0 beyond C
    chans, d = weight_block(d_ptr, c, C, K, d_c, d_k, BLOCK_C, BLOCK_K)
    return chans, d, tl.dot(codes, tl.trans(d), input_precision=PRECISION)


@triton.jit
def dictionary_forward_kernel(t_ptr, d_ptr, b_ptr, codes_ptr, part_ptr, loss_ptr, count_ptr, num_active, chunks, scale,
                              K, d_c, d_k, S, C, s_n, s_c, s_s, per_program, PRECISION: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # stage 1 of one tap, forward, per program: λ = codes of a = Dᵀt + b (project_block, sparse_codes), written
    # pixel-major [N·S, K] in codes_ptr's dtype; then t̂ = D λ from λ as written, and scale × Σ (t̂ - t)² over the
    # program's pixels (scale = 1 / (N·C·S): its part of the MSE), summed into loss_ptr through part_ptr [N, chunks]
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    bias = tl.load(b_ptr).to(tl.float32)
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, a = project_block(t_ptr, d_ptr, n, start, S, C, K, s_n, s_c, s_s, d_c, d_k, PRECISION, BLOCK_S,
                                      BLOCK_C, BLOCK_K)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        codes = sparse_codes(a + bias, ok, num_active, BLOCK_K).to(codes_ptr.dtype.element_ty)
        tl.store(codes_ptr + (n * S + rows[:, None]) * K + cols[None, :], codes, mask=ok)
        codes = codes.to(tl.float32)
        for c in range(0, C, BLOCK_C):
            _, _, _, t = load_block(t_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
            _, _, rebuilt = reconstruct_block(codes, d_ptr, c, C, K, d_c, d_k, PRECISION, BLOCK_C, BLOCK_K)
            total += (rebuilt - t) * (rebuilt - t)  # 0 outside the map: both are
    finish_sum(part_ptr, loss_ptr, count_ptr, n * chunks + chunk, tl.sum(tl.sum(total, axis=1), axis=0) * scale)


@triton.jit
def dictionary_backward_kernel(t_ptr, d_ptr, codes_ptr, g_ptr, x_ptr, y_ptr, db_ptr, grad_b_ptr, count_ptr, chunks,
                               scale, K, d_c, d_k, S, C, s_n, s_c, s_s, per_program, PRECISION: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # stage 1 of one tap, backward, per program, from t and the λ the forward wrote: with e = g·scale·(t̂ - t)
    # (scale = 2 / (N·C·S), g the loss's gradient, a device scalar), dL/dλ = Dᵀe and dL/da = dL/dλ · λ(1-λ).
    # Writes, pixel-major, the two halves of X [2, N·S, C] (e, then t) and the second half of Y [2, N·S, K]
    # (dL/da; the first holds λ), so that dL/dD = Xᵀ Y (decoder and encoder at once), and Σ dL/da (dL/db) into
    # grad_b_ptr in its dtype, through db_ptr [N, chunks]
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    pixels = tl.num_programs(0).to(tl.int64) * S  # N·S: where the second halves of X and Y start
    g = tl.load(g_ptr).to(tl.float32) * scale
    db = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        at = (n * S + rows)[:, None]  # pixel-major row of each pixel
        codes = tl.load(codes_ptr + at * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        d_codes = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
        for c in range(0, C, BLOCK_C):
            _, _, t_ok, t = load_block(t_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
            chans, d, rebuilt = reconstruct_block(codes, d_ptr, c, C, K, d_c, d_k, PRECISION, BLOCK_C, BLOCK_K)
            e = (rebuilt - t) * g
            tl.store(x_ptr + at * C + chans[None, :], e.to(x_ptr.dtype.element_ty), mask=t_ok)
            tl.store(x_ptr + (pixels + at) * C + chans[None, :], t.to(x_ptr.dtype.element_ty), mask=t_ok)
            d_codes = tl.dot(e, d, d_codes, input_precision=PRECISION)
        d_a = d_codes * codes * (1.0 - codes)  # 0 where an atom was not kept (λ = 0)
        tl.store(y_ptr + (pixels + at) * K + cols[None, :], d_a.to(y_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(tl.where(ok, d_a, 0.0), axis=0)
    finish_sum(db_ptr, grad_b_ptr, count_ptr, n * chunks + chunk, tl.sum(db, axis=0))


@triton.jit
def wide_dictionary_forward_kernel(t_ptr, d_ptr, b_ptr, codes_ptr, part_ptr, loss_ptr, count_ptr, num_active, chunks,
                                   scale, K, d_c, d_k, S, C, s_n, s_c, s_s, per_program, PRECISION: tl.constexpr,
                                   KP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    # dictionary_forward_kernel for K wider than a block, one block of BLOCK_S pixels per program (per_program =
    # BLOCK_S): each pixel's top k across the blocks of atoms (running_top_k, KP slots ≥ k); λ then written a block
    # at a time (codes_from_top) and read back, after a barrier, for t̂ = D λ
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    start = chunk * BLOCK_S
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    at = (n * S + rows)[:, None]  # pixel-major row of each pixel
    top_a, top_i, nan = running_top_k(t_ptr, d_ptr, tl.load(b_ptr).to(tl.float32), n, start, S, C, K, s_n, s_c, s_s,
                                      d_c, d_k, num_active, PRECISION, BLOCK_S, BLOCK_C, BLOCK_K, KP)
    top_codes = tl.sigmoid(top_a)
    for k in range(0, K, BLOCK_K):
        ok = (rows < S)[:, None] & (cols < K - k)[None, :]
        codes = codes_from_top(top_codes, top_i, k + cols, nan > 0, num_active, BLOCK_S, BLOCK_K, KP)
        tl.store(codes_ptr + at * K + k + cols[None, :], codes.to(codes_ptr.dtype.element_ty), mask=ok)
    tl.debug_barrier()  # the λ stored above, by any thread of this program, is read back below
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for c in range(0, C, BLOCK_C):
        _, _, _, t = load_block(t_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
        rebuilt = wide_reconstruct_block(codes_ptr, at, rows < S, d_ptr, c, C, K, d_c, d_k, PRECISION, BLOCK_S,
                                         BLOCK_C, BLOCK_K)
        total += (rebuilt - t) * (rebuilt - t)  # 0 outside the map: both are
    finish_sum(part_ptr, loss_ptr, count_ptr, n * chunks + chunk, tl.sum(tl.sum(total, axis=1), axis=0) * scale)


@triton.jit
def wide_reconstruct_block(codes_ptr, at, pixel_ok, d_ptr, c, C, K, d_c, d_k, PRECISION: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # reconstruct_block from the codes λ stored pixel-major (rows `at` of codes_ptr [N·S, K]), BLOCK_K atoms at a
    # time: t̂ [BLOCK_S, BLOCK_C] for channels c .. c + BLOCK_C, 0 beyond C; read from L2 (.cg), as this program
    # may have just written them
    cols = tl.arange(0, BLOCK_K)
    rebuilt = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ok = pixel_ok[:, None] & (cols < K - k)[None, :]
        codes = tl.load(codes_ptr + at * K + k + cols[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        _, _, part = reconstruct_block(codes.to(tl.float32), d_ptr + k * d_k, c, C, K - k, d_c, d_k, PRECISION,
                                       BLOCK_C, BLOCK_K)
        rebuilt += part
    return rebuilt


@triton.jit
def wide_dictionary_backward_kernel(t_ptr, d_ptr, codes_ptr, g_ptr, x_ptr, y_ptr, db_ptr, grad_b_ptr, count_ptr,
                                    chunks, scale, K, d_c, d_k, S, C, s_n, s_c, s_s, per_program,
                                    PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                                    BLOCK_K: tl.constexpr):
    # dictionary_backward_kernel for K wider than a block, one block of BLOCK_S pixels per program: first, a block
    # of channels at a time, e = g·scale·(t̂ - t) (t̂ from the λ the forward wrote) and t into X; after a barrier,
    # a block of atoms at a time, dL/dλ = Dᵀe from the e just written (read back in X's dtype, as torch's decoder
    # would take its gradient) and dL/da = dL/dλ · λ(1-λ) into Y, summed for dL/db
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    pixels = tl.num_programs(0).to(tl.int64) * S  # N·S: where the second halves of X and Y start
    start = chunk * BLOCK_S
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    at = (n * S + rows)[:, None]  # pixel-major row of each pixel
    g = tl.load(g_ptr).to(tl.float32) * scale
    for c in range(0, C, BLOCK_C):
        _, chans, t_ok, t = load_block(t_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
        rebuilt = wide_reconstruct_block(codes_ptr, at, rows < S, d_ptr, c, C, K, d_c, d_k, PRECISION, BLOCK_S,
                                         BLOCK_C, BLOCK_K)
        tl.store(x_ptr + at * C + c + chans[None, :], ((rebuilt - t) * g).to(x_ptr.dtype.element_ty), mask=t_ok)
        tl.store(x_ptr + (pixels + at) * C + c + chans[None, :], t.to(x_ptr.dtype.element_ty), mask=t_ok)
    tl.debug_barrier()  # the e stored above, by any thread of this program, is read back below
    db = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ok = (rows < S)[:, None] & (cols < K - k)[None, :]
        codes = tl.load(codes_ptr + at * K + k + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        d_codes = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
        for c in range(0, C, BLOCK_C):
            chans, d = weight_block(d_ptr + k * d_k, c, C, K - k, d_c, d_k, BLOCK_C, BLOCK_K)
            e_ok = (rows < S)[:, None] & (chans < C)[None, :]
            e = tl.load(x_ptr + at * C + chans[None, :], mask=e_ok, other=0.0, cache_modifier=".cg")
            d_codes = tl.dot(e.to(tl.float32), d, d_codes, input_precision=PRECISION)
        d_a = d_codes * codes * (1.0 - codes)  # 0 where an atom was not kept (λ = 0)
        tl.store(y_ptr + (pixels + at) * K + k + cols[None, :], d_a.to(y_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(tl.where(ok, d_a, 0.0), axis=0)
    finish_sum(db_ptr, grad_b_ptr, count_ptr, n * chunks + chunk, tl.sum(db, axis=0))
