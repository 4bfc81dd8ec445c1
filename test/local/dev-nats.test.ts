// How `npm start` (scripts/dev.sh start) gets its nats-server, through `scripts/dev.sh
// nats`, the step it runs before `expertmesh up`: an existing one ($EXPERTMESH_NATS_SERVER,
// a finished build in the cache, PATH) is used as is, with no Go on PATH and no
// provisioning; only when there is none does it build one with test/env/provision.sh, which
// then fetches a Go toolchain instead of stopping for want of Go.
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { beforeAll, describe, expect, it } from "vitest";
import { toolVersions } from "../env/paths.ts";
import { runCli } from "../support/cli.ts";
import { testEnv } from "../support/env.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));
const devSh = join(root, "scripts/dev.sh");

describe("scripts/dev.sh nats (the nats-server of npm start)", () => {
  let dir = "";
  let nats = "";

  beforeAll(() => {
    dir = mkdtempSync(join(testEnv().runDir, "dev-nats-"));
    nats = testEnv().binaries.natsServer;
  });

  /**
   * A cache folder for EXPERTMESH_CACHE_DIR that shares this run's Node.js 24 (so that
   * scripts/node24.sh does not install it again) and holds nothing else.
   */
  function emptyCache(name: string): string {
    const cache = join(dir, name);
    mkdirSync(cache, { recursive: true });
    const m = /^(.*\/node-(\d+\.\d+\.\d+))\/node_modules\/node\/bin\/node$/.exec(process.execPath);
    if (m) symlinkSync(m[1]!, join(cache, `node-${m[2]}`));
    return cache;
  }

  /** dev.sh nats with no go and no nats-server on PATH. */
  function devNats(env: NodeJS.ProcessEnv) {
    const e: NodeJS.ProcessEnv = { ...process.env, PATH: "/usr/bin:/bin", ...env };
    for (const [k, v] of Object.entries(env)) if (v === undefined) delete e[k];
    if (!("EXPERTMESH_NATS_SERVER" in env)) delete e["EXPERTMESH_NATS_SERVER"];
    return runCli("bash", [devSh, "nats"], undefined, e);
  }

  it("uses a finished build in the cache, without Go and without provisioning", async () => {
    const cache = emptyCache("cache-build");
    const build = join(cache, "bin", "nats-server-v2.14.9");
    mkdirSync(build, { recursive: true });
    symlinkSync(nats, join(build, "nats-server"));
    writeFileSync(join(build, ".complete"), "");
    // A newer build that provision.sh never finished (no .complete) does not count.
    const partial = join(cache, "bin", "nats-server-v2.99.0");
    mkdirSync(partial);
    symlinkSync(nats, join(partial, "nats-server"));
    const r = await devNats({ EXPERTMESH_CACHE_DIR: cache });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(join(build, "nats-server"));
    expect(r.stderr).toContain(`[dev] nats-server: ${join(build, "nats-server")}`);
    expect(r.stderr).not.toContain("[provision");
  });

  it("uses a nats-server on PATH", async () => {
    const cache = emptyCache("cache-path");
    const binDir = join(dir, "path-bin");
    mkdirSync(binDir);
    symlinkSync(nats, join(binDir, "nats-server"));
    const r = await devNats({ EXPERTMESH_CACHE_DIR: cache, PATH: `${binDir}:/usr/bin:/bin` });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(join(binDir, "nats-server"));
    expect(r.stderr).not.toContain("[provision");
  });

  it("uses $EXPERTMESH_NATS_SERVER, and stops at once when it is wrong", async () => {
    const cache = emptyCache("cache-env");
    const r = await devNats({ EXPERTMESH_CACHE_DIR: cache, EXPERTMESH_NATS_SERVER: nats });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(nats);
    const bad = await devNats({
      EXPERTMESH_CACHE_DIR: cache,
      EXPERTMESH_NATS_SERVER: join(dir, "no-such-nats-server"),
    });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain(
      `[EM_ENV_MISSING_BINARY] EXPERTMESH_NATS_SERVER=${join(dir, "no-such-nats-server")} is not an executable file`,
    );
    expect(bad.stderr).not.toContain("[provision");
  });

  it("builds one only when there is none, fetching Go rather than requiring it", async () => {
    const cache = emptyCache("cache-none");
    // No proxy: the fetch stops early with provision.sh's message instead of downloading.
    const r = await devNats({
      EXPERTMESH_CACHE_DIR: cache,
      EXPERTMESH_GO_TOOLCHAIN: "fetch",
      GOPROXY: "off",
    });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("[dev] no nats-server yet");
    expect(r.stderr).toContain("building one with test/env/provision.sh nats");
    expect(r.stderr).toContain(
      `EXPERTMESH_GO_TOOLCHAIN=fetch: using Go ${toolVersions().goToolchain} from the module proxy`,
    );
    expect(r.stderr).toContain("GOPROXY=off names no module proxy to fetch Go from");
    expect(r.stderr).not.toContain("the go command is not on PATH");
  });
});
