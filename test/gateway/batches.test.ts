// OpenAI's Files and Batch APIs (files.ts, batches.ts; ADR 0049) through the official `openai`
// client, against gateways started in this process on the tiny V3 checkpoint: a batch's
// lines are answered as the same requests sent one by one are, bad input is refused with
// the lines named, a cancel stops a batch, and a gateway started again on the same folder
// finishes the batches it finds, each line answered once.
import { spawn } from "node:child_process";
import {
  linkSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI, { toFile } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { gatewayCall, uploadInParts } from "../../src/cli/commands/batch.ts";
import { FileStore, FolderQuota } from "../../src/gateway/files.ts";
import { runCli } from "../support/cli.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { runGatewayToExit, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let dir: string;
let gw: TestGateway;
let files: string;

const filesOf = (d: string, batchConcurrency = 2) => ({
  dir: d,
  maxBytes: 1 << 20,
  batchConcurrency,
});

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  files = mkdtempSync(join(testEnv().runDir, "batch-files-"));
  gw = await startGateway(dir, { files: filesOf(files) });
});
afterAll(async () => {
  await gw?.close();
});

type Line = { custom_id: string; method: string; url: string; body: Record<string, unknown> };
const chatLine = (id: string, content: string, more: object = {}): Line => ({
  custom_id: id,
  method: "POST",
  url: "/v1/chat/completions",
  body: {
    model: "tiny",
    messages: [{ role: "user", content }],
    max_tokens: 6,
    temperature: 0,
    ...more,
  },
});
const jsonl = (lines: object[]) => `${lines.map((l) => JSON.stringify(l)).join("\n")}\n`;

async function upload(client: OpenAI, text: string, name = "in.jsonl") {
  return client.files.create({ file: await toFile(Buffer.from(text), name), purpose: "batch" });
}

/** The batch once it reaches a final status. */
async function settled(client: OpenAI, id: string, ms = 60_000) {
  return waitFor(
    `batch ${id} done`,
    async () => {
      const b = await client.batches.retrieve(id);
      return ["completed", "failed", "expired", "cancelled"].includes(b.status) ? b : undefined;
    },
    ms,
  );
}

/**
 * A batch of `lines` on a gateway on `folder` that runs one line at a time (~0.05 s each:
 * the batch runs for seconds), stopped once `atLeast` lines are answered and before the last:
 * its id.
 */
async function stoppedMidway(folder: string, lines: Line[], atLeast: number): Promise<string> {
  const g = await startGateway(dir, { files: filesOf(folder, 1) });
  let done = 0;
  let id: string;
  try {
    const input = await upload(g.client, jsonl(lines));
    id = (
      await g.client.batches.create({
        input_file_id: input.id,
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
      })
    ).id;
    await waitFor("some lines done", async () => {
      done = (await g.client.batches.retrieve(id)).request_counts!.completed;
      return done >= atLeast ? true : undefined;
    });
  } finally {
    await g.close();
  }
  expect(done).toBeLessThan(lines.length); // (it stopped with lines left to run)
  return id;
}

/** Lines of batches gateway `url` answered (completed) since it started, from its metrics. */
async function linesAnswered(url: string): Promise<number> {
  const m = await (await fetch(`${url}/metrics`)).text();
  return Number(
    /expertmesh_gateway_batch_lines_total\{outcome="completed"\} (\d+)/.exec(m)?.[1] ?? 0,
  );
}

async function linesOf(client: OpenAI, fileId: string | null | undefined) {
  if (!fileId) return [];
  const text = await (await client.files.content(fileId)).text();
  return text
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => JSON.parse(l) as Record<string, any>);
}

describe("/v1/files", () => {
  it("keeps an upload: listed, retrieved, its content the bytes sent, deleted", async () => {
    const text = jsonl([chatLine("a", "hi")]);
    const f = await upload(gw.client, text, "mine.jsonl");
    expect(f).toMatchObject({
      object: "file",
      bytes: Buffer.byteLength(text),
      filename: "mine.jsonl",
      purpose: "batch",
      status: "processed",
    });
    expect(f.id).toMatch(/^file-[0-9a-f]{24}$/);
    expect((await gw.client.files.retrieve(f.id)).bytes).toBe(f.bytes);
    expect(await (await gw.client.files.content(f.id)).text()).toBe(text);
    const listed = [];
    for await (const x of gw.client.files.list({ purpose: "batch" })) listed.push(x.id);
    expect(listed).toContain(f.id);
    expect(await gw.client.files.delete(f.id)).toMatchObject({ id: f.id, deleted: true });
    await expect(gw.client.files.retrieve(f.id)).rejects.toMatchObject({
      status: 404,
      code: "EM_GATEWAY_FILE_NOT_FOUND",
    });
  });

  it("refuses another purpose, a file past --files-max-bytes, and ids it never made", async () => {
    await expect(
      gw.client.files.create({
        file: await toFile(Buffer.from("{}\n"), "x.jsonl"),
        purpose: "fine-tune",
      }),
    ).rejects.toMatchObject({ status: 400, param: "purpose" });
    await expect(upload(gw.client, "x".repeat((1 << 20) + 1))).rejects.toMatchObject({
      status: 413,
      code: "EM_GATEWAY_FILE_TOO_LARGE",
    });
    await expect(gw.client.files.retrieve("file-../../etc/passwd")).rejects.toMatchObject({
      status: 404,
    });
    // Nothing of the refused uploads is left in the folder.
    const names = readdirSync(join(files, "files"));
    expect(names.filter((n) => n.endsWith(".tmp"))).toEqual([]);
  });
});

describe("/v1/files: expiry", () => {
  it("expires_after sets expires_at (an upload of purpose batch: 30 days unless it says); out of bounds is refused with nothing kept", async () => {
    const mine = await gw.client.files.create({
      file: await toFile(Buffer.from(jsonl([chatLine("a", "hi")])), "hour.jsonl"),
      purpose: "batch",
      expires_after: { anchor: "created_at", seconds: 3600 },
    });
    expect(mine.expires_at).toBe(mine.created_at + 3600);
    const plain = await upload(gw.client, jsonl([chatLine("a", "hi")]));
    expect(plain.expires_at).toBe(plain.created_at + 30 * 24 * 3600);
    const before = readdirSync(join(files, "files")).length;
    await expect(
      gw.client.files.create({
        file: await toFile(Buffer.from("{}\n"), "x.jsonl"),
        purpose: "batch",
        expires_after: { anchor: "created_at", seconds: 60 },
      }),
    ).rejects.toMatchObject({ status: 400, param: "expires_after" });
    expect(readdirSync(join(files, "files")).length).toBe(before);
  });

  it("a file past its expires_at is gone: not found, not listed, and swept from the folder", async () => {
    const f = await upload(gw.client, jsonl([chatLine("a", "hi")]));
    // Its time passed: the object on disk says it expired a second ago.
    const meta = join(files, "files", `${f.id}.json`);
    const stored = JSON.parse(readFileSync(meta, "utf8"));
    stored.file.expires_at = Math.floor(Date.now() / 1000) - 1;
    writeFileSync(meta, JSON.stringify(stored));
    // A store that reads the folder afresh (another gateway on it, or this one started again).
    const other = new FileStore(join(files, "files"), 1 << 20);
    try {
      expect(() => other.get("", f.id)).toThrow(
        expect.objectContaining({ code: "EM_GATEWAY_FILE_NOT_FOUND" }),
      );
      expect(other.list("").map((x) => x.id)).not.toContain(f.id);
      other.sweep();
      expect(readdirSync(join(files, "files")).filter((n) => n.startsWith(f.id))).toEqual([]);
    } finally {
      other.close();
    }
    // The gateway that knew it finds it gone from the folder.
    await expect(gw.client.files.retrieve(f.id)).rejects.toMatchObject({ status: 404 });
  });
});

describe("FolderQuota", () => {
  it("counts the folder at start and again as it changes (a hard link once), and what the process says it wrote", async () => {
    const root = mkdtempSync(join(testEnv().runDir, "quota-"));
    mkdirSync(join(root, "files"));
    mkdirSync(join(root, "batches"));
    writeFileSync(join(root, "files", "a"), "x".repeat(1000));
    const q = new FolderQuota(root, 3000, 50);
    try {
      await q.ready;
      expect(q.used()).toBe(1000);
      expect(q.full()).toBe(false);
      q.grew(500); // (written, not walked yet)
      expect(q.used()).toBe(1500);
      // Another process writes; a batch links a file (no more bytes on disk).
      writeFileSync(join(root, "batches", "b"), "y".repeat(2000));
      linkSync(join(root, "files", "a"), join(root, "batches", "a.input"));
      await waitFor("the walk", async () => (q.used() === 3000 ? true : undefined));
      expect(q.full()).toBe(true);
      expect(q.refusal("no upload fits")).toMatchObject({
        code: "EM_GATEWAY_FILES_FULL",
        status: 507,
      });
      rmSync(join(root, "batches", "b"));
      await waitFor("the walk", async () => (q.used() === 1000 ? true : undefined));
    } finally {
      q.close();
    }
  });
});

describe("/v1/files: malformed uploads", () => {
  const post = (body: string, contentType?: string) =>
    fetch(`${gw.url}/v1/files`, {
      method: "POST",
      body,
      ...(contentType ? { headers: { "content-type": contentType } } : {}),
    });
  const part = (name: string, value: string, filename?: string) =>
    `--XX\r\ncontent-disposition: form-data; name="${name}"${filename ? `; filename="${filename}"` : ""}\r\n\r\n${value}\r\n`;
  it.each<[string, () => Promise<Response>]>([
    ["JSON, not a form", () => post(JSON.stringify({ purpose: "batch" }), "application/json")],
    ["no boundary", () => post("x", "multipart/form-data")],
    [
      "cut short",
      () =>
        post(`${part("purpose", "batch")}--XX\r\ncontent-disp`, "multipart/form-data; boundary=XX"),
    ],
    [
      "no file",
      () => post(`${part("purpose", "batch")}--XX--\r\n`, "multipart/form-data; boundary=XX"),
    ],
    [
      "two files",
      () =>
        post(
          `${part("purpose", "batch")}${part("file", "{}", "a.jsonl")}${part("file", "{}", "b.jsonl")}--XX--\r\n`,
          "multipart/form-data; boundary=XX",
        ),
    ],
    [
      "a file in another field",
      () =>
        post(
          `${part("purpose", "batch")}${part("other", "{}", "a.jsonl")}--XX--\r\n`,
          "multipart/form-data; boundary=XX",
        ),
    ],
    [
      "no purpose",
      () => post(`${part("file", "{}", "a.jsonl")}--XX--\r\n`, "multipart/form-data; boundary=XX"),
    ],
  ])("%s: a 4xx with a stable code, nothing kept", async (_, send) => {
    const before = (await gw.client.files.list()).data.length;
    const r = await send();
    expect(r.status, await r.clone().text()).toBeGreaterThanOrEqual(400);
    expect(r.status).toBeLessThan(500);
    const body = (await r.json()) as { error: { code: string } };
    expect(body.error.code).toMatch(/^EM_[A-Z_]+$/);
    expect((await gw.client.files.list()).data.length).toBe(before);
  });
});

describe("/v1/batches", () => {
  it("answers each line as the same request sent alone; a line the route refuses goes to the error file", async () => {
    const lines = [
      chatLine("one", "What is 2+2?"),
      chatLine("two", "Name a color."),
      chatLine("three", "Say hello.", { n: 2 }),
      chatLine("bad-model", "hi", { model: "gpt-none" }),
    ];
    const input = await upload(gw.client, jsonl(lines));
    const created = await gw.client.batches.create({
      input_file_id: input.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
      metadata: { job: "nightly" },
    });
    expect(created).toMatchObject({
      object: "batch",
      status: "validating",
      input_file_id: input.id,
      metadata: { job: "nightly" },
    });
    const done = await settled(gw.client, created.id);
    expect(done.status).toBe("completed");
    expect(done.request_counts).toEqual({ total: 4, completed: 3, failed: 1 });
    expect(done.completed_at).toBeGreaterThanOrEqual(done.created_at);
    const out = await linesOf(gw.client, done.output_file_id);
    expect(out.map((l) => l.custom_id).sort()).toEqual(["one", "three", "two"]);
    for (const l of out) {
      const alone = await gw.client.chat.completions.create(
        lines.find((x) => x.custom_id === l.custom_id)!.body as any,
      );
      expect(l.id).toMatch(/^batch_req_/);
      expect(l.error).toBeNull();
      expect(l.response.status_code).toBe(200);
      expect(l.response.request_id).toMatch(/./);
      expect(l.response.body.choices.map((c: any) => c.message.content)).toEqual(
        alone.choices.map((c) => c.message.content),
      );
    }
    const errors = await linesOf(gw.client, done.error_file_id);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatchObject({
      custom_id: "bad-model",
      response: { status_code: 404, body: { error: { code: "EM_GATEWAY_UNKNOWN_MODEL" } } },
    });
    const outFile = await gw.client.files.retrieve(done.output_file_id!);
    expect(outFile.purpose).toBe("batch_output");
    const listed = await gw.client.batches.list({ limit: 100 });
    expect(listed.data.map((b) => b.id)).toContain(created.id);
    // Done: it cannot be cancelled.
    await expect(gw.client.batches.cancel(created.id)).rejects.toMatchObject({
      status: 409,
      code: "EM_GATEWAY_BATCH_STATE",
    });
  });

  it("keeps its input when the file goes (deleted, expired); sums the answers' usage; output_expires_after sets its files' expiry", async () => {
    const lines = [chatLine("u1", "What is 2+2?"), chatLine("u2", "Name a color.", { n: 2 })];
    const input = await upload(gw.client, jsonl(lines));
    const created = await gw.client.batches.create({
      input_file_id: input.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
      output_expires_after: { anchor: "created_at", seconds: 7200 },
    });
    // The input file deleted at once: the batch has its own link to it.
    await gw.client.files.delete(input.id);
    const done = await settled(gw.client, created.id);
    expect(done.status).toBe("completed");
    expect(done.request_counts).toEqual({ total: 2, completed: 2, failed: 0 });
    expect(done.model).toBe("tiny");
    const out = await linesOf(gw.client, done.output_file_id);
    const sum = (k: string) => out.reduce((a, l) => a + l.response.body.usage[k], 0);
    expect(done.usage).toEqual({
      input_tokens: sum("prompt_tokens"),
      input_tokens_details: {
        cached_tokens: out.reduce(
          (a, l) => a + l.response.body.usage.prompt_tokens_details.cached_tokens,
          0,
        ),
      },
      output_tokens: sum("completion_tokens"),
      output_tokens_details: { reasoning_tokens: 0 },
      total_tokens: sum("total_tokens"),
    });
    expect(done.usage!.output_tokens).toBeGreaterThan(0);
    const outFile = await gw.client.files.retrieve(done.output_file_id!);
    expect(outFile.expires_at).toBe(outFile.created_at + 7200);
    // Its own link goes once it is done.
    expect(readdirSync(join(files, "batches")).filter((n) => n.startsWith(created.id))).toEqual([
      `${created.id}.json`,
    ]);
    await expect(
      gw.client.batches.create({
        input_file_id: (await upload(gw.client, jsonl(lines))).id,
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
        output_expires_after: { anchor: "created_at", seconds: 1 },
      }),
    ).rejects.toMatchObject({ status: 400, param: "output_expires_after" });
  });

  it("runs completions lines too", async () => {
    const input = await upload(
      gw.client,
      jsonl([
        {
          custom_id: "c",
          method: "POST",
          url: "/v1/completions",
          body: { model: "tiny", prompt: "Once upon", max_tokens: 4, temperature: 0 },
        },
      ]),
    );
    const b = await gw.client.batches.create({
      input_file_id: input.id,
      endpoint: "/v1/completions",
      completion_window: "24h",
    });
    const done = await settled(gw.client, b.id);
    const alone = await gw.client.completions.create({
      model: "tiny",
      prompt: "Once upon",
      max_tokens: 4,
      temperature: 0,
    });
    const [line] = await linesOf(gw.client, done.output_file_id);
    expect(line!.response.body.choices[0].text).toBe(alone.choices[0]!.text);
  });

  it("fails a batch whose input has bad lines, naming each, and runs none of it", async () => {
    const text = [
      JSON.stringify(chatLine("ok", "hi")),
      "{not json",
      JSON.stringify(chatLine("ok", "again")),
      JSON.stringify({ ...chatLine("url", "hi"), url: "/v1/completions" }),
      JSON.stringify(chatLine("streamed", "hi", { stream: true })),
      JSON.stringify({ custom_id: "nobody", method: "POST", url: "/v1/chat/completions" }),
    ].join("\n");
    const input = await upload(gw.client, text);
    const b = await gw.client.batches.create({
      input_file_id: input.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
    });
    const done = await settled(gw.client, b.id);
    expect(done.status).toBe("failed");
    expect(done.failed_at).not.toBeNull();
    expect(done.output_file_id).toBeNull();
    expect(done.errors?.data?.map((e) => [e.line, e.code, e.param])).toEqual([
      [2, "invalid_json_line", null],
      [3, "duplicate_custom_id", "custom_id"],
      [4, "invalid_url", "url"],
      [5, "invalid_request", "body.stream"],
      [6, "missing_required_parameter", "body"],
    ]);
  });

  it("refuses a batch of an unknown file, another endpoint, another window", async () => {
    const input = await upload(gw.client, jsonl([chatLine("a", "hi")]));
    const create = (o: object) =>
      gw.client.batches.create({
        input_file_id: input.id,
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
        ...o,
      } as any);
    await expect(create({ input_file_id: "file-000000000000000000000000" })).rejects.toMatchObject({
      status: 404,
      code: "EM_GATEWAY_FILE_NOT_FOUND",
      param: "input_file_id",
    });
    await expect(create({ endpoint: "/v1/embeddings" })).rejects.toMatchObject({
      status: 400,
      param: "endpoint",
    });
    await expect(create({ completion_window: "1h" })).rejects.toMatchObject({
      status: 400,
      param: "completion_window",
    });
    for (const [o, param] of [
      [{ input_file_id: 7 }, "input_file_id"],
      [{ endpoint: undefined }, "endpoint"],
      [{ metadata: ["x"] }, "metadata"],
      [{ metadata: { k: 1 } }, "metadata"],
      [
        { metadata: Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, "v"])) },
        "metadata",
      ],
    ] as const)
      await expect(create(o)).rejects.toMatchObject({ status: 400, param });
    await expect(gw.client.batches.retrieve("batch_nope")).rejects.toMatchObject({
      status: 404,
      code: "EM_GATEWAY_BATCH_NOT_FOUND",
    });
  });

  it("cancel: no more lines start; the batch ends cancelled with the lines done so far", async () => {
    // (~0.05-0.1 s a line, two at a time: the batch runs for a second or more)
    const lines = Array.from({ length: 40 }, (_, i) =>
      chatLine(`l${i}`, `Count to ${i}.`, { max_tokens: 64, ignore_eos: true }),
    );
    const input = await upload(gw.client, jsonl(lines));
    const b = await gw.client.batches.create({
      input_file_id: input.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
    });
    await waitFor("a line done", async () => {
      const now = await gw.client.batches.retrieve(b.id);
      return now.request_counts!.completed > 0 ? true : undefined;
    });
    const cancelling = await gw.client.batches.cancel(b.id);
    expect(["cancelling", "cancelled"]).toContain(cancelling.status);
    const done = await settled(gw.client, b.id);
    expect(done.status).toBe("cancelled");
    expect(done.cancelled_at).not.toBeNull();
    const out = await linesOf(gw.client, done.output_file_id);
    expect(out.length).toBe(done.request_counts!.completed);
    expect(out.length).toBeGreaterThan(0);
    expect(out.length).toBeLessThan(40);
  });
});

describe("batches across a restart, keys, and a gateway without files", () => {
  it("a gateway started again on the same folder finishes the batch: every line answered once, a damaged answer's line again (its part, ended, runs again)", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "batch-restart-"));
    const lines = Array.from({ length: 64 }, (_, i) =>
      chatLine(`r${i}`, `Word ${i}.`, { max_tokens: 32, ignore_eos: true }),
    );
    // (past the first part of 16 lines: it ended, its lease says done)
    const id = await stoppedMidway(folder, lines, 17);
    // An answer damaged on disk (a bad sector, a hand edit): its line runs again.
    const answers = join(folder, "batches", `${id}.p0.output.jsonl`);
    const kept = readFileSync(answers, "utf8").split("\n");
    kept[0] = "{damaged";
    writeFileSync(answers, kept.join("\n"));
    const second = await startGateway(dir, { files: filesOf(folder, 4) });
    try {
      const done = await settled(second.client, id);
      expect(done.status).toBe("completed");
      expect(done.request_counts).toEqual({ total: 64, completed: 64, failed: 0 });
      const out = await linesOf(second.client, done.output_file_id);
      expect(out.map((l) => l.custom_id).sort()).toEqual(lines.map((l) => l.custom_id).sort());
      expect(second.logs.join("\n")).toContain("batches: 1 unfinished");
      expect(second.logs.join("\n")).toContain("part 0 ended without every answer: it runs again");
    } finally {
      await second.close();
    }
  });

  it("gateways on one folder run one batch's lines together; each answers for every batch, a cancel reaches them all, and one goes on with the batch of a gateway killed outright", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "batch-shared-"));
    // A: a gateway process (as a pod runs it), one line at a time; B, later, on the folder.
    const a = await startGatewayProcess({
      modelDir: dir,
      namespace: "batch",
      modelName: "shared",
      name: "gateway-batch-shared",
      args: [`--files-dir=${folder}`, "--batch-concurrency=1"],
    });
    let b: TestGateway | undefined;
    try {
      // (~0.1 s a line: A alone would run the batch for ~20 s; parts of 16 lines)
      const lines = Array.from({ length: 200 }, (_, i) =>
        chatLine(`s${i}`, `Line ${i}.`, { max_tokens: 64, ignore_eos: true }),
      );
      const input = await upload(a.client, jsonl(lines));
      const make = () =>
        a.client.batches.create({
          input_file_id: input.id,
          endpoint: "/v1/chat/completions",
          completion_window: "24h",
        });
      const first = await make();
      await waitFor("A runs lines", async () => {
        const now = await a.client.batches.retrieve(first.id);
        return now.request_counts!.completed > 0 ? true : undefined;
      });
      const bg = await startGateway(dir, { files: filesOf(folder, 2) });
      b = bg;
      // B takes parts of A's batch nobody runs (at its first look, as it starts).
      await waitFor("B runs lines of A's batch", async () =>
        (await linesAnswered(bg.url)) > 0 ? true : undefined,
      );
      await waitFor("B's metrics show the part it runs", async () => {
        const m = await (await fetch(`${bg.url}/metrics`)).text();
        return /^expertmesh_gateway_batch_parts_running [1-9]/m.test(m) ? true : undefined;
      });
      const second = await make();
      expect((await bg.client.batches.list()).data.map((x) => x.id)).toEqual([second.id, first.id]);
      // A cancel through B: A (holding it) and both gateways' lines stop.
      expect((await bg.client.batches.cancel(second.id)).status).toBe("cancelling");
      const cancelled = await settled(bg.client, second.id);
      expect(cancelled.status).toBe("cancelled");
      expect(cancelled.request_counts!.completed).toBeLessThan(200);
      // A dies mid-batch (no stop, no lease given back): B goes on with the batch and A's part.
      const before = (await bg.client.batches.retrieve(first.id)).request_counts!.completed;
      expect(before).toBeLessThan(200);
      process.kill(a.process.pid!, "SIGKILL");
      await waitFor("A gone", async () => (a.process.exited ? true : undefined));
      const done = await settled(bg.client, first.id, 90_000);
      expect(done.status).toBe("completed");
      expect(done.request_counts).toEqual({ total: 200, completed: 200, failed: 0 });
      const out = await linesOf(bg.client, done.output_file_id);
      expect(out.map((l) => l.custom_id).sort()).toEqual(lines.map((l) => l.custom_id).sort());
      expect(bg.logs.join("\n")).toContain("batches: 1 unfinished");
      // A's answers written before it died were kept, not run again by B.
      expect(await linesAnswered(bg.url)).toBeLessThan(200);
      expect(readdirSync(join(folder, "batches")).filter((n) => n.startsWith(first.id))).toEqual([
        `${first.id}.json`,
      ]);
    } finally {
      await b?.close();
      await a.process.stop();
    }
  });

  it("a batch made before batches had parts (one answers file) is taken up: its answers kept, the rest run", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "batch-unsplit-"));
    const lines = Array.from({ length: 64 }, (_, i) =>
      chatLine(`u${i}`, `Word ${i}.`, { max_tokens: 32, ignore_eos: true }),
    );
    const id = await stoppedMidway(folder, lines, 2);
    // The folder as the gateways before parts left it: answers in <id>.output.jsonl.
    const batches = join(folder, "batches");
    const parts = readdirSync(batches).filter((n) => n.startsWith(`${id}.p`));
    const answers = parts
      .filter((n) => n.endsWith(".output.jsonl"))
      .map((n) => readFileSync(join(batches, n), "utf8"))
      .join("");
    for (const n of parts) rmSync(join(batches, n));
    writeFileSync(join(batches, `${id}.output.jsonl`), answers);
    const saved = JSON.parse(readFileSync(join(batches, `${id}.json`), "utf8"));
    delete saved.partLines;
    writeFileSync(join(batches, `${id}.json`), JSON.stringify(saved));
    const kept = answers
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { id: string; custom_id: string });
    expect(kept.length).toBeGreaterThanOrEqual(2);
    const second = await startGateway(dir, { files: filesOf(folder, 4) });
    try {
      const done = await settled(second.client, id);
      expect(done.request_counts).toEqual({ total: 64, completed: 64, failed: 0 });
      const out = await linesOf(second.client, done.output_file_id);
      expect(out.map((l) => l.custom_id).sort()).toEqual(lines.map((l) => l.custom_id).sort());
      // (the same answers, not the lines run again: their request ids)
      const byId = new Map(out.map((l) => [l.custom_id, l.id]));
      for (const k of kept) expect(byId.get(k.custom_id)).toBe(k.id);
    } finally {
      await second.close();
    }
  });

  it("lines answered 429 (the queue full) run again later: none fails", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "batch-later-"));
    // One runs, one waits: of 6 lines at once, the others are refused at first.
    const g = await startGateway(dir, {
      files: filesOf(folder, 6),
      maxRunning: 1,
      maxQueueDepth: 1,
    });
    try {
      const lines = Array.from({ length: 6 }, (_, i) => chatLine(`q${i}`, `Item ${i}.`));
      const input = await upload(g.client, jsonl(lines));
      const b = await g.client.batches.create({
        input_file_id: input.id,
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
      });
      const done = await settled(g.client, b.id);
      expect(done.request_counts).toEqual({ total: 6, completed: 6, failed: 0 });
      expect(done.error_file_id).toBeNull();
      // Some were refused on the way (the queue's metric counts them), and run again.
      const metrics = await (await fetch(`${g.url}/metrics`)).text();
      const rejected = /expertmesh_gateway_requests_rejected_total\{[^}]*\} (\d+)/.exec(metrics);
      expect(Number(rejected?.[1] ?? 0)).toBeGreaterThan(0);
      const answered = (outcome: string) =>
        Number(
          new RegExp(
            `^expertmesh_gateway_batch_lines_total\\{outcome="${outcome}"\\} (\\d+)$`,
            "m",
          ).exec(metrics)?.[1],
        );
      expect(answered("completed")).toBe(6);
      expect(answered("failed")).toBe(0);
      expect(answered("retried")).toBe(Number(rejected?.[1]));
      expect(metrics).toMatch(/^expertmesh_gateway_batch_lines_running 0$/m);
    } finally {
      await g.close();
    }
  });

  it("--files-max-total: an upload past it and a batch while the folder is full get 507 with nothing kept; running lines wait for room, then finish", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "batch-full-"));
    const max = 200_000;
    const g = await startGateway(dir, {
      files: { dir: folder, maxBytes: 1 << 20, maxTotalBytes: max, batchConcurrency: 1 },
    });
    // The official client retries a 5xx (twice by default), but not one that says
    // x-should-retry: false, as a full folder does: each refused request is sent once.
    let sent = 0;
    const client = new OpenAI({
      apiKey: "x",
      baseURL: `${g.url}/v1`,
      fetch: (url, init) => {
        sent++;
        return fetch(url, init);
      },
    });
    const used = () => {
      let sum = 0;
      for (const sub of ["files", "batches"])
        for (const n of readdirSync(join(folder, sub))) sum += statSync(join(folder, sub, n)).size;
      return sum;
    };
    const fill = (bytes: number) => upload(client, "x".repeat(bytes), "filler.jsonl");
    try {
      const big = await fill(150_000);
      const before = used();
      sent = 0;
      const refused = await fill(60_000).catch((err: unknown) => err);
      expect(refused).toMatchObject({ status: 507, code: "EM_GATEWAY_FILES_FULL" });
      expect((refused as { headers: Headers }).headers.get("x-should-retry")).toBe("false");
      expect(sent).toBe(1);
      expect(used()).toBe(before); // (the refused upload left nothing)
      // A batch of 200 lines, its answers about 700 bytes each: room for a few of them.
      const lines = Array.from({ length: 200 }, (_, i) =>
        chatLine(`l${i}`, "Say hello.", { max_tokens: 2 }),
      );
      const input = await upload(client, jsonl(lines));
      await client.files.delete(big.id);
      const room = await fill(max - used() - 3000);
      const b = await client.batches.create({
        input_file_id: input.id,
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
      });
      // Full: no more lines start, the batch waits in progress.
      const stuck = await waitFor("the lines stopped", async () => {
        const a = await client.batches.retrieve(b.id);
        await new Promise((r) => setTimeout(r, 2500));
        const c = await client.batches.retrieve(b.id);
        return c.request_counts!.completed === a.request_counts!.completed &&
          c.request_counts!.completed > 0
          ? c
          : undefined;
      });
      expect(stuck.status).toBe("in_progress");
      expect(stuck.request_counts!.completed).toBeLessThan(200);
      expect(g.logs.join("\n")).toContain("the files folder is full");
      sent = 0;
      await expect(
        client.batches.create({
          input_file_id: input.id,
          endpoint: "/v1/chat/completions",
          completion_window: "24h",
        }),
      ).rejects.toMatchObject({ status: 507, code: "EM_GATEWAY_FILES_FULL" });
      expect(sent).toBe(1);
      const metrics = await (await fetch(`${g.url}/metrics`)).text();
      expect(metrics).toMatch(/expertmesh_gateway_files_bytes \d+/);
      expect(metrics).toContain(`expertmesh_gateway_files_max_bytes ${max}`);
      // Room made: the lines go on, each answered once.
      await client.files.delete(room.id);
      const done = await settled(client, b.id);
      expect(done.status).toBe("completed");
      expect(done.request_counts).toEqual({ total: 200, completed: 200, failed: 0 });
    } finally {
      await g.close();
    }
  });

  it("with API keys, each key sees its own files and batches only", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "batch-keys-"));
    const g = await startGateway(dir, { files: filesOf(folder), apiKeys: ["sk-a", "sk-b"] });
    const b = new OpenAI({ baseURL: `${g.url}/v1`, apiKey: "sk-b", maxRetries: 0 });
    try {
      const f = await upload(g.client, jsonl([chatLine("k", "hi")]));
      const batch = await g.client.batches.create({
        input_file_id: f.id,
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
      });
      await expect(b.files.retrieve(f.id)).rejects.toMatchObject({ status: 404 });
      await expect(b.batches.retrieve(batch.id)).rejects.toMatchObject({ status: 404 });
      expect((await b.files.list()).data).toEqual([]);
      // The lines run without a key of their own.
      const done = await settled(g.client, batch.id);
      expect(done.request_counts).toEqual({ total: 1, completed: 1, failed: 0 });
      // Without a key: 401, as every route.
      const none = new OpenAI({ baseURL: `${g.url}/v1`, apiKey: "sk-wrong", maxRetries: 0 });
      await expect(none.batches.list()).rejects.toMatchObject({ status: 401 });
    } finally {
      await g.close();
    }
  });

  it("a gateway process whose --files-dir cannot be written stops at start with EM_FILES_DIR", async () => {
    const blocker = join(mkdtempSync(join(testEnv().runDir, "batch-dir-")), "a-file");
    writeFileSync(blocker, "not a folder");
    const r = await runGatewayToExit(dir, [`--files-dir=${blocker}/sub`]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(
      /\[EM_FILES_DIR\] --files-dir .*a-file\/sub cannot be made or written/,
    );
    expect(r.stderr).not.toMatch(/serving/);
  });

  it("a gateway without --files-dir refuses the routes with EM_GATEWAY_FILES_OFF", async () => {
    const g = await startGateway(dir);
    try {
      await expect(g.client.batches.list()).rejects.toMatchObject({
        status: 404,
        code: "EM_GATEWAY_FILES_OFF",
      });
      await expect(upload(g.client, "{}\n")).rejects.toMatchObject({
        status: 404,
        code: "EM_GATEWAY_FILES_OFF",
      });
    } finally {
      await g.close();
    }
  });
});

describe("expertmesh batch", () => {
  const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
  const batch = (args: string[]) =>
    runCli(process.execPath, [mainTs, "batch", `--url=${gw.url}/v1`, "--poll=0.1", ...args]);

  it("runs a file as a batch and writes the answers: the succeeded lines in -o, the others in --errors (exit 2)", async () => {
    const d = mkdtempSync(join(testEnv().runDir, "batch-cli-"));
    const input = join(d, "requests.jsonl");
    writeFileSync(
      input,
      jsonl([chatLine("x", "Hi"), chatLine("y", "Bye"), chatLine("z", "hi", { model: "other" })]),
    );
    const r = await batch(["-i", input, "-o", join(d, "answers.jsonl")]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^batch batch_[0-9a-f]{24}: requests\.jsonl uploaded as file-/m);
    expect(r.stderr.match(/completed, 3 of 3 lines \(100 %\), 1 failed/g)).toHaveLength(1);
    const answers = readFileSync(join(d, "answers.jsonl"), "utf8").trim().split("\n");
    expect(answers.map((l) => JSON.parse(l).custom_id).sort()).toEqual(["x", "y"]);
    // The tokens of the answers, as the batch's usage sums them.
    const sum = (k: string) =>
      answers.reduce((a, l) => a + JSON.parse(l).response.body.usage[k], 0);
    expect(r.stderr).toContain(
      `2 answer(s) in ${join(d, "answers.jsonl")} (${sum("prompt_tokens")} prompt tokens`,
    );
    expect(r.stderr).toContain(`, ${sum("completion_tokens")} generated)`);
    // Its files (input, output, errors) are removed from the gateway once written here.
    expect(r.stderr).toContain("3 file(s) removed from the gateway");
    const id = /batch (batch_[0-9a-f]+):/.exec(r.stderr)![1]!;
    const b = await gw.client.batches.retrieve(id);
    for (const f of [b.input_file_id, b.output_file_id!, b.error_file_id!])
      await expect(gw.client.files.retrieve(f)).rejects.toMatchObject({ status: 404 });
    const errors = readFileSync(join(d, "answers.errors.jsonl"), "utf8").trim().split("\n");
    expect(JSON.parse(errors[0]!)).toMatchObject({
      custom_id: "z",
      response: { status_code: 404 },
    });
  });

  it("exits 1 naming the bad lines of a file the gateway refuses, and with EM_BATCH_REMOTE for a gateway without files", async () => {
    const d = mkdtempSync(join(testEnv().runDir, "batch-cli-"));
    const input = join(d, "bad.jsonl");
    writeFileSync(input, `${JSON.stringify(chatLine("a", "hi"))}\n{oops\n`);
    const r = await batch(["-i", input, "-o", join(d, "out.jsonl")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("line 2: invalid_json_line: line 2 is not JSON");
    expect(r.stderr).toContain("failed: nothing ran");
    const bare = await startGateway(dir);
    try {
      const off = await runCli(process.execPath, [
        mainTs,
        "batch",
        `--url=${bare.url}`,
        "-i",
        input,
        "-o",
        join(d, "out.jsonl"),
      ]);
      expect(off.code).toBe(1);
      expect(off.stderr).toContain("[EM_BATCH_REMOTE] POST /v1/files answered HTTP 404");
    } finally {
      await bare.close();
    }
  });

  it("a file larger than --part-bytes goes in parts (/v1/uploads): the same answers", async () => {
    const d = mkdtempSync(join(testEnv().runDir, "batch-cli-"));
    const input = join(d, "requests.jsonl");
    const lines = [chatLine("p", "Hi"), chatLine("q", "Bye"), chatLine("r", "Why")];
    writeFileSync(input, jsonl(lines));
    const r = await batch(["-i", input, "-o", join(d, "answers.jsonl"), "--part-bytes=100"]);
    expect(r.code, r.stderr).toBe(0);
    const parts = Math.ceil(Buffer.byteLength(jsonl(lines)) / 100);
    expect(r.stderr).toMatch(
      new RegExp(`requests\\.jsonl: ${parts} parts uploaded \\(upload_[0-9a-f]{24}\\)`),
    );
    const answers = readFileSync(join(d, "answers.jsonl"), "utf8").trim().split("\n");
    expect(answers.map((l) => JSON.parse(l).custom_id).sort()).toEqual(["p", "q", "r"]);
    const bad = await batch(["-i", input, "-o", join(d, "x.jsonl"), "--part-bytes=0"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain("--part-bytes must be a whole number from 1 to 67108864");
  });

  it("uploadInParts sends a part again after a failure, in order; a part refused (4xx) cancels the upload", async () => {
    const real = gatewayCall(gw.url, {});
    let failures = 0;
    const flaky: typeof real = async (method, path, body) => {
      if (path.endsWith("/parts") && failures++ === 1) throw new Error("connection reset");
      return real(method, path, body);
    };
    const text = Buffer.from("0123456789".repeat(5));
    const file = await uploadInParts(flaky, text, "flaky.jsonl", 16);
    expect(failures).toBe(5); // (4 parts, the second sent twice)
    const content = Buffer.from(await (await gw.client.files.content(file.id)).arrayBuffer());
    expect(content.equals(text)).toBe(true);
    // A refusal is not tried again: the upload is cancelled, its id in the error.
    let cancelled = "";
    const refusing: typeof real = async (method, path, body) => {
      if (path.endsWith("/parts")) {
        throw Object.assign(new Error("HTTP 400"), { status: 400 });
      }
      if (path.endsWith("/cancel")) cancelled = path;
      return real(method, path, body);
    };
    await expect(uploadInParts(refusing, text, "x.jsonl", 16)).rejects.toThrow("HTTP 400");
    expect(cancelled).toMatch(/^\/v1\/uploads\/upload_[0-9a-f]{24}\/cancel$/);
  });

  it("Ctrl-C cancels the batch and still writes the answers it has (exit 1)", async () => {
    const d = mkdtempSync(join(testEnv().runDir, "batch-cli-"));
    const input = join(d, "long.jsonl");
    writeFileSync(
      input,
      jsonl(
        Array.from({ length: 60 }, (_, i) =>
          chatLine(`c${i}`, `Line ${i}.`, { max_tokens: 64, ignore_eos: true }),
        ),
      ),
    );
    const child = spawn(process.execPath, [
      mainTs,
      "batch",
      `--url=${gw.url}`,
      "--poll=0.1",
      "--keep-files",
      "-i",
      input,
      "-o",
      join(d, "out.jsonl"),
    ]);
    let err = "";
    child.stderr.on("data", (b: Buffer) => {
      err += b.toString();
    });
    const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
    await waitFor("the upload", async () => (err.includes("uploaded as") ? true : undefined));
    const id = /batch (batch_[0-9a-f]+):/.exec(err)![1]!;
    await waitFor("a line done", async () =>
      (await gw.client.batches.retrieve(id)).request_counts!.completed > 0 ? true : undefined,
    );
    child.kill("SIGINT");
    expect(await exited).toBe(1);
    expect(err).toContain("cancelling batch_");
    expect(err).toMatch(/cancelled: \d+ line\(s\) not run/);
    const kept = readFileSync(join(d, "out.jsonl"), "utf8").trim().split("\n").filter(Boolean);
    expect(kept.length).toBeGreaterThan(0);
    expect(kept.length).toBeLessThan(60);
    // --keep-files: the batch's files stay on the gateway.
    const b = await gw.client.batches.retrieve(id);
    expect((await gw.client.files.retrieve(b.output_file_id!)).id).toBe(b.output_file_id);
    expect((await gw.client.files.retrieve(b.input_file_id)).id).toBe(b.input_file_id);
    expect(err).not.toContain("removed from the gateway");
  });
});

describe("Anthropic's Message Batches (/v1/messages/batches)", () => {
  const anthropic = () => new Anthropic({ apiKey: "none", baseURL: gw.url, maxRetries: 0 });
  /** Anthropic's compaction request (beta; not in the SDK's non-beta types). */
  const COMPACTION = { compaction: { type: "summarize" } };
  const params = (content: string, more: object = {}) => ({
    model: "tiny",
    max_tokens: 6,
    temperature: 0,
    messages: [{ role: "user" as const, content }],
    ...more,
  });

  async function ended(c: Anthropic, id: string) {
    return waitFor(`message batch ${id} ended`, async () => {
      const b = await c.messages.batches.retrieve(id);
      return b.processing_status === "ended" ? b : undefined;
    });
  }

  it("runs the requests through the SDK: each result the message the same request gets alone, errors as Anthropic's", async () => {
    const c = anthropic();
    const created = await c.messages.batches.create({
      requests: [
        { custom_id: "one", params: params("Say hi.") },
        { custom_id: "two", params: params("Say bye.") },
        { custom_id: "bad", params: params("x", { model: "claude-none" }) },
        // A compaction request (context-edits.ts): its block alone, as sent alone.
        { custom_id: "compacted", params: params("Say hi.", COMPACTION) },
      ],
    });
    expect(created).toMatchObject({ type: "message_batch", processing_status: "in_progress" });
    expect(created.id).toMatch(/^msgbatch_[0-9a-f]{24}$/);
    const done = await ended(c, created.id);
    expect(done.request_counts).toEqual({
      processing: 0,
      succeeded: 3,
      errored: 1,
      canceled: 0,
      expired: 0,
    });
    expect(done.ended_at).not.toBeNull();
    expect(done.results_url).toBe(`${gw.url}/v1/messages/batches/${created.id}/results`);
    const results = new Map<string, Anthropic.Messages.MessageBatchResult>();
    for await (const r of await c.messages.batches.results(created.id))
      results.set(r.custom_id, r.result);
    for (const [id, content] of [
      ["one", "Say hi."],
      ["two", "Say bye."],
    ] as const) {
      const alone = await c.messages.create(params(content));
      const r = results.get(id)!;
      expect(r.type).toBe("succeeded");
      expect(r.type === "succeeded" && r.message.content).toEqual(alone.content);
    }
    const compacted = results.get("compacted")!;
    const alone = await c.messages.create(params("Say hi.", COMPACTION));
    expect(compacted.type === "succeeded" && compacted.message).toMatchObject({
      stop_reason: "compaction",
      content: alone.content,
    });
    expect(alone.content.map((b) => b.type)).toEqual(["compaction"]);
    expect(results.get("bad")).toMatchObject({
      type: "errored",
      error: { type: "error", error: { type: "not_found_error" } },
    });
    // Listed, and once ended, deleted (with its files).
    const listed = [];
    for await (const b of c.messages.batches.list()) listed.push(b.id);
    expect(listed).toContain(created.id);
    expect(await c.messages.batches.delete(created.id)).toEqual({
      id: created.id,
      type: "message_batch_deleted",
    });
    await expect(c.messages.batches.retrieve(created.id)).rejects.toMatchObject({ status: 404 });
  });

  it("cancel: the requests not run are canceled in the results; a running batch cannot be deleted", async () => {
    const c = anthropic();
    const created = await c.messages.batches.create({
      requests: Array.from({ length: 40 }, (_, i) => ({
        custom_id: `m${i}`,
        params: params(`Line ${i}.`, { max_tokens: 32 }),
      })),
    });
    await expect(c.messages.batches.delete(created.id)).rejects.toMatchObject({ status: 409 });
    const canceling = await c.messages.batches.cancel(created.id);
    expect(["canceling", "ended"]).toContain(canceling.processing_status);
    expect(canceling.cancel_initiated_at).not.toBeNull();
    const done = await ended(c, created.id);
    const counts = done.request_counts;
    expect(counts.canceled).toBeGreaterThan(0);
    expect(counts.succeeded + counts.errored + counts.canceled).toBe(40);
    let canceled = 0;
    for await (const r of await c.messages.batches.results(created.id))
      if (r.result.type === "canceled") canceled++;
    expect(canceled).toBe(counts.canceled);
  });

  it("lists newest first in pages (limit, after_id, before_id), as the SDK pages", async () => {
    const folder = mkdtempSync(join(testEnv().runDir, "msgbatch-list-"));
    const g = await startGateway(dir, { files: filesOf(folder) });
    const c = new Anthropic({ apiKey: "none", baseURL: g.url, maxRetries: 0 });
    try {
      const ids: string[] = [];
      for (let i = 0; i < 3; i++)
        ids.unshift(
          (
            await c.messages.batches.create({
              requests: [{ custom_id: `p${i}`, params: params("x") }],
            })
          ).id,
        );
      const page = await c.messages.batches.list({ limit: 2 });
      expect(page.data.map((b) => b.id)).toEqual(ids.slice(0, 2));
      expect(page.has_more).toBe(true);
      const next = await c.messages.batches.list({ limit: 2, after_id: ids[1]! });
      expect([next.data.map((b) => b.id), next.has_more]).toEqual([[ids[2]], false]);
      const back = await c.messages.batches.list({ limit: 1, before_id: ids[2]! });
      expect([back.data.map((b) => b.id), back.has_more]).toEqual([[ids[1]], true]);
      const all: string[] = [];
      for await (const b of c.messages.batches.list({ limit: 1 })) all.push(b.id);
      expect(all).toEqual(ids);
    } finally {
      await g.close();
    }
  });

  it("refuses bad requests with Anthropic's errors, naming the request", async () => {
    const c = anthropic();
    for (const [requests, param] of [
      [[], "requests"],
      [[{ custom_id: "has space", params: params("x") }], "requests.0.custom_id"],
      [
        [
          { custom_id: "a", params: params("x") },
          { custom_id: "a", params: params("y") },
        ],
        "requests.1.custom_id",
      ],
      [[{ custom_id: "a", params: params("x", { stream: true }) }], "requests.0.params.stream"],
    ] as const)
      await expect(
        c.messages.batches.create({ requests } as unknown as Anthropic.Messages.BatchCreateParams),
      ).rejects.toMatchObject({ status: 400, error: { type: "error", error: { param } } });
    await expect(c.messages.batches.retrieve("msgbatch_nope")).rejects.toMatchObject({
      status: 404,
      error: { error: { type: "not_found_error", code: "EM_GATEWAY_BATCH_NOT_FOUND" } },
    });
    await expect(c.messages.batches.results("msgbatch_nope")).rejects.toMatchObject({
      status: 404,
    });
  });
});
