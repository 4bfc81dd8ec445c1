// The configuration of the OpenTelemetry Collector that provision.sh builds (otelcol): an
// OTLP/HTTP receiver on 127.0.0.1:`port` (and an OTLP/gRPC one on `grpcPort` when given) and
// one traces pipeline into `exporter` (the tests forward to themselves with otlphttp, the
// bench counts with debug). Its own metrics are off: their default port (8888) would collide
// between parallel test files.
export function otelcolConfig(
  port: number,
  exporter: { name: string; settings: string },
  grpcPort?: number,
): string {
  const settings = exporter.settings
    .trim()
    .split("\n")
    .map((l) => `    ${l}`)
    .join("\n");
  return `receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:${port}${grpcPort === undefined ? "" : `\n      grpc:\n        endpoint: 127.0.0.1:${grpcPort}`}
exporters:
  ${exporter.name}:
${settings}
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [${exporter.name}]
`;
}
