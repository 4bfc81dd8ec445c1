// OpenAI's Conversations API (conversations.ts, ADR 0053) through the official `openai`
// client: conversations made, read, updated and deleted with their items; Responses
// requests that name one continue it (its items before their input) and add their input and
// answer to it; in memory and in a files folder two gateways share (both adding to one
// conversation at once); each API key sees its own.
import { mkdtempSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testEnv, waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  finishedRequests,
  type HeldGateway,
  heldBackground,
  metric,
  refusalOf,
  startGateway,
  startHeldGateway,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let folder: string;
/** Conversations in memory. */
let m: HeldGateway;
/** Two gateways on one files folder. */
let a: TestGateway;
let b: TestGateway;

const files = (d: string) => ({ dir: d, maxBytes: 1 << 20, batchConcurrency: 1 });

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  folder = mkdtempSync(join(testEnv().runDir, "conversations-"));
  m = await startHeldGateway(dir);
  a = await startGateway(dir, { files: files(folder) });
  b = await startGateway(dir, { files: files(folder) });
});
afterAll(async () => {
  m?.hold.release();
  await m?.close();
  await a?.close();
  await b?.close();
});

const turn = { model: "tiny", max_output_tokens: 6, temperature: 0 } as const;
const user = (text: string) => ({ type: "message" as const, role: "user" as const, content: text });

/** A response's text (a streamed event's response has no output_text of its own). */
const textOf = (r: OpenAI.Responses.Response) =>
  r.output
    .flatMap((i) => (i.type === "message" ? i.content : []))
    .map((p) => (p.type === "output_text" ? p.text : ""))
    .join("");

/** The items of conversation `id`, oldest first, as [type, role or name, text]. */
async function itemsOf(c: OpenAI, id: string) {
  const page = await c.conversations.items.list(id, { order: "asc", limit: 100 });
  return page.data.map((i) => {
    const item = i as { type: string; role?: string; content?: { text?: string }[] };
    return [item.type, item.role, item.content?.map((p) => p.text).join("")];
  });
}

describe("conversations", () => {
  it("made with items and metadata; retrieved, updated; items listed (both orders, paged), added, retrieved, deleted; then deleted", async () => {
    const c = m.client;
    const conv = await c.conversations.create({
      items: [user("one"), { type: "message", role: "assistant", content: "two" }],
      metadata: { topic: "counting" },
    });
    expect(conv).toMatchObject({ object: "conversation", metadata: { topic: "counting" } });
    expect(conv.id).toMatch(/^conv_[0-9a-f]{24}$/);
    expect(await c.conversations.retrieve(conv.id)).toEqual(conv);
    const updated = await c.conversations.update(conv.id, { metadata: { topic: "numbers" } });
    expect(updated.metadata).toEqual({ topic: "numbers" });
    expect((await c.conversations.retrieve(conv.id)).metadata).toEqual({ topic: "numbers" });
    const added = await c.conversations.items.create(conv.id, {
      items: [user("three"), user("four")],
    });
    expect(added.data.map((i) => (i as { content: { text: string }[] }).content[0]!.text)).toEqual([
      "three",
      "four",
    ]);
    expect(await itemsOf(c, conv.id)).toEqual([
      ["message", "user", "one"],
      ["message", "assistant", "two"],
      ["message", "user", "three"],
      ["message", "user", "four"],
    ]);
    // Newest first by default; paged with after.
    const first = await c.conversations.items.list(conv.id, { limit: 3 });
    expect(first.data.map((i) => i.id)).toEqual(
      [...added.data]
        .reverse()
        .map((i) => i.id)
        .concat(first.data[2]!.id),
    );
    expect(first.has_more).toBe(true);
    const all: string[] = [];
    for await (const i of c.conversations.items.list(conv.id, { limit: 1, order: "asc" }))
      all.push(i.id!);
    expect(all).toHaveLength(4);
    expect(
      await c.conversations.items.retrieve(all[1]!, { conversation_id: conv.id }),
    ).toMatchObject({
      id: all[1],
      role: "assistant",
      content: [{ type: "output_text", text: "two" }],
    });
    expect((await c.conversations.items.delete(all[1]!, { conversation_id: conv.id })).id).toBe(
      conv.id,
    );
    expect((await itemsOf(c, conv.id)).map((i) => i[2])).toEqual(["one", "three", "four"]);
    expect(
      (await refusalOf(c.conversations.items.retrieve(all[1]!, { conversation_id: conv.id })))
        .status,
    ).toBe(404);
    expect(await c.conversations.delete(conv.id)).toEqual({
      id: conv.id,
      object: "conversation.deleted",
      deleted: true,
    });
    for (const gone of [
      () => c.conversations.retrieve(conv.id),
      () => c.conversations.items.list(conv.id),
      () => c.conversations.items.create(conv.id, { items: [user("five")] }),
      () => c.conversations.update(conv.id, { metadata: {} }),
      () => c.conversations.delete(conv.id),
    ])
      expect(await refusalOf(gone())).toMatchObject({
        status: 404,
        code: "EM_GATEWAY_CONVERSATION_NOT_FOUND",
      });
  });

  it("a response in a conversation reads its items first and adds its input and answer: as previous_response_id and the whole history would", async () => {
    const c = m.client;
    const conv = await c.conversations.create({ items: [user("Tell me a story.")] });
    const r1 = await c.responses.create({ ...turn, conversation: conv.id, input: "Go on." });
    expect(r1.conversation).toEqual({ id: conv.id });
    // The same answer as the history given whole.
    const whole = await c.responses.create({
      ...turn,
      input: [user("Tell me a story."), user("Go on.")],
    });
    expect(r1.output_text).toBe(whole.output_text);
    expect(await itemsOf(c, conv.id)).toEqual([
      ["message", "user", "Tell me a story."],
      ["message", "user", "Go on."],
      ["message", "assistant", r1.output_text],
    ]);
    // The answer's item is in it as the response gave it (its id too).
    const items = await c.conversations.items.list(conv.id, { order: "asc" });
    expect(items.data[2]!.id).toBe(r1.output[0]!.id);
    // A second turn ({id} form), streamed: as the chain of previous_response_id.
    const stream = await c.responses.create({
      ...turn,
      conversation: { id: conv.id },
      input: "And then?",
      stream: true,
    });
    let r2: OpenAI.Responses.Response | undefined;
    for await (const e of stream)
      if (e.type === "response.completed" || e.type === "response.incomplete") r2 = e.response;
    const chained = await c.responses.create({
      ...turn,
      previous_response_id: whole.id,
      input: "And then?",
    });
    expect(textOf(r2!)).toBe(chained.output_text);
    expect((await itemsOf(c, conv.id)).map((i) => i[2])).toEqual([
      "Tell me a story.",
      "Go on.",
      r1.output_text,
      "And then?",
      textOf(r2!),
    ]);
    // Counted as it would run.
    const counted = await c.responses.inputTokens.count({
      model: "tiny",
      conversation: conv.id,
      input: "More.",
    });
    expect(counted.input_tokens).toBeGreaterThan(
      (await c.responses.inputTokens.count({ model: "tiny", input: "More." })).input_tokens,
    );
  });

  it("a background response adds its answer when it ends; a cancelled one adds nothing; store: false still adds", async () => {
    const c = m.client;
    const conv = await c.conversations.create({});
    const bg = await c.responses.create({
      ...turn,
      conversation: conv.id,
      input: "hi",
      background: true,
    });
    let r = bg;
    while (r.status === "queued" || r.status === "in_progress") {
      await new Promise((res) => setTimeout(res, 50));
      r = await c.responses.retrieve(bg.id);
    }
    expect((await itemsOf(c, conv.id)).map((i) => i[2])).toEqual(["hi", r.output_text]);
    const held = await heldBackground(m, { ...turn, conversation: conv.id, input: "stop" });
    const cancelling = c.responses.cancel(held.id);
    m.hold.releaseAfter(200);
    expect((await cancelling).status).toBe("cancelled");
    expect(await itemsOf(c, conv.id)).toHaveLength(2);
    const unstored = await c.responses.create({
      ...turn,
      conversation: conv.id,
      input: "x",
      store: false,
    });
    expect((await itemsOf(c, conv.id)).map((i) => i[2])).toEqual([
      "hi",
      r.output_text,
      "x",
      unstored.output_text,
    ]);
  });

  it("a client that leaves before the answer: nothing added to its conversation, its response kept cancelled (streamed or not)", async () => {
    const c = m.client;
    const conv = await c.conversations.create({ items: [user("one")] });
    const aborts = await finishedRequests(m.url, "abort");
    // Streamed: the client reads response.created, then leaves.
    m.hold.hold();
    const stream = await c.responses.create({
      ...turn,
      conversation: conv.id,
      input: "streamed",
      stream: true,
    });
    let id = "";
    for await (const e of stream) {
      if (e.type === "response.created") id = e.response.id;
      break;
    }
    await m.hold.entered;
    // Not streamed: the client gives up while it runs.
    const gaveUp = new AbortController();
    const plain = c.responses
      .create({ ...turn, conversation: conv.id, input: "plain" }, { signal: gaveUp.signal })
      .catch((e: unknown) => e);
    await waitFor("both requests in the gateway", async () =>
      (await metric(m.url, "expertmesh_gateway_num_requests_waiting")) +
        (await metric(m.url, "expertmesh_gateway_num_requests_running")) ===
      2
        ? true
        : undefined,
    );
    gaveUp.abort();
    expect(await plain).toBeInstanceOf(Error);
    m.hold.release();
    await waitFor("both requests to end", async () =>
      (await finishedRequests(m.url, "abort")) === aborts + 2 ? true : undefined,
    );
    const kept = await c.responses.retrieve(id);
    expect(kept.status).toBe("cancelled");
    expect(await itemsOf(c, conv.id)).toEqual([["message", "user", "one"]]);
  });

  it("refusals: with previous_response_id, unknown (404 conversation), content a text model cannot read, too many items, bad metadata, bad list queries", async () => {
    const c = m.client;
    const conv = await c.conversations.create({});
    const prev = await c.responses.create({ ...turn, input: "hi" });
    expect(
      await refusalOf(
        c.responses.create({
          ...turn,
          input: "x",
          conversation: conv.id,
          previous_response_id: prev.id,
        }),
      ),
    ).toMatchObject({ status: 400, param: "conversation" });
    expect(
      await refusalOf(
        c.responses.create({ ...turn, input: "x", conversation: `conv_${"0".repeat(24)}` }),
      ),
    ).toMatchObject({
      status: 404,
      param: "conversation",
      code: "EM_GATEWAY_CONVERSATION_NOT_FOUND",
    });
    const image = {
      type: "message" as const,
      role: "user" as const,
      content: [
        { type: "input_image" as const, image_url: "https://x/y.png", detail: "auto" as const },
      ],
    };
    expect(await refusalOf(c.conversations.create({ items: [image] }))).toMatchObject({
      status: 400,
      param: "items.0.content.0",
    });
    expect(
      await refusalOf(c.conversations.items.create(conv.id, { items: [user("a"), image] })),
    ).toMatchObject({
      status: 400,
      param: "items.1.content.0",
    });
    expect((await itemsOf(c, conv.id)).length).toBe(0); // (nothing of a refused request)
    const many = Array.from({ length: 21 }, (_, i) => user(String(i)));
    expect((await refusalOf(c.conversations.create({ items: many }))).status).toBe(400);
    expect((await refusalOf(c.conversations.items.create(conv.id, { items: many }))).status).toBe(
      400,
    );
    expect((await refusalOf(c.conversations.items.create(conv.id, { items: [] }))).status).toBe(
      400,
    );
    const metadata = Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, "v"]));
    expect((await refusalOf(c.conversations.create({ metadata }))).status).toBe(400);
    expect(
      (await refusalOf(c.conversations.update(conv.id, { metadata: { k: "v".repeat(513) } })))
        .status,
    ).toBe(400);
    for (const q of ["limit=0", "limit=101", "order=up", "after=item_nothere"])
      expect((await fetch(`${m.url}/v1/conversations/${conv.id}/items?${q}`)).status).toBe(400);
    for (const id of ["conv_x", "..%2Fresponses", `resp_${"ab".repeat(12)}`])
      expect((await fetch(`${m.url}/v1/conversations/${id}`)).status).toBe(404);
  });

  it("refuses an item id given twice, or one the conversation holds (OpenAI's duplicate item)", async () => {
    const c = m.client;
    const item = (id: string, text: string) => ({ ...user(text), id });
    expect(
      await refusalOf(c.conversations.create({ items: [item("msg_a", "x"), item("msg_a", "y")] })),
    ).toMatchObject({ status: 400, param: "items.1.id" });
    const conv = await c.conversations.create({ items: [item("msg_held", "one")] });
    expect(
      await refusalOf(
        c.conversations.items.create(conv.id, { items: [item("msg_held", "again")] }),
      ),
    ).toMatchObject({ status: 400, param: "items.0.id" });
    // A turn whose input carries an item the conversation holds: refused before it runs.
    expect(
      await refusalOf(
        c.responses.create({
          ...turn,
          conversation: conv.id,
          input: [user("new"), item("msg_held", "one")],
        }),
      ),
    ).toMatchObject({ status: 400, param: "input.1.id" });
    // Without a conversation, an id twice in one input.
    expect(
      await refusalOf(
        c.responses.create({ ...turn, input: [item("msg_b", "x"), item("msg_b", "y")] }),
      ),
    ).toMatchObject({ status: 400, param: "input.1.id" });
    expect(await itemsOf(c, conv.id)).toEqual([["message", "user", "one"]]);
    // New ids are taken.
    await c.conversations.items.create(conv.id, { items: [item("msg_new", "two")] });
    expect((await itemsOf(c, conv.id)).length).toBe(2);
  });
});

describe("conversations in a shared files folder", () => {
  it("made on one gateway, continued on the other; both adding to it at once lose nothing", async () => {
    const conv = await a.client.conversations.create({
      items: [user("Tell me a story.")],
      metadata: { k: "v" },
    });
    expect(await b.client.conversations.retrieve(conv.id)).toEqual(conv);
    const [onA, onB] = await Promise.all([
      a.client.responses.create({ ...turn, conversation: conv.id, input: "on a" }),
      b.client.responses.create({ ...turn, conversation: conv.id, input: "on b" }),
    ]);
    const texts = (await itemsOf(b.client, conv.id)).map((i) => i[2]);
    expect(texts).toHaveLength(5);
    expect(texts[0]).toBe("Tell me a story.");
    // Each answer right after its input (each response adds its items in one write).
    for (const [input, r] of [
      ["on a", onA],
      ["on b", onB],
    ] as const) {
      const at = texts.indexOf(input);
      expect(texts[at + 1]).toBe(r.output_text);
    }
    expect(await itemsOf(a.client, conv.id)).toEqual(await itemsOf(b.client, conv.id));
    // The log: one line a record, the first the one that made it.
    const lines = readFileSync(join(folder, "conversations", `${conv.id}.jsonl`), "utf8")
      .trim()
      .split("\n");
    expect(lines).toHaveLength(4);
    expect(JSON.parse(lines[0]!)).toMatchObject({ made: { id: conv.id, metadata: { k: "v" } } });
    await b.client.conversations.delete(conv.id);
    expect((await refusalOf(a.client.conversations.retrieve(conv.id))).status).toBe(404);
  });
});

describe("conversations per API key", () => {
  for (const where of ["memory", "a files folder"] as const)
    it(`in ${where}: another key's conversation is not there (404 on every route, and for a response)`, async () => {
      const g = await startGateway(dir, {
        apiKeys: ["key-a", "key-b"],
        ...(where === "memory"
          ? {}
          : { files: files(mkdtempSync(join(testEnv().runDir, "conversations-keys-"))) }),
      });
      try {
        const { default: OpenAI } = await import("openai");
        const keyA = new OpenAI({ baseURL: `${g.url}/v1`, apiKey: "key-a", maxRetries: 0 });
        const keyB = new OpenAI({ baseURL: `${g.url}/v1`, apiKey: "key-b", maxRetries: 0 });
        const conv = await keyA.conversations.create({ items: [user("mine")] });
        const item = (await keyA.conversations.items.list(conv.id)).data[0]!.id!;
        for (const p of [
          () => keyB.conversations.retrieve(conv.id),
          () => keyB.conversations.update(conv.id, { metadata: {} }),
          () => keyB.conversations.items.list(conv.id),
          () => keyB.conversations.items.create(conv.id, { items: [user("theirs")] }),
          () => keyB.conversations.items.retrieve(item, { conversation_id: conv.id }),
          () => keyB.conversations.items.delete(item, { conversation_id: conv.id }),
          () => keyB.conversations.delete(conv.id),
          () => keyB.responses.create({ ...turn, conversation: conv.id, input: "x" }),
        ])
          expect((await refusalOf(p())).status).toBe(404);
        expect(await itemsOf(keyA, conv.id)).toEqual([["message", "user", "mine"]]);
        for (const path of ["/v1/conversations", `/v1/conversations/${conv.id}/items`])
          expect((await fetch(`${g.url}${path}`)).status).toBe(401); // (no key)
      } finally {
        await g.close();
      }
    });
});
