"""The docstring of the arguments every fused_accum optimizer adds to torch.optim's."""

ACCUMULATION_ARGS_DOC = """        accumulation_steps: micro-steps per update (>= 1).
        backend: ``"auto"`` (the fastest available per (device, dtype) group),
            ``"torch"`` (the pure-PyTorch reference), ``"triton"``, ``"cpu"`` or
            ``"cuda"``; an explicit one that cannot serve a group raises an error.
        accumulate_in_backward: fold each gradient into its buffer during backward, as
            soon as autograd produces it (in buckets of up to 32 MiB, one launch
            each), and free it, so the whole model's ``.grad`` never exists at once.
            step() then only counts and applies; give a micro-batch's weight with
            :meth:`set_weight` before its backward.
        master_weights: keep an fp32 master copy of every bf16/fp16 parameter (state
            ``"master_param"``, saved in the state dict): the update is applied to the
            master and the parameter receives it rounded, so that updates smaller than
            the parameter's precision are not lost. No effect on fp32/fp64 parameters.
        stochastic_rounding: round bf16 parameters stochastically after each update
            (unbiased: small updates survive on average, at no memory cost), with a
            seed drawn from torch's generator at construction and saved in the state
            dict. The alternative to ``master_weights``; fp16 parameters still round to
            nearest.
        max_grad_norm: clip the window's mean gradient to this global L2 norm before
            the update, as ``torch.nn.utils.clip_grad_norm_`` on it would; the norm
            (before clipping) is then :attr:`grad_norm`, a device tensor. The squares
            are summed by the last micro-step's accumulate pass and the clipping
            factor applied by the step, so no host synchronisation is needed.
        loss_scaling: built-in dynamic loss scaling for fp16 training, without a
            GradScaler and without host synchronisation: ``True`` (GradScaler's
            defaults) or a :class:`LossScaling`. Call ``optimizer.scale_loss(loss)
            .backward()``; a non-finite gradient in any micro-batch skips the whole
            window on the device, and the scale backs off or grows there. All
            parameters must be on one device.
        process_group: data parallel training on torch.distributed: each rank
            accumulates its own micro-batches, and at the window boundary the fp32
            buffers are summed over the ranks of this group (for example
            ``torch.distributed.group.WORLD``) once, in asynchronous buckets, and the
            window weights too, so the update is the weighted mean over every
            micro-batch of every rank. None (the default): one process.
        shard_state: with ``process_group``, shard the optimizer state over its ranks
            (ZeRO-1): the window's buffers are reduce-scattered instead of
            all-reduced, each rank updates its 1/world chunk of every (device, dtype)
            group and keeps state (moments, momentum, master weights) for that chunk
            only, and the updated parameters are all-gathered, in their own dtype.
            The update is the unsharded one's. ``state_dict()`` becomes a collective
            (every rank must call it) that returns the whole state on the host,
            loadable at any world size; ``state[p]`` holds this rank's piece of
            ``p``'s state (flat, possibly empty). Parameters must be dense (not views
            with gaps); not with ``stochastic_rounding``. One rank: no sharding.
        checkpoint_partial_windows: let ``torch.distributed.checkpoint``
            (``get_optimizer_state_dict`` and ``set_optimizer_state_dict``, nested format)
            save and load a window in progress: every parameter's fp32 sum goes into
            its state as ``"accumulation_buffer"`` (zeros where it holds none), so
            every DCP checkpoint grows by 4 bytes per parameter element. Give it to the
            optimizer that saves and to the one that loads: DCP loads only what the
            loading optimizer's template asks for, so without it there a saved window
            is not loaded, and a checkpoint saved without it cannot be loaded with it
            (DCP: missing key). Without it DCP checkpoints hold torch.optim's entries
            only, and a checkpoint mid-window is refused. ``state_dict()`` keeps the
            window whatever this says. Not with ``process_group`` (each rank's window
            is its own).
        track_grad_stats: keep gradient statistics on the device, computed by the
            kernels that already read the gradients (the one extra read is of adopted
            first gradients, in place of their copy): per parameter mean |g|, max |g|
            and L2 norm of each window's applied gradient, each micro-step's gradient
            norm, and the history of the window norms. Where each rank sees part of
            the gradients (FSDP2, ``shard_state``) the parts are combined over the
            ranks when a window ends.
            Read them with :meth:`grad_stats`, :meth:`micro_step_grad_norms` and
            :meth:`grad_norm_history`; plot them with ``fused_accum.plot_grad_flow``.
"""
