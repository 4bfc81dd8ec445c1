// The KV cache's storage dtype (`gateway --kv-cache-dtype`, spec.gateway.kvCache.dtype):
// gateways started in this process on the tiny V3 checkpoint with bf16 and fp8 rows,
// driven by the official `openai` client. Smaller rows mean more tokens in the same bytes;
// batching and paging must not change what the quantized cache gives: a gateway's
// concurrent outputs equal one sequence at a time through generate() with the same dtype.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generate } from "../../src/engine/generate.ts";
import { kvRowBytes } from "../../src/engine/kv-format.ts";
import { GREEDY, runToEnd } from "../../src/gateway/engine.ts";
import { Tokenizer } from "../../src/model/tokenizer.ts";
import { localModel, tinyCheckpointFor } from "../support/golden.ts";
import { native } from "../support/shards.ts";
import { mixedGreedy, SEED_PROMPTS, samples, startGateway, type TestGateway } from "./helpers.ts";

const BYTES = 2 * 2 ** 20;

let dir: string;
let f32: TestGateway;
let bf16: TestGateway;
let fp8: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  const o = { maxBatchTokens: 32, kvCacheBytes: BYTES, blockSize: 4 };
  f32 = await startGateway(dir, o);
  bf16 = await startGateway(dir, { ...o, kvCacheDtype: "bf16" });
  fp8 = await startGateway(dir, { ...o, kvCacheDtype: "fp8" });
});
afterAll(async () => {
  await f32?.close();
  await bf16?.close();
  await fp8?.close();
});

async function capacity(g: TestGateway) {
  const s = await samples(`${g.url}/metrics`, "expertmesh_gateway_kv_cache_capacity_tokens");
  expect(s).toHaveLength(1);
  return { dtype: s[0]!.labels["dtype"], tokens: s[0]!.value };
}

describe("KV cache dtype", () => {
  it("smaller rows hold more tokens in the same bytes (the capacity metric says how many)", async () => {
    const c = f32.weights.config;
    const per = (d: "f32" | "bf16" | "fp8") =>
      kvRowBytes(d, c.kvLoraRank, c.qkRopeHeadDim) * c.numHiddenLayers * 4;
    const want = (d: "f32" | "bf16" | "fp8") => Math.floor(BYTES / per(d)) * 4;
    expect(await capacity(f32)).toEqual({ dtype: "f32", tokens: want("f32") });
    expect(await capacity(bf16)).toEqual({ dtype: "bf16", tokens: want("bf16") });
    expect(await capacity(fp8)).toEqual({ dtype: "fp8", tokens: want("fp8") });
    // Tiny rows (32 + 8): fp8 is 32 codes + 4 bytes of scale + 16 bytes of bf16 rope.
    expect(want("fp8") / want("f32")).toBeGreaterThan(2.9);
  });

  it("a budget only smaller rows fit: f32 is refused with the way out, fp8 serves", async () => {
    const c = f32.weights.config;
    // 256 tokens (the context) of fp8 rows: too few bytes for 256 of f32.
    const bytes = 256 * kvRowBytes("fp8", c.kvLoraRank, c.qkRopeHeadDim) * c.numHiddenLayers;
    await expect(startGateway(dir, { kvCacheBytes: bytes, maxModelLen: 256 })).rejects.toThrow(
      expect.objectContaining({
        code: "EM_KV_BUDGET",
        message: expect.stringMatching(/--kv-cache-dtype bfloat16 or fp8/),
      }),
    );
    const g = await startGateway(dir, {
      kvCacheBytes: bytes,
      maxModelLen: 256,
      kvCacheDtype: "fp8",
    });
    try {
      const r = await g.client.completions.create({
        model: "tiny",
        prompt: "Hello",
        max_tokens: 4,
        temperature: 0,
      });
      expect(r.usage!.completion_tokens).toBeGreaterThan(0);
    } finally {
      await g.close();
    }
  });

  it.each([
    ["bf16", () => bf16],
    ["fp8", () => fp8],
  ] as const)(
    "%s: a batch of sequences in shared blocks = each alone through generate()",
    async (d, gateway) => {
      const g = gateway();
      const tokenizer = Tokenizer.load(dir);
      const prompts = SEED_PROMPTS.map((p) => tokenizer.encode(p));
      const maxTokens = 12;
      const batched = await Promise.all(
        prompts.map(
          async (prompt) =>
            (
              await runToEnd(g.ctx.engine, {
                prompt,
                maxTokens,
                sampling: GREEDY,
                stopTokenIds: [],
                logprobs: null,
                promptLogprobs: false,
              })
            ).ids,
        ),
      );
      const { model } = await localModel(dir, native);
      for (const [i, prompt] of prompts.entries()) {
        const { tokens } = await generate(model, prompt, { maxTokens, kvCacheDtype: d });
        expect(batched[i]).toEqual(tokens);
      }
    },
  );

  it("fp8: concurrent requests through the client get what they get one at a time", async () => {
    const prompts = SEED_PROMPTS.slice(0, 9);
    const together = await Promise.all(prompts.map((p, i) => mixedGreedy(fp8, p, i, 10)));
    const alone: string[] = [];
    for (const [i, p] of prompts.entries()) alone.push(await mixedGreedy(fp8, p, i, 10));
    expect(together).toEqual(alone);
    expect(together.every((t) => t.split(":")[1] !== "0")).toBe(true);
  });
});
