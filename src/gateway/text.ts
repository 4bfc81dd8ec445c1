// Incremental detokenization with stop strings: text is released as tokens arrive, except
// a tail that could still become a stop string (or an unfinished UTF-8 character), so a
// stream never shows text that the stop string later cuts off.
//
// Each token decodes a small window of the last tokens, not the whole output (which made a
// choice's text cost grow with the square of its length: 0.7 ms a token at 4,000 tokens, on
// the event loop every stream shares): as vLLM's detokenizer, the window starts where the
// text last ended cleanly (`#prefix`), and what the new tokens add is the window's text
// past that of its tokens already read (`#read`). Decoders that strip or change a window's
// first token (SentencePiece's leading space) do it to both, so the difference is exact.
import type { Tokenizer } from "../model/tokenizer.ts";

export class OutputText {
  readonly #tok: Tokenizer;
  readonly #stops: readonly string[];
  readonly #holdBack: number;
  readonly ids: number[] = [];
  #text = "";
  /** Characters of #text released so far. */
  #released = 0;
  /** ids[#prefix..#read) were decoded into #text; ids from #read are not yet. */
  #prefix = 0;
  #read = 0;
  /** Set when a stop string was found: the final text ends before it. */
  stopped = false;
  /** The stop string found (the first in the text), when stopped. */
  stoppedBy: string | null = null;

  readonly #includeStop: boolean;
  readonly #skipSpecial: boolean;

  /**
   * `includeStop` (vLLM's include_stop_str_in_output): the text ends after the stop string
   * found, not before; `skipSpecialTokens` (default true, vLLM's): special tokens other than
   * tool-call tokens are left out of the text.
   */
  constructor(
    tokenizer: Tokenizer,
    stops: readonly string[],
    o: { includeStop?: boolean; skipSpecialTokens?: boolean } = {},
  ) {
    this.#tok = tokenizer;
    this.#stops = stops.filter((s) => s.length > 0);
    this.#holdBack = Math.max(0, ...this.#stops.map((s) => s.length - 1));
    this.#includeStop = o.includeStop ?? false;
    this.#skipSpecial = o.skipSpecialTokens ?? true;
  }

  /** The final (or, while generating, current) text. */
  get text(): string {
    return this.#text;
  }

  /** Adds a token; resolves the text now safe to release (maybe ""). */
  push(id: number): string {
    this.ids.push(id);
    const added = this.#decodeNew(false);
    // An unfinished UTF-8 character: wait for the token that completes it.
    if (added === null) return "";
    this.#text += added;
    let cut = -1;
    let by: string | null = null;
    for (const s of this.#stops) {
      // Released text held no stop string: a new one ends in the text after it.
      const at = this.#text.indexOf(s, Math.max(0, this.#released - s.length + 1));
      if (at >= 0 && (cut < 0 || at < cut)) {
        cut = at;
        by = s;
      }
    }
    if (cut >= 0) {
      this.stopped = true;
      this.stoppedBy = by;
      this.#text = this.#text.slice(0, cut + (this.#includeStop ? by!.length : 0));
      return this.#release(this.#text.length);
    }
    return this.#release(this.#text.length - this.#holdBack);
  }

  /** At the end: whatever was held back (an unfinished character as U+FFFD). */
  flush(): string {
    if (!this.stopped) this.#text += this.#decodeNew(true) ?? "";
    return this.#release(this.#text.length);
  }

  /**
   * The text the tokens from #read add, the window moved past them; null (window kept)
   * while it ends in an unfinished character, unless `final`.
   */
  #decodeNew(final: boolean): string | null {
    if (this.#read === this.ids.length) return "";
    const window = this.ids.slice(this.#prefix);
    const head = window.slice(0, this.#read - this.#prefix);
    const known = head.length > 0 ? this.#tok.decode(head, this.#skipSpecial) : "";
    const all = this.#tok.decode(window, this.#skipSpecial);
    if (!final && (all.length <= known.length || all.endsWith("\uFFFD"))) return null;
    this.#prefix = this.#read;
    this.#read = this.ids.length;
    return all.slice(known.length);
  }

  #release(upTo: number): string {
    if (upTo <= this.#released) return "";
    const out = this.#text.slice(this.#released, upTo);
    this.#released = upTo;
    return out;
  }
}
