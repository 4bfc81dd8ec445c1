// The tracing module's pure parts (src/gateway/tracing.ts): which routes run generation jobs
// (and their GenAI operation), the traces URL of --otlp-traces-endpoint over each transport,
// the transport the flag or the environment picks, and when the environment turns tracing on. The export itself is tested against a real collector in
// test/gateway/tracing.test.ts.
import { describe, expect, it } from "vitest";
import {
  operationOfRoute,
  otlpProtocol,
  tracesUrl,
  tracingFromEnv,
} from "../../src/gateway/tracing.ts";

describe("operationOfRoute", () => {
  it.each([
    ["/v1/chat/completions", "chat"],
    ["/v1/messages", "chat"],
    ["/v1/responses", "chat"],
    ["/v1/completions", "text_completion"],
    ["/v2/models/:name/infer", "text_completion"],
    ["/v2/models/:name/versions/:version/infer", "text_completion"],
    ["/v2/models/:name/generate", "text_completion"],
    ["/v2/models/:name/generate_stream", "text_completion"],
    ["/v1/models", null],
    ["/tokenize", null],
    ["/v1/messages/count_tokens", null],
    ["/v1/responses/:id", null],
    ["/metrics", null],
    ["", null],
  ])("%s: %s", (route, op) => {
    expect(operationOfRoute(route)).toBe(op);
  });
});

describe("tracesUrl", () => {
  it.each([
    ["http://otel:4318", "http://otel:4318/v1/traces"],
    ["http://otel:4318/", "http://otel:4318/v1/traces"],
    ["https://otel.example.com", "https://otel.example.com/v1/traces"],
    ["http://otel:4318/v1/traces", "http://otel:4318/v1/traces"],
    ["http://gw/otlp/v1/traces", "http://gw/otlp/v1/traces"],
    ["http://otel:4318?x=1", "http://otel:4318/v1/traces?x=1"],
  ])("%s -> %s", (given, want) => {
    expect(tracesUrl(given)).toBe(want);
  });
  it.each([
    ["grpc://otel:4317", "an http:// or https:// URL"],
    ["otel:4318", "an http:// or https:// URL"],
    ["not a url", "must be an http(s) URL"],
    ["", "must be an http(s) URL"],
  ])("refuses %j", (given, message) => {
    expect(() => tracesUrl(given)).toThrow(
      expect.objectContaining({ code: "EM_CLI_USAGE", message: expect.stringContaining(message) }),
    );
  });
});

describe("tracesUrl over gRPC", () => {
  it.each([
    ["http://otel:4317", "http://otel:4317"],
    ["http://otel:4317/", "http://otel:4317"],
    ["https://otel.example.com:4317", "https://otel.example.com:4317"],
  ])("%s -> %s", (given, want) => {
    expect(tracesUrl(given, "grpc")).toBe(want);
  });
  it.each([
    ["http://otel:4317/v1/traces", "over gRPC is a server's address without a path"],
    ["grpc://otel:4317", "an OTLP/gRPC collector, e.g. http://otel-collector:4317"],
    ["otel:4317", "with gRPC, https means TLS"],
  ])("refuses %j", (given, message) => {
    expect(() => tracesUrl(given, "grpc")).toThrow(
      expect.objectContaining({ code: "EM_CLI_USAGE", message: expect.stringContaining(message) }),
    );
  });
});

describe("otlpProtocol", () => {
  it.each<[string, string | undefined, Record<string, string>, string]>([
    ["the default", undefined, {}, "http/protobuf"],
    ["the flag", "grpc", {}, "grpc"],
    [
      "the flag over the environment",
      "http/protobuf",
      { OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" },
      "http/protobuf",
    ],
    ["OTEL_EXPORTER_OTLP_PROTOCOL", undefined, { OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" }, "grpc"],
    [
      "the traces variable over the general one",
      undefined,
      { OTEL_EXPORTER_OTLP_PROTOCOL: "grpc", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "http/protobuf" },
      "http/protobuf",
    ],
    ["an empty variable", undefined, { OTEL_EXPORTER_OTLP_PROTOCOL: "" }, "http/protobuf"],
  ])("%s", (_, flag, env, want) => {
    expect(otlpProtocol(flag, env)).toBe(want);
  });
  it.each<[string | undefined, Record<string, string>, string]>([
    [
      "http/json",
      {},
      "--otlp-traces-protocol must be grpc or http/protobuf, got 'http/json' (OTLP's JSON encoding is not offered)",
    ],
    ["GRPC", {}, "--otlp-traces-protocol must be grpc or http/protobuf, got 'GRPC'"],
    [
      undefined,
      { OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "udp" },
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be grpc or http/protobuf, got 'udp'",
    ],
    [
      undefined,
      { OTEL_EXPORTER_OTLP_PROTOCOL: "http/json" },
      "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got 'http/json'",
    ],
  ])("refuses %j %j", (flag, env, message) => {
    expect(() => otlpProtocol(flag, env)).toThrow(
      expect.objectContaining({ code: "EM_CLI_USAGE", message: expect.stringContaining(message) }),
    );
  });
});

describe("tracingFromEnv", () => {
  it.each<[string, Record<string, string>, boolean]>([
    ["nothing set", {}, false],
    ["a traces endpoint", { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://c:4318/v1/traces" }, true],
    ["a base endpoint", { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318" }, true],
    ["an empty one", { OTEL_EXPORTER_OTLP_ENDPOINT: "" }, false],
    [
      "the SDK disabled",
      { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c", OTEL_SDK_DISABLED: "true" },
      false,
    ],
    [
      "no traces exporter",
      { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c", OTEL_TRACES_EXPORTER: "none" },
      false,
    ],
  ])("%s: %s", (_, env, on) => {
    expect(tracingFromEnv(env)).toBe(on);
  });
});
