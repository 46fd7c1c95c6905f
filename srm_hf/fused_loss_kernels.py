"""The Triton kernels of the student's SRM loss behind `srm_hf.fused_loss`, which launches them and documents the
maths: from the head's logits, or projecting the student's features through the head themselves (K up to one block
of atoms, or wider: the atoms a block at a time, the log-sum-exp over them online), forward and backward; built on
the blocks of `srm_hf.fused_kernels` (the same layouts, strides and in-launch sums).
"""

import triton
import triton.language as tl

from .fused_kernels import arrive, finish_sum, load_block, project_block, sum_rows, sum_values, weight_block


@triton.jit
def sigmoid_terms(logit, cols, K, CE_ON_SIGMOID: tl.constexpr):
    # a block of head logits l [BLOCK_S, BLOCK_K]: (p = sigmoid(l), the CE input x = p or l with padded atoms at -inf;
    # padded pixels stay finite)
    p = tl.sigmoid(logit)
    return p, tl.where((cols < K)[None, :], p if CE_ON_SIGMOID else logit, -float("inf"))


@triton.jit
def head_terms(logit, rows, cols, y_ptr, n, S, K, CE_ON_SIGMOID: tl.constexpr):
    # sigmoid_terms of a block of image n's pixels `rows`, and their labels y: (p, x, y)
    p, x = sigmoid_terms(logit, cols, K, CE_ON_SIGMOID)
    return p, x, pixel_labels(y_ptr, n, S, rows)


@triton.jit
def pixel_labels(y_ptr, n, S, rows):
    # the labels of image n's pixels `rows` (0 beyond S): the atom each one's CE takes
    return tl.load(y_ptr + n * S + rows, mask=rows < S, other=0)


@triton.jit
def log_sum_exp(x):
    # log Σ exp over a block's atoms [BLOCK_S, BLOCK_K] -> [BLOCK_S]
    top = tl.max(x, axis=1)
    return top + tl.log(tl.sum(tl.exp(x - top[:, None]), axis=1))


@triton.jit
def loss_sums(p, x, y, rows, cols, S, K):
    # a block's CE(x, y) per pixel [BLOCK_S] (0 on padding) and its Σ p over pixels [BLOCK_K]
    x_y = tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
    ok = (rows < S)[:, None] & (cols < K)[None, :]
    return tl.where(rows < S, log_sum_exp(x) - x_y, 0.0), tl.sum(tl.where(ok, p, 0.0), axis=0)


@triton.jit
def logits_gradient(p, x, y, atoms, lse, g_ce, g_p, CE_ON_SIGMOID: tl.constexpr, PIXEL_TERM: tl.constexpr,
                    IMAGE_TERM: tl.constexpr):
    # dL/dl = g_ce·(softmax(x) - onehot(y))·dx/dl + g_p·p(1-p) for a block of atoms `atoms` (their indices in K),
    # softmax(x) = exp(x - lse) with lse the log-sum-exp over all K (g_p [BLOCK_K]: the image term's factor per atom);
    # a term of weight 0 is left out, as the eager loss leaves it out (0 × a NaN label would be NaN)
    d_x = (tl.exp(x - lse[:, None]) - tl.where(atoms[None, :] == y[:, None], 1.0, 0.0)) * g_ce
    slope = p * (1.0 - p)
    grad = tl.zeros_like(p)
    if PIXEL_TERM:
        grad += d_x * slope if CE_ON_SIGMOID else d_x
    if IMAGE_TERM:
        grad += g_p[None, :] * slope
    return grad


@triton.jit
def finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunks, K, eps, image_scale,
                BLOCK_K: tl.constexpr):
    # after each program stored its sums into work [N·chunks CE | N·chunks·K p | N pixel terms | N image terms]: the
    # last program of image n sums its image's parts, BLOCK_K atoms at a time: pixel term n = Σ CE, and image term n =
    # image_scale × Σ_K g log ḡ + (1-g) log(1-ḡ), ḡ = Σ p clamped to [eps, 1 - eps], with d_ptr[n] = dBCE/dḡ up to
    # 1/(N·K): (ḡ - g) / (ḡ (1 - ḡ)), 0 where the clamp moved ḡ (a NaN too, as torch). The last image sums the N
    # pixel and N image terms into pixel_ptr and image_ptr (0-dim)
    N = tl.num_programs(0).to(tl.int64)
    ce_ptr, p_ptr = work_ptr, work_ptr + N * chunks
    terms_ptr = p_ptr + N * chunks * K
    if arrive(count_ptr + n, chunks):
        bce = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            ok = cols < K
            pred = sum_rows(p_ptr + n * chunks * K + start, chunks, K - start, K, BLOCK_K)
            clamped = tl.where(pred < eps, eps, tl.where(pred > 1.0 - eps, 1.0 - eps, pred))  # NaN stays NaN
            target = tl.load(g_ptr + n * K + cols, mask=ok, other=0.0).to(tl.float32)
            bce += tl.where(ok, target * tl.log(clamped) + (1.0 - target) * tl.log(1.0 - clamped), 0.0)
            d = tl.where(pred == clamped, (clamped - target) / (clamped * (1.0 - clamped)), 0.0)
            tl.store(d_ptr + n * K + cols, d, mask=ok)
        tl.store(terms_ptr + n, sum_values(ce_ptr + n * chunks, chunks))
        tl.store(terms_ptr + N + n, tl.sum(bce, axis=0) * image_scale)
        if arrive(count_ptr + N, N):
            tl.store(pixel_ptr, sum_values(terms_ptr, N))
            tl.store(image_ptr, sum_values(terms_ptr + N, N))


@triton.jit
def store_loss_sums(work_ptr, n, chunk, chunks, K, ce, p_sum, BLOCK_K: tl.constexpr):
    # a program's sums (CE: a scalar, p: [BLOCK_K] covering all K) into `finish_loss`'s work buffer
    N = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    tl.store(work_ptr + n * chunks + chunk, ce)
    tl.store(work_ptr + N * chunks + (n * chunks + chunk) * K + cols, p_sum, mask=cols < K)


@triton.jit
def loss_forward_kernel(l_ptr, y_ptr, g_ptr, work_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, chunks, ce_scale,
                        p_scale, eps, image_scale, S, K, s_n, s_k, s_s, per_program, CE_ON_SIGMOID: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # per pixel: p = sigmoid(l), CE(x, y) with x = p (paper) or l; sums over the program's pixels of the CE and of p,
    # times ce_scale and p_scale (the means' and the term's factors), finished into both terms by `finish_loss`
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    ce_total, p_total = tl.zeros([BLOCK_S], dtype=tl.float32), tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, ok, logit = load_block(l_ptr, n, start, S, K, s_n, s_k, s_s, BLOCK_S, BLOCK_K)
        ce, p_sum = loss_sums(*head_terms(logit, rows, cols, y_ptr, n, S, K, CE_ON_SIGMOID), rows, cols, S, K)
        ce_total, p_total = ce_total + ce, p_total + p_sum
    store_loss_sums(work_ptr, n, chunk, chunks, K, tl.sum(ce_total, axis=0) * ce_scale, p_total * p_scale, BLOCK_K)
    finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunks, K, eps, image_scale, BLOCK_K)


@triton.jit
def projected_loss_forward_kernel(s_ptr, w_ptr, b_ptr, y_ptr, g_ptr, work_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr,
                                  chunks, ce_scale, p_scale, eps, image_scale, K, w_c, w_k, S, C, s_n, s_c, s_s,
                                  per_program, CE_ON_SIGMOID: tl.constexpr, PRECISION: tl.constexpr,
                                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # loss_forward_kernel from the student's features s and the head's P [C, K] and scalar c: l = Pᵀs + c made here
    # (project_block), so the head's K-channel logits never reach memory
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    bias = tl.load(b_ptr).to(tl.float32)
    ce_total, p_total = tl.zeros([BLOCK_S], dtype=tl.float32), tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, logit = project_block(s_ptr, w_ptr, n, start, S, C, K, s_n, s_c, s_s, w_c, w_k, PRECISION,
                                          BLOCK_S, BLOCK_C, BLOCK_K)
        ce, p_sum = loss_sums(*head_terms(logit + bias, rows, cols, y_ptr, n, S, K, CE_ON_SIGMOID), rows, cols, S, K)
        ce_total, p_total = ce_total + ce, p_total + p_sum
    store_loss_sums(work_ptr, n, chunk, chunks, K, tl.sum(ce_total, axis=0) * ce_scale, p_total * p_scale, BLOCK_K)
    finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunks, K, eps, image_scale, BLOCK_K)


@triton.jit
def wide_loss_forward_kernel(s_ptr, w_ptr, b_ptr, y_ptr, g_ptr, work_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr,
                             lse_ptr, chunks, ce_scale, p_scale, eps, image_scale, K, w_c, w_k, S, C, s_n, s_c, s_s,
                             per_program, CE_ON_SIGMOID: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # projected_loss_forward_kernel for K wider than a block: one block of BLOCK_S pixels per program (per_program =
    # BLOCK_S), its logits made BLOCK_K atoms at a time; the CE's log-sum-exp over all K kept online (running max and
    # sum) and stored per pixel in lse_ptr [N·S] for backward; Σ p stored a block of atoms at a time
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    N, start = tl.num_programs(0).to(tl.int64), chunk * BLOCK_S
    bias = tl.load(b_ptr).to(tl.float32)
    p_ptr = work_ptr + N * chunks + (n * chunks + chunk) * K
    rows = start + tl.arange(0, BLOCK_S)
    y = pixel_labels(y_ptr, n, S, rows)  # for every block of atoms
    top = tl.full([BLOCK_S], -float("inf"), dtype=tl.float32)
    total, x_y = tl.zeros([BLOCK_S], dtype=tl.float32), tl.zeros([BLOCK_S], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        _, cols, logit = project_block(s_ptr, w_ptr + k * w_k, n, start, S, C, K - k, s_n, s_c, s_s, w_c, w_k,
                                       PRECISION, BLOCK_S, BLOCK_C, BLOCK_K)
        p, x = sigmoid_terms(logit + bias, cols, K - k, CE_ON_SIGMOID)
        top_now = tl.maximum(top, tl.max(x, axis=1))
        shift = tl.where(top_now == -float("inf"), 0.0, top_now)  # a block of -inf x so far: no -inf - -inf
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        top = top_now
        x_y += tl.sum(tl.where(k + cols[None, :] == y[:, None], x, 0.0), axis=1)
        ok = (rows < S)[:, None] & (cols < K - k)[None, :]
        tl.store(p_ptr + k + cols, tl.sum(tl.where(ok, p, 0.0), axis=0) * p_scale, mask=cols < K - k)
    lse = top + tl.log(total)
    tl.store(lse_ptr + n * S + rows, lse, mask=rows < S)
    tl.store(work_ptr + n * chunks + chunk, tl.sum(tl.where(rows < S, lse - x_y, 0.0), axis=0) * ce_scale)
    finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunks, K, eps, image_scale, BLOCK_K)


@triton.jit
def loss_backward_kernel(l_ptr, y_ptr, g_ce_ptr, g_img_ptr, d_img_ptr, out_ptr, o_n, o_k, o_s, ce_scale, p_scale,
                         S, K, s_n, s_k, s_s, per_program, CE_ON_SIGMOID: tl.constexpr, PIXEL_TERM: tl.constexpr,
                         IMAGE_TERM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # dL/dl (logits_gradient), recomputed from l; g_ce and g_img are the gradients of the two terms (device scalars:
    # no host sync), d_img [N, K] dBCE/dḡ
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    cols = tl.arange(0, BLOCK_K)
    g_ce = tl.load(g_ce_ptr).to(tl.float32) * ce_scale
    g_p = tl.load(d_img_ptr + n * K + cols, mask=cols < K, other=0.0) * (tl.load(g_img_ptr).to(tl.float32) * p_scale)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, ok, logit = load_block(l_ptr, n, start, S, K, s_n, s_k, s_s, BLOCK_S, BLOCK_K)
        p, x, y = head_terms(logit, rows, cols, y_ptr, n, S, K, CE_ON_SIGMOID)
        grad = logits_gradient(p, x, y, cols, log_sum_exp(x), g_ce, g_p, CE_ON_SIGMOID, PIXEL_TERM, IMAGE_TERM)
        tl.store(out_ptr + n * o_n + rows[:, None] * o_s + cols[None, :] * o_k,
                 grad.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def projected_loss_backward_kernel(s_ptr, w_ptr, b_ptr, y_ptr, g_ce_ptr, g_img_ptr, d_img_ptr, ds_ptr, x_ptr, dl_ptr,
                                   db_ptr, grad_b_ptr, count_ptr, o_n, o_c, o_s, chunks, ce_scale, p_scale, K, w_c,
                                   w_k, S, C, s_n, s_c, s_s, per_program, CE_ON_SIGMOID: tl.constexpr,
                                   PIXEL_TERM: tl.constexpr, IMAGE_TERM: tl.constexpr, PRECISION: tl.constexpr,
                                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # loss_backward_kernel through the head l = Pᵀs + c, recomputed here: dL/ds = P dL/dl written in the layout of
    # ds (o_n, o_c, o_s), and pixel-major a copy of s into x [N·S, C] and dL/dl into dl [N·S, K], so that one matmul
    # gives dL/dP = Σ s dL/dlᵀ; Σ dL/dl (dL/dc) into grad_b_ptr in its dtype, through db_ptr [N, chunks]
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    bias = tl.load(b_ptr).to(tl.float32)
    cols = tl.arange(0, BLOCK_K)
    g_ce = tl.load(g_ce_ptr).to(tl.float32) * ce_scale
    g_p = tl.load(d_img_ptr + n * K + cols, mask=cols < K, other=0.0) * (tl.load(g_img_ptr).to(tl.float32) * p_scale)
    db = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, logit = project_block(s_ptr, w_ptr, n, start, S, C, K, s_n, s_c, s_s, w_c, w_k, PRECISION,
                                          BLOCK_S, BLOCK_C, BLOCK_K)
        p, x, y = head_terms(logit + bias, rows, cols, y_ptr, n, S, K, CE_ON_SIGMOID)
        grad = logits_gradient(p, x, y, cols, log_sum_exp(x), g_ce, g_p, CE_ON_SIGMOID, PIXEL_TERM, IMAGE_TERM)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        grad = tl.where(ok, grad, 0.0)
        at = (n * S + rows)[:, None]  # pixel-major row of each pixel
        tl.store(dl_ptr + at * K + cols[None, :], grad.to(dl_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(grad, axis=0)
        for c in range(0, C, BLOCK_C):
            _, chans, s_ok, s = load_block(s_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
            _, w = weight_block(w_ptr, c, C, K, w_c, w_k, BLOCK_C, BLOCK_K)
            d_s = tl.dot(grad, tl.trans(w), input_precision=PRECISION)
            tl.store(ds_ptr + n * o_n + rows[:, None] * o_s + (c + chans[None, :]) * o_c,
                     d_s.to(ds_ptr.dtype.element_ty), mask=s_ok)
            tl.store(x_ptr + at * C + c + chans[None, :], s.to(x_ptr.dtype.element_ty), mask=s_ok)
    finish_sum(db_ptr, grad_b_ptr, count_ptr, n * chunks + chunk, tl.sum(db, axis=0))


@triton.jit
def wide_loss_backward_kernel(s_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ce_ptr, g_img_ptr, d_img_ptr, ds_ptr, x_ptr,
                              dl_ptr, db_ptr, grad_b_ptr, count_ptr, o_n, o_c, o_s, chunks, ce_scale, p_scale, K, w_c,
                              w_k, S, C, s_n, s_c, s_s, per_program, CE_ON_SIGMOID: tl.constexpr,
                              PIXEL_TERM: tl.constexpr, IMAGE_TERM: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # projected_loss_backward_kernel for K wider than a block, one block of pixels per program: dL/dl a block of
    # atoms at a time from the forward's log-sum-exp (lse_ptr), written to dl and summed for dL/dc; then, a block of
    # channels at a time, dL/ds = P dL/dl from the dL/dl this program wrote (read back in dl's dtype, as torch's
    # projection would give it to a convolution's backward) and the copy of s
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    start = chunk * BLOCK_S
    rows = start + tl.arange(0, BLOCK_S)
    at = (n * S + rows)[:, None]  # pixel-major row of each pixel
    bias = tl.load(b_ptr).to(tl.float32)
    g_ce, g_img = tl.load(g_ce_ptr).to(tl.float32) * ce_scale, tl.load(g_img_ptr).to(tl.float32) * p_scale
    lse = tl.load(lse_ptr + n * S + rows, mask=rows < S, other=0.0)
    y = pixel_labels(y_ptr, n, S, rows)  # for every block of atoms
    db = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        _, cols, logit = project_block(s_ptr, w_ptr + k * w_k, n, start, S, C, K - k, s_n, s_c, s_s, w_c, w_k,
                                       PRECISION, BLOCK_S, BLOCK_C, BLOCK_K)
        p, x = sigmoid_terms(logit + bias, cols, K - k, CE_ON_SIGMOID)
        g_p = tl.load(d_img_ptr + n * K + k + cols, mask=cols < K - k, other=0.0) * g_img
        grad = logits_gradient(p, x, y, k + cols, lse, g_ce, g_p, CE_ON_SIGMOID, PIXEL_TERM, IMAGE_TERM)
        ok = (rows < S)[:, None] & (cols < K - k)[None, :]
        grad = tl.where(ok, grad, 0.0)
        tl.store(dl_ptr + at * K + k + cols[None, :], grad.to(dl_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(grad, axis=0)
    tl.debug_barrier()  # the dL/dl stored above, by any thread of this program, is read back below
    for c in range(0, C, BLOCK_C):
        _, chans, s_ok, s = load_block(s_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
        d_s = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            cols = tl.arange(0, BLOCK_K)
            ok = (rows < S)[:, None] & (cols < K - k)[None, :]
            grad = tl.load(dl_ptr + at * K + k + cols[None, :], mask=ok, other=0.0, cache_modifier=".cg")
            _, w = weight_block(w_ptr + k * w_k, c, C, K - k, w_c, w_k, BLOCK_C, BLOCK_K)
            d_s = tl.dot(grad.to(tl.float32), tl.trans(w), d_s, input_precision=PRECISION)
        tl.store(ds_ptr + n * o_n + rows[:, None] * o_s + (c + chans[None, :]) * o_c,
                 d_s.to(ds_ptr.dtype.element_ty), mask=s_ok)
        tl.store(x_ptr + at * C + c + chans[None, :], s.to(x_ptr.dtype.element_ty), mask=s_ok)
    finish_sum(db_ptr, grad_b_ptr, count_ptr, n * chunks + chunk, tl.sum(db, axis=0))
