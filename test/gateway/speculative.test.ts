// Speculative decoding by prompt lookup (`gateway --speculative-tokens K`) against the same
// gateway without it: gateways started in this process on the tiny V3 checkpoint, driven by
// the official `openai` client. Speculation must change nothing but the steps: the same
// greedy texts, the same seeded samples (penalties, logit_bias, min_tokens and logprobs
// included), the same under preemption and prefix caching, while drafts are accepted.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BatchForward } from "../../src/engine/batch.ts";
import { LocalExperts } from "../../src/engine/experts.ts";
import { BlockKvCache } from "../../src/engine/kv-blocks.ts";
import { heldExperts } from "../../src/engine/loader.ts";
import type { Drafter, NgramConfig } from "../../src/engine/speculative.ts";
import { GREEDY, runToEnd, ServingEngine } from "../../src/gateway/engine.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, native, startShards, stopAll } from "../support/shards.ts";
import {
  engineIds,
  expectSameSeededCompletions,
  LOOP_PROMPT,
  metric,
  mixedGreedy,
  NUMBERS_FORMAT,
  preemptionScenario,
  SEED_PROMPTS,
  SEEDED_BODIES,
  startGateway,
  streamedChatText,
  type TestGateway,
} from "./helpers.ts";

const SPEC: NgramConfig = { numTokens: 4, maxN: 3, minN: 1 };

let dir: string;
let plain: TestGateway;
let spec: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  plain = await startGateway(dir, { maxBatchTokens: 32 });
  spec = await startGateway(dir, { maxBatchTokens: 32, speculative: SPEC });
});
afterAll(async () => {
  await plain?.close();
  await spec?.close();
});

const user = (content: string) => [{ role: "user" as const, content }];
/** vLLM's extra body parameters (the openai client sends unknown fields as they are). */
const extra = (o: object): object => o;
const specStats = () => spec.ctx.engine.stats;

/** Greedy output ids of `prompt` straight from a gateway's engine (EOS ignored). */
const generate = (g: TestGateway, prompt: number[], maxTokens: number) =>
  engineIds(g.ctx.engine, prompt, maxTokens);

describe("speculative decoding (ngram)", () => {
  it("refuses bad settings", async () => {
    await expect(
      startGateway(dir, { speculative: { numTokens: 0, maxN: 3, minN: 1 } }),
    ).rejects.toThrow(/speculative tokens/);
    await expect(
      startGateway(dir, { speculative: { numTokens: 4, maxN: 1, minN: 2 } }),
    ).rejects.toThrow(/must not exceed prompt-lookup-max/);
  });

  it("greedy: 24 concurrent requests give the texts of the gateway without it", async () => {
    const prompts = Array.from({ length: 24 }, (_, i) =>
      i % 4 === 3 ? LOOP_PROMPT : `${SEED_PROMPTS[i % 8]}${i >= 8 ? ` (${i})` : ""}`,
    );
    const ask = (g: TestGateway, p: string, i: number) => mixedGreedy(g, p, i, 6 + 7 * (i % 6));
    const before = specStats();
    const [a, b] = await Promise.all([
      Promise.all(prompts.map((p, i) => ask(plain, p, i))),
      Promise.all(prompts.map((p, i) => ask(spec, p, i))),
    ]);
    expect(b).toEqual(a);
    const after = specStats();
    expect(after.specDrafts).toBeGreaterThan(before.specDrafts);
    expect(after.specAcceptedTokens).toBeGreaterThan(before.specAcceptedTokens);
    expect(after.specAcceptedTokens - before.specAcceptedTokens).toBeLessThan(
      after.specDraftTokens - before.specDraftTokens,
    );
    for (const g of [plain, spec]) {
      expect(await metric(g.url, "expertmesh_gateway_num_requests_running")).toBe(0);
      expect(await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")).toBe(0);
    }
    expect(await metric(spec.url, "expertmesh_gateway_spec_decode_num_accepted_tokens_total")).toBe(
      after.specAcceptedTokens,
    );
  });

  it("seeded sampling: the same tokens and logprobs, penalties, bias and min_tokens included", async () => {
    // The tiny tokenizer's EOS and a frequent byte token as extra stop tokens; a bias
    // towards one token makes drafts of it likely to be accepted.
    const bodies = [
      ...SEEDED_BODIES,
      {
        temperature: 0.9,
        seed: 5,
        ...extra({ min_tokens: 20, stop_token_ids: [32] }),
        logit_bias: { "32": 3 },
      },
    ];
    const before = specStats();
    await expectSameSeededCompletions(plain, spec, bodies, { maxTokens: 40, logprobs: 3 });
    expect(specStats().specAcceptedTokens).toBeGreaterThan(before.specAcceptedTokens);
  });

  it("streams the same chat text", async () => {
    const collect = (g: TestGateway, content: string) => streamedChatText(g, content, 30);
    const prompts = [LOOP_PROMPT, ...SEED_PROMPTS.slice(0, 4)];
    const [a, b] = await Promise.all([
      Promise.all(prompts.map((p) => collect(plain, p))),
      Promise.all(prompts.map((p) => collect(spec, p))),
    ]);
    expect(b).toEqual(a);
  });

  it("under an output grammar, drafts follow it: the same JSON, with drafts accepted", async () => {
    // An array of integers with "[", "1" and "," favoured: the output repeats itself, so
    // the lookup proposes, and drafts run under the grammar's mask row by row (whitespace
    // first, then a long run of 1s).
    const id = (text: string) => spec.ctx.tokenizer.encode(text, false)[0]!;
    const req = {
      model: "tiny",
      messages: user("Numbers"),
      max_tokens: 48,
      temperature: 0,
      logit_bias: { [id("1")]: 12, [id(",")]: 11, [id("[")]: 10 },
      response_format: NUMBERS_FORMAT,
    };
    const before = specStats();
    const x = await plain.client.chat.completions.create(req);
    const y = await spec.client.chat.completions.create(req);
    expect(y.choices[0]!.message.content).toBe(x.choices[0]!.message.content);
    expect(y.choices[0]!.finish_reason).toBe(x.choices[0]!.finish_reason);
    expect(x.choices[0]!.message.content).toMatch(/\[1111/);
    expect(specStats().specAcceptedTokens).toBeGreaterThan(before.specAcceptedTokens);
    // JSON mode too, and tool calls (required): the same outputs.
    for (const extra of [
      { response_format: { type: "json_object" as const } },
      {
        tools: [
          {
            type: "function" as const,
            function: {
              name: "f",
              parameters: { type: "object", properties: { a: { type: "integer" } } },
            },
          },
        ],
        tool_choice: "required" as const,
      },
    ]) {
      const body = {
        model: "tiny",
        messages: user("A cat"),
        max_tokens: 40,
        temperature: 0,
        ...extra,
      };
      const [p, q] = await Promise.all([
        plain.client.chat.completions.create(body),
        spec.client.chat.completions.create(body),
      ]);
      // Call ids are random per response: compared without them.
      const bare = (m: (typeof p.choices)[0]["message"]) => ({
        ...m,
        tool_calls: m.tool_calls?.map(({ id: _, ...c }) => c),
      });
      expect(bare(q.choices[0]!.message)).toEqual(bare(p.choices[0]!.message));
    }
  });

  it("a prompt that continues an earlier answer finds its accepted draft rows in the prefix cache", async () => {
    // The first answer's blocks, filled partly by accepted drafts, are registered; the
    // follow-up's prompt is that prompt and answer (as token ids), so all its whole
    // blocks come from those rows, and it goes on as without speculation.
    const prompt = spec.ctx.tokenizer.encode(LOOP_PROMPT);
    const acceptedBefore = specStats().specAcceptedTokens;
    const first = await generate(spec, prompt, 48);
    expect(first).toEqual(await generate(plain, prompt, 48));
    // Drafts were accepted in the first answer.
    expect(specStats().specAcceptedTokens).toBeGreaterThan(acceptedBefore);
    const follow = [...prompt, ...first];
    const hitsBefore = specStats().prefixHitTokens;
    expect(await generate(spec, follow, 24)).toEqual(await generate(plain, follow, 24));
    expect(specStats().prefixHitTokens - hitsBefore).toBe(
      Math.floor((follow.length - 1) / 16) * 16,
    );
  });

  it("preempts and recomputes when the cache is full, with the same text", async () => {
    await preemptionScenario(
      dir,
      { speculative: SPEC },
      { after: (g) => expect(g.ctx.engine.stats.specDrafts).toBeGreaterThan(0) },
    );
  });
});

describe("draft length per sequence", () => {
  /** An engine over the plain gateway's weights whose drafter is `drafter`. */
  const engineWith = (drafter: (prompt: readonly number[]) => Drafter) => {
    const w = plain.weights;
    const forward = new BatchForward(w, native, new LocalExperts(native, heldExperts(w)));
    return new ServingEngine(
      forward,
      new BlockKvCache(w.config, { memoryBytes: 8 * 2 ** 20 }),
      { maxBatchTokens: 64, maxRunning: 8, maxQueueDepth: 8 },
      { speculative: { numTokens: 4, drafter } },
    );
  };
  const run = async (e: ServingEngine, prompt: number[]) =>
    (
      await runToEnd(e, {
        prompt,
        maxTokens: 40,
        sampling: GREEDY,
        stopTokenIds: [],
        logprobs: null,
        promptLogprobs: false,
      })
    ).ids;

  it("shrinks while drafts are rejected and stays whole while they are accepted", async () => {
    const prompt = plain.ctx.tokenizer.encode(SEED_PROMPTS[0]!);
    const want = await generate(plain, prompt, 40);
    const P = prompt.length;
    // Always right: the known continuation. Always wrong: a token other than the next.
    const right = engineWith(() => ({
      propose: (seq, k) => want.slice(seq.numTokens - P, seq.numTokens - P + k),
    }));
    const wrong = engineWith(() => ({
      propose: (seq, k) =>
        Array.from({ length: k }, (_, j) => ((want[seq.numTokens - P + j] ?? 0) + 1) % 320),
    }));
    expect(await run(right, prompt)).toEqual(want);
    expect(await run(wrong, prompt)).toEqual(want);
    const r = right.stats;
    const w = wrong.stats;
    // Right: every draft whole (4, the last ones cut by max_tokens), all accepted.
    expect(r.specAcceptedTokens).toBe(r.specDraftTokens);
    expect(r.specDraftTokens).toBeGreaterThanOrEqual(4 * (r.specDrafts - 3));
    // Wrong: 4, 2, then 1 token per draft, none accepted.
    expect(w.specAcceptedTokens).toBe(0);
    expect(w.specDraftTokens).toBe(4 + 2 + (w.specDrafts - 2));
  });
});

describe("speculative decoding with experts on shard processes and two micro-batches", () => {
  let cluster: Cluster | undefined;
  afterAll(async () => {
    await stopAll(cluster);
  });

  it("gives the greedy texts of the in-process gateway without it", async () => {
    cluster = await startShards(dir, 2);
    const g = await startGateway(dir, {
      cluster,
      maxBatchTokens: 24,
      microBatches: 2,
      speculative: SPEC,
    });
    try {
      const prompts = [LOOP_PROMPT, ...SEED_PROMPTS];
      const ask = (gw: TestGateway, p: string) =>
        gw.client.completions
          .create({ model: "tiny", prompt: p, max_tokens: 24, temperature: 0 })
          .then((r) => r.choices[0]!.text);
      const want: string[] = [];
      for (const p of prompts) want.push(await ask(plain, p));
      expect(await Promise.all(prompts.map((p) => ask(g, p)))).toEqual(want);
      expect(g.ctx.engine.stats.specAcceptedTokens).toBeGreaterThan(0);
      expect(g.ctx.engine.numSplitSteps).toBeGreaterThan(0);
    } finally {
      await g.close();
    }
  });
});
