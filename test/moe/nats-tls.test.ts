// NATS over TLS against real nats-servers with TLS on (one verifying clients: mutual TLS):
// shards, a gateway and `generate --distributed` connect with --nats-tls-ca/-cert/-key and
// every connection the server holds is encrypted; what cannot be trusted is refused with the
// reason (EM_NATS_CONNECT), and TLS files that are not what they claim are refused before the
// weights load (EM_NATS_TLS).
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type NatsServer, startNats } from "../env/nats.ts";
import { makeNatsPki, type NatsPki } from "../env/pki.ts";
import { freePort } from "../env/process.ts";
import { runCli } from "../support/cli.ts";
import { testEnv } from "../support/env.ts";
import { type GatewayProcess, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, startShard, startShards, stopAll, waitServing } from "../support/shards.ts";

const main = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const expertmesh = (args: string[]) => runCli(process.execPath, [main, ...args]);

let pki: NatsPki;
let dir: string;
/** Mutual TLS: clients must present a certificate pki.ca signed. */
let mtls: NatsServer;
/** TLS with a certificate for another host name than 127.0.0.1. */
let elsewhere: NatsServer;
let modelDir: string;
let cluster: Cluster | undefined;
let gateway: GatewayProcess | undefined;

const tlsArgs = () => [
  `--nats-tls-ca=${pki.ca}`,
  `--nats-tls-cert=${pki.client.cert}`,
  `--nats-tls-key=${pki.client.key}`,
];

beforeAll(async () => {
  dir = mkdtempSync(join(testEnv().runDir, "nats-tls-"));
  pki = makeNatsPki(dir);
  const logs = join(testEnv().runDir, "logs");
  const bin = testEnv().binaries.natsServer;
  mtls = await startNats(bin, join(dir, "mtls"), logs, {
    name: "nats-mtls",
    tls: { ...pki.server, verifyClientsCa: pki.ca },
  });
  elsewhere = await startNats(bin, join(dir, "elsewhere"), logs, {
    name: "nats-tls-elsewhere",
    jetStream: false,
    tls: pki.elsewhere,
  });
  modelDir = await tinyCheckpointFor("tiny-v3");
});

afterAll(async () => {
  await gateway?.process.stop();
  await stopAll(cluster);
  await mtls?.process.stop();
  await elsewhere?.process.stop();
});

describe.sequential("NATS over TLS", () => {
  it("shards, a gateway and generate --distributed over mutual TLS: every connection encrypted, the tokens those of one process", async () => {
    cluster = await startShards(modelDir, 2, { natsUrl: mtls.info.url, args: tlsArgs() });
    gateway = await startGatewayProcess({
      modelDir,
      planPath: cluster.planPath,
      natsUrl: mtls.info.url,
      namespace: "test",
      modelName: cluster.modelName,
      args: tlsArgs(),
    });
    const answer = await gateway.client.completions.create({
      model: "tiny",
      prompt: "Hello",
      max_tokens: 8,
      temperature: 0,
    });
    expect(answer.usage?.completion_tokens).toBe(8);
    expect(answer.choices[0]?.finish_reason).toBe("length");

    const generate = (extra: string[]) =>
      expertmesh([
        "generate",
        `--model=${modelDir}`,
        "--prompt=Hello",
        "--max-tokens=12",
        "--temperature=0",
        ...extra,
      ]);
    const local = await generate([]);
    const remote = await generate([
      "--distributed",
      `--nats=${mtls.info.url}`,
      `--plan=${cluster.planPath}`,
      "--namespace=test",
      `--model-name=${cluster.modelName}`,
      "--wire=f32", // bf16 activations on the wire change a random model's tokens
      ...tlsArgs(),
    ]);
    expect(remote.code, remote.stderr).toBe(0);
    expect(local.code, local.stderr).toBe(0);
    expect(remote.stdout.length).toBeGreaterThan(1);
    expect(remote.stdout).toBe(local.stdout);

    // What the server holds: the shards and the gateway, each over TLS 1.3.
    const connz = (await (await fetch(`${mtls.info.monitorUrl}/connz?limit=1000`)).json()) as {
      connections: { name?: string; tls_version?: string }[];
    };
    const ours = connz.connections.filter((c) => c.name?.startsWith("expertmesh-"));
    expect(ours.filter((c) => c.name!.startsWith("expertmesh-gateway-"))).toHaveLength(1);
    expect(ours.filter((c) => c.name!.startsWith("expertmesh-shard-"))).toHaveLength(2);
    for (const c of ours) expect(c.tls_version, c.name).toBe("1.3");
  });

  it("reads the files again when it reconnects: a client certificate rotated in place is used after a server restart", async () => {
    // The shard's files in a folder of their own, as a mounted Secret's.
    const files = join(dir, "rotating");
    mkdirSync(files);
    const at = (name: string) => join(files, name);
    copyFileSync(pki.ca, at("ca.crt"));
    copyFileSync(pki.client.cert, at("tls.crt"));
    copyFileSync(pki.client.key, at("tls.key"));
    const port = await freePort();
    const logs = join(testEnv().runDir, "logs");
    const start = (clientCa: string) =>
      startNats(testEnv().binaries.natsServer, join(dir, "rotating-nats"), logs, {
        port,
        name: "nats-mtls-rotating",
        jetStream: false,
        tls: { ...pki.server, verifyClientsCa: clientCa },
      });
    let server = await start(pki.ca);
    const shard = startShard(
      modelDir,
      cluster!.planPath,
      "rotating",
      0,
      "r0",
      server.info.url,
      "test",
      {
        args: [
          `--nats-tls-ca=${at("ca.crt")}`,
          `--nats-tls-cert=${at("tls.crt")}`,
          `--nats-tls-key=${at("tls.key")}`,
        ],
      },
    );
    const shardOnServer = async () => {
      const connz = (await (await fetch(`${server.info.monitorUrl}/connz`)).json()) as {
        connections: { name?: string; tls_version?: string }[];
      };
      return connz.connections.some(
        (c) => c.name?.startsWith("expertmesh-shard-0-r0") && c.tls_version === "1.3",
      );
    };
    try {
      await waitServing(shard);
      expect(await shardOnServer()).toBe(true);
      // The client certificate is renewed by another CA, which the restarted server now
      // requires: only the new files get the shard back in.
      await server.process.stop();
      copyFileSync(pki.otherClient.cert, at("tls.crt"));
      copyFileSync(pki.otherClient.key, at("tls.key"));
      server = await start(pki.otherCa);
      await shard.waitUntil("reconnected with the new certificate", shardOnServer, 20_000);
      expect(shard.exited).toBe(false);
    } finally {
      await shard.stop(3000);
      await server.process.stop();
    }
  });

  it("refuses a server it cannot trust, or one without TLS, and is refused without a client certificate the server trusts, at once and saying why (EM_NATS_CONNECT)", async () => {
    const shard = (url: string, ...extra: string[]) =>
      expertmesh([
        "shard",
        `--model=${modelDir}`,
        `--plan=${cluster!.planPath}`,
        "--shard=0",
        `--nats=${url}`,
        "--nats-wait=0",
        "--metrics-port=0",
        ...extra,
      ]);
    const untrusted =
      /\[EM_NATS_CONNECT\] cannot connect to NATS at .*: the server's TLS certificate is not trusted \(.*\): give the CA that signed it \(--nats-tls-ca/;
    // No CA: Node's public roots do not know the test CA.
    const noCa = await shard(mtls.info.url);
    expect(noCa.code).toBe(1);
    expect(noCa.stderr).toMatch(untrusted);
    // Another CA.
    const otherCa = await shard(elsewhere.info.url, `--nats-tls-ca=${pki.otherCa}`);
    expect(otherCa.stderr).toMatch(untrusted);
    // The right CA, a certificate for another host.
    const wrongHost = await shard(elsewhere.info.url, `--nats-tls-ca=${pki.ca}`);
    expect(wrongHost.code).toBe(1);
    expect(wrongHost.stderr).toMatch(
      /\[EM_NATS_CONNECT\] .*: the server's TLS certificate is not for this host \(.*nats\.invalid\): connect by a name the certificate holds/,
    );
    // TLS asked of a server without it: by the files, or by a tls:// URL alone.
    const plain = testEnv().nats.url;
    const tlsOff =
      /\[EM_NATS_CONNECT\] .*: the server does not offer TLS, which this connection requires/;
    const byFiles = await shard(plain, `--nats-tls-ca=${pki.ca}`);
    expect(byFiles.stderr).toMatch(tlsOff);
    const byScheme = await shard(plain.replace("nats://", "tls://"));
    expect(byScheme.code).toBe(1);
    expect(byScheme.stderr).toMatch(tlsOff);
    // A server that verifies clients: no client certificate, or one another CA signed. The
    // server's TLS alert, at once (nats.js alone would retry until its 20 s timeout).
    const noCert = await shard(mtls.info.url, `--nats-tls-ca=${pki.ca}`);
    expect(noCert.code).toBe(1);
    expect(noCert.stderr).toMatch(
      /\[EM_NATS_CONNECT\] .*: the server requires a client certificate \(mutual TLS\) and this connection gave none: give one its CA signed \(--nats-tls-cert and --nats-tls-key/,
    );
    const otherClient = await shard(
      mtls.info.url,
      `--nats-tls-ca=${pki.ca}`,
      `--nats-tls-cert=${pki.otherClient.cert}`,
      `--nats-tls-key=${pki.otherClient.key}`,
    );
    expect(otherClient.code).toBe(1);
    expect(otherClient.stderr).toMatch(
      /\[EM_NATS_CONNECT\] .*: the server does not accept this connection's client certificate \((?:tlsv1 alert unknown ca|the server verifies client certificates and dropped the connection at the handshake)\): give one signed by the CA it verifies clients with/,
    );
    for (const r of [noCa, otherCa, wrongHost, byFiles, byScheme, noCert, otherClient]) {
      expect(r.stderr).not.toContain("trying for up to"); // refused, not waited for
      expect(r.stderr).not.toContain("serving ");
    }
  });

  it("refuses TLS files that are not what they claim before the weights load (EM_NATS_TLS, EM_CLI_FILE)", async () => {
    const garbage = join(dir, "garbage.pem");
    writeFileSync(garbage, "not a certificate\n");
    const damaged = join(dir, "damaged.crt");
    writeFileSync(
      damaged,
      readFileSync(pki.ca, "utf8").replace(/\n[A-Za-z0-9+/]{64}\n/, "\nAAAA\n"),
    );
    const run = (command: "shard" | "gateway", ...extra: string[]) =>
      expertmesh([
        command,
        `--model=${modelDir}`,
        `--plan=${cluster!.planPath}`,
        `--nats=${mtls.info.url}`,
        "--metrics-port=0",
        ...(command === "shard" ? ["--shard=0"] : ["--http-port=0"]),
        ...extra,
      ]);
    const cases: [string[], RegExp][] = [
      [
        [`--nats-tls-ca=${garbage}`],
        /\[EM_NATS_TLS\] --nats-tls-ca .*garbage\.pem holds no PEM certificate/,
      ],
      [
        [`--nats-tls-ca=${damaged}`],
        /\[EM_NATS_TLS\] --nats-tls-ca .*damaged\.crt is not a readable PEM certificate/,
      ],
      [
        [`--nats-tls-cert=${pki.client.cert}`],
        /\[EM_NATS_TLS\] --nats-tls-cert .*nats-client\.crt is given without --nats-tls-key: a client certificate needs its key/,
      ],
      [
        [`--nats-tls-key=${pki.client.key}`],
        /\[EM_NATS_TLS\] --nats-tls-key .*nats-client\.key is given without --nats-tls-cert/,
      ],
      [
        [`--nats-tls-cert=${pki.client.cert}`, `--nats-tls-key=${garbage}`],
        /\[EM_NATS_TLS\] --nats-tls-key .*garbage\.pem is not a readable PEM private key/,
      ],
      [
        [`--nats-tls-cert=${pki.client.cert}`, `--nats-tls-key=${pki.server.key}`],
        /\[EM_NATS_TLS\] --nats-tls-key .*nats-server\.key is not the key of --nats-tls-cert .*nats-client\.crt \(CN=expertmesh\)/,
      ],
      [
        [`--nats-tls-ca=${join(dir, "no-such.crt")}`],
        /\[EM_CLI_FILE\] --nats-tls-ca .*no-such\.crt: cannot read it: no such file/,
      ],
    ];
    for (const [flags, message] of cases) {
      const r = await run("shard", ...flags);
      expect(r.code, flags.join(" ")).toBe(1);
      expect(r.stderr, flags.join(" ")).toMatch(message);
      expect(r.stderr).not.toContain("loading experts");
    }
    const gw = await run("gateway", `--nats-tls-cert=${pki.client.cert}`);
    expect(gw.code).toBe(1);
    expect(gw.stderr).toMatch(/\[EM_NATS_TLS\] --nats-tls-cert .* is given without --nats-tls-key/);
    expect(gw.stderr).not.toContain("loading weights");
  });
});
