// KServe v2 through NVIDIA's Triton client (tritonclient, Python; the protocol's official
// client), over REST and gRPC, against a gateway started in this process on the tiny V3
// checkpoint: the client's defaults (binary tensor data in and out), JSON tensors, a batch of
// prompts, gzip and deflate bodies, an unknown model, and gRPC streaming (start_stream,
// async_stream_infer). Each text must be the one
// /v1/completions gives for the same greedy prompt. scripts/triton-client.sh installs the
// client into a cached venv (once, about 30 s); without python3 or PyPI this test fails.
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type GrpcGateway, startGrpcGateway } from "../../src/gateway/grpc.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

const run = promisify(execFile);
const PROMPTS = ["The weather today", "Tell me", "Once upon a time"];

let gw: TestGateway;
let grpc: GrpcGateway;
let python: string;

beforeAll(async () => {
  const venv = run("bash", ["scripts/triton-client.sh"], { maxBuffer: 1 << 24 });
  venv.child.stderr?.pipe(process.stderr); // pip's progress, the first time
  python = (await venv).stdout.trim();
  gw = await startGateway(await tinyCheckpointFor("tiny-v3"));
  grpc = await startGrpcGateway({ ctx: gw.ctx }, { port: 0, host: "127.0.0.1" });
});

afterAll(async () => {
  await grpc?.close();
  await gw?.close();
});

describe("tritonclient (HTTP and gRPC)", () => {
  it("infers what /v1/completions gives: binary and JSON tensors, batches, compressed bodies, streams", async () => {
    const want: string[] = [];
    const reasons: string[] = [];
    for (const prompt of PROMPTS) {
      const r = await gw.client.completions.create({
        model: "tiny",
        prompt,
        max_tokens: 6,
        temperature: 0,
      });
      want.push(r.choices[0]!.text);
      reasons.push(r.choices[0]!.finish_reason);
    }
    const { stdout } = await run(
      python,
      [
        "test/clients/triton_client.py",
        "--http",
        new URL(gw.url).host,
        "--grpc",
        `127.0.0.1:${grpc.port}`,
        "--model",
        "tiny",
        "--prompts",
        JSON.stringify(PROMPTS),
      ],
      { maxBuffer: 1 << 24, timeout: 120_000 },
    );
    const got = JSON.parse(stdout);
    const one = { shape: [1, 1], texts: want.slice(0, 1) };
    const all = { shape: [3, 1], texts: want };
    expect(got.http).toMatchObject({
      live: true,
      ready: true,
      model_ready: true,
      extensions: expect.arrayContaining(["binary_tensor_data"]),
      inputs: [{ name: "text_input", datatype: "BYTES", shape: [-1] }],
      single: { ...one, id: "r1" },
      json: one,
      batch: all,
      compressed: all,
    });
    expect(got.http.batch.parameters.finish_reason.split(",")).toHaveLength(3);
    // The client's defaults ask for every output: finish_reason, element by element, too.
    expect(got.http.single.reasons).toEqual(reasons.slice(0, 1));
    expect(got.http.compressed.reasons).toEqual(reasons);
    expect(got.grpc.batch.reasons).toEqual(reasons);
    expect(got.http.unknown_model.status).toBe("404");
    expect(got.http.unknown_model.message).toContain("no-such-model");
    expect(got.grpc).toMatchObject({ live: true, model_ready: true, single: one, batch: all });
    // Streaming: the pieces add up to the texts, and the unknown model is an error on the
    // stream, not its end.
    expect(got.grpc.stream.texts).toEqual(want.slice(0, 2));
    expect(Math.min(...got.grpc.stream.pieces)).toBeGreaterThan(1);
    expect(got.grpc.stream.errors).toEqual([expect.stringContaining("EM_GATEWAY_UNKNOWN_MODEL")]);
  });
});
