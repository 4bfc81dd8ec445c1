// Kubernetes resource quantities ("64Gi", "500M", "1.5e9", 1024) as numbers, for the memory
// checks of src/api/memory.ts. The grammar is apimachinery's resource.Quantity: a decimal
// number, then a binary suffix (Ki..Ei), a decimal one (n, u, m, k, M, G, T, P, E), or an
// exponent (e3, E-2).

const BINARY: Record<string, number> = {
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
  Pi: 2 ** 50,
  Ei: 2 ** 60,
};
const DECIMAL: Record<string, number> = {
  n: 1e-9,
  u: 1e-6,
  m: 1e-3,
  "": 1,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  P: 1e15,
  E: 1e18,
};

const QUANTITY = /^([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$/;

/** The value of a quantity, or null when it is not one. */
export function quantityValue(q: string | number): number | null {
  if (typeof q === "number") return Number.isFinite(q) ? q : null;
  const m = QUANTITY.exec(q.trim());
  if (!m) return null;
  const n = Number(m[1]);
  if (m[2] !== undefined) return n * 10 ** Number(m[2]);
  const suffix = m[3] ?? "";
  return n * (BINARY[suffix] ?? DECIMAL[suffix]!);
}
