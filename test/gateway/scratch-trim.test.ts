// The gateway gives the native engine's scratch caches back after a quiet time
// (src/engine/scratch-trim.ts): a step of many tokens leaves its large arrays cached (the
// /metrics gauge expertmesh_native_scratch_bytes shows them), and once nothing has run for
// scratchTrimMs they are freed (the gauge reads 0, the log says how much). The tiny model's
// arrays pass the cache's 1 MiB floor only in a step of thousands of tokens: 16 prompts of
// 240 tokens (one request's batch) in one step of up to 4096.
import { rmSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { metric, startGateway, type TestGateway } from "./helpers.ts";

let dir: string;
let gw: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  gw = await startGateway(dir, {
    maxBatchTokens: 4096,
    maxQueueDepth: 64,
    kvCacheBytes: 64 * 2 ** 20,
    scratchTrimMs: 1500,
  });
});

afterAll(async () => {
  await gw?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("native scratch trimming", () => {
  it("frees the cached scratch once the gateway has been quiet", async () => {
    const prompt = (i: number) =>
      Array.from({ length: 240 }, (_, t) => 20 + ((t * 7 + i * 13) % 200));
    // One request with a batch of 16 prompts: admitted together, prefilled in one step.
    const batch = (from: number) => Array.from({ length: 16 }, (_, i) => prompt(from + i));
    await gw.client.completions.create({ model: "tiny", prompt: batch(0), max_tokens: 2 });
    const cached = await metric(gw.url, "expertmesh_native_scratch_bytes");
    expect(cached).toBeGreaterThanOrEqual(2 ** 20);
    // Quiet for the trim time (checked every 375 ms), then some.
    await sleep(3000);
    expect(await metric(gw.url, "expertmesh_native_scratch_bytes")).toBe(0);
    expect(gw.logs.some((l) => /idle for 1\.5 s: freed \d+ MiB of native scratch/.test(l))).toBe(
      true,
    );
    // Work again caches again.
    await gw.client.completions.create({ model: "tiny", prompt: batch(50), max_tokens: 1 });
    expect(await metric(gw.url, "expertmesh_native_scratch_bytes")).toBeGreaterThanOrEqual(2 ** 20);
  });
});
