// The chart's Grafana dashboard (charts/expertmesh/dashboards/expertmesh.json), written from
// this file: `node scripts/grafana-dashboard.ts --write` (test/operator/helm.test.ts fails when
// the JSON is not what this writes, and checks every series a query reads against the
// metrics the processes register).
//
// One model at a time (variables: the Prometheus datasource, the namespace, the model), in
// four rows: the model (conditions, queue depth and replicas from the operator's autoscaler),
// its gateways (requests, tokens, latency quantiles, batch, KV cache, dispatch round trips),
// its shards, and the operator. The gateways' and shards' series are told apart by the pod
// labels the model's PodMonitor copies onto them (podTargetLabels: expertmesh.io/model and
// app.kubernetes.io/component, which Prometheus writes with underscores).
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const DASHBOARD_PATH = fileURLToPath(
  new URL("../charts/expertmesh/dashboards/expertmesh.json", import.meta.url),
);

/** The labels a gateway's or shard's series of the chosen model carry. */
const POD = (component: "gateway" | "shard") =>
  `namespace="$namespace", expertmesh_io_model="$model", app_kubernetes_io_component="${component}"`;
const GW = POD("gateway");
const SHARD = POD("shard");
/** The operator's own series of the chosen model. */
const MODEL = `namespace="$namespace", model="$model"`;
const RATE = "$__rate_interval";
/** Every query's datasource: the dashboard's `datasource` variable. */
// biome-ignore lint/suspicious/noTemplateCurlyInString: Grafana's variable syntax, not JavaScript's
const DATASOURCE = { type: "prometheus", uid: "${datasource}" };

interface Target {
  expr: string;
  legendFormat: string;
}

type Unit = "short" | "s" | "reqps" | "percentunit" | "bool_yes_no" | "none";

let nextId = 1;
const panels: object[] = [];
let y = 0;

function row(title: string): void {
  panels.push({
    type: "row",
    id: nextId++,
    title,
    collapsed: false,
    gridPos: { h: 1, w: 24, x: 0, y },
    panels: [],
  });
  y += 1;
}

/** Panels of one row, left to right, each `w` of 24 columns wide and 8 high. */
function line(
  ...items: {
    title: string;
    unit: Unit;
    targets: Target[];
    description: string;
    stat?: boolean;
    w: number;
  }[]
): void {
  let x = 0;
  for (const p of items) {
    panels.push({
      type: p.stat ? "stat" : "timeseries",
      id: nextId++,
      title: p.title,
      description: p.description,
      datasource: DATASOURCE,
      gridPos: { h: 8, w: p.w, x, y },
      fieldConfig: { defaults: { unit: p.unit }, overrides: [] },
      options: p.stat
        ? {
            reduceOptions: { calcs: ["lastNotNull"], fields: "", values: false },
            colorMode: "value",
          }
        : {
            legend: { displayMode: "list", placement: "bottom", showLegend: true },
            tooltip: { mode: "multi" },
          },
      targets: p.targets.map((t, i) => ({
        datasource: DATASOURCE,
        refId: String.fromCharCode(65 + i),
        expr: t.expr,
        legendFormat: t.legendFormat,
      })),
    });
    x += p.w;
  }
  y += 8;
}

const quantiles = (metric: string, selector: string, by = "") =>
  [0.5, 0.9, 0.99].map((q) => ({
    expr: `histogram_quantile(${q}, sum by (le${by ? `, ${by}` : ""}) (rate(${metric}_bucket{${selector}}[${RATE}])))`,
    legendFormat: `p${q * 100}${by ? ` {{${by}}}` : ""}`,
  }));

row("Model");
line(
  {
    title: "Ready",
    unit: "bool_yes_no",
    stat: true,
    w: 4,
    description: "The model's Ready condition (the operator's expertmesh_model_condition).",
    targets: [
      {
        expr: `max(expertmesh_model_condition{${MODEL}, condition="Ready", status="True"}) or on() vector(0)`,
        legendFormat: "Ready",
      },
    ],
  },
  {
    title: "Queue depth per replica",
    unit: "short",
    w: 10,
    description:
      "What the autoscaler scales each role by: waiting requests per gateway, pending tokens per shard replica, averaged over its window.",
    targets: [{ expr: `expertmesh_queue_depth{${MODEL}}`, legendFormat: "{{role}}" }],
  },
  {
    title: "Replicas",
    unit: "short",
    w: 10,
    description: "Each role's replicas now and what the autoscaler wants.",
    targets: [
      { expr: `expertmesh_autoscaler_current_replicas{${MODEL}}`, legendFormat: "{{role}}" },
      {
        expr: `expertmesh_autoscaler_desired_replicas{${MODEL}}`,
        legendFormat: "{{role}} desired",
      },
    ],
  },
);

row("Gateways");
line(
  {
    title: "Requests",
    unit: "reqps",
    w: 8,
    description:
      "Requests finished, by why they finished, and requests refused (429 on overload, bad input).",
    targets: [
      {
        expr: `sum by (finished_reason) (rate(expertmesh_gateway_request_success_total{${GW}}[${RATE}]))`,
        legendFormat: "{{finished_reason}}",
      },
      {
        expr: `sum by (reason) (rate(expertmesh_gateway_requests_rejected_total{${GW}}[${RATE}]))`,
        legendFormat: "rejected: {{reason}}",
      },
    ],
  },
  {
    title: "Tokens",
    unit: "short",
    w: 8,
    description: "Prompt tokens read and tokens generated per second, over every gateway.",
    targets: [
      {
        expr: `sum(rate(expertmesh_gateway_prompt_tokens_total{${GW}}[${RATE}]))`,
        legendFormat: "prompt",
      },
      {
        expr: `sum(rate(expertmesh_gateway_generation_tokens_total{${GW}}[${RATE}]))`,
        legendFormat: "generated",
      },
    ],
  },
  {
    title: "Batch",
    unit: "short",
    w: 8,
    description: "Sequences in the running batches and waiting for admission, over every gateway.",
    targets: [
      { expr: `sum(expertmesh_gateway_num_requests_running{${GW}})`, legendFormat: "running" },
      { expr: `sum(expertmesh_gateway_num_requests_waiting{${GW}})`, legendFormat: "waiting" },
    ],
  },
);
line(
  {
    title: "Time to first token",
    unit: "s",
    w: 8,
    description: "From a request's arrival to its first token.",
    targets: quantiles("expertmesh_gateway_time_to_first_token_seconds", GW),
  },
  {
    title: "Inter-token latency",
    unit: "s",
    w: 8,
    description: "Between a stream's tokens.",
    targets: quantiles("expertmesh_gateway_inter_token_latency_seconds", GW),
  },
  {
    title: "Request latency",
    unit: "s",
    w: 8,
    description: "From a request's arrival to its last token.",
    targets: quantiles("expertmesh_gateway_e2e_request_latency_seconds", GW),
  },
);
line(
  {
    title: "KV cache in use",
    unit: "percentunit",
    w: 8,
    description:
      "The fraction of each gateway's KV cache blocks in use; near 1, requests wait or are preempted.",
    targets: [{ expr: `expertmesh_gateway_kv_cache_usage_perc{${GW}}`, legendFormat: "{{pod}}" }],
  },
  {
    title: "Prefix cache hits and preemptions",
    unit: "short",
    w: 8,
    description:
      "The fraction of looked-up prompt tokens found in the prefix cache, and sequences preempted per second.",
    targets: [
      {
        expr: `sum(rate(expertmesh_gateway_prefix_cache_hits{${GW}}[${RATE}])) / sum(rate(expertmesh_gateway_prefix_cache_queries{${GW}}[${RATE}]))`,
        legendFormat: "prefix hit rate",
      },
      {
        expr: `sum(rate(expertmesh_gateway_num_preemptions{${GW}}[${RATE}]))`,
        legendFormat: "preemptions/s",
      },
    ],
  },
  {
    title: "Expert dispatch round trip (p99)",
    unit: "s",
    w: 8,
    description: "A layer's frame to a shard and back, by shard: the slow shard shows here first.",
    targets: [
      {
        expr: `histogram_quantile(0.99, sum by (le, shard) (rate(expertmesh_gateway_dispatch_latency_seconds_bucket{${GW}}[${RATE}])))`,
        legendFormat: "shard {{shard}}",
      },
    ],
  },
);

row("Shards");
line(
  {
    title: "Tokens computed",
    unit: "short",
    w: 8,
    description: "Tokens each shard's experts computed per second (every replica).",
    targets: [
      {
        expr: `sum by (shard) (rate(expertmesh_shard_tokens_total{${SHARD}}[${RATE}]))`,
        legendFormat: "shard {{shard}}",
      },
    ],
  },
  {
    title: "Pending frames",
    unit: "short",
    w: 8,
    description: "Dispatch frames waiting or being computed, per shard (every replica).",
    targets: [
      {
        expr: `sum by (shard) (expertmesh_shard_pending_frames{${SHARD}})`,
        legendFormat: "shard {{shard}}",
      },
    ],
  },
  {
    title: "Frames answered with an error",
    unit: "short",
    w: 8,
    description: "Per second, per shard; the shard's log says why.",
    targets: [
      {
        expr: `sum by (shard) (rate(expertmesh_shard_errors_total{${SHARD}}[${RATE}]))`,
        legendFormat: "shard {{shard}}",
      },
    ],
  },
);
line({
  title: "Expert load imbalance",
  unit: "none",
  w: 24,
  description:
    "The busiest shard's load over the mean (1 is even); with spec.experts.rebalance the operator re-plans above its threshold.",
  targets: [{ expr: `expertmesh_expert_load_imbalance{${MODEL}}`, legendFormat: "max / mean" }],
});

row("Operator");
line(
  {
    title: "Reconciles",
    unit: "short",
    w: 8,
    description: "Reconciles per second by result, over every model.",
    targets: [
      {
        expr: `sum by (result) (rate(expertmesh_operator_reconcile_total[${RATE}]))`,
        legendFormat: "{{result}}",
      },
    ],
  },
  {
    title: "Reconcile duration (p99)",
    unit: "s",
    w: 8,
    description: "How long one reconcile takes.",
    targets: [
      {
        expr: `histogram_quantile(0.99, sum by (le) (rate(expertmesh_operator_reconcile_duration_seconds_bucket[${RATE}])))`,
        legendFormat: "p99",
      },
    ],
  },
  {
    title: "Leader and work queue",
    unit: "short",
    w: 8,
    description: "Operator replicas leading (1 when healthy) and models waiting to be reconciled.",
    targets: [
      { expr: "sum(expertmesh_operator_is_leader)", legendFormat: "leaders" },
      { expr: "sum(expertmesh_operator_workqueue_depth)", legendFormat: "queued" },
    ],
  },
);

const variable = (name: string, label: string, query: string) => ({
  name,
  label,
  type: "query",
  datasource: DATASOURCE,
  query: { query, refId: `${name}-values` },
  definition: query,
  refresh: 2,
  sort: 1,
  includeAll: false,
  multi: false,
});

/** The dashboard, as Grafana's JSON model (schemaVersion 39). */
export function grafanaDashboard(): object {
  return {
    uid: "expertmesh",
    title: "expertmesh: DeepSeekModel",
    description:
      "One DeepSeekModel's gateways and shards (scraped through spec.monitoring.podMonitor) and the operator (chart metrics.serviceMonitor).",
    tags: ["expertmesh", "llm", "inference"],
    editable: true,
    schemaVersion: 39,
    time: { from: "now-1h", to: "now" },
    refresh: "30s",
    graphTooltip: 1,
    templating: {
      list: [
        { name: "datasource", label: "Prometheus", type: "datasource", query: "prometheus" },
        variable("namespace", "Namespace", "label_values(expertmesh_model_condition, namespace)"),
        variable(
          "model",
          "Model",
          'label_values(expertmesh_model_condition{namespace="$namespace"}, model)',
        ),
      ],
    },
    panels,
  };
}

/** The file's text: the JSON model, two-space indented, with a final newline. */
export function dashboardText(): string {
  return `${JSON.stringify(grafanaDashboard(), null, 2)}\n`;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (process.argv.includes("--write")) {
    writeFileSync(DASHBOARD_PATH, dashboardText());
    process.stdout.write(`wrote ${DASHBOARD_PATH}\n`);
  } else process.stdout.write(dashboardText());
}
