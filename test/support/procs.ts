// Whether a process a test saw is still running. `process.kill(pid, 0)` alone says yes too
// long: for a zombie (exited, not yet reaped: an orphan waits for the machine's PID 1, which
// here reaps every few seconds) and for another process that got the same PID once the
// counter wrapped (pid_max is 32768 on CI machines, and a test run starts thousands).
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";

/** When each PID a test looked at started (clock ticks since boot: /proc/PID/stat field 22). */
const started = new Map<number, string>();

/** State and start time from /proc/PID/stat; undefined when there is no such process. */
function stat(pid: number): { state: string; start: string } | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it.
  const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
  return { state: fields[0]!, start: fields[19]! };
}

/** Remembers `pid`'s start time, so that `alive` does not mistake a later process for it. */
export function track(pid: number): number {
  const s = stat(pid);
  if (s && !started.has(pid)) started.set(pid, s.start);
  return pid;
}

/** Running: not gone, not a zombie, and (if tracked) the same process as when tracked. */
export function alive(pid: number): boolean {
  const s = stat(pid);
  if (!s || s.state === "Z" || s.state === "X") return false;
  const was = started.get(pid);
  return was === undefined || was === s.start;
}

/** Every process under `pid` (children first, depth first), each tracked. */
export function descendants(pid: number): number[] {
  let kids: number[] = [];
  try {
    kids = execFileSync("pgrep", ["-P", String(pid)])
      .toString()
      .trim()
      .split("\n")
      .map(Number);
  } catch {
    return []; // pgrep exits 1 when there are none
  }
  return kids.flatMap((k) => [track(k), ...descendants(k)]);
}
