// Reading the series selectors out of the PromQL queries in the autoscaling examples, the
// chart's alerts and its Grafana dashboard; and checking their syntax with Prometheus's own
// PromQL grammar (@prometheus-io/lezer-promql, what Prometheus's UI parses with).
import { parser } from "@prometheus-io/lezer-promql";

/** The series selectors (name and equality matchers) of a PromQL expression. */
export function promqlSelectors(query: string): { name: string; labels: Record<string, string> }[] {
  return [...query.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}/g)].map((m) => {
    const labels: Record<string, string> = {};
    for (const part of m[2]!.split(",").filter((p) => p.trim())) {
      const l = /^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"\s*$/.exec(part);
      if (!l) throw new Error(`cannot read the matcher '${part}' of ${query}`);
      // The examples select exact series; anything else would need a PromQL engine.
      if (l[2] !== "=") throw new Error(`${query}: only = matchers are checked, not ${l[2]}`);
      labels[l[1]!] = l[3]!;
    }
    return { name: m[1]!, labels };
  });
}

/**
 * Where `query` is not PromQL: the offsets of the parser's error nodes, each with the text
 * from there (empty when it parses). Grafana's range variables ($__rate_interval,
 * $__interval) are read as a duration first; other $variables only appear in label values.
 */
export function promqlSyntaxErrors(query: string): string[] {
  const q = query.replaceAll("$__rate_interval", "5m").replaceAll("$__interval", "1m");
  const errors: string[] = [];
  parser.parse(q).iterate({
    enter: (n) => {
      if (n.type.isError) errors.push(`at ${n.from}: '${q.slice(n.from, n.from + 20)}'`);
    },
  });
  return errors;
}
