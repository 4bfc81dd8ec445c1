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
// the gateway that holds it), a lease (<id>.lease: which gateway holds it, renewed every few
// seconds), a cancel mark (<id>.cancel, from any gateway), and its lines' answers as they
// come, by parts (batch-runner.ts: every gateway on the folder with room runs parts of it,
// each part's answers in its own files). Every gateway on the folder answers for every batch,
// and looks for unfinished batches whose lease ran out (a gateway that stopped or died; a
// restarted one finds its own): it takes the lease, counts the answers written, and ends the
// batch once every line has one; parts go on where their answers end. A line may so run
// twice (its first answer is kept), never be lost.
import { randomBytes } from "node:crypto";
import { appendFileSync, existsSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { makeDirs, readJson, writeJson } from "../util/fs.ts";
import { Leases } from "../util/leases.ts";
import { append, linkOrCopy, parseAnswer, readAnswers } from "./batch-folder.ts";
import { type OpenBatch, PartRunner, partCount, partLines, partPath } from "./batch-runner.ts";
import { ApiError } from "./errors.ts";
import { expiresAfter, type FileStore, filesOff, listPage, madeAt, queryInt } from "./files.ts";

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

/**
 * Runs one request of `owner`'s batch through the gateway's routes (app.inject, in app.ts):
 * what it keeps (a stored response) is the batch owner's.
 */
export type RunLine = (
  url: BatchEndpoint,
  body: Record<string, unknown>,
  owner: string,
) => Promise<LineAnswer>;

/** batches/<id>.json. */
interface Saved {
  batch: BatchObject;
  owner: string;
  ms: number;
  /** The output and error files expire this long after they are made (null, absent: never). */
  outputTtlS?: number | null;
  /**
   * Lines per part (batch-runner.ts), set once the batch is validated; absent: not validated
   * yet, or made before batches had parts (its answers, in <id>.output.jsonl and
   * <id>.errors.jsonl, are moved into its parts' files by the gateway that takes it up).
   */
  partLines?: number;
}

/** A batch this gateway holds the lease of: it validates it, counts its answers, ends it. */
interface Held extends Saved {
  /** The requests, once validated. */
  lines: BatchLine[] | null;
  /** custom_ids with an answer in a part's files (counted once). */
  seen: Set<string>;
  /** Per part: the bytes of its output and error files read, and its lines answered. */
  parts: { read: { output: number; errors: number }; answered: number }[];
  /** Counts or status changed since the object was last written. */
  dirty: boolean;
  /** When its parts were last looked at for one ended short of answers (#reopen; ms). */
  reopenedAt: number;
}

const BATCH_ID = /^batch_[0-9a-f]{24}$/;
/** A part's file (batch-runner.ts partPath): removed with a batch that ended. */
const PART_FILE = /^(batch_[0-9a-f]{24})\.p\d+\.(lease|output\.jsonl|errors\.jsonl)$/;
const now = () => Math.floor(Date.now() / 1000);
const UNFINISHED = new Set<BatchStatus>(["validating", "in_progress", "cancelling", "finalizing"]);
/**
 * A part held by another gateway is looked at again after this long (a lease read per part:
 * a 50,000-line batch has 196).
 */
const BUSY_MS = 5000;
/** Ended batches' objects a gateway keeps in memory (each about a kilobyte). */
const ENDED_KEPT = 10_000;

export interface BatchesOptions {
  /** The files folder (batches/ is made in it). */
  dir: string;
  files: FileStore;
  run: RunLine;
  /** Lines in flight at once, over every batch this gateway runs. */
  concurrency: number;
  /** A lease not renewed for this long is taken over (default 30 s; renewed every sixth). */
  leaseMs?: number;
  /**
   * How often the folder is looked at for batches to take over or help with (default 1 s: a
   * gateway joins a new batch within a second; a look reads the names, and the objects of the
   * batches not ended and not held here: of those it helps with already, every 5 s at most).
   */
  scanMs?: number;
  log?: (line: string) => void;
}

export class Batches {
  readonly #o: BatchesOptions;
  readonly #dir: string;
  readonly #leases: Leases;
  readonly #runner: PartRunner;
  readonly #held = new Map<string, Held>();
  /** Batches seen done (their objects never change again): not read again by #scan. */
  readonly #final = new Set<string>();
  /**
   * The objects of batches seen ended, the newest ENDED_KEPT (they never change: a GET or a
   * list reads them from here, looking only that the file is still there).
   */
  readonly #ended = new Map<string, Saved>();
  /** When #scan last read each offered batch that another gateway holds (ms). */
  readonly #lookedAt = new Map<string, number>();
  #closed = false;
  readonly #timers: NodeJS.Timeout[] = [];
  #renewedAt = 0;

  /** Starts looking after the folder's batches (now, then every scanMs). */
  constructor(o: BatchesOptions) {
    this.#o = o;
    this.#dir = join(o.dir, "batches");
    this.#leases = new Leases(o.leaseMs ?? 30_000);
    makeDirs(this.#dir);
    this.#runner = new PartRunner({
      dir: this.#dir,
      leases: this.#leases,
      quota: o.files.quota,
      run: o.run,
      concurrency: o.concurrency,
      busyMs: BUSY_MS,
      lines: (b) => this.#held.get(b.id)?.lines ?? this.#lines(b.id, b.endpoint),
      // (this gateway's own answers counted at once; a failure here is the count's, not theirs)
      wrote: (id, k) => {
        const h = this.#held.get(id);
        if (h?.lines) this.#safely(`batch ${id}`, () => this.#collect(h, k));
      },
      ended: (id) => {
        const h = this.#held.get(id);
        if (h) this.#safely(`batch ${id}`, () => this.#check(h));
      },
      ...(o.log ? { log: o.log } : {}),
    });
    const tick = setInterval(
      () => this.#safely("the lease renewal", () => this.#tick()),
      Math.min(1000, this.#leases.ms / 6),
    );
    const scan = setInterval(
      () => this.#safely("a look for batches", () => this.#scan()),
      o.scanMs ?? 1000,
    );
    tick.unref();
    scan.unref();
    this.#timers.push(tick, scan);
    // (the first look once the folder is counted: lines wait while it is full)
    void (o.files.quota?.ready ?? Promise.resolve()).then(() =>
      this.#safely("a look for batches", () => this.#scan()),
    );
  }

  /** A new batch of `owner`'s (validated next, then run here and by the folder's others). */
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
    if (this.#leases.take(this.#path(batch.id, "lease")) !== "taken")
      throw new Error(`the lease of a new batch ${batch.id} is taken`);
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
   * Stops `owner`'s batch `id`: a cancel mark that every gateway running its lines reads (at
   * once here, within a second elsewhere); no more of its lines start, those running finish.
   */
  cancel(owner: string, id: string): BatchObject {
    const s = this.#find(owner, id);
    const status = s.batch.status;
    if (status === "validating" || status === "in_progress") {
      const mark = join(this.#dir, `${id}.cancel`);
      if (readJson<{ at: number }>(mark) === undefined) writeJson(mark, { at: now() });
      this.#runner.stop(id);
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
    this.#ended.delete(id);
    for (const name of readdirSync(this.#dir))
      if (name.startsWith(`${id}.`)) rmSync(join(this.#dir, name), { force: true });
  }

  /**
   * Starts no more lines (the gateway stops) and gives up the leases, so that another gateway
   * on the folder (or this one, started again) goes on with them; answers that still come
   * before the process ends are written.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of this.#timers) clearInterval(t);
    this.#runner.close();
    for (const h of this.#held.values()) {
      if (h.dirty) this.#save(h);
      this.#leases.release(this.#path(h.batch.id, "lease"));
    }
    this.#leases.close();
  }

  /** Lines running now, over every batch this gateway runs lines of. */
  get inflight(): number {
    return this.#runner.inflight;
  }

  /** Parts of batches whose lines this gateway runs now. */
  get parts(): number {
    return this.#runner.parts;
  }

  /** Lines answered here since start, by outcome (metrics.ts addBatches). */
  get answered(): { completed: number; failed: number; retried: number } {
    return this.#runner.answered;
  }

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
    const path = this.#path(id, "json");
    const ended = this.#ended.get(id);
    if (ended !== undefined) {
      if (existsSync(path)) return ended;
      this.#ended.delete(id); // (deleted, by any gateway)
      return undefined;
    }
    const s = readJson<Saved>(path);
    if (s?.batch?.id !== id) return undefined;
    if (!UNFINISHED.has(s.batch.status)) {
      this.#ended.set(id, s);
      if (this.#ended.size > ENDED_KEPT) this.#ended.delete(this.#ended.keys().next().value!);
    }
    return s;
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

  #hold(s: Saved): Held {
    const h: Held = { ...s, lines: null, seen: new Set(), parts: [], dirty: false, reopenedAt: 0 };
    this.#held.set(s.batch.id, h);
    return h;
  }

  /** Every second: leases renewed, answers counted, cancel marks read, batches ended. */
  #tick(): void {
    if (this.#closed) return;
    const renew = Date.now() - this.#renewedAt >= this.#leases.ms / 6;
    if (renew) {
      this.#renewedAt = Date.now();
      for (const [id, h] of this.#held)
        if (!this.#leases.renew(this.#path(id, "lease"))) {
          this.#o.log?.(
            `batch ${id}: another gateway holds it now (its lease was not renewed in time)`,
          );
          this.#held.delete(id);
          h.lines = null;
        }
    }
    this.#runner.tick(renew);
    // (one directory read: the parts not started, with no files yet, cost nothing)
    const names = this.#held.size > 0 ? new Set(readdirSync(this.#dir)) : undefined;
    for (const h of this.#held.values())
      this.#safely(`batch ${h.batch.id}`, () => {
        const s = h.batch.status;
        if (
          (s === "validating" || s === "in_progress") &&
          existsSync(this.#path(h.batch.id, "cancel"))
        )
          this.#cancelled(h);
        else this.#check(h, names);
        if (h.dirty) this.#save(h);
      });
  }

  /**
   * Every scanMs: takes up the folder's unfinished batches whose holder is gone, offers the
   * lines of those in progress to this gateway's runner (they run here too when it has room),
   * and removes the part files of batches that ended (a gateway paused past its lease may
   * write a late answer after the end).
   */
  #scan(): void {
    if (this.#closed) return;
    let taken = 0;
    const names = readdirSync(this.#dir);
    const listed = new Set<string>();
    for (const name of names) {
      if (!name.endsWith(".json")) continue;
      const id = name.slice(0, -5);
      listed.add(id);
      if (this.#held.has(id) || this.#final.has(id)) continue;
      // A batch whose parts run here already, held elsewhere: read again every 5 s at most
      // (its holder is taken over after a lease of silence, its end withdrawn within seconds;
      // the runner reads its cancel mark itself). A new one is joined at the next look.
      const t = Date.now();
      const again = Math.min(BUSY_MS, this.#leases.ms / 6);
      if (this.#runner.has(id) && t - (this.#lookedAt.get(id) ?? 0) < again) continue;
      this.#lookedAt.set(id, t);
      const s = this.#load(id);
      if (s === undefined) continue;
      if (!UNFINISHED.has(s.batch.status)) {
        this.#final.add(id);
        this.#runner.withdraw(id);
        rmSync(this.#path(id, "input"), { force: true }); // (a stop at the end of #finish)
        continue;
      }
      if (this.#leases.take(this.#path(id, "lease")) === "taken") {
        // (read again under the lease: its last holder may have written it since)
        const h = this.#hold(this.#load(id) ?? s);
        taken++;
        if (h.batch.status === "validating" || h.batch.status === "in_progress") this.#run(h);
        else this.#safely(`batch ${id}`, () => this.#finish(h));
      } else if (s.batch.status === "in_progress" && s.partLines !== undefined) this.#offer(s);
      else if (s.batch.status !== "validating") this.#runner.withdraw(id);
    }
    for (const name of names) {
      const m = PART_FILE.exec(name);
      if (m && this.#final.has(m[1]!)) rmSync(join(this.#dir, name), { force: true });
    }
    for (const id of this.#lookedAt.keys())
      if (!listed.has(id) || this.#held.has(id) || this.#final.has(id)) this.#lookedAt.delete(id);
    if (taken > 0) this.#o.log?.(`batches: ${taken} unfinished in ${this.#o.dir} go on here`);
  }

  /** Batch `s`, in progress, to this gateway's runner (its lines run here when there is room). */
  #offer(s: Saved): void {
    this.#runner.offer(this.#open(s));
  }

  /** Batch `s` as the runner takes its parts. */
  #open(s: Saved): OpenBatch {
    const b = s.batch;
    return {
      id: b.id,
      endpoint: b.endpoint,
      expiresAt: b.expires_at,
      total: b.request_counts.total,
      partLines: s.partLines!,
      ms: s.ms,
      owner: s.owner,
    };
  }

  /** The cancel mark read: no more lines start; done once no part is running. */
  #cancelled(h: Held): void {
    const mark = readJson<{ at: number }>(this.#path(h.batch.id, "cancel"));
    h.batch.status = "cancelling";
    h.batch.cancelling_at = mark?.at ?? now();
    this.#save(h);
    this.#runner.stop(h.batch.id);
    this.#check(h);
  }

  /** Batch `id`'s input, read and checked (its own link to it, else the file itself). */
  #parse(id: string, endpoint: BatchEndpoint): ReturnType<typeof parseBatchInput> {
    // (a batch made before batches kept their input: the file itself)
    const own = this.#path(id, "input");
    const input = existsSync(own) ? own : this.#o.files.path(this.#load(id)!.batch.input_file_id);
    return parseBatchInput(readFileSync(input, "utf8"), endpoint);
  }

  /** The lines of batch `id`, validated before (by the gateway that holds it). */
  #lines(id: string, endpoint: BatchEndpoint): BatchLine[] {
    const parsed = this.#parse(id, endpoint);
    if ("errors" in parsed) throw new Error(`its input has ${parsed.errors.length} bad lines`);
    return parsed.lines;
  }

  /** Reads and checks the input (again, when taken over), then runs it. */
  async #validate(h: Held): Promise<void> {
    await new Promise((r) => setImmediate(r)); // (the create's answer goes first)
    const b = h.batch;
    let parsed: ReturnType<typeof parseBatchInput>;
    try {
      parsed = this.#parse(b.id, b.endpoint);
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
    if (b.status !== "validating" && b.status !== "in_progress") return; // (cancelled meanwhile)
    if ("errors" in parsed) return this.#fail(h, parsed.errors);
    const lines = parsed.lines;
    h.lines = lines;
    const model = lines[0]?.body["model"];
    b.model = typeof model === "string" ? model.slice(0, 256) : null;
    if (h.partLines === undefined) {
      h.partLines = partLines(lines.length);
      this.#unsplit(h);
    }
    h.parts = Array.from({ length: partCount(lines.length, h.partLines) }, () => ({
      read: { output: 0, errors: 0 },
      answered: 0,
    }));
    h.seen = new Set();
    b.request_counts = { total: lines.length, completed: 0, failed: 0 };
    b.usage = noUsage();
    // The answers written before (by gateways that stopped or run parts still).
    this.#collect(h);
    if (b.status === "validating") {
      b.status = "in_progress";
      b.in_progress_at = now();
    }
    this.#save(h);
    this.#offer(h);
    this.#check(h);
  }

  /**
   * A batch taken up that was made before batches had parts: its answers, in one output and
   * one error file, are moved into its parts' files (a stop midway: done again, and the
   * answers twice are counted once).
   */
  #unsplit(h: Held): void {
    const id = h.batch.id;
    const index = new Map(h.lines!.map((l, i) => [l.custom_id, i]));
    for (const kind of ["output", "errors"] as const) {
      const path = this.#path(id, kind);
      const byPart = new Map<number, string[]>();
      for (const l of readAnswers(path, 0, true).split("\n")) {
        const i = index.get(parseAnswer(l)?.custom_id ?? "");
        if (i === undefined) continue;
        const k = Math.floor(i / h.partLines!);
        byPart.set(k, [...(byPart.get(k) ?? []), l]);
      }
      for (const [k, ls] of byPart)
        appendFileSync(partPath(this.#dir, id, k, kind), `${ls.join("\n")}\n`);
      rmSync(path, { force: true });
    }
  }

  /**
   * Reads the answers the parts' files gained since the last read (whoever wrote them):
   * counts each line's first, sums their usage. `only`: part `only`'s files; `names`: the
   * folder's names (a file not among them is not looked at).
   */
  #collect(h: Held, only?: number, names?: Set<string>): void {
    const b = h.batch;
    h.parts.forEach((part, k) => {
      if ((only !== undefined && k !== only) || part.answered >= this.#size(h, k)) return;
      for (const kind of ["output", "errors"] as const) {
        const path = partPath(this.#dir, b.id, k, kind);
        // (a stat, not a read, for a file that did not grow: on NFS each call is a round trip)
        if (names !== undefined && !names.has(basename(path))) continue;
        if ((statSync(path, { throwIfNoEntry: false })?.size ?? 0) <= part.read[kind]) continue;
        const text = readAnswers(path, part.read[kind]);
        if (text === "") continue;
        part.read[kind] += Buffer.byteLength(text);
        for (const l of text.split("\n")) {
          const a = parseAnswer(l); // (a damaged line: its request runs again)
          if (a === null || h.seen.has(a.custom_id)) continue;
          h.seen.add(a.custom_id);
          part.answered++;
          b.request_counts[kind === "output" ? "completed" : "failed"]++;
          if (kind === "output") addUsage(b.usage, a.response?.body);
          h.dirty = true;
        }
      }
    });
  }

  /** Lines in part `k` of `h`. */
  #size(h: Held, k: number): number {
    return Math.min(h.partLines!, h.batch.request_counts.total - k * h.partLines!);
  }

  /**
   * Parts of `h` that ended short of answers (one damaged on disk; a gateway that could not
   * read the input) are given back and run again, here: their lease goes (read before their
   * answers are, so that the last answers before it was marked done are counted).
   */
  #reopen(h: Held): void {
    if (Date.now() - h.reopenedAt < BUSY_MS) return; // (a lease read per part)
    h.reopenedAt = Date.now();
    h.parts.forEach((part, k) => {
      if (part.answered >= this.#size(h, k)) return;
      const lease = partPath(this.#dir, h.batch.id, k, "lease");
      if (this.#leases.state(lease) !== "done") return;
      this.#collect(h, k);
      if (part.answered >= this.#size(h, k)) return;
      this.#o.log?.(`batch ${h.batch.id}: part ${k} ended without every answer: it runs again`);
      rmSync(lease, { force: true });
      this.#runner.reopen(this.#open(h), k);
    });
  }

  /**
   * Whether no gateway runs a part of `h` (none holds a lease not done): the batch may end
   * without an answer coming after.
   */
  #quiet(h: Held): boolean {
    if (h.partLines === undefined) return true;
    const count = partCount(h.batch.request_counts.total, h.partLines);
    for (let k = 0; k < count; k++)
      if (this.#leases.state(partPath(this.#dir, h.batch.id, k, "lease")) === "held") return false;
    return true;
  }

  /** Counts the answers; ends the batch when every line has one, or it was cancelled, or expired. */
  #check(h: Held, names?: Set<string>): void {
    const b = h.batch;
    if (b.status === "finalizing" || b.status === "cancelling") this.#finish(h);
    if (b.status !== "in_progress" || h.lines === null) return;
    this.#collect(h, undefined, names);
    if (h.seen.size >= h.lines.length) this.#finish(h);
    else if (now() < b.expires_at) this.#reopen(h);
    else {
      this.#runner.stop(b.id);
      if (!this.#quiet(h)) return;
      this.#collect(h);
      this.#expire(h);
      this.#finish(h);
    }
  }

  #fail(h: Held, errors: BatchError[]): void {
    h.batch.status = "failed";
    h.batch.failed_at = now();
    h.batch.errors = { object: "list", data: errors };
    this.#save(h);
    this.#let(h);
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

  /** The lines not answered by expires_at go to their part's error file as batch_expired. */
  #expire(h: Held): void {
    const b = h.batch;
    (h.lines ?? []).forEach((line, i) => {
      if (h.seen.has(line.custom_id)) return;
      h.seen.add(line.custom_id);
      append(partPath(this.#dir, b.id, Math.floor(i / h.partLines!), "errors"), {
        id: `batch_req_${randomBytes(12).toString("hex")}`,
        custom_id: line.custom_id,
        response: null,
        error: {
          code: "batch_expired",
          message: "This request could not be executed before the completion window expired.",
        },
      });
    });
    b.expired_at = now();
    this.#save(h);
  }

  /**
   * Done running (every line answered, cancelled or expired), once no gateway runs a part of
   * it: its parts' answers become files (output, errors; none where no line went there; a
   * line answered twice, by two gateways, keeps its first answer), and its status the last.
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
    this.#runner.withdraw(b.id);
    if (!this.#quiet(h)) return; // (a part still runs somewhere: again at the next tick)
    const count = h.partLines === undefined ? 0 : partCount(b.request_counts.total, h.partLines);
    const parts = (kind: "output" | "errors") => [
      this.#path(b.id, kind), // (a batch made before parts, ended before it was taken up)
      ...Array.from({ length: count }, (_, k) => partPath(this.#dir, b.id, k, kind)),
    ];
    // Each kind: the answers deduplicated into a file of the store, whose id the object
    // names before the parts' files go (a stop in between: done again, the same way).
    const seen = new Set<string>();
    const counts = { completed: 0, failed: 0 };
    const usage = noUsage();
    const answers = (text: string, kind: "output" | "errors") =>
      text.split("\n").filter((l) => {
        const a = parseAnswer(l); // (a damaged line is dropped)
        if (a === null || seen.has(a.custom_id)) return false;
        seen.add(a.custom_id);
        if (kind === "output") addUsage(usage, a.response?.body);
        return true;
      });
    for (const kind of ["output", "errors"] as const) {
      const tally = kind === "output" ? "completed" : "failed";
      const made = kind === "output" ? b.output_file_id : b.error_file_id;
      if (made !== null) {
        counts[tally] = answers(readAnswers(this.#o.files.path(made)), kind).length;
      } else {
        const whole = join(this.#dir, `${b.id}.${kind}.final`);
        rmSync(whole, { force: true });
        // Written part by part (one part's answers in memory at a time); the one part's file
        // itself, linked, when it is the only one and nothing was dropped (no second copy).
        const written = parts(kind).filter((p) => existsSync(p));
        let bytes = 0;
        for (const p of written) {
          const text = readAnswers(p);
          const kept = answers(text, kind);
          counts[tally] += kept.length;
          if (kept.length === 0) continue;
          const deduped = `${kept.join("\n")}\n`;
          if (written.length === 1 && deduped === text) linkOrCopy(p, whole);
          else {
            appendFileSync(whole, deduped);
            bytes += Buffer.byteLength(deduped);
          }
        }
        this.#o.files.quota?.grew(bytes);
        if (counts[tally] > 0) {
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
      }
      for (const p of parts(kind)) rmSync(p, { force: true });
    }
    b.request_counts = { ...b.request_counts, ...counts };
    b.usage = usage;
    b.status = last;
    if (last === "completed") b.completed_at = now();
    if (last === "cancelled") b.cancelled_at = now();
    this.#save(h);
    for (let k = 0; k < count; k++) rmSync(partPath(this.#dir, b.id, k, "lease"), { force: true });
    rmSync(this.#path(b.id, "cancel"), { force: true });
    rmSync(this.#path(b.id, "input"), { force: true });
    this.#let(h);
  }

  /** A batch done here: its lease goes, nothing of it is held. */
  #let(h: Held): void {
    this.#held.delete(h.batch.id);
    this.#leases.release(this.#path(h.batch.id, "lease"));
    h.lines = null;
  }
}

/** What batches/<id>.json holds of a batch held. */
const saved = (h: Saved): Saved => ({
  batch: h.batch,
  owner: h.owner,
  ms: h.ms,
  outputTtlS: h.outputTtlS ?? null,
  ...(h.partLines !== undefined ? { partLines: h.partLines } : {}),
});

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
