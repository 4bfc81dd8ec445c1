// The configuration of the OpenTelemetry Collector that provision.sh builds (otelcol): an
// OTLP/HTTP receiver on 127.0.0.1:`port` and one traces pipeline into `exporter` (the tests
// forward to themselves with otlphttp, the bench counts with debug). Its own metrics are off:
// their default port (8888) would collide between parallel test files.
export function otelcolConfig(port: number, exporter: { name: string; settings: string }): string {
  const settings = exporter.settings
    .trim()
    .split("\n")
    .map((l) => `    ${l}`)
    .join("\n");
  return `receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:${port}
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
