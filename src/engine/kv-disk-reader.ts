// The disk tier's reader thread (kv-disk.ts, ADR 0019): reads block files ahead of their
// use and hands each file's bytes back whole, in one message. On the engine's thread each
// file would take an event-loop turn per open, read and close, and that loop turns only
// between steps: three or four steps for a read. This thread's loop is free: it keeps
// several reads in flight (libuv's thread pool), and answers each in one turn. It also checks
// each file (header and CRC-32: ~0.6 ms per MiB) and sets its time (the order of use), which
// would otherwise take the engine's step. The store's writes (a block file's CRC-32 and its
// system calls) and a shared folder's scans (what the other gateways wrote and removed) run
// here too: the disk tier's I/O off the engine's thread, under the name "reader".
import { open, readdir, stat, unlink } from "node:fs/promises";
import { join } from "node:path";
import { parentPort } from "node:worker_threads";
import {
  BLOCK_FILE_RE,
  BLOCK_TMP_RE,
  blockFileProblem,
  DISK_HEADER_BYTES,
  fillBlockCrc,
  STALE_TMP_MS,
  writeBlockFile,
} from "./kv-disk-file.ts";

/** One block file to read: the whole of `path`, holding `blockBytes` of rows of block `hash`. */
export interface ReadRequest {
  readonly id: number;
  readonly path: string;
  readonly blockBytes: number;
  /** The block's prefix hash (base64 of 32 bytes), checked against the file's. */
  readonly hash: string;
}

/**
 * A file read: its checked bytes (the whole file, header first), or why there are none: it
 * could not be read (`error`), or it failed its checks (`damaged`).
 */
export interface ReadResult {
  readonly id: number;
  readonly buf: ArrayBuffer | null;
  readonly error: string | null;
  /** The failed read's system error code (ENOENT: the file is gone). */
  readonly code?: string;
  readonly damaged: string | null;
}

/** A system call's failure as text ("CODE: message"), and its code. */
function failure(e: unknown): { error: string; code?: string } {
  const err = e as NodeJS.ErrnoException;
  return err.code ? { error: `${err.code}: ${err.message}`, code: err.code } : { error: String(e) };
}

/** What a scan of the folder found since the last: block files added (and their times), removed. */
export interface ScanResult {
  readonly added: readonly { readonly name: string; readonly mtime: number }[];
  readonly removed: readonly string[];
}

/**
 * A block file to write for the store (its writes' CRC and system calls kept off the
 * engine's thread): the whole file in shared memory (the store serves reads of it from there
 * meanwhile), its CRC field filled here.
 */
export interface WriteRequest {
  readonly id: number;
  readonly file: SharedArrayBuffer;
  readonly tmp: string;
  readonly path: string;
  readonly dir: string;
  readonly fingerprintJson: string;
}

/** What the reader posts back: a read's result, a scan's, or a write's end. */
export type ReaderReply =
  | ReadResult
  | { readonly scanned: ScanResult }
  | { readonly wrote: { readonly id: number; readonly error: string | null } };

/** Reads in flight at once (deep enough for an SSD's queue, within libuv's 4 threads). */
const IN_FLIGHT = 4;

const port = parentPort;
if (!port) throw new Error("kv-disk-reader.ts runs as a worker thread");

const queue: ReadRequest[] = [];
let running = 0;

async function read(r: ReadRequest): Promise<ReadResult> {
  const bytes = DISK_HEADER_BYTES + r.blockBytes;
  const buf = new ArrayBuffer(bytes);
  const view = Buffer.from(buf);
  let got = 0;
  try {
    const fh = await open(r.path, "r");
    try {
      while (got < bytes) {
        const { bytesRead } = await fh.read(view, got, bytes - got, got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      const damaged = blockFileProblem(view, got, r.blockBytes, Buffer.from(r.hash, "base64"));
      if (damaged !== null) return { id: r.id, buf: null, error: null, damaged };
      // Its time says when it was last used: the order of eviction after a restart.
      const now = new Date();
      await fh.utimes(now, now).catch(() => {});
    } finally {
      await fh.close();
    }
    return { id: r.id, buf, error: null, damaged: null };
  } catch (e) {
    return { id: r.id, buf: null, ...failure(e), damaged: null };
  }
}

function pump(): void {
  while (running < IN_FLIGHT && queue.length > 0) {
    const r = queue.shift()!;
    if (cancelled.delete(r.id)) continue;
    running++;
    void read(r).then((result) => {
      running--;
      if (!cancelled.delete(r.id)) port!.postMessage(result, result.buf ? [result.buf] : []);
      pump();
    });
  }
  if (queue.length === 0 && running === 0) cancelled.clear();
}

/** Reads cancelled while queued or running (cleared whenever nothing is). */
const cancelled = new Set<number>();

/**
 * What the store posts: reads to do, ids of reads it no longer wants, or a scan of `dir`
 * (`known`: the block files it found at start, the first time).
 */
export type ReaderMessage =
  | { reads: readonly ReadRequest[] }
  | { cancel: readonly number[] }
  | { scan: { dir: string; fileBytes: number; known?: readonly string[] } }
  | { write: WriteRequest };

async function write(w: WriteRequest): Promise<string | null> {
  try {
    const buf = Buffer.from(w.file);
    fillBlockCrc(buf);
    await writeBlockFile(buf, w.tmp, w.path, w.dir, w.fingerprintJson);
    return null;
  } catch (e) {
    await unlink(w.tmp).catch(() => {});
    return failure(e).error;
  }
}

/** The block files the last scan listed. */
let listed = new Set<string>();

/**
 * The block files of `dir` added and removed since the last scan. Left-overs go: temporary
 * files of writes that died (older than STALE_TMP_MS, whoever wrote them: in a shared folder
 * a pid says nothing), and block files of a size this tier never writes.
 */
async function scan(dir: string, fileBytes: number): Promise<ScanResult> {
  let all: string[];
  try {
    all = await readdir(dir);
  } catch {
    return { added: [], removed: [] }; // gone: made again with the next write
  }
  for (const tmp of all.filter((n) => BLOCK_TMP_RE.test(n))) {
    const st = await stat(join(dir, tmp)).catch(() => null);
    if (st && Date.now() - st.mtimeMs > STALE_TMP_MS) await unlink(join(dir, tmp)).catch(() => {});
  }
  const names = all.filter((n) => BLOCK_FILE_RE.test(n));
  const now = new Set(names);
  const removed = [...listed].filter((n) => !now.has(n));
  const added: { name: string; mtime: number }[] = [];
  for (const name of names) {
    if (listed.has(name)) continue;
    const st = await stat(join(dir, name)).catch(() => null);
    if (st?.isFile() && st.size === fileBytes) added.push({ name, mtime: st.mtimeMs });
    else {
      // Gone, or damaged (written whole under a temporary name, a block file has its size).
      if (st?.isFile()) await unlink(join(dir, name)).catch(() => {});
      now.delete(name);
    }
  }
  listed = now;
  return { added, removed };
}

port.on("message", (m: ReaderMessage) => {
  if ("write" in m) {
    const id = m.write.id;
    void write(m.write).then((error) => port!.postMessage({ wrote: { id, error } }));
    return;
  }
  if ("scan" in m) {
    if (m.scan.known) listed = new Set(m.scan.known);
    void scan(m.scan.dir, m.scan.fileBytes).then((scanned) => port!.postMessage({ scanned }));
    return;
  }
  if ("cancel" in m) {
    // With nothing queued or running, those reads have ended already.
    if (queue.length > 0 || running > 0) for (const id of m.cancel) cancelled.add(id);
    return;
  }
  queue.push(...m.reads);
  pump();
});
