// Disaggregated prefill (ADR 0029): gateways in prefill mode compute long prompts for the
// gateways that serve them (decode mode), as DeepSeek's own serving splits the two. The KV
// rows travel through the prefix cache's NATS tier (kv-remote.ts): the prefill gateway
// writes each block to the bucket as it is computed, and the decode gateway reads them back
// as a prefix hit. Only the job (the prompt's token ids) and its answer cross the request
// subject, em.<ns>.<model>.prefill, whose queue group spreads jobs over prefill gateways.
//
// A job is a frame: "EMPF", a version byte, a u32 (LE) length of a JSON header
// ({fingerprint, cacheSalt, priority, tokens}), the header, then the tokens as u32 LE.
// The answer is JSON: {ok: true, shared, blocks, ms} or {ok: false, code, message}.
//
// The decode gateway never depends on an answer: without a prefill gateway (no responders),
// past the timeout, or on a refusal, it computes the prompt itself, from the blocks it finds.
import type { Msg, NatsConnection, Subscription } from "@nats-io/transport-node";
import type { RemotePrefixStore } from "../engine/kv-remote.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import type { PrefillJob, PrefillOffload, ServingEngine } from "./engine.ts";

const MAGIC = Buffer.from("EMPF", "latin1");
const VERSION = 1;
/** Magic, version, header length. */
const PREFIX_BYTES = 4 + 1 + 4;
/** A header longer than this is no job of ours (a salt is the only free text in it). */
const MAX_HEADER_BYTES = 64 * 1024;
/** Queue group of the prefill gateways: each job goes to one. */
export const PREFILL_QUEUE = "prefill";
/** How long a decode gateway waits for its watch to see the blocks a job wrote. */
const WATCH_WAIT_MS = 2000;

/** A job as it crosses the wire: the prompt and what its blocks' keys depend on. */
export interface PrefillFrame {
  /** The prefix cache tier's fingerprint (model, weights, kernels, KV layout). */
  readonly fingerprint: string;
  readonly cacheSalt: string | null;
  readonly priority: number;
  readonly prompt: readonly number[];
}

export function encodePrefillJob(job: PrefillFrame): Uint8Array {
  const header = Buffer.from(
    JSON.stringify({
      fingerprint: job.fingerprint,
      cacheSalt: job.cacheSalt,
      priority: job.priority,
      tokens: job.prompt.length,
    }),
  );
  const out = Buffer.alloc(PREFIX_BYTES + header.length + 4 * job.prompt.length);
  MAGIC.copy(out, 0);
  out.writeUInt8(VERSION, 4);
  out.writeUInt32LE(header.length, 5);
  header.copy(out, PREFIX_BYTES);
  let at = PREFIX_BYTES + header.length;
  for (const t of job.prompt) {
    out.writeUInt32LE(t, at);
    at += 4;
  }
  return out;
}

/** Throws EM_PREFILL_FRAME naming what is wrong with `data`. */
export function decodePrefillJob(data: Uint8Array): PrefillFrame {
  const bad = (why: string): never => {
    throw new ExpertMeshError("EM_PREFILL_FRAME", `prefill job: ${why}`);
  };
  const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (b.length < PREFIX_BYTES || !b.subarray(0, 4).equals(MAGIC)) bad("not a prefill job frame");
  if (b.readUInt8(4) !== VERSION) bad(`version ${b.readUInt8(4)}, this build speaks ${VERSION}`);
  const headerBytes = b.readUInt32LE(5);
  if (headerBytes > MAX_HEADER_BYTES || PREFIX_BYTES + headerBytes > b.length)
    bad(`a header of ${headerBytes} bytes in a frame of ${b.length}`);
  let h: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(
      b.subarray(PREFIX_BYTES, PREFIX_BYTES + headerBytes).toString(),
    );
    if (typeof parsed === "object" && parsed !== null && !Array.isArray(parsed))
      h = parsed as Record<string, unknown>;
    else bad("the header is not a JSON object");
  } catch (e) {
    if (e instanceof ExpertMeshError) throw e;
    bad("the header is not JSON");
  }
  if (typeof h["fingerprint"] !== "string") bad("no fingerprint");
  if (h["cacheSalt"] !== null && typeof h["cacheSalt"] !== "string") bad("cacheSalt");
  const priority = h["priority"];
  if (typeof priority !== "number" || !Number.isSafeInteger(priority)) bad("priority");
  const n = h["tokens"];
  if (typeof n !== "number" || !Number.isSafeInteger(n) || n < 1) bad("tokens");
  const tokensAt = PREFIX_BYTES + headerBytes;
  if (b.length !== tokensAt + 4 * (n as number))
    bad(
      `${n} tokens need ${4 * (n as number)} bytes after the header, the frame has ${b.length - tokensAt}`,
    );
  const prompt = new Array<number>(n as number);
  for (let i = 0; i < prompt.length; i++) prompt[i] = b.readUInt32LE(tokensAt + 4 * i);
  return {
    fingerprint: h["fingerprint"] as string,
    cacheSalt: h["cacheSalt"] as string | null,
    priority: priority as number,
    prompt,
  };
}

/** A prefill gateway's answer. */
export type PrefillAnswer =
  | { ok: true; shared: number; blocks: number; ms: number }
  | { ok: false; code: string; message: string };

export function decodePrefillAnswer(data: Uint8Array): PrefillAnswer {
  try {
    const a = JSON.parse(Buffer.from(data).toString()) as PrefillAnswer;
    if (a.ok === true && typeof a.shared === "number" && typeof a.blocks === "number") return a;
    if (a.ok === false && typeof a.code === "string") return a;
  } catch {}
  throw new ExpertMeshError("EM_PREFILL_FRAME", "a prefill answer that is not one");
}

/** A prefill gateway's counts since start. */
export interface PrefillWorkerStats {
  /** Jobs computed and their blocks shared. */
  done: number;
  /** Jobs refused (malformed, another model, queue full) or failed. */
  failed: number;
  /** Prompt tokens of the jobs done. */
  tokens: number;
  /** Jobs running now. */
  running: number;
}

export interface PrefillWorkerOptions {
  readonly nc: NatsConnection;
  readonly subject: string;
  readonly engine: ServingEngine;
  /** The fingerprint of this gateway's shared tier: jobs for another are refused. */
  readonly fingerprint: string;
  /** Token ids must be below it. */
  readonly vocabSize: number;
  /** Prompt tokens plus one, at most (--max-model-len). */
  readonly maxModelLen: number;
  readonly log?: (message: string) => void;
}

/** A prefill gateway's side: computes the jobs of its queue group, in its engine's batches. */
export class PrefillWorker {
  readonly #o: PrefillWorkerOptions;
  readonly #sub: Subscription;
  readonly #running = new Set<Promise<void>>();
  readonly #stats = { done: 0, failed: 0, tokens: 0 };
  #logged = false;

  constructor(o: PrefillWorkerOptions) {
    this.#o = o;
    this.#sub = o.nc.subscribe(o.subject, {
      queue: PREFILL_QUEUE,
      callback: (err, msg) => {
        if (err) return;
        const job = this.#serve(msg);
        this.#running.add(job);
        void job.finally(() => this.#running.delete(job));
      },
    });
  }

  get stats(): PrefillWorkerStats {
    return { ...this.#stats, running: this.#running.size };
  }

  async #serve(msg: Msg): Promise<void> {
    const t0 = performance.now();
    let answer: PrefillAnswer;
    try {
      const job = decodePrefillJob(msg.data);
      if (job.fingerprint !== this.#o.fingerprint)
        throw new ExpertMeshError(
          "EM_PREFILL_MISMATCH",
          `a job for blocks of fingerprint ${job.fingerprint}, this prefill gateway writes ${this.#o.fingerprint} (another model, weights, kernels or KV cache layout)`,
        );
      const over = job.prompt.find((t) => t >= this.#o.vocabSize);
      if (over !== undefined)
        throw new ExpertMeshError(
          "EM_PREFILL_FRAME",
          `prefill job: token id ${over} is past the vocabulary (${this.#o.vocabSize})`,
        );
      if (job.prompt.length + 1 > this.#o.maxModelLen)
        throw new ExpertMeshError(
          "EM_GATEWAY_PROMPT_TOO_LONG",
          `a prompt of ${job.prompt.length} tokens is past this prefill gateway's context length ${this.#o.maxModelLen}`,
        );
      const r = await this.#o.engine.prefill(job);
      this.#stats.done++;
      this.#stats.tokens += job.prompt.length;
      answer = { ok: true, ...r, ms: performance.now() - t0 };
    } catch (e) {
      this.#stats.failed++;
      const code = e instanceof ExpertMeshError ? e.code : "EM_GATEWAY_INTERNAL";
      answer = { ok: false, code, message: formatError(e) };
      if (!this.#logged) {
        this.#logged = true;
        this.#o.log?.(
          `prefill job refused or failed: ${answer.message}; further ones are counted in /metrics only`,
        );
      }
    }
    if (msg.reply) msg.respond(JSON.stringify(answer));
  }

  /** Takes no more jobs, and waits for those running. */
  async close(): Promise<void> {
    this.#sub.unsubscribe();
    await Promise.allSettled([...this.#running]);
  }
}

/** How the decode gateway's jobs ended, since start. */
export interface PrefillClientStats {
  /** Computed by a prefill gateway, and its blocks seen in the bucket. */
  done: number;
  /** No prefill gateway subscribed. */
  noWorkers: number;
  /** No answer in time. */
  timeout: number;
  /** Refused or failed there (the answer's code), or the blocks not seen in time. */
  failed: number;
  /** Jobs waiting for their answer now. */
  pending: number;
  /** Blocks prefill gateways wrote for this gateway's jobs (as they answered). */
  sharedBlocks: number;
}

export interface PrefillClientOptions {
  readonly nc: NatsConnection;
  readonly subject: string;
  /** The tier the prefill gateways write the blocks to (its fingerprint goes with each job). */
  readonly store: RemotePrefixStore;
  readonly minTokens: number;
  readonly timeoutMs: number;
  readonly log?: (message: string) => void;
}

/** A decode gateway's side: hands prompts to the prefill gateways (ServingEngine's offload). */
export class PrefillClient implements PrefillOffload {
  readonly minTokens: number;
  readonly #o: PrefillClientOptions;
  readonly #stats = { done: 0, noWorkers: 0, timeout: 0, failed: 0, pending: 0, sharedBlocks: 0 };
  /** The last outcome logged: a change is logged once. */
  #lastLogged = "ok";

  constructor(o: PrefillClientOptions) {
    if (!Number.isSafeInteger(o.minTokens) || o.minTokens < 1)
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `the prefill offload's minimum prompt must be a positive number of tokens, got ${o.minTokens}`,
      );
    this.#o = o;
    this.minTokens = o.minTokens;
  }

  get stats(): PrefillClientStats {
    return { ...this.#stats };
  }

  async prefill(job: PrefillJob): Promise<void> {
    const s = this.#stats;
    s.pending++;
    try {
      const msg = await this.#o.nc.request(
        this.#o.subject,
        encodePrefillJob({ ...job, fingerprint: this.#o.store.fingerprint }),
        { timeout: this.#o.timeoutMs },
      );
      const a = decodePrefillAnswer(msg.data);
      if (!a.ok) {
        s.failed++;
        this.#note(`refused (${a.code}: ${a.message})`);
        return;
      }
      s.sharedBlocks += a.shared;
      if (!(await this.#o.store.whenKnown(job.hashes.slice(0, a.shared), WATCH_WAIT_MS))) {
        s.failed++;
        this.#note(`its blocks not seen in the bucket within ${WATCH_WAIT_MS} ms`);
        return;
      }
      s.done++;
      this.#note("ok");
    } catch (e) {
      const name = (e as Error).name;
      const noWorkers =
        name === "NoRespondersError" ||
        (e as { isNoResponders?: () => boolean }).isNoResponders?.() === true;
      if (noWorkers) s.noWorkers++;
      else if (name === "TimeoutError") s.timeout++;
      else s.failed++;
      this.#note(
        noWorkers
          ? "no prefill gateway is there"
          : name === "TimeoutError"
            ? `no answer within ${this.#o.timeoutMs} ms`
            : formatError(e),
      );
    } finally {
      s.pending--;
    }
  }

  /** Logs when the jobs' outcome changes (not per job). */
  #note(outcome: string): void {
    const kind = outcome.replace(/ \(.*$/, "");
    if (kind === this.#lastLogged) return;
    this.#lastLogged = kind;
    this.#o.log?.(
      outcome === "ok"
        ? "prefill gateways compute the long prompts again"
        : `prefill job: ${outcome}; this gateway computes its prompts itself meanwhile`,
    );
  }
}
