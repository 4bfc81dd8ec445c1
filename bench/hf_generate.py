#!/usr/bin/env python3
"""The serve suite's peer: Hugging Face transformers `generate` on CPU at batch 1.

Started by bench/serve.ts with the golden venv's python (scripts/golden/setup.sh), as a
line-protocol server (bench/lib.ts LineClient), so the model loads once and the timed runs
can be interleaved with ours:

    python bench/hf_generate.py --model DIR --threads N [--dtype float32|bfloat16]

It prints one JSON line {"kind": "ready", ...} once the model is loaded, then answers each
JSON line {"cmd": "generate", "prompt": TEXT, "new_tokens": N} with
{"seconds": S, "prompt_tokens": P, "new_tokens": N}: the wall time of one greedy
`model.generate` (prefill included) that produces exactly N new tokens (min_new_tokens =
max_new_tokens = N, so an early end-of-sequence token cannot shorten it). {"cmd": "quit"}
exits.

The prompt is rendered with the checkpoint's chat template (as the gateway does for chat
completions), so both sides see the same prompt tokens.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def coerce_float_fields(cfg: dict, config_cls) -> dict:
    """JSON written by JavaScript cannot tell 0 from 0.0; transformers' strict config
    validation rejects an int where it declares a float (scripts/golden/make_goldens.py)."""
    hints: dict = {}
    for klass in reversed(config_cls.__mro__):
        hints.update(getattr(klass, "__annotations__", {}))
    for key, hint in hints.items():
        text = str(hint)
        value = cfg.get(key)
        if "float" in text and "int" not in text and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = float(value)
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = coerce_float_fields(cfg, config_cls)
    cfg.pop("quantization_config", None)
    config = config_cls.from_dict(cfg)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = getattr(transformers, arch).from_pretrained(str(model_dir), config=config, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))

    def encode(prompt: str) -> torch.Tensor:
        msgs = [{"role": "user", "content": prompt}]
        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        except Exception:  # no chat template: the raw text
            ids = tok(prompt)["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long)

    print(
        json.dumps(
            {
                "kind": "ready",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "load_seconds": load_s,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            if req.get("cmd") == "quit":
                break
            n = int(req["new_tokens"])
            ids = encode(req["prompt"])
            with torch.inference_mode():
                t = time.perf_counter()
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    use_cache=True,
                    pad_token_id=config.eos_token_id if config.pad_token_id is None else config.pad_token_id,
                )
                seconds = time.perf_counter() - t
            reply = {"seconds": seconds, "prompt_tokens": ids.shape[1], "new_tokens": out.shape[1] - ids.shape[1]}
        except Exception as e:  # reported to the caller, which fails the suite
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
