"""fused_accum: exact, lean and fast gradient accumulation for PyTorch optimizers.

Swap ``torch.optim.SGD``/``Adam``/``AdamW`` for ``FusedAccumSGD``/``FusedAccumAdam``/
``FusedAccumAdamW`` and gradients are summed in a persistent fp32 buffer owned by the
optimizer, applied once per window of ``accumulation_steps`` micro-steps.
"""

from ._loss_scaling import LossScaling
from .adam import FusedAccumAdam, FusedAccumAdamW
from .backends import BACKEND_NAMES
from .grad_flow import plot_grad_flow, plot_grad_norm_history
from .sgd import FusedAccumSGD

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "FusedAccumAdam",
    "FusedAccumAdamW",
    "FusedAccumSGD",
    "LossScaling",
    "__version__",
    "plot_grad_flow",
    "plot_grad_norm_history",
]
