// How `shard` and `gateway` report loading progress. Run by `expertmesh up` (which sets
// EXPERTMESH_PROGRESS=1) they write protocol lines (src/local/progress.ts) on stderr that
// `up` turns into progress bars; run by hand or in a pod they keep their log lines.

import { encodeProgress, PROGRESS_ENV, type ProgressEvent } from "../local/progress.ts";
import type { Checkpoint } from "../model/checkpoint.ts";

export interface LoadProgressOptions {
  /** What is counted: "layers", "experts". */
  readonly unit: string;
  /** How many in all (a callback's own total replaces it). */
  readonly total: number;
  /** Bytes the load will read (0: not known). */
  readonly totalBytes: number;
  /** Bytes read so far by the checkpoint (the value at creation counts as 0). */
  readonly bytesRead: () => number;
  /** The human log line for `done` of `total`, when not reporting to `up`. */
  readonly human: (done: number, total: number) => void;
  /** Report protocol lines (default: $EXPERTMESH_PROGRESS is "1"). */
  readonly machine?: boolean;
  /** Writes one protocol line (default: to stderr). */
  readonly write?: (line: string) => void;
  readonly now?: () => number;
  /** Least time between two protocol lines, but the first and last (default 100 ms). */
  readonly minIntervalMs?: number;
}

export interface LoadProgress {
  /** `done` of `total` are loaded (total: the loader's count, when it has one). */
  update(done: number, total?: number): void;
  /** Loading is complete. */
  finish(): void;
}

export function loadProgress(o: LoadProgressOptions): LoadProgress {
  const machine = o.machine ?? process.env[PROGRESS_ENV] === "1";
  const write = o.write ?? ((l: string) => process.stderr.write(`${l}\n`));
  const now = o.now ?? Date.now;
  const every = o.minIntervalMs ?? 100;
  const t0 = now();
  const base = o.bytesRead();
  let total = o.total;
  let done = 0;
  let last = Number.NEGATIVE_INFINITY;
  const emit = (finished: boolean) => {
    const e: ProgressEvent = {
      unit: o.unit,
      done,
      total,
      bytes: o.bytesRead() - base,
      totalBytes: o.totalBytes,
      elapsedMs: now() - t0,
      finished,
    };
    write(encodeProgress(e));
    last = now();
  };
  if (machine) emit(false);
  return {
    update(d, t) {
      done = d;
      if (t !== undefined) total = t;
      if (!machine) o.human(done, total);
      else if (done >= total || now() - last >= every) emit(false);
    },
    finish() {
      if (!machine) return;
      done = total;
      emit(true);
    },
  };
}

const EXPERT = /^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\./;

/** The routed experts `wanted` selects in `ckpt`: how many, and their bytes on disk. */
export function expertLoad(
  ckpt: Checkpoint,
  wanted: (layer: number, expert: number) => boolean,
): { experts: number; bytes: number } {
  const seen = new Set<string>();
  let bytes = 0;
  for (const name of ckpt.names()) {
    const m = EXPERT.exec(name);
    if (!m || !wanted(Number(m[1]), Number(m[2]))) continue;
    seen.add(`${m[1]}.${m[2]}`);
    bytes += ckpt.tensorInfo(name).byteLength;
  }
  return { experts: seen.size, bytes };
}

/** Bytes of every tensor but the routed experts (a gateway), or of all (`--local`). */
export function denseLoadBytes(ckpt: Checkpoint, withExperts: boolean): number {
  let bytes = 0;
  for (const name of ckpt.names())
    if (withExperts || !EXPERT.test(name)) bytes += ckpt.tensorInfo(name).byteLength;
  return bytes;
}

export interface StatusLine {
  /** Seconds since the line was made. */
  seconds(): number;
  /** Shows `render()`: at most every 200 ms on a terminal, else every 10 s. */
  update(render: () => string): void;
  /**
   * The end: `text` as the last line (on a terminal it replaces the one shown; else written
   * unless it is the last one written); without `text`, the line shown stays.
   */
  end(text?: string): void;
}

/**
 * A line of progress on stderr for commands that wait (`fetch`, `batch`): rewritten in place
 * on a terminal, else a line every 10 s, so that a Job's log shows it without flooding.
 */
export function statusLine(
  o: { tty?: boolean; write?: (s: string) => void; now?: () => number } = {},
): StatusLine {
  const tty = o.tty ?? process.stderr.isTTY === true;
  const write = o.write ?? ((s: string) => process.stderr.write(s));
  const now = o.now ?? Date.now;
  const t0 = now();
  let last: number | null = null;
  let shown = "";
  return {
    seconds: () => (now() - t0) / 1000,
    update(render) {
      const t = now();
      if (last !== null && t - last < (tty ? 200 : 10_000)) return;
      last = t;
      shown = render();
      write(tty ? `\r\x1b[K${shown}` : `${shown}\n`);
    },
    end(text) {
      if (text === undefined) {
        if (tty && last !== null) write("\n");
      } else if (tty) write(`\r\x1b[K${text}\n`);
      else if (text !== shown) write(`${text}\n`);
    },
  };
}
