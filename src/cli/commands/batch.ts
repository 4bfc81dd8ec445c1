// `expertmesh batch -i REQUESTS.jsonl -o ANSWERS.jsonl`: runs a file of requests as an OpenAI
// batch on a gateway (its Files and Batch APIs, ADR 0049) and writes the answers, as vLLM's
// `run-batch` does offline: uploads the file, creates the batch, shows its progress, and
// downloads the output (and error) file once it is done. Ctrl-C cancels the batch and still
// writes the answers it has; a second Ctrl-C leaves it running on the gateway.
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { basename } from "node:path";
import { parseArgs } from "node:util";
import { PART_MAX_BYTES } from "../../gateway/uploads.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import { statusLine } from "../progress.ts";
import type { Command } from "../registry.ts";
import { baseUrl } from "./bench.ts";

const USAGE = `expertmesh batch -i REQUESTS.jsonl -o ANSWERS.jsonl [--url URL] [options]

  -i FILE           the requests, one JSON object a line: {"custom_id", "method": "POST",
                    "url": "/v1/chat/completions", "body": {...}} (OpenAI's batch input)
  -o FILE           the answers of the lines that succeeded (2xx), one a line: {"id",
                    "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
  --errors FILE     the other lines' answers (default: -o's name with .errors.jsonl; written
                    only when there are some)
  --url URL         the gateway (default http://127.0.0.1:8000; a trailing /v1 is allowed);
                    it needs --files-dir (spec.gateway.batch)
  --endpoint PATH   the batch's endpoint (default: the first line's url)
  --api-key KEY     sent as a bearer token (default $OPENAI_API_KEY)
  --poll SECONDS    how often the batch's progress is asked for (default 1)
  --detach          print the batch's id once it is created, and leave it to run
  --keep-files      leave the uploaded file and the batch's output and error files on the
                    gateway (default: removed once the answers are written, as they count
                    against its folder's bound)
  --part-bytes N    a file larger than N bytes is sent in parts of N (the gateway's
                    /v1/uploads, ADR 0059), each part tried up to 3 times, its MD5 checked
                    (default 67108864, 64 MiB, the most a part may be)

Progress on stderr: a line rewritten in place on a terminal, else a line every 10 s. Exit
code 0 when every line succeeded, 2 when some failed (their answers in --errors), 1 when the
batch failed (its errors on stderr: bad lines, by number) or was cancelled.`;

export const batchCommand: Command = {
  name: "batch",
  summary: "run a JSONL file of requests as a batch on a gateway and write the answers",
  usage: USAGE,
  run: runBatch,
};

interface Batch {
  id: string;
  status: string;
  output_file_id: string | null;
  error_file_id: string | null;
  errors: { data: { line: number | null; code: string; message: string }[] } | null;
  request_counts: { total: number; completed: number; failed: number };
  /** The answers' tokens (absent from a gateway before batches reported it). */
  usage?: {
    input_tokens: number;
    output_tokens: number;
    input_tokens_details?: { cached_tokens: number };
  };
}

const usage = (m: string) => new ExpertMeshError("EM_CLI_USAGE", m);

async function runBatch(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      i: { type: "string", short: "i" },
      o: { type: "string", short: "o" },
      errors: { type: "string" },
      url: { type: "string" },
      endpoint: { type: "string" },
      "api-key": { type: "string" },
      poll: { type: "string" },
      detach: { type: "boolean" },
      "keep-files": { type: "boolean" },
      "part-bytes": { type: "string" },
    },
    strict: true,
  });
  if (values.i === undefined) throw usage("-i REQUESTS.jsonl is required");
  if (values.o === undefined && !values.detach) throw usage("-o ANSWERS.jsonl is required");
  const poll = Number(values.poll ?? "1");
  if (!(poll > 0)) throw usage(`--poll must be a number of seconds above 0, got '${values.poll}'`);
  const partBytes = Number(values["part-bytes"] ?? PART_MAX_BYTES);
  if (!(Number.isSafeInteger(partBytes) && partBytes >= 1 && partBytes <= PART_MAX_BYTES))
    throw usage(
      `--part-bytes must be a whole number from 1 to ${PART_MAX_BYTES}, got '${values["part-bytes"]}'`,
    );
  let input: Buffer;
  try {
    input = readFileSync(values.i);
  } catch (err) {
    throw usage(`cannot read ${values.i}: ${(err as Error).message}`);
  }
  const endpoint = values.endpoint ?? firstUrl(input, values.i);
  const base = baseUrl(values.url ?? "http://127.0.0.1:8000");
  const key = values["api-key"] ?? process.env["OPENAI_API_KEY"];
  const headers: Record<string, string> = key ? { authorization: `Bearer ${key}` } : {};

  const call = gatewayCall(base, headers);

  const file =
    input.length > partBytes
      ? await uploadInParts(call, input, basename(values.i), partBytes)
      : await (() => {
          const form = new FormData();
          form.append("purpose", "batch");
          form.append("file", new Blob([new Uint8Array(input)]), basename(values.i));
          return call<{ id: string }>("POST", "/v1/files", form);
        })();
  /** Removes the batch's files from the gateway (unless --keep-files); says so. */
  const removeFiles = async (ids: (string | null)[]) => {
    if (values["keep-files"]) return;
    let removed = 0;
    for (const id of ids)
      if (id !== null)
        removed += await call("DELETE", `/v1/files/${id}`).then(
          () => 1,
          () => 0, // (gone already, or the gateway unreachable: it expires)
        );
    if (removed > 0)
      process.stderr.write(
        `${removed} file(s) removed from the gateway (--keep-files keeps them)\n`,
      );
  };
  let created: Batch;
  try {
    created = await call<Batch>("POST", "/v1/batches", {
      input_file_id: file.id,
      endpoint,
      completion_window: "24h",
    });
  } catch (err) {
    await removeFiles([file.id]); // (no batch: nothing will read it)
    throw err;
  }
  const say = (s: string) => process.stderr.write(`${s}\n`);
  say(`batch ${created.id}: ${basename(values.i)} uploaded as ${file.id}, ${endpoint} on ${base}`);
  if (values.detach) {
    process.stdout.write(`${created.id}\n`);
    return 0;
  }

  // Ctrl-C: cancel (the answers so far are still written); again: leave it running.
  let interrupts = 0;
  let cancelled = false;
  const onSignal = () => {
    interrupts++;
    if (interrupts === 1) {
      say(`cancelling ${created.id} (Ctrl-C again leaves it running on the gateway)`);
      cancelled = true;
      void call("POST", `/v1/batches/${created.id}/cancel`).catch((e) => say(String(e)));
    } else {
      say(`leaving ${created.id} to run; GET ${base}/v1/batches/${created.id} follows it`);
      process.exit(130);
    }
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);

  const progress = progressLine(created.id);
  let b = created;
  const done = new Set(["completed", "failed", "expired", "cancelled"]);
  while (!done.has(b.status)) {
    await new Promise((r) => setTimeout(r, poll * 1000));
    b = await call<Batch>("GET", `/v1/batches/${created.id}`);
    progress.update(b);
  }
  progress.end(b);
  process.off("SIGINT", onSignal);
  process.off("SIGTERM", onSignal);

  if (b.status === "failed") {
    for (const e of b.errors?.data ?? [])
      say(`  ${e.line === null ? "" : `line ${e.line}: `}${e.code}: ${e.message}`);
    say(`batch ${b.id} failed: nothing ran`);
    await removeFiles([file.id]);
    return 1;
  }
  const out = values.o!;
  const errorsPath = values.errors ?? `${out.replace(/\.jsonl?$/, "")}.errors.jsonl`;
  const answers =
    b.output_file_id === null
      ? ""
      : await call<string>("GET", `/v1/files/${b.output_file_id}/content`);
  writeFileSync(out, answers);
  const { completed, failed, total } = b.request_counts;
  const u = b.usage;
  const tokens =
    u && completed > 0
      ? ` (${u.input_tokens} prompt tokens${u.input_tokens_details?.cached_tokens ? `, ${u.input_tokens_details.cached_tokens} of them cached` : ""}, ${u.output_tokens} generated)`
      : "";
  say(`${completed} answer(s) in ${out}${tokens}`);
  if (b.error_file_id !== null) {
    writeFileSync(errorsPath, await call<string>("GET", `/v1/files/${b.error_file_id}/content`));
    say(`${failed} failed line(s) in ${errorsPath}`);
  }
  await removeFiles([file.id, b.output_file_id, b.error_file_id]);
  if (b.status !== "completed") {
    say(
      `batch ${b.id} ${b.status}${cancelled ? "" : " on the gateway"}: ${total - completed - failed} line(s) not run`,
    );
    return 1;
  }
  return failed > 0 ? 2 : 0;
}

/** The url of the first request in the file (the batch's endpoint). */
function firstUrl(input: Buffer, name: string): string {
  const first = input
    .toString("utf8")
    .split("\n")
    .find((l) => l.trim() !== "");
  if (first === undefined) throw usage(`${name} holds no request`);
  try {
    const url = (JSON.parse(first) as { url?: unknown }).url;
    if (typeof url === "string") return url;
  } catch {}
  throw usage(`${name}: the first line has no "url" (or give --endpoint)`);
}

/** The batch's progress on stderr (statusLine: rewritten on a terminal, else every 10 s). */
function progressLine(id: string) {
  const status = statusLine();
  const line = (b: Batch) => {
    const { total, completed, failed } = b.request_counts;
    const pct = total > 0 ? ` (${((100 * (completed + failed)) / total).toFixed(0)} %)` : "";
    return `${id}: ${b.status}, ${completed + failed} of ${total} lines${pct}${failed > 0 ? `, ${failed} failed` : ""}, ${status.seconds().toFixed(0)} s`;
  };
  return {
    update: (b: Batch) => status.update(() => line(b)),
    end: (b: Batch) => status.end(line(b)),
  };
}

type Call = <T>(method: string, path: string, body?: FormData | object) => Promise<T>;

/**
 * A call to the gateway: its JSON, or EM_BATCH_REMOTE with what it answered (`status`: the
 * HTTP status, absent when it could not be reached).
 */
export function gatewayCall(base: string, headers: Record<string, string>): Call {
  return async <T>(method: string, path: string, body?: FormData | object): Promise<T> => {
    let res: Response;
    try {
      res = await fetch(`${base}${path}`, {
        method,
        headers:
          body && !(body instanceof FormData)
            ? { ...headers, "content-type": "application/json" }
            : headers,
        ...(body === undefined
          ? {}
          : { body: body instanceof FormData ? body : JSON.stringify(body) }),
      });
    } catch (err) {
      throw new ExpertMeshError(
        "EM_BATCH_REMOTE",
        `${method} ${base}${path}: ${(err as Error).message}`,
      );
    }
    const text = await res.text();
    if (!res.ok) {
      let why = text.replace(/\s+/g, " ").slice(0, 300);
      try {
        why = (JSON.parse(text) as { error: { message: string } }).error.message;
      } catch {}
      throw Object.assign(
        new ExpertMeshError(
          "EM_BATCH_REMOTE",
          `${method} ${path} answered HTTP ${res.status}: ${why}`,
        ),
        { status: res.status },
      );
    }
    return (path.endsWith("/content") ? text : JSON.parse(text)) as T;
  };
}

/** How many times a part is sent before the upload gives up. */
const PART_TRIES = 3;

/**
 * Sends `input` as an upload in parts of `partBytes` (the gateway's /v1/uploads), each part
 * tried up to PART_TRIES times (a refusal, 4xx, is not tried again), then completed with the
 * parts in order and the whole's MD5: the file it made. Progress on stderr; an upload that
 * fails is cancelled.
 */
export async function uploadInParts(
  call: Call,
  input: Buffer,
  filename: string,
  partBytes: number,
): Promise<{ id: string }> {
  const upload = await call<{ id: string }>("POST", "/v1/uploads", {
    bytes: input.length,
    filename,
    mime_type: "application/jsonl",
    purpose: "batch",
  });
  const count = Math.ceil(input.length / partBytes);
  const line = statusLine();
  const partIds: string[] = [];
  try {
    for (let k = 0; k < count; k++) {
      const bytes = input.subarray(k * partBytes, Math.min(input.length, (k + 1) * partBytes));
      for (let attempt = 1; ; attempt++) {
        const form = new FormData();
        form.append("data", new Blob([new Uint8Array(bytes)]), `part-${k + 1}`);
        try {
          partIds.push(
            (await call<{ id: string }>("POST", `/v1/uploads/${upload.id}/parts`, form)).id,
          );
          break;
        } catch (err) {
          const status = (err as { status?: number }).status;
          if (attempt >= PART_TRIES || (status !== undefined && status < 500)) throw err;
          process.stderr.write(
            `${filename}: part ${k + 1} of ${count} failed (${(err as Error).message}); sending it again\n`,
          );
        }
      }
      const sent = Math.min(input.length, (k + 1) * partBytes);
      line.update(
        () => `${filename}: part ${k + 1} of ${count} uploaded (${sent} of ${input.length} bytes)`,
      );
    }
    line.end(`${filename}: ${count} parts uploaded (${upload.id})`);
    const md5 = createHash("md5").update(input).digest("hex");
    const done = await call<{ file: { id: string } }>("POST", `/v1/uploads/${upload.id}/complete`, {
      part_ids: partIds,
      md5,
    });
    return done.file;
  } catch (err) {
    line.end();
    await call("POST", `/v1/uploads/${upload.id}/cancel`).catch(() => {}); // (its parts go)
    throw err;
  }
}
