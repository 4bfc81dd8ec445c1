// The model config: Hugging Face `config.json` of DeepseekV2ForCausalLM /
// DeepseekV3ForCausalLM parsed into one typed, validated object holding every field that
// changes the math. Absent fields take the defaults of the HF config classes
// (`DeepseekV2Config` / `DeepseekV3Config` in each release's configuration_deepseek.py,
// and `DeepseekV2YarnRotaryEmbedding` for the YaRN keys). Field names are camelCase; each
// doc comment names the config.json key it comes from.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { ModelArchitecture } from "../api/presets.ts";
import { ExpertMeshError } from "../util/errors.ts";

export type Architecture = "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM";
export type TopkMethod = "greedy" | "group_limited_greedy" | "noaux_tc";
export type ScoringFunc = "softmax" | "sigmoid";
export type TorchDtype = "bfloat16" | "float16" | "float32";

/** YaRN rope scaling (`rope_scaling` with `type: "yarn"`). */
export interface YarnScaling {
  readonly type: "yarn";
  /** Context extension factor (`factor`). */
  readonly factor: number;
  /** Context length the rope was trained at (`original_max_position_embeddings`). */
  readonly originalMaxPositionEmbeddings: number;
  /** Rotations above which a dimension keeps its frequency (`beta_fast`). */
  readonly betaFast: number;
  /** Rotations below which a dimension is fully interpolated (`beta_slow`). */
  readonly betaSlow: number;
  /** Attention-magnitude coefficient (`mscale`). */
  readonly mscale: number;
  /** Attention-magnitude coefficient applied to all dims (`mscale_all_dim`). */
  readonly mscaleAllDim: number;
}

/** Block-wise fp8 weights (`quantization_config`). */
export interface Fp8Quantization {
  /** `quant_method`. */
  readonly quantMethod: "fp8";
  /** `fmt`. */
  readonly fmt: "e4m3";
  /** `activation_scheme` ("dynamic" in DeepSeek-V3). */
  readonly activationScheme: string;
  /** `weight_block_size`: [rows, cols] of one scale block; always [128, 128] here. */
  readonly weightBlockSize: readonly [number, number];
}

/** Everything about a DeepSeek V2/V3 model that changes the math. */
export interface ModelConfig {
  /** `architectures[0]`. */
  readonly architecture: Architecture;
  /** `model_type`: deepseek_v2 or deepseek_v3. */
  readonly modelType: "deepseek_v2" | "deepseek_v3";
  /** `vocab_size`: rows of the embedding and the LM head. */
  readonly vocabSize: number;
  /** `hidden_size`: model width. */
  readonly hiddenSize: number;
  /** `intermediate_size`: inner width of the dense MLPs. */
  readonly intermediateSize: number;
  /** `moe_intermediate_size`: inner width of one routed expert. */
  readonly moeIntermediateSize: number;
  /** `num_hidden_layers`: transformer blocks, the MTP layers not counted. */
  readonly numHiddenLayers: number;
  /** `num_attention_heads`. */
  readonly numAttentionHeads: number;
  /** `q_lora_rank`: rank of the query down-projection; null = plain `q_proj` (V2, V2-Lite). */
  readonly qLoraRank: number | null;
  /** `kv_lora_rank`: width of the compressed KV latent. */
  readonly kvLoraRank: number;
  /** `qk_nope_head_dim`: per-head query/key dims without rope. */
  readonly qkNopeHeadDim: number;
  /** `qk_rope_head_dim`: per-head query/key dims with rope (the key part is shared by heads). */
  readonly qkRopeHeadDim: number;
  /** `v_head_dim`: per-head value dims. */
  readonly vHeadDim: number;
  /** `n_routed_experts`. */
  readonly nRoutedExperts: number;
  /** `n_shared_experts` (their combined width is `moeIntermediateSize * nSharedExperts`). */
  readonly nSharedExperts: number;
  /** `num_experts_per_tok`: top-k. */
  readonly numExpertsPerTok: number;
  /** `first_k_dense_replace`: leading layers with a dense MLP. */
  readonly firstKDenseReplace: number;
  /** `moe_layer_freq`: always 1 here (every layer from firstKDenseReplace on is MoE). */
  readonly moeLayerFreq: number;
  /** `n_group`: expert groups for group-limited routing (1 when absent). */
  readonly nGroup: number;
  /** `topk_group`: groups a token may route into (1 when absent). */
  readonly topkGroup: number;
  /** `topk_method` (the V2 class default, the misspelt "gready", reads as greedy). */
  readonly topkMethod: TopkMethod;
  /** `scoring_func`. */
  readonly scoringFunc: ScoringFunc;
  /** `norm_topk_prob`: renormalize the top-k weights to sum to 1. */
  readonly normTopkProb: boolean;
  /** `routed_scaling_factor`: multiplies the routed experts' weights. */
  readonly routedScalingFactor: number;
  /** `rms_norm_eps`. */
  readonly rmsNormEps: number;
  /** `rope_theta`. */
  readonly ropeTheta: number;
  /** `rope_scaling`: null or YaRN. */
  readonly ropeScaling: YarnScaling | null;
  /** `max_position_embeddings`. */
  readonly maxPositionEmbeddings: number;
  /** `tie_word_embeddings`: LM head shares the embedding matrix. */
  readonly tieWordEmbeddings: boolean;
  /** `torch_dtype` (null when absent). */
  readonly torchDtype: TorchDtype | null;
  /** `bos_token_id` (null when set to null). */
  readonly bosTokenId: number | null;
  /** `eos_token_id`, as a list (config.json may hold one id or several). */
  readonly eosTokenIds: readonly number[];
  /** `quantization_config`: null or block-wise fp8. */
  readonly quantization: Fp8Quantization | null;
  /** `num_nextn_predict_layers`: MTP layers after the last block, skipped when loading. */
  readonly numNextnPredictLayers: number;
}

/** Defaults of the HF config classes for the fields this parser reads. */
const CLASS_DEFAULTS: Readonly<Record<Architecture, Readonly<Record<string, unknown>>>> = {
  DeepseekV2ForCausalLM: {
    vocab_size: 102400,
    hidden_size: 4096,
    intermediate_size: 11008,
    moe_intermediate_size: 1407,
    num_hidden_layers: 30,
    num_attention_heads: 32,
    n_shared_experts: null,
    n_routed_experts: null,
    routed_scaling_factor: 1.0,
    kv_lora_rank: 512,
    q_lora_rank: 1536,
    qk_rope_head_dim: 64,
    v_head_dim: 128,
    qk_nope_head_dim: 128,
    topk_method: "gready",
    n_group: null,
    topk_group: null,
    num_experts_per_tok: null,
    moe_layer_freq: 1,
    first_k_dense_replace: 0,
    norm_topk_prob: false,
    scoring_func: "softmax",
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    bos_token_id: 100000,
    eos_token_id: 100001,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    rope_scaling: null,
    num_nextn_predict_layers: 0,
  },
  DeepseekV3ForCausalLM: {
    vocab_size: 129280,
    hidden_size: 7168,
    intermediate_size: 18432,
    moe_intermediate_size: 2048,
    num_hidden_layers: 61,
    num_nextn_predict_layers: 1,
    num_attention_heads: 128,
    n_shared_experts: 1,
    n_routed_experts: 256,
    routed_scaling_factor: 2.5,
    kv_lora_rank: 512,
    q_lora_rank: 1536,
    qk_rope_head_dim: 64,
    v_head_dim: 128,
    qk_nope_head_dim: 128,
    topk_method: "noaux_tc",
    n_group: 8,
    topk_group: 4,
    num_experts_per_tok: 8,
    moe_layer_freq: 1,
    first_k_dense_replace: 3,
    norm_topk_prob: true,
    scoring_func: "sigmoid",
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-6,
    bos_token_id: 0,
    eos_token_id: 1,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    rope_scaling: null,
  },
};

/** Defaults of `DeepseekV2YarnRotaryEmbedding` for keys absent from `rope_scaling`. */
const YARN_DEFAULTS = {
  original_max_position_embeddings: 4096,
  beta_fast: 32,
  beta_slow: 1,
  mscale: 1,
  mscale_all_dim: 0,
} as const;

const MODEL_TYPES = {
  DeepseekV2ForCausalLM: "deepseek_v2",
  DeepseekV3ForCausalLM: "deepseek_v3",
} as const;

/** Reads and parses `dir/config.json`. Throws EM_CONFIG_* codes. */
export function readModelConfig(dir: string): ModelConfig {
  const path = join(dir, "config.json");
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ExpertMeshError("EM_CONFIG_READ", `cannot read ${path}: ${errMessage(err)}`, {
      cause: err,
    });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ExpertMeshError("EM_CONFIG_READ", `${path} is not JSON: ${errMessage(err)}`, {
      cause: err,
    });
  }
  return parseModelConfig(json, path);
}

/**
 * Parses a config.json object into a validated ModelConfig. `source` names the file in
 * messages. Throws EM_CONFIG_UNKNOWN_ARCH, EM_CONFIG_MISSING_FIELD or EM_CONFIG_INVALID.
 */
export function parseModelConfig(json: unknown, source = "config.json"): ModelConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ExpertMeshError("EM_CONFIG_INVALID", `${source}: not a JSON object`);
  }
  const raw = json as Record<string, unknown>;
  const architecture = architectureOf(raw, source);
  const f = new Fields(raw, CLASS_DEFAULTS[architecture], source);
  const modelType = MODEL_TYPES[architecture];
  if (raw["model_type"] !== undefined && raw["model_type"] !== modelType) {
    f.invalid(
      `model_type ${JSON.stringify(raw["model_type"])} does not match ${architecture} (${modelType})`,
    );
  }
  f.unsupportedUnless("hidden_act", (v) => v === "silu", "only silu is supported");
  f.unsupportedUnless("attention_bias", (v) => v === false, "attention biases are not supported");

  const topkRaw = f.oneOf("topk_method", ["greedy", "gready", "group_limited_greedy", "noaux_tc"]);
  const topkMethod: TopkMethod = topkRaw === "gready" ? "greedy" : (topkRaw as TopkMethod);
  const grouped = topkMethod !== "greedy";
  const config: ModelConfig = {
    architecture,
    modelType,
    vocabSize: f.int("vocab_size", 1),
    hiddenSize: f.int("hidden_size", 1),
    intermediateSize: f.int("intermediate_size", 1),
    moeIntermediateSize: f.int("moe_intermediate_size", 1),
    numHiddenLayers: f.int("num_hidden_layers", 1),
    numAttentionHeads: f.int("num_attention_heads", 1),
    qLoraRank: f.intOrNull("q_lora_rank", 1),
    kvLoraRank: f.int("kv_lora_rank", 1),
    qkNopeHeadDim: f.int("qk_nope_head_dim", 1),
    qkRopeHeadDim: f.int("qk_rope_head_dim", 2),
    vHeadDim: f.int("v_head_dim", 1),
    nRoutedExperts: f.int("n_routed_experts", 1),
    nSharedExperts: f.int("n_shared_experts", 0),
    numExpertsPerTok: f.int("num_experts_per_tok", 1),
    firstKDenseReplace: f.int("first_k_dense_replace", 0),
    moeLayerFreq: f.int("moe_layer_freq", 1),
    nGroup: grouped ? f.int("n_group", 1) : (f.intOrNull("n_group", 1) ?? 1),
    topkGroup: grouped ? f.int("topk_group", 1) : (f.intOrNull("topk_group", 1) ?? 1),
    topkMethod,
    scoringFunc: f.oneOf("scoring_func", ["softmax", "sigmoid"]) as ScoringFunc,
    normTopkProb: f.bool("norm_topk_prob"),
    routedScalingFactor: f.positive("routed_scaling_factor"),
    rmsNormEps: f.positive("rms_norm_eps"),
    ropeTheta: f.positive("rope_theta"),
    ropeScaling: parseRopeScaling(f),
    maxPositionEmbeddings: f.int("max_position_embeddings", 1),
    tieWordEmbeddings: f.bool("tie_word_embeddings"),
    torchDtype: parseTorchDtype(f),
    bosTokenId: f.intOrNull("bos_token_id", 0),
    eosTokenIds: parseEos(f),
    quantization: parseQuantization(f),
    numNextnPredictLayers: f.int("num_nextn_predict_layers", 0),
  };
  checkConsistency(config, f);
  return config;
}

function architectureOf(raw: Record<string, unknown>, source: string): Architecture {
  const archs = raw["architectures"];
  if (archs === undefined) {
    throw new ExpertMeshError("EM_CONFIG_MISSING_FIELD", `${source}: missing field architectures`);
  }
  if (!Array.isArray(archs) || archs.length !== 1 || typeof archs[0] !== "string") {
    throw new ExpertMeshError(
      "EM_CONFIG_INVALID",
      `${source}: architectures must be a list of one name, got ${JSON.stringify(archs)}`,
    );
  }
  const name = archs[0];
  if (name !== "DeepseekV2ForCausalLM" && name !== "DeepseekV3ForCausalLM") {
    throw new ExpertMeshError(
      "EM_CONFIG_UNKNOWN_ARCH",
      `${source}: architecture ${name} is not supported (supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM)`,
    );
  }
  return name;
}

/** Typed access to config.json fields with the class defaults and uniform errors. */
class Fields {
  private readonly raw: Record<string, unknown>;
  private readonly defaults: Readonly<Record<string, unknown>>;
  readonly source: string;

  constructor(
    raw: Record<string, unknown>,
    defaults: Readonly<Record<string, unknown>>,
    source: string,
  ) {
    this.raw = raw;
    this.defaults = defaults;
    this.source = source;
  }

  /** The field's value, its class default when absent, or undefined when it has none. */
  get(key: string): unknown {
    return Object.hasOwn(this.raw, key) ? this.raw[key] : this.defaults[key];
  }

  invalid(msg: string): never {
    throw new ExpertMeshError("EM_CONFIG_INVALID", `${this.source}: ${msg}`);
  }

  /** The value, throwing EM_CONFIG_MISSING_FIELD when it is absent or null without a default. */
  required(key: string): unknown {
    const v = this.get(key);
    if (v === undefined || v === null) {
      throw new ExpertMeshError(
        "EM_CONFIG_MISSING_FIELD",
        `${this.source}: missing field ${key} (it has no default for this architecture)`,
      );
    }
    return v;
  }

  int(key: string, min: number): number {
    const v = this.required(key);
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
      this.invalid(`${key} must be an integer >= ${min}, got ${JSON.stringify(v)}`);
    }
    return v;
  }

  intOrNull(key: string, min: number): number | null {
    const v = this.get(key);
    return v === undefined || v === null ? null : this.int(key, min);
  }

  positive(key: string): number {
    const v = this.required(key);
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      this.invalid(`${key} must be a positive number, got ${JSON.stringify(v)}`);
    }
    return v;
  }

  bool(key: string): boolean {
    const v = this.required(key);
    if (typeof v !== "boolean")
      this.invalid(`${key} must be true or false, got ${JSON.stringify(v)}`);
    return v;
  }

  oneOf(key: string, allowed: readonly string[]): string {
    const v = this.required(key);
    if (typeof v !== "string" || !allowed.includes(v)) {
      this.invalid(`${key} must be one of ${allowed.join(", ")}, got ${JSON.stringify(v)}`);
    }
    return v;
  }

  /** Rejects a present field whose value `ok` refuses. */
  unsupportedUnless(key: string, ok: (v: unknown) => boolean, why: string): void {
    const v = this.raw[key];
    if (v !== undefined && v !== null && !ok(v))
      this.invalid(`${key} = ${JSON.stringify(v)}: ${why}`);
  }
}

function parseRopeScaling(f: Fields): YarnScaling | null {
  const rs = f.get("rope_scaling");
  if (rs === undefined || rs === null) return null;
  if (typeof rs !== "object" || Array.isArray(rs))
    f.invalid("rope_scaling must be an object or null");
  const r = rs as Record<string, unknown>;
  const type = r["type"] ?? r["rope_type"];
  if (type !== "yarn") {
    f.invalid(`rope_scaling type ${JSON.stringify(type)} is not supported (only yarn)`);
  }
  const sub = new Fields(r, YARN_DEFAULTS, `${f.source}: rope_scaling`);
  const factor = sub.positive("factor");
  const yarn: YarnScaling = {
    type: "yarn",
    factor,
    originalMaxPositionEmbeddings: sub.int("original_max_position_embeddings", 1),
    betaFast: sub.positive("beta_fast"),
    betaSlow: sub.positive("beta_slow"),
    mscale: nonNegative(sub, "mscale"),
    mscaleAllDim: nonNegative(sub, "mscale_all_dim"),
  };
  if (yarn.betaFast < yarn.betaSlow) {
    f.invalid(`rope_scaling beta_fast (${yarn.betaFast}) must be >= beta_slow (${yarn.betaSlow})`);
  }
  return yarn;
}

function nonNegative(f: Fields, key: string): number {
  const v = f.required(key);
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
    f.invalid(`${key} must be a non-negative number, got ${JSON.stringify(v)}`);
  }
  return v;
}

function parseTorchDtype(f: Fields): TorchDtype | null {
  const v = f.get("torch_dtype");
  if (v === undefined || v === null) return null;
  return f.oneOf("torch_dtype", ["bfloat16", "float16", "float32"]) as TorchDtype;
}

function parseEos(f: Fields): number[] {
  const v = f.get("eos_token_id");
  if (v === undefined || v === null) return [];
  const ids = Array.isArray(v) ? v : [v];
  if (!ids.every((x) => typeof x === "number" && Number.isSafeInteger(x) && x >= 0)) {
    f.invalid(`eos_token_id must be a token id or a list of them, got ${JSON.stringify(v)}`);
  }
  return ids as number[];
}

function parseQuantization(f: Fields): Fp8Quantization | null {
  const q = f.get("quantization_config");
  if (q === undefined || q === null) return null;
  if (typeof q !== "object" || Array.isArray(q)) f.invalid("quantization_config must be an object");
  const sub = new Fields(
    q as Record<string, unknown>,
    { activation_scheme: "dynamic", fmt: "e4m3" },
    `${f.source}: quantization_config`,
  );
  sub.oneOf("quant_method", ["fp8"]);
  sub.oneOf("fmt", ["e4m3"]);
  const activationScheme = sub.oneOf("activation_scheme", ["dynamic", "static"]);
  const block = sub.required("weight_block_size");
  if (!Array.isArray(block) || block.length !== 2 || block[0] !== 128 || block[1] !== 128) {
    sub.invalid(`weight_block_size ${JSON.stringify(block)} is not supported (only [128, 128])`);
  }
  return { quantMethod: "fp8", fmt: "e4m3", activationScheme, weightBlockSize: [128, 128] };
}

function checkConsistency(c: ModelConfig, f: Fields): void {
  const need = (ok: boolean, msg: string) => {
    if (!ok) f.invalid(msg);
  };
  need(
    c.moeLayerFreq === 1,
    `moe_layer_freq ${c.moeLayerFreq} is not supported (every DeepSeek V2/V3 release uses 1)`,
  );
  need(
    c.firstKDenseReplace < c.numHiddenLayers,
    `first_k_dense_replace (${c.firstKDenseReplace}) must be less than num_hidden_layers (${c.numHiddenLayers})`,
  );
  need(
    c.numExpertsPerTok <= c.nRoutedExperts,
    `num_experts_per_tok (${c.numExpertsPerTok}) exceeds n_routed_experts (${c.nRoutedExperts})`,
  );
  need(
    c.nRoutedExperts % c.nGroup === 0,
    `n_routed_experts (${c.nRoutedExperts}) must be a multiple of n_group (${c.nGroup})`,
  );
  need(c.topkGroup <= c.nGroup, `topk_group (${c.topkGroup}) exceeds n_group (${c.nGroup})`);
  const perGroup = c.nRoutedExperts / c.nGroup;
  if (c.topkMethod !== "greedy") {
    need(
      c.numExpertsPerTok <= c.topkGroup * perGroup,
      `num_experts_per_tok (${c.numExpertsPerTok}) exceeds the experts in topk_group (${c.topkGroup}) groups of ${perGroup}`,
    );
  }
  if (c.topkMethod === "noaux_tc") {
    // Group scores are the sum of each group's two best expert scores.
    need(perGroup >= 2, `noaux_tc needs at least 2 experts per group, got ${perGroup}`);
  }
  need(c.qkRopeHeadDim % 2 === 0, `qk_rope_head_dim (${c.qkRopeHeadDim}) must be even`);
  if (c.bosTokenId !== null) {
    need(
      c.bosTokenId < c.vocabSize,
      `bos_token_id ${c.bosTokenId} is not below vocab_size ${c.vocabSize}`,
    );
  }
  for (const id of c.eosTokenIds) {
    need(id < c.vocabSize, `eos_token_id ${id} is not below vocab_size ${c.vocabSize}`);
  }
}

/** Query/key head width: no-rope plus rope dims. */
export function qkHeadDim(c: ModelConfig): number {
  return c.qkNopeHeadDim + c.qkRopeHeadDim;
}

/** Whether block `layer` (0-based) has an MoE FFN rather than a dense MLP. */
export function isMoeLayer(c: ModelConfig, layer: number): boolean {
  return layer >= c.firstKDenseReplace && layer < c.numHiddenLayers;
}

/**
 * Whether block `layer` is one of the multi-token-prediction (MTP) layers that follow the
 * last block (`num_nextn_predict_layers` of them, DeepSeek-V3's layer 61): an MoE block of
 * its own behind a projection of [embedding; hidden], with its own head (ADR 0012).
 */
export function isMtpLayer(c: ModelConfig, layer: number): boolean {
  return layer >= c.numHiddenLayers && layer < c.numHiddenLayers + c.numNextnPredictLayers;
}

/** Width of the shared experts taken together (one MLP of this inner width). */
export function sharedExpertsIntermediateSize(c: ModelConfig): number {
  return c.moeIntermediateSize * c.nSharedExperts;
}

/** The figures the placement planner needs (src/api/presets.ts). */
export function modelArchitectureOf(c: ModelConfig): ModelArchitecture {
  return {
    numLayers: c.numHiddenLayers,
    firstDenseLayers: c.firstKDenseReplace,
    routedExperts: c.nRoutedExperts,
    expertsPerToken: c.numExpertsPerTok,
    sharedExperts: c.nSharedExperts,
    hiddenSize: c.hiddenSize,
    moeIntermediateSize: c.moeIntermediateSize,
  };
}

function errMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
