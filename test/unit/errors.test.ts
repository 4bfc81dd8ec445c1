import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { ApiError, anthropicErrorBody, errorBodyFor } from "../../src/gateway/errors.ts";
import { ERROR_CODES, ExpertMeshError, formatError } from "../../src/util/errors.ts";

describe("error codes", () => {
  const doc = readFileSync(new URL("../../docs/errors.md", import.meta.url), "utf8");
  // Table rows: | `EM_CODE` | meaning |
  const documented = [...doc.matchAll(/^\|\s*`(EM_[A-Z0-9_]+)`\s*\|\s*\S.*\|\s*$/gm)].map(
    (m) => m[1],
  );

  it("docs/errors.md documents every code in ERROR_CODES and no other", () => {
    expect([...documented].sort()).toEqual(Object.keys(ERROR_CODES).sort());
  });

  it("codes are EM_<AREA>_<WHAT> and listed once", () => {
    expect(new Set(documented).size).toBe(documented.length);
    for (const code of Object.keys(ERROR_CODES)) expect(code).toMatch(/^EM_[A-Z]+_[A-Z0-9_]+$/);
  });

  it("formats our errors with their code", () => {
    expect(formatError(new ExpertMeshError("EM_PLAN_INVALID", "bad"))).toBe(
      "[EM_PLAN_INVALID] bad",
    );
  });
});

describe("error bodies by the API a request speaks", () => {
  const e = (status: number) => new ApiError("EM_GATEWAY_BAD_REQUEST", "m", { status, param: "p" });
  it.each([
    [400, "invalid_request_error", "invalid_request_error"],
    [401, "authentication_error", "authentication_error"],
    [403, "invalid_request_error", "permission_error"],
    [404, "not_found_error", "not_found_error"],
    [413, "invalid_request_error", "request_too_large"],
    [429, "rate_limit_error", "rate_limit_error"],
    [500, "server_error", "api_error"],
    [503, "server_error", "overloaded_error"],
  ])("%i: OpenAI's %s, Anthropic's %s", (status, openai, anthropic) => {
    expect(errorBodyFor({}, e(status))).toEqual({
      error: { message: "m", type: openai, param: "p", code: "EM_GATEWAY_BAD_REQUEST" },
    });
    expect(errorBodyFor({ "anthropic-version": "2023-06-01" }, e(status))).toEqual({
      type: "error",
      error: { type: anthropic, message: "m", code: "EM_GATEWAY_BAD_REQUEST", param: "p" },
    });
  });
  it("Anthropic's leaves out a missing param", () => {
    expect(
      anthropicErrorBody(new ApiError("EM_GATEWAY_NOT_FOUND", "gone")).error,
    ).not.toHaveProperty("param");
  });
});
