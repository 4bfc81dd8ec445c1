// The batched forward step against the one-sequence forward pass: prefill chunks and
// decode tokens of several sequences mixed in one step give each sequence's logits as if
// it ran alone (max|delta| <= 1e-5 x max|logit|; only float32 summation order differs).
import { describe, expect, it } from "vitest";
import { BatchForward, type BatchItem, type LatentCache } from "../../src/engine/batch.ts";
import { type ExpertRunner, LocalExperts } from "../../src/engine/experts.ts";
import { BlockKvCache, bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import { heldExperts } from "../../src/engine/loader.ts";
import { SequenceCache } from "../../src/engine/model.ts";
import { GREEDY, runToEnd, ServingEngine } from "../../src/gateway/engine.ts";
import { maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";
import { localModel, native } from "../support/shards.ts";

function maxAbs(a: Float32Array): number {
  let m = 0;
  for (const v of a) m = Math.max(m, Math.abs(v));
  return m;
}

describe.each(["tiny-v2", "tiny-v3"] as const)("BatchForward on %s", (name) => {
  it("gives each sequence's logits as if it ran alone", async () => {
    const dir = await tinyCheckpointFor(name);
    const golden = readGolden(name);
    const { weights, model } = await localModel(dir);
    const calls: number[] = [];
    const local = new LocalExperts(native, heldExperts(weights));
    const counting: ExpertRunner = {
      run(layer, x, t, dim, ids, w, topK) {
        calls.push(layer);
        return local.run(layer, x, t, dim, ids, w, topK);
      },
    };
    const batch = new BatchForward(weights, native, counting);
    const c = weights.config;
    // Three sequences: golden prompts extended by a few fixed "decoded" tokens.
    const seqs = golden.prompts.slice(0, 3).map((p, i) => [...p.token_ids, 7 + i, 40 + i, 90]);
    const alone = await Promise.all(
      seqs.map((s) => model.forward(s, new SequenceCache(c, s.length))),
    );
    const blocks = new BlockKvCache(c, { blockSize: 4, memoryBytes: 64 * bytesPerBlock(c, 4) });
    const caches: LatentCache[] = [new SequenceCache(c), blocks.view(1), blocks.view(2)];
    const got = seqs.map(() => [] as Float32Array[]);
    let done = seqs.map(() => 0);
    // Steps of chunk sizes per sequence (0: not in this step); the last steps are decodes.
    const plan = [
      [5, 0, 3],
      [2, 4, 1],
      [100, 100, 100],
      [1, 1, 1],
      [1, 0, 1],
      [1, 1, 0],
      [0, 1, 1],
    ];
    for (const sizes of plan) {
      const items: BatchItem[] = [];
      const who: number[] = [];
      sizes.forEach((want, i) => {
        const n = Math.min(want, seqs[i]!.length - done[i]!);
        if (n <= 0) return;
        if (i > 0) expect(blocks.allocator.reserve(i, done[i]! + n)).toBe(true);
        items.push({
          tokens: seqs[i]!.slice(done[i]!, done[i]! + n),
          cache: caches[i]!,
          logits: "all",
        });
        who.push(i);
      });
      if (items.length === 0) continue;
      calls.length = 0;
      const out = await batch.step(items);
      // One routed-expert call per MoE layer for the whole batch.
      expect(calls).toEqual(weights.layers.filter((l) => l.moe).map((l) => l.index));
      who.forEach((i, k) => {
        got[i]!.push(out[k]!);
        done[i]! += items[k]!.tokens.length;
      });
    }
    done = done.map((d, i) => d - seqs[i]!.length);
    expect(done).toEqual([0, 0, 0]);
    seqs.forEach((_, i) => {
      const joined = new Float32Array(alone[i]!.length);
      let at = 0;
      for (const part of got[i]!) {
        joined.set(part, at);
        at += part.length;
      }
      expect(at).toBe(alone[i]!.length);
      expect(maxAbsDiff(joined, alone[i]!)).toBeLessThanOrEqual(1e-5 * maxAbs(alone[i]!));
    });
  });

  it("returns only the logits asked for", async () => {
    const dir = await tinyCheckpointFor(name);
    const { weights, model } = await localModel(dir);
    const c = weights.config;
    const batch = new BatchForward(weights, native, new LocalExperts(native, heldExperts(weights)));
    const a = [5, 6, 7, 8];
    const b = [9, 10, 11];
    const out = await batch.step([
      { tokens: a, cache: new SequenceCache(c), logits: "last" },
      { tokens: b, cache: new SequenceCache(c), logits: "none" },
    ]);
    expect(out[1]!.length).toBe(0);
    const want = await model.forward(a, new SequenceCache(c), true);
    expect(out[0]!.length).toBe(want.length);
    expect(maxAbsDiff(out[0]!, want)).toBeLessThanOrEqual(1e-5 * maxAbs(want));
  });
});

describe("ServingEngine when sampling throws", () => {
  it("fails every request of the engine instead of leaving them waiting, then serves again", async () => {
    const dir = await tinyCheckpointFor("tiny-v3");
    const { weights } = await localModel(dir);
    let fail = true;
    const forward = new BatchForward(
      weights,
      native,
      new LocalExperts(native, heldExperts(weights)),
    );
    const sample = forward.sample.bind(forward);
    forward.sample = (logits, rows) => {
      if (fail) throw new Error("sampler fault");
      return sample(logits, rows);
    };
    const kv = new BlockKvCache(weights.config, { memoryBytes: 4 * 2 ** 20 });
    const engine = new ServingEngine(forward, kv, {
      maxBatchTokens: 64,
      maxRunning: 8,
      maxQueueDepth: 8,
    });
    const run = (prompt: number[]) =>
      runToEnd(engine, {
        prompt,
        maxTokens: 4,
        sampling: GREEDY,
        stopTokenIds: [],
        logprobs: null,
        promptLogprobs: false,
      }).then(
        (r) => `${r.reason}:${r.ids.length}`,
        (e) => `error:${(e as Error).message}`,
      );
    expect(await Promise.all([run([1, 2, 3]), run([4, 5])])).toEqual([
      "error:sampler fault",
      "error:sampler fault",
    ]);
    expect(engine.stats).toMatchObject({ numRunning: 0, numWaiting: 0, kvUsage: 0 });
    fail = false;
    expect(await run([1, 2, 3])).toBe("length:4");
  });
});
