// POST /v1/responses/compact (compaction.ts, ADR 0056) through the official `openai`
// client: a conversation compacted is its user messages and one compaction item holding the
// model's summary (what the chat request of the conversation and the compaction prompt
// answers, greedy); a request that sends the compacted items on reads the item as the
// model's own earlier turn; a conversation longer than the context still compacts; refusals.
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  COMPACTION_MAX_TOKENS,
  COMPACTION_PROMPT,
  decodeCompaction,
  encodeCompaction,
} from "../../src/gateway/compaction.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  type HeldGateway,
  refusalOf,
  startGateway,
  startHeldGateway,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let g: TestGateway;
/** Its expert calls held at will (a summary that waits). */
let held: HeldGateway;
/** A small context (200 tokens). */
let small: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  g = await startGateway(dir);
  small = await startGateway(dir, { maxModelLen: 200 });
  held = await startHeldGateway(dir);
});
afterAll(async () => {
  held?.hold.release();
  await g?.close();
  await small?.close();
  await held?.close();
});

type Item = OpenAI.Responses.ResponseInputItem;
const user = (content: string) => ({ type: "message" as const, role: "user" as const, content });
const turn = { model: "tiny", max_output_tokens: 6, temperature: 0 } as const;

/** Two responses, "one" then "two" (chained by previous_response_id). */
async function twoTurns(c: OpenAI) {
  const first = await c.responses.create({ ...turn, input: "one" });
  const second = await c.responses.create({
    ...turn,
    previous_response_id: first.id,
    input: "two",
  });
  return { first, second };
}

/** The summary a compacted output's last item holds. */
function summaryOf(output: readonly { type: string }[]): string {
  const last = output.at(-1) as { type: string; encrypted_content: string };
  expect(last.type).toBe("compaction");
  return decodeCompaction(last.encrypted_content, "x").summary;
}

const b64 = (text: string) => Buffer.from(text, "utf8").toString("base64url");

describe("the compaction item's content", () => {
  it.each([
    ["plain", ["a question"]],
    ["", []],
    ["unicode: é 中文 🙂\nlines", ["one", "", "two 🙂"]],
  ])("round-trips %j after %j", (summary, users) => {
    const encoded = encodeCompaction({ summary, users });
    expect(encoded).toMatch(/^emc2\.[A-Za-z0-9_-]*$/);
    expect(decodeCompaction(encoded, "p")).toEqual({ summary, users, after: [] });
  });
  it("round-trips the turn after the summary; refuses one that is not messages", () => {
    const after = [
      { role: "user" as const, content: "q" },
      {
        role: "assistant" as const,
        content: null,
        tool_calls: [
          { id: "c1", type: "function" as const, function: { name: "f", arguments: "{}" } },
        ],
      },
      { role: "tool" as const, tool_call_id: "c1", content: "out" },
    ];
    const encoded = encodeCompaction({ summary: "s", users: ["u"], after });
    expect(decodeCompaction(encoded, "p")).toEqual({ summary: "s", users: ["u"], after });
    const forged = `emc2.${b64(JSON.stringify({ summary: "s", users: [], after: [{ role: "x", content: 1 }] }))}`;
    expect(() => decodeCompaction(forged, "input.0.encrypted_content")).toThrow(
      /not a compaction this gateway made/,
    );
  });
  it("reads the first format (the summary alone, superseding nothing)", () => {
    expect(decodeCompaction(`emc1.${b64("sum")}`, "p")).toEqual({
      summary: "sum",
      users: null,
      after: [],
    });
  });
  it.each([
    ["gAAAAABo-openai"],
    ["emc1.not base64!"],
    ["emc2.aGk"],
    [`emc2.${b64('{"summary": 1, "users": []}')}`],
    [`emc2.${b64('{"summary": "s", "users": [1]}')}`],
    [`emc2.${b64('{"summary": "s"}')}`],
    [`emc2.${b64("null")}`],
  ])("refuses %j", (bad) => {
    expect(() => decodeCompaction(bad, "input.2.encrypted_content")).toThrow(
      /input\.2\.encrypted_content: not a compaction this gateway made/,
    );
  });
});

describe("POST /v1/responses/compact", () => {
  it("a conversation after a previous response: its user messages, then the model's summary; the next turn reads the summary as the model's own turn", async () => {
    const c = g.client;
    const { first, second } = await twoTurns(c);
    const compacted = await c.responses.compact({
      model: "tiny",
      previous_response_id: second.id,
      input: [user("three")],
    });
    expect(compacted.object).toBe("response.compaction");
    expect(compacted.id).toMatch(/^resp_/);
    const users = compacted.output.slice(0, -1);
    expect(
      users.map((i) => {
        const m = i as { type: string; role: string; content: { type: string; text: string }[] };
        return [m.type, m.role, m.content.map((p) => `${p.type}:${p.text}`).join("")];
      }),
    ).toEqual([
      ["message", "user", "input_text:one"],
      ["message", "user", "input_text:two"],
      ["message", "user", "input_text:three"],
    ]);
    // The summary is what the model answers the conversation and the compaction prompt.
    const summary = summaryOf(compacted.output);
    const maxTokens = Math.min(COMPACTION_MAX_TOKENS, Math.floor(g.ctx.maxModelLen / 4));
    const asked = await c.chat.completions.create({
      model: "tiny",
      temperature: 0,
      max_tokens: maxTokens,
      messages: [
        { role: "user", content: "one" },
        { role: "assistant", content: first.output_text },
        { role: "user", content: "two" },
        { role: "assistant", content: second.output_text },
        { role: "user", content: "three" },
        { role: "user", content: COMPACTION_PROMPT },
      ],
    });
    expect(summary.length).toBeGreaterThan(0);
    expect(summary).toBe(asked.choices[0]!.message.content);
    expect(compacted.usage).toMatchObject({
      input_tokens: asked.usage!.prompt_tokens,
      output_tokens: asked.usage!.completion_tokens,
      total_tokens: asked.usage!.total_tokens,
    });

    // The next turn on the compacted items: the summary as the model's turn.
    const next = await c.responses.create({
      ...turn,
      input: [...(compacted.output as Item[]), user("four")],
    });
    const same = await c.chat.completions.create({
      model: "tiny",
      temperature: 0,
      max_tokens: turn.max_output_tokens,
      messages: [
        { role: "user", content: "one" },
        { role: "user", content: "two" },
        { role: "user", content: "three" },
        { role: "assistant", content: summary },
        { role: "user", content: "four" },
      ],
    });
    expect(next.output_text).toBe(same.choices[0]!.message.content);
    expect(next.usage?.input_tokens).toBe(same.usage?.prompt_tokens);
    // Its input items list the compaction item as sent.
    const listed = await c.responses.inputItems.list(next.id, { order: "asc" });
    expect(listed.data.map((i) => i.type)).toEqual([
      "message",
      "message",
      "message",
      "compaction",
      "message",
    ]);
  });

  it("input alone, with instructions; a conversation longer than the context still compacts (its oldest items dropped)", async () => {
    const c = small.client;
    const long = Array.from({ length: 12 }, (_, i) =>
      user(`message ${i} ${"word ".repeat(12)}`),
    ) as Item[];
    const tokens = await c.responses.inputTokens.count({ model: "tiny", input: long });
    expect(tokens.input_tokens).toBeGreaterThan(200);
    const compacted = await c.responses.compact({
      model: "tiny",
      instructions: "Be brief.",
      input: long,
    });
    expect(compacted.output).toHaveLength(13);
    expect(summaryOf(compacted.output).length).toBeGreaterThan(0);
    expect(compacted.usage.input_tokens + compacted.usage.output_tokens).toBeLessThanOrEqual(200);
    expect(compacted.usage.output_tokens).toBeLessThanOrEqual(50);
  });

  it("refusals: nothing to compact, an unknown previous response, another model, another server's compaction item", async () => {
    const c = g.client;
    expect(await refusalOf(c.responses.compact({ model: "tiny" }))).toMatchObject({
      status: 400,
      param: "input",
    });
    expect(
      await refusalOf(c.responses.compact({ model: "tiny", previous_response_id: "resp_nope" })),
    ).toMatchObject({ status: 404, code: "EM_GATEWAY_RESPONSE_NOT_FOUND" });
    expect(
      await refusalOf(c.responses.compact({ model: "other", input: [user("x")] })),
    ).toMatchObject({ status: 404, code: "EM_GATEWAY_UNKNOWN_MODEL" });
    const foreign = [
      user("x"),
      { type: "compaction", encrypted_content: "gAAAAABfromOpenAI" },
      user("y"),
    ] as Item[];
    expect(await refusalOf(c.responses.create({ ...turn, input: foreign }))).toMatchObject({
      status: 400,
      param: "input.1.encrypted_content",
    });
    expect(await refusalOf(c.responses.compact({ model: "tiny", input: foreign }))).toMatchObject({
      status: 400,
      param: "input.1.encrypted_content",
    });
  });
});

describe("server-side compaction (context_management)", () => {
  const cm = (compact_threshold: number) => ({
    context_management: [{ type: "compaction", compact_threshold }],
  });
  const summaryTokens = () => Math.min(COMPACTION_MAX_TOKENS, Math.floor(g.ctx.maxModelLen / 4));
  type Msg = OpenAI.Chat.Completions.ChatCompletionMessageParam;
  const chat = (messages: Msg[], max_tokens: number = turn.max_output_tokens) =>
    g.client.chat.completions.create({ model: "tiny", temperature: 0, max_tokens, messages });
  const assistant = (content: string) =>
    ({ type: "message", role: "assistant", content }) as unknown as Item;
  /** The compaction an output starts with. */
  const compactionOf = (output: readonly { type: string }[]) => {
    expect(output[0]?.type).toBe("compaction");
    return decodeCompaction(
      (output[0] as unknown as { encrypted_content: string }).encrypted_content,
      "x",
    );
  };

  it("under the threshold nothing is compacted; at it, the turns before the last are summarized and the answer runs on the compacted conversation, which the chain goes on from (previous_response_id, or the items sent back)", async () => {
    const c = g.client;
    const { first, second } = await twoTurns(c);
    const at = { ...turn, previous_response_id: second.id, input: "three" };
    const plain = await c.responses.create(at);
    const prompt = plain.usage!.input_tokens;
    const under = await c.responses.create({ ...at, ...cm(prompt + 1) });
    expect(under.output.map((i) => i.type)).toEqual(["message"]);
    expect(under.output_text).toBe(plain.output_text);
    expect(under.usage).toEqual(plain.usage);

    const third = await c.responses.create({ ...at, ...cm(prompt) });
    expect(third.output.map((i) => i.type)).toEqual(["compaction", "message"]);
    expect(third.output[0]!.id).toMatch(/^cmp_/);
    const cmp = compactionOf(third.output);
    expect(cmp.users).toEqual(["one", "two"]);
    expect(cmp.after).toEqual([{ role: "user", content: "three" }]);
    // The summary: what the model answers the turns before "three" and the compaction prompt.
    const asked = await chat(
      [
        { role: "user", content: "one" },
        { role: "assistant", content: first.output_text },
        { role: "user", content: "two" },
        { role: "assistant", content: second.output_text },
        { role: "user", content: COMPACTION_PROMPT },
      ],
      summaryTokens(),
    );
    expect(cmp.summary.length).toBeGreaterThan(0);
    expect(cmp.summary).toBe(asked.choices[0]!.message.content);
    // The answer: on the users, the summary, then "three".
    const compacted: Msg[] = [
      { role: "user", content: "one" },
      { role: "user", content: "two" },
      { role: "assistant", content: cmp.summary },
      { role: "user", content: "three" },
    ];
    const same = await chat(compacted);
    expect(third.output_text).toBe(same.choices[0]!.message.content);
    // Its usage: the summary's and the answer's.
    expect(third.usage).toMatchObject({
      input_tokens: same.usage!.prompt_tokens + asked.usage!.prompt_tokens,
      output_tokens: same.usage!.completion_tokens + asked.usage!.completion_tokens,
      total_tokens: same.usage!.total_tokens + asked.usage!.total_tokens,
    });

    // Chained by id: the kept conversation is the compacted one.
    const fourth = await c.responses.create({
      ...turn,
      previous_response_id: third.id,
      input: "four",
    });
    const next = await chat([
      ...compacted,
      { role: "assistant", content: third.output_text },
      { role: "user", content: "four" },
    ]);
    expect(fourth.output_text).toBe(next.choices[0]!.message.content);
    expect(fourth.usage!.input_tokens).toBe(next.usage!.prompt_tokens);
    // Chained by items: the whole history sent back, the output appended; the compaction item
    // stands for everything before it, so the history adds nothing; dropped, the same.
    const history = [
      user("one"),
      assistant(first.output_text),
      user("two"),
      assistant(second.output_text),
      user("three"),
    ] as Item[];
    for (const input of [
      [...history, ...(third.output as Item[]), user("four")],
      [...(third.output as Item[]), user("four")],
    ]) {
      const stateless = await c.responses.create({ ...turn, input });
      expect(stateless.output_text).toBe(fourth.output_text);
      expect(stateless.usage!.input_tokens).toBe(fourth.usage!.input_tokens);
    }
  });

  it("streamed: the compaction item is the stream's first output item; after calls, the calling turn stays after the summary", async () => {
    const c = g.client;
    const input = [
      user("q1"),
      assistant("r1"),
      user("q2"),
      { type: "function_call", call_id: "call_1", name: "lookup", arguments: '{"k":"v"}' },
      { type: "function_call_output", call_id: "call_1", output: "found" },
    ] as Item[];
    const tools = [
      {
        type: "function" as const,
        name: "lookup",
        parameters: { type: "object", properties: { k: { type: "string" } } },
        strict: false,
      },
    ];
    const stream = c.responses.stream({ ...turn, input, tools, ...cm(1) });
    const events: { type: string; output_index?: number; item?: { type: string } }[] = [];
    for await (const e of stream) events.push(e as (typeof events)[number]);
    const final = await stream.finalResponse();
    const added = events.filter((e) => e.type === "response.output_item.added");
    expect(added[0]).toMatchObject({ output_index: 0, item: { type: "compaction" } });
    expect(added.slice(1).every((e) => e.output_index! >= 1)).toBe(true);
    const types = events.map((e) => e.type);
    expect(types.indexOf("response.output_item.added")).toBeGreaterThan(
      types.indexOf("response.in_progress"),
    );
    const cmp = compactionOf(final.output);
    expect(cmp.users).toEqual(["q1", "q2"]);
    expect(cmp.after.map((m) => m.role)).toEqual(["assistant", "tool"]);
    // The same request unstreamed answers the same (greedy), its compaction the same.
    const whole = await c.responses.create({ ...turn, input, tools, ...cm(1) });
    expect(compactionOf(whole.output)).toEqual(cmp);
    expect(whole.output.slice(1)).toHaveLength(final.output.length - 1);
    expect(whole.output_text).toBe(final.output_text);
  });

  it("nothing of the model's before the last turn: nothing compacted; a conversation joined keeps the compaction item and goes on from it", async () => {
    const c = g.client;
    const alone = await c.responses.create({ ...turn, input: "only a question", ...cm(1) });
    expect(alone.output.map((i) => i.type)).toEqual(["message"]);

    const conv = await c.conversations.create({ items: [user("one")] });
    const r1 = await c.responses.create({ ...turn, conversation: conv.id, input: "two" });
    const r2 = await c.responses.create({
      ...turn,
      conversation: conv.id,
      input: "three",
      ...cm(1),
    });
    const cmp = compactionOf(r2.output);
    expect(cmp.users).toEqual(["one", "two"]);
    const items = await c.conversations.items.list(conv.id, { order: "asc" });
    expect(items.data.map((i) => i.type)).toEqual([
      "message",
      "message",
      "message",
      "message",
      "compaction",
      "message",
    ]);
    const r3 = await c.responses.create({ ...turn, conversation: conv.id, input: "four" });
    const same = await chat([
      { role: "user", content: "one" },
      { role: "user", content: "two" },
      { role: "assistant", content: cmp.summary },
      { role: "user", content: "three" },
      { role: "assistant", content: r2.output_text },
      { role: "user", content: "four" },
    ]);
    expect(r3.output_text).toBe(same.choices[0]!.message.content);
    expect(r1.output_text.length).toBeGreaterThan(0);
  });

  it("background: the compaction item comes after in_progress, and the response kept has it", async () => {
    const c = g.client;
    const first = await c.responses.create({ ...turn, input: "one" });
    const stream = await c.responses.create({
      ...turn,
      previous_response_id: first.id,
      input: "two",
      background: true,
      stream: true,
      ...cm(1),
    });
    const types: string[] = [];
    let id = "";
    let ended = "";
    for await (const e of stream) {
      types.push(e.type);
      if (e.type === "response.created") id = e.response.id;
      if (e.type === "response.completed" || e.type === "response.incomplete")
        ended = e.response.status!;
    }
    expect(types.slice(0, 4)).toEqual([
      "response.created",
      "response.queued",
      "response.in_progress",
      "response.output_item.added",
    ]);
    const kept = await c.responses.retrieve(id);
    expect(["completed", "incomplete"]).toContain(ended);
    expect(kept.status).toBe(ended);
    expect(compactionOf(kept.output).users).toEqual(["one"]);
  });

  it("background: answered at once, queued, while its summary waits; in_progress as the summary runs; then the compaction and the answer of the same request in the foreground; cancelled while summarizing: no output", async () => {
    const c = held.client;
    const first = await c.responses.create({ ...turn, input: "one" });
    const ask = { ...turn, previous_response_id: first.id, input: "two", ...cm(1) };
    const want = await c.responses.create(ask);
    expect(want.output.map((i) => i.type)).toEqual(["compaction", "message"]);
    // (each created while the expert calls are held: its POST cannot wait for the summary)
    const background = async () => {
      held.hold.hold();
      const running = await c.responses.create({ ...ask, background: true });
      expect(running).toMatchObject({ status: "queued", output: [] });
      await held.hold.entered;
      expect(await c.responses.retrieve(running.id)).toMatchObject({
        status: "in_progress",
        output: [],
      });
      return running.id;
    };
    const done = await background();
    const events = c.responses.retrieve(done, { stream: true });
    held.hold.release();
    const types: string[] = [];
    for await (const e of await events) types.push(e.type);
    expect(types.slice(0, 4)).toEqual([
      "response.created",
      "response.queued",
      "response.in_progress",
      "response.output_item.added",
    ]);
    const kept = await c.responses.retrieve(done);
    expect(kept.status).toBe(want.status);
    expect(compactionOf(kept.output)).toEqual(compactionOf(want.output));
    expect(kept.output_text).toBe(want.output_text);
    // (the same tokens: those from the prefix cache differ, the foreground's being cached)
    const { input_tokens, output_tokens, total_tokens } = want.usage!;
    expect(kept.usage).toMatchObject({ input_tokens, output_tokens, total_tokens });

    const cancelledId = await background();
    const cancelling = c.responses.cancel(cancelledId);
    held.hold.releaseAfter(1000); // (the cancel is in by then: the summary stops at its step)
    expect(await cancelling).toMatchObject({ status: "cancelled", output: [] });
    expect(await c.responses.retrieve(cancelledId)).toMatchObject({
      status: "cancelled",
      output: [],
    });
    // What the answer would refuse is still the request's refusal, before any summary.
    const refused = c.responses.create({ ...ask, background: true, model: "gpt-4" });
    expect(await refusalOf(refused)).toMatchObject({ status: 404, param: "model" });
  });

  it("refusals name the entry: another type, a threshold that is not a count, two entries, not a list (also when only counting)", async () => {
    const c = g.client;
    const cases: [unknown, string][] = [
      [[{ type: "truncate" }], "context_management.0.type"],
      [[{ type: "compaction", compact_threshold: 0 }], "context_management.0.compact_threshold"],
      [[{ type: "compaction" }, { type: "compaction" }], "context_management.1"],
      [{ type: "compaction" }, "context_management"],
    ];
    for (const [context_management, param] of cases) {
      const body = { ...turn, input: "x", context_management } as never;
      expect(await refusalOf(c.responses.create(body))).toMatchObject({ status: 400, param });
      expect(await refusalOf(c.responses.inputTokens.count(body))).toMatchObject({
        status: 400,
        param,
      });
    }
    // (an empty list asks nothing)
    const answered = await c.responses.create({ ...turn, input: "x", context_management: [] });
    expect(answered.output.map((i) => i.type)).toEqual(["message"]);
  });
});
