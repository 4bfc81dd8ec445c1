// `expertmesh bench` (src/cli/commands/bench.ts) against a real gateway process with an API
// key: what it reports agrees with what the gateway counted in its own metrics (requests,
// prompt and output tokens), its failures are counted and make the exit status 1, and a
// server it cannot use is a stable error before any load.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { arrivalOffsetsMs, type LevelSummary } from "../../src/loadgen/level.ts";
import { freePort } from "../env/process.ts";
import { runCli } from "../support/cli.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { type GatewayProcess, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const KEY = "bench-key";

interface Report {
  url: string;
  model: string;
  api: string;
  levels: LevelSummary[];
}

let gateway: GatewayProcess;
let dir: string;
beforeAll(async () => {
  dir = mkdtempSync(join(testEnv().runDir, "bench-command-"));
  gateway = await startGatewayProcess({
    modelDir: await tinyCheckpointFor("tiny-v3"),
    namespace: "test",
    modelName: "bench-command",
    args: [`--api-key=${KEY}`],
  });
});
afterAll(async () => {
  await gateway?.process.stop();
});

const bench = (args: string[], env: NodeJS.ProcessEnv = process.env) =>
  runCli(process.execPath, [mainTs, "bench", `--url=${gateway.url}/v1`, ...args], undefined, env);

/** The gateway's counters (a series' value summed over its labels) and prefix-cache hits. */
async function counters(): Promise<{
  success: number;
  prompt: number;
  generation: number;
  prefixHits: number;
}> {
  const port = /metrics on :(\d+)/.exec(gateway.log())![1];
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const sum = (name: string) =>
    [...text.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "gm"))].reduce(
      (n, m) => n + Number(m[1]),
      0,
    );
  return {
    success: sum("expertmesh_gateway_request_success_total"),
    prompt: sum("expertmesh_gateway_prompt_tokens_total"),
    generation: sum("expertmesh_gateway_generation_tokens_total"),
    prefixHits: sum("expertmesh_gateway_prefix_cache_hits"),
  };
}

describe("expertmesh bench", () => {
  it("runs each level, and its requests and tokens are the ones the gateway counted", async () => {
    const before = await counters();
    const out = join(dir, "chat.json");
    const r = await bench(
      [
        "--concurrency=1,3",
        "--requests=5",
        "--max-tokens=6",
        "--prompt-words=20",
        // Ten minutes end to end: every request meets it.
        "--goodput=e2e:600000",
        `--json=${out}`,
      ],
      { ...process.env, OPENAI_API_KEY: KEY },
    );
    expect(r.stderr).not.toMatch(/failed:/);
    expect(r.code).toBe(0);
    const after = await counters();
    // The table on stdout, one row per level; the same figures in the JSON file.
    const rows = r.stdout.split("\n").filter((l) => /^\d+\s+inf\s/.test(l));
    expect(rows).toHaveLength(2);
    const report = JSON.parse(readFileSync(out, "utf8")) as Report;
    expect(report).toMatchObject({ url: gateway.url, model: "tiny", api: "chat" });
    expect(
      report.levels.map((l) => [l.concurrency, l.requests, l.succeeded, l.failed, l.goodRequests]),
    ).toEqual([
      [1, 5, 5, 0, 5],
      [3, 5, 5, 0, 5],
    ]);
    // ignore_eos (the default): every request made exactly --max-tokens tokens.
    for (const l of report.levels) expect(l.outputTokens).toBe(5 * 6);
    expect(after.success - before.success).toBe(10);
    expect(after.generation - before.generation).toBe(60);
    const prompt = report.levels.reduce((n, l) => n + l.promptTokens, 0);
    expect(after.prompt - before.prompt).toBe(prompt);
    // 20 words a prompt: more than 20 tokens each (a word is one token or more).
    expect(prompt).toBeGreaterThan(10 * 20);
    for (const l of report.levels) {
      expect(l.ttftMs.p50).toBeGreaterThan(0);
      expect(l.ttftMs.p50).toBeLessThanOrEqual(l.ttftMs.p99);
      expect(l.e2eMs.p50).toBeGreaterThanOrEqual(l.ttftMs.p50);
      expect(l.tpotMs.p50).toBeGreaterThan(0);
      expect(l.outputTokensPerSecond).toBeCloseTo(l.outputTokens / l.wallSeconds, 6);
    }
    // Progress on stderr: each level's start and end.
    expect(r.stderr).toMatch(/level 2\/2 \(concurrency 3\): 5\/5 requests in [\d.]+ s/);
  });

  it("sends /v1/completions with the prompts of a file, at an arrival rate", async () => {
    const prompts = join(dir, "prompts.jsonl");
    writeFileSync(prompts, `${JSON.stringify({ prompt: "Once upon a time" })}\n"The sea is"\n`);
    const before = await counters();
    const r = await bench([
      `--api-key=${KEY}`,
      "--api=completions",
      `--prompts=${prompts}`,
      "--concurrency=2",
      "--request-rate=50",
      "--requests=4",
      "--max-tokens=3",
      // No first token comes within a microsecond: no request is good.
      "--goodput=ttft:0.001",
      "--json=-",
    ]);
    expect(r.code).toBe(0);
    // --json - : the JSON alone on stdout.
    const report = JSON.parse(r.stdout) as Report;
    expect(report.api).toBe("completions");
    expect(report.levels[0]).toMatchObject({
      concurrency: 2,
      rate: 50,
      succeeded: 4,
      goodRequests: 0,
      goodputRequestsPerSecond: 0,
    });
    const after = await counters();
    expect(after.success - before.success).toBe(4);
    expect(after.prompt - before.prompt).toBe(report.levels[0]!.promptTokens);
  });

  it("fits its defaults to the model's context, and measures a shared prefix the prefix cache keeps", async () => {
    const plain = await bench([`--api-key=${KEY}`, "--concurrency=1", "--json=-"]);
    expect(plain.code).toBe(0);
    const defaults = JSON.parse(plain.stdout) as Report & { maxTokens: number };
    // The tiny model's 256 tokens: 32 output tokens, prompts of 16 words; every request fits.
    expect(defaults).toMatchObject({ maxTokens: 32, promptSource: "random, 16 words" });
    expect(defaults.levels[0]).toMatchObject({ succeeded: 8, failed: 0, outputTokens: 8 * 32 });

    const hits = async () => (await counters()).prefixHits;
    const before = await hits();
    const shared = await bench([
      `--api-key=${KEY}`,
      "--concurrency=1",
      "--requests=4",
      "--prompt-words=3",
      "--shared-prefix-words=40",
      "--max-tokens=2",
      "--seed=11",
      "--json=-",
    ]);
    expect(shared.code).toBe(0);
    const report = JSON.parse(shared.stdout) as Report & { sharedPrefixWords: number };
    expect(report.sharedPrefixWords).toBe(40);
    // The first request computes the system message; the three after it find it cached
    // (whole blocks of it: at least 40 tokens each, a word being one token or more).
    expect((await hits()) - before).toBeGreaterThanOrEqual(3 * 32);
  });

  it("--input-len: every request runs on exactly that many prompt tokens, counted by the gateway's /tokenize with the chat template and the shared prefix", async () => {
    for (const [api, extra] of [
      ["chat", []],
      ["completions", []],
      ["chat", ["--shared-prefix-words=10"]],
    ] as const) {
      const before = await counters();
      const r = await bench([
        `--api-key=${KEY}`,
        `--api=${api}`,
        "--concurrency=2",
        "--requests=5",
        "--input-len=48",
        "--max-tokens=3",
        ...extra,
        "--json=-",
      ]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toContain(
        "bench: sizing 5 prompt(s) to 48 tokens each with the server's /tokenize",
      );
      expect(r.stderr).not.toContain("fell short");
      const report = JSON.parse(r.stdout) as Report & { promptSource: string };
      expect(report.promptSource).toBe("random, 48 tokens");
      expect(report.levels[0]).toMatchObject({ succeeded: 5, promptTokens: 5 * 48 });
      // What the gateway itself counted (with a shared prefix, computed or cached alike).
      expect((await counters()).prompt - before.prompt).toBe(5 * 48);
    }
    const overlong = await bench([`--api-key=${KEY}`, "--input-len=250", "--max-tokens=10"]);
    expect(overlong.code).toBe(1);
    expect(overlong.stderr).toMatch(
      /\[EM_CLI_USAGE\] --input-len 250 and --max-tokens 10 exceed 'tiny''s context of 256 tokens/,
    );
    const tooShort = await bench([`--api-key=${KEY}`, "--input-len=2", "--requests=1"]);
    expect(tooShort.code).toBe(1);
    expect(tooShort.stderr).toMatch(/\[EM_CLI_USAGE\] --input-len 2 is less than the \d+ tokens/);
    const both = await bench(["--input-len=8", "--prompt-words=8"]);
    expect(both.stderr).toContain(
      "[EM_CLI_USAGE] --prompt-words and --input-len exclude each other",
    );
  });

  it("counts failed requests, says why, and exits 1", async () => {
    const r = await bench([
      `--api-key=${KEY}`,
      "--concurrency=2",
      "--requests=3",
      // Prompts of 200 words (600 tokens or so), more than the tiny model's context of 256:
      // every request is refused with HTTP 400.
      "--prompt-words=200",
      "--max-tokens=2",
      "--json=-",
    ]);
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout) as Report;
    expect(report.levels[0]).toMatchObject({ requests: 3, succeeded: 0, failed: 3 });
    expect(report.levels[0]!.errors).toHaveLength(1);
    // Counted by kind (each message names its own prompt's length).
    expect(report.levels[0]!.errors[0]).toMatchObject({
      kind: "HTTP 400 EM_GATEWAY_PROMPT_TOO_LONG",
      count: 3,
    });
    expect(report.levels[0]!.errors[0]!.example).toMatch(/^HTTP 400: .*context/);
    expect(r.stderr).toMatch(
      /bench: 3 request\(s\) failed:\n {2}3 x HTTP 400 EM_GATEWAY_PROMPT_TOO_LONG, e\.g\. HTTP 400: /,
    );
  });

  it("reports the levels done on Ctrl-C, leaving out the one under way, and exits 130", async () => {
    // Level 2 (seed 0 + 1) at 0.001 requests/s: its second request is due long after its first.
    expect(arrivalOffsetsMs(2, 0.001, 1)[1]).toBeGreaterThan(60_000);
    const child = spawn(process.execPath, [
      mainTs,
      "bench",
      `--url=${gateway.url}`,
      `--api-key=${KEY}`,
      "--concurrency=1",
      "--request-rate=inf,0.001",
      "--requests=2",
      "--max-tokens=2",
      "--json=-",
    ]);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
    await waitFor("level 2 under way", async () =>
      /level 2\/2 \(concurrency 1, 0\.001\/s\): 2 requests/.test(stderr) ? true : undefined,
    );
    child.kill("SIGINT");
    expect(await exited).toBe(130);
    expect(stderr).toMatch(
      /level 2\/2 \(concurrency 1, 0\.001\/s\): interrupted after [01] of 2 requests; not counted/,
    );
    const report = JSON.parse(stdout) as Report & { interrupted?: boolean };
    expect(report.interrupted).toBe(true);
    expect(report.levels.map((l) => [l.rate, l.succeeded])).toEqual([[null, 2]]);
  });

  it("refuses a server it cannot use before sending load: no key, a model it does not serve, nothing listening", async () => {
    const noKey = await bench(["--requests=1"], { ...process.env, OPENAI_API_KEY: "" });
    expect(noKey.code).toBe(1);
    expect(noKey.stderr).toMatch(/\[EM_BENCH_REFUSED\] .*HTTP 401.*--api-key/);
    const other = await bench([`--api-key=${KEY}`, "--model=gpt-4o", "--requests=1"]);
    expect(other.code).toBe(1);
    expect(other.stderr).toMatch(
      /\[EM_BENCH_REFUSED\] .* does not serve 'gpt-4o'; it serves: tiny/,
    );
    const port = await freePort();
    const none = await runCli(process.execPath, [
      mainTs,
      "bench",
      `--url=http://127.0.0.1:${port}`,
    ]);
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(
      /\[EM_BENCH_UNREACHABLE\] no answer from http:\/\/127\.0\.0\.1:\d+: .*ECONNREFUSED/,
    );
    const bad = await bench(["--concurrency=0"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/\[EM_CLI_USAGE\] --concurrency must be/);
    const long = await bench([`--api-key=${KEY}`, "--max-tokens=256"]);
    expect(long.code).toBe(1);
    expect(long.stderr).toMatch(
      /\[EM_CLI_USAGE\] --max-tokens 256 leaves no room for a prompt in 'tiny''s context of 256 tokens/,
    );
  });
});
