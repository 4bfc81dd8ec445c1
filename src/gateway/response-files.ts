// The Responses API's stored responses in the gateway's files folder (--files-dir; the
// operator's pods: spec.gateway.batch, a shared claim), so that every gateway on the folder
// answers for every response: a `previous_response_id` or a GET that lands on another
// gateway than the one that answered finds it, and a restarted gateway still has it.
//
// `<dir>/responses/<id>.json`: the kept response (conversation, response, input items),
// written whole (a temporary file renamed). A response expires RESPONSE_TTL_MS after its
// last write, as OpenAI keeps them 30 days. A background response is written when it starts
// (in_progress), every HEARTBEAT_MS while it runs, and when it ends; one found in_progress
// and not written for STALE_MS has lost its gateway (stopped, killed): it reads as failed,
// for good: the gateway that reads it so leaves a `lost` mark, so that a gateway that was only
// paused (its process stopped, its node cut off) ends it failed too when it wakes, and does
// not write it again as completed after a client saw it fail.
// Another gateway stops a running one with a mark beside it, `<id>.cancel` (its text: cancel,
// or drop for a DELETE), which the running gateway looks for every MARK_POLL_MS. A background
// response's events (response-events.ts) are `<id>.events`, kept and removed with it.
import { existsSync, readdirSync, rmSync, statSync, utimesSync } from "node:fs";
import { join } from "node:path";
import { makeDirs, readJson, writeJson } from "../util/fs.ts";
import { type FolderQuota, removeCounted, sweepEvery, writeCounted } from "./files.ts";
import { EventFile, EventLog, followFile } from "./response-events.ts";
import type { Kept, KeptResponses } from "./responses.ts";

/** How long a response is kept after its last write (OpenAI's 30 days). */
export const RESPONSE_TTL_MS = 30 * 24 * 3600_000;
/** A running background response is written again this often. */
export const HEARTBEAT_MS = 10_000;
/** An in_progress response not written for this long has lost its gateway. */
export const STALE_MS = 45_000;
/** How often a gateway looks for marks on the background responses it runs. */
export const MARK_POLL_MS = 500;

/**
 * What another gateway asks of a running background response: stop it (cancel), stop it and
 * keep nothing more (drop: a DELETE), or end it as the failed response it was found to be
 * (lost: silent past STALE_MS).
 */
export type Mark = "cancel" | "drop" | "lost";

/** The ids a gateway makes (responses.ts newId): nothing else names a file here. */
const ID = /^resp_[0-9a-f]{24}$/;

export class ResponseFiles implements KeptResponses {
  /** Files keep every response until it expires (the folder's budget bounds them). */
  readonly capacity = Number.MAX_SAFE_INTEGER;
  readonly #dir: string;
  readonly #quota: FolderQuota | null;
  readonly #timer: NodeJS.Timeout;

  constructor(filesDir: string, quota: FolderQuota | null) {
    this.#dir = join(filesDir, "responses");
    makeDirs(this.#dir);
    this.#quota = quota;
    this.#timer = sweepEvery(() => this.sweep());
  }

  close(): void {
    clearInterval(this.#timer);
  }

  #path(id: string, ext = "json"): string | null {
    return ID.test(id) ? join(this.#dir, `${id}.${ext}`) : null;
  }

  get(id: string): Kept | undefined {
    const path = this.#path(id);
    if (!path) return undefined;
    let written: number;
    try {
      written = statSync(path).mtimeMs;
    } catch {
      return undefined;
    }
    const now = Date.now();
    if (now - written > RESPONSE_TTL_MS) return undefined;
    const kept = readJson<Kept>(path);
    if (!kept) return undefined;
    if (isRunning(kept) && now - written > STALE_MS) {
      // Its gateway stopped without ending it: failed, for good. The mark first: should this
      // gateway stop between the two, the response is still found silent, and marked again.
      this.mark(id, "lost");
      const failed = lostOf(kept);
      this.put(id, failed);
      return failed;
    }
    return kept;
  }

  /** Response `id` as its running gateway last wrote it (not judged lost: that gateway asks). */
  peek(id: string): Kept | undefined {
    const path = this.#path(id);
    return path ? readJson<Kept>(path) : undefined;
  }

  /** The refusal of a new response to keep while the folder is full; null when it has room. */
  refusal(): Error | null {
    return this.#quota?.full() ? this.#quota.refusal("a stored response (store: true)") : null;
  }

  put(id: string, kept: Kept): void {
    const path = this.#path(id);
    if (path) writeCounted(path, JSON.stringify(kept), this.#quota);
  }

  delete(id: string): boolean {
    const path = this.#path(id);
    if (!path) return false;
    this.#remove(this.#path(id, "events")!);
    return this.#remove(path);
  }

  #remove(path: string): boolean {
    return removeCounted(path, this.#quota);
  }

  eventLog(id: string): EventLog {
    const path = this.#path(id, "events");
    return new EventLog(path ? new EventFile(path, this.#quota) : null);
  }

  events(id: string, after: number, ended: () => object | null, signal: AbortSignal) {
    const path = this.#path(id, "events");
    return path && existsSync(path) ? followFile(path, after, ended, signal) : undefined;
  }

  /** Writes a running response's file again (its heartbeat), content unchanged. */
  touch(id: string): void {
    const path = this.#path(id);
    if (!path) return;
    const now = new Date();
    try {
      utimesSync(path, now, now);
    } catch {}
  }

  /** Asks the gateway running response `id` to stop it (cancel) or to stop and forget it. */
  mark(id: string, what: Mark): void {
    const path = this.#path(id, "cancel");
    if (path) writeJson(path, what);
  }

  /** What was asked of running response `id`, if anything; the mark is removed once read. */
  takeMark(id: string): Mark | undefined {
    const path = this.#path(id, "cancel");
    const what = path ? readJson<Mark>(path) : undefined;
    if (path && what !== undefined) rmSync(path, { force: true });
    return what === "cancel" || what === "drop" || what === "lost" ? what : undefined;
  }

  /** Removes expired responses and marks left by responses that ended. */
  sweep(now = Date.now()): void {
    let names: string[];
    try {
      names = readdirSync(this.#dir);
    } catch {
      return;
    }
    for (const name of names) {
      const path = join(this.#dir, name);
      try {
        const st = statSync(path);
        const age = now - st.mtimeMs;
        const counted = name.endsWith(".json") || name.endsWith(".events");
        const old = counted
          ? age > RESPONSE_TTL_MS ||
            // (events whose response was deleted while its gateway wrote them)
            (name.endsWith(".events") &&
              age > 3600_000 &&
              !existsSync(path.replace(/\.events$/, ".json")))
          : age > 3600_000; // (a mark no gateway took, a temporary file left)
        if (!old) continue;
        rmSync(path, { force: true });
        if (counted) this.#quota?.grew(-st.size);
      } catch {}
    }
  }
}

/** A kept response's status (queued, then in_progress, while its gateway runs it). */
function statusOf(kept: Kept | undefined): string | undefined {
  return (kept?.response as { status?: string } | undefined)?.status;
}

/** Whether kept response `kept` is still running (a background one): queued or in_progress. */
export function isRunning(kept: Kept | undefined): boolean {
  const status = statusOf(kept);
  return status === "queued" || status === "in_progress";
}

/** Kept response `kept`, still running, as failed because its gateway fell silent. */
export function lostOf(kept: Kept): Kept {
  if (!isRunning(kept)) return kept;
  const background = (kept.response as { background?: boolean }).background;
  return {
    ...kept,
    response: {
      ...kept.response,
      status: "failed",
      error: {
        code: "EM_GATEWAY_RESPONSE_LOST",
        message: `the gateway running this ${background ? "background " : ""}response stopped before it ended (no word from it for ${STALE_MS / 1000} s)`,
      },
    },
  };
}
