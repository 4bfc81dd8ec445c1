// Token sampling (src/engine/sampling.ts's rule) on both backends: hand-worked tables, then
// random rows checked against an oracle written here in float64 (which tokens the rule
// keeps, in which order, and where in the renormalized CDF each one sits): the token each
// backend picks for u must be the one whose interval holds u, up to float32 rounding.
import { describe, expect, it } from "vitest";
import type { Backend } from "../../src/engine/backend.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { referenceBackend } from "../../src/engine/reference.ts";
import {
  applyPenalties,
  logprobRows,
  maskBadWords,
  type Penalties,
  type SampleRows,
  tokenLogprob,
  uniform32,
} from "../../src/engine/sampling.ts";
import { Prng } from "../../src/model/prng.ts";

const backends: [string, Backend][] = [
  ["reference", referenceBackend],
  ["native", nativeBackend()],
];

interface Setting {
  temperature: number;
  minP?: number;
  topK?: number;
  topP?: number;
}

const rowsOf = (settings: readonly Setting[], uniform: readonly number[]): SampleRows => ({
  temperature: Float32Array.from(settings, (s) => s.temperature),
  topK: Int32Array.from(settings, (s) => s.topK ?? 0),
  topP: Float32Array.from(settings, (s) => s.topP ?? 1),
  uniform: Float32Array.from(uniform, uniform32),
  minP: Float32Array.from(settings, (s) => s.minP ?? 0),
});

/** The rule in float64: kept ids in walk order, their probabilities (summing to 1). */
function oracle(logits: ArrayLike<number>, s: Setting): { ids: number[]; probs: number[] } {
  const V = logits.length;
  const z = Array.from({ length: V }, (_, i) => Math.fround(logits[i]! / s.temperature));
  const byValue = (ids: number[]) => ids.sort((a, b) => z[b]! - z[a]! || a - b);
  const all = Array.from({ length: V }, (_, i) => i);
  const minP = s.minP ?? 0;
  const topK = s.topK ?? 0;
  const topP = s.topP ?? 1;
  const max = all.reduce((m, i) => Math.max(m, z[i]!), -Infinity);
  // min_p: probability at least min_p x the largest (up to float32 rounding of the cut).
  let ids = minP > 0 ? all.filter((i) => Math.exp(z[i]! - max) >= minP * (1 - 1e-6)) : all;
  // Most likely first when top_k or top_p cut, else in id order.
  if ((topK > 0 && topK < ids.length) || topP < 1) ids = byValue(ids);
  if (topK > 0 && topK < ids.length) ids = ids.slice(0, topK);
  let w = ids.map((i) => Math.exp(z[i]! - max));
  if (topP < 1) {
    const total = w.reduce((a, b) => a + b, 0);
    let cum = 0;
    let keep = ids.length;
    for (let j = 0; j < w.length; j++) {
      cum += w[j]!;
      if (cum >= topP * total) {
        keep = j + 1;
        break;
      }
    }
    ids = ids.slice(0, keep);
    w = w.slice(0, keep);
  }
  const mass = w.reduce((a, b) => a + b, 0);
  return { ids, probs: w.map((v) => v / mass) };
}

describe.each(backends)("sampling on the %s backend", (_name, backend) => {
  // Vocabulary of 5; u picks by inverse CDF.
  const L = Float32Array.of(1, 3, 3, 0, 2);
  const table: [string, Setting, number, number][] = [
    ["greedy: argmax, lower id on ties", { temperature: 0 }, 0.99, 1],
    ["greedy ignores top_k, top_p", { temperature: 0, topK: 1, topP: 0.1 }, 0.5, 1],
    [
      "top_k 1 at any temperature is the argmax (ties: lower id)",
      { temperature: 2, topK: 1 },
      0.99,
      1,
    ],
    ["no cut walks the vocabulary in order: u = 0 is token 0", { temperature: 1 }, 0, 0],
    ["no cut, u near 1 is the last token", { temperature: 1 }, 0.999999, 4],
    ["top_k 2 keeps the tied pair, most likely first", { temperature: 1, topK: 2 }, 0.49, 1],
    ["top_k 2, second half is the other of the pair", { temperature: 1, topK: 2 }, 0.51, 2],
    ["top_p cut walks most likely first", { temperature: 1, topP: 0.5 }, 0.0, 1],
    // exp(3)=20.1 twice, exp(2)=7.39, exp(1)=2.72, 1: top_p 0.8 of 51.3 keeps 1, 2, 4 (47.6).
    ["top_p keeps the smallest prefix reaching it", { temperature: 1, topP: 0.8 }, 0.99, 4],
    ["a cold temperature sharpens towards the pair", { temperature: 0.05 }, 0.3, 1],
    // Weights 20.1, 20.1, 7.39, 2.72, 1 (of the max: 1, 1, 0.37, 0.14, 0.05).
    ["min_p 1 keeps the tied pair only", { temperature: 1, minP: 1 }, 0.99, 2],
    ["min_p 0.3 keeps the pair and token 4, in id order", { temperature: 1, minP: 0.3 }, 0.99, 4],
    ["min_p 0.3, lower u: the pair", { temperature: 1, minP: 0.3 }, 0.8, 2],
    ["min_p then top_k: top_k 1 of min_p's", { temperature: 1, minP: 0.3, topK: 1 }, 0.99, 1],
    ["greedy ignores min_p", { temperature: 0, minP: 1 }, 0.99, 1],
    // At temperature 3 token 3's weight is exp(-1) = 0.37 of the max: min_p 0.3 keeps it,
    // and token 0 (0.51): u = 0.01 is token 0 (id order), or the pair's first under top_p.
    ["min_p after temperature", { temperature: 3, minP: 0.3 }, 0.01, 0],
    ["min_p then top_p: most likely first", { temperature: 3, minP: 0.3, topP: 0.999 }, 0.01, 1],
  ];
  it.each(table)("%s", (_what, s, u, want) => {
    expect(backend.sample(L, 5, rowsOf([s], [u]))[0]).toBe(want);
  });

  // Nothing to pick: -1, at any setting, for a NaN or +Infinity anywhere in the row (numbers
  // that overflowed upstream) or a row of -Infinity; a -Infinity among finite logits is
  // only a masked token. The next row is sampled as usual.
  const inf = Number.POSITIVE_INFINITY;
  const unpickable: [string, number[]][] = [
    ["a NaN", [1, Number.NaN, 3, 0, 2]],
    ["+Infinity", [1, 3, inf, 0, 2]],
    ["every logit -Infinity", [-inf, -inf, -inf, -inf, -inf]],
    ["all NaN", [Number.NaN, Number.NaN, Number.NaN, Number.NaN, Number.NaN]],
  ];
  const settings: Setting[] = [
    { temperature: 0 },
    { temperature: 1 },
    { temperature: 1, topK: 2 },
    { temperature: 1, topP: 0.5 },
    { temperature: 1, minP: 0.3 },
  ];
  it.each(unpickable)("-1 for a row with %s", (_what, row) => {
    const two = Float32Array.of(...row, -inf, 3, 3, -inf, 2);
    for (const s of settings)
      expect(
        Array.from(backend.sample(two, 5, rowsOf([s, s], [0.3, 0.3]))),
        JSON.stringify(s),
      ).toEqual([-1, 1]);
  });

  it("random rows: the token whose renormalized CDF interval holds u", () => {
    const rng = new Prng(42);
    const V = 700;
    const cases: { s: Setting; scale: number }[] = [];
    for (const temperature of [0.3, 1, 1.7])
      for (const [topK, topP, minP] of [
        [0, 1, 0],
        [0, 0.9, 0],
        [0, 0.3, 0],
        [40, 1, 0],
        [40, 0.7, 0],
        [1, 1, 0],
        [V, 1, 0],
        [0, 1, 0.05],
        [0, 1, 0.5],
        [40, 0.9, 0.1],
        [3, 1, 0.01],
      ] as const)
        for (const scale of [0.5, 4, 16])
          cases.push({ s: { temperature, topK, topP, minP }, scale });
    const settings = cases.map((c) => c.s);
    const n = settings.length;
    const logits = new Float32Array(n * V);
    cases.forEach(({ scale }, r) => {
      for (let i = 0; i < V; i++) logits[r * V + i] = (rng.uniform() * 2 - 1) * scale;
    });
    const uniform = settings.map(() => rng.uniform());
    const rows = rowsOf(settings, uniform);
    const got = backend.sample(logits, V, rows);
    expect(got).toHaveLength(n);
    for (let r = 0; r < n; r++) {
      const { ids, probs } = oracle(logits.subarray(r * V, (r + 1) * V), settings[r]!);
      const j = ids.indexOf(got[r]!);
      expect(j, `row ${r}: token ${got[r]} is not kept by the rule`).toBeGreaterThanOrEqual(0);
      const lo = probs.slice(0, j).reduce((a, b) => a + b, 0);
      const u = rows.uniform[r]!;
      // float32 weights and sums: the boundaries may move by about 1e-5.
      expect(u, `row ${r} (${JSON.stringify(settings[r])})`).toBeGreaterThanOrEqual(lo - 1e-5);
      expect(u).toBeLessThanOrEqual(lo + probs[j]! + 1e-5);
    }
  });

  it("a nucleus reaching into a long tail: the tail's tokens in id order", () => {
    // One token, and 129,279 at 2^-24.5 of its weight: 0.5 % of the mass in the tail, so
    // top_p 0.999 keeps most of the tail (the native sampler's first band, weights >=
    // 2^-24 of the max, holds only the one token: it must widen).
    const V = 129_280;
    const T = 0.8;
    const logits = new Float32Array(V).fill(-24.5 * Math.LN2 * T);
    logits[5] = 0;
    for (const u of [0.3, 0.9981, 0.99995]) {
      const s = { temperature: T, topP: 0.999 };
      const got = backend.sample(logits, V, rowsOf([s], [u]))[0]!;
      const { ids, probs } = oracle(logits, s);
      expect(ids.length).toBeGreaterThan(100_000);
      let lo = 0;
      const j = ids.indexOf(got);
      for (let i = 0; i < j; i++) lo += probs[i]!;
      expect(j).toBeGreaterThanOrEqual(0);
      const at = uniform32(u);
      expect(at).toBeGreaterThanOrEqual(lo - 1e-5);
      expect(at).toBeLessThanOrEqual(lo + probs[j]! + 1e-5);
      if (u < 0.99) expect(got).toBe(5);
      else expect(got).toBeGreaterThan(60_000);
    }
  });

  it("takes u just below 1 (a float64 that float32 would round up to 1)", () => {
    const u = 1 - 2 ** -30;
    expect(Math.fround(u)).toBe(1);
    expect(uniform32(u)).toBeLessThan(1);
    expect(backend.sample(L, 5, rowsOf([{ temperature: 1 }], [u]))[0]).toBe(4);
  });
});

describe("tokenLogprob", () => {
  /** The reference: the whole log-softmax row in float64, sorted. */
  function reference(x: Float32Array, id: number, k: number) {
    const max = Math.max(...x);
    const lse = max + Math.log(x.reduce((a, v) => a + Math.exp(v - max), 0));
    const order = Array.from(x.keys()).sort((a, b) => x[b]! - x[a]! || a - b);
    return { id, logprob: x[id]! - lse, top: order.slice(0, k).map((t) => [t, x[t]! - lse]) };
  }

  it.each([
    ["ties: lower ids first", Float32Array.of(1, 3, 3, 0, 3, 2), 2, 3],
    ["k larger than the vocabulary", Float32Array.of(0.5, -1, 2), 1, 5],
    ["k = 0: no alternatives", Float32Array.of(0.5, -1, 2), 0, 0],
    ["-inf entries (masked tokens)", Float32Array.of(-Infinity, 1, -Infinity, 0), 3, 2],
  ] as [string, Float32Array, number, number][])("%s", (_what, x, id, k) => {
    const got = tokenLogprob(x, id, k);
    const want = reference(x, id, k);
    expect(got.logprob).toBeCloseTo(want.logprob, 12);
    expect(got.top.map(([t]) => t)).toEqual(want.top.map(([t]) => t));
    for (const [j, [, v]] of got.top.entries())
      expect(v).toBeCloseTo(want.top[j]![1] as number, 12);
  });

  it("equals the reference on random rows at every k up to 20", () => {
    const rng = new Prng(5);
    for (let r = 0; r < 30; r++) {
      // Few distinct values, so that ties are common.
      const x = Float32Array.from({ length: 500 }, () => Math.round(rng.uniform() * 40) / 4);
      const k = r % 21;
      const id = Math.floor(rng.uniform() * 500);
      const got = tokenLogprob(x, id, k);
      const want = reference(x, id, k);
      expect(got.top.map(([t]) => t)).toEqual(want.top.map(([t]) => t));
      expect(got.logprob).toBeCloseTo(want.logprob, 12);
    }
  });
});

describe("logprobs on the native backend", () => {
  const native = nativeBackend();

  // Its exponentials are float (the vectorized kernel): within 2e-6 of the reference's.
  it("equal the reference (tokenLogprob) on random rows, ties and -inf included", () => {
    const rng = new Prng(11);
    const V = 700;
    const T = 24;
    const logits = Float32Array.from({ length: T * V }, (_, i) =>
      // Rows 0-7: few distinct values (ties); 8-15: wide; 16: all -inf; others: masked halves.
      i < 8 * V
        ? Math.round(rng.uniform() * 20) / 4
        : i < 16 * V
          ? (rng.uniform() - 0.5) * 60
          : i < 17 * V
            ? Number.NEGATIVE_INFINITY
            : i % 2
              ? Number.NEGATIVE_INFINITY
              : rng.uniform() * 3,
    );
    const ids = Int32Array.from({ length: T }, () => Math.floor(rng.uniform() * V));
    for (const k of [0, 1, 5, 20]) {
      const got = native.logprobs(logits, V, ids, k);
      const want = logprobRows(logits, V, ids, k);
      expect(Array.from(got.topIds)).toEqual(Array.from(want.topIds));
      for (let i = 0; i < T; i++) {
        const [g, w] = [got.logprob[i]!, want.logprob[i]!];
        if (w === Number.NEGATIVE_INFINITY) expect(g).toBe(w);
        else expect(Math.abs(g - w)).toBeLessThan(2e-6);
      }
      for (let i = 0; i < T * k; i++) {
        const [g, w] = [got.topLogprobs[i]!, want.topLogprobs[i]!];
        if (w === Number.NEGATIVE_INFINITY) expect(g).toBe(w);
        else expect(Math.abs(g - w)).toBeLessThan(2e-6);
      }
    }
  });

  it("refuses ids outside the vocabulary and k past it", () => {
    const x = Float32Array.of(1, 2, 3);
    const code = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        return (e as { code?: string }).code;
      }
      return "no error";
    };
    expect(code(() => native.logprobs(x, 3, Int32Array.of(3), 1))).toBe("EM_NATIVE_ARG");
    expect(code(() => native.logprobs(x, 3, Int32Array.of(0), 4))).toBe("EM_NATIVE_ARG");
  });
});

describe("applyPenalties", () => {
  // Logits of a 6-token vocabulary; the prompt holds 0 and 1, the output so far 1 (twice)
  // and 2 (once).
  const L = [2, -1, 4, 0.5, -3, 1];
  const counts = new Map([
    [1, 2],
    [2, 1],
  ]);
  const prompt = new Set([0, 1]);
  const off: Penalties = { presence: 0, frequency: 0, repetition: 1 };
  const table: [string, Partial<Penalties>, number[]][] = [
    ["none", {}, L],
    ["presence: once per generated token", { presence: 0.5 }, [2, -1.5, 3.5, 0.5, -3, 1]],
    ["frequency: per time generated", { frequency: 0.25 }, [2, -1.5, 3.75, 0.5, -3, 1]],
    // Seen (prompt or output): 0, 1, 2. Positive logits divided, others multiplied.
    ["repetition 2: seen tokens, prompt included", { repetition: 2 }, [1, -2, 2, 0.5, -3, 1]],
    ["repetition 0.5 favours them", { repetition: 0.5 }, [4, -0.5, 8, 0.5, -3, 1]],
    // Repetition first, then the additive ones: token 1: -1 * 2 - (1 + 2) = -5.
    [
      "repetition, then presence and frequency",
      { repetition: 2, presence: 1, frequency: 1 },
      [1, -5, 0, 0.5, -3, 1],
    ],
  ];
  it.each(table)("%s", (_what, p, want) => {
    const row = Float32Array.from(L);
    applyPenalties(row, { ...off, ...p }, counts, prompt);
    expect(Array.from(row)).toEqual(want);
  });

  it("a token in both the prompt and the output is scaled once", () => {
    const row = Float32Array.of(8, 8);
    applyPenalties(row, { ...off, repetition: 2 }, new Map([[0, 3]]), new Set([0]));
    expect(Array.from(row)).toEqual([4, 8]);
  });
});

describe("maskBadWords", () => {
  // Words as token ids: [7] (one token), [1, 2, 3], [4, 5].
  const words = [[7], [1, 2, 3], [4, 5]];
  const table: [string, number[], number[]][] = [
    ["nothing generated: only one-token words", [], [7]],
    ["a word's start: its next token", [9, 1, 2], [7, 3]],
    ["the start of a word but not its prefix", [1, 9, 2], [7]],
    ["two words at once", [1, 2, 4], [7, 5]],
    ["a completed word again", [4, 5, 1, 2], [7, 3]],
  ];
  it.each(table)("%s", (_what, past, masked) => {
    const row = new Float32Array(10).fill(1);
    maskBadWords(row, words, past);
    const got = [...row.keys()].filter((i) => row[i] === Number.NEGATIVE_INFINITY);
    expect(got).toEqual([...masked].sort((a, b) => a - b));
  });
});
