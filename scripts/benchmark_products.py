"""Products of the real 270M's shapes: F.linear, oneDNN (`dense`), skinny_linear.

The numbers behind `graphs/layers.py: linear`: for 1 and 4 rows (decode at batch 1
and 4), the median time of `x @ W.T` for the tied head and a layer's projections, and
the rate the weights stream at (bytes / time); then, for the layers' projections at
512 rows (a 512-token prefill), fp32 time and GFLOP/s. Random weights: only shapes
matter.

    python scripts/benchmark_products.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from optimum_gemma3.graphs import kernels

SHAPES = {  # name: (out features, in features) of Gemma-3 270M
    "head 262144x640": (262144, 640),
    "mlp up 2048x640": (2048, 640),
    "mlp down 640x2048": (640, 2048),
    "q 1024x640": (1024, 640),
    "o 640x1024": (640, 1024),
    "k, v 256x640": (256, 640),
}
PREFILL_ROWS = 512


def median_ms(product, x: torch.Tensor, weight: torch.Tensor, repeats: int) -> float:
    product(x, weight)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(x, weight)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.load():
        raise SystemExit("skinny_linear cannot be built or run here (needs AVX2 and a compiler)")
    products = {
        "F.linear": F.linear,
        "oneDNN": torch.ops.optimum_gemma3.dense,
        "skinny_linear": torch.ops.optimum_gemma3.skinny_linear,
    }
    print(f"{args.threads} threads, torch {torch.__version__}; ms (GB/s of weights)")
    print(f"{'shape':<20}{'dtype':<10}{'rows':>5}" + "".join(f"{n:>20}" for n in products))
    for name, (out_features, in_features) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.randn(out_features, in_features).to(dtype)
            gigabytes = weight.numel() * weight.element_size() / 1e9
            for rows in (1, 4):
                x = torch.randn(rows, in_features).to(dtype)
                cells = []
                for product_name, product in products.items():
                    if product_name == "oneDNN" and dtype != torch.float32:
                        cells.append(f"{'-':>20}")
                        continue
                    ms = median_ms(product, x, weight, args.repeats)
                    cells.append(f"{ms:>10.3f} ({gigabytes / ms * 1e3:5.1f})")
                print(f"{name:<20}{str(dtype)[6:]:<10}{rows:>5}" + "".join(cells))
    print(f"prefill-sized: {PREFILL_ROWS} rows; ms (GFLOP/s)")
    print(f"{'shape':<20}{'dtype':<10}{'rows':>5}{'F.linear':>20}{'oneDNN':>20}")
    for name, (out_features, in_features) in SHAPES.items():
        if name.startswith("head"):
            continue  # prefill runs the head on the last token only
        weight = torch.randn(out_features, in_features)
        x = torch.randn(PREFILL_ROWS, in_features)
        gigaflops = 2 * PREFILL_ROWS * out_features * in_features / 1e9
        cells = []
        for product_name in ("F.linear", "oneDNN"):
            ms = median_ms(products[product_name], x, weight, args.repeats)
            cells.append(f"{ms:>10.3f} ({gigaflops / ms * 1e3:5.1f})")
        print(f"{name:<20}{'float32':<10}{PREFILL_ROWS:>5}" + "".join(cells))


if __name__ == "__main__":
    main()
