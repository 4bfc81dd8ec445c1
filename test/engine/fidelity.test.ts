// The engine against the goldens (Hugging Face transformers patched to follow DeepSeek's
// reference; see docs/fidelity.md), on both backends: the native kernels, and the
// TypeScript reference, which checks the model code independently of the kernels.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Backend } from "../../src/engine/backend.ts";
import { generate } from "../../src/engine/generate.ts";
import { SequenceCache } from "../../src/engine/model.ts";
import { cpuIsaFor, loadAddon, nativeBackend } from "../../src/engine/native.ts";
import { referenceBackend } from "../../src/engine/reference.ts";
import { localModel, maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";

const backends: [string, Backend][] = [
  ["native", nativeBackend()],
  ["reference", referenceBackend],
];
const models = ["tiny-v2", "tiny-v3", "tiny-v3-fp8"] as const;

describe.each(backends)("%s backend", (_name, backend) => {
  describe.each(models)("%s", (name) => {
    const golden = readGolden(name);
    const tol = (p: { max_abs_logit: number }) => golden.tolerance.relative * p.max_abs_logit;

    it("matches the golden full-sequence logits within 1e-4 x max|logit|", async () => {
      const { weights, model } = await localModel(await tinyCheckpointFor(name), backend);
      for (const p of golden.prompts) {
        const logits = await model.forward(p.token_ids, new SequenceCache(weights.config));
        expect(maxAbsDiff(logits, p.logits)).toBeLessThanOrEqual(tol(p));
      }
    });

    it("decodes with the cache to the prefill's logits, position by position", async () => {
      const { weights, model } = await localModel(await tinyCheckpointFor(name), backend);
      const p = golden.prompts[1]!;
      const full = await model.forward(p.token_ids, new SequenceCache(weights.config));
      const cache = new SequenceCache(weights.config);
      const V = weights.config.vocabSize;
      for (let t = 0; t < p.token_ids.length; t++) {
        const step = await model.forward([p.token_ids[t]!], cache);
        expect(maxAbsDiff(step, full.subarray(t * V, (t + 1) * V))).toBeLessThanOrEqual(tol(p));
      }
    });

    it("generates the golden's 32 greedy tokens", async () => {
      const { model } = await localModel(await tinyCheckpointFor(name), backend);
      const prompt = golden.prompts[golden.greedy.prompt_index]!.token_ids;
      const { tokens } = await generate(model, prompt, { maxTokens: golden.greedy.new_tokens });
      expect(tokens).toEqual(golden.greedy.tokens);
    });
  });
});

// --cpu-matmul bf16: activations rounded to bf16 in the bf16-weight GEMMs (AMX tiles or
// AVX512_BF16 where this CPU has them; on a CPU with neither this is the fp32 path again).
// Rounding x costs ~2^-9 relative per product; in these tiny random models that now and then
// flips a near-tie expert choice, which moves a few logits by up to ~8% of the largest (measured:
// mean error 0.1-0.4%, max 0.4-8%). The bounds leave room for that and none for a wrong tile
// layout or write-back, which puts every logit off by about the logits' own size.
describe("native backend, --cpu-matmul bf16", () => {
  let backend: ReturnType<typeof nativeBackend>;
  beforeAll(() => {
    backend = nativeBackend({ cpuMatmul: "bf16" });
  });
  afterAll(() => {
    loadAddon().configure({ isa: "auto" });
  });

  it("runs the bf16 kernels this CPU has", () => {
    const bf16 = cpuIsaFor("bf16", backend.info.availableIsas);
    if (bf16) expect(backend.info.cpu.isa).toBe(bf16);
    else expect(["scalar", "avx2", "avx512"]).toContain(backend.info.cpu.isa);
  });

  it.each(["tiny-v2", "tiny-v3", "tiny-v3-fp8"] as const)(
    "%s: logits within 1%% (mean) and 15%% (max) of max|logit| of the golden",
    async (name) => {
      const golden = readGolden(name);
      const { weights, model } = await localModel(await tinyCheckpointFor(name), backend);
      for (const p of golden.prompts) {
        const logits = await model.forward(p.token_ids, new SequenceCache(weights.config));
        let sum = 0;
        for (let i = 0; i < logits.length; i++) sum += Math.abs(logits[i]! - p.logits[i]!);
        expect(sum / logits.length).toBeLessThanOrEqual(1e-2 * p.max_abs_logit);
        expect(maxAbsDiff(logits, p.logits)).toBeLessThanOrEqual(0.15 * p.max_abs_logit);
      }
    },
  );
});
