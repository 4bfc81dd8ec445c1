// Streams that keep the connection alive (openai.ts eventStream): a stream with nothing to
// send for the gateway's streamKeepaliveMs writes a keepalive, an SSE comment (": keepalive",
// which every client skips) or, on /v1/messages, Anthropic's ping event; and a compaction's
// summary, made before the answer, opens the stream as its job is admitted, so that the
// keepalive covers the summary too. The expert calls are held (holdable), so that a stream is
// silent until they are released whatever the machine's speed: each test waits for the
// keepalive itself, never for a time.
import Anthropic from "@anthropic-ai/sdk";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type HeldGateway, startHeldGateway } from "./helpers.ts";

/** The test gateway's keepalive period: short, so that a held stream gets one at once. */
const KEEPALIVE_MS = 20;
const COMMENT = ": keepalive\n\n";
const PING = 'event: ping\ndata: {"type":"ping"}\n\n';

let g: HeldGateway;
let off: HeldGateway;
let anthropic: Anthropic;

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  g = await startHeldGateway(dir, { streamKeepaliveMs: KEEPALIVE_MS });
  off = await startHeldGateway(dir, { streamKeepaliveMs: 0 });
  anthropic = new Anthropic({ apiKey: "unused", baseURL: g.url, maxRetries: 0 });
});
afterAll(async () => {
  await g?.close();
  await off?.close();
});

const post = (on: HeldGateway, path: string, body: object) =>
  fetch(`${on.url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });

/** A streamed response's text as it comes: until(s) reads until `s` is in it, rest() to the end. */
function reading(res: Response) {
  expect(res.status).toBe(200);
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let text = "";
  const more = async () => {
    const { value, done } = await reader.read();
    if (!done) text += decoder.decode(value, { stream: true });
    return !done;
  };
  return {
    async until(s: string): Promise<string> {
      while (!text.includes(s))
        if (!(await more()))
          throw new Error(`the stream ended without ${JSON.stringify(s)}: ${text}`);
      return text;
    },
    async rest(): Promise<string> {
      while (await more());
      return text;
    },
  };
}

/** The events of an SSE text, comments left out: each one's `event:` (if any) and its data. */
function eventsOf(text: string): { event: string | null; data: string }[] {
  return text
    .split("\n\n")
    .filter((b) => b !== "" && !b.startsWith(":"))
    .map((b) => {
      const lines = b.split("\n");
      const event = lines.find((l) => l.startsWith("event: "))?.slice(7) ?? null;
      const data = lines.find((l) => l.startsWith("data: "))?.slice(6) ?? "";
      return { event, data };
    });
}

/** A chat stream's content, its keepalives skipped. */
function chatContent(text: string): string {
  return eventsOf(text)
    .filter((e) => e.data !== "[DONE]")
    .map((e) => JSON.parse(e.data) as { choices: { delta: { content?: string } }[] })
    .map((c) => c.choices[0]?.delta.content ?? "")
    .join("");
}

const CHAT = {
  model: "tiny",
  messages: [{ role: "user" as const, content: "Say something." }],
  max_tokens: 6,
  temperature: 0,
};

const MESSAGE = {
  model: "tiny",
  max_tokens: 6,
  temperature: 0,
  messages: [{ role: "user" as const, content: "Say something." }],
};

describe("a quiet stream gets keepalives", () => {
  it("chat completions: SSE comments while the step is held, the answer as unheld after them", async () => {
    const want = await g.client.chat.completions.create(CHAT);
    g.hold.hold();
    const s = reading(await post(g, "/v1/chat/completions", { ...CHAT, stream: true }));
    await g.hold.entered;
    await s.until(COMMENT);
    g.hold.release();
    const text = await s.rest();
    expect(text.endsWith("data: [DONE]\n\n")).toBe(true);
    expect(chatContent(text)).toBe(want.choices[0]!.message.content);
    // The official client skips them.
    g.hold.hold();
    g.hold.releaseAfter(20 * KEEPALIVE_MS);
    let streamed = "";
    for await (const c of await g.client.chat.completions.create({ ...CHAT, stream: true }))
      streamed += c.choices[0]?.delta.content ?? "";
    expect(streamed).toBe(want.choices[0]!.message.content);
  });

  it("/v1/messages: Anthropic's ping events, after message_start; the SDK's message as unheld", async () => {
    const want = await anthropic.messages.create(MESSAGE);
    g.hold.hold();
    const s = reading(await post(g, "/v1/messages", { ...MESSAGE, stream: true }));
    await g.hold.entered;
    const head = await s.until(PING);
    expect(head.startsWith("event: message_start\n")).toBe(true);
    g.hold.release();
    const events = eventsOf(await s.rest());
    // (each event's name is its data's type, pings too)
    for (const e of events) expect(e.event).toBe((JSON.parse(e.data) as { type: string }).type);
    expect(events.at(-1)?.event).toBe("message_stop");
    g.hold.hold();
    g.hold.releaseAfter(20 * KEEPALIVE_MS);
    const got = await anthropic.messages.stream(MESSAGE).finalMessage();
    expect(got.content).toEqual(want.content);
    expect(got.stop_reason).toBe(want.stop_reason);
  });

  it("none with a keepalive of 0", async () => {
    off.hold.hold();
    const s = reading(await post(off, "/v1/chat/completions", { ...CHAT, stream: true }));
    await off.hold.entered;
    await new Promise((r) => setTimeout(r, 10 * KEEPALIVE_MS));
    off.hold.release();
    const text = await s.rest();
    expect(text.endsWith("data: [DONE]\n\n")).toBe(true);
    expect(text).not.toContain(": keepalive");
  });
});

describe("a compaction's summary is inside the stream", () => {
  it("/v1/messages compaction request: message_start and the compaction block's start come as the summary's job is admitted, pings while it is made, then its content as unstreamed", async () => {
    const body = { ...MESSAGE, compaction: { type: "summarize" } };
    const betas = ["compact-2026-01-12"];
    const want = (await anthropic.beta.messages.create({
      ...body,
      betas,
    } as never)) as unknown as Anthropic.Beta.Messages.BetaMessage;
    expect(want.stop_reason).toBe("compaction");
    g.hold.hold();
    const s = reading(await post(g, "/v1/messages", { ...body, stream: true }));
    await g.hold.entered;
    const head = eventsOf(await s.until(PING)).map((e) => JSON.parse(e.data) as object);
    expect(head.slice(0, 2)).toMatchObject([
      { type: "message_start" },
      { type: "content_block_start", index: 0, content_block: { type: "compaction" } },
    ]);
    expect(head.slice(2).every((e) => (e as { type: string }).type === "ping")).toBe(true);
    g.hold.release();
    const events = eventsOf(await s.rest())
      .map((e) => JSON.parse(e.data) as { type: string })
      .filter((e) => e.type !== "ping");
    expect(events.map((e) => e.type)).toEqual([
      "message_start",
      "content_block_start",
      "content_block_delta",
      "content_block_stop",
      "message_delta",
      "message_stop",
    ]);
    expect(events[2]).toMatchObject({
      delta: {
        type: "compaction_delta",
        content: (want.content[0] as { content: string }).content,
      },
    });
    expect(events[4]).toMatchObject({ delta: { stop_reason: "compaction" } });
  });

  it("/v1/responses with context_management: the headers as the summary's job is admitted, keepalives (comments) until the events, which are those of a response that starts with its compaction", async () => {
    const body = {
      model: "tiny",
      temperature: 0,
      max_output_tokens: 4,
      input: [
        { role: "user", content: "one" },
        { role: "assistant", content: "first answer" },
        { role: "user", content: "two" },
      ],
      context_management: [{ type: "compaction", compact_threshold: 1 }],
      store: false,
    };
    g.hold.hold();
    const s = reading(await post(g, "/v1/responses", { ...body, stream: true }));
    await g.hold.entered;
    const head = await s.until(COMMENT);
    expect(eventsOf(head)).toEqual([]); // (nothing but keepalives: the response is not made yet)
    g.hold.release();
    const events = eventsOf(await s.rest()).map(
      (e) => JSON.parse(e.data) as { type: string; response?: { output: { type: string }[] } },
    );
    expect(events[0]?.type).toBe("response.created");
    const done = events.at(-1)!;
    expect(done.type).toMatch(/^response\.(completed|incomplete)$/); // (max_output_tokens: 4)
    expect(done.response?.output[0]?.type).toBe("compaction");
  });
});
