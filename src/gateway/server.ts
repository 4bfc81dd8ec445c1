// Putting a gateway together: the engine over loaded weights (routed experts in process,
// or on shards over NATS), the readiness probe of the shards, and the HTTP app.
import type { NatsConnection } from "@nats-io/transport-node";
import type { Backend } from "../engine/backend.ts";
import { BatchForward } from "../engine/batch.ts";
import type { ExpertRunner } from "../engine/experts.ts";
import { BlockKvCache, bytesPerBlock } from "../engine/kv-blocks.ts";
import { DiskPrefixStore } from "../engine/kv-disk.ts";
import type { KvDtype } from "../engine/kv-format.ts";
import type { RemotePrefixStore } from "../engine/kv-remote.ts";
import type { ModelWeights } from "../engine/loader.ts";
import type { SchedulingPolicy } from "../engine/scheduler.ts";
import { scratchTrimAfterMs, scratchTrimmerFor } from "../engine/scratch-trim.ts";
import { checkMtpTokens, ngramSpeculation, type SpeculativeConfig } from "../engine/speculative.ts";
import type { ModelConfig } from "../model/config.ts";
import type { SamplingDefaults } from "../model/generation-config.ts";
import type { Tokenizer } from "../model/tokenizer.ts";
import type { PlacementPlan } from "../moe/placement.ts";
import { type ModelRef, subjects } from "../moe/subjects.ts";
import { decodeFrame, encodeDispatch } from "../moe/wire.ts";
import { ExpertMeshError } from "../util/errors.ts";
import { type PrefillOffload, ServingEngine } from "./engine.ts";
import type { ServeContext } from "./jobs.ts";
import { GatewayMetrics } from "./metrics.ts";
import { prepareVocabulary } from "./output-grammar.ts";
import { PromptEncoder } from "./prompt-encoder.ts";
import type { ReasoningParserName } from "./reasoning.ts";
import type { ToolCallFormat } from "./tool-calls.ts";
import type { Tracing } from "./tracing.ts";

export interface GatewayConfig {
  readonly servedModelName: string;
  /** Other names the model answers to (--served-model-alias). */
  readonly modelAliases?: readonly string[];
  /** Context length served (default: the model's max_position_embeddings). */
  readonly maxModelLen?: number;
  /** Tokens per engine step (chunked prefill budget). */
  readonly maxBatchTokens: number;
  /** Sequences waiting for admission before 429. */
  readonly maxQueueDepth: number;
  /** Sequences running at once (default 256). */
  readonly maxRunning?: number;
  /**
   * Quiet time (ms) after which the backend's scratch caches are freed (scratch-trim.ts;
   * default $EM_SCRATCH_TRIM_MS or 30 s; 0: never).
   */
  readonly scratchTrimMs?: number;
  /** KV cache budget (bytes) and block size (tokens). */
  readonly kvCacheBytes: number;
  readonly blockSize?: number;
  /** How KV cache rows are stored (kv-format.ts; default f32). */
  readonly kvCacheDtype?: KvDtype;
  /** Micro-batches in flight per step, 1 or 2 (default 1; see ServingEngine). */
  readonly microBatches?: number;
  /**
   * Prompt tokens whose logits one step may hold for prompt logprobs (default: 256 MiB of
   * logits and their copy, 259 rows at DeepSeek's vocab); longer prompts take more steps.
   */
  readonly maxLogitRows?: number;
  /**
   * Speculative decoding by prompt lookup or by the model's MTP layer (the weights loaded
   * with it; default off; see ServingEngine).
   */
  readonly speculative?: SpeculativeConfig;
  /** Reuse the KV blocks of prompt prefixes seen before (default true). */
  readonly prefixCaching?: boolean;
  /**
   * The prefix cache's disk tier (ADR 0019): the folder, its byte budget, and what the rows
   * depend on besides the KV layout (the weights and how they are served; prefixCacheIdentity).
   */
  readonly prefixCacheDisk?: {
    readonly dir: string;
    readonly bytes: number;
    readonly identity: Record<string, unknown>;
    /** Read files ahead of their use, off the step (default true). */
    readonly readAhead?: boolean;
    /** Other gateways use the folder too: write-through, and their files found (kv-disk.ts). */
    readonly shared?: boolean;
  };
  /**
   * The prefix cache's NATS tier (ADR 0028), opened by the caller for this gateway's
   * prefixTierLayout; closed with the engine. Under prefixCacheDisk when both are given
   * (not a shared one).
   */
  readonly prefixCacheRemote?: RemotePrefixStore;
  /**
   * Disaggregated prefill, decode side (ADR 0029; prefill.ts's PrefillClient): long prompts
   * are computed by prefill gateways, their blocks read from prefixCacheRemote.
   */
  readonly prefillOffload?: PrefillOffload;
  /** Admission and preemption order (default fcfs; priority: by requests' `priority`). */
  readonly schedulingPolicy?: SchedulingPolicy;
  /** With the priority policy: ms of waiting per priority level gained (default 0: none). */
  readonly priorityAgingMs?: number;
  /** Threads that encode long prompts off the event loop (default 1; 0: none). */
  readonly tokenizerWorkers?: number;
  /** Prompts of more UTF-8 bytes than this go to those threads (default 4096). */
  readonly tokenizerInlineBytes?: number;
  /** Chat prompts' pieces kept encoded, in bytes (default 64 MiB; 0: none; prompt-encoder.ts). */
  readonly tokenizerCacheBytes?: number;
  /** How chat answers' thinking is told from their content (reasoning.ts; default none). */
  readonly reasoningParser?: ReasoningParserName;
  /** A thought's most tokens when a request sets no budget (default: none). */
  readonly thinkingTokenBudget?: number;
  /** The model's tool-call format (default deepseek-v3; tool-calls.ts). */
  readonly toolCallParser?: ToolCallFormat;
  /** Defaults of the sampling fields requests leave out (default: none; generation-config.ts). */
  readonly samplingDefaults?: SamplingDefaults;
  /** A stream silent this long gets a keepalive (default 15 s; 0: none; openai.ts eventStream). */
  readonly streamKeepaliveMs?: number;
  /** OpenTelemetry traces of the requests (tracing.ts), when on. */
  readonly tracing?: Tracing;
  /** Where requests that fail on the server's side (5xx) are logged. */
  readonly log?: (message: string) => void;
}

/**
 * One block of the prefix cache's second tier: its bytes, and what its rows depend on
 * (`identity`: the weights and how they are served; the KV layout is added here).
 */
export function prefixTierLayout(
  c: ModelConfig,
  cfg: Pick<GatewayConfig, "blockSize" | "kvCacheDtype" | "speculative">,
  identity: Record<string, unknown>,
): { blockBytes: number; identity: Record<string, unknown> } {
  const blockSize = cfg.blockSize ?? 16;
  const dtype = cfg.kvCacheDtype ?? "f32";
  // MTP drafts keep the MTP layer's rows in the same blocks (one layer more per token).
  const extraLayers = cfg.speculative?.method === "mtp" ? 1 : 0;
  return {
    blockBytes: bytesPerBlock(c, blockSize, dtype, extraLayers),
    identity: {
      format: 1,
      ...identity,
      kvCacheDtype: dtype,
      blockSize,
      layers: c.numHiddenLayers + extraLayers,
      kvLoraRank: c.kvLoraRank,
      qkRopeHeadDim: c.qkRopeHeadDim,
    },
  };
}

/**
 * Refuses prefix cache tiers that do not go together (EM_CLI_USAGE): a tier without prefix
 * caching, and a shared disk tier beside the NATS tier (the gateways share through the
 * bucket). The gateway command checks before it opens any.
 */
export function checkPrefixTiers(t: {
  disk: boolean;
  diskShared: boolean;
  remote: boolean;
  prefixCaching: boolean;
}): void {
  const refuse = (why: string): never => {
    throw new ExpertMeshError("EM_CLI_USAGE", why);
  };
  if ((t.disk || t.remote) && !t.prefixCaching)
    refuse(
      `${t.disk ? "--prefix-cache-disk" : "--prefix-cache-remote"} needs prefix caching (drop --no-prefix-caching)`,
    );
  if (t.diskShared && t.remote)
    refuse(
      "--prefix-cache-disk-shared and --prefix-cache-remote: the gateways share blocks through the bucket, and the disk tier under it is each gateway's own (drop --prefix-cache-disk-shared)",
    );
}

/** Bytes of prompt logits (float32, held twice: the LM head's output and its split) a step may hold. */
const PROMPT_LOGITS_BYTES = 256 * 2 ** 20;

/**
 * The engine and the context the routes need; checks the KV budget against the context.
 * Close `encoder` when done (its worker threads never keep the process alive, though).
 */
export function createServeContext(
  weights: ModelWeights,
  backend: Backend,
  experts: ExpertRunner,
  tokenizer: Tokenizer,
  cfg: GatewayConfig,
): ServeContext {
  const c = weights.config;
  const maxModelLen = cfg.maxModelLen ?? c.maxPositionEmbeddings;
  if (maxModelLen > c.maxPositionEmbeddings)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--max-model-len ${maxModelLen} is past the model's max_position_embeddings ${c.maxPositionEmbeddings}`,
    );
  const blockSize = cfg.blockSize ?? 16;
  const dtype = cfg.kvCacheDtype ?? "f32";
  const spec = cfg.speculative;
  // MTP drafts keep the MTP layer's rows in the same blocks (one layer more per token).
  const extraLayers = spec?.method === "mtp" ? 1 : 0;
  const diskCfg = cfg.prefixCacheDisk;
  const remote = cfg.prefixCacheRemote;
  checkPrefixTiers({
    disk: diskCfg !== undefined,
    diskShared: diskCfg?.shared === true,
    remote: remote !== undefined,
    prefixCaching: cfg.prefixCaching !== false,
  });
  const disk =
    diskCfg &&
    DiskPrefixStore.open({
      dir: diskCfg.dir,
      maxBytes: diskCfg.bytes,
      ...prefixTierLayout(c, cfg, diskCfg.identity),
      ...(diskCfg.readAhead === false ? { readAhead: false } : {}),
      ...(diskCfg.shared ? { shared: true } : {}),
      ...(cfg.log ? { log: cfg.log } : {}),
    });
  disk?.startReader();
  if (disk)
    cfg.log?.(
      `prefix cache disk tier in ${disk.dir}: ${disk.shared ? "shared with other gateways (scanned in the background), " : ""}${disk.stats.files} blocks kept from before, ` +
        `${(disk.stats.bytes / 2 ** 20).toFixed(1)} of ${(disk.maxBytes / 2 ** 20).toFixed(1)} MiB`,
    );
  const kv = new BlockKvCache(c, {
    blockSize,
    memoryBytes: cfg.kvCacheBytes,
    dtype,
    extraLayers,
    // The local disk first (nearest), then the bucket.
    stores: [disk, remote].filter((t) => !!t),
  });
  if (kv.capacityTokens < maxModelLen)
    throw new ExpertMeshError(
      "EM_KV_BUDGET",
      `the KV cache holds ${kv.capacityTokens} tokens, less than one sequence of ${maxModelLen}: ` +
        `give --kv-cache-bytes at least ${Math.ceil(maxModelLen / blockSize) * bytesPerBlock(c, blockSize, dtype, extraLayers)} or lower --max-model-len` +
        (dtype === "f32" ? " (or store rows smaller: --kv-cache-dtype bfloat16 or fp8)" : ""),
    );
  // The native engine's scratch caches, given back after a quiet time.
  const trimmer = scratchTrimmerFor(backend, cfg.log, cfg.scratchTrimMs ?? scratchTrimAfterMs());
  const engine = new ServingEngine(
    new BatchForward(weights, backend, experts),
    kv,
    {
      maxBatchTokens: cfg.maxBatchTokens,
      maxRunning: cfg.maxRunning ?? 256,
      maxQueueDepth: cfg.maxQueueDepth,
      maxLogitRows:
        cfg.maxLogitRows ?? Math.max(16, Math.floor(PROMPT_LOGITS_BYTES / (8 * c.vocabSize))),
      prefixCaching: cfg.prefixCaching ?? true,
      policy: cfg.schedulingPolicy ?? "fcfs",
      ...(cfg.priorityAgingMs ? { priorityAgingMs: cfg.priorityAgingMs } : {}),
    },
    {
      microBatches: cfg.microBatches ?? 1,
      ...(trimmer ? { scratchTrimmer: trimmer } : {}),
      ...(cfg.prefillOffload ? { prefillOffload: cfg.prefillOffload } : {}),
      ...(spec === undefined
        ? {}
        : {
            speculative:
              spec.method === "mtp"
                ? { method: "mtp" as const, numTokens: checkMtpTokens(spec.numTokens ?? 1) }
                : ngramSpeculation(spec),
          }),
    },
  );
  prepareVocabulary(tokenizer, c.vocabSize, {
    thinking: (cfg.reasoningParser ?? "none") !== "none",
  });
  const encoder = new PromptEncoder(tokenizer, {
    workers: cfg.tokenizerWorkers ?? 1,
    ...(cfg.tokenizerInlineBytes !== undefined ? { inlineBytes: cfg.tokenizerInlineBytes } : {}),
    ...(cfg.tokenizerCacheBytes !== undefined ? { pieceCacheBytes: cfg.tokenizerCacheBytes } : {}),
    ...(cfg.log ? { log: cfg.log } : {}),
  });
  return {
    engine,
    tokenizer,
    encoder,
    servedModelName: cfg.servedModelName,
    ...(cfg.modelAliases?.length ? { modelAliases: cfg.modelAliases } : {}),
    maxModelLen,
    vocabSize: c.vocabSize,
    reasoningParser: cfg.reasoningParser ?? "none",
    thinkingTokenBudget: cfg.thinkingTokenBudget ?? null,
    toolCallFormat: cfg.toolCallParser ?? "deepseek-v3",
    samplingDefaults: cfg.samplingDefaults ?? {},
    ...(cfg.streamKeepaliveMs !== undefined ? { streamKeepaliveMs: cfg.streamKeepaliveMs } : {}),
    metrics: new GatewayMetrics(
      () => engine.stats,
      () => ({ liveWorkers: encoder.liveWorkers, ...encoder.stats }),
      backend.scratchBytes ? () => backend.scratchBytes!() : undefined,
    ),
    ...(cfg.tracing ? { tracing: cfg.tracing } : {}),
    ...(cfg.log ? { log: cfg.log } : {}),
  };
}

/** The outcome of probeShards: ready, or why each shard that failed did. */
export interface ShardProbe {
  readonly ready: boolean;
  /** By shard index, for the shards that did not answer: what happened instead. */
  readonly failed: Readonly<Record<string, string>>;
}

/**
 * Readiness of distributed mode: every shard of the plan answers a one-token dispatch
 * (zero activations, weight 0, one of its own experts) within `timeoutMs`.
 */
export async function probeShards(
  nc: NatsConnection,
  model: ModelRef,
  plan: PlacementPlan,
  hidden: number,
  timeoutMs = 1000,
): Promise<ShardProbe> {
  const layer = plan.layers[0];
  if (!layer) return { ready: true, failed: {} };
  const answers = await Promise.all(
    Array.from({ length: plan.numShards }, async (_, k): Promise<string | null> => {
      const expert = layer.shardExperts[k]?.[0];
      if (expert === undefined) return null;
      const frame = encodeDispatch({
        dtype: "f32",
        planVersion: plan.version,
        layer: layer.layer,
        hidden,
        numTokens: 1,
        tokenOffset: 0,
        totalTokens: 1,
        activations: new Float32Array(hidden),
        token: Uint32Array.of(0),
        expert: Uint32Array.of(expert),
        weight: Float32Array.of(0),
      });
      const subject = subjects.shard(model, k);
      try {
        const msg = await nc.request(subject, frame, { timeout: timeoutMs });
        const f = decodeFrame(msg.data);
        if (f.kind === "combine") return null;
        if (f.kind !== "error") return `answered with a ${f.kind} frame`;
        return f.message.startsWith(`[${f.code}]`) ? f.message : `[${f.code}] ${f.message}`;
      } catch (e) {
        const text = e instanceof Error ? e.message : String(e);
        if (/no responders|503/i.test(text) || (e as { code?: unknown }).code === "503")
          return `no replica serves ${subject} (no responders)`;
        if (/timeout/i.test(text)) return `no answer on ${subject} within ${timeoutMs} ms`;
        return `${subject}: ${text}`;
      }
    }),
  );
  const failed: Record<string, string> = {};
  answers.forEach((why, k) => {
    if (why !== null) failed[String(k)] = why;
  });
  return { ready: Object.keys(failed).length === 0, failed };
}
