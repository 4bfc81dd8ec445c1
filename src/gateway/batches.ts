// OpenAI's Batch API (ADR 0049): POST /v1/batches names an uploaded JSONL file (files.ts) of
// requests to one endpoint (/v1/chat/completions, /v1/completions, /v1/responses, or
// /v1/messages: Anthropic's Message Batches, message-batches.ts, are batches too), each line
// {"custom_id", "method": "POST", "url", "body"}; the gateway checks every line (validating),
// then runs them through its own routes (in_progress), a few at a time (--batch-concurrency,
// at the back of the queue: priority BATCH_PRIORITY on a gateway that schedules by priority;
// an answer 429 or 503 runs again later), and writes each answer as a line of an output file
// (2xx) or an error file (finalizing, completed). GET /v1/batches/{id} shows the status and
// counts, POST .../cancel stops it (cancelling, cancelled: the lines done so far are in its
// files), and a batch not done within its 24 hours expires (the lines left go to the error
// file as batch_expired).
//
// Everything a batch is lives in the files folder: batches/<id>.json (the object, written by
// the gateway that runs it), its answers as they come (<id>.output.jsonl, <id>.errors.jsonl),
// a lease (<id>.lease: which gateway runs it, renewed every few seconds) and a cancel mark
// (<id>.cancel, from any gateway). Every gateway on the folder answers for every batch, and
// looks for unfinished batches whose lease ran out (a gateway that stopped or died; a
// restarted one finds its own): it takes the lease and goes on where the answers end, running
// again only lines with no answer written. A line may so run twice (its first answer is kept),
// never be lost.
import { randomBytes } from "node:crypto";
import {
  closeSync,
  copyFileSync,
  existsSync,
  linkSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { makeDirs } from "../util/fs.ts";
import { ApiError } from "./errors.ts";
import {
  expiresAfter,
  type FileStore,
  filesOff,
  listPage,
  madeAt,
  queryInt,
  readJson,
  writeJson,
} from "./files.ts";

/** The endpoints a batch's lines may name. */
export const BATCH_ENDPOINTS = [
  "/v1/chat/completions",
  "/v1/completions",
  "/v1/responses",
  "/v1/messages",
] as const;
export type BatchEndpoint = (typeof BATCH_ENDPOINTS)[number];

/** Most lines in one batch (OpenAI's limit). */
export const MAX_BATCH_LINES = 50_000;
/** Most errors a failed validation lists. */
const MAX_ERRORS = 100;
/** The completion window (OpenAI's only one). */
const WINDOW_S = 24 * 3600;
/**
 * A line's priority on a gateway that schedules by priority (lower runs first), unless the
 * line sets its own: behind the interactive requests (priority 0).
 */
export const BATCH_PRIORITY = 1000;

export type BatchStatus =
  | "validating"
  | "failed"
  | "in_progress"
  | "finalizing"
  | "completed"
  | "expired"
  | "cancelling"
  | "cancelled";

export interface BatchError {
  code: string;
  message: string;
  param: string | null;
  line: number | null;
}

/** A batch as OpenAI's API describes it. */
export interface BatchObject {
  id: string;
  object: "batch";
  endpoint: BatchEndpoint;
  errors: { object: "list"; data: BatchError[] } | null;
  input_file_id: string;
  completion_window: "24h";
  status: BatchStatus;
  output_file_id: string | null;
  error_file_id: string | null;
  created_at: number;
  in_progress_at: number | null;
  expires_at: number;
  finalizing_at: number | null;
  completed_at: number | null;
  failed_at: number | null;
  expired_at: number | null;
  cancelling_at: number | null;
  cancelled_at: number | null;
  request_counts: { total: number; completed: number; failed: number };
  metadata: Record<string, string> | null;
  /** The model the lines name (the first's; null until validated). */
  model: string | null;
  /** The tokens of the lines answered 2xx so far. */
  usage: BatchUsage;
}

/** OpenAI's batch usage: the answers' usage summed. */
export interface BatchUsage {
  input_tokens: number;
  input_tokens_details: { cached_tokens: number };
  output_tokens: number;
  output_tokens_details: { reasoning_tokens: number };
  total_tokens: number;
}

export const noUsage = (): BatchUsage => ({
  input_tokens: 0,
  input_tokens_details: { cached_tokens: 0 },
  output_tokens: 0,
  output_tokens_details: { reasoning_tokens: 0 },
  total_tokens: 0,
});

/**
 * Adds the `usage` of an answer's body to `sum`: chat and completions' (prompt_tokens, ...),
 * the Responses API's (input_tokens, input_tokens_details, ...) or Anthropic's (input_tokens
 * without the cached ones, cache_read_input_tokens, ...); a body without one adds nothing.
 */
export function addUsage(sum: BatchUsage, body: unknown): void {
  const u = (body as { usage?: unknown } | null)?.usage;
  if (typeof u !== "object" || u === null) return;
  const r = u as Record<string, unknown>;
  const n = (v: unknown) => (typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : 0);
  const sub = (o: unknown, k: string) => n((o as Record<string, unknown> | null)?.[k]);
  let input: number;
  let cached: number;
  let output: number;
  let reasoning: number;
  if ("prompt_tokens" in r) {
    input = n(r["prompt_tokens"]);
    cached = sub(r["prompt_tokens_details"], "cached_tokens");
    output = n(r["completion_tokens"]);
    reasoning = sub(r["completion_tokens_details"], "reasoning_tokens");
  } else {
    const read = n(r["cache_read_input_tokens"]);
    input = n(r["input_tokens"]) + read + n(r["cache_creation_input_tokens"]);
    cached = read + sub(r["input_tokens_details"], "cached_tokens");
    output = n(r["output_tokens"]);
    reasoning = sub(r["output_tokens_details"], "reasoning_tokens");
  }
  sum.input_tokens += input;
  sum.input_tokens_details.cached_tokens += cached;
  sum.output_tokens += output;
  sum.output_tokens_details.reasoning_tokens += reasoning;
  sum.total_tokens += input + output;
}

/** One request of a batch's input. */
export interface BatchLine {
  custom_id: string;
  body: Record<string, unknown>;
}

/**
 * A batch's input file checked line by line (empty lines skipped; numbers count from 1):
 * its requests, or why it fails (up to MAX_ERRORS errors).
 */
export function parseBatchInput(
  text: string,
  endpoint: BatchEndpoint,
): { lines: BatchLine[] } | { errors: BatchError[] } {
  const lines: BatchLine[] = [];
  const errors: BatchError[] = [];
  const ids = new Set<string>();
  const rows = text.split("\n");
  const fail = (line: number, code: string, message: string, param: string | null = null) => {
    if (errors.length < MAX_ERRORS) errors.push({ code, message, param, line });
  };
  for (let i = 0; i < rows.length; i++) {
    const row = rows[i]!.trim();
    if (row === "") continue;
    const n = i + 1;
    let v: unknown;
    try {
      v = JSON.parse(row);
    } catch {
      fail(n, "invalid_json_line", `line ${n} is not JSON`);
      continue;
    }
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      fail(n, "invalid_json_line", `line ${n} is not a JSON object`);
      continue;
    }
    const o = v as Record<string, unknown>;
    const id = o["custom_id"];
    if (typeof id !== "string" || id === "" || id.length > 512) {
      fail(
        n,
        "missing_required_parameter",
        `line ${n}: custom_id must be a string of 1 to 512 characters`,
        "custom_id",
      );
      continue;
    }
    if (ids.has(id)) {
      fail(
        n,
        "duplicate_custom_id",
        `line ${n}: custom_id '${id.slice(0, 80)}' is on an earlier line too`,
        "custom_id",
      );
      continue;
    }
    ids.add(id);
    if (o["method"] !== "POST") {
      fail(n, "invalid_method", `line ${n}: method must be "POST"`, "method");
      continue;
    }
    if (o["url"] !== endpoint) {
      fail(n, "invalid_url", `line ${n}: url must be the batch's endpoint, "${endpoint}"`, "url");
      continue;
    }
    const body = o["body"];
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      fail(
        n,
        "missing_required_parameter",
        `line ${n}: body must be an object (the request)`,
        "body",
      );
      continue;
    }
    const b = body as Record<string, unknown>;
    if (b["stream"] === true) {
      fail(
        n,
        "invalid_request",
        `line ${n}: a batch's requests cannot stream (body.stream)`,
        "body.stream",
      );
      continue;
    }
    if (b["background"] === true) {
      fail(
        n,
        "invalid_request",
        `line ${n}: a batch's requests are answered in the batch, not in the background (body.background)`,
        "body.background",
      );
      continue;
    }
    lines.push({ custom_id: id, body: b });
  }
  if (errors.length === 0 && lines.length === 0)
    fail(0, "empty_file", "the input file holds no request");
  if (lines.length > MAX_BATCH_LINES)
    fail(
      0,
      "too_many_requests",
      `the input file holds ${lines.length} requests; a batch takes at most ${MAX_BATCH_LINES}`,
    );
  return errors.length > 0
    ? { errors: errors.map((e) => (e.line === 0 ? { ...e, line: null } : e)) }
    : { lines };
}

/** What a line's request came back as. */
export interface LineAnswer {
  status: number;
  requestId: string;
  body: unknown;
}

/** Runs one request through the gateway's routes (app.inject, in app.ts). */
export type RunLine = (url: BatchEndpoint, body: Record<string, unknown>) => Promise<LineAnswer>;

/** A batch this gateway runs (holds the lease of). */
interface Held extends Saved {
  /** The requests, once validated. */
  lines: BatchLine[] | null;
  /** custom_ids whose answer is written. */
  done: Set<string>;
  /** The next line to look at. */
  next: number;
  inflight: number;
  /** Lines to run again (answered 429 or 503), once their wait is over. */
  again: BatchLine[];
  /** Lines waiting to run again. */
  waiting: number;
  /** Counts or status changed since the object was last written. */
  dirty: boolean;
  /** Another gateway took the lease (this one was too slow to renew it): nothing more starts. */
  lost: boolean;
}

/** batches/<id>.json. */
interface Saved {
  batch: BatchObject;
  owner: string;
  ms: number;
  /** The output and error files expire this long after they are made (null, absent: never). */
  outputTtlS?: number | null;
}

/** batches/<id>.lease: the gateway that runs the batch, and when it last said so. */
interface Lease {
  holder: string;
  host: string;
  pid: number;
  at: number;
}

/** The Batches of this process (their leases are not a dead process's). */
const LIVE = new Set<string>();

/** Whether process `pid` of this host runs. */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

const BATCH_ID = /^batch_[0-9a-f]{24}$/;
const now = () => Math.floor(Date.now() / 1000);
const UNFINISHED = new Set<BatchStatus>(["validating", "in_progress", "cancelling", "finalizing"]);

/**
 * Answers that say "later" (the admission queue full, the shards unreachable: 429, 503): the
 * line runs again after a wait (1 s, doubling, at most MAX_WAIT_MS) until the batch expires.
 */
const LATER = new Set([429, 503]);
const MAX_WAIT_MS = 30_000;

export interface BatchesOptions {
  /** The files folder (batches/ is made in it). */
  dir: string;
  files: FileStore;
  run: RunLine;
  /** Lines in flight at once, over every batch this gateway runs. */
  concurrency: number;
  /** A lease not renewed for this long is taken over (default 30 s; renewed every sixth). */
  leaseMs?: number;
  /** How often the folder is looked at for batches to take over (default 5 s). */
  scanMs?: number;
  log?: (line: string) => void;
}

export class Batches {
  readonly #o: BatchesOptions;
  readonly #dir: string;
  readonly #leaseMs: number;
  /** This gateway, in the leases it holds. */
  readonly #me = randomBytes(8).toString("hex");
  readonly #host = hostname();
  readonly #held = new Map<string, Held>();
  /** Batches seen done (their objects never change again): not read again by #scan. */
  readonly #final = new Set<string>();
  #inflight = 0;
  #closed = false;
  /** How often each line was answered "later" (LATER). */
  readonly #tries = new WeakMap<BatchLine, number>();
  readonly #timers: NodeJS.Timeout[] = [];
  #renewedAt = 0;
  /** No line starts: the files folder is full (FolderQuota); looked at again every second. */
  #roomWait = false;

  /** Starts looking after the folder's batches (now, then every scanMs). */
  constructor(o: BatchesOptions) {
    this.#o = o;
    this.#dir = join(o.dir, "batches");
    this.#leaseMs = o.leaseMs ?? 30_000;
    makeDirs(this.#dir);
    LIVE.add(this.#me);
    const tick = setInterval(
      () => this.#safely("the lease renewal", () => this.#tick()),
      Math.min(1000, this.#leaseMs / 6),
    );
    const scan = setInterval(
      () => this.#safely("a look for batches", () => this.#scan()),
      o.scanMs ?? 5000,
    );
    tick.unref();
    scan.unref();
    this.#timers.push(tick, scan);
    setImmediate(() => this.#safely("a look for batches", () => this.#scan()));
  }

  /** A new batch of `owner`'s (validated next, then run here). */
  create(
    owner: string,
    req: {
      input_file_id: string;
      endpoint: string;
      completion_window: string;
      metadata?: Record<string, string> | null;
      /** Seconds the output and error files live (OpenAI's output_expires_after). */
      outputTtlS?: number;
    },
  ): BatchObject {
    if (this.#closed)
      throw new ApiError("EM_GATEWAY_STARTING", "the gateway is stopping", { status: 503 });
    const quota = this.#o.files.quota;
    if (quota?.full()) throw quota.refusal("no batch starts");
    if (!(BATCH_ENDPOINTS as readonly string[]).includes(req.endpoint))
      throw new ApiError(
        "EM_GATEWAY_BAD_REQUEST",
        `endpoint ${JSON.stringify(req.endpoint).slice(0, 80)} is not one a batch runs here: ${BATCH_ENDPOINTS.join(", ")}`,
        { param: "endpoint" },
      );
    if (req.completion_window !== "24h")
      throw new ApiError("EM_GATEWAY_BAD_REQUEST", `completion_window must be "24h"`, {
        param: "completion_window",
      });
    const file = this.#o.files.get(owner, req.input_file_id, "input_file_id");
    if (file.purpose !== "batch")
      throw new ApiError(
        "EM_GATEWAY_BAD_REQUEST",
        `file ${file.id} has purpose '${file.purpose}'; a batch's input is a file uploaded with purpose 'batch'`,
        { param: "input_file_id" },
      );
    const ms = madeAt();
    const t = Math.floor(ms / 1000);
    const batch: BatchObject = {
      id: `batch_${randomBytes(12).toString("hex")}`,
      object: "batch",
      endpoint: req.endpoint as BatchEndpoint,
      errors: null,
      input_file_id: file.id,
      completion_window: "24h",
      status: "validating",
      output_file_id: null,
      error_file_id: null,
      created_at: t,
      in_progress_at: null,
      expires_at: t + WINDOW_S,
      finalizing_at: null,
      completed_at: null,
      failed_at: null,
      expired_at: null,
      cancelling_at: null,
      cancelled_at: null,
      request_counts: { total: 0, completed: 0, failed: 0 },
      metadata: req.metadata ?? null,
      model: null,
      usage: noUsage(),
    };
    // The batch's own link to its input: the file may expire or be deleted, the batch runs on.
    try {
      linkOrCopy(this.#o.files.path(file.id), this.#path(batch.id, "input"));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      throw new ApiError("EM_GATEWAY_FILE_NOT_FOUND", `no file '${file.id}' here`, {
        param: "input_file_id",
      }); // (deleted meanwhile)
    }
    // The lease first: no other gateway takes a batch it sees before this one runs it.
    if (!this.#take(batch.id)) throw new Error(`the lease of a new batch ${batch.id} is taken`);
    const h = this.#hold({ batch, owner, ms, outputTtlS: req.outputTtlS ?? null });
    this.#save(h);
    this.#run(h);
    return structuredClone(batch);
  }

  /** `owner`'s batch `id` (404 when it has none such). */
  get(owner: string, id: string): BatchObject {
    return this.#view(this.#find(owner, id));
  }

  /** `owner`'s batches, newest first. */
  list(owner: string): BatchObject[] {
    return readdirSync(this.#dir)
      .filter((n) => n.endsWith(".json"))
      .map((n) => this.#load(n.slice(0, -5)))
      .filter((s): s is Saved => s !== undefined && s.owner === owner)
      .sort((a, b) => b.ms - a.ms || (a.batch.id < b.batch.id ? 1 : -1))
      .map((s) => this.#view(s));
  }

  /**
   * Stops `owner`'s batch `id`: a cancel mark that the gateway running it reads (at once here,
   * within a second elsewhere); no more of its lines start, those running finish.
   */
  cancel(owner: string, id: string): BatchObject {
    const s = this.#find(owner, id);
    const status = s.batch.status;
    if (status === "validating" || status === "in_progress") {
      const mark = join(this.#dir, `${id}.cancel`);
      if (readJson<{ at: number }>(mark) === undefined) writeJson(mark, { at: now() });
      const h = this.#held.get(id);
      if (h) this.#cancelled(h);
    } else if (status !== "cancelling" && status !== "cancelled")
      throw new ApiError(
        "EM_GATEWAY_BATCH_STATE",
        `batch ${id} is ${status}: only a validating or in_progress batch can be cancelled`,
      );
    return this.get(owner, id);
  }

  /**
   * Removes `owner`'s batch `id` and its files (input, output, errors): one that is done only
   * (Anthropic's Message Batches can be deleted; OpenAI's cannot).
   */
  delete(owner: string, id: string): void {
    const s = this.#find(owner, id);
    const status = s.batch.status;
    if (UNFINISHED.has(status))
      throw new ApiError(
        "EM_GATEWAY_BATCH_STATE",
        `batch ${id} is ${status}: only a batch that has ended can be deleted (cancel it first)`,
      );
    for (const file of [s.batch.input_file_id, s.batch.output_file_id, s.batch.error_file_id])
      if (file !== null)
        try {
          this.#o.files.delete(owner, file);
        } catch {
          // (deleted before)
        }
    this.#final.delete(id);
    for (const kind of ["json", "cancel", "lease", "input", "output", "errors"] as const)
      rmSync(this.#path(id, kind), { force: true });
  }

  /**
   * Starts no more lines (the gateway stops) and gives up the leases, so that another gateway
   * on the folder (or this one, started again) goes on with them; answers that still come
   * before the process ends are written.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    LIVE.delete(this.#me);
    for (const t of this.#timers) clearInterval(t);
    for (const h of this.#held.values()) {
      if (h.dirty) this.#save(h);
      this.#release(h.batch.id);
    }
  }

  /** Lines running now, over every batch this gateway runs. */
  get inflight(): number {
    return this.#inflight;
  }

  /** Lines answered here since start, by outcome (metrics.ts addBatches). */
  readonly answered = { completed: 0, failed: 0, retried: 0 };

  #path(id: string, kind: "json" | "lease" | "cancel" | "input" | "output" | "errors"): string {
    return join(
      this.#dir,
      kind === "output" || kind === "errors" ? `${id}.${kind}.jsonl` : `${id}.${kind}`,
    );
  }

  #load(id: string): Saved | undefined {
    if (!BATCH_ID.test(id)) return undefined;
    const held = this.#held.get(id);
    if (held) return saved(held);
    const s = readJson<Saved>(this.#path(id, "json"));
    return s?.batch?.id === id ? s : undefined;
  }

  #find(owner: string, id: string): Saved {
    const s = this.#load(id);
    if (!s || s.owner !== owner)
      throw new ApiError("EM_GATEWAY_BATCH_NOT_FOUND", `no batch '${id.slice(0, 80)}' here`, {
        param: "batch_id",
      });
    return s;
  }

  /** The batch as a client sees it: cancelling once it is marked, whoever runs it. */
  #view(s: Saved): BatchObject {
    const b = structuredClone(s.batch);
    // (a batch saved before batches had them)
    b.model ??= null;
    b.usage ??= noUsage();
    if (b.status === "validating" || b.status === "in_progress") {
      const mark = readJson<{ at: number }>(this.#path(b.id, "cancel"));
      if (mark) {
        b.status = "cancelling";
        b.cancelling_at = mark.at;
      }
    }
    return b;
  }

  #save(h: Held): void {
    h.dirty = false;
    writeJson(this.#path(h.batch.id, "json"), saved(h));
  }

  /** Takes the lease of batch `id` when no gateway holds it, or its holder let it run out. */
  #take(id: string): boolean {
    const path = this.#path(id, "lease");
    const lease = readJson<Lease>(path);
    if (lease !== undefined && !this.#stale(lease)) return false;
    if (lease !== undefined) {
      // Out of date: moved away by one gateway alone (the others' renames find nothing).
      const stale = `${path}.${this.#me}.stale`;
      try {
        renameSync(path, stale);
        rmSync(stale, { force: true });
      } catch {
        // (another gateway moved it first)
      }
    }
    const mine = `${path}.${this.#me}.tmp`;
    writeFileSync(mine, JSON.stringify(this.#lease()));
    try {
      linkSync(mine, path); // fails when the lease is there: one gateway gets it
      return true;
    } catch {
      return false;
    } finally {
      rmSync(mine, { force: true });
    }
  }

  #lease(): Lease {
    return { holder: this.#me, host: this.#host, pid: process.pid, at: Date.now() };
  }

  /**
   * Whether a lease may be taken: not renewed for leaseMs, or its gateway's process is gone
   * (one of this host: a restarted container, a killed `up` gateway, go on at once).
   */
  #stale(lease: Lease): boolean {
    if (Date.now() - lease.at >= this.#leaseMs) return true;
    if (lease.host !== this.#host) return false;
    return lease.pid === process.pid ? !LIVE.has(lease.holder) : !alive(lease.pid);
  }

  /** Renews the leases held; a batch whose lease another gateway took stops here. */
  #renew(): void {
    for (const h of this.#held.values()) {
      const id = h.batch.id;
      const lease = readJson<Lease>(this.#path(id, "lease"));
      if (lease !== undefined && lease.holder !== this.#me) {
        this.#o.log?.(
          `batch ${id}: another gateway runs it now (its lease was not renewed in time)`,
        );
        h.lost = true;
        this.#held.delete(id);
        continue;
      }
      writeJson(this.#path(id, "lease"), this.#lease());
    }
  }

  #release(id: string): void {
    const path = this.#path(id, "lease");
    if (readJson<Lease>(path)?.holder === this.#me) rmSync(path, { force: true });
  }

  #hold(s: Saved): Held {
    const h: Held = {
      ...s,
      lines: null,
      done: new Set(),
      next: 0,
      inflight: 0,
      again: [],
      waiting: 0,
      dirty: false,
      lost: false,
    };
    this.#held.set(s.batch.id, h);
    return h;
  }

  /** Every second: leases renewed, counts written, cancel marks read. */
  #tick(): void {
    if (this.#closed) return;
    if (Date.now() - this.#renewedAt >= this.#leaseMs / 6) {
      this.#renewedAt = Date.now();
      this.#renew();
    }
    for (const h of this.#held.values()) {
      const s = h.batch.status;
      if (
        (s === "validating" || s === "in_progress") &&
        existsSync(this.#path(h.batch.id, "cancel"))
      )
        this.#cancelled(h);
      if (h.dirty) this.#save(h);
    }
    if (this.#roomWait) this.#pump();
  }

  /** Takes over the folder's unfinished batches that no gateway runs. */
  #scan(): void {
    if (this.#closed) return;
    let taken = 0;
    for (const name of readdirSync(this.#dir)) {
      if (!name.endsWith(".json")) continue;
      const id = name.slice(0, -5);
      if (this.#held.has(id) || this.#final.has(id)) continue;
      const s = this.#load(id);
      if (s && !UNFINISHED.has(s.batch.status)) {
        this.#final.add(id);
        rmSync(this.#path(id, "input"), { force: true }); // (a stop at the end of #finish)
      }
      if (!s || !UNFINISHED.has(s.batch.status) || !this.#take(id)) continue;
      // (read again under the lease: its last holder may have written it since)
      const h = this.#hold(this.#load(id) ?? s);
      taken++;
      if (h.batch.status === "validating" || h.batch.status === "in_progress") this.#run(h);
      else this.#safely(`batch ${id}`, () => this.#finish(h));
    }
    if (taken > 0) this.#o.log?.(`batches: ${taken} unfinished in ${this.#o.dir} go on here`);
  }

  /** The cancel mark read: no more lines start; done once those running are. */
  #cancelled(h: Held): void {
    const mark = readJson<{ at: number }>(this.#path(h.batch.id, "cancel"));
    h.batch.status = "cancelling";
    h.batch.cancelling_at = mark?.at ?? now();
    this.#save(h);
    if (h.inflight === 0) this.#finish(h);
  }

  /** Reads and checks the input (again, when taken over), then runs it. */
  async #validate(h: Held): Promise<void> {
    await new Promise((r) => setImmediate(r)); // (the create's answer goes first)
    const b = h.batch;
    let text: string;
    try {
      // (a batch made before batches kept their input: the file itself)
      const own = this.#path(b.id, "input");
      text = readFileSync(existsSync(own) ? own : this.#o.files.path(b.input_file_id), "utf8");
    } catch {
      return this.#fail(h, [
        {
          code: "file_not_found",
          message: `the input file ${b.input_file_id} was deleted before the batch ran`,
          param: "input_file_id",
          line: null,
        },
      ]);
    }
    const parsed = parseBatchInput(text, b.endpoint);
    if (b.status !== "validating" && b.status !== "in_progress") return; // (cancelled meanwhile)
    if ("errors" in parsed) return this.#fail(h, parsed.errors);
    h.lines = parsed.lines;
    const model = parsed.lines[0]?.body["model"];
    b.model = typeof model === "string" ? model.slice(0, 256) : null;
    // The answers written before (by a gateway that stopped; a line it cut short is dropped).
    const { completed, failed } = this.#written(h);
    b.request_counts = { total: parsed.lines.length, completed, failed };
    if (b.status === "validating") {
      b.status = "in_progress";
      b.in_progress_at = now();
    }
    this.#save(h);
    this.#pump();
  }

  /**
   * The answers in `h`'s files so far (a cut last line removed): marks their lines done, sums
   * their usage into the batch's.
   */
  #written(h: Held): { completed: number; failed: number } {
    const counts = { completed: 0, failed: 0 };
    h.batch.usage = noUsage();
    for (const kind of ["output", "errors"] as const) {
      const path = this.#path(h.batch.id, kind);
      if (!existsSync(path)) continue;
      const text = readFileSync(path, "utf8");
      const end = text.lastIndexOf("\n") + 1;
      if (end < text.length) truncateSync(path, Buffer.byteLength(text.slice(0, end)));
      for (const l of text.slice(0, end).split("\n")) {
        const a = parseAnswer(l);
        // (a damaged line: the request runs again)
        if (a === null || h.done.has(a.custom_id)) continue;
        h.done.add(a.custom_id);
        counts[kind === "output" ? "completed" : "failed"]++;
        if (kind === "output") addUsage(h.batch.usage, a.response?.body);
      }
    }
    return counts;
  }

  #fail(h: Held, errors: BatchError[]): void {
    h.batch.status = "failed";
    h.batch.failed_at = now();
    h.batch.errors = { object: "list", data: errors };
    this.#save(h);
    this.#let(h);
  }

  /** Starts lines, oldest batch first, while fewer than `concurrency` run. */
  #pump(): void {
    if (this.#closed) return;
    // A full folder (FolderQuota): no line starts; those done still finish their batch.
    const quota = this.#o.files.quota;
    const full = this.#held.size > 0 && quota !== null && quota.full();
    if (full && !this.#roomWait)
      this.#o.log?.(
        `batches: the files folder is full (${quota.used()} of ${quota.maxBytes} bytes): lines wait until files are deleted or expire`,
      );
    this.#roomWait = full;
    for (const h of this.#held.values()) {
      if (h.batch.status !== "in_progress" || h.lines === null) continue;
      if (h.batch.expired_at === null && now() >= h.batch.expires_at) this.#expire(h);
      while (!full && this.#inflight < this.#o.concurrency) {
        const line = h.again.shift() ?? (h.next < h.lines.length ? h.lines[h.next++] : undefined);
        if (line === undefined) break;
        if (h.done.has(line.custom_id)) continue;
        this.#start(h, line);
      }
      if (h.next >= h.lines.length && h.inflight === 0 && h.waiting === 0 && h.again.length === 0)
        this.#finish(h);
    }
  }

  #start(h: Held, line: BatchLine): void {
    this.#inflight++;
    h.inflight++;
    const written = (answer: object, ok: boolean) => {
      if (h.done.has(line.custom_id)) return;
      h.done.add(line.custom_id);
      const bytes = append(this.#path(h.batch.id, ok ? "output" : "errors"), answer);
      this.#o.files.quota?.grew(bytes); // (apart: inside ?.() the append would not run without a quota)
      h.batch.request_counts[ok ? "completed" : "failed"]++;
      if (ok) addUsage(h.batch.usage, (answer as { response: { body: unknown } }).response.body);
      this.answered[ok ? "completed" : "failed"]++;
      h.dirty = true;
    };
    const id = `batch_req_${randomBytes(12).toString("hex")}`;
    this.#o
      .run(h.batch.endpoint, line.body)
      .then(
        (r) => {
          // An answer cut by the stop: the line runs again wherever the batch goes on.
          if (this.#closed && r.status >= 500) return;
          if (
            LATER.has(r.status) &&
            h.batch.status === "in_progress" &&
            h.batch.expired_at === null
          )
            return this.#later(h, line);
          written(
            {
              id,
              custom_id: line.custom_id,
              response: { status_code: r.status, request_id: r.requestId, body: r.body },
              error: null,
            },
            r.status >= 200 && r.status < 300,
          );
        },
        (err) => {
          if (this.#closed) return; // (not run: it runs again wherever the batch goes on)
          written(
            {
              id,
              custom_id: line.custom_id,
              response: null,
              error: { code: "internal_error", message: String(err).slice(0, 500) },
            },
            false,
          );
        },
      )
      .catch((err) => this.#o.log?.(`batch ${h.batch.id}: an answer not written: ${String(err)}`))
      .finally(() => {
        this.#inflight--;
        h.inflight--;
        if (this.#closed || h.lost) return;
        this.#safely(`batch ${h.batch.id}`, () => {
          if (h.batch.status === "cancelling" && h.inflight === 0) this.#finish(h);
          this.#pump();
        });
      });
  }

  /**
   * Runs `fn` where nothing would catch what it throws (timers, a promise's end): a failure
   * of the folder (a full disk, a file another process damaged) is logged, and the gateway
   * serves on; a batch it stopped midway is taken up again by the next look (its lease runs
   * out, or a restart).
   */
  #safely(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.#o.log?.(`batches: ${what} failed: ${String(err).slice(0, 500)}`);
    }
  }

  /** Validates then runs `h` (its failures: #fail, the batch failed with the error). */
  #run(h: Held): void {
    this.#validate(h).catch((err) => {
      this.#o.log?.(`batch ${h.batch.id}: ${String(err).slice(0, 500)}`);
      this.#safely(`batch ${h.batch.id}`, () =>
        this.#fail(h, [
          { code: "internal_error", message: String(err).slice(0, 500), param: null, line: null },
        ]),
      );
    });
  }

  /** Runs `line` again after a wait that doubles with each "later" it got. */
  #later(h: Held, line: BatchLine): void {
    this.answered.retried++;
    const tries = (this.#tries.get(line) ?? 0) + 1;
    this.#tries.set(line, tries);
    h.waiting++;
    const t = setTimeout(
      () => {
        h.waiting--;
        if (this.#closed || h.lost) return;
        // (cancelled meanwhile: dropped; expired: #expire answered it)
        if (h.batch.status === "in_progress") h.again.push(line);
        this.#safely(`batch ${h.batch.id}`, () => this.#pump());
      },
      Math.min(MAX_WAIT_MS, 1000 * 2 ** (tries - 1)),
    );
    t.unref();
  }

  /** The lines not run by expires_at go to the error file as batch_expired. */
  #expire(h: Held): void {
    for (const line of h.lines ?? []) {
      if (h.done.has(line.custom_id)) continue;
      h.done.add(line.custom_id);
      append(this.#path(h.batch.id, "errors"), {
        id: `batch_req_${randomBytes(12).toString("hex")}`,
        custom_id: line.custom_id,
        response: null,
        error: {
          code: "batch_expired",
          message: "This request could not be executed before the completion window expired.",
        },
      });
      h.batch.request_counts.failed++;
    }
    h.next = h.lines?.length ?? 0; // (no line starts; those running finish, then #finish)
    h.batch.expired_at = now();
    this.#save(h);
  }

  /**
   * Done running (every line, cancelled or expired): its answers become files (output,
   * errors; none where no line went there; a line answered twice, by two gateways, keeps its
   * first answer), and its status the last.
   */
  #finish(h: Held): void {
    const b = h.batch;
    const last: BatchStatus =
      b.expired_at !== null ? "expired" : b.status === "cancelling" ? "cancelled" : "completed";
    if (b.status === "in_progress") {
      b.status = "finalizing";
      b.finalizing_at = now();
      this.#save(h);
    }
    // Each kind: the answers deduplicated into a file of the store, whose id the object
    // names before the answers' own file goes (a stop in between: done again, the same way).
    const seen = new Set<string>();
    const counts = { completed: 0, failed: 0 };
    const usage = noUsage();
    const answers = (text: string, kind: "output" | "errors") =>
      text
        .slice(0, text.lastIndexOf("\n") + 1)
        .split("\n")
        .filter((l) => {
          const a = parseAnswer(l); // (a damaged line is dropped)
          if (a === null || seen.has(a.custom_id)) return false;
          seen.add(a.custom_id);
          if (kind === "output") addUsage(usage, a.response?.body);
          return true;
        });
    for (const kind of ["output", "errors"] as const) {
      const path = this.#path(b.id, kind);
      const count = kind === "output" ? "completed" : "failed";
      const made = kind === "output" ? b.output_file_id : b.error_file_id;
      if (made !== null) {
        counts[count] = answers(readFileSync(this.#o.files.path(made), "utf8"), kind).length;
        rmSync(path, { force: true });
        continue;
      }
      if (!existsSync(path)) continue;
      const text = readFileSync(path, "utf8");
      const kept = answers(text, kind);
      counts[count] = kept.length;
      if (kept.length > 0) {
        const whole = `${path}.final`;
        rmSync(whole, { force: true });
        const deduped = `${kept.join("\n")}\n`;
        // The answers file itself, linked, when nothing was dropped (no second copy on disk).
        if (deduped === text) linkOrCopy(path, whole);
        else {
          writeFileSync(whole, deduped);
          this.#o.files.quota?.grew(Buffer.byteLength(deduped));
        }
        const file = this.#o.files.adopt(
          h.owner,
          whole,
          `${b.id}_${kind === "output" ? "output" : "error"}.jsonl`,
          "batch_output",
          h.outputTtlS ?? null,
        );
        if (kind === "output") b.output_file_id = file.id;
        else b.error_file_id = file.id;
        this.#save(h);
      }
      rmSync(path, { force: true });
    }
    b.request_counts = { ...b.request_counts, ...counts };
    b.usage = usage;
    b.status = last;
    if (last === "completed") b.completed_at = now();
    if (last === "cancelled") b.cancelled_at = now();
    this.#save(h);
    rmSync(this.#path(b.id, "cancel"), { force: true });
    rmSync(this.#path(b.id, "input"), { force: true });
    this.#let(h);
  }

  /** A batch done here: its lease goes, nothing of it is held. */
  #let(h: Held): void {
    this.#held.delete(h.batch.id);
    this.#release(h.batch.id);
    h.lines = null;
  }
}

/** What batches/<id>.json holds of a batch held. */
const saved = (h: Saved): Saved => ({
  batch: h.batch,
  owner: h.owner,
  ms: h.ms,
  outputTtlS: h.outputTtlS ?? null,
});

/** An answer's line (null: an empty or damaged line). */
function parseAnswer(
  line: string,
): { custom_id: string; response?: { body?: unknown } | null } | null {
  if (line === "") return null;
  try {
    const a = JSON.parse(line) as { custom_id?: unknown; response?: { body?: unknown } | null };
    return typeof a.custom_id === "string" ? (a as { custom_id: string }) : null;
  } catch {
    return null;
  }
}

/** A hard link `to` of `from` (one file on disk), or a copy where the filesystem has none. */
function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return;
    copyFileSync(from, to);
  }
}

/**
 * Appends one JSON line (a whole line per write: a stop cuts at most the last); the bytes
 * written.
 */
function append(path: string, v: object): number {
  const fd = openSync(path, "a");
  try {
    return writeSync(fd, `${JSON.stringify(v)}\n`);
  } finally {
    closeSync(fd);
  }
}

interface CreateBody {
  input_file_id?: unknown;
  endpoint?: unknown;
  completion_window?: unknown;
  metadata?: unknown;
  output_expires_after?: unknown;
}

/** The routes plugin. `batches` null: every route refuses (filesOff). */
export function batchesRoutes(batches: Batches | null, owner: (req: FastifyRequest) => string) {
  return async (app: FastifyInstance) => {
    const all = () => {
      if (batches === null) throw filesOff();
      return batches;
    };
    app.post<{ Body: CreateBody }>("/v1/batches", async (req) => {
      const b = all();
      const body = (req.body ?? {}) as CreateBody;
      for (const key of ["input_file_id", "endpoint", "completion_window"] as const)
        if (typeof body[key] !== "string")
          throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${key} is required (a string)`, {
            param: key,
          });
      const metadata = body.metadata;
      if (metadata !== undefined && metadata !== null) {
        const entries =
          typeof metadata === "object" && !Array.isArray(metadata)
            ? Object.entries(metadata)
            : null;
        if (
          entries === null ||
          entries.length > 16 ||
          entries.some(([k, v]) => k.length > 64 || typeof v !== "string" || v.length > 512)
        )
          throw new ApiError(
            "EM_GATEWAY_BAD_REQUEST",
            "metadata is up to 16 pairs of a key of up to 64 characters and a string value of up to 512",
            { param: "metadata" },
          );
      }
      const outputTtlS = expiresAfter(body.output_expires_after, "output_expires_after");
      return b.create(owner(req), {
        ...(outputTtlS !== undefined ? { outputTtlS } : {}),
        input_file_id: body.input_file_id as string,
        endpoint: body.endpoint as string,
        completion_window: body.completion_window as string,
        ...(metadata !== undefined ? { metadata: metadata as Record<string, string> | null } : {}),
      });
    });
    app.get<{ Querystring: { after?: string; limit?: string } }>("/v1/batches", async (req) => {
      const q = req.query;
      return listPage(all().list(owner(req)), q.after, queryInt(q.limit, "limit", 20, 1, 100));
    });
    app.get<{ Params: { id: string } }>("/v1/batches/:id", async (req) =>
      all().get(owner(req), req.params.id),
    );
    app.post<{ Params: { id: string } }>("/v1/batches/:id/cancel", async (req) =>
      all().cancel(owner(req), req.params.id),
    );
  };
}
