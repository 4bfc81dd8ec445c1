// Loads a checkpoint's weights into the structures the model runs on, reading only the
// tensors asked for: a gateway skips the routed experts, a shard loads only its own.
import type { Checkpoint } from "../model/checkpoint.ts";
import {
  isMoeLayer,
  isMtpLayer,
  type ModelConfig,
  qkHeadDim,
  sharedExpertsIntermediateSize,
} from "../model/config.ts";
import { bf16ToFloat32, f16ToFloat32 } from "../model/floats.ts";
import type { Dtype } from "../model/safetensors.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { Weight } from "./backend.ts";
import { type ServeDtype, servedLinear } from "./weight-dtype.ts";

export interface MlpWeights {
  readonly gate: Weight;
  readonly up: Weight;
  readonly down: Weight;
}

export interface AttentionWeights {
  /** V2 (no q LoRA): q_proj; V3: q_a_proj, q_a_layernorm, q_b_proj. */
  readonly qProj?: Weight;
  readonly qA?: Weight;
  readonly qANorm?: Weight;
  readonly qB?: Weight;
  readonly kvA: Weight;
  readonly kvANorm: Weight;
  readonly kvB: Weight;
  readonly o: Weight;
}

export interface MoeWeights {
  readonly router: Weight;
  /** e_score_correction_bias (noaux_tc), used for selection only. */
  readonly bias: Float32Array | null;
  /** Routed experts loaded here, by id. */
  readonly experts: Map<number, MlpWeights>;
  readonly shared: MlpWeights | null;
}

export interface LayerWeights {
  readonly index: number;
  readonly inputNorm: Weight;
  readonly postNorm: Weight;
  readonly attention: AttentionWeights;
  readonly mlp?: MlpWeights;
  readonly moe?: MoeWeights;
}

export interface ModelWeights {
  readonly config: ModelConfig;
  readonly embed: Weight;
  readonly layers: LayerWeights[];
  readonly norm: Weight;
  readonly lmHead: Weight;
  /** The first MTP layer, when loaded (LoadOptions.mtp). */
  readonly mtp?: MtpWeights;
}

/** Which routed experts to load: all, none (a gateway), or a predicate (a shard). */
export type ExpertFilter = "all" | "none" | ((layer: number, expert: number) => boolean);

const DTYPES: Record<Dtype, Weight["dtype"]> = {
  BF16: "bf16",
  F16: "f16",
  F32: "f32",
  F8_E4M3: "fp8",
};

/** Reads one weight, with its fp8 scales when the checkpoint stores it in fp8. */
export async function readWeight(
  ckpt: Checkpoint,
  name: string,
  shape: readonly number[],
): Promise<Weight> {
  const t = await ckpt.read(name, { shape });
  const [rows, cols] = shape.length === 2 ? (shape as [number, number]) : [1, shape[0]!];
  if (t.dtype !== "F8_E4M3") return { dtype: DTYPES[t.dtype], data: t.data, rows, cols };
  const scale = await ckpt.read(`${name}_scale_inv`, {
    shape: [Math.ceil(rows / 128), Math.ceil(cols / 128)],
    dtypes: ["F32"],
  });
  return { dtype: "fp8", data: t.data, rows, cols, scaleInv: scale.data as Float32Array };
}

/** A linear layer's weight, in the serving dtype (weight-dtype.ts). */
async function readLinear(
  ckpt: Checkpoint,
  name: string,
  shape: readonly [number, number],
  dtype: ServeDtype,
): Promise<Weight> {
  return servedLinear(await readWeight(ckpt, name, shape), dtype);
}

/** A 1-D tensor as float32 (biases). */
async function readVector(ckpt: Checkpoint, name: string, n: number): Promise<Float32Array> {
  const t = await ckpt.read(name, { shape: [n] });
  if (t.dtype === "F32") return t.data as Float32Array;
  if (t.dtype === "BF16") return Float32Array.from(t.data as Uint16Array, bf16ToFloat32);
  return Float32Array.from(t.data as Uint16Array, f16ToFloat32);
}

async function readMlp(
  ckpt: Checkpoint,
  prefix: string,
  hidden: number,
  inner: number,
  dtype: ServeDtype,
): Promise<MlpWeights> {
  return {
    gate: await readLinear(ckpt, `${prefix}.gate_proj.weight`, [inner, hidden], dtype),
    up: await readLinear(ckpt, `${prefix}.up_proj.weight`, [inner, hidden], dtype),
    down: await readLinear(ckpt, `${prefix}.down_proj.weight`, [hidden, inner], dtype),
  };
}

/**
 * DeepSeek-V3's multi-token-prediction module (one per `num_nextn_predict_layers`): the
 * next-but-one token from the main model's final hidden state h_i and the embedding of
 * token i + 1, as vLLM's DeepSeekMTP runs it: logits = head(norm(block(eh_proj([enorm(e);
 * hnorm(h)])))). The block is an MoE decoder layer with index num_hidden_layers + k.
 */
export interface MtpWeights {
  readonly embed: Weight;
  readonly enorm: Weight;
  readonly hnorm: Weight;
  /** [hidden, 2 hidden]: the embedding's half first. */
  readonly ehProj: Weight;
  readonly layer: LayerWeights;
  readonly headNorm: Weight;
  readonly head: Weight;
}

export interface LoadOptions {
  /**
   * Also load the first MTP layer (the checkpoint opened with `mtp`). Throws
   * EM_CKPT_NO_MTP when the model has none.
   */
  readonly mtp?: boolean;
  /** The linear layers' weight dtype (weight-dtype.ts; default auto: the checkpoint's). */
  readonly dtype?: ServeDtype;
}

/** Loads the weights; `onProgress(done, total)` after each layer. */
export async function loadWeights(
  ckpt: Checkpoint,
  experts: ExpertFilter = "all",
  onProgress?: (done: number, total: number) => void,
  opts: LoadOptions = {},
): Promise<ModelWeights> {
  const c = ckpt.config;
  const h = c.hiddenSize;
  const dtype = opts.dtype ?? "auto";
  const wanted = (layer: number, e: number) =>
    experts === "all" ? true : experts === "none" ? false : experts(layer, e);
  if (opts.mtp && (c.numNextnPredictLayers < 1 || !ckpt.mtp))
    throw new ExpertMeshError(
      "EM_CKPT_NO_MTP",
      c.numNextnPredictLayers < 1
        ? `${ckpt.dir}: the model has no multi-token-prediction layer (num_nextn_predict_layers is 0), so it cannot draft with MTP`
        : `${ckpt.dir}: the checkpoint was opened without its MTP layer`,
    );
  const total = c.numHiddenLayers + (opts.mtp ? 1 : 0);
  const layers: LayerWeights[] = [];
  for (let i = 0; i < c.numHiddenLayers; i++) {
    layers.push(await readLayer(ckpt, i, isMoeLayer(c, i), wanted, dtype));
    onProgress?.(i + 1, total);
  }
  const embed = await readWeight(ckpt, "model.embed_tokens.weight", [c.vocabSize, h]);
  const lmHead = c.tieWordEmbeddings
    ? embed
    : await readWeight(ckpt, "lm_head.weight", [c.vocabSize, h]);
  let mtp: MtpWeights | undefined;
  if (opts.mtp) {
    const i = c.numHiddenLayers;
    const p = `model.layers.${i}`;
    // DeepSeek-V3 stores the module's own copies of the embedding and head, with the same
    // values as the main model's (the report: shared). A copy equal to the main model's
    // tensor is dropped for it (2 x 1.85 GB on a V3 gateway); a checkpoint without the
    // copies shares the main model's.
    const own = async (name: string, shared: Weight) => {
      if (!ckpt.has(`${p}.${name}`)) return shared;
      const w = await readWeight(ckpt, `${p}.${name}`, [c.vocabSize, h]);
      return sameWeight(w, shared) ? shared : w;
    };
    mtp = {
      embed: await own("embed_tokens.weight", embed),
      enorm: await readWeight(ckpt, `${p}.enorm.weight`, [h]),
      hnorm: await readWeight(ckpt, `${p}.hnorm.weight`, [h]),
      ehProj: await readLinear(ckpt, `${p}.eh_proj.weight`, [h, 2 * h], dtype),
      layer: await readLayer(ckpt, i, c.nRoutedExperts > 0, wanted, dtype),
      headNorm: await readWeight(ckpt, `${p}.shared_head.norm.weight`, [h]),
      head: await own("shared_head.head.weight", lmHead),
    };
    onProgress?.(total, total);
  }
  return {
    config: c,
    embed,
    layers,
    norm: await readWeight(ckpt, "model.norm.weight", [h]),
    lmHead,
    ...(mtp ? { mtp } : {}),
  };
}

/** Whether two weights hold the same bytes (dtype, shape, data and fp8 scales). */
function sameWeight(a: Weight, b: Weight): boolean {
  const bytes = (x: ArrayBufferView) => Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  return (
    a.dtype === b.dtype &&
    a.rows === b.rows &&
    a.cols === b.cols &&
    bytes(a.data).equals(bytes(b.data)) &&
    (a.scaleInv === undefined) === (b.scaleInv === undefined) &&
    (a.scaleInv === undefined || bytes(a.scaleInv).equals(bytes(b.scaleInv!)))
  );
}

/** Block `i`'s weights: attention, norms, and its dense MLP or MoE (routed experts `wanted`). */
async function readLayer(
  ckpt: Checkpoint,
  i: number,
  moe: boolean,
  wanted: (layer: number, expert: number) => boolean,
  dtype: ServeDtype,
): Promise<LayerWeights> {
  const c = ckpt.config;
  const h = c.hiddenSize;
  const H = c.numAttentionHeads;
  const p = `model.layers.${i}`;
  const linear = (name: string, rows: number, cols: number) =>
    readLinear(ckpt, `${p}.self_attn.${name}.weight`, [rows, cols], dtype);
  const attention: AttentionWeights = {
    ...(c.qLoraRank === null
      ? { qProj: await linear("q_proj", H * qkHeadDim(c), h) }
      : {
          qA: await linear("q_a_proj", c.qLoraRank, h),
          qANorm: await readWeight(ckpt, `${p}.self_attn.q_a_layernorm.weight`, [c.qLoraRank]),
          qB: await linear("q_b_proj", H * qkHeadDim(c), c.qLoraRank),
        }),
    kvA: await linear("kv_a_proj_with_mqa", c.kvLoraRank + c.qkRopeHeadDim, h),
    kvANorm: await readWeight(ckpt, `${p}.self_attn.kv_a_layernorm.weight`, [c.kvLoraRank]),
    kvB: await linear("kv_b_proj", H * (c.qkNopeHeadDim + c.vHeadDim), c.kvLoraRank),
    o: await linear("o_proj", h, H * c.vHeadDim),
  };
  const base = {
    index: i,
    inputNorm: await readWeight(ckpt, `${p}.input_layernorm.weight`, [h]),
    postNorm: await readWeight(ckpt, `${p}.post_attention_layernorm.weight`, [h]),
    attention,
  };
  if (!moe) return { ...base, mlp: await readMlp(ckpt, `${p}.mlp`, h, c.intermediateSize, dtype) };
  const loaded = new Map<number, MlpWeights>();
  for (let e = 0; e < c.nRoutedExperts; e++) {
    if (wanted(i, e))
      loaded.set(e, await readMlp(ckpt, `${p}.mlp.experts.${e}`, h, c.moeIntermediateSize, dtype));
  }
  return {
    ...base,
    moe: {
      router: await readWeight(ckpt, `${p}.mlp.gate.weight`, [c.nRoutedExperts, h]),
      bias:
        c.topkMethod === "noaux_tc"
          ? await readVector(ckpt, `${p}.mlp.gate.e_score_correction_bias`, c.nRoutedExperts)
          : null,
      experts: loaded,
      shared:
        c.nSharedExperts > 0
          ? await readMlp(
              ckpt,
              `${p}.mlp.shared_experts`,
              h,
              sharedExpertsIntermediateSize(c),
              dtype,
            )
          : null,
    },
  };
}

/** The routed experts this process holds, by layer (the MTP layer's too): LocalExperts' lookup. */
export function heldExperts(w: ModelWeights): (layer: number) => Map<number, MlpWeights> {
  return (layer) => {
    const l = layer === w.mtp?.layer.index ? w.mtp.layer : w.layers[layer];
    const moe = l?.moe;
    if (!moe)
      throw new ExpertMeshError("EM_GATEWAY_INTERNAL", `layer ${layer} has no routed experts here`);
    return moe.experts;
  };
}

/**
 * Only routed experts, for a shard: reads nothing but the tensors of the experts `wanted`
 * selects (plus the tiny config). Resolves layer -> expert -> weights.
 */
export async function loadExperts(
  ckpt: Checkpoint,
  wanted: (layer: number, expert: number) => boolean,
  onProgress?: (done: number, total: number) => void,
  opts: { readonly dtype?: ServeDtype } = {},
): Promise<Map<number, Map<number, MlpWeights>>> {
  const c = ckpt.config;
  const out = new Map<number, Map<number, MlpWeights>>();
  const jobs: [number, number][] = [];
  // The MTP layers' experts too, when the checkpoint was opened with them.
  const layers = c.numHiddenLayers + (ckpt.mtp ? c.numNextnPredictLayers : 0);
  for (let i = 0; i < layers; i++) {
    if (!isMoeLayer(c, i) && !isMtpLayer(c, i)) continue;
    out.set(i, new Map());
    for (let e = 0; e < c.nRoutedExperts; e++) if (wanted(i, e)) jobs.push([i, e]);
  }
  let done = 0;
  for (const [i, e] of jobs) {
    out
      .get(i)!
      .set(
        e,
        await readMlp(
          ckpt,
          `model.layers.${i}.mlp.experts.${e}`,
          c.hiddenSize,
          c.moeIntermediateSize,
          opts.dtype ?? "auto",
        ),
      );
    onProgress?.(++done, jobs.length);
  }
  return out;
}
