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
import { refusalOf, startGateway, type TestGateway } from "./helpers.ts";

let dir: string;
let g: TestGateway;
/** A small context (200 tokens). */
let small: TestGateway;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  g = await startGateway(dir);
  small = await startGateway(dir, { maxModelLen: 200 });
});
afterAll(async () => {
  await g?.close();
  await small?.close();
});

type Item = OpenAI.Responses.ResponseInputItem;
const user = (content: string) => ({ type: "message" as const, role: "user" as const, content });
const turn = { model: "tiny", max_output_tokens: 6, temperature: 0 } as const;

/** The summary a compacted output's last item holds. */
function summaryOf(output: readonly { type: string }[]): string {
  const last = output.at(-1) as { type: string; encrypted_content: string };
  expect(last.type).toBe("compaction");
  return decodeCompaction(last.encrypted_content, "x");
}

describe("the compaction item's content", () => {
  it.each([["plain"], [""], ["unicode: é 中文 🙂\nlines"]])("round-trips %j", (text) => {
    const encoded = encodeCompaction(text);
    expect(encoded).toMatch(/^emc1\.[A-Za-z0-9_-]*$/);
    expect(decodeCompaction(encoded, "p")).toBe(text);
  });
  it.each([["gAAAAABo-openai"], ["emc1.not base64!"], ["emc2.aGk"]])("refuses %j", (bad) => {
    expect(() => decodeCompaction(bad, "input.2.encrypted_content")).toThrow(
      /input\.2\.encrypted_content: not a compaction this gateway made/,
    );
  });
});

describe("POST /v1/responses/compact", () => {
  it("a conversation after a previous response: its user messages, then the model's summary; the next turn reads the summary as the model's own turn", async () => {
    const c = g.client;
    const first = await c.responses.create({ ...turn, input: "one" });
    const second = await c.responses.create({
      ...turn,
      previous_response_id: first.id,
      input: "two",
    });
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

  it("refusals: nothing to compact, an unknown previous response, another model, another server's compaction item, context_management", async () => {
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
    expect(
      await refusalOf(
        c.responses.create({
          ...turn,
          input: "x",
          context_management: [{ type: "compaction", compact_threshold: 1000 }],
        } as OpenAI.Responses.ResponseCreateParamsNonStreaming),
      ),
    ).toMatchObject({ status: 400, param: "context_management" });
    // (an empty one asks nothing)
    const answered = await c.responses.create({
      ...turn,
      input: "x",
      context_management: [],
    } as OpenAI.Responses.ResponseCreateParamsNonStreaming);
    expect(answered.output_text.length).toBeGreaterThan(0);
  });
});
