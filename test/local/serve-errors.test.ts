// The serving commands (`shard`, `gateway`, and `generate`) when their input is wrong or their address is
// taken: one line with a stable code and a prompt exit, even after they connected to NATS or
// opened a server (before, a late error was printed and the process ran on, still serving),
// and never an unhandled 'error' event. A plan made for another model is refused at start.
import { spawn } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer, type Server } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { resolveArchitecture } from "../../src/api/presets.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { serializePlan } from "../../src/moe/plan-json.ts";
import { startNats } from "../env/nats.ts";
import { freePort, ManagedProcess } from "../env/process.ts";
import { runCli } from "../support/cli.ts";
import { testEnv } from "../support/env.ts";
import { startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { metricsPort, startShard, waitServing } from "../support/shards.ts";

const main = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const expertmesh = (args: string[]) => runCli(process.execPath, [main, ...args]);
/** `expertmesh shard` 0 of the tiny checkpoint with `plan`; `extra` replaces or adds flags. */
const shard = (plan: string, ...extra: string[]) =>
  expertmesh([
    "shard",
    `--model=${dir}`,
    `--plan=${plan}`,
    "--shard=0",
    `--nats=${testEnv().nats.url}`,
    ...(extra.some((f) => f.startsWith("--metrics-port=")) ? [] : ["--metrics-port=0"]),
    ...extra,
  ]);

let dir: string;
let taken: Server;
let takenPort: number;
const plans: Record<string, string> = {};

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  for (const preset of ["tiny-v2", "tiny-v3"] as const) {
    plans[preset] = join(dir, `${preset}.plan.json`);
    const plan = planPlacement({ architecture: resolveArchitecture(preset), numShards: 2 });
    writeFileSync(plans[preset], serializePlan(plan));
  }
  taken = createServer();
  await new Promise<void>((r) => taken.listen(0, "127.0.0.1", r));
  takenPort = (taken.address() as { port: number }).port;
});

afterAll(() => {
  taken?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("serving commands on bad input", () => {
  it("generate: prompt and --max-tokens past the context, and bad sampling flags, refused", async () => {
    const generate = (extra: string[]) => expertmesh(["generate", `--model=${dir}`, ...extra]);
    for (const [extra, message] of [
      [
        ["--prompt=hi", "--max-tokens=1000"],
        /the prompt \(\d+ tokens\) and --max-tokens 1000 do not fit the model's context of \d+ tokens/,
      ],
      [
        [`--prompt=${"ab ".repeat(25_000)}`, "--max-tokens=1"],
        /the prompt \(at least \d+ tokens\)/,
      ],
      [["--prompt=hi", "--max-tokens=1e12"], /--max-tokens 1000000000000 do not fit/],
      [["--prompt=hi", "--max-tokens=1.5"], /--max-tokens must be an integer >= 1, got '1.5'/],
      [["--prompt=hi", "--top-p=0", "--temperature=1"], /--top-p must be in \(0, 1\], got '0'/],
      [["--prompt=hi", "--min-p=1.5"], /--min-p must be in \[0, 1\], got '1.5'/],
      [["--prompt=hi", "--repetition-penalty=0"], /--repetition-penalty must be in 0\.01\.\.100/],
      [
        ["--prompt=hi", "--repetition-penalty=1e-320"],
        /--repetition-penalty must be in 0\.01\.\.100, got '1e-320'/,
      ],
      [["--prompt=hi", "--kv-cache-dtype=fp8_e5m2"], /unknown KV cache dtype 'fp8_e5m2'/],
    ] as const) {
      const r = await generate([...extra]);
      expect(r.code, extra.join(" ").slice(0, 40)).toBe(1);
      expect(r.stderr).toMatch(/\[EM_CLI_USAGE\]/);
      expect(r.stderr).toMatch(message);
    }
  });

  it("unknown options and missing values are usage errors in every command", async () => {
    for (const args of [
      ["generate", "--bogus"],
      ["shard", "--model"],
      ["gateway", "--nope=1"],
      ["up", "-f", "x.yaml", "extra"],
    ]) {
      const r = await expertmesh(args);
      expect(r.code, args.join(" ")).toBe(1);
      expect(r.stderr, args.join(" ")).toMatch(/\[EM_CLI_USAGE\] .*\(see --help\)/);
    }
  });

  it("a namespace or model name that is no NATS subject token is refused", async () => {
    for (const extra of ["--namespace=*", "--namespace=a b", "--model-name=x.>"]) {
      const r = await shard(plans["tiny-v3"]!, extra);
      expect(r.code, extra).toBe(1);
      expect(r.stderr, extra).toMatch(/\[EM_CLI_USAGE\] .* must be letters, digits/);
    }
  });

  it("a shard given another model's plan refuses it before loading anything", async () => {
    const r = await shard(plans["tiny-v2"]!);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/\[EM_PLAN_MISMATCH\] .*tiny-v2\.plan\.json places 8 experts/);
  });

  it("a gateway given another model's plan refuses it", async () => {
    const r = await expertmesh([
      "gateway",
      `--model=${dir}`,
      `--plan=${plans["tiny-v2"]}`,
      `--nats=${testEnv().nats.url}`,
      "--http-port=0",
      "--metrics-port=0",
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("[EM_PLAN_MISMATCH]");
  });

  it("MTP drafts: a bad method or length, a model without the layer, a plan without its experts", async () => {
    const gw = (model: string, ...extra: string[]) =>
      expertmesh(["gateway", `--model=${model}`, "--http-port=0", "--metrics-port=0", ...extra]);
    const method = await gw(dir, "--local", "--speculative-method=eagle");
    expect(method.code).toBe(1);
    expect(method.stderr).toContain("[EM_CLI_USAGE] --speculative-method must be ngram or mtp");
    const tokens = await gw(dir, "--local", "--speculative-method=mtp", "--speculative-tokens=16");
    expect(tokens.code).toBe(1);
    expect(tokens.stderr).toContain(
      "[EM_CLI_USAGE] speculative tokens must be an integer in [1, 15]",
    );
    const none = await gw(dir, "--local", "--speculative-method=mtp");
    expect(none.code).toBe(1);
    expect(none.stderr).toContain("[EM_CKPT_NO_MTP]");
    // A model with the layer, and a plan that does not place its experts.
    const mtpDir = await tinyCheckpointFor("tiny-v3-mtp");
    try {
      const r = await gw(
        mtpDir,
        `--plan=${plans["tiny-v3"]}`,
        `--nats=${testEnv().nats.url}`,
        "--speculative-method=mtp",
      );
      expect(r.code).toBe(1);
      expect(r.stderr).toContain("does not place the MTP layer's experts (layer 4)");
    } finally {
      rmSync(mtpDir, { recursive: true, force: true });
    }
    // A shard of a model without the layer, given a plan that places it.
    const withMtp = join(dir, "mtp.plan.json");
    writeFileSync(
      withMtp,
      serializePlan(
        planPlacement({ architecture: resolveArchitecture("tiny-v3"), numShards: 2, mtpLayers: 1 }),
      ),
    );
    const sh = await shard(withMtp);
    expect(sh.code).toBe(1);
    expect(sh.stderr).toContain("[EM_PLAN_MISMATCH]");
    expect(sh.stderr).toContain("but the model has none");
  });

  it("a load that hangs (its volume blocks) ends gateway and shard with EM_CKPT_READ_STALLED", async () => {
    // A real hang, as a network volume gone away gives one: a write lease (fcntl
    // F_SETLEASE, taken by python3) blocks every open() of the weights file until its
    // holder lets go, or for the kernel's lease-break-time (45 s by default).
    const hung = await tinyCheckpointFor("tiny-v3");
    const lease = spawn(
      "python3",
      [
        "-c",
        "import fcntl, os, signal, sys, time\n" +
          "signal.signal(signal.SIGIO, signal.SIG_IGN)\n" +
          "fd = os.open(sys.argv[1], os.O_WRONLY)\n" +
          "fcntl.fcntl(fd, 1024, fcntl.F_WRLCK)\n" +
          "print('leased', flush=True)\n" +
          "time.sleep(120)\n",
        join(hung, "model.safetensors"),
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    try {
      // Its first line, or its exit (a lease refused: the test fails with its stderr above).
      const said = await new Promise<string>((resolve) => {
        let out = "";
        lease.stdout!.on("data", (d: Buffer) => {
          out += d.toString();
          if (out.includes("\n")) resolve(out);
        });
        lease.on("exit", (code) => resolve(`${out}(python3 exited: ${code})`));
      });
      expect(said).toBe("leased\n");
      const stall = ["--load-stall-timeout=1", "--metrics-port=0"];
      for (const args of [
        ["gateway", `--model=${hung}`, "--local", "--http-port=0", ...stall],
        [
          "shard",
          `--model=${hung}`,
          `--plan=${plans["tiny-v3"]}`,
          "--shard=0",
          `--nats=${testEnv().nats.url}`,
          ...stall,
        ],
      ]) {
        const t0 = performance.now();
        const r = await expertmesh(args);
        expect(r.code, args[0]).toBe(1);
        expect(r.stderr, args[0]).toMatch(
          /\[EM_CKPT_READ_STALLED\] no progress for \d\.\d s while opening the checkpoint: file 0\/1/,
        );
        // Well before the kernel would have broken the lease.
        expect(performance.now() - t0, args[0]).toBeLessThan(30_000);
      }
      // SIGTERM while the weights load (hung here, with no stall limit): it exits at once,
      // cleanly (in a container, as PID 1, a process without a handler would ignore it).
      const loading = new ManagedProcess(
        `gateway-loading-${await freePort()}`,
        process.execPath,
        [main, "gateway", `--model=${hung}`, "--local", "--http-port=0", "--metrics-port=0"],
        join(testEnv().runDir, "logs"),
      );
      try {
        const log = () => readFileSync(loading.logPath, "utf8");
        await loading.waitUntil("listening", async () => log().includes("starting; /health"));
        const t0 = performance.now();
        process.kill(loading.pid!, "SIGTERM");
        for (let i = 0; i < 100 && !loading.exited; i++) await sleep(100);
        expect(loading.exited).toBe(true);
        expect(performance.now() - t0).toBeLessThan(5_000);
        expect(log()).toContain("SIGTERM while starting: exiting");
      } finally {
        await loading.stop(1000);
      }
      const bad = await expertmesh([
        "gateway",
        `--model=${dir}`,
        "--local",
        "--load-stall-timeout=soon",
      ]);
      expect(bad.code).toBe(1);
      expect(bad.stderr).toContain(
        "[EM_CLI_USAGE] --load-stall-timeout must be seconds, 0..86400, got 'soon'",
      );
    } finally {
      lease.kill();
      rmSync(hung, { recursive: true, force: true });
    }
  });

  it("a bad or taken port ends the process with its code (it kept serving, or threw)", async () => {
    const gateway = (extra: string[]) =>
      expertmesh(["gateway", `--model=${dir}`, "--local", "--host=127.0.0.1", ...extra]);
    const dtype = await gateway(["--http-port=0", "--kv-cache-dtype=int4"]);
    expect(dtype.code).toBe(1);
    expect(dtype.stderr).toContain("[EM_CLI_USAGE] unknown KV cache dtype 'int4'");
    const policy = await gateway(["--http-port=0", "--scheduling-policy=lifo"]);
    expect(policy.code).toBe(1);
    expect(policy.stderr).toContain(
      "[EM_CLI_USAGE] --scheduling-policy must be fcfs or priority, got lifo",
    );
    const aging = await gateway(["--http-port=0", "--priority-aging=30"]);
    expect(aging.code).toBe(1);
    expect(aging.stderr).toContain(
      "[EM_CLI_USAGE] --priority-aging needs --scheduling-policy priority",
    );
    const agingBad = await gateway([
      "--http-port=0",
      "--scheduling-policy=priority",
      "--priority-aging=-1",
    ]);
    expect(agingBad.code).toBe(1);
    expect(agingBad.stderr).toContain("[EM_CLI_USAGE] --priority-aging must be a number >= 0");
    const keepalive = await gateway(["--http-port=0", "--stream-keepalive=soon"]);
    expect(keepalive.code).toBe(1);
    expect(keepalive.stderr).toContain(
      "[EM_CLI_USAGE] --stream-keepalive must be a number >= 0, got 'soon'",
    );
    const bad = await gateway(["--http-port=0", "--metrics-port=abc"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain(
      "[EM_CLI_USAGE] --metrics-port must be a port, 0..65535, got 'abc'",
    );
    for (const flag of ["--metrics-port", "--http-port"]) {
      const other = flag === "--http-port" ? "--metrics-port=0" : "--http-port=0";
      const r = await gateway([`${flag}=${takenPort}`, other]);
      expect(r.code, flag).toBe(1);
      expect(r.stderr, flag).toContain(
        `[EM_LISTEN_FAILED] ${flag}: cannot listen on 127.0.0.1:${takenPort}`,
      );
      expect(r.stderr, flag).not.toMatch(/\n\s+at /); // no stack trace
    }
    // A shard's metrics port taken: after it joined its NATS queue group, it leaves again.
    const busy = await shard(plans["tiny-v3"]!, `--metrics-port=${takenPort}`);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain(
      `[EM_LISTEN_FAILED] --metrics-port: cannot listen on 0.0.0.0:${takenPort}`,
    );
  });

  it("files named by options are read before the weights, with the option in the error", async () => {
    const missing = await shard(join(dir, "no-such.plan.json"));
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(
      /\[EM_CLI_FILE\] --plan .*no-such\.plan\.json: cannot read it: no such file/,
    );
    const creds = await shard(plans["tiny-v3"]!, `--nats-creds=${join(dir, "nope.creds")}`);
    expect(creds.stderr).toMatch(/\[EM_CLI_FILE\] --nats-creds .*nope\.creds: cannot read it/);
    expect(creds.stderr).not.toContain("loading experts");
    const gateway = await expertmesh([
      "gateway",
      `--model=${dir}`,
      `--plan=${join(dir, "no-such.plan.json")}`,
      `--nats=${testEnv().nats.url}`,
    ]);
    expect(gateway.code).toBe(1);
    expect(gateway.stderr).toContain("[EM_CLI_FILE] --plan ");
    expect(gateway.stderr).not.toContain("loading weights");
  });

  it("--chat-template: a file that is not there, a template that does not parse or render: refused before the weights", async () => {
    const gateway = (template: string) =>
      expertmesh(["gateway", `--model=${dir}`, "--local", `--chat-template=${template}`]);
    const missing = await gateway(join(dir, "no-such.jinja"));
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(
      /\[EM_CLI_FILE\] --chat-template .*no-such\.jinja: cannot read it: no such file/,
    );
    const broken = await gateway("{% if %}");
    expect(broken.code).toBe(1);
    expect(broken.stderr).toMatch(
      /\[EM_TOKENIZER_TEMPLATE\] --chat-template: chat_template does not parse/,
    );
    const raising = await gateway("{{ raise_exception('no chats here') }}");
    expect(raising.code).toBe(1);
    expect(raising.stderr).toMatch(
      /\[EM_TOKENIZER_TEMPLATE\] .*chat template failed: .*no chats here/,
    );
    for (const r of [missing, broken, raising]) expect(r.stderr).not.toContain("loading weights");
    const generate = await expertmesh([
      "generate",
      `--model=${dir}`,
      "--prompt=hi",
      "--chat",
      `--chat-template=${join(dir, "no-such.jinja")}`,
    ]);
    expect(generate.code).toBe(1);
    expect(generate.stderr).toMatch(/\[EM_CLI_FILE\] --chat-template /);
  });

  it("NATS that cannot be reached or is no URL: EM_NATS_CONNECT; credentials that are none: EM_NATS_AUTH", async () => {
    const closed = await freePort();
    const gone = await shard(
      plans["tiny-v3"]!,
      `--nats=nats://127.0.0.1:${closed}`,
      "--nats-wait=1",
    );
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain(`not reachable (connection refused): trying for up to 1 s`);
    expect(gone.stderr).toContain(
      `[EM_NATS_CONNECT] cannot connect to NATS at nats://127.0.0.1:${closed}: connection refused (tried for 1 s)`,
    );
    const garbage = join(dir, "garbage.creds");
    writeFileSync(garbage, "not a creds file\n");
    const creds = await shard(plans["tiny-v3"]!, `--nats-creds=${garbage}`);
    expect(creds.code).toBe(1);
    expect(creds.stderr).toMatch(
      /\[EM_NATS_AUTH\] --nats-creds .*garbage\.creds is not a NATS \.creds file/,
    );
    const url = await shard(plans["tiny-v3"]!, "--nats=not a url");
    expect(url.stderr).toContain(
      "[EM_NATS_CONNECT] cannot connect to NATS at not a url: not a NATS URL",
    );
    for (const bad of ["x", "-1", "3601"]) {
      const r = await shard(plans["tiny-v3"]!, `--nats-wait=${bad}`);
      expect(r.stderr, bad).toContain(
        `[EM_CLI_USAGE] --nats-wait must be seconds, 0..3600, got '${bad}'`,
      );
    }
  });

  it("a shard started before its NATS server waits for it, then serves", async () => {
    const port = await freePort();
    const p = startShard(dir, plans["tiny-v3"]!, "late-nats", 0, "r0", `nats://127.0.0.1:${port}`);
    const natsDir = join(testEnv().runDir, `late-nats-${port}`);
    let nats: Awaited<ReturnType<typeof startNats>> | undefined;
    try {
      await p.waitUntil("waiting for NATS", async () =>
        readFileSync(p.logPath, "utf8").includes("not reachable (connection refused)"),
      );
      // Its probe port is open meanwhile: live, not ready, saying why, the load counted.
      const at = `http://127.0.0.1:${metricsPort(p)}`;
      const probe = async (path: string) => {
        const r = await fetch(`${at}${path}`);
        return { status: r.status, text: await r.text() };
      };
      expect(await probe("/healthz")).toEqual({ status: 200, text: "ok\n" });
      expect(await probe("/readyz")).toEqual({
        status: 503,
        text: `starting: connecting to NATS at nats://127.0.0.1:${port}\n`,
      });
      const starting = (await probe("/metrics")).text;
      expect(starting).toContain('expertmesh_startup_complete{role="shard"} 0');
      const read = Number(/expertmesh_load_read_bytes\{role="shard"\} (\d+)/.exec(starting)?.[1]);
      expect(read).toBeGreaterThan(0);
      expect(starting).toContain(`expertmesh_load_size_bytes{role="shard"} ${read}`);
      nats = await startNats(
        testEnv().binaries.natsServer,
        natsDir,
        join(testEnv().runDir, "logs"),
        {
          port,
          name: `late-nats-${port}`,
        },
      );
      await waitServing(p);
      expect(p.exited).toBe(false);
      expect(await probe("/readyz")).toEqual({ status: 200, text: "ok\n" });
      const serving = (await probe("/metrics")).text;
      expect(serving).toContain('expertmesh_startup_complete{role="shard"} 1');
      expect(serving).toContain('expertmesh_shard_pending_frames{shard="0"} 0');
    } finally {
      await p.stop(3000);
      await nats?.process.stop(3000);
    }
  });

  it("a gateway started before NATS answers its probes and refuses requests with EM_GATEWAY_STARTING, then serves", async () => {
    const port = await freePort();
    const natsUrl = `nats://127.0.0.1:${port}`;
    const name = `late-gw-${port}`;
    const logs = join(testEnv().runDir, "logs");
    const gw = new ManagedProcess(
      `gateway-${name}`,
      process.execPath,
      [
        main,
        "gateway",
        `--model=${dir}`,
        `--plan=${plans["tiny-v3"]}`,
        `--nats=${natsUrl}`,
        "--namespace=test",
        `--model-name=${name}`,
        "--served-model-name=tiny",
        "--host=127.0.0.1",
        "--http-port=0",
        "--metrics-port=0",
      ],
      logs,
    );
    const log = () => readFileSync(gw.logPath, "utf8");
    const shards: ManagedProcess[] = [];
    let nats: Awaited<ReturnType<typeof startNats>> | undefined;
    try {
      await gw.waitUntil("waiting for NATS", async () => log().includes("not reachable"));
      const m = /starting; \/health and \/ready on (http:\/\/[\d.]+:\d+), metrics on :(\d+)/.exec(
        log(),
      );
      expect(m, log()).not.toBeNull();
      const [url, metrics] = [m![1]!, `http://127.0.0.1:${m![2]}/metrics`];
      const phase = `connecting to NATS at ${natsUrl}`;
      const get = async (at: string) => {
        const r = await fetch(at);
        return { status: r.status, body: await r.text() };
      };
      expect(await get(`${url}/health`)).toEqual({
        status: 200,
        body: JSON.stringify({ status: "starting", phase }),
      });
      expect(await get(`${url}/ready`)).toEqual({
        status: 503,
        body: JSON.stringify({ status: "starting", phase }),
      });
      expect((await get(metrics)).body).toContain('expertmesh_startup_complete{role="gateway"} 0');
      const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });
      // ignore_eos: always 4 tokens (sampled, this random model may end sooner).
      const chat = () =>
        client.chat.completions.create({
          model: "tiny",
          messages: [{ role: "user", content: "Hello" }],
          max_tokens: 4,
          ignore_eos: true,
        } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      const err = await chat().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OpenAI.APIError);
      const api = err as InstanceType<typeof OpenAI.APIError>;
      expect(api.status).toBe(503);
      expect(api.code).toBe("EM_GATEWAY_STARTING");
      expect(api.message).toContain(`the gateway is starting (${phase})`);
      expect(api.headers?.get("retry-after")).toBe("5");

      nats = await startNats(testEnv().binaries.natsServer, join(testEnv().runDir, name), logs, {
        port,
        name,
      });
      await gw.waitUntil("serving", async () => log().includes("serving 'tiny'"));
      // Serving, but not ready: /ready names the shards nobody serves yet (their subjects
      // end with the weights' digest, ADR 0035).
      const weights = await (await Checkpoint.open(dir)).weightsDigest();
      expect(await get(`${url}/ready`)).toEqual({
        status: 503,
        body: JSON.stringify({
          status: "not ready",
          shards: Object.fromEntries(
            [0, 1].map((k) => [
              k,
              `no replica serves em.test.${name}.shard.${k}.w${weights} (no responders)`,
            ]),
          ),
        }),
      });
      for (const k of [0, 1])
        shards.push(startShard(dir, plans["tiny-v3"]!, name, k, "r0", natsUrl));
      await Promise.all(shards.map((p) => waitServing(p)));
      const done = await chat();
      expect(done.usage?.completion_tokens).toBe(4);
      expect(done.choices[0]!.finish_reason).toBe("length");
      expect(await get(`${url}/ready`)).toEqual({
        status: 200,
        body: JSON.stringify({ status: "ready" }),
      });
      const served = (await get(metrics)).body;
      expect(served).toContain('expertmesh_startup_complete{role="gateway"} 1');
      expect(served).toContain("expertmesh_gateway_num_requests_running 0");
    } finally {
      await gw.stop(3000);
      for (const p of shards) await p.stop(3000);
      await nats?.process.stop(3000);
    }
  });

  it("a --dtype that is none of auto, bf16, fp16, fp32, fp8 ends shard, gateway and generate with EM_CLI_USAGE", async () => {
    const runs = await Promise.all([
      shard(plans["tiny-v3"]!, "--dtype=int4"),
      expertmesh(["gateway", "--local", `--model=${dir}`, "--dtype=int4"]),
      expertmesh(["generate", `--model=${dir}`, "--prompt=Hi", "--dtype=int4"]),
    ]);
    for (const r of runs) {
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(
        "[EM_CLI_USAGE] --dtype must be auto, bf16, fp16, fp32, fp8, got 'int4'",
      );
      expect(r.stderr).not.toMatch(/loading|loaded/);
    }
  });

  it("--cpu-matmul: int8 ends shard, gateway and generate with EM_CLI_USAGE; bf16 generates", async () => {
    const runs = await Promise.all([
      shard(plans["tiny-v3"]!, "--cpu-matmul=int8"),
      expertmesh(["gateway", "--local", `--model=${dir}`, "--cpu-matmul=int8"]),
      expertmesh(["generate", `--model=${dir}`, "--prompt=Hi", "--cpu-matmul=int8"]),
    ]);
    for (const r of runs) {
      expect(r.code).toBe(1);
      expect(r.stderr).toContain("[EM_CLI_USAGE] --cpu-matmul must be fp32 or bf16, got 'int8'");
    }
    const ok = await expertmesh([
      "generate",
      `--model=${dir}`,
      "--prompt=Hi",
      "--max-tokens=4",
      "--cpu-matmul=bf16",
    ]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout.length).toBeGreaterThan(0);
  });

  it("SIGTERM with requests in flight: they end whole, then the process exits (keep-alive does not hold it)", async () => {
    const started = await startGatewayProcess({
      modelDir: dir,
      namespace: "local",
      modelName: `stop-${await freePort()}`,
    });
    const gw = started.process;
    try {
      const client = started.client;
      // A plain request and a stream in flight at SIGTERM, each on its own connection.
      const plain = client.completions.create({
        model: "tiny",
        prompt: "Once upon a time",
        max_tokens: 64,
        ignore_eos: true,
      } as OpenAI.CompletionCreateParamsNonStreaming);
      const stream = await client.completions.create({
        model: "tiny",
        prompt: "Once upon a time",
        max_tokens: 48,
        ignore_eos: true,
        stream: true,
      } as OpenAI.CompletionCreateParamsStreaming);
      let chunks = 0;
      let finish: string | null = null;
      for await (const c of stream) {
        if (chunks++ === 0) process.kill(gw.pid!, "SIGTERM");
        finish = c.choices[0]?.finish_reason ?? finish;
      }
      expect(finish).toBe("length");
      expect(chunks).toBeGreaterThan(1);
      expect((await plain).usage?.completion_tokens).toBe(64);
      // The client keeps its connection for reuse; the server closes it (the default
      // keepAliveTimeout, 72 s, would otherwise hold the stop past a pod's grace period).
      for (let i = 0; i < 100 && !gw.exited; i++) await sleep(100);
      expect(gw.exited).toBe(true);
      expect(gw.child.exitCode).toBe(0);
    } finally {
      await gw.stop(3000);
    }
  });

  it("--shutdown-timeout: a request still running then is cut, and the process exits", async () => {
    expect(
      (await expertmesh(["gateway", "--local", `--model=${dir}`, "--shutdown-timeout=x"])).stderr,
    ).toMatch(/\[EM_CLI_USAGE\] --shutdown-timeout must be a number/);
    const started = await startGatewayProcess({
      modelDir: dir,
      namespace: "local",
      modelName: `cut-${await freePort()}`,
      args: ["--shutdown-timeout=1"],
    });
    const gw = started.process;
    try {
      // A request whose body never ends (a stalled upload): in flight for as long as it likes.
      const { port } = new URL(started.url);
      const socket = connect(Number(port), "127.0.0.1");
      await new Promise<void>((r) => socket.once("connect", () => r()));
      socket.write(
        'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mo',
      );
      const closed = new Promise<void>((r) => socket.once("close", () => r()));
      await sleep(200);
      const t0 = performance.now();
      process.kill(gw.pid!, "SIGTERM");
      for (let i = 0; i < 100 && !gw.exited; i++) await sleep(100);
      expect(gw.exited).toBe(true);
      await closed;
      expect(gw.child.exitCode).toBe(0);
      expect(performance.now() - t0).toBeLessThan(6_000);
      expect(started.log()).toContain("requests still running after 1 s: cut");
    } finally {
      await gw.stop(1000);
    }
  });

  it("SIGTERM with connections that never sent a byte (preconnects, HTTP and gRPC): they are closed, and the stop does not wait for them", async () => {
    const started = await startGatewayProcess({
      modelDir: dir,
      namespace: "local",
      modelName: `pre-${await freePort()}`,
      // Long: were the connections waited for, the stop would cut them only after a minute.
      args: ["--shutdown-timeout=60", "--grpc-port=0"],
    });
    const gw = started.process;
    try {
      const http = Number(new URL(started.url).port);
      const grpc = Number(/gRPC \(KServe v2\) on :(\d+)/.exec(started.log())?.[1]);
      expect(grpc).toBeGreaterThan(0);
      // Half-open allowed, as a client that never reads (Python's socket, a stalled proxy)
      // behaves: a Node socket would answer the server's FIN at once, and the graceful
      // close would not wait for it.
      const silent = [http, grpc].map((port) =>
        connect({ port, host: "127.0.0.1", allowHalfOpen: true }),
      );
      await Promise.all(silent.map((s) => new Promise<void>((r) => s.once("connect", () => r()))));
      // The server's end of each (the gRPC server first sends its HTTP/2 settings: read on).
      const ended = Promise.all(
        silent.map((s) => new Promise<void>((r) => s.once("end", () => r()))),
      );
      for (const s of silent) s.on("error", () => {}).resume();
      await sleep(200);
      process.kill(gw.pid!, "SIGTERM");
      // Node counts such a connection neither idle nor active, and grpc-js's graceful
      // shutdown waits for its session: before, the stop waited for --shutdown-timeout.
      for (let i = 0; i < 100 && !gw.exited; i++) await sleep(100);
      expect(gw.exited).toBe(true);
      await ended;
      for (const s of silent) s.destroy();
      expect(gw.child.exitCode).toBe(0);
      expect(started.log()).not.toContain("still running");
    } finally {
      await gw.stop(1000);
    }
  });

  it("--shutdown-delay: after SIGTERM /ready says draining and requests are still served, then it stops", async () => {
    for (const bad of ["x", "-1", "301"]) {
      const r = await expertmesh([
        "gateway",
        "--local",
        `--model=${dir}`,
        `--shutdown-delay=${bad}`,
      ]);
      expect(r.code, bad).toBe(1);
      expect(r.stderr, bad).toMatch(/\[EM_CLI_USAGE\] --shutdown-delay must be/);
    }
    const started = await startGatewayProcess({
      modelDir: dir,
      namespace: "local",
      modelName: `drain-${await freePort()}`,
      args: ["--shutdown-delay=3"],
    });
    const gw = started.process;
    const { url, log } = started;
    try {
      const ready = async () => {
        const r = await fetch(`${url}/ready`);
        return { status: r.status, body: await r.text() };
      };
      expect(await ready()).toEqual({ status: 200, body: JSON.stringify({ status: "ready" }) });
      const client = started.client;
      process.kill(gw.pid!, "SIGTERM");
      await gw.waitUntil("draining", async () => (await ready()).status === 503, 5000);
      expect(await ready()).toEqual({ status: 503, body: JSON.stringify({ status: "draining" }) });
      // Still serving: a request sent now is answered, and liveness holds. Each answer ends
      // its connection (a keep-alive client's next request goes to another gateway).
      const { data: done, response } = await client.completions
        .create({
          model: "tiny",
          prompt: "Hi",
          max_tokens: 3,
          ignore_eos: true,
        } as OpenAI.CompletionCreateParamsNonStreaming)
        .withResponse();
      expect(done.usage?.completion_tokens).toBe(3);
      expect(response.headers.get("connection")).toBe("close");
      expect((await fetch(`${url}/health`)).status).toBe(200);
      expect(gw.exited).toBe(false);
      for (let i = 0; i < 150 && !gw.exited; i++) await sleep(100);
      expect(gw.exited).toBe(true);
      expect(gw.child.exitCode).toBe(0);
      expect(log()).toMatch(
        /SIGTERM: not ready; still serving for 3 s, then stopping\n.*SIGTERM: stopping \(finishing requests in flight\)\n(.*\n)*.*stopped\n/,
      );
    } finally {
      await gw.stop(3000);
    }
  });
});
