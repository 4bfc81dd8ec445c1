// The Secrets and ConfigMaps `up` reads from its -f files (src/local/objects.ts, ADR 0042), and
// which of several -f files is the model's (localFiles).
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { holdsModel, LocalObjects } from "../../src/local/objects.ts";
import { localFiles } from "../../src/local/prepare.ts";

const b64 = (s: string) => Buffer.from(s).toString("base64");

describe("LocalObjects", () => {
  const read = (text: string, ns = "default") => {
    const o = new LocalObjects();
    o.add(text, "f.yaml", ns);
    return o;
  };

  it.each([
    [
      "a Secret's data, decoded",
      `kind: Secret\nmetadata: { name: s }\ndata: { k: ${b64("v1,v2")} }`,
      ["Secret", "s", "k"],
      "v1,v2",
    ],
    [
      "base64 folded over lines",
      `kind: Secret\nmetadata: { name: s }\ndata:\n  k: |\n    ${b64("hello").slice(0, 4)}\n    ${b64("hello").slice(4)}`,
      ["Secret", "s", "k"],
      "hello",
    ],
    [
      "stringData, which wins over data",
      `kind: Secret\nmetadata: { name: s }\ndata: { k: ${b64("old")} }\nstringData: { k: new }`,
      ["Secret", "s", "k"],
      "new",
    ],
    [
      "a ConfigMap's data, as written",
      "kind: ConfigMap\nmetadata: { name: c }\ndata: { k: plain }",
      ["ConfigMap", "c", "k"],
      "plain",
    ],
    [
      "a kind: List's items",
      `kind: List\nitems:\n- kind: Secret\n  metadata: { name: s }\n  stringData: { k: x }`,
      ["Secret", "s", "k"],
      "x",
    ],
    [
      "among other documents",
      "kind: DeepSeekModel\nmetadata: { name: m }\n---\nkind: ConfigMap\nmetadata: { name: c }\ndata: { k: y }",
      ["ConfigMap", "c", "k"],
      "y",
    ],
    [
      "the model's namespace, said",
      "kind: ConfigMap\nmetadata: { name: c, namespace: default }\ndata: { k: z }",
      ["ConfigMap", "c", "k"],
      "z",
    ],
    [
      "another namespace's: not there",
      "kind: ConfigMap\nmetadata: { name: c, namespace: other }\ndata: { k: z }",
      ["ConfigMap", "c", "k"],
      undefined,
    ],
    [
      "a Secret is no ConfigMap",
      "kind: Secret\nmetadata: { name: c }\nstringData: { k: z }",
      ["ConfigMap", "c", "k"],
      undefined,
    ],
    [
      "a key it lacks",
      "kind: Secret\nmetadata: { name: s }\nstringData: { k: z }",
      ["Secret", "s", "other"],
      undefined,
    ],
  ] as const)("%s", (_name, text, [kind, name, key], want) => {
    const o = read(text);
    expect(o.get(kind, name, key)?.value).toBe(want);
    if (want !== undefined) expect(o.get(kind, name, key)?.source).toBe("f.yaml");
  });

  it("knows an object whose key is missing from one that is absent", () => {
    const o = read("kind: Secret\nmetadata: { name: s }\nstringData: { k: z }");
    expect(o.has("Secret", "s")).toBe(true);
    expect(o.has("Secret", "t")).toBe(false);
    expect(o.names).toEqual(["Secret/s"]);
  });

  it.each([
    [
      "no name",
      "kind: Secret\nstringData: { k: z }",
      /Secret \(no name\): metadata\.name is required/,
    ],
    [
      "data not a map",
      "kind: ConfigMap\nmetadata: { name: c }\ndata: [a]",
      /ConfigMap c: data must be a map/,
    ],
    [
      "a number for a string",
      "kind: ConfigMap\nmetadata: { name: c }\ndata: { k: 1 }",
      /data\.k must be a string/,
    ],
    [
      "not base64",
      "kind: Secret\nmetadata: { name: s }\ndata: { k: 'not base64!' }",
      /data\.k is not base64/,
    ],
  ])("refuses %s (EM_MANIFEST_INVALID)", (_name, text, message) => {
    expect(() => read(text)).toThrow(message);
    try {
      read(text);
    } catch (e) {
      expect((e as { code?: string }).code).toBe("EM_MANIFEST_INVALID");
    }
  });

  it("refuses text that is no YAML (EM_MANIFEST_PARSE)", () => {
    expect(() => read("a: [")).toThrow(/f\.yaml is not valid YAML/);
  });
});

describe("localFiles", () => {
  const dir = mkdtempSync(join(tmpdir(), "em-local-files-"));
  const file = (name: string, text: string) => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };
  const model = file("model.yaml", "apiVersion: expertmesh.io/v1alpha1\nkind: DeepSeekModel\n");
  const secrets = file("secrets.yaml", "kind: Secret\nmetadata: { name: s }\n");

  it("one file: the model's, whatever it holds", () => {
    expect(localFiles([secrets]).model).toBe(secrets);
  });
  it("several: the one with the DeepSeekModel, in any order", () => {
    const got = localFiles([secrets, model]);
    expect(got.model).toBe(model);
    expect(got.texts.map(([p]) => p)).toEqual([secrets, model]);
  });
  it.each([
    ["none", [secrets, secrets], /none does/],
    ["two", [model, model], /do$/],
    ["no -f", [], /-f MANIFEST\.yaml is required/],
  ])("refuses %s holding a model", (_name, paths, message) => {
    expect(() => localFiles(paths)).toThrow(message);
  });
  it("says which file it cannot read", () => {
    expect(() => localFiles([model, join(dir, "gone.yaml")])).toThrow(/cannot read .*gone\.yaml/);
  });
  it("holdsModel looks at every document", () => {
    expect(holdsModel("kind: Secret\n---\nkind: DeepSeekModel\n")).toBe(true);
    expect(holdsModel("kind: Secret\n")).toBe(false);
    expect(holdsModel("a: [")).toBe(false);
  });
});
