// Who the processes are to NATS, against real nats-servers that require it (ADR 0032): a
// user and password, a token, an NKEY seed, and .creds files of an operator-mode server
// (JWTs signed as nsc signs them). Shards, a gateway and `generate --distributed` connect
// each way; credentials the server refuses are EM_NATS_CONNECT at once, files that are not
// what they claim EM_NATS_AUTH before the weights load; and the files are read again at each
// reconnect, so an expiring .creds renewed in place, or a password changed with the server's,
// keeps a shard in service.
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { nkeys } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type NatsServer, startNats } from "../env/nats.ts";
import { makeNatsJwtAuth, type NatsJwtAuth } from "../env/nats-jwt.ts";
import { freePort } from "../env/process.ts";
import { runCli } from "../support/cli.ts";
import { testEnv } from "../support/env.ts";
import { type GatewayProcess, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, startShard, startShards, stopAll, waitServing } from "../support/shards.ts";

const main = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const expertmesh = (args: string[]) => runCli(process.execPath, [main, ...args]);

let dir: string;
let logs: string;
let modelDir: string;
/** Users by password and by NKEY. */
let users: NatsServer;
/** One token. */
let tokens: NatsServer;
/** Operator mode: users by .creds. */
let operator: NatsServer;
let jwtAuth: NatsJwtAuth;
/** A one-shard plan of the tiny model, for shards started by hand. */
let planPath: string;
const cleanup: (() => Promise<unknown>)[] = [];

/** A file under the test's folder holding `text`; its path. */
const file = (name: string, text: string | Uint8Array) => {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
};
const seed = nkeys.createUser();
const seedText = new TextDecoder().decode(seed.getSeed());
const natsBin = () => testEnv().binaries.natsServer;

/** Flags of each way in, and the server that takes them. */
const ways = () =>
  ({
    "user and password": {
      server: users,
      args: [
        "--nats-user=alice",
        `--nats-password-file=${file("alice.password", "s3cret pass\n")}`,
      ],
    },
    "NKEY seed": { server: users, args: [`--nats-nkey=${file("user.nk", `${seedText}\n`)}`] },
    token: { server: tokens, args: [`--nats-token-file=${file("token", "t0ken-abc\n")}`] },
    ".creds": {
      server: operator,
      args: [`--nats-creds=${file("alice.creds", jwtAuth.user("alice"))}`],
    },
  }) as const;

beforeAll(async () => {
  dir = mkdtempSync(join(testEnv().runDir, "nats-auth-"));
  logs = join(testEnv().runDir, "logs");
  jwtAuth = makeNatsJwtAuth();
  users = await startNats(natsBin(), join(dir, "users"), logs, {
    name: "nats-users",
    jetStream: false,
    config: [
      "authorization { users = [",
      `  { user: alice, password: "s3cret pass" }`,
      `  { nkey: ${seed.getPublicKey()} }`,
      // One model's user: its subjects, replies included, and nothing else.
      '  { user: fenced, password: "fenced-pw", permissions: { publish: "em.test.fenced.>", subscribe: "em.test.fenced.>" } }',
      "] }",
    ],
  });
  tokens = await startNats(natsBin(), join(dir, "tokens"), logs, {
    name: "nats-token",
    jetStream: false,
    config: [`authorization { token: "t0ken-abc" }`],
  });
  operator = await startNats(natsBin(), join(dir, "operator"), logs, {
    name: "nats-operator",
    jetStream: false,
    config: jwtAuth.serverConfig,
  });
  modelDir = await tinyCheckpointFor("tiny-v3");
  const plan = await expertmesh(["plan", "--preset=tiny-v3", "--shards=1", "--json"]);
  expect(plan.code, plan.stderr).toBe(0);
  planPath = file("plan.json", plan.stdout);
});

afterAll(async () => {
  for (const stop of cleanup.reverse()) await stop();
  for (const s of [users, tokens, operator]) await s?.process.stop();
});

/** The names of the connections a server holds. */
async function connectionNames(server: NatsServer): Promise<string[]> {
  const connz = (await (await fetch(`${server.info.monitorUrl}/connz?limit=1000`)).json()) as {
    connections: { name?: string }[];
  };
  return connz.connections.map((c) => c.name ?? "");
}

/**
 * `generate --distributed` of `model` on `url` with `args`, and the same in one process:
 * their outputs must be equal.
 */
async function expectDistributedAsLocal(
  url: string,
  plan: string,
  model: string,
  args: readonly string[],
) {
  const generate = (extra: readonly string[]) =>
    expertmesh([
      "generate",
      `--model=${modelDir}`,
      "--prompt=Hello",
      "--max-tokens=8",
      "--temperature=0",
      ...extra,
    ]);
  const [local, remote] = await Promise.all([
    generate([]),
    generate([
      "--distributed",
      `--nats=${url}`,
      `--plan=${plan}`,
      "--namespace=test",
      `--model-name=${model}`,
      "--wire=f32", // bf16 activations on the wire change a random model's tokens
      ...args,
    ]),
  ]);
  expect(remote.code, remote.stderr).toBe(0);
  expect(local.code, local.stderr).toBe(0);
  expect(remote.stdout.length).toBeGreaterThan(1);
  expect(remote.stdout).toBe(local.stdout);
}

/** `expertmesh shard` (shard 0 of the one-shard plan) on `url` with `extra`, to its exit. */
const runShard = (url: string, ...extra: string[]) =>
  expertmesh([
    "shard",
    `--model=${modelDir}`,
    `--plan=${planPath}`,
    "--shard=0",
    `--nats=${url}`,
    "--metrics-port=0",
    ...extra,
  ]);

/** A gateway of `model` on `url` with `args` answers a completion through the shards. */
async function expectGatewayAnswers(
  url: string,
  plan: string,
  model: string,
  args: readonly string[],
) {
  const gateway: GatewayProcess = await startGatewayProcess({
    modelDir,
    planPath: plan,
    natsUrl: url,
    namespace: "test",
    modelName: model,
    args: [...args],
  });
  cleanup.push(() => gateway.process.stop());
  try {
    const answer = await gateway.client.completions.create({
      model: "tiny",
      prompt: "Hello",
      max_tokens: 6,
      temperature: 0,
    });
    expect(answer.usage?.completion_tokens).toBe(6);
  } finally {
    await gateway.process.stop();
  }
}

describe.sequential("NATS authentication", () => {
  it.each(["user and password", "NKEY seed", "token", ".creds"] as const)(
    "by %s: a shard and generate --distributed connect, the tokens those of one process",
    async (way) => {
      const { server, args } = ways()[way];
      const cluster: Cluster = await startShards(modelDir, 1, {
        natsUrl: server.info.url,
        args: [...args],
      });
      cleanup.push(() => stopAll(cluster));
      await expectDistributedAsLocal(server.info.url, cluster.planPath, cluster.modelName, args);
      expect(await connectionNames(server)).toContainEqual(
        expect.stringMatching(/^expertmesh-shard-0-/),
      );
      await stopAll(cluster);
    },
  );

  it("a gateway by NKEY answers through its shard", async () => {
    const { server, args } = ways()["NKEY seed"];
    const cluster = await startShards(modelDir, 1, { natsUrl: server.info.url, args: [...args] });
    cleanup.push(() => stopAll(cluster));
    await expectGatewayAnswers(server.info.url, cluster.planPath, cluster.modelName, args);
    await stopAll(cluster);
  });

  it("a user allowed only em.<ns>.<model>.> serves that model: a model's processes say nothing outside it, replies included", async () => {
    const fenced = [
      "--nats-user=fenced",
      `--nats-password-file=${file("fenced.password", "fenced-pw")}`,
    ];
    const url = users.info.url;
    const shard = startShard(modelDir, planPath, "fenced", 0, "f0", url, "test", {
      args: fenced,
    });
    cleanup.push(() => shard.stop(3000));
    await waitServing(shard);
    await expectDistributedAsLocal(url, planPath, "fenced", fenced);
    await expectGatewayAnswers(url, planPath, "fenced", fenced);
    // Nothing refused on the way: the server logs each permissions violation.
    expect(readFileSync(users.process.logPath, "utf8")).not.toMatch(/[Pp]ermissions [Vv]iolation/);
    await shard.stop(3000);

    // Another model's subjects: refused, and a shard or gateway stops rather than sit deaf.
    const [otherShard, otherGateway] = await Promise.all([
      runShard(url, "--namespace=test", "--model-name=other", ...fenced),
      expertmesh([
        "gateway",
        `--model=${modelDir}`,
        `--plan=${planPath}`,
        `--nats=${url}`,
        "--namespace=test",
        "--model-name=other",
        "--http-port=0",
        "--metrics-port=0",
        "--shutdown-delay=0",
        ...fenced,
      ]),
    ]);
    expect(otherShard.code, otherShard.stderr).toBe(1);
    expect(otherShard.stderr).toMatch(
      /\[EM_NATS_PERMISSION\] NATS refused the subscription to em\.test\.other\.(shard\.0\.w[0-9a-f]{16} \(queue group shard-0\)|control\.plan): this process's NATS user needs publish and subscribe on em\.test\.other\.>/,
    );
    expect(otherGateway.code, otherGateway.stderr).toBe(1);
    expect(otherGateway.stderr).toMatch(
      /\[EM_NATS_PERMISSION\] NATS refused the subscription to em\.test\.other\.\S+: .* on em\.test\.other\.>/,
    );
  });

  it("refuses credentials the server does not know at once, saying so (EM_NATS_CONNECT)", async () => {
    const shard = runShard;
    const refused =
      /\[EM_NATS_CONNECT\] cannot connect to NATS at .*: the server refused this connection's credentials \(Authorization Violation\): give the ones it knows/;
    const results = await Promise.all([
      shard(users.info.url),
      shard(
        users.info.url,
        "--nats-user=alice",
        `--nats-password-file=${file("wrong.password", "guess\n")}`,
      ),
      shard(users.info.url, `--nats-nkey=${file("other.nk", nkeys.createUser().getSeed())}`),
      shard(tokens.info.url, `--nats-token-file=${file("wrong.token", "t0ken-abd")}`),
      shard(operator.info.url, `--nats-creds=${file("stranger.creds", jwtAuth.stranger("eve"))}`),
      shard(operator.info.url, `--nats-creds=${file("expired.creds", jwtAuth.user("old", -60))}`),
    ]);
    for (const r of results) {
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(refused);
      expect(r.stderr).not.toContain("trying for up to"); // refused, not waited for (--nats-wait 60)
      expect(r.stderr).not.toContain("guess");
    }
  });

  it("refuses credentials that are not what they claim before the weights load (EM_NATS_AUTH)", async () => {
    const run = (command: "shard" | "gateway", url: string, ...extra: string[]) =>
      expertmesh([
        command,
        `--model=${modelDir}`,
        `--plan=${planPath}`,
        `--nats=${url}`,
        "--metrics-port=0",
        ...(command === "shard" ? ["--shard=0"] : ["--http-port=0"]),
        ...extra,
      ]);
    const password = file("ok.password", "pw");
    const url = users.info.url;
    const cases: [string[], RegExp][] = [
      [
        ["--nats-user=alice", `--nats-password-file=${file("empty.password", "\n")}`],
        /\[EM_NATS_AUTH\] --nats-password-file .*empty\.password is empty/,
      ],
      [["--nats-user=alice"], /\[EM_NATS_AUTH\] a NATS user needs its password/],
      [
        [`--nats-password-file=${password}`],
        /\[EM_NATS_AUTH\] --nats-password-file needs the user/,
      ],
      [
        [`--nats-user-file=${file("two.user", "ali ce")}`, `--nats-password-file=${password}`],
        /\[EM_NATS_AUTH\] --nats-user-file .*two\.user holds white space/,
      ],
      [
        [`--nats-token-file=${file("empty.token", "")}`],
        /\[EM_NATS_AUTH\] --nats-token-file .*empty\.token is empty/,
      ],
      [
        [`--nats-nkey=${file("public.nk", seed.getPublicKey())}`],
        /\[EM_NATS_AUTH\] --nats-nkey .*public\.nk is not an NKEY user seed: it must start with SU/,
      ],
      [
        [`--nats-nkey=${file("account.nk", nkeys.createAccount().getSeed())}`],
        /\[EM_NATS_AUTH\] --nats-nkey .*account\.nk is not an NKEY user seed/,
      ],
      [
        [`--nats-nkey=${file("damaged.nk", `${seedText.slice(0, -3)}AAA`)}`],
        /\[EM_NATS_AUTH\] --nats-nkey .*damaged\.nk is not an NKEY user seed: /,
      ],
      [
        [`--nats-creds=${file("garbage.creds", "not creds\n")}`],
        /\[EM_NATS_AUTH\] --nats-creds .*garbage\.creds is not a NATS \.creds file: it lacks the user JWT/,
      ],
      [
        [`--nats-token-file=${password}`, `--nats-nkey=${file("x.nk", seedText)}`],
        /\[EM_NATS_AUTH\] --nats-token-file, --nats-nkey: a NATS connection authenticates one way/,
      ],
      [
        [],
        /\[EM_NATS_AUTH\] the NATS URL nats:\/\/\*\*\*@127\.0\.0\.1:\d+ holds credentials, which are not read from a URL/,
      ],
      [
        [`--nats-nkey=${join(dir, "no-such.nk")}`],
        /\[EM_CLI_FILE\] --nats-nkey .*no-such\.nk: cannot read it: no such file/,
      ],
    ];
    const withSecretUrl = url.replace("nats://", "nats://alice:hunter2@");
    const results = await Promise.all(
      cases.map(([flags], i) =>
        run("shard", i === cases.length - 2 ? withSecretUrl : url, ...flags),
      ),
    );
    cases.forEach(([flags, message], i) => {
      const r = results[i]!;
      expect(r.code, flags.join(" ")).toBe(1);
      expect(r.stderr, flags.join(" ")).toMatch(message);
      expect(r.stderr).not.toContain("loading experts");
      expect(r.stderr).not.toContain("hunter2");
    });
    const gw = await run("gateway", url, "--nats-user=alice");
    expect(gw.code).toBe(1);
    expect(gw.stderr).toMatch(/\[EM_NATS_AUTH\] a NATS user needs its password/);
    expect(gw.stderr).not.toContain("loading weights");
  });

  it("reads the files again when it reconnects: an expiring .creds renewed in place, a password changed with the server's", async () => {
    // .creds whose JWT expires in 6 s, renewed (as a mounted Secret's) once the shard serves:
    // the server drops the connection at expiry, and the shard is back with the new JWT.
    const folder = join(dir, "rotating");
    mkdirSync(folder);
    const creds = join(folder, "nats.creds");
    writeFileSync(creds, jwtAuth.user("short-lived", 6));
    const shard = startShard(
      modelDir,
      planPath,
      "rotating",
      0,
      "creds",
      operator.info.url,
      "test",
      { args: [`--nats-creds=${creds}`] },
    );
    cleanup.push(() => shard.stop(3000));
    await waitServing(shard);
    writeFileSync(creds, jwtAuth.user("renewed"));
    // The server ended the first JWT's session (the shard logs why), and the shard is in.
    await shard.waitUntil(
      "expired and back with the renewed JWT",
      async () =>
        readFileSync(shard.logPath, "utf8").includes("NATS: User Authentication Expired") &&
        (await connectionNames(operator)).some((n) => n.startsWith("expertmesh-shard-0-creds")),
      20_000,
    );
    expect(shard.exited).toBe(false);
    await shard.stop(3000);

    // A password changed in the file and in the server's config (restarted on its port).
    const port = await freePort();
    const start = (password: string) =>
      startNats(natsBin(), join(dir, "rotating-users"), logs, {
        port,
        name: "nats-users-rotating",
        jetStream: false,
        config: [`authorization { users = [ { user: bob, password: "${password}" } ] }`],
      });
    let server = await start("first");
    const passwordFile = join(folder, "password");
    writeFileSync(passwordFile, "first\n");
    const bob = startShard(modelDir, planPath, "rotating", 0, "bob", server.info.url, "test", {
      args: ["--nats-user=bob", `--nats-password-file=${passwordFile}`],
    });
    cleanup.push(() => bob.stop(3000));
    try {
      await waitServing(bob);
      await server.process.stop();
      writeFileSync(passwordFile, "second\n");
      server = await start("second");
      await bob.waitUntil(
        "reconnected with the new password",
        async () =>
          (await connectionNames(server)).some((n) => n.startsWith("expertmesh-shard-0-bob")),
        20_000,
      );
      expect(bob.exited).toBe(false);
    } finally {
      await bob.stop(3000);
      await server.process.stop();
    }
  });
});
