// POST /v1/responses (OpenAI's Responses API) through the official `openai` client, against
// gateways started in this process on the tiny V3 checkpoint. A Responses request is the
// chat request it stands for: the same tokens come out, read into output items (message,
// reasoning, function_call), and streamed as Responses events.
import OpenAI from "openai";
import { ResponseStream } from "openai/lib/responses/ResponseStream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let dir: string;
let gw: TestGateway;
let r1: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  gw = await startGateway(dir);
  r1 = await startGateway(dir, { reasoningParser: "deepseek-r1" });
});
afterAll(async () => {
  await gw?.close();
  await r1?.close();
});

const user = (content: string) => [{ role: "user" as const, content }];
type Event = { type: string; sequence_number: number } & Record<string, any>;

/**
 * A streamed response's events, in order. Each stream that ends with a response is also read
 * by the SDK's own accumulator (what `client.responses.stream()` runs: it checks each event
 * against the snapshot it builds), which must build the response the last event carries.
 */
async function events(g: TestGateway, body: object): Promise<Event[]> {
  const out: Event[] = [];
  const stream = await g.client.responses.create({
    ...body,
    stream: true,
  } as OpenAI.Responses.ResponseCreateParamsStreaming);
  for await (const e of stream) out.push(e as unknown as Event);
  const last = out.at(-1)!;
  if (/^response\.(completed|incomplete|failed)$/.test(last.type)) {
    const lines = new ReadableStream({
      start(c) {
        for (const e of out) c.enqueue(new TextEncoder().encode(`${JSON.stringify(e)}\n`));
        c.close();
      },
    });
    const built = await ResponseStream.fromReadableStream(lines).finalResponse();
    const want = last["response"] as OpenAI.Responses.Response;
    expect(built.output).toMatchObject(want.output); // (and its own parsed: null)
  }
  return out;
}

describe("POST /v1/responses", () => {
  it("answers what the chat request it stands for answers (text, usage)", async () => {
    const r = await gw.client.responses.create({
      model: "tiny",
      instructions: "Answer briefly.",
      input: "What is the capital of France?",
      max_output_tokens: 12,
      temperature: 0,
    });
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: [
        { role: "system", content: "Answer briefly." },
        { role: "user", content: "What is the capital of France?" },
      ],
      max_tokens: 12,
      temperature: 0,
    });
    expect(r.object).toBe("response");
    expect(r.id).toMatch(/^resp_/);
    expect(r.output_text).toBe(chat.choices[0]!.message.content);
    expect(r.output.map((i) => i.type)).toEqual(["message"]);
    const finish = chat.choices[0]!.finish_reason;
    expect(r.status).toBe(finish === "length" ? "incomplete" : "completed");
    if (finish === "length") expect(r.incomplete_details).toEqual({ reason: "max_output_tokens" });
    // The item the length cut is incomplete too.
    expect((r.output[0] as { status: string }).status).toBe(
      finish === "length" ? "incomplete" : "completed",
    );
    expect(r.usage).toMatchObject({
      input_tokens: chat.usage!.prompt_tokens,
      output_tokens: chat.usage!.completion_tokens,
      total_tokens: chat.usage!.total_tokens,
      output_tokens_details: { reasoning_tokens: 0 },
    });
    expect(r.instructions).toBe("Answer briefly.");
    expect(r.max_output_tokens).toBe(12);
    // the fields OpenAI's response object has, defaults where the request gave none
    expect(r).toMatchObject({
      text: { format: { type: "text" }, verbosity: "medium" },
      top_logprobs: 0,
      reasoning: { effort: null, summary: null },
      max_tool_calls: null,
      service_tier: "default",
      user: null,
      prompt_cache_key: null,
      safety_identifier: null,
    });
  });

  it("accepts and echoes the fields that change nothing here; the same answer", async () => {
    const plain = { model: "tiny", input: "Hello there", max_output_tokens: 8, temperature: 0 };
    const r = await gw.client.responses.create({
      ...plain,
      text: { verbosity: "low" },
      reasoning: { summary: "auto" },
      max_tool_calls: 3,
      service_tier: "flex",
      user: "u-1",
      prompt_cache_key: "k-1",
      safety_identifier: "s-1",
    });
    expect(r).toMatchObject({
      text: { format: { type: "text" }, verbosity: "low" },
      reasoning: { effort: null, summary: "auto" },
      max_tool_calls: 3,
      service_tier: "default",
      user: "u-1",
      prompt_cache_key: "k-1",
      safety_identifier: "s-1",
    });
    expect(r.output_text).toBe((await gw.client.responses.create(plain)).output_text);
    const bad = await gw.client.responses
      .create({ ...plain, text: { verbosity: "loud" as "low" } })
      .catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  });

  it("vLLM's output fields as on chat: allowed_token_ids, bad_words, skip_special_tokens", async () => {
    const tk = gw.ctx.tokenizer;
    const input = "Write something.";
    const base = { model: "tiny", input, max_output_tokens: 16, temperature: 1.2, seed: 3 };
    const chatBase = {
      model: "tiny",
      messages: user(input),
      max_tokens: 16,
      temperature: 1.2,
      seed: 3,
    };
    const allowed = ["a", "b", " c"].map((t) => tk.encode(t, false)[0]!);
    const cases: object[] = [
      { allowed_token_ids: allowed },
      { bad_words: ["the", "a"] },
      { skip_special_tokens: false, max_output_tokens: 40 },
    ];
    for (const extra of cases) {
      const r = await gw.client.responses.create({ ...base, ...extra } as never);
      const { max_output_tokens: m, ...chatExtra } = extra as { max_output_tokens?: number };
      const chat = await gw.client.chat.completions.create({
        ...chatBase,
        ...chatExtra,
        ...(m ? { max_tokens: m } : {}),
      } as never);
      expect((r as OpenAI.Responses.Response).output_text, JSON.stringify(extra)).toBe(
        (chat as OpenAI.ChatCompletion).choices[0]!.message.content,
      );
    }
    // The field works, not only passes: only the allowed tokens.
    const only = await gw.client.responses.create({ ...base, allowed_token_ids: allowed } as never);
    expect((only as OpenAI.Responses.Response).output_text).toMatch(/^(a|b| c)+$/);
    // An id past the vocabulary: refused, with the field named.
    const e = await gw.client.responses
      .create({ ...base, allowed_token_ids: [gw.ctx.vocabSize] } as never)
      .catch((err: { status: number; param: string }) => err);
    expect(e).toMatchObject({ status: 400, param: "allowed_token_ids" });
  });

  it("takes the conversation as input items: messages, content parts, a call and its output", async () => {
    const weather = {
      type: "function" as const,
      name: "get_weather",
      description: "The weather in a city",
      parameters: { type: "object", properties: { city: { type: "string" } } },
      strict: false,
    };
    const r = await gw.client.responses.create({
      model: "tiny",
      input: [
        { role: "developer", content: "Use the tools." },
        { role: "user", content: [{ type: "input_text", text: "Weather in Paris?" }] },
        {
          type: "function_call",
          call_id: "call_1",
          name: "get_weather",
          arguments: '{"city":"Paris"}',
        },
        { type: "function_call_output", call_id: "call_1", output: '{"celsius":21}' },
      ],
      tools: [weather],
      tool_choice: "none",
      max_output_tokens: 8,
      temperature: 0,
    });
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: [
        { role: "system", content: "Use the tools." },
        { role: "user", content: "Weather in Paris?" },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            {
              id: "call_1",
              type: "function",
              function: { name: "get_weather", arguments: '{"city":"Paris"}' },
            },
          ],
        },
        { role: "tool", tool_call_id: "call_1", content: '{"celsius":21}' },
      ],
      tools: [
        {
          type: "function",
          function: {
            name: weather.name,
            description: weather.description,
            parameters: weather.parameters,
            strict: false,
          },
        },
      ],
      tool_choice: "none",
      max_tokens: 8,
      temperature: 0,
    });
    expect(r.usage!.input_tokens).toBe(chat.usage!.prompt_tokens);
    expect(r.output_text).toBe(chat.choices[0]!.message.content);
  });

  it("streams events: created, item and part openings, deltas that add up, completed", async () => {
    const body = {
      model: "tiny",
      input: "Tell me a story.",
      max_output_tokens: 16,
      temperature: 0,
    };
    const whole = await gw.client.responses.create(body);
    const es = await events(gw, body);
    expect(es.map((e) => e.sequence_number)).toEqual(es.map((_, i) => i));
    const types = es.map((e) => e.type);
    expect(types.slice(0, 4)).toEqual([
      "response.created",
      "response.in_progress",
      "response.output_item.added",
      "response.content_part.added",
    ]);
    expect(types.slice(-4)).toEqual([
      "response.output_text.done",
      "response.content_part.done",
      "response.output_item.done",
      whole.status === "completed" ? "response.completed" : "response.incomplete",
    ]);
    const deltas = es.filter((e) => e.type === "response.output_text.delta");
    expect(deltas.length).toBeGreaterThan(1);
    const text = deltas.map((e) => e.delta as string).join("");
    expect(text).toBe(whole.output_text);
    const itemId = es[2]!["item"].id as string;
    for (const d of deltas) expect([d["item_id"], d["output_index"]]).toEqual([itemId, 0]);
    expect(es.find((e) => e.type === "response.output_text.done")!["text"]).toBe(text);
    const final = es.at(-1)!["response"] as OpenAI.Responses.Response;
    expect(final.output[0]).toMatchObject({
      type: "message",
      id: itemId,
      status: whole.status === "completed" ? "completed" : "incomplete",
    });
    expect(final.usage).toEqual(whole.usage);
  });

  it("a named function tool: the call as a function_call item, the chat's same call", async () => {
    const params = {
      type: "object",
      properties: { city: { type: "string" }, days: { type: "integer" } },
      required: ["city", "days"],
    };
    const extra = { seed: 5 } as object;
    const r = await gw.client.responses.create({
      model: "tiny",
      input: "Weather in Paris?",
      tools: [{ type: "function", name: "get_weather", parameters: params, strict: true }],
      tool_choice: { type: "function", name: "get_weather" },
      max_output_tokens: 40,
      temperature: 1,
      ...extra,
    });
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Weather in Paris?"),
      tools: [
        { type: "function", function: { name: "get_weather", parameters: params, strict: true } },
      ],
      tool_choice: { type: "function", function: { name: "get_weather" } },
      max_tokens: 40,
      temperature: 1,
      seed: 5,
    });
    const want = chat.choices[0]!.message.tool_calls![0]!;
    expect(r.output).toHaveLength(1);
    const call = r.output[0]! as OpenAI.Responses.ResponseFunctionToolCall;
    expect(call).toMatchObject({ type: "function_call", name: "get_weather" });
    expect(call.status).toBe(r.status === "completed" ? "completed" : "incomplete");
    expect(call.call_id).toMatch(/^call_/);
    if (want.type === "function") expect(call.arguments).toBe(want.function.arguments);
    // Streamed: the item opens with its name, the arguments come as deltas.
    const es = await events(gw, {
      model: "tiny",
      input: "Weather in Paris?",
      tools: [{ type: "function", name: "get_weather", parameters: params, strict: true }],
      tool_choice: { type: "function", name: "get_weather" },
      max_output_tokens: 40,
      temperature: 1,
      ...extra,
    });
    const added = es.find((e) => e.type === "response.output_item.added")!;
    expect(added["item"]).toMatchObject({
      type: "function_call",
      name: "get_weather",
      arguments: "",
    });
    const args = es
      .filter((e) => e.type === "response.function_call_arguments.delta")
      .map((e) => e.delta as string)
      .join("");
    expect(args).toBe(call.arguments);
    expect(es.find((e) => e.type === "response.function_call_arguments.done")!["arguments"]).toBe(
      args,
    );
  });

  it("namespace tools: their tools named <namespace>__<name> for the model, calls named back into the namespace; history calls too", async () => {
    const params = {
      type: "object",
      properties: { id: { type: "integer" } },
      required: ["id"],
    };
    const crm = {
      type: "namespace",
      name: "crm",
      description: "Customer records.",
      tools: [
        { type: "function", name: "lookup", description: "Find a customer.", parameters: params },
      ],
    };
    const body = {
      model: "tiny",
      input: "Who is customer 7?",
      tools: [crm],
      tool_choice: "required",
      max_output_tokens: 30,
      temperature: 0,
    } as unknown as OpenAI.Responses.ResponseCreateParamsNonStreaming;
    const r = await gw.client.responses.create(body);
    const chatBody = {
      model: "tiny",
      messages: user("Who is customer 7?"),
      tools: [
        {
          type: "function" as const,
          function: {
            name: "crm__lookup",
            description: "Customer records.\n\nFind a customer.",
            parameters: params,
          },
        },
      ],
      tool_choice: "required" as const,
      max_tokens: 30,
      temperature: 0,
    };
    const chat = await gw.client.chat.completions.create(chatBody);
    const want = chat.choices[0]!.message.tool_calls![0]! as { function: { arguments: string } };
    const call = r.output.find((i) => i.type === "function_call")!;
    expect(call).toMatchObject({
      type: "function_call",
      name: "lookup",
      namespace: "crm",
      arguments: want.function.arguments,
    });
    expect(r.tools).toEqual([crm]);
    // Streamed: the item opens named into its namespace.
    const es = await events(gw, { ...body, stream: true });
    const added = es.find(
      (e) =>
        e.type === "response.output_item.added" &&
        (e["item"] as { type: string }).type === "function_call",
    )!;
    expect(added["item"]).toMatchObject({ name: "lookup", namespace: "crm" });
    // Its call and output in the history: the prompt the chat's qualified call makes.
    const turn = [
      {
        type: "function_call",
        call_id: "call_1",
        name: "lookup",
        namespace: "crm",
        arguments: '{"id": 7}',
      },
      { type: "function_call_output", call_id: "call_1", output: "Ada Lovelace" },
    ];
    const next = await gw.client.responses.create({
      ...body,
      input: [{ role: "user", content: "Who is customer 7?" }, ...turn],
      tool_choice: "auto",
    } as unknown as OpenAI.Responses.ResponseCreateParamsNonStreaming);
    const chatNext = await gw.client.chat.completions.create({
      ...chatBody,
      messages: [
        ...user("Who is customer 7?"),
        {
          role: "assistant",
          content: null,
          tool_calls: [
            {
              id: "call_1",
              type: "function",
              function: { name: "crm__lookup", arguments: '{"id": 7}' },
            },
          ],
        },
        { role: "tool", tool_call_id: "call_1", content: "Ada Lovelace" },
      ],
      tool_choice: "auto",
    });
    expect(next.usage!.input_tokens).toBe(chatNext.usage!.prompt_tokens);
    // Refused: a namespace holding a hosted tool; a joined name too long for the model.
    for (const [tools, param] of [
      [[{ ...crm, tools: [{ type: "web_search" }] }], "tools.0.tools.0"],
      [[{ ...crm, tools: [{ ...crm.tools[0], name: "x".repeat(63) }] }], "tools.0.tools.0.name"],
    ] as const) {
      const err = await gw.client.responses
        .create({ ...body, tools } as unknown as OpenAI.Responses.ResponseCreateParamsNonStreaming)
        .catch((e: unknown) => e);
      expect(err).toMatchObject({ status: 400, param });
    }
  });

  it("tool outputs as content parts read as their text; an output without a call (Codex's) as its tool's", async () => {
    const count = async (input: unknown[]) =>
      (
        await gw.client.responses.inputTokens.count({
          model: "tiny",
          input: input as OpenAI.Responses.ResponseInputItem[],
        })
      ).input_tokens;
    const call = { type: "function_call", call_id: "c1", name: "f", arguments: "{}" };
    const asText = [
      user("hi")[0],
      call,
      { type: "function_call_output", call_id: "c1", output: "ok then" },
    ];
    const asParts = [
      user("hi")[0],
      call,
      {
        type: "function_call_output",
        call_id: "c1",
        output: [
          { type: "input_text", text: "ok " },
          { type: "input_text", text: "then" },
        ],
      },
    ];
    expect(await count(asParts)).toBe(await count(asText));
    // without a call: a tool's output all the same (the chat's tool message)
    const unasked = [
      user("hi")[0],
      { type: "function_call_output", name: "goal", namespace: "agent", output: "ship it" },
    ];
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: [...user("hi"), { role: "tool", tool_call_id: "agent__goal", content: "ship it" }],
      max_tokens: 1,
    });
    expect(await count(unasked)).toBe(chat.usage!.prompt_tokens);
    for (const [input, param] of [
      [
        [
          user("hi")[0],
          call,
          {
            type: "function_call_output",
            call_id: "c1",
            output: [{ type: "input_image", image_url: "https://example.com/a.png" }],
          },
        ],
        "input.2.output.0",
      ],
      [[user("hi")[0], { type: "function_call_output", output: "x" }], "input.1"],
    ] as const) {
      const err = await count([...input]).catch((e: unknown) => e);
      expect(err).toMatchObject({ status: 400, param });
    }
  });

  it("a named custom tool: a custom_tool_call item whose input is in the tool's Lark grammar, streamed as input deltas; then its output as input", async () => {
    const definition = 'start: term (("+" | "-") term)~0..2\nterm: /[0-9]{1,2}/ | "x"i';
    const tool = {
      type: "custom" as const,
      name: "calc",
      description: "Evaluates a sum",
      format: { type: "grammar" as const, syntax: "lark" as const, definition },
    };
    const body = {
      model: "tiny",
      input: "Compute",
      tools: [tool],
      tool_choice: { type: "custom" as const, name: "calc" },
      max_output_tokens: 40,
      temperature: 1,
      seed: 6,
    };
    const r = await gw.client.responses.create(body);
    expect(r.output).toHaveLength(1);
    const call = r.output[0]! as OpenAI.Responses.ResponseCustomToolCall & { status: string };
    expect(call).toMatchObject({ type: "custom_tool_call", name: "calc", status: "completed" });
    expect(call.id).toMatch(/^ctc_/);
    expect(call.call_id).toMatch(/^call_/);
    expect(call.input).toMatch(/^(?:[0-9]{1,2}|[xX])(?:[+-](?:[0-9]{1,2}|[xX])){0,2}$/);
    // The chat's same call (the same request, seeded).
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Compute"),
      tools: [
        {
          type: "custom",
          custom: {
            name: "calc",
            description: "Evaluates a sum",
            format: { type: "grammar", grammar: { syntax: "lark", definition } },
          },
        },
      ],
      tool_choice: { type: "custom", custom: { name: "calc" } },
      max_tokens: 40,
      temperature: 1,
      seed: 6,
    });
    const want = chat.choices[0]!.message.tool_calls![0]!;
    expect(want.type === "custom" && want.custom.input).toBe(call.input);
    // Streamed: the item opens with its name, its input comes as deltas.
    const es = await events(gw, body);
    expect(es.find((e) => e.type === "response.output_item.added")!["item"]).toMatchObject({
      type: "custom_tool_call",
      name: "calc",
      input: "",
    });
    const input = es
      .filter((e) => e.type === "response.custom_tool_call_input.delta")
      .map((e) => e.delta as string)
      .join("");
    expect(input).toBe(call.input);
    expect(es.find((e) => e.type === "response.custom_tool_call_input.done")!["input"]).toBe(input);
    // The call and its output as the next request's input; and as the kept conversation.
    const next = await gw.client.responses.create({
      model: "tiny",
      input: [
        { role: "user", content: "Compute" },
        { type: "custom_tool_call", call_id: call.call_id, name: "calc", input: call.input },
        { type: "custom_tool_call_output", call_id: call.call_id, output: "42" },
      ],
      tools: [tool],
      max_output_tokens: 4,
    });
    const continued = await gw.client.responses.create({
      model: "tiny",
      previous_response_id: r.id,
      input: [{ type: "custom_tool_call_output", call_id: call.call_id, output: "42" }],
      tools: [tool],
      max_output_tokens: 4,
    });
    expect(continued.usage!.input_tokens).toBe(next.usage!.input_tokens);
    expect(next.usage!.input_tokens).toBeGreaterThan(r.usage!.input_tokens);
    // allowed_tools in Responses' form: calls of the listed tools only.
    const allowed = await gw.client.responses.create({
      ...body,
      tools: [
        tool,
        { type: "function", name: "other", parameters: { type: "object" }, strict: false },
      ],
      tool_choice: {
        type: "allowed_tools",
        mode: "required",
        tools: [{ type: "custom", name: "calc" }],
      },
    });
    expect(allowed.output[0]).toMatchObject({ type: "custom_tool_call", name: "calc" });
  });

  it("text.format json_schema: the answer follows the schema, as the chat's response_format", async () => {
    const schema = {
      type: "object",
      properties: { answer: { type: "string" } },
      required: ["answer"],
      additionalProperties: false,
    };
    const r = await gw.client.responses.create({
      model: "tiny",
      input: "Answer in JSON.",
      text: { format: { type: "json_schema", name: "answer", schema, strict: true } },
      max_output_tokens: 24,
      temperature: 0,
    });
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Answer in JSON."),
      response_format: {
        type: "json_schema",
        json_schema: { name: "answer", schema, strict: true },
      },
      max_tokens: 24,
      temperature: 0,
    });
    expect(r.output_text).toBe(chat.choices[0]!.message.content);
    expect(r.output_text.trimStart().startsWith("{")).toBe(true);
    expect(r.text?.format).toMatchObject({ type: "json_schema", name: "answer" });
  });

  it("with the R1 parser: the thinking as a reasoning item, streamed as reasoning_text deltas", async () => {
    const body = { model: "tiny", input: "What is 2 + 2?", max_output_tokens: 12, temperature: 0 };
    const chat = await r1.client.chat.completions.create({
      model: "tiny",
      messages: user("What is 2 + 2?"),
      max_tokens: 12,
      temperature: 0,
    });
    const thought = (chat.choices[0]!.message as unknown as { reasoning_content: string })
      .reasoning_content;
    expect(thought.length).toBeGreaterThan(0);
    const r = await r1.client.responses.create(body);
    const reasoning = r.output[0] as OpenAI.Responses.ResponseReasoningItem;
    expect(reasoning.type).toBe("reasoning");
    expect(reasoning.content).toEqual([{ type: "reasoning_text", text: thought }]);
    // This random model never closes its thought (openai.test.ts): no message item.
    expect(r.output).toHaveLength(1);
    expect(r.output_text).toBe("");
    expect(r.usage!.output_tokens_details.reasoning_tokens).toBeGreaterThan(0);
    const es = await events(r1, body);
    expect(
      es
        .filter((e) => e.type === "response.reasoning_text.delta")
        .map((e) => e.delta)
        .join(""),
    ).toBe(thought);
    expect(es.find((e) => e.type === "response.reasoning_text.done")!["text"]).toBe(thought);
  });

  it("continues a kept response (previous_response_id): its conversation, not its instructions", async () => {
    const first = await gw.client.responses.create({
      model: "tiny",
      instructions: "Be brief.",
      input: "Name a color.",
      max_output_tokens: 6,
      temperature: 0,
    });
    expect((first as unknown as { store: boolean }).store).toBe(true);
    const next = await gw.client.responses.create({
      model: "tiny",
      previous_response_id: first.id,
      input: "Another one?",
      max_output_tokens: 6,
      temperature: 0,
    });
    expect(next.previous_response_id).toBe(first.id);
    // The same as the chat of the whole conversation (OpenAI's rule: instructions are not
    // carried over; the previous answer's text is).
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: [
        { role: "user", content: "Name a color." },
        { role: "assistant", content: first.output_text },
        { role: "user", content: "Another one?" },
      ],
      max_tokens: 6,
      temperature: 0,
    });
    expect(next.usage!.input_tokens).toBe(chat.usage!.prompt_tokens);
    expect(next.output_text).toBe(chat.choices[0]!.message.content);
    // Kept: retrieved as answered, deleted, then gone.
    expect(await gw.client.responses.retrieve(first.id)).toEqual(first);
    await gw.client.responses.delete(first.id);
    const gone = (await gw.client.responses.retrieve(first.id).catch((e: unknown) => e)) as {
      status: number;
      code: string;
    };
    expect([gone.status, gone.code]).toEqual([404, "EM_GATEWAY_RESPONSE_NOT_FOUND"]);
    // store: false keeps nothing.
    const unkept = await gw.client.responses.create({
      model: "tiny",
      input: "hi",
      store: false,
      max_output_tokens: 2,
    });
    expect((unkept as unknown as { store: boolean }).store).toBe(false);
    expect(
      (
        (await gw.client.responses.retrieve(unkept.id).catch((e: unknown) => e)) as {
          status: number;
        }
      ).status,
    ).toBe(404);
  });

  it("counts a request's input tokens (input_tokens): the usage.input_tokens the same response gets, a continued conversation's too", async () => {
    const tools = [
      {
        type: "function" as const,
        name: "weather",
        description: "The weather in a city.",
        parameters: { type: "object", properties: { city: { type: "string" } } },
        strict: false,
      },
    ];
    const request = {
      model: "tiny",
      instructions: "Be brief.",
      input: [{ role: "user" as const, content: "Name a color." }],
      tools,
    };
    const counted = await gw.client.responses.inputTokens.count(request);
    expect(counted.object).toBe("response.input_tokens");
    const answered = await gw.client.responses.create({
      ...request,
      max_output_tokens: 4,
      temperature: 0,
    });
    expect(counted.input_tokens).toBe(answered.usage!.input_tokens);
    // No model: the one served; with previous_response_id: the conversation before it too.
    const next = await gw.client.responses.inputTokens.count({
      previous_response_id: answered.id,
      input: "Another one?",
    });
    const continued = await gw.client.responses.create({
      model: "tiny",
      previous_response_id: answered.id,
      input: "Another one?",
      max_output_tokens: 2,
    });
    expect(next.input_tokens).toBe(continued.usage!.input_tokens);
    const alone = await gw.client.responses.inputTokens.count({ input: "Another one?" });
    expect(next.input_tokens).toBeGreaterThan(alone.input_tokens);
    // Another model, a response not kept, no input: refused as the create refuses them.
    for (const [body, status, param] of [
      [{ model: "gpt-none", input: "hi" }, 404, "model"],
      [{ previous_response_id: "resp_none", input: "hi" }, 404, "previous_response_id"],
      [{ input: [] }, 400, null],
      // (a stored prompt: not kept here, so not ignored either)
      [{ input: "hi", prompt: { id: "pmpt_1" } }, 400, "prompt"],
    ] as const) {
      const e = (await gw.client.responses.inputTokens
        .count(body as never)
        .catch((err: unknown) => err)) as { status: number; param: string | null };
      expect([e.status, param === null ? null : e.param]).toEqual([status, param]);
      if (param === "prompt") {
        const created = await gw.client.responses
          .create({ model: "tiny", ...body })
          .catch((err) => err);
        expect([created.status, created.param]).toEqual([400, "prompt"]);
      }
    }
  });

  it("lists a kept response's input items: newest first, in pages, with ids (input_items)", async () => {
    const r = await gw.client.responses.create({
      model: "tiny",
      input: [
        { role: "user", content: "one" },
        { role: "assistant", content: "two" },
        { role: "user", content: [{ type: "input_text", text: "three" }] },
      ],
      max_output_tokens: 2,
      temperature: 0,
    });
    const text = (items: OpenAI.Responses.ResponseItem[]) =>
      items.map((i) => (i as { content: { text: string }[] }).content[0]!.text);
    const all = await gw.client.responses.inputItems.list(r.id);
    expect(text(all.data)).toEqual(["three", "two", "one"]);
    expect(all.data.map((i) => (i as { role: string }).role)).toEqual([
      "user",
      "assistant",
      "user",
    ]);
    expect(all.data[1]).toMatchObject({
      type: "message",
      content: [{ type: "output_text", text: "two" }],
    });
    expect(all.data.every((i) => /^msg_/.test(i.id!))).toBe(true);
    // Oldest first, two at a time: the client follows `after` to the next page.
    const first = await gw.client.responses.inputItems.list(r.id, { order: "asc", limit: 2 });
    expect([text(first.data), first.has_more]).toEqual([["one", "two"], true]);
    const next = await first.getNextPage();
    expect([text(next.data), next.has_more]).toEqual([["three"], false]);
    // The same ids every time (kept with the response).
    expect(next.data[0]!.id).toBe(all.data[0]!.id);
    // A limit out of 1-100, an unknown item to start after, an unknown response.
    for (const limit of [0, 101]) {
      const e = (await gw.client.responses.inputItems
        .list(r.id, { limit })
        .catch((x: unknown) => x)) as {
        status: number;
      };
      expect(e.status).toBe(400);
    }
    const badAfter = (await gw.client.responses.inputItems
      .list(r.id, { after: "msg_nope" })
      .catch((e: unknown) => e)) as { status: number; code: string; param: string };
    expect([badAfter.status, badAfter.code, badAfter.param]).toEqual([
      400,
      "EM_GATEWAY_BAD_REQUEST",
      "after",
    ]);
    const unknown = (await gw.client.responses.inputItems
      .list("resp_nope")
      .catch((e: unknown) => e)) as {
      status: number;
      code: string;
    };
    expect([unknown.status, unknown.code]).toEqual([404, "EM_GATEWAY_RESPONSE_NOT_FOUND"]);
  });

  it("include message.output_text.logprobs: the chat's token logprobs on the text, streamed with its deltas", async () => {
    const body = {
      model: "tiny",
      input: "Count: one, two,",
      max_output_tokens: 8,
      temperature: 0,
      include: ["message.output_text.logprobs" as const],
      top_logprobs: 2,
    };
    const r = await gw.client.responses.create(body);
    const chat = await gw.client.chat.completions.create({
      model: "tiny",
      messages: user("Count: one, two,"),
      max_tokens: 8,
      temperature: 0,
      logprobs: true,
      top_logprobs: 2,
    });
    const part = (r.output[0] as OpenAI.Responses.ResponseOutputMessage)
      .content[0] as OpenAI.Responses.ResponseOutputText;
    expect(part.text).toBe(chat.choices[0]!.message.content);
    expect(part.logprobs).toEqual(chat.choices[0]!.logprobs!.content);
    expect(part.logprobs!.map((l) => l.token).join("")).toBe(part.text);
    expect(part.logprobs!.every((l) => l.top_logprobs.length === 2)).toBe(true);
    // Streamed: the deltas' logprobs add up to the same list, the done event holds it all.
    const ev = await events(gw, body);
    const deltas = ev.filter((e) => e.type === "response.output_text.delta");
    expect(deltas.flatMap((e) => e.logprobs)).toEqual(part.logprobs);
    expect(ev.find((e) => e.type === "response.output_text.done")!.logprobs).toEqual(part.logprobs);
    // Without include: no logprobs on the part.
    const plain = await gw.client.responses.create({ ...body, include: [] });
    expect(
      (plain.output[0] as OpenAI.Responses.ResponseOutputMessage).content[0],
    ).not.toHaveProperty("logprobs");
    // Refused where tokens would be split between items, or for what is not supported.
    const refusal = (g: TestGateway, extra: object) =>
      g.client.responses
        .create({ ...body, ...extra } as OpenAI.Responses.ResponseCreateParamsNonStreaming)
        .catch((e: unknown) => e) as Promise<{ status: number; code: string; param: string }>;
    const thinking = await refusal(r1, {});
    expect([thinking.status, thinking.param]).toEqual([400, "include"]);
    const tools = await refusal(gw, {
      tools: [{ type: "function", name: "f", parameters: { type: "object", properties: {} } }],
    });
    expect([tools.status, tools.param]).toEqual([400, "include"]);
    const unknown = await refusal(gw, { include: ["file_search_call.results"] });
    expect([unknown.status, unknown.code, unknown.param]).toEqual([
      400,
      "EM_GATEWAY_BAD_REQUEST",
      "include.0",
    ]);
    // reasoning.encrypted_content is accepted (and ignored).
    const enc = await gw.client.responses.create({
      ...body,
      include: ["reasoning.encrypted_content"],
    });
    expect(enc.output_text).toBe(part.text);
  });

  it("background: answers at once, runs on to the same answer; cancel stops one; refusals", async () => {
    const body = {
      model: "tiny",
      input: "Tell me a story.",
      max_output_tokens: 12,
      temperature: 0,
    };
    const bg = await gw.client.responses.create({ ...body, background: true });
    expect([bg.status, bg.background, bg.output]).toEqual(["queued", true, []]);
    let polled = await gw.client.responses.retrieve(bg.id);
    for (let i = 0; i < 200 && ["queued", "in_progress"].includes(polled.status!); i++) {
      await new Promise((r) => setTimeout(r, 25));
      polled = await gw.client.responses.retrieve(bg.id);
    }
    const fg = await gw.client.responses.create(body);
    expect(polled.status).toBe(fg.status);
    expect(polled.output_text).toBe(fg.output_text);
    expect(polled.usage).toEqual(fg.usage);
    // A finished background response continues like any other.
    const next = await gw.client.responses.create({ ...body, previous_response_id: bg.id });
    expect(["completed", "incomplete"]).toContain(next.status);
    // Cancelled while it runs (200 tokens take far longer than the next request's round
    // trip): its status says so, its output holds what was written until then.
    const long = await gw.client.responses.create({
      ...body,
      max_output_tokens: 200,
      background: true,
    });
    const cancelled = await gw.client.responses.cancel(long.id);
    expect(cancelled.status).toBe("cancelled");
    expect((await gw.client.responses.retrieve(long.id)).status).toBe("cancelled");
    expect(cancelled.usage).toBeNull();
    // Cancelling again answers the same; a response not made in the background cannot be.
    expect((await gw.client.responses.cancel(long.id)).status).toBe("cancelled");
    const notBg = (await gw.client.responses.cancel(fg.id).catch((e: unknown) => e)) as {
      status: number;
    };
    expect(notBg.status).toBe(400);
    // Deleted while running: stopped, and not kept again when it ends.
    const dropped = await gw.client.responses.create({
      ...body,
      max_output_tokens: 200,
      background: true,
    });
    await gw.client.responses.delete(dropped.id);
    await new Promise((r) => setTimeout(r, 100));
    const gone = (await gw.client.responses.retrieve(dropped.id).catch((e: unknown) => e)) as {
      status: number;
    };
    expect(gone.status).toBe(404);
    // Refused: without store (nothing to poll), continuing one still running.
    const refusal = (extra: object) =>
      gw.client.responses
        .create({
          ...body,
          background: true,
          ...extra,
        } as OpenAI.Responses.ResponseCreateParamsNonStreaming)
        .catch((e: unknown) => e) as Promise<{ status: number; param: string }>;
    expect(await refusal({ store: false })).toMatchObject({ status: 400, param: "background" });
    const running = await gw.client.responses.create({
      ...body,
      max_output_tokens: 200,
      background: true,
    });
    expect(await refusal({ previous_response_id: running.id })).toMatchObject({
      status: 400,
      param: "previous_response_id",
    });
    await gw.client.responses.cancel(running.id);
  });

  it("truncation auto: a conversation too long for the context loses its oldest items until it fits, the instructions and a call's output with its call kept; disabled (the default) refuses it", async () => {
    const maxModelLen = 160;
    const g = await startGateway(dir, { maxModelLen });
    try {
      const input: OpenAI.Responses.ResponseInputItem[] = [];
      for (let i = 0; i < 10; i++)
        input.push(
          { role: "user", content: `Question ${i}: what comes after ${i} apples and pears?` },
          { role: "assistant", content: `After ${i} comes ${i + 1}, as it always has.` },
        );
      // A call and its output near the end: cut before the call, never between the two.
      input.push(
        { type: "function_call", call_id: "c1", name: "count", arguments: '{"n": 10}' },
        { type: "function_call_output", call_id: "c1", output: "11" },
        { role: "user", content: "And now?" },
      );
      const body = {
        model: "tiny",
        instructions: "Count.",
        input,
        max_output_tokens: 8,
        temperature: 0,
        tools: [
          {
            type: "function" as const,
            name: "count",
            parameters: { type: "object" },
            strict: false,
          },
        ],
        tool_choice: "none" as const,
      };
      const refused = (await g.client.responses.create(body).catch((e: unknown) => e)) as {
        status: number;
        code: string;
      };
      expect([refused.status, refused.code]).toEqual([400, "EM_GATEWAY_PROMPT_TOO_LONG"]);
      // Each item's suffix (instructions kept) as counted whole.
      const counts: number[] = [];
      for (let k = 0; k < input.length; k++)
        counts.push(
          (await g.client.responses.inputTokens.count({ ...body, input: input.slice(k) }))
            .input_tokens,
        );
      let r: OpenAI.Responses.Response | undefined;
      // 8 output tokens: cut among the turns; 100: the suffix from the call's output would
      // fit, but the cut falls after it (the call goes, so does its output).
      for (const [max_output_tokens, cut] of [
        [8, 18],
        [100, 22],
      ] as const) {
        const k = counts.findIndex(
          (n, i) =>
            n + max_output_tokens <= maxModelLen &&
            (input[i] as { type?: string }).type !== "function_call_output",
        );
        expect(k).toBe(cut); // (the counts the cases were chosen by)
        if (cut === 22) expect(counts[21]! + max_output_tokens).toBeLessThanOrEqual(maxModelLen);
        r = await g.client.responses.create({ ...body, max_output_tokens, truncation: "auto" });
        expect(r.truncation).toBe("auto");
        expect(r.usage!.input_tokens).toBe(counts[k]);
        const suffix = await g.client.responses.create({
          ...body,
          max_output_tokens,
          input: input.slice(k),
        });
        expect(r.output_text).toBe(suffix.output_text);
        // (max_output_tokens too, which OpenAI's count does not take: fitted as it would run)
        const counted = await g.client.responses.inputTokens.count({
          ...body,
          max_output_tokens,
          truncation: "auto",
        } as OpenAI.Responses.InputTokenCountParams);
        expect(counted.input_tokens).toBe(counts[k]);
      }
      // Kept whole (a next turn fits it again), and refused when even the last item cannot fit.
      expect((await g.client.responses.inputItems.list(r!.id, { limit: 100 })).data).toHaveLength(
        input.length,
      );
      const huge = (await g.client.responses
        .create({ ...body, input: "word ".repeat(400), truncation: "auto" })
        .catch((e: unknown) => e)) as { status: number; code: string };
      expect([huge.status, huge.code]).toEqual([400, "EM_GATEWAY_PROMPT_TOO_LONG"]);
    } finally {
      await g.close();
    }
  });

  it("keeps the last --responses-store responses: an older one is pushed out", async () => {
    const small = await startGateway(dir, { responsesStore: 2 });
    try {
      const ids: string[] = [];
      for (const input of ["a", "b", "c"])
        ids.push(
          (await small.client.responses.create({ model: "tiny", input, max_output_tokens: 2 })).id,
        );
      const status = (id: string) =>
        small.client.responses.retrieve(id).then(
          () => 200,
          (e: { status: number }) => e.status,
        );
      expect(await Promise.all(ids.map(status))).toEqual([404, 200, 200]);
      // Streamed responses are kept too.
      const es = await events(small, { model: "tiny", input: "d", max_output_tokens: 2 });
      const done = es.at(-1)!["response"] as OpenAI.Responses.Response;
      expect(await small.client.responses.retrieve(done.id)).toMatchObject(done);
    } finally {
      await small.close();
    }
  });

  it("a reasoning effort turns V3.1's thinking on (its template's switch)", async () => {
    const v31 = await startGateway(dir, { reasoningParser: "deepseek-v3" });
    try {
      const body = {
        model: "tiny",
        input: "What is 2 + 2?",
        max_output_tokens: 12,
        temperature: 0,
      };
      const plain = await v31.client.responses.create(body);
      expect(plain.output.map((i) => i.type)).toEqual(["message"]);
      const thinking = await v31.client.responses.create({
        ...body,
        reasoning: { effort: "high" },
      });
      const chat = await v31.client.chat.completions.create({
        model: "tiny",
        messages: user("What is 2 + 2?"),
        max_tokens: 12,
        temperature: 0,
        chat_template_kwargs: { thinking: true },
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      const thought = (chat.choices[0]!.message as unknown as { reasoning_content: string })
        .reasoning_content;
      expect(thinking.output[0]).toMatchObject({
        type: "reasoning",
        content: [{ type: "reasoning_text", text: thought }],
      });
      expect(thinking.usage!.input_tokens).toBe(chat.usage!.prompt_tokens);
      // "minimal" asks for none.
      const minimal = await v31.client.responses.create({
        ...body,
        reasoning: { effort: "minimal" },
      });
      expect(minimal.output_text).toBe(plain.output_text);
    } finally {
      await v31.close();
    }
  });

  it("refuses what it cannot do, with the parameter named", async () => {
    const refused = async (body: object) => {
      const err = (await gw.client.responses
        .create(body as OpenAI.Responses.ResponseCreateParamsNonStreaming)
        .catch((e: unknown) => e)) as { status: number; param: string; message: string };
      return [err.status, err.param];
    };
    expect(await refused({ model: "tiny", input: "hi", previous_response_id: "resp_123" })).toEqual(
      [404, "previous_response_id"],
    );
    expect(
      await refused({ model: "tiny", input: "hi", tools: [{ type: "web_search_preview" }] }),
    ).toEqual([400, "tools.0"]);
    // A tool without a type (found by fuzzing: it was a 500).
    expect(await refused({ model: "tiny", input: "hi", tools: [{ name: "f" }] })).toEqual([
      400,
      "tools.0",
    ]);
    expect(await refused({ model: "gpt-4o", input: "hi" })).toEqual([404, "model"]);
    expect((await refused({ model: "tiny", input: [] }))[0]).toBe(400);
    // The chat machinery's refusals name the Responses field.
    expect(
      await refused({ model: "tiny", input: "hi", text: { format: { type: "json_schema" } } }),
    ).toEqual([400, "text.format"]);
    expect(await refused({ model: "tiny", input: "hi", max_output_tokens: 10 ** 6 })).toEqual([
      400,
      "max_output_tokens",
    ]);
    // An image in the input: refused by name, not as a schema error.
    const image = (await gw.client.responses
      .create({
        model: "tiny",
        input: [
          { role: "user", content: "hi" },
          {
            role: "user",
            content: [
              { type: "input_text", text: "What is this?" },
              {
                type: "input_image",
                image_url: "data:image/png;base64,iVBORw0KGgo=",
                detail: "auto",
              },
            ],
          },
        ],
      })
      .catch((e: unknown) => e)) as { status: number; param: string; message: string };
    expect([image.status, image.param]).toEqual([400, "input.1.content.1"]);
    expect(image.message).toContain(
      "input[1].content[1]: content parts of type 'input_image' are not supported: this model reads text only (type 'input_text' or 'output_text')",
    );
  });
});
