// Disaggregated prefill (ADR 0029) over a real nats-server with JetStream: a decode gateway
// hands long prompts to a prefill gateway (a job on em.<ns>.<model>.prefill), which writes
// their blocks to the prefix cache's NATS tier; the decode gateway reads them back as a
// prefix hit and generates. The answers are compared with a gateway that computes alone.
import { fileURLToPath } from "node:url";
import { connect } from "@nats-io/transport-node";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import { RemotePrefixStore } from "../../src/engine/kv-remote.ts";
import { type GenerationRequest, GREEDY } from "../../src/gateway/engine.ts";
import {
  decodePrefillAnswer,
  encodePrefillJob,
  PrefillClient,
  PrefillWorker,
} from "../../src/gateway/prefill.ts";
import { readModelConfig } from "../../src/model/config.ts";
import { subjects } from "../../src/moe/subjects.ts";
import { runCli } from "../support/cli.ts";
import { testEnv, uniqueName, waitFor } from "../support/env.ts";
import { startDisaggregatedPair } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { holdable, samples, startGateway, type TestGateway } from "./helpers.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const B = 4;
/** Prompts lacking fewer tokens are computed by the decode gateway itself. */
const MIN_TOKENS = 16;
const LONG = [
  "In a quiet village by the sea, an old sailor said that the tide",
  "The committee met on Tuesday to discuss the budget for the bridge",
  "Once upon a time there was a small red fox who lived under a hill",
];
const bucketName = () => uniqueName("prefill").replace(/[^A-Za-z0-9_-]/g, "_");
const complete = (client: OpenAI, prompt: string, extra: Record<string, unknown> = {}) =>
  client.completions.create({
    model: "tiny",
    prompt,
    max_tokens: 8,
    temperature: 0,
    ignore_eos: true,
    ...extra,
  } as OpenAI.CompletionCreateParamsNonStreaming);
/** Whole blocks before the prompt's last token: what a full prefix hit gives. */
const wholeBlocks = (promptTokens: number) => Math.floor((promptTokens - 1) / B) * B;

let dir: string;
let reference: TestGateway;
/** The answers of a gateway that computes every prompt itself (no tiers, no offload). */
const expected = new Map<string, string>();
const expect8 = async (prompt: string) => {
  if (!expected.has(prompt))
    expected.set(prompt, (await complete(reference.client, prompt)).choices[0]!.text);
  return expected.get(prompt)!;
};
beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  reference = await startGateway(dir, { blockSize: B, prefixCaching: false });
});
afterAll(async () => {
  await reference?.close();
});

/**
 * In-process gateways of one model over one bucket: decode (with the client) and `workers`
 * prefill gateways (default 1; each with a runner `hold(i)` can stop).
 */
async function pair(o: { timeoutMs?: number; workers?: number } = {}) {
  const nc = await connect({ servers: testEnv().nats.url, name: uniqueName("disagg") });
  const bucket = bucketName();
  const subject = subjects.prefill({ namespace: "test", model: uniqueName("disagg") });
  const open = () =>
    RemotePrefixStore.open({
      nc,
      bucket,
      maxBytes: 8 * 2 ** 20,
      blockBytes: bytesPerBlock(readModelConfig(dir), B, "f32"),
      identity: { test: "disaggregation" },
      storage: "memory",
    });
  const dStore = await open();
  const client = new PrefillClient({
    nc,
    subject,
    store: dStore,
    minTokens: MIN_TOKENS,
    timeoutMs: o.timeoutMs ?? 30_000,
  });
  const decode = await startGateway(dir, {
    blockSize: B,
    prefixCacheRemote: dStore,
    prefillOffload: client,
  });
  const prefills = await Promise.all(
    Array.from({ length: o.workers ?? 1 }, async (_, i) => {
      let hold: ReturnType<typeof holdable> | null = null;
      const store = await open();
      const gateway = await startGateway(dir, {
        blockSize: B,
        prefixCacheRemote: store,
        wrap: (inner) => {
          hold = holdable(inner);
          return hold.runner;
        },
      });
      const worker = new PrefillWorker({
        nc,
        subject,
        id: `prefill-${i}`,
        engine: gateway.ctx.engine,
        fingerprint: store.fingerprint,
        vocabSize: gateway.ctx.vocabSize,
        maxModelLen: gateway.ctx.maxModelLen,
      });
      return { gateway, worker, hold: hold! as ReturnType<typeof holdable> };
    }),
  );
  return {
    nc,
    subject,
    client,
    decode,
    prefill: prefills[0]?.gateway ?? null,
    worker: prefills[0]?.worker ?? null,
    prefills,
    fingerprint: dStore.fingerprint,
    hold: () => prefills[0]!.hold,
    close: async () => {
      for (const p of prefills) p.hold.release();
      await Promise.all(prefills.map((p) => p.worker.close()));
      client.close();
      await Promise.all([decode.close(), ...prefills.map((p) => p.gateway.close())]);
      await nc.close();
    },
  };
}

describe("disaggregated prefill (ADR 0029)", () => {
  it("a long prompt is computed by the prefill gateway; the decode gateway reads its blocks and answers as if it computed it", async () => {
    const p = await pair();
    try {
      const want = await expect8(LONG[0]!);
      const got = await complete(p.decode.client, LONG[0]!);
      const P = got.usage!.prompt_tokens;
      expect(P).toBeGreaterThanOrEqual(MIN_TOKENS);
      expect(got.choices[0]!.text).toBe(want);
      // Every whole block came from the bucket: only the last token was computed here.
      expect(got.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      expect(p.decode.ctx.engine.stats.prefixRemote!.hitTokens).toBe(wholeBlocks(P));
      expect(p.client.stats).toMatchObject({ done: 1, noWorkers: 0, timeout: 0, failed: 0 });
      expect(p.client.stats.sharedBlocks).toBe(wholeBlocks(P) / B);
      expect(p.worker!.stats).toMatchObject({ done: 1, failed: 0, tokens: P, running: 0 });
      expect(p.decode.ctx.engine.stats.numPrefilling).toBe(0);

      // Short, or already cached here: computed here, no job.
      const short = await complete(p.decode.client, "Hi there");
      expect(short.usage!.prompt_tokens).toBeLessThan(MIN_TOKENS);
      expect(short.choices[0]!.text).toBe(await expect8("Hi there"));
      const again = await complete(p.decode.client, LONG[0]!);
      expect(again.choices[0]!.text).toBe(want);
      expect(p.client.stats.done).toBe(1);
      expect(p.worker!.stats.done).toBe(1);

      // Two choices of a new prompt: one job, both wait for it, both read its blocks.
      const two = await complete(p.decode.client, LONG[1]!, { n: 2 });
      const want1 = await expect8(LONG[1]!);
      expect(two.choices.map((c) => c.text)).toEqual([want1, want1]);
      expect(p.client.stats.done).toBe(2);
      expect(p.worker!.stats.done).toBe(2);
      expect(two.usage!.prompt_tokens_details?.cached_tokens).toBe(
        2 * wholeBlocks(two.usage!.prompt_tokens / 2),
      );

      // The metrics of both sides.
      const outcome = async (g: TestGateway, name: string, o: string) =>
        (await samples(`${g.url}/metrics`, name)).find((s) => s.labels["outcome"] === o)?.value;
      // (registered by the CLI; here by hand, as the CLI does)
      p.decode.ctx.metrics.addPrefill({ client: () => p.client.stats });
      p.prefill!.ctx.metrics.addPrefill({ worker: () => p.worker!.stats });
      expect(await outcome(p.decode, "expertmesh_gateway_prefill_remote_total", "done")).toBe(2);
      expect(await outcome(p.decode, "expertmesh_gateway_prefill_remote_total", "timeout")).toBe(0);
      expect(await outcome(p.prefill!, "expertmesh_gateway_prefill_jobs_total", "done")).toBe(2);
    } finally {
      await p.close();
    }
  });

  it("a request cancelled while its prompt is prefilled elsewhere ends quietly; the next is served", async () => {
    const p = await pair();
    try {
      p.hold().hold();
      const tokens = await p.decode.ctx.encoder.encode(LONG[2]!);
      const events: string[] = [];
      const req: GenerationRequest = {
        prompt: tokens,
        maxTokens: 4,
        sampling: GREEDY,
        stopTokenIds: [],
        logprobs: null,
        promptLogprobs: false,
      };
      const r = p.decode.ctx.engine.submit(req, {
        onToken: () => events.push("token"),
        onFinish: (why) => events.push(`finish ${why}`),
        onError: (e) => events.push(`error ${e}`),
      });
      expect(r.ok).toBe(true);
      await p.hold().entered;
      expect(p.decode.ctx.engine.stats.numPrefilling).toBe(1);
      expect(p.decode.ctx.engine.stats.numWaiting).toBe(0);
      if (r.ok) r.cancel();
      await waitFor("the cancelled request gone", async () =>
        p.decode.ctx.engine.stats.numPrefilling === 0 ? true : undefined,
      );
      // Its job is cancelled at the prefill gateway too, while that one's step still runs.
      await waitFor("the job cancelled there", async () =>
        p.worker!.stats.cancelled === 1 ? true : undefined,
      );
      expect(p.worker!.stats).toMatchObject({ done: 0, failed: 0, running: 0 });
      expect(p.client.stats).toMatchObject({ cancelled: 1, done: 0, failed: 0, pending: 0 });
      p.hold().release();
      // The prefill gateway drops the sequence after the step it was in.
      await waitFor("the prefill gateway idle", async () => {
        const s = p.prefill!.ctx.engine.stats;
        return s.numRunning === 0 && s.numWaiting === 0 ? true : undefined;
      });
      expect(events).toEqual([]);
      expect(p.decode.ctx.engine.stats).toMatchObject({ numWaiting: 0, numRunning: 0 });
      const next = await complete(p.decode.client, LONG[1]!);
      expect(next.choices[0]!.text).toBe(await expect8(LONG[1]!));
      expect(p.client.stats).toMatchObject({ cancelled: 1, done: 1 });
      expect(p.worker!.stats).toMatchObject({ cancelled: 1, done: 1 });
    } finally {
      p.hold().release();
      await p.close();
    }
  });

  it("without a prefill gateway, or past the timeout, the decode gateway computes the prompt itself", async () => {
    const alone = await pair({ workers: 0 });
    try {
      const got = await complete(alone.decode.client, LONG[2]!);
      expect(got.choices[0]!.text).toBe(await expect8(LONG[2]!));
      expect(got.usage!.prompt_tokens_details?.cached_tokens).toBe(0);
      expect(alone.client.stats).toMatchObject({ done: 0, noWorkers: 1 });
    } finally {
      await alone.close();
    }
    const slow = await pair({ timeoutMs: 300 });
    try {
      slow.hold().hold();
      const got = await complete(slow.decode.client, LONG[2]!);
      expect(got.choices[0]!.text).toBe(await expect8(LONG[2]!));
      expect(slow.client.stats).toMatchObject({ done: 0, timeout: 1 });
      // The decode gateway computed it: the prefill gateway's job is cancelled, not finished.
      await waitFor("the late job cancelled", async () =>
        slow.worker!.stats.cancelled === 1 ? true : undefined,
      );
      expect(slow.worker!.stats).toMatchObject({ done: 0, running: 0 });
    } finally {
      slow.hold().release();
      await slow.close();
    }
  });

  it("jobs go to the least loaded prefill gateway; one that vanished is forgotten", async () => {
    const p = await pair({ workers: 2 });
    const running = () => p.prefills.map((x) => x.worker.stats.running);
    try {
      await waitFor("both prefill gateways known", async () =>
        p.client.stats.workers === 2 ? true : undefined,
      );
      for (const x of p.prefills) x.hold.hold();
      const first = complete(p.decode.client, LONG[0]!);
      await waitFor("the first job running", async () =>
        running().includes(1) ? true : undefined,
      );
      // The second goes to the other one (random routing would pick the busy one half the time).
      const second = complete(p.decode.client, LONG[1]!);
      await waitFor("the second job running", async () =>
        running().every((n) => n === 1) ? true : undefined,
      );

      // A gateway that stopped without a word (its last report: idle) is the least loaded:
      // it is asked, does not answer (no responders), is forgotten, and the job goes to the
      // queue group (one of the two, busy as they are).
      p.nc.publish(`${p.subject}.load`, JSON.stringify({ id: "ghost-0", tokens: 0, jobs: 0 }));
      await waitFor("the ghost known", async () =>
        p.client.stats.workers === 3 ? true : undefined,
      );
      const third = complete(p.decode.client, LONG[2]!);
      await waitFor("the third job running", async () =>
        running().reduce((a, b) => a + b) === 3 ? true : undefined,
      );
      expect(p.client.stats.workers).toBe(2);
      for (const x of p.prefills) x.hold.release();
      const answers = await Promise.all([first, second, third]);
      for (const [k, a] of answers.entries())
        expect(a.choices[0]!.text).toBe(await expect8(LONG[k]!));
      expect(p.client.stats).toMatchObject({ done: 3, failed: 0, noWorkers: 0, timeout: 0 });
      expect(p.prefills.map((x) => x.worker.stats.done).sort()).toEqual([1, 2]);

      // A prefill gateway that stops says so: the decode gateway knows one.
      await p.prefills[0]!.worker.close();
      await waitFor("one prefill gateway known", async () =>
        p.client.stats.workers === 1 ? true : undefined,
      );
    } finally {
      await p.close();
    }
  });

  it("a prefill gateway answers malformed jobs and jobs of another fingerprint with their codes, and goes on", async () => {
    const p = await pair();
    const ask = async (data: Uint8Array) =>
      decodePrefillAnswer((await p.nc.request(p.subject, data, { timeout: 10_000 })).data);
    try {
      const bad = [
        new Uint8Array([1, 2, 3]),
        new TextEncoder().encode("EMPF\u0001garbage"),
        encodePrefillJob({
          fingerprint: p.fingerprint,
          cacheSalt: null,
          priority: 0,
          prompt: [1],
        }).slice(0, -2),
        encodePrefillJob({
          fingerprint: p.fingerprint,
          cacheSalt: null,
          priority: 0,
          prompt: [1, 2, 1 << 30],
        }),
      ];
      for (const data of bad)
        expect(await ask(data)).toMatchObject({ ok: false, code: "EM_PREFILL_FRAME" });
      expect(
        await ask(
          encodePrefillJob({ fingerprint: "other", cacheSalt: null, priority: 0, prompt: [5, 6] }),
        ),
      ).toMatchObject({ ok: false, code: "EM_PREFILL_MISMATCH" });
      expect(p.worker!.stats).toMatchObject({ done: 0, failed: bad.length + 1 });
      const got = await complete(p.decode.client, LONG[0]!);
      expect(got.choices[0]!.text).toBe(await expect8(LONG[0]!));
      expect(p.worker!.stats.done).toBe(1);
    } finally {
      await p.close();
    }
  });
});

describe("gateway processes with --disaggregation-mode", () => {
  it("decode hands long prompts to a prefill process over NATS, read back from the bucket", async () => {
    const bucket = bucketName();
    const modelName = uniqueName("disagg");
    const { decode, prefill } = await startDisaggregatedPair({
      modelDir: dir,
      modelName,
      bucket,
      blockSize: B,
      minTokens: MIN_TOKENS,
    });
    try {
      const got = await complete(decode.client, LONG[1]!);
      expect(got.choices[0]!.text).toBe(await expect8(LONG[1]!));
      expect(got.usage!.prompt_tokens_details?.cached_tokens).toBe(
        wholeBlocks(got.usage!.prompt_tokens),
      );
      const outcome = async (url: string, name: string, o: string) =>
        (await samples(`${url}/metrics`, name)).find((s) => s.labels["outcome"] === o)?.value;
      expect(await outcome(decode.url, "expertmesh_gateway_prefill_remote_total", "done")).toBe(1);
      expect(await outcome(prefill.url, "expertmesh_gateway_prefill_jobs_total", "done")).toBe(1);
      expect(prefill.log()).toContain("prefill gateway: computing prompts sent to");
    } finally {
      await Promise.all([decode.process.stop(), prefill.process.stop()]);
    }
  });

  it.each([
    [["--disaggregation-mode=decode"], "needs --prefix-cache-remote"],
    [["--disaggregation-mode=sideways"], "must be null, prefill or decode"],
    [["--disaggregation-min-tokens=8"], "needs --disaggregation-mode decode"],
    [
      [
        "--nats=nats://127.0.0.1:1",
        "--prefix-cache-remote=b",
        "--disaggregation-mode=prefill",
        "--disaggregation-timeout=5",
      ],
      "needs --disaggregation-mode decode",
    ],
  ])("refuses %j", async (flags, message) => {
    const run = await runCli(process.execPath, [
      mainTs,
      "gateway",
      `--model=${dir}`,
      "--local",
      ...flags,
    ]);
    expect(run.code).not.toBe(0);
    expect(run.stderr).toContain("EM_CLI_USAGE");
    expect(run.stderr).toContain(message);
  });
});
