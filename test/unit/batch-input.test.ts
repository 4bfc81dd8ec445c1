// A batch's input file checked line by line (src/gateway/batches.ts parseBatchInput), and
// the pages of the Files and Batch APIs' lists (listPage). The input check gives the
// requests it holds, or each bad line's number, code and field. The batches themselves run
// against a gateway in test/gateway/batches.test.ts.
import { describe, expect, it } from "vitest";
import { MAX_BATCH_LINES, parseBatchInput } from "../../src/gateway/batches.ts";
import { listPage } from "../../src/gateway/files.ts";

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
