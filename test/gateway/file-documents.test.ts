// Files as documents of a prompt (documents.ts). Anthropic's Files API (beta
// files-api-2025-04-14) on the gateway's /v1/files routes, told
// from OpenAI's by the anthropic-version header, through the official SDK
// (`client.beta.files`): upload, list (newest first, in pages), metadata, download, delete;
// and Messages documents that name an uploaded text file (`{"type": "file", "file_id"}`),
// which read as the same document sent as a text source, titled by the file's name. A file
// that is not text, one not there, and a gateway without a files folder are refused by name.
// OpenAI's side: a file uploaded with purpose user_data, or sent inline (file_data), as a
// Responses `input_file` part, which reads as the same document sent as input_text.
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import Anthropic, { toFile } from "@anthropic-ai/sdk";
import { toFile as openaiFile } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { documentText } from "../../src/gateway/documents.ts";
import { testEnv } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let gw: TestGateway;
/** No files folder. */
let bare: TestGateway;
let client: Anthropic;

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  const folder = mkdtempSync(join(testEnv().runDir, "anthropic-files-"));
  gw = await startGateway(dir, { files: { dir: folder, maxBytes: 1 << 20, batchConcurrency: 1 } });
  bare = await startGateway(dir);
  client = new Anthropic({ apiKey: "unused", baseURL: gw.url, maxRetries: 0 });
});
afterAll(async () => {
  await gw?.close();
  await bare?.close();
});

const NOTES = "The meeting moved to Thursday.\nBring the quarterly figures.\n";

const upload = async (c: Anthropic, text: string | Buffer, name: string, type: string) =>
  c.beta.files.upload({ file: await toFile(Buffer.from(text), name, { type }) });

/** A greedy question about document `doc`. */
const ask = (doc: object) => ({
  model: "tiny",
  max_tokens: 6,
  temperature: 0,
  messages: [
    {
      role: "user" as const,
      content: [doc, { type: "text", text: "When is the meeting?" }],
    },
  ],
});

describe("Anthropic's Files API", () => {
  it("uploads, lists newest first in pages, gives metadata and content, deletes", async () => {
    const first = await upload(client, NOTES, "notes.txt", "text/plain");
    expect(first).toMatchObject({
      type: "file",
      filename: "notes.txt",
      mime_type: "text/plain",
      size_bytes: Buffer.byteLength(NOTES),
      downloadable: true,
    });
    expect(new Date(first.created_at).getTime()).toBeGreaterThan(Date.now() - 60_000);
    const second = await upload(client, "{}", "data.json", "application/json");
    expect(await client.beta.files.retrieveMetadata(first.id)).toEqual(first);

    const all = await client.beta.files.list();
    expect(all.data.map((f) => f.id).slice(0, 2)).toEqual([second.id, first.id]);
    // In pages: the SDK follows next_page.
    const page = await client.beta.files.list({ limit: 1 });
    expect([page.data.map((f) => f.id), page.hasNextPage()]).toEqual([[second.id], true]);
    const next = await page.getNextPage();
    expect(next.data.map((f) => f.id)).toEqual([first.id]);
    const ids: string[] = [];
    for await (const f of client.beta.files.list({ limit: 1 })) ids.push(f.id);
    expect(ids.slice(0, 2)).toEqual([second.id, first.id]);
    // Only some, by id (ids[]); the older cursors (after_id, before_id) too.
    const some = await client.beta.files.list({ ids: [first.id] });
    expect([some.data.map((f) => f.id), some.hasNextPage()]).toEqual([[first.id], false]);
    const list = async (query: string) =>
      (
        (await (
          await fetch(`${gw.url}/v1/files?${query}`, {
            headers: { "anthropic-version": "2023-06-01" },
          })
        ).json()) as { data: { id: string }[]; has_more: boolean }
      ).data.map((f) => f.id);
    expect(await list(`limit=1&after_id=${second.id}`)).toEqual([first.id]);
    expect(await list(`limit=1&before_id=${first.id}`)).toEqual([second.id]);

    const content = await client.beta.files.download(first.id);
    expect(await content.text()).toBe(NOTES);

    expect(await client.beta.files.delete(second.id)).toEqual({
      id: second.id,
      type: "file_deleted",
    });
    const gone = await client.beta.files.retrieveMetadata(second.id).catch((e: unknown) => e);
    expect(gone).toBeInstanceOf(Anthropic.NotFoundError);
    // in Anthropic's error shape, as every refusal to its SDK (it sends anthropic-version)
    expect((gone as InstanceType<typeof Anthropic.NotFoundError>).error).toMatchObject({
      type: "error",
      error: { type: "not_found_error", code: "EM_GATEWAY_FILE_NOT_FOUND" },
    });
    const noRoute = await client.get("/v1/no-such-route").catch((e: unknown) => e);
    expect((noRoute as InstanceType<typeof Anthropic.NotFoundError>).error).toMatchObject({
      type: "error",
      error: { type: "not_found_error" },
    });
  });

  it("a document naming a text file reads as the same text sent inline, titled by its name; counted the same", async () => {
    const file = await upload(client, NOTES, "notes.txt", "text/plain");
    const byFile = ask({ type: "document", source: { type: "file", file_id: file.id } });
    const inline = ask({
      type: "document",
      title: "notes.txt",
      source: { type: "text", media_type: "text/plain", data: NOTES },
    });
    const betas = ["files-api-2025-04-14"];
    const got = await client.beta.messages.create({ ...byFile, betas } as never);
    const want = await client.messages.create(inline as never);
    expect((got as unknown as Anthropic.Message).content).toEqual(want.content);
    // (the prompt's tokens: those from the prefix cache too, the second being cached)
    const prompt = (u: Anthropic.Usage) => u.input_tokens + (u.cache_read_input_tokens ?? 0);
    expect(prompt((got as unknown as Anthropic.Message).usage)).toBe(prompt(want.usage));
    const counted = await client.beta.messages.countTokens({ ...byFile, betas } as never);
    expect(counted.input_tokens).toBe(
      (await client.messages.countTokens(inline as never)).input_tokens,
    );
    // Its own title kept; in a tool result too.
    const titled = ask({
      type: "document",
      title: "Memo",
      source: { type: "file", file_id: file.id },
    });
    const titledInline = ask({
      type: "document",
      title: "Memo",
      source: { type: "text", media_type: "text/plain", data: NOTES },
    });
    expect((await client.messages.countTokens(titled as never)).input_tokens).toBe(
      (await client.messages.countTokens(titledInline as never)).input_tokens,
    );
  });

  it("refusals: a file that is not text, a file not there, a gateway that keeps no files", async () => {
    const pdf = await upload(client, "%PDF-1.7\n", "report.pdf", "application/pdf");
    const cases: [Anthropic, string, number, string][] = [
      [client, pdf.id, 400, "messages.0.content.0.source.file_id"],
      [client, "file-000000000000000000000000", 404, "messages.0.content.0.source.file_id"],
      [
        new Anthropic({ apiKey: "unused", baseURL: bare.url, maxRetries: 0 }),
        pdf.id,
        400,
        "messages.0.content.0.source",
      ],
    ];
    for (const [c, id, status, param] of cases) {
      const body = ask({ type: "document", source: { type: "file", file_id: id } });
      const err = (await c.messages.create(body as never).catch((e: unknown) => e)) as InstanceType<
        typeof Anthropic.APIError
      >;
      expect(err, id).toBeInstanceOf(Anthropic.APIError);
      expect([err.status, (err.error as { error: { param?: string } }).error.param], id).toEqual([
        status,
        param,
      ]);
    }
    const refused = (await client.messages
      .create(ask({ type: "document", source: { type: "file", file_id: pdf.id } }) as never)
      .catch((e: unknown) => e)) as InstanceType<typeof Anthropic.APIError>;
    expect(refused.message).toContain("application/pdf");
  });
});

describe("OpenAI's input_file (Responses)", () => {
  const question = (part: object) => ({
    model: "tiny",
    max_output_tokens: 6,
    temperature: 0,
    input: [
      {
        role: "user" as const,
        content: [part, { type: "input_text", text: "When is the meeting?" }],
      },
    ],
  });
  const asText = (title: string) =>
    question({ type: "input_text", text: documentText(title, NOTES) });
  const prompt = (u: { input_tokens: number }) => u.input_tokens;

  it("an uploaded file (purpose user_data) and one sent inline read as the document sent as text", async () => {
    const c = gw.client;
    const file = await c.files.create({
      file: await openaiFile(Buffer.from(NOTES), "notes.md", { type: "text/markdown" }),
      purpose: "user_data",
    });
    expect(file).toMatchObject({ purpose: "user_data", expires_at: null, filename: "notes.md" });
    const want = await c.responses.create(asText("notes.md") as never);
    const byId = await c.responses.create(
      question({ type: "input_file", file_id: file.id }) as never,
    );
    expect(byId.output_text).toBe(want.output_text);
    expect(prompt(byId.usage!)).toBe(prompt(want.usage!));
    const inline = question({
      type: "input_file",
      filename: "notes.md",
      file_data: `data:text/markdown;base64,${Buffer.from(NOTES).toString("base64")}`,
    });
    const byData = await c.responses.create(inline as never);
    expect(byData.output_text).toBe(want.output_text);
    // Counted as answered.
    const counted = await c.responses.inputTokens.count(
      question({ type: "input_file", file_id: file.id }) as never,
    );
    expect(counted.input_tokens).toBe(prompt(want.usage!));
  });

  it("a conversation's items read their files as a Responses input does, and keep the text", async () => {
    const c = gw.client;
    const data = `data:text/markdown;base64,${Buffer.from(NOTES).toString("base64")}`;
    const conv = await c.conversations.create({
      items: [
        {
          type: "message",
          role: "user",
          content: [{ type: "input_file", filename: "notes.md", file_data: data }],
        },
      ] as never,
    });
    const items = await c.conversations.items.list(conv.id, { order: "asc" });
    expect(items.data[0]).toMatchObject({
      content: [{ type: "input_text", text: documentText("notes.md", NOTES) }],
    });
    const pdf = {
      type: "input_file",
      filename: "a.pdf",
      file_data: "data:application/pdf;base64,JVBERi0=",
    };
    const refused = (await c.conversations.items
      .create(conv.id, { items: [{ type: "message", role: "user", content: [pdf] }] as never })
      .catch((e: unknown) => e)) as { status: number; param: string };
    expect([refused.status, refused.param]).toEqual([400, "items.0.content.0.file_data"]);
  });

  it("refusals: a URL, a PDF, a file not there, another purpose", async () => {
    const c = gw.client;
    const cases: [object, number, string][] = [
      [
        { type: "input_file", file_url: "https://example.com/a.txt" },
        400,
        "input.0.content.0.file_url",
      ],
      [
        {
          type: "input_file",
          filename: "a.pdf",
          file_data: "data:application/pdf;base64,JVBERi0=",
        },
        400,
        "input.0.content.0.file_data",
      ],
      [
        { type: "input_file", file_id: "file-000000000000000000000000" },
        404,
        "input.0.content.0.file_id",
      ],
      [{ type: "input_file" }, 400, "input.0.content.0"],
    ];
    for (const [part, status, param] of cases) {
      const err = (await c.responses.create(question(part) as never).catch((e: unknown) => e)) as {
        status: number;
        param: string;
      };
      expect([err.status, err.param], param).toEqual([status, param]);
    }
    const purpose = await c.files
      .create({ file: await openaiFile(Buffer.from("x"), "x.txt"), purpose: "fine-tune" })
      .catch((e: unknown) => e);
    expect((purpose as { status: number; param: string }).param).toBe("purpose");
  });
});
