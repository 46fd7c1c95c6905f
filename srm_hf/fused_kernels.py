"""The Triton kernels behind `srm_hf.fused` (which launches them and documents the maths): per pixel, its K values
held in registers as one row of a [BLOCK_S pixels, BLOCK_K atoms] block, atoms padded to a power of two.

Every kernel over pixels runs one program per (image n, chunk of `per_program` pixels) and reads its input through
the strides of an image (s_n), an atom (s_k) and a pixel (s_s); outputs with a layout of their own take (o_n, o_k, o_s).
Sums over an image or the batch end in the same launch: each program stores its part, and the last to arrive at a
counter (`arrive`) adds the parts up in a fixed order.
"""

import triton
import triton.language as tl


@triton.jit
def sparse_codes(a, ok, num_active, BLOCK_K: tl.constexpr):
    # a [BLOCK_S, BLOCK_K] float32 -> λ = sigmoid(a) where an atom is among the k largest a of its pixel, else 0:
    # exactly k, the lowest atom indices first among equal values (`top_k_mask`); NaN wherever a pixel has one
    cols = tl.arange(0, BLOCK_K)[None, :]
    free, kept = ok, ok & (cols < 0)  # atoms still to choose from; atoms kept
    for _ in range(num_active):
        top = tl.max(tl.where(free, a, -float("inf")), axis=1)[:, None]
        first = tl.min(tl.where(free & (a == top), cols, BLOCK_K), axis=1)[:, None]
        kept, free = kept | (cols == first), free & (cols != first)
    nan = tl.max(tl.where(ok & (a != a), 1, 0), axis=1)[:, None] > 0  # tl.max skips NaN: keep it visible
    return tl.where(nan, float("nan"), tl.where(kept, tl.sigmoid(a), 0.0))


@triton.jit
def arrive(count_ptr, expected):
    # whether this program is the last of `expected` to arrive at the int32 counter count_ptr (0 before the launch;
    # the last puts it back to 0 for the next launch on the stream). Whatever any program stored before arriving is
    # visible to the last one: a barrier, then one acq_rel atomic at GPU scope (a grid sync's pattern); the last
    # program reads it with .cg loads (from L2)
    tl.debug_barrier()
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == expected - 1
    tl.store(count_ptr, 0, mask=last)
    return last


@triton.jit
def sum_values(ptr, count, BLOCK: tl.constexpr = 128):
    # Σ ptr[0 .. count) in float32, in a fixed order: values other programs of the launch wrote
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        total += tl.load(ptr + i, mask=i < count, other=0.0, cache_modifier=".cg")
    return tl.sum(total, axis=0)


@triton.jit
def sum_rows(ptr, rows, K, BLOCK_K: tl.constexpr):
    # Σ over rows r < `rows` of ptr[r, :K] ([rows, K] dense) in float32, row after row: [BLOCK_K], 0 beyond K
    cols = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r in range(rows):
        total += tl.load(ptr + r * K + cols, mask=cols < K, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def finish_sum(part_ptr, out_ptr, count_ptr, program, value):
    # a program's `value` into part_ptr[program] (programs numbered row-major over the grid); the last of the launch
    # writes the sum of all of them into out_ptr[0], in out_ptr's dtype
    tl.store(part_ptr + program, value)
    programs = tl.num_programs(0) * tl.num_programs(1)
    if arrive(count_ptr, programs):
        tl.store(out_ptr, sum_values(part_ptr, programs).to(out_ptr.dtype.element_ty))


@triton.jit
def finish_image_labels(part_ptr, g_ptr, count_ptr, n, chunk, chunks, K, total, BLOCK_K: tl.constexpr):
    # a targets program's part of image n's label (`total`, scaled) into part_ptr [N, chunks, K]; the image's last
    # program sums its parts into g_ptr [N, K] (the image label)
    cols = tl.arange(0, BLOCK_K)
    tl.store(part_ptr + (n * chunks + chunk) * K + cols, total, mask=cols < K)
    if arrive(count_ptr + n, chunks):
        tl.store(g_ptr + n * K + cols, sum_rows(part_ptr + n * chunks * K, chunks, K, BLOCK_K), mask=cols < K)


@triton.jit
def load_block(ptr, n, start, S, K, s_n, s_k, s_s, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_S pixels from `start` of image n, in float32: (pixel indices, atom indices, mask, values; 0 outside)
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    ok = (rows < S)[:, None] & (cols < K)[None, :]
    values = tl.load(ptr + n * s_n + rows[:, None] * s_s + cols[None, :] * s_k, mask=ok, other=0.0)
    return rows, cols, ok, values.to(tl.float32)


@triton.jit
def label_pixels(a, rows, cols, ok, label_ptr, n, S, num_active, BLOCK_K: tl.constexpr):
    # a block's codes λ from its projection a [BLOCK_S, BLOCK_K]: stores each pixel's first argmax (its label) and
    # returns the sum of λ over the block's pixels [BLOCK_K]
    codes = sparse_codes(a, ok, num_active, BLOCK_K)
    best = tl.max(tl.where(ok, codes, -1.0), axis=1)
    label = tl.min(tl.where(ok & (codes == best[:, None]), cols[None, :], BLOCK_K), axis=1)
    label = tl.where(label < BLOCK_K, label, 0)  # a pixel of NaN codes: NaN image labels say so, not the label
    tl.store(label_ptr + n * S + rows, label.to(tl.int64), mask=rows < S)
    return tl.sum(tl.where(ok, codes, 0.0), axis=0)


@triton.jit
def targets_kernel(a_ptr, label_ptr, g_ptr, part_ptr, count_ptr, num_active, chunks, scale, S, K, s_n, s_k, s_s,
                   per_program, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: per_program pixels of image n; per pixel the codes λ and their first argmax (the pixel label),
    # and scale × the sum of λ over the program's pixels (its part of the image label g, scale = 1/S)
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, ok, a = load_block(a_ptr, n, start, S, K, s_n, s_k, s_s, BLOCK_S, BLOCK_K)
        total += label_pixels(a, rows, cols, ok, label_ptr, n, S, num_active, BLOCK_K)
    finish_image_labels(part_ptr, g_ptr, count_ptr, n, chunk, chunks, K, total * scale, BLOCK_K)


@triton.jit
def project_block(t_ptr, d_ptr, n, start, S, C, K, s_n, s_c, s_s, d_c, d_k, PRECISION: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # Dᵀt for BLOCK_S pixels from `start` of image n: t read in its own dtype, BLOCK_C channels at a time, D [C, K]
    # through its strides, sums in float32 (tl.dot, PRECISION as torch's convolution / matmul would use); returns
    # (pixel indices, atom indices, Dᵀt [BLOCK_S, BLOCK_K], 0 beyond K and S)
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    a = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    for c in range(0, C, BLOCK_C):
        _, chans, _, t = load_block(t_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
        d_ok = (chans < C - c)[:, None] & (cols < K)[None, :]
        d = tl.load(d_ptr + (c + chans[:, None]) * d_c + cols[None, :] * d_k, mask=d_ok, other=0.0)
        a = tl.dot(t, d.to(tl.float32), a, input_precision=PRECISION)
    return rows, cols, a


@triton.jit
def projected_targets_kernel(t_ptr, d_ptr, b_ptr, label_ptr, g_ptr, part_ptr, count_ptr, num_active, chunks, scale,
                             K, d_c, d_k, S, C, s_n, s_c, s_s, per_program, PRECISION: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # targets_kernel from the teacher's features t [C values per pixel], the coder's D [C, K] and scalar b: the
    # projection a = Dᵀt + b is made here (project_block), so the K-channel map a never reaches memory
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    bias = tl.load(b_ptr).to(tl.float32)  # a device scalar: no host sync
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(chunk * per_program, tl.minimum((chunk + 1) * per_program, S), BLOCK_S):
        rows, cols, a = project_block(t_ptr, d_ptr, n, start, S, C, K, s_n, s_c, s_s, d_c, d_k, PRECISION, BLOCK_S,
                                      BLOCK_C, BLOCK_K)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        total += label_pixels(a + bias, rows, cols, ok, label_ptr, n, S, num_active, BLOCK_K)
    finish_image_labels(part_ptr, g_ptr, count_ptr, n, chunk, chunks, K, total * scale, BLOCK_K)


@triton.jit
def head_terms(logit, rows, cols, y_ptr, n, S, K, CE_ON_SIGMOID: tl.constexpr):
    # a block of head logits l [BLOCK_S, BLOCK_K] of image n: (p = sigmoid(l), the CE input x = p or l with padded
    # atoms at -inf (padded pixels stay finite), the pixels' labels y)
    p = tl.sigmoid(logit)
    x = tl.where((cols < K)[None, :], p if CE_ON_SIGMOID else logit, -float("inf"))
    y = tl.load(y_ptr + n * S + rows, mask=rows < S, other=0)
    return p, x, y


@triton.jit
def loss_sums(p, x, y, rows, cols, S, K):
    # a block's CE(x, y) per pixel [BLOCK_S] (0 on padding) and its Σ p over pixels [BLOCK_K]
    top = tl.max(x, axis=1)
    lse = top + tl.log(tl.sum(tl.exp(x - top[:, None]), axis=1))
    x_y = tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
    ok = (rows < S)[:, None] & (cols < K)[None, :]
    return tl.where(rows < S, lse - x_y, 0.0), tl.sum(tl.where(ok, p, 0.0), axis=0)


@triton.jit
def logits_gradient(p, x, y, cols, g_ce, g_p, CE_ON_SIGMOID: tl.constexpr, PIXEL_TERM: tl.constexpr,
                    IMAGE_TERM: tl.constexpr):
    # dL/dl = g_ce·(softmax(x) - onehot(y))·dx/dl + g_p·p(1-p) for a block (g_p [BLOCK_K]: the image term's factor
    # per atom); a term of weight 0 is left out, as the eager loss leaves it out (0 × a NaN label would be NaN)
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    d_x = (e / tl.sum(e, axis=1)[:, None] - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)) * g_ce
    slope = p * (1.0 - p)
    grad = tl.zeros_like(p)
    if PIXEL_TERM:
        grad += d_x * slope if CE_ON_SIGMOID else d_x
    if IMAGE_TERM:
        grad += g_p[None, :] * slope
    return grad


@triton.jit
def finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunk, chunks, K, ce, p_sum, eps,
                image_scale, BLOCK_K: tl.constexpr):
    # a loss forward program's sums (CE: a scalar, p: [BLOCK_K]) into work [N·chunks CE | N·chunks·K p | N pixel
    # terms | N image terms]. The last program of image n sums its parts: pixel term n = Σ CE, and image term n =
    # image_scale × Σ_K g log ḡ + (1-g) log(1-ḡ), ḡ = Σ p clamped to [eps, 1 - eps], with d_ptr[n] = dBCE/dḡ up to
    # 1/(N·K): (ḡ - g) / (ḡ (1 - ḡ)), 0 where the clamp moved ḡ (a NaN too, as torch). The last image sums the N
    # pixel and N image terms into pixel_ptr and image_ptr (0-dim)
    N = tl.num_programs(0).to(tl.int64)
    ce_ptr, p_ptr, cols = work_ptr, work_ptr + N * chunks, tl.arange(0, BLOCK_K)
    terms_ptr = p_ptr + N * chunks * K
    tl.store(ce_ptr + n * chunks + chunk, ce)
    tl.store(p_ptr + (n * chunks + chunk) * K + cols, p_sum, mask=cols < K)
    if arrive(count_ptr + n, chunks):
        ok = cols < K
        pred = sum_rows(p_ptr + n * chunks * K, chunks, K, BLOCK_K)
        clamped = tl.where(pred < eps, eps, tl.where(pred > 1.0 - eps, 1.0 - eps, pred))  # NaN stays NaN
        target = tl.load(g_ptr + n * K + cols, mask=ok, other=0.0).to(tl.float32)
        bce = tl.where(ok, target * tl.log(clamped) + (1.0 - target) * tl.log(1.0 - clamped), 0.0)
        tl.store(d_ptr + n * K + cols, tl.where(pred == clamped, (clamped - target) / (clamped * (1.0 - clamped)),
                                                0.0), mask=ok)
        tl.store(terms_ptr + n, sum_values(ce_ptr + n * chunks, chunks))
        tl.store(terms_ptr + N + n, tl.sum(bce, axis=0) * image_scale)
        if arrive(count_ptr + N, N):
            tl.store(pixel_ptr, sum_values(terms_ptr, N))
            tl.store(image_ptr, sum_values(terms_ptr + N, N))


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
    finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunk, chunks, K,
                tl.sum(ce_total, axis=0) * ce_scale, p_total * p_scale, eps, image_scale, BLOCK_K)


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
    finish_loss(work_ptr, g_ptr, d_ptr, pixel_ptr, image_ptr, count_ptr, n, chunk, chunks, K,
                tl.sum(ce_total, axis=0) * ce_scale, p_total * p_scale, eps, image_scale, BLOCK_K)


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
        grad = logits_gradient(p, x, y, cols, g_ce, g_p, CE_ON_SIGMOID, PIXEL_TERM, IMAGE_TERM)
        tl.store(out_ptr + n * o_n + rows[:, None] * o_s + cols[None, :] * o_k,
                 grad.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def projected_loss_backward_kernel(s_ptr, w_ptr, b_ptr, y_ptr, g_ce_ptr, g_img_ptr, d_img_ptr, ds_ptr, x_ptr, dl_ptr,
                                   db_ptr, grad_b_ptr, count_ptr, o_n, o_c, o_s, chunks, ce_scale, p_scale, K, w_c,
                                   w_k, S, C, s_n, s_c, s_s, per_program, CE_ON_SIGMOID: tl.constexpr,
                                   PIXEL_TERM: tl.constexpr,
                                   IMAGE_TERM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                                   BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
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
        grad = logits_gradient(p, x, y, cols, g_ce, g_p, CE_ON_SIGMOID, PIXEL_TERM, IMAGE_TERM)
        ok = (rows < S)[:, None] & (cols < K)[None, :]
        grad = tl.where(ok, grad, 0.0)
        at = (n * S + rows)[:, None]  # pixel-major row of each pixel
        tl.store(dl_ptr + at * K + cols[None, :], grad.to(dl_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(grad, axis=0)
        for c in range(0, C, BLOCK_C):
            _, chans, s_ok, s = load_block(s_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
            w_ok = (chans < C - c)[:, None] & (cols < K)[None, :]
            w = tl.load(w_ptr + (c + chans[:, None]) * w_c + cols[None, :] * w_k, mask=w_ok, other=0.0)
            d_s = tl.dot(grad, tl.trans(w.to(tl.float32)), input_precision=PRECISION)
            tl.store(ds_ptr + n * o_n + rows[:, None] * o_s + (c + chans[None, :]) * o_c,
                     d_s.to(ds_ptr.dtype.element_ty), mask=s_ok)
            tl.store(x_ptr + at * C + c + chans[None, :], s.to(x_ptr.dtype.element_ty), mask=s_ok)
    finish_sum(db_ptr, grad_b_ptr, count_ptr, n * chunks + chunk, tl.sum(db, axis=0))
