// Anthropic's Message Batches API (`/v1/messages/batches`, what Anthropic's SDKs call with
// `client.messages.batches`), over the gateway's batches (batches.ts, ADR 0049): a create's
// requests ({custom_id, params}) become a JSONL input file of /v1/messages lines and a batch
// of it, which runs, is kept, and is taken over as any batch is. Its id is the batch's with
// Anthropic's prefix (msgbatch_...); its view is Anthropic's: processing_status, counts that
// stay "processing" until it ends, and the results as Anthropic's JSONL (succeeded with the
// message, errored with the error, canceled or expired for the requests that did not run).
// Errors in Anthropic's format (messages.ts).
import { readFileSync } from "node:fs";
import { Readable } from "node:stream";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { type Batches, type BatchObject, MAX_BATCH_LINES } from "./batches.ts";
import { ApiError } from "./errors.ts";
import { anthropicPage, type FileStore, filesOff } from "./files.ts";

/** A request of a Message Batch: its id, and the body of a POST /v1/messages. */
interface BatchRequest {
  custom_id?: unknown;
  params?: unknown;
}

const CUSTOM_ID = /^[a-zA-Z0-9_-]{1,64}$/;

/** batch_<hex> <-> msgbatch_<hex>. */
const messageBatchId = (batchId: string) => `msgbatch_${batchId.slice("batch_".length)}`;
const batchIdOf = (id: string) => (id.startsWith("msgbatch_") ? `batch_${id.slice(9)}` : "");

const iso = (s: number | null) => (s === null ? null : new Date(s * 1000).toISOString());

/** The requests of a create, checked: the JSONL input of their batch (400 naming the first bad one). */
export function messageBatchInput(body: unknown): string {
  const requests = (body as { requests?: unknown } | null)?.requests;
  const bad = (message: string, param: string) =>
    new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });
  if (!Array.isArray(requests) || requests.length === 0)
    throw bad("requests must be a list of at least one request", "requests");
  if (requests.length > MAX_BATCH_LINES)
    throw bad(
      `a batch takes at most ${MAX_BATCH_LINES} requests, got ${requests.length}`,
      "requests",
    );
  const ids = new Set<string>();
  const lines = requests.map((r: BatchRequest, i) => {
    const id = r?.custom_id;
    if (typeof id !== "string" || !CUSTOM_ID.test(id))
      throw bad(
        `requests.${i}.custom_id must be 1 to 64 letters, digits, '_' or '-'`,
        `requests.${i}.custom_id`,
      );
    if (ids.has(id))
      throw bad(
        `requests.${i}.custom_id '${id}' is on an earlier request too`,
        `requests.${i}.custom_id`,
      );
    ids.add(id);
    const params = r.params;
    if (typeof params !== "object" || params === null || Array.isArray(params))
      throw bad(
        `requests.${i}.params must be an object (a Messages request)`,
        `requests.${i}.params`,
      );
    if ((params as { stream?: unknown }).stream === true)
      throw bad(
        `requests.${i}.params: a batch's requests cannot stream`,
        `requests.${i}.params.stream`,
      );
    return JSON.stringify({ custom_id: id, method: "POST", url: "/v1/messages", body: params });
  });
  return `${lines.join("\n")}\n`;
}

/** Ended batches whose counts a gateway keeps (each a few numbers). */
const ENDED_COUNTS_KEPT = 10_000;

/** A line of a batch's output or error file. */
interface Answer {
  custom_id: string;
  response: { status_code: number; body: unknown } | null;
  error: { code: string; message: string } | null;
}

/** A Message Batch's results: one line per request, Anthropic's. */
export function messageBatchResults(
  batch: BatchObject,
  inputIds: string[],
  output: Answer[],
  errors: Answer[],
): { custom_id: string; result: Record<string, unknown> }[] {
  const results = new Map<string, Record<string, unknown>>();
  for (const a of output)
    results.set(a.custom_id, { type: "succeeded", message: a.response?.body });
  for (const a of errors) {
    if (results.has(a.custom_id)) continue;
    if (a.error?.code === "batch_expired") results.set(a.custom_id, { type: "expired" });
    else
      results.set(a.custom_id, {
        type: "errored",
        error:
          a.response !== null
            ? a.response.body
            : { type: "error", error: { type: "api_error", message: a.error?.message ?? "" } },
      });
  }
  const missing = batch.status === "expired" ? "expired" : "canceled";
  return inputIds.map((id) => ({ custom_id: id, result: results.get(id) ?? { type: missing } }));
}

/** The routes plugin (in messages.ts's scope: Anthropic's error format). */
export function messageBatchesRoutes(
  batches: Batches | null,
  files: FileStore | null,
  owner: (req: FastifyRequest) => string,
) {
  const on = () => {
    if (batches === null || files === null) throw filesOff();
    return { batches, files };
  };
  /** A file's lines (none once it is gone: deleted through /v1/files, or expired). */
  const lines = (fileId: string | null): Answer[] => {
    let text: string;
    try {
      text = fileId === null ? "" : readFileSync(on().files.path(fileId), "utf8");
    } catch {
      return [];
    }
    return text
      .split("\n")
      .filter((l) => l !== "")
      .map((l) => JSON.parse(l) as Answer);
  };
  const inputIds = (b: BatchObject) => lines(b.input_file_id).map((l) => l.custom_id);

  type Counts = {
    processing: number;
    succeeded: number;
    errored: number;
    canceled: number;
    expired: number;
  };
  /**
   * The counts of ended batches by result type (an ended batch never changes: its files are
   * read once, not at every GET or list), the oldest forgotten past ENDED_COUNTS_KEPT.
   */
  const endedCounts = new Map<string, Counts>();
  const countsOf = (b: BatchObject): Counts => {
    const known = endedCounts.get(b.id);
    if (known) return { ...known };
    const counts = { processing: 0, succeeded: 0, errored: 0, canceled: 0, expired: 0 };
    for (const r of messageBatchResults(
      b,
      inputIds(b),
      lines(b.output_file_id),
      lines(b.error_file_id),
    ))
      counts[r.result["type"] as "succeeded" | "errored" | "canceled" | "expired"]++;
    endedCounts.set(b.id, counts);
    if (endedCounts.size > ENDED_COUNTS_KEPT)
      endedCounts.delete(endedCounts.keys().next().value as string);
    return { ...counts };
  };

  /** The batch as Anthropic's MessageBatch (results_url on this gateway, as it was reached). */
  const view = (req: FastifyRequest, b: BatchObject) => {
    const ended = !["validating", "in_progress", "cancelling", "finalizing"].includes(b.status);
    const id = messageBatchId(b.id);
    const counts = ended
      ? countsOf(b)
      : { processing: b.request_counts.total, succeeded: 0, errored: 0, canceled: 0, expired: 0 };
    const proto =
      req.headers["x-forwarded-proto"] === "https" || req.protocol === "https" ? "https" : "http";
    return {
      id,
      type: "message_batch",
      processing_status: ended ? "ended" : b.status === "cancelling" ? "canceling" : "in_progress",
      request_counts: counts,
      created_at: iso(b.created_at),
      expires_at: iso(b.expires_at),
      ended_at: iso(b.completed_at ?? b.cancelled_at ?? b.expired_at ?? b.failed_at),
      cancel_initiated_at: iso(b.cancelling_at),
      archived_at: null,
      results_url: ended
        ? `${proto}://${req.headers.host}/v1/messages/batches/${id}/results`
        : null,
    };
  };
  const find = (req: FastifyRequest<{ Params: { id: string } }>) => {
    const gone = () =>
      new ApiError(
        "EM_GATEWAY_BATCH_NOT_FOUND",
        `no message batch '${req.params.id.slice(0, 80)}' here`,
        { param: "message_batch_id" },
      );
    let b: BatchObject;
    try {
      b = on().batches.get(owner(req), batchIdOf(req.params.id));
    } catch (err) {
      throw err instanceof ApiError && err.code === "EM_GATEWAY_BATCH_NOT_FOUND" ? gone() : err;
    }
    if (b.endpoint !== "/v1/messages") throw gone();
    return b;
  };

  return async (app: FastifyInstance) => {
    app.post(
      "/v1/messages/batches",
      // (a batch's requests may be many: up to an upload's size, not one request's)
      { bodyLimit: files?.maxBytes ?? 1 << 20 },
      async (req) => {
        const { batches, files } = on();
        const who = owner(req);
        const input = messageBatchInput(req.body);
        const file = await files.upload(
          who,
          Readable.from([Buffer.from(input)]),
          "message_batch.jsonl",
          "batch",
          null, // (its results list every request: kept while the batch is)
        );
        const b = batches.create(who, {
          input_file_id: file.id,
          endpoint: "/v1/messages",
          completion_window: "24h",
        });
        return view(req, b);
      },
    );
    app.get<{ Querystring: { limit?: string; after_id?: string; before_id?: string } }>(
      "/v1/messages/batches",
      async (req) => {
        // (newest first, as files.ts pages Anthropic's lists; has_more: more in the
        // direction paged)
        const all = on()
          .batches.list(owner(req))
          .filter((b) => b.endpoint === "/v1/messages")
          .map((b) => ({ id: messageBatchId(b.id), b }));
        const page = anthropicPage(all, req.query);
        return { ...page, data: page.data.map(({ b }) => view(req, b)) };
      },
    );
    app.get<{ Params: { id: string } }>("/v1/messages/batches/:id", async (req) =>
      view(req, find(req)),
    );
    app.post<{ Params: { id: string } }>("/v1/messages/batches/:id/cancel", async (req) => {
      find(req);
      return view(req, on().batches.cancel(owner(req), batchIdOf(req.params.id)));
    });
    app.delete<{ Params: { id: string } }>("/v1/messages/batches/:id", async (req) => {
      const b = find(req);
      on().batches.delete(owner(req), b.id);
      endedCounts.delete(b.id);
      return { id: req.params.id, type: "message_batch_deleted" };
    });
    app.get<{ Params: { id: string } }>("/v1/messages/batches/:id/results", async (req, reply) => {
      const b = find(req);
      if (view(req, b).processing_status !== "ended")
        throw new ApiError(
          "EM_GATEWAY_BATCH_STATE",
          `message batch ${req.params.id} is still processing: its results come once it has ended`,
        );
      const results = messageBatchResults(
        b,
        inputIds(b),
        lines(b.output_file_id),
        lines(b.error_file_id),
      );
      reply.header("content-type", "application/binary");
      return results.map((r) => JSON.stringify(r)).join("\n") + "\n";
    });
  };
}
