// The gateway's API keys (src/gateway/api-keys.ts): how a text splits into keys, which keys
// are accepted, and an --api-keys-file read again when it changes (real files, a short
// interval). The HTTP and gRPC APIs asking it are tested in test/gateway/api-keys-file.test.ts.
import { mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ApiKeys, parseApiKeys, readApiKeysFile } from "../../src/gateway/api-keys.ts";

describe("parseApiKeys", () => {
  it.each([
    ["", []],
    ["k1", ["k1"]],
    ["k1,k2", ["k1", "k2"]],
    [" k1 , k2 ,", ["k1", "k2"]],
    ["k1\nk2\r\nk3\n", ["k1", "k2", "k3"]],
    ["k1,\n\n,k2", ["k1", "k2"]],
    ["a key with spaces", ["a key with spaces"]],
    [" ,\n ", []],
  ])("%j -> %j", (text, keys) => {
    expect(parseApiKeys(text)).toEqual(keys);
  });
});

describe("ApiKeys", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });
  const tempFile = (text: string) => {
    const dir = mkdtempSync(join(tmpdir(), "em-keys-"));
    dirs.push(dir);
    const file = join(dir, "keys");
    writeFileSync(file, text);
    return file;
  };
  const accepts = (keys: ApiKeys, k: string) => keys.accepts(Buffer.from(k));

  it.each([
    [[], [], false, []],
    [["a"], [], true, ["a"]],
    [[], ["b"], true, ["b"]],
    [["a"], ["b", "c"], true, ["a", "b", "c"]],
  ])("fixed %j, from file %j: required %s, accepts %j", (fixed, fromFile, required, ok) => {
    const keys = new ApiKeys(fixed, fromFile);
    expect(keys.required).toBe(required);
    expect(keys.count).toBe(ok.length);
    for (const k of ok) expect(accepts(keys, k)).toBe(true);
    for (const k of ["", "x", "a ", "ab", "A"]) expect(accepts(keys, k)).toBe(false);
  });

  it("from: an array becomes keys, keys stay themselves", () => {
    const keys = new ApiKeys(["a"]);
    expect(ApiKeys.from(keys)).toBe(keys);
    expect(ApiKeys.from(["z"]).required).toBe(true);
    expect(ApiKeys.from(undefined).required).toBe(false);
  });

  it("readApiKeysFile: EM_CLI_FILE for a file not there, EM_GATEWAY_API_KEYS for one with no key", () => {
    expect(readApiKeysFile(tempFile("k1\nk2\n"))).toEqual(["k1", "k2"]);
    expect(() => readApiKeysFile("/nonexistent/keys")).toThrow(
      expect.objectContaining({ code: "EM_CLI_FILE" }),
    );
    expect(() => readApiKeysFile(tempFile(" ,\n"))).toThrow(
      expect.objectContaining({ code: "EM_GATEWAY_API_KEYS" }),
    );
  });

  it("watch: takes a changed file (a rename over it too); keeps the keys through a file with none or none at all", async () => {
    const file = tempFile("old");
    const keys = new ApiKeys([], readApiKeysFile(file));
    const logs: string[] = [];
    keys.watch(file, 100, (m) => logs.push(m));
    try {
      const until = async (cond: () => boolean) => {
        for (let i = 0; i < 100 && !cond(); i++) await new Promise((r) => setTimeout(r, 20));
        expect(cond()).toBe(true);
      };
      writeFileSync(file, "new1,new2");
      await until(() => accepts(keys, "new1"));
      expect(accepts(keys, "new2")).toBe(true);
      expect(accepts(keys, "old")).toBe(false);
      expect(logs).toEqual([`API keys reloaded (${file}): 2 key(s), 1 before`]);

      // Emptied: the previous keys stay, said once however often it is looked at.
      writeFileSync(file, "\n");
      await until(() => logs.length === 2);
      await new Promise((r) => setTimeout(r, 350));
      expect(logs[1]).toContain("cannot be used (the previous keys stay)");
      expect(logs[1]).toContain("holds no key");
      expect(logs).toHaveLength(2);
      expect(accepts(keys, "new1")).toBe(true);

      // Gone (a Secret volume swaps its files by rename): the same.
      rmSync(file);
      await until(() => logs.length === 3);
      expect(logs[2]).toContain("no such file");
      expect(keys.required).toBe(true);

      // Back, by a rename as the kubelet does it.
      writeFileSync(`${file}.tmp`, "third");
      renameSync(`${file}.tmp`, file);
      await until(() => accepts(keys, "third"));
      expect(accepts(keys, "new1")).toBe(false);
      expect(logs[3]).toBe(`API keys reloaded (${file}): 1 key(s), 2 before`);
    } finally {
      keys.stop();
    }
  });

  it("the fixed keys stay whatever the file says", async () => {
    const file = tempFile("f1");
    const keys = new ApiKeys(["fixed"], readApiKeysFile(file));
    keys.watch(file, 100, () => {});
    try {
      writeFileSync(file, "f2");
      for (let i = 0; i < 100 && !accepts(keys, "f2"); i++)
        await new Promise((r) => setTimeout(r, 20));
      expect([accepts(keys, "fixed"), accepts(keys, "f1"), accepts(keys, "f2")]).toEqual([
        true,
        false,
        true,
      ]);
    } finally {
      keys.stop();
    }
  });
});
