// One streamed request to an OpenAI-compatible server, timed as a serving benchmark times it
// (vLLM's `bench serve`): time to the first token, the gaps between the chunks that carry
// tokens, the end-to-end time, and the token counts the server itself reports in `usage`.
// Used by `expertmesh bench` and by the repository's bench suites (bench/serve.ts).
import { type Dispatcher, fetch as undiciFetch } from "undici";

/** Where requests go: the server's base URL (no `/v1`), its model, and how to reach it. */
export interface Target {
  readonly url: string;
  readonly model: string;
  /** `chat`: /v1/chat/completions with one user message; `completions`: /v1/completions. */
  readonly api: "chat" | "completions";
  /** Extra headers on every request (Authorization). */
  readonly headers?: Readonly<Record<string, string>>;
  /** An undici dispatcher (TLS with a private CA, client certificates). */
  readonly dispatcher?: Dispatcher;
}

export interface RequestResult {
  ok: boolean;
  /** Why it failed: `HTTP <status>: <body>`, the stream's error event, or the exception. */
  error?: string;
  /**
   * The failure's kind, for counting alike failures together: `HTTP <status>` and the
   * error's `code` when the body has one, `error event <code>`, `timed out`, or the
   * exception's code.
   */
  errorKind?: string;
  /** performance.now() when the request was sent. */
  startMs: number;
  /** Prompt and output tokens from the server's usage (0 when it sent none). */
  promptTokens: number;
  outputTokens: number;
  /** From sending to the first chunk that carries a token (NaN when none came). */
  ttftMs: number;
  /** Gaps between consecutive chunks that carry tokens. */
  itlMs: number[];
  /** From sending to the end of the stream. */
  e2eMs: number;
}

export interface RequestOptions {
  readonly prompt: string;
  readonly maxTokens: number;
  /** Generate maxTokens whatever the model samples (vLLM's `ignore_eos`). */
  readonly ignoreEos?: boolean;
  /** More request fields (temperature, a system message is `messages` itself, ...). */
  readonly extra?: Readonly<Record<string, unknown>>;
  /** A chat request's messages, in place of one user message with `prompt`. */
  readonly messages?: readonly unknown[];
  /** Cancels the request (a timeout): it counts as failed with this signal's reason. */
  readonly signal?: AbortSignal;
  /** Called with performance.now() as each chunk that carries a token arrives. */
  readonly onToken?: (now: number) => void;
}

/**
 * Splits a server-sent event stream into its `data:` payloads, across chunk boundaries
 * (an event may arrive in pieces, several in one chunk; `\r\n` line ends are accepted).
 */
export class SseParser {
  #buf = "";

  /** The complete events' data payloads in `text` and what came before it. */
  feed(text: string): string[] {
    this.#buf += text.replaceAll("\r\n", "\n");
    const out: string[] = [];
    for (let i = this.#buf.indexOf("\n\n"); i >= 0; i = this.#buf.indexOf("\n\n")) {
      const event = this.#buf.slice(0, i);
      this.#buf = this.#buf.slice(i + 2);
      const data = event
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5));
      if (data.length > 0) out.push(data.join("\n"));
    }
    return out;
  }
}

interface StreamChunk {
  choices?: {
    delta?: { content?: string | null; reasoning_content?: string | null; tool_calls?: unknown[] };
    text?: string;
    logprobs?: { content?: unknown[]; tokens?: unknown[] } | null;
  }[];
  usage?: { prompt_tokens?: number; completion_tokens?: number } | null;
  error?: unknown;
}

/** Whether a chunk carries a token: text, reasoning, a tool call's piece, or (with logprobs) its logprobs. */
const carriesToken = (c: StreamChunk) =>
  c.choices?.some(
    (ch) =>
      ch.delta?.content ||
      ch.delta?.reasoning_content ||
      ch.delta?.tool_calls?.length ||
      ch.text ||
      ch.logprobs?.content?.length ||
      ch.logprobs?.tokens?.length,
  ) ?? false;

/** The request body `send` posts. */
export function requestBody(target: Target, o: RequestOptions): Record<string, unknown> {
  return {
    model: target.model,
    ...(target.api === "chat"
      ? { messages: o.messages ?? [{ role: "user", content: o.prompt }] }
      : { prompt: o.prompt }),
    max_tokens: o.maxTokens,
    ...(o.ignoreEos ? { ignore_eos: true } : {}),
    stream: true,
    stream_options: { include_usage: true },
    ...o.extra,
  };
}

/** Node's fetch, or undici's with the target's dispatcher (TLS with a private CA). */
const fetchFor = (target: Target, url: string, init: RequestInit): Promise<Response> =>
  target.dispatcher
    ? (undiciFetch(url, {
        ...(init as object),
        dispatcher: target.dispatcher,
      }) as unknown as Promise<Response>)
    : fetch(url, init);

/** GET `path` of the target's server (with its headers and dispatcher). */
export function getFrom(target: Pick<Target, "url" | "headers" | "dispatcher">, path: string) {
  return fetchFor(target as Target, `${target.url}${path}`, {
    headers: { ...target.headers },
    signal: AbortSignal.timeout(30_000),
  });
}

/** POST `body` as JSON to `path` of the target's server (with its headers and dispatcher). */
export function postTo(
  target: Pick<Target, "url" | "headers" | "dispatcher">,
  path: string,
  body: unknown,
) {
  return fetchFor(target as Target, `${target.url}${path}`, {
    method: "POST",
    headers: { ...target.headers, "content-type": "application/json" },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(30_000),
  });
}

/** The `code` (or else `type`) of an OpenAI-style error body `{"error": {...}}`, if any. */
function errorCode(body: string): string | undefined {
  try {
    const e = (JSON.parse(body) as { error?: { code?: unknown; type?: unknown } }).error;
    const code = e?.code ?? e?.type;
    return typeof code === "string" || typeof code === "number" ? String(code) : undefined;
  } catch {
    return undefined;
  }
}

/** Sends one streamed request and times it; never throws (a failure is `ok: false`). */
export async function send(target: Target, o: RequestOptions): Promise<RequestResult> {
  const startMs = performance.now();
  const result: RequestResult = {
    ok: true,
    startMs,
    promptTokens: 0,
    outputTokens: 0,
    ttftMs: Number.NaN,
    itlMs: [],
    e2eMs: 0,
  };
  const fail = (kind: string, error: string) => {
    result.ok = false;
    result.errorKind ??= kind;
    result.error ??= error;
  };
  try {
    const path = target.api === "chat" ? "/v1/chat/completions" : "/v1/completions";
    const res = await fetchFor(target, `${target.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...target.headers },
      body: JSON.stringify(requestBody(target, o)),
      ...(o.signal ? { signal: o.signal } : {}),
    });
    if (!res.ok || !res.body) {
      const body = await res.text().catch(() => "");
      const code = errorCode(body);
      fail(
        `HTTP ${res.status}${code ? ` ${code}` : ""}`,
        `HTTP ${res.status}: ${body.replace(/\s+/g, " ").slice(0, 300)}`,
      );
    } else {
      const parser = new SseParser();
      const decoder = new TextDecoder();
      let last = Number.NaN;
      let done = false;
      for await (const bytes of res.body) {
        for (const data of parser.feed(decoder.decode(bytes as Uint8Array, { stream: true }))) {
          if (data.trim() === "[DONE]") {
            done = true;
            continue;
          }
          let chunk: StreamChunk;
          try {
            chunk = JSON.parse(data) as StreamChunk;
          } catch {
            fail("malformed event", `a stream event that is not JSON: ${data.slice(0, 200)}`);
            continue;
          }
          if (chunk.error) {
            const code = errorCode(JSON.stringify({ error: chunk.error }));
            fail(
              `error event${code ? ` ${code}` : ""}`,
              `error event: ${JSON.stringify(chunk.error).slice(0, 300)}`,
            );
          }
          if (chunk.usage) {
            result.promptTokens = chunk.usage.prompt_tokens ?? 0;
            result.outputTokens = chunk.usage.completion_tokens ?? 0;
          }
          if (carriesToken(chunk)) {
            const now = performance.now();
            if (Number.isNaN(result.ttftMs)) result.ttftMs = now - startMs;
            else result.itlMs.push(now - last);
            last = now;
            o.onToken?.(now);
          }
        }
      }
      if (!done) fail("stream cut", "the stream ended without [DONE]");
    }
  } catch (err) {
    const reason = o.signal?.aborted ? o.signal.reason : err;
    const e = reason as {
      name?: string;
      message?: string;
      cause?: { message?: string; code?: string };
    };
    if (e?.name === "TimeoutError") fail("timed out", "timed out");
    else {
      fail(
        e?.cause?.code ?? e?.name ?? "error",
        `${e?.message ?? String(reason)}${e?.cause?.message ? ` (${e.cause.message})` : ""}`,
      );
    }
  }
  result.e2eMs = performance.now() - startMs;
  return result;
}
