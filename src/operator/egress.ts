// spec.networkPolicy.egress: the outgoing connections a model's pods need, as NetworkPolicy
// egress rules (ADR 0044). Pods of every role resolve names (DNS, port 53), reach the NATS
// server (spec.nats.url's ports, at natsTo when given) and, with a Hub source, download their
// weights in an init container (443, or the ports of spec.env's HF_ENDPOINT and proxies);
// gateways and prefill gateways export traces (spec.gateway.tracing's collector). Nothing of
// the model connects to the Kubernetes API (the operator does). What a valueFrom names is not
// known here: its ports go in extraRules. Pure: the reconciler applies what this returns.
import type { V1NetworkPolicyEgressRule, V1NetworkPolicyPort } from "@kubernetes/client-node";
import type { DeepSeekModel } from "../api/schema.ts";

/** The roles whose pods a NetworkPolicy selects. */
export type PolicyRole = "gateway" | "prefill" | "shard";

/** nats.js's port when a URL names none. */
const NATS_DEFAULT_PORT = 4222;

/** spec.env's variables, literal ones, that point the download (and its proxy) elsewhere. */
const DOWNLOAD_URL_ENV = ["HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"];

/**
 * The port a URL names, else its scheme's: 443 for https, 80 for http, `fallback` for any
 * other (a NATS URL's, nats:// or tls://; a bare host:port is read as nats://). Undefined for
 * text that is no URL.
 */
export function urlPort(text: string, fallback: number): number | undefined {
  const withScheme = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(text) ? text : `nats://${text}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    return undefined;
  }
  if (url.port !== "") return Number(url.port);
  if (url.protocol === "https:") return 443;
  if (url.protocol === "http:") return 80;
  return fallback;
}

/** spec.nats.url's ports (several URLs, comma-separated, may name several), sorted. */
export function natsPorts(model: DeepSeekModel): number[] {
  const ports = model.spec.nats.url
    .split(",")
    .map((u) => u.trim())
    .filter((u) => u !== "")
    .map((u) => urlPort(u, NATS_DEFAULT_PORT) ?? NATS_DEFAULT_PORT);
  return [...new Set(ports)].sort((a, b) => a - b);
}

/** The weights download's ports (a Hub source only): the Hub's (or HF_ENDPOINT's), proxies'. */
export function downloadPorts(model: DeepSeekModel): number[] {
  if (!model.spec.model.source.huggingFace) return [];
  const env = new Map((model.spec.env ?? []).map((e) => [e.name, e.value]));
  const ports = new Set<number>();
  if (env.get("HF_ENDPOINT") === undefined) ports.add(443); // (huggingface.co; PyPI for hf download)
  if (model.spec.model.source.huggingFace.downloaderImage) ports.add(443);
  for (const name of DOWNLOAD_URL_ENV) {
    const value = env.get(name);
    const port = value === undefined || value === "" ? undefined : urlPort(value, 443);
    if (port !== undefined) ports.add(port);
  }
  return [...ports].sort((a, b) => a - b);
}

const tcp = (ports: number[]): V1NetworkPolicyPort[] =>
  ports.map((port) => ({ port, protocol: "TCP" }));

/** The egress rules of `role`'s pods: DNS, NATS, the download, traces, then extraRules. */
export function egressRules(model: DeepSeekModel, role: PolicyRole): V1NetworkPolicyEgressRule[] {
  const egress = model.spec.networkPolicy.egress;
  const rules: V1NetworkPolicyEgressRule[] = [
    {
      ports: [
        { port: 53, protocol: "UDP" },
        { port: 53, protocol: "TCP" },
      ],
    },
  ];
  // (an empty natsTo reaches no one: the pods would never connect; left to the user)
  rules.push({
    ports: tcp(natsPorts(model)),
    ...(egress?.natsTo ? { to: egress.natsTo as V1NetworkPolicyEgressRule["to"] } : {}),
  });
  const download = downloadPorts(model);
  if (download.length > 0) rules.push({ ports: tcp(download) });
  const tracing = model.spec.gateway.tracing;
  if (tracing && role !== "shard") {
    const port = urlPort(tracing.otlpEndpoint, tracing.protocol === "grpc" ? 4317 : 4318);
    if (port !== undefined) rules.push({ ports: tcp([port]) });
  }
  for (const extra of egress?.extraRules ?? [])
    rules.push({
      ports: extra.ports.map(({ port, protocol }) => ({ port, protocol: protocol ?? "TCP" })),
      ...(extra.to ? { to: extra.to as V1NetworkPolicyEgressRule["to"] } : {}),
    });
  return rules;
}
