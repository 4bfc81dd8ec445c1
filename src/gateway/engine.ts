// The serving loop (nano-vllm's LLMEngine.step): the scheduler decides, BatchForward runs,
// then each sequence that completed its chunk samples a token. Requests arrive through
// submit() and get their tokens through callbacks; cancel() (client gone, stop string)
// frees the sequence's cache blocks before the next step.
//
// With microBatches 2 a step's chunks are split into two halves (no sequence in both) whose
// forward passes run interleaved: while one half awaits its routed experts for a layer (a
// NATS round trip to the shards), the other runs its attention and dense part. The halves
// are in lock step: the step ends, and the scheduler commits and samples, when both ended.
//
// With speculative decoding (ngram), each decoding sequence's guessed next tokens (its
// draft, speculative.ts) run with its last token in one chunk. Every row is sampled as
// decoding token by token would sample it (penalties and min_tokens counting the draft
// before it, the same random draw for the same output position), and the tokens are kept
// while the sample equals the draft: the first that differs is the step's own next token.
// The output is thus exactly the output without speculation (for a one-hot draft this is
// speculative sampling's acceptance rule), only more of it per step. Rows of rejected
// draft tokens stay in the cache's blocks, past the sequence's length, to be overwritten.
// Under an output grammar, row i is masked by the grammar's state after the draft's first i
// tokens (a fork of the sequence's constraint), as decoding token by token would mask it.
//
// With MTP drafts (ADR 0012) the model's multi-token-prediction layer guesses instead: after
// each step's sampling, the MTP layer runs over the positions the step added to each
// sequence (the main model's final hidden states there, and the token after each), writing
// its own cache rows; a decoding sequence's last row gives its next draft token (argmax).

import type { BatchForward, BatchItem, LatentCache, MtpItem, MtpResult } from "../engine/batch.ts";
import type { BlockKvCache } from "../engine/kv-blocks.ts";
import type { KvDtype } from "../engine/kv-format.ts";
import type { PrefixStore, PrefixStoreStats } from "../engine/prefix-store.ts";
import {
  applyPenalties,
  maskBadWords,
  type Penalties,
  rankIn,
  type SampleRows,
  type TokenLogprob,
  temperature32,
  topP32,
  uniform32,
} from "../engine/sampling.ts";
import {
  type AddResult,
  NO_DRAFT,
  prefixHashes,
  type ScheduledChunk,
  Scheduler,
  type SchedulerConfig,
  type SchedulingPolicy,
  Sequence,
} from "../engine/scheduler.ts";
import type { ScratchTrimmer } from "../engine/scratch-trim.ts";
import { type Drafter, PREDICTION_DRAFT_TOKENS, PredictionDrafter } from "../engine/speculative.ts";
import { Prng } from "../model/prng.ts";
import { ExpertMeshError } from "../util/errors.ts";
import { ApiError } from "./errors.ts";

export interface SamplingParams {
  /** 0: greedy. */
  readonly temperature: number;
  readonly topP: number;
  /** 0: off. */
  readonly topK: number;
  readonly presencePenalty: number;
  readonly frequencyPenalty: number;
  /** vLLM's repetition_penalty (sampling.ts applyPenalties); absent: 1, off. */
  readonly repetitionPenalty?: number;
  /** vLLM's min_p, in [0, 1] (sampling.ts's rule); absent: 0, off. */
  readonly minP?: number;
  readonly seed: number;
  /** [token id, bias] added to the logits before sampling (OpenAI's logit_bias). */
  readonly logitBias?: readonly (readonly [number, number])[];
  /** vLLM's allowed_token_ids, as a bit set over the vocabulary: only these are sampled. */
  readonly allowedTokens?: Uint32Array;
  /** vLLM's bad_words as token id sequences (sampling.ts maskBadWords). */
  readonly badWords?: readonly (readonly number[])[];
}

export interface GenerationRequest {
  readonly prompt: readonly number[];
  readonly maxTokens: number;
  readonly sampling: SamplingParams;
  /** Token ids that end generation (not returned). */
  readonly stopTokenIds: readonly number[];
  /** null: no logprobs; k >= 0: the chosen token's logprob and the k most likely. */
  readonly logprobs: number | null;
  /** Also the logprob of every prompt token (for completions' echo). */
  readonly promptLogprobs: boolean;
  /** The most likely tokens given per prompt position (default: logprobs, or 0). */
  readonly promptTopLogprobs?: number;
  /** Prompt tokens' ranks too (vLLM's prompt_logprobs): a pass over each row. */
  readonly promptRanks?: boolean;
  /**
   * The id (from submit) of a request with the same prompt (another choice of the same API
   * request): with prefix caching this one starts after that one's prompt is computed and
   * takes it from the cache (n choices compute their prompt once).
   */
  readonly promptFrom?: number;
  /** Limits the tokens it may sample (JSON mode); it finishes ("stop") when complete. */
  readonly constraint?: TokenConstraint;
  /** The stop tokens cannot be sampled before this many output tokens (vLLM's min_tokens). */
  readonly minTokens?: number;
  /** Lower runs first, with the priority scheduling policy (default 0; scheduler.ts). */
  readonly priority?: number;
  /** vLLM's cache_salt: shares cached prompt blocks only with requests of the same salt. */
  readonly cacheSalt?: string;
  /**
   * OpenAI's predicted output, as tokens: the draft of every step while the output follows
   * it (speculative.ts PredictionDrafter), whether the engine speculates or not. The output
   * is the same as without it.
   */
  readonly prediction?: readonly number[];
}

/** Which tokens a sequence may sample next, and what it sampled (json-mode.ts). */
export interface TokenConstraint {
  /** Bitset over the vocabulary (bit id % 32 of word id / 32): the tokens allowed next. */
  allowed(): Uint32Array;
  /** The sampled token (an allowed one); true when the output is complete. */
  accept(id: number): boolean;
  /** An independent copy in the same state (to follow a draft without moving this one). */
  fork(): TokenConstraint;
}

export type FinishReason = "stop" | "length";

export interface GenerationCallbacks {
  /**
   * The request's first step was scheduled: `cachedTokens` prompt tokens came from the
   * prefix cache (not computed). Once, before any token.
   */
  onStarted?(cachedTokens: number): void;
  /** Prompt logprobs (first token: null), once, before the first token. */
  onPromptLogprobs?(logprobs: (TokenLogprob | null)[]): void;
  onToken(token: TokenLogprob): void;
  /** A step ran `proposed` draft tokens of its, of which `accepted` were kept. */
  onDraft?(proposed: number, accepted: number): void;
  onFinish(reason: FinishReason): void;
  onError(err: unknown): void;
}

/** A second tier's counts, and the prompt tokens read back from it since start. */
export type PrefixTierStats = PrefixStoreStats & { hitTokens: number };

export interface EngineStats {
  numWaiting: number;
  numRunning: number;
  kvUsage: number;
  /** Token positions the KV cache holds (all blocks), and how it stores rows. */
  kvCapacityTokens: number;
  kvCacheDtype: KvDtype;
  numPreemptions: number;
  /** Tokens of admitted sequences looked up in the prefix cache, and found (not computed). */
  prefixQueryTokens: number;
  prefixHitTokens: number;
  /** The prefix cache's disk tier (ADR 0019), when there is one; hitTokens are of prefixHitTokens. */
  prefixDisk: PrefixTierStats | null;
  /** The prefix cache's NATS tier (ADR 0028), when there is one; hitTokens as prefixDisk's. */
  prefixRemote: PrefixTierStats | null;
  /** Disaggregated prefill (ADR 0029): sequences whose prompt a prefill gateway computes now. */
  numPrefilling: number;
  /** Speculative decoding: drafts run, their tokens, and those accepted. */
  specDrafts: number;
  specDraftTokens: number;
  specAcceptedTokens: number;
  /** MTP steps that failed (their sequences went on without a draft). */
  specMtpFailures: number;
}

interface Active {
  seq: Sequence;
  req: GenerationRequest;
  cb: GenerationCallbacks;
  rng: Prng;
  cache: LatentCache | null;
  /** Output token counts, for the penalties. */
  counts: Map<number, number>;
  /** The prompt's token ids, for the repetition penalty (null without one). */
  promptIds: ReadonlySet<number> | null;
  promptLogprobs: (TokenLogprob | null)[] | null;
  cancelled: boolean;
  /**
   * Disaggregated prefill: the job computing its prompt at a prefill gateway; it joins the
   * scheduler when the job ends. Null once it has.
   */
  prefilled: HeldPrefill | null;
  /** Its first step was scheduled (onStarted told). */
  started: boolean;
  /** Its drafter, with speculative decoding (created at its first draft). */
  drafter: Drafter | null;
  /**
   * Draft tokens it asks for next: halved after a draft of which nothing was accepted,
   * doubled (up to numTokens) after one accepted whole, so text that does not repeat its
   * context costs few rows.
   */
  draftLength: number;
  /** The most draft tokens it asks for (the engine's numTokens, or a prediction's). */
  draftMax: number;
  /** Drafts from the request's predicted output (PredictionDrafter), before any other. */
  predictor: Drafter | null;
  /** With MTP drafts: the MTP layer's guesses for the tokens after its first `at` tokens. */
  mtpDraft: { at: number; tokens: number[] } | null;
}

export interface EngineOptions {
  /**
   * Micro-batches in flight per step (1 or 2, default 1). With 2, a step of two or more
   * sequences runs as two halves whose expert round trips overlap the other's attention.
   */
  readonly microBatches?: number;
  /**
   * Speculative decoding: each decoding sequence runs up to `numTokens` tokens its drafter
   * guesses with its next one (default off). Under an output grammar (JSON, tool calls) a
   * draft is followed on a fork of the grammar, up to its first refused token. Sequences
   * asking for prompt logprobs do not speculate.
   */
  readonly speculative?: SpeculativeOptions;
  /**
   * Trims the backend's scratch memory after a quiet time (scratch-trim.ts); the engine
   * touches it at each step and closes it with the engine.
   */
  readonly scratchTrimmer?: ScratchTrimmer;
  /**
   * Disaggregated prefill (ADR 0029): a prompt lacking at least `minTokens` tokens in this
   * gateway's prefix cache and tiers is computed by a prefill gateway first (prefill.ts).
   * Needs prefix caching and a shared tier: this gateway reads the blocks from it.
   */
  readonly prefillOffload?: PrefillOffload;
}

/** A prompt for a prefill gateway to compute (ADR 0029). */
export interface PrefillJob {
  readonly prompt: readonly number[];
  readonly cacheSalt: string | null;
  readonly priority: number;
  /** Its whole blocks before the last token: what the prefill gateway is to write. */
  readonly hashes: readonly string[];
}

/** Where long prompts are computed when prefill is disaggregated (prefill.ts). */
export interface PrefillOffload {
  /** Prompts lacking fewer tokens than this are computed here. */
  readonly minTokens: number;
  /**
   * Has `job`'s blocks computed elsewhere, and resolves once this gateway's shared tier
   * knows them, or once that failed: this gateway computes what it lacks itself then.
   * `signal` aborts when no request waits for the job any more (the job is cancelled there
   * too, and the promise resolves at once). Never rejects.
   */
  prefill(job: PrefillJob, signal: AbortSignal): Promise<void>;
}

/** A prefill job the sequences of one prompt (its `n` choices) wait for. */
interface HeldPrefill {
  readonly done: Promise<void>;
  readonly abort: AbortController;
  /** Sequences still waiting for it: the last one cancelled aborts the job. */
  waiters: number;
}

export type SpeculativeOptions =
  | {
      readonly method?: "ngram";
      /** Draft tokens per sequence and step, at most. */
      readonly numTokens: number;
      /** A new sequence's drafter (speculative.ts: NgramIndex for prompt lookup). */
      readonly drafter: (prompt: readonly number[]) => Drafter;
    }
  | {
      /**
       * The model's MTP layer drafts (BatchForward.mtpStep): one token, or `numTokens` by
       * running the layer again on its own output (chained, as vLLM and SGLang do).
       */
      readonly method: "mtp";
      readonly numTokens: number;
    };

export class ServingEngine {
  readonly #model: BatchForward;
  readonly #kv: BlockKvCache;
  readonly #scheduler: Scheduler;
  readonly #active = new Map<number, Active>();
  /** Active sequences with a predicted output (they draft whether the engine speculates or not). */
  #predicting = 0;
  /** Scratch rows for #sample. */
  #logits = new Float32Array(0);
  readonly microBatches: number;
  readonly speculative: SpeculativeOptions | null;
  #nextId = 1;
  #looping = false;
  readonly #trimmer: ScratchTrimmer | undefined;
  readonly #offload: PrefillOffload | null;
  /** Sequences whose prompt a prefill gateway computes (not yet in the scheduler). */
  readonly #prefilling = new Set<Active>();
  numPreemptions = 0;
  /** Steps run, and of them those that ran as two micro-batches. */
  numSteps = 0;
  numSplitSteps = 0;
  readonly #spec = { drafts: 0, draftTokens: 0, acceptedTokens: 0, mtpFailures: 0 };

  constructor(
    model: BatchForward,
    kv: BlockKvCache,
    config: SchedulerConfig,
    opts: EngineOptions = {},
  ) {
    const mb = opts.microBatches ?? 1;
    if (mb !== 1 && mb !== 2)
      throw new ExpertMeshError("EM_CLI_USAGE", `micro-batches must be 1 or 2, got ${mb}`);
    this.#model = model;
    this.#kv = kv;
    this.#trimmer = opts.scratchTrimmer;
    this.#scheduler = new Scheduler(config, kv.allocator);
    // A prompt waiting for its prefix's blocks from a tier is scheduled once they are read.
    for (const store of kv.stores) store.onStaged = () => this.#kick();
    this.microBatches = mb;
    this.speculative = opts.speculative ?? null;
    this.#offload = opts.prefillOffload ?? null;
    if (this.#offload && !(config.prefixCaching && kv.stores.some((s) => s.shared)))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        "disaggregated prefill needs prefix caching and a tier the prefill gateways write (--prefix-cache-remote)",
      );
    if (this.speculative?.method === "mtp" && !model.hasMtp)
      throw new ExpertMeshError(
        "EM_CKPT_NO_MTP",
        "MTP drafts need the model's MTP layer: load the weights with it",
      );
  }

  /**
   * Writes the prefix cache's blocks to its tiers, if it has any (at a graceful stop,
   * when no step runs); resolves how many blocks were written.
   */
  persistPrefixes(): Promise<number> {
    return this.#kv.persist();
  }

  /** Ends the tiers' reads ahead and watches, if any (at a stop, after persistPrefixes). */
  async close(): Promise<void> {
    this.#trimmer?.close();
    for (const store of this.#kv.stores) await store.close();
  }

  /**
   * Computes a prompt for another gateway (a prefill job, ADR 0029): runs it as a request
   * for one token (discarded), then has its whole blocks before the last token in the shared
   * tier. Resolves how many of those blocks, from the first, the tier keeps, of how many.
   * Rejects with EM_GATEWAY_OVERLOADED when the queue is full, EM_GATEWAY_PROMPT_TOO_LONG
   * when it cannot fit, EM_PREFILL_CANCELLED when `signal` aborts first (the request is
   * dropped, queued or running), or the engine's error.
   */
  async prefill(
    job: Omit<PrefillJob, "hashes">,
    signal?: AbortSignal,
  ): Promise<{ shared: number; blocks: number }> {
    const seq = new Sequence(0, job.prompt, job.prompt.length);
    seq.cacheSalt = job.cacheSalt;
    const hashes = prefixHashes(seq, this.#kv.allocator.blockSize);
    const cancelled = () =>
      new ExpertMeshError("EM_PREFILL_CANCELLED", "the prefill job was cancelled by its gateway");
    if (signal?.aborted) throw cancelled();
    await new Promise<void>((resolve, reject) => {
      const r = this.submit(
        {
          prompt: job.prompt,
          maxTokens: 1,
          sampling: GREEDY,
          stopTokenIds: [],
          logprobs: null,
          promptLogprobs: false,
          priority: job.priority,
          ...(job.cacheSalt === null ? {} : { cacheSalt: job.cacheSalt }),
        },
        { onToken: () => {}, onFinish: () => resolve(), onError: reject },
      );
      if (r.ok)
        signal?.addEventListener(
          "abort",
          () => {
            r.cancel();
            reject(cancelled());
          },
          { once: true },
        );
      else
        reject(
          r.reason === "queue_full"
            ? new ExpertMeshError("EM_GATEWAY_OVERLOADED", "the prefill gateway's queue is full")
            : new ExpertMeshError(
                "EM_GATEWAY_PROMPT_TOO_LONG",
                `a prompt of ${job.prompt.length} tokens does not fit in the prefill gateway's KV cache`,
              ),
        );
    });
    return { shared: await this.#kv.share(hashes), blocks: hashes.length };
  }

  /** In which order waiting sequences are admitted and running ones preempted. */
  get schedulingPolicy(): SchedulingPolicy {
    return this.#scheduler.config.policy ?? "fcfs";
  }

  /** The second tier's counts, when it is of `kind`. */
  #tierStats(kind: PrefixStore["kind"]): PrefixTierStats | null {
    const stores = this.#kv.stores;
    const store = stores.find((s) => s.kind === kind);
    if (!store) return null;
    // Alone, the scheduler's count; with two tiers, the blocks each one gave.
    const hitTokens =
      stores.length === 1
        ? this.#scheduler.prefixTierHitTokens
        : store.stats.hits * this.#kv.allocator.blockSize;
    return { ...store.stats, hitTokens };
  }

  get stats(): EngineStats {
    return {
      numWaiting: this.#scheduler.numWaiting,
      numRunning: this.#scheduler.numRunning,
      kvUsage: this.#kv.allocator.usage,
      kvCapacityTokens: this.#kv.capacityTokens,
      kvCacheDtype: this.#kv.dtype,
      numPreemptions: this.numPreemptions,
      prefixQueryTokens: this.#scheduler.prefixQueryTokens,
      prefixHitTokens: this.#scheduler.prefixHitTokens,
      prefixDisk: this.#tierStats("disk"),
      prefixRemote: this.#tierStats("remote"),
      numPrefilling: this.#prefilling.size,
      specDrafts: this.#spec.drafts,
      specDraftTokens: this.#spec.draftTokens,
      specAcceptedTokens: this.#spec.acceptedTokens,
      specMtpFailures: this.#spec.mtpFailures,
    };
  }

  /**
   * Queues a request. Resolves its cancel function, or the scheduler's refusal
   * ("queue_full": HTTP 429; "too_large": it could never fit in the KV cache).
   */
  submit(
    req: GenerationRequest,
    cb: GenerationCallbacks,
  ):
    | { ok: true; id: number; cancel: () => void }
    | { ok: false; reason: Exclude<AddResult, "ok"> } {
    const seq = new Sequence(this.#nextId++, req.prompt, req.prompt.length + req.maxTokens);
    seq.wantsAllLogits = req.promptLogprobs;
    seq.priority = req.priority ?? 0;
    seq.cacheSalt = req.cacheSalt ?? null;
    const from = req.promptFrom === undefined ? undefined : this.#active.get(req.promptFrom);
    if (from) seq.promptFrom = from.seq;
    // Another choice of a prompt a prefill gateway computes waits for it too.
    const offload = from ? null : this.#offloadable(seq, req);
    const waitsFor = from?.prefilled ?? null;
    const added =
      waitsFor || offload
        ? this.#scheduler.check(seq, this.#prefilling.size)
        : this.#scheduler.add(seq);
    if (added !== "ok") return { ok: false, reason: added };
    let held = waitsFor;
    if (held) held.waiters++;
    else if (offload) {
      const abort = new AbortController();
      held = { done: this.#offload!.prefill(offload, abort.signal), abort, waiters: 1 };
    }
    const a: Active = {
      seq,
      req,
      cb,
      rng: new Prng(req.sampling.seed),
      cache: null,
      counts: new Map(),
      promptIds: (req.sampling.repetitionPenalty ?? 1) !== 1 ? new Set(req.prompt) : null,
      promptLogprobs: req.promptLogprobs ? [null] : null,
      cancelled: false,
      prefilled: held,
      started: false,
      drafter: null,
      draftLength: 0,
      draftMax: 0,
      predictor: req.prediction?.length
        ? new PredictionDrafter(req.prediction, req.prompt.length)
        : null,
      mtpDraft: null,
    };
    a.draftMax = a.predictor ? PREDICTION_DRAFT_TOKENS : (this.speculative?.numTokens ?? 0);
    a.draftLength = a.draftMax;
    if (a.predictor) this.#predicting++;
    this.#active.set(seq.id, a);
    if (held) {
      this.#prefilling.add(a);
      const join = () => {
        a.prefilled = null;
        if (!this.#prefilling.delete(a)) return; // cancelled meanwhile
        this.#scheduler.add(seq, true);
        this.#kick();
      };
      held.done.then(join, join);
    }
    this.#kick();
    return {
      ok: true,
      id: seq.id,
      cancel: () => {
        a.cancelled = true;
        this.#kick();
      },
    };
  }

  #kick(): void {
    if (this.#looping) return;
    this.#looping = true;
    setImmediate(() => void this.#loop());
  }

  async #loop(): Promise<void> {
    try {
      for (;;) {
        this.#reap();
        if (this.#scheduler.isIdle) break;
        this.#trimmer?.touch();
        const ran = await this.#step();
        this.#trimmer?.touch();
        if (!ran) break;
        // Let HTTP I/O (new requests, disconnects, stream writes) in between steps.
        await new Promise((r) => setImmediate(r));
      }
    } catch (err) {
      // A step that throws outside the forward pass (the sampler, a callback) must not
      // leave requests waiting forever: every sequence fails with the error.
      for (const a of [...this.#active.values()]) {
        this.#end(a);
        if (!a.cancelled) a.cb.onError(err);
      }
    } finally {
      this.#looping = false;
    }
  }

  /** Drops cancelled sequences, freeing their blocks. */
  #reap(): void {
    for (const a of this.#active.values()) if (a.cancelled) this.#end(a);
  }

  /**
   * The job for a prefill gateway, when `seq`'s prompt lacks at least the offload's
   * minTokens tokens in the cache and its tiers; else null (computed here).
   */
  #offloadable(seq: Sequence, req: GenerationRequest): PrefillJob | null {
    const o = this.#offload;
    if (!o || req.promptLogprobs || seq.promptTokens.length < o.minTokens) return null;
    const B = this.#kv.allocator.blockSize;
    const hashes = prefixHashes(seq, B);
    const tier = this.#kv.allocator.tier;
    let cached = 0;
    for (const h of hashes) {
      if (this.#kv.allocator.blockOf(h) === undefined && !tier?.has(h)) break;
      cached++;
    }
    if (seq.promptTokens.length - cached * B < o.minTokens) return null;
    return { prompt: seq.promptTokens, cacheSalt: seq.cacheSalt, priority: seq.priority, hashes };
  }

  #end(a: Active): void {
    if (a.predictor && this.#active.has(a.seq.id)) this.#predicting--;
    // The last sequence waiting for a prefill job cancels it.
    if (this.#prefilling.delete(a) && a.prefilled && --a.prefilled.waiters === 0)
      a.prefilled.abort.abort();
    this.#scheduler.finish(a.seq);
    this.#active.delete(a.seq.id);
  }

  /** One scheduled step; false when nothing could be scheduled. */
  async #step(): Promise<boolean> {
    if (this.speculative || this.#predicting > 0) this.#propose(this.speculative);
    const { chunks, preempted } = this.#scheduler.schedule();
    this.numPreemptions += preempted.length;
    for (const p of preempted) this.#active.get(p.id)!.cache = null;
    if (chunks.length === 0) return false;
    const mtp = this.speculative?.method === "mtp";
    /** With MTP drafts, each chunk's final hidden states (BatchItem.onHidden). */
    const hidden: (Float32Array | undefined)[] = new Array(chunks.length);
    const items: BatchItem[] = chunks.map((c, i) => {
      const a = this.#active.get(c.seq.id)!;
      // A new view holds the positions before the chunk: a prefix found in the cache.
      a.cache ??= this.#kv.view(c.seq.id, c.start);
      if (!a.started) {
        a.started = true;
        a.cb.onStarted?.(c.start);
      }
      const own = c.numTokens - c.draft.length;
      const tokens = Array.from({ length: own }, (_, i) => c.seq.tokenAt(c.start + i));
      tokens.push(...c.draft);
      // Prompt logprobs and drafts need every row; else only the row after the chunk.
      const logits =
        a.promptLogprobs !== null || c.draft.length > 0 ? "all" : c.isComplete ? "last" : "none";
      const onHidden = mtp
        ? (rows: Float32Array) => {
            hidden[i] = rows;
          }
        : undefined;
      return { tokens, cache: a.cache, logits, ...(onHidden ? { onHidden } : {}) };
    });
    const groups =
      this.microBatches > 1 && chunks.length > 1
        ? splitByTokens(chunks)
        : [chunks.map((_, i) => i)];
    this.numSteps++;
    if (groups.length > 1) this.numSplitSteps++;
    const logits: (Float32Array | undefined)[] = new Array(chunks.length);
    const failed: { group: number[]; err: unknown }[] = [];
    const run = async (group: number[]) => {
      try {
        const out = await this.#model.step(group.map((i) => items[i]!));
        group.forEach((i, k) => {
          logits[i] = out[k]!;
        });
      } catch (err) {
        failed.push({ group, err });
      }
    };
    const running: Promise<void>[] = [];
    for (const [g, group] of groups.entries()) {
      // The first half's dispatch is sent (flushed at the end of this tick) before the
      // second half's attention takes the event loop.
      if (g > 0) await new Promise((r) => setImmediate(r));
      running.push(run(group));
    }
    await Promise.all(running);
    // A failed half (e.g. no replica of a shard answered) fails its sequences.
    for (const { group, err } of failed) {
      for (const i of group) {
        const a = this.#active.get(chunks[i]!.seq.id);
        if (!a) continue;
        this.#end(a);
        if (!a.cancelled) a.cb.onError(err);
      }
    }
    const ran = chunks.filter((_, i) => logits[i] !== undefined);
    this.#scheduler.commit(ran);
    // The cache holds the draft's rows past the sequence's computed length: until accepted,
    // they are not part of it.
    for (const c of ran)
      if (c.draft.length > 0) this.#active.get(c.seq.id)?.cache?.setLength(c.seq.numComputed);
    const V = this.#model.config.vocabSize;
    const picks: Pick[] = [];
    chunks.forEach((c, i) => {
      const rows = logits[i];
      if (rows === undefined) return;
      const a = this.#active.get(c.seq.id);
      if (!a || a.cancelled) return;
      if (a.promptLogprobs !== null) this.#collectPromptLogprobs(a, c.start, rows, V);
      if (c.isComplete) {
        const n = 1 + c.draft.length;
        picks.push({ a, raw: rows.subarray(rows.length - n * V), draft: c.draft });
      }
    });
    // Sampled in groups of about SAMPLE_ROWS rows (a pick's rows stay together).
    for (let i = 0; i < picks.length; ) {
      let j = i + 1;
      let rows = 1 + picks[i]!.draft.length;
      while (j < picks.length && rows + 1 + picks[j]!.draft.length <= SAMPLE_ROWS)
        rows += 1 + picks[j++]!.draft.length;
      this.#sample(picks.slice(i, j));
      i = j;
    }
    if (mtp) await this.#mtpDrafts(chunks, hidden);
    return true;
  }

  /**
   * The MTP layer over the positions this step added to each sequence still running (its
   * own tokens and accepted draft tokens: hidden state at p, token p + 1), in one batch;
   * each decoding sequence's last row gives its next draft token. With drafts of K, the
   * layer runs K - 1 times more on its own output (its hidden state and guess at the next
   * position), for the sequences whose draft length asks for more; those rows lie past the
   * sequence's computed positions (in blocks reserved for them, as its draft's rows will
   * be) and are written again once the positions are computed. A failed MTP step (a shard
   * of the MTP layer's experts gone) only costs drafts: its sequences go on without one.
   */
  async #mtpDrafts(
    chunks: readonly ScheduledChunk[],
    hidden: readonly (Float32Array | undefined)[],
  ): Promise<void> {
    const work: { a: Active; item: MtpItem }[] = [];
    for (const [i, c] of chunks.entries()) {
      // Hidden states came only from a forward pass that ran to its end.
      const rows = hidden[i];
      const a = this.#active.get(c.seq.id);
      if (!rows || !a || a.cancelled || !a.cache || a.seq.status !== "running") continue;
      const seq = a.seq;
      a.mtpDraft = null;
      // Positions [c.start, numComputed) are the sequence's now; the token after each is
      // known (a prompt token, an accepted draft token, or the one just sampled).
      const n = Math.min(c.numTokens, seq.numComputed - c.start);
      if (n <= 0) continue;
      const decoding = seq.numTokens - seq.numComputed === 1;
      work.push({
        a,
        item: {
          start: c.start,
          tokens: Array.from({ length: n }, (_, j) => seq.tokenAt(c.start + j + 1)),
          hidden: rows,
          cache: a.cache,
          logits: decoding ? "last" : "none",
        },
      });
    }
    let round = work;
    for (let depth = 0; round.length > 0; depth++) {
      let out: MtpResult;
      try {
        out = await this.#model.mtpStep(round.map((w) => w.item));
      } catch {
        // Drafts so far stand (none at depth 0: they were cleared above).
        this.#spec.mtpFailures++;
        return;
      }
      const next: { a: Active; item: MtpItem }[] = [];
      round.forEach(({ a, item }, k) => {
        const logits = out.logits[k]!;
        if (logits.length === 0) return;
        const token = argmax(logits);
        if (depth === 0) a.mtpDraft = { at: a.seq.numTokens, tokens: [token] };
        else a.mtpDraft!.tokens.push(token);
        // Deeper while the sequence's draft length (and max_tokens) asks for more and a block
        // holds the row.
        const at = item.start + item.tokens.length;
        const want = Math.min(a.draftLength, a.req.maxTokens - a.seq.outputTokens.length - 1);
        if (depth + 1 >= want || !this.#kv.allocator.reserve(a.seq.id, at + 1)) return;
        next.push({
          a,
          item: {
            start: at,
            tokens: [token],
            hidden: out.hidden[k]!,
            cache: a.cache!,
            logits: "last",
          },
        });
      });
      round = next;
    }
  }

  /**
   * Drafts for the decoding sequences that may speculate; none for the others. A draft
   * never reaches past max_tokens (all of it accepted plus the next token fits).
   */
  #propose(cfg: SpeculativeOptions | null): void {
    for (const a of this.#active.values()) {
      const seq = a.seq;
      seq.draft = NO_DRAFT;
      if (
        a.cancelled ||
        seq.status !== "running" ||
        seq.numTokens - seq.numComputed !== 1 ||
        a.promptLogprobs !== null
      )
        continue;
      const k = Math.min(a.draftLength, a.req.maxTokens - seq.outputTokens.length - 1);
      if (k <= 0) continue;
      if (a.predictor) {
        seq.draft = a.predictor.propose(seq, k);
        continue;
      }
      if (!cfg) continue;
      if (cfg.method === "mtp") {
        const d = a.mtpDraft;
        if (d !== null && d.at === seq.numTokens) seq.draft = d.tokens.slice(0, k);
        continue;
      }
      a.drafter ??= cfg.drafter(seq.promptTokens);
      seq.draft = a.drafter.propose(seq, k);
    }
  }

  /** Row j of a chunk starting at `start` predicts the token at start + j + 1. */
  #collectPromptLogprobs(a: Active, start: number, rows: Float32Array, V: number): void {
    const out = a.promptLogprobs!;
    const P = a.seq.promptTokens.length;
    // Rows j0.. predict positions out.length..: those not collected yet (a recomputation
    // after a preemption repeats rows already taken), up to the prompt's last token.
    const j0 = out.length - start - 1;
    const j1 = Math.min(rows.length / V, P - start - 1);
    if (j0 >= 0 && j1 > j0) {
      const ids = a.seq.promptTokens.slice(start + j0 + 1, start + j1 + 1);
      const k = a.req.promptTopLogprobs ?? a.req.logprobs ?? 0;
      const taken = this.#logprobs(
        rows.subarray(j0 * V, j1 * V),
        Int32Array.from(ids),
        ids.map(() => k),
      );
      out.push(
        ...(a.req.promptRanks
          ? taken.map((t, j) => ({
              ...t,
              rank: rankIn(rows.subarray((j0 + j) * V, (j0 + j + 1) * V), t.id),
            }))
          : taken),
      );
    }
    if (out.length === P) {
      a.cb.onPromptLogprobs?.(out);
      // Recomputation after a preemption must not report them again.
      a.promptLogprobs = null;
      a.seq.wantsAllLogits = false;
    }
  }

  /**
   * The next tokens of each of `picks` (sequences that completed their chunk): each row's
   * logits with penalties, logit_bias and min_tokens as of its output position, sampled in
   * one backend call (the native sampler runs the rows on its threads). A pick with a draft
   * has a row per draft token and one more; its tokens are the samples up to and including
   * the first that differs from the draft (or the last row's).
   */
  #sample(picks: readonly Pick[]): void {
    const V = this.#model.config.vocabSize;
    const n = picks.reduce((s, p) => s + 1 + p.draft.length, 0);
    if (this.#logits.length < n * V) this.#logits = new Float32Array(n * V);
    const logits = this.#logits.subarray(0, n * V);
    const rows = {
      temperature: new Float32Array(n),
      topK: new Int32Array(n),
      topP: new Float32Array(n),
      uniform: new Float32Array(n),
      minP: new Float32Array(n),
    } satisfies SampleRows;
    const failed = new Map<Active, unknown>();
    /** First row of each pick. */
    const first: number[] = [];
    /**
     * Per pick, the draft tokens that may be kept: all, or up to the first one the output
     * grammar refuses or that completes it (the rows after can never be kept).
     */
    const usable: number[] = [];
    let r = 0;
    for (const { a, raw, draft } of picks) {
      first.push(r);
      let limit = draft.length;
      // Under a grammar, row i's mask is the state after the draft's first i tokens.
      const grammar =
        a.req.constraint && draft.length > 0 ? a.req.constraint.fork() : a.req.constraint;
      const s = a.req.sampling;
      const penalties: Penalties = {
        presence: s.presencePenalty,
        frequency: s.frequencyPenalty,
        repetition: s.repetitionPenalty ?? 1,
      };
      const penalized =
        penalties.presence !== 0 || penalties.frequency !== 0 || penalties.repetition !== 1;
      // Row i samples output position out + i, after the draft's first i tokens: the
      // penalties count them, and its random draw is the one that position gets unspeculated
      // (drawn from a copy: the generator advances by the tokens kept).
      const counts = penalized && draft.length > 0 ? new Map(a.counts) : a.counts;
      const rng = draft.length > 0 ? a.rng.clone() : a.rng;
      const out = a.seq.outputTokens.length;
      for (let i = 0; i <= draft.length; i++, r++) {
        const row = logits.subarray(r * V, (r + 1) * V);
        row.set(raw.subarray(i * V, (i + 1) * V));
        if (penalized) applyPenalties(row, penalties, counts, a.promptIds);
        for (const [id, bias] of s.logitBias ?? []) row[id]! += bias;
        if (s.allowedTokens) applyMask(row, s.allowedTokens);
        if (s.badWords)
          maskBadWords(
            row,
            s.badWords,
            i === 0 ? a.seq.outputTokens : [...a.seq.outputTokens, ...draft.slice(0, i)],
          );
        const holdsStops = a.req.minTokens !== undefined && out + i < a.req.minTokens;
        if (holdsStops) for (const id of a.req.stopTokenIds) row[id] = Number.NEGATIVE_INFINITY;
        if (grammar && i <= limit)
          try {
            const allowed = grammar.allowed();
            applyMask(row, allowed);
            const d = draft[i];
            if (i < limit && d !== undefined)
              if (((allowed[d >>> 5]! >>> (d & 31)) & 1) === 0 || grammar.accept(d)) limit = i;
          } catch (err) {
            // Past the first row only the draft leads there: cut it before (decoding token
            // by token fails here only if it gets there).
            if (i === 0) failed.set(a, err);
            else limit = Math.min(limit, i - 1);
          }
        rows.temperature[r] = temperature32(s.temperature);
        rows.topK[r] = s.topK;
        rows.topP[r] = topP32(s.topP);
        rows.minP[r] = s.minP ?? 0;
        rows.uniform[r] = uniform32(rng.uniform());
        const d = draft[i];
        if (penalized && d !== undefined) counts.set(d, (counts.get(d) ?? 0) + 1);
      }
      usable.push(limit);
    }
    const ids = this.#model.sample(logits, rows);
    // Rows with nothing to pick (-1). At the first row the request ends: numbers that
    // overflowed (NaN, +inf) would give a random token, and a row of -inf is the request's
    // constraints excluding every token (allowed_token_ids outside a grammar's tokens,
    // min_tokens holding back the only allowed ones). Past it only the draft leads there:
    // the draft is cut before.
    picks.forEach(({ a }, p) => {
      if (failed.has(a)) return;
      const r = first[p]!;
      if (ids[r] === -1) failed.set(a, unpickable(a, logits.subarray(r * V, (r + 1) * V)));
      for (let i = 1; i <= usable[p]!; i++) if (ids[r + i] === -1) usable[p] = i - 1;
    });
    // The rows whose samples are kept: the draft's while they agree, then one more.
    const kept = picks.map(({ a, draft }, p) => {
      let i = 0;
      while (i < usable[p]! && ids[first[p]! + i] === draft[i]) {
        // A stop token ends the sequence: nothing after it is kept.
        if (a.req.stopTokenIds.includes(draft[i]!)) break;
        i++;
      }
      return i + 1;
    });
    // Logprobs of the kept tokens, for the picks that ask, in one call.
    const asking = picks.flatMap(({ a }, p) =>
      a.req.logprobs === null || failed.has(a)
        ? []
        : Array.from({ length: kept[p]! }, (_, i) => ({ p, row: first[p]! + i })),
    );
    const lps = new Map<number, TokenLogprob>();
    if (asking.length > 0) {
      let rowsOf = logits;
      if (asking.length < n) {
        rowsOf = new Float32Array(asking.length * V);
        for (const [i, { row }] of asking.entries())
          rowsOf.set(logits.subarray(row * V, (row + 1) * V), i * V);
      }
      const got = this.#logprobs(
        rowsOf,
        Int32Array.from(asking, ({ row }) => ids[row]!),
        asking.map(({ p }) => picks[p]!.a.req.logprobs!),
      );
      for (const [i, { row }] of asking.entries()) lps.set(row, got[i]!);
    }
    picks.forEach(({ a, draft }, p) => {
      if (failed.has(a)) {
        if (a.cancelled || !this.#active.has(a.seq.id)) return;
        this.#end(a);
        a.cb.onError(failed.get(a));
        return;
      }
      if (draft.length > 0) {
        for (let i = 0; i < kept[p]!; i++) a.rng.uniform();
        const accepted = kept[p]! - 1;
        this.#spec.drafts++;
        this.#spec.draftTokens += draft.length;
        this.#spec.acceptedTokens += accepted;
        if (accepted === 0) a.draftLength = Math.max(1, a.draftLength >> 1);
        else if (accepted === draft.length) a.draftLength = Math.min(a.draftMax, a.draftLength * 2);
        a.cb.onDraft?.(draft.length, accepted);
      }
      for (let i = 0; i < kept[p]!; i++) {
        // A callback (of this or an earlier row) may have ended it: a client's cancel.
        if (a.cancelled || !this.#active.has(a.seq.id)) return;
        const row = first[p]! + i;
        this.#accept(a, ids[row]!, lps.get(row));
      }
      // Still running: the accepted draft tokens' rows are part of its cache now.
      if (kept[p]! > 1 && this.#active.has(a.seq.id) && a.seq.status === "running") {
        this.#scheduler.accept(a.seq, kept[p]! - 1);
        a.cache?.setLength(a.seq.numComputed);
      }
    });
  }

  /** Per row of `logits`: the logprob of ids[row] and its k[row] most likely tokens. */
  #logprobs(logits: Float32Array, ids: Int32Array, k: readonly number[]): TokenLogprob[] {
    const K = Math.max(0, ...k);
    const r = this.#model.logprobs(logits, ids, K);
    return Array.from(ids, (id, i) => ({
      id,
      logprob: r.logprob[i]!,
      top: Array.from(
        { length: k[i]! },
        (_, j) => [r.topIds[i * K + j]!, r.topLogprobs[i * K + j]!] as const,
      ),
    }));
  }

  /** The sampled token `id` of `a`, with its logprobs when the request asks for them. */
  #accept(a: Active, id: number, lp: TokenLogprob | undefined): void {
    const { stopTokenIds, maxTokens } = a.req;
    if (stopTokenIds.includes(id)) {
      this.#end(a);
      a.cb.onFinish("stop");
      return;
    }
    a.seq.outputTokens.push(id);
    a.counts.set(id, (a.counts.get(id) ?? 0) + 1);
    let complete = false;
    try {
      complete = a.req.constraint?.accept(id) ?? false;
    } catch (err) {
      this.#end(a);
      a.cb.onError(err);
      return;
    }
    const token: TokenLogprob = lp ?? { id, logprob: 0, top: [] };
    a.cb.onToken(token);
    if (a.cancelled) return;
    if (complete || a.seq.outputTokens.length >= maxTokens) {
      this.#end(a);
      a.cb.onFinish(complete ? "stop" : "length");
    }
  }
}

/** Index of the largest value (the first of equals). */
function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

/** Sampling that takes the most likely token (no penalties, no bias). */
export const GREEDY: SamplingParams = {
  temperature: 0,
  topP: 1,
  topK: 0,
  presencePenalty: 0,
  frequencyPenalty: 0,
  seed: 0,
};

/**
 * Runs one request to its end without a client (benchmarks, tests): its token ids and why
 * it ended. Rejects with the engine's error, or its refusal ("queue_full", "too_large").
 */
export function runToEnd(
  engine: ServingEngine,
  req: GenerationRequest,
): Promise<{ ids: number[]; reason: FinishReason }> {
  return new Promise((resolve, reject) => {
    const ids: number[] = [];
    const r = engine.submit(req, {
      onToken: (t) => ids.push(t.id),
      onFinish: (reason) => resolve({ ids, reason }),
      onError: reject,
    });
    if (!r.ok) reject(new ExpertMeshError("EM_GATEWAY_OVERLOADED", `refused: ${r.reason}`));
  });
}

/**
 * -inf for the tokens `allowed` leaves out. A mask with no token (which a constraint over
 * a byte-level vocabulary never gives) is an error, not a pick from nothing.
 */
export function applyMask(row: Float32Array, allowed: Uint32Array): void {
  let any = false;
  for (let w = 0; w * 32 < row.length; w++) {
    const bits = allowed[w] ?? 0;
    if (bits === 0xffffffff) {
      any = true;
      continue;
    }
    const end = Math.min(row.length, (w + 1) * 32);
    if (bits === 0) {
      row.fill(Number.NEGATIVE_INFINITY, w * 32, end);
      continue;
    }
    any = true;
    for (let id = w * 32; id < end; id++) if (((bits >>> (id & 31)) & 1) === 0) row[id] = -Infinity;
  }
  if (!any)
    throw new ExpertMeshError("EM_GATEWAY_INTERNAL", "the output constraint allows no token");
}

/**
 * The error for a request whose first row had nothing to pick: numbers that overflowed, or
 * constraints that together exclude every token.
 */
function unpickable(a: Active, row: Float32Array): ExpertMeshError {
  if (row.some((v) => Number.isNaN(v) || v === Number.POSITIVE_INFINITY))
    return new ExpertMeshError(
      "EM_ENGINE_NONFINITE",
      `the model's logits at output position ${a.seq.outputTokens.length} hold NaN or ` +
        "infinity (its weights or activations overflowed); the request ends rather than " +
        "return a random token",
    );
  const s = a.req.sampling;
  const holdsStops = a.req.minTokens !== undefined && a.seq.outputTokens.length < a.req.minTokens;
  const by = [
    s.allowedTokens && "allowed_token_ids",
    s.badWords && "bad_words",
    holdsStops && "min_tokens",
    a.req.constraint && "the output's format (response_format, guided_*, tools)",
  ].filter(Boolean);
  return new ApiError(
    "EM_GATEWAY_BAD_REQUEST",
    `no token is left to sample at output position ${a.seq.outputTokens.length}: ` +
      (by.length > 0 ? `${by.join(", ")} together exclude every token` : "every logit is -inf"),
    { param: s.allowedTokens ? "allowed_token_ids" : null },
  );
}

/** A sequence to sample for, with its logits rows [1 + draft.length, vocab] from the step. */
interface Pick {
  readonly a: Active;
  readonly raw: Float32Array;
  readonly draft: readonly number[];
}

/** Rows per sampling call: bounds the logits copied at once (32 rows at 129k: 16 MiB). */
const SAMPLE_ROWS = 32;

/**
 * Two groups of chunk indices with about the same number of tokens (each chunk, largest
 * first, to the group with fewer tokens so far), each in schedule order.
 */
export function splitByTokens(chunks: readonly { numTokens: number }[]): [number[], number[]] {
  const order = chunks
    .map((_, i) => i)
    .sort((p, q) => chunks[q]!.numTokens - chunks[p]!.numTokens || p - q);
  const groups: [number[], number[]] = [[], []];
  const tokens = [0, 0];
  for (const i of order) {
    const g = tokens[0]! <= tokens[1]! ? 0 : 1;
    groups[g].push(i);
    tokens[g]! += chunks[i]!.numTokens;
  }
  for (const g of groups) g.sort((p, q) => p - q);
  return groups;
}
