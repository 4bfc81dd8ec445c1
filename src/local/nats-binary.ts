// Finds a nats-server binary for local mode: $EXPERTMESH_NATS_SERVER, the test
// environment's cache (`npm run env:provision -- nats`), or PATH. scripts/dev.sh asks the
// same question (`node src/local/nats-binary.ts`) before `npm start` builds one.
import { accessSync, constants, existsSync, readdirSync, statSync } from "node:fs";
import { delimiter, join } from "node:path";
import { cacheDir } from "../util/cache-dir.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";

function executable(path: string): boolean {
  try {
    if (!statSync(path).isFile()) return false;
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** "v2.14.9" > "v2.9.0": numeric parts compared as numbers. */
function byVersionDescending(a: string, b: string): number {
  return b.localeCompare(a, "en", { numeric: true });
}

export function findNatsServer(env: NodeJS.ProcessEnv = process.env): string {
  const explicit = env["EXPERTMESH_NATS_SERVER"];
  if (explicit) {
    if (executable(explicit)) return explicit;
    throw new ExpertMeshError(
      "EM_ENV_MISSING_BINARY",
      `EXPERTMESH_NATS_SERVER=${explicit} is not an executable file`,
    );
  }
  const cache = cacheDir(env);
  const bin = join(cache, "bin");
  if (existsSync(bin)) {
    // Builds provision.sh finished (it writes .complete last), newest version first.
    const builds = readdirSync(bin)
      .filter((d) => d.startsWith("nats-server-") && existsSync(join(bin, d, ".complete")))
      .sort(byVersionDescending);
    for (const d of builds) {
      const path = join(bin, d, "nats-server");
      if (executable(path)) return path;
    }
  }
  for (const dir of (env["PATH"] ?? "").split(delimiter)) {
    if (dir && executable(join(dir, "nats-server"))) return join(dir, "nats-server");
  }
  throw new ExpertMeshError(
    "EM_ENV_MISSING_BINARY",
    `no nats-server found (not in $EXPERTMESH_NATS_SERVER, ${bin}/nats-server-*/ or PATH): ` +
      "run `npm run env:provision -- nats` (builds one into that cache; it fetches a Go " +
      "toolchain itself when Go is missing), put a nats-server release " +
      "(https://github.com/nats-io/nats-server/releases) on PATH, or set EXPERTMESH_NATS_SERVER",
  );
}

// `node src/local/nats-binary.ts`: prints the path found (exit 0), or the error (exit 1).
if (import.meta.main) {
  try {
    process.stdout.write(`${findNatsServer()}\n`);
  } catch (err) {
    process.stderr.write(`${formatError(err)}\n`);
    process.exitCode = 1;
  }
}
