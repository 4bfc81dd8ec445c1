"""Independent float64 numpy port of DeepSeek's reference forward pass.

Written from deepseek-ai/DeepSeek-V3 `inference/model.py` (the "naive" attention path:
`precompute_freqs_cis`, `apply_rotary_emb`, `MLA`, `MLP`, `Gate`, `Expert`, `MoE`, `Block`,
`Transformer`), reading the Hugging Face checkpoint tensor names directly. It shares no code
with transformers, so `make_goldens.py` uses it to cross-check the patched transformers model
(and the unpatched one, to show what the patches change). Float64 throughout, so it is also a
more exact reference than the float32 goldens themselves.

Mapping of the reference's ModelArgs onto config.json keys (as inference/convert.py and the
configs/config_*.json files of the reference do):
  dim=hidden_size, inter_dim=intermediate_size, moe_inter_dim=moe_intermediate_size,
  n_dense_layers=first_k_dense_replace, n_activated_experts=num_experts_per_tok,
  n_expert_groups=n_group, n_limited_groups=topk_group, score_func=scoring_func,
  route_scale=routed_scaling_factor, rope_factor=rope_scaling.factor,
  original_seq_len=rope_scaling.original_max_position_embeddings,
  mscale=rope_scaling.mscale_all_dim, Gate.bias=e_score_correction_bias.
Where the reference hard-codes something that config.json states, see docs/fidelity.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class RefArgs:
    """The reference's ModelArgs, filled from a Hugging Face config.json dict."""

    vocab_size: int
    dim: int
    inter_dim: int
    moe_inter_dim: int
    n_layers: int
    n_dense_layers: int
    n_heads: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int
    n_limited_groups: int
    topk_method: str
    score_func: str
    norm_topk_prob: bool
    route_scale: float
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float
    yarn: bool
    rope_factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    mscale: float
    rms_eps: float

    @staticmethod
    def from_config(cfg: dict) -> "RefArgs":
        """Build the reference's arguments from config.json (HF class defaults where absent)."""
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_type = rs.get("type", rs.get("rope_type", "default"))
        yarn = rope_type == "yarn"
        topk_method = cfg.get("topk_method", "greedy")
        if topk_method == "gready":  # the V2 class default is misspelt
            topk_method = "greedy"
        return RefArgs(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            inter_dim=cfg["intermediate_size"],
            moe_inter_dim=cfg["moe_intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_dense_layers=cfg.get("first_k_dense_replace", 0),
            n_heads=cfg["num_attention_heads"],
            n_routed_experts=cfg["n_routed_experts"],
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            n_activated_experts=cfg["num_experts_per_tok"],
            n_expert_groups=cfg.get("n_group") or 1,
            n_limited_groups=cfg.get("topk_group") or 1,
            topk_method=topk_method,
            score_func=cfg.get("scoring_func", "softmax"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            q_lora_rank=cfg.get("q_lora_rank") or 0,
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            rope_theta=float(cfg.get("rope_theta", rs.get("rope_theta", 10000.0))),
            yarn=yarn,
            rope_factor=float(rs.get("factor", 1.0)) if yarn else 1.0,
            original_seq_len=int(rs.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096)))
            if yarn
            else int(cfg.get("max_position_embeddings", 4096)),
            beta_fast=float(rs.get("beta_fast") or 32),
            beta_slow=float(rs.get("beta_slow") or 1),
            mscale=float(rs.get("mscale_all_dim") or 0.0) if yarn else 0.0,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        )


def precompute_freqs(args: RefArgs, seqlen: int) -> np.ndarray:
    """Complex rotations [seqlen, rope_dim/2], as the reference's precompute_freqs_cis (floor/ceil range)."""
    dim, base, factor = args.qk_rope_head_dim, args.rope_theta, args.rope_factor
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if args.yarn and factor > 1:

        def correction_dim(num_rotations: float) -> float:
            return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    angles = np.outer(np.arange(seqlen, dtype=np.float64), freqs)
    return np.exp(1j * angles)


def apply_rotary(x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Interleaved-pair rotation: (x[2i], x[2i+1]) is one complex number (reference apply_rotary_emb).

    x: [seq, heads, rope_dim]; freqs: [seq, rope_dim/2].
    """
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    y = xc * freqs[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = y.real
    out[..., 1::2] = y.imag
    return out


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


@dataclass
class GateResult:
    indices: np.ndarray  # [tokens, topk], in descending order of (biased) selection score
    weights: np.ndarray  # [tokens, topk]
    margin: float  # smallest gap at any group/expert selection boundary (how close to a tie)


def _topk_desc(x: np.ndarray, k: int) -> np.ndarray:
    # stable: ties go to the lower index, like torch.topk on CPU in practice
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def reference_gate(args: RefArgs, logits: np.ndarray, bias: np.ndarray | None) -> GateResult:
    """DeepSeek reference Gate.forward on router logits [tokens, n_routed_experts].

    Differences from the reference text, both documented in docs/fidelity.md: normalisation
    follows config.norm_topk_prob (the reference hard-codes `score_func == "sigmoid"`, which
    equals norm_topk_prob in every DeepSeek release) and group limiting follows topk_method
    (greedy = no group limit; the reference has n_expert_groups = 1 there).
    """
    n, e = logits.shape
    if args.score_func == "softmax":
        scores = softmax(logits)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    original = scores
    sel = scores + bias if bias is not None else scores.copy()
    margin = math.inf
    groups = args.n_expert_groups if args.topk_method != "greedy" else 1
    if groups > 1:
        g = sel.reshape(n, groups, e // groups)
        if bias is None:
            gscore = g.max(axis=-1)
        else:
            gscore = np.sort(g, axis=-1)[..., ::-1][..., :2].sum(axis=-1)
        gsorted = np.sort(gscore, axis=-1)[:, ::-1]
        if args.n_limited_groups < groups:
            margin = min(margin, float(np.min(gsorted[:, args.n_limited_groups - 1] - gsorted[:, args.n_limited_groups])))
        keep = _topk_desc(gscore, args.n_limited_groups)
        mask = np.ones((n, groups), dtype=bool)
        np.put_along_axis(mask, keep, False, axis=1)
        g = np.where(mask[..., None], -np.inf, g)
        sel = g.reshape(n, e)
    idx = _topk_desc(sel, args.n_activated_experts)
    ssorted = np.sort(sel, axis=-1)[:, ::-1]
    k = args.n_activated_experts
    if k < e:
        gap = ssorted[:, k - 1] - ssorted[:, k]
        margin = min(margin, float(np.min(gap)))
    w = np.take_along_axis(original, idx, axis=1)
    if args.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    w = w * args.route_scale
    return GateResult(idx, w, margin)


class ReferenceModel:
    """The reference Transformer over a dict of float64 numpy arrays with HF tensor names."""

    def __init__(self, cfg: dict, tensors: dict[str, np.ndarray]):
        self.args = RefArgs.from_config(cfg)
        self.t = tensors
        self.route_margin = math.inf
        self.gate_log: dict[int, GateResult] = {}

    def _w(self, name: str) -> np.ndarray:
        return self.t[name]

    def _mlp(self, prefix: str, x: np.ndarray) -> np.ndarray:
        gate = x @ self._w(prefix + "gate_proj.weight").T
        up = x @ self._w(prefix + "up_proj.weight").T
        return (silu(gate) * up) @ self._w(prefix + "down_proj.weight").T

    def _attention(self, p: str, x: np.ndarray, freqs: np.ndarray) -> np.ndarray:
        a = self.args
        s = x.shape[0]
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            q = rms_norm(x @ self._w(p + "q_a_proj.weight").T, self._w(p + "q_a_layernorm.weight"), 1e-6)
            q = q @ self._w(p + "q_b_proj.weight").T
        else:
            q = x @ self._w(p + "q_proj.weight").T
        q = q.reshape(s, a.n_heads, qk)
        q_nope, q_pe = q[..., : a.qk_nope_head_dim], q[..., a.qk_nope_head_dim :]
        q_pe = apply_rotary(q_pe, freqs)
        kv = x @ self._w(p + "kv_a_proj_with_mqa.weight").T
        kv, k_pe = kv[:, : a.kv_lora_rank], kv[:, a.kv_lora_rank :]
        k_pe = apply_rotary(k_pe[:, None, :], freqs)
        kv = rms_norm(kv, self._w(p + "kv_a_layernorm.weight"), 1e-6) @ self._w(p + "kv_b_proj.weight").T
        kv = kv.reshape(s, a.n_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv[..., : a.qk_nope_head_dim], kv[..., a.qk_nope_head_dim :]
        qf = np.concatenate([q_nope, q_pe], axis=-1)
        kf = np.concatenate([k_nope, np.broadcast_to(k_pe, (s, a.n_heads, a.qk_rope_head_dim))], axis=-1)
        scale = qk**-0.5
        if a.yarn and a.rope_factor > 1:
            m = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0
            scale = scale * m * m
        scores = np.einsum("shd,thd->hst", qf, kf) * scale
        mask = np.triu(np.full((s, s), -np.inf), 1)
        probs = softmax(scores + mask[None])
        out = np.einsum("hst,thd->shd", probs, v).reshape(s, a.n_heads * a.v_head_dim)
        return out @ self._w(p + "o_proj.weight").T

    def _moe(self, layer: int, p: str, x: np.ndarray) -> np.ndarray:
        a = self.args
        logits = x @ self._w(p + "gate.weight").T
        bias = self.t.get(p + "gate.e_score_correction_bias")
        g = reference_gate(a, logits, bias)
        self.gate_log[layer] = g
        self.route_margin = min(self.route_margin, g.margin)
        y = np.zeros_like(x)
        for tok in range(x.shape[0]):
            for j in range(a.n_activated_experts):
                e = int(g.indices[tok, j])
                y[tok] += self._mlp(f"{p}experts.{e}.", x[tok : tok + 1])[0] * g.weights[tok, j]
        if a.n_shared_experts:
            y = y + self._mlp(p + "shared_experts.", x)
        return y

    def _block(self, layer: int, h: np.ndarray, freqs: np.ndarray) -> np.ndarray:
        """Block `layer` (the reference's Block) over hidden states h [seq, dim]."""
        a = self.args
        p = f"model.layers.{layer}."
        x = rms_norm(h, self._w(p + "input_layernorm.weight"), a.rms_eps)
        h = h + self._attention(p + "self_attn.", x, freqs)
        x = rms_norm(h, self._w(p + "post_attention_layernorm.weight"), a.rms_eps)
        if layer < a.n_dense_layers:
            return h + self._mlp(p + "mlp.", x)
        return h + self._moe(layer, p + "mlp.", x)

    def hidden(self, tokens: list[int]) -> np.ndarray:
        """Final hidden states [seq, dim] after the final norm (what the LM head reads)."""
        a = self.args
        self.gate_log = {}
        freqs = precompute_freqs(a, len(tokens))
        h = self._w("model.embed_tokens.weight")[np.asarray(tokens)]
        for layer in range(a.n_layers):
            h = self._block(layer, h, freqs)
        return rms_norm(h, self._w("model.norm.weight"), a.rms_eps)

    def forward(self, tokens: list[int]) -> np.ndarray:
        """Logits [seq, vocab] (float64) for one sequence starting at position 0."""
        head = self.t.get("lm_head.weight")
        if head is None:  # tie_word_embeddings
            head = self._w("model.embed_tokens.weight")
        return self.hidden(tokens) @ head.T

    def mtp_logits(self, tokens: list[int], next_token: int, chain: int = 0) -> np.ndarray:
        """Logits [seq, vocab] of the first multi-token-prediction layer (model.layers.{L}).

        DeepSeek-V3's reference (inference/model.py) has no MTP code, so this follows the
        module as the V3 report describes it and as vLLM's DeepSeekMTP runs it on the real
        checkpoint: row i takes the main model's final (normed) hidden state at position i and
        the embedding of token i + 1 (the next token after the sequence for the last row),
        with the embedding zeroed at position 0 as vLLM does; x = eh_proj([enorm(e);
        hnorm(h)]) runs through block L (an MoE block, attending over the rows before it);
        logits = shared_head.head(shared_head.norm(x)). Row i predicts token i + 2.

        With `chain` > 0 the layer then runs on its own output `chain` times, as vLLM and
        SGLang chain it: the next row takes the last row's x (before the head's norm) as its
        hidden state and the last row's argmax as its token, one position further (attending
        over all the rows before it). The logits of those rows follow the sequence's.
        """
        a = self.args
        L = a.n_layers
        p = f"model.layers.{L}."
        h = self.hidden(tokens)
        ids = np.asarray(list(tokens[1:]) + [next_token])
        e = self.t.get(p + "embed_tokens.weight", self._w("model.embed_tokens.weight"))[ids].copy()
        e[0] = 0.0
        x = np.concatenate(
            [rms_norm(e, self._w(p + "enorm.weight"), a.rms_eps), rms_norm(h, self._w(p + "hnorm.weight"), a.rms_eps)],
            axis=-1,
        )
        x = x @ self._w(p + "eh_proj.weight").T
        head = self.t.get(p + "shared_head.head.weight", self.t.get("lm_head.weight"))
        embed = self.t.get(p + "embed_tokens.weight", self._w("model.embed_tokens.weight"))
        rows = x  # the block's inputs so far
        for step in range(chain + 1):
            out = self._block(L, rows, precompute_freqs(a, rows.shape[0]))
            logits = rms_norm(out, self._w(p + "shared_head.norm.weight"), a.rms_eps) @ head.T
            if step == chain:
                return logits
            guess = int(np.argmax(logits[-1]))
            nxt = np.concatenate(
                [
                    rms_norm(embed[guess][None], self._w(p + "enorm.weight"), a.rms_eps),
                    rms_norm(out[-1:], self._w(p + "hnorm.weight"), a.rms_eps),
                ],
                axis=-1,
            ) @ self._w(p + "eh_proj.weight").T
            rows = np.concatenate([rows, nxt], axis=0)
