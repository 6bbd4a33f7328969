"""Parameter shape lists of real models, for benchmarks."""

from __future__ import annotations


def gpt2_124m() -> list[tuple[int, ...]]:
    """GPT-2 small: 148 tensors, 124.4M parameters, the 38.6M token embedding first."""
    hidden, vocab, context, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (context, hidden)]
    for _ in range(layers):
        shapes += [
            (hidden,), (hidden,),  # ln_1
            (hidden, 3 * hidden), (3 * hidden,),  # attention qkv
            (hidden, hidden), (hidden,),  # attention projection
            (hidden,), (hidden,),  # ln_2
            (hidden, 4 * hidden), (4 * hidden,),  # mlp up
            (4 * hidden, hidden), (hidden,),  # mlp down
        ]  # fmt: skip
    shapes += [(hidden,), (hidden,)]  # ln_f
    return shapes
