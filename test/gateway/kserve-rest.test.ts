// KServe's Open Inference Protocol v2 over REST (src/gateway/kserve-rest.ts) with fetch, on
// a gateway started in this process on the tiny V3 checkpoint: health and metadata, infer
// and Triton's generate extension giving the text /v1/completions gives for the same greedy
// request, and bad requests answered {"error": message} with our code, never a 5xx.
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
    expect(server.json).toMatchObject({ name: "expertmesh", extensions: ["generate"] });
    expect(typeof server.json.version).toBe("string");
    const tensor = { datatype: "BYTES", shape: [1] };
    for (const path of ["/v2/models/tiny", "/v2/models/tiny/versions/1"])
      expect((await call(gw, "GET", path)).json).toEqual({
        name: "tiny",
        versions: ["1"],
        platform: "expertmesh",
        inputs: [{ name: "text_input", ...tensor }],
        outputs: [{ name: "text_output", ...tensor }],
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
      outputs: [{ name: "text_output", datatype: "BYTES", shape: [1], data: [want] }],
    });
    // Strings for numbers (as KServe's clients may send them), nested data, a version.
    const nested = await call(gw, "POST", "/v2/models/tiny/versions/1/infer", {
      inputs: [{ name: "prompt", datatype: "BYTES", shape: [1, 1], data: [[PROMPT]] }],
      parameters: { max_tokens: "8", temperature: "0", custom: true },
      outputs: [{ name: "text_output" }],
    });
    expect(nested.json.outputs[0].data).toEqual([want]);
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
      ["two prompts", "/infer", { inputs: [{ ...input, shape: [2], data: ["a", "b"] }] }, "inputs.0.shape"],
      ["a number for the prompt", "/infer", { inputs: [{ ...input, data: [5] }] }, "inputs.0.data"],
      ["negative shape", "/infer", { inputs: [{ ...input, shape: [-1] }] }, "inputs.0.shape"],
      ["an unknown output", "/infer", { ...ok, outputs: [{ name: "logits" }] }, "outputs.0.name"],
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
