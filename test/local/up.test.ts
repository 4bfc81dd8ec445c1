// `expertmesh up -f examples/tiny.yaml` end to end: it creates the tiny model, starts a
// nats-server, four shard processes and the gateway, reports the loading progress of every
// one of them (plain lines: stderr is a pipe here), serves the official openai client over
// HTTP and a @grpc/grpc-js client over gRPC, and Ctrl-C stops every process it started (a
// SIGKILL of `up` too: its children see their standard input end).
// Bad input (a bad port, no nats-server anywhere) fails at once with a stable code.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  type Client,
  type ClientReadableStream,
  credentials,
  type ServiceError,
} from "@grpc/grpc-js";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import OpenAI, { toFile } from "openai";
import { Agent, fetch as undiciFetch } from "undici";
import { afterAll, describe, expect, it } from "vitest";
import { denseLoadBytes } from "../../src/cli/progress.ts";
import { wantedFile } from "../../src/local/hf-hub.ts";
import { PROGRESS_PREFIX } from "../../src/local/progress.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { isMoeLayer } from "../../src/model/config.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";
import { Tokenizer } from "../../src/model/tokenizer.ts";
import { parsePlan } from "../../src/moe/plan-json.ts";
import { makeNatsPki } from "../env/pki.ts";
import { freePort } from "../env/process.ts";
import { runCli } from "../support/cli.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { GenerationClient, InferenceClient } from "../support/grpc.ts";
import { startStandInHub } from "../support/hub.ts";
import { alive, descendants, track } from "../support/procs.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));
const main = join(root, "src/cli/main.ts");
const manifest = join(root, "examples/tiny.yaml");

interface Up {
  proc: ChildProcess;
  models: string;
  out: () => string;
  err: () => string;
}

/**
 * `expertmesh up` on the tiny manifest with a fresh models folder; `detached`: in a process
 * group of its own, like a terminal's foreground job (for a Ctrl-C to the group).
 */
function spawnUp(
  port: number,
  grpcPort: number,
  detached: boolean,
  file = manifest,
  env: NodeJS.ProcessEnv = {},
  models = mkdtempSync(join(testEnv().runDir, "models-")),
  args: string[] = [],
  baseEnv: NodeJS.ProcessEnv = {
    ...process.env,
    EXPERTMESH_NATS_SERVER: testEnv().binaries.natsServer,
  },
): Up {
  const proc = spawn(
    process.execPath,
    [
      main,
      "up",
      "-f",
      file,
      `--models-dir=${models}`,
      `--http-port=${port}`,
      `--grpc-port=${grpcPort}`,
      ...args,
    ],
    {
      env: { ...baseEnv, ...env },
      stdio: ["ignore", "pipe", "pipe"],
      detached,
    },
  );
  let out = "";
  let err = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  return { proc, models, out: () => out, err: () => err };
}

/**
 * Resolves once `up` prints its HTTP endpoint (it has created the model and started all);
 * fails at once if `up` exits first.
 */
async function untilServing(u: Up, port: number): Promise<void> {
  const got = await waitFor(
    "the endpoint",
    async () =>
      u.out().includes(`http://127.0.0.1:${port}/v1`)
        ? "serving"
        : u.proc.exitCode !== null
          ? "exited"
          : undefined,
    90_000,
  ).catch((e) => {
    throw new Error(`${e}\n${u.err().slice(-3000)}`);
  });
  if (got === "exited") throw new Error(`up exited (${u.proc.exitCode})\n${u.err().slice(-3000)}`);
}

/** examples/tiny.yaml with `from` replaced by `to`, in a folder of its own: its path. */
function variantManifest(from: string, to: string): string {
  const text = readFileSync(manifest, "utf8");
  expect(text).toContain(from);
  const file = join(mkdtempSync(join(testEnv().runDir, "variant-")), "tiny.yaml");
  writeFileSync(file, text.replace(from, to));
  return file;
}

/**
 * `expertmesh up` on the tiny manifest with one piece of text replaced, serving: runs `body`,
 * then stops it with SIGINT and waits for it to exit.
 */
async function upWithVariant(
  [from, to]: [string, string],
  body: (started: Up, port: number) => Promise<void>,
  env: NodeJS.ProcessEnv = {},
  models?: string,
  args: string[] = [],
): Promise<void> {
  const file = variantManifest(from, to);
  const port = await freePort();
  const started = spawnUp(port, 0, true, file, env, models, args);
  const proc = started.proc;
  try {
    await untilServing(started, port);
    await body(started, port);
  } finally {
    if (proc.exitCode === null) process.kill(-proc.pid!, "SIGINT");
    await waitFor("up to exit", async () => (proc.exitCode !== null ? true : undefined), 30_000);
  }
}

/** Resolves with `up`'s exit code once it has exited (within 30 s). */
async function exitCodeOf(u: Up): Promise<number | null> {
  await waitFor("up to exit", async () => (u.proc.exitCode !== null ? true : undefined), 30_000);
  return u.proc.exitCode;
}

/** Ctrl-C in a terminal (SIGINT to `up`'s process group); resolves with its exit code. */
async function ctrlC(proc: ChildProcess): Promise<number | null> {
  process.kill(-proc.pid!, "SIGINT");
  await waitFor("up to exit", async () => (proc.exitCode !== null ? true : undefined), 30_000);
  return proc.exitCode;
}

/** The completion tokens of a greedy completion of `Hello` from the gateway on `port`. */
async function completionTokens(port: number, maxTokens: number): Promise<number | undefined> {
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
  const r = await client.completions.create({
    model: "tiny-v3",
    prompt: "Hello",
    max_tokens: maxTokens,
    temperature: 0,
  });
  return r.usage?.completion_tokens;
}

/** A process under `up` whose command line matches `pattern`. */
function pidUnder(u: Up, pattern: RegExp): number | undefined {
  return descendants(u.proc.pid!).find((pid) => {
    try {
      return pattern.test(readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " "));
    } catch {
      return false;
    }
  });
}

/** Resolves once `up`'s stderr has `text`; on a timeout, the error shows its tail. */
function untilLogged(u: Up, what: string, text: string | RegExp, ms = 60_000): Promise<true> {
  return waitFor(
    what,
    async () =>
      (typeof text === "string" ? u.err().includes(text) : text.test(u.err())) ? true : undefined,
    ms,
  ).catch((e) => {
    throw new Error(`${e}\n${u.err().slice(-3000)}`);
  });
}

/**
 * Autoscaling that decides every second over 2 s of reports, scales down after 3 s (the
 * manifest's `spec.autoscaling` fields, `extra` appended).
 */
const fastAutoscaling = (extra: string) =>
  "  autoscaling: { enabled: true, intervalSeconds: 1, metricWindowSeconds: 2, staleAfterSeconds: 3, " +
  `scaleDownStabilizationSeconds: 3, policyPeriodSeconds: 1, ${extra} }\n`;

/** A connection to the nats-server `up` started (it says where). */
async function natsOfUp(u: Up): Promise<NatsConnection> {
  const url = /\[up\] nats-server on (nats:\/\/\S+)/.exec(u.err())?.[1];
  expect(url).toBeDefined();
  return connect({ servers: url! });
}

/**
 * The test's own load reporter (as test/operator/autoscale.test.ts's): `report` on the model's
 * stats subject of `role` every 250 ms, until the returned function is called.
 */
function reportLoad(nc: NatsConnection, role: "shard" | "gateway", report: object): () => void {
  const body = JSON.stringify({ role, id: "test-load", ...report });
  const timer = setInterval(() => nc.publish(`em.default.tiny.stats.${role}.test-load`, body), 250);
  return () => clearInterval(timer);
}

const Inference = InferenceClient;
const Generation = GenerationClient;

function unary<T>(client: Client, method: string, req: unknown): Promise<T> {
  return new Promise((resolve, reject) =>
    (client as any)[method](req, (err: ServiceError | null, res: T) =>
      err ? reject(err) : resolve(res),
    ),
  );
}

function generateStream(client: Client, req: unknown): Promise<any[]> {
  return new Promise((resolve, reject) => {
    const messages: any[] = [];
    const s: ClientReadableStream<any> = (client as any).GenerateStream(req);
    s.on("data", (m: any) => messages.push(m));
    s.on("error", reject);
    s.on("end", () => resolve(messages));
  });
}

/** "144.0 KiB" -> bytes, and how far off the rounding of that text can be. */
function parseBytes(text: string): { bytes: number; slack: number } {
  const [n, unit] = text.split(" ") as [string, string];
  const scale = { B: 1, KiB: 1024, MiB: 2 ** 20, GiB: 2 ** 30 }[unit]!;
  return { bytes: Number(n) * scale, slack: unit === "B" ? 0 : 0.05 * scale };
}

describe("expertmesh up", () => {
  let up: ReturnType<typeof spawn> | undefined;
  afterAll(() => {
    if (up?.pid && up.exitCode === null) process.kill(-up.pid, "SIGKILL");
  });

  it("serves the tiny manifest locally over HTTP and gRPC, with progress for every process, and stops everything on Ctrl-C", async () => {
    const port = await freePort();
    const grpcPort = await freePort();
    const started = spawnUp(port, grpcPort, true);
    up = started.proc;
    const { models } = started;
    await untilServing(started, port);
    const out = started.out();
    let err = started.err();
    expect(err).toContain("creating the tiny-v3 model");
    expect(err).toMatch(/\[shard-3\.0\] .*serving/);
    // The manifest gives every role a GPU; this machine (and CI) has none: the CPU, said so.
    expect(err).toMatch(
      /^\[up\] devices: everything on the CPU \(the manifest requests GPUs; .+\)$/m,
    );
    // What the processes will hold (4 shards of 12 experts x 12 KiB, the gateway's weights
    // and 512 MiB of KV cache), against this machine's memory.
    expect(err).toMatch(
      /^\[up\] memory: the processes will hold ~512\.\d MiB \(shards 576\.0 KiB, gateway 512\.3 MiB with its KV cache\); this machine has [\d.]+ GiB$/m,
    );
    expect(out).toContain(`over gRPC at 127.0.0.1:${grpcPort}`);
    // Its own nats-server, in place of the cluster's that the manifest names.
    expect(err).toMatch(
      /^\[up\] nats-server on nats:\/\/127\.0\.0\.1:\d+ \(in place of spec\.nats\.url, nats:\/\/nats\.expertmesh-system\.svc:4222\)$/m,
    );

    // Progress: stderr is not a terminal, so plain lines, one "done" per loading process;
    // the children's protocol lines are consumed, never shown.
    expect(err + out).not.toContain(PROGRESS_PREFIX.trim());
    expect(err).toMatch(/^\[up\] tiny-v3 model: done \([\d.]+ KiB\) in [\d.]+s$/m);
    const ckpt = await Checkpoint.open(join(models, "tiny-v3"));
    const c = ckpt.config;
    const moeLayers = [...Array(c.numHiddenLayers).keys()].filter((i) => isMoeLayer(c, i)).length;
    let experts = 0;
    let bytes = 0;
    let slack = 0;
    for (const label of ["shard-0.0", "shard-1.0", "shard-2.0", "shard-3.0", "gateway"]) {
      const re = new RegExp(
        `^\\[up\\] ${label.replace(".", "\\.")}: done \\((\\d+)/(\\d+) (experts|layers), ([\\d.]+ (?:B|KiB|MiB))\\) in [\\d.]+s$`,
        "m",
      );
      const m = re.exec(err);
      expect(m, `a "done" progress line for ${label}\n${err.slice(-3000)}`).not.toBeNull();
      const [, done, total, unit, size] = m!;
      expect(Number(done)).toBe(Number(total));
      expect(unit).toBe(label === "gateway" ? "layers" : "experts");
      if (label === "gateway") expect(Number(total)).toBe(c.numHiddenLayers);
      else experts += Number(total);
      const b = parseBytes(size!);
      expect(b.bytes).toBeGreaterThan(0);
      bytes += b.bytes;
      slack += b.slack;
    }
    // Every routed expert is loaded by exactly one shard (no redundant experts), and the
    // shards' bytes plus the gateway's are every tensor of the checkpoint.
    expect(experts).toBe(moeLayers * c.nRoutedExperts);
    expect(Math.abs(bytes - denseLoadBytes(ckpt, true))).toBeLessThanOrEqual(slack);

    const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
    const chat = await client.chat.completions.create({
      model: "tiny-v3",
      messages: [{ role: "user", content: "Hello!" }],
      max_tokens: 8,
      temperature: 0,
    });
    expect(chat.choices[0]!.finish_reason).toBe("length");
    expect(chat.usage?.completion_tokens).toBe(8);
    // The load command the banner prints, as printed, through the shards: its defaults fit
    // the tiny model's context (32 tokens a request), and every request succeeds.
    const hint = /^ {2}expertmesh bench --url (\S+) measures it under load$/m.exec(out);
    expect(hint?.[1]).toBe(`http://127.0.0.1:${port}`);
    const bench = await runCli(process.execPath, [
      main,
      "bench",
      `--url=${hint![1]}`,
      "--concurrency=2",
      "--requests=4",
      "--json=-",
    ]);
    expect(bench.code, bench.stderr).toBe(0);
    expect(JSON.parse(bench.stdout).levels[0]).toMatchObject({
      succeeded: 4,
      outputTokens: 4 * 32,
    });

    // gRPC on the manifest's --grpc-port: KServe v2 health, then a streamed generation
    // that goes through the shards.
    const addr = `127.0.0.1:${grpcPort}`;
    const kserve = new Inference(addr, credentials.createInsecure());
    const gen = new Generation(addr, credentials.createInsecure());
    try {
      expect(await unary(kserve, "ServerLive", {})).toEqual({ live: true });
      expect(await unary(kserve, "ServerReady", {})).toEqual({ ready: true });
      const messages = await generateStream(gen, {
        model: "tiny-v3",
        prompt: "Hello",
        max_tokens: 4,
        temperature: 0,
      });
      const last = messages.at(-1);
      expect(last.finish_reason).toBe("length");
      expect(last.usage.completion_tokens).toBe(4);
    } finally {
      kserve.close();
      gen.close();
    }

    const children = execFileSync("pgrep", ["-P", String(up.pid)])
      .toString()
      .trim()
      .split("\n")
      .map((pid) => track(Number(pid)));
    expect(children.length).toBe(6); // nats-server, 4 shards, the gateway
    // Ctrl-C in a terminal: SIGINT to the whole foreground process group. `up` stops the
    // children in order (gateway, shards, NATS last), so nothing loses NATS mid-drain.
    process.kill(-up.pid!, "SIGINT");
    await waitFor("up to exit", async () => (up!.exitCode !== null ? true : undefined), 30_000);
    expect(up.exitCode).toBe(0);
    for (const pid of children) expect(alive(pid), `child ${pid}`).toBe(false);
    err = started.err();
    const stopped = err.slice(err.indexOf("[up] stopping"));
    expect(stopped).toMatch(/\[gateway\] .*stopped$/m);
    for (const k of [0, 1, 2, 3])
      expect(stopped).toMatch(new RegExp(`\\[shard-${k}\\.0\\] .*drained$`, "m"));
    expect(stopped).not.toMatch(/Uncaught|triggerUncaughtException|connection lost|Error/);
  });

  it("a shard or the gateway that dies while serving is started again (the gateway on its port), and Ctrl-C stops the new ones", async () => {
    const port = await freePort();
    const u = spawnUp(port, 0, true);
    const completes = async () => (await completionTokens(port, 4)) === 4;
    const pidOf = (pattern: RegExp) => pidUnder(u, pattern);
    try {
      await untilServing(u, port);
      expect(await completes()).toBe(true);
      for (const [label, pattern] of [
        ["shard-2.0", / shard .*--shard=2 /],
        ["gateway", / gateway /],
      ] as const) {
        const before = pidOf(pattern);
        expect(before, label).toBeDefined();
        process.kill(before!, "SIGKILL");
        await waitFor(
          `${label} again`,
          async () => (u.err().includes(`[up] ${label} is serving again`) ? true : undefined),
          60_000,
        );
        expect(u.err()).toContain(
          `[up] ${label} exited (SIGKILL); starting it again in 1 s (restart 1)`,
        );
        const after = pidOf(pattern);
        expect(after).toBeDefined();
        expect(after).not.toBe(before);
        // Served through the new process (the gateway's on the same port), with every shard.
        expect(
          await waitFor(
            "a completion",
            async () => ((await completes().catch(() => false)) ? true : undefined),
            30_000,
          ),
        ).toBe(true);
      }
      const procs = descendants(u.proc.pid!);
      expect(await ctrlC(u.proc)).toBe(0);
      // (nats-server, under its watcher shell, may take a moment longer)
      await waitFor(
        "every process gone",
        async () => (procs.some(alive) ? undefined : true),
        10_000,
      );
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGKILL");
    }
  });

  it("with gateway.batch and two gateways: a batch made through up's port runs; its files are in one folder under the cache dir, for every gateway", async () => {
    const cache = mkdtempSync(join(testEnv().runDir, "cache-"));
    await upWithVariant(
      // (examples/tiny.yaml has spec.gateway.batch)
      ["    replicas: 1\n", "    replicas: 2\n"],
      async (started, port) => {
        // (gateways on one folder answering for each other: test/gateway/batches.test.ts)
        const client = new OpenAI({
          baseURL: `http://127.0.0.1:${port}/v1`,
          apiKey: "unused",
          maxRetries: 0,
        });
        const lines = Array.from({ length: 6 }, (_, i) =>
          JSON.stringify({
            custom_id: `u${i}`,
            method: "POST",
            url: "/v1/completions",
            body: { model: "tiny-v3", prompt: `Hello ${i}`, max_tokens: 4, temperature: 0 },
          }),
        );
        const input = await client.files.create({
          file: await toFile(Buffer.from(`${lines.join("\n")}\n`), "in.jsonl"),
          purpose: "batch",
        });
        const b = await client.batches.create({
          input_file_id: input.id,
          endpoint: "/v1/completions",
          completion_window: "24h",
        });
        const done = await waitFor("the batch done", async () => {
          const now = await client.batches.retrieve(b.id);
          return now.status === "completed" ? now : undefined;
        });
        expect(done.request_counts).toEqual({ total: 6, completed: 6, failed: 0 });
        const out = (await (await client.files.content(done.output_file_id!)).text())
          .trim()
          .split("\n")
          .map((l) => JSON.parse(l));
        expect(out.map((l) => l.custom_id).sort()).toEqual(["u0", "u1", "u2", "u3", "u4", "u5"]);
        expect(out.every((l) => l.response.body.usage.completion_tokens === 4)).toBe(true);
        const folder = join(cache, "batch", "default-tiny");
        expect(readdirSync(folder)).toEqual(expect.arrayContaining(["batches", "files"]));
        // A response kept in that folder: found by both gateways. Four connections open at
        // once (up's front gives each new one to the gateway with the fewest): two each.
        const made = await client.responses.create({
          model: "tiny-v3",
          input: "Hello!",
          max_output_tokens: 4,
        });
        expect(readdirSync(join(folder, "responses"))).toContain(`${made.id}.json`);
        const agents = Array.from({ length: 4 }, () => new Agent());
        try {
          const found = await Promise.all(
            agents.map(async (dispatcher) => {
              const r = await undiciFetch(`http://127.0.0.1:${port}/v1/responses/${made.id}`, {
                dispatcher,
              });
              return [r.status, ((await r.json()) as { id?: string }).id];
            }),
          );
          expect(found).toEqual(Array.from({ length: 4 }, () => [200, made.id]));
        } finally {
          await Promise.all(agents.map((x) => x.close()));
        }
        // Both gateways on that folder.
        const gateways = descendants(started.proc.pid!)
          .map((pid) => {
            try {
              return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
            } catch {
              return [];
            }
          })
          .filter((argv) => argv.includes("gateway"));
        expect(gateways).toHaveLength(2);
        for (const argv of gateways) expect(argv).toContain(`--files-dir=${folder}`);
      },
      { EXPERTMESH_CACHE_DIR: cache },
    );
  });

  it("with MTP drafts in the manifest: the tiny model gets its MTP layer, the shards its experts, and the gateway drafts", async () => {
    await upWithVariant(
      ["  gateway:\n", "  gateway:\n    speculative: { method: mtp }\n"],
      async (started, port) => {
        const err = started.err();
        const c = (await Checkpoint.open(join(started.models, "tiny-v3"))).config;
        expect(c.numNextnPredictLayers).toBe(1);
        // 3 MoE layers and the MTP layer, 16 experts each, over 4 shards; the gateway's
        // layers count the MTP layer's dense part.
        let experts = 0;
        for (const k of [0, 1, 2, 3]) {
          const m = new RegExp(`^\\[up\\] shard-${k}\\.0: done \\((\\d+)/\\d+ experts`, "m").exec(
            err,
          );
          experts += Number(m?.[1]);
        }
        expect(experts).toBe(4 * c.nRoutedExperts);
        expect(err).toMatch(/^\[up\] gateway: done \(5\/5 layers/m);
        expect(await completionTokens(port, 12)).toBe(12);
        const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
        const drafts = /^expertmesh_gateway_spec_decode_num_drafts_total (\d+)$/m.exec(metrics);
        expect(Number(drafts?.[1])).toBeGreaterThan(0);
      },
    );
  });

  it("with gateway.chatTemplate and gateway.sampling: chats render with that template, and requests without a temperature take the manifest's", async () => {
    const template =
      "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    await upWithVariant(
      [
        "  gateway:\n",
        `  gateway:\n    chatTemplate: ${JSON.stringify(template)}\n    sampling: { temperature: 0 }\n`,
      ],
      async (started, port) => {
        expect(started.err()).toMatch(
          /^\[gateway\] .*chat template from --chat-template \(\d+ bytes\)$/m,
        );
        expect(started.err()).toMatch(
          /^\[gateway\] .*sampling defaults of requests that leave them out: temperature 0, top_p 0\.95 /m,
        );
        const tokenize = await fetch(`http://127.0.0.1:${port}/tokenize`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ messages: [{ role: "user", content: "hi" }] }),
        });
        const tokenizer = Tokenizer.load(join(started.models, "tiny-v3"));
        expect(((await tokenize.json()) as { tokens: number[] }).tokens).toEqual(
          tokenizer.encode("<|user|>hi<|assistant|>", false),
        );
        // The file's top_p 0.95 stays; the manifest's temperature 0 is greedy.
        const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
        const ask = (extra: object) =>
          client.completions
            .create({ model: "tiny-v3", prompt: "Hello", max_tokens: 12, seed: 3, ...extra })
            .then((r) => r.choices[0]!.text);
        expect(await ask({})).toBe(await ask({ temperature: 0 }));
        expect(await ask({ temperature: 1.5 })).not.toBe(await ask({}));
      },
    );
  });

  it("with spec.model.source.huggingFace: fetches the checkpoint from the Hub (spec.env's HF_ENDPOINT: a stand-in, as no Hub is reachable here) with the token of tokenSecret's Secret in a second -f file, once, and serves it; spec.env reaches every process", async () => {
    const weights = mkdtempSync(join(testEnv().runDir, "hub-weights-"));
    await writeTinyModel(weights, { arch: "v3", preset: "tiny", seed: 0, shards: 2 });
    const hub = await startStandInHub({ repo: "acme/tiny-v3", dir: weights, token: "hf_up" });
    const models = mkdtempSync(join(testEnv().runDir, "models-"));
    // The Hub's address from the manifest's spec.env (as a pod would get a mirror's), the
    // token from the Secret in another -f file (as kubectl apply -f of both would create it).
    const source: [string, string] = [
      "      pvc:\n        claimName: tiny-model\n        path: tiny-v3\n",
      `      huggingFace:\n        repo: acme/tiny-v3\n        tokenSecret: { name: hf-token }\n  env: [{ name: HF_ENDPOINT, value: "${hub.endpoint}" }, { name: EXPERTMESH_TEST_MARK, value: here }, { name: EXPERTMESH_TEST_FROM, valueFrom: { secretKeyRef: { name: s, key: k } } }, { name: EXPERTMESH_TEST_UNSET, valueFrom: { configMapKeyRef: { name: c, key: k } } }]\n`,
    ];
    // A valueFrom variable that no -f file holds comes from the shell, or is unset, said so.
    const env = { EXPERTMESH_TEST_FROM: "shell" };
    const secrets = join(mkdtempSync(join(testEnv().runDir, "secrets-")), "hf-token.yaml");
    writeFileSync(
      secrets,
      `apiVersion: v1\nkind: Secret\nmetadata: { name: hf-token }\ndata: { token: ${Buffer.from("hf_up").toString("base64")} }\n`,
    );
    const snapshot = join(models, "hf", "acme--tiny-v3", "snapshots", hub.commit);
    try {
      await upWithVariant(
        source,
        async (started, port) => {
          const err = started.err();
          expect(err).toMatch(
            new RegExp(`^\\[up\\] acme/tiny-v3@main: fetched [\\d.]+ KiB into ${snapshot}$`, "m"),
          );
          expect(err).toMatch(/^\[up\] acme\/tiny-v3@main: done \([\d.]+ KiB\) in [\d.]+s$/m);
          expect(err).toContain(
            `[up] spec.model.source.huggingFace.tokenSecret: the token from ${secrets}`,
          );
          expect(err).not.toMatch(/creating the tiny-v3 model/);
          expect(err).toMatch(
            /^\[up\] spec\.env: HF_ENDPOINT, EXPERTMESH_TEST_MARK set for every process$/m,
          );
          expect(err).toMatch(
            /^\[up\] spec\.env's EXPERTMESH_TEST_FROM: no -f file holds the Secret s \(key k\); from this shell's \$EXPERTMESH_TEST_FROM$/m,
          );
          expect(err).toMatch(
            /^\[up\] spec\.env's EXPERTMESH_TEST_UNSET: no -f file holds the ConfigMap c \(key k\); unset here \(give the ConfigMap with another -f, or set \$EXPERTMESH_TEST_UNSET in this shell\)$/m,
          );
          expect(await completionTokens(port, 4)).toBe(4);
          // Every process up started has spec.env in its environment.
          const children = execFileSync("pgrep", ["-P", String(started.proc.pid)])
            .toString()
            .trim()
            .split("\n");
          expect(children.length).toBeGreaterThanOrEqual(6);
          for (const pid of children)
            expect(readFileSync(`/proc/${pid}/environ`, "utf8").split("\0"), pid).toContain(
              "EXPERTMESH_TEST_MARK=here",
            );
          for (const pid of children) {
            const vars = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
            expect(vars, pid).toContain("EXPERTMESH_TEST_FROM=shell");
            expect(
              vars.some((v) => v.startsWith("EXPERTMESH_TEST_UNSET=")),
              pid,
            ).toBe(false);
          }
        },
        env,
        models,
        ["-f", secrets],
      );
      const fetched = hub.requests.filter((r) => r.server === "cdn").length;
      // Each file the engine reads, once (not the stand-in's README and figure).
      expect(fetched).toBe(readdirSync(weights).filter(wantedFile).length);
      expect(fetched).toBe(7);
      // Again: the snapshot is complete; the Hub is asked which commit main is, nothing more.
      await upWithVariant(
        source,
        async (started) => {
          expect(started.err()).toMatch(
            new RegExp(
              `^\\[up\\] acme/tiny-v3@main: commit ${hub.commit.slice(0, 12)}, complete in ${snapshot}$`,
              "m",
            ),
          );
        },
        env,
        models,
        ["-f", secrets],
      );
      expect(hub.requests.filter((r) => r.server === "cdn").length).toBe(fetched);
    } finally {
      await hub.close();
    }
  });

  it("-f files with the Secrets and ConfigMaps the manifest names: the gateway requires the API keys of apiKeySecret's Secret, spec.env's valueFrom reaches every process; a bad Secret is refused before anything starts", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "objects-"));
    // The ConfigMap in the manifest's own file, the Secret in another (kept out of git, say).
    const manifestText = readFileSync(manifest, "utf8")
      .replace("    gpus: 1\n", "    gpus: 1\n    apiKeySecret: { name: creds, key: api-keys }\n")
      .replace(
        "  nats:\n",
        "  env: [{ name: EXPERTMESH_TEST_SECRET, valueFrom: { secretKeyRef: { name: creds, key: proxy } } }, { name: EXPERTMESH_TEST_CM, valueFrom: { configMapKeyRef: { name: settings, key: mode } } }]\n  nats:\n",
      );
    const file = join(dir, "tiny.yaml");
    writeFileSync(
      file,
      `${manifestText}---\napiVersion: v1\nkind: ConfigMap\nmetadata: { name: settings, namespace: default }\ndata: { mode: fast }\n`,
    );
    const secrets = join(dir, "secrets.yaml");
    const b64 = (v: string) => Buffer.from(v).toString("base64");
    writeFileSync(
      secrets,
      `apiVersion: v1\nkind: Secret\nmetadata: { name: creds }\ndata:\n  api-keys: ${b64("sk-one,sk-two")}\n  proxy: ${b64("http://user:pw@proxy:3128")}\n`,
    );
    const port = await freePort();
    // (the shell's $EM_API_KEYS would stand in for a Secret no file holds: not here)
    const u = spawnUp(port, 0, true, secrets, { EM_API_KEYS: "" }, undefined, ["-f", file]);
    try {
      await untilServing(u, port);
      const err = u.err();
      expect(err).toContain(
        `[up] spec.gateway.apiKeySecret: the gateways take their keys from ${secrets}`,
      );
      // The examples it prints send a key (named, never shown).
      expect(u.out()).toContain(
        `API keys required (spec.gateway.apiKeySecret's, from ${secrets}): KEY below is one of them`,
      );
      expect(u.out()).toContain("-H 'authorization: Bearer KEY'");
      expect(u.out()).toContain(`expertmesh bench --url http://127.0.0.1:${port} --api-key KEY`);
      expect(u.out() + err).not.toContain("sk-one");
      expect(err).toContain(
        `[up] spec.env's EXPERTMESH_TEST_SECRET: from the Secret creds (key proxy) in ${secrets}`,
      );
      expect(err).toContain(
        `[up] spec.env's EXPERTMESH_TEST_CM: from the ConfigMap settings (key mode) in ${file}`,
      );
      const client = (apiKey: string) =>
        new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey, maxRetries: 0 });
      await expect(client("sk-wrong").models.list()).rejects.toMatchObject({ status: 401 });
      for (const key of ["sk-one", "sk-two"])
        expect((await client(key).models.list()).data.map((m) => m.id)).toEqual(["tiny-v3"]);
      const procs = descendants(u.proc.pid!).filter((pid) =>
        /main\.ts (shard|gateway) /.test(
          readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " "),
        ),
      );
      expect(procs).toHaveLength(5);
      for (const pid of procs) {
        const vars = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
        expect(vars, String(pid)).toContain("EXPERTMESH_TEST_SECRET=http://user:pw@proxy:3128");
        expect(vars, String(pid)).toContain("EXPERTMESH_TEST_CM=fast");
      }
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGINT");
      await exitCodeOf(u);
    }
    // A Secret the API server would refuse (data not base64): refused, nothing started.
    writeFileSync(
      secrets,
      "apiVersion: v1\nkind: Secret\nmetadata: { name: creds }\ndata: { proxy: 'not base64!' }\n",
    );
    const bad = spawnUp(await freePort(), 0, true, file, {}, undefined, ["-f", secrets]);
    expect(await exitCodeOf(bad)).toBe(1);
    expect(bad.err()).toContain(
      `[EM_MANIFEST_INVALID] ${secrets}: Secret creds: data.proxy is not base64`,
    );
    // Two files, neither the model's: said so.
    const none = spawnUp(await freePort(), 0, true, secrets, {}, undefined, ["-f", secrets]);
    expect(await exitCodeOf(none)).toBe(1);
    expect(none.err()).toContain("[EM_CLI_USAGE] of the -f files, one must hold the DeepSeekModel");
  });

  it("--watch with a Secrets -f file: a rotated API key reaches the running gateway without a restart; one that holds no key is said and not applied; dropping apiKeySecret from the manifest rolls the gateway, open; a new spec.env value starts every process again with it", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "watch-secrets-"));
    const file = join(dir, "tiny.yaml");
    writeFileSync(
      file,
      readFileSync(manifest, "utf8")
        .replace("    gpus: 1\n", "    gpus: 1\n    apiKeySecret: { name: creds }\n")
        .replace(
          "  nats:\n",
          "  env: [{ name: EXPERTMESH_TEST_SECRET, valueFrom: { secretKeyRef: { name: creds, key: proxy } } }]\n  nats:\n",
        ),
    );
    const secrets = join(dir, "secrets.yaml");
    const writeSecrets = (keys: string, proxy: string) =>
      writeFileSync(
        secrets,
        `apiVersion: v1\nkind: Secret\nmetadata: { name: creds }\nstringData:\n  api-keys: "${keys}"\n  proxy: ${proxy}\n`,
      );
    writeSecrets("sk-one", "http://proxy-a:3128");
    const port = await freePort();
    const u = spawnUp(port, 0, true, file, { EM_API_KEYS: "" }, undefined, [
      "-f",
      secrets,
      "--watch",
    ]);
    const status = async (apiKey: string) => {
      const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey, maxRetries: 0 });
      return client.models.list().then(
        () => 200,
        (e: { status?: number }) => e.status ?? 0,
      );
    };
    try {
      await untilServing(u, port);
      expect(u.err()).toContain(
        `[up] watching ${secrets} too: new API keys and certificates in their Secrets reach the gateways without a restart, a new value of spec.env's starts every process again`,
      );
      expect([await status("sk-one"), await status("sk-two")]).toEqual([200, 401]);
      const gateway = pidUnder(u, /main\.ts gateway /);
      expect(gateway).toBeDefined();

      // The key rotated in the Secret's file: the gateway takes it, the old one is refused.
      writeSecrets("sk-two", "http://proxy-a:3128");
      await untilLogged(
        u,
        "the rotation",
        `[up] spec.gateway.apiKeySecret changed in ${secrets}: the gateways take its 1 key(s) without a restart`,
      );
      await waitFor(
        "the new key",
        async () => ((await status("sk-two")) === 200 ? true : undefined),
        15_000,
      );
      expect(await status("sk-one")).toBe(401);
      expect(u.err()).toContain(
        `[up] ${secrets} changed: its Secrets' new content goes to the running processes`,
      );

      // No key at all: the gateway keeps the one it has, never serving open.
      writeSecrets(" , ", "http://proxy-a:3128");
      await untilLogged(u, "the refusal", /holds no API key .*: the gateways keep what they have/);
      expect([await status("sk-two"), await status("sk-none")]).toEqual([200, 401]);

      // One gateway served it all: nothing restarted.
      expect(pidUnder(u, /main\.ts gateway /)).toBe(gateway);
      expect(u.err()).not.toContain("stopping everything");

      // The manifest drops apiKeySecret: the gateways roll onto it (as a Deployment's pods
      // would), and the new one takes requests without a key; the shards run on.
      const shard = pidUnder(u, /main\.ts shard /);
      writeFileSync(
        file,
        readFileSync(file, "utf8").replace("    apiKeySecret: { name: creds }\n", ""),
      );
      await untilLogged(
        u,
        "the roll",
        "[up] spec.gateway.apiKeySecret is gone: the new gateways take requests without a key",
      );
      await untilLogged(u, "the rolled gateway", "[up] the gateways run the edited manifest");
      // (a keep-alive connection may reach the old gateway for its last second of draining)
      await waitFor("no key asked", async () =>
        (await status("sk-none")) === 200 ? true : undefined,
      );
      expect(pidUnder(u, /main\.ts shard /)).toBe(shard);
      expect(u.err()).not.toContain("stopping everything");

      // spec.env's value: processes read it at start, so every one starts again with the new
      // one (the operator rolls every role's pods onto it).
      writeSecrets("sk-two", "http://proxy-b:3128");
      await untilLogged(
        u,
        "the env restart",
        `[up] ${secrets} changed (spec.env's EXPERTMESH_TEST_SECRET: its value in ${secrets} changed: processes read their environment at start, and the operator rolls every role's pods onto a new value): stopping everything, then starting it again with the new manifest`,
      );
      await waitFor(
        "a new shard",
        async () => {
          const now = pidUnder(u, /main\.ts shard /);
          return now !== undefined && now !== shard ? true : undefined;
        },
        60_000,
      );
      await waitFor("serving again", async () =>
        (await status("sk-none")) === 200 ? true : undefined,
      );
      for (const role of [/main\.ts shard /, /main\.ts gateway /]) {
        const pid = pidUnder(u, role)!;
        const vars = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
        expect(vars, String(role)).toContain("EXPERTMESH_TEST_SECRET=http://proxy-b:3128");
      }
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGINT");
      await exitCodeOf(u);
    }
  });

  it("spec.gateway.tls with its Secret in a -f file: two gateways behind up's ports serve HTTPS (the front passes TLS through) with that certificate", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "up-tls-"));
    const pki = makeNatsPki(dir);
    const file = variantManifest(
      "    replicas: 1\n",
      "    replicas: 2\n    tls: { secretName: gw-tls }\n",
    );
    const secrets = join(dir, "gw-tls.yaml");
    const b64 = (path: string) => readFileSync(path).toString("base64");
    writeFileSync(
      secrets,
      `apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: { name: gw-tls }\ndata:\n  tls.crt: ${b64(pki.server.cert)}\n  tls.key: ${b64(pki.server.key)}\n`,
    );
    const port = await freePort();
    const u = spawnUp(port, 0, true, file, {}, undefined, ["-f", secrets]);
    try {
      await waitFor(
        "the https endpoint",
        async () =>
          u.out().includes(`https://127.0.0.1:${port}/v1`)
            ? true
            : u.proc.exitCode !== null
              ? Promise.reject(new Error(`up exited\n${u.err().slice(-3000)}`))
              : undefined,
        90_000,
      );
      expect(u.err()).toContain(
        `[up] spec.gateway.tls: the gateways serve TLS with the certificate in ${secrets}`,
      );
      expect(u.out()).toContain(
        `curl --cacert CA.crt https://127.0.0.1:${port}/v1/chat/completions`,
      );
      const agent = new Agent({ connect: { ca: readFileSync(pki.ca) } });
      const client = new OpenAI({
        baseURL: `https://127.0.0.1:${port}/v1`,
        apiKey: "unused",
        maxRetries: 0,
        fetch: ((url: string, init: object) =>
          undiciFetch(url, { ...init, dispatcher: agent })) as unknown as typeof fetch,
      });
      // Several connections (the front spreads them over the gateways), each over TLS.
      for (let i = 0; i < 4; i++)
        expect((await client.models.list()).data.map((m) => m.id)).toEqual(["tiny-v3"]);
      // The certificate's CA is needed: a client that does not trust it is refused.
      await expect(
        new OpenAI({
          baseURL: `https://127.0.0.1:${port}/v1`,
          apiKey: "x",
          maxRetries: 0,
        }).models.list(),
      ).rejects.toThrow(/Connection error/);
      await agent.close();
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGINT");
      await exitCodeOf(u);
    }
  });

  it("with spec.model.dtype fp8: every process loads the bf16 tiny model's linear layers as fp8, and it serves", async () => {
    await upWithVariant(
      ["    preset: tiny-v3\n", "    preset: tiny-v3\n    dtype: fp8\n"],
      async (started, port) => {
        const err = started.err();
        for (const k of [0, 1, 2, 3])
          expect(err).toMatch(
            new RegExp(
              `^\\[shard-${k}\\.0\\] loaded 12 experts .*served in fp8\\) for plan v1$`,
              "m",
            ),
          );
        expect(err).toMatch(/^\[gateway\] linear layers served in fp8 /m);
        expect(await completionTokens(port, 8)).toBe(8);
      },
    );
  });

  it("with spec.autoscaling: a shard's queue depth above target starts replicas up to max, which serve; below it, they are stopped after the window", async () => {
    // The load: a reporter the test adds for shard 0 (as test/operator/autoscale.test.ts
    // does), on the nats-server `up` started; the replicas' own reports and their work are
    // the real processes'.
    const autoscaling = [
      "    gpusPerShard: 1\n",
      "    gpusPerShard: 1\n    replicas: { min: 1, max: 3 }\n" +
        fastAutoscaling("shardTargetQueueDepth: 10"),
    ] as [string, string];
    await upWithVariant(autoscaling, async (u, port) => {
      const err = () => u.err();
      // Said after the endpoints (stdout), on stderr: the two pipes may arrive in either order.
      await untilLogged(
        u,
        "the autoscaling line",
        "[up] autoscaling: each shard between 1 and 3 replicas, target 10",
      );
      const nc = await natsOfUp(u);
      // Which replicas of shard 0 reported tokens they served (their own reports).
      const worked = new Set<string>();
      const reports = nc.subscribe("em.default.tiny.stats.shard.>", {
        callback: (_e, msg) => {
          const r = JSON.parse(new TextDecoder().decode(msg.data));
          if (r.shard === 0 && Object.keys(r.expertTokens ?? {}).length > 0) worked.add(r.id);
        },
      });
      const stopLoad = reportLoad(nc, "shard", { shard: 0, planVersion: 1, pendingTokens: 200 });
      const until = (what: string, text: string) => untilLogged(u, what, text);
      try {
        await until("two more replicas of shard 0", "[up] shard-0.2 is serving");
        await until("the other", "[up] shard-0.1 is serving");
        expect(err()).toMatch(/\[up\] ScaledUp: shard-0: 1 -> 3 replicas \(AtMaximum\)/);
        // Capped at max; the other shards, without load, stay at one replica.
        await new Promise((r) => setTimeout(r, 2500));
        expect(err()).not.toContain("shard-0.3");
        expect(err()).not.toMatch(/starting shard-[123]\.1/);
        // The new replicas take their part of the work (NATS's queue group).
        await waitFor(
          "every replica of shard 0 to serve tokens",
          async () => {
            expect(await completionTokens(port, 8)).toBe(8);
            return worked.size === 3 ? true : undefined;
          },
          30_000,
        );
      } finally {
        stopLoad();
      }
      // The load gone, shard 0 goes back to min after the 3 s window, the newest first.
      await until("shard 0 back to one replica", "[up] shard-0.1 stopped (scaled down; exit 0)");
      expect(err()).toContain("[up] shard-0.2 stopped (scaled down; exit 0)");
      expect(err().indexOf("stopping shard-0.2 (scaled down)")).toBeLessThan(
        err().indexOf("stopping shard-0.1 (scaled down)"),
      );
      expect(err()).not.toContain("shard-0.0 stopped");
      expect(err()).not.toMatch(/shard-0\.[12] exited/);
      expect(await completionTokens(port, 8)).toBe(8);
      reports.unsubscribe();
      await nc.close();
    });
  });

  it("with more than one gateway: up listens on the ports and spreads connections over them; the autoscaler scales gateways by waiting requests", async () => {
    const gateways = [
      "  gateway:\n    replicas: 1\n    gpus: 1\n",
      // (the autoscaling line first: the gateway's section goes on after gpus)
      fastAutoscaling("gatewayTargetQueueDepth: 4, shardTargetQueueDepth: 100000") +
        "  gateway:\n    replicas: 1\n    minReplicas: 1\n    maxReplicas: 3\n    gpus: 1\n    logRequests: true\n",
    ] as [string, string];
    await upWithVariant(gateways, async (u, port) => {
      const err = () => u.err();
      const until = (what: string, text: string | RegExp, ms?: number) =>
        untilLogged(u, what, text, ms);
      const grpcPort = Number(
        /\[up\] 1 gateway\(s\) behind 127\.0\.0\.1:\d+ and :(\d+)/.exec(err())?.[1],
      );
      expect(err()).toMatch(
        new RegExp(`\\[up\\] 1 gateway\\(s\\) behind 127\\.0\\.0\\.1:${port} and :`),
      );
      await until(
        "the autoscaling line",
        "gateways between 1 and 3, target 4 waiting requests per gateway",
      );
      const nc = await natsOfUp(u);
      const stopLoad = reportLoad(nc, "gateway", { waiting: 100 });
      try {
        await until("three gateways", "[up] gateway.2 is serving");
        await until("three gateways", "[up] gateway.1 is serving");
        expect(err()).toMatch(/\[up\] ScaledUp: gateway: 1 -> 3 replicas \(AtMaximum\)/);
        // Concurrent requests, each on a connection of its own, reach every gateway.
        const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
        const answers = await Promise.all(
          Array.from({ length: 12 }, () =>
            client.completions.create({
              model: "tiny-v3",
              prompt: "Hello",
              max_tokens: 16,
              temperature: 0,
            }),
          ),
        );
        for (const a of answers) expect(a.usage?.completion_tokens).toBe(16);
        for (const g of [0, 1, 2])
          expect(err()).toMatch(
            new RegExp(`^\\[gateway\\.${g}\\] request \\S+ POST /v1/completions 200 `, "m"),
          );
        // gRPC through the front too.
        const kserve = new Inference(`127.0.0.1:${grpcPort}`, credentials.createInsecure());
        expect(await unary(kserve, "ServerLive", {})).toEqual({ live: true });
        kserve.close();
        // A gateway that dies leaves the rotation: requests go on through the others, and it
        // rejoins when it serves again.
        process.kill(pidUnder(u, / gateway /)!, "SIGKILL");
        await until("its exit", /\[up\] gateway\.\d exited \(SIGKILL\)/);
        for (let i = 0; i < 6; i++) expect(await completionTokens(port, 4)).toBe(4);
        const dead = /\[up\] (gateway\.\d) exited \(SIGKILL\)/.exec(err())![1]!;
        await until("it again", `[up] ${dead} is serving again`);
      } finally {
        stopLoad();
      }
      // The load gone: back to one gateway after the window, the newest stopped first.
      await until("one gateway", /\[up\] gateway\.1 stopped \(scaled down; exit 0\)/, 90_000);
      expect(err()).toContain("[up] gateway.2 stopped (scaled down; exit 0)");
      expect(err()).not.toContain("gateway.0 stopped");
      for (let i = 0; i < 4; i++) expect(await completionTokens(port, 4)).toBe(4);
      await nc.close();
    });
  });

  it("with spec.experts.rebalance: a skewed load is re-planned and switched live, no request fails, and a shard started later loads the new plan", async () => {
    const rebalance = [
      "    redundantExperts: 0\n",
      "    redundantExperts: 4\n    rebalance: { enabled: true, threshold: 1.01, minImprovement: 0.01, " +
        "windowSeconds: 60, minTokens: 1500, cooldownSeconds: 3600 }\n",
    ] as [string, string];
    await upWithVariant(rebalance, async (u, port) => {
      const err = () => u.err();
      await untilLogged(
        u,
        "the rebalancing line",
        /\[up\] rebalancing: the placement of the 4 redundant expert slot\(s\)/,
      );
      expect(err()).not.toContain("[up] autoscaling:");
      const planPath = /a new plan is rolled out live and written to (\S+)$/m.exec(err())?.[1];
      expect(parsePlan(readFileSync(planPath!, "utf8")).version).toBe(1);
      // The workload: 8 clients asking the same thing over and over (a skewed expert load).
      const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
      let running = true;
      const outcomes = { ok: 0, failed: [] as string[] };
      const clients = Array.from({ length: 8 }, async () => {
        while (running) {
          try {
            const r = await client.chat.completions.create({
              model: "tiny-v3",
              messages: [{ role: "user", content: "tell me about the sea" }],
              max_tokens: 24,
              temperature: 0,
            });
            if (r.usage?.completion_tokens !== 24) throw new Error("short answer");
            outcomes.ok++;
          } catch (e) {
            outcomes.failed.push(String(e));
          }
        }
      });
      try {
        await untilLogged(
          u,
          "a finished rebalance",
          "[up] Rebalanced: plan v2 active on every gateway and shard",
          120_000,
        );
        expect(err()).toMatch(/\[up\] RebalanceStarted: .*loading it on every shard/);
        expect(err()).toMatch(/^\[gateway\] .*routing with plan v2/m);
        expect(parsePlan(readFileSync(planPath!, "utf8")).version).toBe(2);
        expect(err()).toContain(`[up] plan v2 written to ${planPath}`);
        // The switch failed no request.
        expect(outcomes.failed).toEqual([]);
        // A shard that dies now starts again on the file's plan, and serves it.
        process.kill(pidUnder(u, / shard .*--shard=1 /)!, "SIGKILL");
        await untilLogged(u, "shard-1.0 again", "[up] shard-1.0 is serving again");
        expect(err()).toMatch(/^\[shard-1\.0\] loaded \d+ experts .*for plan v2$/m);
        const okBefore = outcomes.ok;
        await waitFor(
          "more answers",
          async () => (outcomes.ok > okBefore + 8 ? true : undefined),
          30_000,
        );
      } finally {
        running = false;
        await Promise.all(clients);
      }
      // While the killed shard (its only replica) is down, its requests fail with 503.
      expect(outcomes.failed.filter((f) => !/503/.test(f))).toEqual([]);
      expect(outcomes.ok).toBeGreaterThan(10);
    });
  });

  it("with gateway.disaggregation starts prefill gateways, which compute the long prompts", async () => {
    const cache = mkdtempSync(join(testEnv().runDir, "cache-"));
    await upWithVariant(
      [
        "  gateway:\n",
        "  gateway:\n    kvCache: { remoteBytes: 8388608 }\n    disaggregation: { replicas: 1, minPromptTokens: 16 }\n",
      ],
      async (started, port) => {
        expect(started.err()).toMatch(
          /^\[prefill\.0\] .*prefill gateway: computing prompts sent to em\.default\.tiny\.prefill\.w[0-9a-f]{16}$/m,
        );
        expect(started.err()).toMatch(
          /^\[gateway\] .*decode gateway: prompts lacking 16 tokens or more go to em\.default\.tiny\.prefill\.w[0-9a-f]{16}$/m,
        );
        const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
        const r = await client.completions.create({
          model: "tiny-v3",
          prompt: "The ferry left the harbour at dawn with forty passengers aboard. ".repeat(3),
          max_tokens: 4,
          temperature: 0,
        });
        const P = r.usage!.prompt_tokens;
        // Every whole block came through the bucket from the prefill gateway.
        expect(r.usage?.prompt_tokens_details?.cached_tokens).toBe(Math.floor((P - 1) / 16) * 16);
        const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
        expect(metrics).toMatch(/^expertmesh_gateway_prefill_remote_total\{outcome="done"\} 1$/m);
      },
      { EXPERTMESH_CACHE_DIR: cache },
    );
  });

  it.each([
    {
      tier: "diskBytes: the prefix cache's disk tier",
      kvCache: "{ diskBytes: 1048576 }",
      kept: /^\[gateway\] prefix cache disk tier in (\S+): (\d+) blocks kept from before/m,
      where: join("prefix-cache", "default-tiny"),
    },
    {
      tier: "remoteBytes: the prefix cache's NATS tier (up's nats-server with JetStream)",
      kvCache: "{ remoteBytes: 4194304 }",
      kept: /^\[gateway\] prefix cache NATS tier in bucket '(\S+)': (\d+) blocks of this model there/m,
      where: "expertmesh-prefix-default-tiny",
    },
  ])(
    "with gateway.kvCache.$tier outlives the run, and the next run starts with it",
    async ({ kvCache, kept, where }) => {
      const cache = mkdtempSync(join(testEnv().runDir, "cache-"));
      // The same weights both times (the fingerprint covers their digest).
      const models = mkdtempSync(join(testEnv().runDir, "models-"));
      const variant: [string, string] = ["  gateway:\n", `  gateway:\n    kvCache: ${kvCache}\n`];
      // Blocks of 16 tokens: a prompt of several.
      const ask = async (port: number) => {
        const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
        const r = await client.completions.create({
          model: "tiny-v3",
          prompt:
            "The lighthouse keeper climbed the stairs every evening to light the lamp. ".repeat(3),
          max_tokens: 4,
          temperature: 0,
        });
        return { cached: r.usage?.prompt_tokens_details?.cached_tokens, text: r.choices[0]!.text };
      };
      let first = { cached: undefined as number | undefined, text: "" };
      await upWithVariant(
        variant,
        async (started, port) => {
          const m = kept.exec(started.err());
          expect(m?.[1]).toContain(where);
          expect(m?.[2]).toBe("0");
          first = await ask(port);
          expect(first.cached).toBe(0);
        },
        { EXPERTMESH_CACHE_DIR: cache },
        models,
      );
      // Ctrl-C stopped the gateway gracefully: its cached blocks were written (the disk
      // tier's files in its folder; the NATS tier's in JetStream's, under the same cache).
      const folder = kvCache.includes("disk")
        ? join(cache, where)
        : join(cache, "jetstream", "default-tiny");
      expect(readdirSync(folder).length).toBeGreaterThan(0);
      await upWithVariant(
        variant,
        async (started, port) => {
          expect(Number(kept.exec(started.err())?.[2])).toBeGreaterThan(0);
          const again = await ask(port);
          expect(again.cached).toBeGreaterThan(0);
          expect(again.text).toBe(first.text);
        },
        { EXPERTMESH_CACHE_DIR: cache },
        models,
      );
    },
  );

  it("stops every process it started when it is killed outright (SIGKILL: no handler runs); the gateway still stops gracefully", async () => {
    const port = await freePort();
    // With a disk tier: the gateway's graceful stop writes it (its log pipe is gone by
    // then: a write to it must not end the process first).
    const file = variantManifest(
      "  gateway:\n",
      "  gateway:\n    kvCache: { diskBytes: 1048576 }\n",
    );
    const cache = mkdtempSync(join(testEnv().runDir, "cache-"));
    const started = spawnUp(port, 0, false, file, { EXPERTMESH_CACHE_DIR: cache });
    const killed = started.proc;
    let all: number[] = [];
    try {
      await untilServing(started, port);
      const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
      await client.completions.create({
        model: "tiny-v3",
        prompt: "The lighthouse keeper climbed the stairs every evening to light the lamp. ".repeat(
          3,
        ),
        max_tokens: 2,
      });
      all = descendants(killed.pid!);
      // nats-server (under its watching shell), 4 shards, the gateway.
      expect(all.length).toBeGreaterThanOrEqual(7);
      killed.kill("SIGKILL");
      await waitFor(
        "every process `up` started to stop",
        async () => (all.every((pid) => !alive(pid)) ? true : undefined),
        30_000,
      ).catch((e) => {
        throw new Error(`${e}: still running ${all.filter(alive).join(", ")}`);
      });
      const folder = join(cache, "prefix-cache", "default-tiny");
      const [fp] = readdirSync(folder);
      expect(readdirSync(join(folder, fp!)).some((f) => f.endsWith(".kv"))).toBe(true);
    } finally {
      if (killed.exitCode === null) killed.kill("SIGKILL");
      for (const pid of all.filter(alive)) process.kill(pid, "SIGKILL"); // after a failure
    }
  });

  it("--watch: an edit of the gateways alone rolls the gateway behind up's front, no request failing (nats-server and the shards run on); a cluster's field alone changes nothing; any other stops everything and starts it again; one that does not validate leaves it running; Ctrl-C stops it all", async () => {
    const file = variantManifest("    shards: 4\n", "    shards: 4\n");
    const text = readFileSync(file, "utf8");
    const port = await freePort();
    const u = spawnUp(port, 0, true, file, {}, undefined, ["--watch"]);
    const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
    const models = async () => (await client.models.list()).data.map((m) => m.id);
    try {
      await untilServing(u, port);
      expect(u.err()).toContain(
        `[up] watching ${file}: an edit of the gateways' flags alone rolls the gateways, one of the replica counts starts or stops processes, any other stops everything`,
      );
      expect(await models()).toEqual(["tiny-v3"]);
      const before = descendants(u.proc.pid!);
      expect(before.length).toBeGreaterThanOrEqual(7); // up, nats-server, 4 shards, the gateway

      // A comment changes nothing the manifest says: nothing restarts.
      writeFileSync(file, `# edited\n${text}`);
      await untilLogged(u, "the no-op", `[up] ${file} changed, but the model says what it said`);
      expect(before.filter(alive)).toEqual(before);

      // The served name reaches the gateway alone: a new one starts beside it, serves, and the
      // old one leaves up's front (which holds the ports under --watch), everything else
      // running on (a Deployment's roll of the gateways, the shards untouched). A client asking
      // all along, without retries, sees no failure.
      const gateway = pidUnder(u, /main\.ts gateway /)!;
      expect(before).toContain(gateway);
      const noRetries = new OpenAI({
        baseURL: `http://127.0.0.1:${port}/v1`,
        apiKey: "unused",
        maxRetries: 0,
      });
      let rolling = true;
      let asked = 0;
      const failed: string[] = [];
      const asking = (async () => {
        while (rolling) {
          try {
            await noRetries.models.list();
            asked++;
          } catch (e) {
            failed.push(String(e));
          }
        }
      })();
      writeFileSync(file, text.replace("servedModelName: tiny-v3", "servedModelName: tiny-rolled"));
      await untilLogged(
        u,
        "the roll",
        `[up] ${file} changed (spec.servedModelName): rolling the gateways onto it; nats-server and the shards run on`,
      );
      await untilLogged(
        u,
        "the rolled gateway",
        "[up] the gateways run the edited manifest, serving 'tiny-rolled'",
      );
      expect(u.err()).toContain("[up] gateway.1 serves the edited manifest");
      await waitFor("the old gateway to stop", async () => (alive(gateway) ? undefined : true));
      rolling = false;
      await asking;
      expect(failed).toEqual([]);
      expect(asked).toBeGreaterThan(0);
      expect(await models()).toEqual(["tiny-rolled"]);
      expect(before.filter(alive)).toEqual(before.filter((pid) => pid !== gateway));
      expect(pidUnder(u, /main\.ts gateway /)).not.toBe(gateway);
      expect(u.out().match(/expertmesh is serving/g)).toHaveLength(1);

      // A gateway flag the new gateway refuses (past the tiny model's 256 positions): the roll
      // stops, and the gateway of the previous manifest serves on.
      writeFileSync(
        file,
        text
          .replace("servedModelName: tiny-v3", "servedModelName: tiny-rolled")
          .replace("    gpus: 1\n", "    gpus: 1\n    limits: { maxModelLen: 300 }\n"),
      );
      await untilLogged(
        u,
        "the stuck roll",
        "[up] gateway.2 did not start on the edited manifest ([EM_LOCAL_CHILD_EXITED] gateway.2 exited (1) before it was ready): the roll stops here; gateway.1 serves on",
      );
      expect(await models()).toEqual(["tiny-rolled"]);
      const rolled = descendants(u.proc.pid!);

      writeFileSync(
        file,
        text
          .replace("servedModelName: tiny-v3", "servedModelName: tiny-edited")
          .replace("    shards: 4\n", "    shards: 2\n"),
      );
      await untilLogged(
        u,
        "the restart",
        `[up] ${file} changed (spec.experts.shards reaches more than the gateways): stopping everything, then starting it again with the new manifest`,
      );
      await waitFor(
        "the edited manifest to serve",
        async () =>
          (u.out().match(/expertmesh is serving/g) ?? []).length === 2 ? true : undefined,
        90_000,
      );
      expect(await models()).toEqual(["tiny-edited"]);
      expect(u.err()).toContain("default/tiny: 2 shard(s) x 1 replica(s)");
      // Every process of the first manifest stopped (none is left behind holding a port).
      expect(rolled.filter(alive)).toEqual([]);

      // A manifest the API server would refuse: said, and the running one serves on.
      writeFileSync(file, text.replace("    shards: 4\n", "    shards: -1\n"));
      await untilLogged(
        u,
        "the refusal",
        /\[up\] \S+ changed, but \[EM_MANIFEST_INVALID\] .*spec\.experts\.shards.*; the previous manifest runs on until it is fixed/,
      );
      expect(await models()).toEqual(["tiny-edited"]);
      expect(u.out().match(/expertmesh is serving/g)).toHaveLength(2);

      // A field only a cluster uses (the image): nothing here changes, nothing restarts.
      const all = descendants(u.proc.pid!);
      writeFileSync(
        file,
        text
          .replace(
            "servedModelName: tiny-v3",
            "servedModelName: tiny-edited\n  image: example.com/em:2",
          )
          .replace("    shards: 4\n", "    shards: 2\n"),
      );
      await untilLogged(
        u,
        "the image edit",
        `[up] ${file} changed (spec.image): nothing up runs changes`,
      );
      expect(all.filter(alive)).toEqual(all);

      expect(await ctrlC(u.proc)).toBe(0);
      await waitFor("every process to stop", async () =>
        all.every((pid) => !alive(pid)) ? true : undefined,
      );
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGKILL");
    }
  });

  it("--watch with two gateways behind up's ports: an edit of their flags rolls them one at a time, each new one serving before the old one stops; one that cannot start stops the roll, the old ones serving on; an edit of the replica counts starts and stops processes, restarting none; no request fails meanwhile", async () => {
    const file = variantManifest("    replicas: 1\n", "    replicas: 2\n");
    const text = readFileSync(file, "utf8");
    const port = await freePort();
    const u = spawnUp(port, 0, true, file, {}, undefined, ["--watch"]);
    // No retries: a request the roll broke counts.
    const client = new OpenAI({
      baseURL: `http://127.0.0.1:${port}/v1`,
      apiKey: "unused",
      maxRetries: 0,
    });
    try {
      await untilServing(u, port);
      const gateways = () =>
        descendants(u.proc.pid!).filter((pid) =>
          /main\.ts gateway /.test(
            readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " "),
          ),
        );
      const before = gateways();
      expect(before).toHaveLength(2);
      const others = descendants(u.proc.pid!).filter((pid) => !before.includes(pid));
      expect(others.length).toBeGreaterThanOrEqual(6); // up, nats-server (and its shell), 4 shards

      // Two clients, one request after another each, for as long as the roll takes.
      let rolling = true;
      const ok: number[] = [0, 0];
      const failed: string[] = [];
      const clientLoop = async (i: number) => {
        while (rolling) {
          try {
            const r = await client.completions.create({
              model: "tiny-v3",
              prompt: `Hello ${i}`,
              max_tokens: 8,
              temperature: 0,
            });
            if (r.choices[0]?.finish_reason) ok[i]!++;
          } catch (e) {
            failed.push(String(e));
          }
        }
      };
      const loops = [clientLoop(0), clientLoop(1)];
      const maxModelLen = (n: number) =>
        text.replace("    replicas: 2\n", `    replicas: 2\n    limits: { maxModelLen: ${n} }\n`);
      // Past the tiny model's 256 positions: the first new gateway exits, the roll stops.
      writeFileSync(file, maxModelLen(300));
      await untilLogged(
        u,
        "the stuck roll",
        "[up] gateway.2 did not start on the edited manifest ([EM_LOCAL_CHILD_EXITED] gateway.2 exited (1) before it was ready): the roll stops here; gateway.0 serves on",
      );
      expect(before.filter(alive)).toEqual(before);
      writeFileSync(file, maxModelLen(200));
      await untilLogged(
        u,
        "the roll",
        `[up] ${file} changed (spec.gateway.limits.maxModelLen): rolling the gateways onto it`,
      );
      await untilLogged(u, "the roll to end", "[up] the gateways run the edited manifest", 90_000);
      rolling = false;
      await Promise.all(loops);
      expect(failed).toEqual([]);
      expect(ok[0]! + ok[1]!).toBeGreaterThan(4);
      for (const [fresh, old] of [
        ["gateway.3", "gateway.0"],
        ["gateway.4", "gateway.1"],
      ])
        await untilLogged(u, `${old} to stop`, `[up] ${old} stopped (replaced by ${fresh}`);
      await waitFor("the old gateways to exit", async () =>
        before.some(alive) ? undefined : true,
      );
      // One at a time: each new gateway served before the one it replaced was told to stop.
      const log = u.err();
      for (const [fresh, old] of [
        ["gateway.3", "gateway.0"],
        ["gateway.4", "gateway.1"],
      ])
        expect(log.indexOf(`[up] ${fresh} serves the edited manifest`)).toBeLessThan(
          log.indexOf(`[up] ${old} stopped (replaced by ${fresh}`),
        );
      const after = gateways();
      expect(after).toHaveLength(2);
      expect(after.filter((pid) => before.includes(pid))).toEqual([]);
      expect(others.filter(alive)).toEqual(others);
      const listed = await client.models.list();
      expect((listed.data[0] as unknown as { max_model_len: number }).max_model_len).toBe(200);
      expect(u.out().match(/expertmesh is serving/g)).toHaveLength(1);

      // Replica counts: processes start (and stop), nothing restarts, as kubectl scale.
      const running = descendants(u.proc.pid!);
      const shards = () =>
        descendants(u.proc.pid!).filter((pid) =>
          /main\.ts shard /.test(
            readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " "),
          ),
        );
      expect(shards()).toHaveLength(4);
      const scaled = (gateways: number, shardReplicas: number) =>
        maxModelLen(200)
          .replace("    replicas: 2\n", `    replicas: ${gateways}\n`)
          .replace(
            "    gpusPerShard: 1\n",
            `    gpusPerShard: 1\n    replicas: { min: ${shardReplicas}, max: 2 }\n`,
          );
      writeFileSync(file, scaled(3, 2));
      await untilLogged(
        u,
        "the scaling",
        `[up] ${file} changed (spec.experts.replicas.max, spec.experts.replicas.min, spec.gateway.replicas): scaling to 3 gateways, scaling to 2 replica(s) of each shard; nothing restarts`,
      );
      for (const name of ["gateway.5", "shard-0.1", "shard-1.1", "shard-2.1", "shard-3.1"])
        await untilLogged(u, `${name} to serve`, `[up] ${name} is serving`);
      expect(gateways()).toHaveLength(3);
      expect(shards()).toHaveLength(8);
      expect(running.filter(alive)).toEqual(running);
      // Scaled down while clients send: the stopped gateway drains, none of theirs fails.
      rolling = true;
      const more = [clientLoop(0), clientLoop(1)];
      writeFileSync(file, scaled(2, 1));
      for (const name of ["gateway.5", "shard-0.1", "shard-1.1", "shard-2.1", "shard-3.1"])
        await untilLogged(u, `${name} to stop`, `[up] ${name} stopped (scaled down`);
      await waitFor("the scaled-down processes to exit", async () =>
        gateways().length === 2 && shards().length === 4 ? true : undefined,
      );
      rolling = false;
      await Promise.all(more);
      expect(failed).toEqual([]);
      expect(running.filter(alive)).toEqual(running);
      expect(await ctrlC(u.proc)).toBe(0);
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGKILL");
    }
  });

  it("--watch killed outright (SIGKILL): the up it runs sees its standard input end and stops everything", async () => {
    const port = await freePort();
    const u = spawnUp(port, 0, true, manifest, {}, undefined, ["--watch"]);
    let all: number[] = [];
    try {
      await untilServing(u, port);
      all = descendants(u.proc.pid!);
      expect(all.length).toBeGreaterThanOrEqual(7);
      u.proc.kill("SIGKILL");
      await waitFor(
        "every process to stop",
        async () => (all.every((pid) => !alive(pid)) ? true : undefined),
        30_000,
      ).catch((e) => {
        throw new Error(`${e}: still running ${all.filter(alive).join(", ")}`);
      });
    } finally {
      for (const pid of all.filter(alive)) process.kill(pid, "SIGKILL"); // after a failure
    }
  });

  it("--single-process: one gateway runs every expert itself; no nats-server (none is installed here) and no shard starts, and Ctrl-C stops it", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "single-"));
    const env: NodeJS.ProcessEnv = { ...process.env, PATH: "/usr/bin:/bin" };
    delete env["EXPERTMESH_NATS_SERVER"];
    env["EXPERTMESH_CACHE_DIR"] = join(dir, "cache"); // no nats-server build there either
    const port = await freePort();
    const u = spawnUp(port, 0, true, manifest, {}, join(dir, "models"), ["--single-process"], env);
    try {
      await untilServing(u, port);
      expect(u.err()).toContain("one process, the gateway running every expert");
      expect(u.err()).toMatch(/serving 'tiny-v3' on http:\/\/127\.0\.0\.1:\d+ \(single-process\)/);
      expect(u.err()).not.toContain("[shard-");
      const procs = descendants(u.proc.pid!);
      expect(procs).toHaveLength(1); // the gateway
      const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
      const r = await client.chat.completions.create({
        model: "tiny-v3",
        messages: [{ role: "user", content: "Hello!" }],
        max_tokens: 8,
        temperature: 0,
      });
      expect(r.choices[0]!.message.content!.length).toBeGreaterThan(0);
      expect(await completionTokens(port, 6)).toBe(6);
      expect(await ctrlC(u.proc)).toBe(0);
      expect(procs.filter(alive)).toEqual([]);
    } finally {
      if (u.proc.exitCode === null) process.kill(-u.proc.pid!, "SIGKILL");
    }
  });

  it("rejects a bad port before starting anything", async () => {
    const r = await runCli(process.execPath, [main, "up", "-f", manifest, "--grpc-port=eighty"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("[EM_CLI_USAGE] --grpc-port must be a port, 0..65535, got 'eighty'");
    const same = await runCli(process.execPath, [
      main,
      "up",
      "-f",
      manifest,
      "--http-port=9123",
      "--grpc-port=9123",
    ]);
    expect(same.code).toBe(1);
    expect(same.stderr).toContain("[EM_CLI_USAGE] the HTTP and gRPC ports are both 9123");
    const device = await runCli(process.execPath, [main, "up", "-f", manifest, "--device=gpu"]);
    expect(device.code).toBe(1);
    expect(device.stderr).toContain("[EM_CLI_USAGE] --device must be auto, cpu or cuda, got 'gpu'");
    const mb = await runCli(process.execPath, [
      main,
      "up",
      "-f",
      manifest,
      "--single-process",
      "--micro-batches=2",
    ]);
    expect(mb.code).toBe(1);
    expect(mb.stderr).toContain(
      "[EM_CLI_USAGE] --micro-batches overlaps one half's expert round trip",
    );
    const remote = variantManifest(
      "  gateway:\n",
      "  gateway:\n    kvCache: { remoteBytes: 4194304 }\n",
    );
    const single = await runCli(process.execPath, [main, "up", "-f", remote, "--single-process"]);
    expect(single.code).toBe(1);
    expect(single.stderr).toContain("[EM_CLI_USAGE] --single-process starts no nats-server");
  });

  it("--device cuda without a CUDA device fails before starting anything", async () => {
    const r = await runCli(process.execPath, [main, "up", "-f", manifest, "--device=cuda"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      "[EM_NATIVE_UNSUPPORTED] --device cuda: the manifest requests GPUs but this machine has no usable CUDA device",
    );
    expect(r.stderr).not.toContain("nats");
  });

  it("says how to get a nats-server when there is none", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "no-nats-"));
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      EXPERTMESH_CACHE_DIR: join(dir, "cache"), // no nats-server build there
      PATH: "/usr/bin:/bin",
    };
    delete env["EXPERTMESH_NATS_SERVER"];
    const r = await runCli(
      process.execPath,
      [
        main,
        "up",
        "-f",
        manifest,
        `--models-dir=${join(dir, "models")}`,
        "--http-port=0",
        "--grpc-port=0",
      ],
      undefined,
      env,
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("[EM_ENV_MISSING_BINARY] no nats-server found");
    expect(r.stderr).toContain("npm run env:provision -- nats");
  });
});
