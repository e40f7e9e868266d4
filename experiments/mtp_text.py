"""The multi-token experiment's printed summary (experiments/mtp.py): one line per run, the table
of a head-kind comparison, and the plain statements of which decodings are slower than greedy and
why."""

from __future__ import annotations


def kinds_table(runs: list[dict]) -> list[str]:
  """The `compare_kinds` table: per run its blocks, next-token loss, per-head accuracy, chain and
  tree tokens per forward, pass costs and speedups at batch B and 1 (chain / tree)."""
  lines = [f"{'variant':<12} {'blocks':>6} {'params':>8} {'val loss':>8}  "
           f"{'acc/head':<24} {'tok/fwd chain tree':>19} {'pass cost B':>12} "
           f"{'pass cost 1':>12} {'speedup B':>10} {'speedup 1':>10}"]
  for r in runs:
    methods = r.get("spec", {}).get("methods", {})

    def cols(batch, key, fmt, methods=methods, r=r):
      got = [m[key] for m in methods.get(batch, {}).values()] if r["heads"] > 1 else []
      return " ".join(fmt.format(x) for x in got) or "-"
    lines.append(
        f"{r['variant']:<12} {r['blocks']:>6} {r['params'] / 1e6:>7.2f}M "
        f"{r['val_loss_per_head'][0]:>8.3f}  "
        f"{' '.join(f'{a:.3f}' for a in r['val_acc_per_head']):<24} "
        f"{cols('batch', 'tokens_per_forward', '{:.2f}'):>19} "
        f"{cols('batch', 'pass_cost', '{:.2f}'):>12} {cols('batch1', 'pass_cost', '{:.2f}'):>12} "
        f"{cols('batch', 'speedup_vs_greedy', '{:.2f}'):>10} "
        f"{cols('batch1', 'speedup_vs_greedy', '{:.2f}'):>10}")
  return lines


def row_text(r: dict) -> str:
  """One run's summary line: losses and accuracies per head, task scores, decoding, memory."""
  parts = [f"heads {r['heads']}", "val loss/head " + " ".join(f"{x:.3f}"
                                                             for x in r["val_loss_per_head"]),
           "acc/head " + " ".join(f"{x:.3f}" for x in r["val_acc_per_head"])]
  if "task" in r:
    parts += [f"{k} {v:.3f}" for k, v in r["task"].items() if isinstance(v, float)]
  if "spec" in r:
    s = r["spec"]
    for batch, label in (("batch", f"batch {s['prompts']}"), ("batch1", "batch 1")):
      methods = s["methods"][batch]
      parts.append(f"{label}: " + ", ".join(
          f"{k} {m['tokens_per_forward']:.2f} tok/fwd {m['speedup_vs_greedy']:.2f}x"
          for k, m in methods.items()) + f"; best {best_text(s['best'][batch])}")
    parts.append(f"identical {s['identical_to_greedy']}")
  mem = r["mem"]
  parts.append(f"loss temp MiB naive {mem['loss_temp_bytes_naive'] / 2**20:.1f} "
               f"efficient {mem['loss_temp_bytes_efficient'] / 2**20:.1f}")
  return " | ".join(parts)


def best_text(best: dict) -> str:
  """The fastest lossless decoding of one batch size, as printed."""
  if best["method"] == "greedy":
    return "greedy (no lossless speculative decoding is faster here)"
  return f"{best['method']} {best['speedup_vs_greedy']:.2f}x"


def slower_text(r: dict) -> list[str]:
  """The plain statements of the printed summary: which decodings are slower than greedy, why."""
  spec = r.get("spec")
  if not spec:
    return []
  lines = [f"batch {spec['prompts'] if batch == 'batch' else 1}: {note}"
           for batch in ("batch", "batch1") for note in spec["best"][batch]["notes"]]
  if spec.get("tree_unavailable"):
    lines.append(f"no tree decoding: {spec['tree_unavailable']}")
  return lines
