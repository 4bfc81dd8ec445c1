// The tensors of a DeepSeek V2/V3 checkpoint in the Hugging Face layout: names and shapes
// (torch Linear weights are [out_features, in_features]) derived from a ModelConfig.
// Loaders use it to ask for exactly the tensors they need with their expected shapes; the
// tiny-model writer uses it to produce them.
import {
  isMoeLayer,
  isMtpLayer,
  type ModelConfig,
  qkHeadDim,
  sharedExpertsIntermediateSize,
} from "./config.ts";
import { FP8_BLOCK } from "./floats.ts";

/** What a weight is, which decides how it is initialized and whether it may be fp8. */
export type WeightKind = "embedding" | "linear" | "norm" | "gate" | "gate_bias" | "lm_head";

/** One weight of the checkpoint. */
export interface WeightSpec {
  readonly name: string;
  readonly shape: readonly number[];
  readonly kind: WeightKind;
  /** Block index, or null for model-level weights. */
  readonly layer: number | null;
  /** Routed expert index, or null. */
  readonly expert: number | null;
}

/**
 * Every weight of the model in checkpoint order: embeddings, blocks 0..L-1 (attention,
 * norms, MLP or MoE), final norm, LM head (absent when tied). MTP layers are not listed.
 */
export function modelWeights(c: ModelConfig): WeightSpec[] {
  const out: WeightSpec[] = [];
  const model = (name: string, shape: number[], kind: WeightKind) =>
    out.push({ name, shape, kind, layer: null, expert: null });
  model("model.embed_tokens.weight", [c.vocabSize, c.hiddenSize], "embedding");
  for (let i = 0; i < c.numHiddenLayers; i++) out.push(...layerWeights(c, i));
  model("model.norm.weight", [c.hiddenSize], "norm");
  if (!c.tieWordEmbeddings) model("lm_head.weight", [c.vocabSize, c.hiddenSize], "lm_head");
  return out;
}

/** The weights of block `i`: attention (MLA), the two norms, then its MLP or MoE. */
export function layerWeights(c: ModelConfig, i: number): WeightSpec[] {
  const p = `model.layers.${i}`;
  const out: WeightSpec[] = [];
  const add = (name: string, shape: number[], kind: WeightKind, expert: number | null = null) =>
    out.push({ name: `${p}.${name}`, shape, kind, layer: i, expert });
  const h = c.hiddenSize;
  const heads = c.numAttentionHeads;
  add("input_layernorm.weight", [h], "norm");
  if (c.qLoraRank === null) {
    add("self_attn.q_proj.weight", [heads * qkHeadDim(c), h], "linear");
  } else {
    add("self_attn.q_a_proj.weight", [c.qLoraRank, h], "linear");
    add("self_attn.q_a_layernorm.weight", [c.qLoraRank], "norm");
    add("self_attn.q_b_proj.weight", [heads * qkHeadDim(c), c.qLoraRank], "linear");
  }
  add("self_attn.kv_a_proj_with_mqa.weight", [c.kvLoraRank + c.qkRopeHeadDim, h], "linear");
  add("self_attn.kv_a_layernorm.weight", [c.kvLoraRank], "norm");
  add(
    "self_attn.kv_b_proj.weight",
    [heads * (c.qkNopeHeadDim + c.vHeadDim), c.kvLoraRank],
    "linear",
  );
  add("self_attn.o_proj.weight", [h, heads * c.vHeadDim], "linear");
  add("post_attention_layernorm.weight", [h], "norm");
  const mlp = (prefix: string, inner: number, expert: number | null = null) => {
    add(`${prefix}.gate_proj.weight`, [inner, h], "linear", expert);
    add(`${prefix}.up_proj.weight`, [inner, h], "linear", expert);
    add(`${prefix}.down_proj.weight`, [h, inner], "linear", expert);
  };
  if (!isMoeLayer(c, i) && !isMtpLayer(c, i)) {
    mlp("mlp", c.intermediateSize);
    return out;
  }
  add("mlp.gate.weight", [c.nRoutedExperts, h], "gate");
  if (c.topkMethod === "noaux_tc")
    add("mlp.gate.e_score_correction_bias", [c.nRoutedExperts], "gate_bias");
  for (let j = 0; j < c.nRoutedExperts; j++) mlp(`mlp.experts.${j}`, c.moeIntermediateSize, j);
  if (c.nSharedExperts > 0) mlp("mlp.shared_experts", sharedExpertsIntermediateSize(c));
  return out;
}

/**
 * The weights of the MTP layers (`model.layers.{L + k}`, k < num_nextn_predict_layers), as
 * DeepSeek-V3 ships them: the block's own (an MoE block) plus `enorm`, `hnorm`, `eh_proj`
 * [hidden, 2 hidden], `shared_head.norm`, `shared_head.head` and a copy of `embed_tokens`.
 */
export function mtpWeights(c: ModelConfig): WeightSpec[] {
  const out: WeightSpec[] = [];
  const h = c.hiddenSize;
  for (let k = 0; k < c.numNextnPredictLayers; k++) {
    const i = c.numHiddenLayers + k;
    const add = (name: string, shape: number[], kind: WeightKind) =>
      out.push({ name: `model.layers.${i}.${name}`, shape, kind, layer: i, expert: null });
    add("embed_tokens.weight", [c.vocabSize, h], "embedding");
    add("enorm.weight", [h], "norm");
    add("hnorm.weight", [h], "norm");
    add("eh_proj.weight", [h, 2 * h], "linear");
    out.push(...layerWeights(c, i));
    add("shared_head.norm.weight", [h], "norm");
    add("shared_head.head.weight", [c.vocabSize, h], "lm_head");
  }
  return out;
}

/** The weights of routed expert `expert` in block `layer` (gate_proj, up_proj, down_proj). */
export function expertWeights(c: ModelConfig, layer: number, expert: number): WeightSpec[] {
  return layerWeights(c, layer).filter((w) => w.expert === expert);
}

/**
 * Whether a weight is stored as fp8 in a block-quantized checkpoint: every 2-D Linear
 * weight except the router gate, the embeddings and the LM head (as in DeepSeek-V3).
 */
export function isFp8Weight(w: WeightSpec): boolean {
  return w.kind === "linear";
}

/** Name and shape of the dequant scales of fp8 weight `w` (`<name>_scale_inv`). */
export function scaleInvOf(w: Pick<WeightSpec, "name" | "shape">): {
  name: string;
  shape: number[];
} {
  const [rows, cols] = w.shape as [number, number];
  return {
    name: `${w.name}_scale_inv`,
    shape: [Math.ceil(rows / FP8_BLOCK), Math.ceil(cols / FP8_BLOCK)],
  };
}
