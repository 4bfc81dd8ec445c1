// The folder expertmesh keeps what it builds and fetches in (Node 24, the test
// environment's binaries, tiny models): $EXPERTMESH_CACHE_DIR, else
// $XDG_CACHE_HOME/expertmesh, else ~/.cache/expertmesh — as scripts/node24.sh and
// test/env/provision.sh compute it.
import { homedir } from "node:os";
import { join } from "node:path";

export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return (
    env["EXPERTMESH_CACHE_DIR"] ??
    join(env["XDG_CACHE_HOME"] ?? join(homedir(), ".cache"), "expertmesh")
  );
}
