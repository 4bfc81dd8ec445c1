// How a serving process (gateway, shard) hears that it should stop: SIGTERM, SIGINT, and,
// as a child of `expertmesh up`, its parent going away. Installed first thing, so that a
// pod deleted while its weights load exits at once: in a container the process is PID 1,
// which ignores a signal it has no handler for, and would wait for the grace period's
// SIGKILL. Nothing is served yet, so nothing is lost: it kills itself, as a normal exit
// would wait for a read hung on a dead volume (libuv joins its threads at exit). Once it
// serves, serving(stop) hands these to its graceful stop.
//
// Writes to standard output and error that fail (their reader, `up`, is gone: EPIPE) are
// ignored: unhandled, that error would end the process before its graceful stop runs.
import { stopWhenParentGone } from "../local/parent-watch.ts";
import { formatError } from "../util/errors.ts";
import { writeTerminationMessage } from "./termination-log.ts";

export interface StopSignals {
  /** From now on a signal (or the parent's going) calls `stop` with its name. */
  serving(stop: (why: string) => void): void;
  /**
   * A fault the process cannot serve past (its NATS subscription refused): logged, then it
   * stops as for a signal (gracefully once serving) and exits with code 1.
   */
  fail(err: unknown): void;
}

export function stopSignals(log: (message: string) => void): StopSignals {
  const ignore = () => {};
  process.stdout.on("error", ignore);
  process.stderr.on("error", ignore);
  let serving = false;
  let failed = false;
  let handler: (why: string) => void = (why) => {
    log(`${why} while starting: exiting`);
    process.kill(process.pid, "SIGKILL");
  };
  process.on("SIGTERM", () => handler("SIGTERM"));
  process.on("SIGINT", () => handler("SIGINT"));
  stopWhenParentGone(() => handler("parent gone"));
  return {
    serving(stop) {
      serving = true;
      handler = stop;
    },
    fail(err) {
      if (failed) return;
      failed = true;
      log(formatError(err));
      writeTerminationMessage(formatError(err));
      process.exitCode = 1;
      if (serving) handler("fatal error");
      else process.exit(1);
    },
  };
}
