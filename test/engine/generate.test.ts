// `expertmesh generate`'s sampling options on the native engine (tiny V3): min_p and the
// repetition penalty, as the gateway applies them (sampling.ts; the gateway's own tests
// check them through its APIs).
import { describe, expect, it } from "vitest";
import { generate } from "../../src/engine/generate.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { localModel, readGolden, tinyCheckpointFor } from "../support/golden.ts";

describe("generate's sampling options", () => {
  const golden = readGolden("tiny-v3");
  const prompt = golden.prompts[golden.greedy.prompt_index]!.token_ids;

  it("min_p 1 keeps only the most likely token: any temperature gives the greedy tokens", async () => {
    const { model } = await localModel(await tinyCheckpointFor("tiny-v3"), nativeBackend());
    const hot = await generate(model, prompt, {
      maxTokens: 16,
      temperature: 2,
      minP: 1,
      seed: 5,
    });
    expect(hot.tokens).toEqual(golden.greedy.tokens.slice(0, 16));
    // Without it this temperature wanders off (the check above can fail).
    const free = await generate(model, prompt, { maxTokens: 16, temperature: 2, seed: 5 });
    expect(free.tokens).not.toEqual(hot.tokens);
  });

  it("a repetition penalty of 100 keeps greedy decoding off the prompt's and its own tokens", async () => {
    const { model } = await localModel(await tinyCheckpointFor("tiny-v3"), nativeBackend());
    const seen = (tokens: number[]) =>
      tokens.filter((t, i) => prompt.includes(t) || tokens.indexOf(t) < i).length;
    // The golden greedy tokens repeat (the check below can fail).
    expect(seen(golden.greedy.tokens)).toBeGreaterThan(0);
    const { tokens } = await generate(model, prompt, {
      maxTokens: golden.greedy.new_tokens,
      repetitionPenalty: 100,
    });
    expect(tokens).toHaveLength(golden.greedy.new_tokens);
    expect(seen(tokens)).toBe(0);
  });
});
