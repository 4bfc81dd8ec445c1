// Where the test environment's binaries live: built by provision.sh into a cache folder
// outside the repository, keyed by the versions pinned in versions.sh.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { cacheDir } from "../../src/util/cache-dir.ts";

export interface ToolVersions {
  nats: string;
  kubernetes: string;
  etcd: string;
  kwok: string;
  helm: string;
  otelcol: string;
  /** The Go toolchain provision.sh fetches when no usable go is installed. */
  goToolchain: string;
  keda: string;
}

/** The versions pinned in test/env/versions.sh. */
export function toolVersions(): ToolVersions {
  const text = readFileSync(new URL("./versions.sh", import.meta.url), "utf8");
  const get = (key: string): string => {
    const m = new RegExp(`^${key}=(\\S+)`, "m").exec(text);
    if (!m?.[1]) throw new Error(`versions.sh has no ${key}`);
    return m[1];
  };
  return {
    nats: get("NATS_SERVER_VERSION"),
    kubernetes: get("KUBERNETES_VERSION"),
    etcd: get("ETCD_VERSION"),
    kwok: get("KWOK_VERSION"),
    helm: get("HELM_VERSION"),
    otelcol: get("OTELCOL_VERSION"),
    goToolchain: get("GO_TOOLCHAIN_VERSION"),
    keda: get("KEDA_VERSION"),
  };
}

/** The cache root, as provision.sh computes it. */
export { cacheDir };

/** Absolute paths of every binary the environment runs. */
export function binaries() {
  const v = toolVersions();
  const bin = join(cacheDir(), "bin");
  const kube = join(bin, `kubernetes-${v.kubernetes}`);
  return {
    natsServer: join(bin, `nats-server-${v.nats}`, "nats-server"),
    etcd: join(bin, `etcd-${v.etcd}`, "etcd"),
    kubeApiserver: join(kube, "kube-apiserver"),
    kubeControllerManager: join(kube, "kube-controller-manager"),
    kubeScheduler: join(kube, "kube-scheduler"),
    kubectl: join(kube, "kubectl"),
    kwok: join(bin, `kwok-${v.kwok}`, "kwok"),
    kwokStages: join(bin, `kwok-${v.kwok}`, "stage"),
    helm: join(bin, `helm-${v.helm}`, "helm"),
    otelcol: join(bin, `otelcol-${v.otelcol}`, "otelcol"),
  };
}
