// Malformed requests on the gateway's gRPC port: KServe v2 ModelInfer and ModelStreamInfer,
// expertmesh.v1 GenerateStream and ChatStream, each a valid request mutated at random from a
// fixed seed (values of the fields' own types but odd, fields the routes know with valid
// values, tensors whose shape, datatype or contents disagree, raw bytes, broken JSON in the
// *_json fields). Every call must end OK or with a status that names the caller's mistake,
// with an em-code: never INTERNAL or UNKNOWN, never a hang; the port keeps serving.
// EM_FUZZ_ITERATIONS (default 300) and EM_FUZZ_SEED widen a campaign.
import {
  type Client,
  credentials,
  Metadata,
  type ServiceError,
  type StatusObject,
  status,
} from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type GrpcGateway, startGrpcGateway } from "../../src/gateway/grpc.ts";
import { mutate, rng, type Vocabulary } from "../support/fuzz.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { GenerationClient, InferenceClient } from "../support/grpc.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 300);
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);

let gw: TestGateway;
let grpc: GrpcGateway;
let kserve: Client;
let gen: Client;

beforeAll(async () => {
  gw = await startGateway(await tinyCheckpointFor("tiny-v3"), { schedulingPolicy: "priority" });
  grpc = await startGrpcGateway({ ctx: gw.ctx }, { port: 0, host: "127.0.0.1" });
  const addr = `127.0.0.1:${grpc.port}`;
  kserve = new InferenceClient(addr, credentials.createInsecure());
  gen = new GenerationClient(addr, credentials.createInsecure());
});

afterAll(async () => {
  kserve?.close();
  gen?.close();
  await grpc?.close();
  await gw?.close();
});

const text = (t: string) => ({
  name: "text_input",
  datatype: "BYTES",
  shape: [1],
  contents: { bytes_contents: [Buffer.from(t)] },
});
/** A valid KServe request, for ModelInfer and ModelStreamInfer. */
const INFER = {
  model_name: "tiny",
  inputs: [text("hi")],
  parameters: { max_tokens: { int64_param: 3 } },
};
const SCHEMA = JSON.stringify({ type: "object", properties: { a: { type: "integer" } } });

/** Each method with a valid request. */
const METHODS: {
  method: string;
  client: () => Client;
  stream: "none" | "server" | "bidi";
  req: Record<string, unknown>;
}[] = [
  {
    method: "ModelInfer",
    client: () => kserve,
    stream: "none",
    req: INFER,
  },
  {
    method: "ModelStreamInfer",
    client: () => kserve,
    stream: "bidi",
    req: INFER,
  },
  {
    method: "GenerateStream",
    client: () => gen,
    stream: "server",
    req: { model: "tiny", prompt: "one two", max_tokens: 3 },
  },
  {
    method: "ChatStream",
    client: () => gen,
    stream: "server",
    req: { model: "tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 3 },
  },
];

const PARAM = (v: unknown) =>
  typeof v === "string"
    ? { string_param: v }
    : typeof v === "boolean"
      ? { bool_param: v }
      : Number.isInteger(v)
        ? { int64_param: v }
        : { double_param: v };

const VOCABULARY: Vocabulary = {
  fields: [
    "model_name",
    "model_version",
    "id",
    "inputs",
    "outputs",
    "parameters",
    "raw_input_contents",
    "name",
    "datatype",
    "shape",
    "contents",
    "bytes_contents",
    "int_contents",
    "fp32_contents",
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "suffix",
    "response_format_json",
    "structured_outputs_json",
    "tools_json",
    "tool_choice",
    "chat_template_kwargs_json",
    "priority",
    "cache_salt",
    "role",
    "content",
    "tool_calls",
    "tool_call_id",
    "string_param",
    "int64_param",
    "double_param",
    "bool_param",
    "binary_data",
  ],
  plausible: {
    model_name: ["tiny", "gpt-4", ""],
    model: ["tiny", "other"],
    datatype: ["BYTES", "FP32", "INT32", "BOOL", "X"],
    shape: [[1], [2], [-1], [0], [1, 1], [3, 2], []],
    name: ["text_input", "finish_reason", "text_output", "x"],
    bytes_contents: [[], [Buffer.from("a"), Buffer.from("b")], [Buffer.from([0xff, 0xfe])]],
    raw_input_contents: [
      [Buffer.from([1, 0, 0, 0, 0x61])],
      [Buffer.from([0xff, 0xff, 0xff, 0x7f])],
      [Buffer.alloc(0)],
    ],
    outputs: [
      [{ name: "text_output" }],
      [{ name: "finish_reason" }, { name: "text_output" }],
      [{ name: "nope" }],
      [{ name: "text_output" }, { name: "text_output" }],
    ],
    parameters: [
      { max_tokens: PARAM(2), temperature: PARAM(0.5) },
      { stop: PARAM("a") },
      { stream: PARAM(true) },
      { max_tokens: PARAM("7") },
      { priority: PARAM(3) },
      { min_p: PARAM(0.5), repetition_penalty: PARAM("1.2"), temperature: PARAM(1) },
      { repetition_penalty: PARAM(1e9) },
      { top_p: PARAM(1e-320) },
      { binary_data_output: PARAM(true) },
      { response_format: PARAM('{"type":"json_object"}') },
      { guided_choice: PARAM('["yes","no"]') },
    ],
    prompt: ["a b", "", "x".repeat(5000)],
    max_tokens: [0, 1, 8, 4294967295],
    temperature: [0, 0.7, 2, 1e-40, 1e300],
    top_p: [0.5, 1, 1e-320, 0],
    top_k: [0, 3, -1],
    min_p: [0, 0.2, 1, 2],
    repetition_penalty: [0.5, 1, 100, 0, 1e9, 1e-320],
    seed: [0, 1, "9223372036854775807"],
    stop: [["a"], [""], []],
    presence_penalty: [2, -2, 5],
    frequency_penalty: [1, 9],
    suffix: [" end"],
    response_format_json: [
      '{"type":"json_object"}',
      `{"type":"json_schema","json_schema":{"name":"s","schema":${SCHEMA}}}`,
      "{",
      "[]",
      "null",
    ],
    structured_outputs_json: [
      '{"choice":["a","b"]}',
      '{"regex":"[a-c]+"}',
      `{"json":${SCHEMA}}`,
      '{"grammar":"root ::= \\"a\\""}',
      "{",
      '{"x":1}',
    ],
    tools_json: [
      '[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]',
      "[",
      "{}",
    ],
    tool_choice: ["auto", "required", "none", "f", '{"type":"function","function":{"name":"f"}}'],
    chat_template_kwargs_json: ['{"thinking":true}', "{", "7"],
    priority: [0, 5, -5, 2147483647],
    cache_salt: ["s", ""],
    messages: [
      [
        { role: "system", content: "s" },
        { role: "user", content: "hi" },
      ],
      [],
      [{ role: "assistant", content: "a" }],
      [{ role: "tool", content: "r", tool_call_id: "x" }],
    ],
    role: ["user", "assistant", "system", "tool", "developer", "x"],
  },
  words: ["tiny", "BYTES", "FP32", "text_input", "text_output", "user", "assistant"],
};

/** How a call ended: its status (OK included). */
function run(m: (typeof METHODS)[number], req: unknown): Promise<Partial<StatusObject>> {
  const c = m.client() as any;
  const deadline = new Date(Date.now() + 60_000);
  return new Promise((resolve) => {
    if (m.stream === "none") {
      c[m.method](req, new Metadata(), { deadline }, (err: ServiceError | null) =>
        resolve(err ?? { code: status.OK }),
      );
      return;
    }
    const s = m.stream === "server" ? c[m.method](req, { deadline }) : c[m.method]({ deadline });
    s.on("data", () => {});
    s.on("error", (err: ServiceError) => resolve(err));
    s.on("status", (st: StatusObject) => {
      if (st.code === status.OK) resolve(st);
    });
    if (m.stream === "bidi") {
      s.write(req);
      s.end();
    }
  });
}

/** Statuses that say the caller erred, or that the gateway is busy. */
const CALLER = new Set([
  status.OK,
  status.INVALID_ARGUMENT,
  status.NOT_FOUND,
  status.RESOURCE_EXHAUSTED,
  status.FAILED_PRECONDITION,
  status.OUT_OF_RANGE,
  status.UNIMPLEMENTED,
  status.UNAVAILABLE,
]);

describe(`gRPC fuzz (${ITERATIONS} calls, seed ${SEED})`, () => {
  it("ends every call OK or with a caller's status and an em-code, and keeps serving", async () => {
    const r = rng(SEED);
    const failures: string[] = [];
    const codes = new Map<number, number>();
    for (let i = 0; i < ITERATIONS && failures.length < 10; i++) {
      const m = r.pick(METHODS);
      const req = structuredClone(m.req);
      mutate(r, VOCABULARY, req);
      let st: Partial<StatusObject>;
      try {
        st = await run(m, req);
      } catch {
        continue; // the client could not serialize it (a value of another type): not sent
      }
      // The client's own serialization refusals come back as INTERNAL without an em-code.
      const em = st.metadata?.get("em-code")[0];
      if (
        st.code === status.INTERNAL &&
        em === undefined &&
        /serializ|Illegal|invalid/i.test(st.details ?? "")
      )
        continue;
      codes.set(st.code!, (codes.get(st.code!) ?? 0) + 1);
      const bad = !CALLER.has(st.code!)
        ? `status ${status[st.code!]} (${st.details})`
        : st.code !== status.OK && em === undefined
          ? `status ${status[st.code!]} without an em-code (${st.details})`
          : null;
      if (bad) failures.push(`#${i} ${m.method}: ${bad}\n${JSON.stringify(req).slice(0, 600)}`);
    }
    if (process.env["EM_FUZZ_VERBOSE"]) console.log(Object.fromEntries(codes));
    expect(failures, failures.join("\n\n")).toEqual([]);
    expect(codes.get(status.OK) ?? 0).toBeGreaterThan(ITERATIONS / 10);
    expect(codes.get(status.INVALID_ARGUMENT) ?? 0).toBeGreaterThan(0);
    // Still serving.
    for (const m of METHODS) expect((await run(m, m.req)).code, m.method).toBe(status.OK);
  });
});
