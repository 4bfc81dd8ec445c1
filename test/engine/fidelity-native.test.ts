// The native engine (the addon's CPU kernels) against the goldens, and op by op against
// the TypeScript reference on the same model's real tensors.
import { describe, expect, it } from "vitest";
import { LocalExperts } from "../../src/engine/experts.ts";
import { generate } from "../../src/engine/generate.ts";
import { loadWeights } from "../../src/engine/loader.ts";
import { DeepSeekForward, SequenceCache } from "../../src/engine/model.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";

const native = nativeBackend();

async function tinyModel(name: "tiny-v2" | "tiny-v3" | "tiny-v3-fp8") {
  const weights = await loadWeights(await Checkpoint.open(await tinyCheckpointFor(name)));
  return {
    weights,
    model: new DeepSeekForward(
      weights,
      native,
      new LocalExperts(native, (l) => weights.layers[l]!.moe!.experts),
    ),
  };
}

describe.each(["tiny-v2", "tiny-v3", "tiny-v3-fp8"] as const)(
  "native engine vs %s golden",
  (name) => {
    it("matches full-sequence logits within 1e-4 x max|logit|", async () => {
      const golden = readGolden(name);
      const { weights, model } = await tinyModel(name);
      for (const p of golden.prompts) {
        const logits = await model.forward(p.token_ids, new SequenceCache(weights.config));
        expect(maxAbsDiff(logits, p.logits)).toBeLessThanOrEqual(
          golden.tolerance.relative * p.max_abs_logit,
        );
      }
    });

    it("decodes with the cache to the prefill's logits, position by position", async () => {
      const golden = readGolden(name);
      const { weights, model } = await tinyModel(name);
      const p = golden.prompts[2]!;
      const full = await model.forward(p.token_ids, new SequenceCache(weights.config));
      const cache = new SequenceCache(weights.config);
      const V = weights.config.vocabSize;
      for (let t = 0; t < p.token_ids.length; t++) {
        const step = await model.forward([p.token_ids[t]!], cache);
        expect(maxAbsDiff(step, full.subarray(t * V, (t + 1) * V))).toBeLessThanOrEqual(
          golden.tolerance.relative * p.max_abs_logit,
        );
      }
    });

    it("generates the golden's 32 greedy tokens", async () => {
      const golden = readGolden(name);
      const { model } = await tinyModel(name);
      const { tokens } = await generate(
        model,
        golden.prompts[golden.greedy.prompt_index]!.token_ids,
        { maxTokens: golden.greedy.new_tokens },
      );
      expect(tokens).toEqual(golden.greedy.tokens);
    });
  },
);
