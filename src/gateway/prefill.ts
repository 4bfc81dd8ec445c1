// Disaggregated prefill (ADR 0029): gateways in prefill mode compute long prompts for the
// gateways that serve them (decode mode), as DeepSeek's own serving splits the two. The KV
// rows travel through the prefix cache's NATS tier (kv-remote.ts): the prefill gateway
// writes each block to the bucket as it is computed, and the decode gateway reads them back
// as a prefix hit. Only the job (the prompt's token ids) and its answer cross NATS:
//
// - <base> = em.<ns>.<model>.prefill: jobs for any prefill gateway (their queue group);
// - <base>.to.<id>: jobs for prefill gateway <id>, the least loaded one a decode gateway
//   knows of (pickPrefillWorker);
// - <base>.load: each prefill gateway's load ({id, tokens, jobs}, or {id, gone: true} as it
//   stops), at each job's start and end and once a second;
// - <base>.cancel: {id} of a job its decode gateway no longer waits for (every request of it
//   cancelled, or past its timeout); the prefill gateway running it drops it.
//
// A job is a frame: "EMPF", a version byte, a u32 (LE) length of a JSON header
// ({fingerprint, cacheSalt, priority, tokens, id?}), the header, then the tokens as u32 LE.
// The answer is JSON: {ok: true, shared, blocks, ms} or {ok: false, code, message}.
//
// The decode gateway never depends on an answer: without a prefill gateway (no responders),
// past the timeout, or on a refusal, it computes the prompt itself, from the blocks it finds.
import { randomBytes } from "node:crypto";
import { headers, type Msg, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { type Span, SpanKind, SpanStatusCode } from "@opentelemetry/api";
import type { RemotePrefixStore } from "../engine/kv-remote.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import type { PrefillJob, PrefillOffload, ServingEngine } from "./engine.ts";
import { requestTraces, type Tracing, traceHeaders } from "./tracing.ts";

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
/** A prefill gateway reports its load this often (and at each job's start and end)... */
const LOAD_EVERY_MS = 1000;
/** ...and a decode gateway forgets one it has not heard from for this long. */
export const LOAD_STALE_MS = 3500;
/** A job id: letters, digits, '-' and '_' (a cancel names it). */
const JOB_ID = /^[A-Za-z0-9_-]{1,64}$/;

/** The subjects of one model's prefill jobs, from the jobs' queue subject (see the top). */
export function prefillSubjects(base: string) {
  return {
    jobs: base,
    to: (worker: string) => `${base}.to.${worker}`,
    load: `${base}.load`,
    cancel: `${base}.cancel`,
  };
}

/** A job as it crosses the wire: the prompt and what its blocks' keys depend on. */
export interface PrefillFrame {
  /** The prefix cache tier's fingerprint (model, weights, kernels, KV layout). */
  readonly fingerprint: string;
  readonly cacheSalt: string | null;
  readonly priority: number;
  readonly prompt: readonly number[];
  /** Names the job in a cancel; a job without one cannot be cancelled. */
  readonly id?: string;
}

export function encodePrefillJob(job: PrefillFrame): Uint8Array {
  const header = Buffer.from(
    JSON.stringify({
      fingerprint: job.fingerprint,
      cacheSalt: job.cacheSalt,
      priority: job.priority,
      tokens: job.prompt.length,
      ...(job.id === undefined ? {} : { id: job.id }),
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
  const id = h["id"];
  if (id !== undefined && (typeof id !== "string" || !JOB_ID.test(id)))
    bad("id (1 to 64 letters, digits, '-' or '_')");
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
    ...(id === undefined ? {} : { id: id as string }),
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

/** A request nobody subscribes to (the NATS client's error for it, across its versions). */
function isNoResponders(e: unknown): boolean {
  return (
    (e as Error).name === "NoRespondersError" ||
    (e as { isNoResponders?: () => boolean }).isNoResponders?.() === true
  );
}

/** A prefill gateway's load, as it reports it on <base>.load. */
export interface PrefillLoad {
  readonly id: string;
  /** Prompt tokens of the jobs it has taken and not yet answered. */
  readonly tokens: number;
  readonly jobs: number;
  /** It stops: send it nothing more. */
  readonly gone?: true;
}

/** A load report, or null when `data` is none (ignored: reports are advisory). */
export function decodePrefillLoad(data: Uint8Array): PrefillLoad | null {
  try {
    const r = JSON.parse(Buffer.from(data).toString()) as Record<string, unknown>;
    if (typeof r["id"] !== "string" || !JOB_ID.test(r["id"])) return null;
    if (r["gone"] === true) return { id: r["id"], tokens: 0, jobs: 0, gone: true };
    const { tokens, jobs } = r;
    if (!Number.isSafeInteger(tokens) || !Number.isSafeInteger(jobs)) return null;
    if ((tokens as number) < 0 || (jobs as number) < 0) return null;
    return { id: r["id"], tokens: tokens as number, jobs: jobs as number };
  } catch {
    return null;
  }
}

/** A prefill gateway as a decode gateway knows it: its last report, and when it came. */
export interface KnownPrefillWorker {
  readonly id: string;
  readonly tokens: number;
  /** performance.now() when the report came (this process's clock, not the sender's). */
  readonly seenAt: number;
}

/** A job this decode gateway sent to a prefill gateway and still waits for. */
export interface SentPrefillJob {
  readonly worker: string;
  readonly tokens: number;
  readonly sentAt: number;
}

/**
 * The prefill gateway to send a job to: the one with the fewest prompt tokens to compute,
 * counting its last report plus this gateway's jobs sent to it since (not yet in a
 * report); ties broken by `random` (so that decode gateways with the same view spread).
 * Null when none reported within `staleMs` of `now`: the job goes to the queue group.
 */
export function pickPrefillWorker(
  workers: Iterable<KnownPrefillWorker>,
  sent: Iterable<SentPrefillJob>,
  now: number,
  staleMs: number = LOAD_STALE_MS,
  random: () => number = Math.random,
): string | null {
  const load = new Map<string, number>();
  const seenAt = new Map<string, number>();
  for (const w of workers) {
    if (now - w.seenAt > staleMs) continue;
    load.set(w.id, w.tokens);
    seenAt.set(w.id, w.seenAt);
  }
  for (const j of sent) {
    const at = seenAt.get(j.worker);
    if (at !== undefined && j.sentAt > at) load.set(j.worker, load.get(j.worker)! + j.tokens);
  }
  let best: string[] = [];
  let min = Number.POSITIVE_INFINITY;
  for (const [id, tokens] of load) {
    if (tokens < min) {
      min = tokens;
      best = [id];
    } else if (tokens === min) best.push(id);
  }
  if (best.length === 0) return null;
  return best[Math.min(best.length - 1, Math.floor(random() * best.length))]!;
}

/** A prefill gateway's counts since start. */
export interface PrefillWorkerStats {
  /** Jobs computed and their blocks shared. */
  done: number;
  /** Jobs refused (malformed, another model, queue full) or failed. */
  failed: number;
  /** Jobs their decode gateway cancelled before they were done. */
  cancelled: number;
  /** Prompt tokens of the jobs done. */
  tokens: number;
  /** Jobs running now. */
  running: number;
}

export interface PrefillWorkerOptions {
  readonly nc: NatsConnection;
  /** The jobs' queue subject (prefillSubjects). */
  readonly subject: string;
  /** This gateway's id (its direct subject and its load reports name it; made a subject token). */
  readonly id: string;
  readonly engine: ServingEngine;
  /** The fingerprint of this gateway's shared tier: jobs for another are refused. */
  readonly fingerprint: string;
  /** Token ids must be below it. */
  readonly vocabSize: number;
  /** Prompt tokens plus one, at most (--max-model-len). */
  readonly maxModelLen: number;
  /** A span per job, in the trace of the request it came from (its NATS headers). */
  readonly tracing?: Tracing;
  readonly log?: (message: string) => void;
}

/** A prefill gateway's side: computes the jobs of its queue group, in its engine's batches. */
export class PrefillWorker {
  readonly #o: PrefillWorkerOptions;
  readonly #id: string;
  readonly #subjects: ReturnType<typeof prefillSubjects>;
  readonly #subs: Subscription[];
  readonly #running = new Set<Promise<void>>();
  /** The jobs running that can be cancelled, by id. */
  readonly #cancels = new Map<string, AbortController>();
  readonly #stats = { done: 0, failed: 0, cancelled: 0, tokens: 0 };
  /** Prompt tokens of the jobs running. */
  #tokens = 0;
  readonly #timer: NodeJS.Timeout;
  #logged = false;

  constructor(o: PrefillWorkerOptions) {
    // A subject token, as a job id (a hostname's dots would split it).
    this.#id = o.id.replace(/[^A-Za-z0-9_-]/g, "_").slice(0, 64) || "prefill";
    this.#o = o;
    this.#subjects = prefillSubjects(o.subject);
    const take = (err: Error | null, msg: Msg) => {
      if (err) return;
      const job = this.#serve(msg);
      this.#running.add(job);
      void job.finally(() => this.#running.delete(job));
    };
    this.#subs = [
      o.nc.subscribe(this.#subjects.jobs, { queue: PREFILL_QUEUE, callback: take }),
      o.nc.subscribe(this.#subjects.to(this.#id), { callback: take }),
      o.nc.subscribe(this.#subjects.cancel, {
        callback: (err, msg) => {
          if (err) return;
          try {
            const { id } = JSON.parse(Buffer.from(msg.data).toString()) as { id?: unknown };
            if (typeof id === "string") this.#cancels.get(id)?.abort();
          } catch {}
        },
      }),
    ];
    this.#report();
    this.#timer = setInterval(() => this.#report(), LOAD_EVERY_MS);
    this.#timer.unref();
  }

  get stats(): PrefillWorkerStats {
    return { ...this.#stats, running: this.#running.size };
  }

  #report(gone = false): void {
    if (this.#o.nc.isClosed()) return;
    const load: PrefillLoad = gone
      ? { id: this.#id, tokens: 0, jobs: 0, gone: true }
      : { id: this.#id, tokens: this.#tokens, jobs: this.#running.size };
    this.#o.nc.publish(this.#subjects.load, JSON.stringify(load));
  }

  async #serve(msg: Msg): Promise<void> {
    const t0 = performance.now();
    let answer: PrefillAnswer;
    let tokens = 0;
    let id: string | undefined;
    const span = this.#span(msg);
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
      const abort = new AbortController();
      if (job.id !== undefined && !this.#cancels.has(job.id)) {
        id = job.id;
        this.#cancels.set(id, abort);
      }
      tokens = job.prompt.length;
      this.#tokens += tokens;
      this.#report();
      span?.setAttribute("expertmesh.prefill.prompt_tokens", tokens);
      const r = await this.#o.engine.prefill(job, abort.signal);
      this.#stats.done++;
      this.#stats.tokens += job.prompt.length;
      answer = { ok: true, ...r, ms: performance.now() - t0 };
      span?.setAttributes({
        "expertmesh.prefill.shared_blocks": r.shared,
        "expertmesh.prefill.blocks": r.blocks,
      });
    } catch (e) {
      const code = e instanceof ExpertMeshError ? e.code : "EM_GATEWAY_INTERNAL";
      answer = { ok: false, code, message: formatError(e) };
      span?.setAttribute("error.type", code);
      span?.setStatus({ code: SpanStatusCode.ERROR, message: answer.message });
      if (code === "EM_PREFILL_CANCELLED") this.#stats.cancelled++;
      else {
        this.#stats.failed++;
        if (!this.#logged) {
          this.#logged = true;
          this.#o.log?.(
            `prefill job refused or failed: ${answer.message}; further ones are counted in /metrics only`,
          );
        }
      }
    } finally {
      if (id !== undefined) this.#cancels.delete(id);
      this.#tokens -= tokens;
    }
    if (msg.reply) msg.respond(JSON.stringify(answer));
    span?.end();
    if (tokens > 0) this.#report();
  }

  /** The job's span, a child of the request's at the decode gateway; null without tracing. */
  #span(msg: Msg): Span | null {
    const tracing = this.#o.tracing;
    if (!tracing) return null;
    const h = msg.headers;
    const parent = tracing.extract({
      traceparent: h?.get("traceparent") || undefined,
      tracestate: h?.get("tracestate") || undefined,
    });
    return tracing.tracer.startSpan(
      "prefill_job",
      { kind: SpanKind.SERVER, attributes: { "messaging.destination.name": msg.subject } },
      parent,
    );
  }

  /** Takes no more jobs (telling the decode gateways), and waits for those running. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    for (const sub of this.#subs) sub.unsubscribe();
    this.#report(true);
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
  /** Cancelled: no request waited for it any more. */
  cancelled: number;
  /** Jobs waiting for their answer now. */
  pending: number;
  /** Blocks prefill gateways wrote for this gateway's jobs (as they answered). */
  sharedBlocks: number;
  /** Prefill gateways whose load this gateway knows (jobs go to the least loaded). */
  workers: number;
}

export interface PrefillClientOptions {
  readonly nc: NatsConnection;
  /** The jobs' queue subject (prefillSubjects). */
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
  readonly #subjects: ReturnType<typeof prefillSubjects>;
  readonly #stats = {
    done: 0,
    noWorkers: 0,
    timeout: 0,
    failed: 0,
    cancelled: 0,
    pending: 0,
    sharedBlocks: 0,
  };
  /** Prefill gateways by id, from their load reports. */
  readonly #workers = new Map<string, KnownPrefillWorker>();
  /** Jobs sent to a named prefill gateway, not yet answered. */
  readonly #sent = new Set<SentPrefillJob>();
  readonly #loads: Subscription;
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
    this.#subjects = prefillSubjects(o.subject);
    this.#loads = o.nc.subscribe(this.#subjects.load, {
      callback: (err, msg) => {
        const load = err ? null : decodePrefillLoad(msg.data);
        if (!load) return;
        if (load.gone) this.#workers.delete(load.id);
        else this.#workers.set(load.id, { ...load, seenAt: performance.now() });
      },
    });
  }

  get stats(): PrefillClientStats {
    const now = performance.now();
    let workers = 0;
    for (const w of this.#workers.values()) if (now - w.seenAt <= LOAD_STALE_MS) workers++;
    return { ...this.#stats, workers };
  }

  /** Stops following the prefill gateways' load (jobs in flight go on). */
  close(): void {
    this.#loads.unsubscribe();
  }

  async prefill(job: PrefillJob, signal: AbortSignal): Promise<void> {
    const s = this.#stats;
    // The span of the request this job is for (tracing.ts): read now, while startJob runs.
    const span = requestTraces.getStore()?.span ?? null;
    const t0 = performance.now();
    const outcome = (what: "done" | "noWorkers" | "timeout" | "failed" | "cancelled") => {
      s[what]++;
      // The outcome as the metric's label names it (expertmesh_gateway_prefill_remote_total).
      span?.addEvent("prefill_remote", {
        "expertmesh.prefill.outcome": what === "noWorkers" ? "no_workers" : what,
        "expertmesh.prefill.ms": Math.round(performance.now() - t0),
      });
    };
    const id = randomBytes(12).toString("base64url");
    const frame = encodePrefillJob({ ...job, id, fingerprint: this.#o.store.fingerprint });
    const cancel = () => {
      if (!this.#o.nc.isClosed()) this.#o.nc.publish(this.#subjects.cancel, JSON.stringify({ id }));
    };
    const aborted = new Promise<"aborted">((resolve) => {
      if (signal.aborted) resolve("aborted");
      else signal.addEventListener("abort", () => resolve("aborted"), { once: true });
    });
    s.pending++;
    try {
      const worker = pickPrefillWorker(this.#workers.values(), this.#sent, performance.now());
      const sent: SentPrefillJob | null =
        worker === null ? null : { worker, tokens: job.prompt.length, sentAt: performance.now() };
      let answer: Msg | "aborted";
      if (sent) this.#sent.add(sent);
      try {
        answer = await Promise.race([this.#ask(frame, sent, span), aborted]);
      } finally {
        if (sent) this.#sent.delete(sent);
      }
      if (answer === "aborted") {
        outcome("cancelled");
        cancel();
        return;
      }
      const a = decodePrefillAnswer(answer.data);
      if (!a.ok) {
        outcome("failed");
        this.#note(`refused (${a.code}: ${a.message})`);
        return;
      }
      s.sharedBlocks += a.shared;
      const seen = await Promise.race([
        this.#o.store.whenKnown(job.hashes.slice(0, a.shared), WATCH_WAIT_MS),
        aborted,
      ]);
      if (seen === "aborted") {
        outcome("cancelled");
        return;
      }
      if (!seen) {
        outcome("failed");
        this.#note(`its blocks not seen in the bucket within ${WATCH_WAIT_MS} ms`);
        return;
      }
      outcome("done");
      this.#note("ok");
    } catch (e) {
      const name = (e as Error).name;
      const noWorkers = isNoResponders(e);
      if (noWorkers) outcome("noWorkers");
      else if (name === "TimeoutError") {
        outcome("timeout");
        // This gateway computes the prompt now: the prefill gateway need not.
        cancel();
      } else outcome("failed");
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

  /**
   * Sends the job to `sent`'s prefill gateway, or to the queue group without one. A named
   * gateway that is gone (no responders) is forgotten, and the job goes to the queue group.
   */
  async #ask(frame: Uint8Array, sent: SentPrefillJob | null, span: Span | null): Promise<Msg> {
    const opts: { timeout: number; headers?: ReturnType<typeof headers> } = {
      timeout: this.#o.timeoutMs,
    };
    if (span) {
      // The prefill gateway's span joins the request's trace.
      opts.headers = headers();
      for (const [k, v] of Object.entries(traceHeaders(span))) opts.headers.set(k, v);
    }
    if (sent) {
      try {
        return await this.#o.nc.request(this.#subjects.to(sent.worker), frame, opts);
      } catch (e) {
        if (!isNoResponders(e)) throw e;
        this.#workers.delete(sent.worker);
      }
    }
    return await this.#o.nc.request(this.#subjects.jobs, frame, opts);
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
