// OpenAI's Files API, as far as batches need it (ADR 0049): a client uploads a batch's input
// (purpose "batch", JSONL) with POST /v1/files (multipart/form-data), and downloads the
// outputs a batch wrote (purpose "batch_output") with GET /v1/files/{id}/content; list, get
// and delete as OpenAI's. The files live in a folder (--files-dir), each as `<id>.data` beside
// `<id>.json` (its object and owner), read from there on every request: every gateway given
// the same folder (the operator's pods: a shared claim) serves every file, and they outlive a
// restart. With API keys, each key sees only the files uploaded with it (the owner is a hash
// of the key; no key: everyone's). A file expires as OpenAI's do: `expires_after` of the upload
// (purpose "batch": 30 days unless it says otherwise), a batch's `output_expires_after` for what
// it writes; an expired file is gone at once for the API and removed from the folder within a
// minute (a batch already made keeps its input: batches.ts links it).
import { createHash, randomBytes } from "node:crypto";
import {
  createReadStream,
  createWriteStream,
  readdirSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { type Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import multipart from "@fastify/multipart";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { ExpertMeshError } from "../util/errors.ts";
import { makeDirs, readJson, writeFileAtomic, writeJson } from "../util/fs.ts";
import { ApiError } from "./errors.ts";

/** Removes file `path` of a folder, its bytes counted out of `quota`; false when it was not there. */
export function removeCounted(path: string, quota: FolderQuota | null): boolean {
  try {
    const { size } = statSync(path);
    rmSync(path);
    quota?.grew(-size);
    return true;
  } catch {
    return false;
  }
}

/**
 * Writes `text` whole to file `path` of a folder (a temporary file renamed), the change in
 * its size counted into `quota`.
 */
export function writeCounted(path: string, text: string, quota: FolderQuota | null): void {
  let before = 0;
  try {
    before = statSync(path).size;
  } catch {}
  writeFileAtomic(path, text);
  quota?.grew(Buffer.byteLength(text) - before);
}

/**
 * How much a files folder (its files/, batches/, responses/, conversations/, uploads/ and
 * chat-completions/) may hold: uploads that would take it past
 * `maxBytes` are refused, batches are refused and their lines wait while it is full (an
 * emptyDir past its sizeLimit gets the pod evicted). The folder is walked (a file
 * hard-linked twice counted once) at start (`ready`: the app serves once it is counted), then
 * every 2 s, off the event loop (stat calls on libuv's threads: a walk of 10,000 files takes
 * ~100 ms), and what this process writes is counted as it writes it; another gateway's writes
 * to a shared folder count at the next walk.
 */
export class FolderQuota {
  readonly #root: string;
  readonly maxBytes: number;
  #used = 0;
  /** Bytes written since the walk under way began (it may or may not have seen them). */
  #grownDuring = 0;
  #walking = false;
  readonly #timer: NodeJS.Timeout;
  /** Settles once the folder is counted the first time. */
  readonly ready: Promise<void>;

  constructor(root: string, maxBytes: number, everyMs = 2000) {
    this.#root = root;
    this.maxBytes = maxBytes;
    this.ready = this.#refresh();
    this.#timer = setInterval(() => void this.#refresh(), everyMs);
    this.#timer.unref();
  }

  /** Stops walking (the gateway stops). */
  close(): void {
    clearInterval(this.#timer);
  }

  /** Bytes the folder holds: the last walk's count and what this process wrote since. */
  used(): number {
    return this.#used;
  }

  /** Counts `bytes` this process wrote to the folder (removed: negative). */
  grew(bytes: number): void {
    this.#used += bytes;
    this.#grownDuring += bytes;
  }

  /** Whether the folder holds maxBytes or more. */
  full(): boolean {
    return this.#used >= this.maxBytes;
  }

  /** The refusal of what would take the folder past maxBytes. */
  refusal(what: string): ApiError {
    return new ApiError(
      "EM_GATEWAY_FILES_FULL",
      `${what}: the files folder holds ${this.#used} of the ${this.maxBytes} bytes it may (--files-max-total; a manifest's spec.gateway.batch.storageBytes); delete files (DELETE /v1/files/{id}) or wait for some to expire`,
    );
  }

  async #refresh(): Promise<void> {
    if (this.#walking) return;
    this.#walking = true;
    this.#grownDuring = 0;
    try {
      const seen = new Set<string>();
      let sum = 0;
      const dirs = [
        "files",
        "batches",
        "responses",
        "conversations",
        "uploads",
        "chat-completions",
      ];
      for (let d = 0; d < dirs.length; d++) {
        const dir = join(this.#root, dirs[d]!);
        const names = await readdir(dir).catch(() => [] as string[]);
        for (let i = 0; i < names.length; i += 64) {
          const batch = names.slice(i, i + 64);
          const stats = await Promise.all(batch.map((n) => stat(join(dir, n)).catch(() => null)));
          for (const [k, st] of stats.entries()) {
            if (!st) continue;
            // (a folder of a folder walked: chat-completions/<owner>/, one level down only)
            if (st.isDirectory()) {
              if (!dirs[d]!.includes("/")) dirs.push(`${dirs[d]}/${batch[k]}`);
            } else sum += counted(seen, st);
          }
        }
      }
      // (writes during the walk: counted again when it saw them too, until the next walk)
      this.#used = sum + this.#grownDuring;
    } finally {
      this.#walking = false;
    }
  }
}

/** A file's size the first time its inode is seen (a hard link: 0 the second time). */
function counted(seen: Set<string>, st: { dev: number; ino: number; size: number }): number {
  const key = `${st.dev}:${st.ino}`;
  if (seen.has(key)) return 0;
  seen.add(key);
  return st.size;
}

/** A file as OpenAI's API describes it. */
export interface FileObject {
  id: string;
  object: "file";
  bytes: number;
  created_at: number;
  filename: string;
  purpose: FilePurpose;
  status: "processed";
  expires_at: number | null;
  status_details: null;
}

/**
 * "batch": a batch's input; "batch_output": what a batch wrote (made here, not uploaded);
 * "user_data": a file input_file parts (Responses) or Messages documents name (uploaded
 * with that purpose, or through Anthropic's Files API).
 */
export type FilePurpose = "batch" | "batch_output" | "user_data";

interface Stored {
  file: FileObject;
  /** ownerOf's value for the key that uploaded it ("" without keys). */
  owner: string;
  /** When it was made, in ms (the order of listings). */
  ms: number;
  /** Its media type, as uploaded (Anthropic's Files API keeps it). */
  mime?: string;
}

/** A file id as this store makes them (checked before any path is built from one). */
const FILE_ID = /^file-[0-9a-f]{24}$/;

/** Leftovers (an upload cut short, a half-made file) older than this are removed. */
const LEFTOVER_MS = 3600_000;
/** How often a files folder's stores are swept (expired objects, leftovers). */
const SWEEP_MS = 60_000;

/**
 * Runs `sweep` every SWEEP_MS (a timer that keeps no process alive; clearInterval stops it):
 * a sweep that throws (the folder unreadable for a moment) is tried again at the next.
 */
export function sweepEvery(sweep: () => void): NodeJS.Timeout {
  const timer = setInterval(() => {
    try {
      sweep();
    } catch {
      // (the next sweep)
    }
  }, SWEEP_MS);
  timer.unref();
  return timer;
}
/** An upload of purpose "batch" without expires_after expires after this (OpenAI's 30 days). */
export const BATCH_FILE_TTL_S = 30 * 24 * 3600;
/** The bounds of `expires_after.seconds` (OpenAI's: an hour to 30 days). */
const TTL_MIN_S = 3600;
const TTL_MAX_S = 30 * 24 * 3600;

/**
 * An `expires_after` ({anchor: "created_at", seconds}: OpenAI's expiration policy) as seconds
 * after the file is made; undefined when not given. `param` names it in the 400.
 */
export function expiresAfter(v: unknown, param: string): number | undefined {
  if (v === undefined) return undefined;
  const o =
    typeof v === "object" && v !== null && !Array.isArray(v)
      ? (v as Record<string, unknown>)
      : null;
  const seconds = o?.["seconds"];
  if (
    o === null ||
    o["anchor"] !== "created_at" ||
    typeof seconds !== "number" ||
    !Number.isInteger(seconds) ||
    seconds < TTL_MIN_S ||
    seconds > TTL_MAX_S ||
    Object.keys(o).some((k) => k !== "anchor" && k !== "seconds")
  )
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${param} is {"anchor": "created_at", "seconds": N}, N an integer from ${TTL_MIN_S} (an hour) to ${TTL_MAX_S} (30 days)`,
      { param },
    );
  return seconds;
}

let lastMade = 0;
/**
 * When an object is made, in ms, for the order of lists: later than the last one this
 * process made (two made in one millisecond keep their order).
 */
export function madeAt(): number {
  lastMade = Math.max(Date.now(), lastMade + 1);
  return lastMade;
}

/** Who a request is, for the files and batches it may see: a hash of its key ("" none). */
export function ownerOf(key: string | null): string {
  return key === null ? "" : createHash("sha256").update(key).digest("hex").slice(0, 32);
}

/**
 * Makes `dir` (the gateway's --files-dir) and checks that it can be written, at start, before
 * the weights load: EM_FILES_DIR otherwise.
 */
export function checkFilesDir(dir: string): void {
  try {
    makeDirs(join(dir, "files"));
    makeDirs(join(dir, "batches"));
    const probe = join(dir, `.probe-${randomBytes(4).toString("hex")}`);
    writeFileSync(probe, "");
    rmSync(probe);
  } catch (err) {
    throw new ExpertMeshError(
      "EM_FILES_DIR",
      `--files-dir ${dir} cannot be made or written: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

export class FileStore {
  readonly #dir: string;
  /** Files read before (they never change; one deleted elsewhere is looked for on disk). */
  readonly #known = new Map<string, Stored>();
  /** Largest upload (bytes). */
  readonly maxBytes: number;
  /** How much the folder may hold (null: no bound). */
  readonly quota: FolderQuota | null;

  readonly #sweeper: NodeJS.Timeout;

  /**
   * Makes the folder and sweeps it now and every minute: expired files and leftovers older than
   * an hour (a shared folder's too) are removed.
   */
  constructor(dir: string, maxBytes: number, quota: FolderQuota | null = null) {
    this.#dir = dir;
    this.maxBytes = maxBytes;
    this.quota = quota;
    makeDirs(dir);
    this.sweep();
    this.#sweeper = sweepEvery(() => this.sweep());
  }

  /** Stops sweeping and counting (the gateway stops). */
  close(): void {
    clearInterval(this.#sweeper);
    this.quota?.close();
  }

  /** Removes expired files and leftovers (an upload cut short, a half-made file) of an hour. */
  sweep(): void {
    const names = new Set(readdirSync(this.#dir));
    const t = Date.now();
    for (const name of names) {
      const path = join(this.#dir, name);
      try {
        if (name.endsWith(".json")) {
          const id = name.slice(0, -5);
          const stored = this.#stored(id);
          if (stored && expired(stored.file, t)) this.#remove(id);
          continue;
        }
        const leftover =
          name.endsWith(".tmp") ||
          (name.endsWith(".data") && !names.has(name.replace(/\.data$/, ".json")));
        if (leftover && t - statSync(path).mtimeMs > LEFTOVER_MS) rmSync(path, { force: true });
      } catch {
        // (removed by another gateway meanwhile)
      }
    }
  }

  /** The path of a file's content. */
  path(id: string): string {
    return join(this.#dir, `${id}.data`);
  }

  /** File `id` (undefined: none such, or it expired). */
  #read(id: string): Stored | undefined {
    const s = this.#stored(id);
    return s && !expired(s.file, Date.now()) ? s : undefined;
  }

  #stored(id: string): Stored | undefined {
    if (!FILE_ID.test(id)) return undefined;
    const meta = join(this.#dir, `${id}.json`);
    const known = this.#known.get(id);
    if (known) {
      try {
        statSync(meta);
        return known;
      } catch {
        this.#known.delete(id);
        return undefined;
      }
    }
    const stored = readJson<Stored>(meta);
    if (stored?.file?.id !== id) return undefined;
    this.#known.set(id, stored);
    return stored;
  }

  /** The file `id` as `owner` may see it; 404 otherwise (another key's is not there for it). */
  get(owner: string, id: string, param = "file_id"): FileObject {
    const stored = this.#read(id);
    if (!stored || stored.owner !== owner)
      throw new ApiError("EM_GATEWAY_FILE_NOT_FOUND", `no file '${id.slice(0, 80)}' here`, {
        param,
      });
    return stored.file;
  }

  /** The file `id` as `owner` may see it, with its media type (null: none kept); else 404. */
  meta(owner: string, id: string, param = "file_id"): { file: FileObject; mime: string | null } {
    const file = this.get(owner, id, param);
    return { file, mime: this.#read(id)?.mime ?? null };
  }

  /** `owner`'s files (of `purpose`), oldest first. */
  list(owner: string, purpose?: string): FileObject[] {
    return readdirSync(this.#dir)
      .filter((n) => n.endsWith(".json"))
      .map((n) => this.#read(n.slice(0, -5)))
      .filter(
        (s): s is Stored =>
          s !== undefined &&
          s.owner === owner &&
          (purpose === undefined || s.file.purpose === purpose),
      )
      .sort((a, b) => a.ms - b.ms || (a.file.id < b.file.id ? -1 : 1))
      .map((s) => s.file);
  }

  /**
   * Stores the stream's bytes as a new file (refused past maxBytes, then nothing is kept) that
   * expires `ttlS` seconds after (null: never).
   */
  async upload(
    owner: string,
    content: Readable,
    filename: string,
    purpose: FilePurpose,
    ttlS: number | null,
  ): Promise<FileObject> {
    const got = await this.receive(content);
    return this.adopt(owner, got, filename, purpose, ttlS);
  }

  /**
   * Writes the stream's bytes to a file of this folder, not a file of the store yet (adopt
   * makes it one, else it is removed as a leftover); refused past maxBytes (the multipart
   * limit cut it: `truncated`'s refusal), past `limit` bytes (`tooLarge`'s) or past the
   * folder's room, nothing kept.
   */
  async receive(
    content: Readable,
    o: { limit?: number; tooLarge?: () => ApiError; truncated?: () => ApiError } = {},
  ): Promise<string> {
    const room = this.quota === null ? Infinity : this.quota.maxBytes - this.quota.used();
    const limit = o.limit ?? Infinity;
    const cut = o.truncated ?? (() => tooLarge(this.maxBytes));
    if (room <= 0) {
      content.resume();
      throw this.quota!.refusal("no upload fits");
    }
    const tmp = join(this.#dir, `upload-${randomBytes(12).toString("hex")}.tmp`);
    let bytes = 0;
    const count = new Transform({
      transform: (chunk: Buffer, _, done) => {
        bytes += chunk.length;
        if (bytes > room) done(this.quota!.refusal(`the upload does not fit (${room} bytes left)`));
        else if (bytes > limit) done(o.tooLarge!());
        else done(null, chunk);
      },
    });
    try {
      await pipeline(content, count, createWriteStream(tmp));
      if ((content as { truncated?: boolean }).truncated) throw cut();
    } catch (err) {
      rmSync(tmp, { force: true });
      content.resume(); // (the rest of the request read and dropped)
      if ((err as { code?: string }).code === "FST_REQ_FILE_TOO_LARGE") throw cut();
      throw err;
    }
    this.quota?.grew(bytes);
    return tmp;
  }

  /**
   * Makes the finished file at `path` (in this folder's filesystem) a file of `owner`'s, that
   * expires `ttlS` seconds after (null: never).
   */
  adopt(
    owner: string,
    path: string,
    filename: string,
    purpose: FilePurpose,
    ttlS: number | null,
    mime?: string,
  ): FileObject {
    const id = `file-${randomBytes(12).toString("hex")}`;
    const bytes = statSync(path).size;
    return this.#keep(owner, id, path, {
      filename,
      purpose,
      bytes,
      ttlS,
      ...(mime ? { mime } : {}),
    });
  }

  #keep(
    owner: string,
    id: string,
    from: string,
    f: {
      filename: string;
      purpose: FilePurpose;
      bytes: number;
      ttlS: number | null;
      mime?: string;
    },
  ): FileObject {
    const ms = madeAt();
    const created = Math.floor(ms / 1000);
    const file: FileObject = {
      id,
      object: "file",
      bytes: f.bytes,
      created_at: created,
      filename: f.filename,
      purpose: f.purpose,
      status: "processed",
      expires_at: f.ttlS === null ? null : created + f.ttlS,
      status_details: null,
    };
    renameSync(from, this.path(id));
    const stored: Stored = { file, owner, ms, ...(f.mime ? { mime: f.mime } : {}) };
    writeJson(join(this.#dir, `${id}.json`), stored);
    this.#known.set(id, stored);
    return file;
  }

  /** Removes `owner`'s file `id` (404 when it has none such). */
  delete(owner: string, id: string): void {
    this.get(owner, id);
    this.#remove(id);
  }

  #remove(id: string): void {
    this.#known.delete(id);
    let freed = 0;
    for (const path of [join(this.#dir, `${id}.json`), this.path(id)]) {
      try {
        // (a content a batch still links to frees nothing yet)
        const st = statSync(path);
        if (st.nlink === 1) freed += st.size;
      } catch {
        continue; // (removed meanwhile)
      }
      rmSync(path, { force: true });
    }
    // Room made now, not at the next walk: an upload right after a delete fits.
    this.quota?.grew(-freed);
  }
}

/** Whether `file` has expired at `ms`. */
const expired = (file: FileObject, ms: number) =>
  file.expires_at !== null && file.expires_at * 1000 <= ms;

const tooLarge = (max: number) =>
  new ApiError(
    "EM_GATEWAY_FILE_TOO_LARGE",
    `the file is larger than this gateway takes (${max} bytes; --files-max-bytes)`,
    { param: "file" },
  );

/** The refusal of a gateway that keeps no files (no --files-dir). */
export function filesOff(): ApiError {
  return new ApiError(
    "EM_GATEWAY_FILES_OFF",
    "this gateway keeps no files, so it runs no batches: start it with --files-dir (a manifest: spec.gateway.batch)",
  );
}

/**
 * The refusal of a multipart/form-data body the form parser failed on (`err`): its 4xx
 * status (else 400); `tooLarge`: a 413 as EM_GATEWAY_FILE_TOO_LARGE.
 */
export function notWholeForm(
  err: unknown,
  what: string,
  o: { param?: string; tooLarge?: boolean } = {},
): ApiError {
  const status = (err as { statusCode?: number }).statusCode;
  return new ApiError(
    o.tooLarge && status === 413 ? "EM_GATEWAY_FILE_TOO_LARGE" : "EM_GATEWAY_BAD_REQUEST",
    `${what} is not a whole multipart/form-data body: ${(err as Error).message}`,
    {
      status: status !== undefined && status >= 400 && status < 500 ? status : 400,
      ...(o.param !== undefined ? { param: o.param } : {}),
    },
  );
}

interface ListQuery {
  purpose?: string;
  after?: string;
  limit?: string;
  order?: string;
}

/**
 * One page of an OpenAI list (`all` in the list's order): the objects after the one whose id
 * is `after` (none when no object has it), at most `limit`.
 */
export function listPage<T extends { id: string }>(
  all: T[],
  after: string | undefined,
  limit: number,
) {
  const from = after === undefined ? 0 : all.findIndex((x) => x.id === after) + 1;
  const rest = after !== undefined && from === 0 ? [] : all.slice(from);
  const data = rest.slice(0, limit);
  return {
    object: "list" as const,
    data,
    first_id: data[0]?.id ?? null,
    last_id: data.at(-1)?.id ?? null,
    has_more: rest.length > limit,
  };
}

/** An integer query parameter in [lo, hi] (default `d`). */
export function queryInt(v: string | undefined, name: string, d: number, lo: number, hi: number) {
  if (v === undefined) return d;
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < lo || n > hi)
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `${name} must be an integer from ${lo} to ${hi}, got '${v.slice(0, 40)}'`,
      { param: name },
    );
  return n;
}

/**
 * A request of Anthropic's Files API (beta files-api-2025-04-14) rather than OpenAI's: the
 * same routes, told apart by the header every Anthropic client sends.
 */
const anthropic = (req: FastifyRequest) => req.headers["anthropic-version"] !== undefined;

/** A file as Anthropic's Files API describes it. */
export function anthropicFile(file: FileObject, mime: string | null) {
  return {
    id: file.id,
    type: "file",
    filename: file.filename,
    mime_type: mime ?? "application/octet-stream",
    size_bytes: file.bytes,
    created_at: new Date(file.created_at * 1000).toISOString(),
    // (what was uploaded can be downloaded here; Anthropic's own are tools' outputs only)
    downloadable: true,
  };
}

interface AnthropicListQuery {
  limit?: string;
  /** The cursor of the page after (next_page: the id of the last one listed). */
  page?: string;
  after_id?: string;
  before_id?: string;
  /** Only these files (the SDK sends ids[]=...). */
  ids?: string | string[];
  "ids[]"?: string | string[];
}

/**
 * One page of an Anthropic list (`all` newest first): after the object `page` or `after_id`
 * (older), or before `before_id` (newer), at most `limit`; `ids`: only those (one page).
 * Both pagings' fields: `next_page` (the SDK's cursor), and `has_more`, `first_id`, `last_id`.
 */
export function anthropicPage<T extends { id: string }>(all: T[], q: AnthropicListQuery) {
  const limit = queryInt(q.limit, "limit", 20, 1, 1000);
  const after = q.page ?? q.after_id;
  if (after !== undefined && q.before_id !== undefined)
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", "give page (or after_id) or before_id, not both", {
      param: "before_id",
    });
  const ids = [q.ids ?? [], q["ids[]"] ?? []].flat();
  let rest: T[];
  let data: T[];
  if (ids.length > 0) {
    const wanted = new Set(ids);
    rest = data = all.filter((x) => wanted.has(x.id));
  } else if (q.before_id !== undefined) {
    const at = all.findIndex((x) => x.id === q.before_id);
    rest = at < 0 ? [] : all.slice(0, at);
    data = rest.slice(-limit);
  } else {
    const at = after === undefined ? -1 : all.findIndex((x) => x.id === after);
    rest = after !== undefined && at < 0 ? [] : all.slice(at + 1);
    data = rest.slice(0, limit);
  }
  const more = ids.length === 0 && rest.length > data.length;
  const lastId = data.at(-1)?.id ?? null;
  return {
    data,
    next_page: more && q.before_id === undefined ? lastId : null,
    has_more: more,
    first_id: data[0]?.id ?? null,
    last_id: lastId,
  };
}

/**
 * The routes plugin. `store` null: every route refuses (filesOff). `owner`: who a request is
 * (ownerOf of its key). A request of Anthropic's Files API (anthropic) gets its shapes: an
 * upload is a file alone (purpose "user_data", never expiring, its media type kept, for
 * Messages documents to name), listings are of those files.
 */
export function filesRoutes(store: FileStore | null, owner: (req: FastifyRequest) => string) {
  return async (app: FastifyInstance) => {
    const files = () => {
      if (store === null) throw filesOff();
      return store;
    };
    // Multipart uploads on this plugin's routes alone; a file past the limit is refused.
    await app.register(multipart, {
      limits: { fileSize: store?.maxBytes ?? 0, files: 1, fields: 8, parts: 16 },
    });
    app.post("/v1/files", async (req) => {
      const s = files();
      if (!req.isMultipart())
        throw new ApiError(
          "EM_GATEWAY_BAD_REQUEST",
          "POST /v1/files takes multipart/form-data with a 'file' and its 'purpose'",
        );
      let received: { tmp: string; filename: string; mime: string } | undefined;
      let purpose: unknown;
      // expires_after as a form sends it: expires_after[anchor], expires_after[seconds]
      const expires: Record<string, unknown> = {};
      try {
        for await (const part of req.parts()) {
          if (part.type === "file") {
            if (part.fieldname !== "file" || received) {
              part.file.resume();
              throw new ApiError(
                "EM_GATEWAY_BAD_REQUEST",
                `one file, in the field 'file', is taken (got '${part.fieldname.slice(0, 40)}')`,
                { param: part.fieldname.slice(0, 40) },
              );
            }
            // (the other fields may come after the file: the file is kept once all are read)
            const tmp = await s.receive(part.file);
            received = { tmp, filename: part.filename || "upload", mime: part.mimetype };
          } else if (part.fieldname === "purpose") purpose = part.value;
          else {
            const m = /^expires_after\[(\w{1,20})\]$/.exec(part.fieldname);
            if (m) {
              const v = String(part.value);
              expires[m[1]!] = m[1] === "seconds" && /^\d{1,12}$/.test(v) ? Number(v) : v;
            }
          }
        }
        if (anthropic(req)) {
          if (!received)
            throw new ApiError("EM_GATEWAY_BAD_REQUEST", "no 'file' in the form", {
              param: "file",
            });
          const { tmp, filename, mime } = received;
          const file = s.adopt(owner(req), tmp, filename, "user_data", null, mime);
          received = undefined;
          return anthropicFile(file, mime);
        }
        if (purpose !== "batch" && purpose !== "user_data")
          throw new ApiError(
            "EM_GATEWAY_BAD_REQUEST",
            purpose === undefined
              ? "purpose is required: 'batch' or 'user_data' (the ones this gateway takes)"
              : `purpose ${JSON.stringify(purpose).slice(0, 60)} is not taken here: 'batch' (a batch's input) or 'user_data' (a file input_file parts name) is`,
            { param: "purpose" },
          );
        if (!received)
          throw new ApiError("EM_GATEWAY_BAD_REQUEST", "no 'file' in the form", { param: "file" });
        // (batch inputs expire after 30 days unless asked otherwise, user data never)
        const ttl =
          expiresAfter(Object.keys(expires).length > 0 ? expires : undefined, "expires_after") ??
          (purpose === "batch" ? BATCH_FILE_TTL_S : null);
        const { tmp, filename, mime } = received;
        const file = s.adopt(owner(req), tmp, filename, purpose, ttl, mime);
        received = undefined;
        return file;
      } catch (err) {
        // Nothing of a refused upload is kept.
        if (received) rmSync(received.tmp, { force: true });
        if (err instanceof ApiError) throw err;
        throw notWholeForm(err, "the upload", { tooLarge: true });
      }
    });
    app.get<{ Querystring: ListQuery }>("/v1/files", async (req) => {
      if (anthropic(req)) {
        const s = files();
        const all = s.list(owner(req), "user_data").reverse();
        const page = anthropicPage(all, req.query as AnthropicListQuery);
        return {
          ...page,
          data: page.data.map((f) => anthropicFile(f, s.meta(owner(req), f.id).mime)),
        };
      }
      const q = req.query;
      const order = q.order ?? "desc";
      if (order !== "asc" && order !== "desc")
        throw new ApiError("EM_GATEWAY_BAD_REQUEST", "order must be 'asc' or 'desc'", {
          param: "order",
        });
      const all = files().list(owner(req), q.purpose);
      if (order === "desc") all.reverse();
      return listPage(all, q.after, queryInt(q.limit, "limit", 10_000, 1, 10_000));
    });
    app.get<{ Params: { id: string } }>("/v1/files/:id", async (req) => {
      if (!anthropic(req)) return files().get(owner(req), req.params.id);
      const { file, mime } = files().meta(owner(req), req.params.id);
      return anthropicFile(file, mime);
    });
    app.get<{ Params: { id: string } }>("/v1/files/:id/content", async (req, reply) => {
      const s = files();
      s.get(owner(req), req.params.id);
      reply.header("content-type", "application/octet-stream");
      return reply.send(createReadStream(s.path(req.params.id)));
    });
    app.delete<{ Params: { id: string } }>("/v1/files/:id", async (req) => {
      files().delete(owner(req), req.params.id);
      if (anthropic(req)) return { id: req.params.id, type: "file_deleted" };
      return { id: req.params.id, object: "file", deleted: true };
    });
  };
}
