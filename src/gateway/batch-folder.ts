// What the gateways on one files folder share of the batches they run (ADR 0049): leases
// (which gateway runs a batch, or a part of its lines) and answer files (one JSON line per
// answer, appended whole).
//
// A lease is a small JSON file made with link(), which fails when the file is there: of
// several gateways that try at once, one gets it. Its holder renews it every few seconds; one
// not renewed for `ms`, or whose process is gone (same host: a pid that no longer runs, or
// this process's own pid after a container restart), may be taken. A part's lease is marked
// done when its lines are answered and kept so, so that no gateway takes the part again.
import { randomBytes } from "node:crypto";
import {
  closeSync,
  copyFileSync,
  fstatSync,
  ftruncateSync,
  linkSync,
  openSync,
  readSync,
  renameSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { hostname } from "node:os";
import { alive } from "../util/process.ts";
import { readJson, writeJson } from "./files.ts";

/** A lease file: the gateway that holds it, and when it last said so. */
export interface Lease {
  holder: string;
  host: string;
  pid: number;
  at: number;
  /** A part's lines are all answered (or the batch stopped): nobody takes it again. */
  done?: boolean;
}

/** The Leases of this process (their leases are not a dead process's). */
const LIVE = new Set<string>();

/** What a lease file says to a gateway that does not hold it. */
export type LeaseState = "free" | "held" | "done";

/** One gateway's leases: taken, renewed, let go. */
export class Leases {
  /** This gateway, in the leases it holds. */
  readonly me = randomBytes(8).toString("hex");
  readonly #host = hostname();
  /** A lease not renewed for this long may be taken. */
  readonly ms: number;

  constructor(ms: number) {
    this.ms = ms;
    LIVE.add(this.me);
  }

  /** This gateway stops: its leases, if still on disk, count as a dead process's. */
  close(): void {
    LIVE.delete(this.me);
  }

  /** Takes lease `path` when nobody holds it, or its holder let it run out; else its state. */
  take(path: string): "taken" | "held" | "done" {
    const lease = readJson<Lease>(path);
    if (lease?.done) return "done";
    if (lease !== undefined && !this.#stale(lease)) return "held";
    if (lease !== undefined) {
      // Out of date: moved away by one gateway alone (the others' renames find nothing).
      const stale = `${path}.${this.me}.stale`;
      try {
        renameSync(path, stale);
        rmSync(stale, { force: true });
      } catch {
        // (another gateway moved it first)
      }
    }
    const mine = `${path}.${this.me}.tmp`;
    writeFileSync(mine, JSON.stringify(this.#lease()));
    try {
      linkSync(mine, path); // fails when the lease is there: one gateway gets it
      return "taken";
    } catch {
      return readJson<Lease>(path)?.done ? "done" : "held";
    } finally {
      rmSync(mine, { force: true });
    }
  }

  /** The state of lease `path` (not taking it). */
  state(path: string): LeaseState {
    const lease = readJson<Lease>(path);
    if (lease === undefined) return "free";
    if (lease.done) return "done";
    return this.#stale(lease) ? "free" : "held";
  }

  /** Renews lease `path`: false when another gateway holds it now (this one was too slow). */
  renew(path: string): boolean {
    const lease = readJson<Lease>(path);
    if (lease !== undefined && lease.holder !== this.me) return false;
    writeJson(path, this.#lease());
    return true;
  }

  /** Gives lease `path` back (when this gateway holds it). */
  release(path: string): void {
    if (readJson<Lease>(path)?.holder === this.me) rmSync(path, { force: true });
  }

  /** Marks lease `path` done (when this gateway holds it): kept, never taken again. */
  finish(path: string): void {
    if (readJson<Lease>(path)?.holder === this.me)
      writeJson(path, { ...this.#lease(), done: true });
  }

  #lease(): Lease {
    return { holder: this.me, host: this.#host, pid: process.pid, at: Date.now() };
  }

  /**
   * Whether a lease may be taken: not renewed for `ms`, or its gateway's process is gone
   * (one of this host: a restarted container, a killed `up` gateway, go on at once).
   */
  #stale(lease: Lease): boolean {
    if (Date.now() - lease.at >= this.ms) return true;
    if (lease.host !== this.#host) return false;
    return lease.pid === process.pid ? !LIVE.has(lease.holder) : !alive(lease.pid);
  }
}

/** An answer's line (null: an empty or damaged line). */
export function parseAnswer(
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

/**
 * The whole lines of answers file `path` from byte `offset` on ("" when there is none); with
 * `cut`, a last line cut short (its writer died midway) is removed from the file, so that the
 * next answer starts a line. Whole lines: their byte length is where the next read starts.
 */
export function readAnswers(path: string, offset = 0, cut = false): string {
  let fd: number;
  try {
    fd = openSync(path, cut ? "r+" : "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return "";
    throw err;
  }
  try {
    const size = fstatSync(fd).size;
    if (size <= offset) return "";
    const buf = Buffer.allocUnsafe(size - offset);
    const n = readSync(fd, buf, 0, buf.length, offset);
    const end = n === 0 ? 0 : buf.lastIndexOf(10, n - 1) + 1;
    if (cut && offset + end < size) ftruncateSync(fd, offset + end);
    return buf.toString("utf8", 0, end);
  } finally {
    closeSync(fd);
  }
}

/**
 * Appends one JSON line (a whole line per write: a stop cuts at most the last); the bytes
 * written.
 */
export function append(path: string, v: object): number {
  const fd = openSync(path, "a");
  try {
    return writeSync(fd, `${JSON.stringify(v)}\n`);
  } finally {
    closeSync(fd);
  }
}

/** A hard link `to` of `from` (one file on disk), or a copy where the filesystem has none. */
export function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return;
    copyFileSync(from, to);
  }
}
