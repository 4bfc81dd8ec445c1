// OpenAI's Conversations API (/v1/conversations): a conversation's items (messages, tool
// calls and their outputs, reasoning) kept by the gateway. A Responses request that names
// one (`conversation`) continues it: its items come before the request's input, and the
// request's input and the response's output are added to it when the response ends
// (responses.ts; ADR 0053).
//
// A conversation is a log of records, folded into what it holds (`fold`): made (its id,
// time, metadata and owner), items added, metadata set, an item deleted. The logs are kept in
// the gateway's memory (the newest `capacity`, within a character budget), or in the files
// folder the gateways share (--files-dir: `<dir>/conversations/<id>.jsonl`, a record a line,
// each appended in one write), so that gateways adding to one conversation at once do not
// overwrite each other's items, and every gateway on the folder finds every conversation.
import { appendFileSync, closeSync, constants, openSync } from "node:fs";
import { join } from "node:path";
import { type Static, Type } from "@sinclair/typebox";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { makeDirs, readFrom, withDirLock } from "../util/fs.ts";
import { isObject } from "../util/objects.ts";
import { withInputFiles } from "./documents.ts";
import { ApiError } from "./errors.ts";
import { type FileStore, type FolderQuota, removeCounted } from "./files.ts";
import type { ServeContext } from "./jobs.ts";
import {
  checkItemIds,
  InputItem,
  type InputListItem,
  inputItemsOf,
  itemsPage,
  messagesOf,
  newId,
  type ResponsesRequest,
} from "./responses.ts";
import { Metadata } from "./schemas.ts";

/** A conversation's item (an input item, or a response's output item), with its id. */
export type ConversationItem = InputListItem;

/** What a conversation holds: its log folded. */
export interface Conversation {
  readonly id: string;
  readonly created_at: number;
  readonly metadata: Readonly<Record<string, string>>;
  /** Who made it (files.ts ownerOf of the request's key; "" without keys): only they find it. */
  readonly owner: string;
  readonly items: readonly ConversationItem[];
}

/** The most items a request adds at once (OpenAI's). */
export const MAX_ADDED_ITEMS = 20;

/** A conversation's log folded so far (what `foldInto` goes on from). */
export interface Folded {
  made: Omit<Conversation, "items">;
  metadata: Record<string, string>;
  items: ConversationItem[];
}

/**
 * A conversation's log lines (JSON records: {made}, then {items}, {metadata} or {deleted}
 * in the order written) folded on top of `state` (the lines before them, folded; undefined:
 * these are the first), which it changes; undefined when the first record is not the one
 * that made it. A line that does not parse (one two writers mixed) is passed over.
 */
export function foldInto(state: Folded | undefined, lines: readonly string[]): Folded | undefined {
  for (const line of lines) {
    let r: { made?: unknown; items?: unknown; metadata?: unknown; deleted?: unknown };
    try {
      r = JSON.parse(line) ?? {};
    } catch {
      continue;
    }
    if (state === undefined) {
      if (typeof r.made !== "object" || r.made === null) return undefined;
      const made = r.made as Omit<Conversation, "items">;
      state = { made, metadata: { ...made.metadata }, items: [] };
    } else if (Array.isArray(r.items)) state.items.push(...(r.items as ConversationItem[]));
    else if (typeof r.metadata === "object" && r.metadata !== null)
      state.metadata = r.metadata as Record<string, string>;
    else if (typeof r.deleted === "string")
      state.items = state.items.filter((i) => i.id !== r.deleted);
  }
  return state;
}

/** A whole log's lines folded into what the conversation holds. */
export function fold(lines: readonly string[]): Conversation | undefined {
  const s = foldInto(undefined, lines);
  return s && { ...s.made, metadata: s.metadata, items: s.items };
}

/** A log read from a cursor: its whole lines after it, and the cursor after them. */
export interface LogRead {
  lines: string[];
  cursor: number;
  /** The log is shorter than the cursor (not the one it was in): these lines are all of it. */
  restarted: boolean;
}

/** Where a gateway keeps conversations' logs: its memory, or the shared files folder. */
export interface ConversationLogs {
  /** Whether this gateway keeps any (a memory store of capacity 0 does not). */
  readonly keeps: boolean;
  /**
   * Conversation `id`'s log from `cursor` (0: its start; else a cursor an earlier read
   * gave), as its whole lines; undefined when it is not kept.
   */
  read(id: string, cursor: number): LogRead | undefined;
  /** Starts the log of a new conversation. */
  make(id: string, line: string): void;
  /** Adds a line to `id`'s log: false when it is not kept (deleted meanwhile). */
  append(id: string, line: string): boolean;
  remove(id: string): boolean;
  /** Why a conversation cannot grow now (a full folder); null when it can. */
  refusal(): ApiError | null;
}

/**
 * The logs of this gateway's newest `capacity` conversations, `maxChars` characters at most
 * (the least recently used out first; never the one written to).
 */
export class MemoryLogs implements ConversationLogs {
  readonly #logs = new Map<string, { lines: string[]; chars: number }>();
  readonly #capacity: number;
  readonly #maxChars: number;
  #chars = 0;

  constructor(capacity: number, maxChars = 64 * 2 ** 20) {
    this.#capacity = capacity;
    this.#maxChars = maxChars;
  }

  get keeps(): boolean {
    return this.#capacity > 0;
  }

  /** (the cursor: a count of lines) */
  read(id: string, cursor: number): LogRead | undefined {
    const log = this.#logs.get(id);
    if (!log) return undefined;
    this.#logs.delete(id); // (used: the newest)
    this.#logs.set(id, log);
    const restarted = cursor > log.lines.length;
    return {
      lines: log.lines.slice(restarted ? 0 : cursor),
      cursor: log.lines.length,
      restarted,
    };
  }

  make(id: string, line: string): void {
    this.#logs.set(id, { lines: [], chars: 0 });
    this.append(id, line);
  }

  append(id: string, line: string): boolean {
    const log = this.#logs.get(id);
    if (!log) return false;
    log.lines.push(line);
    log.chars += line.length;
    this.#chars += line.length;
    // (the oldest out first; never the one just written)
    for (const [old] of this.#logs) {
      if (this.#logs.size <= this.#capacity && this.#chars <= this.#maxChars) break;
      if (old !== id) this.remove(old);
    }
    return true;
  }

  remove(id: string): boolean {
    const log = this.#logs.get(id);
    if (!log) return false;
    this.#logs.delete(id);
    this.#chars -= log.chars;
    return true;
  }

  refusal(): ApiError | null {
    return null;
  }
}

/** The ids a gateway makes (newId("conv")): nothing else names a file here. */
const ID = /^conv_[0-9a-f]{24}$/;

/** Conversations' logs in the files folder: `<filesDir>/conversations/<id>.jsonl`. */
export class FolderLogs implements ConversationLogs {
  readonly keeps = true;
  readonly #dir: string;
  readonly #quota: FolderQuota | null;

  constructor(filesDir: string, quota: FolderQuota | null) {
    this.#dir = join(filesDir, "conversations");
    makeDirs(this.#dir);
    this.#quota = quota;
  }

  #path(id: string): string | null {
    return ID.test(id) ? join(this.#dir, `${id}.jsonl`) : null;
  }

  /**
   * (the cursor: a count of bytes) Reads only what was appended since `cursor`; a line still
   * being written (no line end yet) is left for the next read.
   */
  read(id: string, cursor: number): LogRead | undefined {
    const path = this.#path(id);
    if (!path) return undefined;
    let read = readFrom(path, cursor);
    const restarted = read !== undefined && read.size < cursor;
    if (restarted) read = readFrom(path, 0);
    if (!read) return undefined;
    const from = restarted ? 0 : cursor;
    const { bytes } = read;
    const whole = bytes.length === 0 ? 0 : bytes.lastIndexOf(10) + 1; // (10: a line end)
    const lines = whole === 0 ? [] : bytes.toString("utf8", 0, whole).split("\n").filter(Boolean);
    return { lines, cursor: from + whole, restarted };
  }

  make(id: string, line: string): void {
    const path = this.#path(id);
    if (!path) throw new Error(`not a conversation id: ${id}`);
    appendFileSync(path, `${line}\n`, { flag: "wx" });
    this.#quota?.grew(Buffer.byteLength(line) + 1);
  }

  append(id: string, line: string): boolean {
    const path = this.#path(id);
    if (!path) return false;
    // Under the conversation's lock, opened to closed: on NFS an append lands at the size
    // the client last saw, and reaches the server at the close, so two gateways appending at
    // once could write over each other's records (withDirLock).
    const added = withDirLock(`${path}.lock`, () => {
      let fd: number;
      try {
        fd = openSync(path, constants.O_WRONLY | constants.O_APPEND); // (not made again if gone)
      } catch {
        return false;
      }
      try {
        appendFileSync(fd, `${line}\n`); // (one write: a reader never sees half a record)
      } finally {
        closeSync(fd);
      }
      return true;
    });
    if (added) this.#quota?.grew(Buffer.byteLength(line) + 1);
    return added;
  }

  remove(id: string): boolean {
    const path = this.#path(id);
    return path !== null && removeCounted(path, this.#quota);
  }

  refusal(): ApiError | null {
    return this.#quota?.full() ? this.#quota.refusal("a conversation's items") : null;
  }
}

/** The most conversations kept folded (Conversations' cache), and the most log characters. */
const FOLDED_ENTRIES = 256;
const FOLDED_CHARS = 16 * 2 ** 20;

/**
 * The conversations of a gateway, whoever asks (the routes check the owner). The ones last
 * found are kept folded, with where their log was read to: the next find reads and folds only
 * the records appended since (by any gateway on the folder), not the whole log again.
 */
export class Conversations {
  readonly logs: ConversationLogs;
  readonly #folded = new Map<string, { cursor: number; state: Folded; chars: number }>();
  #foldedChars = 0;

  constructor(logs: ConversationLogs) {
    this.logs = logs;
  }

  /** Conversation `id` as `owner` finds it (another owner's is not there for them). */
  find(owner: string, id: string): Conversation | undefined {
    const hit = this.#folded.get(id);
    if (hit) this.#unfold(id);
    const read = this.logs.read(id, hit?.cursor ?? 0);
    if (!read) return undefined;
    const base = hit && !read.restarted ? hit : undefined;
    const state = foldInto(base?.state, read.lines);
    if (!state) return undefined;
    const chars = (base?.chars ?? 0) + read.lines.reduce((n, l) => n + l.length, 0);
    this.#folded.set(id, { cursor: read.cursor, state, chars });
    this.#foldedChars += chars;
    for (const [old] of this.#folded) {
      if (this.#folded.size <= FOLDED_ENTRIES && this.#foldedChars <= FOLDED_CHARS) break;
      this.#unfold(old);
    }
    if (state.made.owner !== owner) return undefined;
    // (copies: the folded state goes on changing)
    return { ...state.made, metadata: { ...state.metadata }, items: [...state.items] };
  }

  #unfold(id: string): void {
    const f = this.#folded.get(id);
    if (!f) return;
    this.#folded.delete(id);
    this.#foldedChars -= f.chars;
  }

  /** Conversation `id` as `owner` finds it; else 404 (about request field `param`). */
  need(owner: string, id: string, param: string | null = null): Conversation {
    const c = this.find(owner, id);
    if (!c) throw notFound(id, param);
    return c;
  }

  make(owner: string, metadata: Record<string, string>, items: ConversationItem[]): Conversation {
    if (!this.logs.keeps)
      throw new ApiError(
        "EM_GATEWAY_BAD_REQUEST",
        "this gateway keeps no conversations (--responses-store 0)",
      );
    const full = this.logs.refusal();
    if (full) throw full;
    const made = { id: newId("conv"), created_at: Math.floor(Date.now() / 1000), metadata, owner };
    this.logs.make(made.id, JSON.stringify({ made }));
    if (items.length > 0) this.logs.append(made.id, JSON.stringify({ items }));
    return { ...made, items };
  }

  /** Adds `items` to conversation `id` (refused while the folder is full): false when it is gone. */
  add(id: string, items: readonly ConversationItem[]): boolean {
    const full = this.logs.refusal();
    if (full) throw full;
    return this.append(id, items);
  }

  /** Adds `items` to conversation `id` whatever the folder holds (a response's, at its end). */
  append(id: string, items: readonly ConversationItem[]): boolean {
    return items.length === 0 || this.logs.append(id, JSON.stringify({ items }));
  }

  setMetadata(id: string, metadata: Record<string, string>): boolean {
    return this.logs.append(id, JSON.stringify({ metadata }));
  }

  deleteItem(id: string, itemId: string): boolean {
    return this.logs.append(id, JSON.stringify({ deleted: itemId }));
  }

  delete(id: string): boolean {
    this.#unfold(id);
    return this.logs.remove(id);
  }
}

/** A conversation as the API shows it. */
export function conversationObject(c: Conversation) {
  return { id: c.id, object: "conversation", created_at: c.created_at, metadata: c.metadata };
}

/**
 * Items a request adds (a conversation's first ones, or more), with ids; refused as a
 * Responses input would be (content a text model cannot read), naming `items`.
 */
function addedItems(
  items: readonly unknown[],
  held: ReadonlySet<string> = new Set(),
): ConversationItem[] {
  checkItemIds(items, held, "items");
  const added = inputItemsOf(items as ResponsesRequest["input"]);
  try {
    messagesOf(added);
  } catch (err) {
    if (err instanceof ApiError && err.param?.startsWith("input"))
      throw new ApiError(err.code, err.message.replace(/^input/, "items"), {
        param: err.param.replace(/^input/, "items"),
      });
    throw err;
  }
  return added;
}

const notFound = (id: string, param: string | null) =>
  new ApiError(
    "EM_GATEWAY_CONVERSATION_NOT_FOUND",
    `no conversation '${id.slice(0, 80)}' here: it was deleted, pushed out by newer ones, made with another API key, or on another gateway without a files folder they share`,
    { param },
  );

const CreateBody = Type.Object({
  items: Type.Optional(
    Type.Union([Type.Array(InputItem, { maxItems: MAX_ADDED_ITEMS }), Type.Null()]),
  ),
  metadata: Type.Optional(Type.Union([Metadata, Type.Null()])),
});
const UpdateBody = Type.Object({ metadata: Metadata });
const AddBody = Type.Object({
  items: Type.Array(InputItem, { minItems: 1, maxItems: MAX_ADDED_ITEMS }),
});
/** Query of the items list (OpenAI's: newest first unless order=asc; limit 1-100, 20). */
const ItemsQuery = Type.Object({
  limit: Type.Optional(Type.String({ pattern: "^(100|[1-9][0-9]?)$" })),
  order: Type.Optional(Type.Union([Type.Literal("asc"), Type.Literal("desc")])),
  after: Type.Optional(Type.String()),
  include: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String())])),
});
/** include on adding items (accepted: the items come back whole). */
const AddQuery = Type.Object({
  include: Type.Optional(Type.Union([Type.String(), Type.Array(Type.String())])),
});

type Params = { id: string };
type ItemParams = { id: string; item_id: string };

/**
 * The routes plugin; `owner` says who a request is (a conversation is found only by its
 * owner). With `files`, the items' input_file parts are read as text (documents.ts
 * withInputFiles), as a Responses input's are, and kept so.
 */
export function conversationsRoutes(
  conversations: Conversations,
  owner: (req: FastifyRequest) => string = () => "",
  files?: { ctx: ServeContext; store: FileStore | null },
) {
  const find = (req: FastifyRequest<{ Params: Params }>) =>
    conversations.need(owner(req), req.params.id);
  return async (app: FastifyInstance) => {
    if (files)
      app.addHook("preHandler", async (req) => {
        if (req.method === "POST" && isObject(req.body) && Array.isArray(req.body["items"]))
          req.body = await withInputFiles(
            files.ctx,
            req.body,
            { store: files.store, owner: owner(req) },
            "items",
          );
      });
    app.post<{ Body: Static<typeof CreateBody> }>(
      "/v1/conversations",
      { schema: { body: CreateBody } },
      async (req) =>
        conversationObject(
          conversations.make(owner(req), req.body.metadata ?? {}, addedItems(req.body.items ?? [])),
        ),
    );
    app.get<{ Params: Params }>("/v1/conversations/:id", async (req) =>
      conversationObject(find(req)),
    );
    app.post<{ Params: Params; Body: Static<typeof UpdateBody> }>(
      "/v1/conversations/:id",
      { schema: { body: UpdateBody } },
      async (req) => {
        const c = find(req);
        if (!conversations.setMetadata(c.id, req.body.metadata)) throw notFound(c.id, null);
        return conversationObject({ ...c, metadata: req.body.metadata });
      },
    );
    app.delete<{ Params: Params }>("/v1/conversations/:id", async (req) => {
      const c = find(req);
      if (!conversations.delete(c.id)) throw notFound(c.id, null);
      return { id: c.id, object: "conversation.deleted", deleted: true };
    });
    app.get<{ Params: Params; Querystring: Static<typeof ItemsQuery> }>(
      "/v1/conversations/:id/items",
      { schema: { querystring: ItemsQuery } },
      async (req) => itemsPage(find(req).items, req.query, `conversation '${req.params.id}'`),
    );
    app.post<{
      Params: Params;
      Body: Static<typeof AddBody>;
      Querystring: Static<typeof AddQuery>;
    }>(
      "/v1/conversations/:id/items",
      { schema: { body: AddBody, querystring: AddQuery } },
      async (req) => {
        const c = find(req);
        const added = addedItems(req.body.items, new Set(c.items.map((i) => i.id)));
        if (!conversations.add(c.id, added)) throw notFound(c.id, null);
        return itemsPage(added, { order: "asc", limit: "100" }, "");
      },
    );
    app.get<{ Params: ItemParams; Querystring: Static<typeof AddQuery> }>(
      "/v1/conversations/:id/items/:item_id",
      { schema: { querystring: AddQuery } },
      async (req) => {
        const item = find(req).items.find((i) => i.id === req.params.item_id);
        if (!item) throw itemNotFound(req.params.id, req.params.item_id);
        return item;
      },
    );
    app.delete<{ Params: ItemParams }>("/v1/conversations/:id/items/:item_id", async (req) => {
      const c = find(req);
      if (!c.items.some((i) => i.id === req.params.item_id))
        throw itemNotFound(c.id, req.params.item_id);
      if (!conversations.deleteItem(c.id, req.params.item_id)) throw notFound(c.id, null);
      return conversationObject(c);
    });
  };
}

const itemNotFound = (id: string, item: string) =>
  new ApiError(
    "EM_GATEWAY_CONVERSATION_NOT_FOUND",
    `conversation '${id.slice(0, 80)}' has no item '${item.slice(0, 80)}'`,
    { param: "item_id" },
  );
