// A second tier under the prefix cache (kv-blocks.ts): the blocks the KV pool forgets are
// kept there, and read back ahead of their use. Two stores keep them: files on a disk
// (kv-disk.ts, ADR 0019) and values in a NATS JetStream key-value bucket (kv-remote.ts,
// ADR 0028). The KV cache talks to either through this interface.

/** Counts since start. Blocks unless named bytes. */
export interface PrefixStoreStats {
  /** Blocks the store knows it keeps (files, or keys in the bucket). */
  files: number;
  /** Bytes of those (headers included). */
  bytes: number;
  /** Blocks read back (from the store or a pending write's copy). */
  hits: number;
  /** Of hits, blocks read ahead of their use (prefetch). */
  readAhead: number;
  /**
   * Of hits, in a shared store: blocks this store found there rather than wrote (another
   * gateway's, or an earlier run's).
   */
  sharedHits: number;
  /** Blocks written. */
  written: number;
  /** Writes dropped: too many bytes pending, or a write of the same block still running. */
  dropped: number;
  /** Blocks that failed their checks (removed), and reads or writes that failed. */
  errors: number;
}

export interface PrefixStore {
  /** Which store: a folder on a disk, or a NATS bucket. */
  readonly kind: "disk" | "remote";
  /** Payload bytes of one block: its rows in every layer. */
  readonly blockBytes: number;
  /** Bytes one block takes in the store (its header and payload). */
  readonly fileBytes: number;
  /** Bytes the store may take. */
  readonly maxBytes: number;
  /**
   * Other gateways read it too: the KV cache writes each block as it is computed
   * (write-through), not only when the pool forgets it.
   */
  readonly shared: boolean;
  /** read() reads a block not read ahead itself (a local disk), in its caller's step. */
  readonly readsInStep: boolean;
  /** Blocks held read ahead at most (a bound on one step's reads). */
  readonly maxStagedFiles: number;
  /** Called as each read ahead ends (a waiting prompt may go on). */
  onStaged: (() => void) | null;
  /** Called as each write ends (room for the next). */
  onWritten: (() => void) | null;
  readonly stats: PrefixStoreStats;
  /** Whether rows are kept under `hash`. */
  has(hash: string): boolean;
  /** Keeps `parts` (the block's rows, layer after layer) under `hash`; false when dropped. */
  save(hash: string, parts: readonly Uint8Array[]): boolean;
  /** The rows kept under `hash` (valid until the next read), or null. */
  read(hash: string): Uint8Array | null;
  /** Starts reading the rows of `hashes` ahead of their read, in the background. */
  prefetch(hashes: readonly string[]): void;
  /** Whether a read ahead of `hash` still runs. */
  loading(hash: string): boolean;
  /** Counts (and logs, the first time) an error of the store's user. */
  noteError(what: string, e: unknown): void;
  /** Whether save() would take one more block now. */
  readonly hasRoom: boolean;
  /** Waits until one more block's write fits under the pending limit. */
  room(): Promise<void>;
  /** Resolves once every write started so far has ended. */
  flush(): Promise<void>;
  /**
   * Resolves once the writes of `hashes` started so far have ended (not those of other
   * blocks, which a busy gateway keeps starting).
   */
  flushed(hashes: readonly string[]): Promise<void>;
  /** Stops reading ahead and lets go of what the store holds open. */
  close(): Promise<void>;
}
