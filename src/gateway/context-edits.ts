// Anthropic's context management on the Messages API (ADR 0060): the request's
// `context_management.edits` and `compaction`, read and checked, and the edits that change the
// conversation before the prompt is made (pure; messages.ts runs them and the summary).
//
// - clear_tool_uses_20250919: once the prompt reaches `trigger` (input tokens, or tool uses),
//   the results of all tool uses but the last `keep` are replaced with a placeholder (and their
//   inputs with {}, with `clear_tool_inputs`), those of `exclude_tools` kept; with
//   `clear_at_least`, only when that many tokens go.
// - clear_thinking_20251015: thinking blocks of all assistant turns but the last `keep`. The
//   DeepSeek chat templates never render an earlier turn's thought, so this clears no tokens;
//   the turns are counted all the same (applied_edits says what the edit covered).
// - compact_20260112: once the prompt (after the edits above) reaches `trigger`, the
//   conversation is summarized and the answer runs on the summary (messages.ts).
// - `compaction: {type: "summarize"}`: the request is a compaction (the summary, no answer).
import { ApiError } from "./errors.ts";
import type { ChatMessage } from "./schemas.ts";

/** What a cleared tool result reads as. */
export const CLEARED_RESULT = "[tool result cleared]";

export interface ClearToolUses {
  readonly trigger: { readonly type: "input_tokens" | "tool_uses"; readonly value: number };
  /** Tool uses kept, the latest. */
  readonly keep: number;
  /** Tokens an activation must clear at least (0: any). */
  readonly clearAtLeast: number;
  readonly excludeTools: ReadonlySet<string>;
  /** Whether cleared uses lose their inputs too: all, none, or those of the tools named. */
  readonly clearInputs: boolean | ReadonlySet<string>;
}

export interface Compact {
  /** Input tokens that make it compact. */
  readonly trigger: number;
  /** Whether the response stops at the compaction block (stop_reason "compaction"). */
  readonly pause: boolean;
  /** The summarization prompt in place of the default (null: the default). */
  readonly instructions: string | null;
}

/** A request's context_management, checked: each edit at most once. */
export interface ContextEdits {
  /** Assistant turns whose thinking is kept (the latest), or all. */
  readonly clearThinking: { readonly keep: number | "all" } | null;
  readonly clearToolUses: ClearToolUses | null;
  readonly compact: Compact | null;
}

const bad = (message: string, param: string) =>
  new ApiError("EM_GATEWAY_BAD_REQUEST", message, { param });

const isRecord = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

const EDIT_TYPES = ["clear_thinking_20251015", "clear_tool_uses_20250919", "compact_20260112"];

/** A `{type, value}` count: `type` one of `types`, value a whole number of at least `min`. */
function countOf<T extends string>(
  v: unknown,
  types: readonly T[],
  min: number,
  param: string,
): { type: T; value: number } {
  const spelled = types.map((t) => `{"type": "${t}", "value": N}`).join(" or ");
  if (!isRecord(v) || !types.includes(v["type"] as T)) throw bad(`${param}: ${spelled}`, param);
  const n = v["value"];
  if (!(Number.isSafeInteger(n) && (n as number) >= min))
    throw bad(`${param}.value: a whole number, at least ${min}`, `${param}.value`);
  return { type: v["type"] as T, value: n as number };
}

/** A list of tool names, or null/absent. */
function namesOf(v: unknown, param: string): Set<string> | null {
  if (v == null) return null;
  if (!Array.isArray(v) || !v.every((x) => typeof x === "string"))
    throw bad(`${param}: a list of tool names`, param);
  return new Set(v as string[]);
}

/**
 * A request's `context_management` ({edits: [...]}), checked (null: none). Defaults: the
 * triggers the lesser of Anthropic's (100,000 input tokens clearing tool uses, 150,000
 * compacting) and three quarters of the context (`maxModelLen`); 3 tool uses kept; the
 * thinking of the last turn kept.
 */
export function contextEditsOf(value: unknown, maxModelLen: number): ContextEdits | null {
  if (value == null) return null;
  const p = "context_management";
  if (!isRecord(value))
    throw bad(`${p} is an object: {"edits": [{"type": "clear_tool_uses_20250919"}, ...]}`, p);
  const edits = value["edits"] ?? [];
  if (!Array.isArray(edits)) throw bad(`${p}.edits is a list of edits`, `${p}.edits`);
  const ctx = Math.max(1, Math.floor((maxModelLen * 3) / 4));
  let clearThinking: ContextEdits["clearThinking"] = null;
  let clearToolUses: ClearToolUses | null = null;
  let compact: Compact | null = null;
  const seen = new Set<string>();
  for (const [i, e] of edits.entries()) {
    const at = `${p}.edits.${i}`;
    const type = isRecord(e) ? e["type"] : undefined;
    if (!isRecord(e) || typeof type !== "string" || !EDIT_TYPES.includes(type))
      throw bad(
        `${at}.type: one of ${EDIT_TYPES.join(", ")} (got ${JSON.stringify(type ?? null).slice(0, 40)})`,
        `${at}.type`,
      );
    if (seen.has(type)) throw bad(`${at}: '${type}' is given twice`, at);
    seen.add(type);
    if (type === "clear_thinking_20251015") {
      if (i !== 0)
        throw bad(`${at}: clear_thinking_20251015 comes first among the edits`, `${at}.type`);
      const keep = e["keep"];
      clearThinking = {
        keep:
          keep === undefined || keep === null
            ? 1
            : keep === "all" || (isRecord(keep) && keep["type"] === "all")
              ? "all"
              : countOf(keep, ["thinking_turns"], 1, `${at}.keep`).value,
      };
    } else if (type === "clear_tool_uses_20250919") {
      const inputs = e["clear_tool_inputs"];
      if (inputs != null && typeof inputs !== "boolean" && !Array.isArray(inputs))
        throw bad(
          `${at}.clear_tool_inputs: true, false, or a list of tool names`,
          `${at}.clear_tool_inputs`,
        );
      clearToolUses = {
        trigger:
          e["trigger"] == null
            ? { type: "input_tokens", value: Math.min(100_000, ctx) }
            : countOf(e["trigger"], ["input_tokens", "tool_uses"], 1, `${at}.trigger`),
        keep: e["keep"] == null ? 3 : countOf(e["keep"], ["tool_uses"], 0, `${at}.keep`).value,
        clearAtLeast:
          e["clear_at_least"] == null
            ? 0
            : countOf(e["clear_at_least"], ["input_tokens"], 0, `${at}.clear_at_least`).value,
        excludeTools: namesOf(e["exclude_tools"], `${at}.exclude_tools`) ?? new Set(),
        clearInputs: Array.isArray(inputs)
          ? namesOf(inputs, `${at}.clear_tool_inputs`)!
          : inputs === true,
      };
    } else {
      const pause = e["pause_after_compaction"];
      if (pause != null && typeof pause !== "boolean")
        throw bad(`${at}.pause_after_compaction: true or false`, `${at}.pause_after_compaction`);
      compact = {
        trigger:
          e["trigger"] == null
            ? Math.min(150_000, ctx)
            : countOf(e["trigger"], ["input_tokens"], 1, `${at}.trigger`).value,
        pause: pause === true,
        instructions: instructionsOf(e["instructions"], `${at}.instructions`),
      };
    }
  }
  return { clearThinking, clearToolUses, compact };
}

/** A summarization prompt given (null: absent, empty or only whitespace). */
function instructionsOf(v: unknown, param: string): string | null {
  if (v == null) return null;
  if (typeof v !== "string") throw bad(`${param}: a string`, param);
  return v.trim() === "" ? null : v;
}

/**
 * A request's `compaction` ({"type": "summarize", "instructions"?}): its summarization prompt
 * (null: the default); undefined when absent.
 */
export function compactionRequestOf(value: unknown): { instructions: string | null } | undefined {
  if (value == null) return undefined;
  if (!isRecord(value) || value["type"] !== "summarize")
    throw bad(`compaction: {"type": "summarize", "instructions"?: "..."}`, "compaction.type");
  return { instructions: instructionsOf(value["instructions"], "compaction.instructions") };
}

type Call = NonNullable<ChatMessage["tool_calls"]>[number];

const nameOf = (t: Call) => (t.type === "custom" ? t.custom.name : t.function.name);

/** A call without its input ({} for a function's arguments, "" for a custom tool's). */
const withoutInput = (t: Call): Call =>
  t.type === "custom"
    ? { ...t, custom: { ...t.custom, input: "" } }
    : { ...t, function: { ...t.function, arguments: "{}" } };

const inputless = (t: Call) =>
  t.type === "custom" ? t.custom.input === "" : t.function.arguments === "{}";

/** The tool uses (calls) of a conversation, in order. */
function toolUses(messages: readonly ChatMessage[]): { id: string; name: string }[] {
  return messages.flatMap((m) => (m.tool_calls ?? []).map((t) => ({ id: t.id, name: nameOf(t) })));
}

/** Whether the edit is due: the prompt's tokens, or the conversation's tool uses, reach it. */
export function clearingDue(
  e: ClearToolUses,
  messages: readonly ChatMessage[],
  inputTokens: number,
): boolean {
  const n = e.trigger.type === "tool_uses" ? toolUses(messages).length : inputTokens;
  return n >= e.trigger.value;
}

/**
 * The conversation with the results of its tool uses but the last `keep` cleared (and their
 * inputs, as `clearInputs` says), those of `excludeTools` kept; `cleared`: the uses whose
 * result or input changed.
 */
export function clearToolUses(
  messages: readonly ChatMessage[],
  e: ClearToolUses,
): { messages: ChatMessage[]; cleared: number } {
  const uses = toolUses(messages);
  const older = uses
    .slice(0, Math.max(0, uses.length - e.keep))
    .filter((u) => !e.excludeTools.has(u.name));
  const ids = new Map(older.map((u) => [u.id, u.name]));
  const inputsOf = (name: string) =>
    typeof e.clearInputs === "boolean" ? e.clearInputs : e.clearInputs.has(name);
  const changed = new Set<string>();
  const out = messages.map((m): ChatMessage => {
    if (m.role === "tool" && m.tool_call_id !== undefined && ids.has(m.tool_call_id)) {
      if (m.content === CLEARED_RESULT) return m;
      changed.add(m.tool_call_id);
      return { ...m, content: CLEARED_RESULT };
    }
    if (m.tool_calls?.some((t) => ids.has(t.id) && inputsOf(nameOf(t)))) {
      return {
        ...m,
        tool_calls: m.tool_calls.map((t) => {
          if (!ids.has(t.id) || !inputsOf(nameOf(t)) || inputless(t)) return t;
          changed.add(t.id);
          return withoutInput(t);
        }),
      };
    }
    return m;
  });
  return { messages: out, cleared: changed.size };
}

/**
 * How many assistant turns (of Messages request turns, `turns`) lose their thinking when the
 * last `keep` keep theirs.
 */
export function thinkingTurnsCleared(
  turns: readonly { role: string; content: unknown }[],
  keep: number | "all",
): number {
  if (keep === "all") return 0;
  const thinking = turns.filter(
    (m) =>
      m.role === "assistant" &&
      Array.isArray(m.content) &&
      m.content.some(
        (b) => isRecord(b) && (b["type"] === "thinking" || b["type"] === "redacted_thinking"),
      ),
  ).length;
  return Math.max(0, thinking - keep);
}

/** The user turn that stands for a compacted conversation: its summary. */
export function summaryTurn(summary: string): ChatMessage {
  return {
    role: "user",
    content: `This conversation was compacted. Its summary, in place of what came before:\n\n${summary}`,
  };
}

/** What the model is asked, after the conversation, to compact it (Anthropic's compaction). */
export const COMPACT_PROMPT =
  "Summarize the conversation above, which the summary will replace: the task, the latest " +
  "request, what was done and found, what is left to do.";
