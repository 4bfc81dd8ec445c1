import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
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
