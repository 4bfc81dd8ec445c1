// OpenAI's Uploads API (uploads.ts, ADR 0059) through the official `openai` client: a batch
// input sent in parts (to two gateways of one files folder, out of order) becomes one file of
// the Files API that a batch runs; the refusals of each step; an upload that outlives its
// hour takes nothing more and its parts are swept; each API key sees its own.
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import OpenAI, { toFile } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FileStore, FolderQuota } from "../../src/gateway/files.ts";
import { Uploads } from "../../src/gateway/uploads.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { refusalOf, startGateway, type TestGateway } from "./helpers.ts";

let a: TestGateway;
let b: TestGateway;
let keyed: TestGateway;
let plain: TestGateway;
let folder: string;

const filesOf = (d: string) => ({ dir: d, maxBytes: 1 << 20, batchConcurrency: 2 });

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  folder = mkdtempSync(join(testEnv().runDir, "uploads-"));
  a = await startGateway(dir, { files: filesOf(folder) });
  b = await startGateway(dir, { files: filesOf(folder) });
  keyed = await startGateway(dir, {
    files: filesOf(mkdtempSync(join(testEnv().runDir, "uploads-keyed-"))),
    apiKeys: ["key-one", "key-two"],
  });
  plain = await startGateway(dir);
});
afterAll(async () => {
  await a?.close();
  await b?.close();
  await keyed?.close();
  await plain?.close();
});

const line = (id: string, content: string) => ({
  custom_id: id,
  method: "POST",
  url: "/v1/chat/completions",
  body: { model: "tiny", messages: [{ role: "user", content }], max_tokens: 4, temperature: 0 },
});
const jsonl = (lines: object[]) => `${lines.map((l) => JSON.stringify(l)).join("\n")}\n`;
const md5 = (b: Buffer) => createHash("md5").update(b).digest("hex");
const part = async (c: OpenAI, id: string, bytes: Buffer) =>
  c.uploads.parts.create(id, { data: await toFile(bytes, "part") });
const newUpload = (c: OpenAI, bytes: number, filename = "input.jsonl") =>
  c.uploads.create({ bytes, filename, mime_type: "text/jsonl", purpose: "batch" });

describe("/v1/uploads", () => {
  it("a batch input in three parts, sent to two gateways of one folder out of order, completed in order: one file of their bytes, which a batch runs", async () => {
    const text = Buffer.from(jsonl([line("one", "hi"), line("two", "hello there")]));
    const cuts = [0, 40, 90, text.length];
    const chunks = cuts.slice(1).map((end, i) => text.subarray(cuts[i]!, end));
    const upload = await newUpload(a.client, text.length);
    expect(upload).toMatchObject({
      object: "upload",
      bytes: text.length,
      filename: "input.jsonl",
      purpose: "batch",
      status: "pending",
    });
    expect(upload.id).toMatch(/^upload_[0-9a-f]{24}$/);
    expect(upload.expires_at - upload.created_at).toBe(3600);
    // The last part first, to the other gateway.
    const p3 = await part(b.client, upload.id, chunks[2]!);
    const p1 = await part(a.client, upload.id, chunks[0]!);
    const p2 = await part(b.client, upload.id, chunks[1]!);
    expect(p1).toMatchObject({ object: "upload.part", upload_id: upload.id });
    expect(p1.id).toMatch(/^part_[0-9a-f]{24}$/);
    const done = await b.client.uploads.complete(upload.id, {
      part_ids: [p1.id, p2.id, p3.id],
      md5: md5(text),
    });
    expect(done.status).toBe("completed");
    expect(done.file).toMatchObject({
      object: "file",
      bytes: text.length,
      filename: "input.jsonl",
      purpose: "batch",
    });
    const file = done.file!;
    // Either gateway serves the file; its content is the parts in order.
    const content = Buffer.from(await (await a.client.files.content(file.id)).arrayBuffer());
    expect(content.equals(text)).toBe(true);
    expect((await b.client.files.retrieve(file.id)).id).toBe(file.id);
    // The parts are gone from the folder once they are the file.
    expect(readdirSync(join(folder, "uploads")).filter((n) => n.endsWith(".part"))).toEqual([]);
    const batch = await a.client.batches.create({
      input_file_id: file.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
    });
    const ended = await waitFor(
      "the batch done",
      async () => {
        const r = await a.client.batches.retrieve(batch.id);
        return ["completed", "failed"].includes(r.status) ? r : undefined;
      },
      60_000,
    );
    expect(ended.status).toBe("completed");
    expect(ended.request_counts).toMatchObject({ total: 2, completed: 2, failed: 0 });
    // Done: it takes nothing more.
    expect(await refusalOf(part(a.client, upload.id, Buffer.from("x")))).toMatchObject({
      status: 409,
      code: "EM_GATEWAY_UPLOAD_STATE",
    });
    expect(
      await refusalOf(a.client.uploads.complete(upload.id, { part_ids: [p1.id] })),
    ).toMatchObject({ status: 409, code: "EM_GATEWAY_UPLOAD_STATE" });
    expect(await refusalOf(a.client.uploads.cancel(upload.id))).toMatchObject({ status: 409 });
  });

  it("completion refusals leave the upload pending: a part not its own, one named twice, bytes that differ, a wrong md5; parts not named are dropped", async () => {
    const c = a.client;
    const upload = await newUpload(c, 6);
    const x = await part(c, upload.id, Buffer.from("abc"));
    const y = await part(c, upload.id, Buffer.from("def"));
    const spare = await part(c, (await newUpload(c, 3)).id, Buffer.from("zzz"));
    const cases: [string[], string | undefined, string][] = [
      [[x.id, spare.id], undefined, "part_ids.1"],
      [[x.id, x.id], undefined, "part_ids.1"],
      [["part_nope"], undefined, "part_ids.0"],
      [[x.id], undefined, "part_ids"],
      [[x.id, y.id], md5(Buffer.from("abcdeg")), "md5"],
      [[x.id, y.id], "not-hex", "md5"],
    ];
    for (const [part_ids, sum, param] of cases)
      expect(
        await refusalOf(c.uploads.complete(upload.id, { part_ids, ...(sum ? { md5: sum } : {}) })),
      ).toMatchObject({ status: 400, code: "EM_GATEWAY_BAD_REQUEST", param });
    // A part past the bytes it was made with: refused, nothing kept.
    expect(await refusalOf(part(c, upload.id, Buffer.from("more")))).toMatchObject({
      status: 400,
      param: "data",
    });
    // Still pending: completed in the other order, without an md5.
    const extra = await newUpload(c, 2);
    await part(c, extra.id, Buffer.from("no"));
    const done = await c.uploads.complete(upload.id, { part_ids: [y.id, x.id] });
    const content = await (await c.files.content(done.file!.id)).text();
    expect(content).toBe("defabc");
    // Cancelled: its parts go, it takes none more.
    const cancelled = await c.uploads.cancel(extra.id);
    expect(cancelled.status).toBe("cancelled");
    expect(readdirSync(join(folder, "uploads")).filter((n) => n.startsWith(extra.id))).toEqual([
      `${extra.id}.json`,
    ]);
    expect(await refusalOf(part(c, extra.id, Buffer.from("x")))).toMatchObject({ status: 409 });
  });

  it("create refusals: another purpose, more bytes than a file may hold, fields missing; an unknown upload; a form without 'data'", async () => {
    const c = a.client;
    const refusals: [() => Promise<unknown>, number, string][] = [
      [
        () =>
          c.uploads.create({
            bytes: 3,
            filename: "f",
            mime_type: "text/plain",
            purpose: "assistants",
          }),
        400,
        "purpose",
      ],
      [() => newUpload(c, (1 << 20) + 1), 413, "bytes"],
      [
        () => c.uploads.create({ bytes: 3, filename: "f", purpose: "batch" } as never),
        400,
        "mime_type",
      ],
      [
        () => c.uploads.create({ bytes: -1, filename: "f", mime_type: "t", purpose: "batch" }),
        400,
        "bytes",
      ],
      [() => part(c, "upload_nope", Buffer.from("x")), 404, "upload_id"],
      [
        () => c.uploads.complete(`upload_${"0".repeat(24)}`, { part_ids: ["part_x"] }),
        404,
        "upload_id",
      ],
      [() => c.uploads.cancel("../files"), 404, "upload_id"],
    ];
    for (const [p, status, param] of refusals)
      expect(await refusalOf(p())).toMatchObject({ status, param });
    const upload = await newUpload(c, 3);
    const form = new FormData();
    form.append("file", new Blob(["abc"]), "x");
    const r = await fetch(`${a.url}/v1/uploads/${upload.id}/parts`, { method: "POST", body: form });
    expect(r.status).toBe(400);
    expect(await r.json()).toMatchObject({ error: { param: "file" } });
  });

  it("each API key sees its own uploads; a gateway without a files folder has none", async () => {
    const other = new OpenAI({ baseURL: `${keyed.url}/v1`, apiKey: "key-two" });
    const mine = await newUpload(keyed.client, 3);
    expect(await refusalOf(part(other, mine.id, Buffer.from("abc")))).toMatchObject({
      status: 404,
      code: "EM_GATEWAY_UPLOAD_NOT_FOUND",
    });
    expect(await refusalOf(other.uploads.cancel(mine.id))).toMatchObject({ status: 404 });
    expect((await keyed.client.uploads.cancel(mine.id)).status).toBe("cancelled");
    expect(await refusalOf(newUpload(plain.client, 3))).toMatchObject({
      status: 404,
      code: "EM_GATEWAY_FILES_OFF",
    });
  });
});

describe("Uploads in a folder", () => {
  it("an upload past its hour is expired: it takes nothing more, and the sweep removes its parts", async () => {
    const root = mkdtempSync(join(testEnv().runDir, "uploads-expiry-"));
    const files = new FileStore(join(root, "files"), 1 << 20);
    const uploads = new Uploads(join(root, "uploads"), files);
    try {
      const u = uploads.create("", { bytes: 4, filename: "f", mime_type: "t", purpose: "batch" });
      const { Readable } = await import("node:stream");
      await uploads.addPart("", u.id, Readable.from([Buffer.from("ab")]));
      expect(readdirSync(join(root, "uploads")).filter((n) => n.endsWith(".part"))).toHaveLength(1);
      // Its hour passed (the clock moved on).
      const meta = join(root, "uploads", `${u.id}.json`);
      const stored = JSON.parse(readFileSync(meta, "utf8"));
      stored.upload.expires_at = Math.floor(Date.now() / 1000) - 1;
      writeFileSync(meta, JSON.stringify(stored));
      await expect(
        uploads.addPart("", u.id, Readable.from([Buffer.from("cd")])),
      ).rejects.toMatchObject({ code: "EM_GATEWAY_UPLOAD_STATE", message: /is expired/ });
      uploads.sweep();
      expect(readdirSync(join(root, "uploads"))).toEqual([`${u.id}.json`]);
      // An hour after that, forgotten.
      stored.upload.expires_at = Math.floor(Date.now() / 1000) - 3601;
      writeFileSync(meta, JSON.stringify(stored));
      uploads.sweep();
      expect(readdirSync(join(root, "uploads"))).toEqual([]);
    } finally {
      uploads.close();
      files.close();
    }
  });

  it("the folder's count takes in uploads/ and chat-completions/<key>/", async () => {
    const root = mkdtempSync(join(testEnv().runDir, "quota-walk-"));
    mkdirSync(join(root, "uploads"));
    mkdirSync(join(root, "chat-completions", "_"), { recursive: true });
    writeFileSync(join(root, "uploads", "u.p.part"), "x".repeat(300));
    writeFileSync(join(root, "chat-completions", "_", "c.json"), "y".repeat(200));
    const q = new FolderQuota(root, 10_000, 50);
    try {
      await q.ready;
      expect(q.used()).toBe(500);
    } finally {
      q.close();
    }
  });
});
