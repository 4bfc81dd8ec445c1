// The prompt-lookup proposer (speculative.ts): table-driven cases, then its hash-chain
// index against a plain scan of the whole context on random token streams.
import { describe, expect, it } from "vitest";
import {
  checkNgramConfig,
  type NgramConfig,
  NgramIndex,
  PredictionDrafter,
  type TokenSource,
} from "../../src/engine/speculative.ts";
import { Prng } from "../../src/model/prng.ts";

const source = (tokens: readonly number[]): TokenSource => ({
  numTokens: tokens.length,
  tokenAt: (i) => tokens[i]!,
});

/** Tokens from a string: one per character (a..z), for readable cases. */
const t = (s: string) => Array.from(s.replaceAll(" ", ""), (c) => c.charCodeAt(0) - 96);
const str = (ids: number[]) => ids.map((i) => String.fromCharCode(i + 96)).join("");

describe("NgramIndex.propose", () => {
  // biome-ignore format: a table
  it.each([
    { name: "copies what followed the last token's earlier occurrence", ctx: "abcdxyz a", k: 3, want: "bcd" },
    { name: "no earlier occurrence: nothing", ctx: "abcdef", k: 3, want: "" },
    { name: "the longest match wins over a more recent shorter one", ctx: "xab pq zb rs ab", k: 2, want: "pq" },
    { name: "among equal matches the most recent wins", ctx: "ab c ab d ab", k: 1, want: "d" },
    { name: "maxN caps the match: then the most recent of the capped ones", ctx: "wxab c yxab d xab", k: 1, want: "d" },
    { name: "a short period continues into the draft itself", ctx: "q ab ab", k: 5, want: "ababa" },
    { name: "a run of one token proposes more of it", ctx: "z aaa", k: 4, want: "aaaa" },
    { name: "k caps the draft", ctx: "abcdefg a", k: 2, want: "bc" },
    { name: "k 0: nothing", ctx: "abab", k: 0, want: "" },
    { name: "a context no longer than minN: nothing", ctx: "a", k: 3, want: "" },
  ])("$name", ({ ctx, k, want }) => {
    const idx = new NgramIndex({ numTokens: 8, maxN: 3, minN: 1 });
    expect(str(idx.propose(source(t(ctx)), k))).toBe(want);
  });

  it("minN 2 ignores one-token matches", () => {
    const idx = new NgramIndex({ numTokens: 8, maxN: 3, minN: 2 });
    expect(idx.propose(source(t("ab xb c b")), 2)).toEqual([]);
    // The 2-gram "ab" does occur before: what followed it.
    const fresh = new NgramIndex({ numTokens: 8, maxN: 3, minN: 2 });
    expect(str(fresh.propose(source(t("ab xb cab")), 2))).toBe("xb");
  });

  it("equals a scan of the whole context on random streams, asked as they grow", () => {
    const rng = new Prng(17);
    for (let trial = 0; trial < 40; trial++) {
      const cfg: NgramConfig = {
        numTokens: 1 + (trial % 5),
        minN: 1 + (trial % 2),
        maxN: 2 + (trial % 4),
      };
      const vocab = 2 + (trial % 7);
      const tokens: number[] = [];
      const idx = new NgramIndex(cfg);
      for (let n = 0; n < 300; n++) {
        tokens.push(Math.floor(rng.uniform() * vocab));
        // Not asked at every length: the index catches up on what it missed.
        if (rng.uniform() < 0.6) continue;
        expect(idx.propose(source(tokens), cfg.numTokens)).toEqual(
          scanPropose(tokens, cfg, cfg.numTokens),
        );
      }
    }
  });
});

/**
 * The proposal by definition: over every earlier end position p, the longest (up to maxN,
 * at least minN) match of the context's end with the tokens ending at p, the latest p
 * among equals; then the k tokens after p (continuing into the draft). The index walks at
 * most 64 candidates, which these short-vocabulary streams would exceed: the scan looks at
 * the same 64 most recent candidates.
 */
function scanPropose(tokens: readonly number[], c: NgramConfig, k: number): number[] {
  const L = tokens.length;
  if (L <= c.minN) return [];
  let best = -1;
  let bestLen = 0;
  let seen = 0;
  for (let p = L - 2; p >= c.minN - 1 && seen < 64; p--) {
    let m = 0;
    while (m < c.minN && tokens[p - m] === tokens[L - 1 - m]) m++;
    // A candidate of the chain: its last minN tokens hash as the suffix's (equal here).
    if (m < c.minN) continue;
    seen++;
    let n = 0;
    while (n < c.maxN && n <= p && tokens[p - n] === tokens[L - 1 - n]) n++;
    if (n > bestLen) {
      best = p;
      bestLen = n;
      if (n === c.maxN) break;
    }
  }
  if (best < 0) return [];
  const draft: number[] = [];
  for (let j = 0; j < k; j++) {
    const at = best + 1 + j;
    draft.push(at < L ? tokens[at]! : draft[at - L]!);
  }
  return draft;
}

describe("PredictionDrafter.propose", () => {
  // The prompt is "pp" (2 tokens); `out` the output so far; the draft follows the prediction.
  // biome-ignore format: a table
  it.each([
    { name: "nothing out yet: the prediction's start", pred: "abcdefgh", out: "", k: 3, want: "abc" },
    { name: "following it: what comes next", pred: "abcdefgh", out: "abc", k: 3, want: "def" },
    { name: "k bounds the draft; the end bounds it too", pred: "abcdefgh", out: "abcdef", k: 5, want: "gh" },
    { name: "all of it out: nothing more", pred: "abcd", out: "abcd", k: 3, want: "" },
    { name: "one token replaced: the draft goes on after the one it replaced", pred: "abcdefgh", out: "abx", k: 3, want: "def" },
    { name: "two off it: lost until two tokens are found again", pred: "abcdefgh", out: "abxy", k: 3, want: "" },
    { name: "found again after the edit: what follows them there", pred: "abcdefgh", out: "abxyef", k: 2, want: "gh" },
    { name: "a deletion: the output skips part of it", pred: "abcdefghij", out: "abfg", k: 3, want: "hij" },
    { name: "an insertion: the output adds, then rejoins", pred: "abcdefgh", out: "abqqcd", k: 2, want: "ef" },
    { name: "lost, then equal matches: the one after the last place", pred: "cd1 abQ cd2", out: "abZYcd", k: 1, want: "2" },
  ])("$name", ({ pred, out, k, want }) => {
    const p = new PredictionDrafter(ids(pred), 2);
    expect(str2(p.propose(source([100, 100, ...ids(out)]), k))).toBe(want);
  });

  it("reads the output as it grows, proposal by proposal, as the engine calls it", () => {
    const pred = ids("abcdefghijkl");
    const p = new PredictionDrafter(pred, 1);
    const seq: number[] = [100];
    const proposals: string[] = [];
    for (const next of "abcdXYghijkl") {
      proposals.push(str2(p.propose(source(seq), 2)));
      seq.push(ids(next)[0]!);
    }
    // (after X: taken to replace e; after Y: lost, "XY" is not in it; g, h are, from "gh" on)
    expect(proposals).toEqual(["ab", "bc", "cd", "de", "ef", "fg", "", "", "ij", "jk", "kl", "l"]);
  });
});

/** Prediction and output tokens from letters, digits and capitals (one token each). */
const ids = (s: string) => Array.from(s.replaceAll(" ", ""), (c) => c.charCodeAt(0));
const str2 = (xs: number[]) => String.fromCharCode(...xs);

describe("checkNgramConfig", () => {
  // biome-ignore format: a table
  it.each([
    { c: { numTokens: 0, maxN: 3, minN: 1 }, error: /speculative tokens must be an integer in \[1, 15\], got 0/ },
    { c: { numTokens: 16, maxN: 3, minN: 1 }, error: /speculative tokens/ },
    { c: { numTokens: 4, maxN: 3, minN: 0 }, error: /prompt-lookup-min/ },
    { c: { numTokens: 4, maxN: 1, minN: 2 }, error: /prompt-lookup-min \(2\) must not exceed prompt-lookup-max \(1\)/ },
    { c: { numTokens: 2.5, maxN: 3, minN: 1 }, error: /speculative tokens/ },
  ])("refuses $c", ({ c, error }) => {
    expect(() => checkNgramConfig(c)).toThrow(error);
  });

  it("takes a good one as it is", () => {
    const c = { numTokens: 4, maxN: 4, minN: 4 };
    expect(checkNgramConfig(c)).toBe(c);
  });
});

describe("Prng.clone", () => {
  it("gives the numbers the original would, without moving it", () => {
    const p = new Prng(99);
    p.normal(); // leaves a spare Box-Muller sample
    const c = p.clone();
    const fromClone = [c.normal(), c.uniform(), c.nextU32()];
    expect([p.normal(), p.uniform(), p.nextU32()]).toEqual(fromClone);
  });
});
