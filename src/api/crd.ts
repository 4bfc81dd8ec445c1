// Generates the DeepSeekModel CustomResourceDefinition from the TypeBox schema in
// schema.ts: `expertmesh crd --write` refreshes crds/ and the chart's copy, and a unit test
// fails when either differs from what this produces.
import type { TSchema } from "@sinclair/typebox";
import { stringify } from "yaml";
import {
  API_VERSION,
  GROUP,
  KIND,
  PLURAL,
  SHORT_NAMES,
  SpecSchema,
  StatusSchema,
  VERSION,
} from "./schema.ts";

/** Where the generated CRD lives, relative to the repository root. */
export const CRD_FILES = [
  "crds/deepseekmodels.expertmesh.io.yaml",
  "charts/expertmesh/crds/deepseekmodels.expertmesh.io.yaml",
];

type Json = Record<string, any>;

/**
 * Turns TypeBox's JSON Schema into a Kubernetes structural schema: literal unions become
 * enums, records become additionalProperties, int-or-string unions get the Kubernetes flag,
 * numeric exclusive bounds use the OpenAPI v3.0 boolean form, and fields with a default
 * are not listed as required.
 */
export function toStructural(schema: TSchema | Json): Json {
  const s: Json = JSON.parse(JSON.stringify(schema));
  return convert(s);
}

function convert(s: Json): Json {
  const out: Json = {};
  const variants: Json[] | undefined = s["anyOf"];
  if (variants) {
    if (variants.every((v) => "const" in v)) {
      out["type"] = typeof variants[0]!["const"] === "number" ? "integer" : "string";
      out["enum"] = variants.map((v) => v["const"]);
    } else if (
      variants.length === 2 &&
      variants.some((v) => v["type"] === "integer") &&
      variants.some((v) => v["type"] === "string")
    ) {
      out["x-kubernetes-int-or-string"] = true;
      // The variants' own checks at the top, as controller-gen writes resource.Quantity's:
      // each applies to the values of its type only.
      for (const v of variants)
        for (const k of ["pattern", "maxLength", "minimum"]) if (k in v) out[k] = v[k];
    } else {
      throw new Error(`unsupported union in CRD schema: ${JSON.stringify(s).slice(0, 200)}`);
    }
  }
  for (const [key, value] of Object.entries(s)) {
    switch (key) {
      case "anyOf":
        break;
      case "const":
        out["type"] = typeof value === "number" ? "integer" : "string";
        out["enum"] = [value];
        break;
      case "properties": {
        const props = Object.entries(value as Json);
        if (props.length)
          out["properties"] = Object.fromEntries(props.map(([k, v]) => [k, convert(v)]));
        break;
      }
      case "patternProperties": {
        const [only] = Object.values(value as Json);
        out["additionalProperties"] = convert(only as Json);
        break;
      }
      case "items":
        out["items"] = convert(value as Json);
        break;
      case "additionalProperties":
        if (typeof value === "object") out["additionalProperties"] = convert(value as Json);
        break;
      case "exclusiveMinimum":
        out["minimum"] = value;
        out["exclusiveMinimum"] = true;
        break;
      case "exclusiveMaximum":
        out["maximum"] = value;
        out["exclusiveMaximum"] = true;
        break;
      case "required":
        break; // below, once properties are converted
      default:
        out[key] = value;
    }
  }
  // A field with its own default need not be required: the API server fills it in. Listing
  // it would also make a parent's `default: {}` invalid (defaults are checked unexpanded).
  const required = (s["required"] as string[] | undefined)?.filter(
    (k) => out["properties"]?.[k]?.["default"] === undefined,
  );
  if (required?.length) out["required"] = required;
  return out;
}

/** The CRD object (apiextensions.k8s.io/v1). */
export function deepSeekModelCrd(): Json {
  return {
    apiVersion: "apiextensions.k8s.io/v1",
    kind: "CustomResourceDefinition",
    metadata: { name: `${PLURAL}.${GROUP}`, labels: { "app.kubernetes.io/part-of": "expertmesh" } },
    spec: {
      group: GROUP,
      names: {
        kind: KIND,
        listKind: `${KIND}List`,
        plural: PLURAL,
        singular: KIND.toLowerCase(),
        shortNames: SHORT_NAMES,
        categories: ["expertmesh"],
      },
      scope: "Namespaced",
      versions: [
        {
          name: VERSION,
          served: true,
          storage: true,
          // scale: `kubectl scale dsm NAME --replicas N`, or an HPA / KEDA aimed at the model,
          // sets the gateway's replicas (spec.gateway.replicas).
          subresources: {
            status: {},
            scale: {
              specReplicasPath: ".spec.gateway.replicas",
              statusReplicasPath: ".status.gateway.desiredReplicas",
              labelSelectorPath: ".status.gateway.selector",
            },
          },
          additionalPrinterColumns: [
            {
              name: "Ready",
              type: "string",
              jsonPath: '.status.conditions[?(@.type=="Ready")].status',
              description: "All pods ready and the plan rolled out",
            },
            {
              name: "Reason",
              type: "string",
              jsonPath: '.status.conditions[?(@.type=="Ready")].reason',
              description:
                "Why Ready is what it is: AllReplicasReady, ReplicasNotReady (rolling out), or the problem that keeps the model from serving (Unschedulable, ContainerCrashing, ...)",
            },
            {
              name: "Gateways",
              type: "string",
              jsonPath: ".status.gateways",
              description: "Ready/desired gateway pods",
            },
            {
              name: "Shards",
              type: "string",
              jsonPath: ".status.shardPods",
              description: "Ready/desired shard pods",
            },
            {
              name: "Queue",
              type: "number",
              jsonPath: ".status.queueDepth",
              description: "Requests waiting at the gateways",
            },
            {
              name: "Plan",
              type: "integer",
              jsonPath: ".status.planVersion",
              description: "Placement plan version",
              priority: 1,
            },
            { name: "Age", type: "date", jsonPath: ".metadata.creationTimestamp" },
          ],
          schema: {
            openAPIV3Schema: {
              type: "object",
              description: `${KIND} serves a DeepSeek-style Mixture-of-Experts model: gateway pods (OpenAI-compatible HTTP, KServe v2 gRPC) and expert-shard pods that exchange tokens over NATS.`,
              required: ["spec"],
              properties: {
                apiVersion: { type: "string", description: `${API_VERSION}` },
                kind: { type: "string", description: KIND },
                metadata: { type: "object" },
                spec: toStructural(SpecSchema),
                status: toStructural(StatusSchema),
              },
            },
          },
        },
      ],
    },
  };
}

/** The CRD as the YAML file committed in crds/. */
export function deepSeekModelCrdYaml(): string {
  return `# Generated by \`expertmesh crd --write\` from src/api/schema.ts. Do not edit by hand.\n${stringify(deepSeekModelCrd(), { lineWidth: 0 })}`;
}
