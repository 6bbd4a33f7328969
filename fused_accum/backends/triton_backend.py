"""The Triton backend: host side of triton_kernels.py.

Each spec call becomes one kernel launch, whatever the number of tensors: the launch
covers every block of every tensor through block tables built once per tensor layout.
On a GPU, gradients and parameters are reached through int64 address tables; under
the Triton interpreter (CPU tensors, tests) addresses cannot be loaded from memory, so
the operands are staged into one flat copy laid out like the buffers, and the
parameters are copied back after the launch (a skipped step leaves the staged copy
unchanged, so the copy-back leaves the parameters bit for bit as they were).

Nothing here reads a device tensor on the host: ``found_inf``, ``sum_sq``,
``grad_sum_sq``, ``StepBatch.device_scalars`` and ``StepBatch.grad_stats`` go to the
kernels as pointers. The first call with a new set of tensors copies its block and
address tables to the device, which waits; once they are cached (every window after
the first, for a fixed model), no call synchronises.
"""

from __future__ import annotations

import os

import torch

from .layout import like_buffer, write_back
from .spec import StepBatch

BLOCK = 1024
_INTERPRETER_BLOCK = 128  # the interpreter runs a block as numpy arrays: keep them small
_KEPT_PER_CACHE = 16


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton backend cannot run ``dtype`` parameters on ``device``, or None."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # an ImportError, or a broken install failing otherwise
        return f"triton cannot be imported ({type(error).__name__}: {error})"
    if dtype == torch.float64:
        return (
            "Triton hands Python floats to kernels as fp32, which would round the "
            "hyperparameters of fp64 parameters; use backend='cuda' or 'torch' for them"
        )
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_active():
            return None
        return (
            "Triton runs on CUDA tensors, and on CPU tensors only under the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    return f"Triton does not run on {device.type} tensors"


class _Layout:
    """Block tables of one call: which tensor and element each program starts at."""

    def __init__(self, flat_offsets: list[int], numels: list[int], device: torch.device):
        self.block = _INTERPRETER_BLOCK if interpreter_active() else BLOCK
        numels_table = torch.tensor(numels, dtype=torch.int64)
        counts = (numels_table + self.block - 1) // self.block
        first_block = torch.cumsum(counts, 0) - counts
        self.num_blocks = int(counts.sum())
        block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        block_index = torch.arange(self.num_blocks, dtype=torch.int64)
        block_start = (block_index - torch.repeat_interleave(first_block, counts)) * self.block
        self.block_tensor = block_tensor.to(device)
        self.block_start = block_start.to(device)
        self.numels = numels_table.to(device)
        self.flat_offsets = torch.tensor(flat_offsets, dtype=torch.int64, device=device)

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.block_tensor, self.block_start, self.numels, self.flat_offsets


def _flat_base(views: list[torch.Tensor], like: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The whole flat tensor behind views made by _storage.FlatGroup; with ``like``,
    also check that the views sit where those of ``like`` do (the kernels index
    buffers and state with one set of offsets)."""
    storage = views[0].untyped_storage()
    numel = storage.nbytes() // views[0].element_size()
    for index, view in enumerate(views):
        if view.untyped_storage().data_ptr() != storage.data_ptr() or (
            like is not None and view.storage_offset() != like[index].storage_offset()
        ):
            raise AssertionError("the Triton backend needs views laid out by FlatGroup")
    return views[0].as_strided((numel,), (1,), 0)


class _Operand:
    """Gradients or parameters as the kernels reach them, in one of three ways:

    - one tensor: itself as the base (offset 0), nothing copied;
    - several, on a GPU: a table of their addresses;
    - several, under the interpreter: staged into one flat copy laid out like the
      buffers (``write_back`` returns the values to the tensors).
    """

    def __init__(
        self,
        tensors: list[torch.Tensor],
        views: list[torch.Tensor],
        base_numel: int,
        backend: TritonBackend,
    ):
        self.tensors = tensors
        self.views = views
        self.in_layout = [
            like_buffer(t, v, alignment=16) for t, v in zip(tensors, views, strict=True)
        ]
        self.staged = False
        self.pointer_table = len(tensors) > 1 and not interpreter_active()
        device = tensors[0].device
        if len(tensors) == 1:
            self.base = self.in_layout[0]
            self.offsets = backend.zero_offsets(device)
        elif self.pointer_table:
            self.base = backend.address_table([t.data_ptr() for t in self.in_layout], device)
            self.offsets = self.base  # unused by the kernel
        else:
            self.staged = True
            self.base = torch.zeros(base_numel, dtype=tensors[0].dtype, device=device)
            self.offsets = torch.tensor(
                [v.storage_offset() for v in views], dtype=torch.int64, device=device
            )
            for view, tensor in zip(views, self.in_layout, strict=True):
                self._slot(view).copy_(tensor)

    def _slot(self, view: torch.Tensor) -> torch.Tensor:
        return self.base.as_strided(view.shape, view.stride(), view.storage_offset())

    def write_back(self) -> None:
        if self.staged:
            for in_layout, view in zip(self.in_layout, self.views, strict=True):
                in_layout.copy_(self._slot(view))
        write_back(self.tensors, self.in_layout)


def _keep_recent(cache: dict, key, value):
    """Put ``value`` at the recent end of ``cache``, dropping the oldest past the limit."""
    cache[key] = value
    while len(cache) > _KEPT_PER_CACHE:
        cache.pop(next(iter(cache)))
    return value


_TL_DTYPES: dict[torch.dtype, object] = {}


def _tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update(
            {
                torch.float32: tl.float32,
                torch.float64: tl.float64,
                torch.bfloat16: tl.bfloat16,
                torch.float16: tl.float16,
            }
        )
    return _TL_DTYPES[dtype]


def _bias_corrections(
    batch: StepBatch, *, step: int, lr: float, beta1: float, beta2: float
) -> tuple[float, float]:
    """Adam's step size and sqrt of the second bias correction from ``step``; with
    device scalars the kernel reads both from there instead (and ``step`` need not
    be meaningful), so the arguments are placeholders."""
    if batch.device_scalars is not None:
        return 0.0, 1.0
    return float(lr / (1 - beta1**step)), float((1 - beta2**step) ** 0.5)


class TritonBackend:
    """Fused Triton kernels: one launch per call."""

    name = "triton"
    flat_buffers_only = True  # offsets into one flat tensor; the interpreter has no tables

    def __init__(self) -> None:
        from . import triton_kernels

        self._kernels = triton_kernels
        self._layouts: dict[tuple, _Layout] = {}
        self._zero_offsets: dict[torch.device, torch.Tensor] = {}
        self._address_tables: dict[tuple, torch.Tensor] = {}
        self.launches = 0  # kernel launches so far; read by tests

    def _layout(self, buffers: list[torch.Tensor]) -> _Layout:
        """Block tables for this set of tensors. Recent ones are kept (the set rarely
        changes between calls), a bounded number, since each holds device memory."""
        flat_offsets = [b.storage_offset() for b in buffers]
        numels = [b.numel() for b in buffers]
        key = (buffers[0].device, tuple(flat_offsets), tuple(numels))
        layout = self._layouts.pop(key, None)
        if layout is None:
            layout = _Layout(flat_offsets, numels, buffers[0].device)
        return _keep_recent(self._layouts, key, layout)

    def _operand(self, tensors, buffers, base: torch.Tensor) -> _Operand:
        return _Operand(tensors, buffers, base.numel(), self)

    def zero_offsets(self, device: torch.device) -> torch.Tensor:
        """A one-entry offset table holding 0, for a single tensor used as its own base."""
        table = self._zero_offsets.get(device)
        if table is None:
            table = self._zero_offsets[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return table

    def address_table(self, addresses: list[int], device: torch.device) -> torch.Tensor:
        """The addresses as an int64 tensor on ``device``. Recent tables are kept: the
        caching allocator tends to hand gradients the same addresses every micro-step,
        and a hit saves a host-to-device copy."""
        key = (device, tuple(addresses))
        table = self._address_tables.pop(key, None)
        if table is None:
            table = torch.tensor(addresses, dtype=torch.int64, device=device)
        return _keep_recent(self._address_tables, key, table)

    def _launch(self, kernel, layout: _Layout, *args, **constexprs) -> None:
        if layout.num_blocks == 0:
            return
        kernel[(layout.num_blocks,)](*args, BLOCK=layout.block, **constexprs)
        self.launches += 1

    def accumulate(
        self,
        buffers: list[torch.Tensor],
        grads: list[torch.Tensor],
        *,
        scale: float,
        overwrite: bool,
        found_inf: torch.Tensor | None = None,
        sum_sq: torch.Tensor | None = None,
        grad_sum_sq: torch.Tensor | None = None,
    ) -> None:
        if not buffers:
            return
        base = _flat_base(buffers)
        layout = self._layout(buffers)
        grad_operand = self._operand(grads, buffers, base)
        self._launch(
            self._kernels.accumulate_kernel,
            layout,
            base,
            grad_operand.base,
            grad_operand.offsets,
            base if found_inf is None else found_inf,
            base if sum_sq is None else sum_sq,
            base if grad_sum_sq is None else grad_sum_sq,
            *layout.args(),
            float(scale),
            GRAD_DTYPE=_tl_dtype(grads[0].dtype),
            POINTER_TABLE=grad_operand.pointer_table,
            OVERWRITE=overwrite,
            CHECK_FINITE=found_inf is not None,
            HAS_SUM_SQ=sum_sq is not None,
            HAS_GRAD_SUM_SQ=grad_sum_sq is not None,
        )

    def _step_operands(self, batch: StepBatch):
        base = _flat_base(batch.buffers)
        layout = self._layout(batch.buffers)
        params = self._operand(batch.params, batch.buffers, base)
        grads = params if batch.grads is None else self._operand(batch.grads, batch.buffers, base)
        return base, layout, params, grads

    def _common_constexprs(self, batch: StepBatch, params: _Operand, grads: _Operand) -> dict:
        return dict(
            PARAM_DTYPE=_tl_dtype(batch.params[0].dtype),
            GRAD_DTYPE=_tl_dtype((batch.grads or batch.params)[0].dtype),
            POINTER_TABLE=params.pointer_table,
            USE_BUFFER=batch.use_buffer,
            HAS_GRADS=batch.grads is not None,
            HAS_MASTER=batch.masters is not None,
            STOCHASTIC=batch.rounding_seed is not None,
            HAS_DEVICE_SCALARS=batch.device_scalars is not None,
            HAS_GRAD_STATS=batch.grad_stats is not None,
        )

    def _master_base(self, batch: StepBatch, base: torch.Tensor) -> torch.Tensor:
        """The flat tensor of the masters, or (unused) the buffer."""
        return base if batch.masters is None else _flat_base(batch.masters, batch.buffers)

    def _scalars(self, batch: StepBatch, base: torch.Tensor) -> torch.Tensor:
        """The float64 device scalars, or (unused) the buffer. Passed as a pointer: the
        kernels read them, the host never does."""
        return base if batch.device_scalars is None else batch.device_scalars

    def _stats(self, batch: StepBatch, base: torch.Tensor) -> torch.Tensor:
        """The fp32 gradient statistics table, rows added to by the kernels, or (unused)
        the buffer."""
        if batch.grad_stats is None:
            return base
        stats = batch.grad_stats
        if stats.dtype != torch.float32 or stats.shape != (len(batch.params), 4):
            raise ValueError(
                f"grad_stats must be fp32 of shape ({len(batch.params)}, 4), "
                f"not {stats.dtype} {tuple(stats.shape)}"
            )
        if not stats.is_contiguous() or stats.device != base.device:
            raise ValueError("grad_stats must be contiguous, on the parameters' device")
        return stats

    def sgd_step(
        self,
        batch: StepBatch,
        momentum_buffers: list[torch.Tensor] | None,
        *,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        maximize: bool,
        init_momentum: bool,
    ) -> None:
        if not batch.params:
            return
        base, layout, params, grads = self._step_operands(batch)
        momentum_base = (
            base if momentum_buffers is None else _flat_base(momentum_buffers, batch.buffers)
        )
        self._launch(
            self._kernels.sgd_kernel,
            layout,
            params.base,
            params.offsets,
            base,
            grads.base,
            grads.offsets,
            momentum_base,
            self._master_base(batch, base),
            self._scalars(batch, base),
            self._stats(batch, base),
            *layout.args(),
            float(batch.normaliser),
            float(batch.grad_weight),
            float(lr),
            float(momentum),
            float(1 - dampening),
            float(weight_decay),
            batch.rounding_seed or 0,
            **self._common_constexprs(batch, params, grads),
            HAS_WEIGHT_DECAY=weight_decay != 0,
            HAS_MOMENTUM=momentum != 0,
            INIT_MOMENTUM=init_momentum,
            NESTEROV=nesterov,
            MAXIMIZE=maximize,
        )
        params.write_back()

    def adam_step(
        self,
        batch: StepBatch,
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor] | None,
        *,
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled_weight_decay: bool,
        amsgrad: bool,
        maximize: bool,
    ) -> None:
        if not batch.params:
            return
        base, layout, params, grads = self._step_operands(batch)
        exp_avg_base = _flat_base(exp_avgs, batch.buffers)
        self._launch(
            self._kernels.adam_kernel,
            layout,
            params.base,
            params.offsets,
            base,
            grads.base,
            grads.offsets,
            exp_avg_base,
            _flat_base(exp_avg_sqs, batch.buffers),
            exp_avg_base if max_exp_avg_sqs is None else _flat_base(max_exp_avg_sqs, batch.buffers),
            self._master_base(batch, base),
            self._scalars(batch, base),
            self._stats(batch, base),
            *layout.args(),
            float(batch.normaliser),
            float(batch.grad_weight),
            float(1 - beta1),
            float(beta2),
            float(1 - beta2),
            float(eps),
            float(weight_decay),
            float(1 - lr * weight_decay),
            *_bias_corrections(batch, step=step, lr=lr, beta1=beta1, beta2=beta2),
            batch.rounding_seed or 0,
            **self._common_constexprs(batch, params, grads),
            HAS_WEIGHT_DECAY=weight_decay != 0,
            DECOUPLED=decoupled_weight_decay,
            AMSGRAD=amsgrad,
            MAXIMIZE=maximize,
        )
        params.write_back()
