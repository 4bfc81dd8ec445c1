// The prefix cache's NATS tier (ADR 0028): blocks kept as values of a JetStream key-value
// bucket on the NATS server the gateways already use, so that every gateway of a model
// reads the prefixes any of them computed, on any node, and a new pod starts with them.
//
// A block is a block file (kv-disk-file.ts: a 48-byte header with the block's hash and the
// CRC-32 of its rows, then the rows), in as many values as the server's max_payload needs
// (one mostly), under the keys `<fingerprint>.<hash in base64url>.<parts>.<part>`: a gateway
// only reads blocks of its own fingerprint (model, weights, kernels, KV layout), whole.
// The bucket's stream drops its oldest values when full (discard old, not the KV default of
// refusing writes); a block read back from the older half of the bucket is written again, so
// the blocks in use stay. Every gateway watches the keys of its fingerprint (headers only:
// no rows cross the wire but those read), so has() answers from memory; a key the bucket
// dropped without telling (its budget) is a miss when read.
import {
  DiscardPolicy,
  jetstream,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
} from "@nats-io/jetstream";
import { type KV, Kvm, KvWatchInclude } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import { fingerprintOf } from "./kv-disk.ts";
import {
  blockFileName,
  blockFileProblem,
  DISK_HEADER_BYTES,
  fillBlockFile,
} from "./kv-disk-file.ts";
import type { PrefixStore, PrefixStoreStats } from "./prefix-store.ts";

/** Rows copied out of the pool and not yet in the bucket, at most (more are dropped). */
const DEFAULT_MAX_PENDING = 64 * 2 ** 20;
/** Blocks read ahead of their use and held in memory, at most. */
const DEFAULT_MAX_STAGED = 256 * 2 ** 20;
/** Values one block may be split into (under the server's max_payload). */
const MAX_PARTS = 64;
/** A JetStream request (a block's read or write) that takes longer fails. */
const READ_TIMEOUT_MS = 2000;
/**
 * Opening the bucket's watch and listing its keys: a consumer made on a replicated stream
 * waits for its copies to agree, which a busy cluster takes seconds over (2 s failed a
 * gateway's open on a loaded machine).
 */
const OPEN_TIMEOUT_MS = 15_000;
/** A bucket name NATS takes (the stream is KV_<name>). */
const BUCKET_RE = /^[A-Za-z0-9_-]{1,200}$/;

export interface RemotePrefixOptions {
  /** A connection to a NATS server with JetStream (not closed by the store). */
  readonly nc: NatsConnection;
  /** The key-value bucket (--prefix-cache-remote); made when missing. */
  readonly bucket: string;
  /** The bucket's budget when this store makes it (one made before keeps its own). */
  readonly maxBytes: number;
  /** Copies of the bucket on a NATS cluster when this store makes it (default 1). */
  readonly replicas?: number;
  /** Payload bytes of one block: its rows in every layer. */
  readonly blockBytes: number;
  /** What the rows depend on: hashed into the fingerprint that prefixes the keys. */
  readonly identity: Record<string, unknown>;
  /** Copied rows waiting for their write, at most (default 64 MiB; more are dropped). */
  readonly maxPendingBytes?: number;
  /** Blocks read ahead and held in memory, at most (default 256 MiB of them; at least one). */
  readonly maxStagedBytes?: number;
  /** File storage (default) or memory (lost when the NATS server stops). */
  readonly storage?: "file" | "memory";
  readonly log?: (message: string) => void;
}

/** A block the bucket holds (some of its parts, until all are seen). */
interface IndexEntry {
  /** The newest revision of its parts seen. */
  revision: number;
  /** This store computed it (a hit on another is a shared hit). */
  mine: boolean;
  /** Values it is written in, and a bit per part seen. */
  parts: number;
  seen: bigint;
}

/** Whether every part of the block is seen. */
const isWhole = (e: IndexEntry) => e.seen === (1n << BigInt(e.parts)) - 1n;

/** A read ahead: its payload once checked, null while the read runs. */
interface Staged {
  payload: Buffer | null;
}

export class RemotePrefixStore implements PrefixStore {
  readonly kind = "remote";
  readonly shared = true;
  /** Only blocks read ahead are read: the network is never waited on in a step. */
  readonly readsInStep = false;
  readonly bucket: string;
  readonly blockBytes: number;
  readonly fileBytes: number;
  /** The fingerprint the keys start with. */
  readonly fingerprint: string;
  /** The bucket's budget (its own, when another gateway made it). */
  maxBytes: number;
  onStaged: (() => void) | null = null;
  onWritten: (() => void) | null = null;
  readonly #o: RemotePrefixOptions;
  readonly #log: (message: string) => void;
  readonly #maxPending: number;
  readonly #maxStaged: number;
  #kv: KV | null = null;
  #stopWatch: (() => void) | null = null;
  /**
   * Keys of this fingerprint in the bucket, as their hashes, oldest write first: the value's
   * revision, and whether this store computed the block (a hit on another is a shared hit).
   * No more than the bucket holds: those past it are gone (it drops its oldest first).
   */
  readonly #index = new Map<string, IndexEntry>();
  /** Of those, blocks whose every part is seen. */
  #wholeBlocks = 0;
  /** Values one block is written in (its file split under the server's max_payload). */
  #parts = 1;
  /** Values being written: their bytes (a read takes them from here). */
  readonly #pending = new Map<string, Buffer>();
  readonly #writing = new Map<string, Promise<void>>();
  #pendingBytes = 0;
  readonly #staged = new Map<string, Staged>();
  #stagedBytes = 0;
  /** The highest revision (stream sequence) seen: how far the bucket's writes have gone. */
  #lastRevision = 0;
  #closed = false;
  #loggedError = false;
  /** whenKnown()'s callers: the blocks each still waits to see whole. */
  readonly #waiters = new Set<{ missing: Set<string>; done: (known: boolean) => void }>();
  readonly #stats = { hits: 0, readAhead: 0, sharedHits: 0, written: 0, dropped: 0, errors: 0 };

  /**
   * Opens the bucket (made when missing) and lists the keys of this fingerprint. Throws
   * EM_PREFIX_REMOTE when the server has no JetStream, a block would not fit in one message,
   * or the bucket cannot be made or read.
   */
  static async open(o: RemotePrefixOptions): Promise<RemotePrefixStore> {
    const store = new RemotePrefixStore(o);
    await store.#open();
    return store;
  }

  private constructor(o: RemotePrefixOptions) {
    if (!BUCKET_RE.test(o.bucket))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--prefix-cache-remote '${o.bucket}' is no bucket name: letters, digits, '-' and '_' only`,
      );
    this.#o = o;
    this.bucket = o.bucket;
    this.blockBytes = o.blockBytes;
    this.fileBytes = DISK_HEADER_BYTES + o.blockBytes;
    this.maxBytes = o.maxBytes;
    this.fingerprint = fingerprintOf(o.identity);
    this.#log = o.log ?? (() => {});
    this.#maxPending = Math.max(this.fileBytes, o.maxPendingBytes ?? DEFAULT_MAX_PENDING);
    this.#maxStaged = Math.max(this.fileBytes, o.maxStagedBytes ?? DEFAULT_MAX_STAGED);
    if (o.maxBytes < this.fileBytes)
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--prefix-cache-remote-bytes must hold one block of ${this.fileBytes} bytes, got ${o.maxBytes}`,
      );
  }

  async #open(): Promise<void> {
    const { nc, bucket } = this.#o;
    const where = `bucket '${bucket}' on ${nc.getServer()}`;
    const fail = (why: string, e?: unknown): never => {
      throw new ExpertMeshError(
        "EM_PREFIX_REMOTE",
        `prefix cache ${where}: ${why}${e === undefined ? "" : ` (${formatError(e)})`}`,
        { cause: e },
      );
    };
    if (nc.info?.jetstream !== true)
      fail(
        "the NATS server has no JetStream: start it with JetStream on (nats-server -js, or `jetstream {}` in its configuration), or drop --prefix-cache-remote",
      );
    // Room for the message's subject and headers besides the part.
    const partRoom = (nc.info?.max_payload ?? 0) - 1024;
    this.#parts = Math.ceil(this.fileBytes / partRoom);
    if (partRoom <= 0 || this.#parts > MAX_PARTS)
      fail(
        `one block takes ${this.fileBytes} bytes, more than ${MAX_PARTS} values under the server's max_payload ${nc.info?.max_payload}: raise max_payload in its configuration, or make blocks smaller (--block-size, --kv-cache-dtype)`,
      );
    const partBytes = Math.ceil(this.fileBytes / this.#parts);
    const stream = `KV_${bucket}`;
    try {
      const jsm = await jetstreamManager(nc);
      let info = await jsm.streams.info(stream).catch((e: unknown) => {
        if (/stream not found/i.test(String((e as Error).message))) return null;
        throw e;
      });
      if (info === null) {
        // A key-value bucket's stream (as @nats-io/kv makes it), but full means the oldest
        // values go, not that writes are refused: a cache, not a record.
        const config = {
          name: stream,
          subjects: [`$KV.${bucket}.>`],
          retention: RetentionPolicy.Limits,
          max_msgs_per_subject: 1,
          max_bytes: this.maxBytes,
          max_msg_size: partBytes + 1024, // and headers
          discard: DiscardPolicy.Old,
          storage: this.#o.storage === "memory" ? StorageType.Memory : StorageType.File,
          num_replicas: this.#o.replicas ?? 1,
          allow_rollup_hdrs: true,
          allow_direct: true,
          description: "expertmesh prefix cache blocks (ADR 0028)",
        };
        info = await jsm.streams.add(config).catch(async (e: unknown) => {
          // Another gateway made it meanwhile.
          const again = await jsm.streams.info(stream).catch(() => null);
          if (again) return again;
          throw e;
        });
      } else if (info.config.max_bytes !== this.maxBytes) {
        this.#log(
          `prefix cache ${where}: keeps the budget it was made with, ${info.config.max_bytes} bytes (not ${this.maxBytes})`,
        );
      }
      const copies = this.#o.replicas ?? 1;
      if (info.config.num_replicas !== copies)
        this.#log(
          `prefix cache ${where}: keeps the ${info.config.num_replicas} cop${info.config.num_replicas === 1 ? "y" : "ies"} it was made with (not ${copies})`,
        );
      if (info.config.discard !== DiscardPolicy.Old)
        this.#log(
          `prefix cache ${where}: the bucket refuses writes once full (discard ${info.config.discard}, made elsewhere): no block is written after that; let the gateway make it, or make it with discard old`,
        );
      if (info.config.max_bytes > 0) this.maxBytes = info.config.max_bytes;
      if (info.config.max_msg_size > 0 && info.config.max_msg_size < partBytes)
        fail(
          `the bucket takes values of ${info.config.max_msg_size} bytes at most, and one block takes ${this.#parts} of ${partBytes}: use another bucket, or make blocks smaller`,
        );
      this.#lastRevision = info.state.last_seq;
      // A read that takes longer is a miss (the prompt waiting for it computes instead).
      const direct = { allow_direct: info.config.allow_direct };
      this.#kv = await new Kvm(jetstream(nc, { timeout: READ_TIMEOUT_MS })).open(bucket, direct);
      const opening = await new Kvm(jetstream(nc, { timeout: OPEN_TIMEOUT_MS })).open(
        bucket,
        direct,
      );
      // Changes from now on, then what is there: a key written between the two is seen twice.
      const watch = await opening.watch({
        key: `${this.fingerprint}.>`,
        headers_only: true,
        include: KvWatchInclude.UpdatesOnly,
      });
      this.#stopWatch = () => watch.stop();
      void (async () => {
        for await (const e of watch) this.#seen(e.key, e.operation, e.revision);
      })().catch((e: unknown) => this.#error("watching the bucket's keys", e));
      const keys = await opening.keys(`${this.fingerprint}.>`);
      for await (const key of keys) this.#seen(key, "PUT", 0);
    } catch (e) {
      if (e instanceof ExpertMeshError) throw e;
      const copies = this.#o.replicas ?? 1;
      const why = String((e as Error | undefined)?.message ?? e);
      if (copies > 1 && /replicas > 1 not supported|insufficient resources/i.test(why))
        fail(
          `cannot make the bucket in ${copies} copies: that needs a NATS cluster of at least ${copies} servers with JetStream (--prefix-cache-remote-replicas, spec.gateway.kvCache.remoteReplicas; the chart's nats.replicas)`,
          e,
        );
      fail(
        `cannot make or open the bucket (a budget of ${this.maxBytes} bytes over what the server's JetStream may store, or an account without JetStream, are the usual causes)`,
        e,
      );
    }
  }

  /**
   * A key of this fingerprint was written (or removed), as the watch, the listing or this
   * store's own write (`mine`) says.
   */
  #seen(key: string, op: string, revision: number, mine = false): void {
    const k = parseKey(key, this.fingerprint);
    if (k === null) return;
    if (revision > this.#lastRevision) this.#lastRevision = revision;
    const known = this.#index.get(k.hash);
    if (op !== "PUT") {
      // A part gone: the block is.
      this.#forget(k.hash);
      return;
    }
    const bit = 1n << BigInt(k.part);
    // A part seen again (the listing after the watch, the watch after the write's answer)
    // keeps the block's place.
    if (known && known.parts === k.parts && revision <= known.revision && known.seen & bit) {
      known.mine ||= mine;
      return;
    }
    // The newest now; a write in another number of parts starts over.
    const same = known?.parts === k.parts;
    this.#forget(k.hash);
    const entry = {
      revision: Math.max(revision, same ? known.revision : 0),
      mine: mine || (same && known.mine),
      parts: k.parts,
      seen: (same ? known.seen : 0n) | bit,
    };
    this.#index.set(k.hash, entry);
    if (isWhole(entry)) {
      this.#wholeBlocks++;
      for (const w of this.#waiters)
        if (w.missing.delete(k.hash) && w.missing.size === 0) w.done(true);
    }
    const fit = Math.floor(this.maxBytes / this.fileBytes);
    for (const old of this.#index.keys()) {
      if (this.#index.size <= fit) break;
      this.#forget(old);
    }
  }

  /** Takes `hash`'s block out of the index. */
  #forget(hash: string): void {
    const e = this.#index.get(hash);
    if (!e) return;
    this.#index.delete(hash);
    if (isWhole(e)) this.#wholeBlocks--;
  }

  /** Whether every part of `hash`'s block is in the bucket, as far as this store knows. */
  #whole(hash: string): boolean {
    const e = this.#index.get(hash);
    return e !== undefined && isWhole(e);
  }

  /** The keys of `hash`'s block: one per part. */
  #keys(hash: string, parts = this.#parts): string[] {
    const name = blockFileName(hash).slice(0, -3);
    return Array.from({ length: parts }, (_, i) => `${this.fingerprint}.${name}.${parts}.${i}`);
  }

  get stats(): PrefixStoreStats {
    return {
      files: this.#wholeBlocks,
      bytes: this.#wholeBlocks * this.fileBytes,
      ...this.#stats,
    };
  }

  has(hash: string): boolean {
    return this.#whole(hash) || this.#pending.has(hash);
  }

  /**
   * Resolves true once every block of `hashes` is known to be in the bucket (another
   * gateway wrote them: a prefill gateway, ADR 0029), false when some are not within
   * `timeoutMs` or the store closes.
   */
  whenKnown(hashes: readonly string[], timeoutMs: number): Promise<boolean> {
    const missing = new Set(hashes.filter((h) => !this.has(h)));
    if (missing.size === 0) return Promise.resolve(true);
    if (this.#closed) return Promise.resolve(false);
    return new Promise((resolve) => {
      const w = {
        missing,
        done: (known: boolean) => {
          clearTimeout(timer);
          this.#waiters.delete(w);
          resolve(known);
        },
      };
      const timer = setTimeout(() => w.done(false), timeoutMs);
      this.#waiters.add(w);
    });
  }

  save(hash: string, parts: readonly Uint8Array[]): boolean {
    if (this.has(hash)) return true;
    if (this.#closed || !this.hasRoom || this.#writing.has(hash)) {
      this.#stats.dropped++;
      return false;
    }
    const buf = Buffer.allocUnsafe(this.fileBytes);
    fillBlockFile(buf, parts, this.blockBytes, hash);
    this.#put(hash, buf);
    return true;
  }

  /** Writes the block file `buf` under `hash`'s key in the background. */
  /** `mine`: a block this store computed (not one read back and written again). */
  #put(hash: string, buf: Buffer, mine = true): void {
    this.#pending.set(hash, buf);
    this.#pendingBytes += buf.length;
    const write = (async () => {
      try {
        const keys = this.#keys(hash);
        const size = Math.ceil(buf.length / keys.length);
        // In order: the bucket drops its oldest first, part 0 before the others.
        for (const [i, key] of keys.entries()) {
          const revision = await this.#kv!.put(key, buf.subarray(i * size, (i + 1) * size));
          this.#seen(key, "PUT", revision, mine);
        }
        this.#stats.written++;
      } catch (e) {
        this.#error("writing a block", e);
      } finally {
        this.#pending.delete(hash);
        this.#pendingBytes -= buf.length;
        this.#writing.delete(hash);
        this.onWritten?.();
      }
    })();
    this.#writing.set(hash, write);
  }

  read(hash: string): Uint8Array | null {
    const pending = this.#pending.get(hash);
    if (pending) {
      this.#stats.hits++;
      return pending.subarray(DISK_HEADER_BYTES);
    }
    const staged = this.#staged.get(hash);
    if (!staged?.payload) return null; // not read ahead: a miss (no wait on the network here)
    this.#unstage(hash);
    this.#stats.hits++;
    this.#stats.readAhead++;
    if (!this.#index.get(hash)?.mine) this.#stats.sharedHits++;
    return staged.payload;
  }

  prefetch(hashes: readonly string[]): void {
    if (this.#closed) return;
    for (const hash of hashes) {
      if (!this.has(hash)) break;
      if (this.#pending.has(hash) || this.#staged.has(hash)) continue;
      if (!this.#stageRoom()) break;
      const staged: Staged = { payload: null };
      this.#staged.set(hash, staged);
      this.#stagedBytes += this.fileBytes;
      void this.#fetch(hash, staged);
    }
  }

  /** Reads `hash`'s values into `staged`, checked; a part missing or damaged is a miss. */
  async #fetch(hash: string, staged: Staged): Promise<void> {
    const keys = this.#keys(hash, this.#index.get(hash)?.parts);
    try {
      const entries = await Promise.all(keys.map((k) => this.#kv!.get(k)));
      if (this.#staged.get(hash) !== staged) return; // given up meanwhile
      if (entries.some((e) => e === null || e.operation !== "PUT")) {
        // The bucket dropped a part for room (no one is told): a plain miss.
        this.#forget(hash);
        this.#unstage(hash);
        return;
      }
      const values = entries.map((e) => e!.value);
      const value =
        values.length === 1
          ? Buffer.from(values[0]!.buffer, values[0]!.byteOffset, values[0]!.byteLength)
          : Buffer.concat(values);
      const bad = blockFileProblem(
        value,
        value.length,
        this.blockBytes,
        Buffer.from(hash, "base64"),
      );
      if (bad !== null) {
        this.#error(`the block under ${keys[0]} is damaged (${bad}); removed`, null);
        this.#forget(hash);
        this.#unstage(hash);
        await Promise.all(keys.map((k) => this.#kv!.purge(k).catch(() => {})));
        return;
      }
      staged.payload = value.subarray(DISK_HEADER_BYTES);
      // Read from the older half of the bucket: written again, so that a block in use is not
      // the next to go.
      const oldest = Math.min(...entries.map((e) => e!.revision));
      const blocks = Math.floor(this.maxBytes / this.fileBytes) * keys.length;
      if (this.#lastRevision - oldest > blocks / 2 && !this.#writing.has(hash) && this.hasRoom)
        this.#put(hash, Buffer.from(value), false);
    } catch (e) {
      if (this.#staged.get(hash) !== staged) return;
      this.#error("reading a block", e);
      this.#unstage(hash);
    } finally {
      this.onStaged?.();
    }
  }

  loading(hash: string): boolean {
    return this.#staged.get(hash)?.payload === null;
  }

  get maxStagedFiles(): number {
    return Math.floor(this.#maxStaged / this.fileBytes);
  }

  /** Makes room for one more block read ahead: drops those read and unused, oldest first. */
  #stageRoom(): boolean {
    for (const [hash, staged] of this.#staged) {
      if (this.#stagedBytes + this.fileBytes <= this.#maxStaged) break;
      if (staged.payload) this.#unstage(hash);
    }
    return this.#stagedBytes + this.fileBytes <= this.#maxStaged;
  }

  #unstage(hash: string): void {
    if (!this.#staged.delete(hash)) return;
    this.#stagedBytes -= this.fileBytes;
  }

  noteError(what: string, e: unknown): void {
    this.#error(what, e);
  }

  get hasRoom(): boolean {
    return this.#pendingBytes + this.fileBytes <= this.#maxPending;
  }

  async room(): Promise<void> {
    while (!this.hasRoom && this.#writing.size > 0) await Promise.race(this.#writing.values());
  }

  async flush(): Promise<void> {
    while (this.#writing.size > 0) await Promise.all(this.#writing.values());
  }

  async flushed(hashes: readonly string[]): Promise<void> {
    await Promise.all(hashes.map((h) => this.#writing.get(h)));
  }

  /** Ends the watch after the writes started so far; the connection stays open. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const w of this.#waiters) w.done(false);
    await this.flush();
    this.#stopWatch?.();
    this.#staged.clear();
    this.#stagedBytes = 0;
  }

  #error(what: string, e: unknown): void {
    this.#stats.errors++;
    if (this.#loggedError) return;
    this.#loggedError = true;
    this.#log(
      `prefix cache bucket '${this.bucket}': ${what}${e ? ` (${formatError(e)})` : ""}; further errors are counted in /metrics only`,
    );
  }
}

/**
 * The block and part a key of fingerprint `fp` stands for, or null when it is no key this
 * store writes.
 */
function parseKey(key: string, fp: string): { hash: string; parts: number; part: number } | null {
  const m = /^([A-Za-z0-9_-]{43})\.(\d{1,3})\.(\d{1,3})$/.exec(
    key.startsWith(`${fp}.`) ? key.slice(fp.length + 1) : "",
  );
  if (!m) return null;
  const parts = Number(m[2]);
  const part = Number(m[3]);
  if (parts < 1 || parts > MAX_PARTS || part >= parts) return null;
  const hash = Buffer.from(m[1]!, "base64url").toString("base64");
  return blockFileName(hash) === `${m[1]}.kv` ? { hash, parts, part } : null;
}
