// The front suite: what `expertmesh up`'s front for several gateways (src/local/front.ts, the
// gateways' Service in local mode) costs a request, against the peer that sets the bar: the
// same gateway process reached directly, in the same rounds, the two alternating (AB, BA).
//
// One single-process gateway (`gateway --local`) on the mini V3 model; the front runs in this
// process, as it runs in `up`'s, beside the load generator. Streaming chat completions of 32
// tokens (ignore_eos) at 1 and 16 concurrent clients, each request on a connection of its own
// (fetch's pool reuses them: the front hands over connections, not requests).
import type { ChildProcess } from "node:child_process";
import { GatewayFront } from "../src/local/front.ts";
import { type AbRow, abRounds, abTable } from "./ab.ts";
import { ensureMiniModel, localGateway, SERVE_MODEL, stop } from "./serve.ts";

const PATHS = ["direct", "front"] as const;
type Path = (typeof PATHS)[number];
const LEVELS = [1, 16] as const;
const NEW_TOKENS = 32;

export type FrontRow = AbRow<Path>;

export interface FrontResults {
  runs: number;
  model: string;
  requestsPerClient: number;
  rows: FrontRow[];
}

export async function runFront(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<FrontResults> {
  const runs = o.quick ? 1 : o.runs;
  const perClient = o.quick ? 1 : 3;
  const dir = await ensureMiniModel(o.log);
  const children: ChildProcess[] = [];
  const front = new GatewayFront();
  try {
    const direct = await localGateway("gateway", dir, [], children);
    const port = Number(new URL(direct).port);
    const ports = await front.listen("127.0.0.1", 0, 0);
    front.add("gateway", { http: port, grpc: port });
    const rows = await abRounds({
      suite: "front",
      paths: PATHS,
      base: { direct, front: `http://127.0.0.1:${ports.http}` },
      levels: LEVELS,
      perClient,
      newTokens: NEW_TOKENS,
      runs,
      log: o.log,
    });
    return { runs, model: SERVE_MODEL, requestsPerClient: perClient, rows };
  } finally {
    front.close(true);
    for (const c of children) await stop(c);
  }
}

export function frontTables(
  r: FrontResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} rounds, the two paths alternating (AB, BA); from \`${source}\`. One \`gateway --local\` on ${r.model}; streaming chat completions of ${NEW_TOKENS} tokens, ${r.requestsPerClient} per client, one after another. Output tok/s: median (min-max) over rounds; the ratio is per round against the direct path of the same round, then the median; TTFT and ITL: p50 over every request of every round (ms).

${abTable(r.rows, "direct", "path", "front / direct")}`;
}
