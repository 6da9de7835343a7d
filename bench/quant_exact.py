"""The exact quantization scale (small layers) against the alternating method it replaced there:
the squared error each leaves, on random vectors, from one seeded run.

    python bench/quant_exact.py

Prints, per case, in how many of 60 vectors the alternating method (two starts) ends above the
exact optimum, and by how much at most. Exact is never above (tests/test_quant.py checks it
against brute force).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pruning import quant  # noqa: E402


def error(v, bits, exact):
    limit = quant.EXACT_BREAKPOINTS
    quant.EXACT_BREAKPOINTS = limit if exact else 0
    try:
        codes, q = quant.quantize(v, bits)
    finally:
        quant.EXACT_BREAKPOINTS = limit
    return float(((codes.double() * q - v.double()) ** 2).sum())


def main():
    torch.manual_seed(0)
    cases = {"9 normal weights, 4 bits": lambda: torch.randn(9),
             "300 Laplace weights, 4 bits": lambda: torch.distributions.Laplace(0.0, 1.0).sample((300,)),
             "100 normal weights, 2 bits": lambda: torch.randn(100)}
    for name, draw in cases.items():
        bits = 2 if "2 bits" in name else 4
        ratios = []
        for _ in range(60):
            v = draw()
            ratios.append(error(v, bits, exact=False) / error(v, bits, exact=True))
        worse = sum(r > 1 + 1e-6 for r in ratios)
        print(f"{name}: alternating above the exact optimum in {worse} of 60 vectors, "
              f"by up to {100 * (max(ratios) - 1):.1f} %; exact below alternating in none: {min(ratios) >= 1 - 1e-9}")


if __name__ == "__main__":
    main()
