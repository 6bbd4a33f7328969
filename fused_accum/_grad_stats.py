"""Gradient statistics (``track_grad_stats=True``): what the kernels leave on the device
about each window's gradients, collected here and read on the host only when asked.

Per parameter, of the window's applied gradient g (the mean, after clipping and
unscaling): mean |g|, max |g| and the L2 norm; these come out of the step kernels
(``StepBatch.grad_stats``). Per micro-step, the norm of the gradient it brought
(``accumulate(grad_sum_sq=)``, or the step's column of the fresh gradient's squares for
a last micro-step that is accumulated and applied in one pass). Per applied window, the
global norm of the applied gradient, kept as a history for plotting.

Where each rank's step kernels see only part of the gradients (FSDP2's shards, or
shard_state's chunks), the window's tables are combined over the ranks when the window
ends: two all-reduces per step batch (the sums, and the maxima), on the device. Under
FSDP2 each micro-step's gradient is sharded too, so its sums of squares are combined
then as well (one all-reduce for the window); with shard_state every rank has its own
micro-batches' whole gradients, whose norms stay this rank's, as in data parallel.
"""

from __future__ import annotations

from typing import Any

import torch


class GradStatsTracker:
    def __init__(self) -> None:
        self._micro_steps: list[tuple[dict[torch.device, torch.Tensor], Any]] = []
        self._open: dict[torch.device, torch.Tensor] | None = None
        self._open_scale: Any = 1.0
        self._tables: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self.last_tables: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._last_micro_steps: list[tuple[dict[torch.device, torch.Tensor], Any]] = []
        self._history: torch.Tensor | None = None
        self._history_length = 0
        # (process group, whether the micro-steps' sums are partial too) where each rank
        # sees part of the gradients; None where it sees them whole
        self.partial_over: tuple[Any, bool] | None = None

    # ------------------------------------------------------------------ collecting

    def micro_step_sums(
        self, devices: list[torch.device], inverse_scale: Any
    ) -> dict[torch.device, torch.Tensor]:
        """Where the current micro-step's accumulate calls add the squares of their
        gradients (one fp32 element per device); ``inverse_scale`` (a number or a
        device tensor) unscales the gradients' norm."""
        if self._open is None:
            self._open = {device: torch.zeros(1, device=device) for device in devices}
            self._open_scale = inverse_scale
        return self._open

    def open_sums(self) -> dict[torch.device, torch.Tensor] | None:
        """The current micro-step's sums, if it has any."""
        return self._open

    def close_micro_step(self) -> None:
        """The micro-step is over: its sums are final (a step() call)."""
        if self._open is not None:
            self._micro_steps.append((self._open, self._open_scale))
        self._open = None

    def table(self, params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """A zeroed (len(params), 4) table for one step batch to add its statistics to."""
        table = torch.zeros(len(params), 4, device=device)
        self._tables.append((list(params), table))
        return table

    def end_window(self, applied: bool, skip: torch.Tensor | None = None) -> None:
        """The window ended; keep what it left if an update was applied. ``skip``: the
        device's skip flag of a window that may have been skipped there; its statistics
        then read NaN (decided on the device, not read here)."""
        self.close_micro_step()
        if applied and self._tables:
            if skip is not None:
                for _, table in self._tables:
                    table.copy_(torch.where(skip.to(table.device) != 0, torch.nan, table))
            self._finish()
        self.discard()

    def discard(self) -> None:
        self._micro_steps, self._tables, self._open = [], [], None

    def _finish(self) -> None:
        # the micro-step norms are formed when asked for (micro_step_norms): only the
        # window norm is computed per window, for the history
        if self.partial_over is not None:
            self._combine_ranks(*self.partial_over)
        self._last_micro_steps = self._micro_steps
        self.last_tables = self._tables
        if len(self._tables) == 1:
            window_norm = self._tables[0][1][:, 1].sum().sqrt()
        else:
            home = self._tables[0][1].device
            squares = [table[:, 1].sum().to(home) for _, table in self._tables]
            window_norm = torch.stack(squares).sum().sqrt()
        self._append_history(window_norm)

    def _combine_ranks(self, group: Any, micro_steps: bool) -> None:
        """Every rank's part of the window's statistics summed (maxima: the largest)."""
        import torch.distributed as dist

        for _, table in self._tables:
            maxima = table[:, 2].clone()
            dist.all_reduce(table, group=group)
            dist.all_reduce(maxima, dist.ReduceOp.MAX, group=group)
            table[:, 2] = maxima
        sums = [total for step, _ in self._micro_steps for total in step.values()]
        if micro_steps and sums:
            combined = torch.cat([total.to(sums[0].device) for total in sums])
            dist.all_reduce(combined, group=group)
            for total, value in zip(sums, combined, strict=True):
                total.copy_(value)

    def micro_step_norms(self) -> torch.Tensor | None:
        """The L2 norm of each micro-step's gradient in the last applied window."""
        if not self.last_tables:
            return None
        home = self.last_tables[0][1].device
        norms = []
        for index, (sums, scale) in enumerate(self._last_micro_steps):
            total = torch.stack([s.to(home).reshape(()) for s in sums.values()]).sum()
            if index == len(self._last_micro_steps) - 1:
                # the last micro-step's gradients that the step kernels read directly
                total = total + sum(t[:, 3].sum().to(home) for _, t in self.last_tables)
            norms.append(total * scale * scale)
        if not norms:
            norms = [torch.zeros((), device=home)]
        return torch.stack(norms).sqrt()

    def _append_history(self, norm: torch.Tensor) -> None:
        if self._history is None or self._history_length == self._history.numel():
            grown = torch.empty(max(64, 2 * self._history_length), device=norm.device)
            if self._history is not None:
                grown[: self._history_length] = self._history
            self._history = grown
        self._history[self._history_length] = norm
        self._history_length += 1

    # -------------------------------------------------------------------- reading

    def history(self) -> torch.Tensor:
        if self._history is None:
            return torch.empty(0)
        return self._history[: self._history_length]


class GradStatsAccess:
    """The optimizer's gradient statistics (``track_grad_stats``), as a mixin of
    FusedAccumOptimizer. Needs ``_grad_stats``, ``_loss_scale``, ``_accumulation``
    and ``param_groups`` from it."""

    _grad_stats: GradStatsTracker | None
    _loss_scale: Any
    _accumulation: Any
    param_groups: list[dict[str, Any]]

    def _micro_step_squares(self, inverse_loss_scale: float) -> dict | None:
        """With ``track_grad_stats``, where this micro-step's gradients leave the sums
        of their squares (per device); else None."""
        if self._grad_stats is None:
            return None
        scale: Any = inverse_loss_scale
        if self._loss_scale is not None:
            scale = self._loss_scale.scale.reshape(()).reciprocal()
        return self._grad_stats.micro_step_sums(self._accumulation.devices, scale)

    def grad_stats(self) -> list[dict[str, Any]]:
        """With ``track_grad_stats``: per parameter updated by the last applied window,
        in model order, ``{"name", "mean_abs", "max_abs", "norm"}`` of its applied
        gradient (the window's mean, after clipping and unscaling). Names come from
        ``named_parameters()`` when the optimizer was given them, else "group.index".
        Reads the device (a host synchronisation), so call it when you need it."""
        tracker = self._require_grad_stats()
        rows: dict[int, torch.Tensor] = {}
        for params, table in tracker.last_tables:
            values = table.cpu()
            for param, row in zip(params, values, strict=True):
                rows[id(param)] = row
        stats = []
        for group_index, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for index, param in enumerate(group["params"]):
                row = rows.get(id(param))
                if row is None:
                    continue
                stats.append({
                    "name": names[index] if names else f"{group_index}.{index}",
                    "mean_abs": row[0].item() / max(param.numel(), 1),
                    "max_abs": row[2].item(),
                    "norm": row[1].sqrt().item(),
                })  # fmt: skip
        return stats

    def micro_step_grad_norms(self) -> torch.Tensor | None:
        """With ``track_grad_stats``: the L2 norm of each micro-step's gradient in the
        last applied window (unweighted, unscaled; this rank's), a device tensor."""
        return self._require_grad_stats().micro_step_norms()

    def grad_norm_history(self) -> torch.Tensor:
        """With ``track_grad_stats``: the global L2 norm of the applied gradient of
        every window so far that reached the step, a device tensor (NaN for a window
        skipped on the device by ``loss_scaling``)."""
        return self._require_grad_stats().history()

    def _require_grad_stats(self) -> GradStatsTracker:
        if self._grad_stats is None:
            raise RuntimeError(
                "gradient statistics need track_grad_stats=True when the optimizer is created"
            )
        return self._grad_stats
