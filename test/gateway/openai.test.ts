// The gateway against the official `openai` client: a gateway started in this process on
// the tiny V3 checkpoint with its experts in process (and, at the end, on 2 shard
// processes over NATS). Greedy decoding makes outputs comparable across runs.
import { setTimeout as sleep } from "node:timers/promises";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, startShards, stopAll } from "../support/shards.ts";
import {
  holdable,
  metric,
  preemptionScenario,
  SEED_PROMPTS,
  startGateway,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let gw: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  // A small step budget so concurrent prompts are split into chunks and mixed with decodes.
  gw = await startGateway(dir, { maxBatchTokens: 24 });
});
afterAll(async () => gw?.close());

const user = (content: string) => [{ role: "user" as const, content }];

describe("chat completions", () => {
  it("answers with a message, finish reason and usage", async () => {
    const r = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Hello there, how are you?"),
      max_tokens: 10,
      temperature: 0,
    });
    expect(r.object).toBe("chat.completion");
    expect(r.model).toBe("tiny");
    expect(r.choices).toHaveLength(1);
    const c = r.choices[0]!;
    expect(c.message.role).toBe("assistant");
    expect(typeof c.message.content).toBe("string");
    expect(["stop", "length"]).toContain(c.finish_reason);
    const prompt = gw.ctx.tokenizer.encodeChat(user("Hello there, how are you?"), true);
    expect(r.usage).toEqual({
      prompt_tokens: prompt.length,
      completion_tokens: r.usage!.completion_tokens,
      total_tokens: prompt.length + r.usage!.completion_tokens,
    });
    if (c.finish_reason === "length") expect(r.usage!.completion_tokens).toBe(10);
  });

  it("streams the same text as the non-streamed answer, with usage at the end", async () => {
    const body = {
      model: "tiny",
      messages: user("The quick brown fox"),
      max_tokens: 16,
      temperature: 0,
    };
    const whole = await gw.client.chat.completions.create(body);
    const stream = await gw.client.chat.completions.create({ ...body, stream: true });
    let text = "";
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    let roles = 0;
    for await (const chunk of stream) {
      expect(chunk.object).toBe("chat.completion.chunk");
      for (const ch of chunk.choices) {
        if (ch.delta.role) roles++;
        text += ch.delta.content ?? "";
        if (ch.finish_reason) finish = ch.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    expect(roles).toBe(1);
    expect(text).toBe(whole.choices[0]!.message.content);
    expect(finish).toBe(whole.choices[0]!.finish_reason);
    expect(usage).toEqual(whole.usage);
  });

  it("gives n choices, logprobs and top_logprobs; a seed repeats a sampled answer", async () => {
    const body = {
      model: "tiny",
      messages: user("Tell me a story"),
      max_tokens: 8,
      temperature: 0.9,
      top_p: 0.95,
      top_k: 50,
      seed: 1234,
      n: 2,
      presence_penalty: 0.5,
      frequency_penalty: 0.5,
      logprobs: true,
      top_logprobs: 3,
    };
    const a = await gw.client.chat.completions.create(body);
    const b = await gw.client.chat.completions.create(body);
    expect(a.choices.map((c) => c.index)).toEqual([0, 1]);
    expect(b.choices.map((c) => c.message.content)).toEqual(
      a.choices.map((c) => c.message.content),
    );
    for (const c of a.choices) {
      const content = c.logprobs!.content!;
      expect(content.length).toBeGreaterThan(0);
      for (const t of content) {
        expect(t.logprob).toBeLessThanOrEqual(0);
        expect(t.top_logprobs).toHaveLength(3);
        expect(t.top_logprobs[0]!.logprob).toBeGreaterThanOrEqual(t.top_logprobs[2]!.logprob);
      }
    }
    expect(a.usage!.completion_tokens).toBe(
      a.choices.reduce((s, c) => s + c.logprobs!.content!.length, 0),
    );
  });

  it("cuts the text at a stop string", async () => {
    const body = { model: "tiny", messages: user("Hi"), max_tokens: 24, temperature: 0 };
    const full = (await gw.client.chat.completions.create(body)).choices[0]!.message.content!;
    const stop = full.slice(3, 5);
    expect(stop.length).toBe(2);
    const cut = await gw.client.chat.completions.create({ ...body, stop: [stop] });
    expect(cut.choices[0]!.message.content).toBe(full.slice(0, full.indexOf(stop)));
    expect(cut.choices[0]!.finish_reason).toBe("stop");
  });
});

describe("completions", () => {
  it("ignore_eos (vLLM's extra parameter) generates past the end-of-sequence token", async () => {
    const ask = (prompt: string, extra: object = {}) =>
      gw.client.completions.create({
        model: "tiny",
        prompt,
        max_tokens: 40,
        temperature: 0,
        logprobs: 0,
        ...extra,
      });
    // A prompt whose greedy continuation ends with EOS before max_tokens (the tiny model's
    // weights are fixed, so which ones do is too).
    let ended: { prompt: string; text: string; tokens: number } | undefined;
    for (const i of [6, 37, 61, 115, 119, 138, 171]) {
      const prompt = `word ${i} and ${i * 7}`;
      const r = await ask(prompt);
      if (r.choices[0]!.finish_reason === "stop") {
        ended = { prompt, text: r.choices[0]!.text, tokens: r.usage!.completion_tokens };
        break;
      }
    }
    expect(ended, "no prompt of the list ends with EOS: pick others").toBeDefined();
    expect(ended!.tokens).toBeLessThan(40);
    const r = await ask(ended!.prompt, { ignore_eos: true });
    expect(r.choices[0]!.finish_reason).toBe("length");
    expect(r.usage!.completion_tokens).toBe(40);
    expect(r.choices[0]!.text.startsWith(ended!.text)).toBe(true);
    // The token after the stopped text is the EOS token itself.
    const eos = gw.ctx.tokenizer.eosTokenId!;
    expect(r.choices[0]!.logprobs!.tokens![ended!.tokens]).toBe(gw.ctx.tokenizer.decode([eos]));
  });

  it("echoes the prompt with its logprobs, then the completion's", async () => {
    const prompt = "The cat sat on the mat";
    const r = await gw.client.completions.create({
      model: "tiny",
      prompt,
      max_tokens: 5,
      temperature: 0,
      logprobs: 2,
      echo: true,
    });
    const c = r.choices[0]!;
    expect(c.text.startsWith(prompt)).toBe(true);
    const ids = gw.ctx.tokenizer.encode(prompt);
    const lp = c.logprobs!;
    expect(r.usage).toEqual({
      prompt_tokens: ids.length,
      completion_tokens: 5,
      total_tokens: ids.length + 5,
    });
    expect(lp.tokens).toHaveLength(ids.length + 5);
    expect(lp.token_logprobs![0]).toBeNull();
    expect(lp.top_logprobs![0]).toBeNull();
    for (const v of lp.token_logprobs!.slice(1)) expect(v).toBeLessThanOrEqual(0);
    // Greedy: each generated token is the most likely one (several tokens may show as the
    // same text, one key in top_logprobs: compare with every value).
    for (let i = ids.length; i < ids.length + 5; i++) {
      for (const v of Object.values(lp.top_logprobs![i]!))
        expect(lp.token_logprobs![i]!).toBeGreaterThanOrEqual(v - 1e-12);
    }
    // The prompt's logprobs do not depend on how the prompt was chunked.
    const again = await gw.client.completions.create({
      model: "tiny",
      prompt,
      max_tokens: 1,
      temperature: 0,
      logprobs: 0,
      echo: true,
    });
    expect(again.choices[0]!.logprobs!.token_logprobs!.slice(1, ids.length)).toEqual(
      lp.token_logprobs!.slice(1, ids.length).map((v) => expect.closeTo(v!, 5)),
    );
  });

  it("takes token ids as the prompt and streams", async () => {
    const ids = gw.ctx.tokenizer.encode("Once upon a time");
    const whole = await gw.client.completions.create({
      model: "tiny",
      prompt: ids,
      max_tokens: 8,
      temperature: 0,
    });
    const stream = await gw.client.completions.create({
      model: "tiny",
      prompt: ids,
      max_tokens: 8,
      temperature: 0,
      stream: true,
    });
    let text = "";
    for await (const chunk of stream) for (const c of chunk.choices) text += c.text;
    expect(text).toBe(whole.choices[0]!.text);
  });
});

describe("continuous batching", () => {
  it("32 concurrent greedy requests give the same text as one by one", async () => {
    const seeds = SEED_PROMPTS;
    const prompts = Array.from(
      { length: 32 },
      (_, i) => `${seeds[i % 8]}${i >= 8 ? ` (${i})` : ""}`,
    );
    const ask = (p: string, i: number) =>
      gw.client.completions
        .create({ model: "tiny", prompt: p, max_tokens: 6 + 3 * (i % 8), temperature: 0 })
        .then((r) => r.choices[0]!.text);
    const alone: string[] = [];
    for (const [i, p] of prompts.entries()) alone.push(await ask(p, i));
    const together = await Promise.all(prompts.map(ask));
    expect(together).toEqual(alone);
  });
});

describe("preemption", () => {
  it("a cache too small for all sequences preempts and recomputes, with the same text", async () => {
    await preemptionScenario(dir, {});
  });
});

describe("errors", () => {
  const post = (path: string, body: string, headers: Record<string, string> = {}) =>
    fetch(`${gw.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body,
    });

  it("invalid JSON: 400 in OpenAI's format", async () => {
    const r = await post("/v1/chat/completions", "{not json");
    expect(r.status).toBe(400);
    const body: any = await r.json();
    expect(body.error).toMatchObject({
      type: "invalid_request_error",
      code: "EM_GATEWAY_BAD_REQUEST",
    });
    expect(typeof body.error.message).toBe("string");
  });

  it("unknown model: 404", async () => {
    const err = await gw.client.chat.completions
      .create({ model: "gpt-4", messages: user("hi") })
      .catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect(err.code).toBe("EM_GATEWAY_UNKNOWN_MODEL");
    expect(err.param).toBe("model");
  });

  it.each([
    [{ temperature: 5 }, "temperature"],
    [{ top_p: 0 }, "top_p"],
    [{ n: 0 }, "n"],
    [{ max_tokens: 0 }, "max_tokens"],
    [{ max_tokens: "ten" }, "max_tokens"],
    [{ messages: [] }, "messages"],
    [{ messages: [{ role: "robot", content: "x" }] }, "messages.0.role"],
    [{ top_logprobs: 99, logprobs: true }, "top_logprobs"],
  ] as const)("bad parameter %j: 400 naming %s", async (patch, param) => {
    const err = await gw.client.chat.completions
      .create({ model: "tiny", messages: user("hi"), ...(patch as any) })
      .catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err.code).toBe("EM_GATEWAY_BAD_REQUEST");
    expect(err.param).toBe(param);
  });

  it("missing model: 400", async () => {
    const r = await post("/v1/completions", JSON.stringify({ prompt: "x" }));
    expect(r.status).toBe(400);
    expect(((await r.json()) as any).error.param).toBe("model");
  });

  it("prompt longer than the context: 400, and the gateway keeps serving", async () => {
    const long = "word ".repeat(400);
    const err = await gw.client.completions
      .create({ model: "tiny", prompt: long, max_tokens: 4 })
      .catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err.code).toBe("EM_GATEWAY_PROMPT_TOO_LONG");
    const tooMany = await gw.client.completions
      .create({ model: "tiny", prompt: "hi", max_tokens: 1000 })
      .catch((e) => e);
    expect(tooMany.status).toBe(400);
    expect(tooMany.param).toBe("max_tokens");
    const ok = await gw.client.completions.create({ model: "tiny", prompt: "hi", max_tokens: 2 });
    expect(ok.usage!.completion_tokens).toBeGreaterThan(0);
  });

  it("token ids outside the vocabulary: 400", async () => {
    const err = await gw.client.completions
      .create({ model: "tiny", prompt: [1, 2, 10_000_000] })
      .catch((e) => e);
    expect(err.status).toBe(400);
    expect(err.param).toBe("prompt");
  });

  it("unknown route: 404 in OpenAI's format", async () => {
    const r = await fetch(`${gw.url}/v1/embeddings`, { method: "POST" });
    expect(r.status).toBe(404);
    expect(((await r.json()) as any).error.code).toBe("EM_GATEWAY_NOT_FOUND");
  });
});

describe("limits and lifecycle", () => {
  it("a body over --max-request-bytes: 413; a missing API key: 401", async () => {
    const g = await startGateway(dir, { maxRequestBytes: 2048, apiKeys: ["sekret"] });
    try {
      const big = await g.client.chat.completions
        .create({ model: "tiny", messages: user("x".repeat(4000)) })
        .catch((e) => e);
      expect(big.status).toBe(413);
      expect(big.code).toBe("EM_GATEWAY_BODY_TOO_LARGE");
      const anon = new OpenAI({ baseURL: `${g.url}/v1`, apiKey: "wrong", maxRetries: 0 });
      const denied = await anon.models.list().catch((e) => e);
      expect(denied).toBeInstanceOf(OpenAI.AuthenticationError);
      expect(denied.code).toBe("EM_GATEWAY_UNAUTHORIZED");
      const models = await g.client.models.list();
      expect(models.data.map((m) => m.id)).toEqual(["tiny"]);
      expect((await fetch(`${g.url}/health`)).status).toBe(200);
      expect((await fetch(`${g.url}/ready`)).status).toBe(200);
    } finally {
      await g.close();
    }
  });

  it("a full admission queue gives 429 with Retry-After", async () => {
    let h!: ReturnType<typeof holdable>;
    const g = await startGateway(dir, {
      maxQueueDepth: 2,
      maxRunning: 1,
      wrap: (r) => {
        h = holdable(r);
        return h.runner;
      },
    });
    try {
      h.hold();
      const body = { model: "tiny", prompt: "hello", max_tokens: 3, temperature: 0 };
      // The first request runs (held in its first step); two more wait in the queue.
      const first = g.client.completions.create(body);
      await h.entered;
      const waiting = [
        await g.client.completions.create({ ...body, stream: true }),
        await g.client.completions.create({ ...body, stream: true }),
      ];
      expect(await metric(g.url, "expertmesh_gateway_num_requests_waiting")).toBe(2);
      const err = await g.client.completions.create(body).catch((e) => e);
      expect(err).toBeInstanceOf(OpenAI.RateLimitError);
      expect(err.code).toBe("EM_GATEWAY_OVERLOADED");
      expect(err.headers.get("retry-after")).toBe("1");
      h.release();
      expect((await first).choices[0]!.finish_reason).toBeDefined();
      for (const s of waiting) for await (const _ of s);
      expect(await metric(g.url, "expertmesh_gateway_requests_rejected_total")).toBe(1);
    } finally {
      h.release();
      await g.close();
    }
  });

  it("a client that disconnects cancels its sequence and frees its blocks", async () => {
    let h!: ReturnType<typeof holdable>;
    const g = await startGateway(dir, {
      wrap: (r) => {
        h = holdable(r);
        return h.runner;
      },
    });
    const abortedCount = async () =>
      Number(
        /request_success_total\{finished_reason="abort"\} (\d+)/.exec(
          await fetch(`${g.url}/metrics`).then((r) => r.text()),
        )?.[1] ?? 0,
      );
    try {
      const ac = new AbortController();
      const stream = await g.client.chat.completions.create(
        {
          model: "tiny",
          messages: user("Keep talking"),
          max_tokens: 200,
          temperature: 0,
          stream: true,
        },
        { signal: ac.signal },
      );
      let chunks = 0;
      try {
        for await (const _ of stream) {
          if (++chunks === 3) {
            // Hold the engine so the sequence cannot finish on its own meanwhile.
            h.hold();
            ac.abort();
          }
        }
      } catch {
        // The client may end the iteration with an abort error or quietly.
      }
      expect(chunks).toBe(3);
      await waitFor("the server to see the disconnect", async () =>
        (await abortedCount()) === 1 ? true : undefined,
      );
      expect(await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")).toBeGreaterThan(0);
      h.release();
      await waitFor("the sequence's blocks to be freed", async () =>
        (await metric(g.url, "expertmesh_gateway_num_requests_running")) === 0 &&
        (await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")) === 0
          ? true
          : undefined,
      );
      expect(await metric(g.url, "expertmesh_gateway_generation_tokens_total")).toBeLessThan(200);
    } finally {
      h.release();
      await g.close();
    }
  });
});

describe("distributed mode", () => {
  let cluster: Cluster | undefined;
  afterAll(async () => stopAll(cluster));

  it("serves with experts on 2 shard processes, the same greedy text as one process", async () => {
    cluster = await startShards(dir, 2);
    const g = await startGateway(dir, { cluster });
    try {
      expect((await fetch(`${g.url}/ready`)).status).toBe(200);
      const body = {
        model: "tiny",
        messages: user("Hello from far away"),
        max_tokens: 12,
        temperature: 0,
      };
      const [remote, local] = await Promise.all([
        g.client.chat.completions.create(body),
        gw.client.chat.completions.create(body),
      ]);
      expect(remote.choices[0]!.message.content).toBe(local.choices[0]!.message.content);
      expect(remote.usage).toEqual(local.usage);
      // Without shards the gateway is not ready.
      await stopAll(cluster);
      cluster = undefined;
      await sleep(100);
      expect((await fetch(`${g.url}/ready`)).status).toBe(503);
    } finally {
      await g.close();
    }
  });

  it("keeps a stream going when a shard replica is killed mid-stream and another replica exists", async () => {
    cluster = await startShards(dir, 2, { replicas: 2 });
    const g = await startGateway(dir, { cluster });
    try {
      const body = {
        model: "tiny",
        messages: user("Tell me a long story"),
        max_tokens: 24,
        temperature: 0,
      };
      const want = (await gw.client.chat.completions.create(body)).choices[0]!.message.content;
      const stream = await g.client.chat.completions.create({ ...body, stream: true });
      let text = "";
      let chunks = 0;
      for await (const chunk of stream) {
        text += chunk.choices[0]?.delta?.content ?? "";
        if (++chunks === 3)
          cluster.shards.find((s) => s.name.endsWith("-0-r0"))!.child.kill("SIGKILL");
      }
      expect(chunks).toBeGreaterThan(3);
      expect(text).toBe(want);
    } finally {
      await g.close();
    }
  });
});
