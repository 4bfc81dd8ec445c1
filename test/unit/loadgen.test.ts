// The pure parts of `expertmesh bench` (src/loadgen, src/cli/commands/bench.ts): the SSE
// splitter, percentiles, Poisson arrivals, a level's summary and table, prompts, options.
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { baseUrl, listFlag, sloFlag } from "../../src/cli/commands/bench.ts";
import { type RequestResult, requestBody, SseParser } from "../../src/loadgen/client.ts";
import {
  arrivalOffsetsMs,
  distribution,
  formatLevels,
  meetsSlo,
  percentile,
  summarizeLevel,
} from "../../src/loadgen/level.ts";
import {
  fitPrompt,
  randomPrompts,
  readPrompts,
  sharedPrefix,
  type TokenCounter,
} from "../../src/loadgen/prompts.ts";

describe("SseParser", () => {
  const stream = 'data: {"a":1}\n\ndata: [DONE]\n\n';
  it.each([
    ["in one chunk", [stream]],
    ["byte by byte", stream.split("")],
    ["cut inside the blank line", ['data: {"a":1}\n', "\ndata: [DONE]\n", "\n"]],
    ["with CRLF line ends", [stream.replaceAll("\n", "\r\n")]],
    [
      "with comments and other fields",
      [': ping\n\nevent: x\nid: 3\ndata: {"a":1}\n\ndata:[DONE]\n\n'],
    ],
  ])("splits events %s", (_, chunks) => {
    const p = new SseParser();
    expect(chunks.flatMap((c) => p.feed(c))).toEqual(['{"a":1}', "[DONE]"]);
  });

  it("joins an event's data lines and keeps an unfinished event for later", () => {
    const p = new SseParser();
    expect(p.feed("data: one\ndata: two\n\ndata: thr")).toEqual(["one\ntwo"]);
    expect(p.feed("ee\n\n")).toEqual(["three"]);
  });
});

describe("percentile", () => {
  // numpy.percentile(values, p) (linear interpolation).
  it.each([
    [[], 50, Number.NaN],
    [[7], 99, 7],
    [[1, 2, 3, 4], 50, 2.5],
    [[4, 1, 3, 2], 90, 3.7],
    [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99, 9.91],
    [[10, 20], 0, 10],
    [[10, 20], 100, 20],
  ])("of %j at %d is %d", (values, p, want) => {
    const got = percentile(values, p);
    if (Number.isNaN(want)) expect(got).toBeNaN();
    else expect(got).toBeCloseTo(want, 10);
  });

  it("distribution leaves out samples that are not finite (a request with no token)", () => {
    expect(distribution([1, Number.NaN, 3])).toEqual({
      mean: 2,
      p50: 2,
      p90: 2.8,
      p99: 2.98,
      max: 3,
    });
  });
});

describe("arrivalOffsetsMs", () => {
  it("sends everything at once at an infinite rate", () => {
    expect(arrivalOffsetsMs(4, Number.POSITIVE_INFINITY, 1)).toEqual([0, 0, 0, 0]);
  });

  it.each([0.5, 10, 200])(
    "draws exponential gaps of mean 1/rate at %d/s, the same for a seed",
    (rate) => {
      const n = 20_000;
      const a = arrivalOffsetsMs(n, rate, 7);
      expect(a[0]).toBe(0);
      expect(arrivalOffsetsMs(n, rate, 7)).toEqual(a);
      expect(arrivalOffsetsMs(n, rate, 8)).not.toEqual(a);
      const gaps = a.slice(1).map((t, i) => t - a[i]!);
      expect(Math.min(...gaps)).toBeGreaterThanOrEqual(0);
      const mean = gaps.reduce((x, y) => x + y, 0) / gaps.length;
      // The standard error of the mean of 20,000 exponential gaps is 0.7 % of the mean.
      expect(mean / (1000 / rate)).toBeGreaterThan(0.97);
      expect(mean / (1000 / rate)).toBeLessThan(1.03);
      // Exponential: the median gap is ln 2 of the mean.
      expect(percentile(gaps, 50) / mean).toBeCloseTo(Math.LN2, 1);
    },
  );
});

const result = (o: Partial<RequestResult>): RequestResult => ({
  ok: true,
  startMs: 0,
  promptTokens: 10,
  outputTokens: 5,
  ttftMs: 100,
  itlMs: [10, 10, 10, 10],
  e2eMs: 140,
  ...o,
});

describe("summarizeLevel", () => {
  const summary = summarizeLevel(
    { concurrency: 2, rate: Number.POSITIVE_INFINITY, requests: 5 },
    {
      wallSeconds: 2,
      results: [
        result({}),
        result({ ttftMs: 300, e2eMs: 700, outputTokens: 5 }),
        result({ outputTokens: 1, itlMs: [], e2eMs: 100 }),
        result({ ok: false, errorKind: "HTTP 429", error: "HTTP 429: busy", outputTokens: 0 }),
        result({
          ok: false,
          errorKind: "HTTP 429",
          error: "HTTP 429: still busy",
          outputTokens: 0,
        }),
      ],
    },
  );

  it("counts throughput over the wall time from the succeeded requests only", () => {
    expect(summary).toMatchObject({
      concurrency: 2,
      rate: null,
      requests: 5,
      succeeded: 3,
      failed: 2,
      promptTokens: 30,
      outputTokens: 11,
      requestsPerSecond: 1.5,
      outputTokensPerSecond: 5.5,
      totalTokensPerSecond: 20.5,
    });
  });

  it("groups failures by kind, with the first one's message", () => {
    expect(summary.errors).toEqual([{ kind: "HTTP 429", count: 2, example: "HTTP 429: busy" }]);
  });

  it("takes TPOT per request with more than one token: (e2e - ttft) / (tokens - 1)", () => {
    // (140 - 100) / 4 = 10 and (700 - 300) / 4 = 100.
    expect(summary.tpotMs.mean).toBe(55);
    expect(summary.ttftMs.p50).toBe(100);
    expect(summary.itlMs.max).toBe(10);
    expect(summary.e2eMs.max).toBe(700);
  });

  it("prints a row per level, a dash where there is no sample", () => {
    const none = summarizeLevel(
      { concurrency: 1, rate: 4, requests: 1 },
      { wallSeconds: 1, results: [result({ ok: false, errorKind: "timed out" })] },
    );
    const lines = formatLevels([summary, none]).split("\n");
    expect(lines[0]).toMatch(/^concurrency\s+rate\/s\s+ok\s+failed\s+req\/s\s+out tok\/s/);
    expect(lines[1]).toMatch(/^2\s+inf\s+3\s+2\s+1\.50\s+5\.5\s+20\.5\s+100\/260\/296\s/);
    expect(lines[2]).toMatch(/^1\s+4\.00\s+0\s+1\s+0\.00\s+0\.0\s+0\.0\s+-\/-\/-\s/);
    expect(lines.at(-1)).toBe("(latencies in ms)");
  });
});

describe("goodput", () => {
  // TTFT 100, TPOT (140 - 100) / 4 = 10, e2e 140.
  it.each([
    [{}, true],
    [{ ttft: 100, tpot: 10, e2e: 140 }, true],
    [{ ttft: 99 }, false],
    [{ tpot: 9.9 }, false],
    [{ e2e: 139 }, false],
  ])("a request meets %j: %s", (slo, want) => {
    expect(meetsSlo(result({}), slo)).toBe(want);
  });

  it("a failed request meets none; a one-token request has no TPOT to miss", () => {
    expect(meetsSlo(result({ ok: false }), {})).toBe(false);
    expect(meetsSlo(result({ outputTokens: 1, e2eMs: 9e9 }), { tpot: 1 })).toBe(true);
  });

  it("counts the requests that met the objectives, and shows them after req/s", () => {
    const s = summarizeLevel(
      { concurrency: 1, rate: Number.POSITIVE_INFINITY, requests: 3 },
      {
        wallSeconds: 2,
        results: [result({}), result({ ttftMs: 500, e2eMs: 540 }), result({ ok: false })],
      },
      { ttft: 200 },
    );
    expect(s).toMatchObject({ succeeded: 2, goodRequests: 1, goodputRequestsPerSecond: 0.5 });
    const [header, row] = formatLevels([s]).split("\n");
    expect(header).toMatch(/\s+req\/s\s+good req\/s\s+out tok\/s/);
    expect(row).toMatch(/^1\s+inf\s+2\s+1\s+1\.00\s+0\.50\s/);
    expect(
      summarizeLevel({ concurrency: 1, rate: 1, requests: 1 }, { wallSeconds: 1, results: [] }),
    ).not.toHaveProperty("goodRequests");
  });

  it.each([
    ["ttft:500", { ttft: 500 }],
    ["ttft:500,tpot:50", { ttft: 500, tpot: 50 }],
    ["e2el:2000, tpot:7.5", { e2e: 2000, tpot: 7.5 }],
  ])("reads --goodput %s", (v, want) => {
    expect(sloFlag(v)).toEqual(want);
  });

  it.each([
    ["itl:5", /unknown objective 'itl'/],
    ["ttft", /'ttft' needs a number of ms > 0/],
    ["ttft:0", /needs a number/],
    ["ttft:5:6", /needs a number/],
    ["ttft:5,ttft:6", /'ttft' given twice/],
    ["", /unknown objective ''/],
  ])("refuses --goodput %j", (v, why) => {
    expect(() => sloFlag(v)).toThrow(why);
  });
});

describe("requestBody", () => {
  const target = { url: "http://x", model: "m" } as const;
  it.each([
    ["chat", { messages: [{ role: "user", content: "hi" }], max_tokens: 4, ignore_eos: true }],
    ["completions", { prompt: "hi", max_tokens: 4, ignore_eos: true }],
  ] as const)("asks %s for a stream with usage", (api, want) => {
    expect(
      requestBody({ ...target, api }, { prompt: "hi", maxTokens: 4, ignoreEos: true }),
    ).toEqual({
      model: "m",
      ...want,
      stream: true,
      stream_options: { include_usage: true },
    });
  });

  it("leaves ignore_eos out when not asked, and adds the extra fields", () => {
    expect(
      requestBody(
        { ...target, api: "completions" },
        { prompt: "hi", maxTokens: 1, extra: { temperature: 0 } },
      ),
    ).not.toHaveProperty("ignore_eos");
  });
});

describe("prompts", () => {
  it("draws the same prompts for a seed, each with its own first word, of the asked length", () => {
    const a = randomPrompts(50, 12, 3);
    expect(randomPrompts(50, 12, 3)).toEqual(a);
    expect(randomPrompts(50, 12, 4)).not.toEqual(a);
    expect(new Set(a.map((p) => p.split(" ")[0])).size).toBe(50);
    for (const p of a) expect(p.split(" ")).toHaveLength(12);
  });

  it("draws a shared prefix of the asked length from the seed, apart from the prompts", () => {
    const p = sharedPrefix(30, 3);
    expect(p.split(" ")).toHaveLength(30);
    expect(sharedPrefix(30, 3)).toBe(p);
    expect(sharedPrefix(30, 4)).not.toBe(p);
    expect(randomPrompts(1, 31, 3)[0]!.split(" ").slice(1).join(" ")).not.toBe(p);
  });

  const file = (text: string) => {
    const path = join(mkdtempSync(join(tmpdir(), "prompts-")), "p");
    writeFileSync(path, text);
    return path;
  };
  it.each([
    ["plain lines", "one\n\ntwo words\n", ["one", "two words"]],
    ["JSON strings", '"one"\n"two\\nlines"\n', ["one", "two\nlines"]],
    [
      "vLLM's custom dataset",
      '{"prompt": "one"}\n{"prompt": "two", "output_tokens": 3}\n',
      ["one", "two"],
    ],
  ])("reads %s", (_, text, want) => {
    expect(readPrompts(file(text))).toEqual(want);
  });

  it.each([
    ["", /has no prompt/],
    [
      '{"text": "x"}\n',
      /line 1: a JSON line must be a string or an object with a non-empty string "prompt"/,
    ],
    ['{"prompt": "x"}\n{bad\n', /line 2 is not JSON/],
  ])("refuses %j", (text, why) => {
    expect(() => readPrompts(file(text))).toThrow(why);
  });

  it("names a file it cannot read", () => {
    expect(() => readPrompts("/nonexistent/p.jsonl")).toThrow(
      /\[?EM_CLI_FILE|cannot read the prompts file/,
    );
  });
});

describe("fitPrompt (--input-len)", () => {
  /** Counts as a tokenizer would: `overhead` tokens, then each word's `perWord` tokens. */
  const counter = (overhead: number, perWord: (w: string) => number) => {
    const calls = { n: 0 };
    const count: TokenCounter = async (text) => {
      calls.n++;
      return overhead + text.split(" ").reduce((n, w) => n + perWord(w), 0);
    };
    return { count, calls };
  };
  const oneEach = () => 1;
  // A word of 1 to 3 tokens by its length, as a tokenizer splits rarer words.
  const byLength = (w: string) => Math.min(3, Math.ceil(w.length / 2));

  it.each([
    ["one token a word, nothing added", 0, oneEach, [1, 2, 16, 300]],
    ["one token a word, a chat template's 7", 7, oneEach, [8, 9, 64, 1000]],
    ["words of 1 to 3 tokens", 7, byLength, [8, 9, 10, 33, 64, 257]],
  ])("%s: every prompt runs on exactly the length", async (_, overhead, perWord, targets) => {
    for (const target of targets)
      for (const i of [0, 1, 7]) {
        const { count } = counter(overhead, perWord);
        const got = await fitPrompt(i, target, 0, count);
        expect(got.tokens, `${target} #${i}`).toBe(target);
        expect(await count(got.text)).toBe(target);
        expect(got.text.startsWith(`${i}: `) || got.text === `${i}:`).toBe(true);
      }
  });

  it("asks the server O(log length) times", async () => {
    const { count, calls } = counter(5, oneEach);
    await fitPrompt(3, 4096, 0, count);
    expect(calls.n).toBeLessThanOrEqual(16);
  });

  it("is the same prompt for the same index and seed, another for another", async () => {
    const { count } = counter(0, byLength);
    const a = await fitPrompt(2, 40, 5, count);
    expect(await fitPrompt(2, 40, 5, count)).toEqual(a);
    expect((await fitPrompt(3, 40, 5, count)).text).not.toBe(a.text);
    expect((await fitPrompt(2, 40, 6, count)).text).not.toBe(a.text);
  });

  it("settles below the length when no word fits the last token (every word two tokens)", async () => {
    const { count } = counter(0, (w) => (w.endsWith(":") ? 1 : 2));
    expect(await fitPrompt(0, 6, 0, count)).toMatchObject({ tokens: 5 });
    // A letter of one token fills it.
    const letters = counter(0, (w) => (w.endsWith(":") || w === "a" ? 1 : 2)).count;
    const filled = await fitPrompt(0, 6, 0, letters);
    expect(filled).toMatchObject({ tokens: 6 });
    expect(filled.text.endsWith(" a")).toBe(true);
  });

  it("refuses a length the request's own tokens exceed (EM_CLI_USAGE), and a server whose count does not grow (EM_BENCH_REFUSED)", async () => {
    await expect(fitPrompt(0, 6, 0, counter(9, oneEach).count)).rejects.toThrow(
      expect.objectContaining({
        code: "EM_CLI_USAGE",
        message: expect.stringContaining("--input-len 6 is less than the 10 tokens"),
      }),
    );
    await expect(fitPrompt(0, 6, 0, async () => 3)).rejects.toThrow(
      expect.objectContaining({ code: "EM_BENCH_REFUSED" }),
    );
  });
});

describe("bench options", () => {
  it.each([
    ["1,4,16", { integer: true }, [1, 4, 16]],
    ["2", { integer: true }, [2]],
    ["0.5, inf", { integer: false, inf: true }, [0.5, Number.POSITIVE_INFINITY]],
  ])("reads the list %j", (v, o, want) => {
    expect(listFlag(v, "--x", o)).toEqual(want);
  });

  it.each([
    ["0", { integer: true }],
    ["1.5", { integer: true }],
    ["1,", { integer: true }],
    ["inf", { integer: true }],
    ["-1", { integer: false, inf: true }],
    ["fast", { integer: false, inf: true }],
  ])("refuses the list %j", (v, o) => {
    expect(() => listFlag(v, "--x", o)).toThrow(/--x must be a comma-separated list/);
  });

  it.each([
    ["http://127.0.0.1:8000", "http://127.0.0.1:8000"],
    ["http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"],
    ["https://llm.example.com/v1/", "https://llm.example.com"],
    ["http://proxy/models/tiny/v1", "http://proxy/models/tiny"],
  ])("takes the base URL of %s", (v, want) => {
    expect(baseUrl(v)).toBe(want);
  });

  it.each(["localhost:8000", "ftp://x", "nats://x:4222"])("refuses the URL %s", (v) => {
    expect(() => baseUrl(v)).toThrow(/--url must be an http\(s\) URL/);
  });
});
