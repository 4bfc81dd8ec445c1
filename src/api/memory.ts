// What the pods of a DeepSeekModel hold in host memory, from the manifest and the plan alone
// (the operator plans before any checkpoint is read): a shard its routed experts, a gateway
// everything else. Weights stay in host memory on GPU nodes too (the device copies are made
// from them). The operator requests these bytes (plus POD_MEMORY_OVERHEAD) for pods whose
// manifest requests no memory; test/unit/memory.test.ts checks them against written
// checkpoints.
import { formatBytes } from "../local/progress.ts";
import type { PlacementPlan } from "../moe/placement.ts";
import { architectureOf } from "./manifest.ts";
import { presetCache, presetCheckpointDtype, presetDense } from "./presets.ts";
import { quantityValue } from "./quantity.ts";
import type { DeepSeekModel } from "./schema.ts";

/** Room a process needs beside its weights and KV cache (runtime, buffers, a batch's rows). */
export const POD_MEMORY_OVERHEAD = 512 * 2 ** 20;

type Served = "bf16" | "fp16" | "fp32" | "fp8";

/**
 * The dtype the linear layers are served in: spec.model.dtype, or for auto the preset's
 * checkpoint dtype; null when neither says (explicit figures with auto).
 */
export function servedLinearDtype(model: DeepSeekModel): Served | null {
  const { dtype, preset } = model.spec.model;
  if (dtype !== "auto") return dtype;
  return preset ? presetCheckpointDtype(preset) : null;
}

/** Bytes of a [rows, cols] linear weight in `dtype` (fp8: its 128 x 128 block scales too). */
function matrix(rows: number, cols: number, dtype: Served): number {
  if (dtype === "fp8") return rows * cols + Math.ceil(rows / 128) * Math.ceil(cols / 128) * 4;
  return rows * cols * (dtype === "fp32" ? 4 : 2);
}

/** An FFN's gate, up and down weights (hidden <-> inner). */
function ffn(hidden: number, inner: number, dtype: Served): number {
  return 2 * matrix(inner, hidden, dtype) + matrix(hidden, inner, dtype);
}

/**
 * Bytes of the routed experts shard `k` holds (the redundant copies it was given included),
 * in the dtype it serves them in; null when that is not known.
 */
export function shardExpertBytes(
  model: DeepSeekModel,
  plan: PlacementPlan,
  k: number,
): number | null {
  const dtype = servedLinearDtype(model);
  if (dtype === null) return null;
  const { hiddenSize, moeIntermediateSize } = architectureOf(model);
  const expert = ffn(hiddenSize, moeIntermediateSize, dtype);
  // Each expert once: a shard holding an expert it also has a redundant slot for loads it once.
  return plan.layers.reduce((n, l) => n + new Set(l.shardExperts[k]).size * expert, 0);
}

/** shardExpertBytes of every shard of the plan, by index; null when not known. */
export function everyShardExpertBytes(model: DeepSeekModel, plan: PlacementPlan): number[] | null {
  const bytes = Array.from({ length: plan.numShards }, (_, k) => shardExpertBytes(model, plan, k));
  return bytes.some((b) => b === null) ? null : (bytes as number[]);
}

/**
 * Bytes of a gateway's weights: embeddings, LM head, every block's attention and norms, the
 * dense MLPs, routers and shared experts, and with MTP drafts the MTP layer's dense part
 * (its copies of the embeddings and head are the main model's: dropped). Linear layers in
 * the served dtype; embeddings, head, norms and routers in bf16 (as DeepSeek's checkpoints
 * store them). Null without a preset (its dense figures) or a known dtype.
 */
export function gatewayWeightBytes(model: DeepSeekModel): number | null {
  const { preset } = model.spec.model;
  const dtype = servedLinearDtype(model);
  if (!preset || dtype === null) return null;
  const a = architectureOf(model);
  const d = presetDense(preset);
  const { kvLoraRank, ropeDim } = presetCache(preset);
  const h = a.hiddenSize;
  const bf16 = (n: number) => 2 * n;
  const qk = d.nopeDim + ropeDim;
  const attention =
    (d.qLoraRank === null
      ? matrix(d.heads * qk, h, dtype)
      : matrix(d.qLoraRank, h, dtype) +
        matrix(d.heads * qk, d.qLoraRank, dtype) +
        bf16(d.qLoraRank)) +
    matrix(kvLoraRank + ropeDim, h, dtype) +
    bf16(kvLoraRank) +
    matrix(d.heads * (d.nopeDim + d.vDim), kvLoraRank, dtype) +
    matrix(h, d.heads * d.vDim, dtype) +
    bf16(2 * h);
  const moeDense =
    bf16(a.routedExperts * h) +
    (d.routerBias ? 4 * a.routedExperts : 0) +
    (a.sharedExperts > 0 ? ffn(h, a.moeIntermediateSize * a.sharedExperts, dtype) : 0);
  const moeLayers = a.numLayers - a.firstDenseLayers;
  const mtp =
    model.spec.gateway.speculative?.method === "mtp"
      ? attention + moeDense + matrix(h, 2 * h, dtype) + bf16(3 * h)
      : 0;
  return (
    2 * bf16(d.vocabSize * h) +
    bf16(h) +
    a.numLayers * attention +
    a.firstDenseLayers * ffn(h, d.intermediateSize, dtype) +
    moeLayers * moeDense +
    mtp
  );
}

/**
 * Where the manifest's memory limits are below what a pod holds for certain (its weights,
 * and a gateway's KV cache): each such pod would be killed for memory while loading, again
 * and again. One message per role, naming the field, the limit and the bytes.
 */
export function memoryLimitShortfalls(model: DeepSeekModel, plan: PlacementPlan): string[] {
  const out: string[] = [];
  const limit = (r: { limits?: Record<string, string | number> } | undefined) => {
    const q = r?.limits?.["memory"];
    return q === undefined ? null : { text: String(q), bytes: quantityValue(q) };
  };
  const dtype = servedLinearDtype(model);
  const shardLimit = limit(model.spec.experts.resources);
  if (shardLimit?.bytes != null) {
    const bytes = everyShardExpertBytes(model, plan) ?? [];
    const worst = Math.max(0, ...bytes);
    if (worst > shardLimit.bytes)
      out.push(
        `spec.experts.resources.limits.memory ${shardLimit.text} is less than shard ${bytes.indexOf(worst)}'s experts alone (${formatBytes(worst)} in ${dtype}): a shard holds its experts in host memory; raise the limit above that, plus room (expertmesh plan -f prints what each pod holds)`,
      );
  }
  const gatewayLimit = limit(model.spec.gateway.resources);
  if (gatewayLimit?.bytes != null) {
    const kv = model.spec.gateway.kvCache.bytes;
    const weights = gatewayWeightBytes(model);
    if (kv + (weights ?? 0) > gatewayLimit.bytes)
      out.push(
        `spec.gateway.resources.limits.memory ${gatewayLimit.text} is less than the gateway's ${weights === null ? "" : `weights (${formatBytes(weights)}) and `}KV cache (${formatBytes(kv)}, spec.gateway.kvCache.bytes): raise the limit above ${weights === null ? "that" : "their sum"}, plus room`,
      );
  }
  return out;
}
