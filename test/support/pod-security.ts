// A namespace that enforces the "restricted" Pod Security Standard, and the test API
// server's verdict on a pod spec there (a dry-run create: PodSecurity admission judges).
import { CoreV1Api, type V1PodSpec } from "@kubernetes/client-node";
import { adminKubeConfig, uniqueName } from "./env.ts";

export interface RestrictedNamespace {
  name: string;
  /** Why the API server refuses a Pod of `spec` here (its Status message), or null. */
  refusal(spec: V1PodSpec): Promise<string | null>;
  remove(): Promise<void>;
}

export async function restrictedNamespace(prefix: string): Promise<RestrictedNamespace> {
  const core = adminKubeConfig().makeApiClient(CoreV1Api);
  const name = uniqueName(prefix);
  await core.createNamespace({
    body: {
      metadata: {
        name,
        labels: {
          "pod-security.kubernetes.io/enforce": "restricted",
          "pod-security.kubernetes.io/enforce-version": "latest",
        },
      },
    },
  });
  return {
    name,
    async refusal(spec) {
      try {
        await core.createNamespacedPod({
          namespace: name,
          body: { metadata: { name: uniqueName("probe") }, spec },
          dryRun: "All",
        });
        return null;
      } catch (err) {
        const body = (err as { body?: unknown }).body;
        if (typeof body !== "string") return String(err);
        try {
          return (JSON.parse(body) as { message?: string }).message ?? body;
        } catch {
          return body;
        }
      }
    },
    async remove() {
      await core.deleteNamespace({ name }).catch(() => {});
    },
  };
}
