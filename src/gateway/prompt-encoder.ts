// Prompt encoding for the routes, off the event loop when it is long. Encoding runs at
// ~1.5 s per MiB of text, and every stream's tokens go out on the gateway's one event loop:
// a long prompt encoded in place stalls them all. Texts over `inlineBytes` go to worker
// threads that hold their own copy of the tokenizer (loaded from the same directory);
// short ones (a few ms) are encoded in place, where a message round trip would cost more.
// A worker that fails (its tokenizer did not load, it crashed) is dropped and its prompts
// are encoded in place: accepted work is never lost, only the event loop pays again.
import { extname } from "node:path";
import { Worker } from "node:worker_threads";
import type { ChatMessage, ChatTemplateExtra, Tokenizer } from "../model/tokenizer.ts";
import { type ErrorCode, ExpertMeshError } from "../util/errors.ts";

/** To a worker: encode `text`. */
export interface EncodeRequest {
  readonly id: number;
  readonly text: string;
  readonly addSpecialTokens: boolean;
}

/** From a worker: its tokenizer loaded (or not), or one request's ids (or error). */
export type WorkerMessage =
  | { readonly kind: "ready"; readonly size: number; readonly maxTokenBytes: number }
  | { readonly kind: "failed"; readonly message: string }
  | { readonly kind: "encoded"; readonly id: number; readonly ids: Uint32Array }
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
}

/** Encodes prompts with the model's tokenizer, long ones on worker threads. */
export class PromptEncoder {
  readonly tokenizer: Tokenizer;
  /** Prompts encoded on a worker thread, and in place. */
  readonly stats = { offloaded: 0, inline: 0 };
  readonly #inlineBytes: number;
  readonly #threads: EncoderThread[];

  /** Workers need `tokenizer.dir` (they load the files again); without it all is in place. */
  constructor(tokenizer: Tokenizer, o: PromptEncoderOptions = {}) {
    this.tokenizer = tokenizer;
    this.#inlineBytes = o.inlineBytes ?? 4096;
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
    let thread: EncoderThread | undefined;
    if (Buffer.byteLength(text) > this.#inlineBytes)
      for (const t of this.#threads)
        if (t.alive && (thread === undefined || t.pending < thread.pending)) thread = t;
    if (thread === undefined) {
      this.stats.inline++;
      return this.tokenizer.encode(text, addSpecialTokens);
    }
    this.stats.offloaded++;
    return thread.encode(text, addSpecialTokens);
  }

  /** Token ids of a chat, as Tokenizer.encodeChat (the template renders in place). */
  encodeChat(
    messages: readonly ChatMessage[],
    addGenerationPrompt = false,
    extra: ChatTemplateExtra = {},
  ): Promise<number[]> {
    return this.encode(
      this.tokenizer.applyChatTemplate(messages, addGenerationPrompt, extra),
      false,
    );
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

interface Pending {
  readonly text: string;
  readonly addSpecialTokens: boolean;
  readonly resolve: (ids: number[]) => void;
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

  encode(text: string, addSpecialTokens: boolean): Promise<number[]> {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { text, addSpecialTokens, resolve, reject });
      // Queued by the worker until its tokenizer has loaded.
      this.#worker.postMessage({ id, text, addSpecialTokens } satisfies EncodeRequest);
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
        p?.resolve(toArray(m.ids));
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
        p.resolve(this.#tokenizer.encode(p.text, p.addSpecialTokens));
      } catch (err) {
        p.reject(err);
      }
    }
  }
}
