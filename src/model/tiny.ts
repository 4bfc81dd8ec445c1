// Deterministic random DeepSeek checkpoints in the exact Hugging Face layout, for tests
// (`tiny`, matching the tiny-v2 / tiny-v3 presets of src/api/presets.ts) and benchmarks
// (`mini`, about 1 GB in bf16). Every tensor draws from its own PRNG stream keyed by
// (seed, tensor name), so values do not depend on sharding or on --fp8, and one seed
// always gives byte-identical files. docs/tiny-models.md explains the figures.
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ExpertMeshError } from "../util/errors.ts";
import { makeDirs } from "../util/fs.ts";
import { INDEX_FILE, SINGLE_FILE } from "./checkpoint.ts";
import { type ModelConfig, parseModelConfig } from "./config.ts";
import { float32ArrayToBf16, quantizeE4m3Blocks } from "./floats.ts";
import { Prng } from "./prng.ts";
import {
  numElements,
  type TensorToWrite,
  tensorBytes,
  type WriteProgress,
  writeSafetensors,
} from "./safetensors.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson, tinyTokenizerSize } from "./tiny-tokenizer.ts";
import { isFp8Weight, modelWeights, mtpWeights, scaleInvOf, type WeightSpec } from "./weights.ts";

export type TinyArch = "v2" | "v3";
export type TinyPreset = "tiny" | "mini";

/** Options of one tiny checkpoint. */
export interface TinyModelOptions {
  readonly arch: TinyArch;
  readonly preset?: TinyPreset;
  /** PRNG seed, an integer in [0, 2^32); default 0. */
  readonly seed?: number;
  /** Store Linear weights as fp8 e4m3 with 128x128 block scales. */
  readonly fp8?: boolean;
  /**
   * Add one multi-token-prediction layer (v3 only: `num_nextn_predict_layers: 1` and the
   * tensors of `model.layers.{L}`, random like the rest), for MTP speculative decoding.
   */
  readonly mtp?: boolean;
  /** Number of safetensors files; > 1 writes `model-0000k-of-0000n.safetensors` + index. */
  readonly shards?: number;
  /** Called after each tensor with the bytes written so far over all files. */
  readonly onProgress?: (p: { bytesWritten: number; totalBytes: number; file: string }) => void;
}

/** What was written. */
export interface TinyModelSummary {
  readonly dir: string;
  readonly config: ModelConfig;
  /** Files written, with sizes in bytes. */
  readonly files: readonly { name: string; bytes: number }[];
  readonly numTensors: number;
  /** Bytes of tensor data over all safetensors files. */
  readonly tensorBytes: number;
}

/** Architecture figures per (arch, preset), in config.json keys. */
function figures(arch: TinyArch, preset: TinyPreset): Record<string, unknown> {
  const v3 = arch === "v3";
  if (preset === "tiny") {
    return {
      hidden_size: 64,
      intermediate_size: 128,
      moe_intermediate_size: 32,
      num_hidden_layers: v3 ? 4 : 3,
      num_attention_heads: 4,
      num_key_value_heads: 4,
      q_lora_rank: v3 ? 32 : null,
      kv_lora_rank: 32,
      qk_nope_head_dim: 16,
      qk_rope_head_dim: 8,
      v_head_dim: 16,
      n_routed_experts: v3 ? 16 : 8,
      n_shared_experts: v3 ? 1 : 2,
      num_experts_per_tok: v3 ? 4 : 2,
      // V2 scores groups by their best expert: with top-2 from 2 of 4 groups the limit
      // would never change a choice, so V2 picks its 2 experts from 1 of 2 groups of 4.
      n_group: v3 ? 4 : 2,
      topk_group: v3 ? 2 : 1,
      max_position_embeddings: 256,
      rope_scaling: yarn(arch, 64),
    };
  }
  return {
    hidden_size: 1024,
    intermediate_size: 2816,
    moe_intermediate_size: 384,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 8,
    q_lora_rank: v3 ? 384 : null,
    kv_lora_rank: 256,
    qk_nope_head_dim: 64,
    qk_rope_head_dim: 32,
    v_head_dim: 64,
    n_routed_experts: 64,
    n_shared_experts: v3 ? 1 : 2,
    num_experts_per_tok: 6,
    n_group: 8,
    topk_group: v3 ? 4 : 3,
    max_position_embeddings: 4096,
    rope_scaling: yarn(arch, 1024),
  };
}

function yarn(arch: TinyArch, original: number): Record<string, unknown> {
  // DeepSeek-V2 ships mscale = mscale_all_dim = 0.707, V3 ships 1.0 for both.
  // biome-ignore lint/suspicious/noApproximativeNumericConstant: the literal of V2's config.json
  const mscale = arch === "v3" ? 1.0 : 0.707;
  return {
    type: "yarn",
    factor: 4,
    original_max_position_embeddings: original,
    beta_fast: 32,
    beta_slow: 1,
    mscale,
    mscale_all_dim: mscale,
  };
}

/** The `config.json` object of a tiny checkpoint. */
export function tinyConfigJson(
  arch: TinyArch,
  preset: TinyPreset = "tiny",
  fp8 = false,
  mtp = false,
): Record<string, unknown> {
  const v3 = arch === "v3";
  const json: Record<string, unknown> = {
    architectures: [v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"],
    model_type: v3 ? "deepseek_v3" : "deepseek_v2",
    vocab_size: Math.ceil(tinyTokenizerSize() / 64) * 64,
    ...figures(arch, preset),
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    topk_method: v3 ? "noaux_tc" : "group_limited_greedy",
    scoring_func: v3 ? "sigmoid" : "softmax",
    norm_topk_prob: v3,
    routed_scaling_factor: v3 ? 2.5 : 1.0,
    ep_size: 1,
    aux_loss_alpha: 0.001,
    seq_aux: true,
    hidden_act: "silu",
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    tie_word_embeddings: false,
    attention_bias: false,
    attention_dropout: 0.0,
    initializer_range: 0.02,
    bos_token_id: 0,
    eos_token_id: 1,
    pad_token_id: null,
    pretraining_tp: 1,
    use_cache: true,
    torch_dtype: "bfloat16",
  };
  if (mtp && !v3)
    throw new ExpertMeshError("EM_CLI_USAGE", "an MTP layer is a DeepSeek-V3 part: use --arch v3");
  if (v3) json["num_nextn_predict_layers"] = mtp ? 1 : 0;
  if (fp8) {
    json["quantization_config"] = {
      quant_method: "fp8",
      fmt: "e4m3",
      activation_scheme: "dynamic",
      weight_block_size: [128, 128],
    };
  }
  return json;
}

/**
 * The float32 values of weight `w` for `seed`, scaled so activations stay O(1) through
 * the layers: Linear weights N(0, 1/in_features) (so does the router gate and LM head),
 * embeddings N(0, 1), norms 1 + N(0, 0.05^2), the V3 gate bias N(0, 0.1^2) - 0.05.
 */
export function tinyWeightValues(w: WeightSpec, seed: number): Float32Array {
  const rng = new Prng(seed, w.name);
  const out = new Float32Array(numElements(w.shape));
  switch (w.kind) {
    case "embedding":
      return rng.fillNormal(out, 1);
    case "norm":
      return rng.fillNormal(out, 0.05, 1);
    case "gate_bias":
      // Negative and positive biases, large next to the gaps between sigmoid scores, so
      // they change which experts are picked (docs/tiny-models.md).
      return rng.fillNormal(out, 0.1, -0.05);
    case "linear":
    case "gate":
    case "lm_head":
      return rng.fillNormal(out, 1 / Math.sqrt(w.shape[1]!));
  }
}

/**
 * The tensors to write, in checkpoint order, each producing its data on demand. fp8
 * weights are followed by their `_scale_inv`; the gate bias is F32 as in DeepSeek-V3.
 */
export function tinyTensors(config: ModelConfig, seed: number): TensorToWrite[][] {
  const fp8 = config.quantization !== null;
  const units: TensorToWrite[][] = [];
  for (const w of [...modelWeights(config), ...mtpWeights(config)]) {
    const values = () => tinyWeightValues(w, seed);
    if (w.kind === "gate_bias") {
      units.push([{ name: w.name, dtype: "F32", shape: w.shape, data: values }]);
    } else if (fp8 && isFp8Weight(w)) {
      const [rows, cols] = w.shape as [number, number];
      let scaleInv: Float32Array | null = null;
      const scale = scaleInvOf(w);
      units.push([
        {
          name: w.name,
          dtype: "F8_E4M3",
          shape: w.shape,
          data: () => {
            const q = quantizeE4m3Blocks(values(), rows, cols);
            scaleInv = q.scaleInv;
            return q.codes;
          },
        },
        {
          name: scale.name,
          dtype: "F32",
          shape: scale.shape,
          // The writer produces tensors in order, so the weight above ran just before.
          data: () => scaleInv ?? quantizeE4m3Blocks(values(), rows, cols).scaleInv,
        },
      ]);
    } else {
      units.push([
        { name: w.name, dtype: "BF16", shape: w.shape, data: () => float32ArrayToBf16(values()) },
      ]);
    }
  }
  return units;
}

/** Splits units (tensors that stay together) into `n` contiguous shards of similar bytes. */
function splitShards(units: TensorToWrite[][], n: number): TensorToWrite[][] {
  const sizes = units.map((u) => u.reduce((a, t) => a + tensorBytes(t), 0));
  const total = sizes.reduce((a, b) => a + b, 0);
  const shards: TensorToWrite[][] = Array.from({ length: n }, () => []);
  let before = 0;
  units.forEach((u, i) => {
    const k = Math.min(n - 1, Math.floor((before * n) / total));
    shards[k]!.push(...u);
    before += sizes[i]!;
  });
  const empty = shards.findIndex((s) => s.length === 0);
  if (empty >= 0) {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--shards ${n} is too many for this model: shard ${empty + 1} would be empty`,
    );
  }
  return shards;
}

function shardName(k: number, n: number): string {
  const pad = (x: number) => String(x).padStart(5, "0");
  return `model-${pad(k + 1)}-of-${pad(n)}.safetensors`;
}

/** A JSON file as writeTinyModel writes it. */
const jsonText = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;

/**
 * Whether `dir` holds the JSON files writeTinyModel would write now for `opts` (config and
 * tokenizer; the weights follow from the config and the seed): false for a checkpoint an
 * older expertmesh wrote (the tokenizer gained DeepSeek's tool-call tokens, for one).
 */
export function tinyModelCurrent(dir: string, opts: TinyModelOptions): boolean {
  const configJson = tinyConfigJson(
    opts.arch,
    opts.preset ?? "tiny",
    opts.fp8 ?? false,
    opts.mtp ?? false,
  );
  const config = parseModelConfig(configJson, `tiny ${opts.arch} config`);
  const want: [string, unknown][] = [
    ["config.json", configJson],
    ["tokenizer.json", tinyTokenizerJson()],
    ["tokenizer_config.json", tinyTokenizerConfigJson(config.maxPositionEmbeddings)],
  ];
  try {
    return want.every(([name, value]) => readFileSync(join(dir, name), "utf8") === jsonText(value));
  } catch {
    return false;
  }
}

/**
 * Writes a tiny checkpoint into `dir` (created if needed): config.json,
 * generation_config.json, tokenizer.json, tokenizer_config.json and the weights. Old
 * `model*.safetensors` files and index in `dir` are removed first so they cannot shadow
 * the new ones. Tensors are produced and written one at a time.
 */
export async function writeTinyModel(
  dir: string,
  opts: TinyModelOptions,
): Promise<TinyModelSummary> {
  const preset = opts.preset ?? "tiny";
  const seed = opts.seed ?? 0;
  const numShards = opts.shards ?? 1;
  if (!Number.isSafeInteger(seed) || seed < 0 || seed >= 2 ** 32) {
    throw new ExpertMeshError("EM_CLI_USAGE", `seed must be an integer in [0, 2^32), got ${seed}`);
  }
  if (!Number.isSafeInteger(numShards) || numShards < 1) {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `shards must be a positive integer, got ${numShards}`,
    );
  }
  const configJson = tinyConfigJson(opts.arch, preset, opts.fp8 ?? false, opts.mtp ?? false);
  const config = parseModelConfig(configJson, `tiny ${opts.arch} ${preset} config`);
  const shards = splitShards(tinyTensors(config, seed), numShards);

  const totalBytes = shards.flat().reduce((a, t) => a + tensorBytes(t), 0);
  let written: string[];
  try {
    makeDirs(dir);
    removeOldWeights(dir);
    const json = (name: string, value: unknown) => writeFileSync(join(dir, name), jsonText(value));
    json("config.json", configJson);
    json("generation_config.json", {
      bos_token_id: config.bosTokenId,
      eos_token_id: config.eosTokenIds[0],
      do_sample: true,
      temperature: 0.6,
      top_p: 0.95,
    });
    json("tokenizer.json", tinyTokenizerJson());
    json("tokenizer_config.json", tinyTokenizerConfigJson(config.maxPositionEmbeddings));

    let doneBefore = 0;
    const names = numShards === 1 ? [SINGLE_FILE] : shards.map((_, k) => shardName(k, numShards));
    for (const [k, tensors] of shards.entries()) {
      const file = names[k]!;
      const progress = (p: WriteProgress) =>
        opts.onProgress?.({ bytesWritten: doneBefore + p.bytesWritten, totalBytes, file });
      await writeSafetensors(join(dir, file), tensors, { format: "pt" }, progress);
      doneBefore += tensors.reduce((a, t) => a + tensorBytes(t), 0);
    }
    if (numShards > 1) {
      const weightMap: Record<string, string> = {};
      const entries = shards.flatMap((tensors, k) =>
        tensors.map((t) => [t.name, names[k]!] as const),
      );
      for (const [name, file] of entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
        weightMap[name] = file;
      }
      json(INDEX_FILE, { metadata: { total_size: totalBytes }, weight_map: weightMap });
    }
    written = [
      "config.json",
      "generation_config.json",
      "tokenizer.json",
      "tokenizer_config.json",
      ...names,
      ...(numShards > 1 ? [INDEX_FILE] : []),
    ];
  } catch (err) {
    if (err instanceof ExpertMeshError) throw err;
    throw new ExpertMeshError(
      "EM_WRITE_FAILED",
      `cannot write the tiny model to ${dir}: ${err instanceof Error ? err.message : err}`,
      { cause: err },
    );
  }
  const files = written.map((name) => ({ name, bytes: statSync(join(dir, name)).size }));
  return { dir, config, files, numTensors: shards.flat().length, tensorBytes: totalBytes };
}

function removeOldWeights(dir: string): void {
  for (const name of readdirSync(dir)) {
    if (
      name === SINGLE_FILE ||
      name === INDEX_FILE ||
      /^model-\d+-of-\d+\.safetensors$/.test(name)
    ) {
      rmSync(join(dir, name));
    }
  }
}
