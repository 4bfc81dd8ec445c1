// The PromQL checks the chart's tests lean on (test/support/promql.ts): Prometheus's grammar
// accepts what Prometheus runs and refuses what it would refuse, with Grafana's variables.
import { describe, expect, it } from "vitest";
import { promqlSelectors, promqlSyntaxErrors } from "../support/promql.ts";

describe("promqlSyntaxErrors", () => {
  it.each([
    'sum by (le) (rate(a_bucket{x="1"}[5m]))',
    'histogram_quantile(0.99, sum by (le, shard) (rate(a_bucket{ns="$namespace"}[$__rate_interval])))',
    'max(a{c="Ready"}) or on() vector(0)',
    "absent(a == 1)",
    "sum(rate(a[$__interval])) / sum(rate(b[$__interval]))",
  ])("accepts %s", (q) => {
    expect(promqlSyntaxErrors(q)).toEqual([]);
  });
  it.each([
    "sum by (le (rate(a[5m]))", // an unclosed grouping
    "a{x=1}", // an unquoted label value
    "rate(a[$__range_unknown])", // a variable Grafana would not turn into a duration
    "sum(rate(a[5m])", // an unclosed call
    'a{x="1"} +', // an operator without its right side
  ])("refuses %s", (q) => {
    expect(promqlSyntaxErrors(q).length).toBeGreaterThan(0);
  });
});

describe("promqlSelectors", () => {
  it("reads each selector's name and equality matchers", () => {
    expect(promqlSelectors('sum(rate(a_total{x="1", y="$v"}[5m])) / b{z="2"}')).toEqual([
      { name: "a_total", labels: { x: "1", y: "$v" } },
      { name: "b", labels: { z: "2" } },
    ]);
  });
});
