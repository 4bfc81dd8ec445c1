// A stand-in for the Hugging Face Hub, for the tests of `expertmesh up`'s download
// (src/local/hf-hub.ts): the Hub itself cannot be reached from here or from CI, so this is a
// mock, and says so. It serves what the Hub's HTTP API serves for a model repository:
// GET /api/models/<repo>/revision/<rev>?blobs=true (the commit and the files with their
// sizes, and the SHA-256 of the LFS files: the weights), and GET /<repo>/resolve/<commit>/<file>
// as a 302 redirect to a second server on another port (the Hub's CDN, another origin), which
// serves the bytes with Range requests.
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";

export interface HubRequest {
  server: "hub" | "cdn";
  path: string;
  authorization?: string;
  range?: string;
}

export interface StandInHub {
  /** Base URL, for $HF_ENDPOINT. */
  endpoint: string;
  /** Every request either server got. */
  requests: HubRequest[];
  /** The commit every revision of the repository names. */
  commit: string;
  /** The next transfer of `file` stops (the connection is destroyed) after `bytes` bytes. */
  cutNext(file: string, bytes: number): void;
  /** The next transfer of `file` has its byte at `offset` changed (a corrupted transfer). */
  corruptNext(file: string, offset: number): void;
  close(): Promise<void>;
}

/**
 * Serves `repo` with the files of `dir` (and, as a real repository has, a README and a
 * figure in a subfolder), at revision `main`; with `token`, only to requests bearing it.
 */
export async function startStandInHub(o: {
  repo: string;
  dir: string;
  token?: string;
}): Promise<StandInHub> {
  const files = new Map<string, Buffer>();
  for (const name of readdirSync(o.dir)) {
    if (statSync(join(o.dir, name)).isFile()) files.set(name, readFileSync(join(o.dir, name)));
  }
  files.set("README.md", Buffer.from("# a model card\n"));
  files.set("figures/benchmark.png", Buffer.from("not an image"));
  const commit = createHash("sha1").update(o.repo).digest("hex");
  // The listing, hashed once (the bench serves a GiB: hashing it per listing would be timed).
  const siblings = [...files].map(([name, data]) =>
    name.endsWith(".safetensors")
      ? {
          rfilename: name,
          size: data.length,
          lfs: {
            size: data.length,
            sha256: createHash("sha256").update(data).digest("hex"),
            pointerSize: 134,
          },
        }
      : { rfilename: name, size: data.length },
  );
  const requests: HubRequest[] = [];
  const cuts = new Map<string, number>();
  const corruptions = new Map<string, number>();
  const record = (server: HubRequest["server"], req: IncomingMessage) =>
    requests.push({
      server,
      path: req.url ?? "",
      ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}),
      ...(req.headers.range ? { range: req.headers.range } : {}),
    });
  const json = (res: ServerResponse, status: number, body: unknown) => {
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(body));
  };

  const cdn = createServer((req, res) => {
    record("cdn", req);
    const name = decodeURIComponent((req.url ?? "").replace(/^\/[0-9a-f]+\//, ""));
    const data = files.get(name);
    if (!data) return json(res, 404, { error: "Entry not found" });
    let start = 0;
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (range) {
      start = Number(range[1]);
      if (start >= data.length) {
        res.writeHead(416, { "content-range": `bytes */${data.length}` });
        return res.end();
      }
      res.writeHead(206, {
        "content-length": data.length - start,
        "content-range": `bytes ${start}-${data.length - 1}/${data.length}`,
      });
    } else res.writeHead(200, { "content-length": data.length });
    let body = data.subarray(start);
    const bad = corruptions.get(name);
    if (bad !== undefined && bad >= start && bad < data.length) {
      corruptions.delete(name);
      body = Buffer.from(body);
      body[bad - start]! ^= 0xff;
    }
    const cut = cuts.get(name);
    if (cut !== undefined) {
      cuts.delete(name);
      // The headers and the first bytes arrive; then the connection drops.
      res.write(body.subarray(0, cut), () => setTimeout(() => res.destroy(), 50));
      return;
    }
    res.end(body);
  });
  const cdnPort = await listen(cdn);

  const hub = createServer((req, res) => {
    record("hub", req);
    if (o.token && req.headers.authorization !== `Bearer ${o.token}`) {
      return json(res, 401, { error: "Access to this model is restricted." });
    }
    const url = new URL(req.url ?? "/", "http://hub");
    const listing = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/.exec(url.pathname);
    if (listing) {
      if (listing[1] !== o.repo) return json(res, 404, { error: "Repository not found" });
      const rev = decodeURIComponent(listing[2]!);
      if (rev !== "main" && rev !== commit) {
        return json(res, 404, { error: `Invalid rev id: ${rev}` });
      }
      return json(res, 200, {
        id: o.repo,
        sha: commit,
        siblings,
      });
    }
    const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([0-9a-f]{40})\/(.+)$/.exec(url.pathname);
    if (resolve && resolve[1] === o.repo && resolve[2] === commit) {
      res.writeHead(302, { location: `http://127.0.0.1:${cdnPort}/${commit}/${resolve[3]}` });
      return res.end();
    }
    json(res, 404, { error: "Not found" });
  });
  const hubPort = await listen(hub);
  return {
    endpoint: `http://127.0.0.1:${hubPort}`,
    requests,
    commit,
    cutNext: (file, bytes) => cuts.set(file, bytes),
    corruptNext: (file, offset) => corruptions.set(file, offset),
    close: async () => {
      await Promise.all([hub, cdn].map((s) => new Promise((r) => s.close(r))));
    },
  };
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve((server.address() as AddressInfo).port)),
  );
}
