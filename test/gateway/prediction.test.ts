// OpenAI's predicted outputs (`prediction`, engine.ts + speculative.ts PredictionDrafter)
// through the official `openai` client, on a gateway that does not speculate otherwise: the
// answer is the same as without a prediction (greedy, seeded sampling, a JSON grammar, n
// choices, streamed), in fewer engine steps when the prediction is the answer or an edit of
// it, and the usage counts the prediction's tokens kept and not.
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let g: TestGateway;
/**
 * A request whose answer is digits and spaces only (allowed_token_ids): text that encodes
 * back to the very tokens the model wrote (no merge joins digits), as a real model's text
 * does. The random model's free text often does not (bytes of a character split over
 * tokens come back as U+FFFD), so a prediction of it matches it less.
 */
let digits: typeof ask & { allowed_token_ids: number[] };

beforeAll(async () => {
  g = await startGateway(await tinyCheckpointFor("tiny-v3"), { maxBatchTokens: 256 });
  digits = { ...ask, allowed_token_ids: g.ctx.tokenizer.encode("0123456789 ", false) };
});
afterAll(async () => {
  await g?.close();
});

type Details = { accepted_prediction_tokens?: number; rejected_prediction_tokens?: number };
const ask = {
  model: "tiny",
  messages: [{ role: "user" as const, content: "Repeat the list: one two three four" }],
  max_tokens: 40,
  temperature: 0,
};

/** A request's answer and the engine steps it took (run alone). */
async function run(body: object) {
  const before = g.ctx.engine.numSteps;
  const r = await g.client.chat.completions.create(
    body as OpenAI.ChatCompletionCreateParamsNonStreaming,
  );
  return { r, steps: g.ctx.engine.numSteps - before };
}

const predicted = (content: string) => ({ type: "content" as const, content });

describe("predicted outputs", () => {
  it("the answer predicted whole: the same answer in a fraction of the steps, its tokens counted as accepted", async () => {
    const plain = await run(digits);
    const text = plain.r.choices[0]!.message.content!;
    expect(text).toMatch(/^[0-9 ]+$/);
    expect(plain.steps).toBeGreaterThanOrEqual(40); // (a step a token)
    expect(plain.r.usage?.completion_tokens_details).toBeUndefined();
    const fast = await run({ ...digits, prediction: predicted(text) });
    expect(fast.r.choices).toEqual(plain.r.choices);
    // The prompt's step gives the first token; then drafts of 8, all kept, 9 tokens a step
    // (10, 19, 28, 37), and the last draft stops short of max_tokens (2, then the 40th).
    expect(fast.steps).toBe(6);
    const d = fast.r.usage!.completion_tokens_details as Details;
    expect(d).toEqual({ accepted_prediction_tokens: 8 * 4 + 2, rejected_prediction_tokens: 0 });
    expect(fast.r.usage!.completion_tokens).toBe(40);
    // As parts, the same.
    const parts = await run({
      ...digits,
      prediction: { type: "content", content: [{ type: "text", text }] },
    });
    expect(parts.r.choices).toEqual(plain.r.choices);
    // Free text of this random model: the same answer, in fewer steps still.
    const free = await run(ask);
    const freeFast = await run({
      ...ask,
      prediction: predicted(free.r.choices[0]!.message.content!),
    });
    expect(freeFast.r.choices).toEqual(free.r.choices);
    expect(freeFast.steps).toBeLessThan(free.steps);
  });

  it("an edit of the answer (a word changed in the middle): the same answer, still few steps", async () => {
    const plain = await run(digits);
    const text = plain.r.choices[0]!.message.content!;
    const mid = Math.floor(text.length / 2);
    const edited = `${text.slice(0, mid)} 5555 ${text.slice(mid + 3)}`;
    const r = await run({ ...digits, prediction: predicted(edited) });
    expect(r.r.choices).toEqual(plain.r.choices);
    expect(r.steps).toBeLessThan(plain.steps / 2);
    const d = r.r.usage!.completion_tokens_details as Details;
    expect(d.accepted_prediction_tokens).toBeGreaterThan(0);
    expect(d.rejected_prediction_tokens).toBeGreaterThan(0);
  });

  it("a prediction unlike the answer changes nothing but the count", async () => {
    const plain = await run(ask);
    const r = await run({ ...ask, prediction: predicted("zq zq zq zq zq zq zq zq zq zq") });
    expect(r.r.choices).toEqual(plain.r.choices);
    const d = r.r.usage!.completion_tokens_details as Details;
    expect(d.accepted_prediction_tokens).toBe(0);
    // (an empty prediction is none)
    const none = await run({ ...ask, prediction: predicted("") });
    expect(none.r.usage?.completion_tokens_details).toBeUndefined();
  });

  it("the same answers with seeded sampling and n choices, under a JSON grammar, and streamed", async () => {
    const sampled = { ...ask, temperature: 1, seed: 11, n: 2 };
    const plain = await run(sampled);
    const withPrediction = await run({
      ...sampled,
      prediction: predicted(plain.r.choices[0]!.message.content!),
    });
    expect(withPrediction.r.choices).toEqual(plain.r.choices);
    const json = { ...ask, response_format: { type: "json_object" } };
    const plainJson = await run(json);
    const predictedJson = await run({
      ...json,
      prediction: predicted(plainJson.r.choices[0]!.message.content!),
    });
    expect(predictedJson.r.choices).toEqual(plainJson.r.choices);
    expect(predictedJson.steps).toBeLessThan(plainJson.steps);
    let streamed = "";
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of await g.client.chat.completions.create({
      ...ask,
      prediction: predicted(plainJson.r.choices[0]!.message.content!),
      stream: true,
      stream_options: { include_usage: true },
    })) {
      streamed += chunk.choices[0]?.delta.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    expect(streamed).toBe((await run(ask)).r.choices[0]!.message.content);
    expect(usage?.completion_tokens_details).toHaveProperty("accepted_prediction_tokens");
  });

  it("refuses a prediction that is not content (400)", async () => {
    const err = await g.client.chat.completions
      .create({
        ...ask,
        prediction: { type: "other", content: "x" },
      } as unknown as OpenAI.ChatCompletionCreateParamsNonStreaming)
      .catch((e: unknown) => e as { status: number });
    expect(err).toMatchObject({ status: 400 });
  });
});
