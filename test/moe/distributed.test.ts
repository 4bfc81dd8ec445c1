// The expert-parallel data plane against a real nats-server with real shard processes.
// Distributed and single-process runs use the same native kernels; the routed experts'
// partial sums are added per shard (in shard order) instead of in one grouped call, so the
// logits agree up to float32 summation order: we require max|delta| <= 1e-5 x max|logit|
// (observed: ~1e-7) and identical greedy tokens.
import { afterAll, describe, expect, it } from "vitest";
import { generate } from "../../src/engine/generate.ts";
import { SequenceCache } from "../../src/engine/model.ts";
import { maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";
import {
  type Cluster,
  distributedModel,
  localModel,
  startShards,
  stopAll,
} from "../support/shards.ts";

const cases = [
  ["tiny-v2", 1, 0],
  ["tiny-v2", 2, 0],
  ["tiny-v2", 4, 0],
  ["tiny-v2", 2, 2],
  ["tiny-v3", 1, 0],
  ["tiny-v3", 2, 0],
  ["tiny-v3", 4, 0],
  ["tiny-v3", 4, 4],
] as const;

describe.each(cases)(
  "%s over %i shard(s) with %i redundant experts",
  (name, numShards, redundant) => {
    let cluster: Cluster | undefined;
    afterAll(async () => stopAll(cluster));

    it("gives the single-process logits and greedy tokens", async () => {
      const dir = await tinyCheckpointFor(name);
      cluster = await startShards(dir, numShards, { redundant });
      const golden = readGolden(name);
      const local = await localModel(dir);
      const remote = await distributedModel(cluster);
      try {
        for (const p of golden.prompts) {
          const a = await local.model.forward(p.token_ids, new SequenceCache(local.weights.config));
          const b = await remote.model.forward(
            p.token_ids,
            new SequenceCache(remote.weights.config),
          );
          expect(maxAbsDiff(a, b)).toBeLessThanOrEqual(1e-5 * p.max_abs_logit);
        }
        const prompt = golden.prompts[0]!.token_ids;
        const want = await generate(local.model, prompt, { maxTokens: 32 });
        const got = await generate(remote.model, prompt, { maxTokens: 32 });
        expect(got.tokens).toEqual(want.tokens);
        expect(got.tokens).toEqual(golden.greedy.tokens);
      } finally {
        await remote.nc.close();
      }
    });
  },
);
