// Children of `expertmesh up` stop when `up` is gone, however it went. They run in process
// groups of their own (so that Ctrl-C reaches `up` alone, which stops them in order), so a
// SIGKILL of `up` would leave them running, holding the ports the next `up` wants. `up`
// gives each child a pipe as standard input and never writes to it: when `up` exits, the
// kernel closes it, and the child sees end-of-file.

/** Set by `up` in its children's environment: stop when standard input ends. */
export const STOP_ON_STDIN_EOF_ENV = "EXPERTMESH_STOP_ON_STDIN_EOF";

/** Set by `up --watch` in the environment of the `up` it runs: edits will come. */
export const UP_WATCHED_ENV = "EXPERTMESH_UP_WATCHED";

/**
 * Calls `stop` once standard input ends, when the environment asks for it (a child of
 * `up`); otherwise does nothing. Does not keep the process alive by itself.
 */
export function stopWhenParentGone(stop: () => void): void {
  if (process.env[STOP_ON_STDIN_EOF_ENV] !== "1") return;
  let called = false;
  const once = () => {
    if (called) return;
    called = true;
    stop();
  };
  process.stdin.on("end", once);
  process.stdin.on("close", once);
  process.stdin.on("error", once);
  process.stdin.resume();
  (process.stdin as { unref?: () => void }).unref?.();
}

/**
 * nats-server under a shell that stops it the same way (it does not read its standard
 * input): `sh -c NATS_UNDER_WATCH nats-server BINARY ARGS...`. The shell passes SIGTERM,
 * SIGINT and SIGHUP on to nats-server and exits with its status; a background reader of the
 * shell's standard input sends nats-server SIGTERM at end-of-file.
 */
export const NATS_UNDER_WATCH = [
  "exec 3<&0",
  '"$@" </dev/null &',
  "p=$!",
  "trap 'kill -TERM \"$p\" 2>/dev/null' TERM INT HUP",
  '{ cat >/dev/null; kill -TERM "$p" 2>/dev/null; } <&3 >/dev/null 2>&1 &',
  "exec 3<&-",
  "st=0",
  'while kill -0 "$p" 2>/dev/null; do wait "$p"; st=$?; done',
  'exit "$st"',
].join("\n");

/**
 * Calls `handle` with each line `up --watch` writes to standard input (an edited manifest
 * the gateways roll onto, src/local/watch.ts), when the environment says a parent holds it;
 * otherwise does nothing.
 */
export function onParentLines(handle: (line: string) => void): void {
  if (process.env[STOP_ON_STDIN_EOF_ENV] !== "1") return;
  let pending = "";
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk: string) => {
    pending += chunk;
    for (let i = pending.indexOf("\n"); i >= 0; i = pending.indexOf("\n")) {
      const line = pending.slice(0, i);
      pending = pending.slice(i + 1);
      if (line.trim() !== "") handle(line);
    }
  });
  process.stdin.resume();
  (process.stdin as { unref?: () => void }).unref?.();
}
