"""The accumulate kernel of the kernel spec (see spec.py): a micro-batch's gradients,
scaled, added to their fp32 accumulation buffers (or written over them, for the
window's first), one launch for every tensor of the call, addressed as
triton_common.py describes.

With ``HAS_SUM_SQ`` or ``HAS_GRAD_SUM_SQ`` each program writes its block's partial
sums (SUM_PARTIALS per program), which finalize_sums_kernel (triton_finalize.py) adds
up; without them nothing more is written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import SUM_PARTIALS, _address, _block, _load, _store_partial


@triton.jit
def _accumulate_block(
    buffers, grads, found_inf_ptr, partials, tensor,
    local, flat, mask, scale, GRAD_DTYPE: tl.constexpr,
    OVERWRITE: tl.constexpr, CHECK_FINITE: tl.constexpr, HAS_SUM_SQ: tl.constexpr,
    HAS_GRAD_SUM_SQ: tl.constexpr,
):  # fmt: skip
    address = _address(grads, tensor, local, GRAD_DTYPE)
    grad = _load(address, mask).to(tl.float32)
    buffer = _address(buffers, tensor, local, tl.float32)
    if CHECK_FINITE:
        nonfinite = (grad != grad) | (tl.abs(grad) == float("inf"))
        if tl.max(nonfinite.to(tl.int32), axis=0) > 0:
            tl.store(found_inf_ptr, 1.0)
    if HAS_GRAD_SUM_SQ:
        # the gradient as given, widened, before the scale; masked-off elements are 0
        _store_partial(partials, 1, tl.sum(grad * grad, axis=0), None, SUM_PARTIALS)
    contribution = grad * scale
    if not OVERWRITE:
        contribution += _load(buffer, mask)
    tl.store(buffer, contribution, mask=mask)
    if HAS_SUM_SQ:
        # masked-off elements loaded as 0 and add nothing
        block_sum_sq = tl.sum(contribution * contribution, axis=0)
        _store_partial(partials, 0, block_sum_sq, None, SUM_PARTIALS)


@triton.jit
def accumulate_kernel(
    buffers,  # int64 [tensors]: addresses of the fp32 accumulation buffers
    grads,  # int64 [tensors]: addresses of the gradients
    found_inf_ptr,  # one fp32 flag, set to 1 when a gradient element is not finite
    partials,  # fp32 [blocks, SUM_PARTIALS]: the block's sum_sq and grad_sum_sq
    block_tensor,  # int32 [blocks]
    block_start,  # int64 [blocks]
    numels,  # int64 [tensors]
    flat_offsets,  # int64 [tensors]
    scale,  # weight of this micro-batch
    GRAD_DTYPE: tl.constexpr,  # element type of the gradients
    OVERWRITE: tl.constexpr,  # first contribution of the window: do not read the buffer
    CHECK_FINITE: tl.constexpr,  # raise found_inf on a non-finite gradient
    HAS_SUM_SQ: tl.constexpr,  # write the squares of the new buffer values' partial
    HAS_GRAD_SUM_SQ: tl.constexpr,  # write the squares of the gradients' partial
    BLOCK: tl.constexpr,  # elements per program
):
    tensor, local, flat, numel, whole = _block(
        block_tensor, block_start, numels, flat_offsets, BLOCK
    )
    if whole:
        _accumulate_block(
            buffers, grads, found_inf_ptr, partials, tensor,
            local, flat, None, scale, GRAD_DTYPE, OVERWRITE, CHECK_FINITE,
            HAS_SUM_SQ, HAS_GRAD_SUM_SQ,
        )  # fmt: skip
    else:
        _accumulate_block(
            buffers, grads, found_inf_ptr, partials, tensor,
            local, flat, local < numel, scale, GRAD_DTYPE, OVERWRITE,
            CHECK_FINITE, HAS_SUM_SQ, HAS_GRAD_SUM_SQ,
        )  # fmt: skip
