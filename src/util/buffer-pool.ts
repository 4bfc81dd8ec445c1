// Reusable buffers for the data plane's largest allocations (dispatch frames on the
// gateway, decoded activations on a shard, expert sums in one process). A fresh multi-MiB
// ArrayBuffer per frame costs page faults on first touch and collector pressure (external
// memory), each of them more than the codec pass that fills it; a pool of a few buffers per
// process takes both off every layer of every step. The owner decides when a buffer is free
// again: give() must only see a buffer that nothing (NATS client, backend, caller) still
// reads or writes.

/** Best fit among at most `maxFree` free buffers; new ones get 1/8 of headroom. */
export class BufferPool {
  readonly #free: ArrayBuffer[] = [];
  readonly #maxFree: number;

  constructor(maxFree = 16) {
    this.#maxFree = maxFree;
  }

  /**
   * n bytes at offset 0 of their own ArrayBuffer (so typed views of any part align), not
   * zero-filled: the caller writes every byte it reads.
   */
  bytes = (n: number): Uint8Array => {
    let best = -1;
    for (let i = 0; i < this.#free.length; i++) {
      const len = this.#free[i]!.byteLength;
      // Not a much larger buffer for a small request: it would be held for nothing.
      if (len >= n && len <= 2 * n + 65536 && (best < 0 || len < this.#free[best]!.byteLength))
        best = i;
    }
    if (best >= 0) {
      const buf = this.#free[best]!;
      this.#free[best] = this.#free[this.#free.length - 1]!;
      this.#free.pop();
      return new Uint8Array(buf, 0, n);
    }
    // The next step's slightly larger frame for the same shard should fit too.
    return new Uint8Array(Buffer.allocUnsafeSlow(n + (n >> 3)).buffer, 0, n);
  };

  /** n float32 values, as bytes() (not zero-filled). */
  f32 = (n: number): Float32Array => new Float32Array(this.bytes(4 * n).buffer, 0, n);

  /** Hands back the buffer under `view` (a view that bytes() or f32() gave). */
  give(view: ArrayBufferView): void {
    const buf = view.buffer as ArrayBuffer;
    if (this.#free.includes(buf)) return;
    if (this.#free.length >= this.#maxFree) this.#free.shift();
    this.#free.push(buf);
  }

  /** Free buffers held now (for tests). */
  get free(): number {
    return this.#free.length;
  }
}
