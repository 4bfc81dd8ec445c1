// The model code on the TypeScript reference backend against the goldens: this checks the
// forward pass itself (layer wiring, MLA, YaRN, gating, MoE), independent of the kernels.
import { describe, expect, it } from "vitest";
import { LocalExperts } from "../../src/engine/experts.ts";
import { generate } from "../../src/engine/generate.ts";
import { loadWeights } from "../../src/engine/loader.ts";
import { DeepSeekForward, SequenceCache } from "../../src/engine/model.ts";
import { referenceBackend } from "../../src/engine/reference.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";

describe.each(["tiny-v2", "tiny-v3", "tiny-v3-fp8"] as const)(
  "reference backend vs %s golden",
  (name) => {
    it("matches full-sequence logits", async () => {
      const golden = readGolden(name);
      const ckpt = await Checkpoint.open(await tinyCheckpointFor(name));
      const weights = await loadWeights(ckpt);
      const model = new DeepSeekForward(
        weights,
        referenceBackend,
        new LocalExperts(referenceBackend, (l) => weights.layers[l]!.moe!.experts),
      );
      for (const p of golden.prompts) {
        const logits = await model.forward(p.token_ids, new SequenceCache(weights.config));
        expect(maxAbsDiff(logits, p.logits)).toBeLessThanOrEqual(
          golden.tolerance.relative * p.max_abs_logit,
        );
      }
    });
  },
);

describe.each(["tiny-v2", "tiny-v3"] as const)(
  "reference backend, %s: cache and greedy decoding",
  (name) => {
    it("decodes with the cache to the same logits as a prefill, position by position", async () => {
      const golden = readGolden(name);
      const ckpt = await Checkpoint.open(await tinyCheckpointFor(name));
      const weights = await loadWeights(ckpt);
      const model = new DeepSeekForward(
        weights,
        referenceBackend,
        new LocalExperts(referenceBackend, (l) => weights.layers[l]!.moe!.experts),
      );
      const p = golden.prompts[1]!;
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
      const ckpt = await Checkpoint.open(await tinyCheckpointFor(name));
      const weights = await loadWeights(ckpt);
      const model = new DeepSeekForward(
        weights,
        referenceBackend,
        new LocalExperts(referenceBackend, (l) => weights.layers[l]!.moe!.experts),
      );
      const { tokens } = await generate(
        model,
        golden.prompts[golden.greedy.prompt_index]!.token_ids,
        { maxTokens: golden.greedy.new_tokens },
      );
      expect(tokens).toEqual(golden.greedy.tokens);
    });
  },
);
