// MTP speculative decoding (`gateway --speculative-method mtp`, ADR 0012) against the same
// gateway without it, on the tiny V3 checkpoint with an MTP layer, through the official
// `openai` client. The MTP layer's random weights guess almost nothing, so these tests show
// that drafting changes nothing but the steps; an MTP layer whose weights copy its input
// token (built below) shows drafts accepted exactly where the output repeats a token.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Weight } from "../../src/engine/backend.ts";
import { BatchForward } from "../../src/engine/batch.ts";
import type { ExpertRunner } from "../../src/engine/experts.ts";
import { LocalExperts } from "../../src/engine/experts.ts";
import { BlockKvCache } from "../../src/engine/kv-blocks.ts";
import { heldExperts, type MlpWeights, type ModelWeights } from "../../src/engine/loader.ts";
import { GREEDY, type SamplingParams, ServingEngine } from "../../src/gateway/engine.ts";
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

let dir: string;
let plain: TestGateway;
let mtp: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3-mtp");
  plain = await startGateway(dir, { maxBatchTokens: 32 });
  mtp = await startGateway(dir, { maxBatchTokens: 32, speculative: { method: "mtp" } });
});
afterAll(async () => {
  await plain?.close();
  await mtp?.close();
});

const stats = () => mtp.ctx.engine.stats;

describe("MTP speculative decoding", () => {
  it("refuses a model without an MTP layer (EM_CKPT_NO_MTP)", async () => {
    const v3 = await tinyCheckpointFor("tiny-v3");
    await expect(startGateway(v3, { speculative: { method: "mtp" } })).rejects.toMatchObject({
      code: "EM_CKPT_NO_MTP",
    });
  });

  it("greedy: 16 concurrent requests give the texts of the gateway without it, one draft token per decode step", async () => {
    const prompts = Array.from({ length: 16 }, (_, i) =>
      i % 4 === 3 ? LOOP_PROMPT : `${SEED_PROMPTS[i % 8]}${i >= 8 ? ` (${i})` : ""}`,
    );
    const ask = (g: TestGateway, p: string, i: number) => mixedGreedy(g, p, i, 6 + 7 * (i % 5));
    const before = stats();
    const [a, b] = await Promise.all([
      Promise.all(prompts.map((p, i) => ask(plain, p, i))),
      Promise.all(prompts.map((p, i) => ask(mtp, p, i))),
    ]);
    expect(b).toEqual(a);
    const after = stats();
    expect(after.specDrafts - before.specDrafts).toBeGreaterThan(50);
    expect(after.specDraftTokens - before.specDraftTokens).toBe(
      after.specDrafts - before.specDrafts,
    );
    expect(after.specMtpFailures).toBe(0);
    expect(await metric(mtp.url, "expertmesh_gateway_spec_decode_num_drafts_total")).toBe(
      after.specDrafts,
    );
    expect(await metric(mtp.url, "expertmesh_gateway_kv_cache_usage_perc")).toBe(0);
  });

  it("seeded sampling: the same tokens and logprobs, penalties and bias included", async () => {
    await expectSameSeededCompletions(plain, mtp, SEEDED_BODIES, { maxTokens: 32, logprobs: 2 });
  });

  it("streams the same chat text", async () => {
    const collect = (g: TestGateway, content: string) => streamedChatText(g, content, 24);
    const prompts = [LOOP_PROMPT, ...SEED_PROMPTS.slice(0, 3)];
    const [a, b] = await Promise.all([
      Promise.all(prompts.map((p) => collect(plain, p))),
      Promise.all(prompts.map((p) => collect(mtp, p))),
    ]);
    expect(b).toEqual(a);
  });

  it("chained drafts of 3 with random weights: the same texts as without speculation, JSON schema included", async () => {
    const g = await startGateway(dir, {
      maxBatchTokens: 32,
      speculative: { method: "mtp", numTokens: 3 },
    });
    try {
      const prompts = [LOOP_PROMPT, ...SEED_PROMPTS];
      const ask = (gw: TestGateway, p: string, i: number) => mixedGreedy(gw, p, i, 10 + 5 * i);
      const [a, b] = await Promise.all([
        Promise.all(prompts.map((p, i) => ask(plain, p, i))),
        Promise.all(prompts.map((p, i) => ask(g, p, i))),
      ]);
      expect(b).toEqual(a);
      // Under an output grammar too: drafts cut at the first token it refuses.
      const json = {
        model: "tiny",
        messages: [{ role: "user" as const, content: "Numbers" }],
        max_tokens: 40,
        temperature: 0,
        response_format: NUMBERS_FORMAT,
      };
      const [x, y] = await Promise.all([
        plain.client.chat.completions.create(json),
        g.client.chat.completions.create(json),
      ]);
      expect(y.choices[0]!.message.content).toBe(x.choices[0]!.message.content);
      expect(y.choices[0]!.finish_reason).toBe(x.choices[0]!.finish_reason);
      const s = g.ctx.engine.stats;
      expect(s.specDrafts).toBeGreaterThan(20);
      // Nothing accepted: lengths shrink to 1 after the first wholly rejected draft.
      expect(s.specDraftTokens).toBeLessThan(2 * s.specDrafts);
      expect(s.specDraftTokens).toBeGreaterThan(s.specDrafts);
    } finally {
      await g.close();
    }
  });

  it("a follow-up prompt takes its blocks (the MTP layer's rows with them) from the prefix cache", async () => {
    const prompt = mtp.ctx.tokenizer.encode(LOOP_PROMPT);
    const first = await engineIds(mtp.ctx.engine, prompt, 40);
    expect(first).toEqual(await engineIds(plain.ctx.engine, prompt, 40));
    const follow = [...prompt, ...first];
    const hitsBefore = stats().prefixHitTokens;
    expect(await engineIds(mtp.ctx.engine, follow, 24)).toEqual(
      await engineIds(plain.ctx.engine, follow, 24),
    );
    expect(stats().prefixHitTokens - hitsBefore).toBe(Math.floor((follow.length - 1) / 16) * 16);
  });

  it("preempts and recomputes when the cache is full, with the same text (chained drafts reserving ahead)", async () => {
    await preemptionScenario(
      dir,
      { speculative: { method: "mtp", numTokens: 3 } },
      { after: (g) => expect(g.ctx.engine.stats.specDrafts).toBeGreaterThan(0) },
    );
  });

  it("an MTP step that fails costs only drafts: the same text, the failure counted", async () => {
    // The MTP layer's experts (layer 4) fail; the main layers' run.
    const failing = (r: ExpertRunner): ExpertRunner => ({
      run: (layer, ...rest) =>
        layer === 4 ? Promise.reject(new Error("shard of layer 4 gone")) : r.run(layer, ...rest),
    });
    const g = await startGateway(dir, { speculative: { method: "mtp" }, wrap: failing });
    try {
      const prompt = g.ctx.tokenizer.encode(SEED_PROMPTS[0]!);
      expect(await engineIds(g.ctx.engine, prompt, 20)).toEqual(
        await engineIds(plain.ctx.engine, prompt, 20),
      );
      expect(g.ctx.engine.stats.specMtpFailures).toBeGreaterThan(0);
      expect(g.ctx.engine.stats.specDrafts).toBe(0);
      expect(await metric(g.url, "expertmesh_gateway_spec_decode_mtp_failures_total")).toBe(
        g.ctx.engine.stats.specMtpFailures,
      );
    } finally {
      await g.close();
    }
  });
});

describe("MTP drafts with experts on shard processes (plan --mtp)", () => {
  let cluster: Cluster | undefined;
  afterAll(async () => {
    await stopAll(cluster);
  });

  it("the shards hold the MTP layer's experts too; the greedy texts of the in-process gateway without it", async () => {
    cluster = await startShards(dir, 2, { mtp: true });
    expect(cluster.plan.moeLayers).toEqual([1, 2, 3, 4]);
    const g = await startGateway(dir, {
      cluster,
      maxBatchTokens: 24,
      microBatches: 2,
      speculative: { method: "mtp" },
    });
    try {
      const prompts = [LOOP_PROMPT, ...SEED_PROMPTS.slice(0, 5)];
      const ask = (gw: TestGateway, p: string) =>
        gw.client.completions
          .create({ model: "tiny", prompt: p, max_tokens: 20, temperature: 0 })
          .then((r) => r.choices[0]!.text);
      const want: string[] = [];
      for (const p of prompts) want.push(await ask(plain, p));
      expect(await Promise.all(prompts.map((p) => ask(g, p)))).toEqual(want);
      const s = g.ctx.engine.stats;
      expect(s.specDrafts).toBeGreaterThan(20);
      expect(s.specMtpFailures).toBe(0);
    } finally {
      await g.close();
    }
  });
});

describe("an MTP layer that copies its input token", () => {
  /**
   * The loaded MTP layer rewired to predict the token it is given: eh_proj keeps the
   * normed embedding and drops the hidden state, attention and experts add nothing (zero
   * o_proj and down_proj), and the head is the embedding table, whose row for a token
   * scores highest against that token's own embedding.
   */
  function copying(w: ModelWeights): ModelWeights {
    const m = w.mtp!;
    const D = w.config.hiddenSize;
    const f32 = (rows: number, cols: number, data = new Float32Array(rows * cols)): Weight => ({
      dtype: "f32",
      data,
      rows,
      cols,
    });
    const eh = new Float32Array(D * 2 * D);
    for (let i = 0; i < D; i++) eh[i * 2 * D + i] = 1;
    const silent = (x: MlpWeights): MlpWeights => ({ ...x, down: f32(x.down.rows, x.down.cols) });
    const moe = m.layer.moe!;
    const o = m.layer.attention.o;
    return {
      ...w,
      mtp: {
        ...m,
        ehProj: f32(D, 2 * D, eh),
        head: m.embed,
        layer: {
          ...m.layer,
          attention: { ...m.layer.attention, o: f32(o.rows, o.cols) },
          moe: {
            ...moe,
            experts: new Map([...moe.experts].map(([e, x]) => [e, silent(x)])),
            shared: moe.shared && silent(moe.shared),
          },
        },
      },
    };
  }

  /** An engine over the copying layer, drafting `numTokens` per step. */
  const copyEngine = (numTokens: number) => {
    const w = copying(mtp.weights);
    return new ServingEngine(
      new BatchForward(w, native, new LocalExperts(native, heldExperts(w))),
      new BlockKvCache(w.config, { memoryBytes: 8 * 2 ** 20, extraLayers: 1 }),
      { maxBatchTokens: 64, maxRunning: 8, maxQueueDepth: 8 },
      { speculative: { method: "mtp", numTokens } },
    );
  };

  /**
   * Drafts of up to K copies of the last token, chained: a step with last token o[i] keeps
   * the draft's first a tokens where o[i + 1..i + a] all equal o[i]; the sequence's draft
   * length halves after a draft with nothing accepted and doubles (up to K) after one
   * accepted whole, and never reaches past the last token to generate.
   */
  function expectedChained(
    o: readonly number[],
    K: number,
  ): { drafts: number; tokens: number; accepted: number } {
    let drafts = 0;
    let tokens = 0;
    let accepted = 0;
    let L = K;
    for (let i = 0; i < o.length - 1; ) {
      const k = Math.min(L, o.length - i - 2);
      if (k <= 0) {
        i++;
        continue;
      }
      let a = 0;
      while (a < k && o[i + 1 + a] === o[i]) a++;
      drafts++;
      tokens += k;
      accepted += a;
      i += a + 1;
      if (a === 0) L = Math.max(1, L >> 1);
      else if (a === k) L = Math.min(K, L * 2);
    }
    return { drafts, tokens, accepted };
  }

  // The first prompt's output never repeats a token (every draft rejected); a bias towards
  // token 101 makes the second end in a long run of it (most drafts accepted). Drafts of 3
  // chain the layer on its own output (and its guess), 3 deep while they are accepted.
  it.each([1, 3])(
    "drafts of %i: accepted exactly as far as the output repeats its last token",
    async (K) => {
      const engine = copyEngine(K);
      const biased: SamplingParams = { ...GREEDY, logitBias: [[101, 2]] };
      let last = { drafts: 0, tokens: 0, accepted: 0 };
      for (const [text, sampling] of [
        [SEED_PROMPTS[0]!, GREEDY],
        [SEED_PROMPTS[3]!, biased],
      ] as const) {
        const prompt = plain.ctx.tokenizer.encode(text);
        const want = await engineIds(plain.ctx.engine, prompt, 40, sampling);
        const before = engine.stats;
        expect(await engineIds(engine, prompt, 40, sampling)).toEqual(want);
        const after = engine.stats;
        last = {
          drafts: after.specDrafts - before.specDrafts,
          tokens: after.specDraftTokens - before.specDraftTokens,
          accepted: after.specAcceptedTokens - before.specAcceptedTokens,
        };
        expect(last).toEqual(expectedChained(want, K));
      }
      expect(last.accepted).toBeGreaterThan(5);
      // Chained, the run of 101s is taken 3 at a time: more than one token per draft.
      if (K > 1) expect(last.accepted).toBeGreaterThan(last.drafts);
    },
  );
});
