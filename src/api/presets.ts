// Architecture figures of known models, for when the operator cannot read a checkpoint's
// config.json (planning before weights are downloaded, `expertmesh plan --preset`).
// Field names follow the Hugging Face config keys they come from (in each doc comment).
import { ExpertMeshError } from "../util/errors.ts";

/** The expert-layout figures the placement planner needs. */
export interface ExpertLayout {
  /** Transformer blocks (`num_hidden_layers`), the MTP layer not counted. */
  readonly numLayers: number;
  /** Leading blocks with a dense MLP instead of MoE (`first_k_dense_replace`). */
  readonly firstDenseLayers: number;
  /** Routed experts per MoE layer (`n_routed_experts`). */
  readonly routedExperts: number;
  /** Routed experts each token is sent to, top-k (`num_experts_per_tok`). */
  readonly expertsPerToken: number;
}

/** Architecture figures of a DeepSeek-style MoE model. */
export interface ModelArchitecture extends ExpertLayout {
  /** Shared experts every token passes through, run on the gateway (`n_shared_experts`). */
  readonly sharedExperts: number;
  /** Model width in elements (`hidden_size`). */
  readonly hiddenSize: number;
  /** Inner width of one routed expert's FFN in elements (`moe_intermediate_size`). */
  readonly moeIntermediateSize: number;
}

const V3: ModelArchitecture = {
  numLayers: 61,
  firstDenseLayers: 3,
  routedExperts: 256,
  expertsPerToken: 8,
  sharedExperts: 1,
  hiddenSize: 7168,
  moeIntermediateSize: 2048,
};

/** Known presets by name. The tiny ones match `make-tiny-model` checkpoints. */
const PRESETS: Readonly<Record<string, ModelArchitecture>> = {
  "deepseek-v2-lite": {
    numLayers: 27,
    firstDenseLayers: 1,
    routedExperts: 64,
    expertsPerToken: 6,
    sharedExperts: 2,
    hiddenSize: 2048,
    moeIntermediateSize: 1408,
  },
  "deepseek-v2": {
    numLayers: 60,
    firstDenseLayers: 1,
    routedExperts: 160,
    expertsPerToken: 6,
    sharedExperts: 2,
    hiddenSize: 5120,
    moeIntermediateSize: 1536,
  },
  "deepseek-v3": V3,
  "deepseek-r1": V3,
  // V3.1: V3's architecture; its own tool-call format and hybrid thinking (manifest.ts).
  "deepseek-v3.1": V3,
  "tiny-v2": {
    numLayers: 3,
    firstDenseLayers: 1,
    routedExperts: 8,
    expertsPerToken: 2,
    sharedExperts: 2,
    hiddenSize: 64,
    moeIntermediateSize: 32,
  },
  "tiny-v3": {
    numLayers: 4,
    firstDenseLayers: 1,
    routedExperts: 16,
    expertsPerToken: 4,
    sharedExperts: 1,
    hiddenSize: 64,
    moeIntermediateSize: 32,
  },
};

/** A preset's latent KV cache figures: what one token costs a gateway, and its context. */
export interface PresetCache {
  /** `kv_lora_rank`: the latent's width. */
  readonly kvLoraRank: number;
  /** `qk_rope_head_dim`: the rotated key part stored beside it. */
  readonly ropeDim: number;
  /** `max_position_embeddings`: the context a gateway serves unless limits.maxModelLen says less. */
  readonly context: number;
}

const DEEPSEEK_CACHE: PresetCache = { kvLoraRank: 512, ropeDim: 64, context: 163840 };
const TINY_CACHE: PresetCache = { kvLoraRank: 32, ropeDim: 8, context: 256 };
const PRESET_CACHE: Readonly<Record<string, PresetCache>> = {
  "deepseek-v2-lite": DEEPSEEK_CACHE,
  "deepseek-v2": DEEPSEEK_CACHE,
  "deepseek-v3": DEEPSEEK_CACHE,
  "deepseek-r1": DEEPSEEK_CACHE,
  "deepseek-v3.1": DEEPSEEK_CACHE,
  "tiny-v2": TINY_CACHE,
  "tiny-v3": TINY_CACHE,
};

/**
 * A preset's dense figures (config.json keys in the comments): with ModelArchitecture and
 * PresetCache, what a gateway holds (the weights of everything but the routed experts).
 */
export interface PresetDense {
  /** `vocab_size` */
  readonly vocabSize: number;
  /** `intermediate_size`: the dense MLP of the first blocks. */
  readonly intermediateSize: number;
  /** `num_attention_heads` */
  readonly heads: number;
  /** `q_lora_rank` (null: V2-Lite's plain q_proj). */
  readonly qLoraRank: number | null;
  /** `qk_nope_head_dim` */
  readonly nopeDim: number;
  /** `v_head_dim` */
  readonly vDim: number;
  /** The router has `e_score_correction_bias` (V3's noaux_tc), stored in f32. */
  readonly routerBias: boolean;
}

const V3_DENSE: PresetDense = {
  vocabSize: 129280,
  intermediateSize: 18432,
  heads: 128,
  qLoraRank: 1536,
  nopeDim: 128,
  vDim: 128,
  routerBias: true,
};
// make-tiny-model's figures (src/model/tiny.ts); the vocabulary is its tokenizer's, rounded
// up to 64 (test/unit/memory.test.ts checks these against written checkpoints).
const TINY_DENSE = { vocabSize: 320, intermediateSize: 128, heads: 4, nopeDim: 16, vDim: 16 };
const PRESET_DENSE: Readonly<Record<string, PresetDense>> = {
  "deepseek-v2-lite": {
    ...V3_DENSE,
    vocabSize: 102400,
    intermediateSize: 10944,
    heads: 16,
    qLoraRank: null,
    routerBias: false,
  },
  "deepseek-v2": { ...V3_DENSE, vocabSize: 102400, intermediateSize: 12288, routerBias: false },
  "deepseek-v3": V3_DENSE,
  "deepseek-r1": V3_DENSE,
  "deepseek-v3.1": V3_DENSE,
  "tiny-v2": { ...TINY_DENSE, qLoraRank: null, routerBias: false },
  "tiny-v3": { ...TINY_DENSE, qLoraRank: 32, routerBias: true },
};

/** The dense figures of a known preset. */
export function presetDense(name: string): PresetDense {
  const d = Object.hasOwn(PRESET_DENSE, name) ? PRESET_DENSE[name] : undefined;
  if (!d) throw new ExpertMeshError("EM_ARCH_UNKNOWN_PRESET", `unknown model preset '${name}'`);
  return d;
}

/** How a preset's published checkpoint stores its linear layers (DeepSeek-V3 and R1: fp8). */
export type CheckpointDtype = "bf16" | "fp8";

const PRESET_DTYPE: Readonly<Record<string, CheckpointDtype>> = {
  "deepseek-v2-lite": "bf16",
  "deepseek-v2": "bf16",
  "deepseek-v3": "fp8",
  "deepseek-r1": "fp8",
  "deepseek-v3.1": "fp8",
  "tiny-v2": "bf16",
  "tiny-v3": "bf16",
};

/** The dtype of a known preset's checkpoint (make-tiny-model's for the tiny ones). */
export function presetCheckpointDtype(name: string): CheckpointDtype {
  const d = Object.hasOwn(PRESET_DTYPE, name) ? PRESET_DTYPE[name] : undefined;
  if (!d) throw new ExpertMeshError("EM_ARCH_UNKNOWN_PRESET", `unknown model preset '${name}'`);
  return d;
}

/** The KV cache figures of a known preset. */
export function presetCache(name: string): PresetCache {
  const c = Object.hasOwn(PRESET_CACHE, name) ? PRESET_CACHE[name] : undefined;
  if (!c) throw new ExpertMeshError("EM_ARCH_UNKNOWN_PRESET", `unknown model preset '${name}'`);
  return c;
}

/** Names of the known presets, sorted. */
export function presetNames(): string[] {
  return Object.keys(PRESETS).sort();
}

/**
 * The architecture of a preset (by name) or validated explicit figures (a copy).
 * Throws EM_ARCH_UNKNOWN_PRESET or EM_ARCH_INVALID.
 */
export function resolveArchitecture(
  presetOrExplicit: string | ModelArchitecture,
): ModelArchitecture {
  if (typeof presetOrExplicit === "string") {
    const preset = Object.hasOwn(PRESETS, presetOrExplicit) ? PRESETS[presetOrExplicit] : undefined;
    if (!preset) {
      throw new ExpertMeshError(
        "EM_ARCH_UNKNOWN_PRESET",
        `unknown model preset '${presetOrExplicit}' (known: ${presetNames().join(", ")})`,
      );
    }
    return { ...preset };
  }
  const layout = checkExpertLayout(presetOrExplicit);
  const a = presetOrExplicit as unknown as Record<string, unknown>;
  return {
    ...layout,
    sharedExperts: integerField(a, "sharedExperts", 0),
    hiddenSize: integerField(a, "hiddenSize", 1),
    moeIntermediateSize: integerField(a, "moeIntermediateSize", 1),
  };
}

/**
 * Checks the four expert-layout figures (integers, `firstDenseLayers < numLayers`,
 * `expertsPerToken <= routedExperts`) and returns a copy of just them. Throws EM_ARCH_INVALID.
 */
export function checkExpertLayout(value: ExpertLayout): ExpertLayout {
  if (typeof value !== "object" || value === null) {
    throw new ExpertMeshError("EM_ARCH_INVALID", "architecture must be an object");
  }
  const a = value as unknown as Record<string, unknown>;
  const layout: ExpertLayout = {
    numLayers: integerField(a, "numLayers", 1),
    firstDenseLayers: integerField(a, "firstDenseLayers", 0),
    routedExperts: integerField(a, "routedExperts", 1),
    expertsPerToken: integerField(a, "expertsPerToken", 1),
  };
  // The manifest schema's caps, for figures from the CLI or a config.json too (100M layers
  // ran the planner out of memory).
  for (const [key, max] of [
    ["numLayers", 1024],
    ["routedExperts", 4096],
  ] as const) {
    if (layout[key] > max)
      throw new ExpertMeshError(
        "EM_ARCH_INVALID",
        `${key} must be at most ${max}, got ${layout[key]}`,
      );
  }
  if (layout.firstDenseLayers >= layout.numLayers) {
    throw new ExpertMeshError(
      "EM_ARCH_INVALID",
      `firstDenseLayers (${layout.firstDenseLayers}) must be less than numLayers (${layout.numLayers}): a model needs at least one MoE layer`,
    );
  }
  if (layout.expertsPerToken > layout.routedExperts) {
    throw new ExpertMeshError(
      "EM_ARCH_INVALID",
      `expertsPerToken (${layout.expertsPerToken}) must not exceed routedExperts (${layout.routedExperts})`,
    );
  }
  return layout;
}

function integerField(a: Record<string, unknown>, name: string, min: number): number {
  const v = a[name];
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    const want = min === 0 ? "a non-negative integer" : "a positive integer";
    throw new ExpertMeshError(
      "EM_ARCH_INVALID",
      `${name} must be ${want}, got ${JSON.stringify(v)}`,
    );
  }
  return v;
}
