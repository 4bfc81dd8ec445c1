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
import type { ModelConfig } from "../model/config.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { KvPages } from "./backend.ts";
import type { LatentCache } from "./batch.ts";
import { encodeKvRows, type KvDtype, kvRowBytes } from "./kv-format.ts";

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
      let b = this.#free.pop();
      if (b === undefined) {
        // The least recently freed cached block: its prefix is forgotten.
        b = this.#cached.values().next().value!;
        this.#cached.delete(b);
        this.#byHash.delete(this.#hashOf.get(b)!);
        this.#hashOf.delete(b);
      }
      this.#refs[b] = 1;
      table.push(b);
    }
    this.#tables.set(seq, table);
    return true;
  }

  /**
   * Gives `seq` (holding no blocks yet) the registered blocks of the longest run of
   * `hashes` (its blocks' prefix hashes, in order); resolves how many it got.
   */
  attachPrefix(seq: number, hashes: readonly string[]): number {
    if (this.#tables.has(seq)) return 0;
    const table: number[] = [];
    for (const h of hashes) {
      const b = this.#byHash.get(h);
      if (b === undefined) break;
      this.#cached.delete(b);
      this.#refs[b]!++;
      table.push(b);
    }
    if (table.length > 0) this.#tables.set(seq, table);
    return table.length;
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
