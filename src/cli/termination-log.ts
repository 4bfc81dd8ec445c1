// Why a process failed, where Kubernetes looks for it: the kubelet mounts a file at the
// container's terminationMessagePath (default /dev/termination-log; writable even on a
// read-only root filesystem) and copies what the process wrote there, at most 4096 bytes,
// into status.containerStatuses[].lastState.terminated.message. The operator reads it back
// from the pods and names it in the model's Degraded condition (status.ts), so
// `kubectl describe dsm` says `[EM_CKPT_READ] ...` where it would say only CrashLoopBackOff.
// Outside a pod that file does not exist and nothing is written.
import { statSync, writeFileSync } from "node:fs";

/** Overrides the file (tests; a container spec with another terminationMessagePath). */
export const TERMINATION_LOG_ENV = "EM_TERMINATION_LOG";
export const TERMINATION_LOG_DEFAULT = "/dev/termination-log";
/** The kubelet keeps this many bytes of a container's message. */
export const TERMINATION_MESSAGE_MAX_BYTES = 4096;

/** Writes `text` (cut to what the kubelet keeps) when the file exists; never throws. */
export function writeTerminationMessage(text: string): void {
  const path = process.env[TERMINATION_LOG_ENV] || TERMINATION_LOG_DEFAULT;
  try {
    if (!statSync(path).isFile()) return;
    let bytes = Buffer.from(text, "utf8");
    if (bytes.length > TERMINATION_MESSAGE_MAX_BYTES) {
      // Cut on a character boundary: a UTF-8 continuation byte is 10xxxxxx.
      let end = TERMINATION_MESSAGE_MAX_BYTES;
      while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
      bytes = bytes.subarray(0, end);
    }
    writeFileSync(path, bytes);
  } catch {
    // No such file (not a pod), or not writable: the log line says it anyway.
  }
}
