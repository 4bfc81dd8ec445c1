import { describe, expect, it } from "vitest";
import {
  architectureOf,
  gatewayArgs,
  parseManifest,
  servedModelName,
} from "../../src/api/manifest.ts";
import { type ModelArchitecture, presetNames, resolveArchitecture } from "../../src/api/presets.ts";
import { isLabelKey, isResourceName } from "../../src/api/rules.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof ExpertMeshError ? err.code : `not ExpertMeshError: ${err}`;
  }
  return undefined;
}

describe("presets", () => {
  it.each([
    ["deepseek-v2-lite", 27, 1, 64, 6, 2, 2048, 1408],
    ["deepseek-v2", 60, 1, 160, 6, 2, 5120, 1536],
    ["deepseek-v3", 61, 3, 256, 8, 1, 7168, 2048],
    ["deepseek-r1", 61, 3, 256, 8, 1, 7168, 2048],
    ["tiny-v2", 3, 1, 8, 2, 2, 64, 32],
    ["tiny-v3", 4, 1, 16, 4, 1, 64, 32],
  ])(
    "%s",
    (name, numLayers, firstDenseLayers, routedExperts, expertsPerToken, sharedExperts, hiddenSize, moeIntermediateSize) => {
      expect(resolveArchitecture(name)).toEqual({
        numLayers,
        firstDenseLayers,
        routedExperts,
        expertsPerToken,
        sharedExperts,
        hiddenSize,
        moeIntermediateSize,
      });
    },
  );

  it("lists presets and rejects unknown names", () => {
    expect(presetNames()).toHaveLength(7);
    expect(codeOf(() => resolveArchitecture("deepseek-v4"))).toBe("EM_ARCH_UNKNOWN_PRESET");
    expect(codeOf(() => resolveArchitecture("toString"))).toBe("EM_ARCH_UNKNOWN_PRESET");
  });

  const tiny = resolveArchitecture("tiny-v3");
  it.each<[string, Partial<Record<keyof ModelArchitecture, unknown>>]>([
    ["zero layers", { numLayers: 0 }],
    ["fractional experts", { routedExperts: 2.5 }],
    ["string hidden size", { hiddenSize: "64" }],
    ["missing moe size", { moeIntermediateSize: undefined }],
    ["negative shared experts", { sharedExperts: -1 }],
    ["no MoE layer", { firstDenseLayers: 4 }],
    ["top-k over experts", { expertsPerToken: 17 }],
    ["100M layers (the planner ran out of memory)", { numLayers: 100_000_000 }],
    ["more than 4096 experts", { routedExperts: 5000 }],
  ])("rejects explicit figures: %s", (_name, patch) => {
    const arch = { ...tiny, ...patch } as unknown as ModelArchitecture;
    expect(codeOf(() => resolveArchitecture(arch))).toBe("EM_ARCH_INVALID");
  });

  it("accepts valid explicit figures", () => {
    expect(resolveArchitecture({ ...tiny, sharedExperts: 0 })).toEqual({
      ...tiny,
      sharedExperts: 0,
    });
  });
});

describe("isLabelKey (spec.monitoring.podMonitor.labels)", () => {
  it.each([
    ["release", true],
    ["app.kubernetes.io/part-of", true],
    ["a_b-c.d", true],
    ["A", true],
    ["n".repeat(63), true],
    ["n".repeat(64), false],
    [`${"p".repeat(63)}.${"q".repeat(63)}.${"r".repeat(63)}.${"s".repeat(61)}/x`, true],
    [`${"p".repeat(63)}.${"q".repeat(63)}.${"r".repeat(63)}.${"s".repeat(62)}/x`, false],
    ["my release", false],
    ["", false],
    ["-release", false],
    ["release-", false],
    ["Example.com/x", false],
    ["example.com/", false],
    ["/x", false],
    ["a/b/c", false],
    ["example..com/x", false],
  ])("%j: %s", (key, ok) => {
    expect(isLabelKey(key)).toBe(ok);
  });

  /** A manifest of the tiny model with `gateway` (YAML flow) as its spec.gateway. */
  const m = (gateway: string) => `apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: w } } }
  gateway: ${gateway}
`;

  it("refuses a shared Hub download with hf download's image, naming the rule", () => {
    const hf = (extra: string) => `apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { huggingFace: { repo: a/b, sharedStorageClassName: nfs${extra} } } }
`;
    expect(() => parseManifest(hf(", downloaderImage: python:3.12-slim"), "m.yaml")).toThrow(
      /m\.yaml: spec\.model\.source: model\.source\.huggingFace\.sharedStorageClassName needs the model's own image/,
    );
    expect(parseManifest(hf("")).spec.model.source.huggingFace?.sharedStorageClassName).toBe("nfs");
  });

  it.each([
    [
      "{ batch: { sharedClaim: a, sharedStorageClassName: b } }",
      /gateway\.batch: give sharedClaim \(a claim of yours\) or sharedStorageClassName/,
    ],
    [
      "{ kvCache: { diskBytes: 1048576, diskSharedClaim: a, diskSharedStorageClassName: b } }",
      /gateway\.kvCache: give diskSharedClaim \(a claim of yours\) or diskSharedStorageClassName/,
    ],
    [
      "{ kvCache: { diskSharedStorageClassName: b } }",
      /diskSharedClaim or diskSharedStorageClassName \(a disk tier the gateways share\) needs gateway\.kvCache\.diskBytes/,
    ],
    [
      "{ kvCache: { diskBytes: 1048576, remoteBytes: 1048576, diskSharedStorageClassName: b } }",
      /gateway\.kvCache\.remoteBytes and a shared disk tier/,
    ],
  ])("refuses shared claims asked for two ways, or without what they need: %s", (gateway, rule) => {
    expect(() => parseManifest(m(gateway), "m.yaml")).toThrow(rule);
  });

  it("refuses gateway.disaggregation without the NATS tier its blocks go through, naming the rule", () => {
    expect(() => parseManifest(m("{ disaggregation: {} }"), "m.yaml")).toThrow(
      /m\.yaml: spec\.gateway: gateway\.disaggregation needs gateway\.kvCache\.remoteBytes/,
    );
    const ok = parseManifest(m("{ disaggregation: {}, kvCache: { remoteBytes: 1048576 } }"));
    expect(ok.spec.gateway.disaggregation).toEqual({
      replicas: 1,
      minReplicas: 1,
      maxReplicas: 4,
      minPromptTokens: 512,
      timeoutSeconds: 60,
    });
    expect(gatewayArgs(ok).slice(-3)).toEqual([
      "--disaggregation-mode=decode",
      "--disaggregation-min-tokens=512",
      "--disaggregation-timeout=60",
    ]);
    expect(gatewayArgs(ok, "prefill").at(-1)).toBe("--disaggregation-mode=prefill");
    expect(() =>
      parseManifest(m("{ disaggregation: { timeoutSeconds: 0 }, kvCache: { remoteBytes: 1 } }")),
    ).toThrow(ExpertMeshError);
    expect(() =>
      parseManifest(
        m("{ disaggregation: { minReplicas: 3, maxReplicas: 2 }, kvCache: { remoteBytes: 1 } }"),
        "m.yaml",
      ),
    ).toThrow(/gateway\.disaggregation\.minReplicas must not exceed its maxReplicas/);
  });

  it("gateway.tracing becomes the gateways' OTLP flags (both roles); a URL that is not http(s) is refused", () => {
    const all = parseManifest(m("{ tracing: { otlpEndpoint: 'http://otel:4318' } }"));
    expect(all.spec.gateway.tracing).toEqual({
      otlpEndpoint: "http://otel:4318",
      protocol: "http/protobuf",
      sampleRatio: 1,
    });
    expect(gatewayArgs(all).filter((a) => a.startsWith("--otlp"))).toEqual([
      "--otlp-traces-endpoint=http://otel:4318",
    ]);
    const some = parseManifest(
      m(
        "{ tracing: { otlpEndpoint: 'https://otel/v1/traces', sampleRatio: 0.25 }, disaggregation: {}, kvCache: { remoteBytes: 1 } }",
      ),
    );
    for (const role of ["gateway", "prefill"] as const)
      expect(gatewayArgs(some, role).filter((a) => a.startsWith("--otlp"))).toEqual([
        "--otlp-traces-endpoint=https://otel/v1/traces",
        "--otlp-traces-sample-ratio=0.25",
      ]);
    expect(gatewayArgs(parseManifest(m("{}"))).some((a) => a.startsWith("--otlp"))).toBe(false);
    const grpc = parseManifest(
      m("{ tracing: { otlpEndpoint: 'https://otel:4317', protocol: grpc } }"),
    );
    expect(gatewayArgs(grpc).filter((a) => a.startsWith("--otlp"))).toEqual([
      "--otlp-traces-endpoint=https://otel:4317",
      "--otlp-traces-protocol=grpc",
    ]);
    for (const bad of [
      "{ tracing: { otlpEndpoint: 'grpc://otel:4317' } }",
      "{ tracing: { otlpEndpoint: 'http://otel:4317', protocol: http/json } }",
      "{ tracing: { otlpEndpoint: 'http://otel:4317/v1/traces', protocol: grpc } }",
      "{ tracing: { otlpEndpoint: 'http://otel:4318', sampleRatio: 1.5 } }",
      "{ tracing: {} }",
    ])
      expect(() => parseManifest(m(bad), "m.yaml")).toThrow(/spec\.gateway\.tracing/);
  });

  it("refuses a manifest with a bad key, naming the rule", () => {
    expect(() =>
      parseManifest(
        `apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: w } } }
  monitoring: { podMonitor: { enabled: true, labels: { "my release": kps } } }
`,
        "m.yaml",
      ),
    ).toThrow(
      /m\.yaml: spec\.monitoring\.podMonitor: monitoring\.podMonitor\.labels keys must be label keys/,
    );
  });
});

describe("isResourceName (spec.gateway.resources, spec.experts.resources)", () => {
  it.each([
    ["cpu", true],
    ["memory", true],
    ["ephemeral-storage", true],
    ["hugepages-2Mi", true],
    ["hugepages-1Gi", true],
    ["nvidia.com/gpu", true],
    ["example.com/fpga-x", true],
    ["gpu", false],
    ["blockSize", false],
    ["kubernetes.io/gpu", false],
    ["requests.example.com/x", false],
    ["Example.com/x", false],
    ["hugepages-", false],
    ["", false],
  ])("%j: %s", (name, ok) => {
    expect(isResourceName(name)).toBe(ok);
  });
});

describe("spec.<role>.gpuResource", () => {
  const withResource = (role: "gateway" | "experts", value: string) =>
    parseManifest(`apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights } } }
  ${role}: { gpuResource: ${JSON.stringify(value)} }
`);
  it.each([
    ["nvidia.com/gpu", null],
    ["nvidia.com/mig-3g.71gb", null],
    ["nvidia.com/gpu.shared", null],
    ["example.com/H200_x", null],
    ["gpu", /gpuResource/],
    ["nvidia.com/", /gpuResource/],
    ["NVIDIA.com/gpu", /gpuResource/],
    ["nvidia.com/-gpu", /gpuResource/],
    ["kubernetes.io/gpu", /gpuResource must be a device plugin's resource/],
    ["gpu.kubernetes.io/h200", /gpuResource must be a device plugin's resource/],
    ["notkubernetes.io/gpu", null],
  ])("%j", (value, refused) => {
    for (const role of ["gateway", "experts"] as const) {
      if (refused) expect(() => withResource(role, value)).toThrow(refused);
      else expect(withResource(role, value).spec[role].gpuResource).toBe(value);
    }
  });
});

describe("spec.env and spec.podMetadata", () => {
  const withSpec = (yaml: string) =>
    parseManifest(`apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights } } }
${yaml}
`);
  it.each([
    ["env: [{ name: HF_ENDPOINT, value: https://mirror }, { name: _x1, value: '' }]", null],
    ["env: [{ name: EM_API_KEYS, value: k }]", /env names must not start with EM_/],
    [
      "env: [{ name: A, value: '1' }, { name: A, value: '2' }]",
      /spec\.env\[1\]: Duplicate value: \{"name":"A"\}/,
    ],
    ["env: [{ name: HF_TOKEN, value: t }]", /nor be one the operator sets \(POD_NAME, /],
    ["env: [{ name: POD_NAME, value: x }]", /env names must not/],
    ["env: [{ name: 1X, value: x }]", /name/],
    ["env: [{ name: A-B, value: x }]", /name/],
    [
      "env: [{ name: HTTPS_PROXY, valueFrom: { secretKeyRef: { name: proxy, key: url } } }, { name: B, valueFrom: { configMapKeyRef: { name: cm, key: b, optional: true } } }]",
      null,
    ],
    ["env: [{ name: A }]", /each env entry takes a value or a valueFrom, not both nor neither/],
    [
      "env: [{ name: A, value: x, valueFrom: { secretKeyRef: { name: s, key: k } } }]",
      /each env entry takes a value or a valueFrom/,
    ],
    ["env: [{ name: A, valueFrom: {} }]", /one of secretKeyRef, configMapKeyRef/],
    [
      "env: [{ name: A, valueFrom: { secretKeyRef: { name: s, key: k }, configMapKeyRef: { name: c, key: k } } }]",
      /one of secretKeyRef, configMapKeyRef/,
    ],
    ["env: [{ name: A, valueFrom: { secretKeyRef: { name: s } } }]", /key/],
    ["podMetadata: { labels: { team: a, example.com/cost-center: '42' } }", null],
    [
      "podMetadata: { labels: { expertmesh.io/model: x } }",
      /podMetadata\.labels keys must be label keys/,
    ],
    [
      "podMetadata: { labels: { app.kubernetes.io/component: x } }",
      /not under expertmesh\.io\/ nor one the operator sets/,
    ],
    ["podMetadata: { labels: { 'bad key': x } }", /podMetadata\.labels keys/],
    ["podMetadata: { labels: { team: 'not a value' } }", /labels/],
    [
      "podMetadata: { annotations: { sidecar.istio.io/inject: 'false', note: 'any text: at all' } }",
      null,
    ],
    [
      "podMetadata: { annotations: { expertmesh.io/plan-shape: x } }",
      /podMetadata\.annotations keys must be annotation keys/,
    ],
  ])("%s", (yaml, refused) => {
    if (refused) expect(() => withSpec(`  ${yaml}`)).toThrow(refused);
    else expect(() => withSpec(`  ${yaml}`)).not.toThrow();
  });
});

describe("manifests as the API server reads them", () => {
  const base = `apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: w } } }
`;
  it("takes a null field as unset (the API server prunes it before defaulting)", () => {
    const m = parseManifest(
      `${base}  gateway: { limits: { maxModelLen: ~ }, resources: ~ }\n  experts: { shards: null }\n`,
    );
    expect(m.spec.gateway.limits.maxModelLen).toBeUndefined();
    expect(m.spec.gateway.resources).toBeUndefined();
    expect(m.spec.experts.shards).toBe(1);
  });
  it("ignores a status (the status subresource's)", () => {
    const m = parseManifest(`${base}status: Unknown\n`);
    expect(m.spec.model.preset).toBe("tiny-v3");
  });
  it("refuses unknown metadata fields, as kubectl's strict validation does", () => {
    expect(() =>
      parseManifest(base.replace("{ name: m }", "{ name: m, image: x }"), "m.yaml"),
    ).toThrow(/m\.yaml: metadata\.image: unknown field/);
  });
  it("takes RuntimeClass and PriorityClass names that are DNS subdomains", () => {
    const m = parseManifest(
      `${base}  scheduling: { runtimeClassName: nvidia.cdi, priorityClassName: inference-high }\n`,
    );
    expect(m.spec.scheduling).toMatchObject({
      runtimeClassName: "nvidia.cdi",
      priorityClassName: "inference-high",
    });
  });
  it("takes an affinity of every kind (node, pod, anti-pod; required and preferred)", () => {
    const affinity = {
      nodeAffinity: {
        requiredDuringSchedulingIgnoredDuringExecution: {
          nodeSelectorTerms: [
            {
              matchExpressions: [
                { key: "nvidia.com/gpu.product", operator: "In", values: ["NVIDIA-H200"] },
                { key: "nvidia.com/gpu.count", operator: "Gt", values: ["3"] },
                { key: "example.com/drain", operator: "DoesNotExist" },
              ],
            },
            { matchFields: [{ key: "metadata.name", operator: "NotIn", values: ["node-7"] }] },
          ],
        },
        preferredDuringSchedulingIgnoredDuringExecution: [
          {
            weight: 100,
            preference: { matchExpressions: [{ key: "zone", operator: "Exists" }] },
          },
        ],
      },
      podAffinity: {
        preferredDuringSchedulingIgnoredDuringExecution: [
          {
            weight: 50,
            podAffinityTerm: {
              topologyKey: "topology.kubernetes.io/zone",
              labelSelector: { matchLabels: { "app.kubernetes.io/name": "nats" } },
              namespaces: ["nats"],
            },
          },
        ],
      },
      podAntiAffinity: {
        requiredDuringSchedulingIgnoredDuringExecution: [
          {
            topologyKey: "kubernetes.io/hostname",
            labelSelector: {
              matchExpressions: [{ key: "app", operator: "In", values: ["expertmesh"] }],
            },
            matchLabelKeys: ["pod-template-hash"],
          },
        ],
      },
    };
    const m = parseManifest(`${base}  scheduling: { affinity: ${JSON.stringify(affinity)} }\n`);
    expect(m.spec.scheduling.affinity).toEqual(affinity);
  });
  it.each([
    ["a quantity that is not one", "  gateway: { resources: { requests: { memory: lots } } }\n"],
    ["a negative quantity", "  gateway: { resources: { limits: { cpu: -1 } } }\n"],
    ["a resource that is not one", "  experts: { resources: { requests: { blockSize: 4 } } }\n"],
    ["a node selector key with a space", '  scheduling: { nodeSelector: { "gpu type": h200 } }\n'],
    [
      "a node selector value that is no label value",
      '  scheduling: { nodeSelector: { gpu: "[a-z]+" } }\n',
    ],
    [
      "a toleration key with a space",
      '  scheduling: { tolerations: [{ key: "a b", operator: Exists }] }\n',
    ],
    // (found by the admission fuzzer, seed 5817: the API server refuses these in a PodSpec)
    [
      "a toleration with no key, not Exists",
      "  scheduling: { tolerations: [{ effect: NoSchedule }] }\n",
    ],
    [
      "a toleration with an empty key, Equal",
      '  scheduling: { tolerations: [{ key: "", operator: Equal, value: x }] }\n',
    ],
    [
      "a toleration Exists with a value",
      "  scheduling: { tolerations: [{ key: gpu, operator: Exists, value: x }] }\n",
    ],
    [
      "tolerationSeconds without NoExecute",
      "  scheduling: { tolerations: [{ key: gpu, operator: Exists, tolerationSeconds: 30 }] }\n",
    ],
    // Affinity as ValidateAffinity checks it (typed: a field misspelt is refused too).
    [
      "a node affinity requirement In without values",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: gpu, operator: In }] }] } } } }\n",
    ],
    [
      "a node affinity requirement Exists with values",
      "  scheduling: { affinity: { nodeAffinity: { preferredDuringSchedulingIgnoredDuringExecution: [{ weight: 1, preference: { matchExpressions: [{ key: gpu, operator: Exists, values: [a] }] } }] } } }\n",
    ],
    [
      "a node affinity requirement Gt not an integer",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: gpu-count, operator: Gt, values: [two] }] }] } } } }\n",
    ],
    [
      "a node affinity requirement Lt with two values",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: gpu-count, operator: Lt, values: ['1', '2'] }] }] } } } }\n",
    ],
    [
      "a node affinity key with a space",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: 'gpu type', operator: Exists }] }] } } } }\n",
    ],
    [
      "a matchFields requirement not on metadata.name",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchFields: [{ key: spec.unschedulable, operator: In, values: ['true'] }] }] } } } }\n",
    ],
    [
      "no node selector terms",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [] } } } }\n",
    ],
    [
      "a preferred weight of 0",
      "  scheduling: { affinity: { nodeAffinity: { preferredDuringSchedulingIgnoredDuringExecution: [{ weight: 0, preference: {} }] } } }\n",
    ],
    [
      "a pod anti-affinity term without a topologyKey",
      "  scheduling: { affinity: { podAntiAffinity: { requiredDuringSchedulingIgnoredDuringExecution: [{ labelSelector: { matchLabels: { app: x } } }] } } }\n",
    ],
    [
      "a pod affinity label selector NotIn without values",
      "  scheduling: { affinity: { podAffinity: { preferredDuringSchedulingIgnoredDuringExecution: [{ weight: 10, podAffinityTerm: { topologyKey: kubernetes.io/hostname, labelSelector: { matchExpressions: [{ key: app, operator: NotIn }] } } }] } } }\n",
    ],
    [
      "a pod affinity topologyKey with a space",
      "  scheduling: { affinity: { podAffinity: { requiredDuringSchedulingIgnoredDuringExecution: [{ topologyKey: 'a b' }] } } }\n",
    ],
    [
      "a node affinity value that is no label value",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: gpu, operator: In, values: ['a b'] }] }] } } } }\n",
    ],
    [
      "a node affinity Gt with a sign (no label value)",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: gpus, operator: Gt, values: ['-3'] }] }] } } } }\n",
    ],
    [
      "a matchFields node name in capitals",
      "  scheduling: { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchFields: [{ key: metadata.name, operator: In, values: [Node_1] }] }] } } } }\n",
    ],
    [
      "a pod affinity namespace that is no DNS label",
      "  scheduling: { affinity: { podAffinity: { requiredDuringSchedulingIgnoredDuringExecution: [{ topologyKey: zone, namespaces: [Bad_NS] }] } } }\n",
    ],
    [
      "matchLabelKeys without a labelSelector",
      "  scheduling: { affinity: { podAntiAffinity: { requiredDuringSchedulingIgnoredDuringExecution: [{ topologyKey: zone, matchLabelKeys: [pod-template-hash] }] } } }\n",
    ],
    [
      "a key in matchLabelKeys and mismatchLabelKeys",
      "  scheduling: { affinity: { podAntiAffinity: { requiredDuringSchedulingIgnoredDuringExecution: [{ topologyKey: zone, labelSelector: {}, matchLabelKeys: [a], mismatchLabelKeys: [a] }] } } }\n",
    ],
    [
      "a topology spread label selector DoesNotExist with values",
      "  scheduling: { topologySpreadConstraints: [{ maxSkew: 1, topologyKey: zone, whenUnsatisfiable: DoNotSchedule, labelSelector: { matchExpressions: [{ key: app, operator: DoesNotExist, values: [x] }] } }] }\n",
    ],
    [
      "a network policy peer with an ipBlock and a podSelector",
      "  networkPolicy: { enabled: true, metricsFrom: [{ ipBlock: { cidr: 10.0.0.0/8 }, podSelector: {} }] }\n",
    ],
    [
      "a network policy ipBlock without a prefix length",
      "  networkPolicy: { enabled: true, gatewayFrom: [{ ipBlock: { cidr: 10.0.0.0 } }] }\n",
    ],
    [
      "a network policy ipBlock except that is no range",
      "  networkPolicy: { enabled: true, gatewayFrom: [{ ipBlock: { cidr: 10.0.0.0/8, except: [10.1.0.0/33] } }] }\n",
    ],
    [
      "a network policy peer selector In without values",
      "  networkPolicy: { enabled: true, egress: { enabled: true, extraRules: [{ ports: [{ port: 443 }], to: [{ namespaceSelector: { matchExpressions: [{ key: team, operator: In }] } }] }] } }\n",
    ],
    ["a RuntimeClass name in capitals", "  scheduling: { runtimeClassName: NVIDIA }\n"],
    ["a PriorityClass name with an underscore", "  scheduling: { priorityClassName: high_prio }\n"],
  ])("refuses %s (the workloads' own validation would, later)", (_what, extra) => {
    expect(() => parseManifest(base + extra)).toThrow(ExpertMeshError);
  });
  // Found by the admission fuzzer (seed 5808): the API server refused the first two, and
  // admitted the third only to refuse every Deployment made of it.
  it.each([
    [
      "an integer past 64 bits",
      "  gateway: { batch: { storageBytes: 1e+308 } }\n",
      /spec\.gateway\.batch\.storageBytes: Expected an integer of 64 bits at most/,
    ],
    [
      "gateway replicas past an int32 (the scale subresource's)",
      "  gateway: { replicas: 2147483648 }\n",
      /spec\.gateway\.replicas: .*2147483647/,
    ],
    [
      "a weights cache size that is no quantity",
      "",
      /spec\.model\.source\.huggingFace\.cacheSize/,
      "  model: { preset: tiny-v3, source: { huggingFace: { repo: a/b, cacheSize: lots } } }\n",
    ],
  ])("refuses %s", (_what, extra, message, model = "") => {
    const doc = model ? base.replace(/ {2}model: .*\n/, model) : base;
    expect(() => parseManifest(doc + extra)).toThrow(message);
  });
  it("takes the largest counts the API server keeps", () => {
    const m = parseManifest(
      `${base}  gateway: { replicas: 2147483647, batch: { storageBytes: 9007199254740992 } }\n`,
    );
    expect([m.spec.gateway.replicas, m.spec.gateway.batch?.storageBytes]).toEqual([
      2147483647,
      2 ** 53,
    ]);
  });
});

describe("DeepSeekModel manifest", () => {
  const good = `
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: tiny }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights } } }
  experts: { shards: 4 }
`;
  it("gives the gateway (pods and `up` alike) every serving setting of spec.gateway", () => {
    const m = parseManifest(
      `${good}  gateway:
    limits: { maxQueueDepth: 7, maxBatchTokens: 99, maxRunning: 5, maxRequestBytes: 4096, maxModelLen: 200 }
    kvCache: { bytes: 1048576, dtype: bfloat16, blockSize: 8 }
    prefixCaching: false
    schedulingPolicy: priority
    logRequests: true
    speculative: { numTokens: 2 }
`,
    );
    expect(gatewayArgs(m)).toEqual([
      "--served-model-name=tiny",
      "--max-queue-depth=7",
      "--max-batch-tokens=99",
      "--max-running=5",
      "--max-request-bytes=4096",
      "--max-model-len=200",
      "--kv-cache-bytes=1048576",
      "--kv-cache-dtype=bfloat16",
      "--block-size=8",
      "--no-prefix-caching",
      "--scheduling-policy=priority",
      "--log-requests",
      "--reasoning-parser=none",
      "--tool-call-parser=deepseek-v3",
      "--speculative-tokens=2",
      "--prompt-lookup-max=4",
      "--prompt-lookup-min=2",
    ]);
  });

  it("sampling defaults: the model's file unless none, the fields set as an override", () => {
    const args = (sampling: string) =>
      gatewayArgs(parseManifest(`${good}  gateway: { sampling: ${sampling} }\n`)).filter((a) =>
        a.includes("generation-config"),
      );
    const table: [string, string[]][] = [
      ["{}", []],
      ["{ generationConfig: auto }", []],
      ["{ generationConfig: none }", ["--generation-config=none"]],
      [
        "{ temperature: 0.3, minP: 0.05 }",
        ['--override-generation-config={"temperature":0.3,"min_p":0.05}'],
      ],
      [
        "{ generationConfig: none, topP: 0.9, topK: 20, repetitionPenalty: 1.1 }",
        [
          "--generation-config=none",
          '--override-generation-config={"top_p":0.9,"top_k":20,"repetition_penalty":1.1}',
        ],
      ],
    ];
    for (const [sampling, want] of table) expect(args(sampling), sampling).toEqual(want);
    for (const bad of ["{ temperature: 3 }", "{ topP: 0 }", "{ generationConfig: vllm }"])
      expect(() => parseManifest(`${good}  gateway: { sampling: ${bad} }\n`), bad).toThrow(
        /spec\.gateway\.sampling/,
      );
  });

  it("MTP drafts: the gateway gets --speculative-method=mtp and its draft length (default 1)", () => {
    for (const [spec, tokens] of [
      ["{ method: mtp }", 1],
      ["{ method: mtp, numTokens: 3 }", 3],
    ] as const) {
      const m = parseManifest(`${good}  gateway: { speculative: ${spec} }\n`);
      expect(gatewayArgs(m).filter((a) => a.startsWith("--spec"))).toEqual([
        "--speculative-method=mtp",
        `--speculative-tokens=${tokens}`,
      ]);
    }
  });

  it("takes a KV cache that holds the context: smaller rows or a shorter maxModelLen fit", () => {
    // tiny-v3: 4 layers of 32 + 8 per token; 75000 bytes of bf16 rows in blocks of 4 hold
    // floor(75000 / (4 * 80 * 4)) * 4 = 232 tokens.
    const kv = "kvCache: { bytes: 75000, dtype: bfloat16, blockSize: 4 }";
    expect(() => parseManifest(`${good}  gateway: { ${kv} }\n`)).toThrow(/kvCache cannot hold/);
    expect(() =>
      parseManifest(`${good}  gateway: { limits: { maxModelLen: 232 }, ${kv} }\n`),
    ).not.toThrow();
    expect(() =>
      parseManifest(`${good}  gateway: { limits: { maxModelLen: 233 }, ${kv} }\n`),
    ).toThrow(/kvCache cannot hold/);
    expect(() =>
      parseManifest(`${good}  gateway: { ${kv.replace("bfloat16", "fp8")} }\n`),
    ).not.toThrow();
    // MTP drafts keep the MTP layer's rows too: 5 layers, floor(75000 / (4 * 80 * 5)) * 4 = 184.
    const mtp = "speculative: { method: mtp }";
    expect(() =>
      parseManifest(`${good}  gateway: { ${mtp}, limits: { maxModelLen: 184 }, ${kv} }\n`),
    ).not.toThrow();
    expect(() =>
      parseManifest(`${good}  gateway: { ${mtp}, limits: { maxModelLen: 185 }, ${kv} }\n`),
    ).toThrow(/kvCache cannot hold/);
    // DeepSeek-V3 at its 163840-token context: 21.4 GiB of float32 rows, 6.1 GiB of fp8.
    const v3 = good.replace("tiny-v3", "deepseek-v3");
    expect(() => parseManifest(v3)).toThrow(/kvCache cannot hold/);
    expect(() =>
      parseManifest(`${v3}  gateway: { kvCache: { bytes: 6600000000, dtype: fp8 } }\n`),
    ).not.toThrow();
    expect(() =>
      parseManifest(`${v3}  gateway: { kvCache: { bytes: 6500000000, dtype: fp8 } }\n`),
    ).toThrow(/kvCache cannot hold/);
  });

  it("checks the KV cache of explicit figures when they give the MLA dims and the context", () => {
    // 4 layers of 32 + 8 values: 4 * 80 = 320 bytes per token of bf16 rows; 75000 bytes in
    // blocks of 4 hold floor(75000 / 1280) * 4 = 232 tokens (as the tiny-v3 case above).
    const arch = (mla: string) =>
      good.replace(
        "preset: tiny-v3",
        `architecture: { numLayers: 4, firstDenseLayers: 1, routedExperts: 8, expertsPerToken: 2, hiddenSize: 64, moeIntermediateSize: 32${mla} }`,
      );
    const kv = "kvCache: { bytes: 75000, dtype: bfloat16, blockSize: 4 }";
    const withMla = arch(", kvLoraRank: 32, qkRopeHeadDim: 8");
    expect(() =>
      parseManifest(`${withMla}  gateway: { limits: { maxModelLen: 232 }, ${kv} }\n`),
    ).not.toThrow();
    expect(() =>
      parseManifest(`${withMla}  gateway: { limits: { maxModelLen: 233 }, ${kv} }\n`),
    ).toThrow(/kvCache cannot hold .* of model.architecture/);
    const mtp = "speculative: { method: mtp }";
    expect(() =>
      parseManifest(`${withMla}  gateway: { ${mtp}, limits: { maxModelLen: 184 }, ${kv} }\n`),
    ).not.toThrow();
    expect(() =>
      parseManifest(`${withMla}  gateway: { ${mtp}, limits: { maxModelLen: 185 }, ${kv} }\n`),
    ).toThrow(/kvCache cannot hold .* of model.architecture/);
    // fp8 rows: 32 codes + one f32 scale + 8 bf16 = 52 bytes, 208 per token: 360 tokens.
    const fp8 = kv.replace("bfloat16", "fp8");
    expect(() =>
      parseManifest(`${withMla}  gateway: { limits: { maxModelLen: 360 }, ${fp8} }\n`),
    ).not.toThrow();
    expect(() =>
      parseManifest(`${withMla}  gateway: { limits: { maxModelLen: 361 }, ${fp8} }\n`),
    ).toThrow(/kvCache cannot hold/);
    // Without the MLA dims, or without maxModelLen (no context to check against): the
    // gateway checks at start instead.
    expect(() =>
      parseManifest(`${arch("")}  gateway: { limits: { maxModelLen: 100000 }, ${kv} }\n`),
    ).not.toThrow();
    expect(() => parseManifest(`${withMla}  gateway: { ${kv} }\n`)).not.toThrow();
  });

  it("applies the API server's defaults", () => {
    const m = parseManifest(good);
    expect(m.metadata).toEqual({ name: "tiny", namespace: "default" });
    expect(servedModelName(m)).toBe("tiny");
    expect(m.spec.experts).toEqual({
      shards: 4,
      redundantExperts: 0,
      replicas: { min: 1, max: 1 },
      gpusPerShard: 1,
      gpuResource: "nvidia.com/gpu",
      weightsRollout: "Rolling",
      blueGreenWaitSeconds: 600,
      rollingUpdate: { maxSurge: 1, maxUnavailable: 0, progressDeadlineSeconds: 1800 },
      rebalance: {
        enabled: false,
        threshold: 1.25,
        minImprovement: 0.05,
        windowSeconds: 300,
        minTokens: 10000,
        cooldownSeconds: 600,
      },
    });
    expect(m.spec.model.source.pvc).toEqual({ claimName: "weights", path: "" });
    expect(m.spec.gateway.ports).toEqual({ http: 8000, grpc: 8001, metrics: 9090 });
    expect(m.spec.autoscaling.mode).toBe("operator");
    expect(architectureOf(m).routedExperts).toBe(16);
  });

  it("reads explicit architecture figures", () => {
    const text = good.replace(
      "preset: tiny-v3,",
      "architecture: { numLayers: 3, firstDenseLayers: 1, routedExperts: 8, expertsPerToken: 2, sharedExperts: 2, hiddenSize: 64, moeIntermediateSize: 32 },",
    );
    expect(architectureOf(parseManifest(text))).toEqual(resolveArchitecture("tiny-v2"));
  });

  it.each([
    ["not YAML", "a: [1", "EM_MANIFEST_PARSE"],
    ["not a mapping", "- 1", "EM_MANIFEST_INVALID"],
    ["wrong kind", good.replace("DeepSeekModel", "Deployment"), "EM_MANIFEST_INVALID"],
    ["wrong apiVersion", good.replace("v1alpha1", "v1"), "EM_MANIFEST_INVALID"],
    ["bad name", good.replace("name: tiny", "name: Tiny_1"), "EM_MANIFEST_INVALID"],
    ["unknown preset", good.replace("tiny-v3", "huge"), "EM_MANIFEST_INVALID"],
    [
      "preset and architecture",
      good.replace("preset: tiny-v3", "preset: tiny-v3, architecture: {}"),
      "EM_MANIFEST_INVALID",
    ],
    ["no model", good.replace(/ {2}model: .*\n/, ""), "EM_MANIFEST_INVALID"],
    [
      "no source",
      good.replace(", source: { pvc: { claimName: weights } }", ""),
      "EM_MANIFEST_INVALID",
    ],
    [
      "two sources",
      good.replace(
        "{ pvc: { claimName: weights } }",
        "{ pvc: { claimName: w }, huggingFace: { repo: a/b } }",
      ),
      "EM_MANIFEST_INVALID",
    ],
    ["more shards than experts", good.replace("shards: 4", "shards: 17"), "EM_MANIFEST_INVALID"],
    [
      "uneven redundant slots",
      good.replace("shards: 4", "shards: 4, redundantExperts: 3"),
      "EM_MANIFEST_INVALID",
    ],
    [
      "replicas min over max",
      good.replace("shards: 4", "shards: 4, replicas: { min: 3, max: 2 }"),
      "EM_MANIFEST_INVALID",
    ],
    [
      "a shard rollout that may neither surge nor stop a pod",
      good.replace("shards: 4", "shards: 4, rollingUpdate: { maxSurge: 0 }"),
      "EM_MANIFEST_INVALID",
    ],
    [
      "unknown dtype",
      good.replace("preset: tiny-v3,", "preset: tiny-v3, dtype: int3,"),
      "EM_MANIFEST_INVALID",
    ],
    ["zero shards", good.replace("shards: 4", "shards: 0"), "EM_MANIFEST_INVALID"],
    ["string shards", good.replace("shards: 4", "shards: four"), "EM_MANIFEST_INVALID"],
    [
      "negative redundant",
      good.replace("shards: 4", "shards: 4, redundantExperts: -1"),
      "EM_MANIFEST_INVALID",
    ],
    [
      "speculative lookup min over max",
      `${good}  gateway: { speculative: { numTokens: 4, promptLookupMin: 5 } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "speculative without numTokens",
      `${good}  gateway: { speculative: { method: ngram } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "speculative method eagle",
      `${good}  gateway: { speculative: { method: eagle, numTokens: 2 } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "speculative numTokens over 15",
      `${good}  gateway: { speculative: { numTokens: 16 } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "scheduling policy lifo",
      `${good}  gateway: { schedulingPolicy: lifo }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "priority aging under fcfs",
      `${good}  gateway: { priorityAgingSeconds: 30 }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "negative priority aging",
      `${good}  gateway: { schedulingPolicy: priority, priorityAgingSeconds: -1 }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "kv cache dtype fp8_e5m2",
      `${good}  gateway: { kvCache: { dtype: fp8_e5m2 } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "kv cache that cannot hold the tiny model's 256-token context",
      `${good}  gateway: { kvCache: { bytes: 100000 } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    [
      "kv cache that cannot hold maxModelLen",
      `${good}  gateway: { limits: { maxModelLen: 240 }, kvCache: { bytes: 75000, dtype: bfloat16, blockSize: 4 } }\n`,
      "EM_MANIFEST_INVALID",
    ],
    ["kv cache of 0 bytes", `${good}  gateway: { kvCache: { bytes: 0 } }\n`, "EM_MANIFEST_INVALID"],
    [
      "batch-invariant with GPUs (gateway.gpus defaults to 1)",
      good.replace("preset: tiny-v3,", "preset: tiny-v3, batchInvariant: true,"),
      "EM_MANIFEST_INVALID",
    ],
    [
      "batch-invariant with GPU shards",
      `${good.replace("preset: tiny-v3,", "preset: tiny-v3, batchInvariant: true,").replace("shards: 4", "shards: 4, gpusPerShard: 1")}  gateway: { gpus: 0 }\n`,
      "EM_MANIFEST_INVALID",
    ],
  ])("rejects %s", (_name, text, code) => {
    expect(codeOf(() => parseManifest(text))).toBe(code);
  });

  it("takes batchInvariant with CPU roles only, and says why not otherwise", () => {
    const inv = good.replace("preset: tiny-v3,", "preset: tiny-v3, batchInvariant: true,");
    const cpu = `${inv.replace("shards: 4", "shards: 4, gpusPerShard: 0")}  gateway: { gpus: 0 }\n`;
    expect(parseManifest(cpu).spec.model.batchInvariant).toBe(true);
    expect(parseManifest(good).spec.model.batchInvariant).toBe(false);
    expect(() => parseManifest(inv, "m.yaml")).toThrow(
      "m.yaml: spec: model.batchInvariant needs gateway.gpus and experts.gpusPerShard to be 0: only the CPU kernels are batch-invariant",
    );
  });

  it("names the field in the message", () => {
    expect(() => parseManifest(good.replace("shards: 4", "shards: 0"), "m.yaml")).toThrow(
      /m\.yaml: spec\.experts\.shards: Expected integer to be greater or equal to 1 \(got 0\)/,
    );
    expect(() => parseManifest(good.replace("shards: 4", "shards: 17"), "m.yaml")).toThrow(
      "m.yaml: spec: experts.shards must not exceed the model's routed experts (a shard would hold none)",
    );
  });

  it("takes the one DeepSeekModel of a file, refuses two, and refuses a huge file", () => {
    const volume = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: { name: weights }\n";
    expect(parseManifest(`${volume}---${good}`).spec.experts.shards).toBe(4);
    expect(() => parseManifest(`${good}---${good}`, "m.yaml")).toThrow(
      "m.yaml: (document): holds 2 DeepSeekModels: give one per file",
    );
    const labels = Array.from({ length: 20_000 }, (_, i) => `    l${i}: v`).join("\n");
    const huge = good.replace(
      "metadata: { name: tiny }",
      `metadata:\n  name: tiny\n  labels:\n${labels}`,
    );
    expect(codeOf(() => parseManifest(huge))).toBe("EM_MANIFEST_PARSE");
  });

  it.each([
    [
      "spec.experts.replica",
      good.replace("shards: 4", "shards: 4, replica: { max: 3 }"),
      "(did you mean 'replicas'?); spec.experts has shards, redundantExperts, replicas,",
    ],
    ["spec.gateways", `${good}  gateways: { gpus: 0 }\n`, "(did you mean 'gateway'?)"],
    [
      "spec.weights",
      `${good}  weights: x\n`,
      "unknown field; spec has servedModelName, model, image,",
    ],
    [
      "spec.experts.rebalance.Enabled",
      `${good.replace("shards: 4", "shards: 4, rebalance: { Enabled: true }")}`,
      "(did you mean 'enabled'?)",
    ],
    [
      "spec.scheduling.tolerations.1.efect",
      `${good}  scheduling: { tolerations: [{ key: a }, { key: b, efect: NoSchedule }] }\n`,
      "(did you mean 'effect'?)",
    ],
    [
      "spec.scheduling.affinity.nodeAffinity.requiredDuringScheduling",
      `${good}  scheduling: { affinity: { nodeAffinity: { requiredDuringScheduling: { nodeSelectorTerms: [] } } } }\n`,
      "unknown field",
    ],
    ["status.phase", `${good}status: { phase: Ready }\n`, "unknown field"],
    ["extra", `${good}extra: 1\n`, "the document has apiVersion, kind, metadata, spec, status"],
  ])("refuses the unknown field %s, as kubectl's strict validation does", (field, text, msg) => {
    expect(() => parseManifest(text, "m.yaml")).toThrow(`m.yaml: ${field}: unknown field`);
    expect(() => parseManifest(text, "m.yaml")).toThrow(msg);
  });

  it("keeps unknown fields where Kubernetes does (metadata, maps)", () => {
    const m = parseManifest(
      good.replace(
        "metadata: { name: tiny }",
        "metadata: { name: tiny, creationTimestamp: '2026-11-29T00:00:00Z', labels: { app: x } }",
      ) + "  gateway: { resources: { requests: { cpu: 4, example.com/fpga: 1 } } }\n",
    );
    expect(m.metadata.labels).toEqual({ app: "x" });
    expect(m.spec.gateway.resources?.requests).toEqual({ cpu: 4, "example.com/fpga": 1 });
  });

  it("lists an enum's values when a field has none of them", () => {
    expect(() =>
      parseManifest(good.replace("preset: tiny-v3,", "preset: tiny-v3, dtype: int3,"), "m.yaml"),
    ).toThrow(/m\.yaml: spec\.model\.dtype: must be one of [a-z0-9]+, [a-z0-9]+.* \(got "int3"\)/);
  });

  it.each([
    ["spec.experts", good.replace("experts: { shards: 4 }", "experts: [{ shards: 4 }]")],
    ["spec.gateway", `${good}  gateway: [{ gpus: 0 }]\n`],
    ["spec.gateway.ports", `${good}  gateway: { ports: [9999] }\n`],
    ["spec", good.replace(/spec:[\s\S]*/, "spec: [1]\n")],
  ])("rejects a list where %s must be an object (defaults would swallow it)", (field, text) => {
    expect(() => parseManifest(text, "m.yaml")).toThrow(
      `m.yaml: ${field}: Expected object (got a list)`,
    );
  });
});
