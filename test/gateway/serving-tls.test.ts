// The gateway's own TLS (--tls-cert, --tls-key, --tls-client-ca; spec.gateway.tls): real
// gateway processes serving the HTTP API to the official openai client and the gRPC API to a
// grpc-js client over TLS, a renewed certificate (and client CA) taken without a restart,
// clients without a certificate the CA signed refused, and bad files refused before the
// weights load.
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { fileURLToPath } from "node:url";
import { credentials } from "@grpc/grpc-js";
import OpenAI from "openai";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeNatsPki, type NatsPki } from "../env/pki.ts";
import { freePort } from "../env/process.ts";
import { runCli } from "../support/cli.ts";
import { testEnv, waitFor } from "../support/env.ts";
import {
  type GatewayProcess,
  runGatewayToExit,
  startGatewayProcess,
} from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { InferenceClient } from "../support/grpc.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));

let modelDir: string;
let dir: string;
let pki: NatsPki;
let gateway: GatewayProcess;
let grpcPort: number;
const agent = () => new Agent({ connect: { ca: readFileSync(pki.ca) } });

beforeAll(async () => {
  modelDir = await tinyCheckpointFor("tiny-v3");
  dir = mkdtempSync(join(testEnv().runDir, "gateway-tls-"));
  pki = makeNatsPki(dir);
  // The files a pod has from its Secret, replaced in place by a renewal.
  copyFileSync(pki.server.cert, join(dir, "tls.crt"));
  copyFileSync(pki.server.key, join(dir, "tls.key"));
  grpcPort = await freePort();
  gateway = await startGatewayProcess({
    modelDir,
    namespace: "test",
    modelName: "gateway-tls",
    args: [
      `--tls-cert=${join(dir, "tls.crt")}`,
      `--tls-key=${join(dir, "tls.key")}`,
      `--grpc-port=${grpcPort}`,
    ],
    env: { ...process.env, EM_FILE_RELOAD_INTERVAL_MS: "200" },
  });
});
afterAll(async () => {
  await gateway?.process.stop();
});

/** The subject CN of the certificate the server at `port` presents now. */
function servedCn(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: "127.0.0.1", port, ca: readFileSync(pki.ca) }, () => {
      const cn = socket.getPeerCertificate().subject.CN;
      socket.destroy();
      resolve(Array.isArray(cn) ? cn.join(",") : String(cn));
    });
    socket.on("error", reject);
  });
}

function grpcLive(
  ca: Buffer | null,
  port = grpcPort,
  client?: { cert: string; key: string },
): Promise<boolean> {
  const creds = client
    ? credentials.createSsl(ca, readFileSync(client.key), readFileSync(client.cert))
    : credentials.createSsl(ca);
  const stub = new InferenceClient(`127.0.0.1:${port}`, creds);
  return new Promise<boolean>((resolve, reject) => {
    stub["ServerLive"]!({}, { deadline: Date.now() + 10_000 }, (err: Error | null, r: any) => {
      stub.close();
      if (err) reject(err);
      else resolve(r.live === true);
    });
  });
}

describe("gateway --tls-cert / --tls-key", () => {
  it("serves the OpenAI API over TLS to the official client and the gRPC API to a TLS channel; plain HTTP gets no answer", async () => {
    expect(gateway.url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
    const client = new OpenAI({
      baseURL: `${gateway.url}/v1`,
      apiKey: "unused",
      maxRetries: 0,
      fetch: undiciFetch as unknown as typeof fetch,
      fetchOptions: { dispatcher: agent() } as never,
    });
    const got = await client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "Hello!" }],
      max_tokens: 3,
      // Sampled: the tiny model may pick its end-of-sequence token first.
      ignore_eos: true,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(got.usage?.completion_tokens).toBe(3);
    expect(await grpcLive(readFileSync(pki.ca))).toBe(true);
    // A client that does not trust the CA refuses the server.
    await expect(grpcLive(null)).rejects.toThrow();
    await expect(fetch(`${gateway.url}/health`)).rejects.toThrow();
    // The same port in plain HTTP: no HTTP answer.
    await expect(fetch(gateway.url.replace("https:", "http:") + "/health")).rejects.toThrow();
    expect(gateway.log()).toMatch(/TLS on the HTTP and gRPC APIs: CN=nats, valid until /);
    // The metrics port stays plain HTTP (Prometheus scrapes it).
    const metricsPort = /metrics on :(\d+)/.exec(gateway.log())![1];
    const metrics = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
    expect(await metrics.text()).toContain("expertmesh_gateway_");
  });

  it("takes a renewed certificate from its files for new connections on both ports, without a restart", async () => {
    const [http, grpc] = [Number(new URL(gateway.url).port), grpcPort];
    expect(await servedCn(http)).toBe("nats");
    expect(await servedCn(grpc)).toBe("nats");
    // Half a renewal (the certificate first) is not used: its key is the old one.
    copyFileSync(pki.route.cert, join(dir, "tls.crt"));
    await waitFor("the half renewal logged", async () =>
      /TLS files changed but cannot be used \(the previous ones stay\): .*is not the key of/.test(
        gateway.log(),
      )
        ? true
        : undefined,
    );
    expect(await servedCn(http)).toBe("nats");
    copyFileSync(pki.route.key, join(dir, "tls.key"));
    await waitFor("the new certificate served", async () =>
      (await servedCn(http)) === "nats-route" ? true : undefined,
    );
    await waitFor("the new certificate served on gRPC", async () =>
      (await servedCn(grpc)) === "nats-route" ? true : undefined,
    );
    expect(gateway.log()).toMatch(/TLS files reloaded \(.*tls\.crt\): CN=nats-route, valid until /);
    expect(await grpcLive(readFileSync(pki.ca))).toBe(true);
    const health = await undiciFetch(`${gateway.url}/health`, { dispatcher: agent() });
    expect(health.status).toBe(200);
  });

  it("refuses TLS files that are not what they claim before the weights load (EM_GATEWAY_TLS, EM_CLI_FILE, EM_CLI_USAGE)", async () => {
    const garbage = join(dir, "garbage.pem");
    writeFileSync(garbage, "not a certificate\n");
    const run = (...args: string[]) => runGatewayToExit(modelDir, args);
    const cases: [string[], RegExp][] = [
      [
        [`--tls-cert=${garbage}`, `--tls-key=${pki.server.key}`],
        /\[EM_GATEWAY_TLS\] --tls-cert .* holds no PEM certificate/,
      ],
      [
        [`--tls-cert=${pki.server.cert}`, `--tls-key=${garbage}`],
        /\[EM_GATEWAY_TLS\] --tls-key .* is not a readable PEM private key/,
      ],
      [
        [`--tls-cert=${pki.server.cert}`, `--tls-key=${pki.client.key}`],
        /\[EM_GATEWAY_TLS\] --tls-key .* is not the key of --tls-cert .* \(CN=nats\)/,
      ],
      [
        [`--tls-cert=${join(dir, "absent.crt")}`, `--tls-key=${pki.server.key}`],
        /\[EM_CLI_FILE\] --tls-cert .*absent\.crt: cannot read it: no such file/,
      ],
      [[`--tls-cert=${pki.server.cert}`], /\[EM_CLI_USAGE\] --tls-cert needs --tls-key/],
      [
        [
          `--tls-cert=${pki.server.cert}`,
          `--tls-key=${pki.server.key}`,
          `--tls-client-ca=${garbage}`,
        ],
        /\[EM_GATEWAY_TLS\] --tls-client-ca .*garbage\.pem holds no PEM certificate/,
      ],
      [
        [`--tls-client-ca=${pki.ca}`],
        /\[EM_CLI_USAGE\] --tls-client-ca needs --tls-cert and --tls-key/,
      ],
    ];
    for (const [args, want] of cases) {
      const r = await run(...args);
      expect(r.code, args.join(" ")).toBe(1);
      expect(r.stderr).toMatch(want);
      expect(r.stderr).not.toContain("loading weights");
    }
  });
});

describe("gateway --tls-client-ca (mutual TLS)", () => {
  let mtls: GatewayProcess;
  let mtlsGrpc: number;
  let metricsPort: string;
  const clientCa = () => join(dir, "client-ca.crt");
  /** An undici Agent trusting the test CA, presenting `client`'s certificate if given. */
  const clientAgent = (client?: { cert: string; key: string }) =>
    new Agent({
      connect: {
        ca: readFileSync(pki.ca),
        ...(client ? { cert: readFileSync(client.cert), key: readFileSync(client.key) } : {}),
      },
    });
  const openai = (client?: { cert: string; key: string }) =>
    new OpenAI({
      baseURL: `${mtls.url}/v1`,
      apiKey: "unused",
      maxRetries: 0,
      fetch: undiciFetch as unknown as typeof fetch,
      fetchOptions: { dispatcher: clientAgent(client) } as never,
    });
  const httpOk = async (client?: { cert: string; key: string }) => {
    try {
      const r = await undiciFetch(`${mtls.url}/health`, { dispatcher: clientAgent(client) });
      return r.status === 200;
    } catch {
      return false;
    }
  };
  const grpcOk = (client?: { cert: string; key: string }) =>
    grpcLive(readFileSync(pki.ca), mtlsGrpc, client).then(
      () => true,
      () => false,
    );

  beforeAll(async () => {
    copyFileSync(pki.ca, clientCa());
    mtlsGrpc = await freePort();
    mtls = await startGatewayProcess({
      modelDir,
      namespace: "test",
      modelName: "gateway-mtls",
      args: [
        `--tls-cert=${pki.server.cert}`,
        `--tls-key=${pki.server.key}`,
        `--tls-client-ca=${clientCa()}`,
        `--grpc-port=${mtlsGrpc}`,
        "--log-requests",
      ],
      env: { ...process.env, EM_FILE_RELOAD_INTERVAL_MS: "200" },
    });
    metricsPort = /metrics on :(\d+)/.exec(mtls.log())![1]!;
  });
  afterAll(async () => {
    await mtls?.process.stop();
  });

  it("serves both APIs to a client with a certificate the CA signed, and refuses one without, or with another CA's", async () => {
    const got = await openai(pki.client).chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "Hello!" }],
      max_tokens: 2,
      ignore_eos: true,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(got.usage?.completion_tokens).toBe(2);
    expect(await grpcOk(pki.client)).toBe(true);
    // The request log names the client by its certificate, on both APIs (the gateway's
    // log reaches its file after the answer reaches the client: CI at 5e483f9 read it first).
    for (const line of [
      /request \S+ POST \/v1\/chat\/completions 200 .*client="expertmesh"/,
      /rpc \S+ \/inference\.GRPCInferenceService\/ServerLive OK .*client="expertmesh"/,
    ])
      await waitFor(`the log line ${line}`, async () => (line.test(mtls.log()) ? true : undefined));
    expect(mtls.log()).toMatch(
      /TLS on the HTTP and gRPC APIs: CN=nats, valid until .*; client certificates required, signed by CN=expertmesh-test-nats-ca/,
    );
    // Refused at the handshake: no request reaches the API.
    await expect(
      openai().chat.completions.create({
        model: "tiny",
        messages: [{ role: "user", content: "Hello!" }],
        max_tokens: 2,
      }),
    ).rejects.toThrow(/Connection error/);
    expect(await httpOk()).toBe(false);
    expect(await httpOk(pki.otherClient)).toBe(false);
    expect(await grpcOk()).toBe(false);
    expect(await grpcOk(pki.otherClient)).toBe(false);
  });

  it("is measured by `expertmesh bench` with --cacert and a client certificate; without them, bench says it got no answer", async () => {
    const bench = (args: string[]) =>
      runCli(process.execPath, [
        mainTs,
        "bench",
        `--url=${mtls.url}`,
        "--concurrency=2",
        "--requests=2",
        "--max-tokens=3",
        "--json=-",
        ...args,
      ]);
    const r = await bench([
      `--cacert=${pki.ca}`,
      `--cert=${pki.client.cert}`,
      `--key=${pki.client.key}`,
    ]);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout) as {
      levels: { succeeded: number; outputTokens: number }[];
    };
    expect(report.levels).toEqual([expect.objectContaining({ succeeded: 2, outputTokens: 6 })]);
    // The CA trusted but no client certificate: refused at the handshake.
    const noCert = await bench([`--cacert=${pki.ca}`]);
    expect(noCert.code).toBe(1);
    expect(noCert.stderr).toMatch(/\[EM_BENCH_UNREACHABLE\] no answer from https:/);
    // The system CAs only: the server's certificate is not trusted.
    const noCa = await bench([]);
    expect(noCa.code).toBe(1);
    expect(noCa.stderr).toMatch(/\[EM_BENCH_UNREACHABLE\] .*certificate/i);
  });

  it("answers the probes' /health and /ready on the plain metrics port", async () => {
    const health = await fetch(`http://127.0.0.1:${metricsPort}/health`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: "ok" });
    expect((await fetch(`http://127.0.0.1:${metricsPort}/ready`)).status).toBe(200);
    expect(await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text()).toContain(
      "expertmesh_gateway_",
    );
  });

  it("takes a new client CA from its file without a restart: a bundle with a second CA admits that CA's clients on both ports", async () => {
    expect(await httpOk(pki.otherClient)).toBe(false);
    writeFileSync(clientCa(), readFileSync(pki.ca, "utf8") + readFileSync(pki.otherCa, "utf8"));
    await waitFor("the other CA's client admitted", async () =>
      (await httpOk(pki.otherClient)) ? true : undefined,
    );
    await waitFor("the other CA's client admitted on gRPC", async () =>
      (await grpcOk(pki.otherClient)) ? true : undefined,
    );
    expect(await httpOk(pki.client)).toBe(true);
    expect(await httpOk()).toBe(false);
    expect(mtls.log()).toMatch(/request \S+ GET \/health 200 .*client="expertmesh-next"/);
    expect(mtls.log()).toMatch(
      /TLS files reloaded .*signed by CN=expertmesh-test-nats-ca or CN=some-other-ca/,
    );
    // A CA file that is no certificate is not taken: the bundle stays.
    writeFileSync(clientCa(), "not a certificate\n");
    await waitFor("the bad CA file logged", async () =>
      /TLS files changed but cannot be used \(the previous ones stay\): --tls-client-ca .* holds no PEM certificate/.test(
        mtls.log(),
      )
        ? true
        : undefined,
    );
    expect(await httpOk(pki.otherClient)).toBe(true);
  });
});
