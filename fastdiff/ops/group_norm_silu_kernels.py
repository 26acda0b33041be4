"""The Triton kernels of the fused GroupNorm + SiLU (`fastdiff.ops.group_norm_silu` plans and launches them).

A program sees its (sample, group) as a [Cg, HW] matrix with strides (s_c, s_hw), so one kernel serves NCHW and
channels_last. `_group_norm_silu_{fwd,bwd}_kernel` run one tile per program in one of three MODEs: the whole group
(FUSED), or one chunk of a group split along HW, its statistics (STATS) and then the normalisation with every
chunk's statistics merged (SPLIT). `_group_norm_silu_{fwd,bwd}_loop_kernel` are the "looped" path: one program per
group, its chunks twice.
"""

from fastdiff.ops._triton import tl, triton

STATS, FUSED, SPLIT = 0, 1, 2  # the MODE of a launch: chunk statistics only, one-pass, normalise with chunk stats


@triton.jit
def _tile_moments(x, mask, count):
    """(mean, m2) of the masked tile x (count elements): the mean, then the sum of squared deviations from it with
    the first mean's rounding error corrected."""
    mean0 = tl.sum(x) / count
    d = tl.where(mask, x - mean0, 0.0)
    sd = tl.sum(d)
    return mean0 + sd / count, tl.sum(d * d) - sd * sd / count


@triton.jit
def _load_affine(w_ptr, b_ptr, g, c, cmask, Cg: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The group's [BLOCK_C, 1] weight and bias as float32 (1 and 0 where absent)."""
    if HAS_W:
        w = tl.load(w_ptr + g * Cg + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + g * Cg + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.full(c.shape, 0.0, tl.float32)
    return w, b


@triton.jit
def _normalise_silu(x, mean, rstd, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    h = (x - mean) * rstd
    if HAS_W:
        h = h * w
    if HAS_B:
        h = h + b
    return h * tl.sigmoid(h)  # silu


@triton.jit
def _program_tile(G, HW, num_chunks, sxn, sxc, sxhw, Cg: tl.constexpr, MODE: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_HW: tl.constexpr):
    """A tile kernel's program: (group index n*G + g, chunk, g, [BLOCK_C, 1] channels, their mask, the tile's mask,
    its offsets). A SPLIT launch takes its programs in reverse: the chunks the statistics pass read last may still
    be in L2 (group_norm_silu._plan)."""
    pid = tl.program_id(0)
    if MODE == 2:
        pid = tl.num_programs(0) - 1 - pid
    ng = pid // num_chunks
    chunk = pid % num_chunks
    n = ng // G
    g = ng % G
    c = tl.arange(0, BLOCK_C)[:, None]
    hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    cmask = c < Cg
    return ng, chunk, g, c, cmask, cmask & (hw < HW), n.to(tl.int64) * sxn + (g * Cg + c) * sxc + hw * sxhw


@triton.jit
def _looped_group(G, sxn, sxc, Cg: tl.constexpr, BLOCK_C: tl.constexpr):
    """A looped program's group: (index n*G + g, g, [BLOCK_C, 1] channels, their mask, their offsets)."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    c = tl.arange(0, BLOCK_C)[:, None]
    return ng, g, c, c < Cg, n.to(tl.int64) * sxn + (g * Cg + c) * sxc


@triton.jit
def _load_chunk(ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW: tl.constexpr):
    """(offsets, mask, values as float32) of a looped program's chunk `chunk` of its group (base: the group's
    [BLOCK_C, 1] channel offsets)."""
    hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    mask = cmask & (hw < HW)
    offs = base + hw * sxhw
    return offs, mask, tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B: tl.constexpr):
    """(xhat, dh, dxhat) of a tile (see _group_norm_silu_bwd_kernel), zero outside the mask."""
    xhat = (x - mean) * rstd
    h = xhat * w
    if HAS_B:
        h = h + b
    s = tl.sigmoid(h)
    dh = tl.where(mask, dy * s * (1.0 + h * (1.0 - s)), 0.0)
    return xhat, dh, dh * w


@triton.jit
def _group_norm_silu_fwd_kernel(
    x_ptr,  # [N, C, H, W], group (n, g) element (c, hw) at n*sxn + (g*Cg + c)*sxc + hw*sxhw
    y_ptr,  # output, same strides as x
    w_ptr, b_ptr,  # [C] weight and bias (read when HAS_W / HAS_B)
    mean_ptr, rstd_ptr,  # [N*G] float32, written by chunk 0 of each group (saved for the backward)
    part_ptr,  # [N*G, num_chunks, 2] float32 chunk (mean, m2): written in STATS mode, read in SPLIT mode
    HW, G, num_chunks,
    eps,
    sxn, sxc, sxhw,  # strides of x and y
    Cg: tl.constexpr,  # channels per group; constexpr so that the channel mask folds away (vector loads)
    MODE: tl.constexpr,  # STATS=0, FUSED=1, SPLIT=2
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= Cg (the whole group's channels)
    BLOCK_HW: tl.constexpr,  # spatial positions per program (all of HW when FUSED)
    BLOCK_CHUNKS: tl.constexpr,  # >= num_chunks
):
    # program_id -> (group n*G + g, chunk). Bytes: FUSED reads x once and writes y once; STATS reads x once.
    ng, chunk, g, c, cmask, mask, offs = _program_tile(G, HW, num_chunks, sxn, sxc, sxhw, Cg, MODE, BLOCK_C,
                                                       BLOCK_HW)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if MODE == 2:  # merge the chunks' (mean, m2): Chan, Golub & LeVeque (1983)
        k = tl.arange(0, BLOCK_CHUNKS)
        kmask = k < num_chunks
        mean_k = tl.load(part_ptr + (ng * num_chunks + k) * 2, mask=kmask, other=0.0)
        m2_k = tl.load(part_ptr + (ng * num_chunks + k) * 2 + 1, mask=kmask, other=0.0)
        count_k = tl.where(kmask, Cg * tl.minimum(BLOCK_HW, HW - k * BLOCK_HW), 0).to(tl.float32)
        total = Cg * HW * 1.0
        mean = tl.sum(count_k * mean_k, 0) / total
        dev = mean_k - mean
        var = (tl.sum(m2_k, 0) + tl.sum(count_k * dev * dev, 0)) / total
    else:  # two passes over the tile in registers
        count = Cg * tl.minimum(BLOCK_HW, HW - chunk * BLOCK_HW) * 1.0
        mean, m2 = _tile_moments(x, mask, count)
        var = m2 / count

    if MODE == 0:
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2, mean)
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2 + 1, m2)
    else:
        rstd = 1.0 / tl.sqrt_rn(tl.maximum(var, 0.0) + eps)
        tl.store(mean_ptr + ng, mean, mask=chunk == 0)
        tl.store(rstd_ptr + ng, rstd, mask=chunk == 0)
        w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
        tl.store(y_ptr + offs, _normalise_silu(x, mean, rstd, w, b, HAS_W, HAS_B), mask=mask)


@triton.jit
def _group_norm_silu_fwd_loop_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,  # as in _group_norm_silu_fwd_kernel
    HW, G,
    eps,
    sxn, sxc, sxhw,
    Cg: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # spatial positions per iteration
    NUM_CHUNKS: tl.constexpr,  # iterations: a constant trip count (and numpy 2.5's interpreter loops need one)
):
    # The "looped" path: program_id -> group; its chunks twice, statistics then normalise. Bytes: x is read twice
    # by the program, the second time just after the first, so L2 may serve it. The statistics are per-position
    # sums of x - K and (x - K)^2, reduced once after the loop (no block-wide reduction, so no barrier, per
    # chunk); K, the first chunk's mean, keeps a large mean from costing precision. Chunk 0 is always full: a
    # group is split into chunks only when it is larger than one (`_plan`).
    ng, g, c, cmask, base = _looped_group(G, sxn, sxc, Cg, BLOCK_C)
    offs, mask, x = _load_chunk(x_ptr, base, 0, cmask, HW, sxhw, BLOCK_HW)  # chunk 0 (full: the group is split)
    shift = tl.sum(x) / (Cg * BLOCK_HW * 1.0)
    s1 = tl.where(mask, x - shift, 0.0)
    s2 = s1 * s1
    for chunk in range(1, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        d = tl.where(mask, x - shift, 0.0)
        s1 += d
        s2 += d * d
    count = Cg * HW * 1.0
    sum1 = tl.sum(s1)
    mean = shift + sum1 / count
    m2 = tl.sum(s2) - sum1 * sum1 / count
    rstd = 1.0 / tl.sqrt_rn(tl.maximum(m2 / count, 0.0) + eps)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, rstd)
    w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
    for chunk in range(0, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        tl.store(y_ptr + offs, _normalise_silu(x, mean, rstd, w, b, HAS_W, HAS_B), mask=mask)


@triton.jit
def _group_norm_silu_bwd_kernel(
    dy_ptr,  # gradient of the output, same strides as x
    x_ptr,  # the forward input
    dx_ptr,  # gradient of x (written unless STATS), same strides as x
    w_ptr, b_ptr,  # [C] weight and bias (read when HAS_W / HAS_B)
    mean_ptr, rstd_ptr,  # [N*G] float32 from the forward
    part_ptr,  # [N*G, num_chunks, 2] float32 chunk sums of (dxhat, dxhat*xhat): written in STATS, read in SPLIT
    dwdb_ptr,  # [2, N*G, num_chunks, Cg] float32 partial dweight, dbias (written in STATS and FUSED)
    HW, G, num_chunks, NG,
    sxn, sxc, sxhw,  # strides of x, dy and dx
    Cg: tl.constexpr,  # channels per group
    MODE: tl.constexpr,  # STATS=0, FUSED=1, SPLIT=2
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    # program_id -> (group, chunk). Bytes: FUSED reads x and dy once and writes dx once.
    # With xhat = (x - mean) * rstd, h = w*xhat + b, y = silu(h):
    #   dh = dy * s * (1 + h * (1 - s)), s = sigmoid(h);  dw = sum(dh * xhat), db = sum(dh);  dxhat = dh * w
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (means over the group)
    ng, chunk, g, c, cmask, mask, offs = _program_tile(G, HW, num_chunks, sxn, sxc, sxhw, Cg, MODE, BLOCK_C,
                                                       BLOCK_HW)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)

    w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
    xhat, dh, dxhat = _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B)

    if MODE != 2:  # per-channel partial dweight, dbias of this chunk
        cvec = tl.arange(0, BLOCK_C)
        dst = dwdb_ptr + (ng * num_chunks + chunk) * Cg + cvec
        tl.store(dst, tl.sum(dh * xhat, 1), mask=cvec < Cg)
        tl.store(dst + NG * num_chunks * Cg, tl.sum(dh, 1), mask=cvec < Cg)
    if MODE == 0:
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2, tl.sum(dxhat))
        tl.store(part_ptr + (ng * num_chunks + chunk) * 2 + 1, tl.sum(dxhat * xhat))
    else:
        if MODE == 2:
            k = tl.arange(0, BLOCK_CHUNKS)
            kmask = k < num_chunks
            sum_dxhat = tl.sum(tl.load(part_ptr + (ng * num_chunks + k) * 2, mask=kmask, other=0.0), 0)
            sum_dxhat_xhat = tl.sum(tl.load(part_ptr + (ng * num_chunks + k) * 2 + 1, mask=kmask, other=0.0), 0)
        else:
            sum_dxhat = tl.sum(dxhat)
            sum_dxhat_xhat = tl.sum(dxhat * xhat)
        total = Cg * HW * 1.0
        dx = rstd * (dxhat - sum_dxhat / total - xhat * (sum_dxhat_xhat / total))
        tl.store(dx_ptr + offs, dx, mask=mask)


@triton.jit
def _group_norm_silu_bwd_loop_kernel(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,  # as in _group_norm_silu_bwd_kernel
    dwdb_ptr,  # [2, N*G, 1, Cg] float32 partial dweight, dbias of each group
    HW, G, NG,
    sxn, sxc, sxhw,
    Cg: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # as in the forward
):
    # The "looped" backward: program_id -> group; its chunks twice, the sums (and dweight, dbias) then dx. The
    # sums are per-position accumulators reduced once after the loop: dweight and dbias of each channel, then
    # sum(dxhat) = sum_c w_c dbias_c and sum(dxhat * xhat) = sum_c w_c dweight_c.
    ng, g, c, cmask, base = _looped_group(G, sxn, sxc, Cg, BLOCK_C)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    w, b = _load_affine(w_ptr, b_ptr, g, c, cmask, Cg, HAS_W, HAS_B)
    acc_dw = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    acc_db = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for chunk in range(0, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dh, _ = _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B)
        acc_dw += dh * xhat
        acc_db += dh
    cvec = tl.arange(0, BLOCK_C)
    tl.store(dwdb_ptr + ng * Cg + cvec, tl.sum(acc_dw, 1), mask=cvec < Cg)
    tl.store(dwdb_ptr + (NG + ng) * Cg + cvec, tl.sum(acc_db, 1), mask=cvec < Cg)
    sum_dxhat = tl.sum(acc_db * w)
    sum_dxhat_xhat = tl.sum(acc_dw * w)
    total = Cg * HW * 1.0
    for chunk in range(0, NUM_CHUNKS):
        offs, mask, x = _load_chunk(x_ptr, base, chunk, cmask, HW, sxhw, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dh, dxhat = _backward_tile(x, dy, mask, mean, rstd, w, b, HAS_B)
        dx = rstd * (dxhat - sum_dxhat / total - xhat * (sum_dxhat_xhat / total))
        tl.store(dx_ptr + offs, dx, mask=mask)
