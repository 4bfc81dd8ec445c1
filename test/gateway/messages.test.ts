// POST /v1/messages (Anthropic's Messages API) through Anthropic's official TypeScript SDK
// (@anthropic-ai/sdk), against gateways started in this process on the tiny V3 checkpoint. A
// Messages request is the chat request it stands for: the same tokens come out, as content
// blocks (text, thinking, tool_use), streamed as Anthropic's events; errors in Anthropic's
// shape, which the SDK turns into its error classes.
import Anthropic from "@anthropic-ai/sdk";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let gw: TestGateway;
let r1: TestGateway;
let keyed: TestGateway;
let client: Anthropic;

/** Bodies with sampling fields (temperature), which this SDK's types leave out: sent as given. */
type Body = Anthropic.MessageCreateParamsNonStreaming;

const asBody = (body: object) => body as Body;
const ask = (c: Anthropic, body: object) => c.messages.create(asBody(body));

const sdk = (g: TestGateway, apiKey = "unused") =>
  new Anthropic({ apiKey, baseURL: g.url, maxRetries: 0 });

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  gw = await startGateway(dir);
  r1 = await startGateway(dir, { reasoningParser: "deepseek-r1" });
  keyed = await startGateway(dir, { apiKeys: ["sekret"] });
  client = sdk(gw);
});
afterAll(async () => {
  await gw?.close();
  await r1?.close();
  await keyed?.close();
});

const SYSTEM = "Answer briefly.";
const QUESTION = "What is the capital of France?";

/** The question, greedy, as a Messages request. */
const question = (max_tokens: number) => ({
  model: "tiny",
  system: SYSTEM,
  messages: [{ role: "user" as const, content: QUESTION }],
  max_tokens,
  temperature: 0,
});

/** The chat completion the same greedy request gives. */
async function chatAnswer(g: TestGateway, max_tokens: number, extra: object = {}) {
  return g.client.chat.completions.create({
    model: "tiny",
    messages: [
      { role: "system", content: SYSTEM },
      { role: "user", content: QUESTION },
    ],
    max_tokens,
    temperature: 0,
    ...extra,
  });
}

const WEATHER: Anthropic.Tool = {
  name: "get_weather",
  description: "The weather in a city",
  input_schema: {
    type: "object",
    properties: { city: { type: "string", enum: ["Paris", "Rome"] } },
    required: ["city"],
    additionalProperties: false,
  },
};

describe("POST /v1/messages", () => {
  it("answers what the chat request it stands for answers: text, stop reason, usage", async () => {
    const m = await ask(client, {
      model: "tiny",
      system: SYSTEM,
      messages: [{ role: "user", content: QUESTION }],
      max_tokens: 10,
      temperature: 0,
    });
    const chat = await chatAnswer(gw, 10);
    expect(m.type).toBe("message");
    expect(m.role).toBe("assistant");
    expect(m.id).toMatch(/^msg_/);
    expect(m.content).toEqual([{ type: "text", text: chat.choices[0]!.message.content }]);
    expect(m.stop_reason).toBe(
      chat.choices[0]!.finish_reason === "length" ? "max_tokens" : "end_turn",
    );
    expect(m.usage.output_tokens).toBe(chat.usage!.completion_tokens);
    expect(m.usage.input_tokens + (m.usage.cache_read_input_tokens ?? 0)).toBe(
      chat.usage!.prompt_tokens,
    );
    // System as blocks, the turn as blocks: the same.
    const blocks = await ask(client, {
      model: "tiny",
      system: [{ type: "text", text: SYSTEM }],
      messages: [{ role: "user", content: [{ type: "text", text: QUESTION }] }],
      max_tokens: 10,
      temperature: 0,
    });
    expect(blocks.content).toEqual(m.content);
    // count_tokens: the prompt's tokens.
    const counted = await client.messages.countTokens({
      model: "tiny",
      system: SYSTEM,
      messages: [{ role: "user", content: QUESTION }],
    });
    expect(counted.input_tokens).toBe(chat.usage!.prompt_tokens);
  });

  it("prefill: a last assistant turn is the start of the answer, which continues it", async () => {
    const messages: Anthropic.MessageParam[] = [
      { role: "user", content: QUESTION },
      { role: "assistant", content: "The answer is" },
    ];
    const m = await ask(client, { model: "tiny", messages, max_tokens: 10, temperature: 0 });
    // The chat request it stands for continues the message (continue_final_message).
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: messages as OpenAI.ChatCompletionMessageParam[],
      max_tokens: 10,
      temperature: 0,
      continue_final_message: true,
    } as never);
    expect(m.content).toEqual([{ type: "text", text: chat.choices[0]!.message.content }]);
    const prompt = gw.ctx.tokenizer.encode(
      gw.ctx.tokenizer.applyChatTemplate(
        messages.map((x) => ({ role: x.role, content: x.content as string })),
        false,
        { continueFinalMessage: true },
      ),
      false,
    );
    expect(m.usage.input_tokens + (m.usage.cache_read_input_tokens ?? 0)).toBe(prompt.length);
  });

  it("streams Anthropic's events; the final message is the one create gives", async () => {
    const body = question(12);
    const whole = await client.messages.create(body);
    const types: string[] = [];
    let text = "";
    const stream = client.messages.stream(body);
    stream.on("streamEvent", (e) => types.push(e.type));
    stream.on("text", (t) => {
      text += t;
    });
    const final = await stream.finalMessage();
    expect(final.content).toEqual(whole.content);
    expect(final.stop_reason).toBe(whole.stop_reason);
    expect(final.usage.output_tokens).toBe(whole.usage.output_tokens);
    // The input split (cache reads) as message_delta gives it, after the prefix lookup.
    const input = (u: Anthropic.Usage) => u.input_tokens + (u.cache_read_input_tokens ?? 0);
    expect(input(final.usage)).toBe(input(whole.usage));
    expect(final.usage.cache_read_input_tokens).toBeGreaterThan(0); // the same prompt again
    expect(text).toBe((whole.content[0] as Anthropic.TextBlock).text);
    expect(types[0]).toBe("message_start");
    expect(types.slice(-2)).toEqual(["message_delta", "message_stop"]);
    expect(types).toContain("content_block_delta");
  });

  it("stop_sequences: the text ends before the sequence, stop_reason stop_sequence", async () => {
    const base = question(16);
    const full = ((await client.messages.create(base)).content[0] as Anthropic.TextBlock).text;
    const seq = full.slice(3, 6);
    expect(seq.length).toBe(3);
    const cut = await client.messages.create({ ...base, stop_sequences: ["\u0000never", seq] });
    expect(cut.stop_reason).toBe("stop_sequence");
    expect(cut.stop_sequence).toBe(seq);
    expect((cut.content[0] as Anthropic.TextBlock).text).toBe(full.slice(0, full.indexOf(seq)));
  });

  it("tools: a forced tool_use with parsed input, streamed as input_json_delta; results in the next turn", async () => {
    const body = {
      model: "tiny",
      messages: [{ role: "user" as const, content: "Weather in Paris?" }],
      // Room for the whitespace runs JSON allows (24 bytes at most each) around six places.
      max_tokens: 200,
      temperature: 1,
      tools: [WEATHER],
      tool_choice: { type: "tool" as const, name: "get_weather" },
    };
    const m = await client.messages.create(body);
    expect(m.stop_reason).toBe("tool_use");
    const use = m.content.find((b) => b.type === "tool_use") as Anthropic.ToolUseBlock;
    expect(use.name).toBe("get_weather");
    expect(use.id.length).toBeGreaterThan(0);
    expect(["Paris", "Rome"]).toContain((use.input as { city: string }).city);
    const stream = client.messages.stream(body);
    const partial: string[] = [];
    stream.on("inputJson", (delta) => partial.push(delta));
    const final = await stream.finalMessage();
    const streamed = final.content.find((b) => b.type === "tool_use") as Anthropic.ToolUseBlock;
    expect(final.stop_reason).toBe("tool_use");
    expect(JSON.parse(partial.join(""))).toEqual(streamed.input);
    // The next turn carries the call and its result (any tool_choice): answered.
    const next = await ask(client, {
      model: "tiny",
      max_tokens: 8,
      temperature: 0,
      tools: [WEATHER],
      messages: [
        { role: "user", content: "Weather in Paris?" },
        { role: "assistant", content: [{ type: "text", text: "Let me look." }, use] },
        {
          role: "user",
          content: [
            {
              type: "tool_result",
              tool_use_id: use.id,
              content: [{ type: "text", text: "sunny" }],
            },
            { type: "text", text: "And tomorrow?" },
          ],
        },
      ],
    });
    expect(next.content.length).toBeGreaterThan(0);
    expect(next.usage.output_tokens).toBeGreaterThan(0);
  });

  it("thinking: a thinking model's thought as a thinking block, before the text", async () => {
    const a = sdk(r1);
    const m = await ask(a, {
      model: "tiny",
      messages: [{ role: "user", content: "What is 2 + 2?" }],
      max_tokens: 12,
      temperature: 0,
    });
    const chat = await r1.client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "What is 2 + 2?" }],
      max_tokens: 12,
      temperature: 0,
    });
    const msg = chat.choices[0]!.message as unknown as {
      reasoning_content: string;
      content: string;
    };
    expect(m.content[0]).toEqual({
      type: "thinking",
      thinking: msg.reasoning_content,
      signature: "",
    });
    const text = m.content.find((b) => b.type === "text") as Anthropic.TextBlock | undefined;
    expect(text?.text ?? "").toBe(msg.content ?? "");
    // Streamed: thinking_delta events add up to the same thought.
    let thought = "";
    const stream = a.messages.stream(
      asBody({
        model: "tiny",
        messages: [{ role: "user", content: "What is 2 + 2?" }],
        max_tokens: 12,
        temperature: 0,
      }),
    );
    stream.on("thinking", (delta) => {
      thought += delta;
    });
    const streamed = await stream.finalMessage();
    expect(thought).toBe(msg.reasoning_content);
    // The thought's tokens in the usage, as the chat's reasoning_tokens.
    const thinking = { thinking_tokens: chat.usage!.completion_tokens_details!.reasoning_tokens };
    expect(thinking.thinking_tokens).toBeGreaterThan(0);
    expect((m.usage as { output_tokens_details?: object }).output_tokens_details).toEqual(thinking);
    expect((streamed.usage as { output_tokens_details?: object }).output_tokens_details).toEqual(
      thinking,
    );
  });

  it("thinking adaptive and between_tools think as enabled does (no budget); display omitted leaves the thought's text out", async () => {
    const a = sdk(r1);
    const base = {
      model: "tiny",
      messages: [{ role: "user" as const, content: "What is 2 + 2?" }],
      max_tokens: 12,
      temperature: 0,
    };
    const enabled = await ask(a, { ...base, thinking: { type: "enabled", budget_tokens: 1000 } });
    expect(enabled.content[0]).toMatchObject({ type: "thinking" });
    expect((enabled.content[0] as Anthropic.ThinkingBlock).thinking.length).toBeGreaterThan(0);
    for (const type of ["adaptive", "between_tools"] as const)
      expect((await ask(a, { ...base, thinking: { type } })).content, type).toEqual(
        enabled.content,
      );
    // display "updates" (a beta's; Claude Code sends it): the thought, as summarized
    for (const display of ["summarized", "updates"])
      expect((await ask(a, { ...base, thinking: { type: "adaptive", display } })).content).toEqual(
        enabled.content,
      );
    const omitted = await ask(a, {
      ...base,
      thinking: { type: "adaptive", display: "omitted" },
    });
    expect(omitted.content[0]).toEqual({ type: "thinking", thinking: "", signature: "" });
    expect(omitted.content.slice(1)).toEqual(enabled.content.slice(1));
    // Streamed: the block opens and closes, no thinking_delta.
    const kinds: string[] = [];
    const stream = a.messages.stream(
      asBody({ ...base, thinking: { type: "adaptive", display: "omitted" } }),
    );
    stream.on("streamEvent", (e) => {
      if (e.type === "content_block_start") kinds.push(`start ${e.content_block.type}`);
      if (e.type === "content_block_delta") kinds.push(e.delta.type);
    });
    const final = await stream.finalMessage();
    expect(kinds[0]).toBe("start thinking");
    expect(kinds).not.toContain("thinking_delta");
    expect(final.content[0]).toEqual({ type: "thinking", thinking: "", signature: "" });
  });

  it("structured outputs (output_config.format): the text follows the JSON schema, as the chat's json_schema", async () => {
    const schema = {
      type: "object",
      properties: { answer: { type: "integer" }, unit: { type: "string", maxLength: 5 } },
      required: ["answer", "unit"],
      additionalProperties: false,
    };
    const base = {
      model: "tiny",
      messages: [{ role: "user" as const, content: "What is 2 + 2?" }],
      max_tokens: 48,
      temperature: 0,
    };
    const m = await ask(client, {
      ...base,
      output_config: { format: { type: "json_schema", schema }, effort: "low" },
    });
    const text = (m.content.find((b) => b.type === "text") as Anthropic.TextBlock).text;
    const chat = await gw.client.chat.completions.create({
      ...base,
      response_format: {
        type: "json_schema",
        json_schema: { name: "output", schema, strict: true },
      },
    });
    expect(text).toBe(chat.choices[0]!.message.content);
    if (m.stop_reason === "end_turn") {
      const v = JSON.parse(text) as { answer: unknown; unit: unknown };
      expect(Object.keys(v).sort()).toEqual(["answer", "unit"]);
      expect(Number.isInteger(v.answer)).toBe(true);
    } else expect(text.trimStart().startsWith("{")).toBe(true);
    const plain = await ask(client, base);
    expect(plain.content).not.toEqual(m.content);
    // A schema the gateway cannot compile: 400 naming output_config.format.
    const e = await ask(client, {
      ...base,
      output_config: { format: { type: "json_schema", schema: { type: "object", not: {} } } },
    }).catch((err: { status: number; error: unknown }) => err);
    expect((e as { status: number }).status).toBe(400);
    expect(JSON.stringify((e as { error: unknown }).error)).toContain("output_config.format");
  });

  it("documents and search results: their text in the prompt, in a tag with their title; PDFs and citations refused", async () => {
    const asked = (content: unknown, role = "user") => ({
      model: "tiny",
      max_tokens: 6,
      temperature: 0,
      messages: [{ role, content }],
    });
    /** The answer and prompt of a request, to compare with the same as plain text. */
    const run = async (body: object) => {
      const m = await ask(client, body);
      return {
        content: m.content,
        prompt: m.usage.input_tokens + (m.usage.cache_read_input_tokens ?? 0),
      };
    };
    // A text document (title, context), then the question.
    const doc = await run(
      asked([
        {
          type: "document",
          source: { type: "text", media_type: "text/plain", data: "Paris is the capital." },
          title: "Notes",
          context: "From the atlas.",
        },
        { type: "text", text: QUESTION },
      ]),
    );
    expect(doc).toEqual(
      await run(
        asked(
          `<document title="Notes">\nFrom the atlas.\n\nParis is the capital.\n</document>\n${QUESTION}`,
        ),
      ),
    );
    // Content blocks as the source, no title; a search result in a tool's result.
    const blocks = await run(
      asked([
        {
          type: "document",
          source: {
            type: "content",
            content: [
              { type: "text", text: "A" },
              { type: "text", text: "B" },
            ],
          },
        },
        { type: "text", text: "Why?" },
      ]),
    );
    expect(blocks).toEqual(await run(asked("<document>\nAB\n</document>\nWhy?")));
    const search = (content: unknown) => ({
      ...asked("x"),
      tools: [WEATHER],
      messages: [
        { role: "user", content: "Weather?" },
        {
          role: "assistant",
          content: [{ type: "tool_use", id: "t1", name: "get_weather", input: { city: "Paris" } }],
        },
        { role: "user", content: [{ type: "tool_result", tool_use_id: "t1", content }] },
      ],
    });
    expect(
      await run(
        search([
          {
            type: "search_result",
            source: "https://example.com/w",
            title: "Weather",
            content: [{ type: "text", text: "sunny" }],
          },
        ]),
      ),
    ).toEqual(
      await run(
        search(
          '<search_result source="https://example.com/w" title="Weather">\nsunny\n</search_result>\n',
        ),
      ),
    );
    // Refused: a PDF, citations, an image among a document's blocks, a search result without a title.
    // biome-ignore format: a table
    const refused: [string, unknown, string][] = [
      ["a PDF", [{ type: "document", source: { type: "base64", media_type: "application/pdf", data: "JVBE" } }], "messages.0.content.0.source"],
      ["citations", [{ type: "document", source: { type: "text", media_type: "text/plain", data: "x" }, citations: { enabled: true } }], "messages.0.content.0.citations"],
      ["an image in a content source", [{ type: "document", source: { type: "content", content: [{ type: "image", source: {} }] } }], "messages.0.content.0.source.content.0"],
      ["a search result without a title", [{ type: "search_result", source: "s", content: [] }], "messages.0.content.0"],
    ];
    for (const [what, content, param] of refused) {
      const err = await ask(client, asked(content)).then(
        () => expect.unreachable(what),
        (e: unknown) => e as InstanceType<typeof Anthropic.APIError>,
      );
      expect(err.status, what).toBe(400);
      expect((err.error as { error: { param?: string } }).error.param, what).toBe(param);
    }
  });

  it("models: the SDK's list and retrieve give the served model (Anthropic's fields); another id is not found", async () => {
    const page = await client.models.list();
    expect(page.data).toMatchObject([
      {
        id: "tiny",
        type: "model",
        display_name: "tiny",
        created_at: "1970-01-01T00:00:00.000Z",
        max_input_tokens: gw.ctx.maxModelLen - 1,
        max_tokens: gw.ctx.maxModelLen - 1,
        lifecycle: "active",
      },
    ]);
    expect(page.hasNextPage()).toBe(false);
    expect(await client.models.retrieve("tiny")).toMatchObject(page.data[0]!);
    const other = await client.models.retrieve("claude-sonnet-4-5").catch((e: unknown) => e);
    expect(other).toBeInstanceOf(Anthropic.NotFoundError);
    // Keys by x-api-key, as for messages.
    const denied = await sdk(keyed, "wrong")
      .models.list()
      .catch((e: unknown) => e);
    expect(denied).toBeInstanceOf(Anthropic.AuthenticationError);
    expect((await sdk(keyed, "sekret").models.list()).data.map((m) => m.id)).toEqual(["tiny"]);
  });

  it("a system message in the conversation: the chat's system message at that place; text only", async () => {
    const later = "Reply in French.";
    const messages = [
      { role: "user", content: QUESTION },
      { role: "system", content: [{ type: "text", text: later }] },
      { role: "assistant", content: "Paris." },
      { role: "user", content: "And Italy?" },
    ];
    const m = await ask(client, {
      model: "tiny",
      system: SYSTEM,
      messages,
      max_tokens: 10,
      temperature: 0,
    });
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: [
        { role: "system", content: SYSTEM },
        { role: "user", content: QUESTION },
        { role: "system", content: later },
        { role: "assistant", content: "Paris." },
        { role: "user", content: "And Italy?" },
      ],
      max_tokens: 10,
      temperature: 0,
    });
    expect(m.content).toEqual([{ type: "text", text: chat.choices[0]!.message.content }]);
    const count = async (ms: object[]) =>
      (await client.messages.countTokens({ model: "tiny", system: SYSTEM, messages: ms } as never))
        .input_tokens;
    expect(await count(messages)).toBe(chat.usage!.prompt_tokens);
    expect(await count(messages.filter((x) => x.role !== "system"))).toBeLessThan(
      chat.usage!.prompt_tokens,
    );
    // text only, as the top-level system
    const image = [{ type: "image", source: { type: "url", url: "https://example.com/a.png" } }];
    const err = await ask(client, {
      model: "tiny",
      messages: [messages[0], { role: "system", content: image }, ...messages.slice(2)],
      max_tokens: 4,
    }).then(
      () => expect.unreachable("an image in a system message"),
      (e: unknown) => e as InstanceType<typeof Anthropic.APIError>,
    );
    expect(err).toBeInstanceOf(Anthropic.BadRequestError);
    expect((err.error as { error: { param: string } }).error.param).toBe("messages.1.content.0");
  });

  it("max_tokens past the context's rest: the answer runs to the window's end, stop_reason model_context_window_exceeded", async () => {
    const window = gw.ctx.maxModelLen;
    const count = (k: number) =>
      client.messages
        .countTokens({ model: "tiny", messages: [{ role: "user", content: "ab ".repeat(k) }] })
        .then(
          (c) => c.input_tokens,
          () => Number.POSITIVE_INFINITY,
        );
    // the longest prompt of this kind that leaves the answer 3 tokens or more
    let [lo, hi] = [1, window];
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if ((await count(mid)) <= window - 3) lo = mid;
      else hi = mid - 1;
    }
    const content = "ab ".repeat(lo);
    const room = window - (await count(lo));
    expect(room).toBeGreaterThanOrEqual(3);
    const body = { model: "tiny", messages: [{ role: "user", content }], temperature: 0 };
    // (the SDK streams a max_tokens over ~21k only: 16k plain, 32k streamed, as Claude Code)
    const m = await ask(client, { ...body, max_tokens: 16_000 });
    expect(m.stop_reason).toBe("model_context_window_exceeded");
    expect(m.usage.output_tokens).toBe(room);
    // streamed: the same
    const streamed = await client.messages
      .stream(asBody({ ...body, max_tokens: 32_000 }) as Anthropic.MessageStreamParams)
      .finalMessage();
    expect(streamed.stop_reason).toBe("model_context_window_exceeded");
    expect(streamed.content).toEqual(m.content);
    // a max_tokens inside the window stops there, as before
    const cut = await ask(client, { ...body, max_tokens: room - 1 });
    expect(cut.stop_reason).toBe("max_tokens");
    expect(cut.usage.output_tokens).toBe(room - 1);
    // and a chat completion's max_tokens past the context is still refused (OpenAI's)
    const chat = await gw.client.chat.completions
      .create({ model: "tiny", messages: [{ role: "user", content }], max_tokens: 32_000 })
      .catch((e: unknown) => e);
    expect(chat).toMatchObject({ status: 400, code: "EM_GATEWAY_PROMPT_TOO_LONG" });
  });

  it("bad requests: Anthropic's error types, our code, the field; keys by x-api-key", async () => {
    const ok = {
      model: "tiny",
      messages: [{ role: "user" as const, content: "hi" }],
      max_tokens: 4,
    };
    // biome-ignore format: a table
    const cases: [string, object, number, string, string | undefined][] = [
      ["no max_tokens", { model: "tiny", messages: ok.messages }, 400, "invalid_request_error", "max_tokens"],
      ["no messages", { ...ok, messages: [] }, 400, "invalid_request_error", "messages"],
      ["a tool_result block that is no block", { ...ok, messages: [{ role: "user", content: [{ type: "tool_result", tool_use_id: "t", content: [{ foo: 1 }] }] }] }, 400, "invalid_request_error", "messages.0.content.0.content.0"],
      ["an image", { ...ok, messages: [{ role: "user", content: [{ type: "image", source: {} }] }] }, 400, "invalid_request_error", "messages.0.content.0"],
      ["a server tool", { ...ok, tools: [{ type: "web_search_20250305", name: "web_search" }] }, 400, "invalid_request_error", "tools.0.type"],
      ["MCP servers", { ...ok, mcp_servers: [{ type: "url", url: "https://mcp.example.com/sse", name: "x" }] }, 400, "invalid_request_error", "mcp_servers"],
      ["a container", { ...ok, container: "container_1" }, 400, "invalid_request_error", "container"],
      ["tool choice without a name", { ...ok, tools: [WEATHER], tool_choice: { type: "tool" } }, 400, "invalid_request_error", "tool_choice.name"],
      ["a prompt past the context", { ...ok, messages: [{ role: "user", content: "ab ".repeat(2000) }] }, 400, "invalid_request_error", "messages"],
      ["temperature 1.5", { ...ok, temperature: 1.5 }, 400, "invalid_request_error", "temperature"],
      ["an unknown model", { ...ok, model: "claude-x" }, 404, "not_found_error", "model"],
    ];
    for (const [what, body, status, type, param] of cases) {
      const err = await client.messages.create(body as never).then(
        () => expect.unreachable(what),
        (e: unknown) => e as InstanceType<typeof Anthropic.APIError>,
      );
      expect(err, what).toBeInstanceOf(Anthropic.APIError);
      expect(err.status, what).toBe(status);
      const e = (err.error as { error: { type: string; code: string; param?: string } }).error;
      expect(e.type, what).toBe(type);
      expect(e.code, what).toMatch(/^EM_GATEWAY_/);
      expect(e.param, what).toBe(param);
    }
    // API keys: Anthropic's x-api-key header (the SDK's), refused when wrong.
    expect((await sdk(keyed, "sekret").messages.create(ok)).type).toBe("message");
    const denied = await sdk(keyed, "wrong")
      .messages.create(ok)
      .then(
        () => expect.unreachable("wrong key"),
        (e: unknown) => e as InstanceType<typeof Anthropic.APIError>,
      );
    expect(denied).toBeInstanceOf(Anthropic.AuthenticationError);
    expect((await client.messages.create(ok)).type).toBe("message");
  });
});
