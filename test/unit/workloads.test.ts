import type { V1Deployment, V1NetworkPolicy } from "@kubernetes/client-node";
import { describe, expect, it } from "vitest";
import { architectureOf, parseManifest, prefixCacheBucket } from "../../src/api/manifest.ts";
import { gatewayWeightBytes, POD_MEMORY_OVERHEAD, shardExpertBytes } from "../../src/api/memory.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import {
  claimNoSmaller,
  desiredObjects,
  networkPolicies,
  specReplicas,
} from "../../src/operator/workloads.ts";

function manifest(extra = "") {
  return parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns, uid: u-1 }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  experts: { shards: 4, gpusPerShard: 2, replicas: { min: 2, max: 3 } }
  scheduling:
    nodeSelector: { nvidia.com/gpu.product: NVIDIA-H200 }
    tolerations: [{ key: nvidia.com/gpu, operator: Exists, effect: NoSchedule }]
    priorityClassName: inference
    runtimeClassName: nvidia
${extra}`);
}

function objects(extra = "") {
  const m = manifest(extra);
  const plan = planPlacement({
    architecture: architectureOf(m),
    numShards: m.spec.experts.shards,
    redundantExperts: 0,
  });
  return desiredObjects(m, plan, specReplicas(m, plan));
}

describe("desiredObjects", () => {
  it("adds a PodMonitor last when asked, scraping every pod's metrics port", () => {
    expect(objects().some((o) => o.kind === "PodMonitor")).toBe(false);
    expect(objects("  monitoring: { podMonitor: { enabled: false } }").at(-1)?.kind).toBe(
      "Service",
    );
    const all = objects(
      "  monitoring: { podMonitor: { enabled: true, interval: 15s, labels: { release: kps, expertmesh.io/model: other } } }",
    );
    const pm = all.at(-1)!;
    expect(pm).toMatchObject({
      apiVersion: "monitoring.coreos.com/v1",
      kind: "PodMonitor",
      metadata: {
        name: "m",
        namespace: "ns",
        // The user's labels, but never over the ones that say who owns it.
        labels: { release: "kps", "expertmesh.io/model": "m" },
        ownerReferences: [{ kind: "DeepSeekModel", name: "m", uid: "u-1", controller: true }],
      },
      spec: {
        selector: {
          matchLabels: {
            "expertmesh.io/model": "m",
            "app.kubernetes.io/managed-by": "expertmesh-operator",
          },
        },
        podTargetLabels: ["expertmesh.io/model", "app.kubernetes.io/component"],
        podMetricsEndpoints: [
          { port: "metrics", path: "/metrics", honorLabels: true, interval: "15s" },
        ],
      },
    });
    // Its selector finds the gateway's and every shard's pods, which all name a metrics port.
    const sel = (pm as { spec: { selector: { matchLabels: Record<string, string> } } }).spec
      .selector.matchLabels;
    const deployments = all.filter((o) => o.kind === "Deployment") as {
      spec: {
        template: {
          metadata: { labels: Record<string, string> };
          spec: { containers: { ports?: { name: string }[] }[] };
        };
      };
    }[];
    expect(deployments).toHaveLength(5);
    for (const d of deployments) {
      expect(d.spec.template.metadata.labels).toMatchObject(sel);
      expect(d.spec.template.spec.containers[0]!.ports!.map((p) => p.name)).toContain("metrics");
    }
    // Prometheus durations, units in falling order (the Prometheus Operator's own pattern).
    for (const ok of ["1m30s", "1d", "0", "500ms"])
      expect(
        objects(`  monitoring: { podMonitor: { enabled: true, interval: "${ok}" } }`).at(-1),
      ).toMatchObject({ spec: { podMetricsEndpoints: [{ interval: ok }] } });
    for (const bad of ["soon", "30s1m", "1s1s", "15"])
      expect(
        () => objects(`  monitoring: { podMonitor: { enabled: true, interval: "${bad}" } }`),
        bad,
      ).toThrow(/interval/);
    expect(() =>
      objects(`  monitoring: { podMonitor: { enabled: true, labels: { team: "a b" } } }`),
    ).toThrow(/labels/);
  });

  it("makes the plan first, shards before the gateway, and a PDB per Deployment", () => {
    const names = objects().map((o) => `${o.kind}/${o.metadata?.name}`);
    expect(names).toEqual([
      "ConfigMap/m-plan",
      "Deployment/m-shard-0",
      "PodDisruptionBudget/m-shard-0",
      "Deployment/m-shard-1",
      "PodDisruptionBudget/m-shard-1",
      "Deployment/m-shard-2",
      "PodDisruptionBudget/m-shard-2",
      "Deployment/m-shard-3",
      "PodDisruptionBudget/m-shard-3",
      "Deployment/m-gateway",
      "PodDisruptionBudget/m-gateway",
      "Service/m",
    ]);
    for (const o of objects()) {
      expect(o.metadata?.ownerReferences).toEqual([
        {
          apiVersion: "expertmesh.io/v1alpha1",
          kind: "DeepSeekModel",
          name: "m",
          uid: "u-1",
          controller: true,
          blockOwnerDeletion: true,
        },
      ]);
      expect(o.metadata?.namespace).toBe("ns");
    }
  });

  it("a chat template: in the plan ConfigMap, named to the gateway, its hash on the gateway's pods", () => {
    const gatewayOf = (all: ReturnType<typeof objects>) =>
      all.find((o) => o.metadata?.name === "m-gateway") as any;
    const plain = objects();
    expect((plain.find((o) => o.kind === "ConfigMap") as any).data["chat_template.jinja"]).toBe(
      undefined,
    );
    expect(gatewayOf(plain).spec.template.spec.containers[0].args.join(" ")).not.toContain(
      "--chat-template",
    );
    expect(
      gatewayOf(plain).spec.template.metadata.annotations["expertmesh.io/chat-template"],
    ).toBeUndefined();
    const withTemplate = (t: string) =>
      objects(`  gateway:\n    chatTemplate: ${JSON.stringify(t)}\n`);
    const a = withTemplate("{{ messages[0].content }}");
    expect((a.find((o) => o.kind === "ConfigMap") as any).data["chat_template.jinja"]).toBe(
      "{{ messages[0].content }}",
    );
    const gw = gatewayOf(a).spec.template;
    expect(gw.spec.containers[0].args).toContain(
      "--chat-template=/etc/expertmesh/chat_template.jinja",
    );
    // The plan ConfigMap is mounted at /etc/expertmesh.
    expect(gw.spec.containers[0].volumeMounts).toContainEqual({
      name: "plan",
      mountPath: "/etc/expertmesh",
      readOnly: true,
    });
    const hash = gw.metadata.annotations["expertmesh.io/chat-template"];
    expect(hash).toMatch(/^[0-9a-f]{16}$/);
    // Another template, another hash (the gateways roll); shards do not carry it.
    const b = withTemplate("{{ messages[-1].content }}");
    expect(gatewayOf(b).spec.template.metadata.annotations["expertmesh.io/chat-template"]).not.toBe(
      hash,
    );
    const shard = a.find((o) => o.metadata?.name === "m-shard-0") as any;
    expect(shard.spec.template.metadata.annotations["expertmesh.io/chat-template"]).toBeUndefined();
  });

  it("spec.env's Secret and ConfigMap values: their hash on every role's pods (a new value rolls them all); none without", () => {
    const m = manifest("  gateway: { kvCache: { remoteBytes: 1048576 }, disaggregation: {} }");
    const plan = planPlacement({
      architecture: architectureOf(m),
      numShards: m.spec.experts.shards,
      redundantExperts: 0,
      version: 1,
    });
    const deployments = (hash?: string) =>
      desiredObjects(m, plan, specReplicas(m, plan), hash).filter(
        (o): o is V1Deployment => o.kind === "Deployment",
      );
    const annotated = deployments("0123456789abcdef");
    expect(annotated.length).toBeGreaterThanOrEqual(3); // shards, gateway, prefill
    for (const d of annotated)
      expect(d.spec!.template.metadata!.annotations!["expertmesh.io/env-sources"]).toBe(
        "0123456789abcdef",
      );
    for (const d of deployments())
      expect(d.spec!.template.metadata!.annotations!["expertmesh.io/env-sources"]).toBeUndefined();
  });

  it("spreads each role's pods by its own labels unless a constraint names a labelSelector", () => {
    expect(
      (objects().find((o) => o.kind === "Deployment") as any).spec.template.spec
        .topologySpreadConstraints,
    ).toBeUndefined();
    const all = objects(`    topologySpreadConstraints:
      - { maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway }
      - maxSkew: 2
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector: { matchLabels: { team: a } }
        matchLabelKeys: [pod-template-hash]
`);
    const spread = (name: string) =>
      (all.find((o) => o.metadata?.name === name) as any).spec.template.spec
        .topologySpreadConstraints;
    const byRole = (component: string) => ({
      maxSkew: 1,
      topologyKey: "topology.kubernetes.io/zone",
      whenUnsatisfiable: "ScheduleAnyway",
      labelSelector: {
        matchLabels: { "expertmesh.io/model": "m", "app.kubernetes.io/component": component },
      },
    });
    const given = {
      maxSkew: 2,
      topologyKey: "kubernetes.io/hostname",
      whenUnsatisfiable: "DoNotSchedule",
      labelSelector: { matchLabels: { team: "a" } },
      matchLabelKeys: ["pod-template-hash"],
    };
    expect(spread("m-gateway")).toEqual([byRole("gateway"), given]);
    // Every shard's Deployment counts all the model's shards (one replica each, usually).
    for (const k of [0, 3]) expect(spread(`m-shard-${k}`)).toEqual([byRole("shard"), given]);
    // The pods carry the labels the default selector names.
    const labels = (all.find((o) => o.metadata?.name === "m-shard-3") as any).spec.template.metadata
      .labels;
    expect(labels).toMatchObject(byRole("shard").labelSelector.matchLabels);
  });

  it("spec.logFormat json: every gateway and shard container logs JSON lines", () => {
    const args = (all: ReturnType<typeof objects>) =>
      all
        .filter((o) => o.kind === "Deployment")
        .map((d) => [d.metadata!.name, (d as any).spec.template.spec.containers[0].args]);
    for (const [, a] of args(objects())) expect(a).not.toContain("--log-format=json");
    const json = args(
      objects(
        "  logFormat: json\n  gateway: { kvCache: { remoteBytes: 1048576 }, disaggregation: {} }",
      ),
    );
    expect(json.map(([name]) => name)).toEqual(
      expect.arrayContaining(["m-gateway", "m-prefill", "m-shard-0", "m-shard-3"]),
    );
    for (const [name, a] of json) expect(a, name as string).toContain("--log-format=json");
  });

  it("spec.nats: each Secret mounted read-only where its flag points; with tls, a nats:// URL given as tls://", () => {
    const pods = (extra: string) =>
      objects(extra)
        .filter((o) => o.kind === "Deployment")
        .map((d) => (d as any).spec.template.spec);
    const natsOf = (pod: any) => ({
      args: pod.containers[0].args.filter((a: string) => a.startsWith("--nats")),
      volumes: pod.volumes.filter((v: any) => v.name.startsWith("nats")),
      mounts: pod.containers[0].volumeMounts.filter((v: any) => v.name.startsWith("nats")),
    });
    const url = "nats://nats.infra.svc:4222";
    const cases: [string, ReturnType<typeof natsOf>][] = [
      [`  nats: { url: "${url}" }`, { args: [`--nats=${url}`], volumes: [], mounts: [] }],
      [
        `  nats: { url: "${url}", credentialsSecret: { name: creds } }`,
        {
          args: [`--nats=${url}`, "--nats-creds=/var/run/expertmesh/nats/nats.creds"],
          volumes: [{ name: "nats-creds", secret: { secretName: "creds" } }],
          mounts: [{ name: "nats-creds", mountPath: "/var/run/expertmesh/nats", readOnly: true }],
        },
      ],
      [
        `  nats: { url: "${url}", userSecret: { name: bob } }`,
        {
          args: [
            `--nats=${url}`,
            "--nats-user-file=/var/run/expertmesh/nats-auth/user/username",
            "--nats-password-file=/var/run/expertmesh/nats-auth/user/password",
          ],
          volumes: [{ name: "nats-user", secret: { secretName: "bob" } }],
          mounts: [
            { name: "nats-user", mountPath: "/var/run/expertmesh/nats-auth/user", readOnly: true },
          ],
        },
      ],
      [
        `  nats: { url: "${url}", tokenSecret: { name: tok } }`,
        {
          args: [`--nats=${url}`, "--nats-token-file=/var/run/expertmesh/nats-auth/token/token"],
          volumes: [{ name: "nats-token", secret: { secretName: "tok" } }],
          mounts: [
            {
              name: "nats-token",
              mountPath: "/var/run/expertmesh/nats-auth/token",
              readOnly: true,
            },
          ],
        },
      ],
      // An identity and TLS together.
      [
        `  nats: { url: "${url}", nkeySecret: { name: nk, key: user.nk }, tls: { caSecret: { name: ca } } }`,
        {
          args: [
            "--nats=tls://nats.infra.svc:4222",
            "--nats-nkey=/var/run/expertmesh/nats-auth/nkey/user.nk",
            "--nats-tls-ca=/var/run/expertmesh/nats-tls/ca/ca.crt",
          ],
          volumes: [
            { name: "nats-nkey", secret: { secretName: "nk" } },
            { name: "nats-tls-ca", secret: { secretName: "ca" } },
          ],
          mounts: [
            { name: "nats-nkey", mountPath: "/var/run/expertmesh/nats-auth/nkey", readOnly: true },
            { name: "nats-tls-ca", mountPath: "/var/run/expertmesh/nats-tls/ca", readOnly: true },
          ],
        },
      ],
      // TLS with the public roots: no files, but TLS required.
      [
        `  nats: { url: "${url}", tls: {} }`,
        { args: ["--nats=tls://nats.infra.svc:4222"], volumes: [], mounts: [] },
      ],
      [
        `  nats: { url: "tls://nats:4222", tls: { caSecret: { name: ca, key: root.pem }, clientSecret: { name: client } } }`,
        {
          args: [
            "--nats=tls://nats:4222",
            "--nats-tls-ca=/var/run/expertmesh/nats-tls/ca/root.pem",
            "--nats-tls-cert=/var/run/expertmesh/nats-tls/client/tls.crt",
            "--nats-tls-key=/var/run/expertmesh/nats-tls/client/tls.key",
          ],
          volumes: [
            { name: "nats-tls-ca", secret: { secretName: "ca" } },
            { name: "nats-tls-client", secret: { secretName: "client" } },
          ],
          mounts: [
            { name: "nats-tls-ca", mountPath: "/var/run/expertmesh/nats-tls/ca", readOnly: true },
            {
              name: "nats-tls-client",
              mountPath: "/var/run/expertmesh/nats-tls/client",
              readOnly: true,
            },
          ],
        },
      ],
    ];
    for (const [extra, want] of cases) {
      const all = pods(
        `${extra}\n  gateway: { kvCache: { remoteBytes: 1048576 }, disaggregation: {} }`,
      );
      expect(all).toHaveLength(6); // gateway, prefill, 4 shards
      for (const pod of all) expect(natsOf(pod), extra).toEqual(want);
    }
  });

  it("requests GPUs, passes scheduling through and mounts the weights read-only", () => {
    const shard = objects().find((o) => o.metadata?.name === "m-shard-2") as any;
    const pod = shard.spec.template.spec;
    expect(shard.spec.replicas).toBe(2);
    expect(pod.containers[0].resources.limits["nvidia.com/gpu"]).toBe("2");
    expect(pod.containers[0].args).toContain("--shard=2");
    expect(pod.containers[0].args).toContain("--model=/models/tiny");
    expect(pod.containers[0].args).toContain("--device=cuda:0");
    expect(pod.nodeSelector).toEqual({ "nvidia.com/gpu.product": "NVIDIA-H200" });
    expect(pod.tolerations).toEqual([
      { key: "nvidia.com/gpu", operator: "Exists", effect: "NoSchedule" },
    ]);
    expect(pod.priorityClassName).toBe("inference");
    expect(pod.runtimeClassName).toBe("nvidia");
    const gateway = objects().find((o) => o.metadata?.name === "m-gateway") as any;
    expect(gateway.spec.template.spec.runtimeClassName).toBe("nvidia");
    expect(pod.volumes[0]).toEqual({
      name: "model",
      persistentVolumeClaim: { claimName: "weights", readOnly: true },
    });
    expect(pod.securityContext).toEqual({
      runAsNonRoot: true,
      runAsUser: 10001,
      runAsGroup: 10001,
      fsGroup: 10001,
      // (not every file of a shared claim's thousands chowned at each pod's start)
      fsGroupChangePolicy: "OnRootMismatch",
      seccompProfile: { type: "RuntimeDefault" },
    });
  });

  it("requests each role's GPUs as its gpuResource (MIG profiles, shared GPUs); nvidia.com/gpu by default", () => {
    const byName = (all: ReturnType<typeof objects>, name: string) =>
      (all.find((o) => o.metadata?.name === name) as any).spec.template.spec.containers[0]
        .resources;
    const cases: [string, string, string][] = [
      ["", "nvidia.com/gpu", "nvidia.com/gpu"],
      [
        "  gateway: { gpuResource: nvidia.com/gpu.shared }",
        "nvidia.com/gpu.shared",
        "nvidia.com/gpu",
      ],
      [
        "  gateway: { gpus: 2, gpuResource: nvidia.com/mig-3g.71gb, kvCache: { remoteBytes: 1048576 }, disaggregation: {} }",
        "nvidia.com/mig-3g.71gb",
        "nvidia.com/gpu",
      ],
    ];
    for (const [extra, gateway, shard] of cases) {
      const all = objects(extra);
      const gw = manifest(extra).spec.gateway.gpus;
      for (const name of [
        "m-gateway",
        ...(extra.includes("disaggregation") ? ["m-prefill"] : []),
      ]) {
        const r = byName(all, name);
        expect(r.limits, `${name} ${extra}`).toEqual({ ...r.limits, [gateway]: String(gw) });
        expect(r.requests[gateway], `${name} ${extra}`).toBe(String(gw));
        if (gateway !== "nvidia.com/gpu") expect(r.limits).not.toHaveProperty("nvidia.com/gpu");
      }
      expect(byName(all, "m-shard-0").limits[shard], extra).toBe("2");
    }
    // The shards' own resource, and a CRD too old to default the field (the operator's own).
    const mig = manifest();
    mig.spec.experts.gpuResource = "nvidia.com/mig-7g.141gb";
    const plan = planPlacement({ architecture: architectureOf(mig), numShards: 4 });
    const shard = (m: typeof mig) =>
      (
        desiredObjects(m, plan, specReplicas(m, plan)).find(
          (o) => o.metadata?.name === "m-shard-1",
        ) as any
      ).spec.template.spec.containers[0].resources;
    expect(shard(mig).limits).toMatchObject({ "nvidia.com/mig-7g.141gb": "2" });
    expect(shard(mig).limits).not.toHaveProperty("nvidia.com/gpu");
    const old = manifest();
    delete (old.spec.experts as { gpuResource?: string }).gpuResource;
    delete (old.spec.gateway as { gpuResource?: string }).gpuResource;
    expect(shard(old).limits).toMatchObject({ "nvidia.com/gpu": "2" });
  });

  it("runs CPU shards without a GPU request when gpusPerShard is 0", () => {
    const shard = objects().find((o) => o.metadata?.name === "m-shard-0") as any;
    expect(shard.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"]).toBe("2");
    const cpu = desiredObjects(
      {
        ...manifest(),
        spec: { ...manifest().spec, experts: { ...manifest().spec.experts, gpusPerShard: 0 } },
      },
      planPlacement({ architecture: architectureOf(manifest()), numShards: 4 }),
      { gateway: 1, shards: [1, 1, 1, 1] },
    ).find((o) => o.metadata?.name === "m-shard-0") as any;
    expect(cpu.spec.template.spec.containers[0].resources.limits).toBeUndefined();
    expect(cpu.spec.template.spec.containers[0].args).toContain("--device=cpu");
  });

  /** Each Deployment's args that start with `prefix`, for a manifest with `model` patched in. */
  const roleArgs = (
    model: Partial<ReturnType<typeof manifest>["spec"]["model"]>,
    prefix: string,
  ) => {
    const m = manifest();
    const served = { ...m, spec: { ...m.spec, model: { ...m.spec.model, ...model } } };
    const plan = planPlacement({ architecture: architectureOf(m), numShards: 4 });
    return desiredObjects(served, plan, specReplicas(served, plan))
      .filter((o) => o.kind === "Deployment")
      .map((o) =>
        ((o as any).spec.template.spec.containers[0].args as string[]).filter((a) =>
          a.startsWith(prefix),
        ),
      );
  };

  it("passes spec.model.dtype to gateways and shards as --dtype, and nothing for auto", () => {
    expect(roleArgs({ dtype: "auto" }, "--dtype")).toEqual([[], [], [], [], []]);
    expect(roleArgs({ dtype: "fp8" }, "--dtype")).toEqual(Array(5).fill(["--dtype=fp8"]));
  });

  it("passes spec.model.cpuMatmul bf16 to gateways and shards as --cpu-matmul, nothing for fp32", () => {
    expect(roleArgs({ cpuMatmul: "fp32" }, "--cpu-matmul")).toEqual([[], [], [], [], []]);
    expect(roleArgs({ cpuMatmul: "bf16" }, "--cpu-matmul")).toEqual(
      Array(5).fill(["--cpu-matmul=bf16"]),
    );
  });

  it("passes spec.model.batchInvariant to gateways and shards as --batch-invariant", () => {
    expect(roleArgs({ batchInvariant: false }, "--batch-invariant")).toEqual([[], [], [], [], []]);
    expect(roleArgs({ batchInvariant: true }, "--batch-invariant")).toEqual(
      Array(5).fill(["--batch-invariant"]),
    );
  });

  it("gateways keep serving 5 s after SIGTERM, within the pod's grace period", () => {
    const gw = objects("").find((o) => o.metadata?.name === "m-gateway") as any;
    const pod = gw.spec.template.spec;
    expect(pod.containers[0].args).toContain("--shutdown-delay=5");
    // The delay, then up to 45 s (--shutdown-timeout) for requests in flight, then the prefix
    // cache's writes and the NATS drain must end before SIGKILL.
    expect(pod.terminationGracePeriodSeconds).toBeGreaterThanOrEqual(5 + 45 + 10);
  });

  it("passes --no-prefix-caching to the gateway only when spec.gateway.prefixCaching is false", () => {
    const args = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
        .containers[0].args as string[];
    expect(args("")).not.toContain("--no-prefix-caching");
    expect(args("  gateway: { prefixCaching: false }")).toContain("--no-prefix-caching");
  });

  it("gives the gateway an emptyDir and the disk tier's flags only when kvCache.diskBytes is set", () => {
    const gwPod = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec;
    const plain = gwPod("");
    expect(plain.containers[0].args.join(" ")).not.toContain("--prefix-cache-disk");
    expect(plain.volumes.map((v: any) => v.name)).not.toContain("prefix-cache");
    const pod = gwPod("  gateway: { kvCache: { diskBytes: 8589934592 } }");
    expect(pod.containers[0].args).toEqual(
      expect.arrayContaining([
        "--prefix-cache-disk=/var/cache/expertmesh/prefix",
        "--prefix-cache-disk-bytes=8589934592",
      ]),
    );
    expect(pod.volumes).toContainEqual({
      name: "prefix-cache",
      emptyDir: { sizeLimit: String(8589934592 + 128 * 2 ** 20) },
    });
    expect(pod.containers[0].volumeMounts).toContainEqual({
      name: "prefix-cache",
      mountPath: "/var/cache/expertmesh/prefix",
    });
    // The scheduler places the pod where the emptyDir fits (unless the manifest says).
    expect(pod.containers[0].resources.requests["ephemeral-storage"]).toBe(
      String(8589934592 + 128 * 2 ** 20),
    );
    expect(plain.containers[0].resources.requests["ephemeral-storage"]).toBeUndefined();
    const given = gwPod(
      '  gateway: { kvCache: { diskBytes: 8589934592 }, resources: { requests: { ephemeral-storage: "20Gi" } } }',
    );
    expect(given.containers[0].resources.requests["ephemeral-storage"]).toBe("20Gi");
    // Shards have no prefix cache.
    const shard = objects("  gateway: { kvCache: { diskBytes: 8589934592 } }").find(
      (o) => o.metadata?.name === "m-shard-0",
    ) as any;
    expect(shard.spec.template.spec.volumes.map((v: any) => v.name)).not.toContain("prefix-cache");
  });

  it("passes the NATS tier's bucket, budget and copies only when kvCache.remoteBytes is set", () => {
    const gw = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec;
    expect(gw("").containers[0].args.join(" ")).not.toContain("--prefix-cache-remote");
    const pod = gw("  gateway: { kvCache: { remoteBytes: 8589934592 } }");
    expect(pod.containers[0].args).toEqual(
      expect.arrayContaining([
        "--prefix-cache-remote=expertmesh-prefix-ns-m",
        "--prefix-cache-remote-bytes=8589934592",
      ]),
    );
    // No volume: the blocks live on the NATS server.
    expect(pod.volumes.map((v: any) => v.name)).not.toContain("prefix-cache");
    // One copy unless asked (a NATS cluster keeps 3 of a bucket that must outlive a server).
    expect(pod.containers[0].args.join(" ")).not.toContain("--prefix-cache-remote-replicas");
    const replicated = gw("  gateway: { kvCache: { remoteBytes: 8589934592, remoteReplicas: 3 } }");
    expect(replicated.containers[0].args).toContain("--prefix-cache-remote-replicas=3");
  });

  it("with gateway.disaggregation, runs prefill gateways outside the Service and hands them long prompts", () => {
    const plain = objects("  gateway: { kvCache: { remoteBytes: 8589934592 } }");
    expect(plain.some((o) => o.metadata?.name === "m-prefill")).toBe(false);
    expect(
      (plain.find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec.containers[0]
        .args,
    ).not.toContain("--disaggregation-mode=decode");
    const all = objects(
      "  gateway:\n    kvCache: { remoteBytes: 8589934592 }\n    disaggregation: { replicas: 3, minPromptTokens: 1024 }",
    );
    const gw = all.find((o) => o.metadata?.name === "m-gateway") as any;
    const prefill = all.find((o) => o.metadata?.name === "m-prefill") as any;
    const args = (d: any): string[] => d.spec.template.spec.containers[0].args;
    expect(args(gw)).toEqual(
      expect.arrayContaining([
        "--disaggregation-mode=decode",
        "--disaggregation-min-tokens=1024",
        "--disaggregation-timeout=60",
        "--prefix-cache-remote=expertmesh-prefix-ns-m",
      ]),
    );
    expect(prefill.kind).toBe("Deployment");
    expect(prefill.spec.replicas).toBe(3);
    expect(args(prefill)[0]).toBe("gateway");
    expect(args(prefill)).toEqual(
      expect.arrayContaining([
        "--disaggregation-mode=prefill",
        "--prefix-cache-remote=expertmesh-prefix-ns-m",
      ]),
    );
    expect(args(prefill).join(" ")).not.toContain("--disaggregation-min-tokens");
    // The same gateway otherwise (GPUs, resources, probes).
    const strip = (a: string[]) => a.filter((x) => !x.startsWith("--disaggregation-"));
    expect(strip(args(prefill))).toEqual(strip(args(gw)));
    expect(prefill.spec.template.spec.containers[0].resources).toEqual(
      gw.spec.template.spec.containers[0].resources,
    );
    // Its own component: the Service (and the gateways' PDB) select the serving gateways only.
    const labels = prefill.spec.template.metadata.labels;
    expect(labels["app.kubernetes.io/component"]).toBe("prefill");
    const service = all.find((o) => o.kind === "Service") as any;
    expect(Object.entries(service.spec.selector).every(([k, v]) => labels[k] === v)).toBe(false);
    expect(
      all.some(
        (o: any) =>
          o.kind === "PodDisruptionBudget" &&
          o.metadata.name === "m-prefill" &&
          o.spec.selector.matchLabels["app.kubernetes.io/component"] === "prefill",
      ),
    ).toBe(true);
  });

  it.each([
    ["m", "default", "expertmesh-prefix-default-m"],
    ["v3.chat", "team-a", "expertmesh-prefix-team-a-v3_chat"],
  ])("names the bucket of model %s in %s %s (NATS takes no dots)", (name, namespace, bucket) => {
    const m = manifest();
    expect(prefixCacheBucket({ ...m, metadata: { name, namespace } })).toBe(bucket);
  });

  it("with kvCache.diskSharedClaim, every gateway mounts that claim for a shared disk tier", () => {
    const gw = objects(
      "  gateway:\n    replicas: 2\n    kvCache: { diskBytes: 8589934592, diskSharedClaim: prefix-rwx }",
    ).find((o) => o.metadata?.name === "m-gateway") as any;
    const pod = gw.spec.template.spec;
    expect(pod.volumes).toContainEqual({
      name: "prefix-cache",
      persistentVolumeClaim: { claimName: "prefix-rwx" },
    });
    expect(pod.volumes.filter((v: any) => v.name === "prefix-cache")).toHaveLength(1);
    expect(pod.containers[0].volumeMounts).toContainEqual({
      name: "prefix-cache",
      mountPath: "/var/cache/expertmesh/prefix",
    });
    expect(pod.containers[0].args).toEqual(
      expect.arrayContaining([
        "--prefix-cache-disk=/var/cache/expertmesh/prefix",
        "--prefix-cache-disk-bytes=8589934592",
        "--prefix-cache-disk-shared",
      ]),
    );
    // The volume's own capacity holds the files: no emptyDir to request room for.
    expect(pod.containers[0].resources.requests["ephemeral-storage"]).toBeUndefined();
  });

  it.each([
    [
      "an emptyDir each",
      "{ concurrency: 4 }",
      // 10 GiB, and 5% and 64 MiB for answers written before the gateway sees it full
      { name: "batch", emptyDir: { sizeLimit: String(10737418240 + 536870912 + 67108864) } },
      String(10737418240 + 536870912 + 67108864),
    ],
    [
      "a shared claim",
      "{ sharedClaim: batch-rwx, maxFileBytes: 1000 }",
      { name: "batch", persistentVolumeClaim: { claimName: "batch-rwx" } },
      undefined,
    ],
  ])(
    "spec.gateway.batch on %s: the serving gateways' Files and Batch APIs, not the prefill gateways'",
    (_, batch, volume, storage) => {
      const all = objects(
        `  gateway:\n    batch: ${batch}\n    kvCache: { remoteBytes: 1073741824 }\n    disaggregation: { replicas: 1 }`,
      );
      const pod = (name: string) =>
        (all.find((o) => o.metadata?.name === name) as any).spec.template.spec;
      const gw = pod("m-gateway");
      expect(gw.volumes).toContainEqual(volume);
      expect(gw.containers[0].volumeMounts).toContainEqual({
        name: "batch",
        mountPath: "/var/lib/expertmesh/batch",
      });
      const flags = gw.containers[0].args.filter((a: string) => /^--(files|batch)-/.test(a));
      expect(flags).toEqual([
        "--files-dir=/var/lib/expertmesh/batch",
        `--files-max-bytes=${batch.includes("1000") ? 1000 : 209715200}`,
        "--files-max-total=10737418240",
        `--batch-concurrency=${batch.includes("concurrency: 4") ? 4 : 8}`,
      ]);
      expect(gw.containers[0].resources.requests["ephemeral-storage"]).toBe(storage);
      const prefill = pod("m-prefill");
      expect(prefill.volumes.some((v: any) => v.name === "batch")).toBe(false);
      expect(prefill.containers[0].args.join(" ")).not.toContain("--files-dir");
    },
  );

  it("with a StorageClass for the shared claims, the operator makes them (ReadWriteMany, of the volumes' sizes, owned by the model) before the pods that mount them", () => {
    const all = objects(
      "  gateway:\n    replicas: 2\n" +
        "    kvCache: { diskBytes: 8589934592, diskSharedStorageClassName: nfs-rwx }\n" +
        "    batch: { sharedStorageClassName: efs, storageBytes: 1073741824 }",
    );
    const claims = all.filter((o) => o.kind === "PersistentVolumeClaim") as any[];
    expect(claims.map((c) => [c.metadata.name, c.spec])).toEqual([
      [
        "m-prefix-cache",
        {
          accessModes: ["ReadWriteMany"],
          storageClassName: "nfs-rwx",
          // the budget and 128 MiB for the writes under way
          resources: { requests: { storage: String(8589934592 + 134217728) } },
        },
      ],
      [
        "m-batch",
        {
          accessModes: ["ReadWriteMany"],
          storageClassName: "efs",
          // storageBytes, 5% and 64 MiB for the answers being written
          resources: { requests: { storage: String(1073741824 + 53687092 + 67108864) } },
        },
      ],
    ]);
    for (const c of claims) {
      expect(c.metadata.ownerReferences).toEqual([
        expect.objectContaining({ kind: "DeepSeekModel", name: "m", uid: "u-1", controller: true }),
      ]);
      expect(c.metadata.labels).toMatchObject({
        "expertmesh.io/model": "m",
        "app.kubernetes.io/component": "storage",
      });
    }
    const first = all.findIndex((o) => o.kind === "Deployment");
    expect(all.findIndex((o) => o.kind === "PersistentVolumeClaim")).toBeLessThan(first);
    const pod = (all.find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec;
    expect(pod.volumes).toEqual(
      expect.arrayContaining([
        { name: "prefix-cache", persistentVolumeClaim: { claimName: "m-prefix-cache" } },
        { name: "batch", persistentVolumeClaim: { claimName: "m-batch" } },
      ]),
    );
    expect(pod.containers[0].args).toContain("--prefix-cache-disk-shared");
    // The claims hold the files: no emptyDir to request room for.
    expect(pod.containers[0].resources.requests["ephemeral-storage"]).toBeUndefined();
    // A claim of the user's: none made.
    expect(
      objects("  gateway:\n    batch: { sharedClaim: mine }").some(
        (o) => o.kind === "PersistentVolumeClaim",
      ),
    ).toBe(false);
  });

  it.each([
    ["grows", "1Gi", "2147483648", "2147483648"],
    ["never shrinks", "10Gi", "5368709120", "10Gi"],
    ["keeps the claim's own words for the same size", "1Gi", "1073741824", "1Gi"],
    ["keeps a size in other units", "2G", "1Gi", "2G"],
    ["applies what it wants when the claim says nothing", undefined, "1Gi", "1Gi"],
  ])("a made claim's size %s: had %s, wanted %s -> %s", (_, had, want, applied) => {
    const claim = (storage: string | undefined) => ({
      apiVersion: "v1",
      kind: "PersistentVolumeClaim",
      metadata: { name: "m-batch" },
      spec: {
        accessModes: ["ReadWriteMany"],
        storageClassName: "efs",
        resources: storage === undefined ? {} : { requests: { storage } },
      },
    });
    const out = claimNoSmaller(claim(want), claim(had));
    expect(out.spec?.resources?.requests?.["storage"]).toBe(applied);
    expect(out.spec?.storageClassName).toBe("efs");
  });

  it("gives the gateways (only) spec.gateway.apiKeySecret's key as a mounted file they reload, never in args or env", () => {
    const pods = (extra: string) =>
      objects(extra)
        .filter((o) => o.kind === "Deployment")
        .map((o) => (o as any).spec.template.spec);
    const keysOf = (p: any) => ({
      volume: p.volumes.find((v: any) => v.name === "gateway-api-keys"),
      mount: p.containers[0].volumeMounts.find((v: any) => v.name === "gateway-api-keys"),
      flag: p.containers[0].args.find((a: string) => a.startsWith("--api-keys-file")),
    });
    const none = { volume: undefined, mount: undefined, flag: undefined };
    expect(pods("").map(keysOf)).toEqual(pods("").map(() => none));
    const withKeys = pods("  gateway: { apiKeySecret: { name: keys } }");
    const gateway = withKeys.find((p) => p.containers[0].name === "gateway");
    expect(keysOf(gateway)).toEqual({
      volume: {
        name: "gateway-api-keys",
        secret: { secretName: "keys", items: [{ key: "api-keys", path: "keys" }] },
      },
      mount: {
        name: "gateway-api-keys",
        mountPath: "/var/run/expertmesh/gateway-api-keys",
        readOnly: true,
      },
      flag: "--api-keys-file=/var/run/expertmesh/gateway-api-keys/keys",
    });
    expect(withKeys.filter((p) => p.containers[0].name !== "gateway").map(keysOf)).toEqual(
      withKeys.filter((p) => p.containers[0].name !== "gateway").map(() => none),
    );
    expect(JSON.stringify(gateway.containers[0].env)).not.toContain("keys");
  });

  it("serves the gateways' APIs over TLS from spec.gateway.tls's Secret: mounted, flags, HTTPS probes; shards untouched", () => {
    const pods = (extra: string) =>
      objects(extra)
        .filter((o) => o.kind === "Deployment")
        .map((o) => (o as any).spec.template.spec);
    const mount = {
      name: "gateway-tls",
      mountPath: "/var/run/expertmesh/gateway-tls",
      readOnly: true,
    };
    const flags = [
      "--tls-cert=/var/run/expertmesh/gateway-tls/tls.crt",
      "--tls-key=/var/run/expertmesh/gateway-tls/tls.key",
    ];
    for (const pod of pods("")) {
      expect(pod.containers[0].args.filter((a: string) => a.startsWith("--tls"))).toEqual([]);
      expect(pod.volumes.map((v: any) => v.name)).not.toContain("gateway-tls");
    }
    const plain = pods("").find((p) => p.containers[0].name === "gateway")!.containers[0];
    expect(plain.readinessProbe.httpGet.scheme).toBeUndefined();
    const withTls = pods(
      "  gateway: { tls: { secretName: gw-cert }, disaggregation: { replicas: 1 }, kvCache: { remoteBytes: 1073741824 } }",
    );
    const gateways = withTls.filter((p) => p.containers[0].name === "gateway");
    expect(gateways).toHaveLength(2); // the gateways and the prefill gateways
    for (const pod of gateways) {
      const c = pod.containers[0];
      expect(c.args).toEqual(expect.arrayContaining(flags));
      expect(c.volumeMounts).toContainEqual(mount);
      expect(pod.volumes).toContainEqual({
        name: "gateway-tls",
        secret: { secretName: "gw-cert" },
      });
      expect(c.readinessProbe.httpGet).toEqual({ path: "/ready", port: "http", scheme: "HTTPS" });
      expect(c.livenessProbe.httpGet).toEqual({ path: "/health", port: "http", scheme: "HTTPS" });
    }
    for (const pod of withTls.filter((p) => p.containers[0].name !== "gateway")) {
      expect(pod.containers[0].args.filter((a: string) => a.startsWith("--tls"))).toEqual([]);
      expect(pod.volumes.map((v: any) => v.name)).not.toContain("gateway-tls");
    }
  });

  it("verifies clients with spec.gateway.tls.clientCASecret: its key mounted and passed, the probes on the metrics port in plain HTTP", () => {
    const gateways = objects(
      "  gateway: { tls: { secretName: gw-cert, clientCASecret: { name: clients, key: bundle.pem } }, disaggregation: { replicas: 1 }, kvCache: { remoteBytes: 1073741824 } }",
    )
      .filter((o) => o.kind === "Deployment")
      .map((o) => (o as any).spec.template.spec)
      .filter((p) => p.containers[0].name === "gateway");
    expect(gateways).toHaveLength(2);
    for (const pod of gateways) {
      const c = pod.containers[0];
      expect(c.args.filter((a: string) => a.startsWith("--tls"))).toEqual([
        "--tls-cert=/var/run/expertmesh/gateway-tls/tls.crt",
        "--tls-key=/var/run/expertmesh/gateway-tls/tls.key",
        "--tls-client-ca=/var/run/expertmesh/gateway-client-ca/bundle.pem",
      ]);
      expect(c.volumeMounts).toContainEqual({
        name: "gateway-client-ca",
        mountPath: "/var/run/expertmesh/gateway-client-ca",
        readOnly: true,
      });
      expect(pod.volumes).toContainEqual({
        name: "gateway-client-ca",
        secret: { secretName: "clients" },
      });
      // The kubelet presents no client certificate: the API's port would refuse its probes.
      expect(c.readinessProbe.httpGet).toEqual({ path: "/ready", port: "metrics" });
      expect(c.livenessProbe.httpGet).toEqual({ path: "/health", port: "metrics" });
    }
  });

  it("passes --scheduling-policy=priority only when spec.gateway.schedulingPolicy asks", () => {
    const args = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
        .containers[0].args as string[];
    expect(args("").filter((a) => a.startsWith("--scheduling"))).toEqual([]);
    expect(
      args("  gateway: { schedulingPolicy: fcfs }").filter((a) => a.startsWith("--scheduling")),
    ).toEqual([]);
    expect(args("  gateway: { schedulingPolicy: priority }")).toContain(
      "--scheduling-policy=priority",
    );
    expect(
      args("  gateway: { schedulingPolicy: priority }").filter((a) => a.startsWith("--priority")),
    ).toEqual([]);
    expect(
      args("  gateway: { schedulingPolicy: priority, priorityAgingSeconds: 2.5 }").filter((a) =>
        a.startsWith("--priority"),
      ),
    ).toEqual(["--priority-aging=2.5"]);
  });

  it("modelAliases: a --served-model-alias each, after --served-model-name; unset, none", () => {
    const names = (extra: string) =>
      (
        (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
          .containers[0].args as string[]
      ).filter((a) => a.startsWith("--served-model"));
    expect(names("  gateway: { modelAliases: [claude-haiku-5-5, gpt-x] }")).toEqual([
      "--served-model-name=m",
      "--served-model-alias=claude-haiku-5-5",
      "--served-model-alias=gpt-x",
    ]);
    expect(names("")).toEqual(["--served-model-name=m"]);
  });

  it("streamKeepaliveSeconds: the gateways' --stream-keepalive (0 too: none); unset, their default", () => {
    const keepalive = (extra: string) =>
      (
        (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
          .containers[0].args as string[]
      ).filter((a) => a.startsWith("--stream-keepalive"));
    expect(keepalive("  gateway: { streamKeepaliveSeconds: 5 }")).toEqual(["--stream-keepalive=5"]);
    expect(keepalive("  gateway: { streamKeepaliveSeconds: 0 }")).toEqual(["--stream-keepalive=0"]);
    expect(keepalive("")).toEqual([]);
  });

  it.each([
    ["tiny-v3", "", "none"],
    ["deepseek-r1", "", "deepseek-r1"],
    ["deepseek-r1", ", reasoningParser: none", "none"],
    ["deepseek-v3", ", reasoningParser: deepseek-r1", "deepseek-r1"],
    ["deepseek-v3", ", reasoningParser: deepseek-v3", "deepseek-v3"],
    ["deepseek-v3.1", "", "deepseek-v3"],
  ])(
    "passes --reasoning-parser (and --tool-call-parser) to the gateway: preset %s%s -> %s",
    (preset, extra, want) => {
      const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: r, namespace: ns }
spec:
  model: { preset: ${preset}, source: { pvc: { claimName: weights, path: w } } }
  experts: { shards: 4 }
  gateway: { limits: { maxModelLen: 2048 }${extra} }
`);
      const plan = planPlacement({ architecture: architectureOf(m), numShards: 4 });
      const gw = desiredObjects(m, plan, specReplicas(m, plan)).find(
        (o) => o.metadata?.name === "r-gateway",
      ) as any;
      const args = gw.spec.template.spec.containers[0].args as string[];
      expect(args.filter((a) => a.startsWith("--reasoning-parser"))).toEqual([
        `--reasoning-parser=${want}`,
      ]);
      // The tool-call format by preset too: V3.1 has its own.
      expect(args.filter((a) => a.startsWith("--tool-call-parser"))).toEqual([
        `--tool-call-parser=${preset === "deepseek-v3.1" ? "deepseek-v3.1" : "deepseek-v3"}`,
      ]);
    },
  );

  it("passes speculative decoding to the gateway, with the lookup defaults", () => {
    const args = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
        .containers[0].args as string[];
    const spec = (a: string[]) => a.filter((x) => /^--(speculative|prompt-lookup)/.test(x));
    expect(spec(args(""))).toEqual([]);
    expect(spec(args("  gateway: { speculative: { numTokens: 5 } }"))).toEqual([
      "--speculative-tokens=5",
      "--prompt-lookup-max=4",
      "--prompt-lookup-min=2",
    ]);
    expect(
      spec(
        args(
          "  gateway: { speculative: { numTokens: 3, promptLookupMax: 8, promptLookupMin: 1 } }",
        ),
      ),
    ).toEqual(["--speculative-tokens=3", "--prompt-lookup-max=8", "--prompt-lookup-min=1"]);
  });

  it.each([
    ["", []],
    ["  gateway: { thinkingTokenBudget: 2048 }", ["--thinking-token-budget=2048"]],
    ["  gateway: { thinkingTokenBudget: 0 }", ["--thinking-token-budget=0"]],
  ])("passes a default thinking budget to the gateway: %j", (extra, want) => {
    const args = (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template
      .spec.containers[0].args as string[];
    expect(args.filter((a) => a.startsWith("--thinking-token-budget"))).toEqual(want);
  });

  it("sets the gateway Service's session affinity (None unless the manifest says ClientIP)", () => {
    const service = (extra: string) => objects(extra).find((o) => o.kind === "Service") as any;
    expect(service("").spec.sessionAffinity).toBe("None");
    expect(service("  gateway: { sessionAffinity: ClientIP }").spec.sessionAffinity).toBe(
      "ClientIP",
    );
  });

  it("requests the gateway's KV cache and weights' bytes of memory unless the manifest requests some", () => {
    const gatewayContainer = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
        .containers[0];
    // The tiny-v3 gateway's weights: 302912 bytes (memory.test.ts checks them on a checkpoint).
    const weights = gatewayWeightBytes(manifest())!;
    expect(weights).toBe(302912);
    expect(gatewayContainer("").resources.requests.memory).toBe(
      String(536870912 + weights + POD_MEMORY_OVERHEAD),
    );
    expect(
      gatewayContainer(
        "  gateway: { kvCache: { bytes: 2147483648 }, resources: { limits: { cpu: 2 } } }",
      ).resources,
    ).toMatchObject({
      requests: { memory: String(2147483648 + weights + POD_MEMORY_OVERHEAD) },
      limits: { cpu: "2" },
    });
    expect(
      gatewayContainer("  gateway: { resources: { requests: { memory: 8Gi } } }").resources.requests
        .memory,
    ).toBe("8Gi");
    // A limit above the weights and KV cache but under them plus the overhead: the request
    // is the limit (one above it made the API server refuse the Deployment).
    const tight = 536870912 + weights + 1024;
    expect(
      gatewayContainer(`  gateway: { resources: { limits: { memory: ${tight} } } }`).resources,
    ).toMatchObject({ requests: { memory: String(tight) }, limits: { memory: String(tight) } });
    expect(
      gatewayContainer("  gateway: { resources: { limits: { memory: 64Gi } } }").resources.requests
        .memory,
    ).toBe(String(536870912 + weights + POD_MEMORY_OVERHEAD));
  });

  it.each([
    // tiny-v3, 4 shards: 3 MoE layers x 4 experts each, 3 matrices of 64 x 32.
    { preset: "tiny-v3", dtype: "auto", shards: 4, redundant: 0, bytes: 12 * 3 * 2048 * 2 },
    { preset: "tiny-v3", dtype: "fp32", shards: 4, redundant: 0, bytes: 12 * 3 * 2048 * 4 },
    // fp8: a byte per weight and one f32 scale per (started) 128 x 128 block.
    { preset: "tiny-v3", dtype: "fp8", shards: 4, redundant: 0, bytes: 12 * 3 * (2048 + 4) },
    // DeepSeek-V3 as examples/deepseek-v3.yaml: fp8 checkpoint, 9 slots per shard per layer
    // over 58 MoE layers, each expert 3 x (2048 x 7168 bytes + 16 x 56 scales): ~21.4 GiB.
    {
      preset: "deepseek-v3",
      dtype: "auto",
      shards: 32,
      redundant: 32,
      bytes: 58 * 9 * 3 * (2048 * 7168 + 16 * 56 * 4),
    },
    // V2 in bf16, or served in fp8 (half, plus scales).
    {
      preset: "deepseek-v2",
      dtype: "auto",
      shards: 8,
      redundant: 0,
      bytes: 59 * 20 * 3 * 1536 * 5120 * 2,
    },
    {
      preset: "deepseek-v2",
      dtype: "fp8",
      shards: 8,
      redundant: 0,
      bytes: 59 * 20 * 3 * (1536 * 5120 + 12 * 40 * 4),
    },
  ] as const)(
    "a $preset shard in $dtype requests its experts' bytes of memory ($bytes) plus room",
    ({ preset, dtype, shards, redundant, bytes }) => {
      const m = manifest();
      const model = {
        ...m,
        spec: {
          ...m.spec,
          model: { ...m.spec.model, preset, dtype },
          experts: { ...m.spec.experts, shards, redundantExperts: redundant },
        },
      };
      const plan = planPlacement({
        architecture: architectureOf(model),
        numShards: shards,
        redundantExperts: redundant,
      });
      for (const k of [0, shards - 1]) expect(shardExpertBytes(model, plan, k)).toBe(bytes);
      const shard = desiredObjects(model, plan, specReplicas(model, plan)).find(
        (o) => o.metadata?.name === "m-shard-0",
      ) as any;
      expect(shard.spec.template.spec.containers[0].resources.requests.memory).toBe(
        String(bytes + POD_MEMORY_OVERHEAD),
      );
    },
  );

  it("a shard's memory request is the manifest's when it has one, and none when the dtype is not known", () => {
    const m = manifest();
    const plan = planPlacement({ architecture: architectureOf(m), numShards: 4 });
    const requests = (model: typeof m) =>
      (
        desiredObjects(model, plan, specReplicas(model, plan)).find(
          (o) => o.metadata?.name === "m-shard-0",
        ) as any
      ).spec.template.spec.containers[0].resources.requests;
    const own = {
      ...m,
      spec: {
        ...m.spec,
        experts: { ...m.spec.experts, resources: { requests: { memory: "3Gi", cpu: "2" } } },
      },
    };
    expect(requests(own)).toEqual({ memory: "3Gi", cpu: "2", "nvidia.com/gpu": "2" });
    // Only a limit, under the computed request: the request is the limit.
    const limited = {
      ...m,
      spec: { ...m.spec, experts: { ...m.spec.experts, resources: { limits: { memory: "1Mi" } } } },
    };
    expect(requests(limited).memory).toBe("1Mi");
    // Explicit figures, dtype auto: the checkpoint's dtype is not known before it is read.
    const { preset: _, ...explicitModel } = m.spec.model;
    const explicit = {
      ...m,
      spec: { ...m.spec, model: { ...explicitModel, architecture: architectureOf(m) } },
    };
    expect(shardExpertBytes(explicit, plan, 0)).toBeNull();
    expect(requests(explicit)).toEqual({ "nvidia.com/gpu": "2" });
  });

  it("passes the KV cache's bytes, dtype and block size to the gateway", () => {
    const args = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
        .containers[0].args as string[];
    const kv = (a: string[]) => a.filter((x) => /^--(kv-cache|block-size)/.test(x));
    expect(kv(args(""))).toEqual([
      "--kv-cache-bytes=536870912",
      "--kv-cache-dtype=float32",
      "--block-size=16",
    ]);
    expect(
      kv(args("  gateway: { kvCache: { bytes: 17179869184, dtype: fp8, blockSize: 64 } }")),
    ).toEqual(["--kv-cache-bytes=17179869184", "--kv-cache-dtype=fp8", "--block-size=64"]);
  });

  it("passes --tool-call-parser to the gateway (deepseek-v3 unless the manifest says)", () => {
    const args = (extra: string) =>
      (objects(extra).find((o) => o.metadata?.name === "m-gateway") as any).spec.template.spec
        .containers[0].args as string[];
    const of = (a: string[]) => a.filter((x) => x.startsWith("--tool-call-parser"));
    expect(of(args(""))).toEqual(["--tool-call-parser=deepseek-v3"]);
    expect(of(args("  gateway: { toolCallParser: deepseek-v3.1 }"))).toEqual([
      "--tool-call-parser=deepseek-v3.1",
    ]);
  });

  it("leaves replicas to an HPA or KEDA in external autoscaling mode", () => {
    const objs = objects("  autoscaling: { enabled: true, mode: external }");
    for (const d of objs.filter((o) => o.kind === "Deployment") as any[])
      expect(d.spec.replicas).toBeUndefined();
  });

  it("spec.env reaches every container, the download's too; spec.podMetadata every pod; absent, the pods are as before", () => {
    const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: v, namespace: ns }
spec:
  model: { preset: tiny-v3, source: { huggingFace: { repo: acme/tiny } } }
  gateway: { disaggregation: { replicas: 1 }, kvCache: { remoteBytes: 1073741824 } }
  env:
    - { name: HF_ENDPOINT, value: "https://hf-mirror.internal" }
    - { name: HTTPS_PROXY, valueFrom: { secretKeyRef: { name: proxy, key: url } } }
    - { name: NO_PROXY, valueFrom: { configMapKeyRef: { name: net, key: no-proxy, optional: true } } }
  podMetadata:
    labels: { team: inference, app.kubernetes.io/part-of: llm }
    annotations: { sidecar.istio.io/inject: "false" }
`);
    const plan = planPlacement({
      architecture: architectureOf(m),
      numShards: m.spec.experts.shards,
    });
    const deployments = desiredObjects(m, plan, specReplicas(m, plan)).filter(
      (o) => o.kind === "Deployment",
    ) as V1Deployment[];
    expect(deployments.map((d) => d.metadata?.name)).toEqual(
      expect.arrayContaining(["v-gateway", "v-prefill", "v-shard-0"]),
    );
    const extra = [
      { name: "HF_ENDPOINT", value: "https://hf-mirror.internal" },
      { name: "HTTPS_PROXY", valueFrom: { secretKeyRef: { name: "proxy", key: "url" } } },
      {
        name: "NO_PROXY",
        valueFrom: { configMapKeyRef: { name: "net", key: "no-proxy", optional: true } },
      },
    ];
    for (const d of deployments) {
      const pod = d.spec!.template;
      for (const c of [...pod.spec!.containers, ...(pod.spec!.initContainers ?? [])])
        for (const e of extra) expect(c.env, `${d.metadata?.name} ${c.name}`).toContainEqual(e);
      expect(pod.metadata!.labels).toMatchObject({
        team: "inference",
        "app.kubernetes.io/part-of": "llm",
        "app.kubernetes.io/component": d.metadata!.labels!["app.kubernetes.io/component"],
      });
      expect(pod.metadata!.annotations).toMatchObject({
        "sidecar.istio.io/inject": "false",
        "expertmesh.io/plan-shape": expect.any(String),
      });
      // The selector stays the operator's alone: pods are found by it whatever is added.
      expect(Object.keys(d.spec!.selector.matchLabels!)).not.toContain("team");
    }
    // Without them, nothing is added (the pods of a model that sets neither do not roll).
    for (const o of objects()) {
      if (o.kind !== "Deployment") continue;
      const pod = (o as V1Deployment).spec!.template;
      expect(Object.keys(pod.metadata!.annotations!)).toEqual(["expertmesh.io/plan-shape"]);
      expect(pod.metadata!.labels).toEqual((o as V1Deployment).spec!.selector.matchLabels);
      expect(pod.spec!.containers[0]!.env!.map((e) => e.name)).not.toContain("HF_ENDPOINT");
    }
  });

  it("downloads Hugging Face weights in an init container with the token from the Secret", () => {
    const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: v3, namespace: ns }
spec:
  model: { preset: deepseek-v3, source: { huggingFace: { repo: deepseek-ai/DeepSeek-V3, tokenSecret: { name: hf } } } }
  experts: { shards: 32 }
  gateway: { kvCache: { bytes: 34359738368, dtype: fp8 } }
`);
    const plan = planPlacement({ architecture: architectureOf(m), numShards: 32 });
    const gw = desiredObjects(m, plan, specReplicas(m, plan)).find(
      (o) => o.metadata?.name === "v3-gateway",
    ) as any;
    const init = gw.spec.template.spec.initContainers[0];
    expect(init.env).toContainEqual({ name: "HF_REPO", value: "deepseek-ai/DeepSeek-V3" });
    expect(init.env).toContainEqual({
      name: "HF_TOKEN",
      valueFrom: { secretKeyRef: { name: "hf", key: "token" } },
    });
    expect(gw.spec.template.spec.volumes[0]).toEqual({
      name: "model",
      emptyDir: { sizeLimit: "1500Gi" },
    });
    expect(gw.spec.template.spec.containers[0].args).toContain(
      "--model=/models/deepseek-ai--DeepSeek-V3",
    );
    // By default the model's own image fetches them (`expertmesh fetch`), into --model's folder.
    expect(init).toMatchObject({
      image: m.spec.image,
      args: [
        "fetch",
        "deepseek-ai/DeepSeek-V3",
        "--revision=main",
        "--dir=/models/deepseek-ai--DeepSeek-V3",
      ],
    });
    expect(init.command).toBeUndefined();
    // A Python image named: `hf download`, as before (what models created earlier keep).
    const py = parseManifest(
      `apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: v3, namespace: ns }
spec:
  model: { preset: deepseek-v3, source: { huggingFace: { repo: deepseek-ai/DeepSeek-V3, downloaderImage: "python:3.12-slim" } } }
  experts: { shards: 32 }
  gateway: { kvCache: { bytes: 34359738368, dtype: fp8 } }
`,
    );
    const pyInit = (
      desiredObjects(py, plan, specReplicas(py, plan)).find(
        (o) => o.metadata?.name === "v3-gateway",
      ) as any
    ).spec.template.spec.initContainers[0];
    expect(pyInit.image).toBe("python:3.12-slim");
    expect(pyInit.command[2]).toContain('hf download "$HF_REPO" --revision "$HF_REVISION"');
    expect(pyInit.args).toBeUndefined();
  });

  it("with huggingFace.sharedStorageClassName every pod mounts one claim the operator makes (of cacheSize), downloaded once by the fetchers' lease", () => {
    const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: v3, namespace: ns }
spec:
  model: { preset: deepseek-v3, source: { huggingFace: { repo: deepseek-ai/DeepSeek-V3, cacheSize: 800Gi, sharedStorageClassName: nfs } } }
  experts: { shards: 32 }
  gateway: { kvCache: { bytes: 34359738368, dtype: fp8 } }
`);
    const plan = planPlacement({ architecture: architectureOf(m), numShards: 32 });
    const all = desiredObjects(m, plan, specReplicas(m, plan));
    const claims = all.filter((o) => o.kind === "PersistentVolumeClaim") as any[];
    expect(claims.map((c) => [c.metadata.name, c.spec])).toEqual([
      [
        "v3-weights",
        {
          accessModes: ["ReadWriteMany"],
          storageClassName: "nfs",
          resources: { requests: { storage: "800Gi" } },
        },
      ],
    ]);
    const deployments = all.filter((o) => o.kind === "Deployment") as any[];
    expect(deployments).toHaveLength(33);
    // (a folder of the revision's own: pods of another revision never fetch into it)
    for (const d of deployments) {
      const pod = d.spec.template.spec;
      expect(pod.volumes).toContainEqual({
        name: "model",
        persistentVolumeClaim: { claimName: "v3-weights" },
      });
      expect(pod.initContainers[0].args).toEqual([
        "fetch",
        "deepseek-ai/DeepSeek-V3",
        "--revision=main",
        "--dir=/models/deepseek-ai--DeepSeek-V3@main",
      ]);
      expect(pod.containers[0].args).toContain("--model=/models/deepseek-ai--DeepSeek-V3@main");
    }
  });

  it.each([
    [
      "peers absent: anyone",
      "{ enabled: true }",
      [{ ports: ["http", "grpc"] }, { ports: ["metrics"] }],
      [{ ports: ["metrics"] }],
    ],
    [
      "metrics from Prometheus's namespace, the API from an ingress controller",
      "{ enabled: true, gatewayFrom: [{ namespaceSelector: { matchLabels: { kubernetes.io/metadata.name: ingress } } }], metricsFrom: [{ ipBlock: { cidr: 10.0.0.0/8 } }] }",
      [
        {
          ports: ["http", "grpc"],
          from: [
            { namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": "ingress" } } },
          ],
        },
        { ports: ["metrics"], from: [{ ipBlock: { cidr: "10.0.0.0/8" } }] },
      ],
      [{ ports: ["metrics"], from: [{ ipBlock: { cidr: "10.0.0.0/8" } }] }],
    ],
    [
      "an empty list: no one (the rule left out)",
      "{ enabled: true, metricsFrom: [] }",
      [{ ports: ["http", "grpc"] }],
      [],
    ],
  ])("spec.networkPolicy, %s", (_name, np, gateway, shard) => {
    const m = manifest(
      `  networkPolicy: ${np}\n  gateway: { disaggregation: { replicas: 1 }, kvCache: { remoteBytes: 1073741824 } }`,
    );
    const rules = (component: string) =>
      networkPolicies(m)
        .find((p) => p.metadata?.name === `m-${component}`)!
        .spec!.ingress!.map((r) => ({
          ports: r.ports!.map((p) => p.port),
          ...(r._from ? { from: r._from } : {}),
        }));
    expect(networkPolicies(m).map((p) => p.metadata?.name)).toEqual([
      "m-gateway",
      "m-shard",
      "m-prefill",
    ]);
    expect(rules("gateway")).toEqual(gateway);
    expect(rules("shard")).toEqual(shard);
    expect(rules("prefill")).toEqual(shard);
  });

  it("spec.networkPolicy: none unless enabled; each selects its role's pods and no other's", () => {
    expect(objects().some((o) => o.kind === "NetworkPolicy")).toBe(false);
    expect(
      objects("  networkPolicy: { enabled: false }").some((o) => o.kind === "NetworkPolicy"),
    ).toBe(false);
    const all = objects("  networkPolicy: { enabled: true }");
    const pods = all.flatMap((o) =>
      o.kind === "Deployment" ? [(o as V1Deployment).spec!.template.metadata!.labels!] : [],
    );
    for (const policy of all.filter((o) => o.kind === "NetworkPolicy") as V1NetworkPolicy[]) {
      const role = policy.metadata!.labels!["app.kubernetes.io/component"];
      const selected = pods.filter((labels) =>
        Object.entries(policy.spec!.podSelector!.matchLabels!).every(([k, v]) => labels[k] === v),
      );
      expect(selected.length, role).toBeGreaterThan(0);
      for (const labels of selected) expect(labels["app.kubernetes.io/component"]).toBe(role);
      expect(policy.spec!.policyTypes).toEqual(["Ingress"]);
    }
  });
});
