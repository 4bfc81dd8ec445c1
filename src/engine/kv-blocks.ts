// The MLA latent KV cache in fixed-size blocks under a memory budget (as vLLM's paged
// cache, with MLA's one latent row per token and layer instead of per-head K and V).
// BlockAllocator is the pure bookkeeping (free list, one block table per sequence);
// BlockKvCache holds the rows and gives each sequence a LatentCache view through its
// block table, so the scheduler can admit, grow, preempt and free sequences by blocks.
import type { ModelConfig } from "../model/config.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { LatentCache } from "./batch.ts";

/** Free list and block tables; knows nothing about the rows stored in the blocks. */
export class BlockAllocator {
  readonly numBlocks: number;
  /** Token positions per block. */
  readonly blockSize: number;
  #free: number[];
  readonly #tables = new Map<number, number[]>();

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
  }

  get numFreeBlocks(): number {
    return this.#free.length;
  }

  get numUsedBlocks(): number {
    return this.numBlocks - this.#free.length;
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
    if (more > this.#free.length) return false;
    for (let i = 0; i < more; i++) table.push(this.#free.pop()!);
    this.#tables.set(seq, table);
    return true;
  }

  /** The blocks of `seq`, in position order (empty when it holds none). */
  table(seq: number): readonly number[] {
    return this.#tables.get(seq) ?? [];
  }

  /** Returns all of `seq`'s blocks to the free list; resolves how many. */
  free(seq: number): number {
    const table = this.#tables.get(seq);
    if (!table) return 0;
    this.#tables.delete(seq);
    for (let i = table.length - 1; i >= 0; i--) this.#free.push(table[i]!);
    return table.length;
  }
}

export interface BlockKvOptions {
  /** Token positions per block (default 16). */
  blockSize?: number;
  /** Bytes the cache may use (rows are float32). */
  memoryBytes: number;
}

/** Bytes one block takes: blockSize rows of (kvLoraRank + ropeDim) float32 in every layer. */
export function bytesPerBlock(config: ModelConfig, blockSize: number): number {
  return blockSize * (config.kvLoraRank + config.qkRopeHeadDim) * config.numHiddenLayers * 4;
}

/** The latent rows of all sequences, in blocks; storage [layer][block, blockSize, rowWidth]. */
export class BlockKvCache {
  readonly allocator: BlockAllocator;
  readonly rowWidth: number;
  readonly #layers: Float32Array[];

  constructor(config: ModelConfig, o: BlockKvOptions) {
    const blockSize = o.blockSize ?? 16;
    const numBlocks = Math.floor(o.memoryBytes / bytesPerBlock(config, blockSize));
    this.allocator = new BlockAllocator(numBlocks, blockSize);
    this.rowWidth = config.kvLoraRank + config.qkRopeHeadDim;
    this.#layers = Array.from(
      { length: config.numHiddenLayers },
      () => new Float32Array(numBlocks * blockSize * this.rowWidth),
    );
  }

  /** Positions the whole cache holds (all blocks). */
  get capacityTokens(): number {
    return this.allocator.numBlocks * this.allocator.blockSize;
  }

  /**
   * A view of `seq`'s rows through its block table, starting empty. The caller reserves
   * blocks (allocator.reserve) before the forward pass writes positions.
   */
  view(seq: number): LatentCache {
    const alloc = this.allocator;
    const W = this.rowWidth;
    const B = alloc.blockSize;
    const layers = this.#layers;
    let length = 0;
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
        const buf = layers[layer]!;
        for (let p = start; p < start + n; ) {
          // Copy the run of positions that stays within one block.
          const inBlock = Math.min(B - (p % B), start + n - p);
          const at = (table[Math.floor(p / B)]! * B + (p % B)) * W;
          buf.set(rows.subarray((p - start) * W, (p - start + inBlock) * W), at);
          p += inBlock;
        }
      },
      rows(layer, upTo) {
        const table = alloc.table(seq);
        const buf = layers[layer]!;
        const out = new Float32Array(upTo * W);
        for (let p = 0; p < upTo; p += B) {
          const k = Math.min(B, upTo - p);
          const at = table[p / B]! * B * W;
          out.set(buf.subarray(at, at + k * W), p * W);
        }
        return out;
      },
      setLength(n) {
        length = n;
      },
    };
  }
}
