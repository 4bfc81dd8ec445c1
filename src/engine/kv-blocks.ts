// The MLA latent KV cache in fixed-size blocks under a memory budget (as vLLM's paged
// cache, with MLA's one latent row per token and layer instead of per-head K and V).
// BlockAllocator is the pure bookkeeping (free list, one block table per sequence);
// BlockKvCache holds the rows and gives each sequence a LatentCache view through its
// block table, so the scheduler can admit, grow, preempt and free sequences by blocks.
//
// Prefix caching (vLLM's automatic prefix caching): a full block whose rows are computed
// is registered under the hash of its tokens and of every token before it (the rows at a
// position depend on all earlier tokens). A new sequence whose first blocks hash the same
// takes those blocks into its table (shared, counted by reference) and skips computing
// them. A block no sequence holds keeps its rows and hash until a reservation needs it
// (least recently freed first), so a prefix outlives the requests that computed it.
// With tiers under the pool (PrefixTier over stores, nearest first: a disk, ADR 0019, a NATS
// bucket, ADR 0028, or both) a registered block is handed to them when its block is taken for
// other rows, and a prefix continues with their blocks, read back into free blocks, past
// those still in the pool.
import type { ModelConfig } from "../model/config.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { KvPages } from "./backend.ts";
import type { LatentCache } from "./batch.ts";
import { encodeKvRows, type KvDtype, kvRowBytes, writeKvBytes } from "./kv-format.ts";
import type { PrefixStore } from "./prefix-store.ts";

/** Where registered blocks go when the pool forgets them, and come back from. */
export interface PrefixTier {
  /** Block `block`, registered under `hash`, is about to be forgotten: keep its rows. */
  evicting(block: number, hash: string): void;
  /** Whether rows are kept under `hash`. */
  has(hash: string): boolean;
  /**
   * Reads the rows kept under `hash`: a function that writes them into a block (false if
   * that failed; valid until the next fetch), or null when they could not be had.
   */
  fetch(hash: string): ((block: number) => boolean) | null;
  /**
   * Starts reading the rows of `hashes` ahead of their fetch, in the background; a tier
   * without reads of its own (in memory) leaves it out.
   */
  prefetch?(hashes: readonly string[]): void;
  /** Whether a read ahead of `hash`'s rows is still running. */
  loading?(hash: string): boolean;
  /**
   * fetch() reads rows not read ahead itself (a local disk): a prompt alone reads them in its
   * step rather than waiting for reads ahead. Without it (the NATS tier), only rows read
   * ahead are fetched, and a prompt alone waits for their reads too.
   */
  readonly readsInStep?: boolean;
  /**
   * Block `block`'s rows are all computed and registered under `hash`: a tier that others
   * read too (a shared disk or a NATS bucket) keeps them now, not only once they are forgotten.
   */
  computed?(block: number, hash: string): void;
}

/** Free list and block tables; knows nothing about the rows stored in the blocks. */
export class BlockAllocator {
  readonly numBlocks: number;
  /** Token positions per block. */
  readonly blockSize: number;
  #free: number[];
  readonly #tables = new Map<number, number[]>();
  /** Sequences holding each block. */
  readonly #refs: Int32Array;
  /** Registered full blocks: hash -> block, and back. */
  readonly #byHash = new Map<string, number>();
  readonly #hashOf = new Map<number, string>();
  /** Registered blocks no sequence holds, least recently freed first (reusable). */
  readonly #cached = new Set<number>();
  /** The second tier under the registered blocks (none: forgotten ones are gone). */
  tier: PrefixTier | null = null;
  /** Of the blocks the last attachPrefix gave, those read back from the tier. */
  lastLoaded = 0;
  /** The last attachPrefix stopped at its read limit with more of the prefix in the tier. */
  lastCapped = false;
  /** Blocks one attachPrefix reads from the tier at most (a bound on a step's reads). */
  maxTierReads = Number.POSITIVE_INFINITY;

  constructor(numBlocks: number, blockSize: number) {
    if (
      !Number.isInteger(numBlocks) ||
      numBlocks < 1 ||
      !Number.isInteger(blockSize) ||
      blockSize < 1
    )
      throw new ExpertMeshError(
        "EM_KV_BUDGET",
        `the KV cache needs at least one block of at least one token (got ${numBlocks} blocks of ${blockSize})`,
      );
    this.numBlocks = numBlocks;
    this.blockSize = blockSize;
    // Popped from the end: block 0 is handed out first.
    this.#free = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i);
    this.#refs = new Int32Array(numBlocks);
  }

  /** Blocks a reservation may take: empty ones and cached ones no sequence holds. */
  get numFreeBlocks(): number {
    return this.#free.length + this.#cached.size;
  }

  /** Blocks no sequence holds that keep a registered prefix (included in numFreeBlocks). */
  get numCachedBlocks(): number {
    return this.#cached.size;
  }

  get numUsedBlocks(): number {
    return this.numBlocks - this.numFreeBlocks;
  }

  /** Fraction of blocks in use, 0..1. */
  get usage(): number {
    return this.numUsedBlocks / this.numBlocks;
  }

  /** Blocks that hold `numTokens` positions. */
  blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSize);
  }

  /**
   * Grows `seq`'s block table to hold `numTokens` positions. All or nothing: false, and
   * no change, when the free blocks do not suffice.
   */
  reserve(seq: number, numTokens: number): boolean {
    const table = this.#tables.get(seq) ?? [];
    const more = this.blocksFor(numTokens) - table.length;
    if (more > this.numFreeBlocks) return false;
    for (let i = 0; i < more; i++) {
      const b = this.#take();
      this.#refs[b] = 1;
      table.push(b);
    }
    this.#tables.set(seq, table);
    return true;
  }

  /** An empty block, else the least recently freed cached one (its prefix forgotten). */
  #take(): number {
    const free = this.#free.pop();
    if (free !== undefined) return free;
    const b: number = this.#cached.values().next().value!;
    const hash = this.#hashOf.get(b)!;
    this.tier?.evicting(b, hash);
    this.#cached.delete(b);
    this.#byHash.delete(hash);
    this.#hashOf.delete(b);
    return b;
  }

  /**
   * Gives `seq` (holding no blocks yet) the registered blocks of the longest run of
   * `hashes` (its blocks' prefix hashes, in order); resolves how many it got. A block not
   * in the pool but in the tier is read back into a free block (registered again) while
   * `keepFree(n)` blocks stay free besides, with n blocks attached: the blocks the
   * sequence's first chunk then needs, so that reading never keeps it from being
   * admitted; and at most maxTierReads (lastCapped says when that stopped it). lastLoaded
   * says how many were read.
   */
  attachPrefix(
    seq: number,
    hashes: readonly string[],
    keepFree: (attached: number) => number = () => 1,
  ): number {
    this.lastLoaded = 0;
    this.lastCapped = false;
    if (this.#tables.has(seq)) return 0;
    const table: number[] = [];
    for (const h of hashes) {
      let b = this.#byHash.get(h);
      if (b !== undefined) {
        this.#cached.delete(b);
        this.#refs[b]!++;
      } else {
        if (!this.tier?.has(h) || this.numFreeBlocks - 1 < keepFree(table.length + 1)) break;
        if (this.lastLoaded >= this.maxTierReads) {
          this.lastCapped = true;
          break;
        }
        // Read first: a miss costs no block of the pool.
        const put = this.tier.fetch(h);
        if (!put) break;
        b = this.#take();
        if (!put(b)) {
          this.#free.push(b);
          break;
        }
        this.#refs[b] = 1;
        this.#byHash.set(h, b);
        this.#hashOf.set(b, h);
        this.lastLoaded++;
      }
      table.push(b);
    }
    if (table.length > 0) this.#tables.set(seq, table);
    return table.length;
  }

  /**
   * Starts reading ahead the blocks attachPrefix(`hashes`) would read from the tier (those
   * past the pool's, up to the first the tier lacks, at most maxTierReads), and says whether
   * any of those reads still runs: then the sequence waits, and the running ones go on,
   * instead of the whole step waiting for the disk.
   */
  prefetchPrefix(hashes: readonly string[]): boolean {
    const tier = this.tier;
    if (!tier?.prefetch || !tier.loading) return false;
    const want: string[] = [];
    for (const h of hashes) {
      if (this.#byHash.has(h)) continue;
      if (!tier.has(h) || want.length >= this.maxTierReads) break;
      want.push(h);
    }
    if (want.length === 0) return false;
    tier.prefetch(want);
    return want.some((h) => tier.loading!(h));
  }

  /**
   * The registered blocks and their hashes, least recently used first: the cached ones in
   * the order they were freed, then those sequences hold.
   */
  registered(): [block: number, hash: string][] {
    const held = [...this.#hashOf].filter(([b]) => !this.#cached.has(b));
    return [...[...this.#cached].map((b): [number, string] => [b, this.#hashOf.get(b)!]), ...held];
  }

  /** The block registered under `hash`, if any. */
  blockOf(hash: string): number | undefined {
    return this.#byHash.get(hash);
  }

  /**
   * Registers block `index` of `seq`'s table, whose rows are all computed, under `hash`
   * (kept when another block already has it).
   */
  register(seq: number, index: number, hash: string): void {
    const b = this.#tables.get(seq)?.[index];
    if (b === undefined || this.#hashOf.has(b) || this.#byHash.has(hash)) return;
    this.#byHash.set(hash, b);
    this.#hashOf.set(b, hash);
    this.tier?.computed?.(b, hash);
  }

  /** The blocks of `seq`, in position order (empty when it holds none). */
  table(seq: number): readonly number[] {
    return this.#tables.get(seq) ?? [];
  }

  /**
   * Lets go of all of `seq`'s blocks; resolves how many. A block no other sequence holds
   * goes back to the free list, or, registered, to the cached ones (its rows kept).
   */
  free(seq: number): number {
    const table = this.#tables.get(seq);
    if (!table) return 0;
    this.#tables.delete(seq);
    // Last block first: a prefix's later blocks are forgotten before its first ones.
    for (let i = table.length - 1; i >= 0; i--) {
      const b = table[i]!;
      if (--this.#refs[b]! > 0) continue;
      if (this.#hashOf.has(b)) this.#cached.add(b);
      else this.#free.push(b);
    }
    return table.length;
  }
}

export interface BlockKvOptions {
  /** Token positions per block (default 16). */
  blockSize?: number;
  /** Bytes the cache may use. */
  memoryBytes: number;
  /** How rows are stored (kv-format.ts; default f32). */
  dtype?: KvDtype;
  /**
   * Layers past the model's blocks that keep rows too: the MTP layer's (index
   * num_hidden_layers) with MTP speculative decoding. Default 0.
   */
  extraLayers?: number;
  /**
   * The prefix cache's tiers under the pool, nearest first, opened for this cache's
   * blockBytes: a disk (ADR 0019), a NATS bucket (ADR 0028), or both (at most one that
   * other gateways share).
   */
  stores?: readonly PrefixStore[];
}

/** Bytes one block takes: blockSize rows of `dtype` (default f32) in every layer. */
export function bytesPerBlock(
  config: ModelConfig,
  blockSize: number,
  dtype: KvDtype = "f32",
  extraLayers = 0,
): number {
  return (
    blockSize *
    kvRowBytes(dtype, config.kvLoraRank, config.qkRopeHeadDim) *
    (config.numHiddenLayers + extraLayers)
  );
}

/** The latent rows of all sequences, in blocks; storage [layer][block, blockSize, row bytes]. */
export class BlockKvCache {
  readonly allocator: BlockAllocator;
  readonly dtype: KvDtype;
  /** The prefix cache's tiers under the pool, nearest first (none: forgotten is gone). */
  readonly stores: readonly PrefixStore[];
  readonly #C: number;
  readonly #dr: number;
  readonly #rowBytes: number;
  readonly #pages: KvPages[];

  constructor(config: ModelConfig, o: BlockKvOptions) {
    const blockSize = o.blockSize ?? 16;
    this.dtype = o.dtype ?? "f32";
    const layers = config.numHiddenLayers + (o.extraLayers ?? 0);
    const numBlocks = Math.floor(
      o.memoryBytes / bytesPerBlock(config, blockSize, this.dtype, o.extraLayers ?? 0),
    );
    this.allocator = new BlockAllocator(numBlocks, blockSize);
    this.#C = config.kvLoraRank;
    this.#dr = config.qkRopeHeadDim;
    this.#rowBytes = kvRowBytes(this.dtype, this.#C, this.#dr);
    this.#pages = Array.from({ length: layers }, () => ({
      dtype: this.dtype,
      pool: new Uint8Array(numBlocks * blockSize * this.#rowBytes),
      blockSize,
    }));
    this.stores = o.stores ?? [];
    for (const store of this.stores)
      if (store.blockBytes !== this.blockBytes)
        throw new ExpertMeshError(
          "EM_GATEWAY_INTERNAL",
          `the ${store.kind} tier holds blocks of ${store.blockBytes} bytes, this cache's are ${this.blockBytes}`,
        );
    const shared = this.stores.filter((s) => s.shared);
    if (shared.length > 1)
      throw new ExpertMeshError(
        "EM_GATEWAY_INTERNAL",
        "the prefix cache takes one tier that other gateways share",
      );
    this.#shared = shared[0] ?? null;
    if (this.stores.length > 0) {
      const stores = this.stores;
      // A step reads at most 256 MiB of blocks (a prompt with more takes several steps), and
      // no more than a store holds read ahead (else it would drop the head's own reads).
      this.allocator.maxTierReads = Math.max(
        1,
        Math.min(Math.floor(2 ** 28 / this.blockBytes), ...stores.map((s) => s.maxStagedFiles)),
      );
      if (this.#shared) this.#shared.onWritten = () => this.#writeUnwritten();
      /** The nearest store that keeps `hash`'s rows. */
      const keeper = (hash: string) => stores.find((s) => s.has(hash));
      this.allocator.tier = {
        // Every store keeps it (one that has it already, or is written through, skips it).
        evicting: (b, hash) => {
          for (const s of stores) s.save(hash, this.#blockRows(b));
        },
        has: (hash) => keeper(hash) !== undefined,
        readsInStep: stores.every((s) => s.readsInStep),
        // Each store reads ahead the blocks it is the nearest keeper of.
        prefetch: (hashes) => {
          for (const s of stores) s.prefetch(hashes.filter((h) => keeper(h) === s));
        },
        loading: (hash) => keeper(hash)?.loading(hash) ?? false,
        // A store other gateways read too gets each block as it is computed (write-through;
        // save() skips those its index knows: no look on a network disk per block). A long
        // prefill computes blocks faster than the store takes them: those past the pending
        // limit are written as earlier writes end, while the pool still holds them.
        ...(this.#shared
          ? { computed: (b: number, hash: string) => this.#writeThrough(b, hash) }
          : {}),
        fetch: (hash) => {
          for (const store of stores) {
            if (!store.has(hash)) continue;
            const payload = store.read(hash);
            if (!payload) continue;
            return (b) => this.#writeBlock(store, payload, b);
          }
          return null;
        },
      };
    }
  }

  /** Writes `payload` (a block's rows, layer after layer, read from `store`) into block `b`. */
  #writeBlock(store: PrefixStore, payload: Uint8Array, b: number): boolean {
    const per = this.allocator.blockSize * this.#rowBytes;
    try {
      this.#pages.forEach((p, l) => {
        writeKvBytes(payload.subarray(l * per, (l + 1) * per), p.pool, b * per);
      });
      return true;
    } catch (e) {
      store.noteError("writing a block read back into the KV cache", e);
      return false;
    }
  }

  /** The store other gateways read too, if any: it gets blocks as they are computed. */
  readonly #shared: PrefixStore | null;

  /** Shared tier: computed blocks not yet written (no room then), oldest first. */
  readonly #unwritten = new Set<string>();

  #writeThrough(b: number, hash: string): void {
    const store = this.#shared!;
    if (this.#unwritten.size === 0 && store.hasRoom) {
      store.save(hash, this.#blockRows(b));
      return;
    }
    this.#unwritten.add(hash);
    // Registered blocks bound it; those evicted meanwhile went to the tier with their rows.
    if (this.#unwritten.size > this.allocator.numBlocks) {
      for (const h of this.#unwritten)
        if (this.allocator.blockOf(h) === undefined) this.#unwritten.delete(h);
    }
  }

  /** A write ended: the computed blocks still waiting, while there is room. */
  #writeUnwritten(): void {
    const store = this.#shared!;
    for (const hash of this.#unwritten) {
      if (!store.hasRoom) return;
      this.#unwritten.delete(hash);
      const b = this.allocator.blockOf(hash);
      if (b !== undefined) store.save(hash, this.#blockRows(b));
    }
  }

  /** Bytes of one block's rows over all layers (what the second tier keeps per block). */
  get blockBytes(): number {
    return this.allocator.blockSize * this.bytesPerToken;
  }

  /** Block `b`'s rows in each layer (views of the pool). */
  #blockRows(b: number): Uint8Array[] {
    const per = this.allocator.blockSize * this.#rowBytes;
    return this.#pages.map((p) => p.pool.subarray(b * per, (b + 1) * per));
  }

  /**
   * Writes every registered block each tier lacks to it, and waits for the writes: at
   * a graceful stop, so that the next start finds them. Resolves how many were written.
   */
  async persist(): Promise<number> {
    let n = 0;
    for (const store of this.stores) {
      const written = store.stats.written;
      // The most recently used that fit in the budget, oldest first: the disk's least
      // recently used order (file times, after a restart) keeps the pool's.
      const fit = Math.floor(store.maxBytes / store.fileBytes);
      for (const [b, hash] of this.allocator.registered().slice(-fit))
        if (!store.has(hash)) await this.#saveWhenRoom(store, b, hash);
      await store.flush();
      n += store.stats.written - written;
    }
    return n;
  }

  /**
   * Writes the blocks of `hashes` the pool holds and the shared tier lacks to it, and waits
   * for their writes (a prefill gateway's job, ADR 0029: most were written through as they
   * were computed). Resolves how many of `hashes`, from the first, the shared tier then keeps.
   */
  async share(hashes: readonly string[]): Promise<number> {
    const store = this.#shared;
    if (!store) return 0;
    for (const hash of hashes) {
      const b = this.allocator.blockOf(hash);
      if (b !== undefined && !store.has(hash)) await this.#saveWhenRoom(store, b, hash);
    }
    // Only these: the blocks of the prompts computed meanwhile keep being written.
    await store.flushed(hashes);
    // A prefix is read up to its first block missing: those after it are of no use.
    const missing = hashes.findIndex((h) => !store.has(h));
    return missing === -1 ? hashes.length : missing;
  }

  /** Writes block `b` to `store` under `hash` once it has room, if `b` still holds those rows. */
  async #saveWhenRoom(store: PrefixStore, b: number, hash: string): Promise<void> {
    await store.room();
    // The engine may have run meanwhile: only a block that still holds these rows.
    if (this.allocator.blockOf(hash) === b) store.save(hash, this.#blockRows(b));
  }

  /** Positions the whole cache holds (all blocks). */
  get capacityTokens(): number {
    return this.allocator.numBlocks * this.allocator.blockSize;
  }

  /** Bytes of one token's rows over all layers. */
  get bytesPerToken(): number {
    return this.#rowBytes * this.#pages.length;
  }

  /**
   * A view of `seq`'s rows through its block table, holding `length` positions (a prefix
   * found in the cache: attachPrefix), else empty. The caller reserves blocks
   * (allocator.reserve) before the forward pass writes positions.
   */
  view(seq: number, length = 0): LatentCache {
    const alloc = this.allocator;
    const B = alloc.blockSize;
    const C = this.#C;
    const dr = this.#dr;
    const W = C + dr;
    const rowBytes = this.#rowBytes;
    const all = this.#pages;
    const dtype = this.dtype;
    return {
      get length() {
        return length;
      },
      write(layer, start, rows) {
        const table = alloc.table(seq);
        const n = rows.length / W;
        if (alloc.blocksFor(start + n) > table.length)
          throw new ExpertMeshError(
            "EM_KV_BUDGET",
            `sequence ${seq} writes position ${start + n - 1} beyond its ${table.length} reserved blocks`,
          );
        const pool = all[layer]!.pool;
        for (let p = start; p < start + n; ) {
          // Encode the run of positions that stays within one block.
          const inBlock = Math.min(B - (p % B), start + n - p);
          const at = (table[Math.floor(p / B)]! * B + (p % B)) * rowBytes;
          encodeKvRows(
            dtype,
            C,
            dr,
            rows.subarray((p - start) * W, (p - start + inBlock) * W),
            pool,
            at,
          );
          p += inBlock;
        }
      },
      pages(layer) {
        return all[layer]!;
      },
      table() {
        return alloc.table(seq);
      },
      setLength(n) {
        length = n;
      },
    };
  }
}
