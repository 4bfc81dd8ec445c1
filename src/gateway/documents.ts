// Documents in a prompt: a file's text (an uploaded file named by id, or one sent inline)
// read as the prompt's text, in a tag that carries its title. Anthropic's Messages documents
// and the Responses API's `input_file` parts both come here. This gateway's models read
// text, so only text files are read: by their media type, or their name's extension when the
// type says nothing (application/octet-stream), and only when their bytes are UTF-8; a PDF,
// an image or a spreadsheet is refused by name.
import { readFile } from "node:fs/promises";
import { extname } from "node:path";
import { isObject } from "../util/objects.ts";
import { ApiError } from "./errors.ts";
import type { FileStore } from "./files.ts";
import type { ServeContext } from "./jobs.ts";

/** Where documents find the files they name, and whose the request is. */
export interface DocumentFiles {
  /** null: this gateway keeps no files (no --files-dir). */
  readonly store: FileStore | null;
  readonly owner: string;
}

/** Media types read as text. */
const TEXT_MEDIA =
  /^(text\/[\w.+-]+|application\/(json|xml|yaml|x-yaml|x-ndjson|javascript|x-sh|sql|csv|toml|x-tex)|[\w.+-]+\/[\w.+-]+\+(json|xml))\s*(;.*)?$/i;

/** Extensions read as text when the media type says nothing. */
const TEXT_EXTENSIONS = new Set(
  (
    "txt md markdown rst json jsonl ndjson yaml yml toml xml html htm css csv tsv log ini cfg conf tex " +
    "py js mjs cjs ts tsx jsx java kt c h cc cpp hpp cs go rs rb php pl sh bash zsh sql r swift scala lua"
  ).split(" "),
);

/** Whether a file of media type `mime` named `filename` is read as text. */
export function isTextFile(mime: string | null, filename: string): boolean {
  if (mime && TEXT_MEDIA.test(mime)) return true;
  const generic = !mime || /^application\/octet-stream\s*(;.*)?$/i.test(mime);
  return generic && TEXT_EXTENSIONS.has(extname(filename).slice(1).toLowerCase());
}

const bad = (message: string, param: string) =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });

/** Refuses a file that is not read as text (isTextFile), naming its type or name. */
function checkTextFile(mime: string | null, filename: string, what: string, param: string): void {
  if (isTextFile(mime, filename)) return;
  const kind = mime && !/octet-stream/i.test(mime) ? mime : `'${filename.slice(0, 80)}'`;
  throw bad(
    `${what} is ${kind}: only text files are read here (text/plain, text/markdown, text/csv, application/json, code, ...); this model reads text, and this gateway has no PDF, image or office-document reader`,
    param,
  );
}

/**
 * The text of `bytes`, a file of `mime` named `filename` (`what` names it in messages):
 * refused when it is not a text file or not UTF-8.
 */
export function textOfFile(
  bytes: Uint8Array,
  mime: string | null,
  filename: string,
  what: string,
  param: string,
): string {
  checkTextFile(mime, filename, what, param);
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw bad(`${what} is not UTF-8 text`, param);
  }
}

/**
 * The text of the uploaded file `id` (its owner's), refused when there is no files folder,
 * when it is not there (404), not text, or longer than the context whatever it encodes to
 * (before it is read). `noFiles`: the param and advice of the error when there is no files
 * folder.
 */
export async function storedFileText(
  ctx: ServeContext,
  files: DocumentFiles | undefined,
  id: string,
  param: string,
  noFiles: { param: string; instead: string } = { param, instead: "send the file's text instead" },
): Promise<{ text: string; filename: string }> {
  const store = files?.store;
  if (!store)
    throw bad(
      `this gateway keeps no files (its Files API is off: --files-dir, spec.gateway.batch): ${noFiles.instead}`,
      noFiles.param,
    );
  const { file, mime } = store.meta(files.owner, id, param);
  if (file.bytes / (4 * ctx.tokenizer.maxTokenBytes) >= ctx.maxModelLen)
    throw new ApiError(
      "EM_GATEWAY_PROMPT_TOO_LONG",
      `file '${id.slice(0, 80)}' (${file.bytes} bytes) is longer than this model's context (${ctx.maxModelLen} tokens) whatever it encodes to`,
      { param },
    );
  const what = `file '${id.slice(0, 80)}'`;
  checkTextFile(mime, file.filename, what, param);
  const bytes = await readFile(store.path(id));
  return { text: textOfFile(bytes, mime, file.filename, what, param), filename: file.filename };
}

/** A document as the prompt's text: `<document title="...">`, its context, its text. */
export function documentText(title: unknown, text: string, context?: unknown): string {
  const attr = typeof title === "string" && title !== "" ? ` title=${JSON.stringify(title)}` : "";
  const before = typeof context === "string" && context ? `${context}\n\n` : "";
  return `<document${attr}>\n${before}${text}\n</document>\n`;
}

/**
 * `b` with each `input_file` part of its input's messages read as text (documents.ts): an
 * uploaded file (`file_id`, its owner's) or one sent inline (`file_data`: a data URL, or
 * base64, with its `filename`), as an `input_text` part holding the document; a `file_url`
 * is refused (this gateway fetches nothing). The response keeps the input as read.
 * `field`: the body's list of items (a conversation's are `items`).
 */
export async function withInputFiles<T extends Record<string, unknown>>(
  ctx: ServeContext,
  b: T,
  files: DocumentFiles,
  field = "input",
): Promise<T> {
  const input = b[field] as unknown[];
  let out: unknown[] | null = null;
  for (const [j, item] of input.entries()) {
    if (!isObject(item) || !Array.isArray(item["content"])) continue;
    const parts = item["content"] as unknown[];
    let read: unknown[] | null = null;
    for (const [k, part] of parts.entries()) {
      if (!isObject(part) || part["type"] !== "input_file") continue;
      const param = `${field}.${j}.content.${k}`;
      const named = typeof part["filename"] === "string" ? part["filename"] : "";
      let text: string;
      let title = named;
      if (typeof part["file_id"] === "string") {
        const got = await storedFileText(ctx, files, part["file_id"], `${param}.file_id`);
        text = got.text;
        title ||= got.filename;
      } else if (typeof part["file_data"] === "string") {
        const m = /^data:([^;,]*)(;base64)?,/.exec(part["file_data"]);
        const data = m ? part["file_data"].slice(m[0].length) : part["file_data"];
        const bytes =
          m && !m[2] ? Buffer.from(decodeURIComponent(data)) : Buffer.from(data, "base64");
        text = textOfFile(
          bytes,
          m?.[1] || null,
          named,
          `the file '${named.slice(0, 80)}'`,
          `${param}.file_data`,
        );
      } else if (part["file_url"] !== undefined)
        throw bad(
          "file_url: this gateway fetches no URLs; send the file as file_data or upload it (file_id)",
          `${param}.file_url`,
        );
      else throw bad("an input_file part has a file_id or file_data", param);
      read ??= [...parts];
      read[k] = { type: "input_text", text: documentText(title, text) };
    }
    if (read) {
      out ??= [...input];
      out[j] = { ...item, content: read };
    }
  }
  return out ? { ...b, [field]: out } : b;
}
