"""PyTorch peer of shards/bench/bench_cuda_moe.cpp: the same grouped expert FFN (DeepSeek-V3
shapes, bf16 weights, gather by token, weighted combine) as (a) a loop of torch.matmul per
expert and (b) torch._grouped_mm where this PyTorch has it, interleaved, median/min/max.
Also measures the dense bf16 GEMM rate and the device copy bandwidth in the same run (the
limits the BENCHMARKING rules ask ratios against).

    python3 shards/bench/torch_moe_peer.py --json OUT.json [--tokens 8,64,512,4096] [--runs 7]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

HIDDEN, INTER, EXPERTS, TOP_K = 7168, 2048, 256, 8


def timed(fn, min_s=0.05):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        torch.cuda.synchronize()
        el = time.perf_counter() - t0
        if el >= min_s:
            return el / calls


def stats(v):
    v = sorted(v)
    return {"median": v[len(v) // 2], "min": v[0], "max": v[-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", default="8,64,512,4096")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    name = torch.cuda.get_device_name(0)
    rows_out = []

    # Limits measured in this run.
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    dense = stats([2 * n**3 / timed(lambda: a @ b) / 1e12 for _ in range(args.runs)])
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy = stats([2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e9 for _ in range(args.runs)])
    del a, b, src, dst
    rows_out.append({"what": "dense_bf16_gemm", "shape": [n, n, n], "tflops": dense, "device": name})
    rows_out.append({"what": "copy_bandwidth", "bytes": 2 * 2 * 1024**3, "gbps": copy, "device": name})
    print(f"torch peer on {name}: dense bf16 GEMM {dense['median']:.1f} TFLOP/s, copy {copy['median']:.0f} GB/s")
    # The fp8 limit: a dense e4m3 GEMM (per-tensor scales, bf16 out) where torch has
    # _scaled_mm and the device fp8 tensor cores (sm_89+); the fp8 rows of em_bench_cuda_moe
    # compare against it.
    try:
        a8 = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        b8 = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.tensor(1.0, device=dev)

        def mm8():
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        dense8 = stats([2 * n**3 / timed(mm8) / 1e12 for _ in range(args.runs)])
        del a8, b8
        rows_out.append({"what": "dense_fp8_gemm", "shape": [n, n, n], "tflops": dense8, "device": name})
        print(f"torch peer on {name}: dense fp8 e4m3 GEMM (torch._scaled_mm) {dense8['median']:.1f} TFLOP/s")
    except Exception as e:  # noqa: BLE001 - older torch or a device without fp8: no row
        print(f"dense fp8 GEMM unavailable here: {e}")

    w1 = torch.randn(EXPERTS, INTER, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02
    w3 = torch.randn(EXPERTS, INTER, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device=dev, dtype=torch.bfloat16) * 0.02
    has_grouped = hasattr(torch, "_grouped_mm")

    for tokens in [int(t) for t in args.tokens.split(",")]:
        choice = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
        flat = choice.flatten()
        order = torch.argsort(flat, stable=True)
        token_of_row = (order // TOP_K).to(dev)
        counts = torch.bincount(flat, minlength=EXPERTS)
        offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
        counts_list = counts.tolist()
        rows = int(counts.sum())
        x = torch.randn(tokens, HIDDEN, device=dev) * 0.5
        row_weight = torch.full((rows, 1), 0.125, device=dev)

        def combine(o):
            y = torch.zeros(tokens, HIDDEN, device=dev)
            return y.index_add_(0, token_of_row, o.float() * row_weight)

        def loop():
            xg = x[token_of_row].to(torch.bfloat16)
            outs = []
            r0 = 0
            for e, c in enumerate(counts_list):
                if c == 0:
                    continue
                xe = xg[r0 : r0 + c]
                h = F.silu(xe @ w1[e].T) * (xe @ w3[e].T)
                outs.append(h @ w2[e].T)
                r0 += c
            return combine(torch.cat(outs))

        def grouped():
            xg = x[token_of_row].to(torch.bfloat16)
            g = torch._grouped_mm(xg, w1.transpose(-2, -1), offs=offs)
            u = torch._grouped_mm(xg, w3.transpose(-2, -1), offs=offs)
            return combine(torch._grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs))

        sides = {"torch loop": loop}
        if has_grouped:
            try:
                grouped()
                sides["torch _grouped_mm"] = grouped
            except Exception as e:  # noqa: BLE001 - report and go on with the loop
                print(f"torch._grouped_mm unavailable here: {e}")
        flops = 6.0 * rows * HIDDEN * INTER
        samples = {k: [] for k in sides}
        for _ in range(args.runs):
            for k, fn in sides.items():
                samples[k].append(flops / timed(fn) / 1e12)
        for k, v in samples.items():
            s = stats(v)
            print(
                f"moe_ffn bf16 tokens {tokens:5d} rows {rows:6d}  {k:18s} {s['median']:8.2f} TFLOP/s"
                f" (min {s['min']:.2f} max {s['max']:.2f})"
            )
            rows_out.append(
                {"what": "moe_ffn", "impl": k, "tokens": tokens, "rows": rows, "tflops": s, "device": name}
            )
    with open(args.json, "w") as f:
        json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
