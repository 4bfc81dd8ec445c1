// The prefix cache's disk tier (ADR 0019): a block the KV pool forgets is written to a file
// named by its prefix hash, and a sequence whose prefix continues past the pool's blocks
// reads the next ones back instead of computing them. One folder per fingerprint of what
// the rows depend on (model, weights, KV dtype, block size), so a file is only ever read
// by a gateway that would have computed the same bytes.
//
// A file (kv-disk-file.ts): a 48-byte header and the block's rows, layer after layer. Written
// under a temporary name and renamed. Reads check everything (those read ahead on the reader
// thread, the others here); a file that fails is a miss, removed.
import { createHash } from "node:crypto";
import {
  closeSync,
  mkdirSync,
  openSync,
  readdirSync,
  readSync,
  rmSync,
  statSync,
  unlinkSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { unlink } from "node:fs/promises";
import { extname, join } from "node:path";
import { Worker } from "node:worker_threads";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import { alive } from "../util/process.ts";
import {
  BLOCK_FILE_RE,
  BLOCK_TMP_RE,
  blockFileProblem,
  DISK_HEADER_BYTES,
  blockFileName as fileName,
  fillBlockCrc,
  fillBlockFile,
  hashOfBlockFile,
  STALE_TMP_MS,
  writeBlockFile,
} from "./kv-disk-file.ts";
import type { ReaderReply, ReadRequest, ReadResult, ScanResult } from "./kv-disk-reader.ts";
import type { PrefixStore, PrefixStoreStats } from "./prefix-store.ts";

const readerUrl = new URL(`./kv-disk-reader${extname(import.meta.url)}`, import.meta.url);

export { DISK_HEADER_BYTES };

/** Rows copied out of the pool and not yet on disk, at most (more spills are dropped). */
const DEFAULT_MAX_PENDING = 64 * 2 ** 20;
/** Rows of files read ahead of their use and held in memory, at most. */
const DEFAULT_MAX_STAGED = 256 * 2 ** 20;

export interface DiskPrefixOptions {
  /** The folder given (--prefix-cache-disk); the files go in a folder per fingerprint under it. */
  readonly dir: string;
  /** Bytes the files of this fingerprint may take (headers included). */
  readonly maxBytes: number;
  /** Payload bytes of one block: its rows in every layer. */
  readonly blockBytes: number;
  /**
   * What the rows depend on (JSON): hashed into the fingerprint and written beside the files
   * as fingerprint.json, for people.
   */
  readonly identity: Record<string, unknown>;
  /** Copied rows waiting for their write, at most (default 64 MiB; more are dropped). */
  readonly maxPendingBytes?: number;
  /**
   * Files read ahead of their use (prefetch) and held in memory, at most (default: those of
   * 256 MiB of rows; at least one file).
   */
  readonly maxStagedBytes?: number;
  /** False: prefetch() reads nothing, and read() reads in the caller's step (default true). */
  readonly readAhead?: boolean;
  /**
   * Other gateways use the folder too (a ReadWriteMany volume): has() looks for a file it
   * does not know before saying no, the folder is scanned on the reader thread at open and
   * every minute after (files the others wrote or removed; nothing is listed on the caller's
   * thread), a file gone is a plain miss, and the caller writes blocks as they are computed
   * (kv-blocks.ts), not only when the pool forgets them.
   */
  readonly shared?: boolean;
  readonly log?: (message: string) => void;
}

/** Counts since start (a file per block). */
export type DiskPrefixStats = PrefixStoreStats;

interface Entry {
  readonly fileBytes: number;
  /** The file's bytes while its write runs (a read takes them from here). */
  pending: Buffer | null;
  /** Shared folder: a file this store found there (another gateway's, or an earlier run's). */
  readonly found?: true;
}

/**
 * A file read ahead of its use: its payload, checked on the reader thread, once the read has
 * ended (null while it runs).
 */
interface Staged {
  readonly entry: Entry;
  /** The reader's id of the read while it runs. */
  readonly id: number;
  payload: Buffer | null;
}

/** The 64-bit hex fingerprint of `identity` (canonical JSON: keys sorted). */
export function fingerprintOf(identity: Record<string, unknown>): string {
  const canon = (v: unknown): unknown =>
    v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(
          Object.keys(v)
            .sort()
            .map((k) => [k, canon((v as Record<string, unknown>)[k])]),
        )
      : Array.isArray(v)
        ? v.map(canon)
        : v;
  return createHash("sha256")
    .update(JSON.stringify(canon(identity)))
    .digest("hex")
    .slice(0, 16);
}

/** Another fingerprint's folder is removed only after this long unused. */
const OTHER_IDLE_MS = 3_600_000;
/** A running store refreshes its fingerprint.json's time this often (in use, not idle). */
const HEARTBEAT_MS = 600_000;
/** A shared folder is scanned again this often (files the other gateways wrote or removed). */
const SHARED_RESCAN_MS = 60_000;
/** A shared folder's file found missing is looked for again after this long. */
const SHARED_MISS_MS = 1_000;

function fingerprintText(fp: string, identity: Record<string, unknown>): string {
  return `${JSON.stringify({ fingerprint: fp, ...identity }, null, 2)}\n`;
}

/**
 * Folders of other fingerprints under `root` (older builds, models or settings) count
 * against the budget too: while they and this one's `ownBytes` exceed `maxBytes`, those
 * unused for over an hour (by their files' times: reads refresh them, a start rewrites
 * fingerprint.json) are removed, least recently used first. Only folders this store would
 * have written (a fingerprint's name, fingerprint.json, block and temporary files only) are
 * counted or touched. A running store refreshes its fingerprint.json every 10 minutes, so a
 * gateway's folder is never idle while the gateway runs.
 */
function removeIdleFingerprints(
  root: string,
  own: string,
  ownBytes: number,
  maxBytes: number,
): { folders: number; bytes: number } {
  const others: { path: string; bytes: number; used: number }[] = [];
  let names: string[];
  try {
    names = readdirSync(root);
  } catch {
    return { folders: 0, bytes: 0 };
  }
  for (const name of names) {
    if (name === own || !/^[0-9a-f]{16}$/.test(name)) continue;
    const path = join(root, name);
    try {
      const files = readdirSync(path);
      if (!files.includes("fingerprint.json")) continue;
      if (
        files.some(
          (f) => f !== "fingerprint.json" && !BLOCK_FILE_RE.test(f) && !BLOCK_TMP_RE.test(f),
        )
      )
        continue;
      let bytes = 0;
      let used = 0;
      for (const f of files) {
        const st = statSync(join(path, f), { throwIfNoEntry: false });
        if (!st?.isFile()) continue;
        bytes += st.size;
        used = Math.max(used, st.mtimeMs);
      }
      others.push({ path, bytes, used });
    } catch {
      // not a folder, or not ours to read
    }
  }
  let total = ownBytes + others.reduce((n, f) => n + f.bytes, 0);
  const gone = { folders: 0, bytes: 0 };
  const idle = others
    .filter((f) => Date.now() - f.used > OTHER_IDLE_MS)
    .sort((a, b) => a.used - b.used);
  for (const f of idle) {
    if (total <= maxBytes) break;
    try {
      rmSync(f.path, { recursive: true, force: true });
      total -= f.bytes;
      gone.folders++;
      gone.bytes += f.bytes;
    } catch {
      // left: counted still
    }
  }
  return gone;
}

export class DiskPrefixStore implements PrefixStore {
  readonly kind = "disk";
  readonly readsInStep = true;
  /** The fingerprint's folder. */
  readonly dir: string;
  readonly maxBytes: number;
  readonly blockBytes: number;
  readonly fileBytes: number;
  readonly #maxPending: number;
  readonly #log: (message: string) => void;
  /** By hash, least recently used first (a use moves an entry to the end). */
  readonly #entries = new Map<string, Entry>();
  /** Hashes whose write is running. */
  readonly #writing = new Map<string, Promise<void>>();
  /** Hashes whose file is being removed (a new write of one waits for it). */
  readonly #unlinking = new Map<string, Promise<void>>();
  #bytes = 0;
  #pending = 0;
  #tmp = 0;
  #loggedError = false;
  /** One file's bytes, for reads. */
  #scratch: Buffer | null = null;
  /** Files read ahead (prefetch), oldest first, and their bytes. */
  readonly #staged = new Map<string, Staged>();
  readonly #maxStaged: number;
  #readsAhead: boolean;
  #stagedBytes = 0;
  /** Called when a read ahead ends (the scheduler's user then schedules again). */
  onStaged: (() => void) | null = null;
  /** Called when a write ends (room for more: kv-blocks.ts retries the blocks it could not save). */
  onWritten: (() => void) | null = null;
  /** fingerprint.json's text, and the timer that refreshes its time while this store runs. */
  readonly #fingerprintJson: string;
  readonly #heartbeat: NodeJS.Timeout;
  /** Other gateways use the folder too (DiskPrefixOptions.shared). */
  readonly shared: boolean;
  /** Shared: hashes looked for on the disk and not found, and when (SHARED_MISS_MS). */
  readonly #missedAt = new Map<string, number>();
  /** Shared: callers of the rescan() running on the reader thread, and whether one ran. */
  #scanWaiters: (() => void)[] | null = null;
  #scanned = false;
  /** Writes running on the reader thread, by id. */
  readonly #ioWrites = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  #ioId = 0;
  /** The thread that reads ahead (made at the first prefetch), and its reads by id. */
  #reader: Worker | null = null;
  readonly #reads = new Map<number, { hash: string; staged: Staged }>();
  #readId = 0;
  readonly #stats = { hits: 0, readAhead: 0, sharedHits: 0, written: 0, dropped: 0, errors: 0 };

  /**
   * Opens (makes) the fingerprint's folder under `o.dir` and indexes the files there,
   * dropping leftovers of interrupted writes, files of another size, and the least
   * recently written past the budget. Throws EM_PREFIX_DISK when the folder is unusable.
   */
  static open(o: DiskPrefixOptions): DiskPrefixStore {
    const fp = fingerprintOf(o.identity);
    const dir = join(o.dir, fp);
    try {
      // The rows are users' prompts, in a form: for this user alone.
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      writeFileSync(join(dir, "fingerprint.json"), fingerprintText(fp, o.identity));
    } catch (e) {
      throw new ExpertMeshError(
        "EM_PREFIX_DISK",
        `--prefix-cache-disk ${o.dir}: cannot write there (${formatError(e)})`,
      );
    }
    const store = new DiskPrefixStore(dir, o);
    const gone = removeIdleFingerprints(o.dir, fp, store.#bytes, o.maxBytes);
    if (gone.folders > 0)
      store.#log(
        `prefix cache disk: removed ${gone.folders} folder(s) of other fingerprints under ${o.dir} ` +
          `(${(gone.bytes / 2 ** 20).toFixed(1)} MiB, unused for over an hour) to keep it within its budget`,
      );
    return store;
  }

  private constructor(dir: string, o: DiskPrefixOptions) {
    if (!Number.isInteger(o.blockBytes) || o.blockBytes < 1)
      throw new ExpertMeshError("EM_GATEWAY_INTERNAL", `block bytes ${o.blockBytes}`);
    this.dir = dir;
    this.blockBytes = o.blockBytes;
    this.fileBytes = DISK_HEADER_BYTES + o.blockBytes;
    if (!Number.isSafeInteger(o.maxBytes) || o.maxBytes < this.fileBytes)
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--prefix-cache-disk-bytes must hold one block of ${this.fileBytes} bytes, got ${o.maxBytes}`,
      );
    this.maxBytes = o.maxBytes;
    this.#maxPending = Math.max(o.maxPendingBytes ?? DEFAULT_MAX_PENDING, this.fileBytes);
    // By default the files of 256 MiB of rows: what one step may read (kv-blocks.ts).
    this.#maxStaged = Math.max(
      o.maxStagedBytes ?? Math.floor(DEFAULT_MAX_STAGED / this.blockBytes) * this.fileBytes,
      this.fileBytes,
    );
    this.#readsAhead = o.readAhead ?? true;
    this.shared = o.shared ?? false;
    this.#log = o.log ?? (() => {});
    this.#fingerprintJson = fingerprintText(fingerprintOf(o.identity), o.identity);
    // A shared folder may hold hundreds of thousands of files on a network volume: it is
    // scanned on the reader thread, in the background (has() finds files meanwhile).
    if (this.shared) void this.rescan();
    else this.#scan();
    // Its folder is in use while it runs, even with no block read or written: another
    // fingerprint's store removes folders unused for an hour (removeIdleFingerprints). A
    // shared folder is scanned again meanwhile.
    let beat = 0;
    const every = this.shared ? SHARED_RESCAN_MS : HEARTBEAT_MS;
    this.#heartbeat = setInterval(() => {
      beat += every;
      if (this.shared) void this.rescan();
      if (beat < HEARTBEAT_MS) return;
      beat = 0;
      const now = new Date();
      try {
        utimesSync(join(this.dir, "fingerprint.json"), now, now);
      } catch {
        // gone: made again with the next write
      }
    }, every);
    this.#heartbeat.unref();
  }

  #scan(): void {
    const found: { hash: string; mtime: number }[] = [];
    for (const name of readdirSync(this.dir)) {
      const path = join(this.dir, name);
      const tmp = BLOCK_TMP_RE.exec(name);
      if (tmp) {
        // An interrupted write, unless another live process (a gateway on the same folder)
        // is writing it: not ours (this process has written nothing yet; in a restarted
        // container an earlier one had the same pid), and not older than a write can take.
        const pid = Number(tmp[1]);
        const writing =
          pid !== process.pid &&
          alive(pid) &&
          Date.now() - (statSync(path, { throwIfNoEntry: false })?.mtimeMs ?? 0) < STALE_TMP_MS;
        if (!writing) this.#remove(path);
        continue;
      }
      if (!BLOCK_FILE_RE.test(name)) continue;
      let st: ReturnType<typeof statSync>;
      try {
        st = statSync(path);
      } catch {
        continue;
      }
      // base64url's spare bits: only the name this store would write stands for a hash.
      const hash = hashOfBlockFile(name);
      if (st.size !== this.fileBytes || hash === null) {
        this.#remove(path);
        continue;
      }
      found.push({ hash, mtime: st.mtimeMs });
    }
    found.sort((a, b) => a.mtime - b.mtime);
    for (const f of found) {
      this.#entries.set(f.hash, { fileBytes: this.fileBytes, pending: null });
      this.#bytes += this.fileBytes;
    }
    this.#trim(0);
  }

  get stats(): DiskPrefixStats {
    return { files: this.#entries.size, bytes: this.#bytes, ...this.#stats };
  }

  /**
   * Whether rows are kept under `hash`. In a shared folder, a file this store does not know
   * is looked for (once a second at most per hash), and known from then on if found: another
   * gateway wrote it.
   */
  has(hash: string): boolean {
    if (this.#entries.has(hash)) return true;
    if (!this.shared) return false;
    const now = Date.now();
    const missed = this.#missedAt.get(hash);
    if (missed !== undefined && now - missed < SHARED_MISS_MS) return false;
    const st = statSync(join(this.dir, fileName(hash)), { throwIfNoEntry: false });
    if (st?.isFile() && st.size === this.fileBytes) {
      this.#missedAt.delete(hash);
      this.#know(hash);
      return true;
    }
    if (this.#missedAt.size >= 4096) this.#missedAt.clear();
    this.#missedAt.set(hash, now);
    return false;
  }

  /** Indexes a file another gateway wrote (the most recently used), within the budget. */
  #know(hash: string): void {
    this.#trim(this.fileBytes);
    this.#entries.set(hash, { fileBytes: this.fileBytes, pending: null, found: true });
    this.#bytes += this.fileBytes;
  }

  /**
   * A shared folder scanned again, on the reader thread (a folder of a few hundred thousand
   * files on a network volume takes seconds to list): files the other gateways wrote since
   * the last scan are indexed (by their times, as at start), and those they removed are
   * forgotten. Runs every minute; resolves once applied (at once without a reader thread:
   * has() still finds the others' files one by one).
   */
  rescan(): Promise<void> {
    if (!this.#readsAhead) return Promise.resolve();
    this.#scanWaiters ??= [];
    const done = new Promise<void>((resolve) => this.#scanWaiters!.push(resolve));
    if (this.#scanWaiters.length === 1) {
      try {
        // The first scan starts from what the index knows (no stat of each again).
        const known = this.#scanned ? undefined : [...this.#entries.keys()].map(fileName);
        this.#readerThread().postMessage({
          scan: { dir: this.dir, fileBytes: this.fileBytes, known },
        });
        this.#scanned = true;
      } catch (e) {
        this.#readerLost(e);
      }
    }
    return done;
  }

  /** A scan's differences applied (rescan). */
  #scanDone(m: ScanResult): void {
    for (const name of m.removed) {
      const hash = hashOfBlockFile(name);
      const entry = hash === null ? undefined : this.#entries.get(hash);
      if (entry && !entry.pending && !this.#writing.has(hash!)) this.#drop(hash!, entry);
    }
    const found = m.added
      .map((f) => ({ hash: hashOfBlockFile(f.name), mtime: f.mtime }))
      .filter((f): f is { hash: string; mtime: number } => f.hash !== null)
      .filter((f) => !this.#entries.has(f.hash))
      .sort((a, b) => a.mtime - b.mtime);
    for (const f of found) this.#know(f.hash);
    this.#endScans();
  }

  #endScans(): void {
    const waiters = this.#scanWaiters ?? [];
    this.#scanWaiters = null;
    for (const w of waiters) w();
  }

  /**
   * Keeps a block's rows under `hash`: `parts` (its layers' rows, in order, blockBytes in
   * all) are copied now and written in the background. False when dropped (too many bytes
   * pending, or this block's previous write still running); true when kept or already there.
   */
  save(hash: string, parts: readonly Uint8Array[]): boolean {
    const known = this.#entries.get(hash);
    if (known) {
      this.#touch(hash, known);
      return true;
    }
    if (this.#pending + this.fileBytes > this.#maxPending || this.#writing.has(hash)) {
      this.#stats.dropped++;
      return false;
    }
    const name = fileName(hash);
    // With the reader thread, it computes the CRC and makes the system calls (~0.6 ms per MiB
    // of CRC off the engine's step): the file in shared memory, read from here meanwhile.
    const onReader = this.#readsAhead;
    const buf = onReader
      ? Buffer.from(new SharedArrayBuffer(this.fileBytes))
      : Buffer.allocUnsafe(this.fileBytes);
    fillBlockFile(buf, parts, this.blockBytes, hash, !onReader);
    this.#trim(this.fileBytes);
    const entry: Entry = { fileBytes: this.fileBytes, pending: buf };
    this.#entries.set(hash, entry);
    this.#bytes += this.fileBytes;
    this.#pending += this.fileBytes;
    const path = join(this.dir, name);
    const tmp = `${path}.tmp-${process.pid}-${this.#tmp++}`;
    const write = (async () => {
      try {
        // An earlier file of this hash still being removed: after that, not over this one.
        await this.#unlinking.get(hash);
        // The reader thread gone meanwhile (closed, failed): written here after all.
        if (onReader && this.#readsAhead)
          await this.#writeOnReader(buf.buffer as SharedArrayBuffer, tmp, path);
        else {
          if (onReader) fillBlockCrc(buf);
          await writeBlockFile(buf, tmp, path, this.dir, this.#fingerprintJson);
        }
        this.#stats.written++;
        // Evicted while it was written: nothing keeps it.
        if (this.#entries.get(hash) !== entry) await this.#unlink(hash);
      } catch (e) {
        this.#error(`writing ${path}`, e);
        await unlink(tmp).catch(() => {});
        if (this.#entries.get(hash) === entry) this.#drop(hash, entry);
      } finally {
        entry.pending = null;
        this.#pending -= this.fileBytes;
        this.#writing.delete(hash);
        this.onWritten?.();
      }
    })();
    this.#writing.set(hash, write);
    return true;
  }

  /**
   * The rows kept under `hash` (blockBytes, layer after layer; valid until the next read),
   * or null when there are none, or their file fails its checks (then removed).
   */
  read(hash: string): Uint8Array | null {
    const entry = this.#entries.get(hash);
    if (!entry) return null;
    this.#touch(hash, entry);
    if (entry.pending) {
      this.#stats.hits++;
      return entry.pending.subarray(DISK_HEADER_BYTES);
    }
    const path = join(this.dir, fileName(hash));
    const staged = this.#staged.get(hash);
    if (staged) this.#unstage(hash, staged);
    if (staged?.payload) {
      // Checked, and its time set, on the reader thread.
      this.#hit(entry);
      this.#stats.readAhead++;
      return staged.payload;
    }
    // Not read ahead, or that read still runs: read now (its result is then dropped).
    this.#scratch ??= Buffer.allocUnsafe(this.fileBytes);
    const buf = this.#scratch;
    let got = 0;
    try {
      const fd = openSync(path, "r");
      try {
        while (got < this.fileBytes) {
          const n = readSync(fd, buf, got, this.fileBytes - got, got);
          if (n === 0) break;
          got += n;
        }
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      if (!this.#goneFromShared((e as NodeJS.ErrnoException).code))
        this.#error(`reading ${path}`, e);
      this.#drop(hash, entry);
      this.#remove(path); // unreadable: not left outside the budget's count
      return null;
    }
    return this.#check(hash, entry, path, buf, got);
  }

  /** read()'s end: `buf` (`got` bytes of the file) checked, its payload or null. */
  #check(hash: string, entry: Entry, path: string, buf: Buffer, got: number): Uint8Array | null {
    const bad = blockFileProblem(buf, got, this.blockBytes, Buffer.from(hash, "base64"));
    if (bad !== null) {
      this.#damaged(hash, entry, path, bad);
      return null;
    }
    // Its time says when it was last used: the order of eviction after a restart.
    try {
      const now = new Date();
      utimesSync(path, now, now);
    } catch {
      // only an order
    }
    this.#hit(entry);
    return buf.subarray(DISK_HEADER_BYTES);
  }

  /** Counts a block read back from its file. */
  #hit(entry: Entry): void {
    this.#stats.hits++;
    if (entry.found) this.#stats.sharedHits++;
  }

  /** A file that failed its checks: a miss from now on, and removed. */
  #damaged(hash: string, entry: Entry, path: string, why: string): void {
    this.#error(`${path} is damaged (${why}); removed`, null);
    this.#drop(hash, entry);
    this.#remove(path);
  }

  /**
   * Starts reading the files of `hashes` (in order, stopping at one not kept) into memory
   * in the background, while the staging budget allows, so that read() then takes their
   * bytes without waiting on the disk. onStaged is called as each read ends. Reads already
   * started or done are not started again; files read ahead and not used are dropped,
   * oldest first, to make room.
   */
  prefetch(hashes: readonly string[]): void {
    if (!this.#readsAhead) return;
    const reads: ReadRequest[] = [];
    // Those wanted and read already become the newest: making room drops others first.
    for (const hash of hashes) {
      const staged = this.#staged.get(hash);
      if (staged) {
        this.#staged.delete(hash);
        this.#staged.set(hash, staged);
      }
    }
    for (const hash of hashes) {
      const entry = this.#entries.get(hash);
      if (!entry) break;
      if (entry.pending || this.#staged.has(hash)) continue;
      if (!this.#stageRoom()) break;
      const id = this.#readId++;
      const staged: Staged = { entry, id, payload: null };
      this.#staged.set(hash, staged);
      this.#stagedBytes += this.fileBytes;
      this.#reads.set(id, { hash, staged });
      reads.push({ id, path: join(this.dir, fileName(hash)), blockBytes: this.blockBytes, hash });
    }
    if (reads.length === 0) return;
    try {
      this.#readerThread().postMessage({ reads });
    } catch (e) {
      this.#readerLost(e);
    }
  }

  /**
   * Ends the reader thread and drops what it read (reads ahead stop; read() reads in its
   * caller's step).
   */
  async close(): Promise<void> {
    const r = this.#reader;
    clearInterval(this.#heartbeat);
    this.#readsAhead = false;
    this.#reader = null;
    this.#abandonReads();
    this.#endScans();
    this.#abandonWrites("the store was closed");
    for (const [hash, staged] of this.#staged) this.#unstage(hash, staged);
    await r?.terminate();
  }

  /** Starts the reader thread now rather than at the first read ahead (~0.1 s later). */
  startReader(): void {
    if (!this.#readsAhead) return;
    try {
      this.#readerThread();
    } catch (e) {
      this.#readerLost(e);
    }
  }

  #readerThread(): Worker {
    if (this.#reader) return this.#reader;
    if (!this.#readsAhead) throw new Error("no reader thread: read ahead is off or it was closed");
    const w = new Worker(readerUrl, { name: "expertmesh-kv-disk-reader" });
    // It never keeps the process alive.
    w.unref();
    w.on("message", (m: ReaderReply) => {
      if ("scanned" in m) this.#scanDone(m.scanned);
      else if ("wrote" in m) this.#wrote(m.wrote.id, m.wrote.error);
      else this.#readDone(m);
    });
    w.on("error", (e) => this.#readerLost(e));
    w.on("exit", (code) => {
      if (this.#reader === w) this.#readerLost(new Error(`exited with code ${code}`));
    });
    this.#reader = w;
    return w;
  }

  /** The reader thread failed: no more reads ahead; those started are read in the step. */
  #readerLost(e: unknown): void {
    if (!this.#readsAhead) return;
    this.#readsAhead = false;
    this.#reader = null;
    this.#error("its reader thread failed, files are read in the engine's step from now on", e);
    this.#abandonReads();
    this.#endScans();
    this.#abandonWrites("the reader thread failed");
    this.onStaged?.();
  }

  /** Writes `file` (a whole block file, its CRC filled there) on the reader thread. */
  #writeOnReader(file: SharedArrayBuffer, tmp: string, path: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const id = this.#ioId++;
      this.#ioWrites.set(id, { resolve, reject });
      try {
        const dir = this.dir;
        const fingerprintJson = this.#fingerprintJson;
        this.#readerThread().postMessage({ write: { id, file, tmp, path, dir, fingerprintJson } });
      } catch (e) {
        this.#readerLost(e);
        this.#wrote(id, `the reader thread is gone (${formatError(e)})`);
      }
    });
  }

  #wrote(id: number, error: string | null): void {
    const w = this.#ioWrites.get(id);
    if (!w) return;
    this.#ioWrites.delete(id);
    if (error === null) w.resolve();
    else w.reject(new Error(error));
  }

  /** Writes the reader thread will not end: failed (their entries dropped, counted). */
  #abandonWrites(why: string): void {
    for (const id of [...this.#ioWrites.keys()]) this.#wrote(id, why);
  }

  #abandonReads(): void {
    for (const { hash, staged } of [...this.#reads.values()]) this.#unstage(hash, staged);
    this.#reads.clear();
  }

  #readDone(m: ReadResult): void {
    const read = this.#reads.get(m.id);
    if (!read) return;
    this.#reads.delete(m.id);
    const { hash, staged } = read;
    // Used, dropped or evicted meanwhile: its bytes are not wanted (the call below still
    // lets a waiting prompt be scheduled again).
    if (this.#staged.get(hash) !== staged) {
      // nothing to keep
    } else if (m.buf === null) {
      const path = join(this.dir, fileName(hash));
      this.#unstage(hash, staged);
      if (m.damaged !== null) this.#damaged(hash, staged.entry, path, m.damaged);
      else {
        if (!this.#goneFromShared(m.code)) this.#error(`reading ${path}`, m.error);
        this.#drop(hash, staged.entry);
        this.#remove(path);
      }
    } else {
      staged.payload = Buffer.from(m.buf, DISK_HEADER_BYTES);
    }
    this.onStaged?.();
  }

  /** Whether a read ahead of `hash`'s file is running. */
  loading(hash: string): boolean {
    return this.#staged.get(hash)?.payload === null;
  }

  /** Reads ahead running or queued on the reader thread (not yet ended nor given up). */
  get readsInFlight(): number {
    return this.#reads.size;
  }

  /** Files the store holds read ahead at most. */
  get maxStagedFiles(): number {
    return Math.floor(this.#maxStaged / this.fileBytes);
  }

  /** Bytes held by reads ahead (running or done, not yet used). */
  get stagedBytes(): number {
    return this.#stagedBytes;
  }

  /** Makes room for one more file read ahead: drops done ones, oldest first. */
  #stageRoom(): boolean {
    for (const [hash, staged] of this.#staged) {
      if (this.#stagedBytes + this.fileBytes <= this.#maxStaged) break;
      if (staged.payload) this.#unstage(hash, staged);
    }
    return this.#stagedBytes + this.fileBytes <= this.#maxStaged;
  }

  #unstage(hash: string, staged: Staged): void {
    if (this.#staged.get(hash) !== staged) return;
    this.#staged.delete(hash);
    this.#stagedBytes -= this.fileBytes;
    // A read still queued is not wanted now: the reader skips it (one already running ends,
    // and its bytes are dropped here).
    if (staged.payload === null && this.#reads.delete(staged.id)) {
      try {
        this.#reader?.postMessage({ cancel: [staged.id] });
      } catch {
        // the reader is gone: nothing to skip
      }
    }
  }

  /** Whether a read's error code says another gateway removed the file (a plain miss). */
  #goneFromShared(code: string | undefined): boolean {
    return this.shared && code === "ENOENT";
  }

  /** Counts (and logs, the first time) an error of the tier's user. */
  noteError(what: string, e: unknown): void {
    this.#error(what, e);
  }

  /** Whether save() would take one more block now (its copy fits under the pending limit). */
  get hasRoom(): boolean {
    return this.#pending + this.fileBytes <= this.#maxPending;
  }

  /** Waits until one more block's write fits under the pending limit (flushes of many blocks). */
  async room(): Promise<void> {
    while (this.#pending + this.fileBytes > this.#maxPending && this.#writing.size > 0)
      await Promise.race(this.#writing.values());
  }

  /** Resolves once the writes of `hashes` started so far have ended. */
  async flushed(hashes: readonly string[]): Promise<void> {
    await Promise.all(hashes.map((h) => this.#writing.get(h)));
  }

  /** Resolves once every write and removal started so far has ended. */
  async flush(): Promise<void> {
    while (this.#writing.size > 0 || this.#unlinking.size > 0)
      await Promise.all([...this.#writing.values(), ...this.#unlinking.values()]);
  }

  #touch(hash: string, entry: Entry): void {
    this.#entries.delete(hash);
    this.#entries.set(hash, entry);
  }

  /** Evicts the least recently used files until `more` bytes fit in the budget. */
  #trim(more: number): void {
    for (const [hash, entry] of this.#entries) {
      if (this.#bytes + more <= this.maxBytes) break;
      this.#drop(hash, entry);
      // A pending write removes its own file when it ends (it is no longer the entry).
      if (!entry.pending) void this.#unlink(hash);
    }
  }

  /** Removes `hash`'s file in the background; a new write of it waits for that. */
  #unlink(hash: string): Promise<void> {
    const before = this.#unlinking.get(hash);
    const done: Promise<void> = (async () => {
      await before;
      await unlink(join(this.dir, fileName(hash))).catch(() => {});
    })().finally(() => {
      if (this.#unlinking.get(hash) === done) this.#unlinking.delete(hash);
    });
    this.#unlinking.set(hash, done);
    return done;
  }

  #drop(hash: string, entry: Entry): void {
    if (this.#entries.get(hash) !== entry) return;
    this.#entries.delete(hash);
    this.#bytes -= entry.fileBytes;
    const staged = this.#staged.get(hash);
    if (staged) this.#unstage(hash, staged);
  }

  #remove(path: string): void {
    try {
      unlinkSync(path);
    } catch {
      // gone already
    }
  }

  #error(what: string, e: unknown): void {
    this.#stats.errors++;
    // Once in the log: a full or read-only disk would otherwise log every block.
    if (this.#loggedError) return;
    this.#loggedError = true;
    this.#log(
      `prefix cache disk: ${what}${e ? ` (${formatError(e)})` : ""}; further errors are counted in /metrics only`,
    );
  }
}
