// OpenAI's Batch API (ADR 0049): POST /v1/batches names an uploaded JSONL file (files.ts) of
// requests to one endpoint (/v1/chat/completions, /v1/completions or /v1/responses), each line
// {"custom_id", "method": "POST", "url", "body"}; the gateway checks every line (validating),
// then runs them through its own routes (in_progress), a few at a time (--batch-concurrency,
// at the back of the queue: priority BATCH_PRIORITY on a gateway that schedules by priority),
// and writes each answer as a line of an output file (2xx) or an error file (finalizing,
// completed). GET /v1/batches/{id} shows the status and counts, POST .../cancel stops it
// (cancelling, cancelled: the lines done so far are in its files), and a batch not done
// within its 24 hours expires (the lines left go to the error file as batch_expired).
//
// Everything a batch is lives in the files folder (batches/<id>.json, and its lines' answers
// as they come, <id>.output.jsonl and <id>.errors.jsonl): a gateway that restarts on the same
// folder goes on with its batches where they were, running again only the lines whose answer
// was not written (a line may so run twice, never be lost).
import { randomBytes } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { ApiError } from "./errors.ts";
import { type FileStore, filesOff, queryInt } from "./files.ts";

/** The endpoints a batch's lines may name. */
export const BATCH_ENDPOINTS = [
  "/v1/chat/completions",
  "/v1/completions",
  "/v1/responses",
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

interface Active {
  batch: BatchObject;
  owner: string;
  /** The requests, once validated. */
  lines: BatchLine[] | null;
  /** custom_ids whose answer is written (a restart's). */
  done: Set<string>;
  /** The next line to look at. */
  next: number;
  inflight: number;
  /** Lines to run again (answered 429 or 503), once their wait is over. */
  again: BatchLine[];
  /** Lines waiting to run again. */
  waiting: number;
}

interface Saved {
  batch: BatchObject;
  owner: string;
}

const fresh = (batch: BatchObject, owner: string): Active => ({
  batch,
  owner,
  lines: null,
  done: new Set(),
  next: 0,
  inflight: 0,
  again: [],
  waiting: 0,
});

/**
 * Answers that say "later" (the admission queue full, the shards unreachable: 429, 503): the
 * line runs again after a wait (1 s, doubling, at most MAX_WAIT_MS) until the batch expires.
 */
const LATER = new Set([429, 503]);
const MAX_WAIT_MS = 30_000;

const BATCH_ID = /^batch_[0-9a-f]{24}$/;
const now = () => Math.floor(Date.now() / 1000);

export interface BatchesOptions {
  /** The files folder (batches/ is made in it). */
  dir: string;
  files: FileStore;
  run: RunLine;
  /** Lines in flight at once, over every batch. */
  concurrency: number;
  log?: (line: string) => void;
}

export class Batches {
  readonly #o: BatchesOptions;
  readonly #dir: string;
  /** Every batch kept, in creation order. */
  readonly #all = new Map<string, Active>();
  #inflight = 0;
  #closed = false;
  /** How often each line was answered "later" (LATER). */
  readonly #tries = new WeakMap<BatchLine, number>();

  /** The batches in the folder (a restart's) are served again, unfinished ones go on. */
  constructor(o: BatchesOptions) {
    this.#o = o;
    this.#dir = join(o.dir, "batches");
    mkdirSync(this.#dir, { recursive: true });
    const saved: Saved[] = [];
    for (const name of readdirSync(this.#dir)) {
      if (!name.endsWith(".json")) continue;
      try {
        const s = JSON.parse(readFileSync(join(this.#dir, name), "utf8")) as Saved;
        if (BATCH_ID.test(s.batch?.id ?? "")) saved.push(s);
      } catch {
        // (a half-written one: written again by its next change, or gone)
      }
    }
    saved.sort((a, b) => a.batch.created_at - b.batch.created_at);
    for (const { batch, owner } of saved) this.#all.set(batch.id, fresh(batch, owner));
    let resumed = 0;
    for (const a of this.#all.values()) {
      const s = a.batch.status;
      if (s === "validating" || s === "in_progress" || s === "cancelling" || s === "finalizing") {
        resumed++;
        if (s === "validating" || s === "in_progress") void this.#validate(a);
        else this.#finish(a);
      }
    }
    if (resumed > 0) o.log?.(`batches: ${resumed} unfinished in ${o.dir} go on`);
  }

  /** A new batch of `owner`'s (validated next, then run). */
  create(
    owner: string,
    req: {
      input_file_id: string;
      endpoint: string;
      completion_window: string;
      metadata?: Record<string, string> | null;
    },
  ): BatchObject {
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
    const t = now();
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
    };
    const a = fresh(batch, owner);
    this.#all.set(batch.id, a);
    this.#save(a);
    void this.#validate(a);
    return structuredClone(batch);
  }

  /** `owner`'s batch `id` (404 when it has none such). */
  get(owner: string, id: string): BatchObject {
    return structuredClone(this.#find(owner, id).batch);
  }

  /** `owner`'s batches, newest first, after `after`, at most `limit`. */
  list(owner: string, after: string | undefined, limit: number) {
    let all = [...this.#all.values()].filter((a) => a.owner === owner).reverse();
    if (after !== undefined) {
      const at = all.findIndex((a) => a.batch.id === after);
      all = at < 0 ? [] : all.slice(at + 1);
    }
    return {
      data: all.slice(0, limit).map((a) => structuredClone(a.batch)),
      has_more: all.length > limit,
    };
  }

  /** Stops `owner`'s batch `id`: no more of its lines start; those running finish. */
  cancel(owner: string, id: string): BatchObject {
    const a = this.#find(owner, id);
    const s = a.batch.status;
    if (s === "validating" || s === "in_progress") {
      a.batch.status = "cancelling";
      a.batch.cancelling_at = now();
      this.#save(a);
      if (a.inflight === 0) this.#finish(a);
    } else if (s !== "cancelling" && s !== "cancelled")
      throw new ApiError(
        "EM_GATEWAY_BATCH_STATE",
        `batch ${id} is ${s}: only a validating or in_progress batch can be cancelled`,
      );
    return structuredClone(a.batch);
  }

  /**
   * Starts no more lines (the gateway stops): those running are not waited for; their
   * answers, if they come before the process ends, are written, else they run again at the
   * next start.
   */
  close(): void {
    this.#closed = true;
  }

  /** Lines running now, over every batch (for tests and metrics). */
  get inflight(): number {
    return this.#inflight;
  }

  #find(owner: string, id: string): Active {
    const a = BATCH_ID.test(id) ? this.#all.get(id) : undefined;
    if (!a || a.owner !== owner)
      throw new ApiError("EM_GATEWAY_BATCH_NOT_FOUND", `no batch '${id.slice(0, 80)}' here`, {
        param: "batch_id",
      });
    return a;
  }

  #path(a: Active, kind: "json" | "output" | "errors"): string {
    return join(this.#dir, kind === "json" ? `${a.batch.id}.json` : `${a.batch.id}.${kind}.jsonl`);
  }

  #save(a: Active): void {
    const path = this.#path(a, "json");
    writeFileSync(
      `${path}.tmp`,
      JSON.stringify({ batch: a.batch, owner: a.owner } satisfies Saved),
    );
    renameSync(`${path}.tmp`, path);
  }

  /** Reads and checks the input (again, after a restart), then runs it. */
  async #validate(a: Active): Promise<void> {
    await new Promise((r) => setImmediate(r)); // (the create's answer goes first)
    const b = a.batch;
    let text: string;
    try {
      text = readFileSync(this.#o.files.path(b.input_file_id), "utf8");
    } catch {
      return this.#fail(a, [
        {
          code: "file_not_found",
          message: `the input file ${b.input_file_id} was deleted before the batch ran`,
          param: "input_file_id",
          line: null,
        },
      ]);
    }
    const parsed = parseBatchInput(text, b.endpoint);
    if (b.status !== "validating" && b.status !== "in_progress" && b.status !== "cancelling")
      return; // (cancelled while it was read)
    if ("errors" in parsed) return this.#fail(a, parsed.errors);
    a.lines = parsed.lines;
    // A restart's answers: the lines already written (a line cut short by the stop is dropped).
    let completed = 0;
    let failed = 0;
    for (const kind of ["output", "errors"] as const)
      for (const id of this.#written(a, kind)) {
        a.done.add(id);
        if (kind === "output") completed++;
        else failed++;
      }
    b.request_counts = { total: parsed.lines.length, completed, failed };
    if (b.status === "validating") {
      b.status = "in_progress";
      b.in_progress_at = now();
    }
    this.#save(a);
    if (b.status === "cancelling") this.#finish(a);
    else this.#pump();
  }

  /** The custom_ids of the answers in one of `a`'s files (a cut last line removed). */
  #written(a: Active, kind: "output" | "errors"): string[] {
    const path = this.#path(a, kind);
    if (!existsSync(path)) return [];
    const text = readFileSync(path, "utf8");
    const end = text.lastIndexOf("\n") + 1;
    if (end < text.length) truncateSync(path, Buffer.byteLength(text.slice(0, end)));
    return text
      .slice(0, end)
      .split("\n")
      .filter((l) => l !== "")
      .map((l) => (JSON.parse(l) as { custom_id: string }).custom_id);
  }

  #fail(a: Active, errors: BatchError[]): void {
    a.batch.status = "failed";
    a.batch.failed_at = now();
    a.batch.errors = { object: "list", data: errors };
    this.#save(a);
  }

  /** Starts lines, oldest batch first, while fewer than `concurrency` run. */
  #pump(): void {
    if (this.#closed) return;
    for (const a of this.#all.values()) {
      if (this.#inflight >= this.#o.concurrency) return;
      if (a.batch.status !== "in_progress" || a.lines === null) continue;
      if (a.batch.expired_at === null && now() >= a.batch.expires_at) this.#expire(a);
      while (this.#inflight < this.#o.concurrency) {
        const line = a.again.shift() ?? (a.next < a.lines.length ? a.lines[a.next++] : undefined);
        if (line === undefined) break;
        if (a.done.has(line.custom_id)) continue;
        this.#start(a, line);
      }
      if (a.next >= a.lines.length && a.inflight === 0 && a.waiting === 0 && a.again.length === 0)
        this.#finish(a);
    }
  }

  #start(a: Active, line: BatchLine): void {
    this.#inflight++;
    a.inflight++;
    const written = (answer: object, ok: boolean) => {
      if (a.done.has(line.custom_id)) return;
      a.done.add(line.custom_id);
      append(this.#path(a, ok ? "output" : "errors"), answer);
      if (ok) a.batch.request_counts.completed++;
      else a.batch.request_counts.failed++;
    };
    const id = `batch_req_${randomBytes(12).toString("hex")}`;
    this.#o
      .run(a.batch.endpoint, line.body)
      .then(
        (r) => {
          // An answer cut by the stop: the line runs again at the next start.
          if (this.#closed && r.status >= 500) return;
          if (
            LATER.has(r.status) &&
            a.batch.status === "in_progress" &&
            a.batch.expired_at === null
          )
            return this.#later(a, line);
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
          // Not run (the gateway stopping): left for the next start.
          if (this.#closed) return;
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
      .catch((err) => this.#o.log?.(`batch ${a.batch.id}: an answer not written: ${String(err)}`))
      .finally(() => {
        this.#inflight--;
        a.inflight--;
        if (this.#closed) return;
        if (a.batch.status === "cancelling" && a.inflight === 0) this.#finish(a);
        this.#pump();
      });
  }

  /** Runs `line` again after a wait that doubles with each "later" it got. */
  #later(a: Active, line: BatchLine): void {
    const tries = (this.#tries.get(line) ?? 0) + 1;
    this.#tries.set(line, tries);
    a.waiting++;
    const t = setTimeout(
      () => {
        a.waiting--;
        if (this.#closed) return;
        // (cancelled meanwhile: dropped; expired: #expire answered it)
        if (a.batch.status === "in_progress") a.again.push(line);
        this.#pump();
      },
      Math.min(MAX_WAIT_MS, 1000 * 2 ** (tries - 1)),
    );
    t.unref();
  }

  /** The lines not run by expires_at go to the error file as batch_expired. */
  #expire(a: Active): void {
    for (const line of a.lines ?? []) {
      if (a.done.has(line.custom_id)) continue;
      a.done.add(line.custom_id);
      append(this.#path(a, "errors"), {
        id: `batch_req_${randomBytes(12).toString("hex")}`,
        custom_id: line.custom_id,
        response: null,
        error: {
          code: "batch_expired",
          message: "This request could not be executed before the completion window expired.",
        },
      });
      a.batch.request_counts.failed++;
    }
    a.next = a.lines?.length ?? 0; // (no line starts; those running finish, then #finish)
    a.batch.expired_at = now();
    this.#save(a);
  }

  /**
   * Done running (every line, cancelled or expired): its answers become files (output,
   * errors; none where no line went there), and its status the last.
   */
  #finish(a: Active): void {
    const b = a.batch;
    const last: BatchStatus =
      b.expired_at !== null ? "expired" : b.status === "cancelling" ? "cancelled" : "completed";
    if (b.status === "in_progress") {
      b.status = "finalizing";
      b.finalizing_at = now();
      this.#save(a);
    }
    for (const kind of ["output", "errors"] as const) {
      const path = this.#path(a, kind);
      if (!existsSync(path)) continue;
      const file = this.#o.files.adopt(
        a.owner,
        path,
        `${b.id}_${kind === "output" ? "output" : "error"}.jsonl`,
        "batch_output",
      );
      if (kind === "output") b.output_file_id = file.id;
      else b.error_file_id = file.id;
      this.#save(a);
    }
    b.status = last;
    if (last === "completed") b.completed_at = now();
    if (last === "cancelled") b.cancelled_at = now();
    this.#save(a);
    a.lines = null; // (the requests are not needed any more)
  }
}

/** Appends one JSON line (a whole line per write: a stop cuts at most the last). */
function append(path: string, v: object): void {
  const fd = openSync(path, "a");
  try {
    writeSync(fd, `${JSON.stringify(v)}\n`);
  } finally {
    closeSync(fd);
  }
}

interface CreateBody {
  input_file_id?: unknown;
  endpoint?: unknown;
  completion_window?: unknown;
  metadata?: unknown;
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
      return b.create(owner(req), {
        input_file_id: body.input_file_id as string,
        endpoint: body.endpoint as string,
        completion_window: body.completion_window as string,
        ...(metadata !== undefined ? { metadata: metadata as Record<string, string> | null } : {}),
      });
    });
    app.get<{ Querystring: { after?: string; limit?: string } }>("/v1/batches", async (req) => {
      const { data, has_more } = all().list(
        owner(req),
        req.query.after,
        queryInt(req.query.limit, "limit", 20, 1, 100),
      );
      return {
        object: "list",
        data,
        first_id: data[0]?.id ?? null,
        last_id: data.at(-1)?.id ?? null,
        has_more,
      };
    });
    app.get<{ Params: { id: string } }>("/v1/batches/:id", async (req) =>
      all().get(owner(req), req.params.id),
    );
    app.post<{ Params: { id: string } }>("/v1/batches/:id/cancel", async (req) =>
      all().cancel(owner(req), req.params.id),
    );
  };
}
