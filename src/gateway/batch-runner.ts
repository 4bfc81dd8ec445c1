// The lines of batches, run by parts (ADR 0049): a batch in progress is cut into parts of
// `partLines` lines (the last shorter), and every gateway on the folder with room for more
// lines takes the next part nobody holds (its lease: batches/<id>.p<k>.lease) and runs it,
// writing its answers to the part's own files (<id>.p<k>.output.jsonl, .errors.jsonl: one
// writer at a time, so appends never interleave, even on NFS). A part all answered (or whose
// batch was cancelled or expired) has its lease marked done and is never taken again. A part
// whose gateway died is taken by the next gateway with room, which reads the answers written
// and runs the lines without one. The gateway that holds the batch's own lease (batches.ts)
// counts the parts' answers and finishes the batch; this runs lines only.
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { readJson } from "../util/fs.ts";
import type { Leases } from "../util/leases.ts";
import { append, parseAnswer, readAnswers } from "./batch-folder.ts";
import type { BatchEndpoint, BatchLine, RunLine } from "./batches.ts";
import type { FolderQuota } from "./files.ts";

/**
 * Lines in a part of a batch of `total`: about 64 parts, 16 to 256 lines each (a gateway with
 * room takes a whole part: small enough that gateways share a batch's end, large enough that
 * a 50,000-line batch is 196 parts, not 50,000 leases).
 */
export function partLines(total: number): number {
  return Math.min(256, Math.max(16, Math.ceil(total / 64)));
}

/** How many parts a batch of `total` lines in parts of `size` has. */
export const partCount = (total: number, size: number) => Math.ceil(total / size);

/** A part's files: <id>.p<k>.lease, .output.jsonl, .errors.jsonl. */
export function partPath(dir: string, id: string, k: number, kind: "lease" | "output" | "errors") {
  return join(dir, kind === "lease" ? `${id}.p${k}.lease` : `${id}.p${k}.${kind}.jsonl`);
}

/** A batch in progress whose parts a gateway may take. */
export interface OpenBatch {
  id: string;
  endpoint: BatchEndpoint;
  /** Unix seconds: no line starts after. */
  expiresAt: number;
  total: number;
  partLines: number;
  /** When it was made (the oldest batch's parts go first). */
  ms: number;
  /** Whose it is (files.ts ownerOf): its lines run as theirs. */
  owner: string;
}

interface Offered extends OpenBatch {
  /** Its lines, read once a part of it is taken here. */
  lines: BatchLine[] | null;
  /** Parts seen done (their leases say so). */
  done: Set<number>;
  /** Parts another gateway holds: not looked at again before this time (ms). */
  busyUntil: Map<number, number>;
  /** Cancelled or expired: no part of it is taken, no line of it starts. */
  stopped: boolean;
}

/** A part this gateway runs (holds the lease of). */
interface Part {
  batch: Offered;
  k: number;
  lines: BatchLine[];
  /** custom_ids whose answer is written. */
  done: Set<string>;
  /** The next line to look at. */
  next: number;
  inflight: number;
  /** Lines to run again (answered 429 or 503), once their wait is over. */
  again: BatchLine[];
  /** Lines waiting to run again. */
  waiting: number;
  /** Another gateway took the lease (this one was too slow to renew it): nothing more starts. */
  lost: boolean;
}

/**
 * Answers that say "later" (the admission queue full, the shards unreachable: 429, 503): the
 * line runs again after a wait (1 s, doubling, at most MAX_WAIT_MS) until the batch expires.
 */
const LATER = new Set([429, 503]);
const MAX_WAIT_MS = 30_000;

const now = () => Math.floor(Date.now() / 1000);

export interface PartRunnerOptions {
  /** batches/ of the files folder. */
  dir: string;
  leases: Leases;
  quota: FolderQuota | null;
  run: RunLine;
  /** Lines in flight at once, over every part this gateway runs. */
  concurrency: number;
  /** A part another gateway holds is looked at again after this long (ms). */
  busyMs: number;
  /** The lines of batch `b` (its input, parsed; it throws when the input is gone). */
  lines: (b: OpenBatch) => BatchLine[];
  /** An answer to a line of part `k` of batch `id` was written here. */
  wrote: (id: string, k: number) => void;
  /** A part of batch `id` ended here (answered, or stopped): its batch may be done. */
  ended: (id: string) => void;
  log?: (line: string) => void;
}

export class PartRunner {
  readonly #o: PartRunnerOptions;
  readonly #open = new Map<string, Offered>();
  /** The parts held, by "<id>.p<k>", in the order taken. */
  readonly #parts = new Map<string, Part>();
  #inflight = 0;
  #closed = false;
  /** How often each line was answered "later" (LATER). */
  readonly #tries = new WeakMap<BatchLine, number>();
  /** No line starts: the files folder is full (FolderQuota); looked at again every tick. */
  #roomWait = false;
  /** A pump is due (setImmediate): what stops or ends a batch never pumps inside a pump. */
  #due = false;

  /** Lines answered here since start, by outcome (metrics.ts addBatches). */
  readonly answered = { completed: 0, failed: 0, retried: 0 };

  constructor(o: PartRunnerOptions) {
    this.#o = o;
  }

  /** Lines running now. */
  get inflight(): number {
    return this.#inflight;
  }

  /** Parts held now. */
  get parts(): number {
    return this.#parts.size;
  }

  /** Batch `b` is in progress: its parts may be taken here (once more room frees). */
  offer(b: OpenBatch): void {
    if (this.#closed) return;
    const known = this.#open.get(b.id);
    if (known !== undefined) return;
    this.#open.set(b.id, {
      ...b,
      lines: null,
      done: new Set(),
      busyUntil: new Map(),
      stopped: false,
    });
    this.#soon();
  }

  /**
   * Part `k` of batch `b` ended with lines unanswered (an answer damaged on disk; a gateway
   * that could not read the input): its lease was given back, it is taken again here.
   */
  reopen(b: OpenBatch, k: number): void {
    const known = this.#open.get(b.id);
    if (known === undefined) this.offer(b);
    else {
      known.done.delete(k);
      known.busyUntil.delete(k);
      this.#soon();
    }
  }

  /** Whether batch `id` is offered (its parts are taken here when there is room). */
  has(id: string): boolean {
    return this.#open.has(id);
  }

  /** Batch `id` is no longer in progress here (ended, or its object says so). */
  withdraw(id: string): void {
    this.stop(id);
    this.#open.delete(id);
  }

  /** Batch `id` was cancelled (or expired): no more of its lines start; those running finish. */
  stop(id: string): void {
    const b = this.#open.get(id);
    if (b === undefined || b.stopped) return;
    b.stopped = true;
    this.#soon();
  }

  /** Pumps once this turn's work is done. */
  #soon(): void {
    if (this.#due || this.#closed) return;
    this.#due = true;
    setImmediate(() => {
      this.#due = false;
      this.#safely(() => this.pump());
    });
  }

  /** Every second: parts' leases renewed (`renew`), cancel marks read, a full folder again. */
  tick(renew: boolean): void {
    if (this.#closed) return;
    for (const b of this.#open.values())
      if (!b.stopped && existsSync(join(this.#o.dir, `${b.id}.cancel`))) this.stop(b.id);
    if (renew)
      for (const [key, p] of this.#parts)
        if (!this.#o.leases.renew(this.#lease(p))) {
          this.#o.log?.(
            `batch ${p.batch.id}: another gateway runs part ${p.k} now (its lease was not renewed in time)`,
          );
          p.lost = true;
          this.#parts.delete(key);
        }
    // (a full folder again; a part of a gateway that died; a batch expired)
    if (this.#open.size > 0 || this.#parts.size > 0) this.pump();
  }

  /** Starts no more lines and gives the parts held back (their answers so far are kept). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of this.#parts.values()) this.#o.leases.release(this.#lease(p));
  }

  /**
   * Starts lines, oldest part first, while fewer than `concurrency` run; takes another part
   * when the parts held have no line left to start.
   */
  pump(): void {
    if (this.#closed) return;
    // A full folder (FolderQuota): no line starts; parts done still end.
    const quota = this.#o.quota;
    const full = this.#open.size > 0 && quota !== null && quota.full();
    if (full && !this.#roomWait)
      this.#o.log?.(
        `batches: the files folder is full (${quota.used()} of ${quota.maxBytes} bytes): lines wait until files are deleted or expire`,
      );
    this.#roomWait = full;
    for (;;) {
      for (const [key, p] of [...this.#parts]) {
        if (!this.#parts.has(key)) continue; // (ended meanwhile)
        const b = p.batch;
        if (!b.stopped && now() >= b.expiresAt) b.stopped = true; // (its holder writes them expired)
        while (!full && !b.stopped && this.#inflight < this.#o.concurrency) {
          const line = p.again.shift() ?? (p.next < p.lines.length ? p.lines[p.next++] : undefined);
          if (line === undefined) break;
          if (p.done.has(line.custom_id)) continue;
          this.#start(p, line);
        }
        const left = b.stopped ? 0 : p.lines.length - p.next + p.again.length + p.waiting;
        if (left === 0 && p.inflight === 0) this.#end(p);
      }
      if (full || this.#inflight >= this.#o.concurrency || this.#startable() || !this.#seek())
        return;
    }
  }

  /** Whether a part held has a line not started yet. */
  #startable(): boolean {
    for (const p of this.#parts.values())
      if (!p.batch.stopped && (p.next < p.lines.length || p.again.length > 0)) return true;
    return false;
  }

  /** Takes the next part nobody holds, oldest batch first: whether one was taken. */
  #seek(): boolean {
    const t = Date.now();
    const open = [...this.#open.values()].sort((a, b) => a.ms - b.ms);
    for (const b of open) {
      if (b.stopped) continue;
      const count = partCount(b.total, b.partLines);
      for (let k = 0; k < count; k++) {
        if (b.done.has(k) || (b.busyUntil.get(k) ?? 0) > t || this.#parts.has(`${b.id}.p${k}`))
          continue;
        const lease = partPath(this.#o.dir, b.id, k, "lease");
        const got = this.#o.leases.take(lease);
        if (got === "done") b.done.add(k);
        if (got === "held") b.busyUntil.set(k, t + this.#o.busyMs);
        if (got !== "taken") continue;
        if (this.#hold(b, k)) return true;
        this.#o.leases.release(lease);
        if (b.stopped) break;
      }
      if (b.done.size === count) this.#open.delete(b.id);
    }
    return false;
  }

  /**
   * Starts running part `k` of `b` (its lease just taken): false when the batch is no longer
   * in progress (its object, read under the lease, says so: the gateway that finishes it
   * waits for parts held, so none is taken once it has begun to).
   */
  #hold(b: Offered, k: number): boolean {
    const status = readJson<{ batch?: { status?: string } }>(join(this.#o.dir, `${b.id}.json`))
      ?.batch?.status;
    if (status === undefined) {
      // (not readable now: a disk error, an NFS hiccup; looked at again later)
      b.busyUntil.set(k, Date.now() + this.#o.busyMs);
      return false;
    }
    if (status !== "in_progress" || existsSync(join(this.#o.dir, `${b.id}.cancel`))) {
      b.stopped = true;
      return false;
    }
    try {
      b.lines ??= this.#o.lines(b);
    } catch (err) {
      this.#o.log?.(`batch ${b.id}: its lines could not be read: ${String(err).slice(0, 300)}`);
      b.stopped = true;
      return false;
    }
    const p: Part = {
      batch: b,
      k,
      lines: b.lines.slice(k * b.partLines, (k + 1) * b.partLines),
      done: new Set(),
      next: 0,
      inflight: 0,
      again: [],
      waiting: 0,
      lost: false,
    };
    // The answers written before (by a gateway that stopped; a line it cut short is dropped).
    for (const kind of ["output", "errors"] as const)
      for (const l of readAnswers(partPath(this.#o.dir, b.id, k, kind), 0, true).split("\n")) {
        const a = parseAnswer(l); // (a damaged line: the request runs again)
        if (a !== null) p.done.add(a.custom_id);
      }
    this.#parts.set(`${b.id}.p${k}`, p);
    return true;
  }

  /** Part `p` is answered (or its batch stopped): its lease says done, its batch is told. */
  #end(p: Part): void {
    this.#parts.delete(`${p.batch.id}.p${p.k}`);
    if (p.lost) return;
    this.#o.leases.finish(this.#lease(p));
    p.batch.done.add(p.k);
    this.#o.ended(p.batch.id);
  }

  #lease(p: Part): string {
    return partPath(this.#o.dir, p.batch.id, p.k, "lease");
  }

  #start(p: Part, line: BatchLine): void {
    this.#inflight++;
    p.inflight++;
    const b = p.batch;
    const written = (answer: object, ok: boolean) => {
      // (a part another gateway took runs the line again: one writer to a part's files)
      if (p.done.has(line.custom_id) || p.lost) return;
      p.done.add(line.custom_id);
      const bytes = append(partPath(this.#o.dir, b.id, p.k, ok ? "output" : "errors"), answer);
      this.#o.quota?.grew(bytes); // (apart: inside ?.() the append would not run without a quota)
      this.answered[ok ? "completed" : "failed"]++;
      this.#o.wrote(b.id, p.k);
    };
    const id = `batch_req_${randomBytes(12).toString("hex")}`;
    this.#o
      .run(b.endpoint, line.body, b.owner)
      .then(
        (r) => {
          // An answer cut by the stop: the line runs again wherever the batch goes on.
          if (this.#closed && r.status >= 500) return;
          if (LATER.has(r.status) && !b.stopped) return this.#later(p, line);
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
          if (this.#closed) return; // (not run: it runs again wherever the batch goes on)
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
      .catch((err) => this.#o.log?.(`batch ${b.id}: an answer not written: ${String(err)}`))
      .finally(() => {
        this.#inflight--;
        p.inflight--;
        if (!this.#closed) this.#safely(() => this.pump());
      });
  }

  /** Runs `line` again after a wait that doubles with each "later" it got. */
  #later(p: Part, line: BatchLine): void {
    this.answered.retried++;
    const tries = (this.#tries.get(line) ?? 0) + 1;
    this.#tries.set(line, tries);
    p.waiting++;
    const t = setTimeout(
      () => {
        p.waiting--;
        if (this.#closed || p.lost) return;
        // (cancelled or expired meanwhile: dropped; the batch's holder answers it expired)
        if (!p.batch.stopped) p.again.push(line);
        this.#safely(() => this.pump());
      },
      Math.min(MAX_WAIT_MS, 1000 * 2 ** (tries - 1)),
    );
    t.unref();
  }

  /**
   * Runs `fn` where nothing would catch what it throws (a promise's end, a timer): a failure
   * of the folder is logged, and the gateway serves on (a part stopped midway is taken up
   * again once its lease runs out).
   */
  #safely(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.#o.log?.(`batches: running lines failed: ${String(err).slice(0, 500)}`);
    }
  }
}
