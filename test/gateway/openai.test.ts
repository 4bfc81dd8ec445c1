// The gateway against the official `openai` client: a gateway started in this process on
// the tiny V3 checkpoint with its routed experts on 2 shard processes over the test
// nats-server (distributed mode, as in production). Experts in process only where that adds
// something: the single-process reference and the preemption scenario (engine bookkeeping;
// its distributed variant is in micro-batches.test.ts). The `expertmesh gateway` process
// itself for what its command adds: load reports on NATS and per-shard dispatch metrics.
// Greedy decoding makes outputs comparable across runs.
import { connect as netConnect } from "node:net";
import { hostname } from "node:os";
import { connect } from "@nats-io/transport-node";
import OpenAI, { type APIError } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import { isDone, run, START } from "../../src/gateway/json-mode.ts";
import { formatCall } from "../../src/gateway/tool-calls.ts";
import { loadSamplingDefaults } from "../../src/model/generation-config.ts";
import { subjects } from "../../src/moe/subjects.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, startShard, startShards, stopAll, waitServing } from "../support/shards.ts";
import {
  finishedRequests,
  metric,
  natsDelivered,
  preemptionScenario,
  SEED_PROMPTS,
  samples,
  shardFrames,
  startGateway,
  startHeldGateway,
  stepTokens,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let cluster: Cluster;
let gw: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  cluster = await startShards(dir, 2);
  // A small step budget so concurrent prompts are split into chunks and mixed with decodes;
  // prompts over 64 bytes encoded by the tokenizer worker (a tiny model's prompts that fit
  // its 256-token context are all short), so the usage checks below compare its ids with
  // the tokenizer's in this thread.
  gw = await startGateway(dir, { cluster, maxBatchTokens: 24, tokenizerInlineBytes: 64 });
});
afterAll(async () => {
  await gw?.close();
  await stopAll(cluster);
});

const user = (content: string) => [{ role: "user" as const, content }];
/** vLLM's extra body parameter (the openai client sends unknown fields as they are). */
const ignoreEos: object = { ignore_eos: true };

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
      // Whole 16-token blocks of the prompt an earlier request computed (none yet, or the
      // chat template's start).
      prompt_tokens_details: { cached_tokens: expect.any(Number) },
      // DeepSeek's API's names for the same split.
      prompt_cache_hit_tokens: r.usage!.prompt_tokens_details!.cached_tokens,
      prompt_cache_miss_tokens: prompt.length - r.usage!.prompt_tokens_details!.cached_tokens!,
    });
    expect(r.usage!.prompt_tokens_details!.cached_tokens! % 16).toBe(0);
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
    // The same counts; the stream found the prompt's whole blocks in the prefix cache.
    const {
      prompt_tokens_details: cachedWhole,
      prompt_cache_hit_tokens: _hit,
      prompt_cache_miss_tokens: _miss,
      ...counts
    } = whole.usage as OpenAI.CompletionUsage & Record<string, number>;
    expect(usage).toEqual({
      ...counts,
      prompt_tokens_details: expect.anything(),
      prompt_cache_hit_tokens: usage!.prompt_tokens_details!.cached_tokens,
      prompt_cache_miss_tokens: counts.prompt_tokens - usage!.prompt_tokens_details!.cached_tokens!,
    });
    expect(usage!.prompt_tokens_details!.cached_tokens).toBe(
      Math.floor((counts.prompt_tokens - 1) / 16) * 16,
    );
    expect(cachedWhole!.cached_tokens).toBeLessThanOrEqual(
      usage!.prompt_tokens_details!.cached_tokens!,
    );
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
    const finished = async () =>
      (await finishedRequests(gw.url, "stop")) + (await finishedRequests(gw.url, "length"));
    const before = await finished();
    const a = await gw.client.chat.completions.create(body);
    const b = await gw.client.chat.completions.create(body);
    expect(await finished()).toBe(before + 2); // requests, not choices
    expect(a.choices.map((c) => c.index)).toEqual([0, 1]);
    expect(b.choices.map((c) => c.message.content)).toEqual(
      a.choices.map((c) => c.message.content),
    );
    for (const c of a.choices) {
      const content = c.logprobs!.content!;
      expect(content.length).toBeGreaterThan(0);
      // The tokens' own bytes rebuild the text (a character split over tokens included).
      expect(Buffer.from(content.flatMap((t) => t.bytes!)).toString("utf8")).toBe(
        c.message.content,
      );
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

  it("continues a final assistant message (vLLM's continue_final_message, DeepSeek's prefix: true): the answer is the continuation", async () => {
    const messages = [
      { role: "user" as const, content: "Write a story" },
      { role: "assistant" as const, content: "Once upon a time" },
    ];
    const body = { model: "tiny", max_tokens: 10, temperature: 0, ...ignoreEos };
    const continued = await gw.client.chat.completions.create({
      ...body,
      messages,
      continue_final_message: true,
      add_generation_prompt: false,
    } as never);
    // The prompt is the conversation up to the message's content, its turn open.
    const text = gw.ctx.tokenizer.applyChatTemplate(messages, false, {
      continueFinalMessage: true,
    });
    expect(text.endsWith("<｜Assistant｜>Once upon a time")).toBe(true);
    const prompt = gw.ctx.tokenizer.encode(text, false);
    expect(continued.usage!.prompt_tokens).toBe(prompt.length);
    // The same tokens as a completion of that prompt: the continuation only.
    const completion = await gw.client.completions.create({ ...body, prompt });
    const answer = continued.choices[0]!.message.content;
    expect(answer).toBe(completion.choices[0]!.text);
    // Not what a new turn after the message would say.
    const fresh = await gw.client.chat.completions.create({ ...body, messages });
    expect(fresh.usage!.prompt_tokens).not.toBe(prompt.length);
    // DeepSeek's API: prefix: true on the last message.
    const prefixed = await gw.client.chat.completions.create({
      ...body,
      messages: [messages[0]!, { ...messages[1]!, prefix: true }],
    } as never);
    expect(prefixed.choices[0]!.message.content).toBe(answer);
    // /tokenize counts it the same way.
    const counted = await fetch(`${gw.url}/tokenize`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        messages,
        continue_final_message: true,
        add_generation_prompt: false,
      }),
    });
    expect(((await counted.json()) as { tokens: number[] }).tokens).toEqual(prompt);
    // What cannot be continued: 400 naming the field.
    const refusals: [object, string][] = [
      [{ messages: [messages[0]], continue_final_message: true }, "continue_final_message"],
      [
        { messages, continue_final_message: true, add_generation_prompt: true },
        "continue_final_message",
      ],
      [{ messages: [{ ...messages[0]!, prefix: true }, messages[1]] }, "messages.0.prefix"],
      [
        { messages: [messages[0], { role: "assistant", content: "", prefix: true }] },
        "messages.1.prefix",
      ],
      [
        { messages, continue_final_message: true, response_format: { type: "json_object" } },
        "response_format",
      ],
    ];
    for (const [patch, param] of refusals) {
      const e = (await gw.client.chat.completions
        .create({ ...body, messages, ...patch } as never)
        .catch((err: APIError) => err)) as APIError;
      expect(e.status, JSON.stringify(patch)).toBe(400);
      expect(e.param, JSON.stringify(patch)).toBe(param);
    }
  });

  it("a chat template that refuses a conversation, or rewrites a message to continue: 400 EM_TOKENIZER_TEMPLATE", async () => {
    // R1's habit: the text before </think> is dropped from an assistant's message.
    const template =
      "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system prompts here') }}{% endif %}" +
      "<｜{{ m.role }}｜>{{ m.content.split('</think>')[-1] }}{% endfor %}" +
      "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";
    const g = await startGateway(dir, { cluster, chatTemplate: template });
    try {
      const ask = (messages: object[], extra: object = {}) =>
        g.client.chat.completions
          .create({ model: "tiny", messages, max_tokens: 2, ...extra } as never)
          .catch((e: APIError) => e);
      const ok = await ask([{ role: "user", content: "hi" }]);
      expect((ok as OpenAI.ChatCompletion).choices).toHaveLength(1);
      const system = (await ask([
        { role: "system", content: "s" },
        { role: "user", content: "hi" },
      ])) as APIError;
      expect(system.status).toBe(400);
      expect(system.code).toBe("EM_TOKENIZER_TEMPLATE");
      expect(system.message).toContain("no system prompts here");
      const rewritten = (await ask(
        [
          { role: "user", content: "hi" },
          { role: "assistant", content: "<think>hm</think>Well" },
        ],
        { continue_final_message: true },
      )) as APIError;
      expect(rewritten.status).toBe(400);
      expect(rewritten.message).toContain("cannot be continued");
    } finally {
      await g.close();
    }
  });

  it("min_p: every sampled token at least min_p times as likely as the most likely one", async () => {
    const body = {
      model: "tiny",
      messages: user("Tell me a story"),
      max_tokens: 12,
      temperature: 1,
      seed: 77,
      n: 6,
      logprobs: true,
      top_logprobs: 1,
    };
    // How far below the most likely token each sampled one was (log of the ratio).
    const gaps = (r: OpenAI.ChatCompletion) =>
      r.choices.flatMap((c) =>
        c.logprobs!.content!.map((t) => t.logprob - t.top_logprobs[0]!.logprob),
      );
    const free = await gw.client.chat.completions.create(body);
    const cut = await gw.client.chat.completions.create({ ...body, min_p: 0.3 } as never);
    // This random model's distribution is flat: unconstrained, it samples far below the top.
    expect(Math.min(...gaps(free))).toBeLessThan(Math.log(0.3));
    expect(gaps(cut).length).toBeGreaterThan(0);
    for (const g of gaps(cut)) expect(g).toBeGreaterThanOrEqual(Math.log(0.3) - 1e-4);
    // min_p 1 keeps only the most likely token: any temperature answers the greedy text.
    const greedy = await gw.client.chat.completions.create({ ...body, n: 1, temperature: 0 });
    const hot = await gw.client.chat.completions.create({
      ...body,
      n: 1,
      temperature: 2,
      min_p: 1,
    } as never);
    expect(hot.choices[0]!.message.content).toBe(greedy.choices[0]!.message.content);
    const bad = await gw.client.chat.completions
      .create({ ...body, min_p: 1.5 } as never)
      .catch((e: APIError) => e);
    expect((bad as APIError).status).toBe(400);
  });

  it("repetition_penalty: a large one keeps greedy decoding off the prompt's and its own tokens", async () => {
    const messages = user("Hello Hello Hello, say hello again and again");
    const body = {
      model: "tiny",
      messages,
      max_tokens: 24,
      temperature: 0,
      logprobs: true,
      top_logprobs: 1,
      ...ignoreEos,
    };
    // Token ids of the answer, from each token's bytes (special tokens: by name).
    const tk = gw.ctx.tokenizer;
    const idOf = new Map<string, number>();
    for (const [id, b] of tk.tokenBytes()!.entries())
      if (b) idOf.set(Buffer.from(b).toString("hex"), id);
    const ids = (r: OpenAI.ChatCompletion) =>
      r.choices[0]!.logprobs!.content!.map(
        (t) => idOf.get(Buffer.from(t.bytes!).toString("hex")) ?? tk.tokenToId(t.token),
      );
    const prompt = new Set(tk.encodeChat(messages, true));
    const repeats = (out: (number | undefined)[]) =>
      out.filter((id, i) => id === undefined || prompt.has(id) || out.indexOf(id) < i).length;
    const plain = ids(await gw.client.chat.completions.create(body));
    expect(plain).toHaveLength(24);
    // This random model repeats itself (or its prompt) when left alone.
    expect(repeats(plain)).toBeGreaterThan(0);
    const penalized = await gw.client.chat.completions.create({
      ...body,
      repetition_penalty: 50,
    } as never);
    expect(ids(penalized)).toHaveLength(24);
    expect(repeats(ids(penalized))).toBe(0);
    // The logprobs are the penalized ones: greedy takes their most likely token.
    for (const t of penalized.choices[0]!.logprobs!.content!)
      expect(t.logprob).toBe(t.top_logprobs[0]!.logprob);
    // 1 is off.
    const one = ids(
      await gw.client.chat.completions.create({ ...body, repetition_penalty: 1 } as never),
    );
    expect(one).toEqual(plain);
    // Out of 0.01..100 refused, on chat and Responses: a tiny positive one (1e-320) divided
    // the logits to +inf (a 500 EM_ENGINE_NONFINITE before), as a huge one would the other way.
    for (const repetition_penalty of [0, 1e-320, 0.0099, 100.5]) {
      const bad = await gw.client.chat.completions
        .create({ ...body, repetition_penalty } as never)
        .catch((e: APIError) => e);
      expect([(bad as APIError).status, (bad as APIError).param]).toEqual([
        400,
        "repetition_penalty",
      ]);
      const viaResponses = await gw.client.responses
        .create({ model: "tiny", input: "Hello", repetition_penalty } as never)
        .catch((e: APIError) => e);
      expect((viaResponses as APIError).status).toBe(400);
    }
    const least = await gw.client.chat.completions.create({
      ...body,
      repetition_penalty: 0.01,
    } as never);
    expect(ids(least)).toHaveLength(24);
  });

  it("response_format json_object: each choice is a JSON object, or its start when cut short", async () => {
    const body = {
      model: "tiny",
      messages: user("Describe a cat as JSON"),
      max_tokens: 40,
      temperature: 1,
      seed: 5,
      n: 8,
    };
    const json = { type: "json_object" } as const;
    const plain = await gw.client.chat.completions.create(body);
    const free = await gw.client.chat.completions.create({ ...body, response_format: json });
    // Without the constraint this random model does not write JSON.
    expect(plain.choices.some((c) => !c.message.content!.startsWith("{"))).toBe(true);
    for (const c of free.choices) {
      const text = c.message.content!;
      // A prefix of a JSON object (json-mode.test.ts checks the automaton against
      // JSON.parse); complete exactly when the choice stopped.
      const state = run(START, new Uint8Array(Buffer.from(text)));
      expect(state, JSON.stringify(text)).not.toBeNull();
      expect(isDone(state!)).toBe(c.finish_reason === "stop");
      if (c.finish_reason === "stop") expect(JSON.parse(text)).toBeTypeOf("object");
    }
    // With the closing tokens favoured (and whitespace left out), every choice completes:
    // JSON.parse takes it.
    const id = (t: string) => gw.ctx.tokenizer.encode(t, false)[0]!;
    const closers = ['"', "}", "]"].map(id);
    const nudged = await gw.client.chat.completions.create({
      ...body,
      response_format: json,
      logit_bias: Object.fromEntries([
        ...closers.map((c) => [String(c), 4]),
        ...[" ", "\n", "\t", "\r"].map((t) => [String(id(t)), -100]),
      ]),
    });
    for (const c of nudged.choices) {
      expect(c.finish_reason, JSON.stringify(c.message.content)).toBe("stop");
      const v = JSON.parse(c.message.content!) as unknown;
      expect(v !== null && typeof v === "object" && !Array.isArray(v)).toBe(true);
    }
    // Streamed: the same texts; completions take it too.
    const streamed = new Map<number, string>();
    for await (const chunk of await gw.client.chat.completions.create({
      ...body,
      response_format: json,
      stream: true,
    }))
      for (const c of chunk.choices)
        streamed.set(c.index, (streamed.get(c.index) ?? "") + (c.delta.content ?? ""));
    expect(free.choices.map((c) => streamed.get(c.index))).toEqual(
      free.choices.map((c) => c.message.content),
    );
    const completion = await gw.client.completions.create({
      model: "tiny",
      prompt: "JSON:",
      max_tokens: 30,
      temperature: 0,
      response_format: json,
      logit_bias: Object.fromEntries(closers.map((id) => [String(id), 4])),
    } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(JSON.parse(completion.choices[0]!.text)).toBeTypeOf("object");
  });

  /**
   * 6 choices of a json_schema request, closing tokens favoured and whitespace banned
   * (compact JSON), so that this random model finishes within max_tokens.
   */
  const schemaChoices = (
    schema: Record<string, unknown>,
    o: { name: string; seed: number; maxTokens: number },
  ) => {
    const id = (t: string) => String(gw.ctx.tokenizer.encode(t, false)[0]!);
    return gw.client.chat.completions.create({
      model: "tiny",
      messages: user(`A ${o.name}`),
      max_tokens: o.maxTokens,
      temperature: 1,
      seed: o.seed,
      n: 6,
      response_format: { type: "json_schema", json_schema: { name: o.name, schema, strict: true } },
      logit_bias: {
        ...Object.fromEntries(['"', "}", "]", ","].map((t) => [id(t), 4])),
        ...Object.fromEntries([" ", "\n", "\t", "\r"].map((t) => [id(t), -100])),
      },
    });
  };

  it("response_format json_schema: each choice is an instance of the schema", async () => {
    const schema = {
      type: "object",
      properties: {
        name: { type: "string" },
        age: { type: "integer" },
        mood: { enum: ["happy", "sad"] },
        tags: { type: "array", items: { type: "boolean" }, maxItems: 2 },
        pet: { type: ["string", "null"] },
      },
      required: ["name", "age", "mood", "tags", "pet"],
      additionalProperties: false,
    };
    const r = await schemaChoices(schema, { name: "person", seed: 9, maxTokens: 120 });
    for (const c of r.choices) {
      expect(c.finish_reason, c.message.content!).toBe("stop");
      const v = JSON.parse(c.message.content!) as Record<string, unknown>;
      expect(Object.keys(v)).toEqual(["name", "age", "mood", "tags", "pet"]);
      expect(typeof v["name"]).toBe("string");
      expect(Number.isInteger(v["age"])).toBe(true);
      expect(["happy", "sad"]).toContain(v["mood"]);
      expect(Array.isArray(v["tags"]) && (v["tags"] as unknown[]).length <= 2).toBe(true);
      for (const t of v["tags"] as unknown[]) expect(typeof t).toBe("boolean");
      expect(v["pet"] === null || typeof v["pet"] === "string").toBe(true);
    }
    // What the subset does not cover, or no schema: 400 naming response_format.
    for (const format of [
      { type: "json_schema", json_schema: { name: "x", schema: { type: "array" } } },
      {
        type: "json_schema",
        json_schema: {
          name: "x",
          schema: { type: "object", properties: { s: { type: "string", format: "color" } } },
        },
      },
      { type: "json_schema", json_schema: { name: "x" } },
    ]) {
      const err = await gw.client.chat.completions
        .create({ model: "tiny", messages: user("x"), response_format: format as never })
        .then(
          () => expect.unreachable("accepted"),
          (e: APIError) => e,
        );
      expect([err.status, err.param], JSON.stringify(format)).toEqual([400, "response_format"]);
    }
  });

  it("vLLM's guided_choice, guided_regex and guided_json (and structured_outputs): every choice obeys", async () => {
    const ask = (extra: Record<string, unknown>, o: { n?: number; stream?: boolean } = {}) =>
      gw.client.chat.completions.create({
        model: "tiny",
        messages: user("Pick"),
        max_tokens: 40,
        temperature: 1,
        seed: 3,
        n: o.n ?? 6,
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const choices = ["red", "green", "blue (light)"];
    for (const extra of [{ guided_choice: choices }, { structured_outputs: { choice: choices } }]) {
      const r = await ask(extra);
      for (const c of r.choices) {
        expect(choices, JSON.stringify(extra)).toContain(c.message.content);
        expect(c.finish_reason).toBe("stop");
      }
    }
    // A pattern with a bounded tail: the model ends it (EOS is allowed once it matches) or
    // reaches the bound, where only the end remains.
    const pattern = "[A-Z]{2}-[0-9]{2,4}( [a-z]{1,3})?";
    for (const extra of [{ guided_regex: pattern }, { structured_outputs: { regex: pattern } }]) {
      const r = await ask(extra);
      for (const c of r.choices) {
        expect(c.message.content).toMatch(new RegExp(`^(?:${pattern})$`));
        expect(c.finish_reason).toBe("stop");
      }
    }
    // Streamed: the deltas add up to a match.
    let text = "";
    for await (const chunk of await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Pick"),
      max_tokens: 40,
      seed: 4,
      stream: true,
      guided_regex: pattern,
    } as unknown as OpenAI.ChatCompletionCreateParamsStreaming))
      text += chunk.choices[0]?.delta.content ?? "";
    expect(text).toMatch(new RegExp(`^(?:${pattern})$`));
    // Completions take them too.
    const done = await gw.client.completions.create({
      model: "tiny",
      prompt: "Colour:",
      max_tokens: 20,
      n: 4,
      seed: 2,
      guided_choice: choices,
    } as OpenAI.CompletionCreateParamsNonStreaming);
    for (const c of done.choices) expect(choices).toContain(c.text);
    // guided_json: a schema (or its text), as response_format json_schema.
    const schema = { type: "object", properties: { n: { enum: [1, 2] } }, required: ["n"] };
    // Whitespace banned (this random model would pile it up within max_tokens).
    const ws = (t: string) => String(gw.ctx.tokenizer.encode(t, false)[0]!);
    const logit_bias = Object.fromEntries([" ", "\n", "\t", "\r"].map((t) => [ws(t), -100]));
    for (const guided_json of [schema, JSON.stringify(schema)]) {
      const r = await ask({ guided_json, logit_bias }, { n: 2 });
      for (const c of r.choices)
        expect([{ n: 1 }, { n: 2 }]).toContainEqual(JSON.parse(c.message.content!));
    }
    // Refused with 400 naming the field.
    for (const [extra, param] of [
      [{ guided_regex: "(?=a)" }, "guided_regex"],
      [{ guided_choice: [] }, "guided_choice"],
      [{ guided_choice: choices, guided_regex: "a" }, "guided_choice"],
      [{ response_format: { type: "json_object" }, guided_choice: choices }, "guided_choice"],
      [{ structured_outputs: { grammar: "root ::= x" } }, "structured_outputs.grammar"],
      [{ guided_json: "{not json" }, "guided_json"],
      [
        { guided_choice: choices, tools: [{ type: "function", function: { name: "f" } }] },
        "guided_choice",
      ],
    ] as [Record<string, unknown>, string][])
      await expectRefused(() => ask(extra, { n: 1 }), extra, param);
  });

  it("vLLM's guided_grammar (and structured_outputs.grammar): every choice is in the GBNF or Lark grammar's language", async () => {
    const ask = (extra: Record<string, unknown>, n = 6) =>
      gw.client.chat.completions.create({
        model: "tiny",
        messages: user("List"),
        max_tokens: 40,
        temperature: 1,
        seed: 5,
        n,
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    // A bounded list (at most 26 characters: the model must end it within 40 tokens).
    const list = `
      root ::= "(" item ("," item){0,3} ")"   # up to four items
      item ::= [0-9]{1,2} | "x" | "(" [0-9] ")"
    `;
    const item = String.raw`(?:[0-9]{1,2}|x|\([0-9]\))`;
    const listRe = new RegExp(String.raw`^\(${item}(?:,${item}){0,3}\)$`);
    for (const extra of [{ guided_grammar: list }, { structured_outputs: { grammar: list } }]) {
      const r = await ask(extra);
      for (const c of r.choices) {
        expect(c.message.content, JSON.stringify(extra)).toMatch(listRe);
        expect(c.finish_reason).toBe("stop");
      }
    }
    // Not a regular language: a^n b^n in brackets. Complete answers balance; one cut by
    // max_tokens is a prefix of such.
    const nested = `root ::= "[" s "]"\ns ::= "a" s "b" | ""`;
    const r = await ask({ guided_grammar: nested, max_tokens: 12 });
    for (const c of r.choices) {
      const t = c.message.content!;
      const m = /^\[(a*)(b*)(\]?)$/.exec(t);
      expect(m, t).not.toBeNull();
      const [, a, b, close] = m!;
      expect(b!.length, t).toBeLessThanOrEqual(a!.length);
      if (c.finish_reason === "stop") expect([b!.length, close], t).toEqual([a!.length, "]"]);
      else expect(close, t).toBe("");
    }
    // Streamed, and on /v1/completions: the same language.
    let text = "";
    for await (const chunk of await gw.client.completions.create({
      model: "tiny",
      prompt: "Items:",
      max_tokens: 40,
      seed: 6,
      stream: true,
      guided_grammar: list,
    } as unknown as OpenAI.CompletionCreateParamsStreaming))
      text += chunk.choices[0]?.text ?? "";
    expect(text).toMatch(listRe);
    // Lark (no '::='): a left-recursive list, case-insensitive x, a regular expression.
    const lark = `
      start: "(" list ")"
      list: list "," item | item   // left recursion
      item: /[0-9]{1,2}/ | "x"i
    `;
    const larkItem = "(?:[0-9]{1,2}|[xX])";
    const larkWhole = new RegExp(String.raw`^\(${larkItem}(?:,${larkItem})*\)$`);
    const larkPrefix = new RegExp(String.raw`^\((?:${larkItem},)*(?:[0-9]{0,2}|[xX])$`);
    const lr = await ask({ structured_outputs: { grammar: lark } });
    for (const c of lr.choices)
      expect(c.message.content).toMatch(c.finish_reason === "stop" ? larkWhole : larkPrefix);
    expect(lr.choices.some((c) => c.finish_reason === "stop")).toBe(true);
    // Refused with 400 naming the field and the reason.
    for (const [extra, param, message] of [
      [
        { guided_grammar: `root ::= n root "x" | "y"\nn ::= "" | "n"` },
        "guided_grammar",
        /left recursion/,
      ],
      [
        { structured_outputs: { grammar: `start: item\nitem: "a" rest` } },
        "structured_outputs.grammar",
        /'rest' is used but not defined \(line 2, column 11\)/,
      ],
      [{ guided_grammar: "root ::= [" }, "guided_grammar", /unterminated character class/],
      [{ guided_grammar: 5 }, "guided_grammar", /GBNF/],
      [
        { structured_outputs: { grammar: `start ::= "a"` } },
        "structured_outputs.grammar",
        /'root'/,
      ],
      [{ guided_grammar: list, guided_regex: "a" }, "guided_grammar", /both/],
    ] as [Record<string, unknown>, string, RegExp][])
      await expectRefused(() => ask(extra, 1), extra, param, message);
  });

  it("response_format structural_tag (and structured_outputs.structural_tag): tags, a thought then an answer, free text with triggers; every choice obeys", async () => {
    // Whitespace banned (this random model would pile it up in JSON within max_tokens).
    const ws = (t: string) => String(gw.ctx.tokenizer.encode(t, false)[0]!);
    const logit_bias = Object.fromEntries([" ", "\n", "\t", "\r"].map((t) => [ws(t), -100]));
    const ask = (extra: Record<string, unknown>, n = 4) =>
      gw.client.chat.completions.create({
        model: "tiny",
        messages: user("Weather?"),
        max_tokens: 80,
        temperature: 1,
        seed: 3,
        n,
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const city = {
      type: "object",
      properties: { city: { type: "string", maxLength: 6 } },
      required: ["city"],
      additionalProperties: false,
    };
    const fn = (name: string, schema: unknown) => ({
      type: "tag",
      begin: `<function=${name}>`,
      content: { type: "json_schema", json_schema: schema },
      end: "</function>",
    });
    // Exactly one call, in the model's own wrapper: the name one of the two, the arguments
    // an instance of that function's schema.
    const oneCall = {
      type: "structural_tag",
      format: {
        type: "triggered_tags",
        triggers: ["<function="],
        tags: [
          fn("get_weather", city),
          fn("get_time", { type: "object", properties: {}, additionalProperties: false }),
        ],
        at_least_one: true,
        stop_after_first: true,
      },
    };
    const r = await ask({ response_format: oneCall, logit_bias });
    for (const c of r.choices) {
      const m = /^<function=(get_weather|get_time)>(.*)<\/function>$/s.exec(c.message.content!);
      expect(m, c.message.content!).not.toBeNull();
      const args = JSON.parse(m![2]!);
      if (m![1] === "get_time") expect(args).toEqual({});
      else expect(Object.keys(args)).toEqual(["city"]);
      expect(c.finish_reason).toBe("stop");
    }
    // A thought in tags (its free text stops at the end tag), then an answer under a pattern.
    const thenAnswer = {
      type: "structural_tag",
      format: {
        type: "sequence",
        elements: [
          {
            type: "tag",
            begin: "<think>",
            content: { type: "any_text", max_chars: 8 },
            end: "</think>",
          },
          { type: "const_string", value: "Answer: " },
          { type: "regex", pattern: "[0-9]{1,3}" },
        ],
      },
    };
    const shape = /^<think>([\s\S]*?)<\/think>Answer: [0-9]{1,3}$/;
    for (const c of (await ask({ response_format: thenAnswer })).choices) {
      const m = shape.exec(c.message.content!);
      expect(m, c.message.content!).not.toBeNull();
      expect([...m![1]!].length).toBeLessThanOrEqual(8);
      expect(c.finish_reason).toBe("stop");
    }
    // Streamed, on /v1/completions, and as vLLM's structured_outputs.structural_tag (a JSON
    // string there): the same shape.
    let text = "";
    for await (const chunk of await gw.client.completions.create({
      model: "tiny",
      prompt: "Think:",
      max_tokens: 80,
      seed: 4,
      stream: true,
      structured_outputs: { structural_tag: JSON.stringify(thenAnswer) },
    } as unknown as OpenAI.CompletionCreateParamsStreaming))
      text += chunk.choices[0]?.text ?? "";
    expect(text).toMatch(shape);
    // vLLM's older form: free text, a structure wherever its trigger appears (this random
    // model writes text; what it writes holds no unfinished or malformed call).
    const older = {
      type: "structural_tag",
      structures: [{ begin: "<function=get_weather>", schema: city, end: "</function>" }],
      triggers: ["<function="],
    };
    for (const c of (await ask({ response_format: older, max_tokens: 16 })).choices) {
      const t = c.message.content!;
      for (const at of t.split("<function=").slice(1))
        expect(at, t).toMatch(
          /^get_weather>\{.*\}<\/function>|^(g(e(t(_(w(e(a(t(h(e(r(>.*)?)?)?)?)?)?)?)?)?)?)?)?$/s,
        );
    }
    // Refused with 400 naming the field and the part at fault.
    for (const [extra, param, message] of [
      [
        { response_format: { type: "structural_tag", format: { type: "exclude_token" } } },
        "response_format",
        /"exclude_token" is not supported/,
      ],
      [
        {
          response_format: {
            type: "structural_tag",
            format: {
              type: "tag",
              begin: "<a>",
              content: { type: "json_schema", json_schema: { type: "string" } },
              end: "</a>",
            },
          },
        },
        "response_format",
        /content\.json_schema: the root must be an object/,
      ],
      [
        { response_format: { type: "structural_tag" } },
        "response_format",
        /neither "format" nor "structures"/,
      ],
      [
        { structured_outputs: { structural_tag: "{not json" } },
        "structured_outputs.structural_tag",
        /JSON text/,
      ],
      [{ response_format: oneCall, guided_regex: "a" }, "guided_regex", /both/],
    ] as [Record<string, unknown>, string, RegExp][])
      await expectRefused(() => ask(extra, 1), extra, param, message);
  });

  it("response_format json_schema: pattern, format, lengths, bounds, a union, a map and a set hold in every choice", async () => {
    const schema = {
      type: "object",
      properties: {
        code: { type: "string", pattern: "^[A-Z]{2}-\\d{3}$" },
        day: { type: "string", format: "date" },
        name: { type: "string", minLength: 2, maxLength: 6 },
        n: { type: "integer", minimum: 3, maximum: 7 },
        score: { type: "number", multipleOf: 0.5, minimum: -2, exclusiveMaximum: 10 },
        pet: {
          anyOf: [
            { type: "object", properties: { a: { type: "integer", maximum: 9 } }, required: ["a"] },
            { type: "object", properties: { b: { type: "boolean" } }, required: ["b"] },
          ],
        },
        counts: {
          type: "object",
          additionalProperties: { type: "integer", minimum: 0, maximum: 9 },
          propertyNames: { enum: ["k1", "k2"] },
          maxProperties: 2,
        },
        set: { type: "array", items: { enum: ["x", "y"] }, uniqueItems: true },
      },
      required: ["code", "day", "name", "n", "score", "pet", "counts", "set"],
      additionalProperties: false,
    };
    const r = await schemaChoices(schema, { name: "record", seed: 5, maxTokens: 200 });
    for (const c of r.choices) {
      expect(c.finish_reason, c.message.content!).toBe("stop");
      const v = JSON.parse(c.message.content!) as Record<string, unknown>;
      expect(v["code"]).toMatch(/^[A-Z]{2}-\d{3}$/);
      expect(v["day"]).toMatch(/^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$/);
      const name = [...(v["name"] as string)];
      expect(name.length >= 2 && name.length <= 6, v["name"] as string).toBe(true);
      expect(Number.isInteger(v["n"]) && (v["n"] as number) >= 3 && (v["n"] as number) <= 7).toBe(
        true,
      );
      const score = v["score"] as number;
      expect(score >= -2 && score < 10 && Number.isInteger(score * 2), String(score)).toBe(true);
      const pet = v["pet"] as Record<string, unknown>;
      const one = (k: string) => JSON.stringify(Object.keys(pet)) === JSON.stringify([k]);
      expect(
        (one("a") && (pet["a"] as number) <= 9) || (one("b") && typeof pet["b"] === "boolean"),
      ).toBe(true);
      const counts = Object.entries(v["counts"] as Record<string, number>);
      expect(counts.length).toBeLessThanOrEqual(2);
      for (const [k, n] of counts) expect(["k1", "k2"].includes(k) && n >= 0 && n <= 9).toBe(true);
      const set = v["set"] as string[];
      expect(new Set(set).size === set.length && set.every((x) => x === "x" || x === "y")).toBe(
        true,
      );
    }
  });

  it("tool_choice allowed_tools: calls only of the tools listed, every tool in the prompt", async () => {
    const fn = (name: string) => ({
      type: "function" as const,
      function: { name, parameters: { type: "object", properties: {} } },
    });
    const calc = {
      type: "custom" as const,
      custom: {
        name: "calc",
        format: {
          type: "grammar" as const,
          grammar: { syntax: "regex" as const, definition: "[0-9]{1,3}" },
        },
      },
    };
    const base = {
      model: "tiny",
      messages: user("Go"),
      max_tokens: 40,
      temperature: 1,
      seed: 9,
      tools: [fn("alpha"), fn("beta"), fn("gamma"), calc],
    };
    const allowed = {
      type: "allowed_tools",
      allowed_tools: {
        mode: "required",
        tools: [
          { type: "function", function: { name: "beta" } },
          { type: "custom", custom: { name: "calc" } },
        ],
      },
    };
    const r = await gw.client.chat.completions.create({
      ...base,
      n: 8,
      tool_choice: allowed,
    } as never);
    const names = new Set<string>();
    for (const c of r.choices) {
      expect(c.message.content).toBeNull(); // required: calls at once
      for (const call of c.message.tool_calls ?? [])
        names.add(call.type === "custom" ? call.custom.name : call.function.name);
    }
    expect(names.size).toBeGreaterThan(0);
    for (const name of names) expect(["beta", "calc"]).toContain(name);
    // The same prompt as any tool_choice: all four tools are presented.
    const all = await gw.client.chat.completions.create({
      ...base,
      max_tokens: 1,
      tool_choice: "required",
    });
    expect(r.usage!.prompt_tokens).toBe(all.usage!.prompt_tokens);
    for (const [choice, param] of [
      [
        { type: "allowed_tools", allowed_tools: { mode: "sometimes", tools: [] } },
        "tool_choice.allowed_tools",
      ],
      [
        {
          type: "allowed_tools",
          allowed_tools: {
            mode: "auto",
            tools: [{ type: "function", function: { name: "delta" } }],
          },
        },
        "tool_choice.allowed_tools.tools.0",
      ],
      [
        {
          type: "allowed_tools",
          allowed_tools: {
            mode: "auto",
            tools: [{ type: "function", function: { name: "calc" } }],
          },
        },
        "tool_choice.allowed_tools.tools.0",
      ],
    ] as [Record<string, unknown>, string][])
      await expectRefused(
        () => gw.client.chat.completions.create({ ...base, tool_choice: choice } as never),
        choice,
        param,
      );
  });

  it("tool_choice naming a function: a tool call whose arguments follow its parameters", async () => {
    const weather = {
      type: "function" as const,
      function: {
        name: "get_weather",
        description: "The weather in a city",
        parameters: {
          type: "object",
          properties: {
            city: { type: "string" },
            unit: { type: "string", enum: ["celsius", "fahrenheit"] },
            days: { type: "integer" },
          },
          required: ["city", "unit", "days"],
        },
      },
    };
    const other = { type: "function" as const, function: { name: "noop" } };
    const id = (t: string) => String(gw.ctx.tokenizer.encode(t, false)[0]!);
    const body = {
      model: "tiny",
      messages: user("Weather in Paris?"),
      max_tokens: 100,
      temperature: 1,
      seed: 3,
      n: 3,
      tools: [other, weather],
      tool_choice: { type: "function" as const, function: { name: "get_weather" } },
      // Compact, and closing quotes favoured, so this random model finishes (see json_schema).
      logit_bias: {
        [id('"')]: 4,
        [id(",")]: 4,
        [id("}")]: 4,
        ...Object.fromEntries([" ", "\n", "\t", "\r"].map((t) => [id(t), -100])),
      },
    };
    const r = await gw.client.chat.completions.create(body);
    for (const c of r.choices) {
      expect(c.message.content).toBeNull();
      expect(c.finish_reason).toBe("stop");
      const call = c.message.tool_calls![0]!;
      expect(call.type).toBe("function");
      expect(call.id).toMatch(/^call_/);
      if (call.type !== "function") continue;
      expect(call.function.name).toBe("get_weather");
      const args = JSON.parse(call.function.arguments) as Record<string, unknown>;
      expect(Object.keys(args)).toEqual(["city", "unit", "days"]);
      expect(typeof args["city"]).toBe("string");
      expect(["celsius", "fahrenheit"]).toContain(args["unit"]);
      expect(Number.isInteger(args["days"])).toBe(true);
    }
    // Streamed: the call's header first, then its arguments in pieces that add up to the
    // same text (same seed).
    const args = new Map<number, string>();
    const names = new Map<number, string>();
    for await (const chunk of await gw.client.chat.completions.create({ ...body, stream: true }))
      for (const c of chunk.choices)
        for (const t of c.delta.tool_calls ?? []) {
          if (t.function?.name) names.set(c.index, t.function.name);
          args.set(c.index, (args.get(c.index) ?? "") + (t.function?.arguments ?? ""));
        }
    expect([...names.values()]).toEqual(["get_weather", "get_weather", "get_weather"]);
    expect(r.choices.map((c) => args.get(c.index))).toEqual(
      r.choices.map(
        (c) => (c.message.tool_calls![0] as { function: { arguments: string } }).function.arguments,
      ),
    );
    // "required" with one tool is that tool; "none" is plain text.
    const required = await gw.client.chat.completions.create({
      ...body,
      n: 1,
      tools: [weather],
      tool_choice: "required",
    });
    expect(required.choices[0]!.message.tool_calls![0]!.type).toBe("function");
    const none = await gw.client.chat.completions.create({
      ...body,
      n: 1,
      max_tokens: 5,
      tool_choice: "none",
      logit_bias: {},
    });
    expect(none.choices[0]!.message.tool_calls ?? []).toEqual([]);
    expect(typeof none.choices[0]!.message.content).toBe("string");
  });

  it("custom tools (OpenAI's type custom): input in a Lark grammar or matching a regular expression, as custom tool_calls, streamed too; custom calls in the history", async () => {
    const calc = {
      type: "custom" as const,
      custom: {
        name: "calc",
        description: "Evaluates a sum",
        format: {
          type: "grammar" as const,
          grammar: {
            syntax: "lark" as const,
            definition:
              'start: expr\nexpr: term (("+" | "-") term)~0..2\nterm: /[0-9]{1,2}/ | "x"i',
          },
        },
      },
    };
    const code = {
      type: "custom" as const,
      custom: {
        name: "code",
        format: {
          type: "grammar" as const,
          grammar: { syntax: "regex" as const, definition: "[a-z]{1,6}\\(\\)" },
        },
      },
    };
    const note = { type: "custom" as const, custom: { name: "note" } }; // free text
    const weather = {
      type: "function" as const,
      function: { name: "get_weather", parameters: { type: "object", properties: {} } },
    };
    const calcInput = /^(?:[0-9]{1,2}|[xX])(?:[+-](?:[0-9]{1,2}|[xX])){0,2}$/;
    const codeInput = /^[a-z]{1,6}\(\)$/;
    const base = {
      model: "tiny",
      messages: user("Compute"),
      max_tokens: 40,
      temperature: 1,
      seed: 4,
      tools: [weather, note, calc, code],
    };
    // Named: one call, its input in the grammar's language.
    const r = await gw.client.chat.completions.create({
      ...base,
      n: 4,
      tool_choice: { type: "custom", custom: { name: "calc" } },
    });
    for (const c of r.choices) {
      expect(c.finish_reason).toBe("stop");
      expect(c.message.content).toBeNull();
      expect(c.message.tool_calls).toHaveLength(1);
      const call = c.message.tool_calls![0]!;
      expect(call.type).toBe("custom");
      expect(call.id).toMatch(/^call_/);
      if (call.type !== "custom") continue;
      expect(call.custom.name).toBe("calc");
      expect(call.custom.input).toMatch(calcInput);
    }
    // Streamed: the head names the custom tool, then pieces of its input.
    let input = "";
    let head: unknown;
    for await (const chunk of await gw.client.chat.completions.create({
      ...base,
      stream: true,
      tool_choice: { type: "custom", custom: { name: "code" } },
    })) {
      for (const t of (chunk.choices[0]?.delta.tool_calls ?? []) as unknown as {
        id?: string;
        custom?: { name?: string; input: string };
      }[]) {
        if (t.id) head = t;
        input += t.custom?.input ?? "";
      }
    }
    expect(head).toMatchObject({ index: 0, type: "custom", custom: { name: "code", input: "" } });
    expect(input).toMatch(codeInput);
    // "required": whichever tool the model picks, its call is well formed.
    const any = await gw.client.chat.completions.create({
      ...base,
      n: 6,
      max_tokens: 60,
      tool_choice: "required",
      parallel_tool_calls: false,
    });
    for (const c of any.choices) {
      if (c.finish_reason !== "tool_calls") continue;
      const call = c.message.tool_calls![0]!;
      if (call.type === "function") expect(() => JSON.parse(call.function.arguments)).not.toThrow();
      else if (call.custom.name === "calc") expect(call.custom.input).toMatch(calcInput);
      else if (call.custom.name === "code") expect(call.custom.input).toMatch(codeInput);
      else expect(call.custom.name).toBe("note");
    }
    expect(any.choices.some((c) => c.finish_reason === "tool_calls")).toBe(true);
    // A custom call and its result in the history: part of the prompt.
    const history = (input: string) =>
      gw.client.chat.completions.create({
        ...base,
        max_tokens: 1,
        messages: [
          ...user("Compute"),
          {
            role: "assistant",
            content: null,
            tool_calls: [{ id: "call_1", type: "custom", custom: { name: "calc", input } }],
          },
          { role: "tool", tool_call_id: "call_1", content: "3" },
        ],
      });
    const short = await history("1+2");
    const long = await history("1+2-3+4-5+6-7+8");
    expect(long.usage!.prompt_tokens).toBeGreaterThan(short.usage!.prompt_tokens);
    // Refused with 400 naming the field.
    for (const [extra, param, message] of [
      [
        {
          tools: [
            {
              type: "custom",
              custom: {
                name: "x",
                format: { type: "grammar", grammar: { syntax: "ebnf", definition: "a" } },
              },
            },
          ],
        },
        "tools.0.custom.format",
        /"lark" \| "regex"/,
      ],
      [
        {
          tool_choice: { type: "custom", custom: { name: "calc" } },
          tools: [
            calc,
            {
              type: "custom",
              custom: {
                name: "x",
                format: { type: "grammar", grammar: { syntax: "lark", definition: "start: nope" } },
              },
            },
          ],
        },
        "tools.1",
        /'nope' is used but not defined/,
      ],
      [
        { tools: [calc], tool_choice: { type: "function", function: { name: "calc" } } },
        "tool_choice",
        /function tools/,
      ],
    ] as [Record<string, unknown>, string, RegExp][])
      await expectRefused(
        () => gw.client.chat.completions.create({ ...base, ...extra } as never),
        extra,
        param,
        message,
      );
  });

  describe("tool calls in DeepSeek's format", () => {
    const fn = (name: string, parameters?: Record<string, unknown>) => ({
      type: "function" as const,
      function: { name, ...(parameters ? { parameters } : {}) },
    });
    const weather = fn("get_weather", {
      type: "object",
      // Bounds are enforced in tools' arguments as in response_format.
      properties: { city: { type: "string" }, days: { type: "integer", minimum: 1 } },
      required: ["city", "days"],
    });
    /** The token of one character, or of an added token's text. */
    const id = (t: string) => gw.ctx.tokenizer.encode(t, false)[0]!;
    // Whitespace between JSON tokens left out (this random model would pile it up).
    const ws = () => Object.fromEntries([" ", "\n", "\t", "\r"].map((t) => [String(id(t)), -100]));
    const CALLS_BEGIN = "<｜tool▁calls▁begin｜>";
    const CALL_BEGIN = "<｜tool▁call▁begin｜>";
    const CALLS_END = "<｜tool▁calls▁end｜>";
    /** Streamed calls and content of each choice. */
    const streamed = async (body: object, g: TestGateway = gw) => {
      const calls = new Map<number, { id?: string; name?: string; arguments: string }[]>();
      const content = new Map<number, string>();
      const finish = new Map<number, string | null>();
      for await (const chunk of await g.client.chat.completions.create({
        ...(body as OpenAI.ChatCompletionCreateParamsNonStreaming),
        stream: true,
      }))
        for (const c of chunk.choices) {
          content.set(c.index, (content.get(c.index) ?? "") + (c.delta.content ?? ""));
          if (c.finish_reason) finish.set(c.index, c.finish_reason);
          const list = calls.get(c.index) ?? [];
          calls.set(c.index, list);
          for (const t of c.delta.tool_calls ?? []) {
            list[t.index] ??= { arguments: "" };
            const entry = list[t.index]!;
            if (t.id) entry.id = t.id;
            if (t.function?.name) entry.name = t.function.name;
            entry.arguments += t.function?.arguments ?? "";
          }
        }
      return { calls, content, finish };
    };

    /**
     * Calls forced by the bias: the calls token first (this random model would not choose
     * it), one call (the calls-end token as soon as allowed), closing quotes and braces
     * favoured so that the arguments end.
     */
    const oneCall = () => ({
      model: "tiny",
      messages: user("Weather in Paris?"),
      max_tokens: 120,
      temperature: 1,
      seed: 11,
      n: 4,
      tools: [fn("noop"), weather],
      logit_bias: {
        [id(CALLS_BEGIN)]: 100,
        [id(CALLS_END)]: 100,
        [id('"')]: 4,
        [id("}")]: 4,
        ...ws(),
      },
    });

    it('"auto" with response_format: calls, or an answer in the format, as the first token chooses', async () => {
      const schema = {
        type: "object",
        properties: { answer: { type: "string" } },
        required: ["answer"],
        additionalProperties: false,
      };
      const format = {
        type: "json_schema" as const,
        json_schema: { name: "a", schema, strict: true },
      };
      // The calls token favoured: calls, as without the format.
      const calls = await gw.client.chat.completions.create({
        ...oneCall(),
        response_format: format,
      });
      for (const c of calls.choices) {
        expect(c.finish_reason, JSON.stringify(c.message)).toBe("tool_calls");
        expect(c.message.tool_calls).toHaveLength(1);
        JSON.parse(
          (c.message.tool_calls![0] as { function: { arguments: string } }).function.arguments,
        );
      }
      // The calls token ruled out: an instance of the schema (closers favoured so it ends).
      const body = {
        ...oneCall(),
        response_format: format,
        logit_bias: { [id(CALLS_BEGIN)]: -100, [id('"')]: 4, [id("}")]: 4, ...ws() },
      };
      const answers = await gw.client.chat.completions.create(body);
      for (const c of answers.choices) {
        expect(c.message.tool_calls ?? []).toHaveLength(0);
        if (c.finish_reason === "length") continue; // cut short: a prefix, not checked
        expect(c.finish_reason).toBe("stop");
        const v = JSON.parse(c.message.content!) as Record<string, unknown>;
        expect(Object.keys(v)).toEqual(["answer"]);
        expect(typeof v["answer"]).toBe("string");
      }
      expect(answers.choices.some((c) => c.finish_reason === "stop")).toBe(true);
      // Free sampling (no bias but whitespace): the first token is the calls token or the
      // start of the JSON answer in every choice, never free text.
      const free = await gw.client.chat.completions.create({
        ...oneCall(),
        response_format: format,
        logit_bias: ws(),
        max_tokens: 1,
        logprobs: true,
      });
      for (const c of free.choices) {
        const first = c.logprobs!.content![0]!.token;
        expect(first === CALLS_BEGIN || first.startsWith("{"), first).toBe(true);
      }
    });

    it('"auto": once the model writes the calls token, calls to the tools follow, answered as tool_calls', async () => {
      const body = oneCall();
      const r = await gw.client.chat.completions.create(body);
      for (const c of r.choices) {
        expect(c.finish_reason, JSON.stringify(c.message)).toBe("tool_calls");
        expect(c.message.content).toBeNull();
        expect(c.message.tool_calls).toHaveLength(1);
        for (const call of c.message.tool_calls!) {
          if (call.type !== "function") throw new Error("not a function call");
          expect(call.id).toMatch(/^call_/);
          expect(["noop", "get_weather"]).toContain(call.function.name);
          const args = JSON.parse(call.function.arguments) as Record<string, unknown>;
          if (call.function.name === "get_weather") {
            expect(Object.keys(args)).toEqual(["city", "days"]);
            expect(typeof args["city"]).toBe("string");
            expect(Number.isInteger(args["days"]) && (args["days"] as number) >= 1).toBe(true);
          }
        }
      }
      // Streamed (same seed): the same calls, in deltas (a header with id and name, then
      // the arguments in pieces), no content.
      const s = await streamed(body);
      for (const c of r.choices) {
        expect(s.finish.get(c.index)).toBe("tool_calls");
        expect(s.content.get(c.index)).toBe("");
        const got = s.calls.get(c.index)!;
        expect(got.map((x) => [x.name, x.arguments])).toEqual(
          c.message.tool_calls!.map((x) =>
            x.type === "function" ? [x.function.name, x.function.arguments] : [],
          ),
        );
        for (const x of got) expect(x.id).toMatch(/^call_/);
      }
      // The openai client's own stream accumulator (what SDK users call) rebuilds the same
      // message from the deltas.
      const final = await gw.client.chat.completions
        .stream({ ...body, n: 1 } as OpenAI.ChatCompletionCreateParamsStreaming)
        .finalChatCompletion();
      const first = r.choices[0]!.message.tool_calls!.map((x) =>
        x.type === "function" ? [x.function.name, x.function.arguments] : [],
      );
      expect(final.choices[0]!.finish_reason).toBe("tool_calls");
      expect(
        final.choices[0]!.message.tool_calls!.map((x) =>
          x.type === "function" ? [x.function.name, x.function.arguments] : [],
        ),
      ).toEqual(first);
      expect(final.choices[0]!.message.tool_calls![0]!.id).toMatch(/^call_/);
      // A stop string inside the arguments cuts the call: "stop", not "tool_calls".
      const cut = await gw.client.chat.completions.create({
        ...body,
        n: 1,
        tools: [weather],
        stop: ['"city"'],
      });
      expect(cut.choices[0]!.finish_reason).toBe("stop");
      expect(
        cut.choices[0]!.message.tool_calls!.map((x) =>
          x.type === "function" ? [x.function.name, x.function.arguments] : [],
        ),
      ).toEqual([["get_weather", "{"]]);
      // Left to itself this model writes text: content, never the calls token as text.
      const text = await gw.client.chat.completions.create({
        ...body,
        logit_bias: { [id(CALLS_BEGIN)]: -100 },
        max_tokens: 30,
      });
      for (const c of text.choices) {
        expect(c.message.tool_calls ?? []).toEqual([]);
        expect(["stop", "length"]).toContain(c.finish_reason);
        expect(c.message.content).not.toContain(CALLS_BEGIN);
      }
    });

    it("--tool-call-parser deepseek-v3.1: calls in V3.1's format (name, then raw JSON)", async () => {
      const v31 = await startGateway(dir, { toolCallParser: "deepseek-v3.1" });
      try {
        const body = { ...oneCall(), n: 3, logprobs: true };
        const r = await v31.client.chat.completions.create(body);
        for (const c of r.choices) {
          expect(c.finish_reason, JSON.stringify(c.message)).toBe("tool_calls");
          expect(c.message.tool_calls).toHaveLength(1);
          const call = c.message.tool_calls![0]!;
          if (call.type !== "function") throw new Error("not a function call");
          JSON.parse(call.function.arguments);
          // The text the model wrote, token by token: V3.1's format, no "function" type and
          // no json block.
          const raw = c.logprobs!.content!.map((t) => t.token).join("");
          expect(raw).toBe(
            `${CALLS_BEGIN}${formatCall("deepseek-v3.1", call.function.name, call.function.arguments)}${CALLS_END}`,
          );
        }
        // Streamed: the same calls.
        const s = await streamed({ ...body, logprobs: false }, v31);
        for (const c of r.choices)
          expect(s.calls.get(c.index)!.map((x) => [x.name, x.arguments])).toEqual(
            c.message.tool_calls!.map((x) =>
              x.type === "function" ? [x.function.name, x.function.arguments] : [],
            ),
          );
      } finally {
        await v31.close();
      }
    });

    it("parallel_tool_calls: several calls in a turn, or exactly one", async () => {
      const body = {
        model: "tiny",
        messages: user("Ping twice"),
        max_tokens: 80,
        temperature: 1,
        seed: 2,
        n: 2,
        tools: [fn("noop"), fn("ping", { type: "object", properties: {} })],
        tool_choice: "required" as const,
        // After each call, another one whenever the grammar allows it.
        logit_bias: { [id(CALL_BEGIN)]: 100, [id("}")]: 6, ...ws() },
      };
      const many = await gw.client.chat.completions.create(body);
      for (const c of many.choices) {
        // It never stops calling: cut at max_tokens, the last call maybe unfinished.
        expect(c.finish_reason).toBe("length");
        const calls = c.message.tool_calls!;
        expect(calls.length).toBeGreaterThanOrEqual(2);
        for (const call of calls.slice(0, -1))
          if (call.type === "function") expect(JSON.parse(call.function.arguments)).toEqual({});
      }
      const one = await gw.client.chat.completions.create({ ...body, parallel_tool_calls: false });
      for (const c of one.choices) {
        expect(c.finish_reason).toBe("tool_calls");
        expect(c.message.tool_calls).toHaveLength(1);
      }
    });

    it("a conversation with calls and their results renders in DeepSeek's format", async () => {
      const messages = [
        { role: "user" as const, content: "Weather in Paris?" },
        {
          role: "assistant" as const,
          content: null,
          tool_calls: [
            {
              id: "call_1",
              type: "function" as const,
              function: { name: "get_weather", arguments: '{"city": "Paris", "days": 1}' },
            },
          ],
        },
        { role: "tool" as const, tool_call_id: "call_1", content: "sunny" },
      ];
      const r = await gw.client.chat.completions.create({
        model: "tiny",
        messages,
        tools: [weather],
        tool_choice: "none",
        max_tokens: 4,
        temperature: 0,
      });
      expect(r.choices[0]!.message.tool_calls ?? []).toEqual([]);
      const expected = gw.ctx.tokenizer.encodeChat(
        messages.map((m) => ({ ...m }) as never),
        true,
      );
      const text = gw.ctx.tokenizer.decode(expected);
      expect(text).toContain(
        `${CALLS_BEGIN}${CALL_BEGIN}function<｜tool▁sep｜>get_weather\n\`\`\`json\n{"city": "Paris", "days": 1}\n\`\`\`<｜tool▁call▁end｜><｜tool▁calls▁end｜>`,
      );
      expect(
        text.endsWith("<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"),
      ).toBe(true);
      // The template also names the tools (the tiny one does; V3's leaves that to the
      // gateway: tool-calls.test.ts).
      const withTools = gw.ctx.tokenizer.encode(
        gw.ctx.tokenizer.applyChatTemplate(messages as never, true, { tools: [weather] }),
        false,
      );
      expect(r.usage!.prompt_tokens).toBe(withTools.length);
    });
  });

  describe("with --reasoning-parser deepseek-r1", () => {
    let r1: TestGateway;
    beforeAll(async () => {
      r1 = await startGateway(dir, { reasoningParser: "deepseek-r1" });
    });
    afterAll(async () => {
      await r1?.close();
    });
    const body = {
      model: "tiny",
      messages: user("What is 2 + 2?"),
      max_tokens: 12,
      temperature: 0,
    };
    type Thinking = { content: string | null; reasoning_content?: string };

    it("answers the thinking as reasoning_content: never closed here, all of it", async () => {
      const plain = (await gw.client.chat.completions.create(body)).choices[0]!.message.content!;
      const r = await r1.client.chat.completions.create(body);
      const m = r.choices[0]!.message as unknown as Thinking;
      // This random model never writes </think>: R1 thinks first, so all is thinking.
      expect(plain).not.toContain("</think>");
      expect(m.reasoning_content).toBe(plain);
      expect(m.content).toBe("");
      // The thinking's tokens in the usage (its text encoded again); none without a parser.
      const reasoning = { reasoning_tokens: r1.ctx.tokenizer.encode(plain, false).length };
      expect(r.usage!.completion_tokens_details).toEqual(reasoning);
      expect(reasoning.reasoning_tokens).toBeGreaterThan(0);
      expect((await gw.client.chat.completions.create(body)).usage).not.toHaveProperty(
        "completion_tokens_details",
      );
      let thought = "";
      let content = "";
      let usage: OpenAI.CompletionUsage | undefined;
      for await (const chunk of await r1.client.chat.completions.create({
        ...body,
        stream: true,
      })) {
        for (const c of chunk.choices) {
          const d = c.delta as unknown as Thinking;
          thought += d.reasoning_content ?? "";
          content += d.content ?? "";
        }
        if (chunk.usage) usage = chunk.usage;
      }
      expect([thought, content]).toEqual([plain, ""]);
      expect(usage!.completion_tokens_details).toEqual(reasoning);
    });

    it("thinks before a grammar's answer: the structure applies after </think>", async () => {
      const json = { ...body, response_format: { type: "json_object" as const } };
      const r = await r1.client.chat.completions.create(json);
      const m = r.choices[0]!.message as unknown as Thinking;
      // This model never closes its thought within 12 tokens: all thinking, no answer yet
      // (without the parser the same request answers JSON at once).
      expect(r.choices[0]!.finish_reason).toBe("length");
      expect(m.reasoning_content!.length).toBeGreaterThan(0);
      expect(m.reasoning_content).not.toContain("</think>");
      expect(m.content).toBe("");
      const plain = await gw.client.chat.completions.create(json);
      expect(plain.choices[0]!.message.content!.trimStart().startsWith("{")).toBe(true);
    });
  });

  describe("with --reasoning-parser deepseek-v3 (V3.1's hybrid thinking)", () => {
    let v31: TestGateway;
    beforeAll(async () => {
      v31 = await startGateway(dir, { reasoningParser: "deepseek-v3" });
    });
    afterAll(async () => {
      await v31?.close();
    });
    type Thinking = { content: string | null; reasoning_content?: string };
    const ask = (kwargs?: object) =>
      v31.client.chat.completions.create({
        model: "tiny",
        messages: user("What is 2 + 2?"),
        max_tokens: 12,
        temperature: 0,
        ...(kwargs ? ({ chat_template_kwargs: kwargs } as object) : {}),
      });
    const tokenize = async (kwargs?: object) =>
      (
        (await (
          await fetch(`${v31.url}/tokenize`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({
              messages: user("What is 2 + 2?"),
              ...(kwargs ? { chat_template_kwargs: kwargs } : {}),
            }),
          })
        ).json()) as { tokens: number[] }
      ).tokens;

    it("thinks only when the request sets thinking: the template's switch and the split", async () => {
      const text = (ids: number[]) => v31.ctx.tokenizer.decode(ids);
      // The template opens the answer with <think> or </think> as the request asks.
      expect(text(await tokenize({ thinking: true }))).toMatch(/<｜Assistant｜><think>$/);
      expect(text(await tokenize({ thinking: false }))).toMatch(/<｜Assistant｜><\/think>$/);
      expect(text(await tokenize())).toMatch(/<｜Assistant｜>$/);
      // Not thinking (no kwargs, or false): all content, as without a parser.
      const plain = (await ask()).choices[0]!.message as unknown as Thinking;
      expect(plain.content!.length).toBeGreaterThan(0);
      expect(plain.reasoning_content).toBeUndefined();
      const off = (await ask({ thinking: false })).choices[0]!.message as unknown as Thinking;
      expect(off.reasoning_content).toBeUndefined();
      // Thinking: never closed by this random model within 12 tokens, so all reasoning.
      const on = (await ask({ thinking: true })).choices[0]!.message as unknown as Thinking;
      expect(on.content).toBe("");
      expect(on.reasoning_content!.length).toBeGreaterThan(0);
      // The prompt differs (<think>), so the text does too: the same as the R1 parser's
      // reading of the same prompt's output.
      const r1 = await startGateway(dir, { reasoningParser: "deepseek-r1" });
      try {
        const same = await r1.client.chat.completions.create({
          model: "tiny",
          messages: user("What is 2 + 2?"),
          max_tokens: 12,
          temperature: 0,
          chat_template_kwargs: { thinking: true },
        } as OpenAI.ChatCompletionCreateParamsNonStreaming);
        expect(same.choices[0]!.message).toEqual(on);
      } finally {
        await r1.close();
      }
    });

    it("reasoning_effort (OpenAI's) asks it to think as the template's switch does; the kwargs win", async () => {
      const withEffort = (effort: string, kwargs?: object) =>
        v31.client.chat.completions.create({
          model: "tiny",
          messages: user("What is 2 + 2?"),
          max_tokens: 12,
          temperature: 0,
          reasoning_effort: effort,
          ...(kwargs ? { chat_template_kwargs: kwargs } : {}),
        } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      const on = (await ask({ thinking: true })).choices[0]!.message;
      const plain = (await ask()).choices[0]!.message;
      expect(on).not.toEqual(plain);
      for (const effort of ["low", "medium", "high"])
        expect((await withEffort(effort)).choices[0]!.message).toEqual(on);
      for (const effort of ["none", "minimal"])
        expect((await withEffort(effort)).choices[0]!.message).toEqual(plain);
      const off = (await ask({ thinking: false })).choices[0]!.message;
      expect((await withEffort("high", { thinking: false })).choices[0]!.message).toEqual(off);
    });

    it("refuses template variables the gateway sets, and kwargs that are no object", async () => {
      for (const kwargs of [{ add_generation_prompt: false }, { messages: [] }]) {
        const err = await ask(kwargs).catch((e) => e);
        expectApiError(
          err,
          OpenAI.BadRequestError,
          "invalid_request_error",
          "EM_GATEWAY_BAD_REQUEST",
          "chat_template_kwargs",
        );
        expect(err.message).toMatch(/is set by the gateway/);
      }
      const err = await v31.client.chat.completions
        .create({
          model: "tiny",
          messages: user("hi"),
          chat_template_kwargs: "thinking",
        } as unknown as OpenAI.ChatCompletionCreateParamsNonStreaming)
        .catch((e) => e);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    });
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
  it("vLLM's bad_words: the word's last token is not sampled where the output would complete it", async () => {
    const tk = gw.ctx.tokenizer;
    const body = { model: "tiny", prompt: "Hi", max_tokens: 16, temperature: 0, logprobs: 0 };
    const tokensOf = async (extra: object) =>
      ((await gw.client.completions.create({ ...body, ...extra } as never)) as OpenAI.Completion)
        .choices[0]!.logprobs!.tokens!;
    const full = await tokensOf(ignoreEos);
    // A token of the greedy answer that is one printable word, alone or after a space.
    const k = full.findIndex((t) => {
      const w = t.trimStart();
      return (
        /^[\x21-\x7e]+$/.test(w) &&
        [w, ` ${w}`].some((x) => {
          const ids = tk.encode(x, false);
          return ids.length === 1 && tk.decode(ids) === t;
        })
      );
    });
    expect(k).toBeGreaterThanOrEqual(0);
    const word = full[k]!.trim();
    const banned = await tokensOf({ ...ignoreEos, bad_words: [word] });
    expect(banned.slice(0, k)).toEqual(full.slice(0, k));
    expect(banned[k]).not.toBe(full[k]);
    expect(banned.map((t) => t.trim())).not.toContain(word);
  });

  it("vLLM's return_tokens_as_token_ids: logprobs name tokens token_id:<id>, on chat and completions, streamed or not", async () => {
    const tk = gw.ctx.tokenizer;
    const idOf = (name: string) => {
      expect(name).toMatch(/^token_id:\d+$/);
      return Number(name.slice("token_id:".length));
    };
    const chatBody = {
      model: "tiny",
      messages: user("Count"),
      max_tokens: 6,
      temperature: 0,
      logprobs: true,
      top_logprobs: 2,
    };
    const plain = (await gw.client.chat.completions.create(chatBody)).choices[0]!.logprobs!
      .content!;
    const named = (
      await gw.client.chat.completions.create({
        ...chatBody,
        return_tokens_as_token_ids: true,
      } as never)
    ).choices[0]!.logprobs!.content!;
    expect(named.map((t) => tk.decode([idOf(t.token)]))).toEqual(plain.map((t) => t.token));
    expect(named.map((t) => t.logprob)).toEqual(plain.map((t) => t.logprob));
    expect(Buffer.from(named[0]!.bytes!).toString()).toBe(named[0]!.token);
    expect(named[0]!.top_logprobs.map((t) => tk.decode([idOf(t.token)]))).toEqual(
      plain[0]!.top_logprobs.map((t) => t.token),
    );
    const body = { model: "tiny", prompt: "Count", max_tokens: 6, temperature: 0, logprobs: 2 };
    const text = (await gw.client.completions.create(body)).choices[0]!;
    const ids = (
      (await gw.client.completions.create({
        ...body,
        return_tokens_as_token_ids: true,
      } as never)) as OpenAI.Completion
    ).choices[0]!;
    expect(ids.text).toBe(text.text);
    expect(ids.logprobs!.tokens!.map((t) => tk.decode([idOf(t)]))).toEqual(text.logprobs!.tokens);
    expect(ids.logprobs!.text_offset).toEqual(text.logprobs!.text_offset);
    for (const top of ids.logprobs!.top_logprobs!) for (const k of Object.keys(top!)) idOf(k);
    // Streamed: the same names.
    const stream = await gw.client.completions.create({
      ...body,
      stream: true,
      return_tokens_as_token_ids: true,
    } as never);
    const streamed: string[] = [];
    for await (const chunk of stream as unknown as AsyncIterable<OpenAI.Completion>)
      streamed.push(...(chunk.choices[0]?.logprobs?.tokens ?? []));
    expect(streamed).toEqual(ids.logprobs!.tokens);
  });

  it("vLLM's include_stop_str_in_output, skip_special_tokens and allowed_token_ids; fields it cannot honour refused (beam search, audio)", async () => {
    const greedy = { model: "tiny", prompt: "Hi", max_tokens: 24, temperature: 0, ...ignoreEos };
    const text = (extra: object) =>
      gw.client.completions
        .create({ ...greedy, ...extra } as never)
        .then((r) => (r as OpenAI.Completion).choices[0]!.text);
    const full = await text({});
    const stop = full.slice(4, 6);
    const at = full.indexOf(stop);
    expect(await text({ stop: [stop] })).toBe(full.slice(0, at));
    expect(await text({ stop: [stop], include_stop_str_in_output: true })).toBe(
      full.slice(0, at + stop.length),
    );
    // Special tokens: left out by default (the tool-call ones apart, which parsers read);
    // kept with skip_special_tokens false. Past its end-of-sequence (ignore_eos) this
    // random model writes some.
    const tk = gw.ctx.tokenizer;
    const special = tk.addedTokens
      .map((t) => t.content)
      .filter((t) => t.startsWith("<｜") && !t.includes("tool"));
    const kept = await text({ skip_special_tokens: false, max_tokens: 60 });
    expect(special.some((t) => kept.includes(t))).toBe(true);
    let stripped = kept;
    for (const t of special) stripped = stripped.replaceAll(t, "");
    expect(stripped).toBe(await text({ max_tokens: 60 }));
    // allowed_token_ids: only those tokens, at any temperature.
    const allowed = ["a", "b", " c"].map((t) => tk.encode(t, false)[0]!);
    const sampled = await text({ temperature: 1.5, seed: 4, allowed_token_ids: allowed });
    expect(sampled).toMatch(/^(a|b| c)+$/);
    expect(sampled).not.toBe(full);
    const outside = await gw.client.completions
      .create({ ...greedy, allowed_token_ids: [gw.ctx.vocabSize] } as never)
      .catch((e: APIError) => e);
    expect((outside as APIError).status).toBe(400);
    expect((outside as APIError).param).toBe("allowed_token_ids");
    // Constraints that leave no token together: a 400 naming them, not a pick from a row of
    // -inf: tokens outside a guided choice's; only the EOS while min_tokens holds it back.
    // Streamed, the error ends the stream.
    const conflicts = [
      [{ allowed_token_ids: allowed, guided_choice: ["xyz"] }, /the output's format/],
      [{ allowed_token_ids: [tk.eosTokenId!], min_tokens: 2, ignore_eos: false }, /min_tokens/],
    ] as const;
    for (const [extra, names] of conflicts) {
      const e = await gw.client.completions
        .create({ ...greedy, ...extra } as never)
        .catch((err: APIError) => err);
      expect(e, JSON.stringify(extra)).toBeInstanceOf(OpenAI.BadRequestError);
      expect((e as APIError).message).toMatch(/no token is left to sample at output position 0/);
      expect((e as APIError).message).toMatch(names);
      expect((e as APIError).param).toBe("allowed_token_ids");
    }
    const stream = await gw.client.completions.create({
      ...greedy,
      ...conflicts[0][0],
      stream: true,
    } as never);
    const streamed = await (async () => {
      for await (const _ of stream as unknown as AsyncIterable<unknown>);
    })().catch((err: Error) => err);
    expect((streamed as Error).message).toMatch(/no token is left to sample/);
    // The gateway goes on serving.
    expect(await text({})).toBe(full);
    // vLLM's fields that would change the answer and are not implemented: refused, not
    // ignored; their off values pass.
    for (const [field, on, off] of [
      ["use_beam_search", true, false],
      ["logits_processors", ["p"], []],
    ] as const) {
      const e = await gw.client.completions
        .create({ ...greedy, max_tokens: 1, [field]: on } as never)
        .catch((err: APIError) => err);
      expect((e as APIError).status, field).toBe(400);
      expect((e as APIError).param, field).toBe(field);
      expect(await text({ max_tokens: 1, [field]: off })).toBe(await text({ max_tokens: 1 }));
    }
    // Output a text model cannot write (OpenAI's audio): refused, naming the field; text
    // alone passes.
    const chat = { model: "tiny", max_tokens: 1, messages: [{ role: "user", content: "hi" }] };
    for (const [field, value] of [
      ["modalities", ["text", "audio"]],
      ["audio", { voice: "alloy", format: "wav" }],
    ] as const) {
      const e = await gw.client.chat.completions
        .create({ ...chat, [field]: value } as never)
        .catch((err: APIError) => err);
      expect((e as APIError).status, field).toBe(400);
      expect((e as APIError).param, field).toBe(field);
    }
    const textOnly = await gw.client.chat.completions.create({
      ...chat,
      modalities: ["text"],
    } as never);
    expect((textOnly as OpenAI.ChatCompletion).choices).toHaveLength(1);
  });

  it("truncate_prompt_tokens (vLLM's): only the prompt's last k tokens, also past the context", async () => {
    const text = "one two three four five six seven eight nine ten";
    const ids = gw.ctx.tokenizer.encode(text);
    const greedy = { model: "tiny", max_tokens: 5, temperature: 0 } as const;
    const cut = await gw.client.completions.create({
      ...greedy,
      prompt: text,
      echo: true,
      truncate_prompt_tokens: 3,
    } as never);
    const last3 = await gw.client.completions.create({ ...greedy, prompt: ids.slice(-3) });
    expect(cut.usage!.prompt_tokens).toBe(3);
    // The text of the last 3 tokens is echoed, and the answer is theirs.
    const echoed = gw.ctx.tokenizer.decode(ids.slice(-3), true);
    expect(cut.choices[0]!.text).toBe(echoed + last3.choices[0]!.text);
    // A prompt longer than the context fits once truncated; -1 keeps a context's worth.
    const long = "word ".repeat(gw.ctx.maxModelLen + 50);
    const fits = await gw.client.completions.create({
      ...greedy,
      prompt: long,
      truncate_prompt_tokens: 20,
    } as never);
    expect(fits.usage!.prompt_tokens).toBe(20);
    const whole = await gw.client.completions
      .create({ ...greedy, prompt: long, truncate_prompt_tokens: -1 } as never)
      .then(
        () => null,
        (e: unknown) => e,
      );
    // A context's worth of prompt leaves no room for max_tokens.
    expect(whole).toBeInstanceOf(OpenAI.BadRequestError);
    expect((whole as Error).message).toMatch(
      new RegExp(`the prompt has ${gw.ctx.maxModelLen} tokens and max_tokens is 5`),
    );
    // Chat: the rendered conversation's last tokens.
    const chat = await gw.client.chat.completions.create({
      ...greedy,
      messages: user(long),
      truncate_prompt_tokens: 12,
    } as never);
    expect(chat.usage!.prompt_tokens).toBe(12);
    const zero = await gw.client.completions
      .create({ ...greedy, prompt: text, truncate_prompt_tokens: 0 } as never)
      .then(
        () => null,
        (e: unknown) => e,
      );
    expect(zero).toBeInstanceOf(OpenAI.BadRequestError);
    expect((zero as InstanceType<typeof OpenAI.BadRequestError>).param).toBe(
      "truncate_prompt_tokens",
    );
  });

  it("prompt_logprobs (vLLM's): each prompt token's logprob and rank, and the top tokens", async () => {
    type Entry = { logprob: number; rank: number; decoded_token: string };
    type WithPrompt = { prompt_logprobs: (Record<string, Entry> | null)[] };
    const prompt = "The quick brown fox jumps over the lazy dog";
    const ids = gw.ctx.tokenizer.encode(prompt);
    const body = { model: "tiny", prompt, max_tokens: 2, temperature: 0 } as const;
    const r = await gw.client.completions.create({ ...body, prompt_logprobs: 2 } as never);
    const got = (r.choices[0] as unknown as WithPrompt).prompt_logprobs;
    // The same logprobs as echo with logprobs (which has no ranks).
    const echo = await gw.client.completions.create({ ...body, echo: true, logprobs: 2 });
    const want = echo.choices[0]!.logprobs!.token_logprobs!.slice(0, ids.length);
    expect(got).toHaveLength(ids.length);
    expect(got[0]).toBeNull();
    for (let i = 1; i < ids.length; i++) {
      const e = got[i]!;
      const own = e[ids[i]!]!;
      expect(own.logprob).toBeCloseTo(want[i]!, 9);
      expect(own.decoded_token).toBe(gw.ctx.tokenizer.decode([ids[i]!]));
      // Top 2 by rank; the prompt token's rank agrees with them.
      const top = Object.entries(e)
        .filter(([id, x]) => Number(id) !== ids[i] || x.rank <= 2)
        .sort((a, b) => a[1].rank - b[1].rank);
      expect(top.map(([, x]) => x.rank).slice(0, 2)).toEqual([1, 2]);
      expect(top[0]![1].logprob).toBeGreaterThanOrEqual(top[1]![1].logprob);
      if (own.rank > 2) expect(own.logprob).toBeLessThanOrEqual(top[1]![1].logprob);
      else expect(top[own.rank - 1]![0]).toBe(String(ids[i]));
      expect(Object.keys(e).length).toBe(own.rank > 2 ? 3 : 2);
    }
    // Chat: for the rendered conversation, at the top of the answer.
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("hi"),
      max_tokens: 2,
      prompt_logprobs: 0,
    } as never);
    const chatLps = (chat as unknown as WithPrompt).prompt_logprobs;
    expect(chatLps).toHaveLength(chat.usage!.prompt_tokens);
    expect(chatLps.slice(1).every((e) => e !== null && Object.keys(e).length === 1)).toBe(true);
    // Not with stream; at most 20.
    for (const extra of [{ stream: true }, { prompt_logprobs: 21 }]) {
      const err = await gw.client.completions
        .create({ ...body, prompt_logprobs: 1, ...extra } as never)
        .then(
          () => null,
          (e: unknown) => e,
        );
      expect(err, JSON.stringify(extra)).toBeInstanceOf(OpenAI.BadRequestError);
    }
  });

  it("min_tokens and stop_token_ids (vLLM's extra parameters)", async () => {
    const eos = gw.ctx.tokenizer.eosTokenId!;
    const a = gw.ctx.tokenizer.encode("a", false)[0]!;
    const ask = (extra: object) =>
      gw.client.completions.create({
        model: "tiny",
        prompt: "Count:",
        max_tokens: 20,
        temperature: 0,
        ...extra,
      } as OpenAI.CompletionCreateParamsNonStreaming);
    // EOS favoured: it ends the choice at once, or after min_tokens.
    const ttft = () => metric(gw.url, "expertmesh_gateway_time_to_first_token_seconds_count");
    const ttftBefore = await ttft();
    const atOnce = await ask({ logit_bias: { [eos]: 100 } });
    expect([atOnce.usage!.completion_tokens, atOnce.choices[0]!.finish_reason]).toEqual([
      0,
      "stop",
    ]);
    // Its first sampled token (EOS) still came after a time to first token, as vLLM counts it.
    expect((await ttft()) - ttftBefore).toBe(1);
    const five = await ask({ logit_bias: { [eos]: 100 }, min_tokens: 5 });
    expect([five.usage!.completion_tokens, five.choices[0]!.finish_reason]).toEqual([5, "stop"]);
    // A token of stop_token_ids ends it like EOS (not in the text); with min_tokens, after.
    const stopA = await ask({ logit_bias: { [a]: 100 }, stop_token_ids: [a] });
    expect([stopA.usage!.completion_tokens, stopA.choices[0]!.text]).toEqual([0, ""]);
    const later = await ask({ logit_bias: { [a]: 100 }, stop_token_ids: [a], min_tokens: 3 });
    expect([later.usage!.completion_tokens, later.choices[0]!.finish_reason]).toEqual([3, "stop"]);
    expect(later.choices[0]!.text).not.toContain("a");
    // Without it, the favoured token fills max_tokens.
    const all = await ask({ logit_bias: { [a]: 100 } });
    expect(all.choices[0]!.text).toBe("a".repeat(20));
  });

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
      // Prompt logprobs need every prompt row computed: nothing from the prefix cache.
      prompt_tokens_details: { cached_tokens: 0 },
      prompt_cache_hit_tokens: 0,
      prompt_cache_miss_tokens: ids.length,
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

  it("streams the echoed prompt with its logprobs, the same as without streaming", async () => {
    const body = {
      model: "tiny",
      prompt: "The cat sat on the mat",
      max_tokens: 6,
      temperature: 0,
      logprobs: 2,
      echo: true,
    };
    const whole = (await gw.client.completions.create(body)).choices[0]!;
    const parts: OpenAI.CompletionChoice[] = [];
    for await (const chunk of await gw.client.completions.create({ ...body, stream: true }))
      parts.push(...chunk.choices);
    // First the prompt, with one entry per prompt token: null for the first (nothing
    // predicts it), a logprob and the top 2 for the others.
    const ids = gw.ctx.tokenizer.encode(body.prompt);
    const echo = parts[0]!;
    expect(echo.text).toBe(body.prompt);
    expect(echo.logprobs!.tokens).toHaveLength(ids.length);
    expect(echo.logprobs!.token_logprobs![0]).toBeNull();
    expect(echo.logprobs!.top_logprobs![0]).toBeNull();
    for (const v of echo.logprobs!.token_logprobs!.slice(1)) expect(v).toBeLessThanOrEqual(0);
    for (const t of echo.logprobs!.top_logprobs!.slice(1))
      expect(Object.keys(t!).length).toBeGreaterThan(0);
    // All the chunks together: the text and logprobs of the answer without streaming.
    const joined = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] } as Record<
      string,
      unknown[]
    >;
    for (const p of parts)
      for (const [k, v] of Object.entries(p.logprobs ?? {})) joined[k]!.push(...(v as unknown[]));
    expect(parts.map((p) => p.text).join("")).toBe(whole.text);
    expect(joined).toEqual(whole.logprobs);
    expect(joined["tokens"]).toHaveLength(ids.length + 6);
    expect(parts.at(-1)!.finish_reason).toBe(whole.finish_reason);
  });

  it("encodes a long prompt on the tokenizer worker to the ids this thread gets", async () => {
    const prompt =
      "Naïve café owners in Zürich — and 東京 too — said: <tag> 'quotes', numbers 12345, " +
      "tabs\tand\nnewlines; the quick brown fox jumps over the lazy dog!";
    expect(Buffer.byteLength(prompt)).toBeGreaterThan(64);
    const ids = gw.ctx.tokenizer.encode(prompt);
    const before = gw.ctx.encoder.stats.offloaded;
    const body = { model: "tiny", max_tokens: 4, temperature: 0, logprobs: 1, echo: true };
    const byText = await gw.client.completions.create({ ...body, prompt });
    expect(gw.ctx.encoder.stats.offloaded).toBe(before + 1);
    expect(await metric(gw.url, "expertmesh_gateway_tokenizer_workers")).toBe(1);
    const encoded = await samples(`${gw.url}/metrics`, "expertmesh_gateway_prompts_encoded");
    expect(encoded.find((e) => e.labels["where"] === "worker")?.value).toBe(before + 1);
    const byIds = await gw.client.completions.create({ ...body, prompt: ids });
    expect(byText.usage!.prompt_tokens).toBe(ids.length);
    // Same ids, so the same echoed tokens, logprobs and greedy continuation.
    expect(byText.choices[0]!.logprobs!.tokens).toEqual(byIds.choices[0]!.logprobs!.tokens);
    expect(byText.choices[0]!.logprobs!.token_logprobs).toEqual(
      byIds.choices[0]!.logprobs!.token_logprobs,
    );
  });

  it("a long chat sent again with a turn more: its earlier pieces kept encoded (/metrics), its tokens the whole chat's", async () => {
    const cached = async () =>
      (await samples(`${gw.url}/metrics`, "expertmesh_gateway_prompt_piece_tokens")).find(
        (e) => e.labels["result"] === "cached",
      )?.value ?? 0;
    const tokenize = async (
      messages: { role: "system" | "user" | "assistant"; content: string }[],
    ) => {
      const res = await fetch(`${gw.url}/tokenize`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "tiny", messages, add_generation_prompt: true }),
      });
      expect(res.status).toBe(200);
      const { tokens } = (await res.json()) as { tokens: number[] };
      expect(tokens).toEqual(gw.ctx.tokenizer.encodeChat(messages, true));
      return tokens;
    };
    const chat = [
      { role: "system" as const, content: "Be brief. ".repeat(400) },
      { role: "user" as const, content: "What do foxes eat? ".repeat(250) },
    ];
    await tokenize(chat);
    const before = await cached();
    const more = [
      ...chat,
      { role: "assistant" as const, content: "Mice." },
      { role: "user" as const, content: "And?" },
    ];
    const ids = await tokenize(more);
    expect((await cached()) - before).toBeGreaterThan(ids.length / 2);
  });

  it("samples greedily below temperature 1e-5, and takes a top_p below float32's range", async () => {
    const body = { model: "tiny", prompt: "The cat sat on", max_tokens: 6, ignore_eos: true };
    const greedy = (await gw.client.completions.create({ ...body, temperature: 0 })).choices[0]!
      .text;
    // 1e-40 is a float32 denormal: logits / T overflowed to infinity, and the draws were noise.
    for (const [temperature, seed] of [
      [1e-40, 1],
      [1e-40, 2],
      [9e-6, 3],
    ] as const) {
      const r = await gw.client.completions.create({ ...body, temperature, seed } as never);
      expect(r.choices[0]!.text, `temperature ${temperature}`).toBe(greedy);
    }
    // 1e-320 is 0 in float32, which the sampler refused (500 before): it keeps the top token.
    const tiny = await gw.client.completions.create({ ...body, temperature: 1, top_p: 1e-320 });
    expect(tiny.choices[0]!.text).toBe(greedy);
  });

  it("applies logit_bias: +100 forces a token, -100 bans the greedy one", async () => {
    const body = {
      model: "tiny",
      prompt: "The cat sat on",
      max_tokens: 4,
      temperature: 0,
      logprobs: 0,
    };
    const plain = await gw.client.completions.create(body);
    const greedy = plain.choices[0]!.logprobs!.tokens![0]!;
    const forced = gw.ctx.tokenizer.encode(" fox", false)[0]!;
    const [pushed, banned] = await Promise.all([
      gw.client.completions.create({ ...body, logit_bias: { [String(forced)]: 100 } }),
      gw.client.completions.create({
        ...body,
        logit_bias: { [String(gw.ctx.tokenizer.encode(greedy, false)[0]!)]: -100 },
      }),
    ]);
    expect(pushed.choices[0]!.logprobs!.tokens).toEqual(
      Array(4).fill(gw.ctx.tokenizer.decode([forced])),
    );
    expect(banned.choices[0]!.logprobs!.tokens![0]).not.toBe(greedy);
    // Text-only requests with these fields set to "nothing" are served as usual.
    const same = await gw.client.completions.create({
      ...body,
      suffix: "",
      best_of: 1,
    } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(same.choices[0]!.text).toBe(plain.choices[0]!.text);
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

  it("a batch of prompts gives each prompt's n choices, as requests of one prompt do", async () => {
    const texts = ["The cat sat on", "Once upon a time", "word 6 and 42"];
    const body = { model: "tiny", n: 2, max_tokens: 6, temperature: 0.9, seed: 11, logprobs: 1 };
    const alone = await Promise.all(
      texts.map((prompt) => gw.client.completions.create({ ...body, prompt })),
    );
    const batch = await gw.client.completions.create({ ...body, prompt: texts });
    // Indexed prompt * n + choice; the same seed samples the same text per choice.
    expect(batch.choices.map((c) => c.index)).toEqual([0, 1, 2, 3, 4, 5]);
    for (const [p, one] of alone.entries())
      for (const c of one.choices) {
        const got = batch.choices[p * 2 + c.index]!;
        expect(got.text).toBe(c.text);
        expect(got.logprobs!.tokens).toEqual(c.logprobs!.tokens);
      }
    // Choices of one prompt differ (their seeds do), so the check above pairs them right.
    expect(alone.some((r) => r.choices[0]!.text !== r.choices[1]!.text)).toBe(true);
    const sum = (f: (r: OpenAI.Completion) => number) => alone.reduce((s, r) => s + f(r), 0);
    expect(batch.usage!.prompt_tokens).toBe(sum((r) => r.usage!.prompt_tokens));
    expect(batch.usage!.completion_tokens).toBe(sum((r) => r.usage!.completion_tokens));

    // Token ids, echoed and streamed: every choice's chunks add up to the answer's text.
    const ids = texts.map((t) => gw.ctx.tokenizer.encode(t));
    const greedy = { model: "tiny", max_tokens: 5, temperature: 0, echo: true };
    const whole = await gw.client.completions.create({ ...greedy, prompt: ids });
    expect(whole.choices.map((c) => c.text.slice(0, texts[c.index]!.length))).toEqual(texts);
    const streamed = new Map<number, string>();
    for await (const chunk of await gw.client.completions.create({
      ...greedy,
      prompt: ids,
      stream: true,
    }))
      for (const c of chunk.choices) streamed.set(c.index, (streamed.get(c.index) ?? "") + c.text);
    expect([...streamed.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1])).toEqual(
      whole.choices.map((c) => c.text),
    );
  });

  it("a batch of prompts is refused whole when one of them is bad", async () => {
    const refused = (prompt: unknown, extra: object = {}) =>
      gw.client.completions
        .create({ model: "tiny", max_tokens: 2, ...extra, prompt } as never)
        .then(
          () => expect.unreachable("accepted"),
          (e: APIError) => e,
        );
    const tooLong = await refused(["hi", "word ".repeat(400)]);
    expect([tooLong.status, tooLong.code, tooLong.param]).toEqual([
      400,
      "EM_GATEWAY_PROMPT_TOO_LONG",
      "prompt[1]",
    ]);
    const overMax = await refused(["hi", "word ".repeat(30)], { max_tokens: 250 });
    expect(overMax.message).toMatch(/prompt 1 has \d+ tokens and max_tokens is 250/);
    expect(overMax.param).toBe("max_tokens");
    const outside = await refused([
      [1, 2],
      [3, 10_000_000],
    ]);
    expect([outside.status, outside.param]).toEqual([400, "prompt[1]"]);
    for (const prompt of [[], ["a", [1, 2]], [[]], Array(65).fill("a")])
      expect((await refused(prompt)).status).toBe(400);
    // Nothing of a refused batch was left running.
    expect(await metric(gw.url, "expertmesh_gateway_num_requests_running")).toBe(0);
    expect(await metric(gw.url, "expertmesh_gateway_num_requests_waiting")).toBe(0);
  });
});

describe("tokenize and detokenize (vLLM's routes)", () => {
  const post = async (path: string, body: object) => {
    const r = await fetch(`${gw.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: r.status, body: (await r.json()) as any };
  };
  const weather = [
    {
      type: "function" as const,
      function: {
        name: "get_weather",
        parameters: { type: "object", properties: { city: { type: "string" } } },
      },
    },
  ];

  it("counts a completion's prompt as the completion does, and detokenizes it back", async () => {
    const text = "The quick brown fox, once more";
    const t = await post("/tokenize", { model: "tiny", prompt: text, return_token_strs: true });
    expect(t.status).toBe(200);
    const done = await gw.client.completions.create({ model: "tiny", prompt: text, max_tokens: 1 });
    expect(t.body.count).toBe(done.usage!.prompt_tokens);
    expect(t.body.tokens).toEqual(gw.ctx.tokenizer.encode(text));
    expect(t.body.tokens).toHaveLength(t.body.count);
    expect(t.body.max_model_len).toBe(gw.ctx.maxModelLen);
    expect(t.body.token_strs.join("")).toBe(gw.ctx.tokenizer.decode(t.body.tokens));
    // Without the special tokens: the text alone, which detokenizes to the text.
    const plain = await post("/tokenize", { prompt: text, add_special_tokens: false });
    expect(plain.body.count).toBeLessThan(t.body.count);
    const d = await post("/detokenize", { model: "tiny", tokens: plain.body.tokens });
    expect(d).toEqual({ status: 200, body: { prompt: text } });
  });

  it("counts a chat's prompt as the chat completion does, tools included", async () => {
    for (const extra of [{}, { tools: weather }, { tools: weather, tool_choice: "required" }]) {
      const messages = [
        { role: "system" as const, content: "Be brief." },
        { role: "user" as const, content: "Weather in Paris?" },
      ];
      const t = await post("/tokenize", { model: "tiny", messages, ...extra });
      expect(t.status).toBe(200);
      const done = await gw.client.chat.completions.create({
        model: "tiny",
        messages,
        max_tokens: 1,
        ...extra,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      expect(t.body.count, JSON.stringify(extra)).toBe(done.usage!.prompt_tokens);
      // Without the assistant's turn opened: fewer tokens, the same start.
      const open = await post("/tokenize", { messages, add_generation_prompt: false, ...extra });
      expect(open.body.count).toBeLessThan(t.body.count);
      expect(t.body.tokens.slice(0, open.body.count)).toEqual(open.body.tokens);
    }
  });

  it("refuses bad requests with stable codes", async () => {
    const code = (r: { body: any }) => r.body.error.code;
    const both = await post("/tokenize", { prompt: "a", messages: user("a") });
    expect([both.status, code(both)]).toEqual([400, "EM_GATEWAY_BAD_REQUEST"]);
    expect(both.body.error.message).toMatch(/exactly one of prompt and messages/);
    const none = await post("/tokenize", {});
    expect([none.status, code(none)]).toEqual([400, "EM_GATEWAY_BAD_REQUEST"]);
    const model = await post("/tokenize", { model: "gpt-4", prompt: "a" });
    expect([model.status, code(model)]).toEqual([404, "EM_GATEWAY_UNKNOWN_MODEL"]);
    const vocab = await post("/detokenize", { tokens: [1, 10_000_000] });
    expect([vocab.status, code(vocab)]).toEqual([400, "EM_GATEWAY_BAD_REQUEST"]);
    expect(vocab.body.error.message).toMatch(/token 10000000 is outside the vocabulary/);
    const tool = await post("/tokenize", {
      messages: [{ role: "tool", content: "sunny" }],
    });
    expect([tool.status, code(tool)]).toEqual([400, "EM_GATEWAY_BAD_REQUEST"]);
    const types = await post("/detokenize", { tokens: "1 2" });
    expect([types.status, code(types)]).toEqual([400, "EM_GATEWAY_BAD_REQUEST"]);
    // No tokens: no text (the tokenizers library throws on an empty list: 500 before).
    expect(await post("/detokenize", { tokens: [] })).toEqual({
      status: 200,
      body: { prompt: "" },
    });
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
  // Experts in process: the scheduler's bookkeeping with one micro-batch (with two, over
  // NATS, in micro-batches.test.ts).
  it("a cache too small for all sequences preempts and recomputes, with the same text", async () => {
    await preemptionScenario(dir, {});
  });
});

/**
 * The request `send` makes (with `extra` in its body) is refused: 400 naming `param`, its
 * message matching `message` when given.
 */
async function expectRefused(
  send: () => Promise<unknown>,
  extra: Record<string, unknown>,
  param: string,
  message?: RegExp,
): Promise<void> {
  const err = await send().then(
    () => expect.unreachable(JSON.stringify(extra)),
    (e: APIError) => e,
  );
  expect([err.status, err.param], JSON.stringify(extra)).toEqual([400, param]);
  if (message) expect(err.message).toMatch(message);
}

/** An error of the openai client from a body in OpenAI's format, with these fields. */
function expectApiError(
  err: unknown,
  cls: new (...args: never[]) => APIError,
  type: string,
  code: string,
  param: string | null,
): void {
  expect(err).toBeInstanceOf(cls);
  expect((err as APIError).error).toEqual({
    message: expect.stringMatching(/\w/),
    type,
    param,
    code,
  });
}

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
    expectApiError(
      err,
      OpenAI.NotFoundError,
      "not_found_error",
      "EM_GATEWAY_UNKNOWN_MODEL",
      "model",
    );
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
    [{ logit_bias: { "5": 101 } }, "logit_bias.5"],
    [{ logit_bias: { x: 1 } }, "logit_bias"],
    [{ logit_bias: { "999999": 1 } }, "logit_bias"],
    [{ tool_choice: "auto" }, "tool_choice"],
    [{ tools: [{ type: "function", function: { name: "f" } }], tool_choice: "any" }, "tool_choice"],
    [{ tools: [{ type: "function", function: { name: "a b" } }] }, "tools.0"],
    [
      {
        tools: [
          { type: "function", function: { name: "f" } },
          { type: "function", function: { name: "f" } },
        ],
      },
      "tools.1",
    ],
    [{ messages: [{ role: "tool", content: "x" }] }, "messages.0"],
    [
      {
        messages: [
          {
            role: "user",
            content: "x",
            tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: "{}" } }],
          },
        ],
      },
      "messages.0",
    ],
    [{ messages: [{ role: "user", content: null }] }, "messages.0"],
    [{ min_tokens: 50, max_tokens: 10 }, "min_tokens"],
    [{ stop_token_ids: [999999] }, "stop_token_ids"],
    [{ stop_token_ids: "x" }, "stop_token_ids"],
    // Not implemented, and they would change the answer: refused, not ignored.
    [
      {
        tools: [{ type: "function", function: { name: "f" } }],
        tool_choice: { type: "function", function: { name: "nope" } },
      },
      "tool_choice",
    ],
    [{ tools: [{ type: "bash" }], tool_choice: "none" }, "tools.0"],
    [
      {
        tools: [{ type: "function", function: { name: "f", parameters: { type: "string" } } }],
        tool_choice: "required",
      },
      "tools",
    ],
    [{ functions: [{ name: "f" }] }, "functions"],
    [{ response_format: { type: "json_schema", json_schema: { name: "x" } } }, "response_format"],
  ] as const)("bad parameter %j: 400 naming %s", async (patch, param) => {
    const err = await gw.client.chat.completions
      .create({ model: "tiny", messages: user("hi"), ...(patch as any) })
      .catch((e) => e);
    expectApiError(
      err,
      OpenAI.BadRequestError,
      "invalid_request_error",
      "EM_GATEWAY_BAD_REQUEST",
      param,
    );
  });

  it("says what a field must be, once: not the failures of its null branch or of each allowed value", async () => {
    const err = await gw.client.chat.completions
      .create({ model: "tiny", messages: [{ role: "robot", content: "x" }] as any })
      .catch((e) => e);
    expect(err.message).toMatch(
      /invalid request: body\/messages\/0\/role must be one of "system", "developer", "user", "assistant", "tool"$/,
    );
    const bound = await gw.client.chat.completions
      .create({ model: "tiny", messages: user("hi"), n: 99 })
      .catch((e) => e);
    expect(bound.message).toMatch(/invalid request: body\/n must be <= 16$/);
  });

  it("content parts that are not text (images, audio, files): 400 naming the part and its type", async () => {
    const parts = (...rest: object[]) => [
      { role: "system", content: "be brief" },
      { role: "user", content: [{ type: "text", text: "What is this?" }, ...rest] },
    ];
    for (const [part, type] of [
      [
        { type: "image_url", image_url: { url: "data:image/png;base64,iVBORw0KGgo=" } },
        "image_url",
      ],
      [{ type: "input_audio", input_audio: { data: "UklGRg==", format: "wav" } }, "input_audio"],
      [{ type: "file", file: { file_id: "file-1" } }, "file"],
    ] as const) {
      const err = await gw.client.chat.completions
        .create({ model: "tiny", messages: parts(part) as any, max_tokens: 2 })
        .catch((e) => e);
      expectApiError(
        err,
        OpenAI.BadRequestError,
        "invalid_request_error",
        "EM_GATEWAY_BAD_REQUEST",
        "messages.1.content.1",
      );
      expect(err.message).toContain(
        `messages[1].content[1]: content parts of type '${type}' are not supported: this model reads text only (type 'text')`,
      );
    }
    // A text part without its text, and /tokenize's messages, the same way.
    const noText = await gw.client.chat.completions
      .create({ model: "tiny", messages: parts({ type: "text" }) as any, max_tokens: 2 })
      .catch((e) => e);
    expect(noText.error.param).toBe("messages.1.content.1");
    expect(noText.message).toContain("a part of type 'text' needs a string 'text'");
    const r = await post(
      "/tokenize",
      JSON.stringify({
        model: "tiny",
        messages: parts({ type: "image_url", image_url: { url: "x" } }),
      }),
    );
    expect(r.status).toBe(400);
    expect(((await r.json()) as any).error.param).toBe("messages.1.content.1");
    // Text parts alone are read as their text, joined.
    const ok = await gw.client.chat.completions.create({
      model: "tiny",
      messages: [
        {
          role: "user",
          content: [
            { type: "text", text: "Hel" },
            { type: "text", text: "lo" },
          ],
        },
      ],
      max_tokens: 3,
      temperature: 0,
    });
    const plain = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Hello"),
      max_tokens: 3,
      temperature: 0,
    });
    expect(ok.choices[0]!.message.content).toBe(plain.choices[0]!.message.content);
    expect(ok.usage!.prompt_tokens).toBe(plain.usage!.prompt_tokens);
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
    expectApiError(
      err,
      OpenAI.BadRequestError,
      "invalid_request_error",
      "EM_GATEWAY_PROMPT_TOO_LONG",
      "prompt",
    );
    // Far past the context: refused by its size, before it is encoded; chat messages too.
    const huge = "lorem ipsum ".repeat(50_000);
    for (const [err, param] of [
      [
        await gw.client.completions.create({ model: "tiny", prompt: huge }).catch((e) => e),
        "prompt",
      ],
      [
        await gw.client.chat.completions
          .create({ model: "tiny", messages: user(huge) })
          .catch((e) => e),
        "messages",
      ],
    ] as const) {
      expectApiError(
        err,
        OpenAI.BadRequestError,
        "invalid_request_error",
        "EM_GATEWAY_PROMPT_TOO_LONG",
        param,
      );
      expect(err.message).toMatch(/the prompt has at least \d+ tokens/);
    }
    const tooMany = await gw.client.completions
      .create({ model: "tiny", prompt: "hi", max_tokens: 1000 })
      .catch((e) => e);
    expectApiError(
      tooMany,
      OpenAI.BadRequestError,
      "invalid_request_error",
      "EM_GATEWAY_PROMPT_TOO_LONG",
      "max_tokens",
    );
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

  it("requests refused before routing or parsing get our format too", async () => {
    const badEscape = await fetch(`${gw.url}/v1/%zz`);
    expect(badEscape.status).toBe(400);
    expect(((await badEscape.json()) as any).error.code).toBe("EM_GATEWAY_BAD_REQUEST");
    // What Node's parser refuses never reaches fastify: a raw answer on the socket.
    const raw = (request: string) =>
      new Promise<string>((resolve, reject) => {
        const u = new URL(gw.url);
        const sock = netConnect(Number(u.port), u.hostname, () => sock.end(request));
        let out = "";
        sock.on("data", (d) => {
          out += d.toString();
        });
        sock.on("close", () => resolve(out));
        sock.on("error", reject);
      });
    for (const [request, status] of [
      [`GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`, 431],
      ["BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400],
      ["POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", 400],
    ] as const) {
      const answer = await raw(request);
      expect(answer.split("\r\n")[0]).toMatch(new RegExp(`^HTTP/1.1 ${status} `));
      const body = JSON.parse(answer.slice(answer.indexOf("\r\n\r\n") + 4));
      expect(body.error.code).toBe("EM_GATEWAY_BAD_REQUEST");
    }
    expect((await fetch(`${gw.url}/health`)).status).toBe(200);
  });
});

describe("limits and lifecycle", () => {
  it("x-request-id on every answer (the client's, or a new one); --log-requests logs each exchange", async () => {
    const g = await startGateway(dir, { logRequests: true });
    try {
      const body = { model: "tiny", messages: user("hi"), max_tokens: 3 };
      const post = (b: object, headers: Record<string, string> = {}) =>
        fetch(`${g.url}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", ...headers },
          body: JSON.stringify(b),
        });
      const mine = await post(body, { "x-request-id": "trace-42" });
      expect(mine.headers.get("x-request-id")).toBe("trace-42");
      const chat = (await mine.json()) as OpenAI.ChatCompletion;
      const fresh = await post({ ...body, stream: true });
      const id = fresh.headers.get("x-request-id")!;
      expect(id).toMatch(/^[0-9a-f-]{36}$/);
      await fresh.text();
      const bad = await post({ ...body, temperature: 9 }, { "x-request-id": "bad one" });
      expect(bad.status).toBe(400);
      // Not a printable token: replaced.
      expect(bad.headers.get("x-request-id")).not.toBe("bad one");
      await waitFor("three log lines", async () =>
        g.logs.filter((l) => l.startsWith("request ")).length === 3 ? true : undefined,
      );
      const lines = g.logs.filter((l) => l.startsWith("request "));
      const u = chat.usage!;
      expect(lines[0]).toMatch(
        new RegExp(
          `^request trace-42 POST /v1/chat/completions 200 in \\d+ ms prompt=${u.prompt_tokens} cached=\\d+ completion=${u.completion_tokens} finish=(stop|length)$`,
        ),
      );
      expect(lines[1]).toMatch(
        new RegExp(`^request ${id} POST /v1/chat/completions 200 in \\d+ ms prompt=`),
      );
      expect(lines[2]).toMatch(/^request \S+ POST \/v1\/chat\/completions 400 in \d+ ms$/);
    } finally {
      await g.close();
    }
  });

  it("a body over --max-request-bytes: 413; a missing API key: 401", async () => {
    const g = await startGateway(dir, { cluster, maxRequestBytes: 2048, apiKeys: ["sekret"] });
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
      // retrieve: the same model; another name is 404 naming it.
      expect(await g.client.models.retrieve("tiny")).toEqual(models.data[0]);
      const other = await g.client.models.retrieve("gpt-4").catch((e) => e);
      expect(other).toBeInstanceOf(OpenAI.NotFoundError);
      expect(other.code).toBe("EM_GATEWAY_UNKNOWN_MODEL");
      // Paths that fastify decodes to an API route need the key too ('%76%31' is 'v1').
      for (const path of ["/%76%31/models", "/v%31/models", "/nope"]) {
        const r = await fetch(`${g.url}${path}`);
        expect(r.status, path).toBe(401);
        expect(((await r.json()) as any).error.code).toBe("EM_GATEWAY_UNAUTHORIZED");
      }
      const encoded = await fetch(`${g.url}/%76%31/models`, {
        headers: { authorization: "Bearer sekret" },
      });
      expect(encoded.status).toBe(200);
      expect((await fetch(`${g.url}/health`)).status).toBe(200);
      expect((await fetch(`${g.url}/ready`)).status).toBe(200);
      expect((await fetch(`${g.url}/metrics`)).status).toBe(200);
    } finally {
      await g.close();
    }
  });

  it("a full admission queue gives 429 with Retry-After", async () => {
    const g = await startHeldGateway(dir, { cluster, maxQueueDepth: 2, maxRunning: 1 });
    const h = g.hold;
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
      expectApiError(err, OpenAI.RateLimitError, "rate_limit_error", "EM_GATEWAY_OVERLOADED", null);
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
    const g = await startHeldGateway(dir, { cluster });
    const h = g.hold;
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
        (await finishedRequests(g.url, "abort")) === 1 ? true : undefined,
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

describe("sampling defaults (the model's generation_config.json)", () => {
  it("fill in what requests leave out, on every API; what a request sets wins", async () => {
    const { defaults } = loadSamplingDefaults(dir, "auto");
    // The tiny model's file is DeepSeek-V3's.
    expect(defaults).toEqual({ temperature: 0.6, top_p: 0.95 });
    const d = await startGateway(dir, { cluster, samplingDefaults: defaults });
    try {
      const recommended = { temperature: 0.6, top_p: 0.95 };
      const chat = { model: "tiny", messages: user("Pick a word"), max_tokens: 10, seed: 8 };
      const chatText = (g: TestGateway, extra: object) =>
        g.client.chat.completions
          .create({ ...chat, ...extra })
          .then((r) => r.choices[0]!.message.content);
      const want = await chatText(gw, recommended);
      expect(await chatText(d, {})).toBe(want);
      // The defaults mattered: without them this seed samples another answer.
      expect(await chatText(gw, {})).not.toBe(want);
      // A field the request sets is its own (here: greedy).
      expect(await chatText(d, { temperature: 0 })).toBe(await chatText(gw, { temperature: 0 }));

      const completion = { model: "tiny", prompt: "Once", max_tokens: 10, seed: 8 };
      const completionText = (g: TestGateway, extra: object) =>
        g.client.completions.create({ ...completion, ...extra }).then((r) => r.choices[0]!.text);
      expect(await completionText(d, {})).toBe(await completionText(gw, recommended));

      // KServe v2 REST: the text model samples with the same defaults.
      const infer = async (g: TestGateway, parameters: object) => {
        const r = await fetch(`${g.url}/v2/models/tiny/infer`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({
            inputs: [{ name: "text_input", datatype: "BYTES", shape: [1], data: ["Once"] }],
            parameters: { max_tokens: 10, seed: 8, ...parameters },
          }),
        });
        return ((await r.json()) as { outputs: { data: string[] }[] }).outputs[0]!.data[0];
      };
      expect(await infer(d, {})).toBe(await infer(gw, recommended));
      expect(await infer(d, {})).toBe(await completionText(d, {}));

      // The Responses API (a chat underneath).
      const respond = (g: TestGateway, extra: object) =>
        g.client.responses
          .create({
            model: "tiny",
            input: "Pick a word",
            max_output_tokens: 10,
            store: false,
            ...extra,
            seed: 8,
          } as never)
          .then((r) => (r as unknown as OpenAI.Responses.Response).output_text);
      expect(await respond(d, {})).toBe(await respond(gw, recommended));
    } finally {
      await d.close();
    }
  });
});

describe("distributed mode", () => {
  it("gives the same greedy text as one process with its experts in process", async () => {
    const local = await startGateway(dir, { maxBatchTokens: 24 });
    try {
      const chat = {
        model: "tiny",
        messages: user("Hello from far away"),
        max_tokens: 12,
        temperature: 0,
      };
      const completion = {
        model: "tiny",
        prompt: SEED_PROMPTS[3]!,
        max_tokens: 12,
        temperature: 0,
      };
      const [remote, here, remoteC, hereC] = await Promise.all([
        gw.client.chat.completions.create(chat),
        local.client.chat.completions.create(chat),
        gw.client.completions.create(completion),
        local.client.completions.create(completion),
      ]);
      expect(remote.choices[0]!.message.content).toBe(here.choices[0]!.message.content);
      expect(remote.usage).toEqual(here.usage);
      expect(remoteC.choices[0]!.text).toBe(hereC.choices[0]!.text);
      expect(remote.usage!.completion_tokens).toBeGreaterThan(0);
    } finally {
      await local.close();
    }
  });

  it("prompt logprobs take more steps under maxLogitRows, and are the same", async () => {
    // Tokens per expert call = tokens per step: what bounds the [rows, vocab] logits.
    const { rows, wrap: counting } = stepTokens();
    const free = await startGateway(dir, { maxBatchTokens: 24 });
    const bounded = await startGateway(dir, {
      maxBatchTokens: 24,
      maxLogitRows: 2,
      wrap: counting,
    });
    try {
      const body = {
        model: "tiny",
        prompt: SEED_PROMPTS[3]!,
        max_tokens: 3,
        temperature: 0,
        logprobs: 2,
        echo: true,
        n: 2,
      };
      const [a, b] = await Promise.all([
        free.client.completions.create(body),
        bounded.client.completions.create(body),
      ]);
      const P = a.usage!.prompt_tokens;
      expect(P).toBeGreaterThan(4);
      // Two choices, each a sequence wanting all its prompt rows: 2 such rows a step for
      // both (plus a decode token of a choice whose prompt is done), where 24 would fit.
      expect(Math.max(...rows)).toBe(3);
      expect(rows.length).toBeGreaterThanOrEqual(P);
      for (const [i, c] of b.choices.entries()) {
        const want = a.choices[i]!;
        expect(c.text).toBe(want.text);
        expect(c.logprobs!.tokens).toEqual(want.logprobs!.tokens);
        expect(c.logprobs!.token_logprobs).toEqual(
          want.logprobs!.token_logprobs!.map((v) => (v === null ? null : expect.closeTo(v, 4))),
        );
      }
    } finally {
      await Promise.all([free.close(), bounded.close()]);
    }
  });

  it("prefix caching: a prompt's known prefix is not computed again, and the text is the same", async () => {
    const { rows, wrap: counting } = stepTokens(gw.weights);
    const cached = await startGateway(dir, {
      maxBatchTokens: 256,
      blockSize: 4,
      prefixCaching: true,
      wrap: counting,
    });
    try {
      const system = "You are a terse assistant who answers in one line. ".repeat(2);
      const ask = (client: OpenAI, question: string) =>
        client.chat.completions.create({
          model: "tiny",
          messages: [
            { role: "system", content: system },
            { role: "user", content: question },
          ],
          max_tokens: 6,
          temperature: 0,
        });
      const first = await ask(cached.client, "What is a fox?");
      const computedFirst = rows.reduce((x, y) => x + y, 0);
      rows.length = 0;
      const second = await ask(cached.client, "What is a dog?");
      const computedSecond = rows.reduce((x, y) => x + y, 0);
      const P = second.usage!.prompt_tokens;
      // The shared system prompt (whole blocks of 4) came from the cache.
      expect(computedFirst).toBe(first.usage!.prompt_tokens + 5);
      expect(computedSecond).toBeLessThan(P - 20);
      const hits = await metric(cached.url, "expertmesh_gateway_prefix_cache_hits");
      expect(hits).toBe(P + 5 - computedSecond);
      expect(second.usage!.prompt_tokens_details).toEqual({ cached_tokens: hits });
      expect(first.usage!.prompt_tokens_details).toEqual({ cached_tokens: 0 });
      // DeepSeek's API's fields say the same.
      expect(second.usage).toMatchObject({
        prompt_cache_hit_tokens: hits,
        prompt_cache_miss_tokens: P - hits,
      });
      // The same text as computing everything (the distributed gateway, no cache).
      for (const [got, q] of [
        [first, "What is a fox?"],
        [second, "What is a dog?"],
      ] as const)
        expect(got.choices[0]!.message.content).toBe(
          (await ask(gw.client, q)).choices[0]!.message.content,
        );
    } finally {
      await cached.close();
    }
  });

  it("prefix caching: n choices compute their prompt once, and sample what they did before", async () => {
    const { rows, wrap: counting } = stepTokens(gw.weights);
    const opts = { maxBatchTokens: 256, blockSize: 4 };
    const [cached, plain] = await Promise.all([
      startGateway(dir, { ...opts, prefixCaching: true, wrap: counting }),
      startGateway(dir, { ...opts, prefixCaching: false }),
    ]);
    try {
      const body = {
        model: "tiny",
        prompt: "The history of the lighthouse keepers of the northern islands begins with",
        max_tokens: 5,
        temperature: 1,
        seed: 7,
        n: 4,
        ignore_eos: true,
      } as OpenAI.CompletionCreateParamsNonStreaming;
      const got = await cached.client.completions.create(body);
      const P = got.usage!.prompt_tokens;
      // One prompt, then 3 more choices from its cached blocks (their last partial block
      // and last token computed), then 4 x 4 decode tokens: far below 4 prompts.
      const computed = rows.reduce((x, y) => x + y, 0);
      expect(computed).toBeLessThanOrEqual(P + 3 * 4 + 4 * 4);
      expect(got.choices.map((c) => c.text)).toEqual(
        (await plain.client.completions.create(body)).choices.map((c) => c.text),
      );
    } finally {
      await Promise.all([cached.close(), plain.close()]);
    }
  });

  it("prefix caching under a tight KV cache: shared, evicted and preempted blocks give the same text", async () => {
    const config = gw.weights.config;
    const tight = {
      maxModelLen: 64,
      blockSize: 4,
      kvCacheBytes: 24 * bytesPerBlock(config, 4),
      maxBatchTokens: 64,
    };
    const [cached, plain] = await Promise.all([
      startGateway(dir, { ...tight, prefixCaching: true }),
      startGateway(dir, { ...tight, prefixCaching: false }),
    ]);
    try {
      const prefixes = [
        "In a quiet village by the sea, an old sailor",
        "The committee met on Tuesday to discuss the budget and",
        "Once upon a time there was a small red fox who",
      ];
      const prompts = prefixes.flatMap((p) => [" walked", " said", " found"].map((s) => p + s));
      const ask = (g: TestGateway) => (p: string) =>
        g.client.completions
          .create({
            model: "tiny",
            prompt: p,
            max_tokens: 24,
            temperature: 0,
            ignore_eos: true,
          } as OpenAI.CompletionCreateParamsNonStreaming)
          .then((r) => r.choices[0]!.text);
      const want = await Promise.all(prompts.map(ask(plain)));
      // Twice: the second round finds the first round's blocks (those not evicted since).
      for (let round = 0; round < 2; round++)
        expect(await Promise.all(prompts.map(ask(cached)))).toEqual(want);
      expect(await metric(cached.url, "expertmesh_gateway_prefix_cache_hits")).toBeGreaterThan(0);
      expect(await metric(cached.url, "expertmesh_gateway_num_preemptions")).toBeGreaterThan(0);
      expect(await metric(plain.url, "expertmesh_gateway_prefix_cache_hits")).toBe(0);
      expect(await metric(cached.url, "expertmesh_gateway_kv_cache_usage_perc")).toBe(0);
    } finally {
      await Promise.all([cached.close(), plain.close()]);
    }
  });

  it("the gateway process times each shard's round trips and reports its load on NATS", async () => {
    const ref = `em.test.${cluster.modelName}`;
    const p = await startGatewayProcess({
      modelDir: dir,
      planPath: cluster.planPath,
      namespace: "test",
      modelName: cluster.modelName,
      // Speculative decoding on: it changes no output (speculative.test.ts), only steps.
      args: ["--wire=f32", "--max-running=2", "--speculative-tokens=3", "--prompt-lookup-min=1"],
    });
    const nc = await connect({ servers: testEnv().nats.url });
    type Report = {
      subject: string;
      role: string;
      id: string;
      waiting: number;
      running: number;
      kvUsage: number;
      planVersion: number;
      timestamp: number;
    };
    const reports: Report[] = [];
    nc.subscribe(`${ref}.stats.gateway.>`, {
      callback: (err, msg) => {
        if (!err)
          reports.push({ subject: msg.subject, ...(msg.json() as Omit<Report, "subject">) });
      },
    });
    const shards = cluster.shards;
    try {
      // One request: one dispatch_latency sample per round trip to each shard, as many as
      // the frames each shard answered meanwhile (nothing else asks the shards then). With
      // f32 on the wire, the same greedy text as the gateway of the other tests.
      const body = {
        model: "tiny",
        messages: user("Hello from a gateway pod"),
        max_tokens: 8,
        temperature: 0,
      };
      const want = (await gw.client.chat.completions.create(body)).choices[0]!.message.content;
      const framesBefore = await Promise.all(shards.map(shardFrames));
      const answer = await p.client.chat.completions.create(body);
      expect(answer.choices[0]!.message.content).toBe(want);
      expect(
        await metric(p.url, "expertmesh_gateway_spec_decode_num_draft_tokens_total"),
      ).toBeGreaterThanOrEqual(0);
      const frames = (await Promise.all(shards.map(shardFrames))).map(
        (n, k) => n - framesBefore[k]!,
      );
      const metrics = `${p.url}/metrics`;
      const counts = await samples(metrics, "expertmesh_gateway_dispatch_latency_seconds_count");
      const sums = await samples(metrics, "expertmesh_gateway_dispatch_latency_seconds_sum");
      expect(counts.map((s) => s.labels["ok"])).not.toContain("false");
      for (const [k] of shards.entries()) {
        const count = counts.find((s) => s.labels["shard"] === String(k))?.value;
        expect(count, `shard ${k}`).toBeGreaterThan(0);
        expect(count, `shard ${k}`).toBe(frames[k]);
        expect(sums.find((s) => s.labels["shard"] === String(k))!.value).toBeGreaterThan(0);
      }
      // The command takes the model's generation_config.json (the tiny model's is
      // DeepSeek-V3's: temperature 0.6, top_p 0.95) for requests that leave them out; the
      // in-process gateway here has no defaults.
      expect(p.log()).toContain(
        "sampling defaults of requests that leave them out: temperature 0.6, top_p 0.95",
      );
      const sampled = { ...body, seed: 11, temperature: undefined };
      const recommended = await gw.client.chat.completions.create({
        ...sampled,
        temperature: 0.6,
        top_p: 0.95,
      });
      const unset = await p.client.chat.completions.create(sampled);
      expect(unset.choices[0]!.message.content).toBe(recommended.choices[0]!.message.content);
      expect(
        (await gw.client.chat.completions.create(sampled)).choices[0]!.message.content,
      ).not.toBe(recommended.choices[0]!.message.content);

      // Load reports, once a second: idle, then busy while the shards are stopped (the
      // first step cannot finish: 2 sequences running, 3 waiting), then idle again.
      const first = reports.length;
      const idle = await waitFor("a load report", async () => reports[first]);
      expect(idle).toEqual({
        subject: `${ref}.stats.gateway.${hostname()}-${p.process.pid}`,
        role: "gateway",
        id: `${hostname()}-${p.process.pid}`,
        waiting: 0,
        running: 0,
        kvUsage: 0,
        planVersion: cluster.plan.version,
        timestamp: expect.any(Number),
      });
      for (const s of shards) s.child.kill("SIGSTOP");
      const from = reports.length;
      const load = Promise.all(
        SEED_PROMPTS.slice(0, 5).map((prompt) =>
          p.client.completions.create({ model: "tiny", prompt, max_tokens: 4, temperature: 0 }),
        ),
      );
      try {
        const busy = await waitFor("a report of the 5 requests", async () =>
          reports.slice(from).find((r) => r.waiting + r.running === 5),
        );
        expect(busy.running).toBeGreaterThan(0);
        expect(busy.running).toBeLessThanOrEqual(2);
        expect(busy.waiting).toBeGreaterThanOrEqual(3);
        expect(busy.kvUsage).toBeGreaterThan(0);
      } finally {
        for (const s of shards) s.child.kill("SIGCONT");
      }
      const done = await load;
      for (const r of done) expect(r.usage!.completion_tokens).toBeGreaterThan(0);
      const after = reports.length;
      const quiet = await waitFor("a report after the requests", async () => reports[after]);
      expect(quiet).toMatchObject({ waiting: 0, running: 0, kvUsage: 0 });
      expect(quiet.timestamp).toBeGreaterThan(idle.timestamp);
    } finally {
      for (const s of shards) s.child.kill("SIGCONT");
      await nc.close();
      await p.process.stop(3000);
    }
  });

  it("keeps a stream going when a shard replica with work is killed and another replica exists", async () => {
    // A second replica of shard 0 in its queue group.
    const r0 = cluster.shards.find((s) => s.name.endsWith("-0-r0"))!;
    const r1 = startShard(dir, cluster.planPath, cluster.modelName, 0, "r1");
    cluster.shards.push(r1);
    await waitServing(r1);
    const body = {
      model: "tiny",
      messages: user("Tell me a long story"),
      max_tokens: 32,
      temperature: 0,
      stream: true as const,
      ...ignoreEos,
    };
    // Both replicas healthy: the text to expect; NATS spreads the frames over both.
    const before = await Promise.all([shardFrames(r0), shardFrames(r1)]);
    let want = "";
    for await (const chunk of await gw.client.chat.completions.create(body))
      want += chunk.choices[0]?.delta?.content ?? "";
    expect(await shardFrames(r0)).toBeGreaterThan(before[0]);
    expect(await shardFrames(r1)).toBeGreaterThan(before[1]);

    // Again; after 3 chunks r0 stops, and is killed once a frame reached it: the step
    // waiting on it must retry on r1.
    const subject = subjects.shard(cluster.ref, 0);
    const retriesBefore = gw.remote!.retries;
    let text = "";
    let chunks = 0;
    let tokensAtKill = -1;
    let r1AtKill = -1;
    try {
      for await (const chunk of await gw.client.chat.completions.create(body)) {
        text += chunk.choices[0]?.delta?.content ?? "";
        if (++chunks !== 3) continue;
        r0.child.kill("SIGSTOP");
        // Counted from now: frames delivered to the stopped process, that it cannot answer.
        const delivered = await natsDelivered("expertmesh-shard-0-r0", subject);
        expect(delivered).toBeGreaterThan(0);
        await waitFor("a frame to reach the stopped replica", async () =>
          (await natsDelivered("expertmesh-shard-0-r0", subject))! > delivered! ? true : undefined,
        );
        tokensAtKill = await metric(gw.url, "expertmesh_gateway_generation_tokens_total");
        r1AtKill = await shardFrames(r1);
        r0.child.kill("SIGKILL");
      }
    } finally {
      r0.child.kill("SIGCONT");
    }
    expect(chunks).toBeGreaterThan(3);
    expect(text).toBe(want);
    expect(gw.remote!.retries).toBeGreaterThan(retriesBefore);
    // Tokens came after the kill, their shard-0 frames from r1.
    expect(await metric(gw.url, "expertmesh_gateway_generation_tokens_total")).toBeGreaterThan(
      tokensAtKill,
    );
    expect(await shardFrames(r1)).toBeGreaterThan(r1AtKill);
  });

  it("is not ready without its shards", async () => {
    expect((await fetch(`${gw.url}/ready`)).status).toBe(200);
    await stopAll(cluster);
    await waitFor("/ready to say 503", async () =>
      (await fetch(`${gw.url}/ready`)).status === 503 ? true : undefined,
    );
    // A request now fails on the gateway's side: answered 503 and logged, once. The bad
    // requests of the earlier tests (4xx) were answered only.
    const logged = gw.logs.length;
    expect(gw.logs.filter((l) => !/ failed: 5\d\d /.test(l))).toEqual([]);
    const err = await gw.client.completions
      .create({ model: "tiny", prompt: "hi", max_tokens: 2 })
      .catch((e) => e);
    expect(err.status).toBe(503);
    expect(gw.logs.slice(logged)).toEqual([
      expect.stringMatching(new RegExp(`failed: 503 ${err.code}: `)),
    ]);
  });
});
