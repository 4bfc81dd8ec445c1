// test/env/provision.sh on a machine without Go: `provision.sh go` fetches the Go
// toolchain from the module proxy as the module golang.org/toolchain, checks its h1: hash
// against the checksum database, unpacks it into the cache and runs it. The proxy here is a
// real HTTP server on loopback speaking the GOPROXY protocol (…/@v/VERSION.zip and
// …/sumdb/sum.golang.org/lookup/…); the "toolchain" it serves is a small zip whose bin/go
// is a shell script, so the test needs no network and no 70 MiB download. Its h1: hash is
// computed here in TypeScript, independently of the script's bash.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { crc32 } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { toolVersions } from "../env/paths.ts";
import { runCli } from "../support/cli.ts";
import { testEnv } from "../support/env.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));
const provision = join(root, "test/env/provision.sh");
const GO = toolVersions().goToolchain;
const os = process.platform === "darwin" ? "darwin" : "linux";
const arch =
  ({ x64: "amd64", arm64: "arm64" } as Record<string, string>)[process.arch] ?? process.arch;
const version = `v0.0.1-${GO}.${os}-${arch}`;
const prefix = `golang.org/toolchain@${version}/`;

/** A zip of `files` (stored, no compression, no permission bits: like a module zip). */
function zip(files: [string, Buffer][]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  for (const [name, data] of files) {
    const n = Buffer.from(name);
    const crc = crc32(data);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4); // version needed
    local.writeUInt16LE(0x21, 12); // date: 1980-01-01
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(data.length, 18);
    local.writeUInt32LE(data.length, 22);
    local.writeUInt16LE(n.length, 26);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE(20, 4); // made by
    central.writeUInt16LE(20, 6); // needed
    central.writeUInt16LE(0x21, 14);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(data.length, 20);
    central.writeUInt32LE(data.length, 24);
    central.writeUInt16LE(n.length, 28);
    central.writeUInt32LE(offset, 42);
    locals.push(local, n, data);
    centrals.push(central, n);
    offset += 30 + n.length + data.length;
  }
  const cd = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(files.length, 8);
  end.writeUInt16LE(files.length, 10);
  end.writeUInt32LE(cd.length, 12);
  end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, cd, end]);
}

/** Go's dirhash.Hash1 over zip entries: sha256 of "HEX  NAME\n" lines sorted by name. */
function h1(files: [string, Buffer][]): string {
  const sha = (b: Buffer | string) => createHash("sha256").update(b);
  const lines = [...files]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([name, data]) => `${sha(data).digest("hex")}  ${name}\n`)
    .join("");
  return `h1:${sha(lines).digest("base64")}`;
}

const goScript = `#!/bin/sh
# A stand-in for the go command: just what provision.sh asks of it.
case "$1" in
  version) echo "go version ${GO} ${os}/${arch}" ;;
  env) echo "${GO}" ;;
  *) echo "fake go: $*" >&2; exit 2 ;;
esac
`;
const files: [string, Buffer][] = [
  [`${prefix}go.mod`, Buffer.from("module golang.org/toolchain\n")],
  [`${prefix}VERSION`, Buffer.from(`${GO}\ntime 2026-09-01T20:03:23Z\n`)],
  [`${prefix}bin/go`, Buffer.from(goScript)],
  [`${prefix}pkg/tool/${os}_${arch}/compile`, Buffer.from("#!/bin/sh\nexit 0\n")],
];
const zipBytes = zip(files);
const goodHash = h1(files);

describe("provision.sh go: a Go toolchain from the module proxy", () => {
  let server: Server;
  let proxy = "";
  let requests: string[] = [];
  let sumdbHash = goodHash;
  let dir = "";

  beforeAll(async () => {
    dir = mkdtempSync(join(testEnv().runDir, "provision-go-"));
    server = createServer((req, res) => {
      const url = req.url ?? "";
      requests.push(`${req.method} ${url}`);
      if (url === `/golang.org/toolchain/@v/${version}.zip`) {
        res.writeHead(200, {
          "content-type": "application/zip",
          "content-length": zipBytes.length,
        });
        res.end(req.method === "HEAD" ? undefined : zipBytes);
      } else if (url === `/sumdb/sum.golang.org/lookup/golang.org/toolchain@${version}`) {
        res.writeHead(200, { "content-type": "text/plain" });
        res.end(
          `61743986\ngolang.org/toolchain ${version} ${sumdbHash}\ngolang.org/toolchain ${version}/go.mod h1:8wlg68NqwW7eMnI1aABk/C2pDYXj8mrMY4TyRfiLeS0=\n\ngo.sum database tree\n`,
        );
      } else res.writeHead(404).end("not found\n");
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    proxy = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  });
  afterAll(() => {
    server?.close();
  });

  /** provision.sh ARGS with no go on PATH, `cache` as the cache and the local proxy. */
  function run(cache: string, env: NodeJS.ProcessEnv = {}, args = ["go"]) {
    const e: NodeJS.ProcessEnv = {
      ...process.env,
      PATH: "/usr/bin:/bin",
      EXPERTMESH_CACHE_DIR: cache,
      EXPERTMESH_GO_TOOLCHAIN: "fetch", // ignore a Go in /usr/local/go/bin
      GOPROXY: `${proxy},direct`,
      ...env,
    };
    delete e["GOSUMDB"];
    delete e["GOTOOLCHAIN"];
    for (const [k, v] of Object.entries(env)) if (v === undefined) delete e[k];
    return runCli("bash", [provision, ...args], undefined, e);
  }

  it("fetches, checks and unpacks the toolchain, then finds it in the cache", async () => {
    const cache = join(dir, "cache-ok");
    requests = [];
    const r = await run(cache);
    expect(r.code, r.stderr).toBe(0);
    const goRoot = join(cache, "go", GO);
    expect(r.stdout.trim().split("\n").at(-1)).toBe(`GO_BIN=${goRoot}/bin`);
    expect(r.stderr).toContain(`downloading golang.org/toolchain@${version} from ${proxy}`);
    expect(r.stderr).toMatch(/download: 100%/); // progress, plain lines (stderr is a pipe)
    expect(r.stderr).toContain(`checksum ${goodHash} matches the checksum database`);
    expect(r.stderr).toContain(`ready in ${goRoot} (go version ${GO} ${os}/${arch})`);
    // The zip kept no permission bits: bin/ and pkg/tool/ were made executable.
    expect(statSync(join(goRoot, "bin/go")).mode & 0o111).not.toBe(0);
    expect(statSync(join(goRoot, `pkg/tool/${os}_${arch}/compile`)).mode & 0o111).not.toBe(0);
    expect(existsSync(join(goRoot, ".complete"))).toBe(true);
    expect(requests).toContain(`GET /golang.org/toolchain/@v/${version}.zip`);
    expect(requests).toContain(`GET /sumdb/sum.golang.org/lookup/golang.org/toolchain@${version}`);

    requests = [];
    const again = await run(cache);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toContain(`Go ${GO}: cached in ${goRoot}`);
    expect(again.stdout).toContain(`GO_BIN=${goRoot}/bin`);
    expect(requests).toEqual([]);
  });

  it("refuses a download whose hash the checksum database does not confirm", async () => {
    const cache = join(dir, "cache-bad");
    sumdbHash = "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    try {
      const r = await run(cache);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(
        `checksum mismatch for golang.org/toolchain@${version}: the download hashes to ${goodHash}, the checksum database says ${sumdbHash}`,
      );
      expect(existsSync(join(cache, "go", GO))).toBe(false);
      expect(readdirSync(join(cache, "build")).filter((d) => d.startsWith("go-fetch"))).toEqual([]);
    } finally {
      sumdbHash = goodHash;
    }
  });

  it("says what to do when there is no proxy to fetch from", async () => {
    const r = await run(join(dir, "cache-off"), { GOPROXY: "off" });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("GOPROXY=off names no module proxy to fetch Go from");
    const missing = await run(join(dir, "cache-404"), { GOPROXY: `${proxy}/nothing-here` });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain(`could not download golang.org/toolchain@${version}`);
  });

  it("skips a go older than 1.21 on PATH", async () => {
    const fake = join(dir, "old-go");
    mkdirSync(fake, { recursive: true });
    writeFileSync(
      join(fake, "go"),
      '#!/bin/sh\n[ "$1" = env ] && echo go1.19.13 || echo "go version go1.19.13 linux/amd64"\n',
      { mode: 0o755 },
    );
    const cache = join(dir, "cache-old");
    const r = await run(cache, {
      PATH: `${fake}:/usr/bin:/bin`,
      EXPERTMESH_GO_TOOLCHAIN: undefined,
    });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`${fake}/go is go1.19.13, older than Go 1.21: not used`);
    // Then an installed Go >= 1.21 (the machines keep one in /usr/local/go/bin), else the
    // fetched toolchain; never the old one.
    const goBin = r.stdout.trim().split("\n").at(-1)!;
    expect(goBin).toMatch(/^GO_BIN=/);
    expect(goBin).not.toBe(`GO_BIN=${fake}`);
    if (!existsSync("/usr/local/go/bin/go"))
      expect(goBin).toBe(`GO_BIN=${join(cache, "go", GO)}/bin`);
  });
});
