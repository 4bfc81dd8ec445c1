// The informer's list+watch contract against the real API server: it resumes a watch the
// server ended from the last resourceVersion (no relist), and lists again on 410 Gone.
import { fileURLToPath } from "node:url";
import { CoreV1Api, CustomObjectsApi } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Informer } from "../../src/operator/informer.ts";
import { installModelCrd } from "../support/crd.ts";
import { adminKubeConfig, uniqueName, waitFor } from "../support/env.ts";

const kc = adminKubeConfig();
const core = kc.makeApiClient(CoreV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };
const _crd = fileURLToPath(
  new URL("../../crds/deepseekmodels.expertmesh.io.yaml", import.meta.url),
);

function dsm(name: string) {
  return {
    apiVersion: "expertmesh.io/v1alpha1",
    kind: "DeepSeekModel",
    metadata: { name },
    spec: { model: { preset: "tiny-v2", source: { pvc: { claimName: "w" } } } },
  };
}

describe("Informer", () => {
  const namespace = uniqueName("informer");
  const informers: Informer<{ metadata?: { name?: string } }>[] = [];
  beforeAll(async () => {
    await core.createNamespace({ body: { metadata: { name: namespace } } });
    // DeepSeekModels: a kind whose watch cache starts when the CRD is created, so an early
    // resourceVersion is certainly expired.
    await installModelCrd(namespace);
  });
  afterAll(async () => {
    for (const i of informers) i.stop();
    await core.deleteNamespace({ name: namespace }).catch(() => {});
  });

  function modelInformer(
    seen: string[],
    opts: { staleFirstList?: boolean; watchTimeoutSeconds?: number },
  ) {
    let lists = 0;
    const inf = new Informer<{ metadata?: { name?: string } }>(kc, {
      name: "deepseekmodels",
      list: async () => {
        const list = (await custom.listNamespacedCustomObject({ ...G, namespace })) as {
          items: [];
          metadata: { resourceVersion: string };
        };
        lists++;
        // A resourceVersion the API server has long forgotten: its watch answers 410 Gone.
        const rv = opts.staleFirstList && lists === 1 ? "5" : list.metadata.resourceVersion;
        return { items: list.items, resourceVersion: rv };
      },
      watchPath: `/apis/expertmesh.io/v1alpha1/namespaces/${namespace}/deepseekmodels`,
      ...(opts.watchTimeoutSeconds
        ? { watchQuery: { timeoutSeconds: String(opts.watchTimeoutSeconds) } }
        : {}),
      onChange: (obj, event) => seen.push(`${event}:${obj.metadata?.name}`),
    });
    informers.push(inf);
    return inf;
  }

  it("lists again after 410 Gone and then sees new objects", async () => {
    const seen: string[] = [];
    const inf = modelInformer(seen, { staleFirstList: true });
    await inf.start();
    await waitFor("a relist after 410", async () => (inf.lists >= 2 ? true : undefined), 15_000);
    await custom.createNamespacedCustomObject({ ...G, namespace, body: dsm("after-gone") });
    await waitFor(
      "the new object",
      async () => (seen.includes("ADDED:after-gone") ? true : undefined),
      15_000,
    );
    expect(inf.lists).toBe(2);
  });

  it("resumes a watch the server closed from the last resourceVersion, without listing", async () => {
    const seen: string[] = [];
    const inf = modelInformer(seen, { watchTimeoutSeconds: 1 });
    await inf.start();
    await new Promise((r) => setTimeout(r, 3500)); // the server ends the watch every second
    await custom.createNamespacedCustomObject({ ...G, namespace, body: dsm("after-timeouts") });
    await waitFor(
      "the object created after several watch timeouts",
      async () => (seen.includes("ADDED:after-timeouts") ? true : undefined),
      15_000,
    );
    expect(inf.lists).toBe(1);
    // Nothing delivered twice: every ADDED event names a distinct object.
    const added = seen.filter((s) => s.startsWith("ADDED:"));
    expect(new Set(added).size).toBe(added.length);
  });
});
