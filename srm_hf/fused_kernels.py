"""The Triton kernels behind `srm_hf.fused` (which launches them and documents the maths) and the blocks the loss's
and stage 1's kernels share: per pixel, its K values held in registers as one row of a [BLOCK_S pixels, BLOCK_K
atoms] block, atoms padded to a power of two.

Every kernel over pixels runs one program per (image n, chunk of `per_program` pixels) and reads its input through
the strides of an image (s_n), an atom (s_k) and a pixel (s_s); outputs with a layout of their own take (o_n, o_k, o_s).
Sums over an image or the batch end in the same launch: each program stores its part, and the last to arrive at a
counter (`arrive`) adds the parts up in a fixed order.
"""

import triton
import triton.language as tl

NO_ATOM = tl.constexpr(2**30)  # the atom index of an unused slot of a pixel's running top k (`merge_top_k`)


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
def merge_top_k(top_a, top_i, a, atoms, free, num_active, BLOCK_S: tl.constexpr, KP: tl.constexpr):
    # the k largest values of each pixel among its top so far (top_a, top_i [BLOCK_S, KP]: values and atom indices
    # in the order chosen, unused slots at index NO_ATOM) and a block a [BLOCK_S, BLOCK_K] of atoms `atoms`
    # [BLOCK_K] (free: those to choose from), chosen as `sparse_codes` chooses over all K at once: the largest first,
    # the lowest index first among equal values. Blocks merged in any order give the same set (the order is total)
    slots = tl.arange(0, KP)[None, :]
    kept = top_i < NO_ATOM
    new_a, new_i = tl.full([BLOCK_S, KP], -float("inf"), tl.float32), tl.full([BLOCK_S, KP], NO_ATOM, tl.int32)
    for j in range(num_active):
        top = tl.maximum(tl.max(tl.where(kept, top_a, -float("inf")), axis=1),
                         tl.max(tl.where(free, a, -float("inf")), axis=1))[:, None]
        first = tl.minimum(tl.min(tl.where(kept & (top_a == top), top_i, NO_ATOM), axis=1),
                           tl.min(tl.where(free & (a == top), atoms[None, :], NO_ATOM), axis=1))[:, None]
        kept, free = kept & (top_i != first), free & (atoms[None, :] != first)
        new_a, new_i = tl.where(slots == j, top, new_a), tl.where(slots == j, first, new_i)
    return new_a, new_i


@triton.jit
def codes_from_top(top_codes, top_i, atoms, nan, num_active, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                   KP: tl.constexpr):
    # a block of codes λ [BLOCK_S, BLOCK_K] for the atoms `atoms` from each pixel's kept atoms (top_i [BLOCK_S, KP])
    # and their codes (top_codes, sigmoid of their a): 0 elsewhere, NaN over a pixel flagged in nan [BLOCK_S]
    slots = tl.arange(0, KP)[None, :]
    codes = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    for j in range(num_active):
        atom = tl.sum(tl.where(slots == j, top_i, 0), axis=1)[:, None]
        code = tl.sum(tl.where(slots == j, top_codes, 0.0), axis=1)[:, None]
        codes = tl.where(atoms[None, :] == atom, code, codes)
    return tl.where(nan[:, None], float("nan"), codes)


@triton.jit
def running_top_k(t_ptr, d_ptr, bias, n, start, S, C, K, s_n, s_c, s_s, d_c, d_k, num_active,
                  PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                  KP: tl.constexpr):
    # for BLOCK_S pixels from `start` of image n, a = Dᵀt + b made BLOCK_K atoms at a time (project_block) and each
    # pixel's top k kept across the blocks (merge_top_k): (top a [BLOCK_S, KP], their atoms, 1 where a pixel has a
    # NaN a [BLOCK_S])
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    top_a = tl.full([BLOCK_S, KP], -float("inf"), tl.float32)
    top_i = tl.full([BLOCK_S, KP], NO_ATOM, tl.int32)
    nan = tl.zeros([BLOCK_S], dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        _, _, a = project_block(t_ptr, d_ptr + k * d_k, n, start, S, C, K - k, s_n, s_c, s_s, d_c, d_k, PRECISION,
                                BLOCK_S, BLOCK_C, BLOCK_K)
        ok = (rows < S)[:, None] & (cols < K - k)[None, :]
        a += bias
        nan = tl.maximum(nan, tl.max(tl.where(ok & (a != a), 1, 0), axis=1))  # tl.max skips NaN: keep it visible
        top_a, top_i = merge_top_k(top_a, top_i, a, k + cols, ok, num_active, BLOCK_S, KP)
    return top_a, top_i, nan


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
def sum_rows(ptr, rows, width, stride, BLOCK_K: tl.constexpr):
    # Σ over rows r < `rows` of ptr[r·stride + j], j < width, in float32, row after row: [BLOCK_K], 0 beyond width
    cols = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r in range(rows):
        total += tl.load(ptr + r * stride + cols, mask=cols < width, other=0.0, cache_modifier=".cg")
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
        tl.store(g_ptr + n * K + cols, sum_rows(part_ptr + n * chunks * K, chunks, K, K, BLOCK_K), mask=cols < K)


@triton.jit
def load_block(ptr, n, start, S, K, s_n, s_k, s_s, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_S pixels from `start` of image n, in float32: (pixel indices, atom indices, mask, values; 0 outside)
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    ok = (rows < S)[:, None] & (cols < K)[None, :]
    values = tl.load(ptr + n * s_n + rows[:, None] * s_s + cols[None, :] * s_k, mask=ok, other=0.0)
    return rows, cols, ok, values.to(tl.float32)


@triton.jit
def weight_block(w_ptr, c, C, K, w_c, w_k, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # rows c .. c + BLOCK_C of a matrix [C, K] (a dictionary D, a head's P) through its strides, in float32: (their
    # indices, the block [BLOCK_C, BLOCK_K], 0 beyond C and K)
    chans, cols = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_K)
    ok = (chans < C - c)[:, None] & (cols < K)[None, :]
    block = tl.load(w_ptr + (c + chans[:, None]) * w_c + cols[None, :] * w_k, mask=ok, other=0.0)
    return c + chans, block.to(tl.float32)


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
        _, _, _, t = load_block(t_ptr + c * s_c, n, start, S, C - c, s_n, s_c, s_s, BLOCK_S, BLOCK_C)
        _, d = weight_block(d_ptr, c, C, K, d_c, d_k, BLOCK_C, BLOCK_K)
        a = tl.dot(t, d, a, input_precision=PRECISION)
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
def wide_targets_kernel(t_ptr, d_ptr, b_ptr, label_ptr, g_ptr, part_ptr, count_ptr, num_active, chunks, scale, K,
                        d_c, d_k, S, C, s_n, s_c, s_s, per_program, PRECISION: tl.constexpr, KP: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # projected_targets_kernel for K wider than a block, one block of BLOCK_S pixels per program: each pixel's top k
    # across the blocks of atoms (running_top_k); its label, the first maximal code as label_pixels takes it (every
    # code 0, when the kept sigmoids underflow: atom 0); its part of the image label a block of atoms at a time
    n, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets for large batches
    start = chunk * BLOCK_S
    rows, cols = start + tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_K)
    top_a, top_i, nan = running_top_k(t_ptr, d_ptr, tl.load(b_ptr).to(tl.float32), n, start, S, C, K, s_n, s_c, s_s,
                                      d_c, d_k, num_active, PRECISION, BLOCK_S, BLOCK_C, BLOCK_K, KP)
    top_codes, kept = tl.sigmoid(top_a), top_i < NO_ATOM
    best = tl.max(tl.where(kept, top_codes, -1.0), axis=1)
    label = tl.min(tl.where(kept & (top_codes == best[:, None]), top_i, NO_ATOM), axis=1)
    label = tl.where((nan > 0) | (best <= 0.0), 0, label)  # a pixel of NaN codes: its image label says so
    tl.store(label_ptr + n * S + rows, label.to(tl.int64), mask=rows < S)
    parts = part_ptr + (n * chunks + chunk) * K
    for k in range(0, K, BLOCK_K):
        ok = (rows < S)[:, None] & (cols < K - k)[None, :]
        codes = codes_from_top(top_codes, top_i, k + cols, nan > 0, num_active, BLOCK_S, BLOCK_K, KP)
        tl.store(parts + k + cols, tl.sum(tl.where(ok, codes, 0.0), axis=0) * scale, mask=cols < K - k)
    if arrive(count_ptr + n, chunks):  # the image's last program sums its parts into g, a block of atoms at a time
        for k in range(0, K, BLOCK_K):
            image = sum_rows(part_ptr + n * chunks * K + k, chunks, K - k, K, BLOCK_K)
            tl.store(g_ptr + n * K + k + cols, image, mask=cols < K - k)
