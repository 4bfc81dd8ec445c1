// `gateway --batch-invariant` (ADR 0027): a request's greedy tokens and logprobs are the same
// bits alone and among other requests, however the scheduler chunks its prompt (the step's
// token budget is shared with the others' chunks and decodes) and whatever prefix of it the
// cache already holds; and a token's logprob is the same decoded as prefilled (prompt_logprobs
// of the prompt and the output). Real gateway processes on the tiny V3 checkpoint, the official
// `openai` client; one with its experts in the process (--local), one over NATS with shards of
// redundant experts (a token's copy chosen by its own activations, copyHash).
//
// Without --batch-invariant none of this holds in general: a prompt chunk of 32 tokens or more
// takes MLA's multi-head form, fewer the absorbed one, and the two sum in other orders (checked:
// this file fails with the flag removed).
import { rmSync } from "node:fs";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readModelConfig } from "../../src/model/config.ts";
import { type GatewayProcess, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, startShards, stopAll } from "../support/shards.ts";

let dir: string;
let vocab: number;
let cluster: Cluster | undefined;
const gateways: Record<string, GatewayProcess> = {};

/** n token ids from a fixed LCG (seed), in [16, vocab). */
function tokens(n: number, seed: number): number[] {
  const out: number[] = [];
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out.push(16 + (s % (vocab - 16)));
  }
  return out;
}

// A step runs 64 tokens: a 150-token prompt alone is prefilled in chunks of 64, 64 and 22;
// among others its chunks fall elsewhere.
const FLAGS = ["--batch-invariant", "--max-batch-tokens=64"];

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  vocab = readModelConfig(dir).vocabSize;
  gateways["local"] = await startGatewayProcess({
    modelDir: dir,
    namespace: "inv",
    modelName: "local",
    args: FLAGS,
  });
  cluster = await startShards(dir, 2, { redundant: 2, args: ["--batch-invariant"] });
  gateways["distributed"] = await startGatewayProcess({
    modelDir: dir,
    planPath: cluster.planPath,
    namespace: "test",
    modelName: cluster.modelName,
    args: FLAGS,
  });
}, 120_000);

afterAll(async () => {
  for (const g of Object.values(gateways)) await g.process.stop(3000);
  await stopAll(cluster);
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Answer {
  tokens: number[];
  logprobs: number[];
}

/** Completion of `prompt` (token ids), greedy unless `seed`: its tokens and their logprobs. */
async function complete(
  client: OpenAI,
  prompt: number[],
  o: { maxTokens?: number; salt?: string; seed?: number } = {},
): Promise<Answer> {
  const r = await client.completions.create({
    model: "tiny",
    prompt,
    max_tokens: o.maxTokens ?? 16,
    ...(o.seed === undefined ? { temperature: 0 } : { temperature: 1, seed: o.seed }),
    logprobs: 0,
    // vLLM's: the output as token ids, so no text round trip can blur them
    return_tokens_as_token_ids: true,
    // vLLM's: this request shares cached prompt blocks only with others of its salt
    ...(o.salt ? { cache_salt: o.salt } : {}),
  } as unknown as OpenAI.CompletionCreateParamsNonStreaming);
  const lp = r.choices[0]!.logprobs!;
  return {
    tokens: lp.tokens!.map((t) => Number(t.replace(/^token_id:/, ""))),
    logprobs: lp.token_logprobs!,
  };
}

describe.each(["local", "distributed"])("gateway --batch-invariant (%s experts)", (mode) => {
  const client = () => gateways[mode]!.client;
  const subject = () => tokens(150, 1);

  it("answers a request alone, among others, and after a cached prefix, bit for bit", async () => {
    // Each under its own cache salt, so that none reads the rows another one computed.
    const alone = await complete(client(), subject(), { salt: "alone" });
    expect(alone.tokens).toHaveLength(16);
    // Among others sent first: the subject's chunks share steps with their prefills and
    // decodes, wherever those fall.
    const others = [
      complete(client(), tokens(20, 2), { maxTokens: 24 }),
      complete(client(), tokens(90, 3), { maxTokens: 8 }),
      complete(client(), tokens(40, 4), { maxTokens: 12 }),
    ];
    const among = await complete(client(), subject(), { salt: "among" });
    await Promise.all(others);
    expect(among).toEqual(alone);
    // After another request with the subject's first 100 tokens: their 96 in whole blocks
    // come from the cache, and the rest is one chunk of 54 (alone: 64 and 22).
    await complete(client(), [...subject().slice(0, 100), ...tokens(20, 5)], {
      salt: "warm",
      maxTokens: 1,
    });
    const warm = await complete(client(), subject(), { salt: "warm" });
    expect(warm).toEqual(alone);
  });

  it("samples the same tokens with a seed, alone and among others", async () => {
    const alone = await complete(client(), subject(), { salt: "seed-alone", seed: 7 });
    const others = [
      complete(client(), tokens(60, 12), { maxTokens: 20, seed: 1 }),
      complete(client(), tokens(110, 13), { maxTokens: 6 }),
    ];
    const among = await complete(client(), subject(), { salt: "seed-among", seed: 7 });
    await Promise.all(others);
    expect(among).toEqual(alone);
  });

  it("gives a token the same logprob decoded as prefilled", async () => {
    const prompt = tokens(100, 9);
    const decoded = await complete(client(), prompt, { salt: "decoded" });
    // The prompt and the output as one prompt: prefilled in chunks of 64, the output's tokens
    // among the prompt's.
    const r = await client().completions.create({
      model: "tiny",
      prompt: [...prompt, ...decoded.tokens],
      max_tokens: 1,
      temperature: 0,
      prompt_logprobs: 0,
      cache_salt: "prefilled",
    } as unknown as OpenAI.CompletionCreateParamsNonStreaming);
    const entries = (
      r.choices[0] as unknown as {
        prompt_logprobs: (Record<string, { logprob: number }> | null)[];
      }
    ).prompt_logprobs;
    const prefilled = decoded.tokens.map((t, i) => entries[prompt.length + i]![String(t)]!.logprob);
    expect(prefilled).toEqual(decoded.logprobs);
  });
});
