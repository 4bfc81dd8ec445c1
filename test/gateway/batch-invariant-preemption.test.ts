// Batch invariance through preemption (ADR 0027): a gateway in this process on the CPU
// backend's batch-invariant kernels (the addon configured so, as `--batch-invariant` does),
// with a KV cache of 24 blocks of 4 tokens. Four requests of 30 + 30 tokens alone, then all
// four at once: they do not fit together, so sequences are preempted and recomputed (prompt
// and output so far in one chunk, where they were prefilled in 30 and decoded a token at a
// time; prefix caching off, so that nothing is read back instead), and every request must
// still answer with the same tokens and logprobs, bit for bit.
// With the default kernels a recomputed chunk of 33 tokens or more (the tiny dims) takes the multi-head
// form and the logprobs move (checked: this file fails without the configure call).
import { rmSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import { loadAddon } from "../../src/engine/native.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { allAtOnce, type HeldGateway, metric, startHeldGateway } from "./helpers.ts";

let dir: string;
let g: HeldGateway;

beforeAll(async () => {
  expect(loadAddon().configure({ batchInvariant: true }).cpu.batchInvariant).toBe(true);
  dir = await tinyCheckpointFor("tiny-v3");
  const config = (await Checkpoint.open(dir)).config;
  g = await startHeldGateway(dir, {
    maxModelLen: 64,
    blockSize: 4,
    // Off: a preempted sequence would find its own blocks in the prefix cache instead of
    // recomputing them.
    prefixCaching: false,
    kvCacheBytes: 24 * bytesPerBlock(config, 4, "f32", 0),
  });
});

afterAll(async () => {
  await g?.close();
  loadAddon().configure({});
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("batch invariance through preemption", () => {
  it("answers preempted and recomputed requests as it answers them alone", async () => {
    // Prompts of 30 tokens: prefilled alone in one chunk of 30 (under the multi-head form's
    // 32), recomputed with their output so far in chunks of 31 or more.
    const prompts = [1, 2, 3, 4].map((seed) =>
      Array.from({ length: 30 }, (_, i) => 20 + ((i * 7 + seed * 31) % 200)),
    );
    const ask = async (prompt: number[]) => {
      const r = await g.client.completions.create({
        model: "tiny",
        prompt,
        max_tokens: 30,
        temperature: 0,
        logprobs: 0,
      });
      const lp = r.choices[0]!.logprobs!;
      return { text: r.choices[0]!.text, logprobs: lp.token_logprobs };
    };
    const alone = [];
    for (const p of prompts) alone.push(await ask(p));
    expect(await metric(g.url, "expertmesh_gateway_num_preemptions")).toBe(0);
    // All four in the scheduler at once: they do not fit the cache together.
    expect(await allAtOnce(g, g.hold, () => prompts.map(ask))).toEqual(alone);
    expect(await metric(g.url, "expertmesh_gateway_num_preemptions")).toBeGreaterThan(0);
  });
});
