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


def llama_1b() -> list[tuple[int, ...]]:
    """A 1.1B Llama-like model (TinyLlama's shapes): 201 tensors, 22 layers of 9 with
    grouped-query attention, many small norm weights, a 65.5M embedding and an untied
    output layer."""
    hidden, intermediate, vocab, layers, kv = 2048, 5632, 32000, 22, 256
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [
            (hidden,),  # input norm
            (hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q k v o
            (hidden,),  # post-attention norm
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),  # mlp
        ]  # fmt: skip
    shapes += [(hidden,), (vocab, hidden)]  # final norm, output layer
    return shapes


def tiny() -> list[tuple[int, ...]]:
    """A few small tensors of odd sizes, for quick runs and tests."""
    return [(33, 17), (17,), (1000,), (5, 7, 3)]


SHAPE_LISTS = {"gpt2-124m": gpt2_124m, "llama-1b": llama_1b, "tiny": tiny}
