import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { resolveArchitecture } from "../../src/api/presets.ts";
import {
  isMoeLayer,
  modelArchitectureOf,
  parseModelConfig,
  qkHeadDim,
  readModelConfig,
} from "../../src/model/config.ts";
import { tinyConfigJson } from "../../src/model/tiny.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

const root = mkdtempSync(join(tmpdir(), "em-config-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof ExpertMeshError ? err.code : `not ExpertMeshError: ${err}`;
  }
  return undefined;
}

// biome-ignore lint/suspicious/noApproximativeNumericConstant: the literal of DeepSeek-V2's config.json
const V2_MSCALE = 0.707;

/** DeepSeek-V2-Lite's config.json (abridged: fields that do not change the math dropped). */
const V2_LITE = {
  architectures: ["DeepseekV2ForCausalLM"],
  aux_loss_alpha: 0.001,
  bos_token_id: 100000,
  eos_token_id: 100001,
  first_k_dense_replace: 1,
  hidden_act: "silu",
  hidden_size: 2048,
  intermediate_size: 10944,
  kv_lora_rank: 512,
  max_position_embeddings: 163840,
  model_type: "deepseek_v2",
  moe_intermediate_size: 1408,
  moe_layer_freq: 1,
  n_group: 1,
  n_routed_experts: 64,
  n_shared_experts: 2,
  norm_topk_prob: false,
  num_attention_heads: 16,
  num_experts_per_tok: 6,
  num_hidden_layers: 27,
  num_key_value_heads: 16,
  q_lora_rank: null,
  qk_nope_head_dim: 128,
  qk_rope_head_dim: 64,
  rms_norm_eps: 1e-6,
  rope_scaling: {
    beta_fast: 32,
    beta_slow: 1,
    factor: 40,
    mscale: V2_MSCALE,
    mscale_all_dim: V2_MSCALE,
    original_max_position_embeddings: 4096,
    type: "yarn",
  },
  rope_theta: 10000,
  routed_scaling_factor: 1.0,
  scoring_func: "softmax",
  tie_word_embeddings: false,
  topk_group: 1,
  topk_method: "greedy",
  torch_dtype: "bfloat16",
  v_head_dim: 128,
  vocab_size: 102400,
};

/** DeepSeek-V3's config.json (abridged). */
const V3 = {
  architectures: ["DeepseekV3ForCausalLM"],
  bos_token_id: 0,
  eos_token_id: 1,
  first_k_dense_replace: 3,
  hidden_size: 7168,
  intermediate_size: 18432,
  kv_lora_rank: 512,
  max_position_embeddings: 163840,
  model_type: "deepseek_v3",
  moe_intermediate_size: 2048,
  moe_layer_freq: 1,
  n_group: 8,
  n_routed_experts: 256,
  n_shared_experts: 1,
  norm_topk_prob: true,
  num_attention_heads: 128,
  num_experts_per_tok: 8,
  num_hidden_layers: 61,
  num_nextn_predict_layers: 1,
  q_lora_rank: 1536,
  qk_nope_head_dim: 128,
  qk_rope_head_dim: 64,
  quantization_config: {
    activation_scheme: "dynamic",
    fmt: "e4m3",
    quant_method: "fp8",
    weight_block_size: [128, 128],
  },
  rms_norm_eps: 1e-6,
  rope_scaling: {
    beta_fast: 32,
    beta_slow: 1,
    factor: 40,
    mscale: 1.0,
    mscale_all_dim: 1.0,
    original_max_position_embeddings: 4096,
    type: "yarn",
  },
  rope_theta: 10000,
  routed_scaling_factor: 2.5,
  scoring_func: "sigmoid",
  tie_word_embeddings: false,
  topk_group: 4,
  topk_method: "noaux_tc",
  torch_dtype: "bfloat16",
  v_head_dim: 128,
  vocab_size: 129280,
};

describe("parseModelConfig", () => {
  it("parses DeepSeek-V3", () => {
    const c = parseModelConfig(V3);
    expect(c).toMatchObject({
      architecture: "DeepseekV3ForCausalLM",
      modelType: "deepseek_v3",
      qLoraRank: 1536,
      topkMethod: "noaux_tc",
      scoringFunc: "sigmoid",
      nGroup: 8,
      topkGroup: 4,
      normTopkProb: true,
      routedScalingFactor: 2.5,
      bosTokenId: 0,
      eosTokenIds: [1],
      numNextnPredictLayers: 1,
      torchDtype: "bfloat16",
      quantization: { quantMethod: "fp8", fmt: "e4m3", weightBlockSize: [128, 128] },
      ropeScaling: {
        type: "yarn",
        factor: 40,
        originalMaxPositionEmbeddings: 4096,
        mscale: 1,
        mscaleAllDim: 1,
      },
    });
    expect(qkHeadDim(c)).toBe(192);
    expect([0, 2, 3, 60, 61].map((l) => isMoeLayer(c, l))).toEqual([
      false,
      false,
      true,
      true,
      false,
    ]);
    expect(modelArchitectureOf(c)).toEqual(resolveArchitecture("deepseek-v3"));
  });

  it("parses DeepSeek-V2-Lite (no q LoRA, greedy routing)", () => {
    const c = parseModelConfig(V2_LITE);
    expect(c).toMatchObject({
      architecture: "DeepseekV2ForCausalLM",
      qLoraRank: null,
      topkMethod: "greedy",
      nGroup: 1,
      quantization: null,
      numNextnPredictLayers: 0,
      ropeScaling: { mscale: V2_MSCALE, mscaleAllDim: V2_MSCALE, betaFast: 32, betaSlow: 1 },
    });
    expect(modelArchitectureOf(c)).toEqual(resolveArchitecture("deepseek-v2-lite"));
  });

  it.each(["v2", "v3"] as const)("parses the tiny-%s config and matches its preset", (arch) => {
    const c = parseModelConfig(tinyConfigJson(arch));
    expect(modelArchitectureOf(c)).toEqual(resolveArchitecture(`tiny-${arch}`));
  });

  it("fills absent fields with DeepseekV3Config's defaults", () => {
    const c = parseModelConfig({ architectures: ["DeepseekV3ForCausalLM"] });
    const { quantization, ropeScaling, torchDtype, maxPositionEmbeddings, ...rest } = c;
    const {
      quantization: _q,
      ropeScaling: _r,
      torchDtype: _t,
      maxPositionEmbeddings: _m,
      ...real
    } = parseModelConfig(V3);
    expect(rest).toEqual(real); // the class defaults are DeepSeek-V3's figures
    expect([quantization, ropeScaling, torchDtype, maxPositionEmbeddings]).toEqual([
      null,
      null,
      null,
      4096,
    ]);
  });

  it("fills absent fields with DeepseekV2Config's defaults", () => {
    const c = parseModelConfig({
      architectures: ["DeepseekV2ForCausalLM"],
      n_routed_experts: 160,
      n_shared_experts: 2,
      num_experts_per_tok: 6,
    });
    expect(c).toMatchObject({
      vocabSize: 102400,
      hiddenSize: 4096,
      numHiddenLayers: 30,
      qLoraRank: 1536,
      kvLoraRank: 512,
      topkMethod: "greedy", // the class default is the misspelt "gready"
      nGroup: 1,
      topkGroup: 1,
      scoringFunc: "softmax",
      normTopkProb: false,
      firstKDenseReplace: 0,
      bosTokenId: 100000,
      eosTokenIds: [100001],
      maxPositionEmbeddings: 2048,
      numNextnPredictLayers: 0,
    });
  });

  it("fills absent YaRN keys with DeepseekV2YarnRotaryEmbedding's defaults", () => {
    const c = parseModelConfig({ ...V3, rope_scaling: { rope_type: "yarn", factor: 8 } });
    expect(c.ropeScaling).toEqual({
      type: "yarn",
      factor: 8,
      originalMaxPositionEmbeddings: 4096,
      betaFast: 32,
      betaSlow: 1,
      mscale: 1,
      mscaleAllDim: 0,
    });
  });

  it("accepts a list of eos ids", () => {
    expect(parseModelConfig({ ...V3, eos_token_id: [1, 2] }).eosTokenIds).toEqual([1, 2]);
  });

  const { n_routed_experts: _, ...v2NoExperts } = V2_LITE;
  const { n_group: __, ...v2NoGroup } = {
    ...V2_LITE,
    topk_method: "group_limited_greedy",
    topk_group: 1,
  };
  const cases: [string, unknown, string][] = [
    ["not an object", [1], "EM_CONFIG_INVALID"],
    ["no architectures", { hidden_size: 1 }, "EM_CONFIG_MISSING_FIELD"],
    ["unknown architecture", { architectures: ["LlamaForCausalLM"] }, "EM_CONFIG_UNKNOWN_ARCH"],
    ["two architectures", { architectures: ["DeepseekV3ForCausalLM", "X"] }, "EM_CONFIG_INVALID"],
    ["V2 without n_routed_experts (dense default)", v2NoExperts, "EM_CONFIG_MISSING_FIELD"],
    ["group routing without n_group", v2NoGroup, "EM_CONFIG_MISSING_FIELD"],
    ["yarn without factor", { ...V3, rope_scaling: { type: "yarn" } }, "EM_CONFIG_MISSING_FIELD"],
    ["explicit null for a required field", { ...V3, hidden_size: null }, "EM_CONFIG_MISSING_FIELD"],
    ["string where an integer goes", { ...V3, hidden_size: "7168" }, "EM_CONFIG_INVALID"],
    ["fractional integer", { ...V3, num_hidden_layers: 2.5 }, "EM_CONFIG_INVALID"],
    ["zero heads", { ...V3, num_attention_heads: 0 }, "EM_CONFIG_INVALID"],
    ["model_type of the other version", { ...V3, model_type: "deepseek_v2" }, "EM_CONFIG_INVALID"],
    ["top-k above experts", { ...V3, num_experts_per_tok: 300 }, "EM_CONFIG_INVALID"],
    ["experts not a multiple of groups", { ...V3, n_group: 7 }, "EM_CONFIG_INVALID"],
    ["topk_group above n_group", { ...V3, topk_group: 9 }, "EM_CONFIG_INVALID"],
    [
      "top-k above the chosen groups",
      { ...V3, topk_group: 1, num_experts_per_tok: 33 },
      "EM_CONFIG_INVALID",
    ],
    [
      "noaux_tc with one expert per group",
      { ...V3, n_group: 256, topk_group: 8 },
      "EM_CONFIG_INVALID",
    ],
    ["all layers dense", { ...V3, first_k_dense_replace: 61 }, "EM_CONFIG_INVALID"],
    ["moe_layer_freq 2", { ...V3, moe_layer_freq: 2 }, "EM_CONFIG_INVALID"],
    ["unknown topk_method", { ...V3, topk_method: "random" }, "EM_CONFIG_INVALID"],
    ["unknown scoring_func", { ...V3, scoring_func: "relu" }, "EM_CONFIG_INVALID"],
    ["norm_topk_prob not boolean", { ...V3, norm_topk_prob: 1 }, "EM_CONFIG_INVALID"],
    ["negative scaling factor", { ...V3, routed_scaling_factor: -1 }, "EM_CONFIG_INVALID"],
    ["odd rope dims", { ...V3, qk_rope_head_dim: 63 }, "EM_CONFIG_INVALID"],
    [
      "linear rope scaling",
      { ...V3, rope_scaling: { type: "linear", factor: 2 } },
      "EM_CONFIG_INVALID",
    ],
    [
      "beta_fast below beta_slow",
      { ...V3, rope_scaling: { type: "yarn", factor: 2, beta_fast: 1, beta_slow: 32 } },
      "EM_CONFIG_INVALID",
    ],
    [
      "another quantization",
      { ...V3, quantization_config: { quant_method: "gptq" } },
      "EM_CONFIG_INVALID",
    ],
    [
      "fp8 blocks of 64",
      { ...V3, quantization_config: { ...V3.quantization_config, weight_block_size: [64, 64] } },
      "EM_CONFIG_INVALID",
    ],
    [
      "fp8 without block size",
      { ...V3, quantization_config: { quant_method: "fp8" } },
      "EM_CONFIG_MISSING_FIELD",
    ],
    ["gelu activation", { ...V3, hidden_act: "gelu" }, "EM_CONFIG_INVALID"],
    ["attention biases", { ...V3, attention_bias: true }, "EM_CONFIG_INVALID"],
    ["unknown torch_dtype", { ...V3, torch_dtype: "int8" }, "EM_CONFIG_INVALID"],
    ["bos outside the vocabulary", { ...V3, bos_token_id: 129280 }, "EM_CONFIG_INVALID"],
    ["eos not an id", { ...V3, eos_token_id: "x" }, "EM_CONFIG_INVALID"],
  ];
  it.each(cases)("rejects %s", (_name, json, code) => {
    expect(codeOf(() => parseModelConfig(json))).toBe(code);
  });

  it("names the file and the field in its messages", () => {
    expect(() => parseModelConfig({ ...V3, n_group: 7 }, "/m/config.json")).toThrow(
      /\/m\/config\.json: n_routed_experts \(256\) must be a multiple of n_group \(7\)/,
    );
  });
});

describe("readModelConfig", () => {
  it("reads dir/config.json", () => {
    const dir = mkdtempSync(join(root, "ok-"));
    writeFileSync(join(dir, "config.json"), JSON.stringify(V3));
    expect(readModelConfig(dir).hiddenSize).toBe(7168);
  });

  it("fails with EM_CONFIG_READ on a missing or non-JSON file", () => {
    const dir = mkdtempSync(join(root, "bad-"));
    expect(codeOf(() => readModelConfig(dir))).toBe("EM_CONFIG_READ");
    writeFileSync(join(dir, "config.json"), "{");
    expect(codeOf(() => readModelConfig(dir))).toBe("EM_CONFIG_READ");
  });
});
