"""Cross-entropy over large vocabularies, with the logits gradient computed in the forward pass.

Two kernels, chosen by :data:`CONFIG` (benchmarks/sweep_kernels.py times both on a GPU):

- "row": one program per row walks the vocabulary in blocks twice: an online max / log-sum-exp pass for the loss,
  then a pass that writes the gradient (softmax - onehot, times the chain rule of scaling and soft-capping, times the
  row's share of the reduction), optionally into the logits buffer itself. With 32 warps one program is resident
  per SM, so the rows in flight fit in L2 (33 MiB at V = 128256), the second pass walks the blocks in reverse, and
  eviction hints keep a row in L2 until its gradient pass: DRAM sees about one read and one write of the logits at
  V = 128k, but at V = 256k the ~130 rows in flight (66 MiB) no longer fit L2 and part of the row is read twice.
- "split": a row is cut into chunks of ``chunk`` columns, one program a chunk, each chunk held in registers from
  its load to its gradient store: the programs of a row publish their partial (max, sum of exp) to a small buffer,
  wait for each other (programs take work in the order they start, so every wait is on a program already
  running or able to start), combine them into the row's log-sum-exp and write the gradient from registers. DRAM
  sees exactly one read and one write whatever V, and one exp per element instead of two. With ``block`` set, a
  chunk (e.g. half a 256k row) is streamed twice instead, as "row" streams a row: the rows' footprint in L2 is
  then the chunk's. Triton's interpreter runs programs one after another, where a program cannot wait for a later
  one: there (``sync="launches"``) the same kernel runs twice, publishing, then finishing.

No float32 copy of the logits is ever made; the backward pass only scales the stored gradient by grad_output and
skips that entirely (without a host sync) where grad_output is 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton
from swiftune_kernels.reference import cross_entropy as reference

REDUCTIONS = ("mean", "sum", "none")
KERNELS = ("row", "split")
# Default launch configuration (one line to switch to a sweep's winner): the kernel; for "split" the columns a
# program takes (None: 8192), "block" (None: the chunk is held in registers; a number: the chunk is streamed in
# blocks of that many columns, twice, as "row" streams a row) and its warps; "fused_mean": reduction "mean" computes
# its denominator (and zeroes the split kernel's counters) in one small launch and the mean in another, instead of
# ~6 small torch ops.
CONFIG = {"kernel": "row", "chunk": None, "block": None, "num_warps": None, "fused_mean": True}


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv / next_power_of_2 are constexpr functions that cost ~10 us a call on the host
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@triton.jit
def _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    if HAS_LOGIT_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(z) = 2 * sigmoid(2z) - 1: tl.math.tanh is missing in older Triton and in the interpreter.
        x = softcap * (2.0 * tl.sigmoid(2.0 * x * inv_softcap) - 1.0)
    return x


@triton.jit
def _cross_entropy_row(
    row,
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    stride_t,
    loss_ptr,
    weight_ptr,
    stride_w,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    x_row = x_ptr + row * stride_xm
    g_row = grad_ptr + row * stride_gm
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row * stride_t)
    if target == ignore_index:
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < n_cols)
        tl.store(loss_ptr + row, 0.0)
    else:
        inv_softcap = 1.0 / softcap
        # An out-of-range target makes the row's loss NaN instead of reading outside the row.
        target_ok = (target >= 0) & (target < n_cols)
        x_t = tl.load(x_row + target, mask=target_ok, other=0.0).to(tl.float32)
        c_t = _transform(x_t, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        c_t = tl.where(target_ok, c_t, float("nan"))
        target_col = tl.where(target_ok, target, -1).to(tl.int32)  # int32 compares against the block's columns

        m = float("-inf")
        d = 0.0
        # Register double buffering: the next block's load is in flight while this block's max and sum reductions
        # (which synchronize the program's warps) run, so one program per SM still keeps DRAM busy.
        # With COMPUTE_GRAD the row is read again by the gradient pass: ask L2 to keep it (evict_last), then to drop
        # it once re-read and written (evict_first), so that finished rows do not push out rows still in flight.
        x_next = tl.load(x_row + offs, mask=offs < n_cols, other=0.0, eviction_policy=KEEP)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            x = x_next.to(tl.float32)
            x_next = tl.load(x_row + BLOCK_V + cols, mask=BLOCK_V + cols < n_cols, other=0.0, eviction_policy=KEEP)
            c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            c = tl.where(mask, c, float("-inf"))
            m_new = tl.maximum(m, tl.max(c, 0))
            # Keeps exp(-inf - -inf) = NaN away when a whole block is -inf (masked vocabulary entries).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(c - m_safe), 0)
            m = m_new
        lse = m + tl.log(d)

        if COMPUTE_GRAD:
            w = tl.load(weight_ptr + row * stride_w).to(tl.float32)
            if HAS_LOGIT_SCALE:
                w = w * logit_scale
            num_blocks = tl.cdiv(n_cols, BLOCK_V)
            for i in range(0, num_blocks):
                cols = (num_blocks - 1 - i) * BLOCK_V + offs
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy=DROP).to(tl.float32)
                c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
                p = tl.exp(c - lse)
                g = tl.where(cols == target_col, p - 1.0, p)
                if HAS_SOFTCAP:
                    t = c * inv_softcap
                    g = g * (1.0 - t * t)
                tl.store(g_row + cols, g * w, mask=mask, eviction_policy=DROP)
        tl.store(loss_ptr + row, lse - c_t)


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    stride_t,
    loss_ptr,
    weight_ptr,
    stride_w,
    n_rows,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Persistent programs walk rows pid, pid + programs, ...: the launcher sizes the grid so that the rows in
    # flight (one a program) fit in L2 between the two passes over each row.
    # An int64 start makes the loop variable int64: row * stride cannot overflow for (N, V) past 2**31 elements.
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        _cross_entropy_row(
            row, x_ptr, stride_xm, grad_ptr, stride_gm, target_ptr, stride_t, loss_ptr,
            weight_ptr, stride_w, n_cols, ignore_index, logit_scale, softcap,
            HAS_LOGIT_SCALE, HAS_SOFTCAP, COMPUTE_GRAD, KEEP, DROP, BLOCK_V,
        )  # fmt: skip


@triton.jit
def _split_row_lse(partial_ptr, count_ptr, row, chunk, m, d, n_chunks, PUBLISH, FINISH, CHUNKS_P2: tl.constexpr):
    # Publish this chunk's (max, sum of exp) and, to finish, wait for the row's other chunks and combine them into
    # the row's log-sum-exp (NaN should the wait give up).
    partial = partial_ptr + row * (2 * CHUNKS_P2)
    if PUBLISH:
        tl.store(partial + chunk, m)
        tl.store(partial + CHUNKS_P2 + chunk, d)
        tl.debug_barrier()  # every thread's stores before the release that announces them
        tl.atomic_add(count_ptr + row, 1, sem="release")
    lse = m
    if FINISH:
        arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire")
        # Bounded (~0.1 s, where a real wait is microseconds): should a peer never arrive, the row's loss and
        # gradient become NaN instead of the GPU hanging.
        spins = arrived * 0  # an int32 scalar like arrived: a loop-carried value of one type
        while (arrived < n_chunks) & (spins < 1 << 17):
            arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire")
            spins += 1
        ks = tl.arange(0, CHUNKS_P2)
        ms = tl.load(partial + ks, mask=ks < n_chunks, other=float("-inf"), cache_modifier=".cg")
        ds = tl.load(partial + CHUNKS_P2 + ks, mask=ks < n_chunks, other=0.0, cache_modifier=".cg")
        top = tl.max(ms, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        lse = top + tl.log(tl.sum(ds * tl.exp(ms - top), 0))
        lse = tl.where(arrived < n_chunks, float("nan"), lse)
    return lse


@triton.jit
def _cross_entropy_split_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    stride_t,
    loss_ptr,
    weight_ptr,
    stride_w,
    partial_ptr,
    count_ptr,
    ticket_ptr,
    n_cols,
    n_chunks,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    PUBLISH: tl.constexpr,
    FINISH: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
):
    # Work goes by ticket (start order), not program id: the chunks a program waits for hold later tickets only if
    # they are of its own row, and all earlier rows' programs have started, so some row can always complete.
    ticket = tl.atomic_add(ticket_ptr, 1)
    row = (ticket // n_chunks).to(tl.int64)
    chunk = ticket % n_chunks
    start = chunk * CHUNK
    x_row = x_ptr + row * stride_xm
    g_row = grad_ptr + row * stride_gm
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row * stride_t)
    if target == ignore_index:
        if FINISH:
            if COMPUTE_GRAD:
                for block in range(start, tl.minimum(start + CHUNK, n_cols), BLOCK_V):
                    cols = block + offs
                    tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < n_cols)
            if chunk == 0:
                tl.store(loss_ptr + row, 0.0)
    else:
        inv_softcap = 1.0 / softcap
        target_ok = (target >= 0) & (target < n_cols)
        target_col = tl.where(target_ok, target, -1).to(tl.int32)  # int32 compares against the chunk's columns
        # The chunk holding the target writes the loss (an out-of-range target gives NaN, from chunk 0).
        owner = chunk == tl.where(target_ok, target_col // CHUNK, 0)
        if BLOCK_V == CHUNK:
            # The chunk stays in registers from its load to its gradient store: one read, one write, one exp each.
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            c = tl.where(mask, c, float("-inf"))
            m = tl.max(c, 0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf logits: exp gives 0, not NaN
            e = tl.exp(c - m_safe)
            # the target logit from registers, now (the gradient may overwrite it in the logits buffer later)
            c_t = 0.0
            if owner:
                c_t = tl.sum(tl.where(cols == target_col, c, 0.0), 0)
            lse = _split_row_lse(
                partial_ptr, count_ptr, row, chunk, m, tl.sum(e, 0), n_chunks, PUBLISH, FINISH, CHUNKS_P2
            )
            if FINISH and COMPUTE_GRAD:
                w = tl.load(weight_ptr + row * stride_w).to(tl.float32)
                if HAS_LOGIT_SCALE:
                    w = w * logit_scale
                p = e * tl.exp(m_safe - lse)  # softmax from the exp already taken
                g = tl.where(cols == target_col, p - 1.0, p)
                if HAS_SOFTCAP:
                    t = c * inv_softcap
                    g = g * (1.0 - t * t)
                tl.store(g_row + cols, g * w, mask=mask)
        else:
            # A chunk too large for registers is streamed twice, as the row kernel streams a row: an online max /
            # sum pass (L2 asked to keep the blocks), then the gradient pass in reverse (blocks read last first).
            # Its footprint in L2 is the chunk, not the row.
            end = tl.minimum(start + CHUNK, n_cols)
            c_t = 0.0
            if owner:  # read before this program publishes, so before any program writes the row's gradient
                x_t = tl.load(x_row + target_col, mask=target_ok, other=0.0).to(tl.float32)
                c_t = _transform(x_t, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            m = float("-inf")
            d = 0.0
            x_next = tl.load(x_row + start + offs, mask=start + offs < end, other=0.0, eviction_policy=KEEP)
            for block in range(start, end, BLOCK_V):
                cols = block + offs
                mask = cols < end
                x = x_next.to(tl.float32)
                x_next = tl.load(x_row + BLOCK_V + cols, mask=BLOCK_V + cols < end, other=0.0, eviction_policy=KEEP)
                c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
                c = tl.where(mask, c, float("-inf"))
                m_new = tl.maximum(m, tl.max(c, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(c - m_safe), 0)
                m = m_new
            lse = _split_row_lse(partial_ptr, count_ptr, row, chunk, m, d, n_chunks, PUBLISH, FINISH, CHUNKS_P2)
            if FINISH and COMPUTE_GRAD:
                w = tl.load(weight_ptr + row * stride_w).to(tl.float32)
                if HAS_LOGIT_SCALE:
                    w = w * logit_scale
                num_blocks = tl.cdiv(end - start, BLOCK_V)
                for i in range(0, num_blocks):
                    cols = start + (num_blocks - 1 - i) * BLOCK_V + offs
                    mask = cols < end
                    x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy=DROP).to(tl.float32)
                    c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
                    p = tl.exp(c - lse)
                    g = tl.where(cols == target_col, p - 1.0, p)
                    if HAS_SOFTCAP:
                        t = c * inv_softcap
                        g = g * (1.0 - t * t)
                    tl.store(g_row + cols, g * w, mask=mask, eviction_policy=DROP)
        if FINISH:
            if owner:
                tl.store(loss_ptr + row, tl.where(target_ok, lse - c_t, float("nan")))


@triton.jit
def _cross_entropy_mean_weight_kernel(
    target_ptr, stride_t, n_rows, ignore_index, weight_ptr, denominator_ptr, zero_ptr, n_zero, BLOCK: tl.constexpr
):
    # One program: the count of kept targets, its inverse (the row weight), and the split kernel's zeroed counters.
    offs = tl.arange(0, BLOCK)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        t = tl.load(target_ptr + rows.to(tl.int64) * stride_t, mask=rows < n_rows, other=ignore_index)
        kept += (t != ignore_index).to(tl.int32)
    for start in range(0, n_zero, BLOCK):
        tl.store(zero_ptr + start + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=start + offs < n_zero)
    denominator = tl.sum(kept, 0).to(tl.float32)
    tl.store(denominator_ptr, denominator)
    tl.store(weight_ptr, 1.0 / denominator)


@triton.jit
def _cross_entropy_mean_kernel(loss_ptr, n_rows, denominator_ptr, out_ptr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        total += tl.load(loss_ptr + rows, mask=rows < n_rows, other=0.0)
    tl.store(out_ptr, tl.sum(total, 0) / tl.load(denominator_ptr))


@triton.jit
def _cross_entropy_bwd_kernel(
    grad_ptr,
    stride_gm,
    grad_output_ptr,
    stride_gom,
    n_cols,
    programs_per_row,
    BLOCK_V: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // programs_per_row).to(tl.int64)
    # int64: a scalar grad_output scales a whole weight gradient as one row, which can pass 2**31 elements.
    col_start = (pid % programs_per_row).to(tl.int64) * (BLOCK_V * BLOCKS_PER_PROGRAM)
    scale = tl.load(grad_output_ptr + row * stride_gom).to(tl.float32)
    # loss.backward() gives grad_output == 1: skip the pass over the gradient instead of syncing to find out.
    if scale != 1.0:
        g_row = grad_ptr + row * stride_gm
        for span in range(col_start, n_cols, programs_per_row * (BLOCK_V * BLOCKS_PER_PROGRAM)):
            for i in range(0, BLOCKS_PER_PROGRAM):
                cols = span + i * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_row + cols, g * scale, mask=mask)


def cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    *,
    ignore_index: int = -100,
    logit_scale: float | None = None,
    softcap: float | None = None,
    grad: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    kernel: str | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    l2_hints: bool = True,
    programs: int | None = None,
    chunk: int | None = None,
    split_block: int | None = None,
    sync: str | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss (float32, 0 on ignored rows) of ``logits`` (N, V); writes d(sum_i weight_i * loss_i)/dlogits.

    ``weight`` holds 1 or N float32 row weights; ``grad`` (N, V), when given, receives the gradient and may be
    ``logits`` itself; ``loss`` (N,), when given, receives the loss. ``kernel`` ("row" or "split", default
    ``CONFIG["kernel"]``) picks the kernel; ``block_v``, ``l2_hints`` and ``programs`` tune "row", ``chunk``
    (columns a program), ``split_block`` (stream a chunk in blocks of this many columns; None: hold it in
    registers), ``sync`` ("kernel": programs wait for each other; "launches": two launches, the only
    way under the interpreter) and ``counters`` (N + 2 zeroed int32, else allocated) tune "split".
    """
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n_rows,)
    assert grad is None or (grad.shape == logits.shape and grad.stride(1) == 1)
    assert weight.numel() in (1, n_rows)
    if loss is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    kernel = kernel or CONFIG["kernel"]
    assert kernel in KERNELS, kernel
    scalars = (
        n_cols,
        ignore_index,
        1.0 if logit_scale is None else float(logit_scale),
        1.0 if softcap is None else float(softcap),
    )
    common = (
        logits,
        logits.stride(0),
        logits if grad is None else grad,
        logits.stride(0) if grad is None else grad.stride(0),
        targets,
        targets.stride(0),
        loss,
        weight,
        0 if weight.numel() == 1 else weight.stride(0),
    )
    flags = dict(
        HAS_LOGIT_SCALE=logit_scale is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None
    )
    if kernel == "split":
        options = dict(chunk=chunk, block=split_block, num_warps=num_warps, sync=sync, counters=counters)
        _launch_split(common, scalars, flags, n_rows, n_cols, options, logits.is_cuda)
        return loss
    if block_v is None:
        # 64 KiB of logits per block and 32 warps: 64 registers a thread (with the prefetched block), so one
        # program fills an SM's register file. One row per SM keeps ~130 rows in flight (33 MiB of bf16 at
        # V = 128k), which fits H100's 50 MiB L2: the gradient pass re-reads the row from L2, not DRAM.
        block_v = min(_next_power_of_2(n_cols), 65536 // logits.element_size())
    if num_warps is None:
        num_warps = max(4, min(32, block_v * logits.element_size() // 2048))
    if programs is None:
        # One row a program on the GPU: an H100 sweep of persistent grids of 66-132 programs (fewer rows in flight,
        # so more L2 hits in the gradient pass) was 6-70% slower, one program an SM cannot pull full bandwidth alone.
        # CPU (interpreter): two programs, so that tests walk the persistent row loop.
        programs = n_rows if logits.is_cuda else 2
    _cross_entropy_fwd_kernel[(max(1, min(programs, n_rows)),)](
        *common,
        n_rows,
        *scalars,
        **flags,
        KEEP="evict_last" if l2_hints and grad is not None else "",
        DROP="evict_first" if l2_hints else "",
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss


def split_chunk(n_cols: int, chunk: int | None = None) -> int:
    """Columns a program of the "split" kernel holds: ``chunk`` or ``CONFIG["chunk"]`` or 8192, at most the row."""
    chunk = chunk or CONFIG["chunk"] or 8192
    assert chunk & (chunk - 1) == 0, "chunk must be a power of 2"
    return min(chunk, _next_power_of_2(n_cols))


def _launch_split(common, scalars, flags, n_rows, n_cols, options, on_gpu):
    chunk = split_chunk(n_cols, options["chunk"])
    n_chunks = _cdiv(n_cols, chunk)
    # "block": stream a chunk in blocks of this many columns (two passes, as the row kernel); None: hold it whole
    block = min(options["block"] or CONFIG.get("block") or chunk, chunk)
    num_warps = options["num_warps"] or CONFIG["num_warps"]
    if num_warps is None:
        # held: 16 elements a thread (fp32 logits and their exp stay in registers), several programs an SM, so
        # one program's loads are in flight while another waits for its row or stores; streamed: as "row"
        num_warps = max(1, min(16, chunk // 512)) if block == chunk else max(4, min(32, block * 2 // 2048))
    sync = options["sync"] or ("kernel" if on_gpu else "launches")
    assert sync in ("kernel", "launches"), sync
    device = common[0].device
    counters = options["counters"]
    if counters is None:
        counters = torch.zeros(n_rows + 2, dtype=torch.int32, device=device)
    assert counters.numel() == n_rows + 2 and counters.dtype == torch.int32
    chunks_p2 = _next_power_of_2(n_chunks)
    partials = torch.empty(n_rows, 2, chunks_p2, dtype=torch.float32, device=device)
    grid = (n_rows * n_chunks,)
    hints = block < chunk and flags["COMPUTE_GRAD"]
    # counters[0] and [1]: the tickets of the (one or two) launches; counters[2:]: the chunks arrived per row
    phases = [(True, True)] if sync == "kernel" else [(True, False), (False, True)]
    for i, (publish, finish) in enumerate(phases):
        _cross_entropy_split_kernel[grid](
            *common,
            partials,
            counters[2:],
            counters[i:],
            n_cols,
            n_chunks,
            *scalars[1:],
            **flags,
            PUBLISH=publish,
            FINISH=finish,
            CHUNK=chunk,
            CHUNKS_P2=chunks_p2,
            BLOCK_V=block,
            KEEP="evict_last" if hints else "",
            DROP="evict_first" if hints else "",
            num_warps=num_warps,
        )


def mean_weight(
    targets: torch.Tensor, ignore_index: int, n_zero: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: (row weight (1,), mean denominator (), ``n_zero`` zeroed int32) for reduction "mean"."""
    out = torch.empty(2, dtype=torch.float32, device=targets.device)
    zeros = torch.empty(max(n_zero, 1), dtype=torch.int32, device=targets.device)
    block = min(4096, _next_power_of_2(max(targets.numel(), n_zero, 1)))
    _cross_entropy_mean_weight_kernel[(1,)](
        targets, targets.stride(0), targets.numel(), ignore_index, out, out[1:], zeros, n_zero, BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out[:1], out[1], zeros[:n_zero]


def mean_loss(loss: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """One launch: sum(loss) / denominator, float32."""
    out = torch.empty((), dtype=torch.float32, device=loss.device)
    block = min(4096, _next_power_of_2(max(loss.numel(), 1)))
    _cross_entropy_mean_kernel[(1,)](
        loss, loss.numel(), denominator, out, BLOCK=block, num_warps=4 if block <= 1024 else 8
    )
    return out


_BWD_MAX_PROGRAMS = 1024  # programs that scale a whole gradient by one grad_output (each loops over its spans)


def cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Scale ``grad`` in place by ``grad_output`` (one value, or one per row of a 2-D ``grad``); returns ``grad``."""
    per_row = grad_output.numel() > 1
    rows = grad.view(1, -1) if not per_row and grad.is_contiguous() else grad.view(grad.shape[0], -1)
    n_rows, n_cols = rows.shape
    assert rows.stride(1) == 1 and grad_output.numel() in (1, n_rows)
    if grad.numel() == 0:
        return grad
    # 64k elements per program; a scalar grad_output scales the whole tensor as one row with at most 1024 programs,
    # each looping: where grad_output is 1 (the usual case) the launch is a few waves of programs that exit at once.
    per_program = min(_next_power_of_2(n_cols), 65536)
    block = min(per_program, 4096)
    programs_per_row = _cdiv(n_cols, per_program)
    if not per_row:
        programs_per_row = min(programs_per_row, _BWD_MAX_PROGRAMS)
    _cross_entropy_bwd_kernel[(n_rows * programs_per_row,)](
        rows,
        rows.stride(0),
        grad_output,
        grad_output.stride(0) if per_row else 0,
        n_cols,
        programs_per_row,
        BLOCK_V=block,
        BLOCKS_PER_PROGRAM=per_program // block,
        num_warps=4 if block <= 1024 else 8,
    )
    return grad


def check_loss_options(
    targets: torch.Tensor,
    n_rows: int,
    reduction: str,
    logit_scale: float | None,
    softcap: float | None,
    num_items_in_batch: int | torch.Tensor | None,
) -> None:
    """Raise a TypeError / ValueError a user can act on for bad targets or loss options."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 tensor of class indices, got {got}; cast it with .long().")
    if targets.shape != (n_rows,):
        raise ValueError(
            f"targets must have shape ({n_rows},), one class index per row, got {tuple(targets.shape)}; "
            "flatten with .view(-1) after shifting the labels."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number (e.g. 30.0 for Gemma 2), got {softcap}.")
    if logit_scale is not None and not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a Python float, got {type(logit_scale).__name__}.")
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the denominator of reduction='mean', but reduction={reduction!r}; "
            "leave it out or use reduction='mean'."
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a 0-d tensor, got shape {tuple(num_items_in_batch.shape)}.")
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int) or num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be a positive int or a 0-d tensor, got {num_items_in_batch!r}.")


def cross_entropy_weight(
    targets: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row weight d(loss)/d(loss_i) as a (1,) float32 tensor, and the mean's denominator (None otherwise).

    Both stay on the device: the count of non-ignored targets is never read back to the host.
    """
    device = targets.device
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=device), None
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().to(torch.float32)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(device=device, dtype=torch.float32).reshape(())
    else:
        denominator = torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)
    return (1.0 / denominator).reshape(1), denominator


def reduce_loss(loss: torch.Tensor, reduction: str, denominator: torch.Tensor | None) -> torch.Tensor:
    """Reduce per-row losses the way :func:`cross_entropy_weight` weighted their gradients."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for :func:`cross_entropy`: the gradient is computed in forward, backward only scales it."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, logit_scale, softcap, num_items_in_batch, inplace):
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        fused_mean = CONFIG["fused_mean"] and reduction == "mean" and num_items_in_batch is None
        counters = None
        if fused_mean:
            split = CONFIG["kernel"] == "split"
            weight, denominator, zeros = mean_weight(targets, ignore_index, x.shape[0] + 2 if split else 0)
            counters = zeros if split else None
        else:
            weight, denominator = cross_entropy_weight(targets, ignore_index, reduction, num_items_in_batch)
        grad = None
        if ctx.needs_input_grad[0]:
            # A private contiguous copy can always take the gradient; the caller's logits only when allowed.
            grad = x if (inplace or x is not logits) else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        loss = cross_entropy_forward(
            x,
            targets,
            weight,
            ignore_index=ignore_index,
            logit_scale=logit_scale,
            softcap=softcap,
            grad=grad,
            counters=counters,
        )
        if grad is logits:
            # The logits now hold the gradient: autograd nodes that saved them will refuse to run instead of
            # silently computing with the wrong values.
            torch.autograd.graph.increment_version(logits)
        ctx.grad_logits = None if grad is None else grad.detach()
        return mean_loss(loss, denominator) if fused_mean else reduce_loss(loss, reduction, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad_logits
        if grad is None:
            raise RuntimeError(
                "cross_entropy keeps one logits gradient and scales it in place: it cannot run backward twice; "
                "call the loss again instead of retain_graph=True."
            )
        ctx.grad_logits = None
        cross_entropy_backward(grad, grad_output.to(torch.float32).reshape(-1))
        return grad, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against class indices, never upcasting the logits to a float32 copy.

    Args:
        logits: (N, V) float32, float16 or bfloat16 scores over a vocabulary of V.
        targets: (N,) int64 class indices in [0, V), or ``ignore_index`` for rows that do not count.
        ignore_index: Target value whose rows get zero loss and zero gradient.
        reduction: "mean" (over non-ignored rows), "sum", or "none" (per-row losses, 0 on ignored rows).
        logit_scale: Multiply the logits by this first (Cohere, Granite).
        softcap: Soft-cap the (scaled) logits to ``softcap * tanh(logits / softcap)`` (Gemma 2).
        num_items_in_batch: With reduction "mean", divide the summed loss by this count (an int or a 0-d tensor:
            the number of target tokens over all gradient accumulation steps, as transformers passes it) instead
            of by the local count, so that accumulated gradients equal the full batch's.
        inplace: Write the logits gradient into ``logits`` during the forward pass, saving an (N, V) buffer. Only
            when nothing reads ``logits`` afterwards: their values are overwritten. An autograd node that saved
            them (e.g. ``logits = x.exp()``) then raises in backward instead of computing a wrong gradient.

    Returns:
        float32 loss: a scalar, or (N,) for reduction "none".
    """
    check_floating("logits", logits)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be 2-D (tokens, vocab), got shape {tuple(logits.shape)}; flatten with "
            ".view(-1, logits.shape[-1])."
        )
    check_loss_options(targets, logits.shape[0], reduction, logit_scale, softcap, num_items_in_batch)
    check_same_device(logits=logits, targets=targets)
    if inplace and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace=True would overwrite a leaf tensor that requires grad; pass inplace=False, or logits "
            "computed by an op (e.g. lm_head(hidden))."
        )
    options = dict(ignore_index=ignore_index, reduction=reduction, logit_scale=logit_scale, softcap=softcap)
    if not use_triton(logits):
        return reference.cross_entropy(logits, targets, num_items_in_batch=num_items_in_batch, **options)
    return CrossEntropyFunction.apply(
        logits, targets, ignore_index, reduction, logit_scale, softcap, num_items_in_batch, inplace
    )
