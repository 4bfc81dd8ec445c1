// Incremental detokenization (src/gateway/text.ts) against decoding the whole output at
// every token (what it replaced, kept here as the oracle): the same released pieces for
// random outputs of the tiny tokenizer (multi-byte characters split across byte tokens,
// invalid UTF-8, added tokens, stop strings), and the same final text.
import { describe, expect, it } from "vitest";
import { OutputText } from "../../src/gateway/text.ts";
import { Prng } from "../../src/model/prng.ts";
import { tinyTokenizerConfigJson, tinyTokenizerJson } from "../../src/model/tiny-tokenizer.ts";
import { Tokenizer } from "../../src/model/tokenizer.ts";

const tok = new Tokenizer(tinyTokenizerJson(), tinyTokenizerConfigJson(256));

/** The former OutputText: the whole output decoded at every token. */
class Oracle {
  readonly ids: number[] = [];
  text = "";
  released = 0;
  stopped = false;
  readonly stops: string[];
  readonly holdBack: number;
  constructor(stops: string[]) {
    this.stops = stops;
    this.holdBack = Math.max(0, ...stops.map((s) => s.length - 1));
  }
  push(id: number): string {
    this.ids.push(id);
    const text = tok.decode(this.ids, true);
    let cut = -1;
    for (const s of this.stops) {
      const at = text.indexOf(s, Math.max(0, this.released - s.length + 1));
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      this.stopped = true;
      this.text = text.slice(0, cut);
      return this.release(this.text.length);
    }
    this.text = text;
    if (text.endsWith("\uFFFD")) return "";
    return this.release(text.length - this.holdBack);
  }
  flush(): string {
    return this.release(this.text.length);
  }
  release(upTo: number): string {
    if (upTo <= this.released) return "";
    const out = this.text.slice(this.released, upTo);
    this.released = upTo;
    return out;
  }
}

/** Random outputs: English and multi-byte text as encoded, random bytes and added tokens. */
function randomIds(rng: Prng): number[] {
  const texts = [
    "The quick brown fox",
    " héllo wörld",
    " 東京 🚀",
    " and it is",
    "\n\n",
    " “quotes”",
  ];
  const ids: number[] = [];
  while (ids.length < 120) {
    const r = rng.uniform();
    if (r < 0.6) ids.push(...tok.encode(texts[Math.floor(rng.uniform() * texts.length)]!, false));
    else if (r < 0.85)
      ids.push(5 + Math.floor(rng.uniform() * 256)); // a byte token
    else ids.push(Math.floor(rng.uniform() * tok.size)); // any, added tokens included
  }
  return ids;
}

describe("incremental detokenization", () => {
  const rng = new Prng(9, "output-text");
  const cases = Array.from({ length: 80 }, (_, i) => ({
    ids: randomIds(rng),
    stops: [[], ["fox"], [" w", "🚀"], ["\n\n", "東"], ["it is there"]][i % 5]!,
  }));

  it("releases what decoding the whole output at every token released, piece by piece", () => {
    let stopped = 0;
    for (const { ids, stops } of cases) {
      const got = new OutputText(tok, stops);
      const want = new Oracle(stops);
      for (const id of ids) {
        expect(got.push(id), JSON.stringify(want.text)).toBe(want.push(id));
        expect(got.stopped).toBe(want.stopped);
        if (want.stopped) break;
      }
      expect(got.flush()).toBe(want.flush());
      expect(got.text).toBe(want.text);
      if (want.stopped) stopped++;
    }
    expect(stopped).toBeGreaterThan(20);
  });

  it("holds an unfinished character until the token that completes it", () => {
    // One byte token per UTF-8 byte.
    const byteId = (b: number) => tok.tokenBytes()!.findIndex((t) => t?.length === 1 && t[0] === b);
    const ids = [...Buffer.from("é東🚀")].map(byteId);
    const out = new OutputText(tok, []);
    expect(ids.map((id) => out.push(id))).toEqual(["", "é", "", "", "東", "", "", "", "🚀"]);
    // Cut short: the unfinished character comes out as U+FFFD at the end.
    const cut = new OutputText(tok, []);
    expect(
      ids
        .slice(0, 4)
        .map((id) => cut.push(id))
        .join(""),
    ).toBe("é");
    expect(cut.flush()).toBe("\uFFFD");
    expect(cut.text).toBe("é\uFFFD");
  });
});
