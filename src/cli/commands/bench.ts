// `expertmesh bench`: load on a running OpenAI-compatible server (an expertmesh gateway, the
// Service of a DeepSeekModel, `expertmesh up`, or any other), as vLLM's `bench serve`:
// streamed requests at each concurrency (and arrival rate) asked for, with the throughput and
// the latency percentiles (time to first token, time per output token, inter-token gaps,
// end to end) each level reached. For sizing replicas and the autoscaler's target queue
// depth, and comparing configurations; the repository's own suites are under bench/.
import { writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { Agent } from "undici";
import { getFrom, postTo, type Target } from "../../loadgen/client.ts";
import {
  formatLevels,
  type LevelSpec,
  type LevelSummary,
  runLevel,
  type Slo,
  summarizeLevel,
} from "../../loadgen/level.ts";
import { fitPrompt, randomPrompts, readPrompts, sharedPrefix } from "../../loadgen/prompts.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import { boolFlag, intFlag, numberFlag, readOptionFile } from "../options.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh bench [--url URL] [--model NAME] [--api chat|completions]
                  [--concurrency 1,4,16] [--request-rate inf] [--requests N]
                  [--max-tokens 128] [--prompt-words 64 | --input-len N | --prompts FILE]
                  [--ignore-eos true]
                  [--shared-prefix-words N]
                  [--goodput ttft:MS,tpot:MS,e2e:MS] [--temperature T] [--seed S]
                  [--timeout SECONDS] [--json FILE]
                  [--api-key KEY] [--cacert FILE] [--cert FILE --key FILE]

  --url URL            the server (default http://127.0.0.1:8000; a trailing /v1 is allowed)
  --model NAME         the model to ask for (default: the first the server's /v1/models lists)
  --api API            chat (/v1/chat/completions, default) or completions (/v1/completions)
  --concurrency LIST   requests in flight at once, a level each (default 1,4,16)
  --request-rate LIST  arrivals per second (Poisson), a level each with every concurrency;
                       inf (default) sends a request whenever one of the level's slots is free
  --requests N         requests per level (default 4 x the concurrency, at least 8)
  --max-tokens N       output tokens per request (default 128, at most an eighth of the
                       context length the server lists: 32 for the tiny model)
  --ignore-eos BOOL    generate max-tokens whatever the model samples (default true; vLLM's
                       ignore_eos: every request then has the same output length; servers
                       that do not know the field may refuse it: false)
  --prompt-words N     random prompts of N common words, each different (default 64, at most
                       a sixteenth of the context length: 16 for the tiny model)
  --input-len N        random prompts on which each request runs on exactly N prompt tokens
                       (vLLM's random input length), counted by the server's /tokenize
                       (expertmesh's and vLLM's) with the chat template and the shared prefix
                       the request adds; the report's prompt tokens say what was sent
  --shared-prefix-words N
                       N random words before every prompt, the same for all (a system
                       message in chat, the prompt's start in completions): what a prefix
                       cache saves (default 0)
  --prompts FILE       the prompts instead, cycled: JSON Lines of strings or {"prompt": ...}
                       objects, or one prompt per line
  --goodput SLOS       service-level objectives in ms (vLLM's --goodput): also report the
                       requests/s that met all of them (ttft, tpot, e2e; e.g. ttft:500,tpot:50)
  --temperature T      sent as the requests' temperature (default: the server's)
  --seed S             draws the random prompts and arrivals (default 0)
  --timeout SECONDS    a request still running after this fails (default 600)
  --json FILE          also write the results as JSON (- for stdout, then without the table)
  --api-key KEY        sent as a bearer token (default $OPENAI_API_KEY)
  --cacert FILE        trust this CA for https (a gateway with spec.gateway.tls)
  --cert/--key FILE    a client certificate for mutual TLS

Prints a table, one row per level: requests that succeeded and failed, requests/s and
tokens/s over the level's wall time, latency percentiles p50/p90/p99 in ms. Exit status 1
when any request failed (the failures are counted by kind, with an example of each). Ctrl-C
reports the levels done (exit status 130), leaving out the one under way.`;

export const benchCommand: Command = {
  name: "bench",
  summary: "measure a running server: throughput and latency percentiles under load",
  usage: USAGE,
  run: runBench,
};

/** A comma-separated list of numbers >= min (or `inf` where allowed). */
export function listFlag(
  v: string,
  flag: string,
  o: { integer: boolean; inf?: boolean },
): number[] {
  const items = v.split(",").map((s) => s.trim());
  return items.map((s) => {
    if (o.inf && s === "inf") return Number.POSITIVE_INFINITY;
    const n = Number(s);
    const valid = s !== "" && (o.integer ? Number.isSafeInteger(n) : Number.isFinite(n)) && n > 0;
    if (!valid) {
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `${flag} must be a comma-separated list of ${o.integer ? "integers" : "numbers"} > 0${o.inf ? " or inf" : ""}, got '${v}'`,
      );
    }
    return n;
  });
}

/** --goodput's objectives: `name:ms` pairs, names ttft, tpot, e2e (vLLM's e2el too). */
export function sloFlag(v: string): Slo {
  const slo: Slo = {};
  const bad = (why: string): never => {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--goodput must be name:ms pairs separated by commas, names ttft, tpot, e2e (e.g. ttft:500,tpot:50): ${why}, got '${v}'`,
    );
  };
  for (const part of v.split(",")) {
    const [name, value, ...rest] = part.split(":").map((s) => s.trim());
    const key = name === "e2el" ? "e2e" : name;
    if (key !== "ttft" && key !== "tpot" && key !== "e2e") bad(`unknown objective '${name}'`);
    const ms = Number(value);
    if (rest.length > 0 || value === undefined || value === "" || !Number.isFinite(ms) || ms <= 0)
      bad(`'${part}' needs a number of ms > 0`);
    if (slo[key as keyof Slo] !== undefined) bad(`'${name}' given twice`);
    slo[key as keyof Slo] = ms;
  }
  return slo;
}

/** The server's base URL from --url: without a trailing slash or /v1. */
export function baseUrl(v: string): string {
  let url: URL;
  try {
    url = new URL(v);
  } catch {
    throw new ExpertMeshError("EM_CLI_USAGE", `--url must be an http(s) URL, got '${v}'`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new ExpertMeshError("EM_CLI_USAGE", `--url must be an http(s) URL, got '${v}'`);
  }
  return url.href.replace(/\/+$/, "").replace(/\/v1$/, "");
}

/**
 * The model to ask for (--model, or the first listed) and its context length where the
 * server lists it (`max_model_len`, as vLLM's and expertmesh's /v1/models do); checks the
 * server answers.
 */
async function discoverModel(
  target: Omit<Target, "model" | "api">,
  asked?: string,
): Promise<{ model: string; maxModelLen?: number }> {
  let res: Response;
  try {
    res = await getFrom(target, "/v1/models");
  } catch (err) {
    const e = err as { message?: string; cause?: { message?: string; code?: string } };
    throw new ExpertMeshError(
      "EM_BENCH_UNREACHABLE",
      `no answer from ${target.url}: ${e.cause?.message ?? e.message ?? String(err)}; is the server running (expertmesh up, or kubectl port-forward to the model's Service)?`,
      { cause: err },
    );
  }
  const body = await res.text().catch(() => "");
  // A server in front of the model that lists none (404) still serves a named model.
  if (res.status === 404 && asked) return { model: asked };
  if (!res.ok) {
    throw new ExpertMeshError(
      "EM_BENCH_REFUSED",
      `${target.url}/v1/models answered HTTP ${res.status}: ${body.replace(/\s+/g, " ").slice(0, 300)}${res.status === 401 ? " (give the key with --api-key or $OPENAI_API_KEY)" : ""}`,
    );
  }
  let cards: { id: string; max_model_len?: unknown }[] = [];
  try {
    cards = (
      (JSON.parse(body) as { data?: { id?: unknown; max_model_len?: unknown }[] }).data ?? []
    ).filter((m): m is { id: string } => typeof m?.id === "string");
  } catch {}
  const ids = cards.map((m) => m.id);
  const found = (model: string) => {
    const len = cards.find((m) => m.id === model)?.max_model_len;
    return typeof len === "number" && len > 0 ? { model, maxModelLen: len } : { model };
  };
  if (asked) {
    if (ids.length > 0 && !ids.includes(asked)) {
      throw new ExpertMeshError(
        "EM_BENCH_REFUSED",
        `${target.url} does not serve '${asked}'; it serves: ${ids.join(", ")}`,
      );
    }
    return found(asked);
  }
  if (ids.length === 0) {
    throw new ExpertMeshError(
      "EM_BENCH_REFUSED",
      `${target.url}/v1/models lists no model; name one with --model`,
    );
  }
  return found(ids[0]!);
}

/** Progress on stderr: a rewritten line on a terminal, a line per level elsewhere. */
function levelProgress(label: string, total: number) {
  const tty = process.stderr.isTTY === true;
  let done = 0;
  let failed = 0;
  let last = 0;
  const line = () => `${label}: ${done}/${total} requests${failed ? `, ${failed} failed` : ""}`;
  if (!tty) process.stderr.write(`${label}: ${total} requests\n`);
  return {
    settled(ok: boolean) {
      done++;
      if (!ok) failed++;
      const now = Date.now();
      if (tty && (now - last > 100 || done === total)) {
        process.stderr.write(`\r\x1b[K${line()}`);
        last = now;
      }
    },
    finish(summary: LevelSummary) {
      const end = `${line()} in ${summary.wallSeconds.toFixed(1)} s, ${summary.outputTokensPerSecond.toFixed(1)} output tokens/s`;
      process.stderr.write(tty ? `\r\x1b[K${end}\n` : `${end}\n`);
    },
  };
}

const optionalInt = (v: string | undefined, flag: string) =>
  v === undefined ? undefined : intFlag(v, flag, 1);

function writeReport(path: string, json: string): void {
  try {
    writeFileSync(path, json);
  } catch (err) {
    throw new ExpertMeshError(
      "EM_WRITE_FAILED",
      `--json ${path}: cannot write it: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

async function runBench(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: "string" },
      model: { type: "string" },
      api: { type: "string" },
      concurrency: { type: "string" },
      "request-rate": { type: "string" },
      requests: { type: "string" },
      "max-tokens": { type: "string" },
      "ignore-eos": { type: "string" },
      "prompt-words": { type: "string" },
      "input-len": { type: "string" },
      "shared-prefix-words": { type: "string" },
      prompts: { type: "string" },
      temperature: { type: "string" },
      goodput: { type: "string" },
      seed: { type: "string" },
      timeout: { type: "string" },
      json: { type: "string" },
      "api-key": { type: "string" },
      cacert: { type: "string" },
      cert: { type: "string" },
      key: { type: "string" },
    },
    strict: true,
  });
  const url = baseUrl(values.url ?? "http://127.0.0.1:8000");
  const api = values.api ?? "chat";
  if (api !== "chat" && api !== "completions") {
    throw new ExpertMeshError("EM_CLI_USAGE", `--api must be chat or completions, got '${api}'`);
  }
  const concurrencies = listFlag(values.concurrency ?? "1,4,16", "--concurrency", {
    integer: true,
  });
  const rates = listFlag(values["request-rate"] ?? "inf", "--request-rate", {
    integer: false,
    inf: true,
  });
  const requestsFlag = values.requests;
  const ignoreEos = boolFlag(values["ignore-eos"], "--ignore-eos", true);
  const seed = intFlag(values.seed, "--seed", 0, 0);
  const timeoutMs = numberFlag(values.timeout, "--timeout", 600, 0.001) * 1000;
  const temperature =
    values.temperature === undefined
      ? undefined
      : numberFlag(values.temperature, "--temperature", 0, 0);
  const slo = values.goodput !== undefined ? sloFlag(values.goodput) : undefined;
  const promptFlags = (["prompts", "prompt-words", "input-len"] as const).filter(
    (f) => values[f] !== undefined,
  );
  if (promptFlags.length > 1) {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `${promptFlags.map((f) => `--${f}`).join(" and ")} exclude each other`,
    );
  }
  if ((values.cert === undefined) !== (values.key === undefined)) {
    throw new ExpertMeshError("EM_CLI_USAGE", "--cert and --key go together");
  }
  const levels: LevelSpec[] = rates.flatMap((rate) =>
    concurrencies.map((concurrency) => ({
      concurrency,
      rate,
      requests: intFlag(requestsFlag, "--requests", Math.max(8, 4 * concurrency)),
    })),
  );
  // Checked before connecting; their defaults depend on the model's context length.
  const maxTokensFlag = optionalInt(values["max-tokens"], "--max-tokens");
  const promptWordsFlag = optionalInt(values["prompt-words"], "--prompt-words");
  const inputLen = optionalInt(values["input-len"], "--input-len");
  const prefixWords = intFlag(values["shared-prefix-words"], "--shared-prefix-words", 0, 0);
  const filePrompts = values.prompts !== undefined ? readPrompts(values.prompts) : undefined;

  const apiKey = values["api-key"] ?? process.env.OPENAI_API_KEY;
  const headers: Record<string, string> = apiKey ? { authorization: `Bearer ${apiKey}` } : {};
  let dispatcher: Target["dispatcher"];
  if (values.cacert !== undefined || values.cert !== undefined) {
    dispatcher = new Agent({
      connect: {
        ...(values.cacert !== undefined ? { ca: readOptionFile(values.cacert, "--cacert") } : {}),
        ...(values.cert !== undefined
          ? {
              cert: readOptionFile(values.cert, "--cert"),
              key: readOptionFile(values.key!, "--key"),
            }
          : {}),
      },
    });
  }
  let onInterrupt: (() => void) | undefined;
  try {
    const reach = { url, headers, ...(dispatcher ? { dispatcher } : {}) };
    const { model, maxModelLen } = await discoverModel(reach, values.model);
    // Defaults that fit a small context (the tiny model's 256 tokens): output at most an
    // eighth of it, random prompts of at most a sixteenth as many words.
    const fitted = (dflt: number, share: number) =>
      maxModelLen === undefined
        ? dflt
        : Math.max(1, Math.min(dflt, Math.floor(maxModelLen / share)));
    const maxTokens = maxTokensFlag ?? fitted(128, 8);
    if (maxModelLen !== undefined && maxTokens >= maxModelLen) {
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--max-tokens ${maxTokens} leaves no room for a prompt in '${model}''s context of ${maxModelLen} tokens (its max_model_len)`,
      );
    }
    if (inputLen !== undefined && maxModelLen !== undefined && inputLen + maxTokens > maxModelLen) {
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--input-len ${inputLen} and --max-tokens ${maxTokens} exceed '${model}''s context of ${maxModelLen} tokens (its max_model_len)`,
      );
    }
    const promptWords = promptWordsFlag ?? fitted(64, 16);
    // One prompt per request of the run: a later level finds none in the prefix cache.
    const total = levels.reduce((n, l) => n + l.requests, 0);
    const prefix = prefixWords > 0 ? sharedPrefix(prefixWords, seed) : undefined;
    /** A request with this prompt: the shared prefix before it, as a system message in chat. */
    const requestWith = (prompt: string) => {
      if (prefix === undefined) return { prompt };
      return api === "chat"
        ? {
            prompt,
            messages: [
              { role: "system", content: prefix },
              { role: "user", content: prompt },
            ],
          }
        : { prompt: `${prefix}\n\n${prompt}` };
    };
    const prompts =
      filePrompts ??
      (inputLen !== undefined
        ? await promptsOfLength(reach, { model, api }, total, inputLen, seed, requestWith)
        : randomPrompts(total, promptWords, seed));
    /** Request i of the run (over every level). */
    const requestAt = (i: number) => requestWith(prompts[i % prompts.length]!);
    const target: Target = { ...reach, model, api };
    const toStdout = values.json === "-";
    process.stderr.write(
      `bench: '${model}' at ${url} (${api}), ${maxTokens} output tokens per request${ignoreEos ? "" : " at most"}, ${levels.length} level(s)\n`,
    );
    const summaries: LevelSummary[] = [];
    let sent = 0;
    // Ctrl-C: the levels done so far are reported; the one under way is left out (its
    // requests cancelled). A second Ctrl-C quits at once.
    const interrupt = new AbortController();
    onInterrupt = () => {
      if (interrupt.signal.aborted) process.exit(130);
      interrupt.abort();
    };
    process.on("SIGINT", onInterrupt);
    process.on("SIGTERM", onInterrupt);
    for (const [n, spec] of levels.entries()) {
      const label = `level ${n + 1}/${levels.length} (concurrency ${spec.concurrency}${Number.isFinite(spec.rate) ? `, ${spec.rate}/s` : ""})`;
      const progress = levelProgress(label, spec.requests);
      const run = await runLevel(
        target,
        spec,
        (i) => ({
          ...requestAt(sent + i),
          maxTokens,
          ignoreEos,
          ...(temperature !== undefined ? { extra: { temperature } } : {}),
        }),
        {
          seed: seed + n,
          timeoutMs,
          onSettled: (r) => progress.settled(r.ok),
          stop: interrupt.signal,
        },
      );
      if (run.interrupted) {
        process.stderr.write(
          `\n${label}: interrupted after ${run.results.length} of ${spec.requests} requests; not counted\n`,
        );
        break;
      }
      sent += spec.requests;
      const summary = summarizeLevel(spec, run, slo);
      progress.finish(summary);
      summaries.push(summary);
    }
    const report = {
      url,
      model,
      api,
      date: new Date().toISOString(),
      maxTokens,
      ignoreEos,
      promptSource:
        values.prompts ??
        (inputLen !== undefined ? `random, ${inputLen} tokens` : `random, ${promptWords} words`),
      ...(prefixWords > 0 ? { sharedPrefixWords: prefixWords } : {}),
      ...(slo ? { slo } : {}),
      ...(interrupt.signal.aborted ? { interrupted: true } : {}),
      levels: summaries,
    };
    const json = `${JSON.stringify(report, null, 2)}\n`;
    if (toStdout) process.stdout.write(json);
    else {
      process.stdout.write(`${formatLevels(summaries)}\n`);
      if (values.json !== undefined) writeReport(values.json, json);
    }
    const failed = summaries.reduce((n, s) => n + s.failed, 0);
    if (failed === 0) return interrupt.signal.aborted ? 130 : 0;
    const errors = new Map<string, { count: number; example: string }>();
    for (const s of summaries) {
      for (const e of s.errors) {
        const seen = errors.get(e.kind);
        errors.set(e.kind, {
          count: (seen?.count ?? 0) + e.count,
          example: seen?.example ?? e.example,
        });
      }
    }
    process.stderr.write(
      `bench: ${failed} request(s) failed:\n${[...errors].map(([kind, e]) => `  ${e.count} x ${kind}, e.g. ${e.example}`).join("\n")}\n`,
    );
    return 1;
  } finally {
    if (onInterrupt) {
      process.off("SIGINT", onInterrupt);
      process.off("SIGTERM", onInterrupt);
    }
    await dispatcher?.close();
  }
}

/**
 * `count` random prompts on which each request runs on `length` prompt tokens (fitPrompt),
 * counted by the server's /tokenize on the request `requestWith` makes of each: 8 at a time,
 * with a line on stderr. EM_BENCH_REFUSED for a server without /tokenize.
 */
async function promptsOfLength(
  reach: Omit<Target, "model" | "api">,
  { model, api }: Pick<Target, "model" | "api">,
  count: number,
  length: number,
  seed: number,
  requestWith: (prompt: string) => { prompt: string; messages?: unknown[] },
): Promise<string[]> {
  const tokens = async (text: string): Promise<number> => {
    const r = requestWith(text);
    const body =
      api === "chat"
        ? { model, messages: r.messages ?? [{ role: "user", content: r.prompt }] }
        : { model, prompt: r.prompt };
    const res = await postTo(reach, "/tokenize", body);
    const answer = await res.text();
    if (!res.ok)
      throw new ExpertMeshError(
        "EM_BENCH_REFUSED",
        res.status === 404 || res.status === 405
          ? `${reach.url} has no /tokenize (expertmesh's and vLLM's route) to count prompt tokens with: --input-len needs it; give --prompt-words instead`
          : `${reach.url}/tokenize answered HTTP ${res.status}: ${answer.replace(/\s+/g, " ").slice(0, 300)}`,
      );
    let parsed: { count?: unknown; tokens?: unknown } = {};
    try {
      parsed = JSON.parse(answer) as typeof parsed;
    } catch {}
    if (typeof parsed?.count === "number") return parsed.count;
    if (Array.isArray(parsed?.tokens)) return parsed.tokens.length;
    throw new ExpertMeshError(
      "EM_BENCH_REFUSED",
      `${reach.url}/tokenize answered without a count: ${answer.slice(0, 300)}`,
    );
  };
  process.stderr.write(
    `bench: sizing ${count} prompt(s) to ${length} tokens each with the server's /tokenize\n`,
  );
  const out: { text: string; tokens: number }[] = new Array(count);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(8, count) }, async () => {
      for (let i = next++; i < count; i = next++) out[i] = await fitPrompt(i, length, seed, tokens);
    }),
  );
  const short = out.filter((p) => p.tokens !== length);
  if (short.length > 0)
    process.stderr.write(
      `bench: ${short.length} prompt(s) fell short of ${length} tokens (${Math.min(...short.map((p) => p.tokens))} at least): no word fit their last tokens\n`,
    );
  return out.map((p) => p.text);
}
