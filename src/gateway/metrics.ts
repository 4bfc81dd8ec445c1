// The gateway's Prometheus metrics, named after vLLM's where one exists (vllm:X becomes
// expertmesh_gateway_X): queue depth, KV cache usage, latencies, token counts, and the
// round trip of each expert shard. One registry per gateway (tests run several).
import { Counter, Gauge, Histogram, Registry, type RegistryContentType } from "prom-client";
import { registerScratchGauge } from "../engine/scratch-trim.ts";
import type { EngineStats, PrefixTierStats } from "./engine.ts";
import type { PrefillClientStats, PrefillWorkerStats } from "./prefill.ts";

const LATENCY_BUCKETS = [
  0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20,
  40, 80,
];

/**
 * A registry's exposition for a scrape: OpenMetrics (with the latency histograms' exemplars:
 * the trace id of a traced request, ADR 0030) when `accept` asks for it, as Prometheus does
 * by default, else Prometheus's text format. The registry's content type is switched for
 * the call, so scrapes of one registry run one at a time.
 */
export async function exposition(
  registry: Registry,
  accept: string | undefined,
): Promise<{ contentType: string; body: string }> {
  const type = accept?.includes("application/openmetrics-text")
    ? Registry.OPENMETRICS_CONTENT_TYPE
    : Registry.PROMETHEUS_CONTENT_TYPE;
  const before = scrapes.get(registry) ?? Promise.resolve();
  const run = before.then(async () => {
    (registry as unknown as Registry<RegistryContentType>).setContentType(type);
    return { contentType: type as string, body: await registry.metrics() };
  });
  scrapes.set(
    registry,
    run.then(
      () => {},
      () => {},
    ),
  );
  return run;
}

/** A registry of OpenMetrics type (typed as the default one, which every caller takes). */
function openMetricsRegistry(): Registry {
  const r = new Registry<RegistryContentType>();
  r.setContentType(Registry.OPENMETRICS_CONTENT_TYPE);
  return r as unknown as Registry;
}

/** Each registry's last scrape (exposition runs them in turn). */
const scrapes = new WeakMap<Registry, Promise<void>>();

export class GatewayMetrics {
  /**
   * OpenMetrics at first: prom-client allows exemplars only on metrics made on such a
   * registry. Scrapes choose their format (exposition).
   */
  readonly registry: Registry = openMetricsRegistry();
  readonly timeToFirstToken: Histogram;
  readonly interTokenLatency: Histogram;
  readonly e2eLatency: Histogram;
  readonly promptTokens: Counter;
  readonly generationTokens: Counter;
  readonly requests: Counter<"finished_reason">;
  readonly rejected: Counter<"reason">;
  readonly dispatchLatency: Histogram<"shard" | "ok">;

  /** `encoder`: the prompt encoder's figures (its workers alive, prompts encoded where). */
  constructor(
    stats: () => EngineStats,
    encoder?: () => {
      liveWorkers: number;
      offloaded: number;
      inline: number;
      pieceTokensCached: number;
      pieceTokensEncoded: number;
    },
    scratchBytes?: () => number,
  ) {
    const registers = [this.registry];
    if (scratchBytes) registerScratchGauge(this.registry, scratchBytes);
    if (encoder) {
      new Gauge({
        name: "expertmesh_gateway_tokenizer_workers",
        help: "Tokenizer worker threads alive (a failed one leaves its prompts to the event loop).",
        registers,
        collect() {
          this.set(encoder().liveWorkers);
        },
      });
      new Gauge({
        name: "expertmesh_gateway_prompts_encoded",
        help: "Prompts encoded since start, on a tokenizer worker or on the event loop.",
        labelNames: ["where"],
        registers,
        collect() {
          const e = encoder();
          this.set({ where: "worker" }, e.offloaded);
          this.set({ where: "event_loop" }, e.inline);
        },
      });
      new Gauge({
        name: "expertmesh_gateway_prompt_piece_tokens",
        help: "Tokens of long chat prompts since start: from pieces kept encoded (cached: a conversation's earlier turns sent again), or encoded.",
        labelNames: ["result"],
        registers,
        collect() {
          const e = encoder();
          this.set({ result: "cached" }, e.pieceTokensCached);
          this.set({ result: "encoded" }, e.pieceTokensEncoded);
        },
      });
    }
    new Gauge({
      name: "expertmesh_gateway_num_requests_waiting",
      help: "Sequences waiting for admission (the queue depth the autoscaler reads).",
      registers,
      collect() {
        this.set(stats().numWaiting);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_num_requests_running",
      help: "Sequences in the running batch.",
      registers,
      collect() {
        this.set(stats().numRunning);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_kv_cache_usage_perc",
      help: "Fraction of KV cache blocks in use (0..1).",
      registers,
      collect() {
        this.set(stats().kvUsage);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_kv_cache_capacity_tokens",
      help: "Token positions the KV cache holds (all blocks), by how it stores rows (f32, bf16, fp8).",
      labelNames: ["dtype"],
      registers,
      collect() {
        const s = stats();
        this.set({ dtype: s.kvCacheDtype }, s.kvCapacityTokens);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_num_preemptions",
      help: "Sequences preempted (freed and recomputed later) since start.",
      registers,
      collect() {
        this.set(stats().numPreemptions);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_prefix_cache_queries",
      help: "Tokens of admitted requests looked up in the prefix cache since start (--prefix-caching).",
      registers,
      collect() {
        this.set(stats().prefixQueryTokens);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_prefix_cache_hits",
      help: "Of those, tokens found in the prefix cache (their KV rows reused, not computed).",
      registers,
      collect() {
        this.set(stats().prefixHitTokens);
      },
    });
    /** A gauge of a tier's counts: expertmesh_gateway_prefix_cache_<tier>_<name>. */
    const tierGauge =
      (tier: "disk" | "remote") =>
      (name: string, help: string, of: (d: PrefixTierStats) => number) =>
        new Gauge({
          name: `expertmesh_gateway_prefix_cache_${tier}_${name}`,
          help,
          registers,
          collect() {
            const d = tier === "disk" ? stats().prefixDisk : stats().prefixRemote;
            if (d) this.set(of(d));
          },
        });
    if (stats().prefixDisk) {
      const disk = tierGauge("disk");
      disk(
        "hits",
        "Of prefix_cache_hits, tokens read back from the disk tier since start (--prefix-cache-disk).",
        (d) => d.hitTokens,
      );
      disk(
        "read_ahead",
        "Blocks read back from the disk tier whose file was read in the background, ahead of their use, since start.",
        (d) => d.readAhead,
      );
      disk(
        "shared_hits",
        "Of the blocks read back, those from files this gateway found in a shared disk tier (--prefix-cache-disk-shared) rather than wrote: another gateway's, or an earlier run's, since start.",
        (d) => d.sharedHits,
      );
      disk("bytes", "Bytes of the disk tier's block files.", (d) => d.bytes);
      disk("files", "Block files in the disk tier.", (d) => d.files);
      disk("written", "Blocks written to the disk tier since start.", (d) => d.written);
      disk(
        "dropped",
        "Blocks not written to the disk tier (64 MiB of writes already pending) since start.",
        (d) => d.dropped,
      );
      disk(
        "errors",
        "Disk tier reads and writes that failed, and damaged files removed, since start.",
        (d) => d.errors,
      );
    }
    if (stats().prefixRemote) {
      const remote = tierGauge("remote");
      remote(
        "hits",
        "Of prefix_cache_hits, tokens read back from the NATS tier since start (--prefix-cache-remote).",
        (d) => d.hitTokens,
      );
      remote(
        "shared_hits",
        "Of the blocks read back from the NATS tier, those this gateway did not write: another gateway's, or an earlier run's, since start.",
        (d) => d.sharedHits,
      );
      remote(
        "blocks",
        "Blocks of this gateway's model the NATS tier's bucket holds, as its watch says.",
        (d) => d.files,
      );
      remote("written", "Blocks written to the NATS tier since start.", (d) => d.written);
      remote(
        "dropped",
        "Blocks not written to the NATS tier (64 MiB of writes already pending) since start.",
        (d) => d.dropped,
      );
      remote(
        "errors",
        "NATS tier reads and writes that failed, and damaged values removed, since start.",
        (d) => d.errors,
      );
    }
    // Speculative decoding (vLLM's spec_decode counters): acceptance rate is
    // accepted / draft tokens; tokens per drafted step 1 + accepted / drafts.
    const specCounter = (name: string, help: string, of: (s: EngineStats) => number) => {
      let seen = 0;
      new Counter({
        name: `expertmesh_gateway_spec_decode_${name}_total`,
        help,
        registers,
        collect() {
          const v = of(stats());
          this.inc(v - seen);
          seen = v;
        },
      });
    };
    specCounter(
      "num_drafts",
      "Drafts run (a sequence's guessed tokens in one step).",
      (s) => s.specDrafts,
    );
    specCounter("num_draft_tokens", "Draft tokens run.", (s) => s.specDraftTokens);
    specCounter(
      "num_accepted_tokens",
      "Draft tokens accepted (the tokens the model itself produced).",
      (s) => s.specAcceptedTokens,
    );
    specCounter(
      "mtp_failures",
      "MTP passes that failed (their sequences went on without a draft; MTP drafts only).",
      (s) => s.specMtpFailures,
    );
    this.timeToFirstToken = new Histogram({
      name: "expertmesh_gateway_time_to_first_token_seconds",
      help: "From request arrival to its first generated token.",
      buckets: LATENCY_BUCKETS,
      registers,
      // A traced request's trace id on its bucket (OpenMetrics scrapes): from a slow bucket
      // in a dashboard to one of its traces.
      enableExemplars: true,
    });
    this.interTokenLatency = new Histogram({
      name: "expertmesh_gateway_inter_token_latency_seconds",
      help: "Between consecutive tokens of one sequence.",
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.e2eLatency = new Histogram({
      name: "expertmesh_gateway_e2e_request_latency_seconds",
      help: "From request arrival to its last token.",
      buckets: LATENCY_BUCKETS,
      registers,
      enableExemplars: true,
    });
    this.promptTokens = new Counter({
      name: "expertmesh_gateway_prompt_tokens_total",
      help: "Prompt tokens of admitted requests.",
      registers,
    });
    this.generationTokens = new Counter({
      name: "expertmesh_gateway_generation_tokens_total",
      help: "Tokens generated.",
      registers,
    });
    this.requests = new Counter({
      name: "expertmesh_gateway_request_success_total",
      help: "Requests finished, by reason (stop, length, abort, error).",
      labelNames: ["finished_reason"],
      registers,
    });
    this.rejected = new Counter({
      name: "expertmesh_gateway_requests_rejected_total",
      help: "Requests refused before admission (queue_full, too_large).",
      labelNames: ["reason"],
      registers,
    });
    this.dispatchLatency = new Histogram({
      name: "expertmesh_gateway_dispatch_latency_seconds",
      help: "Round trip of one layer's dispatch to one expert shard.",
      labelNames: ["shard", "ok"],
      buckets: LATENCY_BUCKETS,
      registers,
    });
  }

  /**
   * Disaggregated prefill (ADR 0029): a decode gateway's jobs by outcome, and a prefill
   * gateway's jobs. Counters that follow the given counts (collected at each scrape).
   */
  addPrefill(of: { client?: () => PrefillClientStats; worker?: () => PrefillWorkerStats }): void {
    const registers = [this.registry];
    /** A counter by outcome following `counts` (each outcome's count since start). */
    const byOutcome = (name: string, help: string, counts: () => Record<string, number>) => {
      const seen = new Map<string, number>();
      new Counter({
        name,
        help,
        labelNames: ["outcome"],
        registers,
        collect() {
          for (const [outcome, v] of Object.entries(counts())) {
            this.inc({ outcome }, v - (seen.get(outcome) ?? 0));
            seen.set(outcome, v);
          }
        },
      });
    };
    const gauge = (name: string, help: string, value: () => number) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.set(value());
        },
      });
    const { client, worker } = of;
    if (client) {
      byOutcome(
        "expertmesh_gateway_prefill_remote_total",
        "Prompts handed to prefill gateways (--disaggregation-mode decode), by outcome: done (their blocks read from the bucket), no_workers, timeout, failed (refused there, or the blocks not seen), cancelled (no request waited any more); all but done and cancelled were computed here.",
        () => {
          const s = client();
          return {
            done: s.done,
            no_workers: s.noWorkers,
            timeout: s.timeout,
            failed: s.failed,
            cancelled: s.cancelled,
          };
        },
      );
      gauge(
        "expertmesh_gateway_prefill_workers",
        "Prefill gateways whose load this gateway knows (each job goes to the least loaded; with none, to any).",
        () => client().workers,
      );
      gauge(
        "expertmesh_gateway_prefill_remote_pending",
        "Prompts a prefill gateway computes for this gateway now.",
        () => client().pending,
      );
      gauge(
        "expertmesh_gateway_prefill_remote_shared_blocks",
        "Blocks prefill gateways wrote to the bucket for this gateway's prompts, since start.",
        () => client().sharedBlocks,
      );
    }
    if (worker) {
      byOutcome(
        "expertmesh_gateway_prefill_jobs_total",
        "Prefill jobs this gateway took (--disaggregation-mode prefill), by outcome: done, failed (refused or failed; answered with the error's code), cancelled (by their decode gateway, before done).",
        () => ({ done: worker().done, failed: worker().failed, cancelled: worker().cancelled }),
      );
      gauge(
        "expertmesh_gateway_prefill_jobs_running",
        "Prefill jobs this gateway computes now.",
        () => worker().running,
      );
      gauge(
        "expertmesh_gateway_prefill_job_tokens",
        "Prompt tokens of the prefill jobs done, since start.",
        () => worker().tokens,
      );
    }
  }

  /**
   * The Batch API (ADR 0049): lines running here, and lines answered by outcome (completed,
   * failed, retried: answered 429 or 503 and run again), collected at each scrape.
   */
  addBatches(
    stats: () => {
      running: number;
      parts: number;
      lines: Record<string, number>;
      /** The files folder's bytes and bound (null: no --files-max-total). */
      folderBytes: number | null;
      folderMaxBytes: number | null;
    },
  ): void {
    const registers = [this.registry];
    // The folder's gauges: set only with --files-max-total (no count without a bound).
    for (const [name, key, help] of [
      [
        "expertmesh_gateway_files_bytes",
        "folderBytes",
        "Bytes the files folder (--files-dir: uploads, batches, their answers) holds, counted with --files-max-total only.",
      ],
      [
        "expertmesh_gateway_files_max_bytes",
        "folderMaxBytes",
        "How much the files folder may hold (--files-max-total): past it uploads and new batches are refused (507) and batch lines wait.",
      ],
    ] as const)
      new Gauge({
        name,
        help,
        registers,
        collect() {
          const v = stats()[key];
          if (v !== null) this.set(v);
        },
      });
    new Gauge({
      name: "expertmesh_gateway_batch_lines_running",
      help: "Lines of batches this gateway runs now (at most --batch-concurrency).",
      registers,
      collect() {
        this.set(stats().running);
      },
    });
    new Gauge({
      name: "expertmesh_gateway_batch_parts_running",
      help: "Parts of batches this gateway runs the lines of now (with a folder shared by several gateways, how the batches spread over them).",
      registers,
      collect() {
        this.set(stats().parts);
      },
    });
    const seen = new Map<string, number>();
    new Counter({
      name: "expertmesh_gateway_batch_lines_total",
      help: "Lines of batches answered here since start, by outcome: completed (2xx), failed (any other answer), retried (429 or 503, run again).",
      labelNames: ["outcome"],
      registers,
      collect() {
        for (const [outcome, v] of Object.entries(stats().lines)) {
          this.inc({ outcome }, v - (seen.get(outcome) ?? 0));
          seen.set(outcome, v);
        }
      },
    });
  }
}
