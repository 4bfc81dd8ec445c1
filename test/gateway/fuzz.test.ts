// Malformed requests against every POST route of a gateway (OpenAI, Anthropic Messages,
// Responses, KServe v2 REST, tokenize): valid bodies mutated at random (values swapped for
// odd ones, fields added from the routes' own vocabulary, fields removed, bodies cut short
// or sent with odd bytes), from a fixed seed. Each answer must be a success or a 4xx/429
// with a stable EM_* code: never a 5xx, a hang or a dead process; streams must end. After
// the run, plain requests still answer. The GET routes that take an id and a query (a
// response, its input items and its events again, files, batches) get odd ids and queries.
//
// EM_FUZZ_ITERATIONS (default 400) and EM_FUZZ_SEED (default 20261201) widen a campaign,
// EM_FUZZ_ROUTE (a part of a path) narrows it to one API:
//   EM_FUZZ_ITERATIONS=20000 EM_FUZZ_SEED=7 npx vitest run test/gateway/fuzz.test.ts
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { deflateSync, gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testEnv, waitFor } from "../support/env.ts";
import { mutate, type Rng, rng, type Vocabulary } from "../support/fuzz.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { metric, startGateway, type TestGateway } from "./helpers.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 400);
/** Only the routes whose path contains this (a campaign on one API). */
const ROUTE_FILTER = process.env["EM_FUZZ_ROUTE"] ?? "";
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);

let g: TestGateway;

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  // With a files folder: stored responses are files there (response-files.ts), and the
  // previous_response_id and background values the fuzzer sends reach that store.
  const files = mkdtempSync(join(testEnv().runDir, "fuzz-files-"));
  // V3.1's parser: requests that set chat_template_kwargs {thinking: true} think, so thinking
  // meets the budgets, grammars, predictions and logprobs the fuzzer sends too.
  g = await startGateway(dir, {
    reasoningParser: "deepseek-v3",
    schedulingPolicy: "priority",
    maxRequestBytes: 256 * 1024,
    files: { dir: files, maxBytes: 1 << 20, maxTotalBytes: 64 << 20, batchConcurrency: 1 },
  });
  const conv = await g.client.conversations.create({ items: [{ role: "user", content: "hi" }] });
  PLAUSIBLE["conversation"]!.push(conv.id, { id: conv.id });
});

afterAll(async () => {
  await g?.close();
});

const MESSAGES = [{ role: "user", content: "hi" }];
/** Each route with a valid body (small max tokens: the tiny model answers in milliseconds). */
const ROUTES: { path: string; body: Record<string, unknown> }[] = [
  { path: "/v1/chat/completions", body: { model: "tiny", messages: MESSAGES, max_tokens: 3 } },
  { path: "/v1/completions", body: { model: "tiny", prompt: "one two", max_tokens: 3 } },
  { path: "/v1/responses", body: { model: "tiny", input: "hi", max_output_tokens: 3 } },
  {
    path: "/v1/responses/compact",
    body: { model: "tiny", input: [{ role: "user", content: "hi" }] },
  },
  {
    path: "/v1/conversations",
    body: { items: [{ type: "message", role: "user", content: "hi" }], metadata: { k: "v" } },
  },
  {
    path: "/v1/uploads",
    body: { bytes: 3, filename: "in.jsonl", mime_type: "text/jsonl", purpose: "batch" },
  },
  { path: "/v1/messages", body: { model: "tiny", max_tokens: 3, messages: MESSAGES } },
  { path: "/v1/messages/count_tokens", body: { model: "tiny", messages: MESSAGES } },
  { path: "/tokenize", body: { model: "tiny", prompt: "one two" } },
  { path: "/detokenize", body: { model: "tiny", tokens: [5, 6, 7] } },
  {
    path: "/v2/models/tiny/infer",
    body: {
      inputs: [{ name: "text_input", shape: [1], datatype: "BYTES", data: ["hi"] }],
      parameters: { max_tokens: 3 },
    },
  },
  { path: "/v2/models/tiny/generate", body: { text_input: "hi", parameters: { max_tokens: 3 } } },
  {
    path: "/v2/models/tiny/generate_stream",
    body: { text_input: "hi", parameters: { max_tokens: 3 } },
  },
];

const FUZZED = ROUTES.filter((route) => route.path.includes(ROUTE_FILTER));

/** Fields the routes know, added with odd values (or plausible ones). */
const FIELDS = [
  "temperature",
  "top_p",
  "top_k",
  "min_p",
  "n",
  "best_of",
  "logprobs",
  "top_logprobs",
  "stop",
  "seed",
  "response_format",
  "tools",
  "tool_choice",
  "stream",
  "stream_options",
  "logit_bias",
  "presence_penalty",
  "frequency_penalty",
  "repetition_penalty",
  "max_tokens",
  "max_completion_tokens",
  "max_output_tokens",
  "priority",
  "echo",
  "suffix",
  "guided_json",
  "guided_regex",
  "guided_choice",
  "guided_grammar",
  "prompt_logprobs",
  "truncate_prompt_tokens",
  "ignore_eos",
  "min_tokens",
  "user",
  "cache_salt",
  "chat_template_kwargs",
  "previous_response_id",
  "conversation",
  "items",
  "background",
  "truncation",
  "context_management",
  "compaction",
  "bytes",
  "filename",
  "mime_type",
  "thinking_token_budget",
  "prediction",
  "encrypted_content",
  "store",
  "instructions",
  "reasoning",
  "text",
  "thinking",
  "system",
  "metadata",
  "stop_sequences",
  "include_stop_str_in_output",
  "prefix",
  "skip_special_tokens",
  "add_special_tokens",
  "messages",
  "prompt",
  "input",
  "model",
  "inputs",
  "outputs",
  "parameters",
  "text_input",
  "tokens",
  "binary_data",
  "id",
  "parallel_tool_calls",
  "continue_final_message",
  "add_generation_prompt",
  "documents",
  "return_tokens_as_token_ids",
] as const;

const SCHEMA = {
  type: "object",
  properties: { a: { type: "integer", minimum: 0, maximum: 9 }, b: { enum: ["x", "y"] } },
  required: ["a"],
};
const TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } } },
  },
};
/** Values each field takes when valid: mixed, they reach the features' combinations. */
const PLAUSIBLE: Record<string, unknown[]> = {
  temperature: [0, 0.7, 1, 2],
  top_p: [0.1, 0.9, 1],
  top_k: [1, 5, -1],
  min_p: [0.1, 0, 1, 1.5],
  n: [1, 2, 3],
  best_of: [2, 3],
  logprobs: [true, 0, 2, 5],
  top_logprobs: [0, 3],
  stop: ["\n", ["a", "the"]],
  seed: [1, 42],
  response_format: [
    { type: "json_object" },
    { type: "json_schema", json_schema: { name: "s", schema: SCHEMA } },
    { type: "text" },
  ],
  tools: [
    [TOOL],
    // (a namespace of tools, in the Responses API's form; a hosted tool)
    [{ type: "namespace", name: "ns", description: "d", tools: [{ type: "function", name: "f" }] }],
    [{ type: "web_search" }],
  ],
  tool_choice: [
    "auto",
    "required",
    "none",
    { type: "function", function: { name: "get_weather" } },
  ],
  stream: [true, false],
  stream_options: [{ include_usage: true }, { include_usage: true, continuous_usage_stats: true }],
  logit_bias: [{ "5": 100 }, { "7": -100 }],
  presence_penalty: [0.5, -2, 2],
  frequency_penalty: [1, -1],
  repetition_penalty: [1.1, 0, 100, 1e30, 1e-320, 0.01],
  max_tokens: [1, 2, 8, 40, 32_000],
  max_completion_tokens: [2, 5],
  max_output_tokens: [2, 16],
  priority: [-3, 0, 4],
  echo: [true],
  suffix: [" end"],
  guided_json: [SCHEMA],
  guided_regex: ["[a-c]{2,4}"],
  guided_choice: [["yes", "no"]],
  guided_grammar: ['root ::= "a" | "b" root'],
  prompt_logprobs: [0, 2],
  truncate_prompt_tokens: [1, 2, 100],
  ignore_eos: [true],
  prefix: [true],
  min_tokens: [1, 4],
  user: ["u"],
  cache_salt: ["s"],
  chat_template_kwargs: [{ thinking: true }],
  background: [true],
  store: [true, false],
  instructions: ["be brief"],
  reasoning: [{ effort: "low" }],
  text: [{ format: { type: "json_object" } }],
  thinking: [{ type: "enabled", budget_tokens: 1024 }],
  system: ["be brief", [{ type: "text", text: "be brief" }]],
  stop_sequences: [["the"]],
  include_stop_str_in_output: [true],
  skip_special_tokens: [false],
  add_special_tokens: [false],
  messages: [
    [
      { role: "system", content: "s" },
      { role: "user", content: "hi" },
    ],
    [{ role: "user", content: [{ type: "text", text: "hi" }] }],
    [{ role: "assistant", content: "par" }],
    // (a system turn inside the conversation, Anthropic's; one of an image)
    [
      { role: "user", content: "hi" },
      { role: "system", content: [{ type: "text", text: "s" }] },
      { role: "user", content: "more" },
    ],
    [{ role: "system", content: [{ type: "image", source: {} }] }],
    // (a text document, read as text)
    [
      {
        role: "user",
        content: [
          { type: "document", source: { type: "text", media_type: "text/plain", data: "d" } },
        ],
      },
    ],
    // (a compaction block, standing for what came before it)
    [
      { role: "user", content: "hi" },
      { role: "assistant", content: [{ type: "compaction", content: "sum" }] },
      { role: "user", content: "more" },
    ],
    // (a document naming a file: not there, or no files folder)
    [
      {
        role: "user",
        content: [{ type: "document", source: { type: "file", file_id: "file-x" } }],
      },
    ],
  ],
  prompt: ["a b", ["a", "b"], [1, 2, 3], [[1, 2], [3]]],
  input: [
    "hi",
    [{ role: "user", content: "hi" }],
    // (a turn after an answer: what context_management compacts)
    [
      { role: "user", content: "hi" },
      { role: "assistant", content: "yo" },
      { role: "user", content: "more" },
    ],
    // (files as input: inline text, a PDF, one not there, a URL)
    [
      {
        role: "user",
        content: [
          { type: "input_file", filename: "a.txt", file_data: "data:text/plain;base64,aGk=" },
          { type: "input_file", filename: "a.pdf", file_data: "JVBERi0=" },
          { type: "input_file", file_id: "file-x" },
          { type: "input_file", file_url: "https://example.com/a.txt" },
        ],
      },
    ],
  ],
  context_management: [
    [{ type: "compaction", compact_threshold: 1 }],
    [{ type: "compaction" }],
    // (Anthropic's, on /v1/messages)
    {
      edits: [
        {
          type: "clear_tool_uses_20250919",
          trigger: { type: "input_tokens", value: 1 },
          keep: { type: "tool_uses", value: 0 },
        },
      ],
    },
    {
      edits: [
        {
          type: "compact_20260112",
          trigger: { type: "input_tokens", value: 1 },
          pause_after_compaction: true,
        },
      ],
    },
  ],
  compaction: [{ type: "summarize" }, { type: "summarize", instructions: "Be brief." }],
  items: [[{ type: "message", role: "user", content: "hi" }], [], [{ type: "reasoning" }]],
  // (and a conversation of the gateway's, made in beforeAll)
  conversation: [`conv_${"0".repeat(24)}`],
  parallel_tool_calls: [false],
  truncation: ["auto", "disabled"],
  prediction: [
    { type: "content", content: "hi there" },
    { type: "content", content: [{ type: "text", text: "a b a b" }] },
  ],
  thinking_token_budget: [0, 2],
  continue_final_message: [true],
  add_generation_prompt: [false],
  return_tokens_as_token_ids: [true],
  parameters: [{ max_tokens: 2, temperature: 0 }, { stop: ["a"] }],
  outputs: [[{ name: "text_output" }], [{ name: "finish_reason" }, { name: "text_output" }]],
};

const VOCABULARY: Vocabulary = {
  fields: FIELDS,
  plausible: PLAUSIBLE,
  words: [
    "tiny",
    "user",
    "assistant",
    "system",
    "tool",
    "auto",
    "none",
    "json_object",
    "json_schema",
    "text",
    "function",
    "required",
    "object",
    "string",
    "integer",
  ],
};

/** BYTES elements in Triton's binary form: each a 4-byte little-endian length, then its bytes. */
function bytesElements(elements: Buffer[]): Buffer {
  return Buffer.concat(
    elements.flatMap((e) => {
      const len = Buffer.alloc(4);
      len.writeUInt32LE(e.length);
      return [len, e];
    }),
  );
}

interface Encoded {
  bytes: Buffer;
  headers: Record<string, string>;
}

/**
 * A body's bytes and headers: JSON, or now and then cut short, odd bytes, no JSON at all,
 * compressed (validly or not), or in Triton's binary tensor form (a JSON header, then the
 * inputs' bytes, with an Inference-Header-Content-Length that may lie).
 */
function encode(r: Rng, body: Record<string, unknown>): Encoded {
  const json = Buffer.from(JSON.stringify(body));
  const plain = (bytes: Buffer, type = "application/json"): Encoded => ({
    bytes,
    headers: { "content-type": type },
  });
  switch (r.int(48)) {
    case 0:
      return plain(json.subarray(0, r.int(json.length)));
    case 1:
      return plain(Buffer.concat([json.subarray(0, 5), Buffer.from([0xff, 0xfe, 0xc0])]));
    case 2:
      return plain(json, "text/plain");
    case 3:
      return plain(Buffer.from(r.pick(["null", "[]", "1", '"x"', "{}{}", "{"])));
    case 4:
      return plain(json, "application/json; charset=latin1");
    case 5:
    case 6:
    case 7: {
      // Binary tensor data: the first input's elements moved out of the JSON.
      const inputs = Array.isArray(body["inputs"]) ? (body["inputs"] as unknown[]) : [];
      const first = inputs[0] as Record<string, unknown> | undefined;
      const elements = [Buffer.from("hi"), Buffer.from([0xff, 0xfe]), Buffer.alloc(0)].slice(
        0,
        1 + r.int(3),
      );
      let binary = bytesElements(elements);
      if (r.next() < 0.3) binary = binary.subarray(0, r.int(binary.length + 1));
      if (r.next() < 0.2) binary = Buffer.concat([binary, Buffer.from([1, 2, 3])]);
      if (first && typeof first === "object") {
        delete first["data"];
        first["parameters"] = {
          binary_data_size: r.pick([binary.length, binary.length + 1, 0, -1, 2 ** 40, "x"]),
        };
      }
      const header = Buffer.from(JSON.stringify(body));
      const length = r.pick([
        header.length,
        header.length,
        header.length - 1,
        header.length + 3,
        0,
        -5,
      ]);
      return {
        bytes: Buffer.concat([header, binary]),
        headers: {
          "content-type": r.pick(["application/octet-stream", "application/json"]),
          "inference-header-content-length": String(r.next() < 0.1 ? "abc" : length),
        },
      };
    }
    case 8:
      return {
        bytes: gzipSync(json),
        headers: { "content-type": "application/json", "content-encoding": "gzip" },
      };
    case 9:
      return {
        bytes: deflateSync(json),
        headers: { "content-type": "application/json", "content-encoding": "deflate" },
      };
    case 10: {
      const z = gzipSync(json);
      z[10 + r.int(Math.max(1, z.length - 10))]! ^= 0xff;
      return {
        bytes: z,
        headers: { "content-type": "application/json", "content-encoding": "gzip" },
      };
    }
    case 11:
      return {
        bytes: json,
        headers: {
          "content-type": "application/json",
          "content-encoding": r.pick(["br", "gzip", "x"]),
        },
      };
    default:
      return {
        bytes: json,
        headers: {
          "content-type": "application/json",
          ...(r.next() < 0.1 ? { "accept-encoding": r.pick(["gzip", "deflate", "br", "*"]) } : {}),
        },
      };
  }
}

interface Failure {
  iteration: number;
  path: string;
  body: string;
  why: string;
}

async function send(path: string, { bytes, headers }: Encoded) {
  const res = await fetch(`${g.url}${path}`, {
    method: "POST",
    headers,
    body: bytes,
    signal: AbortSignal.timeout(60_000),
  });
  // Read it all: a stream must end.
  const text = await res.text();
  return { status: res.status, text, type: res.headers.get("content-type") ?? "" };
}

/** How each API's event stream ends. */
const STREAM_END: [RegExp, RegExp][] = [
  // A background response's events again: none past starting_after's end, else to its last.
  [
    /^\/v1\/responses\/[^/?]+(\?.*)?$/,
    /^$|event: response\.(completed|incomplete|failed)\ndata: [^\n]*\n\n$/,
  ],
  [/^\/v1\/(chat\/)?completions$/, /data: \[DONE\]\n\n$/],
  [/^\/v1\/messages$/, /event: (message_stop|error)\ndata: [^\n]*\n\n$/],
  [
    /^\/v1\/responses$/,
    /event: (response\.(completed|incomplete|failed)|error)\ndata: [^\n]*\n\n$/,
  ],
];

/** What is wrong with an answer (null: fine). */
function problem(path: string, status: number, text: string, type: string): string | null {
  if (status >= 500 && status !== 503) return `status ${status}`;
  if (status < 400) {
    // A stream that failed midway says so in an event; it must still be a stable code.
    if (/"code":"EM_GATEWAY_INTERNAL"/.test(text)) return "internal error in a 2xx body";
    const end = STREAM_END.find(([route]) => route.test(path))?.[1];
    if (type.startsWith("text/event-stream") && end && !end.test(text))
      return `a stream that does not end as its API's do: ...${JSON.stringify(text.slice(-200))}`;
    return null;
  }
  if (!type.includes("json")) return `status ${status} with content-type ${type}`;
  let parsed: any;
  try {
    parsed = JSON.parse(text);
  } catch {
    return `status ${status}: body is not JSON`;
  }
  const code = parsed?.error?.code ?? parsed?.code ?? parsed?.error?.type;
  if (typeof code !== "string" || !/^(EM_[A-Z0-9_]+|[a-z_]+_error)$/.test(code))
    return `status ${status}: no stable code (${text.slice(0, 200)})`;
  if (code === "EM_GATEWAY_INTERNAL") return `status ${status}: EM_GATEWAY_INTERNAL`;
  return null;
}

describe(`gateway fuzz (${ITERATIONS} requests, seed ${SEED})`, () => {
  it("answers every malformed request with a success or a stable 4xx, and keeps serving", async () => {
    const r = rng(SEED);
    const failures: Failure[] = [];
    const statuses = new Map<number, number>();
    for (let i = 0; i < ITERATIONS; i++) {
      const route = r.pick(FUZZED);
      const body = structuredClone(route.body);
      mutate(r, VOCABULARY, body);
      const encoded = encode(r, body);
      let why: string | null;
      try {
        const res = await send(route.path, encoded);
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        why = problem(route.path, res.status, res.text, res.type);
      } catch (e) {
        why = `no answer: ${(e as Error).message}`;
      }
      if (why) {
        failures.push({
          iteration: i,
          path: route.path,
          body: `${JSON.stringify(encoded.headers)} ${encoded.bytes.toString("utf8", 0, 400)}`,
          why,
        });
        if (failures.length >= 10) break;
      }
    }
    if (process.env["EM_FUZZ_VERBOSE"]) console.log(Object.fromEntries(statuses));
    expect(failures, JSON.stringify(failures, null, 2)).toEqual([]);
    // Not every request refused: the mutations leave many valid ones.
    expect(statuses.get(200) ?? 0).toBeGreaterThan(ITERATIONS / 10);
    expect([...statuses.keys()].some((s) => s >= 400 && s < 500)).toBe(true);
    // Still serving: plain requests on each API.
    const chat = await g.client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 2,
    });
    expect(chat.choices[0]!.finish_reason).toBeDefined();
    for (const route of ROUTES) {
      const res = await send(route.path, {
        bytes: Buffer.from(JSON.stringify(route.body)),
        headers: { "content-type": "application/json" },
      });
      expect(res.status, `${route.path}: ${res.text.slice(0, 200)}`).toBe(200);
    }
    await expectNothingLeft();
  });

  it("the same from 8 clients at once, a third of whom hang up midway", async () => {
    const r = rng(SEED + 1);
    const failures: string[] = [];
    let done = 0;
    let hungUp = 0;
    const client = async () => {
      while (done < ITERATIONS / 2 && failures.length < 10) {
        done++;
        const route = r.pick(FUZZED);
        const body = structuredClone(route.body);
        mutate(r, VOCABULARY, body);
        // Longer answers now and then, for a hang-up to land mid-generation.
        if (r.next() < 0.3) body["max_tokens"] = 40 + r.int(40);
        const abort = new AbortController();
        const hangUp = r.next() < 0.33;
        if (hangUp) setTimeout(() => abort.abort(), r.int(30));
        try {
          const res = await fetch(`${g.url}${route.path}`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify(body),
            signal: hangUp ? abort.signal : AbortSignal.timeout(60_000),
          });
          const text = await res.text();
          const why = problem(route.path, res.status, text, res.headers.get("content-type") ?? "");
          if (why) failures.push(`${route.path} ${why}: ${JSON.stringify(body).slice(0, 400)}`);
        } catch (e) {
          if (hangUp && abort.signal.aborted) hungUp++;
          else failures.push(`${route.path} no answer (${(e as Error).message})`);
        }
      }
    };
    await Promise.all(Array.from({ length: 8 }, client));
    expect(failures, failures.join("\n")).toEqual([]);
    expect(hungUp).toBeGreaterThan(0);
    // What the clients that hung up had started is cancelled and its blocks freed.
    await expectNothingLeft();
  });
});

describe(`gateway GET fuzz (${ITERATIONS / 2} requests, seed ${SEED})`, () => {
  it("answers odd ids and queries on the GET routes with a success or a stable 4xx; streams end", async () => {
    const r = rng(SEED + 2);
    const c = g.client;
    const body = { model: "tiny", input: "hi", max_output_tokens: 3 };
    const stored = await c.responses.create(body);
    const background = await c.responses.create({ ...body, background: true });
    const file = await c.files.create({
      file: new File(
        ['{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n'],
        "in.jsonl",
      ),
      purpose: "batch",
    });
    const conv = await c.conversations.create({ items: [{ role: "user", content: "hi" }] });
    const item = (await c.conversations.items.list(conv.id)).data[0]!.id!;
    const kept = await c.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 3,
      store: true,
      metadata: { a: "1" },
    });
    const ids = [
      stored.id,
      background.id,
      background.id,
      `resp_${"0".repeat(24)}`,
      "..%2F..%2Fetc",
      "%ff%fe",
      "resp_",
      "x".repeat(300),
    ];
    const paths = [
      (id: string) => `/v1/responses/${id}`,
      (id: string) => `/v1/responses/${id}`,
      (id: string) => `/v1/responses/${id}/input_items`,
      () => `/v1/files/${r.pick([file.id, "file-x", "%2e%2e"])}`,
      () => `/v1/files/${r.pick([file.id, "file-x"])}/content`,
      () => "/v1/files",
      () => "/v1/batches",
      () => "/v1/models",
      () => `/v1/conversations/${r.pick([conv.id, "conv_x", "%2e%2e"])}`,
      () => `/v1/conversations/${r.pick([conv.id, "conv_x"])}/items`,
      () => `/v1/conversations/${conv.id}/items/${r.pick([item, "msg_x", "%ff"])}`,
      // Stored chat completions: the list, one, its messages (one entry: the responses' events
      // keep their share of the draws).
      () =>
        r.pick([
          "/v1/chat/completions",
          `/v1/chat/completions/${r.pick([kept.id, "chatcmpl-x", "%2e%2e", "x".repeat(300)])}`,
          `/v1/chat/completions/${r.pick([kept.id, "chatcmpl-x"])}/messages`,
        ]),
    ];
    const keys = [
      "stream",
      "starting_after",
      "include",
      "include[]",
      "include_obfuscation",
      "limit",
      "order",
      "after",
      "before",
      "purpose",
      "model",
      "metadata[a]",
      "metadata[",
      "__proto__",
    ];
    const values = [
      "true",
      "true",
      "false",
      "0",
      "1",
      "3",
      "-1",
      "abc",
      "1e309",
      "",
      "%ff",
      "99999999999",
      "asc",
      "desc",
      "batch",
      "x".repeat(5000),
      "message.output_text.logprobs",
    ];
    const failures: string[] = [];
    const seen = new Set<string>(); // (status, and whether it was a stream)
    for (let i = 0; i < ITERATIONS / 2 && failures.length < 10; i++) {
      const path = r.pick(paths)(r.pick(ids));
      const query = [
        // (a response's events asked for half the time: the other keys rarely leave one)
        ...(path.startsWith("/v1/responses/") && r.next() < 0.5 ? ["stream=true"] : []),
        ...Array.from({ length: r.int(4) }, () => {
          const v = r.pick(values);
          return `${r.pick(keys)}=${v.startsWith("%") ? v : encodeURIComponent(v)}`;
        }),
      ].join("&");
      // Every 50th: the background response's events as they are asked for, so that the
      // draws, whatever the seed, include a stream taken (the others rarely leave one).
      const url =
        i % 50 === 0
          ? `/v1/responses/${background.id}?stream=true`
          : query
            ? `${path}?${query}`
            : path;
      try {
        const res = await fetch(`${g.url}${url}`, { signal: AbortSignal.timeout(60_000) });
        const text = await res.text();
        const type = res.headers.get("content-type") ?? "";
        seen.add(`${res.status}${type.startsWith("text/event-stream") ? " stream" : ""}`);
        const why = problem(url, res.status, text, type);
        if (why) failures.push(`GET ${url.slice(0, 300)}: ${why}`);
      } catch (e) {
        failures.push(`GET ${url.slice(0, 300)}: no answer (${(e as Error).message})`);
      }
    }
    expect(failures, failures.join("\n")).toEqual([]);
    // Queries the routes took, streams among them, and refusals of both kinds.
    for (const s of ["200", "200 stream", "400", "404"]) expect([...seen]).toContain(s);
    // A background response's events, whole and after one, once it has ended.
    const events = async (q: string) =>
      (await (await fetch(`${g.url}/v1/responses/${background.id}?stream=true${q}`)).text())
        .split("\n\n")
        .filter(Boolean);
    const whole = await events("");
    expect(whole.length).toBeGreaterThan(3);
    expect(await events("&starting_after=1")).toEqual(whole.slice(2));
  });
});

/** Every accepted request ended and freed its KV blocks (once cancellations land). */
async function expectNothingLeft() {
  const names = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"];
  const left = async () =>
    Object.fromEntries(
      await Promise.all(
        names.map(async (n) => [n, await metric(g.url, `expertmesh_gateway_${n}`)] as const),
      ),
    );
  await waitFor("the engine to be idle", async () =>
    Object.values(await left()).every((v) => v === 0) ? true : undefined,
  ).catch(() => {});
  expect(await left()).toEqual(Object.fromEntries(names.map((n) => [n, 0])));
}
