// The operator's Helm chart (charts/expertmesh): lints strictly, renders least-privilege
// RBAC in both modes (cluster-wide, namespaced), ships the generated CRD, and installs into
// the test control plane, where the operator pods get scheduled and Running and the
// ServiceAccount gets exactly the access it needs.
import { execFile } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { type ConnectionOptions, connect as tlsConnect } from "node:tls";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import {
  ApiextensionsV1Api,
  AppsV1Api,
  AuthorizationV1Api,
  CoreV1Api,
  NetworkingV1Api,
  RbacAuthorizationV1Api,
  type V1Pod,
} from "@kubernetes/client-node";
import { Kvm } from "@nats-io/kv";
import { connect, nkeys } from "@nats-io/transport-node";
import { Registry } from "prom-client";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import {
  DASHBOARD_PATH,
  dashboardText,
  grafanaDashboard,
} from "../../scripts/grafana-dashboard.ts";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { shardMetrics } from "../../src/cli/commands/shard.ts";
import type { EngineStats } from "../../src/gateway/engine.ts";
import { GatewayMetrics } from "../../src/gateway/metrics.ts";
import { connectNats, serverInfo } from "../../src/moe/nats-connection.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { Autoscaler } from "../../src/operator/autoscale/autoscaler.ts";
import { OperatorMetrics } from "../../src/operator/metrics.ts";
import { desiredObjects, podMonitor, specReplicas } from "../../src/operator/workloads.ts";
import { makeNatsPki } from "../env/pki.ts";
import { freePort, ManagedProcess } from "../env/process.ts";
import { kubectl } from "../support/cli.ts";
import { deleteCrd, installCrd } from "../support/crd.ts";
import { adminKubeConfig, testEnv, uniqueName, waitFor } from "../support/env.ts";
import { restrictedNamespace } from "../support/pod-security.ts";
import { promqlSelectors, promqlSyntaxErrors } from "../support/promql.ts";

const run = promisify(execFile);

const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
const chartDir = join(repoRoot, "charts", "expertmesh");
const CRD_FILE = "deepseekmodels.expertmesh.io.yaml";
const chartCrd = join(chartDir, "crds", CRD_FILE);
const repoCrd = join(repoRoot, "crds", CRD_FILE);

/** The operator's rules on what it reconciles, as agreed with the operator (no leases). */
/** The ClusterRole's one rule beyond OPERATOR_RULES: GPU nodes' memory labels (GPUMemoryShort). */
const NODE_RULES = [{ apiGroups: [""], resources: ["nodes"], verbs: ["list"] }];

const OPERATOR_RULES = [
  { apiGroups: ["expertmesh.io"], resources: ["deepseekmodels"], verbs: ["get", "list", "watch"] },
  {
    apiGroups: ["expertmesh.io"],
    resources: ["deepseekmodels/status"],
    verbs: ["get", "update", "patch"],
  },
  { apiGroups: ["expertmesh.io"], resources: ["deepseekmodels/finalizers"], verbs: ["update"] },
  {
    apiGroups: [""],
    resources: ["configmaps", "services"],
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"],
  },
  { apiGroups: [""], resources: ["pods"], verbs: ["get", "list", "watch"] },
  {
    apiGroups: [""],
    resources: ["persistentvolumeclaims"],
    verbs: ["get", "list", "create", "update", "patch", "delete"],
  },
  { apiGroups: [""], resources: ["secrets"], verbs: ["get"] },
  { apiGroups: [""], resources: ["events"], verbs: ["list", "create", "patch"] },
  { apiGroups: ["events.k8s.io"], resources: ["events"], verbs: ["create", "patch"] },
  {
    apiGroups: ["apps"],
    resources: ["deployments"],
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"],
  },
  { apiGroups: ["apps"], resources: ["replicasets"], verbs: ["list", "patch"] },
  {
    apiGroups: ["policy"],
    resources: ["poddisruptionbudgets"],
    verbs: ["get", "list", "watch", "create", "update", "patch", "delete"],
  },
  {
    apiGroups: ["networking.k8s.io"],
    resources: ["networkpolicies"],
    verbs: ["get", "list", "create", "update", "patch", "delete"],
  },
  {
    apiGroups: ["monitoring.coreos.com"],
    resources: ["podmonitors"],
    verbs: ["get", "list", "create", "update", "patch", "delete"],
  },
];

const LEASE_RULES = [
  { apiGroups: ["coordination.k8s.io"], resources: ["leases"], verbs: ["get", "create", "update"] },
];

const BASE_ARGS = [
  "operator",
  "--metrics-port=8080",
  "--leader-elect=true",
  "--lease-namespace=$(POD_NAMESPACE)",
  "--identity=$(POD_NAME)",
  "--env-resync=30",
];

type Obj = Record<string, any>;

// Helm keeps its own config/cache/data in a throwaway folder, never in $HOME.
const helmHome = mkdtempSync(join(tmpdir(), "expertmesh-helm-"));
const helmEnv = {
  ...process.env,
  HELM_CONFIG_HOME: join(helmHome, "config"),
  HELM_CACHE_HOME: join(helmHome, "cache"),
  HELM_DATA_HOME: join(helmHome, "data"),
  KUBECONFIG: join(helmHome, "no-kubeconfig"),
};

/** Runs helm; on failure the error carries helm's stderr. */
async function helm(args: string[]): Promise<string> {
  try {
    const { stdout } = await run(testEnv().binaries.helm, args, {
      env: helmEnv,
      maxBuffer: 64 * 1024 * 1024,
      timeout: 120_000,
    });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; message: string };
    throw new Error(
      `helm ${args.join(" ")} failed: ${e.message}\n${e.stderr ?? ""}${e.stdout ?? ""}`,
    );
  }
}

/** The bundled NATS server's objects (values nats.*), which `render` leaves out. */
const isNats = (o: Obj) => o.metadata?.labels?.["app.kubernetes.io/component"] === "nats";

/** `helm template` of the chart, the operator's objects only (the bundled NATS left out). */
async function render(release: string, namespace: string, extra: string[] = []): Promise<Obj[]> {
  return (await renderAll(release, namespace, extra)).filter((o) => !isNats(o));
}

/** `helm template` of the chart, parsed into objects (empty documents dropped). */
async function renderAll(release: string, namespace: string, extra: string[] = []): Promise<Obj[]> {
  const out = await helm(["template", release, chartDir, "--namespace", namespace, ...extra]);
  const docs = parseAllDocuments(out);
  const objects: Obj[] = [];
  for (const doc of docs) {
    if (doc.errors.length > 0) throw new Error(`bad YAML from helm: ${doc.errors[0]?.message}`);
    const obj = doc.toJS() as Obj | null;
    if (obj) objects.push(obj);
  }
  return objects;
}

const ofKind = (objects: Obj[], kind: string): Obj[] => objects.filter((o) => o.kind === kind);

function only(objects: Obj[], kind: string): Obj {
  const found = ofKind(objects, kind);
  expect(found, `exactly one ${kind}`).toHaveLength(1);
  return found[0]!;
}

/** Every apiGroups/resources/verbs/resourceNames entry of every rule, for wildcard checks. */
function ruleEntries(objects: Obj[]): string[] {
  return objects
    .filter((o) => o.kind === "Role" || o.kind === "ClusterRole")
    .flatMap((o) => (o.rules ?? []) as Obj[])
    .flatMap((r) => [
      ...(r.apiGroups ?? []),
      ...(r.resources ?? []),
      ...(r.verbs ?? []),
      ...(r.resourceNames ?? []),
      ...(r.nonResourceURLs ?? []),
    ]);
}

function expectStandardLabels(objects: Obj[], release: string): void {
  for (const o of objects) {
    const labels = o.metadata?.labels ?? {};
    const what = `${o.kind}/${o.metadata?.name}`;
    expect(labels["app.kubernetes.io/name"], what).toBe("expertmesh");
    expect(labels["app.kubernetes.io/instance"], what).toBe(release);
    expect(labels["app.kubernetes.io/version"], what).toBe("0.1.0");
    expect(labels["app.kubernetes.io/managed-by"], what).toBe("Helm");
    expect(labels["helm.sh/chart"], what).toBe("expertmesh-0.1.0");
  }
}

function expectLeaderElectionRole(objects: Obj[], namespace: string, serviceAccount: string) {
  const roles = ofKind(objects, "Role").filter((r) =>
    (r.rules as Obj[]).some((rule) => rule.resources.includes("leases")),
  );
  expect(roles).toHaveLength(1);
  const role = roles[0]!;
  expect(role.metadata.namespace).toBe(namespace);
  expect(role.rules).toEqual(LEASE_RULES);
  const binding = ofKind(objects, "RoleBinding").find((b) => b.roleRef.name === role.metadata.name);
  expect(binding?.metadata.namespace).toBe(namespace);
  expect(binding?.roleRef).toEqual({
    apiGroup: "rbac.authorization.k8s.io",
    kind: "Role",
    name: role.metadata.name,
  });
  expect(binding?.subjects).toEqual([{ kind: "ServiceAccount", name: serviceAccount, namespace }]);
  // Leases are never granted cluster-wide.
  for (const cr of ofKind(objects, "ClusterRole")) {
    expect(JSON.stringify(cr.rules)).not.toContain("leases");
  }
}

function operatorContainer(objects: Obj[]): Obj {
  const deployment = only(objects, "Deployment");
  const containers = deployment.spec.template.spec.containers as Obj[];
  expect(containers).toHaveLength(1);
  return containers[0]!;
}

function crdMissingMessage(): string {
  return (
    `the chart must ship the DeepSeekModel CRD: ${chartCrd} is missing. It is an identical ` +
    `copy of ${repoCrd}, written by the CRD generator (Helm installs charts/expertmesh/crds/ ` +
    `before the templates); run the generator.`
  );
}

/** A pod as a NetworkPolicy sees it: its labels and its namespace's name. */
type PodAt = { labels: Record<string, string>; namespace: string };

/**
 * Whether a LabelSelector (matchLabels and matchExpressions, Kubernetes' semantics) selects
 * these labels; an empty selector selects everything.
 */
function selects(selector: Obj | undefined, labels: Record<string, string>): boolean {
  const byLabel = Object.entries(selector?.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
  const byExpression = ((selector?.matchExpressions ?? []) as Obj[]).every((e) => {
    const has = Object.hasOwn(labels, e.key);
    switch (e.operator) {
      case "In":
        return has && e.values.includes(labels[e.key]);
      case "NotIn":
        return !has || !e.values.includes(labels[e.key]);
      case "Exists":
        return has;
      case "DoesNotExist":
        return !has;
      default:
        throw new Error(`unknown selector operator ${e.operator}`);
    }
  });
  return byLabel && byExpression;
}

/**
 * Whether an Ingress NetworkPolicy (in the namespace of its metadata) lets `pod` reach the
 * named port of the pods it selects: a rule without `from` admits anyone; a peer with only a
 * podSelector means pods of the policy's namespace; a namespaceSelector is matched against
 * the label kubernetes.io/metadata.name, which the API server gives every namespace.
 */
function admits(policy: Obj, pod: PodAt, port: string): boolean {
  const nsLabels = { "kubernetes.io/metadata.name": pod.namespace };
  return ((policy.spec.ingress ?? []) as Obj[]).some((rule) => {
    const ports = (rule.ports ?? []) as Obj[];
    if (ports.length > 0 && !ports.some((p) => p.port === port)) return false;
    if (rule.from === undefined) return true;
    return (rule.from as Obj[]).some((peer) => {
      if (peer.ipBlock) return false;
      const inNamespace =
        peer.namespaceSelector === undefined
          ? pod.namespace === policy.metadata.namespace
          : selects(peer.namespaceSelector, nsLabels);
      return inNamespace && selects(peer.podSelector, pod.labels);
    });
  });
}

/** A LabelSelector's matchLabels as the API's labelSelector parameter. */
function selectorString(selector: Obj | undefined): string {
  expect(selector?.matchExpressions, "only matchLabels here").toBeUndefined();
  return Object.entries(selector?.matchLabels ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(",");
}

/** Values as a file for `helm -f` (in the throwaway helm folder). */
function writeValues(values: Obj): string {
  const file = join(helmHome, `values-${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(file, JSON.stringify(values));
  return file;
}

afterAll(() => {
  rmSync(helmHome, { recursive: true, force: true });
});

describe("Helm chart charts/expertmesh", () => {
  it("passes helm lint --strict, in both modes", async () => {
    const out = await helm(["lint", "--strict", chartDir]);
    expect(out).toContain("0 chart(s) failed");
    const namespaced = await helm([
      "lint",
      "--strict",
      chartDir,
      "--set",
      "watchNamespaces={team-a,team-b}",
    ]);
    expect(namespaced).toContain("0 chart(s) failed");
  });

  it("rejects invalid values through its schema", async () => {
    await expect(render("em", "ops", ["--set", "logLevel=loud"])).rejects.toThrow(/logLevel/);
    await expect(render("em", "ops", ["--set", "logFormat=xml"])).rejects.toThrow(/logFormat/);
    await expect(render("em", "ops", ["--set", "watchNamespaces={Not_A_Name}"])).rejects.toThrow(
      /watchNamespaces/,
    );
    await expect(render("em", "ops", ["--set", "nosuchvalue=1"])).rejects.toThrow(/nosuchvalue/);
  });

  it("renders a ServiceMonitor when asked, which the Prometheus Operator's CRD accepts", async () => {
    expect((await render("em", "default")).some((o) => o.kind === "ServiceMonitor")).toBe(false);
    const objects = await render("em", "default", [
      "--set",
      "metrics.serviceMonitor.enabled=true",
      "--set",
      "metrics.serviceMonitor.interval=30s",
      "--set",
      "metrics.serviceMonitor.labels.release=kps",
    ]);
    const sm = only(objects, "ServiceMonitor");
    const svc = only(objects, "Service");
    expect(sm.metadata.labels.release).toBe("kps");
    expect(sm.spec).toEqual({
      selector: { matchLabels: svc.spec.selector },
      namespaceSelector: { matchNames: ["default"] },
      endpoints: [{ port: "metrics", path: "/metrics", honorLabels: true, interval: "30s" }],
    });
    // It selects the metrics Service (which carries the selector's labels).
    expect(svc.metadata.labels).toMatchObject(sm.spec.selector.matchLabels);
    await expect(
      render("em", "default", ["--set", "metrics.serviceMonitor.interval=soon"]),
    ).rejects.toThrow(/interval/);
    // The CRD at the version pinned in test/env/versions.sh, in the real API server.
    const crd = await installCrd("servicemonitor");
    try {
      const dry = await kubectl(["apply", "--dry-run=server", "-f", "-"], JSON.stringify(sm));
      expect(dry.code, dry.stderr).toBe(0);
      expect(dry.stdout).toContain("servicemonitor.monitoring.coreos.com/em-expertmesh created");
    } finally {
      await deleteCrd(crd);
    }
  });

  it("renders alerts on the models' conditions when asked: series the operator serves, a rule the Prometheus Operator's CRD accepts", async () => {
    expect((await render("em", "default")).some((o) => o.kind === "PrometheusRule")).toBe(false);
    const objects = await render("em", "default", [
      "--set",
      "metrics.prometheusRule.enabled=true",
      "--set",
      "metrics.prometheusRule.for=30m",
      "--set",
      "metrics.prometheusRule.labels.release=kps",
    ]);
    const rule = only(objects, "PrometheusRule");
    expect(rule.metadata.labels.release).toBe("kps");
    const rules = rule.spec.groups.flatMap((g: { rules: unknown[] }) => g.rules) as {
      alert: string;
      expr: string;
      for: string;
      labels: Record<string, string>;
      annotations: Record<string, string>;
    }[];
    expect(rules.map((r) => r.alert)).toEqual([
      "ExpertMeshModelNotReady",
      "ExpertMeshModelDegraded",
      "ExpertMeshModelRolloutStalled",
      "ExpertMeshOperatorNoLeader",
    ]);
    // The stalled rollout's reason is the one the status computes (status.ts).
    expect(promqlSelectors(rules[2]!.expr)[0]!.labels).toEqual({
      condition: "Progressing",
      status: "False",
      reason: "ProgressDeadlineExceeded",
    });
    expect(rules[0]).toMatchObject({ for: "30m", labels: { severity: "warning" } });
    // Prometheus fills in the labels: the template's text reaches it unexpanded.
    expect(rules[0]!.annotations["summary"]).toBe(
      "DeepSeekModel {{ $labels.namespace }}/{{ $labels.model }} is not Ready",
    );
    expect(rules[0]!.annotations["description"]).toContain("not been Ready for 30m");
    // Every series they read is one the operator serves, with labels it has.
    const registry = new OperatorMetrics().registry;
    for (const r of rules) {
      expect(promqlSyntaxErrors(r.expr), r.alert).toEqual([]);
      for (const [name] of r.expr.matchAll(/\bexpertmesh_[a-z_]+/g))
        expect(registry.getSingleMetric(name), `${r.alert}: ${name}`).toBeDefined();
      for (const { name, labels } of promqlSelectors(r.expr)) {
        const metric = registry.getSingleMetric(name);
        expect(metric, `${r.alert}: ${name}`).toBeDefined();
        const labelNames = (metric as unknown as { labelNames: string[] }).labelNames;
        for (const l of Object.keys(labels)) expect(labelNames, `${r.alert}: ${name}`).toContain(l);
      }
    }
    expect(promqlSelectors(rules[0]!.expr)).toEqual([
      { name: "expertmesh_model_condition", labels: { condition: "Ready", status: "False" } },
    ]);
    await expect(
      render("em", "default", ["--set", "metrics.prometheusRule.for=soon"]),
    ).rejects.toThrow(/for/);
    const crd = await installCrd("prometheusrule");
    try {
      const dry = await kubectl(["apply", "--dry-run=server", "-f", "-"], JSON.stringify(rule));
      expect(dry.code, dry.stderr).toBe(0);
      expect(dry.stdout).toContain("prometheusrule.monitoring.coreos.com/em-expertmesh created");
    } finally {
      await deleteCrd(crd);
    }
  });

  it("ships a Grafana dashboard (off by default) whose every query reads series the processes register, with labels they carry", async () => {
    expect(
      (await render("em", "default")).some((o) => o.metadata.name === "em-expertmesh-dashboard"),
    ).toBe(false);
    const objects = await render("em", "default", [
      "--set",
      "grafana.dashboard.enabled=true",
      "--set",
      "grafana.dashboard.annotations.grafana_folder=expertmesh",
      "--set",
      "grafana.dashboard.namespace=monitoring",
    ]);
    const cm = objects.find(
      (o) => o.kind === "ConfigMap" && o.metadata.name === "em-expertmesh-dashboard",
    )!;
    expect(cm.metadata.namespace).toBe("monitoring");
    expect(cm.metadata.labels.grafana_dashboard).toBe("1"); // the sidecar's default label
    expect(cm.metadata.annotations).toEqual({ grafana_folder: "expertmesh" });
    // The chart's file is what the generator writes, and reaches the ConfigMap whole.
    expect(readFileSync(DASHBOARD_PATH, "utf8")).toBe(dashboardText());
    const dashboard = JSON.parse(cm.data["expertmesh.json"]);
    expect(dashboard).toEqual(grafanaDashboard());

    // Every series the processes register: the operator's (with its autoscaler's), a
    // gateway's and a shard's, each from the code that serves it.
    const operator = new OperatorMetrics().registry;
    new Autoscaler({ registry: operator, requeue: () => {}, event: () => {}, log: () => {} });
    // (An idle engine's figures: its tiers' and speculation's series are registered only
    // where the gateway has them, which the dashboard leaves out.)
    const idle: EngineStats = {
      numWaiting: 0,
      numRunning: 0,
      kvUsage: 0,
      kvCapacityTokens: 0,
      kvCacheDtype: "bf16",
      numPreemptions: 0,
      prefixQueryTokens: 0,
      prefixHitTokens: 0,
      prefixDisk: null,
      prefixRemote: null,
      numPrefilling: 0,
      specDrafts: 0,
      specDraftTokens: 0,
      specAcceptedTokens: 0,
      specMtpFailures: 0,
    };
    const gateway = new GatewayMetrics(() => idle).registry;
    const shard = new Registry();
    shardMetrics(shard, 0, { pendingFrames: 0, totals: { frames: 0, tokens: 0, errors: 0 } });
    const registered = (name: string) =>
      (operator.getSingleMetric(name) ??
        gateway.getSingleMetric(name) ??
        shard.getSingleMetric(name)) as unknown as
        | { labelNames: string[]; constructor: { name: string } }
        | undefined;
    // What a pod's series carry beside their own labels: the PodMonitor's target labels
    // (Prometheus writes the pods' label names with underscores) and Prometheus's own.
    const pm = podMonitor(
      parseManifest(
        "apiVersion: expertmesh.io/v1alpha1\nkind: DeepSeekModel\nmetadata: { name: m, namespace: default }\n" +
          "spec: { model: { preset: tiny-v3, source: { pvc: { claimName: w } } } }\n",
      ),
    );
    const targetLabels = [
      ...pm.spec.podTargetLabels.map((l) => l.replace(/[^a-zA-Z0-9_]/g, "_")),
      "namespace",
      "pod",
    ];
    expect(targetLabels).toEqual([
      "expertmesh_io_model",
      "app_kubernetes_io_component",
      "namespace",
      "pod",
    ]);

    const targets = (dashboard.panels as Obj[]).flatMap((p) =>
      ((p.targets ?? []) as { expr: string; legendFormat: string }[]).map((t) => ({
        panel: p.title as string,
        expr: t.expr,
        legendFormat: t.legendFormat,
      })),
    );
    expect(targets.length).toBeGreaterThan(20);
    for (const t of targets) {
      const what = `${t.panel}: ${t.expr}`;
      expect(promqlSyntaxErrors(t.expr), what).toEqual([]);
      const names = [...t.expr.matchAll(/\bexpertmesh_[a-z0-9_]+\b(?!\s*[=!~])/g)].map(
        (x: RegExpMatchArray) => x[0],
      );
      expect(names.length, what).toBeGreaterThan(0);
      const carried = new Set<string>();
      for (const full of names) {
        const name = full.replace(/_bucket$/, "");
        const metric = registered(name);
        expect(metric, `${what}: ${name} is registered nowhere`).toBeDefined();
        if (full !== name) expect(metric!.constructor.name, what).toBe("Histogram");
        const pod = gateway.getSingleMetric(name) ?? shard.getSingleMetric(name);
        for (const l of [
          ...metric!.labelNames,
          ...(pod ? targetLabels : []),
          ...(full !== name ? ["le"] : []),
        ])
          carried.add(l);
      }
      for (const { name, labels } of promqlSelectors(t.expr)) {
        for (const l of Object.keys(labels))
          expect(carried.has(l), `${what}: ${name} has no ${l}`).toBe(true);
        if (gateway.getSingleMetric(name))
          expect(labels["app_kubernetes_io_component"], what).toBe("gateway");
        if (shard.getSingleMetric(name))
          expect(labels["app_kubernetes_io_component"], what).toBe("shard");
      }
      const grouped = [...t.expr.matchAll(/\bby \(([^)]*)\)/g)].flatMap((x: RegExpMatchArray) =>
        x[1]!.split(",").map((l) => l.trim()),
      );
      for (const l of grouped) expect(carried.has(l), `${what}: grouped by ${l}`).toBe(true);
      // A legend names labels the result still has.
      for (const [, l] of t.legendFormat.matchAll(
        /\{\{(\w+)\}\}/g,
      ) as IterableIterator<RegExpMatchArray>) {
        const kept = grouped.length > 0 ? grouped.filter((g) => g !== "le") : [...carried];
        expect(kept, `${what}: legend {{${l}}}`).toContain(l);
      }
    }
    // Its variables come from the operator's series, which every model has.
    expect(
      (dashboard.templating.list as Obj[])
        .filter((v) => v.type === "query")
        .map((v) => v.query.query),
    ).toEqual([
      "label_values(expertmesh_model_condition, namespace)",
      'label_values(expertmesh_model_condition{namespace="$namespace"}, model)',
    ]);
    // Panels do not overlap on Grafana's 24-column grid.
    const cells = new Set<string>();
    for (const p of dashboard.panels as Obj[])
      for (let x = p.gridPos.x; x < p.gridPos.x + p.gridPos.w; x++)
        for (let y = p.gridPos.y; y < p.gridPos.y + p.gridPos.h; y++) {
          expect(x, p.title).toBeLessThan(24);
          expect(cells.has(`${x},${y}`), `${p.title} overlaps at ${x},${y}`).toBe(false);
          cells.add(`${x},${y}`);
        }
  });

  it("selects neither the pods nor the Services of a model named like the release", async () => {
    const objects = await render("em", "default", ["--set", "metrics.serviceMonitor.enabled=true"]);
    const svc = only(objects, "Service");
    const sm = only(objects, "ServiceMonitor");
    const deployment = only(objects, "Deployment");
    const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: em, namespace: default, uid: u-1 }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  experts: { shards: 2 }
  monitoring: { podMonitor: { enabled: true } }
`);
    const plan = planPlacement({
      architecture: architectureOf(m),
      numShards: m.spec.experts.shards,
      redundantExperts: 0,
    });
    const model = desiredObjects(m, plan, specReplicas(m, plan));
    const matches = (
      labels: Record<string, string> | undefined,
      selector: Record<string, string>,
    ) => Object.entries(selector).every(([k, v]) => labels?.[k] === v);
    const pods = model.flatMap((o) =>
      "spec" in o && o.spec && "template" in o.spec ? [o.spec.template?.metadata?.labels] : [],
    );
    const services = model.filter((o) => o.kind === "Service").map((o) => o.metadata?.labels);
    expect(pods.length).toBeGreaterThanOrEqual(3);
    expect(services.length).toBeGreaterThanOrEqual(1);
    // What the test guards against: the Deployment's selector alone matches the model's pods.
    expect(pods.every((l) => matches(l, deployment.spec.selector.matchLabels))).toBe(true);
    for (const labels of pods)
      expect(matches(labels, svc.spec.selector), JSON.stringify(labels)).toBe(false);
    for (const labels of services)
      expect(matches(labels, sm.spec.selector.matchLabels), JSON.stringify(labels)).toBe(false);
    // And the operator's own pods and Service still are.
    expect(matches(deployment.spec.template.metadata.labels, svc.spec.selector)).toBe(true);
    expect(matches(svc.metadata.labels, sm.spec.selector.matchLabels)).toBe(true);
  });

  describe("the bundled NATS server (values nats.*)", () => {
    it("is rendered by default, as the Service the CRD's default spec.nats.url names, and selects only its own pod", async () => {
      const all = await renderAll("em", "expertmesh-system");
      const nats = all.filter(isNats);
      expect(nats.map((o) => `${o.kind}/${o.metadata.name}`).sort()).toEqual([
        "ConfigMap/em-expertmesh-nats",
        "Service/em-expertmesh-nats",
        "Service/nats",
        "StatefulSet/em-expertmesh-nats",
      ]);
      // nats://nats.expertmesh-system.svc:4222, the CRD's default.
      const crd = readFileSync(repoCrd, "utf8");
      expect(crd).toContain("default: nats://nats.expertmesh-system.svc:4222");
      const svc = ofKind(nats, "Service").find((o) => o.metadata.name === "nats")!;
      expect(svc.metadata.namespace).toBe("expertmesh-system");
      expect(svc.spec.ports.map((p: Obj) => [p.name, p.port])).toEqual([
        ["client", 4222],
        ["monitor", 8222],
      ]);
      const sts = only(nats, "StatefulSet");
      const pod = sts.spec.template;
      expect(sts.spec.selector.matchLabels).toEqual(svc.spec.selector);
      expect(pod.metadata.labels).toMatchObject(svc.spec.selector);
      // Neither the operator's Deployment nor its metrics Service selects the NATS pod.
      const operator = only(
        all.filter((o) => !isNats(o)),
        "Deployment",
      );
      const matches = (labels: Obj, selector: Obj) =>
        Object.entries(selector).every(([k, v]) => labels[k] === v);
      expect(matches(pod.metadata.labels, operator.spec.selector.matchLabels)).toBe(false);
      expect(
        matches(
          pod.metadata.labels,
          only(
            all.filter((o) => !isNats(o)),
            "Service",
          ).spec.selector,
        ),
      ).toBe(false);
      const container = pod.spec.containers[0];
      expect(container.image).toBe("nats:2.14.9-alpine");
      expect(container.securityContext.readOnlyRootFilesystem).toBe(true);
      expect(pod.spec.securityContext.runAsNonRoot).toBe(true);
      expect(pod.spec.volumes.find((v: Obj) => v.name === "data")).toEqual({
        name: "data",
        emptyDir: {},
      });
      expect(sts.spec.volumeClaimTemplates).toBeUndefined();
      // The configuration's digest rolls the pod when the configuration changes.
      const digest = pod.metadata.annotations["checksum/config"];
      const other = only(
        (await renderAll("em", "expertmesh-system", ["--set", "nats.maxPayload=2097152"])).filter(
          isNats,
        ),
        "StatefulSet",
      );
      expect(other.spec.template.metadata.annotations["checksum/config"]).not.toBe(digest);

      const off = await renderAll("em", "expertmesh-system", ["--set", "nats.enabled=false"]);
      expect(off.filter(isNats)).toEqual([]);
      expect(off.filter((o) => !isNats(o)).length).toBe(all.filter((o) => !isNats(o)).length);

      const persistent = only(
        (
          await renderAll("em", "expertmesh-system", [
            "--set",
            "nats.jetstream.persistence.enabled=true",
            "--set",
            "nats.jetstream.persistence.size=50Gi",
            "--set",
            "nats.jetstream.persistence.storageClassName=fast",
          ])
        ).filter(isNats),
        "StatefulSet",
      );
      expect(persistent.spec.template.spec.volumes.map((v: Obj) => v.name)).toEqual(["config"]);
      expect(persistent.spec.volumeClaimTemplates).toEqual([
        {
          metadata: { name: "data" },
          spec: {
            accessModes: ["ReadWriteOnce"],
            storageClassName: "fast",
            resources: { requests: { storage: "50Gi" } },
          },
        },
      ]);
    });

    it("its rendered configuration runs on the real nats-server: JetStream, max_payload, mutual TLS, and the probes' paths answer", async () => {
      const objects = (
        await renderAll("em", "expertmesh-system", [
          "--set",
          "nats.tls.secretName=nats-server-tls",
          "--set",
          "nats.tls.verifyClients=true",
          "--set",
          "nats.maxPayload=4194304",
        ])
      ).filter(isNats);
      const conf = only(objects, "ConfigMap").data["nats.conf"] as string;
      const pod = only(objects, "StatefulSet").spec.template.spec;
      // What the pod mounts where the configuration looks: the Secret under /etc/nats/tls.
      expect(pod.containers[0].volumeMounts).toContainEqual({
        name: "tls",
        mountPath: "/etc/nats/tls",
        readOnly: true,
      });
      expect(pod.volumes).toContainEqual({
        name: "tls",
        secret: { secretName: "nats-server-tls" },
      });
      // The same file with this machine's paths and free ports in place of the pod's.
      const dir = mkdtempSync(join(testEnv().runDir, "chart-nats-"));
      const pki = makeNatsPki(dir);
      copyFileSync(pki.server.cert, join(dir, "tls.crt"));
      copyFileSync(pki.server.key, join(dir, "tls.key"));
      copyFileSync(pki.ca, join(dir, "ca.crt"));
      const [port, monitor] = [await freePort(), await freePort()];
      const local = conf
        .replace(/^port: 4222$/m, `port: ${port}\nhost: 127.0.0.1`)
        .replace(/^http_port: 8222$/m, `http: "127.0.0.1:${monitor}"`)
        .replace('"/data/jetstream"', `"${join(dir, "jetstream")}"`)
        .replaceAll("/etc/nats/tls/", `${dir}/`)
        .replace('"/var/run/nats/nats.pid"', `"${join(dir, "nats.pid")}"`);
      expect(local).not.toBe(conf);
      expect(local).not.toMatch(/\/etc\/nats|\/data\/|\/var\/run/);
      writeFileSync(join(dir, "nats.conf"), local);
      const server = new ManagedProcess(
        "nats-chart-config",
        testEnv().binaries.natsServer,
        ["--config", join(dir, "nats.conf")],
        join(testEnv().runDir, "logs"),
      );
      try {
        const probe = only(objects, "StatefulSet").spec.template.spec.containers[0];
        const paths = [probe.startupProbe, probe.livenessProbe, probe.readinessProbe].map(
          (p: Obj) => p.httpGet.path as string,
        );
        expect(paths).toEqual([
          "/healthz",
          "/healthz?js-server-only=true",
          "/healthz?js-enabled-only=true",
        ]);
        await server.waitUntil("healthy", async () => {
          for (const path of paths)
            if (!(await fetch(`http://127.0.0.1:${monitor}${path}`)).ok) return false;
          return true;
        });
        const url = `nats://127.0.0.1:${port}`;
        const nc = await connect({
          servers: url,
          tls: { caFile: pki.ca, certFile: pki.client.cert, keyFile: pki.client.key },
        });
        try {
          expect(nc.info?.max_payload).toBe(4194304);
          expect(nc.info?.jetstream).toBe(true);
          expect(nc.info?.tls_required).toBe(true);
          expect(nc.info?.tls_verify).toBe(true);
        } finally {
          await nc.close();
        }
        // Without a client certificate, no connection (the server verifies clients).
        await expect(
          connect({ servers: url, tls: { caFile: pki.ca }, timeout: 2000, reconnect: false }),
        ).rejects.toThrow();
      } finally {
        await server.stop();
      }
    });

    it("with nats.auth.configSecret its rendered configuration admits only the clients the Secret's auth.conf names (the real nats-server)", async () => {
      const objects = (
        await renderAll("em", "expertmesh-system", ["--set", "nats.auth.configSecret=nats-auth"])
      ).filter(isNats);
      const conf = only(objects, "ConfigMap").data["nats.conf"] as string;
      const pod = only(objects, "StatefulSet").spec.template.spec;
      const container = pod.containers[0];
      // The config where the command reads it, the Secret's auth.conf where it includes it.
      expect(container.command).toEqual(["nats-server", "--config", "/etc/nats/config/nats.conf"]);
      expect(container.volumeMounts).toEqual(
        expect.arrayContaining([
          { name: "config", mountPath: "/etc/nats/config", readOnly: true },
          { name: "auth", mountPath: "/etc/nats/auth", readOnly: true },
        ]),
      );
      expect(pod.volumes).toContainEqual({
        name: "auth",
        secret: { secretName: "nats-auth", items: [{ key: "auth.conf", path: "auth.conf" }] },
      });
      expect(conf).toContain('include "../auth/auth.conf"');
      // The pod's layout on this machine: config/nats.conf beside auth/auth.conf.
      const dir = mkdtempSync(join(testEnv().runDir, "chart-nats-auth-"));
      mkdirSync(join(dir, "config"));
      mkdirSync(join(dir, "auth"));
      const nkey = nkeys.createUser();
      writeFileSync(
        join(dir, "auth", "auth.conf"),
        [
          "authorization { users = [",
          '  { user: expertmesh, password: "pa ss#1 \\"q\\"" }',
          `  { nkey: ${nkey.getPublicKey()} }`,
          "] }",
          "",
        ].join("\n"),
      );
      const [port, monitor] = [await freePort(), await freePort()];
      const local = conf
        .replace(/^port: 4222$/m, `port: ${port}\nhost: 127.0.0.1`)
        .replace(/^http_port: 8222$/m, `http: "127.0.0.1:${monitor}"`)
        .replace('"/data/jetstream"', `"${join(dir, "jetstream")}"`)
        .replace('"/var/run/nats/nats.pid"', `"${join(dir, "nats.pid")}"`);
      writeFileSync(join(dir, "config", "nats.conf"), local);
      const server = new ManagedProcess(
        "nats-chart-auth",
        testEnv().binaries.natsServer,
        ["--config", join(dir, "config", "nats.conf")],
        join(testEnv().runDir, "logs"),
      );
      try {
        await server.waitUntil(
          "healthy",
          async () => (await fetch(`http://127.0.0.1:${monitor}/healthz`)).ok,
        );
        const url = `nats://127.0.0.1:${port}`;
        const as = (auth: Parameters<typeof connectNats>[0]["auth"]) =>
          connectNats({ url, name: "chart-auth-test", auth });
        for (const auth of [
          { identity: { kind: "user" as const, user: "expertmesh", password: 'pa ss#1 "q"' } },
          { identity: { kind: "nkey" as const, seed: nkey.getSeed() } },
        ]) {
          const nc = await as(auth);
          expect(nc.info?.auth_required).toBe(true);
          await nc.close();
        }
        for (const auth of [
          undefined,
          { identity: { kind: "user" as const, user: "expertmesh", password: "guess" } },
        ])
          await expect(as(auth)).rejects.toThrow(/refused this connection's credentials/);
      } finally {
        await server.stop();
      }
    });

    it("with a Secret to watch, its reloader has the server reload when the Secret's files change: a rotated password gets in, the old one not, other users stay connected (the rendered script, the real nats-server)", async () => {
      const render = async (extra: string[]) =>
        (
          await renderAll("em", "default", ["--set", "nats.auth.configSecret=nats-auth", ...extra])
        ).filter(isNats);
      const objects = await render(["--set", "nats.reloader.intervalSeconds=1"]);
      const conf = only(objects, "ConfigMap").data["nats.conf"] as string;
      const pod = only(objects, "StatefulSet").spec.template.spec;
      expect(pod.shareProcessNamespace).toBe(true);
      const [server, reloader] = pod.containers as [Obj, Obj];
      expect(reloader.name).toBe("reloader");
      expect(reloader.image).toBe(server.image);
      expect(reloader.securityContext.readOnlyRootFilesystem).toBe(true);
      // The server writes its pid where the reloader reads it; both see the auth Secret.
      expect(conf).toContain('pid_file: "/var/run/nats/nats.pid"');
      expect(server.volumeMounts).toContainEqual({ name: "pid", mountPath: "/var/run/nats" });
      expect(reloader.volumeMounts).toEqual([
        { name: "pid", mountPath: "/var/run/nats", readOnly: true },
        { name: "auth", mountPath: "/etc/nats/auth", readOnly: true },
      ]);
      expect(pod.volumes).toContainEqual({ name: "pid", emptyDir: {} });
      // The API server takes the pod as rendered (a dry run: no such Secret here).
      const dryRun = await kubectl(
        ["apply", "--dry-run=server", "-n", "default", "-f", "-"],
        JSON.stringify({ apiVersion: "v1", kind: "List", items: objects }),
      );
      expect(dryRun.code, dryRun.stderr).toBe(0);
      const [shell, ...args] = reloader.command as string[];
      expect(args.slice(2)).toEqual(["reloader", "/var/run/nats/nats.pid", "1", "/etc/nats/auth"]);

      // Nothing to watch (no auth or TLS Secret), or turned off: no reloader, no pid file.
      for (const values of [
        ["--set", "nats.auth.configSecret="],
        ["--set", "nats.reloader.enabled=false"],
      ]) {
        const off = await render(values);
        const spec = only(off, "StatefulSet").spec.template.spec;
        expect(
          spec.containers.map((c: Obj) => c.name),
          values.join(" "),
        ).toEqual(["nats"]);
        expect(spec.shareProcessNamespace).toBeUndefined();
        expect(only(off, "ConfigMap").data["nats.conf"]).not.toContain("pid_file");
      }

      // The pod's layout here; the Secret's folder as the kubelet keeps it (auth.conf a link
      // into ..data, itself a link to the current version, swapped when the Secret changes).
      const dir = mkdtempSync(join(testEnv().runDir, "chart-nats-reload-"));
      for (const sub of ["config", "auth", "run"]) mkdirSync(join(dir, sub));
      const secretVersion = (name: string, authConf: string) => {
        mkdirSync(join(dir, "auth", name));
        writeFileSync(join(dir, "auth", name, "auth.conf"), authConf);
        symlinkSync(name, join(dir, "auth", "..data_tmp"));
        renameSync(join(dir, "auth", "..data_tmp"), join(dir, "auth", "..data"));
      };
      const users = (password: string) =>
        `authorization { users = [ { user: expertmesh, password: "${password}" }, { user: observer, password: "watch" } ] }\n`;
      secretVersion("..v1", users("one"));
      symlinkSync("..data/auth.conf", join(dir, "auth", "auth.conf"));
      const [port, monitor] = [await freePort(), await freePort()];
      writeFileSync(
        join(dir, "config", "nats.conf"),
        conf
          .replace(/^port: 4222$/m, `port: ${port}\nhost: 127.0.0.1`)
          .replace(/^http_port: 8222$/m, `http: "127.0.0.1:${monitor}"`)
          .replace('"/data/jetstream"', `"${join(dir, "jetstream")}"`)
          .replace('"/var/run/nats/nats.pid"', `"${join(dir, "run", "nats.pid")}"`),
      );
      const logs = join(testEnv().runDir, "logs");
      const nats = new ManagedProcess(
        "nats-chart-reload",
        testEnv().binaries.natsServer,
        ["--config", join(dir, "config", "nats.conf")],
        logs,
      );
      const local = (a: string) =>
        a
          .replace("/var/run/nats/", `${join(dir, "run")}/`)
          .replace("/etc/nats/auth", join(dir, "auth"));
      const reload = new ManagedProcess(
        "nats-chart-reloader",
        `/bin/${shell}`,
        args.map(local),
        logs,
        {
          ...process.env,
          PATH: `${dirname(testEnv().binaries.natsServer)}:${process.env.PATH}`,
        },
      );
      const url = `nats://127.0.0.1:${port}`;
      const as = (user: string, password: string) =>
        connect({ servers: url, user, pass: password, reconnect: false, timeout: 2000 });
      try {
        await nats.waitUntil(
          "healthy",
          async () => (await fetch(`http://127.0.0.1:${monitor}/healthz`)).ok,
        );
        await reload.waitUntil("watching", async () =>
          /^watching /m.test(readFileSync(reload.logPath, "utf8")),
        );
        const observer = await as("observer", "watch");
        await (await as("expertmesh", "one")).close();
        await expect(as("expertmesh", "two")).rejects.toThrow(/Authorization Violation/);

        secretVersion("..v2", users("two"));
        const rotated = await waitFor(
          "the rotated password to get in",
          async () => as("expertmesh", "two").catch(() => undefined),
          20_000,
        );
        await rotated.close();
        await expect(as("expertmesh", "one")).rejects.toThrow(/Authorization Violation/);
        expect(readFileSync(reload.logPath, "utf8")).toContain(
          "files changed: reloaded the server's configuration",
        );
        // The server was not restarted: the observer's connection is the same, and answers.
        expect(observer.isClosed()).toBe(false);
        await observer.flush();
        await observer.close();
      } finally {
        await reload.stop();
        await nats.stop();
      }
    });

    /** The first line a TLS server at 127.0.0.1:`port` sends; null if it drops the peer. */
    function tlsGreeting(port: number, options: ConnectionOptions): Promise<string | null> {
      return new Promise((resolve) => {
        const socket = tlsConnect({ host: "127.0.0.1", port, ...options });
        let text = "";
        const done = (line: string | null) => {
          clearTimeout(timer);
          socket.destroy();
          resolve(line);
        };
        const timer = setTimeout(() => done(null), 5000);
        socket.setEncoding("utf8");
        socket.on("data", (chunk: string) => {
          text += chunk;
          const end = text.indexOf("\r\n");
          if (end >= 0) done(text.slice(0, end));
        });
        socket.on("error", () => done(null));
        socket.on("close", () => done(null));
      });
    }

    /**
     * Three nats-servers here, each with the chart's rendered file for nats.replicas 3: this
     * machine's ports in place of the pods', 127.0.0.1 in place of the pods' names, each its
     * own store, POD_NAME its name; with routesTls, the routes' Secret's files from the test
     * PKI. They must form a cluster whose replicated bucket outlives a server.
     */
    async function chartCluster(routesTls: boolean) {
      const extra = ["--set", "nats.replicas=3"];
      if (routesTls) extra.push("--set", "nats.tls.routesSecretName=nats-routes");
      const objects = (await renderAll("em", "default", extra)).filter(isNats);
      const sts = only(objects, "StatefulSet");
      expect(sts.spec.replicas).toBe(3);
      expect(sts.spec.podManagementPolicy).toBe("Parallel");
      // The pods' names resolve through a headless Service, listed before they are ready.
      const headless = ofKind(objects, "Service").find(
        (o) => o.metadata.name === sts.spec.serviceName,
      )!;
      expect(headless.spec).toMatchObject({ clusterIP: "None", publishNotReadyAddresses: true });
      expect(headless.spec.selector).toEqual(sts.spec.selector.matchLabels);
      expect(only(objects, "PodDisruptionBudget").spec).toEqual({
        maxUnavailable: 1,
        selector: sts.spec.selector,
      });
      const pod = sts.spec.template.spec;
      const container = pod.containers[0];
      expect(container.env).toEqual([
        { name: "POD_NAME", valueFrom: { fieldRef: { fieldPath: "metadata.name" } } },
      ]);
      expect(container.ports.map((p: Obj) => p.name)).toContain("cluster");
      const routesMount = { name: "routes-tls", mountPath: "/etc/nats/routes-tls", readOnly: true };
      if (routesTls) {
        // The routes' Secret where the configuration reads it, watched by the reloader.
        expect(pod.volumes).toContainEqual({
          name: "routes-tls",
          secret: {
            secretName: "nats-routes",
            items: ["tls.crt", "tls.key", "ca.crt"].map((key) => ({ key, path: key })),
          },
        });
        const reloader = pod.containers.find((c: Obj) => c.name === "reloader");
        for (const c of [container, reloader]) expect(c.volumeMounts).toContainEqual(routesMount);
        expect(reloader.command).toContain("/etc/nats/routes-tls");
      } else {
        expect(pod.containers.map((c: Obj) => c.name)).toEqual(["nats"]);
        expect(container.volumeMounts).not.toContainEqual(routesMount);
      }
      // The API server takes them as rendered.
      const dryRun = await kubectl(
        ["apply", "--dry-run=server", "-n", "default", "-f", "-"],
        JSON.stringify({ apiVersion: "v1", kind: "List", items: objects }),
      );
      expect(dryRun.code, dryRun.stderr).toBe(0);

      const conf = only(objects, "ConfigMap").data["nats.conf"] as string;
      const routeHost = (i: number) =>
        `${sts.metadata.name}-${i}.${headless.metadata.name}.default.svc`;
      for (const i of [0, 1, 2]) expect(conf).toContain(`nats://${routeHost(i)}:6222`);
      // Clients are told of no pod addresses: they reconnect through the Service.
      expect(conf).toMatch(/^ {2}no_advertise: true$/m);
      const dir = mkdtempSync(join(testEnv().runDir, "chart-nats-cluster-"));
      const pki = makeNatsPki(dir);
      copyFileSync(pki.route.cert, join(dir, "tls.crt"));
      copyFileSync(pki.route.key, join(dir, "tls.key"));
      copyFileSync(pki.ca, join(dir, "ca.crt"));
      const ports = await Promise.all(
        [0, 1, 2].map(async () => ({
          client: await freePort(),
          cluster: await freePort(),
          monitor: await freePort(),
        })),
      );
      const servers = ports.map((p, i) => {
        let local = conf
          .replace(/^port: 4222$/m, `port: ${p.client}\nhost: 127.0.0.1`)
          .replace(/^http_port: 8222$/m, `http: "127.0.0.1:${p.monitor}"`)
          .replace(/^ {2}port: 6222$/m, `  port: ${p.cluster}\n  host: 127.0.0.1`)
          .replace('"/data/jetstream"', `"${join(dir, `js-${i}`)}"`)
          .replaceAll("/etc/nats/routes-tls/", `${dir}/`)
          .replace('"/var/run/nats/nats.pid"', `"${join(dir, `nats-${i}.pid`)}"`);
        for (const [j, q] of ports.entries())
          local = local.replace(`${routeHost(j)}:6222`, `127.0.0.1:${q.cluster}`);
        expect(local).not.toMatch(/\.svc|\/data\/|\/etc\/nats|\/var\/run/);
        writeFileSync(join(dir, `nats-${i}.conf`), local);
        return new ManagedProcess(
          `nats-chart-cluster-${routesTls ? "tls-" : ""}${i}`,
          testEnv().binaries.natsServer,
          ["--config", join(dir, `nats-${i}.conf`)],
          join(testEnv().runDir, "logs"),
          { ...process.env, POD_NAME: `em-expertmesh-nats-${i}` },
        );
      });
      const monitor = (i: number, path: string) =>
        fetch(`http://127.0.0.1:${ports[i]!.monitor}${path}`);
      const routes = async (i: number) =>
        ((await (await monitor(i, "/routez")).json()) as { num_routes: number }).num_routes;
      try {
        // Ready (the probe's path) only once JetStream's cluster has a leader.
        for (const [i, server] of servers.entries())
          await server.waitUntil(
            "ready",
            async () => (await monitor(i, "/healthz?js-enabled-only=true")).ok,
            60_000,
          );
        const nc1 = await connect({ servers: `nats://127.0.0.1:${ports[1]!.client}` });
        expect(nc1.info?.connect_urls ?? []).toEqual([]);
        await nc1.close();
        // JetStream is healthy with a quorum (2 of 3 routed), not the full mesh: a CI run saw
        // server 0 with 1 route here. Wait for every server to reach both others.
        await waitFor(
          "every server routed to both others",
          async () =>
            (await Promise.all([0, 1, 2].map(routes))).every((n) => n >= 2) ? true : undefined,
          30_000,
        );
        for (const i of [0, 1, 2]) {
          expect(await routes(i), `server ${i}'s routes`).toBeGreaterThanOrEqual(2);
          const varz = (await (await monitor(i, "/varz")).json()) as { server_name: string };
          expect(varz.server_name).toBe(`em-expertmesh-nats-${i}`);
          const port = ports[i]!.cluster;
          if (!routesTls) {
            // A plain route port greets in plain text.
            expect(await serverInfo(`nats://127.0.0.1:${port}`, 5000)).not.toBeNull();
            continue;
          }
          // A TLS route port says nothing in plain text; it greets a route's certificate over
          // TLS, and drops a peer that has none (it verifies both ways).
          expect(await serverInfo(`nats://127.0.0.1:${port}`, 1000)).toBeNull();
          const ca = readFileSync(pki.ca);
          const route = { cert: readFileSync(pki.route.cert), key: readFileSync(pki.route.key) };
          expect(await tlsGreeting(port, { ca, ...route })).toMatch(/^INFO \{/);
          expect(await tlsGreeting(port, { ca })).toBeNull();
        }
        if (routesTls) {
          // A reload (what the reloader does after a rotation) keeps the routes.
          process.kill(servers[1]!.pid!, "SIGHUP");
          await waitFor("the reload logged", async () =>
            readFileSync(servers[1]!.logPath, "utf8").includes("Reloaded server configuration")
              ? true
              : undefined,
          );
          expect(readFileSync(servers[1]!.logPath, "utf8")).not.toMatch(/reload.*(?:error|fail)/i);
          expect(await routes(1)).toBeGreaterThanOrEqual(2);
        }
        // A bucket kept on all three, written through server 0, read through server 2 after
        // server 0 is gone.
        const nc0 = await connect({ servers: `nats://127.0.0.1:${ports[0]!.client}` });
        const kv0 = await waitFor("a bucket of 3 replicas", async () =>
          new Kvm(nc0).create("cluster-test", { replicas: 3 }).catch(() => undefined),
        );
        // (under load the bucket's stream may still be electing its leader: no responders)
        await waitFor("the value written", async () =>
          kv0.put("k", "written before the loss").catch(() => undefined),
        );
        await nc0.close();
        await servers[0]!.stop();
        const nc2 = await connect({ servers: `nats://127.0.0.1:${ports[2]!.client}` });
        try {
          // Until the others elected a new leader for the bucket (if server 0 led it).
          const entry = await waitFor("the value from the others", async () =>
            new Kvm(nc2)
              .open("cluster-test")
              .then(async (kv) => (await kv.get("k")) ?? undefined)
              .catch(() => undefined),
          );
          expect(entry?.string()).toBe("written before the loss");
        } finally {
          await nc2.close();
        }
      } finally {
        for (const server of servers) await server.stop();
      }
    }

    it("with nats.replicas 3 its rendered configuration forms a cluster on the real nats-server: routes by the pods' names, JetStream clustered, a replicated bucket that outlives a server", async () => {
      await chartCluster(false);
    });

    it("with nats.tls.routesSecretName the cluster's routes run over TLS, verified both ways, and a reload keeps them (the real nats-server)", async () => {
      await chartCluster(true);
    });

    it("with nats.networkPolicy.enabled admits to the client port only the models' pods, the operator's and extraFrom; the monitor port to monitorFrom", async () => {
      const policyOf = async (extra: string[]) =>
        only((await renderAll("em", "ops", extra)).filter(isNats), "NetworkPolicy");
      expect(
        (await renderAll("em", "ops")).filter(isNats).map((o) => o.kind),
        "off by default",
      ).not.toContain("NetworkPolicy");
      const open = await policyOf(["--set", "nats.networkPolicy.enabled=true"]);
      const all = await renderAll("em", "ops", ["--set", "nats.networkPolicy.enabled=true"]);
      const natsPod = only(all.filter(isNats), "StatefulSet").spec.template.metadata.labels;
      const operatorPod = only(
        all.filter((o) => !isNats(o)),
        "Deployment",
      ).spec.template.metadata.labels;
      // Every kind of pod a model runs (gateways, prefill gateways, shards), in team-a.
      const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: em, namespace: team-a, uid: u-1 }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  experts: { shards: 2 }
  gateway: { disaggregation: { replicas: 1 }, kvCache: { remoteBytes: 1073741824 } }
`);
      const plan = planPlacement({
        architecture: architectureOf(m),
        numShards: m.spec.experts.shards,
        redundantExperts: 0,
      });
      const modelPods = desiredObjects(m, plan, specReplicas(m, plan)).flatMap((o) =>
        "spec" in o && o.spec && "template" in o.spec ? [o.spec.template!.metadata!.labels!] : [],
      );
      expect(new Set(modelPods.map((l) => l["app.kubernetes.io/component"]))).toEqual(
        new Set(["gateway", "prefill", "shard"]),
      );
      const inTeamA = (labels: Record<string, string>): PodAt => ({ labels, namespace: "team-a" });
      const inOps = (labels: Record<string, string>): PodAt => ({ labels, namespace: "ops" });

      expect(selects(open.spec.podSelector, natsPod)).toBe(true);
      expect(selects(open.spec.podSelector, operatorPod)).toBe(false);
      expect(open.spec.policyTypes).toEqual(["Ingress"]);
      for (const labels of modelPods) {
        expect(admits(open, inTeamA(labels), "client"), JSON.stringify(labels)).toBe(true);
        expect(admits(open, inOps(labels), "client")).toBe(true);
      }
      expect(admits(open, inOps(operatorPod), "client")).toBe(true);
      // The operator's labels count in the release's namespace only.
      expect(admits(open, inTeamA(operatorPod), "client")).toBe(false);
      const stranger = { app: "curl" };
      expect(admits(open, inOps(stranger), "client")).toBe(false);
      expect(admits(open, inOps(natsPod), "client")).toBe(false);
      expect(admits(open, inOps(stranger), "monitor"), "monitorFrom empty: anyone").toBe(true);

      const narrow = await policyOf([
        "-f",
        writeValues({
          nats: {
            networkPolicy: {
              enabled: true,
              modelNamespaces: ["team-b"],
              extraFrom: [{ podSelector: { matchLabels: { app: "nats-box" } } }],
              monitorFrom: [
                {
                  namespaceSelector: {
                    matchLabels: { "kubernetes.io/metadata.name": "monitoring" },
                  },
                },
              ],
            },
          },
        }),
      ]);
      for (const labels of modelPods) {
        expect(admits(narrow, inTeamA(labels), "client")).toBe(false);
        expect(admits(narrow, { labels, namespace: "team-b" }, "client")).toBe(true);
      }
      expect(admits(narrow, inOps(operatorPod), "client")).toBe(true);
      expect(admits(narrow, inOps({ app: "nats-box" }), "client")).toBe(true);
      expect(admits(narrow, inOps({ app: "nats-box" }), "monitor")).toBe(false);
      expect(admits(narrow, { labels: stranger, namespace: "monitoring" }, "monitor")).toBe(true);
      expect(admits(narrow, { labels: stranger, namespace: "monitoring" }, "client")).toBe(false);

      // A cluster: its servers reach each other's route port, and no one else does.
      const clustered = await policyOf([
        "--set",
        "nats.networkPolicy.enabled=true",
        "--set",
        "nats.replicas=3",
      ]);
      expect(admits(clustered, inOps(natsPod), "cluster")).toBe(true);
      expect(admits(clustered, inOps(operatorPod), "cluster")).toBe(false);
      expect(admits(clustered, inOps(stranger), "cluster")).toBe(false);
      expect(admits(open, inOps(natsPod), "cluster"), "one server: no route port").toBe(false);

      await expect(
        render("em", "ops", ["--set", "nats.networkPolicy.modelNamespaces[0]=Team_A"]),
      ).rejects.toThrow(/modelNamespaces/);
      await expect(
        render("em", "ops", ["--set", "nats.networkPolicy.extraFrom[0].podSelectr.app=x"]),
      ).rejects.toThrow(/extraFrom/);
    });

    it("its notes say whether the routes between the NATS servers are encrypted and which Secrets are reloaded in place", async () => {
      const notes = async (values: string[]) => {
        const out = await helm([
          "install",
          "em",
          chartDir,
          "--namespace",
          "ops",
          "--dry-run=client",
          "--kubeconfig",
          testEnv().kube.kubeconfig,
          ...values.flatMap((v) => ["--set", v]),
        ]);
        return out.slice(out.indexOf("NOTES:"));
      };
      const plainRoutes = "The routes between its servers are plain text";
      expect(await notes([])).not.toContain("routes between its servers");
      expect(await notes(["nats.replicas=3"])).toContain(
        `${plainRoutes}: set nats.tls.routesSecretName to encrypt them.`,
      );
      const clientTlsOnly = await notes(["nats.replicas=3", "nats.tls.secretName=nats-tls"]);
      expect(clientTlsOnly).toContain(`${plainRoutes}, though its clients use TLS:`);
      expect(clientTlsOnly).toContain("A change to Secret nats-tls is reloaded in place");
      const all = await notes([
        "nats.replicas=3",
        "nats.tls.secretName=nats-tls",
        "nats.tls.routesSecretName=nats-routes",
        "nats.auth.configSecret=nats-auth",
      ]);
      expect(all).toContain(
        "The routes between its servers use TLS (Secret nats-routes), verified both ways.",
      );
      expect(all).toContain(
        "A change to Secret nats-auth, nats-tls or nats-routes is reloaded in place",
      );
      expect(await notes(["nats.replicas=3", "nats.reloader.enabled=false"])).not.toContain(
        "reloaded in place",
      );
    });

    it("refuses values it cannot run: client verification without a Secret, a payload past 64 MiB, a store size NATS cannot read, an even cluster, routes TLS without a cluster", async () => {
      for (const [value, field] of [
        ["nats.tls.verifyClients=true", /secretName/],
        ["nats.maxPayload=134217728", /maxPayload/],
        ["nats.jetstream.maxFileStore=ten", /maxFileStore/],
        ["nats.serviceName=Not_A_Name", /serviceName/],
        ["nats.replicas=2", /replicas/],
        ["nats.tls.routesSecretName=routes", /replicas/], // routes exist only in a cluster
      ] as const)
        await expect(render("em", "ops", ["--set", value]), value).rejects.toThrow(field);
    });
  });

  it("runs only pods that pass the restricted Pod Security Standard (the API server's PodSecurity admission judges)", async () => {
    const core = adminKubeConfig().makeApiClient(CoreV1Api);
    const restricted = await restrictedNamespace("em-chart-restricted");
    const namespace = restricted.name;
    try {
      // The control: the namespace does enforce it.
      expect(await restricted.refusal({ containers: [{ name: "c", image: "busybox" }] })).toMatch(
        /violates PodSecurity/,
      );
      // Every pod: the operator's, and the NATS server's with its reloader.
      const objects = await renderAll("em", namespace, [
        "--set",
        "nats.auth.configSecret=nats-auth",
        "--set",
        "nats.tls.secretName=nats-tls",
      ]);
      // The operator's pods run as its ServiceAccount, which admission looks up.
      await core.createNamespacedServiceAccount({
        namespace,
        body: { metadata: { name: only(objects, "ServiceAccount").metadata.name } },
      });
      const pods = objects.filter((o) => o.kind === "Deployment" || o.kind === "StatefulSet");
      expect(pods.map((o) => o.kind).sort()).toEqual(["Deployment", "StatefulSet"]);
      expect(
        pods.flatMap((o) => o.spec.template.spec.containers.map((c: Obj) => c.name)).sort(),
      ).toEqual(["nats", "operator", "reloader"].sort());
      for (const o of pods)
        expect(await restricted.refusal(o.spec.template.spec), o.metadata.name).toBeNull();
    } finally {
      await restricted.remove();
    }
  });

  it("ships the CRD as an identical copy of crds/" + CRD_FILE, () => {
    if (!existsSync(chartCrd)) throw new Error(crdMissingMessage());
    if (!existsSync(repoCrd)) throw new Error(`${repoCrd} is missing: run the CRD generator`);
    expect(readFileSync(chartCrd, "utf8"), `${chartCrd} differs from ${repoCrd}`).toBe(
      readFileSync(repoCrd, "utf8"),
    );
  });

  describe("cluster-wide mode (default values)", () => {
    const release = "em";
    const namespace = "expertmesh-system";
    let objects: Obj[];
    beforeAll(async () => {
      objects = await render(release, namespace);
    });

    it("renders exactly the expected objects, all with the standard labels", () => {
      const kinds = objects.map((o) => `${o.kind}/${o.metadata.name}`).sort();
      expect(kinds).toEqual(
        [
          "ClusterRole/em-expertmesh",
          "ClusterRoleBinding/em-expertmesh",
          "Deployment/em-expertmesh",
          "Role/em-expertmesh-leader-election",
          "RoleBinding/em-expertmesh-leader-election",
          "Service/em-expertmesh-metrics",
          "ServiceAccount/em-expertmesh",
        ].sort(),
      );
      for (const o of objects) {
        if (o.kind !== "ClusterRole" && o.kind !== "ClusterRoleBinding") {
          expect(o.metadata.namespace, `${o.kind}/${o.metadata.name}`).toBe(namespace);
        }
      }
      expectStandardLabels(objects, release);
      expectStandardLabels([only(objects, "Deployment").spec.template], release);
    });

    it("grants the operator exactly its rules in a ClusterRole, with no wildcard anywhere", () => {
      const clusterRole = only(objects, "ClusterRole");
      expect(clusterRole.rules).toEqual([...OPERATOR_RULES, ...NODE_RULES]);
      const entries = ruleEntries(objects);
      expect(entries.length).toBeGreaterThan(0);
      for (const e of entries) expect(e).not.toContain("*");
      const binding = only(objects, "ClusterRoleBinding");
      expect(binding.roleRef).toEqual({
        apiGroup: "rbac.authorization.k8s.io",
        kind: "ClusterRole",
        name: clusterRole.metadata.name,
      });
      expect(binding.subjects).toEqual([
        { kind: "ServiceAccount", name: "em-expertmesh", namespace },
      ]);
      expectLeaderElectionRole(objects, namespace, "em-expertmesh");
      // The only Role is leader election's: no per-namespace Roles in this mode.
      expect(ofKind(objects, "Role")).toHaveLength(1);
    });

    it("runs the operator with probes, security contexts, downward API env and its args", () => {
      const deployment = only(objects, "Deployment");
      expect(deployment.spec.replicas).toBe(2);
      const pod = deployment.spec.template.spec;
      expect(deployment.spec.selector.matchLabels).toEqual({
        "app.kubernetes.io/name": "expertmesh",
        "app.kubernetes.io/instance": release,
      });
      expect(pod.serviceAccountName).toBe("em-expertmesh");
      expect(pod.terminationGracePeriodSeconds).toBe(30);
      expect(pod.securityContext).toEqual({
        runAsNonRoot: true,
        runAsUser: 10001,
        runAsGroup: 10001,
        fsGroup: 10001,
        seccompProfile: { type: "RuntimeDefault" },
      });
      const c = operatorContainer(objects);
      expect(c.image).toBe("expertmesh/expertmesh:0.1.0");
      expect(c.imagePullPolicy).toBe("IfNotPresent");
      expect(c.args).toEqual(BASE_ARGS);
      expect(c.command).toBeUndefined(); // the image's entrypoint is the expertmesh CLI
      expect(c.securityContext).toEqual({
        allowPrivilegeEscalation: false,
        readOnlyRootFilesystem: true,
        capabilities: { drop: ["ALL"] },
      });
      expect(c.ports).toEqual([{ name: "metrics", containerPort: 8080, protocol: "TCP" }]);
      expect(c.livenessProbe.httpGet).toEqual({ path: "/healthz", port: "metrics" });
      expect(c.readinessProbe.httpGet).toEqual({ path: "/readyz", port: "metrics" });
      expect(c.resources).toEqual({
        requests: { cpu: "100m", memory: "128Mi" },
        limits: { cpu: "500m", memory: "512Mi" },
      });
      const env = Object.fromEntries((c.env as Obj[]).map((e) => [e.name, e]));
      expect(env["POD_NAME"]?.valueFrom).toEqual({ fieldRef: { fieldPath: "metadata.name" } });
      expect(env["POD_NAMESPACE"]?.valueFrom).toEqual({
        fieldRef: { fieldPath: "metadata.namespace" },
      });
      expect(env["EXPERTMESH_LOG_LEVEL"]?.value).toBe("info");
      // A read-only root filesystem still gets a writable /tmp.
      expect(c.volumeMounts).toEqual([{ name: "tmp", mountPath: "/tmp" }]);
      for (const key of ["nodeSelector", "tolerations", "affinity", "priorityClassName"]) {
        expect(pod[key], key).toBeUndefined();
      }
    });

    it("exposes metrics through a Service with Prometheus annotations", () => {
      const svc = only(objects, "Service");
      expect(svc.spec.type).toBe("ClusterIP");
      expect(svc.spec.ports).toEqual([
        { name: "metrics", port: 8080, targetPort: "metrics", protocol: "TCP" },
      ]);
      // The Deployment's selector and the component: not the pods of a model named like the
      // release, which carry the same name and instance labels.
      expect(svc.spec.selector).toEqual({
        ...only(objects, "Deployment").spec.selector.matchLabels,
        "app.kubernetes.io/component": "operator",
      });
      expect(svc.metadata.annotations).toMatchObject({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
      });
    });
  });

  describe("namespaced mode (watchNamespaces: [team-a, team-b])", () => {
    const release = "expertmesh";
    const namespace = "ops";
    let objects: Obj[];
    beforeAll(async () => {
      objects = await render(release, namespace, [
        "--set",
        "watchNamespaces={team-a,team-b}",
        "--set",
        "serviceAccount.name=operator",
      ]);
    });

    it("renders a Role + RoleBinding per watched namespace and nothing cluster-wide", () => {
      expect(ofKind(objects, "ClusterRole")).toEqual([]);
      expect(ofKind(objects, "ClusterRoleBinding")).toEqual([]);
      for (const o of objects) expect(o.metadata.namespace, o.kind).toBeDefined();
      for (const ns of ["team-a", "team-b"]) {
        const roles = ofKind(objects, "Role").filter((r) => r.metadata.namespace === ns);
        expect(roles, ns).toHaveLength(1);
        expect(roles[0]!.rules).toEqual(OPERATOR_RULES);
        const bindings = ofKind(objects, "RoleBinding").filter((b) => b.metadata.namespace === ns);
        expect(bindings, ns).toHaveLength(1);
        expect(bindings[0]!.roleRef).toEqual({
          apiGroup: "rbac.authorization.k8s.io",
          kind: "Role",
          name: roles[0]!.metadata.name,
        });
        expect(bindings[0]!.subjects).toEqual([
          { kind: "ServiceAccount", name: "operator", namespace },
        ]);
      }
      // Release namespace: only the leader-election Role.
      expect(
        ofKind(objects, "Role")
          .map((r) => r.metadata.namespace)
          .sort(),
      ).toEqual(["ops", "team-a", "team-b"]);
      expectLeaderElectionRole(objects, namespace, "operator");
      for (const e of ruleEntries(objects)) expect(e).not.toContain("*");
      expectStandardLabels(objects, release);
    });

    it("passes one --namespace per watched namespace to the operator", () => {
      expect(operatorContainer(objects).args).toEqual([
        ...BASE_ARGS,
        "--namespace=team-a",
        "--namespace=team-b",
      ]);
      expect(only(objects, "ServiceAccount").metadata.name).toBe("operator");
      expect(only(objects, "Deployment").spec.template.spec.serviceAccountName).toBe("operator");
    });
  });

  it("passes envResyncSeconds as --env-resync, and refuses one below 1 s", async () => {
    const objects = await render("em", "ops", ["--set", "envResyncSeconds=5"]);
    expect(operatorContainer(objects).args).toContain("--env-resync=5");
    await expect(render("em", "ops", ["--set", "envResyncSeconds=0"])).rejects.toThrow(/minimum/);
  });

  it("passes the scheduling and image values through", async () => {
    const objects = await render("em", "ops", [
      "--set",
      "image.repository=registry.example/em",
      "--set",
      "image.tag=dev",
      "--set",
      "image.pullPolicy=Always",
      "--set",
      "imagePullSecrets[0].name=regcred",
      "--set",
      "replicaCount=3",
      "--set",
      "nodeSelector.pool=system",
      "--set",
      "tolerations[0].key=dedicated,tolerations[0].operator=Exists",
      "--set",
      "priorityClassName=system-cluster-critical",
      "--set",
      "podAnnotations.team=ml",
      "--set",
      "logLevel=debug",
      "--set",
      "logFormat=json",
      "--set",
      "metrics.service.port=9102",
      "--set",
      "serviceAccount.annotations.owner=ml",
      "--set",
      "rbac.create=false",
    ]);
    const deployment = only(objects, "Deployment");
    const pod = deployment.spec.template.spec;
    expect(deployment.spec.replicas).toBe(3);
    expect(pod.containers[0].image).toBe("registry.example/em:dev");
    expect(pod.containers[0].imagePullPolicy).toBe("Always");
    expect(pod.imagePullSecrets).toEqual([{ name: "regcred" }]);
    expect(pod.nodeSelector).toEqual({ pool: "system" });
    expect(pod.tolerations).toEqual([{ key: "dedicated", operator: "Exists" }]);
    expect(pod.priorityClassName).toBe("system-cluster-critical");
    expect(deployment.spec.template.metadata.annotations.team).toBe("ml");
    expect(
      (pod.containers[0].env as Obj[]).find((e) => e.name === "EXPERTMESH_LOG_LEVEL")?.value,
    ).toBe("debug");
    expect(
      (pod.containers[0].env as Obj[]).find((e) => e.name === "EXPERTMESH_LOG_FORMAT")?.value,
    ).toBe("json");
    expect(only(objects, "Service").spec.ports[0].port).toBe(9102);
    expect(only(objects, "ServiceAccount").metadata.annotations).toEqual({ owner: "ml" });
    // rbac.create=false: no Roles or bindings of any kind.
    for (const kind of ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]) {
      expect(ofKind(objects, kind), kind).toEqual([]);
    }
  });

  describe("helm install into the test control plane", () => {
    const kc = adminKubeConfig();
    const core = kc.makeApiClient(CoreV1Api);
    const apps = kc.makeApiClient(AppsV1Api);
    const rbac = kc.makeApiClient(RbacAuthorizationV1Api);
    const authz = kc.makeApiClient(AuthorizationV1Api);
    const crds = kc.makeApiClient(ApiextensionsV1Api);
    const namespace = uniqueName("em-helm");
    const release = uniqueName("em");
    const fullname = `${release}-expertmesh`;
    let installed = false;

    afterAll(async () => {
      if (installed) {
        await helm([
          "uninstall",
          release,
          "--namespace",
          namespace,
          "--kubeconfig",
          testEnv().kube.kubeconfig,
        ]).catch(() => {});
      }
      await core.deleteNamespace({ name: namespace }).catch(() => {});
    });

    it("installs the CRD, ServiceAccount, ClusterRole, Deployment and Service; pods run", async () => {
      // The CRD is part of the chart: its absence is a failure, never a skip.
      if (!existsSync(chartCrd)) throw new Error(crdMissingMessage());

      const kubeconfig = testEnv().kube.kubeconfig;
      const out = await helm([
        "install",
        release,
        chartDir,
        "--namespace",
        namespace,
        "--create-namespace",
        "--kubeconfig",
        kubeconfig,
        "--wait=false",
        "--set",
        "nats.networkPolicy.enabled=true",
      ]);
      installed = true;
      expect(out).toContain("STATUS: deployed");
      expect(out).toContain("kubectl apply -f examples/tiny.yaml");
      // The notes name the bundled NATS server, and say that outside expertmesh-system the
      // models' default URL does not reach it.
      expect(out).toContain(`nats://nats.${namespace}.svc:4222`);
      expect(out).toContain("This is not the DeepSeekModel default");
      expect(out).toContain(
        "A NetworkPolicy admits to it only the models' pods, the operator's, where the CNI enforces NetworkPolicy.",
      );

      const crd = await waitFor("CRD established", async () => {
        const c = await crds.readCustomResourceDefinition({ name: "deepseekmodels.expertmesh.io" });
        const established = c.status?.conditions?.find((x) => x.type === "Established");
        return established?.status === "True" ? c : undefined;
      });
      expect(crd.spec.group).toBe("expertmesh.io");

      await core.readNamespacedServiceAccount({ name: fullname, namespace });
      const clusterRole = await rbac.readClusterRole({ name: fullname });
      expect(
        clusterRole.rules?.map((r) => ({
          apiGroups: r.apiGroups,
          resources: r.resources,
          verbs: r.verbs,
        })),
      ).toEqual([...OPERATOR_RULES, ...NODE_RULES]);
      await rbac.readClusterRoleBinding({ name: fullname });
      await rbac.readNamespacedRole({ name: `${fullname}-leader-election`, namespace });
      const svc = await core.readNamespacedService({ name: `${fullname}-metrics`, namespace });
      expect(svc.spec?.ports?.[0]?.port).toBe(8080);
      const deployment = await apps.readNamespacedDeployment({ name: fullname, namespace });
      expect(deployment.spec?.replicas).toBe(2);

      const selector = `app.kubernetes.io/name=expertmesh,app.kubernetes.io/instance=${release}`;
      const pods = await waitFor(
        "2 Running operator pods",
        async () => {
          const list = await core.listNamespacedPod({ namespace, labelSelector: selector });
          const running = list.items.filter((p: V1Pod) => p.status?.phase === "Running");
          return running.length === 2 ? running : undefined;
        },
        90_000,
      );
      const nodes = new Set(testEnv().kube.nodeNames);
      for (const pod of pods) {
        expect(nodes.has(pod.spec?.nodeName ?? "")).toBe(true);
        expect(pod.spec?.serviceAccountName).toBe(fullname);
        expect(pod.status?.conditions?.find((c) => c.type === "PodScheduled")?.status).toBe("True");
      }

      // The bundled NATS server: its StatefulSet's pod scheduled and running (kwok runs no
      // image: what runs its configuration is the test above), its Service as models name it.
      const nats = await waitFor(
        "the NATS pod Running",
        async () => {
          const list = await core.listNamespacedPod({
            namespace,
            labelSelector: `app.kubernetes.io/name=nats,app.kubernetes.io/instance=${release}`,
          });
          const running = list.items.filter((p: V1Pod) => p.status?.phase === "Running");
          return running.length === 1 ? running[0] : undefined;
        },
        90_000,
      );
      expect(nats.metadata?.name).toBe(`${fullname}-nats-0`);
      expect(nodes.has(nats.spec?.nodeName ?? "")).toBe(true);
      const natsService = await core.readNamespacedService({ name: "nats", namespace });
      expect(natsService.spec?.ports?.map((p) => p.port)).toEqual([4222, 8222]);
    });

    it("its NATS NetworkPolicy, as the API server keeps it, selects the NATS pod and admits the operator's pods, and no other pod of the release", async () => {
      // The API server validates and stores the policy; no CNI runs here to enforce it, so
      // what is checked is whom its selectors name among the release's real pods.
      expect(installed, "the install test must have installed the release").toBe(true);
      const policy = await kc
        .makeApiClient(NetworkingV1Api)
        .readNamespacedNetworkPolicy({ name: `${fullname}-nats`, namespace });
      const podsOf = async (selector: Obj | undefined) =>
        (
          await core.listNamespacedPod({ namespace, labelSelector: selectorString(selector) })
        ).items.map((p) => p.metadata?.name);
      expect(await podsOf(policy.spec?.podSelector)).toEqual([`${fullname}-nats-0`]);
      const [client, monitor] = policy.spec?.ingress ?? [];
      expect(client?.ports).toEqual([{ port: "client", protocol: "TCP" }]);
      expect(monitor).toEqual({ ports: [{ port: "monitor", protocol: "TCP" }] });
      const [models, operator] = client?._from ?? [];
      expect(models?.namespaceSelector).toEqual({});
      const operatorPods = await core.listNamespacedPod({
        namespace,
        labelSelector: `app.kubernetes.io/name=expertmesh,app.kubernetes.io/instance=${release}`,
      });
      expect(operatorPods.items).toHaveLength(2);
      expect((await podsOf(operator?.podSelector)).sort()).toEqual(
        operatorPods.items.map((p) => p.metadata?.name).sort(),
      );
      // No model runs in the release's namespace: the models' peer names none of its pods.
      expect(await podsOf(models?.podSelector)).toEqual([]);
    });

    it("gives the operator's ServiceAccount what it needs and nothing more", async () => {
      expect(installed, "the install test must have installed the release").toBe(true);
      const user = `system:serviceaccount:${namespace}:${fullname}`;
      const groups = ["system:serviceaccounts", `system:serviceaccounts:${namespace}`];
      const can = async (attrs: {
        verb: string;
        resource: string;
        group?: string;
        subresource?: string;
        namespace?: string;
      }): Promise<boolean> => {
        const review = await authz.createSubjectAccessReview({
          body: { spec: { user, groups, resourceAttributes: attrs } },
        });
        return review.status?.allowed === true;
      };
      const elsewhere = "some-team";
      const allowed = [
        { verb: "watch", resource: "deepseekmodels", group: "expertmesh.io" },
        {
          verb: "patch",
          resource: "deepseekmodels",
          subresource: "status",
          group: "expertmesh.io",
          namespace: elsewhere,
        },
        { verb: "create", resource: "deployments", group: "apps", namespace: elsewhere },
        { verb: "delete", resource: "services", namespace: elsewhere },
        { verb: "get", resource: "secrets", namespace: elsewhere },
        { verb: "create", resource: "events", group: "events.k8s.io", namespace: elsewhere },
        { verb: "create", resource: "poddisruptionbudgets", group: "policy", namespace: elsewhere },
        {
          verb: "delete",
          resource: "networkpolicies",
          group: "networking.k8s.io",
          namespace: elsewhere,
        },
        { verb: "update", resource: "leases", group: "coordination.k8s.io", namespace },
      ];
      const denied = [
        {
          verb: "create",
          resource: "deepseekmodels",
          group: "expertmesh.io",
          namespace: elsewhere,
        },
        {
          verb: "delete",
          resource: "deepseekmodels",
          group: "expertmesh.io",
          namespace: elsewhere,
        },
        { verb: "list", resource: "secrets", namespace: elsewhere },
        { verb: "create", resource: "pods", namespace: elsewhere },
        { verb: "delete", resource: "pods", namespace: elsewhere },
        { verb: "create", resource: "leases", group: "coordination.k8s.io", namespace: elsewhere },
        { verb: "delete", resource: "leases", group: "coordination.k8s.io", namespace },
        { verb: "create", resource: "clusterroles", group: "rbac.authorization.k8s.io" },
        { verb: "get", resource: "nodes" },
      ];
      for (const a of allowed) expect(await can(a), `allowed: ${JSON.stringify(a)}`).toBe(true);
      for (const a of denied) expect(await can(a), `denied: ${JSON.stringify(a)}`).toBe(false);
    });

    it("helm uninstall removes the release's objects, cluster-scoped ones included", async () => {
      expect(installed, "the install test must have installed the release").toBe(true);
      await helm([
        "uninstall",
        release,
        "--namespace",
        namespace,
        "--kubeconfig",
        testEnv().kube.kubeconfig,
      ]);
      installed = false;
      const gone = async (read: () => Promise<unknown>): Promise<boolean> => {
        try {
          await read();
          return false;
        } catch (err) {
          return (err as { code?: number }).code === 404;
        }
      };
      expect(await gone(() => rbac.readClusterRole({ name: fullname }))).toBe(true);
      expect(await gone(() => rbac.readClusterRoleBinding({ name: fullname }))).toBe(true);
      expect(
        await gone(() => core.readNamespacedServiceAccount({ name: fullname, namespace })),
      ).toBe(true);
      await waitFor("Deployment deleted", async () =>
        (await gone(() => apps.readNamespacedDeployment({ name: fullname, namespace })))
          ? true
          : undefined,
      );
      await waitFor("the NATS StatefulSet and Service deleted", async () =>
        (await gone(() =>
          apps.readNamespacedStatefulSet({ name: `${fullname}-nats`, namespace }),
        )) && (await gone(() => core.readNamespacedService({ name: "nats", namespace })))
          ? true
          : undefined,
      );
    });
  });
});
