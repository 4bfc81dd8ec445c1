// Continuous batching, the deciding part only (nano-vllm's Scheduler, with vLLM v1's
// unified token budget): a bounded waiting queue and a running list; each step takes
// running sequences first (decode tokens and the rest of chunked prefills), then admits
// waiting ones while the max-batched-tokens budget, the running limit and the KV blocks
// allow. When a running sequence needs a block and none is free, the most recently
// admitted one is preempted: its blocks are freed and it waits again at the front, to be
// recomputed (prompt and output so far) when it is readmitted. With prefix caching, a
// sequence admitted takes the cached blocks of its longest known prefix (kv-blocks.ts) and
// starts computing after them. With speculative decoding, a decoding sequence's draft
// tokens ride in its chunk when the budgets and blocks allow (never preempting for them);
// they count as computed only once the engine accepts them. With the priority policy
// (vLLM's --scheduling-policy priority, ADR 0016) both queues are kept in (priority,
// arrival) order, so the running list's end holds the sequence preempted first, and a
// waiting sequence of higher priority preempts lower ones that keep it out. With aging,
// the waiting queue counts a priority better by one per priorityAgingMs since arrival, so
// a steady stream of higher priorities cannot keep a request out for ever. Never touches
// a device.
import { createHash } from "node:crypto";
import { ExpertMeshError } from "../util/errors.ts";
import type { BlockAllocator } from "./kv-blocks.ts";

export type SequenceStatus = "waiting" | "running" | "finished";

/** The empty draft, shared: chunks and sequences without one allocate nothing per step. */
export const NO_DRAFT: readonly number[] = Object.freeze([]);

/** One sequence being generated: the prompt, the tokens sampled so far, cache progress. */
export class Sequence {
  readonly id: number;
  readonly promptTokens: readonly number[];
  readonly outputTokens: number[] = [];
  /** The most tokens this sequence may ever hold (prompt + output). */
  readonly maxTotalTokens: number;
  /** Positions whose latent rows are in the cache. */
  numComputed = 0;
  status: SequenceStatus = "waiting";
  /** Times it was preempted (and recomputed). */
  numPreemptions = 0;
  /**
   * With the priority policy: lower runs first (vLLM's `priority`); equal ones in arrival
   * (id) order. Ignored under fcfs.
   */
  priority = 0;
  /**
   * When it arrived (performance.now(), ms): with priority aging its place in the waiting
   * queue improves with the time since.
   */
  arrivedAt = performance.now();
  /**
   * Every row's logits are wanted (prompt logprobs), not just the last: its chunks count
   * against the scheduler's maxLogitRows.
   */
  wantsAllLogits = false;
  /**
   * A sequence with the same prompt submitted before this one (another choice of the same
   * request): with prefix caching this one is admitted after that one's prompt is computed,
   * to find it in the cache instead of computing it again.
   */
  promptFrom: Sequence | null = null;
  /**
   * vLLM's cache_salt: mixed into its first block's hash (and so every later one), so that
   * only sequences with the same salt share cached blocks (null: unsalted).
   */
  cacheSalt: string | null = null;
  /** Tokens read back from a second tier for it while it waited (counted when admitted). */
  tierLoaded = 0;
  /**
   * Tokens guessed to follow its last one (speculative.ts), set by the engine before each
   * step: a decoding sequence runs them with its last token in one chunk, cache room
   * and budgets allowing, and the engine keeps those the model confirms (accept()).
   */
  draft: readonly number[] = NO_DRAFT;

  constructor(id: number, promptTokens: readonly number[], maxTotalTokens: number) {
    if (promptTokens.length === 0)
      throw new ExpertMeshError("EM_CLI_USAGE", "a sequence needs at least one prompt token");
    this.id = id;
    this.promptTokens = promptTokens;
    this.maxTotalTokens = maxTotalTokens;
  }

  /** Prompt plus output tokens. */
  get numTokens(): number {
    return this.promptTokens.length + this.outputTokens.length;
  }

  /** Token at position `i` of prompt + output. */
  tokenAt(i: number): number {
    const p = this.promptTokens.length;
    return i < p ? this.promptTokens[i]! : this.outputTokens[i - p]!;
  }

  readonly #blockHashes: string[] = [];

  /**
   * Hashes of its blocks of `blockSize` positions, at least the first `count` (which must
   * hold tokens; more when computed before): each covers its block's tokens and the hash
   * before it, so equal hashes mean equal tokens from position 0 (what the latent rows of
   * a block depend on). Computed once per block.
   */
  blockHashes(count: number, blockSize: number): readonly string[] {
    const h = this.#blockHashes;
    for (let i = h.length; i < count; i++) {
      const tokens = new Uint32Array(blockSize);
      for (let j = 0; j < blockSize; j++) tokens[j] = this.tokenAt(i * blockSize + j);
      const seed =
        this.cacheSalt === null ? `b${blockSize}` : `b${blockSize}\0salt:${this.cacheSalt}`;
      h.push(
        createHash("sha256")
          .update(i > 0 ? h[i - 1]! : seed)
          .update(tokens)
          .digest("base64"),
      );
    }
    return h;
  }
}

/**
 * The hashes of `seq`'s whole blocks of `blockSize` before its last token (whose logits are
 * computed): what a prefix hit can give it.
 */
export function prefixHashes(seq: Sequence, blockSize: number): readonly string[] {
  const blocks = Math.floor((seq.numTokens - 1) / blockSize);
  return seq.blockHashes(blocks, blockSize).slice(0, blocks);
}

/** Part of a sequence to run in one step: positions [start, start + numTokens). */
export interface ScheduledChunk {
  readonly seq: Sequence;
  readonly start: number;
  readonly numTokens: number;
  /** The chunk reaches the sequence's last token: its logits give the next token. */
  readonly isComplete: boolean;
  /**
   * Draft tokens run after the sequence's last token (the chunk's last draft.length
   * tokens; numTokens counts them). Their cache rows are written but not counted as
   * computed until the engine accepts them.
   */
  readonly draft: readonly number[];
}

export interface SchedulerConfig {
  /** Tokens one step may run over all sequences (chunked prefill splits prompts to fit). */
  readonly maxBatchTokens: number;
  /** Sequences running at once. */
  readonly maxRunning: number;
  /** Sequences that may wait for admission; more are refused (HTTP 429). */
  readonly maxQueueDepth: number;
  /**
   * Tokens of sequences that want every row's logits, per step (default: no limit). Each
   * such token is a [vocab] row of logits: 2048 of them are 1 GiB at DeepSeek's 129k vocab.
   */
  readonly maxLogitRows?: number;
  /**
   * Reuse the cached blocks of a known prefix (default false). Not for sequences that want
   * every row's logits: those need every prompt row computed.
   */
  readonly prefixCaching?: boolean;
  /** Default fcfs. */
  readonly policy?: SchedulingPolicy;
  /**
   * With the priority policy: a waiting sequence counts as one priority better per this
   * many ms since it arrived (default 0: no aging). Only the waiting queue's order ages:
   * preemption still needs a better priority as given, and then also a better aged one.
   */
  readonly priorityAgingMs?: number;
}

export type AddResult = "ok" | "queue_full" | "too_large";

/**
 * fcfs: arrival order, the newest admitted is preempted first. priority: (priority, id)
 * order, the lowest is preempted first, and also to let in a waiting one of higher priority
 * (with aging, the waiting ones in (aged priority, id) order).
 */
export const SCHEDULING_POLICIES = ["fcfs", "priority"] as const;
export type SchedulingPolicy = (typeof SCHEDULING_POLICIES)[number];

export class Scheduler {
  readonly config: SchedulerConfig;
  readonly #blocks: BlockAllocator;
  /** The priority policy: the running list in (priority, id) order, the waiting one aged. */
  readonly #byPriority: boolean;
  /** Priority aging: ms per level (0: none). */
  readonly #agingMs: number;
  #waiting: Sequence[] = [];
  #running: Sequence[] = [];
  /** Tokens of admitted sequences looked up in the prefix cache, and found there. */
  prefixQueryTokens = 0;
  prefixHitTokens = 0;
  /** Of prefixHitTokens, those read back from the allocator's second tier (the disk). */
  prefixTierHitTokens = 0;

  constructor(config: SchedulerConfig, blocks: BlockAllocator) {
    for (const k of ["maxBatchTokens", "maxRunning", "maxQueueDepth", "maxLogitRows"] as const) {
      if (k === "maxLogitRows" && config[k] === undefined) continue;
      if (!Number.isInteger(config[k]) || config[k]! < 1)
        throw new ExpertMeshError(
          "EM_CLI_USAGE",
          `scheduler ${k} must be a positive integer, got ${config[k]}`,
        );
    }
    if (config.policy !== undefined && !SCHEDULING_POLICIES.includes(config.policy))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `scheduling policy must be ${SCHEDULING_POLICIES.join(" or ")}, got ${config.policy}`,
      );
    const aging = config.priorityAgingMs ?? 0;
    if (!Number.isFinite(aging) || aging < 0)
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `priority aging must be a number of ms >= 0, got ${config.priorityAgingMs}`,
      );
    if (aging > 0 && config.policy !== "priority")
      throw new ExpertMeshError("EM_CLI_USAGE", "priority aging needs the priority policy");
    this.config = config;
    this.#blocks = blocks;
    this.#byPriority = config.policy === "priority";
    this.#agingMs = aging;
  }

  get numWaiting(): number {
    return this.#waiting.length;
  }

  get numRunning(): number {
    return this.#running.length;
  }

  get isIdle(): boolean {
    return this.#waiting.length === 0 && this.#running.length === 0;
  }

  /**
   * Whether add() would take `seq`: "queue_full" when maxQueueDepth sequences already wait
   * (with `also` more waiting elsewhere: for a prefill gateway), "too_large" when it could
   * not fit in the whole cache even alone.
   */
  check(seq: Sequence, also = 0): AddResult {
    if (this.#blocks.blocksFor(seq.maxTotalTokens) > this.#blocks.numBlocks) return "too_large";
    if (this.#waiting.length + also >= this.config.maxQueueDepth) return "queue_full";
    return "ok";
  }

  /**
   * Queues a new sequence, when check(seq) says "ok". One `accepted` before (checked then;
   * its prompt was computed by a prefill gateway meanwhile) is queued past the queue's depth.
   */
  add(seq: Sequence, accepted = false): AddResult {
    const checked = this.check(seq);
    if (checked === "too_large" || (checked === "queue_full" && !accepted)) return checked;
    seq.status = "waiting";
    if (this.#byPriority) insertOrdered(this.#waiting, seq, this.#waitsBefore);
    else this.#waiting.push(seq);
    return "ok";
  }

  /** Picks the next step's chunks; `preempted` lists sequences sent back to wait. */
  schedule(): { chunks: ScheduledChunk[]; preempted: Sequence[] } {
    let budget = this.config.maxBatchTokens;
    let logitRows = this.config.maxLogitRows ?? Number.POSITIVE_INFINITY;
    // Tokens to run of `seq`: the rest of it within the budgets.
    const tokensOf = (seq: Sequence) =>
      Math.min(seq.numTokens - seq.numComputed, budget, seq.wantsAllLogits ? logitRows : budget);
    const chunks: ScheduledChunk[] = [];
    const preempted: Sequence[] = [];
    // A head whose prefix is still being read from disk preempts no one yet: the room would
    // stand empty for the read.
    if (this.#byPriority && !this.#headReadsAhead()) this.#makeRoomForPriority(preempted);
    // Preempted for a waiting sequence of higher priority: that one is admitted below.
    const forPriority = preempted.length;
    const take = (seq: Sequence, n: number, draft: readonly number[] = NO_DRAFT) => {
      chunks.push(chunkOf(seq, n, draft));
      budget -= n;
      if (seq.wantsAllLogits || draft.length > 0) logitRows -= n;
    };
    for (let i = 0; i < this.#running.length && budget > 0; i++) {
      const seq = this.#running[i]!;
      const n = tokensOf(seq);
      // No logit rows left this step: it waits for the next (keeping its place).
      if (n === 0) continue;
      // A decoding sequence's draft rides along while the budgets have room (each of its
      // tokens is a row of logits), leaving a token for each running sequence after it,
      // and when its blocks fit: a draft never preempts anyone.
      let draft: readonly number[] = NO_DRAFT;
      if (seq.numTokens - seq.numComputed === 1 && seq.draft.length > 0) {
        const later = this.#running.length - i - 1;
        const d = Math.min(seq.draft.length, budget - 1 - later, logitRows - 1);
        if (d > 0 && this.#blocks.reserve(seq.id, seq.numComputed + 1 + d))
          draft = seq.draft.slice(0, d);
      }
      if (draft.length > 0) {
        take(seq, 1 + draft.length, draft);
        continue;
      }
      let fits = this.#blocks.reserve(seq.id, seq.numComputed + n);
      // Free blocks by preempting the newest running sequences, this one last.
      while (!fits) {
        const victim = this.#running.at(-1)!;
        this.#preempt(victim);
        preempted.push(victim);
        if (victim === seq) break;
        fits = this.#blocks.reserve(seq.id, seq.numComputed + n);
      }
      if (!fits) break;
      take(seq, n);
    }
    // Admitting while preempting would only preempt again.
    while (
      preempted.length === forPriority &&
      budget > 0 &&
      this.#waiting.length > 0 &&
      this.#running.length < this.config.maxRunning
    ) {
      const seq = this.#waiting[0]!;
      const lookup = this.config.prefixCaching === true && !seq.wantsAllLogits;
      const from = seq.promptFrom;
      if (
        lookup &&
        from?.status === "running" &&
        from.numComputed < from.promptTokens.length &&
        seq.numComputed === 0
      )
        break;
      let hit = 0;
      let loaded = 0;
      if (lookup && seq.numComputed === 0) {
        const B = this.#blocks.blockSize;
        // Blocks read back from a second tier leave free those the first chunk then needs
        // (the rest of the prompt, within the step's budget).
        const chunkBlocks = (attached: number) =>
          Math.ceil(Math.min(budget, seq.numTokens - attached * B) / B);
        if (this.#headReadsAhead()) break;
        hit = this.#blocks.attachPrefix(seq.id, this.#prefixHashes(seq), chunkBlocks) * B;
        seq.tierLoaded += this.#blocks.lastLoaded * B;
        loaded = seq.tierLoaded;
        seq.numComputed = hit;
        if (this.#blocks.lastCapped) {
          // More of its prefix to read than one step may: the blocks read stay cached in the
          // pool, and the next steps find them there and read on (first in line, it waits).
          this.#blocks.free(seq.id);
          seq.numComputed = 0;
          break; // the next ones are read ahead below, while this step runs
        }
      }
      const n = tokensOf(seq);
      if (n === 0 || !this.#blocks.reserve(seq.id, seq.numComputed + n)) {
        if (hit > 0) {
          this.#blocks.free(seq.id);
          seq.numComputed = 0;
        }
        break;
      }
      if (lookup) {
        this.prefixQueryTokens += seq.numTokens;
        this.prefixHitTokens += hit;
        this.prefixTierHitTokens += Math.min(loaded, hit);
        seq.tierLoaded = 0;
      }
      this.#waiting.shift();
      seq.status = "running";
      if (this.#byPriority) insertOrdered(this.#running, seq, runsBefore);
      else this.#running.push(seq);
      take(seq, n);
    }
    // A head kept out (no slot, no budget) has its prefix's files read meanwhile.
    this.#headReadsAhead();
    return { chunks, preempted };
  }

  #prefixHashes(seq: Sequence): readonly string[] {
    return prefixHashes(seq, this.#blocks.blockSize);
  }

  /**
   * Whether the first waiting sequence waits for its prefix's blocks from the second tier,
   * read in the background (started here): only while sequences run, which step on
   * meanwhile. Alone, it reads them in its step: no one else waits, and it starts sooner;
   * unless the tier reads nothing in a step (the NATS tier), then it waits alone too.
   */
  #headReadsAhead(): boolean {
    const head = this.#waiting[0];
    if (
      !head ||
      (this.#running.length === 0 && this.#blocks.tier?.readsInStep !== false) ||
      this.config.prefixCaching !== true ||
      head.wantsAllLogits ||
      head.numComputed !== 0
    )
      return false;
    return this.#blocks.prefetchPrefix(this.#prefixHashes(head));
  }

  /**
   * Records that a step ran these chunks: their rows are now in the cache (a draft's rows
   * only once accept() counts them).
   */
  commit(chunks: readonly ScheduledChunk[]): void {
    for (const c of chunks) {
      const seq = c.seq;
      if (seq.status !== "running" || seq.numComputed !== c.start) continue;
      this.#computed(seq, c.numTokens - c.draft.length);
    }
  }

  /**
   * Counts `n` more positions of a running sequence as computed: the draft tokens of its
   * last chunk that the engine accepted (it appended them to the output first).
   */
  accept(seq: Sequence, n: number): void {
    if (seq.status !== "running" || n <= 0) return;
    if (seq.numComputed + n > seq.numTokens)
      throw new ExpertMeshError(
        "EM_GATEWAY_INTERNAL",
        `sequence ${seq.id} accepts ${n} positions past its ${seq.numTokens} tokens`,
      );
    this.#computed(seq, n);
  }

  /** numComputed += n; with prefix caching, registers the blocks that completed. */
  #computed(seq: Sequence, n: number): void {
    const start = seq.numComputed;
    seq.numComputed += n;
    if (!this.config.prefixCaching) return;
    // Blocks these positions completed: others may now start from them.
    const B = this.#blocks.blockSize;
    const first = Math.floor(start / B);
    const done = Math.floor(seq.numComputed / B);
    if (done === first) return;
    const hashes = seq.blockHashes(done, B);
    for (let i = first; i < done; i++) this.#blocks.register(seq.id, i, hashes[i]!);
  }

  /** Removes a sequence (finished, cancelled or failed) and frees its blocks. */
  finish(seq: Sequence): void {
    this.#waiting = this.#waiting.filter((s) => s !== seq);
    this.#running = this.#running.filter((s) => s !== seq);
    this.#blocks.free(seq.id);
    seq.status = "finished";
  }

  /**
   * The waiting queue's order: (priority, id), where with aging a priority counts one
   * better per #agingMs since arrival. That key is fixed per sequence (priority +
   * arrivedAt / agingMs: all age at the same rate), so the queue stays sorted.
   */
  readonly #waitsBefore = (a: Sequence, b: Sequence): boolean => {
    const ka = this.#agingMs > 0 ? a.priority + a.arrivedAt / this.#agingMs : a.priority;
    const kb = this.#agingMs > 0 ? b.priority + b.arrivedAt / this.#agingMs : b.priority;
    return ka < kb || (ka === kb && a.id < b.id);
  };

  /**
   * Priority policy: while the first waiting sequence outranks a running one and cannot be
   * admitted for want of a running slot or of blocks for its first chunk, preempts the
   * last running one it outranks (the lowest); not when preempting all it outranks could
   * not free enough blocks. Outranking takes a better priority as given and, with aging,
   * a place before it in the aged order too: an aged head of low priority only gets the
   * next free slot, and a victim always waits behind the head it made room for (no two
   * sequences preempt each other in turn). Blocks kept by the prefix cache count as free;
   * a prefix hit only makes the chunk smaller.
   */
  #makeRoomForPriority(preempted: Sequence[]): void {
    const head = this.#waiting[0];
    if (!head) return;
    const firstChunk = Math.min(
      head.numTokens,
      this.config.maxBatchTokens,
      head.wantsAllLogits ? (this.config.maxLogitRows ?? head.numTokens) : head.numTokens,
    );
    const need = this.#blocks.blocksFor(firstChunk);
    const outranked = (s: Sequence) => s.priority > head.priority && this.#waitsBefore(head, s);
    // At most what preempting every lower one frees (shared blocks may stay held): when
    // even that is short, preempting would not let it in.
    let freeable = this.#blocks.numFreeBlocks;
    for (const s of this.#running) if (outranked(s)) freeable += this.#blocks.table(s.id).length;
    if (freeable < need) return;
    while (this.#running.length >= this.config.maxRunning || this.#blocks.numFreeBlocks < need) {
      const low = this.#running.findLast(outranked);
      if (!low) return;
      this.#preempt(low);
      preempted.push(low);
    }
  }

  #preempt(seq: Sequence): void {
    this.#running = this.#running.filter((s) => s !== seq);
    this.#blocks.free(seq.id);
    seq.numComputed = 0;
    seq.numPreemptions++;
    seq.status = "waiting";
    // fcfs: first to be readmitted. priority: behind the waiting ones of higher priority
    // and those of its own that arrived before it.
    if (this.#byPriority) insertOrdered(this.#waiting, seq, this.#waitsBefore);
    else this.#waiting.unshift(seq);
  }
}

/** The running list's order: (priority, id), as given. */
function runsBefore(a: Sequence, b: Sequence): boolean {
  return a.priority < b.priority || (a.priority === b.priority && a.id < b.id);
}

/** Inserts `seq` into `list`, kept in the order `before` gives. */
function insertOrdered(
  list: Sequence[],
  seq: Sequence,
  before: (a: Sequence, b: Sequence) => boolean,
): void {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (before(list[mid]!, seq)) lo = mid + 1;
    else hi = mid;
  }
  list.splice(lo, 0, seq);
}

function chunkOf(seq: Sequence, n: number, draft: readonly number[]): ScheduledChunk {
  return {
    seq,
    start: seq.numComputed,
    numTokens: n,
    isComplete: seq.numComputed + n - draft.length === seq.numTokens,
    draft,
  };
}
