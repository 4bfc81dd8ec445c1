// Anthropic's context management on POST /v1/messages (context-edits.ts, ADR 0060), through
// the official SDK's beta surface (`client.beta.messages`, betas context-management-2025-06-27
// and compact-2026-01-12), on the tiny V3 checkpoint. Each edit is checked against the
// request it stands for: a cleared conversation answers as the same conversation sent with
// its results already cleared; a compacted one answers as the request of its summary alone,
// and the summary is what the conversation and the compaction prompt answer, greedy.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Anthropic from "@anthropic-ai/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { COMPACTION_MAX_TOKENS } from "../../src/gateway/compaction.ts";
import { CLEARED_RESULT, COMPACT_PROMPT, summaryTurn } from "../../src/gateway/context-edits.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let gw: TestGateway;
let r1: TestGateway;
let client: Anthropic;
const CONTEXT = 1024;

type Beta = Anthropic.Beta.Messages.MessageCreateParamsNonStreaming;
type BetaMessage = Anthropic.Beta.Messages.BetaMessage;
const BETAS = ["context-management-2025-06-27", "compact-2026-01-12"];

const sdk = (g: TestGateway) => new Anthropic({ apiKey: "unused", baseURL: g.url, maxRetries: 0 });
/** A beta request, sampling fields (temperature) and all, as given. */
const ask = (c: Anthropic, body: object) =>
  c.beta.messages.create({ ...(body as Beta), betas: BETAS }) as Promise<BetaMessage>;

/** The tiny V3 checkpoint with a context of CONTEXT tokens (its own is 256: too few for a loop). */
async function longerCheckpoint(): Promise<string> {
  const dir = await tinyCheckpointFor("tiny-v3");
  const path = join(dir, "config.json");
  const config = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
  writeFileSync(path, JSON.stringify({ ...config, max_position_embeddings: CONTEXT }));
  return dir;
}

beforeAll(async () => {
  const dir = await longerCheckpoint();
  gw = await startGateway(dir, { maxModelLen: CONTEXT });
  r1 = await startGateway(dir, { maxModelLen: CONTEXT, reasoningParser: "deepseek-r1" });
  client = sdk(gw);
});
afterAll(async () => {
  await gw?.close();
  await r1?.close();
});

const SEARCH: Anthropic.Tool = { name: "search", input_schema: { type: "object" } };
const MEMORY: Anthropic.Tool = { name: "memory", input_schema: { type: "object" } };

/** The result of use `i`: long. */
const RESULT = (i: number) => `result ${i}: ${"notes ".repeat(12)}`;

/** A tool loop of four uses (search, memory, search, search), each with its result. */
function toolLoop(result: (i: number) => string = RESULT) {
  const names = ["search", "memory", "search", "search"];
  const messages: Anthropic.MessageParam[] = [{ role: "user", content: "Find the notes." }];
  for (const [i, name] of names.entries()) {
    messages.push({
      role: "assistant",
      content: [
        { type: "tool_use", id: `t${i}`, name, input: name === "search" ? { q: `q${i}` } : {} },
      ],
    });
    messages.push({
      role: "user",
      content: [{ type: "tool_result", tool_use_id: `t${i}`, content: result(i) }],
    });
  }
  return {
    model: "tiny",
    system: "Be brief.",
    max_tokens: 8,
    temperature: 0,
    tools: [SEARCH, MEMORY],
    messages,
  };
}

const textOf = (m: { content: readonly { type: string }[] }) =>
  m.content
    .filter((b) => b.type === "text")
    .map((b) => (b as unknown as { text: string }).text)
    .join("");

/** The prompt's tokens, as usage gives them (cached or not). */
const promptTokens = (m: BetaMessage) =>
  m.usage.input_tokens + (m.usage.cache_read_input_tokens ?? 0);

/** count_tokens of a body (beta: with its context_management). */
const count = (body: object) =>
  client.beta.messages.countTokens({
    ...(body as Anthropic.Beta.Messages.MessageCountTokensParams),
    betas: BETAS,
  });

const clearing = (edit: object) => ({
  context_management: { edits: [{ type: "clear_tool_uses_20250919", ...edit }] },
});

describe("clear_tool_uses_20250919", () => {
  it("clears the results of all uses but the last kept: the answer the cleared conversation gives", async () => {
    const body = toolLoop();
    const edit = {
      trigger: { type: "input_tokens", value: 1 },
      keep: { type: "tool_uses", value: 1 },
    };
    const m = await ask(client, { ...body, ...clearing(edit) });
    // The same conversation with the first three results already cleared, no edits.
    const cleared = toolLoop((i) => (i < 3 ? CLEARED_RESULT : RESULT(i)));
    const plain = await ask(client, cleared);
    expect(textOf(m)).toBe(textOf(plain));
    expect(promptTokens(m)).toBe(promptTokens(plain));
    const full = await count(body);
    expect(m.context_management).toEqual({
      applied_edits: [
        {
          type: "clear_tool_uses_20250919",
          cleared_tool_uses: 3,
          cleared_input_tokens: full.input_tokens - promptTokens(plain),
        },
      ],
    });
    expect(m.context_management!.applied_edits[0]!.cleared_input_tokens).toBeGreaterThan(50);
    // count_tokens: the count after the edits, and before them.
    const counted = await count({ ...body, ...clearing(edit) });
    expect(counted.input_tokens).toBe(promptTokens(plain));
    expect(counted.context_management).toEqual({ original_input_tokens: full.input_tokens });
  });

  it("exclude_tools keeps a tool's results; clear_tool_inputs empties the cleared calls' inputs", async () => {
    const body = toolLoop();
    const m = await ask(client, {
      ...body,
      ...clearing({
        trigger: { type: "tool_uses", value: 4 },
        keep: { type: "tool_uses", value: 0 },
        exclude_tools: ["memory"],
        clear_tool_inputs: true,
      }),
    });
    // By hand: uses 0, 2, 3 (search) cleared, inputs and results; 1 (memory) as it was.
    const messages = structuredClone(body.messages) as {
      role: string;
      content: { type: string; input?: object; content?: string }[];
    }[];
    for (const i of [0, 2, 3]) {
      messages[1 + 2 * i]!.content[0]!.input = {};
      messages[2 + 2 * i]!.content[0]!.content = CLEARED_RESULT;
    }
    const plain = await ask(client, { ...body, messages });
    expect(textOf(m)).toBe(textOf(plain));
    expect(promptTokens(m)).toBe(promptTokens(plain));
    expect(m.context_management!.applied_edits).toMatchObject([{ cleared_tool_uses: 3 }]);
  });

  it("edits nothing below its trigger, or when clear_at_least cannot be met", async () => {
    const body = toolLoop();
    const plain = await ask(client, body);
    const full = (await count(body)).input_tokens;
    for (const edit of [
      { trigger: { type: "input_tokens", value: full + 1 } },
      { trigger: { type: "tool_uses", value: 5 } },
      {
        trigger: { type: "input_tokens", value: 1 },
        clear_at_least: { type: "input_tokens", value: full },
      },
    ]) {
      const m = await ask(client, { ...body, ...clearing(edit) });
      expect(m.context_management, JSON.stringify(edit)).toEqual({ applied_edits: [] });
      expect(textOf(m)).toBe(textOf(plain));
      expect(promptTokens(m)).toBe(full);
    }
    // A plain Messages request says nothing of context management.
    expect(plain.context_management).toBeUndefined();
  });
});

describe("clear_thinking_20251015", () => {
  it("counts the turns whose thinking goes (no tokens: the templates never render it)", async () => {
    const turn = (t: string): Anthropic.MessageParam => ({
      role: "assistant",
      content: [
        { type: "thinking", thinking: t, signature: "" },
        { type: "text", text: "ok" },
      ],
    });
    const body = {
      model: "tiny",
      max_tokens: 6,
      temperature: 0,
      thinking: { type: "enabled", budget_tokens: 4 },
      messages: [
        { role: "user", content: "a" },
        turn("first thought"),
        { role: "user", content: "b" },
        turn("second thought"),
        { role: "user", content: "c" },
      ],
    };
    const m = await ask(sdk(r1), {
      ...body,
      context_management: { edits: [{ type: "clear_thinking_20251015" }] },
    });
    expect(m.context_management).toEqual({
      applied_edits: [
        { type: "clear_thinking_20251015", cleared_thinking_turns: 1, cleared_input_tokens: 0 },
      ],
    });
    const all = await ask(sdk(r1), {
      ...body,
      context_management: { edits: [{ type: "clear_thinking_20251015", keep: "all" }] },
    });
    expect(all.context_management).toEqual({ applied_edits: [] });
    expect(promptTokens(all)).toBe(promptTokens(m));
  });
});

/** A conversation of three turns, the last a question. */
const CHAT = {
  model: "tiny",
  system: "Be brief.",
  max_tokens: 8,
  temperature: 0,
  messages: [
    { role: "user" as const, content: "I am Ada; I like tea." },
    { role: "assistant" as const, content: "Noted." },
    { role: "user" as const, content: "What do I like?" },
  ],
};

/** The summary the conversation `body` gives: it, then the compaction prompt, greedy. */
async function summaryOf(body: typeof CHAT, prompt = COMPACT_PROMPT): Promise<string> {
  const m = await ask(client, {
    ...body,
    messages: [...body.messages, { role: "user", content: prompt }],
    max_tokens: Math.min(COMPACTION_MAX_TOKENS, Math.floor(CONTEXT / 4)),
    temperature: 0,
  });
  return textOf(m);
}

const compacting = (edit: object = {}) => ({
  context_management: {
    edits: [{ type: "compact_20260112", trigger: { type: "input_tokens", value: 1 }, ...edit }],
  },
});

describe("compact_20260112", () => {
  it("summarizes the conversation into a compaction block; the answer runs on the summary alone", async () => {
    const m = await ask(client, { ...CHAT, ...compacting() });
    const summary = await summaryOf(CHAT);
    expect(summary.trim()).not.toBe("");
    expect(m.content[0]).toEqual({ type: "compaction", content: summary, encrypted_content: null });
    // The answer: what the system prompt and the summary alone give.
    const alone = await ask(client, {
      ...CHAT,
      messages: [{ role: "user", content: summaryTurn(summary).content }],
    });
    expect({ ...m, content: m.content.slice(1) }).toMatchObject({
      content: alone.content,
      stop_reason: alone.stop_reason,
    });
    expect(promptTokens(m)).toBe(promptTokens(alone));
    // usage: the answer's; the summary's beside it, an iteration of its own.
    const iterations = m.usage.iterations!;
    expect(iterations.map((i) => i.type)).toEqual(["compaction", "message"]);
    expect(iterations[1]).toMatchObject({
      input_tokens: m.usage.input_tokens,
      output_tokens: m.usage.output_tokens,
    });
    const summarized = iterations[0]!;
    expect(summarized.input_tokens + summarized.cache_read_input_tokens).toBe(
      (
        await count({
          ...CHAT,
          messages: [...CHAT.messages, { role: "user", content: COMPACT_PROMPT }],
        })
      ).input_tokens,
    );
    expect(summarized.output_tokens).toBeGreaterThan(0);
    expect(m.context_management).toEqual({ applied_edits: [] });

    // Sent back (the response appended, then a new question), the block stands for all
    // before it: the prompt is the system prompt, the summary, the answer and the question.
    const next = {
      ...CHAT,
      messages: [
        ...CHAT.messages,
        { role: "assistant", content: m.content },
        { role: "user", content: "And my name?" },
      ],
    };
    const sent = await ask(client, next);
    const same = await ask(client, {
      ...CHAT,
      messages: [
        { role: "user", content: summaryTurn(summary).content },
        { role: "assistant", content: alone.content },
        { role: "user", content: "And my name?" },
      ],
    });
    expect(textOf(sent)).toBe(textOf(same));
    expect(promptTokens(sent)).toBe(promptTokens(same));
    expect((await count(next)).input_tokens).toBe(promptTokens(same));
  });

  it("instructions replace the summarization prompt; below the trigger nothing is compacted", async () => {
    const instructions = "List the names only.";
    const m = await ask(client, { ...CHAT, ...compacting({ instructions }) });
    expect(m.content[0]).toMatchObject({
      type: "compaction",
      content: await summaryOf(CHAT, instructions),
    });
    const full = (await count(CHAT)).input_tokens;
    const below = await ask(client, {
      ...CHAT,
      ...compacting({ trigger: { type: "input_tokens", value: full + 1 } }),
    });
    const plain = await ask(client, CHAT);
    expect(below.content).toEqual(plain.content);
    expect(below.usage.iterations ?? null).toBeNull();
  });

  it("pause_after_compaction: the compaction block alone, stop_reason compaction; streamed alike", async () => {
    const body = { ...CHAT, ...compacting({ pause_after_compaction: true }) };
    const m = await ask(client, body);
    const summary = await summaryOf(CHAT);
    expect(m.content).toEqual([{ type: "compaction", content: summary, encrypted_content: null }]);
    expect(m.stop_reason).toBe("compaction");
    expect(m.usage).toMatchObject({ input_tokens: 0, output_tokens: 0 });
    expect(m.usage.iterations!.map((i) => i.type)).toEqual(["compaction"]);
    const stream = client.beta.messages.stream({ ...(body as Beta), betas: BETAS });
    const compacted: string[] = [];
    stream.on("compaction", (c) => compacted.push(c));
    const final = await stream.finalMessage();
    expect(compacted).toEqual([summary]);
    expect(final.content).toEqual(m.content);
    expect(final.stop_reason).toBe("compaction");
    expect(final.usage.iterations).toEqual(m.usage.iterations);
  });

  it("streams the compaction block first, then the answer's blocks (index 1 on), as create gives them", async () => {
    const body = { ...toolLoop(), ...compacting() };
    const m = await ask(client, body);
    expect(m.content[0]!.type).toBe("compaction");
    const stream = client.beta.messages.stream({ ...(body as Beta), betas: BETAS });
    const indexes: number[] = [];
    stream.on("streamEvent", (e) => {
      if (e.type === "content_block_start") indexes.push(e.index);
    });
    const final = await stream.finalMessage();
    expect(final.content).toEqual(m.content);
    expect(indexes).toEqual(m.content.map((_, i) => i));
    expect(final.usage.iterations!.map((i) => i.type)).toEqual(["compaction", "message"]);
    expect(final.context_management).toEqual({ applied_edits: [] });
  });
});

describe("edits together", () => {
  it("compaction's trigger is judged on the prompt the clearing left", async () => {
    const body = toolLoop();
    const clear = {
      type: "clear_tool_uses_20250919",
      trigger: { type: "input_tokens", value: 1 },
      keep: { type: "tool_uses", value: 0 },
    };
    const cleared = (await count({ ...body, context_management: { edits: [clear] } })).input_tokens;
    const full = (await count(body)).input_tokens;
    expect(cleared).toBeLessThan(full);
    const both = (trigger: number) => ({
      ...body,
      context_management: {
        edits: [
          clear,
          { type: "compact_20260112", trigger: { type: "input_tokens", value: trigger } },
        ],
      },
    });
    // Past the cleared prompt (though not the full one): no compaction.
    const under = await ask(client, both(cleared + 1));
    expect(under.content.some((b) => b.type === "compaction")).toBe(false);
    expect(promptTokens(under)).toBe(cleared);
    expect(under.context_management!.applied_edits).toMatchObject([{ cleared_tool_uses: 4 }]);
    // At it: compacted, the cleared conversation summarized.
    const at = await ask(client, both(cleared));
    expect(at.content[0]!.type).toBe("compaction");
    expect(at.usage.iterations!.map((i) => i.type)).toEqual(["compaction", "message"]);
  });
});

describe("compaction requests (compaction: {type: 'summarize'})", () => {
  it("give the compaction block alone, which later requests send first in place of what it summarizes", async () => {
    const m = await ask(client, { ...CHAT, compaction: { type: "summarize" } });
    const summary = await summaryOf(CHAT);
    expect(m.content).toEqual([{ type: "compaction", content: summary, encrypted_content: null }]);
    expect(m.stop_reason).toBe("compaction");
    const later = {
      ...CHAT,
      messages: [
        { role: "assistant", content: m.content },
        { role: "user", content: "Go on." },
      ],
    };
    const byHand = {
      ...CHAT,
      messages: [
        { role: "user", content: summaryTurn(summary).content },
        { role: "user", content: "Go on." },
      ],
    };
    expect(textOf(await ask(client, later))).toBe(textOf(await ask(client, byHand)));
    expect((await count(later)).input_tokens).toBe((await count(byHand)).input_tokens);
    // count_tokens ignores it: the conversation as sent.
    expect((await count({ ...CHAT, compaction: { type: "summarize" } })).input_tokens).toBe(
      (await count(CHAT)).input_tokens,
    );
  });

  it("a compaction block whose content is null (a failed compaction) changes nothing", async () => {
    const failed = {
      ...CHAT,
      messages: [
        ...CHAT.messages.slice(0, 1),
        {
          role: "assistant",
          content: [
            { type: "compaction", content: null, encrypted_content: null },
            { type: "text", text: "Noted." },
          ],
        },
        ...CHAT.messages.slice(2),
      ],
    };
    expect((await count(failed)).input_tokens).toBe((await count(CHAT)).input_tokens);
  });
});

describe("refusals", () => {
  it("a bad edit, a compaction beside context_management or an answer's fields, an empty summary", async () => {
    // biome-ignore format: a table
    const cases: [string, object, string][] = [
      ["an unknown edit", { context_management: { edits: [{ type: "clear_all" }] } }, "context_management.edits.0.type"],
      ["a bad trigger", clearing({ trigger: { type: "input_tokens", value: 0 } }), "context_management.edits.0.trigger.value"],
      ["compaction and edits", { compaction: { type: "summarize" }, ...compacting() }, "context_management"],
      ["compaction of another type", { compaction: { type: "truncate" } }, "compaction.type"],
      ["compaction and stop_sequences", { compaction: { type: "summarize" }, stop_sequences: ["x"] }, "stop_sequences"],
      ["an empty summary", { messages: [{ role: "assistant", content: [{ type: "compaction", content: "" }] }, { role: "user", content: "hi" }] }, "messages.0.content.0.content"],
      ["a compaction in a user turn", { messages: [{ role: "user", content: [{ type: "compaction", content: "s" }] }] }, "messages.0.content.0"],
    ];
    for (const [what, extra, param] of cases) {
      const err = await ask(client, { ...CHAT, ...extra }).then(
        () => expect.unreachable(what),
        (e: unknown) => e as InstanceType<typeof Anthropic.APIError>,
      );
      expect(err, what).toBeInstanceOf(Anthropic.BadRequestError);
      const e = (err.error as { error: { type: string; code: string; param?: string } }).error;
      expect(e, what).toMatchObject({
        type: "invalid_request_error",
        code: "EM_GATEWAY_BAD_REQUEST",
        param,
      });
    }
  });
});
