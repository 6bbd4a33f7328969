"""The Triton backend: host side of the Triton kernels (triton_accumulate.py,
triton_steps.py, triton_finalize.py).

Each spec call becomes one kernel launch, whatever the number of tensors: the launch
covers every block of every tensor through block tables built once per tensor layout.
Gradients and parameters are reached through int64 address tables, on a GPU and under
the Triton interpreter alike (tests run on CPU tensors through the same addressing as
a GPU); an interpreter that cannot follow them makes the backend unavailable there,
with the reason, rather than run other code.

Every launch runs on its tensors' device and that device's current stream. Nothing
here reads a device tensor on the host: ``found_inf``, ``sum_sq``, ``grad_sum_sq``,
``StepBatch.device_scalars`` and ``StepBatch.grad_stats`` go to the kernels as
pointers. Tables go to the device from pinned memory without blocking the host, and
recent ones are kept, so a fixed model's calls upload nothing after the first window.

Sums over many programs repeat bit for bit: a call that asks for ``sum_sq``,
``grad_sum_sq`` or ``grad_stats`` has its programs write their partials to a scratch
buffer, and launches a finalize kernel after them on the same stream that adds them up
in a fixed order (triton_finalize.py). The scratch is kept per device and stream and
only grows, so steady state allocates nothing.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from .layout import like_buffer, write_back
from .spec import StepBatch

BLOCK = 1024
_INTERPRETER_BLOCK = 128  # the interpreter runs a block as numpy arrays: keep them small
FINALIZE_TILE = 1024  # partials a finalize program reduces at a time
_INTERPRETER_FINALIZE_TILE = 8  # small, so that the tests' few programs span many tiles
# Entries kept per cache. Layouts: one per set of tensors a call covers, so one per
# parameter with accumulate_in_backward: a model's worth must fit, or every micro-step
# rebuilds and uploads them. Address tables: a few bytes each.
_KEPT_LAYOUTS = 4096
_KEPT_ADDRESS_TABLES = 256


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
            return _interpreter_problem()
        return (
            "Triton runs on CUDA tensors, and on CPU tensors only under the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    return f"Triton does not run on {device.type} tensors"


@functools.cache
def _interpreter_problem() -> str | None:
    """Why this Triton interpreter cannot run the kernels (it does not follow an address
    loaded from a table, as triton < 3.8 does not), or None; found once by a probe."""
    from .triton_common import follows_address_tables

    if follows_address_tables():
        return None
    import triton

    return (
        f"the Triton interpreter of triton {triton.__version__} does not follow address "
        f"tables, which the kernels use on a GPU; the tests need one that does "
        f"(triton >= 3.8)"
    )


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``; to a GPU from pinned memory, without
    making the host wait (the caching host allocator keeps the pinned block until the
    copy is done)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _stream_key(device: torch.device) -> int | None:
    """The current stream of ``device``, for the caches: a table uploaded without
    blocking on one stream is ready for kernels on that stream only."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).stream_id


def _new_address_table(addresses: list[int], device: torch.device) -> torch.Tensor:
    return _upload(torch.tensor(addresses, dtype=torch.int64), device)


class _Layout:
    """Block tables of one call: which tensor and element each program starts at."""

    def __init__(self, flat_offsets: list[int], numels: list[int], device: torch.device):
        interpreted = interpreter_active()
        self.block = _INTERPRETER_BLOCK if interpreted else BLOCK
        self.finalize_tile = _INTERPRETER_FINALIZE_TILE if interpreted else FINALIZE_TILE
        numels_table = torch.tensor(numels, dtype=torch.int64)
        counts = (numels_table + self.block - 1) // self.block
        first_block = torch.cumsum(counts, 0) - counts
        self.num_blocks = int(counts.sum())
        block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        block_index = torch.arange(self.num_blocks, dtype=torch.int64)
        block_start = (block_index - torch.repeat_interleave(first_block, counts)) * self.block
        self.block_tensor = _upload(block_tensor, device)
        self.block_start = _upload(block_start, device)
        self.numels = _upload(numels_table, device)
        self.flat_offsets = _upload(torch.tensor(flat_offsets, dtype=torch.int64), device)
        # each tensor's programs are consecutive: where they start and how many, for the
        # finalize of the gradient statistics
        self.tensor_first_block = _upload(first_block, device)
        self.tensor_blocks = _upload(counts, device)

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.block_tensor, self.block_start, self.numels, self.flat_offsets


def _flat_base(views: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    """The whole flat tensor behind views made by _storage.FlatGroup, checked to sit
    where those of ``like`` do (the kernels index every state with one set of
    offsets)."""
    storage = views[0].untyped_storage()
    numel = storage.nbytes() // views[0].element_size()
    for index, view in enumerate(views):
        if view.untyped_storage().data_ptr() != storage.data_ptr() or (
            view.storage_offset() != like[index].storage_offset()
        ):
            raise AssertionError("the Triton backend needs views laid out by FlatGroup")
    return views[0].as_strided((numel,), (1,), 0)


class _Operand:
    """Gradients or parameters as the kernels reach them: a table of their addresses.
    One that is not in its buffer's memory order or not 16-byte aligned is reached
    through a copy that is (``write_back`` returns the values to the tensor)."""

    def __init__(self, tensors: list[torch.Tensor], views: list[torch.Tensor], backend):
        self.tensors = tensors
        self.in_layout = [
            like_buffer(t, v, alignment=16) for t, v in zip(tensors, views, strict=True)
        ]
        self.table = backend.address_table(
            [t.data_ptr() for t in self.in_layout], tensors[0].device
        )

    def write_back(self) -> None:
        write_back(self.tensors, self.in_layout)


def _recent(cache: dict, key, make, limit: int):
    """``cache[key]``, made by ``make()`` if missing, moved to the recent end of
    ``cache``; the oldest entries past ``limit`` are dropped."""
    value = cache.pop(key, None)
    cache[key] = value = make() if value is None else value
    while len(cache) > limit:
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

    def __init__(self) -> None:
        # imported here: importing the kernels imports triton
        from . import triton_accumulate, triton_common, triton_finalize, triton_steps

        self._kernels = SimpleNamespace(
            accumulate_kernel=triton_accumulate.accumulate_kernel,
            sgd_kernel=triton_steps.sgd_kernel,
            adam_kernel=triton_steps.adam_kernel,
            finalize_sums_kernel=triton_finalize.finalize_sums_kernel,
            finalize_grad_stats_kernel=triton_finalize.finalize_grad_stats_kernel,
            SUM_PARTIALS=triton_common.SUM_PARTIALS,
            STAT_PARTIALS=triton_common.STAT_PARTIALS,
        )
        self._layouts: dict[tuple, _Layout] = {}
        self._address_tables: dict[tuple, torch.Tensor] = {}
        self._unused_tensors: dict[torch.device, torch.Tensor] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.launches = 0  # kernel launches so far; read by tests

    def _layout(self, buffers: list[torch.Tensor]) -> _Layout:
        """Block tables for this set of tensors. Recent ones are kept (the set rarely
        changes between calls), a bounded number, since each holds device memory."""
        flat_offsets = [b.storage_offset() for b in buffers]
        numels = [b.numel() for b in buffers]
        device = buffers[0].device
        key = (device, _stream_key(device), tuple(flat_offsets), tuple(numels))
        make = functools.partial(_Layout, flat_offsets, numels, device)
        return _recent(self._layouts, key, make, _KEPT_LAYOUTS)

    def address_table(self, addresses: list[int], device: torch.device) -> torch.Tensor:
        """The addresses as an int64 tensor on ``device``. Recent tables are kept: the
        caching allocator tends to hand gradients the same addresses every micro-step,
        and a hit saves a host-to-device copy."""
        key = (device, _stream_key(device), tuple(addresses))

        make = functools.partial(_new_address_table, addresses, device)  # only on a miss
        return _recent(self._address_tables, key, make, _KEPT_ADDRESS_TABLES)

    def _launch(self, kernel, layout: _Layout, *args, **constexprs) -> None:
        """``kernel`` over every block of ``layout``."""
        if layout.num_blocks == 0:
            return
        self._run(kernel, layout.num_blocks, layout, *args, BLOCK=layout.block, **constexprs)

    def _finalize(self, kernel, programs: int, layout: _Layout, *args, **constexprs) -> None:
        """``programs`` programs of a finalize ``kernel``, after the launch on ``layout``
        whose partials they reduce (none without blocks)."""
        if layout.num_blocks == 0:
            return
        self._run(kernel, programs, layout, *args, TILE=layout.finalize_tile, **constexprs)

    def _run(self, kernel, programs: int, layout: _Layout, *args, **constexprs) -> None:
        device = layout.numels.device
        # Triton launches on the current device and its current stream: make them the
        # tensors' (parameters on cuda:1 must not get kernels on cuda:0)
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            kernel[(programs,)](*args, **constexprs)
        self.launches += 1

    def _partials(self, layout: _Layout, per_program: int) -> torch.Tensor:
        """Scratch for ``per_program`` fp32 partials of every block of ``layout``. One
        per device and stream, grown when a call needs more and never shrunk: kernels
        on one stream run in order, so a call's partials are read by its finalize
        before the next call's programs write theirs, and after the first window
        nothing is allocated (keeping one per size would keep one per parameter shape
        with accumulate_in_backward)."""
        device = layout.numels.device
        key = (device, _stream_key(device))
        needed = layout.num_blocks * per_program
        scratch = self._scratch.get(key)
        if scratch is None or scratch.numel() < needed:
            scratch = self._scratch[key] = torch.empty(needed, device=device)
        return scratch

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
        layout = self._layout(buffers)
        grad_operand = _Operand(grads, buffers, self)
        unused = self._unused(buffers[0].device)
        sums = dict(HAS_SUM_SQ=sum_sq is not None, HAS_GRAD_SUM_SQ=grad_sum_sq is not None)
        partials = unused
        if any(sums.values()):
            partials = self._partials(layout, self._kernels.SUM_PARTIALS.value)
        self._launch(
            self._kernels.accumulate_kernel,
            layout,
            self._buffer_table(buffers),
            grad_operand.table,
            unused if found_inf is None else found_inf,
            partials,
            *layout.args(),
            float(scale),
            GRAD_DTYPE=_tl_dtype(grads[0].dtype),
            OVERWRITE=overwrite,
            CHECK_FINITE=found_inf is not None,
            **sums,
        )
        if any(sums.values()):
            self._finalize(
                self._kernels.finalize_sums_kernel,
                1,
                layout,
                partials,
                layout.num_blocks,
                unused if sum_sq is None else sum_sq,
                unused if grad_sum_sq is None else grad_sum_sq,
                **sums,
            )

    def _buffer_table(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        """The buffers' addresses: views of the flat buffer, or gradients adopted as
        their parameter's buffer (fp32, dense and 64-byte aligned either way)."""
        return self.address_table([b.data_ptr() for b in buffers], buffers[0].device)

    def _unused(self, device: torch.device) -> torch.Tensor:
        """A one-element fp32 tensor for pointer arguments a variant does not use."""
        unused = self._unused_tensors.get(device)
        if unused is None:
            unused = self._unused_tensors[device] = torch.zeros(1, device=device)
        return unused

    def _step_operands(self, batch: StepBatch, states: list[list[torch.Tensor] | None]):
        """The block layout and the tables of a step. The layout's flat offsets (of the
        optimizer state, and each element's position for stochastic rounding) come
        from the first flat state list given, or the buffers when there is none."""
        flat_views = next((state for state in states if state), batch.buffers)
        layout = self._layout(flat_views)
        params = _Operand(batch.params, batch.buffers, self)
        grads = params if batch.grads is None else _Operand(batch.grads, batch.buffers, self)
        return flat_views, layout, params, grads, self._buffer_table(batch.buffers)

    def _flat(self, views: list[torch.Tensor] | None, like: list[torch.Tensor]) -> torch.Tensor:
        """The flat tensor behind state ``views``, laid out like ``like``; or, for a
        state the variant does not use, a stand-in."""
        return self._unused(like[0].device) if views is None else _flat_base(views, like)

    def _common_constexprs(self, batch: StepBatch) -> dict:
        return dict(
            PARAM_DTYPE=_tl_dtype(batch.params[0].dtype),
            GRAD_DTYPE=_tl_dtype((batch.grads or batch.params)[0].dtype),
            USE_BUFFER=batch.use_buffer,
            HAS_GRADS=batch.grads is not None,
            HAS_MASTER=batch.masters is not None,
            STOCHASTIC=batch.rounding_seed is not None,
            HAS_DEVICE_SCALARS=batch.device_scalars is not None,
            HAS_GRAD_STATS=batch.grad_stats is not None,
        )

    def _scalars(self, batch: StepBatch) -> torch.Tensor:
        """The float64 device scalars, or a stand-in. Passed as a pointer: the kernels
        read them, the host never does."""
        if batch.device_scalars is None:
            return self._unused(batch.params[0].device)
        return batch.device_scalars

    def _stats_partials(self, batch: StepBatch, layout: _Layout) -> torch.Tensor:
        """Scratch for the step's partial gradient statistics (the fp32 table is checked
        here, before any launch), or a stand-in without them."""
        if batch.grad_stats is None:
            return self._unused(batch.params[0].device)
        stats = batch.grad_stats
        if stats.dtype != torch.float32 or stats.shape != (len(batch.params), 4):
            raise ValueError(
                f"grad_stats must be fp32 of shape ({len(batch.params)}, 4), "
                f"not {stats.dtype} {tuple(stats.shape)}"
            )
        if not stats.is_contiguous() or stats.device != batch.params[0].device:
            raise ValueError("grad_stats must be contiguous, on the parameters' device")
        return self._partials(layout, self._kernels.STAT_PARTIALS.value)

    def _finalize_stats(self, batch: StepBatch, layout: _Layout, partials: torch.Tensor) -> None:
        """Add the step's partial statistics to ``batch.grad_stats``, one program per
        row (with a set skip flag it writes nothing)."""
        if batch.grad_stats is None:
            return
        self._finalize(
            self._kernels.finalize_grad_stats_kernel,
            len(batch.params),
            layout,
            partials,
            batch.grad_stats,
            self._scalars(batch),
            layout.tensor_first_block,
            layout.tensor_blocks,
            HAS_GRADS=batch.grads is not None,
            HAS_DEVICE_SCALARS=batch.device_scalars is not None,
        )

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
        flat_views, layout, params, grads, buffers = self._step_operands(
            batch, [momentum_buffers, batch.masters]
        )
        partials = self._stats_partials(batch, layout)
        self._launch(
            self._kernels.sgd_kernel,
            layout,
            params.table,
            buffers,
            grads.table,
            self._flat(momentum_buffers, flat_views),
            self._flat(batch.masters, flat_views),
            self._scalars(batch),
            partials,
            *layout.args(),
            float(batch.normaliser),
            float(batch.grad_weight),
            float(lr),
            float(momentum),
            float(1 - dampening),
            float(weight_decay),
            batch.rounding_seed or 0,
            **self._common_constexprs(batch),
            HAS_WEIGHT_DECAY=weight_decay != 0,
            HAS_MOMENTUM=momentum != 0,
            INIT_MOMENTUM=init_momentum,
            NESTEROV=nesterov,
            MAXIMIZE=maximize,
        )
        self._finalize_stats(batch, layout, partials)
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
        flat_views, layout, params, grads, buffers = self._step_operands(
            batch, [exp_avgs, batch.masters]
        )
        partials = self._stats_partials(batch, layout)
        self._launch(
            self._kernels.adam_kernel,
            layout,
            params.table,
            buffers,
            grads.table,
            self._flat(exp_avgs, flat_views),
            self._flat(exp_avg_sqs, flat_views),
            self._flat(max_exp_avg_sqs, flat_views),
            self._flat(batch.masters, flat_views),
            self._scalars(batch),
            partials,
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
            **self._common_constexprs(batch),
            HAS_WEIGHT_DECAY=weight_decay != 0,
            DECOUPLED=decoupled_weight_decay,
            AMSGRAD=amsgrad,
            MAXIMIZE=maximize,
        )
        self._finalize_stats(batch, layout, partials)
        params.write_back()
