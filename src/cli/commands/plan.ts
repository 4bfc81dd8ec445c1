// `expertmesh plan`: prints the expert placement plan for a model and shard count, as a
// human-readable summary or (--json) the serialized plan that goes into the ConfigMap.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { architectureOf, readManifest, servedModelName } from "../../api/manifest.ts";
import {
  everyShardExpertBytes,
  GPU_MEMORY_OVERHEAD,
  gatewayWeightBytes,
  gpuMemoryShortfalls,
  servedLinearDtype,
} from "../../api/memory.ts";
import { type ExpertLayout, resolveArchitecture } from "../../api/presets.ts";
import { quantityValue } from "../../api/quantity.ts";
import type { DeepSeekModel } from "../../api/schema.ts";
import { formatBytes } from "../../local/progress.ts";
import { type ExpertLoad, type PlacementPlan, planPlacement } from "../../moe/placement.ts";
import { serializePlan } from "../../moe/plan-json.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import type { Command } from "../registry.ts";

const USAGE =
  "expertmesh plan (-f MANIFEST.yaml | --preset NAME | --experts N --layers L --dense-layers D --top-k K)\n" +
  "                [--shards K] [--redundant R] [--load FILE.json] [--plan-version V] [--mtp] [--json]\n" +
  "                [--gpu-memory QUANTITY]\n\n" +
  "  -f MANIFEST.yaml   DeepSeekModel manifest; --shards/--redundant override its spec.experts\n" +
  "  --preset NAME      deepseek-v2-lite, deepseek-v2, deepseek-v3, deepseek-v3.1, deepseek-r1, tiny-v2, tiny-v3\n" +
  "  --shards K         expert shards (required without -f)\n" +
  "  --redundant R      extra expert slots in total per layer (EPLB replication), default 0\n" +
  "  --load FILE.json   per-expert token counts: [n0, n1, ...] or one such array per MoE layer\n" +
  "  --plan-version V   plan version, default 1\n" +
  "  --mtp              also place the experts of the MTP layer after the last block (DeepSeek-V3/R1's\n" +
  "                     layer 61), for gateway --speculative-method mtp; a manifest asking for MTP\n" +
  "                     drafts (spec.gateway.speculative.method: mtp) implies it\n" +
  "  --json             print the serialized plan instead of a summary\n" +
  "  --gpu-memory Q     with -f: one GPU's memory (80Gi, 141Gi, 9856Mi), checked against what each\n" +
  "                     process of a role with GPUs keeps on its GPU (the operator checks the nodes'\n" +
  "                     labels: Event GPUMemoryShort)";

export const planCommand: Command = {
  name: "plan",
  summary: "print the expert placement plan for a model and a number of shards",
  usage: USAGE,
  async run(argv) {
    process.stdout.write(planOutput(argv));
    return 0;
  },
};

/** What `expertmesh plan ARGV` prints. Throws ExpertMeshError (EM_CLI_USAGE, EM_PLAN_*, ...). */
export function planOutput(argv: string[]): string {
  const opts = parseOptions(argv);
  const model = modelFromOptions(opts);
  const shards = intOption(opts, "shards") ?? model.shards;
  if (shards === undefined) usage("--shards is required without -f");
  const loadFile = opts["load"] as string | undefined;
  const plan = planPlacement({
    architecture: model.layout,
    numShards: shards,
    redundantExperts: intOption(opts, "redundant") ?? model.redundantExperts ?? 0,
    expertLoad: loadFile === undefined ? undefined : readLoad(loadFile),
    version: intOption(opts, "plan-version") ?? 1,
    mtpLayers: opts["mtp"] || model.mtp ? 1 : 0,
  });
  if (opts["json"]) return serializePlan(plan);
  const loadNote = loadFile === undefined ? "uniform load" : `load from ${loadFile}`;
  const gpu = opts["gpu-memory"] as string | undefined;
  if (gpu !== undefined && !model.manifest) usage("--gpu-memory needs -f MANIFEST.yaml");
  const memory = model.manifest
    ? [...memoryLines(model.manifest, plan), ...gpuLines(model.manifest, plan, gpu)]
    : [];
  return summary(model.label, model.layout, plan, loadNote) + memory.map((l) => `${l}\n`).join("");
}

/** What each pod will hold in host memory, as the operator requests it (src/api/memory.ts). */
function memoryLines(m: DeepSeekModel, plan: PlacementPlan): string[] {
  const dtype = servedLinearDtype(m);
  const shards = everyShardExpertBytes(m, plan) ?? [0];
  const weights = gatewayWeightBytes(m);
  const kv = m.spec.gateway.kvCache.bytes;
  const lo = Math.min(...shards);
  const hi = Math.max(...shards);
  const own = (r: { requests?: Record<string, unknown> } | undefined) =>
    r?.requests?.["memory"] !== undefined ? ` (the manifest requests ${r.requests["memory"]})` : "";
  return [
    `memory per pod (linear layers in ${dtype ?? "the checkpoint's dtype, not known before it is read"}):`,
    `  shard:   ${dtype === null ? "not known (explicit architecture, dtype auto)" : `${lo === hi ? formatBytes(lo) : `${formatBytes(lo)}-${formatBytes(hi)}`} of experts`}${own(m.spec.experts.resources)}`,
    `  gateway: ${weights === null ? "weights not known (no preset)" : `${formatBytes(weights)} of weights`} + ${formatBytes(kv)} of KV cache${own(m.spec.gateway.resources)}`,
  ];
}

/**
 * What each process of a role with GPUs keeps on its GPU (resident weights, a gateway's KV
 * cache mirror, CUDA's share), and with --gpu-memory whether one GPU of that size holds it.
 */
function gpuLines(m: DeepSeekModel, plan: PlacementPlan, gpuMemory: string | undefined): string[] {
  const { gateway, experts } = m.spec;
  const shards = experts.gpusPerShard > 0 ? everyShardExpertBytes(m, plan) : null;
  const weights = gatewayWeightBytes(m);
  const lines = [
    ...(shards ? [`  shard:   ${formatBytes(Math.max(...shards) + GPU_MEMORY_OVERHEAD)}`] : []),
    ...(gateway.gpus > 0
      ? [
          `  gateway: ${formatBytes((weights ?? 0) + gateway.kvCache.bytes + GPU_MEMORY_OVERHEAD)} (${weights === null ? "weights not known, " : "weights, "}the KV cache's device copy)`,
        ]
      : []),
  ];
  if (gpuMemory === undefined) {
    return lines.length
      ? [
          `on its GPU (with ~${formatBytes(GPU_MEMORY_OVERHEAD)} for CUDA; --gpu-memory checks a size):`,
          ...lines,
        ]
      : [];
  }
  const bytes = quantityValue(gpuMemory);
  if (bytes === null || bytes <= 0)
    usage(`--gpu-memory must be a quantity of bytes (80Gi, 9856Mi), got '${gpuMemory}'`);
  if (lines.length === 0)
    return ["no role of this manifest runs on a GPU: --gpu-memory checks nothing"];
  const flag = `--gpu-memory ${gpuMemory}`;
  const short = gpuMemoryShortfalls(m, plan, { bytes, flag });
  return [
    `on its GPU (with ~${formatBytes(GPU_MEMORY_OVERHEAD)} for CUDA), against one GPU of ${formatBytes(bytes)} (${flag}):`,
    ...lines,
    ...(short.length ? short.map((l) => `  too much: ${l}`) : ["  every process fits"]),
  ];
}

type Options = Record<string, string | boolean | undefined>;

function parseOptions(argv: string[]): Options {
  const str = { type: "string" } as const;
  try {
    return parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        file: { type: "string", short: "f" },
        preset: str,
        experts: str,
        layers: str,
        "dense-layers": str,
        "top-k": str,
        shards: str,
        redundant: str,
        load: str,
        "plan-version": str,
        mtp: { type: "boolean" },
        json: { type: "boolean" },
        "gpu-memory": str,
      },
    }).values;
  } catch (err) {
    return usage(err instanceof Error ? err.message : String(err));
  }
}

interface ModelChoice {
  label: string;
  layout: ExpertLayout;
  shards?: number;
  redundantExperts?: number;
  /** The manifest asks for MTP drafts: its plan places the MTP layer. */
  mtp?: boolean;
  /** The manifest: what each pod will hold in memory (src/api/memory.ts). */
  manifest?: DeepSeekModel;
}

const EXPLICIT = ["experts", "layers", "dense-layers", "top-k"] as const;

function modelFromOptions(opts: Options): ModelChoice {
  const file = opts["file"];
  const preset = opts["preset"];
  const explicit = EXPLICIT.filter((k) => opts[k] !== undefined);
  const sources = [file, preset, explicit.length > 0 ? "x" : undefined].filter(Boolean);
  if (sources.length !== 1) {
    usage(
      "give exactly one of -f MANIFEST, --preset NAME, or --experts/--layers/--dense-layers/--top-k",
    );
  }
  if (typeof file === "string") {
    const m = readManifest(file);
    const from = m.spec.model.preset ? `preset ${m.spec.model.preset}` : "explicit architecture";
    return {
      label: `${servedModelName(m)} (${m.metadata.namespace}/${m.metadata.name}, ${from})`,
      layout: architectureOf(m),
      shards: m.spec.experts.shards,
      redundantExperts: m.spec.experts.redundantExperts,
      mtp: m.spec.gateway.speculative?.method === "mtp",
      manifest: m,
    };
  }
  if (typeof preset === "string") {
    return { label: `preset ${preset}`, layout: resolveArchitecture(preset) };
  }
  const missing = EXPLICIT.filter((k) => opts[k] === undefined);
  if (missing.length > 0) usage(`missing ${missing.map((k) => `--${k}`).join(", ")}`);
  return {
    label: "explicit architecture",
    layout: {
      routedExperts: intOption(opts, "experts")!,
      numLayers: intOption(opts, "layers")!,
      firstDenseLayers: intOption(opts, "dense-layers")!,
      expertsPerToken: intOption(opts, "top-k")!,
    },
  };
}

function intOption(opts: Options, name: string): number | undefined {
  const v = opts[name];
  if (v === undefined) return undefined;
  if (typeof v !== "string" || !/^-?\d+$/.test(v))
    usage(`--${name} must be an integer, got '${v}'`);
  return Number(v);
}

function readLoad(path: string): ExpertLoad {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw new ExpertMeshError("EM_PLAN_LOAD_INVALID", `cannot read load file ${path}: ${err}`, {
      cause: err,
    });
  }
  if (!Array.isArray(value)) {
    throw new ExpertMeshError("EM_PLAN_LOAD_INVALID", `${path} must hold a JSON array`);
  }
  return value;
}

function usage(msg: string): never {
  throw new ExpertMeshError("EM_CLI_USAGE", `${msg}\nusage: ${USAGE.split("\n\n")[0]}`);
}

function summary(label: string, layout: ExpertLayout, plan: PlacementPlan, loadNote: string) {
  const first = plan.layers[0]!;
  const sameLayers = plan.layers.every(
    (l) => JSON.stringify(l.replicas) === JSON.stringify(first.replicas),
  );
  const worst = plan.layers.reduce((a, l) =>
    l.balance.maxOverMean > a.balance.maxOverMean ? l : a,
  );
  const replicated = first.replicas.flatMap((shards, e) =>
    shards.length > 1 ? [`${e} x${shards.length} (shards ${shards.join(", ")})`] : [],
  );
  // Layers past the blocks are MTP layers (plan --mtp).
  const blocks = plan.moeLayers.filter((l) => l < layout.numLayers);
  const mtp = plan.moeLayers.filter((l) => l >= layout.numLayers);
  const MAX_LISTED = 16;
  if (replicated.length > MAX_LISTED) {
    replicated.splice(MAX_LISTED, Infinity, `... ${replicated.length - MAX_LISTED} more (--json)`);
  }
  const lines = [
    `model:            ${label}`,
    `MoE layers:       ${formatRanges(plan.moeLayers)} (${blocks.length} of ${layout.numLayers} layers${mtp.length > 0 ? `, and MTP layer ${formatRanges(mtp)}` : ""}; ${plan.routedExperts} routed experts, top-${layout.expertsPerToken})`,
    `shards:           ${plan.numShards}`,
    `slots per shard:  ${plan.slotsPerShard} (${plan.routedExperts} routed + ${plan.redundantExperts} redundant experts)`,
    `plan version:     ${plan.version}`,
    `experts by shard in layer ${first.layer}${sameLayers ? " (same in every MoE layer)" : " (layers differ; --json shows all)"}:`,
    ...first.shardExperts.map((experts, s) => `  shard ${s}: ${formatRanges(experts)}`),
    `replicated experts in layer ${first.layer}: ${replicated.length > 0 ? replicated.join("; ") : "none"}`,
    `expected load balance (max/mean shard load, ${loadNote}): ${first.balance.maxOverMean.toFixed(3)} in layer ${first.layer}, worst ${worst.balance.maxOverMean.toFixed(3)} in layer ${worst.layer}`,
  ];
  return `${lines.join("\n")}\n`;
}

/** Ascending ids as ranges: [0,1,2,3,7,9,10] -> "0-3, 7, 9-10". */
export function formatRanges(ids: readonly number[]): string {
  const parts: string[] = [];
  for (let i = 0; i < ids.length; ) {
    let j = i;
    while (j + 1 < ids.length && ids[j + 1] === ids[j]! + 1) j++;
    parts.push(i === j ? `${ids[i]}` : `${ids[i]}-${ids[j]}`);
    i = j + 1;
  }
  return parts.join(", ");
}
