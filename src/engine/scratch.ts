// Scratch float32 arrays for a forward step, reused from one layer and step to the next
// (ADR 0022).
//
// A forward step makes a dozen arrays per layer (norms, projections, attention's rows,
// the MLP's activations), each dead by the end of the layer. Made fresh, every one over
// 64 bytes is an off-heap allocation that V8 counts as external memory, and each 64 MiB of
// it (about a third of a second of decoding 32 sequences on mini-v3) forces a full
// mark-compact: at concurrency 32 the collector took a tenth of the gateway's CPU. Taken
// from here they are allocated once.
//
// Discipline: take() hands out arrays until release(mark) gives back every array taken
// since mark() (a stack, so a step's arrays outlive its layers' arrays). An array handed
// out is NOT zeroed: whoever takes it writes every element before reading it.

/**
 * EM_SCRATCH_POISON=1 (the test suite sets it, vitest.config.ts): every array handed out is
 * filled with NaN first, so an element nobody writes shows in the results on the first step,
 * not only when a reused array happens to hold something else.
 */
const POISON = process.env["EM_SCRATCH_POISON"] === "1";

/** Arrays of more than this many floats are allocated fresh, not kept (16 MiB). */
const MAX_POOLED = 1 << 22;
/** What one Scratch keeps at most, in floats (256 MiB); past it take() allocates fresh. */
const MAX_KEPT = 1 << 26;
/** Every this many releases, buckets not taken from since the last sweep are dropped. */
const SWEEP_EVERY = 512;

/** The capacity bucket of n floats: the next power of two, at least 16. */
export function bucketOf(n: number): number {
  return n <= 16 ? 16 : 2 ** Math.ceil(Math.log2(n));
}

export class Scratch {
  /** Free buffers by capacity. */
  readonly #free = new Map<number, Float32Array[]>();
  /** Buffers handed out, in order (their views were returned by take()). */
  readonly #taken: Float32Array[] = [];
  /** Buckets taken from since the last sweep. */
  readonly #used = new Set<number>();
  #kept = 0;
  #releases = 0;

  /** Floats this scratch holds (free or handed out). */
  get keptFloats(): number {
    return this.#kept;
  }

  /** An array of n floats, valid until the release() of a mark taken before it; NOT zeroed. */
  take(n: number): Float32Array {
    const a = this.#take(n);
    if (POISON) a.fill(Number.NaN);
    return a;
  }

  #take(n: number): Float32Array {
    if (n > MAX_POOLED) return new Float32Array(n);
    const cap = bucketOf(n);
    this.#used.add(cap);
    let buf = this.#free.get(cap)?.pop();
    if (buf === undefined) {
      if (this.#kept + cap > MAX_KEPT) return new Float32Array(n);
      buf = new Float32Array(cap);
      this.#kept += cap;
    }
    this.#taken.push(buf);
    return n === cap ? buf : buf.subarray(0, n);
  }

  /** A mark for release(). */
  mark(): number {
    return this.#taken.length;
  }

  /** Takes back every array handed out since `mark`; their contents are garbage from now on. */
  release(mark: number): void {
    while (this.#taken.length > mark) {
      const buf = this.#taken.pop()!;
      const list = this.#free.get(buf.length);
      if (list) list.push(buf);
      else this.#free.set(buf.length, [buf]);
    }
    if (++this.#releases % SWEEP_EVERY === 0) this.#sweep();
  }

  /** Drops the free buffers of buckets nobody took from since the last sweep. */
  #sweep(): void {
    for (const [cap, list] of this.#free) {
      if (this.#used.has(cap)) continue;
      this.#kept -= cap * list.length;
      this.#free.delete(cap);
    }
    this.#used.clear();
  }
}
