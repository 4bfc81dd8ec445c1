// Finds a nats-server binary for local mode: $EXPERTMESH_NATS_SERVER, the test
// environment's cache (`npm run env:provision`), or PATH.
import { existsSync, readdirSync } from "node:fs";
import { homedir } from "node:os";
import { delimiter, join } from "node:path";
import { ExpertMeshError } from "../util/errors.ts";

export function findNatsServer(): string {
  const explicit = process.env["EXPERTMESH_NATS_SERVER"];
  if (explicit) {
    if (existsSync(explicit)) return explicit;
    throw new ExpertMeshError(
      "EM_ENV_MISSING_BINARY",
      `EXPERTMESH_NATS_SERVER=${explicit} does not exist`,
    );
  }
  const cache =
    process.env["EXPERTMESH_CACHE_DIR"] ??
    join(process.env["XDG_CACHE_HOME"] ?? join(homedir(), ".cache"), "expertmesh");
  const bin = join(cache, "bin");
  if (existsSync(bin)) {
    const builds = readdirSync(bin)
      .filter((d) => d.startsWith("nats-server-"))
      .sort()
      .reverse();
    for (const d of builds)
      if (existsSync(join(bin, d, "nats-server"))) return join(bin, d, "nats-server");
  }
  for (const dir of (process.env["PATH"] ?? "").split(delimiter)) {
    if (dir && existsSync(join(dir, "nats-server"))) return join(dir, "nats-server");
  }
  throw new ExpertMeshError(
    "EM_ENV_MISSING_BINARY",
    "no nats-server found: run `npm run env:provision` (builds one into ~/.cache/expertmesh/bin), install one on PATH, or set EXPERTMESH_NATS_SERVER",
  );
}
