// The disk tier's reader thread (kv-disk.ts, ADR 0019): reads block files ahead of their
// use and hands each file's bytes back whole, in one message. On the engine's thread each
// file would take an event-loop turn per open, read and close, and the loop turns only
// between steps: three or four steps for a read. This thread answers in one.
import { closeSync, openSync, readSync } from "node:fs";
import { parentPort } from "node:worker_threads";

/** One file to read: `bytes` from the start of `path`. */
export interface ReadRequest {
  readonly id: number;
  readonly path: string;
  readonly bytes: number;
}

/** A file read: its bytes (`got` of them read), or why it could not be. */
export interface ReadResult {
  readonly id: number;
  readonly buf: ArrayBuffer | null;
  readonly got: number;
  readonly error: string | null;
}

const port = parentPort;
if (!port) throw new Error("kv-disk-reader.ts runs as a worker thread");

port.on("message", (reads: readonly ReadRequest[]) => {
  for (const r of reads) {
    const buf = new ArrayBuffer(r.bytes);
    const view = new Uint8Array(buf);
    let got = 0;
    let error: string | null = null;
    try {
      const fd = openSync(r.path, "r");
      try {
        while (got < r.bytes) {
          const n = readSync(fd, view, got, r.bytes - got, got);
          if (n === 0) break;
          got += n;
        }
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      error = err.code ? `${err.code}: ${err.message}` : String(e);
    }
    const result: ReadResult = { id: r.id, buf: error ? null : buf, got, error };
    port.postMessage(result, error ? [] : [buf]);
  }
});
