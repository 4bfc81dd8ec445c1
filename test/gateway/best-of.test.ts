// best_of on /v1/completions with the official openai client: best_of choices are generated
// per prompt and the n with the highest summed token logprob come back, in that order. The
// candidates are what the same request with n = best_of (same seed) gives, so the pick is
// checked against them; bad values are refused with 400 naming best_of.
import type OpenAI from "openai";
import type { APIError } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let gw: TestGateway;
beforeAll(async () => {
  gw = await startGateway(await tinyCheckpointFor("tiny-v3"));
});
afterAll(async () => {
  await gw?.close();
});

const body = { model: "tiny", max_tokens: 6, temperature: 1, seed: 7 };
const sum = (c: OpenAI.CompletionChoice) =>
  c.logprobs!.token_logprobs!.reduce((s, x) => s + (x ?? 0), 0);

/** The candidates of a best_of request: the same request with n = best_of, with logprobs. */
async function candidates(prompt: string | string[], bestOf: number) {
  return gw.client.completions.create({ ...body, prompt, n: bestOf, logprobs: 0 });
}

describe("best_of", () => {
  it("returns the n of best_of choices with the highest summed logprob, best first", async () => {
    const all = await candidates("Once upon a time", 4);
    const ranked = [...all.choices].sort((a, b) => sum(b) - sum(a));
    expect(new Set(all.choices.map((c) => c.text)).size).toBeGreaterThan(1);
    // The seed is chosen so that the best two are not simply the first two generated.
    expect(ranked.slice(0, 2).map((c) => c.index)).not.toEqual([0, 1]);
    const one = await gw.client.completions.create({
      ...body,
      prompt: "Once upon a time",
      best_of: 4,
    } as never);
    expect((one as OpenAI.Completion).choices.map((c) => [c.index, c.text])).toEqual([
      [0, ranked[0]!.text],
    ]);
    expect((one as OpenAI.Completion).choices[0]!.logprobs).toBeNull();
    // Every generated choice counts in usage.
    expect((one as OpenAI.Completion).usage!.completion_tokens).toBe(all.usage!.completion_tokens);
    const two = (await gw.client.completions.create({
      ...body,
      prompt: "Once upon a time",
      n: 2,
      best_of: 4,
      logprobs: 0,
    } as never)) as OpenAI.Completion;
    expect(two.choices.map((c) => c.text)).toEqual([ranked[0]!.text, ranked[1]!.text]);
    expect(two.choices.map((c) => c.index)).toEqual([0, 1]);
    expect(sum(two.choices[0]!)).toBeGreaterThanOrEqual(sum(two.choices[1]!));
  });

  it("picks per prompt in a batch", async () => {
    const prompts = ["The cat sat on", "word 6 and 42"];
    const alone = await Promise.all(prompts.map((p) => candidates(p, 3)));
    const batch = (await gw.client.completions.create({
      ...body,
      prompt: prompts,
      best_of: 3,
    } as never)) as OpenAI.Completion;
    expect(batch.choices.map((c) => c.index)).toEqual([0, 1]);
    for (const [p, all] of alone.entries()) {
      const best = [...all.choices].sort((a, b) => sum(b) - sum(a))[0]!;
      expect(batch.choices[p]!.text).toBe(best.text);
    }
  });

  it("refuses best_of below n, outside 1..16, not an integer, or above n when streamed", async () => {
    for (const extra of [
      { n: 3, best_of: 2 },
      { best_of: 0 },
      { best_of: 17 },
      { best_of: 2.5 },
      { best_of: "2" },
      { best_of: 2, stream: true },
    ]) {
      const err = await gw.client.completions
        .create({ ...body, prompt: "hi", ...extra } as never)
        .then(
          () => null,
          (e: APIError) => e,
        );
      expect(err?.status, JSON.stringify(extra)).toBe(400);
      expect((err!.error as { param?: string }).param).toBe("best_of");
    }
  });
});
