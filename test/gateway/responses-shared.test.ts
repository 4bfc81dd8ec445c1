// Responses kept in the files folder that gateways share (response-files.ts), through the
// official `openai` client against two gateways started in this process on one folder, as
// the operator's gateway pods on a shared claim: whichever gateway a request lands on finds
// the responses the other made, continues them, cancels or deletes one the other runs in the
// background, and a running response whose gateway stopped reads as failed.
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import OpenAI, { toFile } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ResponseFiles, STALE_MS } from "../../src/gateway/response-files.ts";
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
let a: HeldGateway;
let b: TestGateway;

const files = (d: string, maxTotalBytes?: number) => ({
  dir: d,
  maxBytes: 1 << 20,
  batchConcurrency: 1,
  ...(maxTotalBytes ? { maxTotalBytes } : {}),
});

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  folder = mkdtempSync(join(testEnv().runDir, "responses-shared-"));
  a = await startHeldGateway(dir, { files: files(folder) });
  b = await startGateway(dir, { files: files(folder) });
});
afterAll(async () => {
  a?.hold.release();
  await a?.close();
  await b?.close();
});

const body = { model: "tiny", input: "Tell me a story.", max_output_tokens: 8, temperature: 0 };

const refusalOf = (p: Promise<unknown>) =>
  p.catch((e: unknown) => e) as Promise<{ status: number; code?: string; param?: string }>;

describe("responses in a shared files folder", () => {
  it("one gateway's response is the other's: retrieved, its input items, continued, deleted", async () => {
    const first = await a.client.responses.create(body);
    expect(first.status).toBe("incomplete"); // (8 tokens of the tiny model's noise)
    expect(readdirSync(join(folder, "responses"))).toContain(`${first.id}.json`);
    const there = await b.client.responses.retrieve(first.id);
    expect([there.id, there.output_text, there.usage]).toEqual([
      first.id,
      first.output_text,
      first.usage,
    ]);
    const items = await b.client.responses.inputItems.list(first.id);
    expect(items.data.map((i) => i.type)).toEqual(["message"]);
    // Continued on the other gateway: the same answer as on the one that made it.
    const next = { ...body, input: "And then?", previous_response_id: first.id };
    const onB = await b.client.responses.create(next);
    const onA = await a.client.responses.create(next);
    expect(onB.output_text).toBe(onA.output_text);
    expect(onB.usage?.input_tokens).toBe(onA.usage?.input_tokens);
    expect(onB.usage!.input_tokens).toBeGreaterThan(first.usage!.input_tokens);
    // Deleted on one: gone on both.
    await b.client.responses.delete(first.id);
    expect((await refusalOf(a.client.responses.retrieve(first.id))).status).toBe(404);
    expect((await refusalOf(b.client.responses.delete(first.id))).status).toBe(404);
  });

  it("a background response one gateway runs: polled on the other, cancelled or deleted from it", async () => {
    const running = await heldBackground(a, { ...body, max_output_tokens: 64 }); // (running on a)
    expect((await b.client.responses.retrieve(running.id)).status).toBe("in_progress");
    // Continuing it is refused on the other gateway too while it runs.
    const early = await refusalOf(
      b.client.responses.create({ ...body, previous_response_id: running.id }),
    );
    expect([early.status, early.param]).toEqual([400, "previous_response_id"]);
    // The cancel from b waits until a has stopped it (a sees the mark within half a second).
    const cancel = b.client.responses.cancel(running.id);
    a.hold.releaseAfter(1500);
    const cancelled = await cancel;
    expect(cancelled.status).toBe("cancelled");
    expect((await a.client.responses.retrieve(running.id)).status).toBe("cancelled");

    // Deleted from b while a runs it: stopped, and a does not keep it again when it ends.
    a.hold.hold();
    const dropped = await a.client.responses.create({
      ...body,
      max_output_tokens: 64,
      background: true,
    });
    await b.client.responses.delete(dropped.id);
    await new Promise((r) => setTimeout(r, 1000));
    a.hold.release();
    await new Promise((r) => setTimeout(r, 500));
    for (const g of [a, b])
      expect((await refusalOf(g.client.responses.retrieve(dropped.id))).status).toBe(404);
    expect(readdirSync(join(folder, "responses")).filter((n) => n.startsWith(dropped.id))).toEqual(
      [],
    );
  });

  it("a response left in_progress by a gateway that stopped reads as failed, for good", async () => {
    const id = `resp_${"ab".repeat(12)}`;
    const path = join(folder, "responses", `${id}.json`);
    const response = {
      id,
      object: "response",
      status: "in_progress",
      background: true,
      output: [],
    };
    writeFileSync(path, JSON.stringify({ conversation: [], response, inputItems: [] }));
    // Written recently: still its gateway's.
    expect((await b.client.responses.retrieve(id)).status).toBe("in_progress");
    const then = new Date(Date.now() - STALE_MS - 5000);
    utimesSync(path, then, then);
    const lost = await b.client.responses.retrieve(id);
    expect(lost.status).toBe("failed");
    expect(lost.error).toMatchObject({ code: "EM_GATEWAY_RESPONSE_LOST" });
    expect((await a.client.responses.retrieve(id)).status).toBe("failed");
    // A mark beside it, for its gateway should that one only have been paused.
    expect(readFileSync(path.replace(/json$/, "cancel"), "utf8")).toBe('"lost"');
    // Ids that no gateway makes name no file (a path, another prefix).
    for (const bad of ["..%2Fresponses%2Fx", "resp_x", `item_${"ab".repeat(12)}`])
      expect((await refusalOf(a.client.responses.retrieve(bad))).status).toBe(404);
  });

  it("a folder with no room left keeps no more responses: 507 before anything runs; store false still answers", async () => {
    const full = mkdtempSync(join(testEnv().runDir, "responses-full-"));
    mkdirSync(join(full, "files"));
    writeFileSync(join(full, "files", "ballast"), Buffer.alloc(4096));
    const g = await startGateway(dir, { files: files(full, 1024) });
    try {
      const refused = await refusalOf(g.client.responses.create(body));
      expect([refused.status, refused.code]).toEqual([507, "EM_GATEWAY_FILES_FULL"]);
      const unstored = await g.client.responses.create({ ...body, store: false });
      expect([unstored.status, unstored.output_text.length > 0]).toEqual(["incomplete", true]);
    } finally {
      await g.close();
    }
  });

  it("expired responses and old marks are swept; fresh ones stay", () => {
    const d = mkdtempSync(join(testEnv().runDir, "responses-sweep-"));
    const store = new ResponseFiles(d, null);
    try {
      const kept = { conversation: [], response: { status: "completed" }, inputItems: [] };
      const [old, fresh] = [`resp_${"0".repeat(24)}`, `resp_${"1".repeat(24)}`];
      store.put(old, kept);
      store.put(fresh, kept);
      store.mark(old, "cancel");
      const long = new Date(Date.now() - 31 * 24 * 3600_000);
      utimesSync(join(d, "responses", `${old}.json`), long, long);
      utimesSync(join(d, "responses", `${old}.cancel`), long, long);
      expect(store.get(old)).toBeUndefined(); // (expired: gone for the API at once)
      store.sweep();
      expect(readdirSync(join(d, "responses"))).toEqual([`${fresh}.json`]);
      expect(store.get(fresh)?.response).toEqual({ status: "completed" });
    } finally {
      store.close();
    }
  });
});

describe("responses per API key", () => {
  /** A gateway with keys sk-a and sk-b; clients of each. */
  async function keyed(o: { files?: string } = {}) {
    const g = await startHeldGateway(dir, {
      apiKeys: ["sk-a", "sk-b"],
      ...(o.files ? { files: files(o.files) } : {}),
    });
    const as = (key: string) => new OpenAI({ baseURL: `${g.url}/v1`, apiKey: key, maxRetries: 0 });
    return { g, keyA: as("sk-a"), keyB: as("sk-b") };
  }

  /** Every route that names a response, as `c` sees response `id`: the statuses. */
  async function reach(c: OpenAI, id: string) {
    const status = (p: Promise<unknown>) =>
      p.then(
        () => 200,
        (e: { status: number }) => e.status,
      );
    return {
      retrieve: await status(c.responses.retrieve(id)),
      inputItems: await status(c.responses.inputItems.list(id)),
      continued: await status(c.responses.create({ ...body, previous_response_id: id })),
      inputTokens: await status(
        c.responses.inputTokens.count({ model: "tiny", input: "hi", previous_response_id: id }),
      ),
    };
  }
  const everywhere = (s: number) => ({ retrieve: s, inputItems: s, continued: s, inputTokens: s });

  for (const where of ["memory", "a files folder"] as const)
    it(`in ${where}: a response made with one key is not there for another (404 on every route, its cancel and delete too)`, async () => {
      const folder2 = mkdtempSync(join(testEnv().runDir, "responses-keys-"));
      const { g, keyA, keyB } = await keyed(where === "memory" ? {} : { files: folder2 });
      try {
        const mine = await keyA.responses.create(body);
        expect(await reach(keyB, mine.id)).toEqual(everywhere(404));
        const refused = await refusalOf(
          keyB.responses.create({ ...body, previous_response_id: mine.id }),
        );
        expect([refused.status, refused.param]).toEqual([404, "previous_response_id"]);
        expect((await refusalOf(keyB.responses.delete(mine.id))).status).toBe(404);
        expect((await refusalOf(keyB.responses.cancel(mine.id))).status).toBe(404);
        // Still the maker's: the other key's delete removed nothing.
        expect(await reach(keyA, mine.id)).toEqual(everywhere(200));
        await keyA.responses.delete(mine.id);
        expect((await refusalOf(keyA.responses.retrieve(mine.id))).status).toBe(404);
      } finally {
        await g.close();
      }
    });

  it("a background response: another key can neither poll, cancel nor delete it while it runs", async () => {
    const folder2 = mkdtempSync(join(testEnv().runDir, "responses-keys-bg-"));
    const { g, keyA, keyB } = await keyed({ files: folder2 });
    try {
      const running = await heldBackground(g, { ...body, max_output_tokens: 64 }, keyA);
      for (const refused of [
        keyB.responses.retrieve(running.id),
        keyB.responses.cancel(running.id),
        keyB.responses.delete(running.id),
      ])
        expect((await refusalOf(refused)).status).toBe(404);
      expect((await keyA.responses.retrieve(running.id)).status).toBe("in_progress");
      const cancel = keyA.responses.cancel(running.id);
      g.hold.releaseAfter(300);
      expect((await cancel).status).toBe("cancelled");
    } finally {
      g.hold.release();
      await g.close();
    }
  });

  it("a batch's /v1/responses lines are kept as its owner's: found with the key that made the batch only", async () => {
    const folder2 = mkdtempSync(join(testEnv().runDir, "responses-keys-batch-"));
    const { g, keyA, keyB } = await keyed({ files: folder2 });
    try {
      const line = { custom_id: "r1", method: "POST", url: "/v1/responses", body };
      const input = await keyA.files.create({
        file: await toFile(Buffer.from(`${JSON.stringify(line)}\n`), "in.jsonl"),
        purpose: "batch",
      });
      let batch = await keyA.batches.create({
        input_file_id: input.id,
        endpoint: "/v1/responses",
        completion_window: "24h",
      });
      const until = Date.now() + 60_000;
      while (batch.status !== "completed" && Date.now() < until) {
        await new Promise((r) => setTimeout(r, 200));
        batch = await keyA.batches.retrieve(batch.id);
      }
      expect(batch.request_counts).toEqual({ total: 1, completed: 1, failed: 0 });
      const out = await (await keyA.files.content(batch.output_file_id!)).text();
      const id = (JSON.parse(out) as { response: { body: { id: string } } }).response.body.id;
      expect(id).toMatch(/^resp_/);
      expect((await keyA.responses.retrieve(id)).id).toBe(id);
      expect((await refusalOf(keyB.responses.retrieve(id))).status).toBe(404);
    } finally {
      await g.close();
    }
  });
});
