// Progress bars of `expertmesh up` on its stderr: one per child that loads weights (and one
// while the tiny model is written). On a terminal they stay at the bottom and are redrawn
// in place (ANSI cursor movement, at most every `redrawMs`), with the children's log lines
// printed above them; when every bar has ended they are left as they are and the next
// lines follow below. Anywhere else (CI logs, a pipe) each bar gets plain lines instead:
// at most one a second at new 10% steps, and one when it ends (see plainLineDue).
import {
  type BarState,
  emptyBar,
  fractionOf,
  type PlainMark,
  type ProgressEvent,
  plainLineDue,
  renderBar,
  renderPlain,
} from "./progress.ts";

/** Where the board writes: process.stderr, or anything with the same few members. */
export interface BoardOutput {
  write(s: string): unknown;
  readonly isTTY?: boolean;
  readonly columns?: number;
  readonly rows?: number;
}

export interface BoardOptions {
  /** Draw bars in place (default: out.isTTY). */
  readonly tty?: boolean;
  /** Clock, in ms (default Date.now). */
  readonly now?: () => number;
  /** Least time between two redraws of running bars (default 100 ms). */
  readonly redrawMs?: number;
  /** Before every plain line (default "[up] "). */
  readonly prefix?: string;
}

interface Bar {
  readonly label: string;
  state: BarState;
  /** When its state last changed (running bars' elapsed time goes on from there). */
  at: number;
  mark: PlainMark;
}

/** Moves the cursor to the start of the line `n` lines up and clears to the screen's end. */
const up = (n: number) => (n > 0 ? `\x1b[${n}F\x1b[J` : "");

export class ProgressBoard {
  readonly tty: boolean;
  private readonly out: BoardOutput;
  private readonly now: () => number;
  private readonly redrawMs: number;
  private readonly prefix: string;
  /** Bars of the current block, in the order they came. */
  private bars: Bar[] = [];
  /** Lines the last drawing took (terminal only). */
  private drawn = 0;
  private lastDraw = Number.NEGATIVE_INFINITY;
  private pending: ReturnType<typeof setTimeout> | null = null;
  private ticker: ReturnType<typeof setInterval> | null = null;

  constructor(out: BoardOutput, opts: BoardOptions = {}) {
    this.out = out;
    this.tty = opts.tty ?? out.isTTY === true;
    this.now = opts.now ?? Date.now;
    this.redrawMs = opts.redrawMs ?? 100;
    this.prefix = opts.prefix ?? "[up] ";
  }

  /** A bar that waits for its first report (a child that is starting). */
  add(label: string, unit = ""): void {
    if (this.find(label)) return;
    const t = this.now();
    this.bars.push({
      label,
      at: t,
      mark: { atMs: t, tenth: 0 },
      state: emptyBar(unit),
    });
    if (this.tty) this.schedule();
  }

  /** A report for `label` (its bar is made if it has none); `finished` ends the bar. */
  update(label: string, e: Omit<ProgressEvent, "elapsedMs"> & { elapsedMs?: number }): void {
    let bar = this.find(label);
    if (!bar) {
      this.add(label, e.unit);
      bar = this.find(label)!;
    }
    if (ended(bar.state)) return;
    const t = this.now();
    const elapsedMs =
      e.elapsedMs ?? (bar.state.status === "waiting" ? 0 : bar.state.elapsedMs + (t - bar.at));
    if (bar.state.status === "waiting" && e.elapsedMs === undefined)
      bar.mark = { atMs: t, tenth: 0 };
    bar.state = { ...e, elapsedMs, status: e.finished ? "done" : "running" };
    bar.at = t;
    this.changed(bar);
  }

  /** Ends `label`'s bar as failed (a child that exited while loading). No-op once ended. */
  fail(label: string, reason: string): void {
    const bar = this.find(label);
    if (!bar || ended(bar.state)) return;
    const t = this.now();
    const elapsedMs =
      bar.state.status === "running" ? bar.state.elapsedMs + (t - bar.at) : bar.state.elapsedMs;
    bar.state = { ...bar.state, elapsedMs, status: "failed", reason };
    bar.at = t;
    this.changed(bar);
  }

  /** One line of text (no newline), printed above the bars. */
  log(text: string): void {
    if (!this.tty || this.drawn === 0) {
      this.out.write(`${text}\n`);
      return;
    }
    this.out.write(`${up(this.drawn)}${text}\n${this.frame()}`);
  }

  /** Ends every bar still open as failed with `reason`, draws the last state, stops timers. */
  close(reason = "stopped"): void {
    for (const b of [...this.bars]) if (!ended(b.state)) this.fail(b.label, reason);
    this.stopTimers();
  }

  private find(label: string): Bar | undefined {
    return this.bars.find((b) => b.label === label);
  }

  private changed(bar: Bar): void {
    if (!this.tty) {
      const t = this.now();
      if (plainLineDue(bar.mark, bar.state, t)) {
        this.out.write(`${this.prefix}${renderPlain(bar.label, this.shown(bar, t))}\n`);
        bar.mark = { atMs: t, tenth: Math.floor(fractionOf(bar.state) * 10) };
      }
      if (this.bars.every((b) => ended(b.state))) this.bars = [];
      return;
    }
    if (ended(bar.state)) this.draw();
    else this.schedule();
  }

  /** The state to show now: a running bar's clock keeps going between reports. */
  private shown(bar: Bar, t: number): BarState {
    return bar.state.status === "running"
      ? { ...bar.state, elapsedMs: bar.state.elapsedMs + (t - bar.at) }
      : bar.state;
  }

  private schedule(): void {
    const wait = this.lastDraw + this.redrawMs - this.now();
    if (wait <= 0) this.draw();
    else if (!this.pending) {
      this.pending = setTimeout(() => {
        this.pending = null;
        this.draw();
      }, wait);
      this.pending.unref?.();
    }
  }

  private draw(): void {
    if (this.pending) {
      clearTimeout(this.pending);
      this.pending = null;
    }
    this.out.write(`${up(this.drawn)}${this.frame()}`);
    this.lastDraw = this.now();
    if (this.bars.length > 0 && this.bars.every((b) => ended(b.state))) {
      // The block is complete: leave it on screen as plain text.
      this.bars = [];
      this.drawn = 0;
      this.stopTimers();
    } else if (!this.ticker && this.bars.length > 0) {
      // Elapsed times keep moving while a child is quiet (one large tensor, say).
      this.ticker = setInterval(() => this.draw(), 1000);
      this.ticker.unref?.();
    }
  }

  /** The bars as text (terminal), and sets `drawn` to its line count. */
  private frame(): string {
    const t = this.now();
    // A terminal that reports no size (0 x 0, as under `script` without one) gets 80 x 24.
    const width = Math.max(20, (this.out.columns || 80) - 1);
    const room = Math.max(2, (this.out.rows || 24) - 2);
    let shown = this.bars;
    let rest = "";
    if (shown.length > room) {
      // Too many to show: open bars first, then the summary of the others.
      const rank = (b: Bar) => ({ running: 0, waiting: 1, failed: 2, done: 3 })[b.state.status];
      const keep = new Set([...this.bars].sort((a, b) => rank(a) - rank(b)).slice(0, room - 1));
      shown = this.bars.filter((b) => keep.has(b));
      const others = this.bars.filter((b) => !keep.has(b));
      const count = (s: BarState["status"]) => others.filter((b) => b.state.status === s).length;
      rest = `... ${others.length} more: ${count("done")} done, ${count("running")} loading, ${count("waiting")} waiting, ${count("failed")} failed`;
    }
    const labelWidth = Math.max(...shown.map((b) => b.label.length));
    const lines = shown.map((b) => renderBar(b.label, this.shown(b, t), width, labelWidth));
    if (rest) lines.push(rest.slice(0, width));
    this.drawn = lines.length;
    return lines.map((l) => `${l}\n`).join("");
  }

  private stopTimers(): void {
    if (this.pending) clearTimeout(this.pending);
    if (this.ticker) clearInterval(this.ticker);
    this.pending = null;
    this.ticker = null;
  }
}

function ended(s: BarState): boolean {
  return s.status === "done" || s.status === "failed";
}
