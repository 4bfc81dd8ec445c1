// The forward pass on scratch arrays (src/engine/scratch.ts): the backends' `out` arguments
// write every element of a dirty array, a model reused across steps of different sizes
// computes what a fresh one computes, and two steps in flight at once (micro-batches) do
// not share arrays.
import { beforeAll, describe, expect, it } from "vitest";
import type { Backend } from "../../src/engine/backend.ts";
import { BatchForward, type BatchItem } from "../../src/engine/batch.ts";
import { type ExpertRunner, groupByExpert, LocalExperts } from "../../src/engine/experts.ts";
import { heldExperts, type ModelWeights } from "../../src/engine/loader.ts";
import { SequenceCache } from "../../src/engine/model.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { referenceBackend } from "../../src/engine/reference.ts";
import { Prng } from "../../src/model/prng.ts";
import { localModel, tinyCheckpointFor } from "../support/golden.ts";

let weights: ModelWeights;
beforeAll(async () => {
  weights = (await localModel(await tinyCheckpointFor("tiny-v3"), nativeBackend())).weights;
});

function random(rng: Prng, n: number): Float32Array {
  return Float32Array.from({ length: n }, () => rng.uniform() * 2 - 1);
}

/** An array of n NaNs: any element an op leaves unwritten shows. */
const dirty = (n: number) => new Float32Array(n).fill(Number.NaN);

describe.each([
  ["native", nativeBackend()],
  ["reference", referenceBackend],
] as [string, Backend][])("%s backend: results written into `out`", (_name, b) => {
  it("matmul, rmsnorm, siluMul and the grouped expert FFN", () => {
    const rng = new Prng(5);
    const layer = weights.layers[1]!;
    const D = weights.config.hiddenSize;
    const T = 3;
    const x = random(rng, T * D);
    const w = layer.attention.kvA;
    const mm = dirty(T * w.rows);
    expect(b.matmul(x, T, w, mm)).toBe(mm);
    expect(mm).toEqual(b.matmul(x, T, w));
    const rn = dirty(T * D);
    expect(b.rmsnorm(x, T, layer.inputNorm, 1e-6, rn)).toBe(rn);
    expect(rn).toEqual(b.rmsnorm(x, T, layer.inputNorm, 1e-6));
    const up = random(rng, T * D);
    const sm = dirty(T * D);
    expect(b.siluMul(x, up, sm)).toBe(sm);
    expect(sm).toEqual(b.siluMul(x, up));
    // Tokens 0 and 2 go to experts; output row 1 gets none and must come back zero.
    const experts = layer.moe!.experts;
    const ids = [...experts.keys()].slice(0, 2);
    const g = groupByExpert(x, D, [0, 0, 2], [ids[0]!, ids[1]!, ids[1]!], [0.5, 0.25, 1]);
    const args = {
      x,
      xIndex: g.xIndex,
      dim: D,
      offsets: g.offsets,
      w1: g.experts.map((e) => experts.get(e)!.gate),
      w3: g.experts.map((e) => experts.get(e)!.up),
      w2: g.experts.map((e) => experts.get(e)!.down),
      rowWeight: g.rowWeight,
      outIndex: g.outIndex,
      numOut: T,
    };
    const moe = dirty(T * D);
    expect(b.moe({ ...args, out: moe })).toBe(moe);
    expect(moe).toEqual(b.moe(args));
    expect(moe.subarray(D, 2 * D).every((v) => v === 0)).toBe(true);
    expect(moe.subarray(0, D).some((v) => v !== 0)).toBe(true);
  });
});

/**
 * Experts that answer on a later turn of the event loop, as remote shards do: after 1 to 10
 * turns (by the first token's first expert), so that steps in flight together overtake each
 * other.
 */
function later(inner: ExpertRunner): ExpertRunner {
  return {
    async run(layer, x, t, dim, ids, weights, topK) {
      for (let turns = 1 + 3 * (ids[0]! % 4); turns > 0; turns--)
        await new Promise((r) => setImmediate(r));
      return inner.run(layer, x, t, dim, ids, weights, topK);
    },
  };
}

describe("the forward pass's scratch arrays", () => {
  const prompts = (V: number) => {
    const rng = new Prng(11);
    // Two pairs with the same number of tokens in every step of schedule(): a step of each
    // pair asks for arrays of the same sizes.
    return [13, 6, 9, 10].map((n) =>
      Array.from({ length: n }, () => Math.floor(rng.uniform() * V)),
    );
  };

  /** Two prefill chunks, then three decode steps, every sequence in every step. */
  function schedule(ps: number[][]): [number, number][] {
    const longest = Math.max(...ps.map((p) => p.length));
    return [
      [0, 5],
      [5, longest],
      [longest, longest + 1],
      [longest + 1, longest + 2],
      [longest + 2, longest + 3],
    ];
  }

  function itemsFor(ps: number[][], caches: SequenceCache[], [from, to]: [number, number]) {
    return ps.flatMap((p, i): BatchItem[] => {
      // Past the prompt, a sequence decodes its own first tokens again (any tokens do).
      const tokens =
        from >= p.length && to > p.length
          ? [p[from % p.length]!]
          : p.slice(Math.min(from, p.length), Math.min(to, p.length));
      return tokens.length > 0 ? [{ tokens, cache: caches[i]!, logits: "all" }] : [];
    });
  }

  it("a model reused across steps of 4 to 20 tokens equals a fresh model per step, exactly", async () => {
    const backend = nativeBackend();
    const experts = new LocalExperts(backend, heldExperts(weights));
    const c = weights.config;
    const ps = prompts(c.vocabSize);
    const run = async (model: () => BatchForward) => {
      const caches = ps.map(() => new SequenceCache(c, 4));
      const out: Float32Array[] = [];
      for (const range of schedule(ps))
        out.push(...(await model().step(itemsFor(ps, caches, range))));
      return out;
    };
    const reused = new BatchForward(weights, backend, experts);
    const a = await run(() => reused);
    const b = await run(() => new BatchForward(weights, backend, experts));
    expect(a.length).toBe(20);
    a.forEach((x, i) => {
      expect(x).toEqual(b[i]);
    });
  });

  it("two steps in flight at once compute what they compute one after the other", async () => {
    const backend = nativeBackend();
    const c = weights.config;
    const model = new BatchForward(
      weights,
      backend,
      later(new LocalExperts(backend, heldExperts(weights))),
    );
    const ps = prompts(c.vocabSize);
    const halves = [ps.slice(0, 2), ps.slice(2)];
    const run = async (together: boolean) => {
      const caches = halves.map((h) => h.map(() => new SequenceCache(c, 4)));
      const out: Float32Array[][] = [[], []];
      for (const range of schedule(ps)) {
        const steps = halves.map((h, k) => () => model.step(itemsFor(h, caches[k]!, range)));
        const got = together
          ? await Promise.all(steps.map((s) => s()))
          : [await steps[0]!(), await steps[1]!()];
        got.forEach((g, k) => {
          out[k]!.push(...g);
        });
      }
      return out.flat();
    };
    const a = await run(true);
    const b = await run(false);
    expect(a.length).toBe(b.length);
    a.forEach((x, i) => {
      expect(x).toEqual(b[i]);
    });
  });
});
