"""state_dict and load_state_dict of the fused_accum optimizers, as a mixin of
FusedAccumOptimizer: torch.optim's format, plus the window in progress."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from ._accumulation import AccumulationState
from ._checkpoint import (
    checkpoint_frame,
    flattened,
    partial_window_refused,
)
from ._sharded import local_tensor, shown_like


class StateDictMixin:
    """Needs ``_accumulation``, ``_flat_state_names``, ``_count_state_names``,
    ``_count_view``, ``_all_params``, ``_describe``, ``discard_window``,
    ``_fold_held``, ``state`` and ``param_groups`` from the optimizer."""

    _accumulation: AccumulationState
    _flat_state_names: tuple[str, ...]
    _rounding_seed: int
    _loss_scale: Any
    _pending_weight: float
    _folded_since_step: bool
    _folded_ids: set[int]
    _incomplete_micro_batch: bool

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (loadable by torch.optim.SGD/Adam/AdamW, which
        ignore the extra entry), plus ``"accumulation"``: the current window's buffers
        and counters, and the micro-batch in progress (its weight from
        :meth:`set_weight`, and with ``accumulate_in_backward`` whether backward already
        folded part of it), so that a run stopped mid-window, even between a backward
        and its step(), resumes exactly."""
        self._fold_held()  # what backward took is in the window (a failed backward's too)
        accumulation = self._accumulation
        checkpoint = checkpoint_frame("_get_optim_state_dict")
        if checkpoint is not None:
            flat = flattened(checkpoint)
            partial = accumulation.window_micro_steps or self._folded_since_step
            if partial and (flat or not self.checkpoint_partial_windows):
                raise RuntimeError(partial_window_refused(accumulation.window_micro_steps, flat))
            if partial and accumulation.shards and not accumulation.holds_sum:
                raise RuntimeError(
                    f"the {accumulation.window_micro_steps} micro-step(s) of this window "
                    f"left no sums in the optimizer: FSDP2 without gradient sync keeps "
                    f"them itself, unsharded, and torch.distributed.checkpoint does not "
                    f"save them. Checkpoint at a window boundary in that style"
                )
        state_dict = super().state_dict()
        if accumulation.state_shard is not None:
            self._gather_state(state_dict)
        window = {
            "window_micro_steps": accumulation.window_micro_steps,
            "window_weight": accumulation.window_weight,
            "micro_step_count": accumulation.micro_step_count,
            "update_count": accumulation.update_count,
            "last_step_applied": accumulation.last_step_applied,
            "overflowed": accumulation.overflowed,
            "rounding_seed": self._rounding_seed,
            # the micro-batch in progress: its weight, and whether backward already
            # folded some of its gradients (accumulate_in_backward) or failed doing so
            "pending_weight": self._pending_weight,
            "folded_since_step": self._folded_since_step,
            "incomplete_micro_batch": self._incomplete_micro_batch,
        }
        if self._loss_scale is not None:
            if checkpoint is not None:  # DCP keeps one rank's copy of a plain tensor
                self._overflow_of_every_shard()
            saved = self._loss_scale.state_dict()
            window["loss_scale"] = saved
            # the buffers hold the window's sums times the loss scale (read once here)
            window["buffer_scale"] = float(saved["scale"].item())
        if checkpoint is not None:
            if self.checkpoint_partial_windows and not flat:
                self._window_for_checkpoint(state_dict, window)
        else:
            window["buffers"] = {
                index: accumulation.buffer_view(param)
                for index, param in enumerate(self._all_params())
                if id(param) in accumulation.holds_sum
            }
            state_dict["accumulation"] = window
        return state_dict

    def _window_for_checkpoint(self, state_dict: dict[str, Any], window: dict[str, Any]) -> None:
        """The window where DCP keeps it (see _checkpoint.py): its counters in every
        param group, and every parameter's sum in its state, zeros where it holds none,
        so that every checkpoint, and every load template, has the same entries."""
        accumulation = self._accumulation
        for group in state_dict["param_groups"]:
            group["accumulation_window"] = window
        for index, param in enumerate(self._all_params()):
            holds = id(param) in accumulation.holds_sum
            if holds:
                buffer = accumulation.buffer_view(param)
            else:
                group, _ = accumulation.slots[id(param)]
                local = local_tensor(param)
                buffer = torch.zeros(local.shape, dtype=group.accum_dtype, device=local.device)
            entries = dict(state_dict["state"].get(index, {}))
            entries["accumulation_buffer"] = shown_like(buffer, param)
            entries["accumulation_sum"] = int(holds)
            state_dict["state"][index] = entries

    def _gather_state(self, state_dict: dict[str, Any]) -> None:
        """With shard_state: the flat states in ``state_dict`` whole, gathered from every
        rank (a collective), in place of this rank's pieces."""
        whole = self._reducer.gather_states(self._accumulation)
        params = self._all_params()
        for index, param_state in list(state_dict["state"].items()):
            gathered = whole[id(params[index])]
            state_dict["state"][index] = {
                name: gathered[name]
                if name in self._flat_state_names and name in gathered
                else value
                for name, value in param_state.items()
            }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the matching torch.optim optimizer
        (state is converted to the accumulation dtype, fp32, whatever it was saved
        in). A torch.optim state dict leaves an empty window. ``accumulation_steps`` is
        a setting, not state: the constructor's value stays. Everything is checked
        before anything changes, so a state dict that does not fit raises and leaves
        the optimizer as it was."""
        state_dict = dict(state_dict)
        saved_state = state_dict.pop("state")
        window = state_dict.pop("accumulation", None)
        groups, saved_state, from_checkpoint = _window_out_of_checkpoint(
            state_dict["param_groups"], saved_state
        )
        state_dict["param_groups"] = groups
        window = window or from_checkpoint or {"buffers": {}}
        id_map = self._check_state_dict(state_dict["param_groups"], saved_state, window)
        # The saved tensors may be views of our own flat storage (a state dict of this
        # very optimizer, held in memory): copy those out before that storage changes.
        ours = self._own_storages()
        saved_state = {k: self._detached(v, ours) for k, v in saved_state.items()}
        buffers = self._detached(window["buffers"], ours)
        super().load_state_dict({**state_dict, "state": {}})
        accumulation = self._accumulation
        for flat_group in accumulation.groups.values():
            for flat in [*flat_group.states.values(), *flat_group.counts.values()]:
                flat.zero_()
        for saved_id, param_state in saved_state.items():
            param = id_map[saved_id]
            self.state[param] = self._load_param_state(param, param_state)
        self.discard_window()
        for saved_id, buffer in buffers.items():
            param = id_map[saved_id]
            accumulation.buffer_view(param).copy_(local_tensor(buffer))
            accumulation.holds_sum.add(id(param))
        for name in ("window_micro_steps", "micro_step_count", "update_count"):
            setattr(accumulation, name, int(window.get(name, 0)))
        accumulation.window_weight = float(window.get("window_weight", 0.0))
        accumulation.last_step_applied = bool(window.get("last_step_applied", False))
        accumulation.overflowed = bool(window.get("overflowed", False))
        self._rounding_seed = int(window.get("rounding_seed", self._rounding_seed))
        self._pending_weight = float(window.get("pending_weight", 1.0))
        self._folded_since_step = bool(window.get("folded_since_step", False))
        self._folded_ids.clear()  # the saving optimizer's parameters are not ours
        self._incomplete_micro_batch = bool(window.get("incomplete_micro_batch", False))
        self._load_loss_scale(window)

    def _load_loss_scale(self, window: dict[str, Any]) -> None:
        """The loss scale, and the window's sums and overflow flag re-expressed for
        this optimizer's scaling, whichever scaling (or none) saved them."""
        accumulation = self._accumulation
        saved = window.get("loss_scale")
        if self._loss_scale is not None and saved is not None:
            self._loss_scale.load_state_dict(saved)
        saved_overflow = bool(window.get("overflowed", False))
        if saved is not None:
            saved_overflow |= bool(saved["found_inf"].item() != 0)
        if self._loss_scale is not None:
            self._loss_scale.found_inf.fill_(float(saved_overflow))
        else:
            accumulation.overflowed = saved_overflow
        own_scale = 1.0
        if self._loss_scale is not None:
            own_scale = float(self._loss_scale.scale.item())
        factor = own_scale / float(window.get("buffer_scale", 1.0))
        if factor != 1.0:
            for param in self._all_params():
                if id(param) in accumulation.holds_sum:
                    accumulation.buffer_view(param).mul_(factor)

    def _check_state_dict(
        self, saved_groups: list[dict[str, Any]], saved_state: dict, window: dict
    ) -> dict[Any, torch.Tensor]:
        """The map from saved parameter ids to our parameters, once every group size
        and every saved tensor's shape has been checked."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the "
                    "size of optimizer's group"
                )
        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        id_map = dict(zip(saved_ids, self._all_params(), strict=True))
        for saved_id, param_state in saved_state.items():
            for name, value in param_state.items():
                if name in self._flat_state_names and isinstance(value, torch.Tensor):
                    self._check_saved_shape(id_map[saved_id], name, value)
        for saved_id, buffer in window["buffers"].items():
            self._check_saved_shape(id_map[saved_id], "accumulation buffer", buffer)
        return id_map

    def _own_storages(self) -> set[int]:
        """The addresses of the storages we hold: flat tensors, counts and adopted
        buffers."""
        accumulation = self._accumulation
        flats = [
            flat
            for group in accumulation.groups.values()
            for flat in [*group.flat_tensors(), *group.counts.values()]
        ]
        return {t.untyped_storage().data_ptr() for t in chain(flats, accumulation.adopted.values())}

    def _detached(self, value: Any, ours: set[int]) -> Any:
        """``value`` with every tensor that lives in storage of ours copied out."""
        if isinstance(value, dict):
            return {key: self._detached(item, ours) for key, item in value.items()}
        if (
            isinstance(value, torch.Tensor)
            and local_tensor(value).untyped_storage().data_ptr() in ours
        ):
            return value.clone()
        return value

    def _load_param_state(self, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        loaded: dict[str, Any] = {}
        for name, value in saved.items():
            if name in self._flat_state_names and isinstance(value, torch.Tensor):
                view = self._accumulation.state_view(param, name)
                if self._accumulation.state_shard is not None:
                    value = self._accumulation.value_piece(param, value)
                view.copy_(local_tensor(value))  # a DTensor: sharded as its parameter
                loaded[name] = shown_like(view, param)
            elif name in self._count_state_names:
                view = self._count_view(param, name)
                view.fill_(float(value))
                loaded[name] = view
            else:
                loaded[name] = value
        return loaded

    def _check_saved_shape(self, param: torch.Tensor, name: str, value: torch.Tensor) -> None:
        if value.shape != param.shape:
            raise ValueError(
                f"the saved {name} of {self._describe(param)} has shape "
                f"{tuple(value.shape)} but the parameter has shape {tuple(param.shape)}; "
                f"the state dict belongs to a different model"
            )


def _window_out_of_checkpoint(
    groups: list[dict[str, Any]], saved_state: dict[Any, dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[Any, dict[str, Any]], dict[str, Any] | None]:
    """The param groups and per-parameter state of a state dict that went through
    torch.distributed.checkpoint, without the window's entries (see
    ``_window_for_checkpoint``), and the window they held in the ``"accumulation"``
    format (None if they held none)."""
    window = None
    clean_groups = []
    for group in groups:
        group = dict(group)
        window = group.pop("accumulation_window", None) or window
        clean_groups.append(group)
    if window is None:
        return groups, saved_state, None
    window = dict(window)
    window["buffers"] = {}
    clean_state = {}
    for saved_id, entries in saved_state.items():
        entries = dict(entries)
        buffer = entries.pop("accumulation_buffer", None)
        if entries.pop("accumulation_sum", 0):
            window["buffers"][saved_id] = buffer
        if entries:  # the window's entries alone: a parameter without state
            clean_state[saved_id] = entries
    return clean_groups, clean_state, window
