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
import { DEFAULT_GPU_RESOURCE, type DeepSeekModel } from "./schema.ts";

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

/**
 * What a process keeps on its GPU beside its weights (and a gateway's KV cache mirror):
 * CUDA's context, cuBLAS's workspaces and the scratch of a large batch's activations (a V3
 * shard's moe_ffn at 4096 tokens: ~2 GB).
 */
export const GPU_MEMORY_OVERHEAD = 2 * 2 ** 30;

/** One node's GPU of a role's resource, and its memory (from the node's labels). */
export interface NodeGpuMemory {
  node: string;
  bytes: number;
}

/**
 * The node label that gives the memory of one device of `resource`, as NVIDIA's GPU feature
 * discovery writes it: `nvidia.com/gpu.memory` for whole GPUs (a MIG slice's with the
 * single strategy), `nvidia.com/mig-3g.71gb.memory` per profile with the mixed strategy; in
 * MiB. Null where that label would not be a valid key (its name part over 63 characters).
 */
export function gpuMemoryLabel(resource: string): string | null {
  const label = `${resource}.memory`;
  const name = label.slice(label.indexOf("/") + 1);
  return name.length <= 63 ? label : null;
}

/** One GPU's memory given by hand (`expertmesh plan --gpu-memory`), for every role. */
export interface GivenGpu {
  bytes: number;
  /** How it was given, for the messages: "--gpu-memory 80Gi". */
  flag: string;
}

/**
 * Where a role's process keeps more on its GPU than one device of the role's resource holds,
 * on the nodes that offer it: the shard with the most experts (resident weights, the
 * addon's default), a gateway's weights and its KV cache's device mirror, each plus
 * GPU_MEMORY_OVERHEAD. Not an error: what does not fit is copied to the GPU per op (weights)
 * or read from host memory (the KV mirror), at PCIe's speed instead of HBM's. One message
 * per role, for the reconciler's Warning Event GPUMemoryShort (or `plan --gpu-memory`'s
 * verdict); none for a role without GPUs, without known bytes or without labelled nodes.
 */
export function gpuMemoryShortfalls(
  model: DeepSeekModel,
  plan: PlacementPlan,
  nodes: { gateway: readonly NodeGpuMemory[]; experts: readonly NodeGpuMemory[] } | GivenGpu,
): string[] {
  const out: string[] = [];
  const dtype = servedLinearDtype(model);
  const where = (resource: string, need: number, role: "gateway" | "experts") => {
    if ("flag" in nodes) {
      const { bytes, flag } = nodes;
      return bytes >= need
        ? null
        : {
            text: `more than one GPU of ${formatBytes(bytes)} (${flag}) holds`,
            largest: bytes,
            fitsSomewhere: false,
          };
    }
    const offered = nodes[role];
    const short = offered.filter((n) => n.bytes < need);
    if (short.length === 0) return null;
    const largest = Math.max(...offered.map((n) => n.bytes));
    const names = short
      .slice(0, 3)
      .map((n) => n.node)
      .join(", ");
    const more = short.length > 3 ? ` and ${short.length - 3} more` : "";
    return {
      text:
        short.length === offered.length
          ? `more than one ${resource} holds on every node that offers it (${formatBytes(largest)} at most, ${gpuMemoryLabel(resource)}; ${offered.length} node(s))`
          : `more than one ${resource} holds on ${short.length} of the ${offered.length} nodes that offer it (${names}${more}; ${gpuMemoryLabel(resource)})`,
      largest,
      fitsSomewhere: short.length < offered.length,
    };
  };
  // A GPU smaller than CUDA's own share: nothing about the model's layout helps.
  const tiny = (largest: number) =>
    largest <= GPU_MEMORY_OVERHEAD
      ? `a GPU of ${formatBytes(largest)} holds little beside CUDA's own ~${formatBytes(GPU_MEMORY_OVERHEAD)}`
      : null;
  const { experts, gateway } = model.spec;
  const shardBytes = experts.gpusPerShard > 0 ? everyShardExpertBytes(model, plan) : null;
  if (shardBytes && shardBytes.length > 0) {
    const worst = Math.max(...shardBytes);
    const k = shardBytes.indexOf(worst);
    const resource = experts.gpuResource ?? DEFAULT_GPU_RESOURCE;
    const found = where(resource, worst + GPU_MEMORY_OVERHEAD, "experts");
    if (found) {
      // Shards of about the same bytes each: enough of them that the largest device holds one.
      const room = found.largest - GPU_MEMORY_OVERHEAD;
      const total = shardBytes.reduce((a, b) => a + b, 0);
      const enough = room > 0 ? Math.ceil(total / room) : null;
      const instead = tiny(found.largest)
        ? [tiny(found.largest)]
        : [
            enough !== null && enough > plan.numShards
              ? `about ${enough} shards (spec.experts.shards, now ${plan.numShards}) would fit them`
              : null,
            found.fitsSomewhere
              ? "or keep the shards on the nodes with larger GPUs (spec.scheduling.nodeSelector or affinity)"
              : null,
            dtype === "bf16" || dtype === "fp16" ? "fp8 (spec.model.dtype) halves them" : null,
          ].filter((s) => s !== null);
      out.push(
        `shard ${k} keeps ${formatBytes(worst)} of experts (${dtype}) on its GPU, plus ~${formatBytes(GPU_MEMORY_OVERHEAD)} for CUDA: ${found.text}; the experts that do not fit are copied to the GPU for every batch, at PCIe's speed${instead.length ? `: ${instead.join("; ")}` : ""}`,
      );
    }
  }
  if (gateway.gpus > 0) {
    const weights = gatewayWeightBytes(model);
    const kv = gateway.kvCache.bytes;
    const resource = gateway.gpuResource ?? DEFAULT_GPU_RESOURCE;
    const found = where(resource, (weights ?? 0) + kv + GPU_MEMORY_OVERHEAD, "gateway");
    if (found) {
      const held =
        weights === null
          ? `its KV cache's device copy (${formatBytes(kv)}, spec.gateway.kvCache.bytes)`
          : `${formatBytes(weights)} of weights and its KV cache's device copy (${formatBytes(kv)}, spec.gateway.kvCache.bytes)`;
      const room = found.largest - (weights ?? 0) - GPU_MEMORY_OVERHEAD;
      const instead = tiny(found.largest)
        ? [tiny(found.largest)]
        : [
            room > 0
              ? `a KV cache of ${formatBytes(room)} or less fits beside ${weights === null ? "CUDA's share" : "the weights"}`
              : `the weights alone do not fit${dtype === "bf16" || dtype === "fp16" ? ": fp8 (spec.model.dtype) halves them" : ""}`,
            found.fitsSomewhere ? "or keep the gateways on the nodes with larger GPUs" : null,
          ].filter((s) => s !== null);
      out.push(
        `a gateway keeps ${held} on its GPU, plus ~${formatBytes(GPU_MEMORY_OVERHEAD)} for CUDA: ${found.text}; what does not fit stays in host memory and crosses PCIe every step: ${instead.join("; ")}`,
      );
    }
  }
  return out;
}
