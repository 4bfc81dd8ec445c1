// spec.networkPolicy.egress (src/operator/egress.ts, ADR 0044): the ports a model's pods open
// connections to, per role, from the manifest alone; and the policies that carry them. The
// API server's acceptance of them is tested in test/operator/network-policy.test.ts.
import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { downloadPorts, egressRules, natsPorts, urlPort } from "../../src/operator/egress.ts";
import { networkPolicies } from "../../src/operator/workloads.ts";

function manifest(spec: string, source = "pvc: { claimName: w }") {
  return parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns, uid: u-1 }
spec:
  model: { preset: tiny-v3, source: { ${source} } }
${spec}`);
}
const hub = "huggingFace: { repo: deepseek-ai/DeepSeek-V3 }";

describe("urlPort", () => {
  it.each([
    ["nats://nats.x.svc:4222", 4222],
    ["nats://nats.x.svc", 4222],
    ["tls://nats.x.svc", 4222],
    ["tls://nats.x.svc:7422", 7422],
    ["nats.x.svc:5222", 5222],
    ["nats.x.svc", 4222],
    ["https://hf-mirror.example", 443],
    ["http://proxy.corp:3128", 3128],
    ["http://otel-collector.observability:4318", 4318],
    ["http://otel-collector.observability", 80],
    ["nats://[::1]:4333", 4333],
    ["http://[bad", undefined],
  ])("%s -> %s", (url, port) => {
    expect(urlPort(url, 4222)).toBe(port);
  });
});

describe("natsPorts, downloadPorts", () => {
  it.each([
    ["the default URL", "", [4222]],
    ["several servers", "  nats: { url: 'nats://a:4222, nats://b:4223,tls://c' }", [4222, 4223]],
  ])("NATS, %s", (_, spec, ports) => {
    expect(natsPorts(manifest(spec))).toEqual(ports);
  });

  it.each([
    ["weights on a volume: none", "", "pvc: { claimName: w }", []],
    ["the Hub", "", hub, [443]],
    [
      "a mirror and a proxy in spec.env",
      "  env: [{ name: HF_ENDPOINT, value: 'http://mirror.corp:8080' }, { name: HTTPS_PROXY, value: 'http://proxy.corp:3128' }]",
      hub,
      [3128, 8080],
    ],
    [
      "a mirror through a Secret: its port unknown here, the Hub's kept",
      "  env: [{ name: HF_ENDPOINT, valueFrom: { secretKeyRef: { name: s, key: k } } }]",
      hub,
      [443],
    ],
    [
      "hf download in a Python image: PyPI too",
      "  env: [{ name: HF_ENDPOINT, value: 'http://mirror.corp:8080' }]",
      "huggingFace: { repo: deepseek-ai/DeepSeek-V3, downloaderImage: 'python:3.12-slim' }",
      [443, 8080],
    ],
  ])("download, %s", (_, spec, source, ports) => {
    expect(downloadPorts(manifest(spec, source))).toEqual(ports);
  });
});

describe("egressRules", () => {
  const np = (extra = "") =>
    `  networkPolicy: { enabled: true, egress: { enabled: true${extra} } }\n`;
  const dns = {
    ports: [
      { port: 53, protocol: "UDP" },
      { port: 53, protocol: "TCP" },
    ],
  };
  const nats = { ports: [{ port: 4222, protocol: "TCP" }] };

  it("every role: DNS and NATS; nothing else for weights on a volume without traces", () => {
    const m = manifest(np());
    for (const role of ["gateway", "prefill", "shard"] as const)
      expect(egressRules(m, role), role).toEqual([dns, nats]);
  });

  it("natsTo, a Hub download, the gateways' collector, extraRules", () => {
    const natsTo = "{ namespaceSelector: { matchLabels: { kubernetes.io/metadata.name: nats } } }";
    const m = manifest(
      `${np(`, natsTo: [${natsTo}], extraRules: [{ ports: [{ port: 9000 }, { port: 5353, protocol: UDP }], to: [{ ipBlock: { cidr: 10.0.0.0/8 } }] }]`)}` +
        "  gateway: { tracing: { otlpEndpoint: 'http://otel.observability:4317', protocol: grpc } }\n",
      hub,
    );
    const natsRule = {
      ports: [{ port: 4222, protocol: "TCP" }],
      to: [{ namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": "nats" } } }],
    };
    const download = { ports: [{ port: 443, protocol: "TCP" }] };
    const otlp = { ports: [{ port: 4317, protocol: "TCP" }] };
    const extra = {
      ports: [
        { port: 9000, protocol: "TCP" },
        { port: 5353, protocol: "UDP" },
      ],
      to: [{ ipBlock: { cidr: "10.0.0.0/8" } }],
    };
    expect(egressRules(m, "gateway")).toEqual([dns, natsRule, download, otlp, extra]);
    expect(egressRules(m, "prefill")).toEqual([dns, natsRule, download, otlp, extra]);
    // Shards export no traces.
    expect(egressRules(m, "shard")).toEqual([dns, natsRule, download, extra]);
  });

  it("the policies carry them (Ingress and Egress) only with egress.enabled", () => {
    const types = (spec: string) =>
      networkPolicies(manifest(spec)).map((p) => [p.spec?.policyTypes, p.spec?.egress?.length]);
    expect(types("  networkPolicy: { enabled: true }\n")).toEqual([
      [["Ingress"], undefined],
      [["Ingress"], undefined],
    ]);
    expect(types(np())).toEqual([
      [["Ingress", "Egress"], 2],
      [["Ingress", "Egress"], 2],
    ]);
  });

  it("networkPolicy.enabled is the master switch: egress.enabled alone makes no policy", () => {
    expect(networkPolicies(manifest("  networkPolicy: { egress: { enabled: true } }\n"))).toEqual(
      [],
    );
  });
});
