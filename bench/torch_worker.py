"""PyTorch side of the kernel benchmark (bench/run.ts drives it; not run by hand).

A persistent process: bench/run.ts writes one JSON command per line on stdin and reads
one JSON reply per line on stdout, so our kernels and PyTorch's alternate (A B A B) in
the same run, on the same machine, with the same thread count. Timing is taken here,
around the calls only (no IPC in it). Anything the libraries print goes to stderr.

Commands:
  {"cmd": "hello"}                                   -> versions, threads, build config
  {"cmd": "probe"}                                   -> which kernels torch runs (oneDNN / MKL verbose)
  {"cmd": "setup", "key", "op": "matmul"|"ffn", "tokens", "dim", "inter", "dtype": "bf16"|"f32", "copies",
   "lib": "torch"|"numpy"}
  {"cmd": "setup", "key", "op": "sample", "file", "rows", "vocab", "temperature", "top_k", "top_p", "min_p",
   "logprobs"?: k}                                   (with logprobs: vLLM's logprobs instead of a pick)
  {"cmd": "run", "key", "calls"}                     -> {"seconds": wall time of `calls` calls}
  {"cmd": "free", "key"}
  {"cmd": "quit"}

matmul: y = F.linear(x, W), x [tokens, dim], W [inter, dim] (torch Linear layout; for the
V2-Lite / V3 expert shapes the bench passes dim = hidden, inter = moe_intermediate).
ffn:    y = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2), one expert, as in
DeepSeek's reference MLP. x has the weights' dtype (F.linear needs one dtype).
lib "numpy" (f32 only) runs the same with numpy's matmul on its bundled OpenBLAS: a second
fp32 reference, to tell whether torch's MKL picked a slow path on this CPU.
`copies` distinct copies of the weights are used round-robin so that, as in serving, the
weights come from memory and not from the last call's cache.
sample: one token per row of logits [rows, vocab] (float32 read from `file`) as vLLM's
sampler does it in PyTorch (vllm/v1/sample/ops/topk_topp_sampler.py and sampler.py):
greedy is argmax; otherwise logits / temperature, top-k alone by torch.topk, top-p (with
or without top-k) by sorting the row, masking and scattering back, then softmax and
probs / Exponential(1) noise, argmax (its random_sample). `run` returns the picked tokens
of its last call too (the bench checks they are kept tokens).
"""

import contextlib
import json
import os
import sys
import tempfile
import time

# Everything printed by libraries must stay off the reply channel.
_reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

# numpy's OpenBLAS (a second fp32 reference, see setup) reads its thread count at load.
if len(sys.argv) > 1 and int(sys.argv[1]) > 0:
    os.environ["OPENBLAS_NUM_THREADS"] = sys.argv[1]

import ctypes  # noqa: E402
import glob  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
cases = {}


def reply(obj):
    _reply.write(json.dumps(obj) + "\n")


def hello(threads):
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "parallel_info": torch.__config__.parallel_info(),
        "config": torch.__config__.show(),
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("OPENBLAS", "OMP_", "MKL", "KMP", "DNNL", "ONEDNN", "GOMP"))},
        "requested_threads": threads,
    }
    info["numpy"] = np.__version__
    info["numpy_blas"] = openblas_info()
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = threadpool_info()
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    return info


def openblas_info():
    """numpy's bundled OpenBLAS: the kernel (core) it picked at run time and its threads."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*.so*"))
    if not libs:
        return {"lib": None}
    lib = ctypes.CDLL(libs[0])
    out = {"lib": os.path.basename(libs[0])}
    for key, names in (("corename", ("scipy_openblas_get_corename64_", "openblas_get_corename")),
                       ("config", ("scipy_openblas_get_config64_", "openblas_get_config"))):
        for n in names:
            if hasattr(lib, n):
                f = getattr(lib, n)
                f.restype = ctypes.c_char_p
                out[key] = f().decode()
                break
    for n in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads"):
        if hasattr(lib, n):
            out["threads"] = getattr(lib, n)()
            break
    return out


@contextlib.contextmanager
def captured_output():
    """Collects what native code writes to fds 1 and 2 meanwhile."""
    with tempfile.TemporaryFile(mode="w+b") as f:
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        out = []
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            out.append(f.read().decode("utf-8", "replace"))


def probe():
    """Which kernels torch picks for F.linear at a decode and a prefill shape, per dtype:
    oneDNN and MKL verbose lines (they name the implementation and the ISA)."""
    result = {}
    for name, dt in DTYPES.items():
        for tokens in (1, 256):
            x = torch.randn(tokens, 2048).to(dt)
            w = (torch.randn(1408, 2048) * 0.02).to(dt)
            F.linear(x, w)
            with captured_output() as out:
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.backends.mkl.verbose(
                    torch.backends.mkl.VERBOSE_ON
                ):
                    F.linear(x, w)
            lines = [ln for ln in out[0].splitlines() if "verbose" in ln.lower()]
            result[f"{name}/tokens={tokens}"] = lines[:6] or ["(no oneDNN/MKL verbose output: a native ATen kernel ran)"]
    return result


def setup_sample(c):
    rows, vocab = c["rows"], c["vocab"]
    logits = torch.from_numpy(np.fromfile(c["file"], dtype=np.float32, count=rows * vocab).reshape(rows, vocab))
    cases[c["key"]] = {
        "op": "sample",
        "logits": logits,
        "temperature": float(c["temperature"]),
        "top_k": int(c.get("top_k") or 0),
        "top_p": float(c.get("top_p") or 1.0),
        "min_p": float(c.get("min_p") or 0.0),
        "gen": torch.Generator().manual_seed(0),
        "logprobs": c.get("logprobs"),
    }
    return {"ok": True}


def logprobs(case):
    """vLLM's logprobs: log_softmax of the row, the sampled token's entry, the top k."""
    logits = case["logits"]
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    chosen = lp.gather(-1, ids)
    top = lp.topk(case["logprobs"], dim=-1)
    return top.indices[:, 0] + 0 * chosen[:, 0].long()


def sample(case):
    if case.get("logprobs") is not None:
        return logprobs(case)
    logits, t, k, p = case["logits"], case["temperature"], case["top_k"], case["top_p"]
    if t <= 0:
        return logits.argmax(dim=-1)
    logits = logits / t
    vocab = logits.shape[-1]
    if case["min_p"] > 0:
        # vLLM's min_p: after the temperature, before top-k and top-p.
        probs = logits.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < case["min_p"] * top, -float("inf"))
    if p < 1.0:
        logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
        if 0 < k < vocab:
            kth = logits_sort.gather(1, torch.full((logits.shape[0], 1), vocab - k, dtype=torch.long))
            logits_sort.masked_fill_(logits_sort < kth, -float("inf"))
        probs_sort = logits_sort.softmax(dim=-1)
        probs_sum = torch.cumsum(probs_sort, dim=-1, out=probs_sort)
        mask = probs_sum <= 1 - p
        mask[:, -1] = False
        logits_sort.masked_fill_(mask, -float("inf"))
        logits = logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)
    elif 0 < k < vocab:
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    q = torch.empty_like(probs).exponential_(generator=case["gen"])
    return probs.div_(q).argmax(dim=-1)


def setup(c):
    if c["op"] == "sample":
        return setup_sample(c)
    dt = DTYPES[c["dtype"]]
    gen = torch.Generator().manual_seed(0)
    tokens, dim, inter = c["tokens"], c["dim"], c["inter"]
    x = torch.randn(tokens, dim, generator=gen).to(dt)
    if c["op"] == "matmul":
        base = [(torch.randn(inter, dim, generator=gen) * 0.02).to(dt)]
    else:
        base = [
            (torch.randn(inter, dim, generator=gen) * 0.02).to(dt),  # w1 gate_proj
            (torch.randn(inter, dim, generator=gen) * 0.02).to(dt),  # w3 up_proj
            (torch.randn(dim, inter, generator=gen) * 0.02).to(dt),  # w2 down_proj
        ]
    copies = [base] + [[w.clone() for w in base] for _ in range(max(1, c["copies"]) - 1)]
    lib = c.get("lib", "torch")
    if lib == "numpy":  # W [out, in] as numpy; x @ W.T is a transposed-B sgemm, no copy
        x = x.numpy()
        copies = [[w.numpy() for w in ws] for ws in copies]
    cases[c["key"]] = {"op": c["op"], "lib": lib, "x": x, "copies": copies, "next": 0}
    return {"ok": True, "weight_bytes": sum(w.numel() * w.element_size() for w in base)}


def run(c):
    case = cases[c["key"]]
    if case["op"] == "sample":
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(c["calls"]):
                tokens = sample(case)
            s = time.perf_counter() - t0
        return {"seconds": s, "tokens": tokens.tolist()}
    x, copies, n = case["x"], case["copies"], len(case["copies"])
    i = case["next"]
    calls = c["calls"]
    if case["lib"] == "numpy":
        t0 = time.perf_counter()
        for k in range(calls):
            ws = copies[(i + k) % n]
            if case["op"] == "matmul":
                x @ ws[0].T
            else:
                g = x @ ws[0].T
                u = x @ ws[1].T
                g *= u / (1.0 + np.exp(-g))  # silu(g) * u
                g @ ws[2].T
        s = time.perf_counter() - t0
        case["next"] = (i + calls) % n
        return {"seconds": s}
    with torch.inference_mode():
        if case["op"] == "matmul":
            t0 = time.perf_counter()
            for k in range(calls):
                (w,) = copies[(i + k) % n]
                F.linear(x, w)
            s = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            for k in range(calls):
                w1, w3, w2 = copies[(i + k) % n]
                F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
            s = time.perf_counter() - t0
    case["next"] = (i + calls) % n
    return {"seconds": s}


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        c = json.loads(line)
        try:
            cmd = c["cmd"]
            if cmd == "hello":
                reply(hello(threads))
            elif cmd == "probe":
                reply(probe())
            elif cmd == "setup":
                reply(setup(c))
            elif cmd == "run":
                reply(run(c))
            elif cmd == "free":
                cases.pop(c["key"], None)
                reply({"ok": True})
            elif cmd == "quit":
                reply({"ok": True})
                return
            else:
                reply({"error": f"unknown command {cmd}"})
        except Exception as e:  # report, keep serving
            reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
