// Prompt encoding for the routes, off the event loop when it is long. Encoding runs at
// ~1.5 s per MiB of text, and every stream's tokens go out on the gateway's one event loop:
// a long prompt encoded in place stalls them all. Texts over `inlineBytes` go to worker
// threads that hold their own copy of the tokenizer (loaded from the same directory);
// short ones (a few ms) are encoded in place, where a message round trip would cost more.
// A worker that fails (its tokenizer did not load, it crashed) is dropped and its prompts
// are encoded in place: accepted work is never lost, only the event loop pays again.
import { extname } from "node:path";
import { Worker } from "node:worker_threads";
import { splitPieces } from "../model/pieces.ts";
import type { ChatMessage, ChatTemplateExtra, Tokenizer } from "../model/tokenizer.ts";
import { type ErrorCode, ExpertMeshError } from "../util/errors.ts";

/** To a worker: encode each of `texts`. */
export interface EncodeRequest {
  readonly id: number;
  readonly texts: readonly string[];
  readonly addSpecialTokens: boolean;
}

/** From a worker: its tokenizer loaded (or not), or one request's ids (or error). */
export type WorkerMessage =
  | { readonly kind: "ready"; readonly size: number; readonly maxTokenBytes: number }
  | { readonly kind: "failed"; readonly message: string }
  | {
      readonly kind: "encoded";
      readonly id: number;
      /** The texts' ids one after the other, `lengths[i]` of them text i's. */
      readonly ids: Uint32Array;
      readonly lengths: readonly number[];
    }
  | {
      readonly kind: "error";
      readonly id: number;
      readonly code: ErrorCode | null;
      readonly message: string;
    };

export interface PromptEncoderOptions {
  /** Worker threads; 0 encodes every prompt in place. Default 1. */
  readonly workers?: number;
  /** Texts of at most this many UTF-8 bytes are encoded in place. Default 4096. */
  readonly inlineBytes?: number;
  /** Where a failed worker is reported. */
  readonly log?: (message: string) => void;
  /**
   * Chat prompts' pieces kept encoded (pieces.ts), this many bytes of them at most (their
   * text and ids; least recently used first out). Default PIECE_CACHE_BYTES; 0: none.
   */
  readonly pieceCacheBytes?: number;
}

/** The pieces kept encoded when PromptEncoderOptions.pieceCacheBytes is not given: 64 MiB. */
export const PIECE_CACHE_BYTES = 64 * 2 ** 20;

/**
 * A chat prompt is cut into pieces of at least this many characters (about 500 tokens of
 * English), each kept encoded: fewer, longer pieces cost less to look up, and a turn added
 * re-encodes at most one piece of what came before it.
 */
export const PIECE_CHARS = 2048;

/**
 * Encodes prompts with the model's tokenizer, long ones on worker threads. A chat prompt is
 * encoded by pieces (pieces.ts), those seen before taken from a cache: a conversation sent
 * again with a turn more (an agent's loop) encodes only its new turn, not its whole history.
 */
export class PromptEncoder {
  readonly tokenizer: Tokenizer;
  /**
   * Prompts encoded on a worker thread, and in place; of chat prompts' tokens, those from
   * pieces kept encoded, and those encoded.
   */
  readonly stats = { offloaded: 0, inline: 0, pieceTokensCached: 0, pieceTokensEncoded: 0 };
  readonly #inlineBytes: number;
  readonly #threads: EncoderThread[];
  readonly #pieces: PieceCache | null;

  /** Workers need `tokenizer.dir` (they load the files again); without it all is in place. */
  constructor(tokenizer: Tokenizer, o: PromptEncoderOptions = {}) {
    this.tokenizer = tokenizer;
    this.#inlineBytes = o.inlineBytes ?? 4096;
    const cacheBytes = o.pieceCacheBytes ?? PIECE_CACHE_BYTES;
    this.#pieces = tokenizer.pieceSplitter && cacheBytes > 0 ? new PieceCache(cacheBytes) : null;
    const dir = tokenizer.dir;
    const n = dir === null ? 0 : (o.workers ?? 1);
    this.#threads = Array.from(
      { length: n },
      (_, i) =>
        new EncoderThread(tokenizer, dir!, (reason) =>
          o.log?.(`tokenizer worker ${i} ${reason}: its prompts are encoded on the event loop`),
        ),
    );
  }

  /** Worker threads still serving. */
  get liveWorkers(): number {
    return this.#threads.filter((t) => t.alive).length;
  }

  /** Token ids of `text`, as Tokenizer.encode. */
  async encode(text: string, addSpecialTokens = true): Promise<number[]> {
    return (await this.#encodeEach([text], addSpecialTokens))[0]!;
  }

  /** Token ids of each of `texts`: on a worker when they are long together. */
  #encodeEach(texts: readonly string[], addSpecialTokens: boolean): Promise<number[][]> {
    let thread: EncoderThread | undefined;
    let bytes = 0;
    for (const t of texts) bytes += Buffer.byteLength(t);
    if (bytes > this.#inlineBytes)
      for (const t of this.#threads)
        if (t.alive && (thread === undefined || t.pending < thread.pending)) thread = t;
    if (thread === undefined) {
      this.stats.inline++;
      try {
        return Promise.resolve(texts.map((t) => this.tokenizer.encode(t, addSpecialTokens)));
      } catch (err) {
        return Promise.reject(err);
      }
    }
    this.stats.offloaded++;
    return thread.encode(texts, addSpecialTokens);
  }

  /** Token ids of a chat, as Tokenizer.encodeChat (the template renders in place). */
  encodeChat(
    messages: readonly ChatMessage[],
    addGenerationPrompt = false,
    extra: ChatTemplateExtra = {},
  ): Promise<number[]> {
    return this.encodePieces(
      this.tokenizer.applyChatTemplate(messages, addGenerationPrompt, extra),
    );
  }

  /**
   * Token ids of `text` (no special tokens added), as encode: its pieces (pieces.ts) kept
   * encoded taken from the cache, the others encoded together and kept.
   */
  async encodePieces(text: string): Promise<number[]> {
    const cache = this.#pieces;
    const splitter = this.tokenizer.pieceSplitter;
    if (cache === null || splitter === null || text.length < 2 * PIECE_CHARS)
      return this.encode(text, false);
    const parts = splitPieces(splitter, text, PIECE_CHARS);
    const got = parts.map((p) => cache.get(p));
    const missing = parts.filter((_, i) => got[i] === undefined);
    const encoded = missing.length ? await this.#encodeEach(missing, false) : [];
    let k = 0;
    let total = 0;
    for (const [i, part] of parts.entries()) {
      let ids = got[i];
      if (ids === undefined) {
        ids = encoded[k++]!;
        cache.set(part, ids);
        got[i] = ids;
        this.stats.pieceTokensEncoded += ids.length;
      } else this.stats.pieceTokensCached += ids.length;
      total += ids.length;
    }
    // (joined into an array of its final length: pushing grows and copies it again and again)
    const out = new Array<number>(total);
    let at = 0;
    for (const ids of got) for (let j = 0; j < ids!.length; j++) out[at++] = ids![j]!;
    return out;
  }

  /** Stops the workers; prompts they still held are encoded in place. */
  async close(): Promise<void> {
    await Promise.all(this.#threads.map((t) => t.close()));
  }
}

/** The ids as numbers: a plain loop, ~8x faster than Array.from (which stalls the loop). */
function toArray(ids: Uint32Array): number[] {
  const out = new Array<number>(ids.length);
  for (let i = 0; i < ids.length; i++) out[i] = ids[i]!;
  return out;
}

/**
 * Pieces' ids by their text, at most `bytes` of both (UTF-16 text, 8 bytes an id as a
 * number array holds them), the least recently used dropped first.
 */
export class PieceCache {
  readonly #map = new Map<string, readonly number[]>();
  readonly #budget: number;
  #bytes = 0;

  constructor(bytes: number) {
    this.#budget = bytes;
  }

  get size(): number {
    return this.#map.size;
  }

  get bytes(): number {
    return this.#bytes;
  }

  get(text: string): readonly number[] | undefined {
    const ids = this.#map.get(text);
    if (ids !== undefined) {
      // (most recently used: last in the map's order)
      this.#map.delete(text);
      this.#map.set(text, ids);
    }
    return ids;
  }

  set(text: string, ids: readonly number[]): void {
    const cost = PieceCache.cost(text, ids);
    if (cost > this.#budget || this.#map.has(text)) return;
    this.#map.set(text, ids);
    this.#bytes += cost;
    for (const [t, v] of this.#map) {
      if (this.#bytes <= this.#budget) break;
      this.#map.delete(t);
      this.#bytes -= PieceCache.cost(t, v);
    }
  }

  static cost(text: string, ids: readonly number[]): number {
    return 2 * text.length + 8 * ids.length;
  }
}

interface Pending {
  readonly texts: readonly string[];
  readonly addSpecialTokens: boolean;
  readonly resolve: (ids: number[][]) => void;
  readonly reject: (err: unknown) => void;
}

// The worker's file next to this one: .ts when run from source, .js when compiled.
const workerUrl = new URL(`./tokenizer-worker${extname(import.meta.url)}`, import.meta.url);

/** One worker thread and the requests it holds. */
class EncoderThread {
  readonly #tokenizer: Tokenizer;
  readonly #worker: Worker;
  readonly #pending = new Map<number, Pending>();
  readonly #onLost: (reason: string) => void;
  #nextId = 0;
  #alive = true;

  constructor(tokenizer: Tokenizer, dir: string, onLost: (reason: string) => void) {
    this.#tokenizer = tokenizer;
    this.#onLost = onLost;
    this.#worker = new Worker(workerUrl, { workerData: { dir }, name: "expertmesh-tokenizer" });
    // It never keeps the process alive: the servers do while there is work.
    this.#worker.unref();
    this.#worker.on("message", (m: WorkerMessage) => this.#message(m));
    this.#worker.on("error", (err) => this.#fail(`failed: ${err.message}`));
    this.#worker.on("exit", (code) => this.#fail(`exited (code ${code})`));
  }

  get alive(): boolean {
    return this.#alive;
  }

  get pending(): number {
    return this.#pending.size;
  }

  encode(texts: readonly string[], addSpecialTokens: boolean): Promise<number[][]> {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { texts, addSpecialTokens, resolve, reject });
      // Queued by the worker until its tokenizer has loaded.
      this.#worker.postMessage({ id, texts, addSpecialTokens } satisfies EncodeRequest);
    });
  }

  async close(): Promise<void> {
    if (!this.#alive) return;
    this.#drop(null);
    await this.#worker.terminate();
  }

  #message(m: WorkerMessage): void {
    switch (m.kind) {
      case "ready": {
        const t = this.#tokenizer;
        if (m.size !== t.size || m.maxTokenBytes !== t.maxTokenBytes)
          this.#fail("loaded other tokenizer files than the gateway's (changed on disk?)");
        return;
      }
      case "failed":
        this.#fail(`could not load the tokenizer: ${m.message}`);
        return;
      case "encoded": {
        const p = this.#pending.get(m.id);
        this.#pending.delete(m.id);
        const each: number[][] = [];
        let at = 0;
        for (const n of m.lengths) {
          each.push(toArray(m.ids.subarray(at, at + n)));
          at += n;
        }
        p?.resolve(each);
        return;
      }
      case "error": {
        const p = this.#pending.get(m.id);
        this.#pending.delete(m.id);
        p?.reject(m.code ? new ExpertMeshError(m.code, m.message) : new Error(m.message));
        return;
      }
    }
  }

  #fail(reason: string): void {
    if (!this.#alive) return;
    this.#drop(reason);
    void this.#worker.terminate();
  }

  /** No more requests; the ones held are encoded in place. `reason` null: a normal close. */
  #drop(reason: string | null): void {
    this.#alive = false;
    const held = [...this.#pending.values()];
    this.#pending.clear();
    if (reason !== null) this.#onLost(reason);
    for (const p of held) {
      try {
        p.resolve(p.texts.map((t) => this.#tokenizer.encode(t, p.addSpecialTokens)));
      } catch (err) {
        p.reject(err);
      }
    }
  }
}
