// KServe's Open Inference Protocol v2 over REST (src/gateway/kserve-rest.ts) with fetch, on
// a gateway started in this process on the tiny V3 checkpoint: health and metadata, infer
// and Triton's generate extension giving the text /v1/completions gives for the same greedy
// request, and bad requests answered {"error": message} with our code, never a 5xx.
import { deflateSync, gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let gw: TestGateway;
let keyed: TestGateway;

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  gw = await startGateway(dir);
  keyed = await startGateway(dir, { apiKeys: ["sekret"] });
});

afterAll(async () => {
  await gw?.close();
  await keyed?.close();
});

async function call(
  g: TestGateway,
  method: "GET" | "POST",
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: any; text: string }> {
  const r = await fetch(`${g.url}${path}`, {
    method,
    headers: { ...(body !== undefined ? { "content-type": "application/json" } : {}), ...headers },
    ...(body !== undefined ? { body: typeof body === "string" ? body : JSON.stringify(body) } : {}),
  });
  const text = await r.text();
  let json: any = null;
  try {
    json = JSON.parse(text);
  } catch {}
  return { status: r.status, json, text };
}

const PROMPT = "The weather today";
const inferBody = (parameters: Record<string, unknown> = {}, extra: object = {}) => ({
  id: "req-7",
  inputs: [{ name: "text_input", datatype: "BYTES", shape: [1], data: [PROMPT] }],
  parameters: { max_tokens: 8, temperature: 0, ...parameters },
  ...extra,
});

/** BYTES elements in binary form: a 4-byte little-endian length, then the bytes, each. */
function bytesElements(texts: string[]): Buffer {
  return Buffer.concat(
    texts.flatMap((t) => {
      const len = Buffer.alloc(4);
      len.writeUInt32LE(Buffer.byteLength(t));
      return [len, Buffer.from(t)];
    }),
  );
}

function parseElements(buf: Buffer): string[] {
  const out: string[] = [];
  for (let at = 0; at < buf.length; ) {
    const n = buf.readUInt32LE(at);
    out.push(buf.subarray(at + 4, at + 4 + n).toString("utf8"));
    at += 4 + n;
  }
  return out;
}

/** A JSON header and binary tensor data after it. */
function withBinary(header: unknown, parts: Buffer[]) {
  const head = Buffer.from(JSON.stringify(header));
  return { bytes: Buffer.concat([head, ...parts]), headerLength: head.length };
}

/** A body and its header-length header, as a rawCall's arguments. */
function binary(header: unknown, parts: Buffer[]): [Buffer, Record<string, string>] {
  const b = withBinary(header, parts);
  return [b.bytes, { "inference-header-content-length": String(b.headerLength) }];
}

/** A POST of raw bytes without a content type (as Triton's client sends), the body as bytes. */
async function rawCall(
  g: TestGateway,
  path: string,
  body: Buffer,
  headers: Record<string, string>,
) {
  const r = await fetch(`${g.url}${path}`, { method: "POST", headers, body });
  return { status: r.status, headers: r.headers, body: Buffer.from(await r.arrayBuffer()) };
}

async function completion(max_tokens = 8): Promise<string> {
  const r = await gw.client.completions.create({
    model: "tiny",
    prompt: PROMPT,
    max_tokens,
    temperature: 0,
  });
  return r.choices[0]!.text;
}

describe("KServe v2 REST", () => {
  it("health, server and model metadata, model readiness", async () => {
    expect(await call(gw, "GET", "/v2/health/live")).toMatchObject({
      status: 200,
      json: { live: true },
    });
    expect(await call(gw, "GET", "/v2/health/ready")).toMatchObject({
      status: 200,
      json: { ready: true },
    });
    const server = await call(gw, "GET", "/v2");
    expect(server.json).toMatchObject({
      name: "expertmesh",
      extensions: ["binary_tensor_data", "generate"],
    });
    expect(typeof server.json.version).toBe("string");
    const tensor = { datatype: "BYTES", shape: [-1] };
    for (const path of ["/v2/models/tiny", "/v2/models/tiny/versions/1"])
      expect((await call(gw, "GET", path)).json).toEqual({
        name: "tiny",
        versions: ["1"],
        platform: "expertmesh",
        inputs: [{ name: "text_input", ...tensor }],
        outputs: [
          { name: "text_output", ...tensor },
          { name: "finish_reason", ...tensor },
        ],
      });
    expect(await call(gw, "GET", "/v2/models/tiny/ready")).toMatchObject({
      status: 200,
      json: { name: "tiny", ready: true },
    });
    for (const path of ["/v2/models/gpt-4", "/v2/models/tiny/versions/2/ready"]) {
      const r = await call(gw, "GET", path);
      expect(r.status, path).toBe(404);
      expect(r.json.code).toBe("EM_GATEWAY_UNKNOWN_MODEL");
      expect(typeof r.json.error).toBe("string");
    }
  });

  it("infer: the text /v1/completions gives, with parameters as numbers or strings", async () => {
    const want = await completion();
    const r = await call(gw, "POST", "/v2/models/tiny/infer", inferBody());
    expect(r.status).toBe(200);
    expect(r.json).toEqual({
      model_name: "tiny",
      model_version: "1",
      id: "req-7",
      parameters: {
        finish_reason: expect.stringMatching(/^(stop|length)$/),
        prompt_tokens: gw.ctx.tokenizer.encode(PROMPT).length,
        completion_tokens: expect.any(Number),
      },
      outputs: [
        { name: "text_output", datatype: "BYTES", shape: [1], data: [want] },
        {
          name: "finish_reason",
          datatype: "BYTES",
          shape: [1],
          data: [r.json.parameters.finish_reason],
        },
      ],
    });
    // Strings for numbers (as KServe's clients may send them), nested data, a version.
    const nested = await call(gw, "POST", "/v2/models/tiny/versions/1/infer", {
      inputs: [{ name: "prompt", datatype: "BYTES", shape: [1, 1], data: [[PROMPT]] }],
      parameters: { max_tokens: "8", temperature: "0", custom: true },
      outputs: [{ name: "text_output" }],
    });
    expect(nested.json.outputs).toEqual([
      { name: "text_output", datatype: "BYTES", shape: [1, 1], data: [want] },
    ]);
    expect(nested.json).not.toHaveProperty("id");
  });

  it("generate and generate_stream (Triton's extension): the same text", async () => {
    const want = await completion(6);
    const g = await call(gw, "POST", "/v2/models/tiny/generate", {
      text_input: PROMPT,
      max_tokens: 6,
      parameters: { temperature: 0 },
    });
    expect(g.status).toBe(200);
    expect(g.json).toMatchObject({ model_name: "tiny", model_version: "1", text_output: want });
    const s = await call(gw, "POST", "/v2/models/tiny/generate_stream", {
      text_input: PROMPT,
      parameters: { max_tokens: 6, temperature: 0 },
    });
    expect(s.status).toBe(200);
    const events = s.text
      .split("\n\n")
      .filter((e) => e.startsWith("data: "))
      .map((e) => JSON.parse(e.slice(6)));
    expect(events.length).toBeGreaterThan(1);
    expect(events.map((e) => e.text_output).join("")).toBe(want);
    expect(events.at(-1).finish_reason).toMatch(/^(stop|length)$/);
    expect(events.slice(0, -1).every((e) => e.finish_reason === undefined)).toBe(true);
  });

  it("infer with a batch of prompts: one answer each, in the input's shape, as each alone", async () => {
    const prompts = [PROMPT, "Tell me", "Once upon a time"];
    const alone: string[] = [];
    for (const p of prompts) {
      const r = await call(gw, "POST", "/v2/models/tiny/infer", {
        inputs: [{ name: "text_input", datatype: "BYTES", shape: [1], data: [p] }],
        parameters: { max_tokens: 6, temperature: 0 },
      });
      alone.push(r.json.outputs[0].data[0]);
    }
    const r = await call(gw, "POST", "/v2/models/tiny/infer", {
      inputs: [
        { name: "text_input", datatype: "BYTES", shape: [3, 1], data: prompts.map((p) => [p]) },
      ],
      parameters: { max_tokens: 6, temperature: 0 },
    });
    expect(r.status).toBe(200);
    const reasons = r.json.parameters.finish_reason.split(",");
    expect(reasons).toHaveLength(3);
    expect(r.json.outputs).toEqual([
      { name: "text_output", datatype: "BYTES", shape: [3, 1], data: alone },
      { name: "finish_reason", datatype: "BYTES", shape: [3, 1], data: reasons },
    ]);
    // A stop that ends the second answer at once: "stop" there, the others as before.
    const first = alone[1]!.trim().split(/\s+/)[0]!;
    const stopped = await call(gw, "POST", "/v2/models/tiny/infer", {
      inputs: [{ name: "text_input", datatype: "BYTES", shape: [3], data: prompts }],
      outputs: [{ name: "finish_reason" }],
      parameters: { max_tokens: 6, temperature: 0, stop: first },
    });
    expect(stopped.json.outputs).toHaveLength(1);
    expect(stopped.json.outputs[0].name).toBe("finish_reason");
    expect(stopped.json.outputs[0].data[1]).toBe("stop");
    expect(stopped.json.outputs[0].data.join(",")).toBe(stopped.json.parameters.finish_reason);
    expect(r.json.parameters.prompt_tokens).toBe(
      prompts.reduce((a, p) => a + gw.ctx.tokenizer.encode(p).length, 0),
    );
  });

  it("binary tensor data: inputs and outputs after the JSON header, compressed or not", async () => {
    const prompts = [PROMPT, "Tell me"];
    const want = await call(gw, "POST", "/v2/models/tiny/infer", {
      inputs: [{ name: "text_input", datatype: "BYTES", shape: [2], data: prompts }],
      parameters: { max_tokens: 6, temperature: 0 },
    });
    const bytes = bytesElements(prompts);
    const header = {
      inputs: [
        { name: "flag", datatype: "BOOL", shape: [1], parameters: { binary_data_size: 1 } },
        {
          name: "text_input",
          datatype: "BYTES",
          shape: [2],
          parameters: { binary_data_size: bytes.length },
        },
      ],
      outputs: [{ name: "text_output", parameters: { binary_data: true } }],
      parameters: { max_tokens: 6, temperature: 0 },
    };
    const body = withBinary(header, [Buffer.from([1]), bytes]);
    // (fetch asks for gzip unless told otherwise, and inflates what it gets.)
    for (const [what, sent, headers, encoding] of [
      ["plain", body.bytes, { "accept-encoding": "identity" }, ""],
      [
        "gzip",
        gzipSync(body.bytes),
        { "content-encoding": "gzip", "accept-encoding": "gzip" },
        "gzip",
      ],
      [
        "deflate",
        deflateSync(body.bytes),
        { "content-encoding": "deflate", "accept-encoding": "deflate" },
        "deflate",
      ],
    ] as const) {
      const r = await rawCall(gw, "/v2/models/tiny/infer", sent, {
        "inference-header-content-length": String(body.headerLength),
        ...headers,
      });
      expect(r.status, what).toBe(200);
      expect(r.headers.get("content-encoding") ?? "", what).toBe(encoding);
      const length = Number(r.headers.get("inference-header-content-length"));
      const json = JSON.parse(r.body.subarray(0, length).toString("utf8"));
      expect(json.outputs, what).toEqual([
        {
          name: "text_output",
          datatype: "BYTES",
          shape: [2],
          parameters: { binary_data_size: r.body.length - length },
        },
      ]);
      expect(parseElements(r.body.subarray(length)), what).toEqual(want.json.outputs[0].data);
    }
    // JSON in, binary out for every output (binary_data_output), and JSON again when the
    // output says binary_data: false.
    const all = await rawCall(
      gw,
      "/v2/models/tiny/infer",
      Buffer.from(JSON.stringify(inferBody({ binary_data_output: true, max_tokens: 6 }))),
      {},
    );
    const n = Number(all.headers.get("inference-header-content-length"));
    expect(n).toBeGreaterThan(0);
    const allJson = JSON.parse(all.body.subarray(0, n).toString("utf8"));
    const sizes = allJson.outputs.map(
      (o: { parameters: { binary_data_size: number } }) => o.parameters.binary_data_size,
    );
    expect(allJson.outputs.map((o: { name: string }) => o.name)).toEqual([
      "text_output",
      "finish_reason",
    ]);
    expect(n + sizes[0] + sizes[1]).toBe(all.body.length);
    expect(parseElements(all.body.subarray(n, n + sizes[0]))).toHaveLength(1);
    expect(parseElements(all.body.subarray(n + sizes[0]))).toEqual([
      allJson.parameters.finish_reason,
    ]);
    // Per output: finish_reason in binary, text_output in JSON (binary_data: false wins).
    const mixed = await rawCall(
      gw,
      "/v2/models/tiny/infer",
      Buffer.from(
        JSON.stringify({
          ...inferBody({ binary_data_output: true, max_tokens: 6 }),
          outputs: [
            { name: "text_output", parameters: { binary_data: false } },
            { name: "finish_reason" },
          ],
        }),
      ),
      {},
    );
    const m = Number(mixed.headers.get("inference-header-content-length"));
    const mixedJson = JSON.parse(mixed.body.subarray(0, m).toString("utf8"));
    expect(mixedJson.outputs[0].data).toHaveLength(1);
    expect(parseElements(mixed.body.subarray(m))).toEqual([mixedJson.parameters.finish_reason]);
  });

  it("bad binary bodies: 400 (415 for an unknown encoding) naming the part; the gateway keeps serving", async () => {
    const input = (size: unknown, extra = {}) => ({
      inputs: [
        {
          name: "text_input",
          datatype: "BYTES",
          shape: [1],
          parameters: { binary_data_size: size },
          ...extra,
        },
      ],
    });
    const one = bytesElements(["hi"]);
    // biome-ignore format: a table
    const cases: [string, Buffer, Record<string, string>, number, string | undefined][] = [
      ["header length not a number", one, { "inference-header-content-length": "x" }, 400, "Inference-Header-Content-Length"],
      ["header length past the body", one, { "inference-header-content-length": "999" }, 400, "Inference-Header-Content-Length"],
      ["JSON header cut short", withBinary(input(6), [one]).bytes, { "inference-header-content-length": "5" }, 400, undefined],
      ["size past the bytes", ...binary(input(one.length + 1), [one]), 400, "inputs.0.parameters.binary_data_size"],
      ["bytes left over", ...binary(input(one.length - 1), [one]), 400, "inputs"],
      ["negative size", ...binary(input(-1), []), 400, "inputs.0.parameters.binary_data_size"],
      ["data and binary", ...binary(input(one.length, { data: ["hi"] }), [one]), 400, "inputs.0.data"],
      ["not BYTES elements", ...binary(input(3), [Buffer.from([9, 0, 0])]), 400, "inputs.0.parameters.binary_data_size"],
      ["not UTF-8", ...binary(input(6), [Buffer.from([2, 0, 0, 0, 0xff, 0xfe])]), 400, "inputs.0.data"],
      ["brotli", one, { "content-encoding": "br" }, 415, "Content-Encoding"],
      ["gzip that is not", one, { "content-encoding": "gzip" }, 400, "Content-Encoding"],
    ];
    for (const [what, body, headers, status, param] of cases) {
      const r = await rawCall(gw, "/v2/models/tiny/infer", body, headers);
      expect(r.status, what).toBe(status);
      const json = JSON.parse(r.body.toString("utf8"));
      expect(json.code, what).toBe("EM_GATEWAY_BAD_REQUEST");
      expect(typeof json.error, what).toBe("string");
      expect(json.param, what).toBe(param);
    }
    // A body that inflates past the limit (1 MiB here) is 413, not a 1 GiB buffer.
    const bomb = gzipSync(Buffer.alloc(8 << 20, 0x20));
    const r = await rawCall(gw, "/v2/models/tiny/infer", bomb, { "content-encoding": "gzip" });
    expect(r.status).toBe(413);
    expect(JSON.parse(r.body.toString("utf8")).code).toBe("EM_GATEWAY_BODY_TOO_LARGE");
    expect((await call(gw, "POST", "/v2/models/tiny/infer", inferBody())).status).toBe(200);
  });

  it("bad requests: 400 with the protocol's error and our code; the gateway keeps serving", async () => {
    const ok = inferBody();
    const input = ok.inputs[0]!;
    // biome-ignore format: a table
    const cases: [string, string, unknown, string][] = [
      ["not JSON", "/infer", "{", ""],
      ["an array body", "/infer", [1], "body"],
      ["no inputs", "/infer", { inputs: [] }, "inputs"],
      ["FP32 text", "/infer", { inputs: [{ ...input, datatype: "FP32", data: [1] }] }, "inputs.0.datatype"],
      ["shape mismatch", "/infer", { inputs: [{ ...input, shape: [2] }] }, "inputs.0.shape"],
      ["no prompts", "/infer", { inputs: [{ ...input, shape: [0], data: [] }] }, "inputs.0.shape"],
      ["65 prompts", "/infer", { inputs: [{ ...input, shape: [65], data: Array(65).fill("a") }] }, "inputs.0.shape"],
      ["binary_data not a flag", "/infer", { ...ok, outputs: [{ name: "text_output", parameters: { binary_data: "yes" } }] }, "outputs.0.parameters.binary_data"],
      ["binary_data_output not a flag", "/infer", inferBody({ binary_data_output: 1 }), "parameters.binary_data_output"],
      ["a number for the prompt", "/infer", { inputs: [{ ...input, data: [5] }] }, "inputs.0.data"],
      ["negative shape", "/infer", { inputs: [{ ...input, shape: [-1] }] }, "inputs.0.shape"],
      ["17 dimensions", "/infer", { inputs: [{ ...input, shape: Array(17).fill(1) }] }, "inputs.0.shape"],
      ["data nested 100,000 deep", "/infer", `{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ${"[".repeat(100_000)}"a"${"]".repeat(100_000)}}]}`, "inputs.0.data"],
      ["an unknown output", "/infer", { ...ok, outputs: [{ name: "logits" }] }, "outputs.0.name"],
      ["an output twice", "/infer", { ...ok, outputs: [{ name: "text_output" }, { name: "text_output" }] }, "outputs.1.name"],
      ["temperature 5", "/infer", inferBody({ temperature: 5 }), "temperature"],
      ["temperature hot", "/infer", inferBody({ temperature: "hot" }), "parameters.temperature"],
      ["stop a number", "/infer", inferBody({ stop: 3 }), "parameters.stop"],
      ["priority on an fcfs gateway", "/infer", inferBody({ priority: 2 }), "priority"],
      ["past the context", "/infer", inferBody({ max_tokens: 100_000 }), "max_tokens"],
      ["generate without text", "/generate", { parameters: {} }, "text_input"],
      ["generate parameters a list", "/generate", { text_input: "a", parameters: [] }, "parameters"],
      ["generate_stream top_p 0", "/generate_stream", { text_input: "a", top_p: 0 }, "top_p"],
    ];
    for (const [what, tail, body, param] of cases) {
      const r = await call(gw, "POST", `/v2/models/tiny${tail}`, body);
      expect(r.status, what).toBe(400);
      expect(typeof r.json?.error, what).toBe("string");
      expect(r.json.code, what).toMatch(/^EM_GATEWAY_(BAD_REQUEST|PROMPT_TOO_LONG)$/);
      // "": no field to name (the body is no JSON at all).
      expect(r.json.param, what).toBe(param || undefined);
    }
    expect((await call(gw, "POST", "/v2/models/tiny/infer", inferBody())).status).toBe(200);
  });

  it("with API keys: health open, everything else needs the key", async () => {
    expect((await call(keyed, "GET", "/v2/health/live")).status).toBe(200);
    expect((await call(keyed, "GET", "/v2/health/ready")).status).toBe(200);
    const denied = await call(keyed, "GET", "/v2/models/tiny");
    expect(denied.status).toBe(401);
    expect(denied.json.code).toBe("EM_GATEWAY_UNAUTHORIZED");
    const auth = { authorization: "Bearer sekret" };
    expect((await call(keyed, "GET", "/v2/models/tiny", undefined, auth)).status).toBe(200);
    const r = await call(keyed, "POST", "/v2/models/tiny/infer", inferBody(), auth);
    expect(r.status).toBe(200);
  });
});
