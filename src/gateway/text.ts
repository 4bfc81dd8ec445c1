// Incremental detokenization with stop strings: text is released as tokens arrive, except
// a tail that could still become a stop string (or an unfinished UTF-8 character), so a
// stream never shows text that the stop string later cuts off.
import type { Tokenizer } from "../model/tokenizer.ts";

export class OutputText {
  readonly #tok: Tokenizer;
  readonly #stops: readonly string[];
  readonly #holdBack: number;
  readonly ids: number[] = [];
  #text = "";
  /** Characters of #text released so far. */
  #released = 0;
  /** Set when a stop string was found: the final text ends before it. */
  stopped = false;

  constructor(tokenizer: Tokenizer, stops: readonly string[]) {
    this.#tok = tokenizer;
    this.#stops = stops.filter((s) => s.length > 0);
    this.#holdBack = Math.max(0, ...this.#stops.map((s) => s.length - 1));
  }

  /** The final (or, while generating, current) text. */
  get text(): string {
    return this.#text;
  }

  /** Adds a token; resolves the text now safe to release (maybe ""). */
  push(id: number): string {
    this.ids.push(id);
    const text = this.#tok.decode(this.ids, true);
    let cut = -1;
    for (const s of this.#stops) {
      const at = text.indexOf(s, Math.max(0, this.#released - s.length + 1));
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      this.stopped = true;
      this.#text = text.slice(0, cut);
      return this.#release(this.#text.length);
    }
    this.#text = text;
    if (text.endsWith("\uFFFD")) return "";
    return this.#release(text.length - this.#holdBack);
  }

  /** At the end: whatever was held back. */
  flush(): string {
    return this.#release(this.#text.length);
  }

  #release(upTo: number): string {
    if (upTo <= this.#released) return "";
    const out = this.#text.slice(this.#released, upTo);
    this.#released = upTo;
    return out;
  }
}
