// Stored chat completions (stored-completions.ts, ADR 0055) through the official `openai`
// client: completions made with store: true listed (both orders, paged, by model and by
// metadata), retrieved as answered (streamed ones too), their messages listed, their
// metadata set, deleted; store: false ones and ones whose client left are not kept; in
// memory and in a files folder two gateways share; each API key sees its own.
import { mkdtempSync, readdirSync } from "node:fs";
import { join } from "node:path";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testEnv, waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  finishedRequests,
  type HeldGateway,
  metric,
  refusalOf,
  startGateway,
  startHeldGateway,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let folder: string;
/** Completions in memory. */
let m: HeldGateway;
/** Two gateways on one files folder. */
let a: TestGateway;
let b: TestGateway;
/** Two API keys. */
let keyed: TestGateway;
/** Keeps nothing (--responses-store 0). */
let none: TestGateway;

const files = (d: string) => ({ dir: d, maxBytes: 1 << 20, batchConcurrency: 1 });

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  folder = mkdtempSync(join(testEnv().runDir, "stored-completions-"));
  m = await startHeldGateway(dir);
  a = await startGateway(dir, { files: files(folder) });
  b = await startGateway(dir, { files: files(folder) });
  keyed = await startGateway(dir, { apiKeys: ["key-one", "key-two"] });
  none = await startGateway(dir, { responsesStore: 0 });
});
afterAll(async () => {
  m?.hold.release();
  for (const g of [m, a, b, keyed, none]) await g?.close();
});

const ask = (text: string, extra: Partial<OpenAI.ChatCompletionCreateParamsNonStreaming> = {}) =>
  ({
    model: "tiny",
    max_tokens: 5,
    temperature: 0,
    messages: [{ role: "user" as const, content: text }],
    ...extra,
  }) satisfies OpenAI.ChatCompletionCreateParamsNonStreaming;

/** Every stored completion's id, as the list pages them (`limit` a page). */
async function allIds(c: OpenAI, q: OpenAI.Chat.ChatCompletionListParams = {}) {
  const ids: string[] = [];
  for await (const x of c.chat.completions.list(q)) ids.push(x.id);
  return ids;
}

describe("stored chat completions", () => {
  it("listed oldest first (or newest), paged, by model and metadata; retrieved as answered; metadata set; deleted", async () => {
    const c = m.client;
    const before = await allIds(c);
    const one = await c.chat.completions.create(
      ask("one", { store: true, metadata: { topic: "count", n: "1" } }),
    );
    const unstored = await c.chat.completions.create(ask("not kept"));
    const falsely = await c.chat.completions.create(ask("not kept", { store: false }));
    const two = await c.chat.completions.create(
      ask("two", { store: true, metadata: { topic: "count", n: "2" } }),
    );
    const three = await c.chat.completions.create(
      ask("three", { store: true, metadata: { topic: "other" } }),
    );
    const made = [one.id, two.id, three.id];
    expect([...made].sort()).toEqual(made); // (ids in the order they were made)

    expect((await allIds(c)).slice(before.length)).toEqual(made);
    expect((await allIds(c, { order: "desc" })).slice(0, 3)).toEqual([...made].reverse());
    // Pages of one: the client follows `after` to the end.
    expect((await allIds(c, { limit: 1 })).slice(before.length)).toEqual(made);
    const page = await c.chat.completions.list({ limit: 2, after: one.id });
    expect(page.data.map((x) => x.id)).toEqual([two.id, three.id]);
    expect(page.has_more).toBe(false);
    expect(await allIds(c, { metadata: { topic: "count" } })).toEqual([one.id, two.id]);
    expect(await allIds(c, { metadata: { topic: "count", n: "2" } })).toEqual([two.id]);
    expect(await allIds(c, { model: "tiny" })).toEqual(await allIds(c));
    expect(await allIds(c, { model: "other" })).toEqual([]);
    expect(await allIds(c)).not.toContain(unstored.id);
    expect(await allIds(c)).not.toContain(falsely.id);

    const got = await c.chat.completions.retrieve(two.id);
    expect(got).toMatchObject({
      id: two.id,
      object: "chat.completion",
      model: "tiny",
      created: two.created,
      choices: two.choices,
      usage: two.usage,
      metadata: { topic: "count", n: "2" },
      temperature: 0,
    });
    expect(
      (await refusalOf(c.chat.completions.retrieve(unstored.id))) as { code?: string },
    ).toMatchObject({ status: 404, code: "EM_GATEWAY_COMPLETION_NOT_FOUND" });

    const updated = await c.chat.completions.update(two.id, { metadata: { topic: "moved" } });
    expect(updated.metadata).toEqual({ topic: "moved" });
    expect(await allIds(c, { metadata: { topic: "count" } })).toEqual([one.id]);
    expect(await allIds(c, { metadata: { topic: "moved" } })).toEqual([two.id]);
    expect((await c.chat.completions.retrieve(two.id)).choices).toEqual(two.choices);
    // (an update keeps its place in the list)
    expect((await allIds(c)).slice(before.length)).toEqual(made);

    expect(await c.chat.completions.delete(two.id)).toEqual({
      object: "chat.completion.deleted",
      id: two.id,
      deleted: true,
    });
    expect(await refusalOf(c.chat.completions.retrieve(two.id))).toMatchObject({ status: 404 });
    expect(await refusalOf(c.chat.completions.delete(two.id))).toMatchObject({ status: 404 });
    // A page after a completion deleted since still starts where it was.
    const rest = await c.chat.completions.list({ after: two.id });
    expect(rest.data.map((x) => x.id)).toEqual([three.id]);
  });

  it("a request's messages listed with ids (both orders, paged), content parts as parts and text", async () => {
    const c = m.client;
    const made = await c.chat.completions.create({
      model: "tiny",
      max_tokens: 3,
      store: true,
      messages: [
        { role: "system", content: "be brief" },
        {
          role: "user",
          content: [
            { type: "text", text: "first " },
            { type: "text", text: "second" },
          ],
        },
        { role: "assistant", content: "ok" },
        { role: "user", content: "again" },
      ],
    });
    const all = [];
    for await (const x of c.chat.completions.messages.list(made.id, { limit: 1 })) all.push(x);
    expect(all.map((x) => x.id)).toEqual([0, 1, 2, 3].map((i) => `${made.id}-${i}`));
    expect(all.map((x) => [x.role, x.content])).toEqual([
      ["system", "be brief"],
      ["user", "first second"],
      ["assistant", "ok"],
      ["user", "again"],
    ]);
    expect(all[1]!.content_parts).toEqual([
      { type: "text", text: "first " },
      { type: "text", text: "second" },
    ]);
    expect(all[0]!.content_parts).toBeNull();
    const desc = await c.chat.completions.messages.list(made.id, { order: "desc", limit: 2 });
    expect(desc.data.map((x) => x.content)).toEqual(["again", "ok"]);
    expect(desc.has_more).toBe(true);
    const after = await c.chat.completions.messages.list(made.id, {
      order: "desc",
      after: `${made.id}-2`,
    });
    expect(after.data.map((x) => x.content)).toEqual(["first second", "be brief"]);
  });

  it("a streamed completion kept as its answer whole; one whose client left not kept", async () => {
    const c = m.client;
    const stream = await c.chat.completions.create({
      ...ask("streamed", { store: true, max_tokens: 8 }),
      stream: true,
    });
    let id = "";
    let text = "";
    let finish: string | null = null;
    for await (const chunk of stream) {
      id = chunk.id;
      text += chunk.choices[0]?.delta.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    await waitFor("the streamed completion kept", async () =>
      (await allIds(c)).includes(id) ? true : undefined,
    );
    const kept = await c.chat.completions.retrieve(id);
    expect(kept.choices).toHaveLength(1);
    expect(kept.choices[0]!.message.content).toBe(text);
    expect(kept.choices[0]!.finish_reason).toBe(finish);
    expect(kept.usage?.completion_tokens).toBeGreaterThan(0);

    // A client that leaves mid-answer, streamed and not.
    const aborts = await finishedRequests(m.url, "abort");
    const before = await allIds(c);
    m.hold.hold();
    const left = await c.chat.completions.create({
      ...ask("left", { store: true, max_tokens: 8 }),
      stream: true,
    });
    for await (const _ of left) break;
    await m.hold.entered;
    const gaveUp = new AbortController();
    const plain = c.chat.completions
      .create(ask("plain", { store: true }), { signal: gaveUp.signal })
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
    expect(await allIds(c)).toEqual(before);
  });

  it("n > 1: every choice kept", async () => {
    const made = await m.client.chat.completions.create(
      ask("many", { store: true, n: 3, temperature: 1, seed: 7 }),
    );
    const kept = await m.client.chat.completions.retrieve(made.id);
    expect(kept.choices).toEqual(made.choices);
    expect(kept.choices).toHaveLength(3);
    expect(kept).toMatchObject({ seed: 7, temperature: 1 });
  });

  it("in a files folder: made on one gateway, listed, retrieved, updated and deleted on the other", async () => {
    const made = await a.client.chat.completions.create(
      ask("shared", { store: true, metadata: { where: "a" } }),
    );
    expect(await allIds(b.client)).toEqual([made.id]);
    expect((await b.client.chat.completions.retrieve(made.id)).choices).toEqual(made.choices);
    await b.client.chat.completions.update(made.id, { metadata: { where: "b" } });
    expect((await a.client.chat.completions.retrieve(made.id)).metadata).toEqual({ where: "b" });
    expect(readdirSync(join(folder, "chat-completions", "_"))).toEqual([`${made.id}.json`]);
    await b.client.chat.completions.delete(made.id);
    expect(await refusalOf(a.client.chat.completions.retrieve(made.id))).toMatchObject({
      status: 404,
      code: "EM_GATEWAY_COMPLETION_NOT_FOUND",
    });
    expect(await allIds(a.client)).toEqual([]);
  });

  it("each API key sees its own", async () => {
    const one = keyed.client;
    const two = new OpenAI({ baseURL: `${keyed.url}/v1`, apiKey: "key-two", maxRetries: 0 });
    const mine = await one.chat.completions.create(ask("mine", { store: true }));
    const theirs = await two.chat.completions.create(ask("theirs", { store: true }));
    expect(await allIds(one)).toEqual([mine.id]);
    expect(await allIds(two)).toEqual([theirs.id]);
    expect(await refusalOf(two.chat.completions.retrieve(mine.id))).toMatchObject({ status: 404 });
    expect(await refusalOf(two.chat.completions.delete(mine.id))).toMatchObject({ status: 404 });
    expect(await refusalOf(two.chat.completions.update(mine.id, { metadata: {} }))).toMatchObject({
      status: 404,
    });
    expect(await allIds(one)).toEqual([mine.id]);
  });

  it("refusals: store: true where none are kept, bad metadata, bad list queries, bad updates", async () => {
    expect(
      await refusalOf(none.client.chat.completions.create(ask("x", { store: true }))),
    ).toMatchObject({ status: 400, param: "store" });
    // (store: false, or none said, still answers there)
    expect((await none.client.chat.completions.create(ask("x"))).choices).toHaveLength(1);
    expect(await allIds(none.client)).toEqual([]);

    const c = m.client;
    const many = Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, "v"]));
    expect(
      await refusalOf(c.chat.completions.create(ask("x", { store: true, metadata: many }))),
    ).toMatchObject({ status: 400 });
    const long = { k: "v".repeat(513) };
    expect(
      await refusalOf(c.chat.completions.create(ask("x", { store: true, metadata: long }))),
    ).toMatchObject({ status: 400 });
    const made = await c.chat.completions.create(ask("x", { store: true }));
    expect(await refusalOf(c.chat.completions.update(made.id, { metadata: many }))).toMatchObject({
      status: 400,
    });
    const raw = async (path: string) => {
      const r = await fetch(`${m.url}${path}`);
      return {
        status: r.status,
        body: (await r.json()) as { error: { code: string; param?: string } },
      };
    };
    for (const [q, param] of [
      ["order=sideways", "order"],
      ["limit=0", "limit"],
      ["limit=101", "limit"],
      ["limit=x", "limit"],
    ])
      expect(await raw(`/v1/chat/completions?${q}`)).toMatchObject({
        status: 400,
        body: { error: { code: "EM_GATEWAY_BAD_REQUEST", param } },
      });
    expect(await raw(`/v1/chat/completions/${made.id}/messages?after=nope`)).toMatchObject({
      status: 400,
      body: { error: { param: "after" } },
    });
    expect(await raw("/v1/chat/completions/chatcmpl-../messages")).toMatchObject({
      status: 404,
      body: { error: { code: "EM_GATEWAY_COMPLETION_NOT_FOUND" } },
    });
    // Still whole: the refusals took nothing away.
    expect((await c.chat.completions.retrieve(made.id)).id).toBe(made.id);
  });
});
