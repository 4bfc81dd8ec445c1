// Progress of long-running local work (loading weights, writing the tiny model): the line
// protocol children use to report it to `expertmesh up`, and the text of one progress bar.
// Pure functions only; src/local/progress-board.ts draws them on a terminal or a log.

/** Set to "1" in a child's environment by `expertmesh up`: report progress as protocol lines. */
export const PROGRESS_ENV = "EXPERTMESH_PROGRESS";
/** Every protocol line on a child's stderr starts with this, then one JSON object. */
export const PROGRESS_PREFIX = "@expertmesh-progress ";

/** One progress report of a child (or of `up` itself). */
export interface ProgressEvent {
  /** What `done`/`total` count: "layers", "experts", or "bytes" (then they are bytes). */
  readonly unit: string;
  readonly done: number;
  readonly total: number;
  /** Bytes read or written so far, and how many in all (0: not known). */
  readonly bytes: number;
  readonly totalBytes: number;
  /** Since the work began. */
  readonly elapsedMs: number;
  /** True on the last report: the work is complete. */
  readonly finished: boolean;
}

/** A progress bar: the last event plus whether the work ended, and how. */
export interface BarState extends ProgressEvent {
  readonly status: "waiting" | "running" | "done" | "failed";
  /** Why it failed (status "failed"). */
  readonly reason?: string;
}

/** A bar with nothing counted yet. */
export function emptyBar(unit: string, status: BarState["status"] = "waiting"): BarState {
  return {
    unit,
    done: 0,
    total: 0,
    bytes: 0,
    totalBytes: 0,
    elapsedMs: 0,
    finished: false,
    status,
  };
}

/** The protocol line for `e` (no newline). */
export function encodeProgress(e: ProgressEvent): string {
  return PROGRESS_PREFIX + JSON.stringify(e);
}

/** The event in a protocol line; null for any other line (or a malformed event). */
export function parseProgressLine(line: string): ProgressEvent | null {
  if (!line.startsWith(PROGRESS_PREFIX)) return null;
  let v: unknown;
  try {
    v = JSON.parse(line.slice(PROGRESS_PREFIX.length));
  } catch {
    return null;
  }
  if (typeof v !== "object" || v === null) return null;
  const o = v as Record<string, unknown>;
  const num = (k: string) =>
    typeof o[k] === "number" && Number.isFinite(o[k]) && (o[k] as number) >= 0;
  if (
    typeof o["unit"] !== "string" ||
    !["done", "total", "bytes", "totalBytes", "elapsedMs"].every(num)
  )
    return null;
  return {
    unit: o["unit"],
    done: o["done"] as number,
    total: o["total"] as number,
    bytes: o["bytes"] as number,
    totalBytes: o["totalBytes"] as number,
    elapsedMs: o["elapsedMs"] as number,
    finished: o["finished"] === true,
  };
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** 512 B, 1.5 KiB, 12.0 MiB, 1.25 GiB. */
export function formatBytes(n: number): string {
  if (n < KiB) return `${Math.round(n)} B`;
  if (n < MiB) return `${(n / KiB).toFixed(1)} KiB`;
  if (n < GiB) return `${(n / MiB).toFixed(1)} MiB`;
  return `${(n / GiB).toFixed(2)} GiB`;
}

/** 0.4s, 12.0s, 3m05s, 1h02m. */
export function formatElapsed(ms: number): string {
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, "0")}m`;
}

/** How far along, in [0, 1]: by bytes when their total is known, else by count. */
export function fractionOf(s: BarState): number {
  if (s.status === "done") return 1;
  const f = s.totalBytes > 0 ? s.bytes / s.totalBytes : s.total > 0 ? s.done / s.total : 0;
  return Math.min(1, Math.max(0, f));
}

/** "4/12 experts" or, for unit bytes, "1.5 KiB/3.0 KiB" (when done: "3.0 KiB"). */
function countText(s: BarState): string {
  if (s.unit === "bytes")
    return s.status === "done"
      ? formatBytes(s.total)
      : `${formatBytes(s.done)}/${formatBytes(s.total)}`;
  return `${s.done}/${s.total} ${s.unit}`;
}

/** "1.5/3.0 KiB"-style bytes, or "" when the count already is bytes. */
function bytesText(s: BarState): string {
  if (s.unit === "bytes") return "";
  if (s.status === "done" || s.totalBytes === 0) return formatBytes(s.bytes);
  return `${formatBytes(s.bytes)}/${formatBytes(s.totalBytes)}`;
}

/**
 * One bar for a terminal, never longer than `width` columns (so redrawing in place never
 * wraps): `label  [#####-----]  40%  4/10 experts  1.5/3.0 KiB  0.4s`. The bar shrinks
 * (down to 10 cells, then it is left out) before the text is cut.
 */
export function renderBar(label: string, s: BarState, width: number, labelWidth = 0): string {
  const name = label.padEnd(labelWidth);
  const pct = `${String(Math.floor(fractionOf(s) * 100)).padStart(3)}%`;
  let tail: string;
  if (s.status === "waiting") tail = "waiting";
  else if (s.status === "failed")
    tail = `${s.total > 0 ? `${countText(s)}  ` : ""}failed: ${s.reason ?? "unknown"}`;
  else {
    const bytes = bytesText(s);
    const time =
      s.status === "done" ? `done in ${formatElapsed(s.elapsedMs)}` : formatElapsed(s.elapsedMs);
    tail = [countText(s), bytes, time].filter(Boolean).join("  ");
  }
  const fixed = `${name}  [] ${pct}  ${tail}`.length;
  const cells = Math.min(30, width - fixed);
  let line: string;
  if (s.status === "waiting") line = `${name}  ${tail}`;
  else if (cells >= 10) {
    const full = Math.round(fractionOf(s) * cells);
    line = `${name}  [${"#".repeat(full)}${"-".repeat(cells - full)}] ${pct}  ${tail}`;
  } else line = `${name}  ${pct}  ${tail}`;
  return line.length <= width ? line : `${line.slice(0, Math.max(0, width - 1))}~`;
}

/**
 * One plain log line (no bar, no cursor movement) for logs that are not a terminal:
 * `shard-0.0: 40% (4/10 experts, 1.5/3.0 KiB, 0.4s)`,
 * `shard-0.0: done (10/10 experts, 3.0 KiB) in 0.9s`,
 * `shard-0.0: failed at 40% (4/10 experts): exited (1)`.
 */
export function renderPlain(label: string, s: BarState): string {
  const pct = `${Math.floor(fractionOf(s) * 100)}%`;
  if (s.status === "waiting") return `${label}: waiting`;
  if (s.status === "failed") {
    const where = s.total > 0 ? ` at ${pct} (${countText(s)})` : "";
    return `${label}: failed${where}: ${s.reason ?? "unknown"}`;
  }
  if (s.status === "done") {
    const what = [countText(s), bytesText(s)].filter(Boolean).join(", ");
    return `${label}: done (${what}) in ${formatElapsed(s.elapsedMs)}`;
  }
  const parts = [countText(s), bytesText(s), formatElapsed(s.elapsedMs)].filter(Boolean);
  return `${label}: ${pct} (${parts.join(", ")})`;
}

/** When a plain line was last written for a bar. */
export interface PlainMark {
  readonly atMs: number;
  /** floor(fraction * 10) then. */
  readonly tenth: number;
}

/**
 * Whether a plain log wants a line for a running bar now: at most one a second, and then
 * only when it reached a new 10% step, or when a report comes 10 s or more after the
 * last line (slow loads still show they are alive); never at 100% (the "done" line comes
 * next). Ended bars (done, failed) always get their line.
 */
export function plainLineDue(last: PlainMark, s: BarState, nowMs: number): boolean {
  if (s.status === "done" || s.status === "failed") return true;
  if (s.status === "waiting" || fractionOf(s) >= 1) return false; // "done" follows
  const since = nowMs - last.atMs;
  if (since >= 10_000) return true;
  return since >= 1000 && Math.floor(fractionOf(s) * 10) > last.tenth;
}
