// The processes' log lines (src/util/log.ts): text as before, or one JSON object per line
// with a line's fields as keys; which format a command runs with; a failure's last line.
import { describe, expect, it } from "vitest";
import { ExpertMeshError } from "../../src/util/errors.ts";
import {
  failureLine,
  formatLine,
  logFormat,
  logFormatInArgv,
  processLog,
} from "../../src/util/log.ts";

const time = new Date("2026-12-02T10:00:00.000Z");

describe("formatLine", () => {
  it("text: time, who, message (the fields are in the message already)", () => {
    expect(
      formatLine("text", {
        time,
        level: "info",
        component: "gateway",
        instance: "pod-1",
        who: "gateway pod-1",
        message: "request r1 POST /v1/completions 200 in 5 ms",
        fields: { status: 200 },
      }),
    ).toBe("2026-12-02T10:00:00.000Z gateway pod-1: request r1 POST /v1/completions 200 in 5 ms");
  });
  it("json: the base keys, then the fields; undefined fields and reserved names left out", () => {
    const line = formatLine("json", {
      time,
      level: "error",
      component: "shard",
      instance: "r0",
      who: "shard 0/r0",
      message: 'a "quoted"\nmessage',
      fields: {
        status: 200,
        reasons: ["stop", "length"],
        gone: true,
        none: null,
        left: undefined,
        msg: "not mine",
        level: "debug",
      },
    });
    expect(line).not.toContain("\n");
    expect(JSON.parse(line)).toEqual({
      time: "2026-12-02T10:00:00.000Z",
      level: "error",
      component: "shard",
      instance: "r0",
      msg: 'a "quoted"\nmessage',
      status: 200,
      reasons: ["stop", "length"],
      gone: true,
      none: null,
    });
    expect(Object.keys(JSON.parse(line)).slice(0, 5)).toEqual([
      "time",
      "level",
      "component",
      "instance",
      "msg",
    ]);
  });
});

describe("logFormat", () => {
  it.each<[string | undefined, Record<string, string>, string]>([
    [undefined, {}, "text"],
    ["json", {}, "json"],
    ["text", { EXPERTMESH_LOG_FORMAT: "json" }, "text"],
    [undefined, { EXPERTMESH_LOG_FORMAT: "json" }, "json"],
    [undefined, { EXPERTMESH_LOG_FORMAT: "" }, "text"],
  ])("flag %j, env %j: %s", (flag, env, want) => {
    expect(logFormat(flag, env)).toBe(want);
  });
  it.each<[string | undefined, Record<string, string>, string]>([
    ["xml", {}, "--log-format must be text or json, got 'xml'"],
    [undefined, { EXPERTMESH_LOG_FORMAT: "JSON" }, "EXPERTMESH_LOG_FORMAT must be text or json"],
  ])("refuses flag %j, env %j", (flag, env, message) => {
    expect(() => logFormat(flag, env)).toThrow(
      expect.objectContaining({ code: "EM_CLI_USAGE", message: expect.stringContaining(message) }),
    );
  });
  it.each<[string[], string | undefined]>([
    [["--model=x", "--log-format=json"], "json"],
    [["--log-format", "text", "--local"], "text"],
    [["--log-format"], undefined],
    [["--model", "x"], undefined],
  ])("in argv %j: %j", (argv, want) => {
    expect(logFormatInArgv(argv)).toBe(want);
  });
});

describe("processLog and failureLine", () => {
  it("writes lines at info and error", () => {
    const lines: string[] = [];
    const log = processLog({
      format: "json",
      component: "operator",
      instance: "op-0",
      who: "operator",
      write: (l) => lines.push(l),
    });
    log("reconciled", { model: "default/tiny" });
    log.error("failed");
    expect(lines.map((l) => JSON.parse(l))).toMatchObject([
      {
        level: "info",
        component: "operator",
        instance: "op-0",
        msg: "reconciled",
        model: "default/tiny",
      },
      { level: "error", msg: "failed" },
    ]);
  });
  it("a failure: text as before, or JSON with its code", () => {
    const e = new ExpertMeshError("EM_CLI_USAGE", "--model is required");
    expect(failureLine("text", "gateway", e)).toBe(
      "expertmesh gateway: [EM_CLI_USAGE] --model is required",
    );
    expect(JSON.parse(failureLine("json", "gateway", e))).toMatchObject({
      level: "error",
      component: "gateway",
      code: "EM_CLI_USAGE",
      msg: "[EM_CLI_USAGE] --model is required",
    });
    expect(JSON.parse(failureLine("json", "shard", new Error("boom")))).not.toHaveProperty("code");
  });
});
