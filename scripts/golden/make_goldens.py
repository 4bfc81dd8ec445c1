#!/usr/bin/env python3
"""Golden outputs for the expertmesh engine, computed by Hugging Face transformers.

Usage:
  make_goldens.py CHECKPOINT_DIR OUT_JSON [--fp8-dequant] [--no-check]

Loads a DeepSeek-V2/V3 Hugging Face checkpoint directory (config.json, model.safetensors or
model.safetensors.index.json + shards) into transformers' DeepseekV2ForCausalLM /
DeepseekV3ForCausalLM in float32 on CPU, patches transformers where it departs from
DeepSeek's reference implementation (deepseek-ai/DeepSeek-V3 inference/model.py), and writes
a small JSON fixture: full-sequence logits for three fixed prompts, 32 greedy tokens after the
first prompt, the checkpoint's hashes and figures, versions and the patches applied.

Meant for small checkpoints (it keeps a float32 copy of every weight in memory and in a
temporary folder). fp8 checkpoints (quantization_config fmt e4m3 with weight_scale_inv tensors) need
--fp8-dequant: every fp8 weight becomes float32 `fp8_value * scale_inv[row // 128, col // 128]`
before the same float32 model runs (goldens "against a dequantized reference").

Unless --no-check, the script also runs an independent float64 numpy port of the reference
(reference_numpy.py) and fails if the patched model's logits differ from it by more than the
engine's tolerance; it records how far unpatched transformers is from the reference, and checks
one MoE layer's routing by hand. See docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

sys.dont_write_bytecode = True  # no __pycache__ in the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_numpy  # noqa: E402
from prompts import prompt_ids  # noqa: E402

FORMAT = "expertmesh-golden/1"
PROMPT_LENGTHS = (7, 16, 24)
GREEDY_TOKENS = 32
REL_TOLERANCE = 1e-4  # engine tests: max|delta| <= REL_TOLERANCE * max|logit|
FP8_BLOCK = 128


def log(msg: str) -> None:
    print(f"[golden] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> NoReturn:
    print(f"[golden] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# --------------------------------------------------------------------------------------------
# Checkpoint reading and fp8 dequantization
# --------------------------------------------------------------------------------------------


def safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [ckpt / f for f in sorted(set(weight_map.values()))]
    single = ckpt / "model.safetensors"
    if single.exists():
        return [single]
    fail(f"{ckpt}: neither model.safetensors nor model.safetensors.index.json")


def sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def is_fp8_checkpoint(cfg: dict, tensors: dict[str, torch.Tensor]) -> bool:
    q = cfg.get("quantization_config")
    has_scales = any(k.endswith("weight_scale_inv") for k in tensors)
    if q is None:
        if has_scales:
            fail("checkpoint has weight_scale_inv tensors but no quantization_config in config.json")
        return False
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        fail(f"unsupported quantization_config {q!r} (only fp8 e4m3 block-wise)")
    if list(q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
        fail(f"unsupported weight_block_size {q.get('weight_block_size')!r} (only [128, 128])")
    if not has_scales:
        fail("quantization_config says fp8 but no weight_scale_inv tensors were found")
    return True


def dequantize_fp8(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """weight_fp32 = float(fp8 weight) * scale_inv of its 128x128 block (as the reference's weight_dequant).

    Returns the new tensor dict (scale tensors removed) and how many weights were dequantized.
    """
    out: dict[str, torch.Tensor] = {}
    count = 0
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            if t.dtype == torch.float8_e4m3fn:
                fail(f"{name} is fp8 but has no {name}_scale_inv")
            out[name] = t
            continue
        if t.dtype != torch.float8_e4m3fn:
            fail(f"{name} has a scale_inv but dtype {t.dtype}, expected float8_e4m3fn")
        rows, cols = t.shape
        want = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
        if tuple(scale.shape) != want:
            fail(f"{name}_scale_inv has shape {tuple(scale.shape)}, expected {want} for weight {tuple(t.shape)}")
        full = scale.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
        out[name] = t.float() * full
        count += 1
    orphans = [k for k in tensors if k.endswith("_scale_inv") and k[: -len("_scale_inv")] not in tensors]
    if orphans:
        fail(f"scale tensors without weights: {orphans[:3]}")
    return out, count


# --------------------------------------------------------------------------------------------
# Patches: transformers -> DeepSeek reference (deepseek-ai/DeepSeek-V3 inference/model.py)
# --------------------------------------------------------------------------------------------

PATCHES: list[dict] = []  # filled by install_patches(); written to the fixture


def _register(name: str, follows: str, summary: str) -> None:
    PATCHES.append({"name": name, "follows": follows, "summary": summary})


def reference_softmax_scale(config) -> float:
    """Attention softmax scale of the reference MLA.__init__.

    softmax_scale = qk_head_dim ** -0.5, times mscale**2 with
    mscale = 0.1 * mscale_all_dim * ln(factor) + 1 when YaRN extends the context (factor > 1).
    """
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rp = getattr(config, "rope_parameters", None) or {}
    if rp.get("rope_type", "default") == "yarn" and float(rp.get("factor") or 1.0) > 1.0:
        m = 0.1 * float(rp.get("mscale_all_dim") or 0.0) * math.log(float(rp["factor"])) + 1.0
        scale *= m * m
    return scale


def _router_settings(config) -> dict:
    topk_method = getattr(config, "topk_method", None) or "greedy"
    if topk_method == "gready":
        topk_method = "greedy"
    if config.model_type == "deepseek_v3" and getattr(config, "topk_method", None) is None:
        topk_method = "noaux_tc"
    return {
        "score_func": getattr(config, "scoring_func", None) or ("sigmoid" if config.model_type == "deepseek_v3" else "softmax"),
        "topk_method": topk_method,
        "norm_topk_prob": bool(getattr(config, "norm_topk_prob", False)),
        "n_group": int(getattr(config, "n_group", None) or 1),
        "topk_group": int(getattr(config, "topk_group", None) or 1),
        "top_k": int(config.num_experts_per_tok),
        "route_scale": float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
    }


def reference_gate_forward(self, hidden_states):
    """Router forward following the reference Gate.forward (model.py, class Gate).

    scores = softmax(logits) (fp32) or sigmoid(logits); selection uses scores + bias
    (e_score_correction_bias, noaux_tc only); with groups, a group scores its max
    (no bias) or the sum of its top-2 (with bias), the top `topk_group` groups are kept and the
    others are masked with -inf; top-k experts are then chosen from the kept ones; weights are
    the unbiased scores of the chosen experts, renormalised to sum 1 when norm_topk_prob, then
    always multiplied by routed_scaling_factor. Returns transformers' (router_logits, weights,
    indices) triple.
    """
    s = self._em_ref
    x = hidden_states.reshape(-1, self.weight.shape[1])
    logits = torch.nn.functional.linear(x.float(), self.weight.float())
    if s["score_func"] == "softmax":
        scores = logits.softmax(dim=-1, dtype=torch.float32)
    elif s["score_func"] == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown scoring_func {s['score_func']!r}")
    original = scores
    bias = getattr(self, "e_score_correction_bias", None) if s["topk_method"] == "noaux_tc" else None
    if bias is not None:
        scores = scores + bias.float()
    groups = s["n_group"] if s["topk_method"] != "greedy" else 1
    if groups > 1:
        scores = scores.view(x.size(0), groups, -1)
        if bias is None:
            group_scores = scores.amax(dim=-1)
        else:
            group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
        keep = group_scores.topk(s["topk_group"], dim=-1)[1]
        mask = scores.new_ones(x.size(0), groups, dtype=torch.bool).scatter_(1, keep, False)
        scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, s["top_k"], dim=-1)[1]
    weights = original.gather(1, indices)
    if s["norm_topk_prob"]:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * s["route_scale"]
    return logits, weights, indices


def patch_router(router_cls) -> None:
    """Replace a transformers TopkRouter's forward with reference_gate_forward.

    The settings the reference reads (scoring_func, topk_method, norm_topk_prob, groups, scale)
    are captured from the config in a wrapped __init__, because transformers' router classes
    do not keep them all (the V2 router ignores norm_topk_prob, the V3 router ignores
    scoring_func and topk_method).
    """
    original_init = router_cls.__init__

    def __init__(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        self._em_ref = _router_settings(config)

    router_cls.__init__ = __init__
    router_cls.forward = reference_gate_forward


def patch_attention_scale(attn_cls) -> None:
    """Set each MLA module's softmax scale to reference_softmax_scale(config) after __init__."""
    original_init = attn_cls.__init__

    def __init__(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        self.scaling = reference_softmax_scale(config)

    attn_cls.__init__ = __init__


def patch_rope_no_attention_factor(rotary_cls) -> None:
    """Force the rotary embedding's attention_scaling (YaRN 'attention_factor') to 1.0.

    transformers multiplies cos/sin (V3) or the complex rotation (V2) by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (or mscale(factor) when either key
    is missing); the reference's apply_rotary_emb never scales the rotation.
    """
    original_init = rotary_cls.__init__

    def __init__(self, config, *args, **kwargs):
        original_init(self, config, *args, **kwargs)
        self.attention_scaling = 1.0

    rotary_cls.__init__ = __init__


def install_patches() -> None:
    """Apply every reference patch to transformers' DeepSeek V2/V3 classes (once)."""
    if PATCHES:
        return
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m3

    for cls in (m2.DeepseekV2TopkRouter, m3.DeepseekV3TopkRouter):
        patch_router(cls)
    _register(
        "router_reference_gate",
        "model.py Gate.forward",
        "-inf (not 0) for unselected groups; group score = max (no bias) or top-2 sum (bias); "
        "scoring_func and topk_method honoured by V3 too; renormalise iff norm_topk_prob (V2 ignored it), "
        "no +1e-20; routed_scaling_factor always applied; fp32 gate logits",
    )
    for cls in (m2.DeepseekV2Attention, m3.DeepseekV3Attention):
        patch_attention_scale(cls)
    _register(
        "attention_softmax_scale",
        "model.py MLA.__init__ (softmax_scale *= mscale * mscale)",
        "softmax scale = qk_head_dim^-0.5 * (0.1*mscale_all_dim*ln(factor)+1)^2 under YaRN, for V2 and V3",
    )
    for cls in (m2.DeepseekV2RotaryEmbedding, m3.DeepseekV3RotaryEmbedding):
        patch_rope_no_attention_factor(cls)
    _register(
        "rope_no_attention_factor",
        "model.py precompute_freqs_cis / apply_rotary_emb (unit-magnitude rotation)",
        "YaRN attention_factor on cos/sin forced to 1.0",
    )
    _register(
        "rope_interleave",
        "model.py apply_rotary_emb (view_as_complex over consecutive pairs)",
        "V3 config.rope_interleave forced to true; V2 already rotates interleaved pairs",
    )


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


def coerce_float_fields(cfg: dict) -> dict:
    """Turn integral numbers into floats where transformers' config class declares a float field.

    JSON writers that cannot tell 0 from 0.0 (JavaScript's, as used by make-tiny-model) write
    e.g. "attention_dropout": 0, which transformers' strict config validation rejects.
    """
    import transformers

    cls = getattr(transformers, cfg["architectures"][0].replace("ForCausalLM", "Config"))
    hints: dict = {}
    for klass in reversed(cls.__mro__):
        hints.update(getattr(klass, "__annotations__", {}))
    for key, hint in hints.items():
        text = str(hint)
        value = cfg.get(key)
        if "float" in text and "int" not in text and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = float(value)
    return cfg


def write_fp32_checkpoint(cfg: dict, tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """A float32 copy of the checkpoint without quantization_config, for from_pretrained."""
    from safetensors.torch import save_file

    cfg = coerce_float_fields(dict(cfg))
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))


def load_model(fp32_dir: Path, arch: str, patched: bool):
    import transformers

    if patched:
        install_patches()
    cls = getattr(transformers, arch)
    config = transformers.AutoConfig.from_pretrained(str(fp32_dir))
    if patched and config.model_type == "deepseek_v3":
        config.rope_interleave = True
    kwargs = dict(config=config, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    try:
        model, info = cls.from_pretrained(str(fp32_dir), experts_implementation="eager", **kwargs)
    except TypeError:
        model, info = cls.from_pretrained(str(fp32_dir), **kwargs)
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    if missing or mismatched or unexpected:
        fail(f"weights did not load cleanly: missing={missing[:5]} mismatched={mismatched[:5]} unexpected={unexpected[:5]}")
    model.eval()
    for p in model.parameters():
        if p.dtype != torch.float32:
            fail(f"parameter in {p.dtype}, expected float32")
    return model


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def full_logits(model, ids: list[int]) -> np.ndarray:
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float], np.ndarray]:
    """n greedy tokens with the model's KV cache; returns tokens, top-1 minus top-2 margins, step logits."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = out.cache
    logits = out.logits[0, -1]
    tokens, margins, steps = [], [], []
    for _ in range(n):
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        steps.append(logits.numpy().copy())
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1]
    return tokens, margins, np.stack(steps)


def b64_f32(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def rel_delta(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    d = float(np.max(np.abs(a.astype(np.float64) - ref)))
    return d, d / float(np.max(np.abs(ref)))


# --------------------------------------------------------------------------------------------
# Independent checks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def gate_check(model, ref_cfg: dict, np_tensors: dict[str, np.ndarray], ids: list[int]) -> dict:
    """Capture the first MoE layer's router input in the patched model; recompute its routing in numpy."""
    layer = next(i for i, l in enumerate(model.model.layers) if hasattr(l.mlp, "gate"))
    router = model.model.layers[layer].mlp.gate
    seen = {}

    def hook(mod, inputs, output):
        seen["x"] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy()
        seen["w"] = output[1].detach().double().numpy()
        seen["i"] = output[2].detach().numpy()

    h = router.register_forward_hook(hook)
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        h.remove()
    args = reference_numpy.RefArgs.from_config(ref_cfg)
    p = f"model.layers.{layer}.mlp."
    logits = seen["x"] @ np_tensors[p + "gate.weight"].T
    g = reference_numpy.reference_gate(args, logits, np_tensors.get(p + "gate.e_score_correction_bias"))
    same = bool(np.array_equal(np.sort(g.indices, 1), np.sort(seen["i"], 1)))
    # compare weights expert-by-expert
    order_hf = np.argsort(seen["i"], 1)
    order_np = np.argsort(g.indices, 1)
    w_hf = np.take_along_axis(seen["w"], order_hf, 1)
    w_np = np.take_along_axis(g.weights, order_np, 1)
    wdelta = float(np.max(np.abs(w_hf - w_np)))
    return {"layer": layer, "tokens": len(ids), "same_experts": same, "max_weight_delta": wdelta, "min_margin": g.margin}


@torch.no_grad()
def synthetic_gate_check(model, ref_cfg: dict, np_tensors: dict[str, np.ndarray]) -> dict:
    """Patched router vs numpy reference on random inputs, with the bias pushed negative.

    Shifting e_score_correction_bias by -1.5 makes most selection scores negative, which is where
    masking unselected groups with 0 instead of -inf picks the wrong experts.
    """
    layer = next(i for i, l in enumerate(model.model.layers) if hasattr(l.mlp, "gate"))
    router = model.model.layers[layer].mlp.gate
    p = f"model.layers.{layer}.mlp."
    args = reference_numpy.RefArgs.from_config(ref_cfg)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(256, router.weight.shape[1], generator=gen, dtype=torch.float32) * 2.0
    has_bias = hasattr(router, "e_score_correction_bias") and router._em_ref["topk_method"] == "noaux_tc"
    saved = router.e_score_correction_bias.clone() if has_bias else None
    try:
        if has_bias:
            router.e_score_correction_bias.sub_(1.5)
        _, w, i = router(x)
        bias = router.e_score_correction_bias.double().numpy() if has_bias else None
    finally:
        if has_bias:
            router.e_score_correction_bias.copy_(saved)
    logits = x.double().numpy() @ np_tensors[p + "gate.weight"].T
    g = reference_numpy.reference_gate(args, logits, bias)
    same = bool(np.array_equal(np.sort(g.indices, 1), np.sort(i.numpy(), 1)))
    return {"tokens": 256, "bias_shift": -1.5 if has_bias else 0.0, "same_experts": same}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


FIGURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
    "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
    "rope_theta", "rope_scaling", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "torch_dtype",
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--fp8-dequant", action="store_true", help="dequantize fp8 e4m3 weights to float32 first")
    ap.add_argument("--no-check", action="store_true", help="skip the numpy reference cross-check")
    a = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)

    ckpt: Path = a.checkpoint
    cfg_path = ckpt / "config.json"
    if not cfg_path.exists():
        fail(f"{cfg_path} not found")
    cfg_bytes = cfg_path.read_bytes()
    cfg = json.loads(cfg_bytes)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        fail(f"architectures[0] is {arch!r}; expected DeepseekV2ForCausalLM or DeepseekV3ForCausalLM")
    files = safetensors_files(ckpt)
    log(f"{ckpt}: {arch}, {len(files)} safetensors file(s)")
    tensors = load_tensors(files)
    fp8 = is_fp8_checkpoint(cfg, tensors)
    if fp8 and not a.fp8_dequant:
        fail("fp8 checkpoint: pass --fp8-dequant to compute goldens against the dequantized weights")
    if a.fp8_dequant and not fp8:
        fail("--fp8-dequant given but the checkpoint is not fp8 (no quantization_config)")
    n_dequant = 0
    if fp8:
        tensors, n_dequant = dequantize_fp8(tensors)
        log(f"dequantized {n_dequant} fp8 weights to float32 (128x128 block scales)")
    tensors = {k: v for k, v in tensors.items() if not _is_mtp_name(k, cfg)}

    vocab = int(cfg["vocab_size"])
    prompts = [prompt_ids(i, n, vocab) for i, n in enumerate(PROMPT_LENGTHS)]

    with tempfile.TemporaryDirectory(prefix="em-golden-") as tmp:
        tmpdir = Path(tmp)
        write_fp32_checkpoint(cfg, tensors, tmpdir)
        unpatched = None
        if not a.no_check:
            log("running unpatched transformers (for the record)")
            m0 = load_model(tmpdir, arch, patched=False)
            unpatched = [full_logits(m0, ids) for ids in prompts]
            del m0
        log("running patched transformers (float32, CPU)")
        model = load_model(tmpdir, arch, patched=True)
        logits = [full_logits(model, ids) for ids in prompts]
        tokens, margins, step_logits = greedy(model, prompts[0], GREEDY_TOKENS)
        # the same tokens by recomputing the whole sequence each step (no KV cache)
        recompute = full_logits(model, prompts[0] + tokens[:-1])[len(prompts[0]) - 1 :]
        cache_vs_recompute = float(np.max(np.abs(recompute - step_logits)))
        if [int(x) for x in recompute.argmax(-1)] != tokens:
            fail("greedy tokens with KV cache differ from recomputation without cache")

        checks: dict = {"kv_cache_vs_recompute_max_abs_delta": cache_vs_recompute}
        if not a.no_check:
            np_tensors = {k: v.double().numpy() for k, v in tensors.items()}
            ref = reference_numpy.ReferenceModel(cfg, np_tensors)
            ref_rows = []
            for i, ids in enumerate(prompts):
                r = ref.forward(ids)
                d, rel = rel_delta(logits[i], r)
                du, relu = rel_delta(unpatched[i], r)
                ref_rows.append({
                    "prompt": i, "max_abs_delta": d, "relative": rel, "route_margin": ref.route_margin,
                    "unpatched_max_abs_delta": du, "unpatched_relative": relu,
                })  # fmt: skip
                ref.route_margin = math.inf
                log(f"prompt {i}: patched vs numpy reference rel {rel:.2e}; unpatched transformers rel {relu:.2e}")
                if rel > REL_TOLERANCE:
                    fail(f"prompt {i}: patched transformers differs from the numpy reference by {rel:.3e} x max|logit|")
            rg = ref.forward(prompts[0] + tokens)
            ref_greedy = [int(x) for x in rg[len(prompts[0]) - 1 : -1].argmax(-1)]
            if ref_greedy != tokens:
                fail(f"greedy tokens differ from the numpy reference: {tokens} vs {ref_greedy}")
            checks["numpy_reference"] = ref_rows
            checks["numpy_reference_greedy_tokens_match"] = True
            checks["gate"] = gate_check(model, cfg, np_tensors, prompts[2])
            checks["gate_synthetic"] = synthetic_gate_check(model, cfg, np_tensors)
            if not (checks["gate"]["same_experts"] and checks["gate_synthetic"]["same_experts"]):
                fail(f"router check failed: {checks['gate']} {checks['gate_synthetic']}")
            log(f"gate checks: {checks['gate']} {checks['gate_synthetic']}")

    import transformers

    fixture = {
        "format": FORMAT,
        "description": "Golden outputs of transformers patched to follow DeepSeek's reference; see docs/fidelity.md",
        "generator": {
            "script": "scripts/golden/make_goldens.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "eager",
        },
        "checkpoint": {
            "name": ckpt.resolve().name,
            "architecture": arch,
            "model_type": cfg.get("model_type"),
            "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
            "weights_sha256": sha256_files(files),
            "fp8_dequantized": fp8,
            "fp8_dequantized_weights": n_dequant,
            "figures": {k: cfg.get(k) for k in FIGURE_KEYS if k in cfg},
        },
        "patches": PATCHES,
        "tolerance": {"rule": "max|engine - golden| <= relative * max|golden| per prompt", "relative": REL_TOLERANCE},
        "logits_encoding": "base64 of little-endian float32, row-major [seq, vocab]",
        "prompts": [
            {
                "token_ids": ids,
                "shape": [len(ids), vocab],
                "max_abs_logit": float(np.max(np.abs(l))),
                "argmax": [int(x) for x in l.argmax(-1)],
                "logits_f32_b64": b64_f32(l),
            }
            for ids, l in zip(prompts, logits)
        ],
        "greedy": {
            "prompt_index": 0,
            "new_tokens": GREEDY_TOKENS,
            "stop_at_eos": False,
            "tokens": tokens,
            "min_top2_margin": min(margins),
            "top2_margins": margins,
        },
        "checks": checks,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(fixture, indent=1) + "\n")
    log(f"wrote {a.out} ({a.out.stat().st_size / 1024:.0f} KiB) in {time.time() - t0:.1f}s")


def _is_mtp_name(key: str, cfg: dict) -> bool:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]) >= int(cfg["num_hidden_layers"])
    return False


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
