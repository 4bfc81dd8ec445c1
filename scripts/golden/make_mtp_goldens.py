"""Golden outputs of the multi-token-prediction (MTP) layer of a tiny checkpoint.

Usage: make_mtp_goldens.py CHECKPOINT_DIR OUT_JSON

The checkpoint comes from `expertmesh make-tiny-model --arch v3 --mtp`. Hugging Face
transformers ignores MTP layers, so these goldens come from the float64 numpy port of the
reference alone (reference_numpy.py, ReferenceModel.mtp_logits: the module as vLLM's
DeepSeekMTP runs it). Needs numpy only; safetensors files are parsed here (bf16 and f32).

Per prompt: the main model's greedy next token after the prompt (argmax of the reference's
last logits row) and the MTP layer's logits for every position, given that token after the
last one; for prompt 1, two more rows: the layer chained on its own output (its last row's
hidden state and argmax, one position further), as chained MTP drafts run it. The engine test (test/engine/mtp.test.ts) compares its MTP step against them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import prompt_ids  # noqa: E402
from reference_numpy import ReferenceModel  # noqa: E402

# Prompt lengths; ids from prompts.py, as make_goldens.py's.
LENGTHS = [5, 12, 23]
RELATIVE_TOLERANCE = 1e-4


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one file as float64 (BF16 and F32 only: what the tiny model writes)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin : base + end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        else:
            sys.exit(f"{path}: tensor {name} has dtype {info['dtype']}; only BF16 and F32 are read here")
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ckpt, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    cfg_bytes = (ckpt / "config.json").read_bytes()
    cfg = json.loads(cfg_bytes)
    if cfg.get("num_nextn_predict_layers", 0) < 1:
        sys.exit(f"{ckpt}: no MTP layer (num_nextn_predict_layers is 0); make it with --mtp")
    weights = ckpt / "model.safetensors"
    tensors = read_safetensors(weights)
    model = ReferenceModel(cfg, tensors)
    prompts = []
    for i, length in enumerate(LENGTHS):
        ids = prompt_ids(i, length, cfg["vocab_size"])
        main_logits = model.forward(ids)
        nxt = int(np.argmax(main_logits[-1]))
        # Prompt 1 chains the layer twice more: its logits have 2 more rows.
        mtp = model.mtp_logits(ids, nxt, chain=2 if i == 1 else 0).astype(np.float32)
        prompts.append(
            {
                "token_ids": ids,
                "next_token": nxt,
                "shape": list(mtp.shape),
                "max_abs_logit": float(np.abs(mtp).max()),
                "argmax": [int(a) for a in mtp.argmax(axis=-1)],
                "mtp_logits_f32_b64": base64.b64encode(mtp.tobytes()).decode(),
            }
        )
        print(f"[mtp-golden] prompt {i}: {length} tokens, next {nxt}, MTP argmax {prompts[-1]['argmax']}", file=sys.stderr)
    doc = {
        "format": "expertmesh-mtp-golden-v1",
        "description": "MTP layer logits per position (row i predicts token i + 2), float64 numpy reference cast to float32",
        "generator": "scripts/golden/make_mtp_goldens.py",
        "checkpoint": {
            "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        },
        "tolerance": {"rule": "max|engine - golden| <= relative * max|golden| per prompt", "relative": RELATIVE_TOLERANCE},
        "prompts": prompts,
    }
    out_path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
