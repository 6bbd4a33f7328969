"""Accumulation state: the flat groups, which parameters hold a contribution in the
current window, and the window's counters. It folds gradients in through the backends
and knows nothing of the update rules."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container

import torch

from ._sharded import is_dtensor, local_tensor
from ._storage import FlatGroup
from ._sums import SERIAL_BELOW, sum_in_fixed_order
from .backends import Backend, resolve_backend


class AccumulationState:
    """Flat fp32 (fp64 for fp64 parameters) buffers per (device, dtype) group, with the
    bookkeeping of the window being accumulated.

    During a window a parameter's buffer holds the weighted sum of its gradients so
    far, for the parameters in ``holds_sum`` (their ids: those that have received a
    gradient); the buffers of the others hold dead values, overwritten by their first
    gradient.

    A window's first gradient of a parameter need not be copied at all: when it is
    private (the caller says so), already in the accumulation dtype and layout, and
    folded in with weight 1 and nothing to check or to sum but its own squares, it
    becomes the parameter's buffer for the rest of the window (``adopted``), as
    autograd makes the first gradient ``.grad``. This saves the copy's 8 bytes per fp32
    element, and the flat buffer of a group whose gradients are all adopted is never
    allocated.
    """

    def __init__(self, backend_name: str) -> None:
        self.backend_name = backend_name
        self.groups: dict[tuple[torch.device, torch.dtype], FlatGroup] = {}
        self.backends: dict[tuple[torch.device, torch.dtype], Backend] = {}
        # Keyed by id(param): hashing a tensor runs Python code, and these are looked up
        # for every parameter at every micro-step.
        self.slots: dict[int, tuple[FlatGroup, int]] = {}
        # every parameter in the order added, with what its gradient must be: (shape,
        # dtype, device index: -1 on CPU), for the steady state's intake
        self.ordered: list[torch.Tensor] = []
        self.grad_specs: list[tuple[torch.Size, torch.dtype, int]] = []
        self._steady_plan: list[tuple[Backend, torch.device, list[int] | None, list]] | None = None
        self.holds_sum: set[int] = set()
        self.adopted: dict[int, torch.Tensor] = {}  # id(param): its gradient, as its buffer
        # id(param): the shard of a DTensor parameter, as the flat group holds it
        self.shards: dict[int, torch.Tensor] = {}
        self.shard_mesh = None  # their DeviceMesh: one for all
        self.adoption = True  # off where the flat buffers themselves are needed (all-reduce)
        self.state_shard: tuple[int, int] | None = None  # (rank, world) with shard_state
        self._adopting: set[FlatGroup] = set()  # groups whose backend and dtype allow it
        self.window_micro_steps = 0
        self.window_weight = 0.0
        self.micro_step_count = 0
        self.update_count = 0
        self.last_step_applied = False
        self.overflowed = False  # a micro-step of this window had a non-finite gradient

    def add_params(self, params: list[torch.Tensor]) -> set[FlatGroup]:
        """Give each parameter a slice of its group's flat tensors; return the groups
        that grew (their flat tensors are new, so views into them must be remade)."""
        # a DTensor parameter (FSDP2) is accumulated and updated through its shard
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for param in params:
            if is_dtensor(param):
                self.shards[id(param)] = param._local_tensor
                self.shard_mesh = param.device_mesh
            by_key[(param.device, param.dtype)].append(param)
        grown = set()
        for key, new_params in by_key.items():
            if key not in self.groups:
                self.backends[key] = resolve_backend(self.backend_name, *key)
                self.groups[key] = FlatGroup(*key)
                group = self.groups[key]
                if self.state_shard is not None:
                    group.shard(*self.state_shard)
                if group.accum_dtype == group.param_dtype:  # fp32 and fp64 parameters
                    self._adopting.add(group)
            group = self.groups[key]
            if any(id(param) in self.shards for param in new_params):
                # a shard's gradient is a view of FSDP's reduce buffer: never adopted
                self._adopting.discard(group)
            start = len(group.params)
            group.add([local_tensor(param) for param in new_params])
            for index, param in enumerate(new_params, start):
                self.slots[id(param)] = (group, index)
            grown.add(group)
        for param in params:
            self.ordered.append(param)
            local = local_tensor(param)
            self.grad_specs.append((local.shape, local.dtype, local.get_device()))
        self._steady_plan = None
        return grown

    def check_chunks_stay(self, params: list[torch.Tensor]) -> None:
        """With ``state_shard``: raise, before anything changes, if adding ``params``
        would grow a group that already has state (its chunks would move)."""
        for param in params:
            group = self.groups.get((param.device, param.dtype))
            if group is not None and group.states:
                raise RuntimeError(
                    "with shard_state, parameters cannot be added to a (device, dtype) "
                    "group once the optimizer has state for it: the chunk of state each "
                    "rank keeps would move. Add every param group before the first update"
                )

    def shard_of(self, param: torch.Tensor) -> torch.Tensor:
        """What the flat group holds for ``param``: itself, or the shard of a DTensor
        parameter, checked to be the one it still has."""
        shard = self.shards.get(id(param))
        if shard is None:
            return param
        if param._local_tensor is not shard:
            raise RuntimeError(
                "a DTensor parameter's shard was replaced after the optimizer was made "
                "(FSDP2 does so on model.to() or model.float()): create the optimizer "
                "after moving or casting the model"
            )
        return shard

    def param_piece(self, param: torch.Tensor) -> torch.Tensor:
        """With ``state_shard``: the piece of ``param`` this rank updates (see
        FlatGroup.piece)."""
        group, index = self.slots[id(param)]
        return group.param_piece(index)

    def buffer_piece(self, param: torch.Tensor) -> torch.Tensor:
        """With ``state_shard``: the piece of ``param``'s buffer that this rank's chunk
        holds, which the boundary's reduce-scatter sums over the ranks."""
        group, index = self.slots[id(param)]
        return group.flat_piece(group.buffer, index)

    def value_piece(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """With ``state_shard``: the piece of ``value`` (a tensor shaped like ``param``,
        such as a loaded state) that this rank keeps."""
        group, index = self.slots[id(param)]
        start, stop = group.piece(index)
        return group.memory_order(index, value)[start:stop]

    @property
    def devices(self) -> list[torch.device]:
        """The devices of the groups, in the order the parameters were added."""
        return list(dict.fromkeys(device for device, _ in self.groups))

    def backend_for(self, param: torch.Tensor) -> Backend:
        return self.backends[(param.device, param.dtype)]

    def buffer_view(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor holding ``param``'s sum: its adopted gradient, or its view of the
        flat buffer."""
        adopted = self.adopted.get(id(param))
        if adopted is not None:
            return adopted
        group, index = self.slots[id(param)]
        return group.buffer_view(index)

    def step_buffer(self, param: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
        """The buffer a step is given for ``param``. When the window holds no sum for
        it, the buffer is not read and only lends its layout (its dtype, strides and
        flat offset): the fresh gradient ``fresh`` serves where it can, else a view of
        the group's optimizer state, which has the same layout, so that the flat
        buffer is not allocated for a step that would not read it."""
        if id(param) not in self.holds_sum:
            group, index = self.slots[id(param)]
            if fresh is not None and self._may_stand_in(group, index, fresh):
                return fresh
            flat_state = next(iter(group.states.values()), None)
            if flat_state is not None:
                return group.view(flat_state, index)
        return self.buffer_view(param)

    def _may_stand_in(self, group: FlatGroup, index: int, grad: torch.Tensor) -> bool:
        """Whether ``grad`` may serve as buffer ``index`` of ``group``."""
        return group in self._adopting and group.gradient_fits(index, grad)

    def state_view(self, param: torch.Tensor, name: str) -> torch.Tensor:
        group, index = self.slots[id(param)]
        return group.state_view(name, index)

    def count_view(self, param: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
        group, index = self.slots[id(param)]
        return group.count_view(name, index, device)

    def advance_counts(
        self, params: list[torch.Tensor], name: str, amount: float | torch.Tensor
    ) -> None:
        """Add ``amount`` (a number, or a one-element tensor on the counts' device) to
        count ``name`` of each of ``params``: one add when they are consecutive
        parameters of one group, as a window's batch usually is."""
        located = [self.slots[id(param)] for param in params]
        group, first = located[0]
        counts = group.counts[name]
        if all(g is group for g, _ in located) and [i for _, i in located] == list(
            range(first, first + len(located))
        ):
            counts[first : first + len(located)].add_(amount)
            return
        views = [g.counts[name][index] for g, index in located]
        if isinstance(amount, torch.Tensor):
            # a list of tensors: the Scalar overload would read the amount on the host
            torch._foreach_add_(views, [amount] * len(views))
        else:
            torch._foreach_add_(views, amount)

    def fold(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        weight: float,
        found_inf: torch.Tensor | None = None,
        sum_sq: dict[torch.device, torch.Tensor] | None = None,
        grad_sum_sq: dict[torch.device, torch.Tensor] | None = None,
        private: Container[int] = (),
    ) -> None:
        """Add ``weight * grad`` into the buffer of each (param, grad) pair: one backend
        call per (group, first contribution or not). ``found_inf`` (one device's flag)
        is raised by a non-finite gradient; ``sum_sq`` and ``grad_sum_sq`` (per device)
        receive the sums of squares of the new buffer values and of the gradients.
        ``private`` holds the ids of the parameters whose gradient here is referenced
        nowhere else: such a gradient may be adopted as the buffer (see the class)."""
        self._steady_plan = None  # buffers may be adopted here
        calls: dict[tuple, tuple[list, list]] = {}
        holds_sum, slots, adopted = self.holds_sum, self.slots, self.adopted
        may_adopt = self.adoption and weight == 1.0 and found_inf is None and sum_sq is None
        squared: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        # recorded once every kernel has run, so that an error leaves the window as it was
        first_sums: list[int] = []
        newly_adopted: dict[int, torch.Tensor] = {}
        for param, grad in pairs:
            key = id(param)
            group, index = slots[key]
            first = key not in holds_sum
            if first:
                first_sums.append(key)
            if first and may_adopt and key in private and self._may_stand_in(group, index, grad):
                newly_adopted[key] = grad
                if grad_sum_sq is not None:
                    squared[group.device].append(grad)
                continue
            call = calls.get((group, first))
            if call is None:
                call = calls[(group, first)] = ([], [])
            buffer = adopted.get(key)
            call[0].append(group.buffer_view(index) if buffer is None else buffer)
            call[1].append(grad)
        for (group, first), (buffers, grads) in calls.items():
            self.backends[(group.device, group.param_dtype)].accumulate(
                buffers,
                grads,
                scale=weight,
                overwrite=first,
                found_inf=found_inf,
                sum_sq=None if sum_sq is None else sum_sq[group.device],
                grad_sum_sq=None if grad_sum_sq is None else grad_sum_sq[group.device],
            )
        for device, grads in squared.items():
            # adopted, so read by no kernel: their squares from a read-only pass, in a
            # fixed order (a GPU's foreach norm, or a CPU's on small tensors, reduces
            # in a fixed order itself)
            if device.type == "cpu" and any(g.numel() >= SERIAL_BELOW for g in grads):
                squares = torch.stack([sum_in_fixed_order(g.double().square()) for g in grads])
            else:
                squares = torch.stack(torch._foreach_norm(grads)).double().square()
            grad_sum_sq[device].add_(squares.sum().float())
        holds_sum.update(first_sums)
        adopted.update(newly_adopted)

    @property
    def steady(self) -> bool:
        """Whether every parameter holds a sum in this window: a micro-step that brings
        a gradient for each then adds them all, as ``fold_every`` does."""
        return len(self.holds_sum) == len(self.slots) and not self.overflowed

    @property
    def backend_checks(self) -> bool:
        """Whether ``fold_every`` may be given unchecked gradients: one group, whose
        backend checks every operand (dtype, shape, layout, device) before it writes
        anything, so a bad gradient raises with nothing folded."""
        return len(self.groups) == 1 and next(iter(self.backends.values())).checks_operands

    def fold_every(
        self,
        grads: list[torch.Tensor],
        weight: float,
        found_inf: torch.Tensor | None = None,
        grad_sum_sq: dict[torch.device, torch.Tensor] | None = None,
    ) -> None:
        """``fold`` for the steady state: ``grads`` holds one gradient for every
        parameter, in the order of ``ordered``, and every parameter holds a sum (see
        ``steady``). One backend call per group, on buffer lists made once per window."""
        if self._steady_plan is None:
            self._steady_plan = self._make_steady_plan()
        for backend, device, positions, buffers in self._steady_plan:
            group_grads = grads if positions is None else [grads[i] for i in positions]
            backend.accumulate(
                buffers,
                group_grads,
                scale=weight,
                overwrite=False,
                found_inf=found_inf,
                grad_sum_sq=None if grad_sum_sq is None else grad_sum_sq[device],
            )

    def _make_steady_plan(self) -> list[tuple[Backend, torch.device, list[int] | None, list]]:
        """Per group: its backend, device, the positions of its parameters in
        ``ordered`` (None: all of them, in order) and their buffers."""
        positions: dict[FlatGroup, list[int]] = defaultdict(list)
        for position, param in enumerate(self.ordered):
            positions[self.slots[id(param)][0]].append(position)
        plan = []
        for group, members in positions.items():
            buffers = [self.buffer_view(self.ordered[i]) for i in members]
            whole = len(positions) == 1
            key = (group.device, group.param_dtype)
            plan.append((self.backends[key], group.device, None if whole else members, buffers))
        return plan

    def end_window(self) -> None:
        """Forget the window: its sums are dead once applied or discarded."""
        self.holds_sum.clear()
        self.adopted.clear()  # the adopted gradients are freed, as zero_grad() frees .grad
        self._steady_plan = None
        self.overflowed = False
        self.window_micro_steps = 0
        self.window_weight = 0.0
