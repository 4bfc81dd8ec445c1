// Reading the series selectors out of the PromQL queries in the autoscaling examples.

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
