// A per-object work queue in the manner of client-go's: a key is processed by one worker
// at a time; adding a key that is being processed marks it dirty so it runs once more
// afterwards; failures are retried with per-key exponential backoff.

export interface WorkQueueOptions {
  /** First retry delay in ms (doubles per consecutive failure). */
  baseDelayMs?: number;
  /** Longest retry delay in ms. */
  maxDelayMs?: number;
}

/** What a worker returns: nothing, or a delay after which the key is processed again. */
export type WorkResult = { requeueAfterMs?: number } | undefined;

export class WorkQueue {
  readonly #queue: string[] = [];
  readonly #queued = new Set<string>();
  readonly #processing = new Set<string>();
  readonly #dirty = new Set<string>();
  readonly #failures = new Map<string, number>();
  readonly #timers = new Map<string, NodeJS.Timeout>();
  readonly #baseDelayMs: number;
  readonly #maxDelayMs: number;
  readonly #waiters: (() => void)[] = [];
  #shutdown = false;

  constructor(opts: WorkQueueOptions = {}) {
    this.#baseDelayMs = opts.baseDelayMs ?? 500;
    this.#maxDelayMs = opts.maxDelayMs ?? 60_000;
  }

  /** Keys being processed now, in no particular order. */
  get inFlight(): string[] {
    return [...this.#processing];
  }

  /** Keys waiting (not counting those being processed or waiting for a timer). */
  get depth(): number {
    return this.#queue.length;
  }

  add(key: string): void {
    if (this.#shutdown) return;
    if (this.#processing.has(key)) {
      this.#dirty.add(key);
      return;
    }
    if (this.#queued.has(key)) return;
    this.#queued.add(key);
    this.#queue.push(key);
    this.#waiters.shift()?.();
  }

  /** Adds `key` after `ms` (an earlier pending timer for the key wins if sooner). */
  addAfter(key: string, ms: number): void {
    if (this.#shutdown) return;
    if (this.#timers.has(key)) return;
    const t = setTimeout(() => {
      this.#timers.delete(key);
      this.add(key);
    }, ms);
    t.unref();
    this.#timers.set(key, t);
  }

  /** The backoff delay for the key's next retry; counts the failure. */
  nextBackoff(key: string): number {
    const n = this.#failures.get(key) ?? 0;
    this.#failures.set(key, n + 1);
    return Math.min(this.#baseDelayMs * 2 ** n, this.#maxDelayMs);
  }

  /** Forgets a key's failures (after a success). */
  forget(key: string): void {
    this.#failures.delete(key);
  }

  failures(key: string): number {
    return this.#failures.get(key) ?? 0;
  }

  /**
   * Runs `concurrency` workers until shutdown. A worker that throws gets the key retried
   * with backoff; one that returns requeueAfterMs gets it again after that delay.
   */
  async run(
    worker: (key: string) => Promise<WorkResult>,
    concurrency = 2,
    onError?: (key: string, err: unknown) => void,
  ): Promise<void> {
    const loop = async () => {
      while (!this.#shutdown) {
        const key = this.#queue.shift();
        if (key === undefined) {
          await new Promise<void>((resolve) => this.#waiters.push(resolve));
          continue;
        }
        this.#queued.delete(key);
        this.#processing.add(key);
        try {
          const result = await worker(key);
          this.forget(key);
          if (result?.requeueAfterMs !== undefined) this.addAfter(key, result.requeueAfterMs);
        } catch (err) {
          onError?.(key, err);
          this.addAfter(key, this.nextBackoff(key));
        } finally {
          this.#processing.delete(key);
          if (this.#dirty.delete(key)) this.add(key);
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, loop));
  }

  /** Stops the workers after their current item; pending timers are dropped. */
  shutdown(): void {
    this.#shutdown = true;
    for (const t of this.#timers.values()) clearTimeout(t);
    this.#timers.clear();
    for (const wake of this.#waiters.splice(0)) wake();
  }
}
