// Background responses streamed (response-events.ts, ADR 0052), through the official `openai`
// client: background and stream together stream a response that runs on without its client;
// GET /v1/responses/{id}?stream=true replays its events, from the start or after
// starting_after, and follows them while it runs; on another gateway of a shared files
// folder too, from its <id>.events file.
import { existsSync, mkdtempSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { STALE_MS } from "../../src/gateway/response-files.ts";
import { testEnv } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  type HeldGateway,
  heldBackground,
  startGateway,
  startHeldGateway,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let folder: string;
/** Responses in memory. */
let m: HeldGateway;
/** Two gateways on one files folder. */
let a: HeldGateway;
let b: TestGateway;

const files = (d: string) => ({ dir: d, maxBytes: 1 << 20, batchConcurrency: 1 });

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  folder = mkdtempSync(join(testEnv().runDir, "responses-stream-"));
  m = await startHeldGateway(dir);
  a = await startHeldGateway(dir, { files: files(folder) });
  b = await startGateway(dir, { files: files(folder) });
});
afterAll(async () => {
  m?.hold.release();
  a?.hold.release();
  await m?.close();
  await a?.close();
  await b?.close();
});

type Event = { type: string; sequence_number: number } & Record<string, any>;

const body = { model: "tiny", input: "Tell me a story.", max_output_tokens: 8, temperature: 0 };

async function collect(stream: AsyncIterable<unknown>, until?: number): Promise<Event[]> {
  const out: Event[] = [];
  for await (const e of stream) {
    out.push(e as Event);
    if (until !== undefined && (e as Event).sequence_number >= until) break;
  }
  return out;
}

/** Response `id`'s events as GET ?stream=true sends them on `g`. */
const replay = async (g: TestGateway, id: string, starting_after?: number) =>
  collect(
    await g.client.responses.retrieve(id, {
      stream: true,
      ...(starting_after === undefined ? {} : { starting_after }),
    }),
  );

/** The text of the output_text deltas. */
const deltas = (es: Event[]) =>
  es
    .filter((e) => e.type === "response.output_text.delta")
    .map((e) => e["delta"] as string)
    .join("");
const textOf = (r: OpenAI.Responses.Response) =>
  r.output
    .flatMap((i) => (i.type === "message" ? i.content : []))
    .map((c) => (c.type === "output_text" ? c.text : ""))
    .join("");

/**
 * Checks a whole stream: numbered from 0, created (queued) first, then queued, in_progress
 * (unless it ended while queued), one last event that ends it.
 */
function expectWhole(es: Event[]): OpenAI.Responses.Response {
  expect(es.map((e) => e.sequence_number)).toEqual(es.map((_, i) => i));
  expect(es.slice(0, 2).map((e) => e.type)).toEqual(["response.created", "response.queued"]);
  expect(es[0]!["response"]).toMatchObject({ status: "queued", background: true });
  if (es.length > 3) expect(es[2]!.type).toBe("response.in_progress");
  const ends = es.filter((e) => /^response\.(completed|incomplete|failed)$/.test(e.type));
  expect(ends).toEqual([es.at(-1)]);
  return es.at(-1)!["response"] as OpenAI.Responses.Response;
}

const statusOf = (url: string) => fetch(url).then((r) => r.status);

describe("background responses streamed", () => {
  it("background and stream together: its events as they come; GET ?stream=true replays them (after starting_after too)", async () => {
    const live = await collect(
      await m.client.responses.create({ ...body, background: true, stream: true }),
    );
    const last = expectWhole(live);
    expect(live.at(-1)!.type).toBe("response.incomplete"); // (8 tokens of the tiny model's noise)
    expect(deltas(live)).toBe(textOf(last));
    // The same answer as the response made in the foreground, and as GET finds it.
    const fg = await m.client.responses.create(body);
    expect(textOf(last)).toBe(fg.output_text);
    const id = last.id;
    expect((await m.client.responses.retrieve(id)).output_text).toBe(fg.output_text);
    // Replayed whole, and after an event.
    expect(await replay(m, id)).toEqual(live);
    expect(await replay(m, id, 3)).toEqual(live.slice(4));
    expect(await replay(m, id, live.length + 5)).toEqual([]);
    // The SDK's own helper resumes through it, and builds the same final response.
    const resumed = m.client.responses.stream({ response_id: id, starting_after: 2 });
    const seen: number[] = [];
    resumed.on("event", (e) => seen.push(e.sequence_number));
    expect((await resumed.finalResponse()).output_text).toBe(fg.output_text);
    expect(seen[0]).toBe(3);
  });

  it("queued while the batch is full (status, response.queued), in_progress once its first step runs; cancelled while queued: no in_progress; another gateway of the folder sees it queued", async () => {
    const q = await startHeldGateway(dir, { maxRunning: 1, files: files(folder) });
    try {
      const first = await heldBackground(q, body);
      const second = await q.client.responses.create({ ...body, background: true });
      const third = await q.client.responses.create({ ...body, background: true });
      expect(second.status).toBe("queued");
      expect((await q.client.responses.retrieve(first.id)).status).toBe("in_progress");
      for (const g of [q, b])
        expect((await g.client.responses.retrieve(second.id)).status).toBe("queued");
      expect((await b.client.responses.cancel(third.id)).status).toBe("cancelled");
      const events = replay(q, second.id);
      q.hold.release();
      const es = await events;
      expect(expectWhole(es).status).toBe("incomplete"); // (max_output_tokens)
      expect(es[2]!["response"]).toMatchObject({ status: "in_progress", output: [] });
      expect((await replay(b, third.id)).map((e) => [e.type, e["response"]?.status])).toEqual([
        ["response.created", "queued"],
        ["response.queued", "queued"],
        ["response.incomplete", "cancelled"],
      ]);
    } finally {
      q.hold.release();
      await q.close();
    }
  });

  it("a client that leaves the stream does not stop the response; GET ?stream=true picks up where it left, live", async () => {
    m.hold.hold();
    const first = await collect(
      await m.client.responses.create({
        ...body,
        max_output_tokens: 24,
        background: true,
        stream: true,
      }),
      1, // (created, queued: then the client leaves)
    );
    const id = (first[0]!["response"] as { id: string }).id;
    await m.hold.entered;
    expect((await m.client.responses.retrieve(id)).status).toBe("in_progress");
    const rest = replay(m, id, 1);
    m.hold.releaseAfter(300);
    const after = await rest;
    const whole = [...first, ...after];
    const last = expectWhole(whole);
    expect(["completed", "incomplete"]).toContain(last.status);
    expect(deltas(whole)).toBe(textOf(last));
    expect(await replay(m, id)).toEqual(whole);
  });

  it("in a shared folder: a response running on one gateway streams from the other, live, to its end; the same events as its own", async () => {
    const running = await heldBackground(a, { ...body, max_output_tokens: 24 });
    const there = replay(b, running.id); // (from <id>.events, while a runs it)
    a.hold.releaseAfter(500);
    const onB = await there;
    const last = expectWhole(onB);
    expect(deltas(onB)).toBe(textOf(last));
    expect(await replay(a, running.id)).toEqual(onB);
    expect(await replay(b, running.id, 5)).toEqual(onB.slice(6));
  });

  it("in a shared folder: one cancelled from the other gateway while streamed there ends with response.incomplete, status cancelled", async () => {
    a.hold.hold();
    const running = await a.client.responses.create({
      ...body,
      max_output_tokens: 64,
      background: true,
    });
    const there = replay(b, running.id);
    await new Promise((r) => setTimeout(r, 300));
    const cancel = b.client.responses.cancel(running.id);
    a.hold.releaseAfter(1500);
    expect((await cancel).status).toBe("cancelled");
    const onB = await there;
    const last = expectWhole(onB);
    expect([onB.at(-1)!.type, last.status]).toEqual(["response.incomplete", "cancelled"]);
    expect(await replay(a, running.id)).toEqual(onB);
    a.hold.release(); // (cancelled before the timer: its step waits still)
  });

  it("a response whose gateway stopped streams what it wrote, then response.failed (EM_GATEWAY_RESPONSE_LOST)", async () => {
    const id = `resp_${"cd".repeat(12)}`;
    const base = join(folder, "responses", id);
    const response = {
      id,
      object: "response",
      status: "in_progress",
      background: true,
      output: [],
    };
    writeFileSync(`${base}.json`, JSON.stringify({ conversation: [], response, inputItems: [] }));
    writeFileSync(
      `${base}.events`,
      [
        { type: "response.created", sequence_number: 0, response },
        { type: "response.in_progress", sequence_number: 1, response },
      ]
        .map((e) => `${JSON.stringify(e)}\n`)
        .join(""),
    );
    const then = new Date(Date.now() - STALE_MS - 5000);
    utimesSync(`${base}.json`, then, then);
    const es = await replay(b, id);
    expect(es.map((e) => e.type)).toEqual([
      "response.created",
      "response.in_progress",
      "response.failed",
    ]);
    expect(es[2]!["response"]).toMatchObject({
      status: "failed",
      error: { code: "EM_GATEWAY_RESPONSE_LOST" },
    });
  });

  it("a gateway paused past STALE_MS: found lost on the other, it stays failed; the paused one ends it failed too and writes it no more", async () => {
    // (a pause is made here by setting the response's file back STALE_MS, as a gateway
    // stopped for that long leaves it, while its expert calls are held)
    const running = await heldBackground(a, { ...body, max_output_tokens: 24 });
    const base = join(folder, "responses", running.id);
    const then = new Date(Date.now() - STALE_MS - 5000);
    utimesSync(`${base}.json`, then, then);
    const lost = await b.client.responses.retrieve(running.id);
    expect(lost).toMatchObject({ status: "failed", error: { code: "EM_GATEWAY_RESPONSE_LOST" } });
    // The paused gateway wakes: it takes the mark within MARK_POLL_MS, before any more steps.
    const onA = replay(a, running.id);
    await new Promise((r) => setTimeout(r, 1500));
    a.hold.release();
    const es = await onA;
    const last = expectWhole(es);
    expect(es.at(-1)!.type).toBe("response.failed");
    expect(last).toMatchObject({ status: "failed", error: { code: "EM_GATEWAY_RESPONSE_LOST" } });
    await new Promise((r) => setTimeout(r, 1000)); // (a late write would be there by now)
    for (const g of [a, b]) {
      expect(await g.client.responses.retrieve(running.id)).toMatchObject({
        status: "failed",
        error: { code: "EM_GATEWAY_RESPONSE_LOST" },
      });
      expect(await replay(g, running.id)).toEqual(es);
    }
    expect(existsSync(`${base}.cancel`)).toBe(false); // (the mark taken)
  });

  it("refusals: not a background response (400 stream), a bad starting_after (400), another's or none (404), events not kept (400)", async () => {
    const fg = await m.client.responses.create(body);
    const refused = (await m.client.responses
      .retrieve(fg.id, { stream: true })
      .catch((e: unknown) => e)) as { status: number; param: string };
    expect([refused.status, refused.param]).toEqual([400, "stream"]);
    const bg = await m.client.responses.create({ ...body, background: true });
    for (const q of ["starting_after=abc", "starting_after=-1", "stream=yes"])
      expect(await statusOf(`${m.url}/v1/responses/${bg.id}?stream=true&${q}`)).toBe(400);
    expect(await statusOf(`${m.url}/v1/responses/resp_${"0".repeat(24)}?stream=true`)).toBe(404);
    // A background response kept in the folder before its events were.
    const id = `resp_${"ef".repeat(12)}`;
    const response = { id, object: "response", status: "completed", background: true, output: [] };
    writeFileSync(
      join(folder, "responses", `${id}.json`),
      JSON.stringify({ conversation: [], response, inputItems: [] }),
    );
    const old = (await b.client.responses
      .retrieve(id, { stream: true })
      .catch((e: unknown) => e)) as { status: number; param: string };
    expect([old.status, old.param]).toEqual([400, "stream"]);
    expect((await b.client.responses.retrieve(id)).status).toBe("completed");
  });
});
