// OpenAI's Uploads API (ADR 0059): a file sent in parts, for a batch input too large to send
// in one request (or over a link that drops): POST /v1/uploads says its size, name and
// purpose; POST /v1/uploads/{id}/parts adds a part (multipart/form-data, field `data`, up to
// 64 MiB); POST /v1/uploads/{id}/complete names the parts in order (and may give the whole's
// MD5), which then become one file of the Files API (files.ts); POST .../cancel drops them.
//
// An upload lives in the files folder (`uploads/<id>.json` and `uploads/<id>.<part>.part`),
// so parts sent to different gateways of a shared folder make one file, and a restart loses
// none. A pending upload expires an hour after it was made (its parts removed by the sweep),
// as OpenAI's do; each API key sees its own (files.ts ownerOf).
import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  createReadStream,
  openSync,
  readdirSync,
  renameSync,
  rmSync,
  statSync,
} from "node:fs";
import { join } from "node:path";
import { Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import multipart from "@fastify/multipart";
import { type Static, Type } from "@sinclair/typebox";
import type { FastifyInstance, FastifyRequest } from "fastify";
import { makeDirs, readJson, writeJson } from "../util/fs.ts";
import { ApiError } from "./errors.ts";
import {
  BATCH_FILE_TTL_S,
  expiresAfter,
  type FileObject,
  type FileStore,
  filesOff,
  madeAt,
  notWholeForm,
  removeCounted,
  sweepEvery,
} from "./files.ts";

/** An upload as OpenAI's API describes it. */
export interface UploadObject {
  id: string;
  object: "upload";
  bytes: number;
  created_at: number;
  expires_at: number;
  filename: string;
  purpose: string;
  status: "pending" | "completed" | "cancelled" | "expired";
  file: FileObject | null;
}

interface StoredUpload {
  upload: UploadObject;
  /** ownerOf's value for the key that made it ("" without keys). */
  owner: string;
  mime_type: string;
  /** When the file it makes expires, seconds after it is made. */
  file_ttl_s: number;
}

/** The largest part (OpenAI's 64 MB). */
export const PART_MAX_BYTES = 64 * 2 ** 20;
/** A pending upload expires this long after it was made (OpenAI's hour). */
export const UPLOAD_TTL_S = 3600;
/** An upload that has ended (completed, cancelled, expired) is forgotten this long after its expiry. */
const FORGET_AFTER_S = 3600;

const UPLOAD_ID = /^upload_[0-9a-f]{24}$/;
const PART_ID = /^part_[0-9a-f]{24}$/;

const notFound = (id: string) =>
  new ApiError("EM_GATEWAY_UPLOAD_NOT_FOUND", `no upload '${id.slice(0, 80)}' here`, {
    param: "upload_id",
  });

const bad = (message: string, param: string) =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });

/** The uploads of a files folder; `files` makes the file a completed upload becomes. */
export class Uploads {
  readonly #dir: string;
  readonly #files: FileStore;
  readonly #sweeper: NodeJS.Timeout;

  constructor(dir: string, files: FileStore) {
    this.#dir = dir;
    this.#files = files;
    makeDirs(dir);
    this.#sweeper = sweepEvery(() => this.sweep());
  }

  close(): void {
    clearInterval(this.#sweeper);
  }

  /** The largest upload: the largest file (--files-max-bytes). */
  get maxBytes(): number {
    return this.#files.maxBytes;
  }

  #meta(id: string): string {
    return join(this.#dir, `${id}.json`);
  }

  #part(id: string, part: string): string {
    return join(this.#dir, `${id}.${part}.part`);
  }

  /** Upload `id` as stored, its status "expired" once a pending one has outlived its hour. */
  #read(id: string): StoredUpload | undefined {
    if (!UPLOAD_ID.test(id)) return undefined;
    const s = readJson<StoredUpload>(this.#meta(id));
    if (s?.upload?.id !== id) return undefined;
    if (s.upload.status === "pending" && s.upload.expires_at * 1000 <= Date.now())
      s.upload.status = "expired";
    return s;
  }

  /** `owner`'s upload `id`; 404 otherwise. */
  #get(owner: string, id: string): StoredUpload {
    const s = this.#read(id);
    if (!s || s.owner !== owner) throw notFound(id);
    return s;
  }

  /** `owner`'s upload `id`, refused (409) unless it still takes parts. */
  #pending(owner: string, id: string, doing: string): StoredUpload {
    const s = this.#get(owner, id);
    if (s.upload.status !== "pending")
      throw new ApiError(
        "EM_GATEWAY_UPLOAD_STATE",
        `upload '${id}' is ${s.upload.status}: it cannot ${doing}`,
        { param: "upload_id" },
      );
    return s;
  }

  /** The parts of upload `id` in the folder, by part id, with their sizes. */
  #parts(id: string): Map<string, number> {
    const parts = new Map<string, number>();
    const prefix = `${id}.`;
    for (const name of readdirSync(this.#dir)) {
      if (!name.startsWith(prefix) || !name.endsWith(".part")) continue;
      const part = name.slice(prefix.length, -".part".length);
      try {
        parts.set(part, statSync(join(this.#dir, name)).size);
      } catch {
        // (removed meanwhile)
      }
    }
    return parts;
  }

  #removeParts(id: string): void {
    for (const part of this.#parts(id).keys())
      removeCounted(this.#part(id, part), this.#files.quota);
  }

  /** A new pending upload of `owner`'s. */
  create(owner: string, b: UploadCreate): UploadObject {
    if (b.purpose !== "batch")
      throw bad(
        `purpose ${JSON.stringify(b.purpose).slice(0, 60)} is not taken here: 'batch' is (this gateway keeps files for batches)`,
        "purpose",
      );
    if (b.bytes > this.maxBytes)
      throw new ApiError(
        "EM_GATEWAY_FILE_TOO_LARGE",
        `an upload of ${b.bytes} bytes makes a file larger than this gateway takes (${this.maxBytes} bytes; --files-max-bytes)`,
        { param: "bytes" },
      );
    const quota = this.#files.quota;
    if (quota && quota.used() + b.bytes > quota.maxBytes)
      throw quota.refusal(`an upload of ${b.bytes} bytes`);
    const fileTtl = expiresAfter(b.expires_after, "expires_after") ?? BATCH_FILE_TTL_S;
    const created = Math.floor(madeAt() / 1000);
    const upload: UploadObject = {
      id: `upload_${randomBytes(12).toString("hex")}`,
      object: "upload",
      bytes: b.bytes,
      created_at: created,
      expires_at: created + UPLOAD_TTL_S,
      filename: b.filename,
      purpose: b.purpose,
      status: "pending",
      file: null,
    };
    const stored: StoredUpload = { upload, owner, mime_type: b.mime_type, file_ttl_s: fileTtl };
    writeJson(this.#meta(upload.id), stored);
    return upload;
  }

  /**
   * Adds the stream's bytes as a part of `owner`'s pending upload `id`: at most
   * PART_MAX_BYTES, and not past the bytes the upload was made with.
   */
  async addPart(owner: string, id: string, data: NodeJS.ReadableStream & { truncated?: boolean }) {
    const s = this.#pending(owner, id, "take more parts");
    let held = 0;
    for (const size of this.#parts(id).values()) held += size;
    const room = s.upload.bytes - held;
    const tmp = await this.#files.receive(data as never, {
      limit: room,
      tooLarge: () =>
        bad(
          `the part takes the upload past the ${s.upload.bytes} bytes it was made with (its parts hold ${held})`,
          "data",
        ),
      truncated: () =>
        bad(`a part is at most ${Math.min(PART_MAX_BYTES, this.maxBytes)} bytes`, "data"),
    });
    const part = `part_${randomBytes(12).toString("hex")}`;
    try {
      // (an upload ended meanwhile takes it no more: the sweep would remove it anyway)
      this.#pending(owner, id, "take more parts");
      renameSync(tmp, this.#part(id, part)); // (the same filesystem: still counted)
    } catch (err) {
      removeCounted(tmp, this.#files.quota);
      throw err;
    }
    return {
      id: part,
      object: "upload.part" as const,
      created_at: Math.floor(Date.now() / 1000),
      upload_id: id,
    };
  }

  /**
   * Completes `owner`'s upload `id`: its parts `partIds`, in that order, become one file
   * (their bytes must be the upload's; `md5`, when given, their MD5); the other parts go.
   */
  async complete(owner: string, id: string, partIds: readonly string[], md5?: string) {
    const s = this.#pending(owner, id, "be completed");
    if (md5 !== undefined && !/^[0-9a-fA-F]{32}$/.test(md5))
      throw bad("md5 is 32 hexadecimal digits (the MD5 of the whole file)", "md5");
    const parts = this.#parts(id);
    const seen = new Set<string>();
    let total = 0;
    for (const [i, p] of partIds.entries()) {
      if (!PART_ID.test(p) || !parts.has(p))
        throw bad(`upload '${id}' has no part '${p.slice(0, 80)}'`, `part_ids.${i}`);
      if (seen.has(p)) throw bad(`part '${p}' is named twice`, `part_ids.${i}`);
      seen.add(p);
      total += parts.get(p)!;
    }
    if (total !== s.upload.bytes)
      throw bad(
        `the parts named hold ${total} bytes; the upload was made with bytes ${s.upload.bytes}`,
        "part_ids",
      );
    // One completion at a time, whichever gateway of the folder it reaches.
    const marker = join(this.#dir, `${id}.completing`);
    let fd: number;
    try {
      fd = openSync(marker, "wx");
    } catch {
      throw new ApiError("EM_GATEWAY_UPLOAD_STATE", `upload '${id}' is being completed`, {
        param: "upload_id",
      });
    }
    closeSync(fd);
    try {
      const hash = createHash("md5");
      const tmp = await this.#files.receive(
        concatenated(partIds.map((p) => this.#part(id, p))).pipe(
          new Transform({
            transform: (chunk: Buffer, _, done) => {
              hash.update(chunk);
              done(null, chunk);
            },
          }),
        ) as never,
      );
      const digest = hash.digest("hex");
      if (md5 !== undefined && digest !== md5.toLowerCase()) {
        removeCounted(tmp, this.#files.quota);
        throw bad(`md5 ${md5} is not the parts' (${digest})`, "md5");
      }
      const file = this.#files.adopt(owner, tmp, s.upload.filename, "batch", s.file_ttl_s);
      const upload: UploadObject = { ...s.upload, status: "completed", file };
      writeJson(this.#meta(id), { ...s, upload });
      this.#removeParts(id); // (listed again: parts that came during the copy go too)
      return upload;
    } finally {
      rmSync(marker, { force: true });
    }
  }

  /** Cancels `owner`'s pending upload `id`: its parts go, it takes none more. */
  cancel(owner: string, id: string): UploadObject {
    const s = this.#pending(owner, id, "be cancelled");
    const upload: UploadObject = { ...s.upload, status: "cancelled" };
    writeJson(this.#meta(id), { ...s, upload });
    this.#removeParts(id);
    return upload;
  }

  /**
   * Removes the parts of uploads that no longer take them (expired, ended, gone) and forgets
   * uploads an hour past their expiry; a completion marker left by a gateway that stopped
   * halfway goes after an hour.
   */
  sweep(): void {
    const now = Date.now();
    for (const name of readdirSync(this.#dir)) {
      const id = name.slice(0, name.indexOf("."));
      try {
        if (name.endsWith(".json")) {
          const s = this.#read(id);
          if (s && (s.upload.expires_at + FORGET_AFTER_S) * 1000 <= now)
            rmSync(this.#meta(id), { force: true });
          if (s?.upload.status === "expired") this.#removeParts(id);
        } else if (name.endsWith(".part")) {
          const s = this.#read(id);
          const old = now - statSync(join(this.#dir, name)).mtimeMs > UPLOAD_TTL_S * 1000;
          if (s ? s.upload.status !== "pending" && old : old)
            removeCounted(join(this.#dir, name), this.#files.quota);
        } else if (name.endsWith(".completing") || name.endsWith(".tmp")) {
          if (now - statSync(join(this.#dir, name)).mtimeMs > UPLOAD_TTL_S * 1000)
            rmSync(join(this.#dir, name), { force: true });
        }
      } catch {
        // (removed by another gateway meanwhile)
      }
    }
  }
}

/** The files at `paths`, one after the other, as one stream. */
function concatenated(paths: readonly string[]): NodeJS.ReadableStream {
  const out = new Transform({ transform: (chunk, _, done) => done(null, chunk) });
  void (async () => {
    try {
      for (const p of paths) await pipeline(createReadStream(p), out, { end: false });
      out.end();
    } catch (err) {
      out.destroy(err as Error);
    }
  })();
  return out;
}

/** POST /v1/uploads's body. */
export const UploadCreate = Type.Object({
  bytes: Type.Integer({ minimum: 0 }),
  filename: Type.String({ minLength: 1, maxLength: 1024 }),
  mime_type: Type.String({ minLength: 1, maxLength: 255 }),
  purpose: Type.String(),
  expires_after: Type.Optional(Type.Unknown()),
});
export type UploadCreate = Static<typeof UploadCreate>;

/** POST /v1/uploads/{id}/complete's body. */
const UploadComplete = Type.Object({
  part_ids: Type.Array(Type.String(), { minItems: 1, maxItems: 10_000 }),
  md5: Type.Optional(Type.String()),
});
type UploadComplete = Static<typeof UploadComplete>;

/**
 * The routes plugin. `uploads` null (no files folder): every route refuses (filesOff).
 * `owner`: who a request is (ownerOf of its key).
 */
export function uploadsRoutes(uploads: Uploads | null, owner: (req: FastifyRequest) => string) {
  return async (app: FastifyInstance) => {
    const need = () => {
      if (uploads === null) throw filesOff();
      return uploads;
    };
    await app.register(multipart, {
      limits: {
        fileSize: Math.min(PART_MAX_BYTES, uploads?.maxBytes ?? 0),
        files: 1,
        fields: 4,
        parts: 8,
      },
    });
    app.post<{ Body: UploadCreate }>(
      "/v1/uploads",
      { schema: { body: UploadCreate } },
      async (req) => need().create(owner(req), req.body),
    );
    app.post<{ Params: { id: string } }>("/v1/uploads/:id/parts", async (req) => {
      const u = need();
      if (!req.isMultipart())
        throw bad(
          "POST /v1/uploads/{id}/parts takes multipart/form-data with the part as 'data'",
          "data",
        );
      let part: Awaited<ReturnType<Uploads["addPart"]>> | undefined;
      try {
        for await (const p of req.parts()) {
          if (p.type !== "file") continue;
          if (p.fieldname !== "data" || part) {
            p.file.resume();
            throw bad(
              `one part, in the field 'data', is taken (got '${p.fieldname.slice(0, 40)}')`,
              p.fieldname.slice(0, 40),
            );
          }
          part = await u.addPart(owner(req), req.params.id, p.file);
        }
      } catch (err) {
        if (err instanceof ApiError) throw err;
        throw notWholeForm(err, "the part", { param: "data" });
      }
      if (!part) throw bad("no 'data' in the form", "data");
      return part;
    });
    app.post<{ Params: { id: string }; Body: UploadComplete }>(
      "/v1/uploads/:id/complete",
      { schema: { body: UploadComplete } },
      async (req) => need().complete(owner(req), req.params.id, req.body.part_ids, req.body.md5),
    );
    app.post<{ Params: { id: string } }>("/v1/uploads/:id/cancel", async (req) =>
      need().cancel(owner(req), req.params.id),
    );
  };
}
