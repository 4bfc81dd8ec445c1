// `npm run bench` (scripts/dev.sh bench -> node bench/run.ts "$@"): the CPU benchmark set.
//
//   node bench/run.ts [--suite kernels] [--quick] [--threads N] [--runs N] [--out FILE] [--no-report]
//
// Suites: kernels (expert matmul + expert FFN vs PyTorch, memory bandwidth, FMA peak), and
// the others of SUITES (bench/report.ts), each in its own file here.
// A full run writes bench/results/<suite>-<date>.json and regenerates BENCHMARKS.md from
// it (bench/report.ts); --quick (V2-Lite shapes at 1, 16, 256 tokens, fewer sides) writes
// bench/results/<suite>-<date>.quick.tmp.json (git-ignored) and leaves BENCHMARKS.md alone.
// The rules: /work/shared/BENCHMARKING.md, summarized at the top of BENCHMARKS.md.
import { mkdirSync, writeFileSync } from "node:fs";
import { availableParallelism, loadavg } from "node:os";
import { join, relative } from "node:path";
import { parseArgs } from "node:util";
import { runAutoscale } from "./autoscale.ts";
import { autoscaleTables } from "./autoscale-report.ts";
import { runBatches } from "./batches.ts";
import { runContext } from "./context.ts";
import { runDisagg } from "./disagg.ts";
import { runDiskRead } from "./disk-read.ts";
import { runDiskShared } from "./disk-shared.ts";
import { runDispatch } from "./dispatch.ts";
import { dispatchTables } from "./dispatch-report.ts";
import { runDtype } from "./dtype.ts";
import { runFetch } from "./fetch.ts";
import { runFront } from "./front.ts";
import { runInvariant } from "./invariant.ts";
import { runIsa } from "./isa.ts";
import { runJson } from "./json.ts";
import { runKernels } from "./kernels.ts";
import { runKvCache } from "./kv-cache.ts";
import { formatLikeRepo, gitCommit, machineInfo, REPO_ROOT, RESULTS_DIR, today } from "./lib.ts";
import { runPool } from "./pool.ts";
import { runPrefix } from "./prefix.ts";
import { runPriority } from "./priority.ts";
import { kernelTables, SUITES, type Suite, TABLES_ONLY, updateBenchmarksMd } from "./report.ts";
import { runResponses } from "./responses.ts";
import { runSampling } from "./sampling.ts";
import { runServe } from "./serve.ts";
import { serveTables } from "./serve-report.ts";
import { runSpeculative } from "./speculative.ts";
import { runTls } from "./tls.ts";
import { runTokenize } from "./tokenize.ts";
import { runTracing } from "./tracing.ts";

const USAGE = `usage: node bench/run.ts [options]   (npm run bench -- [options])
  --suite NAME   suite to run, repeatable or comma-separated: ${SUITES.join(", ")}, all (default: all)
  --quick        a smoke run in about a minute: V2-Lite shapes at 1, 16, 256 tokens, ours vs torch
                 only; results go to bench/results/*.quick.tmp.json, BENCHMARKS.md is not touched
  --threads N    threads for ours, PyTorch and the limit loops (default: all CPUs, ${availableParallelism()} here)
  --runs N       counted runs per row (default 5, at least 5 unless --quick)
  --out FILE     results JSON (default bench/results/<suite>-<date>.json)
  --no-report    do not regenerate BENCHMARKS.md
  -h, --help`;

/** The suites whose section is their tables alone (report.ts: TABLES_ONLY), and their runs. */
const RUN_TABLES_ONLY: Record<
  keyof typeof TABLES_ONLY,
  (o: {
    threads: number;
    runs: number;
    quick: boolean;
    log: (s: string) => void;
  }) => Promise<object>
> = {
  tokenize: runTokenize,
  prefix: runPrefix,
  json: runJson,
  sampling: runSampling,
  speculative: runSpeculative,
  kvcache: runKvCache,
  pool: runPool,
  dtype: runDtype,
  priority: runPriority,
  isa: runIsa,
  diskread: runDiskRead,
  diskshared: runDiskShared,
  disagg: runDisagg,
  invariant: runInvariant,
  front: runFront,
  tracing: runTracing,
  tls: runTls,
  fetch: runFetch,
  batches: runBatches,
  responses: runResponses,
  context: runContext,
};

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      suite: { type: "string", multiple: true },
      quick: { type: "boolean", default: false },
      threads: { type: "string" },
      runs: { type: "string" },
      out: { type: "string" },
      "no-report": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const requested = (values.suite ?? ["all"]).flatMap((s) => s.split(",")).filter(Boolean);
  const suites: Suite[] = [];
  for (const s of requested) {
    if (s === "all") suites.push(...SUITES);
    else if ((SUITES as readonly string[]).includes(s)) suites.push(s as Suite);
    else {
      console.error(`unknown suite '${s}'\n${USAGE}`);
      return 2;
    }
  }
  const threads = values.threads ? Number(values.threads) : availableParallelism();
  const runs = values.runs ? Number(values.runs) : 5;
  if (!Number.isInteger(threads) || threads < 1) {
    console.error(`--threads must be a positive integer\n${USAGE}`);
    return 2;
  }
  if (!Number.isInteger(runs) || runs < 1 || (runs < 5 && !values.quick)) {
    console.error("--runs must be an integer >= 5 (BENCHMARKING.md: at least 5 counted runs)");
    return 2;
  }
  const log = (s: string) => console.error(s);

  // Writes a suite's results to bench/results (numbers to 5 significant digits unless
  // `exact`: far below any run's spread, and the files stay small), prints its tables, and
  // regenerates BENCHMARKS.md from a full run.
  const save = (
    suite: Suite,
    results: object,
    tables: (source: string) => string,
    exact = false,
  ) => {
    mkdirSync(RESULTS_DIR, { recursive: true });
    const out =
      values.out ??
      join(RESULTS_DIR, `${suite}-${today()}${values.quick ? ".quick.tmp" : ""}.json`);
    const round = (_k: string, v: unknown) =>
      typeof v === "number" && !Number.isInteger(v) ? Number(v.toPrecision(5)) : v;
    writeFileSync(
      out,
      formatLikeRepo(`${JSON.stringify(results, exact ? undefined : round)}\n`, out),
    );
    console.log(tables(relative(REPO_ROOT, out)));
    if (!values.quick && !values["no-report"]) {
      const md = updateBenchmarksMd({ [suite]: out });
      log(`[bench] ${relative(REPO_ROOT, md)} regenerated from ${relative(REPO_ROOT, out)}`);
    }
  };
  /** When and at which commit the run was made. */
  const stamp = () => ({
    date: new Date().toISOString().slice(0, 16).replace("T", " ") + " UTC",
    ...gitCommit(),
  });

  for (const suite of new Set(suites)) {
    if (suite === "autoscale") {
      // A deterministic simulation of the operator's decision code: one run is exact, and
      // nothing in it depends on this machine's speed.
      const results = { suite, ...stamp(), ...runAutoscale(log) };
      save(suite, results, () => autoscaleTables(results));
    }
    if (suite in RUN_TABLES_ONLY) {
      const name = suite as keyof typeof RUN_TABLES_ONLY;
      const machine = machineInfo();
      const res = await RUN_TABLES_ONLY[name]({ threads, runs, quick: values.quick, log });
      const results = { suite, ...stamp(), machine, ...res };
      save(suite, results, (source) => TABLES_ONLY[name](results as never, source));
    }
    if (suite === "dispatch") {
      const machine = machineInfo();
      const { rows, natsVersion } = await runDispatch({ runs, quick: values.quick, log });
      const order = "all-orders" as const;
      const results = { suite, ...stamp(), machine, natsVersion, runs, order, rows };
      save(suite, results, (source) => dispatchTables(results, source), true);
    }
    if (suite === "serve") {
      const machine = machineInfo();
      // Repetitions of the whole load (each level of each configuration): 3 unless --runs
      // is given, to keep the suite under ~15 minutes on 2 cores.
      const res = await runServe({
        threads,
        runs,
        quick: values.quick,
        log,
        ...(values.runs ? { repetitions: runs } : {}),
      });
      const loadavgEnd = loadavg().map((v) => Math.round(v * 100) / 100);
      const results = { suite, ...stamp(), machine: { ...machine, loadavgEnd }, ...res };
      save(suite, results, (source) => serveTables(results, source));
    }
    if (suite === "kernels") {
      const results = await runKernels({
        threads,
        runs,
        quick: values.quick,
        targetRunSeconds: values.quick ? 0.05 : 0.1,
        coldBytes: 256 * 1024 * 1024,
        log,
      });
      log(`[bench] kernels: ${results.seconds.toFixed(0)} s`);
      save(suite, results, (source) => kernelTables(results, source));
    }
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    console.error(`[bench] failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    process.exit(1);
  },
);
