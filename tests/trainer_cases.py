"""What the trainer integration tests share: a tiny token-classification MLP (labels
partly -100, so micro-batches hold different token counts), its data, and the
references a trained model is held against:

- ``fp64_reference``: AdamW in fp64 on each window's exact mean gradient (the token mean
  over the window, or the mean of the micro-batches' token means), clipped as
  ``clip_grad_norm_`` would clip it;
- ``bf16_ideal``: for bf16 parameters, the micro-batches' own bf16 gradients summed in
  fp32, AdamW computed in fp32 and the parameter rounded once per update: what exact
  accumulation gives a bf16 model, whatever its forward and backward round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

D_IN, D_HID, N_CLASSES, SEQ = 8, 16, 5, 6
N = 4  # micro-batches per window
BATCH = 2
UPDATES = 5
LR = 1e-2
CLIP = 0.05  # below every window's norm here: every window clips


def make_data(count: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """``count`` items of SEQ tokens; ``scale`` the inputs' standard deviation."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        labels = torch.randint(0, N_CLASSES, (SEQ,), generator=generator)
        ignored = torch.rand(SEQ, generator=generator) < 0.4
        ignored[0] = False  # at least one counted token
        labels[ignored] = -100
        x = torch.randn(SEQ, D_IN, generator=generator) * scale
        items.append({"x": x, "labels": labels})
    return items


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = torch.nn.Linear(D_IN, D_HID)
        self.lin2 = torch.nn.Linear(D_HID, N_CLASSES)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x.to(self.lin1.weight.dtype))))


def token_loss(logits, labels, num_items=None) -> torch.Tensor:
    """The sum of the token losses over ``num_items`` (default: this batch's tokens)."""
    total = F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return total / (labels.ne(-100).sum() if num_items is None else num_items)


def model(dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(0)
    return MLP().to(dtype)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _window_loss(net, window, mode, x_dtype=None):
    """The losses whose gradients sum to the window's mean gradient, one per micro-batch."""
    if mode == "tokens":
        count = sum(int(labels.ne(-100).sum()) for _, labels in window)
        return [token_loss(net.logits(x), labels, count) for x, labels in window]
    return [token_loss(net.logits(x), labels) / len(window) for x, labels in window]


def fp64_reference(
    init, windows, *, mode, clip=None, lrs=None, weight_decay=0.0, dtype=torch.float64
):
    """(parameters, pre-clip norms) of fp64 AdamW on each window's mean gradient;
    ``windows``: lists of (x, labels); ``lrs``: the learning rate per update.
    ``dtype=torch.float32``: torch.optim's own fp32 run of the same."""
    net = MLP().to(dtype)
    net.load_state_dict({k: v.to(dtype) for k, v in init.items()})
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=weight_decay)
    norms = []
    for index, window in enumerate(windows):
        optimizer.zero_grad()
        for loss in _window_loss(net, [(x.to(dtype), y) for x, y in window], mode):
            loss.backward()
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs[index]
        limit = float("inf") if clip is None else clip
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), limit)))
        optimizer.step()
    return snapshot(net), norms


def check_fp32_run(trained, init, windows, *, mode, clip, lrs, weight_decay) -> list[float]:
    """Assert that fp32 parameters ``trained`` are as close to the fp64 reference as
    torch.optim's own fp32 run on the same windows is (within 2x): at the small learning
    rates of a recipe, fp32 rounding of the weights dominates both. Returns the
    reference's pre-clip norms."""
    settings = dict(mode=mode, clip=clip, lrs=lrs, weight_decay=weight_decay)
    expected, norms = fp64_reference(init, windows, **settings)
    torch_fp32, _ = fp64_reference(init, windows, **settings, dtype=torch.float32)
    ours, theirs = moved_off(trained, expected, init), moved_off(torch_fp32, expected, init)
    assert ours <= 2 * theirs, f"{ours:.3g} off fp64, torch.optim's fp32 run {theirs:.3g}"
    return norms


def bf16_ideal(init, windows, *, mode, clip=None):
    """bf16 parameters updated from the window's bf16 micro-batch gradients summed in
    fp32, with fp32 AdamW state, rounded once per update."""
    net = MLP().to(torch.bfloat16)
    net.load_state_dict(init)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in net.parameters()]
    optimizer = torch.optim.AdamW(shadow, lr=LR, weight_decay=0.0)
    for window in windows:
        sums = [torch.zeros_like(s) for s in shadow]
        for loss in _window_loss(net, window, mode):
            net.zero_grad()
            loss.backward()
            for total, param in zip(sums, net.parameters(), strict=True):
                total += param.grad.float()
        for s, param, total in zip(shadow, net.parameters(), sums, strict=True):
            s.data.copy_(param.detach().float())
            s.grad = total
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(shadow, clip)
        optimizer.step()
        with torch.no_grad():
            for s, param in zip(shadow, net.parameters(), strict=True):
                param.copy_(s)
    return snapshot(net)


def moved_off(trained, reference, init) -> float:
    """The largest, over tensors, of |trained - reference| / |reference - init|: the
    distance from the reference relative to how far training moved the weights."""
    worst = 0.0
    for key, expected in reference.items():
        expected = expected.double()
        moved = (expected - init[key].double()).norm()
        worst = max(worst, float((trained[key].double() - expected).norm() / moved))
    return worst


def linear(lr: float, updates: int) -> list[float]:
    """The learning rate of each update under a linear decay to 0 without warmup (HF's
    "linear", ``LinearLR(optimizer, 1.0, 0.0, total_iters=updates)``)."""
    return [lr * (updates - k) / updates for k in range(updates)]


def windows_of(micro_batches: list, size: int = N) -> list:
    return [micro_batches[i : i + size] for i in range(0, len(micro_batches), size)]
