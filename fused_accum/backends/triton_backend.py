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
pointers. Tables, and the scratch that sums need (below), are kept between calls
(triton_tables.py): a fixed model's calls upload and allocate nothing after the first
window.

Sums over many programs repeat bit for bit: a call that asks for ``sum_sq``,
``grad_sum_sq`` or ``grad_stats`` has its programs write their partials to a scratch
buffer, and launches a finalize kernel after them on the same stream that adds them up
in a fixed order (triton_finalize.py).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from .spec import AdamHyperparams, SgdHyperparams, StepBatch
from .triton_tables import Tables, _flat_base, _Layout, _Operand, interpreter_active


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


def _bias_corrections(batch: StepBatch, hyper: AdamHyperparams, step: int) -> tuple[float, float]:
    """Adam's step size and sqrt of the second bias correction from ``step``; with
    device scalars the kernel reads both from there instead (and ``step`` need not
    be meaningful), so the arguments are placeholders."""
    if batch.device_scalars is not None:
        return 0.0, 1.0
    return float(hyper.lr / (1 - hyper.beta1**step)), float((1 - hyper.beta2**step) ** 0.5)


class TritonBackend:
    """Fused Triton kernels: one launch per call."""

    name = "triton"
    checks_operands = False

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
        self._tables = Tables()
        self.launches = 0  # kernel launches so far; read by tests

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
        layout = self._tables.layout(buffers)
        grad_operand = _Operand(grads, buffers, self._tables)
        unused = self._tables.unused(buffers[0].device)
        sums = dict(HAS_SUM_SQ=sum_sq is not None, HAS_GRAD_SUM_SQ=grad_sum_sq is not None)
        partials = unused
        if any(sums.values()):
            partials = self._tables.partials(layout, self._kernels.SUM_PARTIALS.value)
        self._launch(
            self._kernels.accumulate_kernel,
            layout,
            self._tables.buffer_table(buffers),
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

    def _step_operands(self, batch: StepBatch, states: list[list[torch.Tensor] | None]):
        """The block layout and the tables of a step. The layout's flat offsets (of the
        optimizer state, and each element's position for stochastic rounding) come
        from the first flat state list given, or the buffers when there is none."""
        tables = self._tables
        flat_views = next((state for state in states if state), batch.buffers)
        layout = tables.layout(flat_views)
        params = _Operand(batch.params, batch.buffers, tables)
        grads = params if batch.grads is None else _Operand(batch.grads, batch.buffers, tables)
        return flat_views, layout, params, grads, tables.buffer_table(batch.buffers)

    def _flat(self, views: list[torch.Tensor] | None, like: list[torch.Tensor]) -> torch.Tensor:
        """The flat tensor behind state ``views``, laid out like ``like``; or, for a
        state the variant does not use, a stand-in."""
        return self._tables.unused(like[0].device) if views is None else _flat_base(views, like)

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
            return self._tables.unused(batch.params[0].device)
        return batch.device_scalars

    def _stats_partials(self, batch: StepBatch, layout: _Layout) -> torch.Tensor:
        """Scratch for the step's partial gradient statistics (the fp32 table is checked
        here, before any launch), or a stand-in without them."""
        if batch.grad_stats is None:
            return self._tables.unused(batch.params[0].device)
        stats = batch.grad_stats
        if stats.dtype != torch.float32 or stats.shape != (len(batch.params), 4):
            raise ValueError(
                f"grad_stats must be fp32 of shape ({len(batch.params)}, 4), "
                f"not {stats.dtype} {tuple(stats.shape)}"
            )
        if not stats.is_contiguous() or stats.device != batch.params[0].device:
            raise ValueError("grad_stats must be contiguous, on the parameters' device")
        return self._tables.partials(layout, self._kernels.STAT_PARTIALS.value)

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
        hyper: SgdHyperparams,
        *,
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
            float(hyper.lr),
            float(hyper.momentum),
            float(1 - hyper.dampening),
            float(hyper.weight_decay),
            batch.rounding_seed or 0,
            **self._common_constexprs(batch),
            HAS_WEIGHT_DECAY=hyper.weight_decay != 0,
            HAS_MOMENTUM=hyper.momentum != 0,
            INIT_MOMENTUM=init_momentum,
            NESTEROV=hyper.nesterov,
            MAXIMIZE=hyper.maximize,
        )
        self._finalize_stats(batch, layout, partials)
        params.write_back()

    def adam_step(
        self,
        batch: StepBatch,
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor] | None,
        hyper: AdamHyperparams,
        *,
        step: int,
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
            float(1 - hyper.beta1),
            float(hyper.beta2),
            float(1 - hyper.beta2),
            float(hyper.eps),
            float(hyper.weight_decay),
            float(1 - hyper.lr * hyper.weight_decay),
            *_bias_corrections(batch, hyper, step),
            batch.rounding_seed or 0,
            **self._common_constexprs(batch),
            HAS_WEIGHT_DECAY=hyper.weight_decay != 0,
            DECOUPLED=hyper.decoupled_weight_decay,
            AMSGRAD=hyper.amsgrad,
            MAXIMIZE=hyper.maximize,
        )
        self._finalize_stats(batch, layout, partials)
        params.write_back()
