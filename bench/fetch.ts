// The fetch suite (`npm run bench -- --suite fetch`): what checking each weights file against
// the SHA-256 the Hub lists costs `expertmesh fetch` (src/local/hf-hub.ts; ADR 0040's
// amendment), against the peer that sets the bar: the same fetch trusting sizes alone
// (`--no-verify`, what it did before), the two taking turns (AB, BA).
//
// The Hub is test/support/hub.ts's stand-in in a process of its own (bench/hub-server.ts) on
// loopback, serving a checkpoint of FILES safetensors files of random bytes: a network faster
// than any real one, so the ratio here is the worst case (a link slower than the hash rate
// hides the hash behind the transfer). Each run fetches everything into a fresh folder
// (hubDownload, four files at a time, as `fetch --dir`), then deletes it. Measured per run:
// MB/s (bytes / wall time) and the fetching process's CPU seconds per GB; and, alone, one
// core's SHA-256 rate on a buffer in memory (the ceiling of a checked fetch).
import { type ChildProcess, spawn } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hubDownload } from "../src/local/hf-hub.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { stop } from "./serve.ts";

const REPO = "bench/random-weights";
const FILES = 4;

export interface FetchSide {
  mbPerS: Stats;
  cpuSPerGb: Stats;
}

export interface FetchResults {
  runs: number;
  files: number;
  fileBytes: number;
  /** One core's SHA-256 over a buffer in memory, MB/s. */
  sha256MbPerS: Stats;
  checked: FetchSide;
  unchecked: FetchSide;
  /** checked / unchecked MB/s, per AB pair, then the median. */
  ratio: Stats;
}

/** The stand-in Hub in its own process; resolves its endpoint. */
async function startHub(dir: string): Promise<{ proc: ChildProcess; endpoint: string }> {
  const proc = spawn(
    process.execPath,
    [new URL("./hub-server.ts", import.meta.url).pathname, REPO, dir],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const endpoint = await new Promise<string>((resolve, reject) => {
    let out = "";
    proc.stdout!.on("data", (c: Buffer) => {
      out += c.toString();
      if (out.includes("\n")) resolve(out.trim());
    });
    proc.on("exit", (code) => reject(new Error(`bench/hub-server.ts exited (${code})`)));
  });
  return { proc, endpoint };
}

export async function runFetch(o: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<FetchResults> {
  const fileBytes = (o.quick ? 16 : 256) * 2 ** 20;
  const runs = o.quick ? 2 : o.runs;
  const src = mkdtempSync(join(tmpdir(), "em-bench-fetch-src-"));
  writeFileSync(join(src, "config.json"), JSON.stringify({ model_type: "deepseek_v3" }));
  const block = Buffer.alloc(fileBytes);
  for (let k = 0; k < FILES; k++) {
    randomFillSync(block);
    writeFileSync(join(src, `model-0000${k + 1}-of-0000${FILES}.safetensors`), block);
  }
  const total = FILES * fileBytes;

  // One core's SHA-256: the same buffer hashed in 64 KiB chunks (a transfer's chunk size).
  const sha: number[] = [];
  for (let r = 0; r < runs; r++) {
    const hash = createHash("sha256");
    const t0 = performance.now();
    for (let at = 0; at < block.length; at += 65536) hash.update(block.subarray(at, at + 65536));
    hash.digest();
    sha.push(block.length / 1e6 / ((performance.now() - t0) / 1000));
  }

  const hub = await startHub(src);
  const sides = { checked: true, unchecked: false } as const;
  const measured: Record<keyof typeof sides, { mb: number[]; cpu: number[] }> = {
    checked: { mb: [], cpu: [] },
    unchecked: { mb: [], cpu: [] },
  };
  try {
    const once = async (side: keyof typeof sides) => {
      const dir = mkdtempSync(join(tmpdir(), "em-bench-fetch-"));
      try {
        const cpu0 = process.cpuUsage();
        const t0 = performance.now();
        const got = await hubDownload({
          repo: REPO,
          revision: "main",
          endpoint: hub.endpoint,
          dir,
          verify: sides[side],
        });
        const s = (performance.now() - t0) / 1000;
        const cpu = process.cpuUsage(cpu0);
        if (got.fetched < total) throw new Error(`fetched ${got.fetched} of ${total} bytes`);
        return {
          mb: got.fetched / 1e6 / s,
          cpu: (cpu.user + cpu.system) / 1e6 / (got.fetched / 1e9),
        };
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    };
    await once("checked"); // warm-ups: the JIT, the hub's first sends
    await once("unchecked");
    for (let r = 0; r < runs; r++) {
      const order: (keyof typeof sides)[] =
        r % 2 === 0 ? ["checked", "unchecked"] : ["unchecked", "checked"];
      for (const side of order) {
        const m = await once(side);
        measured[side].mb.push(m.mb);
        measured[side].cpu.push(m.cpu);
      }
      o.log(
        `[bench] fetch run ${r + 1}/${runs}: checked ${measured.checked.mb.at(-1)!.toFixed(0)} MB/s, unchecked ${measured.unchecked.mb.at(-1)!.toFixed(0)} MB/s`,
      );
    }
  } finally {
    hub.proc.stdin!.end();
    await stop(hub.proc);
    rmSync(src, { recursive: true, force: true });
  }
  const side = (k: keyof typeof sides): FetchSide => ({
    mbPerS: stats(measured[k].mb),
    cpuSPerGb: stats(measured[k].cpu),
  });
  return {
    runs,
    files: FILES,
    fileBytes,
    sha256MbPerS: stats(sha),
    checked: side("checked"),
    unchecked: side("unchecked"),
    ratio: stats(measured.checked.mb.map((mb, i) => mb / measured.unchecked.mb[i]!)),
  };
}

export function fetchTables(
  r: FetchResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const row = (name: string, s: FetchSide, vs: string) =>
    `| ${name} | ${medianRange(s.mbPerS, 0)} | ${vs} | ${medianRange(s.cpuSPerGb, 2)} |`;
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} counted runs per side after a warm-up each, sides alternating; from \`${source}\`. The stand-in Hub (its own process) on loopback serves ${r.files} files of ${r.fileBytes / 2 ** 20} MiB of random bytes; each run fetches all of them into a fresh folder, four at a time. Medians (min-max). One core's SHA-256 on a buffer in memory: ${medianRange(r.sha256MbPerS, 0)} MB/s.

| fetch | MB/s | against unchecked | client CPU s per GB |
|---|---:|---:|---:|
${row("checked (SHA-256, the default)", r.checked, `**${r.ratio.median.toFixed(2)}x** (${r.ratio.min.toFixed(2)}-${r.ratio.max.toFixed(2)})`)}
${row("unchecked (`--no-verify`)", r.unchecked, "1.00x (the peer)")}`;
}
