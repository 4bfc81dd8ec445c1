// Two micro-batches in flight (`gateway --micro-batches 2`) against one: gateways started
// in this process on the tiny V3 checkpoint with their routed experts on 2 shard processes
// over the test nats-server, driven by the official `openai` client. Greedy outputs must be
// the same; the scheduler's bookkeeping (preemption, cancellation) must stay right.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExpertRunner } from "../../src/engine/experts.ts";
import { waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, startShards, stopAll } from "../support/shards.ts";
import {
  finishedRequests,
  metric,
  mixedGreedy,
  preemptionScenario,
  SEED_PROMPTS,
  startGateway,
  type TestGateway,
} from "./helpers.ts";

/** Counts the expert calls in flight at once (the real runner does the work). */
function inFlight(inner: ExpertRunner) {
  const s = { now: 0, max: 0, calls: 0 };
  const runner: ExpertRunner = {
    async run(...args) {
      s.calls++;
      s.max = Math.max(s.max, ++s.now);
      try {
        return await inner.run(...args);
      } finally {
        s.now--;
      }
    },
  };
  return { runner, s };
}

let dir: string;
let cluster: Cluster | undefined;
let one: TestGateway;
let two: TestGateway;
let oneCalls: ReturnType<typeof inFlight>["s"];
let twoCalls: ReturnType<typeof inFlight>["s"];

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  cluster = await startShards(dir, 2);
  // A small step budget: concurrent prompts are split into chunks and mixed with decodes.
  one = await startGateway(dir, {
    cluster,
    maxBatchTokens: 24,
    wrap: (r) => {
      const c = inFlight(r);
      oneCalls = c.s;
      return c.runner;
    },
  });
  two = await startGateway(dir, {
    cluster,
    maxBatchTokens: 24,
    microBatches: 2,
    wrap: (r) => {
      const c = inFlight(r);
      twoCalls = c.s;
      return c.runner;
    },
  });
});
afterAll(async () => {
  await one?.close();
  await two?.close();
  await stopAll(cluster);
});

const user = (content: string) => [{ role: "user" as const, content }];
/** vLLM's extra body parameter (the openai client sends unknown fields as they are). */
const ignoreEos: object = { ignore_eos: true };

const seeds = SEED_PROMPTS;

describe("two micro-batches in flight", () => {
  it("rejects other counts", async () => {
    await expect(startGateway(dir, { microBatches: 3 })).rejects.toThrow(/micro-batches/);
  });

  it("24 concurrent greedy requests give the same text as with one micro-batch", async () => {
    const prompts = Array.from(
      { length: 24 },
      (_, i) => `${seeds[i % 8]}${i >= 8 ? ` (${i})` : ""}`,
    );
    // Completions and chats, with and without ignore_eos, of different lengths.
    const ask = (g: TestGateway, p: string, i: number) => mixedGreedy(g, p, i, 4 + 3 * (i % 7));
    const alone: string[] = [];
    for (const [i, p] of prompts.entries()) alone.push(await ask(one, p, i));
    const callsBefore = twoCalls.calls;
    const splitBefore = two.ctx.engine.numSplitSteps;
    const [withOne, withTwo] = await Promise.all([
      Promise.all(prompts.map((p, i) => ask(one, p, i))),
      Promise.all(prompts.map((p, i) => ask(two, p, i))),
    ]);
    expect(withOne).toEqual(alone);
    expect(withTwo).toEqual(withOne);
    // The second gateway did split its steps, and both halves' expert calls were in flight
    // at once; the first never had two.
    expect(two.ctx.engine.numSplitSteps).toBeGreaterThan(splitBefore);
    expect(twoCalls.calls).toBeGreaterThan(callsBefore);
    expect(twoCalls.max).toBe(2);
    expect(oneCalls.max).toBe(1);
    expect(one.ctx.engine.numSplitSteps).toBe(0);
    for (const g of [one, two]) {
      expect(await metric(g.url, "expertmesh_gateway_num_requests_running")).toBe(0);
      expect(await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")).toBe(0);
    }
  });

  it("streams the same text as with one micro-batch", async () => {
    const body = (content: string) => ({
      model: "tiny",
      messages: user(content),
      max_tokens: 20,
      temperature: 0,
      stream: true as const,
    });
    const collect = async (g: TestGateway, content: string) => {
      let text = "";
      for await (const chunk of await g.client.chat.completions.create(body(content)))
        text += chunk.choices[0]?.delta?.content ?? "";
      return text;
    };
    const prompts = seeds.slice(0, 6);
    const [a, b] = await Promise.all([
      Promise.all(prompts.map((p) => collect(one, p))),
      Promise.all(prompts.map((p) => collect(two, p))),
    ]);
    expect(b).toEqual(a);
    expect(a.every((t) => t.length > 0)).toBe(true);
  });

  it("preempts and recomputes when the cache is full, with the same text", async () => {
    await preemptionScenario(
      dir,
      { cluster, microBatches: 2 },
      {
        before: (g) => expect(g.ctx.engine.numSplitSteps).toBe(0),
        after: (g) => expect(g.ctx.engine.numSplitSteps).toBeGreaterThan(0),
      },
    );
  });

  it("a client that disconnects frees its blocks; the other half goes on unchanged", async () => {
    const keep = {
      model: "tiny",
      messages: user("Tell me a long story"),
      max_tokens: 40,
      temperature: 0,
      ...ignoreEos,
    };
    const want = (await one.client.chat.completions.create(keep)).choices[0]!.message.content;
    const abortedBefore = await finishedRequests(two.url, "abort");
    const splitBefore = two.ctx.engine.numSplitSteps;
    const ac = new AbortController();
    const leaving = (async () => {
      const stream = await two.client.chat.completions.create(
        {
          model: "tiny",
          messages: user("Keep talking"),
          max_tokens: 200,
          temperature: 0,
          stream: true,
          ...ignoreEos,
        },
        { signal: ac.signal },
      );
      let chunks = 0;
      try {
        for await (const _ of stream) if (++chunks === 5) ac.abort();
      } catch {
        // The client may end the iteration with an abort error or quietly.
      }
      return chunks;
    })();
    const staying = two.client.chat.completions.create(keep);
    expect(await leaving).toBe(5);
    const r = await staying;
    expect(r.choices[0]!.message.content).toBe(want);
    expect(r.usage!.completion_tokens).toBe(40);
    expect(two.ctx.engine.numSplitSteps).toBeGreaterThan(splitBefore);
    await waitFor("the server to see the disconnect and free the blocks", async () =>
      (await finishedRequests(two.url, "abort")) === abortedBefore + 1 &&
      (await metric(two.url, "expertmesh_gateway_num_requests_running")) === 0 &&
      (await metric(two.url, "expertmesh_gateway_kv_cache_usage_perc")) === 0
        ? true
        : undefined,
    );
  });
});
