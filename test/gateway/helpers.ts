// Gateways started in the test process on a tiny checkpoint: experts in process, or on
// shard processes over the test nats-server; and the official `openai` client for them.
import type { AddressInfo } from "node:net";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import type { FastifyInstance } from "fastify";
import OpenAI from "openai";
import type { Completion, CompletionCreateParamsNonStreaming } from "openai/resources/completions";
import type {
  Response,
  ResponseCreateParamsNonStreaming,
} from "openai/resources/responses/responses";
import { expect } from "vitest";
import { type ExpertRunner, LocalExperts } from "../../src/engine/experts.ts";
import { bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import { heldExperts, loadWeights, type ModelWeights } from "../../src/engine/loader.ts";
import { buildGatewayApp } from "../../src/gateway/app.ts";
import {
  GREEDY,
  runToEnd,
  type SamplingParams,
  type ServingEngine,
} from "../../src/gateway/engine.ts";
import type { ServeContext } from "../../src/gateway/jobs.ts";
import { createServeContext, type GatewayConfig, probeShards } from "../../src/gateway/server.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { Tokenizer } from "../../src/model/tokenizer.ts";
import { RemoteExperts } from "../../src/moe/dispatcher.ts";
import type { ManagedProcess } from "../env/process.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { type Cluster, metricsPort, native } from "../support/shards.ts";

export interface TestGateway {
  url: string;
  app: FastifyInstance;
  ctx: ServeContext;
  client: OpenAI;
  weights: ModelWeights;
  /** The dispatcher to the shards (distributed mode), e.g. for its retry count. */
  remote: RemoteExperts | null;
  /** What the gateway logged (requests that failed on its side). */
  logs: string[];
  close(): Promise<void>;
}

export interface TestGatewayOptions extends Partial<GatewayConfig> {
  /** Wraps the expert runner (e.g. to hold a step). */
  wrap?: (r: ExpertRunner) => ExpertRunner;
  apiKeys?: string[];
  maxRequestBytes?: number;
  /** Experts on these shards over NATS instead of in process. */
  cluster?: Cluster;
  responsesStore?: number;
  /** Access log lines (--log-requests) go to `logs` too. */
  logRequests?: boolean;
  /** A chat template in place of the tokenizer's (--chat-template). */
  chatTemplate?: string;
  /** The Files and Batch APIs (--files-dir, --files-max-bytes, --files-max-total, --batch-concurrency). */
  files?: { dir: string; maxBytes: number; maxTotalBytes?: number; batchConcurrency: number };
}

export async function startGateway(dir: string, o: TestGatewayOptions = {}): Promise<TestGateway> {
  const mtp = o.speculative?.method === "mtp";
  const ckpt = await Checkpoint.open(dir, { mtp });
  const weights = await loadWeights(ckpt, o.cluster ? "none" : "all", undefined, { mtp });
  let nc: NatsConnection | null = null;
  let remote: RemoteExperts | null = null;
  let experts: ExpertRunner;
  let ready: (() => Promise<boolean>) | undefined;
  if (o.cluster) {
    const conn = await connect({ servers: testEnv().nats.url });
    nc = conn;
    const ref = o.cluster.ref;
    remote = new RemoteExperts({
      nc: conn,
      model: ref,
      plan: o.cluster.plan,
      dispatchDtype: "f32",
      combineDtype: "f32",
    });
    experts = remote;
    const plan = o.cluster.plan;
    ready = async () => (await probeShards(conn, ref, plan, weights.config.hiddenSize, 500)).ready;
  } else {
    experts = new LocalExperts(native, heldExperts(weights));
  }
  if (o.wrap) experts = o.wrap(experts);
  const logs: string[] = [];
  // The test's own options apart, the rest is the gateway's configuration.
  const {
    wrap: _w,
    apiKeys: _k,
    maxRequestBytes: _b,
    cluster: _c,
    responsesStore: _s,
    logRequests: _l,
    files: _f,
    chatTemplate,
    ...cfg
  } = o;
  const ctx = createServeContext(weights, native, experts, Tokenizer.load(dir, chatTemplate), {
    servedModelName: "tiny",
    maxBatchTokens: 64,
    maxQueueDepth: 64,
    kvCacheBytes: 8 * 2 ** 20,
    ...cfg,
    log: (m) => logs.push(m),
  });
  const app = buildGatewayApp({
    ctx,
    ...(o.apiKeys ? { apiKeys: o.apiKeys } : {}),
    ...(o.maxRequestBytes ? { maxRequestBytes: o.maxRequestBytes } : {}),
    ...(o.responsesStore !== undefined ? { responsesStore: o.responsesStore } : {}),
    ...(o.files ? { files: o.files } : {}),
    ...(o.logRequests ? { logRequest: (line: string) => logs.push(line) } : {}),
    ...(ready ? { ready } : {}),
  });
  await app.listen({ port: 0, host: "127.0.0.1" });
  const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
  const client = new OpenAI({
    baseURL: `${url}/v1`,
    apiKey: o.apiKeys?.[0] ?? "none",
    maxRetries: 0,
  });
  return {
    url,
    app,
    ctx,
    client,
    weights,
    remote,
    logs,
    close: async () => {
      await app.close();
      await ctx.encoder.close();
      await ctx.engine.close();
      await nc?.close();
    },
  };
}

/**
 * Counts the tokens of each expert call (a wrap for startGateway): of one step, and with
 * `weights` only the first MoE layer's (one entry per step rather than per layer).
 */
export function stepTokens(weights?: ModelWeights) {
  const only = weights?.layers.findIndex((l) => l.moe);
  const rows: number[] = [];
  const wrap = (inner: ExpertRunner): ExpertRunner => ({
    run(layer, x, t, ...rest) {
      if (only === undefined || layer === only) rows.push(t);
      return inner.run(layer, x, t, ...rest);
    },
  });
  return { rows, wrap };
}

/** A gateway (startGateway) whose expert calls can be held: `hold` (holdable). */
export type HeldGateway = TestGateway & { hold: ReturnType<typeof holdable> };

export async function startHeldGateway(
  dir: string,
  o: TestGatewayOptions = {},
): Promise<HeldGateway> {
  let hold!: ReturnType<typeof holdable>;
  const g = await startGateway(dir, {
    ...o,
    wrap: (r) => {
      hold = holdable(o.wrap ? o.wrap(r) : r);
      return hold.runner;
    },
  });
  return Object.assign(g, { hold });
}

/**
 * A background response made on `g` (through `client`, g's own by default) with its expert
 * calls held: running, its first step waiting, once this resolves (`g.hold.release()` lets
 * it go on).
 */
export async function heldBackground(
  g: HeldGateway,
  request: Omit<ResponseCreateParamsNonStreaming, "background">,
  client: OpenAI = g.client,
): Promise<Response> {
  g.hold.hold();
  const running = await client.responses.create({ ...request, background: true });
  await g.hold.entered;
  return running;
}

/** An expert runner whose calls wait while `hold` is set; `entered` resolves on the first call held. */
export function holdable(inner: ExpertRunner) {
  let open: (() => void) | null = null;
  let gate: Promise<void> | null = null;
  /** hold() calls so far. */
  let holds = 0;
  const release = () => {
    gate = null;
    open?.();
  };
  let onEnter: (() => void) | null = null;
  const newEntered = () =>
    new Promise<void>((r) => {
      onEnter = r;
    });
  let entered = newEntered();
  const runner: ExpertRunner = {
    async run(...args) {
      if (gate) {
        onEnter?.();
        await gate;
      }
      return inner.run(...args);
    },
  };
  return {
    runner,
    /** Resolves on the first call held since the last hold(). */
    get entered() {
      return entered;
    },
    /** Holds the calls from now (a hold not yet released goes on: its calls wait still). */
    hold() {
      entered = newEntered();
      holds++;
      gate ??= new Promise((r) => {
        open = r;
      });
    },
    release,
    /** Releases the hold there is now in `ms` (not one made after it: a later test's). */
    releaseAfter(ms: number) {
      const held = holds;
      setTimeout(() => {
        if (holds === held) release();
      }, ms);
    },
  };
}

/** A metric's value from the Prometheus text (first sample without labels, or with `labels`). */
export async function metric(url: string, name: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "m").exec(text);
  if (!m) throw new Error(`metric ${name} not found`);
  return Number(m[1]);
}

/** Every sample of a metric in the Prometheus text at `url`, with its labels. */
export async function samples(
  url: string,
  name: string,
): Promise<{ labels: Record<string, string>; value: number }[]> {
  const text = await (await fetch(url)).text();
  const out: { labels: Record<string, string>; value: number }[] = [];
  for (const m of text.matchAll(new RegExp(`^${name}(?:\\{([^}]*)\\})? (\\S+)$`, "gm"))) {
    const labels = Object.fromEntries(
      [...(m[1] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((l) => [l[1]!, l[2]!]),
    );
    out.push({ labels, value: Number(m[2]) });
  }
  return out;
}

/** Requests the gateway at `url` finished with `reason` (stop, length, abort, error). */
export async function finishedRequests(url: string, reason: string): Promise<number> {
  const s = await samples(`${url}/metrics`, "expertmesh_gateway_request_success_total");
  return s.find((x) => x.labels["finished_reason"] === reason)?.value ?? 0;
}

/** Dispatch frames a shard process answered so far (its expertmesh_shard_frames_total). */
export async function shardFrames(shard: ManagedProcess): Promise<number> {
  const s = await samples(
    `http://127.0.0.1:${metricsPort(shard)}/metrics`,
    "expertmesh_shard_frames_total",
  );
  return s.reduce((n, x) => n + x.value, 0);
}

/**
 * Messages the test nats-server delivered so far to the open connection named `name` that
 * subscribes to `subject` (its /connz out_msgs); undefined when there is none.
 */
export async function natsDelivered(name: string, subject: string): Promise<number | undefined> {
  const connz = (await (
    await fetch(`${testEnv().nats.monitorUrl}/connz?subs=1&limit=4096`)
  ).json()) as {
    connections: { name?: string; out_msgs: number; subscriptions_list?: string[] }[];
  };
  return connz.connections.find(
    (c) => c.name === name && (c.subscriptions_list ?? []).includes(subject),
  )?.out_msgs;
}

/**
 * The preemption scenario: a KV cache of 64 tokens in blocks of 4 that cannot hold four
 * sequences of ~35 tokens. Asks four prompts one by one (no preemption), then all four at
 * once (the first step held until every request is queued), and checks the texts are the
 * same, that preemption happened and that the cache ends empty. `before` / `after` add
 * checks on the gateway after the one-by-one and the together runs.
 */
/**
 * The requests `start` sends, all in the scheduler at once: the first step is held (`h`)
 * until every one of them is waiting or running.
 */
export async function allAtOnce<T>(
  g: TestGateway,
  h: ReturnType<typeof holdable>,
  start: () => Promise<T>[],
): Promise<T[]> {
  h.hold();
  const requests = start();
  const together = Promise.all(requests);
  await waitFor(`all ${requests.length} requests to be queued`, async () =>
    (await metric(g.url, "expertmesh_gateway_num_requests_waiting")) +
      (await metric(g.url, "expertmesh_gateway_num_requests_running")) ===
    requests.length
      ? true
      : undefined,
  );
  h.release();
  return together;
}

export async function preemptionScenario(
  dir: string,
  opts: TestGatewayOptions,
  checks: { before?: (g: TestGateway) => void; after?: (g: TestGateway) => void } = {},
): Promise<void> {
  const config = (await Checkpoint.open(dir)).config;
  const g = await startHeldGateway(dir, {
    ...opts,
    maxModelLen: 64,
    blockSize: 4,
    // 16 blocks of 4 (an MTP layer's rows take a layer more per block).
    kvCacheBytes: 16 * bytesPerBlock(config, 4, "f32", opts.speculative?.method === "mtp" ? 1 : 0),
  });
  const h = g.hold;
  try {
    const prompts = ["one two", "three four five", "six", "seven eight nine ten"];
    const ask = (p: string) =>
      g.client.completions
        .create({ model: "tiny", prompt: p, max_tokens: 30, temperature: 0 })
        .then((r) => r.choices[0]!.text);
    const alone: string[] = [];
    for (const p of prompts) alone.push(await ask(p));
    expect(await metric(g.url, "expertmesh_gateway_num_preemptions")).toBe(0);
    checks.before?.(g);
    expect(await allAtOnce(g, h, () => prompts.map(ask))).toEqual(alone);
    expect(await metric(g.url, "expertmesh_gateway_num_preemptions")).toBeGreaterThan(0);
    checks.after?.(g);
    expect(await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")).toBe(0);
  } finally {
    h.release();
    await g.close();
  }
}

/** Prompts of different lengths for the batching tests (repeated to fill 24–32 requests). */
export const SEED_PROMPTS = [
  "The quick brown fox jumps over the lazy dog",
  "Hello",
  "In the beginning",
  "What is the capital of France? Tell me with all the details you know",
  "a b c d e f g",
  "To be or not to be",
  "1 2 3 4 5 6 7 8 9 10 11 12",
  "The weather today",
];

/**
 * Request `i` of a mixed greedy load: every third a chat, the others completions (every
 * other one with ignore_eos), of `maxTokens`; answered as "finish:completion tokens:text".
 */
export async function mixedGreedy(
  g: TestGateway,
  prompt: string,
  i: number,
  maxTokens: number,
): Promise<string> {
  if (i % 3 === 2) {
    const r = await g.client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: prompt }],
      max_tokens: maxTokens,
      temperature: 0,
    });
    return `${r.choices[0]!.finish_reason}:${r.usage!.completion_tokens}:${r.choices[0]!.message.content}`;
  }
  const r = await g.client.completions.create({
    model: "tiny",
    prompt,
    max_tokens: maxTokens,
    temperature: 0,
    ...(i % 2 === 0 ? ({ ignore_eos: true } as object) : {}),
  });
  return `${r.choices[0]!.finish_reason}:${r.usage!.completion_tokens}:${r.choices[0]!.text}`;
}

/** A streamed greedy chat answer's content, joined. */
export async function streamedChatText(
  g: TestGateway,
  content: string,
  maxTokens: number,
): Promise<string> {
  let text = "";
  const stream = await g.client.chat.completions.create({
    model: "tiny",
    messages: [{ role: "user", content }],
    max_tokens: maxTokens,
    temperature: 0,
    stream: true,
  });
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  return text;
}

/**
 * Expects two completions answers to say the same: texts, finish reasons, usage, and per
 * choice the same tokens with the same logprobs (to 4 places) and top-logprob candidates.
 */
export function expectSameCompletions(got: Completion, want: Completion): void {
  expect(got.choices.map((c) => [c.text, c.finish_reason])).toEqual(
    want.choices.map((c) => [c.text, c.finish_reason]),
  );
  expect(got.usage).toEqual(want.usage);
  for (const [k, c] of got.choices.entries()) {
    const w = want.choices[k]!.logprobs!;
    expect(c.logprobs!.tokens).toEqual(w.tokens);
    c.logprobs!.token_logprobs!.forEach((lp, j) => {
      expect(lp).toBeCloseTo(w.token_logprobs![j]!, 4);
    });
    expect(c.logprobs!.top_logprobs!.map((t) => Object.keys(t!).sort())).toEqual(
      w.top_logprobs!.map((t) => Object.keys(t!).sort()),
    );
  }
}

/** Output ids of `prompt` straight from an engine (EOS ignored; greedy unless `sampling`). */
export async function engineIds(
  engine: ServingEngine,
  prompt: number[],
  maxTokens: number,
  sampling: SamplingParams = GREEDY,
): Promise<number[]> {
  const req = { prompt, maxTokens, sampling, stopTokenIds: [] };
  return (await runToEnd(engine, { ...req, logprobs: null, promptLogprobs: false })).ids;
}

/** A prompt that repeats itself (prompt lookup finds matches from the first output token on). */
export const LOOP_PROMPT = "one two three four one two three four one two three four one two";

/** Seeded sampling settings of the speculative tests: penalties, top-p/k and logit_bias. */
export const SEEDED_BODIES: readonly Record<string, unknown>[] = [
  { temperature: 0.8, top_p: 0.95, seed: 7 },
  { temperature: 1.0, top_k: 12, seed: 11, frequency_penalty: 0.5, presence_penalty: 0.3 },
  { temperature: 0.7, seed: 3, logit_bias: { "101": 4, "32": 2 } },
];

/**
 * Each of `bodies` as a completions request with n 2 and logprobs (body i on LOOP_PROMPT
 * when odd, else SEED_PROMPTS[i]), sent to both gateways at once: the same answers.
 */
export async function expectSameSeededCompletions(
  want: TestGateway,
  got: TestGateway,
  bodies: readonly Record<string, unknown>[],
  o: { maxTokens: number; logprobs: number },
): Promise<void> {
  for (const [i, b] of bodies.entries()) {
    const req = {
      model: "tiny",
      prompt: i % 2 ? LOOP_PROMPT : SEED_PROMPTS[i]!,
      max_tokens: o.maxTokens,
      n: 2,
      logprobs: o.logprobs,
      ...b,
    } as CompletionCreateParamsNonStreaming;
    const [x, y] = await Promise.all([
      want.client.completions.create(req),
      got.client.completions.create(req),
    ]);
    expectSameCompletions(y, x);
  }
}

/** A json_schema response_format: {"n": [integers]} (the speculative tests' structured answer). */
export const NUMBERS_FORMAT = {
  type: "json_schema" as const,
  json_schema: {
    name: "n",
    schema: {
      type: "object",
      properties: { n: { type: "array", items: { type: "integer" } } },
      required: ["n"],
    },
  },
};

/**
 * How a client call ended: its refusal (an SDK error: status, and the param and code the
 * gateway named), or {status: 200}.
 */
export async function refusalOf(p: Promise<unknown>) {
  return (await p.then(
    () => ({ status: 200 }),
    (e: unknown) => e,
  )) as { status: number; param?: string; code?: string };
}
