// Another project's CustomResourceDefinition in the test cluster: fetched at the version
// pinned in test/env/versions.sh by test/env/crd.sh (from the Go module proxy, cached),
// applied server-side, and waited for until the API server serves it.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { expect } from "vitest";
import { parse } from "yaml";
import { kubectl, runCli } from "./cli.ts";
import { waitFor } from "./env.ts";

const crdScript = fileURLToPath(new URL("../env/crd.sh", import.meta.url));

export type ForeignCrd = "keda" | "podmonitor" | "servicemonitor" | "prometheusrule";

/** The CRD file of `which` (fetched once) and the CRD's name. */
export async function fetchCrd(which: ForeignCrd): Promise<{ path: string; name: string }> {
  const fetched = await runCli("bash", [crdScript, which]);
  expect(fetched.code, fetched.stderr).toBe(0);
  const path = fetched.stdout.trim().split("\n").at(-1)!;
  const crd = parse(readFileSync(path, "utf8")) as { kind: string; metadata: { name: string } };
  expect(crd.kind, path).toBe("CustomResourceDefinition");
  return { path, name: crd.metadata.name };
}

/** Installs `which` into the test cluster; resolves its name once it is Established. */
export async function installCrd(which: ForeignCrd, path?: string): Promise<string> {
  const crd = path ? { path, name: (await fetchCrd(which)).name } : await fetchCrd(which);
  const install = await kubectl([
    "apply",
    "--server-side",
    "--field-manager=expertmesh-test",
    "-f",
    crd.path,
  ]);
  expect(install.code, install.stderr).toBe(0);
  await waitFor(`${crd.name} Established`, async () => {
    const r = await kubectl([
      "get",
      "crd",
      crd.name,
      "-o",
      'jsonpath={.status.conditions[?(@.type=="Established")].status}',
    ]);
    return r.code === 0 && r.stdout.trim() === "True" ? true : undefined;
  });
  return crd.name;
}

/** Removes CRD `name` (and its objects) from the test cluster, if there. */
export async function deleteCrd(name: string, wait = false): Promise<void> {
  await kubectl(["delete", "crd", name, "--ignore-not-found", `--wait=${wait}`]);
}

const modelCrd = fileURLToPath(
  new URL("../../crds/deepseekmodels.expertmesh.io.yaml", import.meta.url),
);

/** This project's DeepSeekModel CRD, applied server-side; resolves once it is served. */
export async function installModelCrd(namespace: string): Promise<void> {
  const r = await kubectl(["apply", "--server-side", "-f", modelCrd]);
  expect(r.code, r.stderr).toBe(0);
  await waitFor(
    "the DeepSeekModel CRD served",
    async () => (await kubectl(["get", "dsm", "-n", namespace])).code === 0 || undefined,
  );
}
