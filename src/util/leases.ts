// Leases on a shared folder (a ReadWriteMany volume, or one machine's disk): which process
// runs a piece of work that several could (a batch or a part of its lines, ADR 0049; a
// checkpoint's download into a shared claim, ADR 0050).
//
// A lease is a small JSON file made with link(), which fails when the file is there: of
// several processes that try at once, one gets it. Its holder renews it every few seconds;
// one not renewed for `ms`, or whose process is gone (same host: a pid that no longer runs,
// or this process's own pid after a container restart), may be taken. A lease may be marked
// done and kept so, so that nobody takes its work again.
import { randomBytes } from "node:crypto";
import { linkSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { readJson, writeJson } from "./fs.ts";
import { alive } from "./process.ts";

/** A lease file: the process that holds it, and when it last said so. */
export interface Lease {
  holder: string;
  host: string;
  pid: number;
  at: number;
  /** Its work is done (a part's lines all answered, a batch stopped): nobody takes it again. */
  done?: boolean;
}

/** The Leases of this process (their leases are not a dead process's). */
const LIVE = new Set<string>();

/** What a lease file says to a process that does not hold it. */
export type LeaseState = "free" | "held" | "done";

/** One process's (or one gateway's) leases: taken, renewed, let go. */
export class Leases {
  /** This holder, in the leases it holds. */
  readonly me = randomBytes(8).toString("hex");
  readonly #host = hostname();
  /** A lease not renewed for this long may be taken. */
  readonly ms: number;

  constructor(ms: number) {
    this.ms = ms;
    LIVE.add(this.me);
  }

  /** This holder stops: its leases, if still on disk, count as a dead process's. */
  close(): void {
    LIVE.delete(this.me);
  }

  /** Takes lease `path` when nobody holds it, or its holder let it run out; else its state. */
  take(path: string): "taken" | "held" | "done" {
    const lease = readJson<Lease>(path);
    if (lease?.done) return "done";
    if (lease !== undefined && !this.#stale(lease)) return "held";
    if (lease !== undefined) {
      // Out of date: moved away by one taker alone (the others' renames find nothing).
      const stale = `${path}.${this.me}.stale`;
      try {
        renameSync(path, stale);
        rmSync(stale, { force: true });
      } catch {
        // (another taker moved it first)
      }
    }
    const mine = `${path}.${this.me}.tmp`;
    writeFileSync(mine, JSON.stringify(this.#lease()));
    try {
      linkSync(mine, path); // fails when the lease is there: one taker gets it
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

  /** Renews lease `path`: false when another holds it now (this one was too slow). */
  renew(path: string): boolean {
    const lease = readJson<Lease>(path);
    if (lease !== undefined && lease.holder !== this.me) return false;
    writeJson(path, this.#lease());
    return true;
  }

  /** Gives lease `path` back (when this holder holds it). */
  release(path: string): void {
    if (readJson<Lease>(path)?.holder === this.me) rmSync(path, { force: true });
  }

  /** Marks lease `path` done (when this holder holds it): kept, never taken again. */
  finish(path: string): void {
    if (readJson<Lease>(path)?.holder === this.me)
      writeJson(path, { ...this.#lease(), done: true });
  }

  #lease(): Lease {
    return { holder: this.me, host: this.#host, pid: process.pid, at: Date.now() };
  }

  /**
   * Whether a lease may be taken: not renewed for `ms`, or its holder's process is gone
   * (one of this host: a restarted container, a killed `up` gateway, go on at once).
   */
  #stale(lease: Lease): boolean {
    if (Date.now() - lease.at >= this.ms) return true;
    if (lease.host !== this.#host) return false;
    return lease.pid === process.pid ? !LIVE.has(lease.holder) : !alive(lease.pid);
  }
}

/** What lease file `path` says (undefined: none, or not whole yet). */
export function readLease(path: string): Lease | undefined {
  return readJson<Lease>(path);
}
