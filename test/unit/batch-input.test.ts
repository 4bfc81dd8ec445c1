// A batch's input file checked line by line (src/gateway/batches.ts parseBatchInput), and
// the pages of the Files and Batch APIs' lists (listPage), a batch's usage summed over its
// answers of each API (addUsage), and the expiration policy of files (expiresAfter). The
// input check gives the requests it holds, or each bad line's number, code and field. The
// batches themselves run against a gateway in test/gateway/batches.test.ts.
import { describe, expect, it } from "vitest";
import {
  addUsage,
  type BatchUsage,
  MAX_BATCH_LINES,
  noUsage,
  parseBatchInput,
} from "../../src/gateway/batches.ts";
import { expiresAfter, listPage } from "../../src/gateway/files.ts";

const line = (o: Record<string, unknown> = {}) =>
  JSON.stringify({
    custom_id: "a",
    method: "POST",
    url: "/v1/chat/completions",
    body: { model: "m", messages: [] },
    ...o,
  });

describe("parseBatchInput", () => {
  it.each<[string, string, [number | null, string, string | null][]]>([
    ["not JSON", "{x", [[1, "invalid_json_line", null]]],
    ["an array", "[1]", [[1, "invalid_json_line", null]]],
    [
      "no custom_id",
      line({ custom_id: undefined }),
      [[1, "missing_required_parameter", "custom_id"]],
    ],
    [
      "an empty custom_id",
      line({ custom_id: "" }),
      [[1, "missing_required_parameter", "custom_id"]],
    ],
    [
      "a number custom_id",
      line({ custom_id: 7 }),
      [[1, "missing_required_parameter", "custom_id"]],
    ],
    ["GET", line({ method: "GET" }), [[1, "invalid_method", "method"]]],
    ["another url", line({ url: "/v1/completions" }), [[1, "invalid_url", "url"]]],
    ["no body", line({ body: undefined }), [[1, "missing_required_parameter", "body"]]],
    ["a string body", line({ body: "x" }), [[1, "missing_required_parameter", "body"]]],
    ["stream", line({ body: { stream: true } }), [[1, "invalid_request", "body.stream"]]],
    [
      "background",
      line({ body: { background: true } }),
      [[1, "invalid_request", "body.background"]],
    ],
    [
      "a duplicate, numbered past blank lines",
      `${line()}\n\n${line()}`,
      [[3, "duplicate_custom_id", "custom_id"]],
    ],
    ["nothing", "\n \n", [[null, "empty_file", null]]],
  ])("%s", (_, text, errors) => {
    const r = parseBatchInput(text, "/v1/chat/completions");
    expect("errors" in r && r.errors.map((e) => [e.line, e.code, e.param])).toEqual(errors);
  });

  it("gives the requests of a good file in order, with CRLF line ends and stream: false", () => {
    const text = [
      line({ custom_id: "x" }),
      line({ custom_id: "y", body: { prompt: "p", stream: false } }),
    ].join("\r\n");
    expect(parseBatchInput(text, "/v1/chat/completions")).toEqual({
      lines: [
        { custom_id: "x", body: { model: "m", messages: [] } },
        { custom_id: "y", body: { prompt: "p", stream: false } },
      ],
    });
  });

  it("lists at most 100 errors; refuses more than MAX_BATCH_LINES requests", () => {
    const bad = parseBatchInput("{\n".repeat(500), "/v1/completions");
    expect("errors" in bad && bad.errors.length).toBe(100);
    const many = Array.from({ length: MAX_BATCH_LINES + 1 }, (_, i) =>
      line({ custom_id: `c${i}`, url: "/v1/completions" }),
    ).join("\n");
    const r = parseBatchInput(many, "/v1/completions");
    expect("errors" in r && r.errors.map((e) => e.code)).toEqual(["too_many_requests"]);
  });
});

describe("listPage", () => {
  const all = ["a", "b", "c", "d"].map((id) => ({ id }));
  it.each<[string, string | undefined, number, string[], boolean]>([
    ["the first page", undefined, 2, ["a", "b"], true],
    ["after b", "b", 2, ["c", "d"], false],
    ["after the last", "d", 2, [], false],
    ["after an unknown id", "x", 2, [], false],
    ["all of it", undefined, 10, ["a", "b", "c", "d"], false],
  ])("%s", (_, after, limit, ids, more) => {
    const p = listPage(all, after, limit);
    expect(p.data.map((x) => x.id)).toEqual(ids);
    expect(p).toMatchObject({
      object: "list",
      first_id: ids[0] ?? null,
      last_id: ids.at(-1) ?? null,
      has_more: more,
    });
  });
});

describe("addUsage", () => {
  const chat = {
    usage: {
      prompt_tokens: 10,
      completion_tokens: 5,
      total_tokens: 15,
      prompt_tokens_details: { cached_tokens: 4 },
      completion_tokens_details: { reasoning_tokens: 2 },
    },
  };
  const completion = { usage: { prompt_tokens: 3, completion_tokens: 7, total_tokens: 10 } };
  const response = {
    usage: {
      input_tokens: 8,
      input_tokens_details: { cached_tokens: 6 },
      output_tokens: 9,
      output_tokens_details: { reasoning_tokens: 1 },
      total_tokens: 17,
    },
  };
  // Anthropic's input_tokens leave out the tokens read from (or written to) the cache.
  const message = {
    usage: {
      input_tokens: 2,
      cache_creation_input_tokens: 1,
      cache_read_input_tokens: 6,
      output_tokens: 4,
    },
  };
  // [what, bodies, [input, cached, output, reasoning, total]]
  it.each<[string, unknown[], [number, number, number, number, number]]>([
    ["nothing", [], [0, 0, 0, 0, 0]],
    ["a chat", [chat], [10, 4, 5, 2, 15]],
    ["a completion (no details)", [completion], [3, 0, 7, 0, 10]],
    ["a response", [response], [8, 6, 9, 1, 17]],
    ["a message", [message], [9, 6, 4, 0, 13]],
    ["chats summed", [chat, chat, completion], [23, 8, 17, 4, 40]],
    ["a body without usage", [{ id: "x" }, null, "text", chat], [10, 4, 5, 2, 15]],
    [
      "numbers that are not counts",
      [{ usage: { prompt_tokens: -1, completion_tokens: "5" } }],
      [0, 0, 0, 0, 0],
    ],
  ])("%s", (_, bodies, [input, cached, output, reasoning, total]) => {
    const sum: BatchUsage = noUsage();
    for (const b of bodies) addUsage(sum, b);
    expect(sum).toEqual({
      input_tokens: input,
      input_tokens_details: { cached_tokens: cached },
      output_tokens: output,
      output_tokens_details: { reasoning_tokens: reasoning },
      total_tokens: total,
    });
  });
});

describe("expiresAfter", () => {
  it.each<[string, unknown, number | undefined]>([
    ["absent", undefined, undefined],
    ["an hour", { anchor: "created_at", seconds: 3600 }, 3600],
    ["30 days", { anchor: "created_at", seconds: 2_592_000 }, 2_592_000],
  ])("%s", (_, v, seconds) => {
    expect(expiresAfter(v, "expires_after")).toBe(seconds);
  });
  it.each<[string, unknown]>([
    ["under an hour", { anchor: "created_at", seconds: 3599 }],
    ["over 30 days", { anchor: "created_at", seconds: 2_592_001 }],
    ["another anchor", { anchor: "last_active_at", seconds: 3600 }],
    ["no anchor", { seconds: 3600 }],
    ["seconds a string", { anchor: "created_at", seconds: "3600" }],
    ["seconds a fraction", { anchor: "created_at", seconds: 3600.5 }],
    ["another key", { anchor: "created_at", seconds: 3600, days: 1 }],
    ["null", null],
    ["an array", [3600]],
    ["a number", 3600],
  ])("refuses %s", (_, v) => {
    expect(() => expiresAfter(v, "output_expires_after")).toThrow(
      expect.objectContaining({
        code: "EM_GATEWAY_BAD_REQUEST",
        param: "output_expires_after",
      }),
    );
  });
});
