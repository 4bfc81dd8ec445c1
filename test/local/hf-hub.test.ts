// `expertmesh up`'s download of a checkpoint from the Hugging Face Hub (src/local/hf-hub.ts),
// against a stand-in for the Hub (test/support/hub.ts: the Hub cannot be reached from here
// or from CI, so it is a mock) serving a tiny checkpoint of three safetensors shards: only
// what the engine reads is fetched, a complete snapshot is not fetched again, a transfer cut
// short resumes with a Range request, a gated repository needs HF_TOKEN (not sent on to the
// CDN's origin), $HTTP_PROXY is honoured (through a real forward proxy), a file whose SHA-256
// is not the listed one is thrown away, and offline the last snapshot serves.
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  writeFileSync,
} from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { hubDownload, hubSnapshot, wantedFile } from "../../src/local/hf-hub.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";
import { Leases } from "../../src/util/leases.ts";
import { freePort } from "../env/process.ts";
import { kubectl, runCli } from "../support/cli.ts";
import { uniqueName, waitFor } from "../support/env.ts";
import { type StandInHub, startStandInHub } from "../support/hub.ts";
import { startTestProxy } from "../support/proxy.ts";

const REPO = "deepseek-ai/tiny-v3";
let model: string;
let hub: StandInHub | undefined;
beforeAll(async () => {
  model = mkdtempSync(join(tmpdir(), "hub-model-"));
  await writeTinyModel(model, { arch: "v3", preset: "tiny", seed: 0, shards: 3 });
});
afterEach(async () => {
  await hub?.close();
  hub = undefined;
});

/** An EM_HF_DOWNLOAD error whose message matches `re`. */
const hubError = (re: RegExp) => ({ code: "EM_HF_DOWNLOAD", message: expect.stringMatching(re) });

const engineFiles = () => readdirSync(model).filter(wantedFile).sort();
const sameFiles = (dir: string) => {
  expect(
    readdirSync(dir)
      .filter((f) => !f.startsWith("."))
      .sort(),
  ).toEqual(engineFiles());
  for (const f of engineFiles())
    expect(readFileSync(join(dir, f)).equals(readFileSync(join(model, f))), f).toBe(true);
};

describe("hubSnapshot", () => {
  it("fetches the files the engine reads into a snapshot of the commit, once", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const root = mkdtempSync(join(tmpdir(), "hub-root-"));
    const seen: [number, number][] = [];
    const first = await hubSnapshot({
      repo: REPO,
      revision: "main",
      root,
      endpoint: hub.endpoint,
      onProgress: (done, total) => seen.push([done, total]),
    });
    expect(first.commit).toBe(hub.commit);
    expect(first.dir).toBe(join(root, "deepseek-ai--tiny-v3", "snapshots", hub.commit));
    expect(engineFiles()).toContain("model-00002-of-00003.safetensors");
    expect(engineFiles()).toContain("model.safetensors.index.json");
    sameFiles(first.dir);
    // The README and the figure were not fetched.
    const fetched = hub.requests.filter((r) => r.server === "cdn").map((r) => r.path);
    expect(fetched).toHaveLength(engineFiles().length);
    expect(fetched.join()).not.toMatch(/README|figures/);
    expect(readFileSync(join(root, "deepseek-ai--tiny-v3", "refs", "main"), "utf8")).toBe(
      hub.commit,
    );
    // Progress counts up to every byte of the files.
    const total = engineFiles().reduce((n, f) => n + readFileSync(join(model, f)).length, 0);
    expect(seen.at(-1)).toEqual([total, total]);
    expect(first.fetched).toBe(total);

    // Again: the listing is asked (main may have moved), nothing is fetched.
    const before = hub.requests.length;
    const again = await hubSnapshot({ repo: REPO, revision: "main", root, endpoint: hub.endpoint });
    expect(again).toEqual({ dir: first.dir, commit: hub.commit, fetched: 0 });
    expect(hub.requests.slice(before).map((r) => r.server)).toEqual(["hub"]);

    // Two at once into another cache (two `up` of one repository): each file fetched once,
    // by one of them; the other waits for it.
    const shared = mkdtempSync(join(tmpdir(), "hub-root-"));
    const cdn = () => hub!.requests.filter((r) => r.server === "cdn").length;
    const start = cdn();
    const both = await Promise.all(
      [0, 1].map(() =>
        hubSnapshot({ repo: REPO, revision: "main", root: shared, endpoint: hub!.endpoint }),
      ),
    );
    for (const b of both) sameFiles(b.dir);
    expect(both.map((b) => b.fetched).sort((a, b) => a - b)).toEqual([0, total]);
    expect(cdn() - start).toBe(engineFiles().length);
  });

  it("resumes a transfer cut short where it stopped", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const root = mkdtempSync(join(tmpdir(), "hub-root-"));
    const file = "model-00001-of-00003.safetensors";
    hub.cutNext(file, 1000);
    await expect(
      hubSnapshot({ repo: REPO, revision: "main", root, endpoint: hub.endpoint }),
    ).rejects.toMatchObject(
      hubError(
        new RegExp(
          `the transfer of ${REPO}/${file} broke off after 1000 bytes: .*\\(run it again to resume\\)`,
        ),
      ),
    );
    const dir = join(root, "deepseek-ai--tiny-v3", "snapshots", hub.commit);
    expect(readFileSync(join(dir, `${file}.incomplete`)).length).toBe(1000);
    expect(existsSync(join(dir, ".expertmesh-complete"))).toBe(false);

    const resumed = await hubSnapshot({
      repo: REPO,
      revision: "main",
      root,
      endpoint: hub.endpoint,
    });
    sameFiles(resumed.dir);
    // The resolve request carries the Range, and the redirect keeps it.
    const ranges = hub.requests
      .filter((r) => r.server === "cdn" && r.range)
      .map((r) => [r.path, r.range]);
    expect(ranges).toEqual([[`/${hub.commit}/${file}`, "bytes=1000-"]]);
    expect(resumed.fetched).toBeLessThan(
      engineFiles().reduce((n, f) => n + readFileSync(join(model, f)).length, 0),
    );
  });

  it("a file whose bytes differ from the SHA-256 the Hub lists is thrown away, resumed part and all; the next run fetches it anew", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const root = mkdtempSync(join(tmpdir(), "hub-root-"));
    const file = "model-00002-of-00003.safetensors";
    const snapshot = () =>
      hubSnapshot({ repo: REPO, revision: "main", root, endpoint: hub!.endpoint });
    const dir = join(root, "deepseek-ai--tiny-v3", "snapshots", hub.commit);
    const corrupted = hubError(
      new RegExp(
        `${REPO}/${file} arrived corrupted: its SHA-256 is [0-9a-f]{64}, the Hub lists [0-9a-f]{64} \\(it was thrown away; run it again to fetch it anew\\)`,
      ),
    );

    // A corrupted byte in one transfer: the right size, the wrong content.
    hub.corruptNext(file, 500);
    await expect(snapshot()).rejects.toMatchObject(corrupted);
    expect(existsSync(join(dir, file))).toBe(false);
    expect(existsSync(join(dir, `${file}.incomplete`))).toBe(false);
    expect(existsSync(join(dir, ".expertmesh-complete"))).toBe(false);

    // A corrupted byte in the part a cut transfer left: the resumed rest is sound, the whole
    // is not (the part is hashed from the disk before the rest arrives).
    hub.corruptNext(file, 10);
    hub.cutNext(file, 1000);
    await expect(snapshot()).rejects.toMatchObject(hubError(/broke off after 1000 bytes/));
    await expect(snapshot()).rejects.toMatchObject(corrupted);
    expect(existsSync(join(dir, `${file}.incomplete`))).toBe(false);

    sameFiles((await snapshot()).dir);
    // Three transfers of the file were whole or resumed, the last one from the start.
    const gets = hub.requests.filter((r) => r.server === "cdn" && r.path.endsWith(file));
    expect(gets.map((r) => r.range ?? "whole")).toEqual(["whole", "whole", "bytes=1000-", "whole"]);
  });

  it("a gated repository needs HF_TOKEN, which goes to the Hub and not to the CDN's origin", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model, token: "hf_secret" });
    const root = mkdtempSync(join(tmpdir(), "hub-root-"));
    await expect(
      hubSnapshot({ repo: REPO, revision: "main", root, endpoint: hub.endpoint }),
    ).rejects.toMatchObject(
      hubError(
        /.* refused to list deepseek-ai\/tiny-v3 \(HTTP 401\): the repository is gated or private \(set HF_TOKEN/,
      ),
    );
    const got = await hubSnapshot({
      repo: REPO,
      revision: "main",
      root,
      endpoint: hub.endpoint,
      token: "hf_secret",
    });
    sameFiles(got.dir);
    const hubAuth = hub.requests.filter((r) => r.server === "hub").map((r) => r.authorization);
    expect(hubAuth.slice(1).every((a) => a === "Bearer hf_secret")).toBe(true);
    expect(hub.requests.filter((r) => r.server === "cdn" && r.authorization)).toEqual([]);
  });

  it("refuses what is not there: another revision, a repository without config.json", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const root = mkdtempSync(join(tmpdir(), "hub-root-"));
    await expect(
      hubSnapshot({ repo: REPO, revision: "v9", root, endpoint: hub.endpoint }),
    ).rejects.toMatchObject(
      hubError(/.* has no revision 'v9' of deepseek-ai\/tiny-v3 \(HTTP 404\)/),
    );
    await hub.close();
    const empty = mkdtempSync(join(tmpdir(), "hub-empty-"));
    writeFileSync(join(empty, "tokenizer.json"), "{}");
    hub = await startStandInHub({ repo: REPO, dir: empty });
    await expect(
      hubSnapshot({ repo: REPO, revision: "main", root, endpoint: hub.endpoint }),
    ).rejects.toMatchObject(
      hubError(/has no config\.json: not a checkpoint in the Hugging Face layout/),
    );
  });

  it("offline, uses the revision's last complete snapshot; with none, says it cannot reach the Hub", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const root = mkdtempSync(join(tmpdir(), "hub-root-"));
    const online = await hubSnapshot({
      repo: REPO,
      revision: "main",
      root,
      endpoint: hub.endpoint,
    });
    const gone = `http://127.0.0.1:${await freePort()}`;
    const said: string[] = [];
    const offline = await hubSnapshot({
      repo: REPO,
      revision: "main",
      root,
      endpoint: gone,
      log: (l) => said.push(l),
    });
    expect(offline).toEqual({ dir: online.dir, commit: online.commit, fetched: 0 });
    expect(said.join("\n")).toMatch(
      /cannot reach http:\/\/127\.0\.0\.1:\d+ \(.*\): using deepseek-ai\/tiny-v3@main as fetched before/,
    );
    await expect(
      hubSnapshot({
        repo: REPO,
        revision: "main",
        root: mkdtempSync(join(tmpdir(), "hub-root-")),
        endpoint: gone,
      }),
    ).rejects.toMatchObject(
      hubError(/cannot reach http:\/\/127\.0\.0\.1:\d+ to fetch deepseek-ai\/tiny-v3: /),
    );
  });
});

describe("expertmesh fetch", () => {
  const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
  const jobFile = fileURLToPath(new URL("../../examples/fetch-weights-job.yaml", import.meta.url));

  it("runs examples/fetch-weights-job.yaml's command: the files into --dir, then nothing more; the API server admits the Job and its claim", async () => {
    const docs = parseAllDocuments(readFileSync(jobFile, "utf8")).map((d) => d.toJS());
    const job = docs.find((d) => d.kind === "Job");
    const args: string[] = job.spec.template.spec.containers[0].args;
    expect(args.slice(0, 2)).toEqual(["fetch", "deepseek-ai/DeepSeek-V3"]);
    hub = await startStandInHub({ repo: "deepseek-ai/DeepSeek-V3", dir: model });
    // The Job's arguments, the volume's folder in a temporary one.
    const dir = join(mkdtempSync(join(tmpdir(), "fetch-")), "DeepSeek-V3");
    const run = () =>
      runCli(
        process.execPath,
        [mainTs, ...args.map((a) => (a === "/weights/DeepSeek-V3" ? dir : a))],
        undefined,
        { ...process.env, HF_ENDPOINT: hub!.endpoint },
      );
    const first = await run();
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toBe(`${dir}\n`);
    expect(first.stderr).toMatch(
      /^deepseek-ai\/DeepSeek-V3@main: fetched [\d.]+ KiB, commit [0-9a-f]{12}$/m,
    );
    sameFiles(dir);
    const again = await run();
    expect(again.code).toBe(0);
    expect(again.stderr).toMatch(/complete already/);
    expect(hub.requests.filter((r) => r.server === "cdn")).toHaveLength(engineFiles().length);

    const ns = uniqueName("em-fetch");
    expect((await kubectl(["create", "namespace", ns])).code).toBe(0);
    const text = readFileSync(jobFile, "utf8").replaceAll(
      "namespace: inference",
      `namespace: ${ns}`,
    );
    const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], text);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(
      /persistentvolumeclaim\/deepseek-v3-weights created \(server dry run\)/,
    );
    expect(r.stdout).toMatch(/job\.batch\/fetch-deepseek-v3 created \(server dry run\)/);
  });

  it("--dir: files found there without a run of this commit's marker are fetched again", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const dir = mkdtempSync(join(tmpdir(), "fetch-"));
    // A config.json of the right size but other bytes, copied in by hand.
    const config = readFileSync(join(model, "config.json"));
    writeFileSync(join(dir, "config.json"), Buffer.alloc(config.length, 0x20));
    const got = await hubDownload({ repo: REPO, revision: "main", dir, endpoint: hub.endpoint });
    sameFiles(dir);
    expect(got.fetched).toBe(
      engineFiles().reduce((n, f) => n + readFileSync(join(model, f)).length, 0),
    );
    expect(readFileSync(join(dir, ".expertmesh-complete"), "utf8").split("\n")[0]).toBe(hub.commit);
  });

  it("--dir shared by several fetchers (a model's pods on one claim): one fetches, the others wait for its marker, or take over from one that died", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const dir = mkdtempSync(join(tmpdir(), "fetch-shared-"));
    const lease = join(dir, ".expertmesh-fetch.lease");
    const cdn = () => hub!.requests.filter((r) => r.server === "cdn").length;
    // Another fetcher holds the folder (a live one: this process's lease).
    const other = new Leases(60_000);
    expect(other.take(lease)).toBe("taken");
    const said: string[] = [];
    const seen: [number, number][] = [];
    const waiting = hubDownload({
      repo: REPO,
      revision: "main",
      dir,
      endpoint: hub.endpoint,
      log: (l) => said.push(l),
      onProgress: (done, total) => seen.push([done, total]),
    });
    await waitFor("the second fetcher waiting", async () => (said.length > 0 ? true : undefined));
    expect(said[0]).toMatch(
      new RegExp(
        `^another fetcher \\(${hostname()}, pid ${process.pid}\\) is fetching ${REPO} into ${dir}: waiting for it$`,
      ),
    );
    // The other finishes: its files and marker (fetched elsewhere, moved in), its lease let go.
    const elsewhere = mkdtempSync(join(tmpdir(), "fetch-"));
    await hubDownload({ repo: REPO, revision: "main", dir: elsewhere, endpoint: hub.endpoint });
    for (const f of readdirSync(elsewhere)) renameSync(join(elsewhere, f), join(dir, f));
    other.release(lease);
    expect((await waiting).fetched).toBe(0);
    sameFiles(dir);
    expect(cdn()).toBe(engineFiles().length);
    const total = engineFiles().reduce((n, f) => n + readFileSync(join(model, f)).length, 0);
    expect(seen.at(-1)?.[1]).toBe(total); // (the other's progress, shown while waiting)

    // One that dies holding the lease (its process gone): the next takes over and fetches.
    const dead = mkdtempSync(join(tmpdir(), "fetch-shared-"));
    const gone = new Leases(60_000);
    expect(gone.take(join(dead, ".expertmesh-fetch.lease"))).toBe("taken");
    gone.close();
    const before = cdn();
    const taken = await hubDownload({
      repo: REPO,
      revision: "main",
      dir: dead,
      endpoint: hub.endpoint,
    });
    expect(taken.fetched).toBe(total);
    sameFiles(dead);
    expect(existsSync(join(dead, ".expertmesh-fetch.lease"))).toBe(false);
    expect(cdn() - before).toBe(engineFiles().length);

    // Two `expertmesh fetch --dir` at once into one folder: the files fetched once.
    const both = mkdtempSync(join(tmpdir(), "fetch-shared-"));
    const env = { ...process.env, HF_ENDPOINT: hub.endpoint };
    const start = cdn();
    const runs = await Promise.all(
      [0, 1].map(() =>
        runCli(process.execPath, [mainTs, "fetch", REPO, "--dir", both], undefined, env),
      ),
    );
    for (const r of runs) expect(r.code, r.stderr).toBe(0);
    sameFiles(both);
    expect(cdn() - start).toBe(engineFiles().length);
  });

  it("fetch checks the weights' SHA-256 (exit 1 on a corrupted one); --no-verify trusts their sizes", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const env = { ...process.env, HF_ENDPOINT: hub.endpoint };
    const file = "model-00003-of-00003.safetensors";
    const fetchInto = (dir: string, ...flags: string[]) =>
      runCli(process.execPath, [mainTs, "fetch", REPO, "--dir", dir, ...flags], undefined, env);

    hub.corruptNext(file, 100);
    const checked = await fetchInto(mkdtempSync(join(tmpdir(), "fetch-")));
    expect(checked.code).toBe(1);
    expect(checked.stderr).toMatch(
      new RegExp(`\\[EM_HF_DOWNLOAD\\] ${REPO}/${file} arrived corrupted: its SHA-256 is`),
    );

    hub.corruptNext(file, 100);
    const dir = mkdtempSync(join(tmpdir(), "fetch-"));
    const trusted = await fetchInto(dir, "--no-verify");
    expect(trusted.code, trusted.stderr).toBe(0);
    // The corrupted byte was kept: the sizes agree, and nothing else was looked at.
    const got = readFileSync(join(dir, file));
    const want = readFileSync(join(model, file));
    expect(got.length).toBe(want.length);
    expect(got[100]).toBe(want[100]! ^ 0xff);
  });

  it("fetch goes through $HTTP_PROXY (Node's fetch alone would not), and around it for a host in $NO_PROXY", async () => {
    hub = await startStandInHub({ repo: REPO, dir: model });
    const proxy = await startTestProxy();
    try {
      const base: NodeJS.ProcessEnv = {
        ...process.env,
        HF_ENDPOINT: hub.endpoint,
        HTTP_PROXY: proxy.url,
      };
      for (const name of ["NO_PROXY", "no_proxy", "http_proxy", "HTTPS_PROXY", "https_proxy"])
        delete base[name];
      const dir = mkdtempSync(join(tmpdir(), "fetch-"));
      const via = await runCli(
        process.execPath,
        [mainTs, "fetch", REPO, "--dir", dir],
        undefined,
        base,
      );
      expect(via.code, via.stderr).toBe(0);
      sameFiles(dir);
      // The listing and every file's resolve went to the proxy, and so did each redirect to
      // the CDN's origin.
      const hubPort = new URL(hub.endpoint).port;
      expect(proxy.seen).toContain(
        `GET ${hub.endpoint}/api/models/${REPO}/revision/main?blobs=true`,
      );
      for (const f of engineFiles()) {
        expect(proxy.seen).toContain(`GET ${hub.endpoint}/${REPO}/resolve/${hub.commit}/${f}`);
        expect(
          proxy.seen.some((s) => s.endsWith(`/${hub!.commit}/${f}`) && !s.includes(`:${hubPort}/`)),
          `${f} from the CDN through the proxy`,
        ).toBe(true);
      }
      expect(proxy.seen.length).toBe(1 + 2 * engineFiles().length);

      proxy.seen.length = 0;
      const around = await runCli(
        process.execPath,
        [mainTs, "fetch", REPO, "--dir", mkdtempSync(join(tmpdir(), "fetch-"))],
        undefined,
        { ...base, NO_PROXY: "127.0.0.1" },
      );
      expect(around.code, around.stderr).toBe(0);
      expect(proxy.seen).toEqual([]);
    } finally {
      await proxy.close();
    }
  });

  it("refuses what is no repository, and says when the Hub cannot be reached", async () => {
    const bad = await runCli(process.execPath, [mainTs, "fetch", "DeepSeek-V3"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/\[EM_CLI_USAGE\] give one Hugging Face repository as org\/name/);
    const gone = await runCli(
      process.execPath,
      [mainTs, "fetch", "a/b", "--dir", mkdtempSync(join(tmpdir(), "fetch-"))],
      undefined,
      { ...process.env, HF_ENDPOINT: `http://127.0.0.1:${await freePort()}` },
    );
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(
      /\[EM_HF_DOWNLOAD\] cannot reach http:\/\/127\.0\.0\.1:\d+ to fetch a\/b/,
    );
  });
});
