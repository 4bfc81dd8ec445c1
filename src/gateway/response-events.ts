// The events of a background response (the Responses API's stream: response.created, the
// items' deltas, ..., response.completed), numbered and kept, so that a client can stream it
// again from the start or after the last event it saw (GET /v1/responses/{id}?stream=true
// &starting_after=N), and a POST with background and stream together streams a response
// that runs on if its client leaves (ADR 0052).
//
// While the response runs, its gateway holds the events in an EventLog, which the readers
// on that gateway follow as they are written. The memory store keeps the log after the end
// (with the response: the same budget, the same eviction); in a files folder they are also
// appended to `<id>.events` (JSON lines, flushed every FLUSH_MS), which the readers on the
// other gateways, and any after the end, follow (followFile, every FOLLOW_POLL_MS).
import { appendFileSync, closeSync, fstatSync, openSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { readFrom } from "../util/fs.ts";
import type { FolderQuota } from "./files.ts";

/** A running response's events are appended to its file this often. */
export const FLUSH_MS = 50;
/** A reader of another gateway's events looks for more this often. */
export const FOLLOW_POLL_MS = 100;
/** ... and, while none come, whether the response ended without them this often. */
const ENDED_POLL_MS = 1000;

/** The events that end a response's stream (a cancelled one ends with response.incomplete). */
const TERMINAL = /^\{"type":"response\.(completed|incomplete|failed)"/;
const TYPE = /^\{"type":"([^"]+)"/;

/** Whether an event (as kept: JSON, its type first) ends its response's stream. */
export function isTerminal(line: string): boolean {
  return TERMINAL.test(line);
}

/** The event that ends the stream of a response that ended as `response` says. */
export function terminalType(response: object): string {
  const status = (response as { status?: string }).status;
  return status === "completed"
    ? "response.completed"
    : status === "failed"
      ? "response.failed"
      : "response.incomplete"; // (incomplete, cancelled)
}

/** An event as kept, as a server-sent event. */
export function sseOf(line: string): string {
  return `event: ${TYPE.exec(line)?.[1] ?? "message"}\ndata: ${line}\n\n`;
}

/** The event `type` numbered `sequence`, as kept: JSON with its type first. */
export function eventLine(type: string, sequence: number, body: object): string {
  return JSON.stringify({ type, sequence_number: sequence, ...body });
}

/** Where a log's events go besides its memory (a file of the folder). */
export interface EventSink {
  write(line: string): void;
  /** Writes what is pending; nothing more is written. */
  close(): void;
  /** Writes nothing more, pending included (the response was deleted). */
  discard(): void;
}

/** A response's events in order (event n is numbered n), followed by readers as they come. */
export class EventLog {
  readonly #lines: string[] = [];
  readonly #sink: EventSink | null;
  #chars = 0;
  #ended = false;
  #wake: (() => void)[] = [];

  constructor(sink: EventSink | null = null) {
    this.#sink = sink;
  }

  /** Characters held (what the memory store counts against its budget). */
  get chars(): number {
    return this.#chars;
  }

  get ended(): boolean {
    return this.#ended;
  }

  /** Adds event `type` (numbered next); nothing once ended. */
  append(type: string, body: object): void {
    if (this.#ended) return;
    const line = eventLine(type, this.#lines.length, body);
    this.#lines.push(line);
    this.#chars += line.length;
    this.#sink?.write(line);
    this.#notify();
  }

  /** No more events: the readers end after the last. `discard`: none is written anywhere. */
  end(discard = false): void {
    if (this.#ended) return;
    this.#ended = true;
    if (discard) this.#sink?.discard();
    else this.#sink?.close();
    this.#notify();
  }

  /** The events after number `after` (-1: all), then each as it comes, until the end. */
  async *follow(after: number, signal?: AbortSignal): AsyncGenerator<string> {
    let next = Math.max(0, after + 1);
    for (;;) {
      while (next < this.#lines.length) yield this.#lines[next++]!;
      if (this.#ended || signal?.aborted) return;
      await new Promise<void>((resolve) => {
        const left = () => resolve();
        signal?.addEventListener("abort", left, { once: true });
        this.#wake.push(() => {
          signal?.removeEventListener("abort", left); // (not one more per event)
          resolve();
        });
      });
    }
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = [];
    for (const w of wake) w();
  }
}

/**
 * `<id>.events` of a files folder: a running response's events appended, FLUSH_MS apart,
 * counted in the folder's quota, through a descriptor held open: a file removed meanwhile
 * (its response deleted on another gateway) is not made again, and nothing more is written.
 * A write that fails (the folder full) stops the file where it is; its readers end with the
 * response as kept (followFile).
 */
export class EventFile implements EventSink {
  readonly #quota: FolderQuota | null;
  #fd: number | null = null;
  #pending: string[] = [];
  #timer: NodeJS.Timeout | null = null;

  constructor(path: string, quota: FolderQuota | null) {
    this.#quota = quota;
    try {
      this.#fd = openSync(path, "a"); // (there at once: a reader elsewhere tells it from none kept)
    } catch {}
  }

  write(line: string): void {
    if (this.#fd === null) return;
    this.#pending.push(line);
    this.#timer ??= setTimeout(() => this.#flush(), FLUSH_MS);
  }

  close(): void {
    this.#flush();
    this.discard();
  }

  discard(): void {
    this.#pending = [];
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    if (this.#fd !== null) closeSync(this.#fd);
    this.#fd = null;
  }

  #flush(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    if (this.#fd === null || this.#pending.length === 0) return;
    const text = `${this.#pending.join("\n")}\n`;
    this.#pending = [];
    try {
      if (fstatSync(this.#fd).nlink === 0) {
        this.discard(); // (removed)
        return;
      }
      appendFileSync(this.#fd, text);
      this.#quota?.grew(Buffer.byteLength(text));
    } catch {
      this.discard();
    }
  }
}

/**
 * The events of `<id>.events` after number `after`, following the file until its response's
 * last event. `ended()`: the response as kept when it is no longer in_progress (else null):
 * a file that ends without a last event (its gateway stopped, a write failed) is ended with
 * one for the response as kept (failed, by then, for a lost one).
 */
export async function* followFile(
  path: string,
  after: number,
  ended: () => object | null,
  signal?: AbortSignal,
): AsyncGenerator<string> {
  let offset = 0;
  let rest = Buffer.alloc(0);
  let sequence = -1;
  /** The response, once seen ended; when `ended` was last asked (it reads the response). */
  let over: object | null = null;
  let askedAt = 0;
  for (;;) {
    const chunk = readFrom(path, offset)?.bytes ?? Buffer.alloc(0);
    offset += chunk.length;
    let lines: string[] = [];
    if (chunk.length > 0) {
      const bytes = rest.length ? Buffer.concat([rest, chunk]) : chunk;
      const last = bytes.lastIndexOf(10);
      lines = last < 0 ? [] : bytes.subarray(0, last).toString("utf8").split("\n");
      rest = Buffer.from(bytes.subarray(last + 1));
    }
    for (const line of lines) {
      if (!line) continue;
      sequence++;
      if (sequence > after) yield line;
      if (isTerminal(line)) return;
    }
    if (signal?.aborted) return;
    if (chunk.length === 0) {
      // Nothing new: the response may have ended without its last event here (asked at
      // most every ENDED_POLL_MS). Its file is read once more after it is seen ended (its
      // last event is written before it is kept).
      if (over) {
        if (sequence + 1 > after)
          yield eventLine(terminalType(over), sequence + 1, { response: over });
        return;
      }
      if (Date.now() - askedAt >= ENDED_POLL_MS) {
        askedAt = Date.now();
        over = ended();
        if (over) continue;
      }
      await sleep(FOLLOW_POLL_MS, undefined, { signal }).catch(() => {});
    }
  }
}
