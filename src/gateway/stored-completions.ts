// OpenAI's stored chat completions (ADR 0055): a chat completion made with `store: true` is
// kept with its request's messages and metadata, so that GET /v1/chat/completions lists them
// (oldest first unless order=desc; by model, by metadata), GET /v1/chat/completions/{id}
// retrieves one, GET .../{id}/messages lists its request's messages, POST .../{id} sets its
// metadata and DELETE .../{id} removes it. Each API key sees its own (files.ts ownerOf).
//
// Kept where the gateway keeps responses: its memory (the newest --responses-store), or its
// files folder, `<dir>/chat-completions/<owner>/<id>.json`, which every gateway on it reads
// (expired 30 days after the last write). Ids are time-ordered (completionId), so a list's
// order is its ids', sorted: a page reads only the completions it returns (and those a filter
// passes over), and `after` places a page even when that completion was deleted since.
import { randomBytes } from "node:crypto";
import { readdirSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { Type } from "@sinclair/typebox";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { makeDirs, readJson } from "../util/fs.ts";
import { ApiError } from "./errors.ts";
import { type FolderQuota, queryInt, removeCounted, sweepEvery, writeCounted } from "./files.ts";
import { RESPONSE_TTL_MS } from "./response-files.ts";
import { Metadata } from "./schemas.ts";

/**
 * A new chat completion id: `chatcmpl-`, the millisecond `now` in 12 hex digits, 12 random
 * ones. Sorted as strings, ids are in the order they were made (to the millisecond).
 */
export function completionId(now = Date.now()): string {
  return `chatcmpl-${now.toString(16).padStart(12, "0")}${randomBytes(6).toString("hex")}`;
}

/** The ids completionId makes (nothing else names a file here). */
const ID = /^chatcmpl-[0-9a-f]{24}$/;

/** A stored completion's message: the request's, with an id (OpenAI's ChatCompletionStoreMessage). */
export type StoredMessage = { readonly id: string; readonly role: string } & Record<
  string,
  unknown
>;

/** A chat completion as retrieved: as answered, with the request's metadata. */
export type CompletionObject = {
  readonly id: string;
  readonly model: string;
  readonly created: number;
  readonly metadata: Readonly<Record<string, string>>;
} & Record<string, unknown>;

export interface StoredCompletion {
  /** Who made it (files.ts ownerOf of the request's key; "" without keys). */
  readonly owner: string;
  readonly completion: CompletionObject;
  readonly messages: readonly StoredMessage[];
}

/** Where a gateway keeps stored completions: its memory, or its files folder. */
export interface StoredCompletions {
  /** Whether it keeps any (memory of capacity 0: none). */
  readonly keeps: boolean;
  /** The refusal of a new one while the folder is full; null when there is room. */
  refusal(): ApiError | null;
  put(s: StoredCompletion): void;
  /** Completion `id` if `owner` made it. */
  get(owner: string, id: string): StoredCompletion | undefined;
  delete(owner: string, id: string): boolean;
  /** The ids of `owner`'s completions, oldest first. */
  ids(owner: string): string[];
  close(): void;
}

/** The newest `capacity` completions, `maxChars` characters of them at most (oldest out first). */
export class MemoryCompletions implements StoredCompletions {
  readonly capacity: number;
  readonly maxChars: number;
  readonly #kept = new Map<string, StoredCompletion & { chars: number }>();
  #chars = 0;

  constructor(capacity: number, maxChars = 128 * 2 ** 20) {
    this.capacity = capacity;
    this.maxChars = maxChars;
  }

  get keeps(): boolean {
    return this.capacity > 0;
  }

  get size(): number {
    return this.#kept.size;
  }

  refusal(): ApiError | null {
    return null;
  }

  put(s: StoredCompletion): void {
    const id = s.completion.id;
    const chars = JSON.stringify(s.completion).length + JSON.stringify(s.messages).length;
    this.#forget(id);
    if (!this.keeps || chars > this.maxChars) return;
    this.#kept.set(id, { ...s, chars });
    this.#chars += chars;
    // (the oldest by id: a completion is kept when it ends, not in the order made)
    while (this.#kept.size > this.capacity || this.#chars > this.maxChars)
      this.#forget(this.#oldest());
  }

  #oldest(): string {
    let oldest = "";
    for (const id of this.#kept.keys()) if (oldest === "" || id < oldest) oldest = id;
    return oldest;
  }

  get(owner: string, id: string): StoredCompletion | undefined {
    const s = this.#kept.get(id);
    return s && s.owner === owner ? s : undefined;
  }

  delete(owner: string, id: string): boolean {
    return this.get(owner, id) !== undefined && this.#forget(id);
  }

  #forget(id: string): boolean {
    const s = this.#kept.get(id);
    if (!s) return false;
    this.#kept.delete(id);
    this.#chars -= s.chars;
    return true;
  }

  ids(owner: string): string[] {
    const ids: string[] = [];
    for (const [id, s] of this.#kept) if (s.owner === owner) ids.push(id);
    return ids.sort();
  }

  close(): void {}
}

/** Completions in the files folder: `<filesDir>/chat-completions/<owner>/<id>.json`. */
export class FolderCompletions implements StoredCompletions {
  readonly keeps = true;
  readonly #dir: string;
  readonly #quota: FolderQuota | null;
  readonly #timer: NodeJS.Timeout;

  constructor(filesDir: string, quota: FolderQuota | null) {
    this.#dir = join(filesDir, "chat-completions");
    makeDirs(this.#dir);
    this.#quota = quota;
    this.#timer = sweepEvery(() => this.sweep());
  }

  close(): void {
    clearInterval(this.#timer);
  }

  /** Owner `owner`'s folder (ownerOf: 32 hex digits, or "" without keys). */
  #ownerDir(owner: string): string {
    return join(this.#dir, owner === "" ? "_" : owner);
  }

  #path(owner: string, id: string): string | null {
    return ID.test(id) && /^[0-9a-f]{0,64}$/.test(owner)
      ? join(this.#ownerDir(owner), `${id}.json`)
      : null;
  }

  refusal(): ApiError | null {
    return this.#quota?.full()
      ? this.#quota.refusal("a stored chat completion (store: true)")
      : null;
  }

  put(s: StoredCompletion): void {
    const path = this.#path(s.owner, s.completion.id);
    if (!path) return;
    makeDirs(this.#ownerDir(s.owner));
    writeCounted(path, JSON.stringify(s), this.#quota);
  }

  get(owner: string, id: string): StoredCompletion | undefined {
    const path = this.#path(owner, id);
    if (!path) return undefined;
    try {
      if (Date.now() - statSync(path).mtimeMs > RESPONSE_TTL_MS) return undefined;
    } catch {
      return undefined;
    }
    const s = readJson<StoredCompletion>(path);
    return s?.owner === owner && s.completion?.id === id ? s : undefined;
  }

  delete(owner: string, id: string): boolean {
    const path = this.#path(owner, id);
    return path !== null && removeCounted(path, this.#quota);
  }

  ids(owner: string): string[] {
    let names: string[];
    try {
      names = readdirSync(this.#ownerDir(owner));
    } catch {
      return [];
    }
    return names
      .filter((n) => n.endsWith(".json") && ID.test(n.slice(0, -5)))
      .map((n) => n.slice(0, -5))
      .sort();
  }

  /** Removes expired completions, and temporary files older than an hour. */
  sweep(now = Date.now()): void {
    let owners: string[];
    try {
      owners = readdirSync(this.#dir);
    } catch {
      return;
    }
    for (const owner of owners) {
      const dir = join(this.#dir, owner);
      let names: string[];
      try {
        names = readdirSync(dir);
      } catch {
        continue;
      }
      for (const name of names) {
        const path = join(dir, name);
        try {
          const st = statSync(path);
          const counted = name.endsWith(".json");
          if (now - st.mtimeMs <= (counted ? RESPONSE_TTL_MS : 3600_000)) continue;
          rmSync(path, { force: true });
          if (counted) this.#quota?.grew(-st.size);
        } catch {}
      }
    }
  }
}

const notFound = (id: string) =>
  new ApiError(
    "EM_GATEWAY_COMPLETION_NOT_FOUND",
    `no stored chat completion '${id.slice(0, 80)}' here: it was not stored (store: true), was deleted, pushed out by newer ones or expired, made with another API key, or by another gateway without a files folder they share`,
  );

/** `store: true` on a gateway that keeps none. */
export function storeOff(): ApiError {
  return new ApiError(
    "EM_GATEWAY_BAD_REQUEST",
    "this gateway keeps no chat completions (--responses-store 0): send store: false",
    { param: "store" },
  );
}

/** The request's messages as stored: ids `<id>-<index>`; parts' text as content too. */
export function storedMessages(id: string, messages: readonly object[]): StoredMessage[] {
  return messages.map((m, i) => {
    const { content, ...rest } = m as { role: string; content?: unknown };
    const parts = Array.isArray(content) ? (content as { type?: string; text?: string }[]) : null;
    return {
      id: `${id}-${i}`,
      ...rest,
      content: parts
        ? parts.map((p) => (p.type === "text" ? (p.text ?? "") : "")).join("")
        : (content ?? null),
      content_parts: parts,
    };
  });
}

interface ListQuery {
  after?: string;
  limit?: string;
  order?: string;
  model?: string;
  /** metadata[key]=value (the official clients' form), any number of them. */
  [k: string]: string | string[] | undefined;
}

const order = (v: string | undefined): "asc" | "desc" => {
  if (v === undefined || v === "asc" || v === "desc") return v ?? "asc";
  throw new ApiError("EM_GATEWAY_BAD_REQUEST", "order must be 'asc' or 'desc'", {
    param: "order",
  });
};

/** metadata[key]=value of a list's query: every pair must match. */
function metadataFilter(q: ListQuery): [string, string][] {
  const pairs: [string, string][] = [];
  for (const [k, v] of Object.entries(q)) {
    const m = /^metadata\[(.{1,64})\]$/.exec(k);
    if (!m) continue;
    if (typeof v !== "string")
      throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${k.slice(0, 80)} is given more than once`, {
        param: "metadata",
      });
    pairs.push([m[1]!, v]);
  }
  return pairs;
}

const UpdateBody = Type.Object({ metadata: Type.Union([Metadata, Type.Null()]) });

/**
 * A list's page: of `ids` (in the list's order) those from index `from` on, each loaded
 * (`load`: undefined when gone since, passed over) and kept when `keep` says so, `limit` at most.
 */
export function pageOf<T extends { id: string }>(
  ids: readonly string[],
  from: number,
  limit: number,
  load: (id: string) => T | undefined,
  keep: (x: T) => boolean = () => true,
) {
  const data: T[] = [];
  let hasMore = false;
  for (let i = from; i < ids.length; i++) {
    const x = load(ids[i]!);
    if (!x || !keep(x)) continue;
    if (data.length === limit) {
      hasMore = true;
      break;
    }
    data.push(x);
  }
  return {
    object: "list" as const,
    data,
    first_id: data[0]?.id ?? null,
    last_id: data.at(-1)?.id ?? null,
    has_more: hasMore,
  };
}

/**
 * Where a page of time-ordered `ids` (in the list's order) starts: past `after`, which need
 * not be there any more (deleted since): the first id made after it (asc), before it (desc).
 */
export function startAfter(ids: readonly string[], after: string | undefined, o: "asc" | "desc") {
  if (after === undefined) return 0;
  const at = ids.findIndex((id) => (o === "asc" ? id > after : id < after));
  return at < 0 ? ids.length : at;
}

/** GET /v1/chat/completions: a page of `owner`'s completions, of `model`, with every `metadata` pair. */
export function listCompletions(
  store: StoredCompletions,
  owner: string,
  q: {
    after?: string | undefined;
    order: "asc" | "desc";
    limit: number;
    model?: string | undefined;
    metadata?: readonly [string, string][];
  },
) {
  const ids = q.order === "asc" ? store.ids(owner) : store.ids(owner).reverse();
  const pairs = q.metadata ?? [];
  return pageOf(
    ids,
    startAfter(ids, q.after, q.order),
    q.limit,
    (id) => store.get(owner, id)?.completion,
    (c) =>
      (q.model === undefined || c.model === q.model) &&
      pairs.every(([k, v]) => c.metadata?.[k] === v),
  );
}

/** The routes of stored completions (POST /v1/chat/completions makes them: openai.ts). */
export function storedCompletionsRoutes(
  store: StoredCompletions,
  owner: (req: FastifyRequest) => string,
) {
  return async (app: FastifyInstance) => {
    const need = (req: FastifyRequest, id: string) => {
      const s = store.get(owner(req), id);
      if (!s) throw notFound(id);
      return s;
    };
    app.get<{ Querystring: ListQuery }>("/v1/chat/completions", async (req) => {
      const q = req.query;
      return listCompletions(store, owner(req), {
        after: q.after,
        order: order(q.order),
        limit: queryInt(q.limit, "limit", 20, 1, 100),
        model: typeof q.model === "string" ? q.model : undefined,
        metadata: metadataFilter(q),
      });
    });
    app.get<{ Params: { id: string } }>(
      "/v1/chat/completions/:id",
      async (req) => need(req, req.params.id).completion,
    );
    app.get<{ Params: { id: string }; Querystring: ListQuery }>(
      "/v1/chat/completions/:id/messages",
      async (req) => {
        const { messages } = need(req, req.params.id);
        const q = req.query;
        const ordered = order(q.order) === "asc" ? messages : [...messages].reverse();
        const at = q.after === undefined ? -1 : ordered.findIndex((m) => m.id === q.after);
        if (q.after !== undefined && at < 0)
          throw new ApiError(
            "EM_GATEWAY_BAD_REQUEST",
            `chat completion '${req.params.id.slice(0, 80)}' has no message '${q.after.slice(0, 80)}'`,
            { param: "after" },
          );
        const byId = new Map(ordered.map((m) => [m.id, m]));
        return pageOf(
          ordered.map((m) => m.id),
          at + 1,
          queryInt(q.limit, "limit", 20, 1, 100),
          (id) => byId.get(id),
        );
      },
    );
    app.post<{ Params: { id: string }; Body: { metadata: Record<string, string> | null } }>(
      "/v1/chat/completions/:id",
      { schema: { body: UpdateBody } },
      async (req) => {
        const s = need(req, req.params.id);
        const completion = { ...s.completion, metadata: req.body.metadata ?? {} };
        store.put({ ...s, completion });
        return completion;
      },
    );
    app.delete<{ Params: { id: string } }>("/v1/chat/completions/:id", async (req) => {
      if (!store.delete(owner(req), req.params.id)) throw notFound(req.params.id);
      return { object: "chat.completion.deleted", id: req.params.id, deleted: true };
    });
  };
}
