"""Fidelity figures from stored episodes and scores, and the reports people and machines read.

Per input set and system: action-format validity of the first turn, of every turn and per turn
index (drift), valid final actions; agreement with the teacher's first turn (same action type,
exact action, token F1, embedding similarity); teacher-forced NLL and top-k KL. Every figure
carries its count, every rate its 95% Wilson interval, and retention and gap closed a 95%
bootstrap interval over the inputs. **Retention** is adapter ÷ teacher (teacher ÷ adapter for lower-is-better
NLL); **gap closed** is (adapter − base) ÷ (teacher − base), which reads the same way for
lower-is-better metrics because both differences change sign.
"""

from __future__ import annotations

from typing import Any

from genpi.config import PG_METHODS
from genpi.evaluate import metrics
from genpi.prompt.spec import PromptSpec

SYSTEMS = ("teacher", "base", "adapter")
LOWER_IS_BETTER = ("nll", "kl_topk", "nll_under_teacher")
TITLES = {
    "format_valid": "action format, first turn",
    "format_valid_all_turns": "action format, every turn",
    "final_valid": "valid final action",
    "same_action_type": "same action type as teacher",
    "exact_action": "same action as teacher",
    "token_f1": "token F1 with teacher",
    "embedding_similarity": "embedding similarity with teacher",
    "nll": "NLL of teacher replies (per token)",
    "kl_topk": "top-k KL to teacher (per token)",
    "nll_under_teacher": "NLL of its own first reply under the teacher (per token)",
    "action_in_teacher_samples": "first action among the teacher's sampled actions",
}


def _first(episode: dict) -> str:
    return episode["turns"][0]["agent"] if episode["turns"] else ""


Samples = list[tuple[float, float]]  # per input: (numerator, denominator) of a ratio-of-sums figure


def _figure(samples: Samples, rate: bool = False) -> dict[str, Any]:
    """A figure from per-input samples: the ratio of sums; a rate with its 95% Wilson interval."""
    den = sum(d for _, d in samples)
    value = sum(n for n, _ in samples) / den if den else None
    out: dict[str, Any] = {"value": None if value is None else round(value, 4), "n": len(samples)}
    if rate and den:
        out["interval"] = [round(x, 4) for x in metrics.wilson_interval(round(sum(n for n, _ in samples)), round(den))]
    return out


def system_samples(
    spec: PromptSpec,
    episodes: list[dict],
    teacher: list[dict],
    scores: list[dict],
    system: str,
    similarity: list[float] | None,
    agreement: list[dict] | None = None,
) -> dict[str, Samples]:
    """Every metric of one system on one input set, as one (numerator, denominator) per input."""
    fmt = spec.action_format
    out: dict[str, Samples] = {}

    def mean(values: list[bool] | list[float]) -> Samples:
        return [(float(v), 1.0) for v in values]

    if fmt.has_actions:
        out["format_valid"] = mean([metrics.format_valid(fmt, _first(e)) for e in episodes])
        out["format_valid_all_turns"] = [
            (sum(metrics.format_valid(fmt, t["agent"]) for t in e["turns"]), len(e["turns"])) for e in episodes
        ]
    if fmt.has_final:
        out["final_valid"] = mean(
            [bool(e["turns"]) and metrics.final_valid(fmt, e["turns"][-1]["agent"]) for e in episodes]
        )
    if fmt.has_actions:
        out["same_action_type"] = mean(
            [
                metrics.action_type(fmt, _first(e)) is not None
                and metrics.action_type(fmt, _first(e)) == metrics.action_type(fmt, _first(t))
                for e, t in zip(episodes, teacher)
            ]
        )
        out["exact_action"] = mean(
            [metrics.exact_action_match(fmt, _first(e), _first(t)) for e, t in zip(episodes, teacher)]
        )
    out["token_f1"] = mean([metrics.token_f1(_first(e), _first(t)) for e, t in zip(episodes, teacher)])
    if similarity is not None:
        out["embedding_similarity"] = mean(similarity)
    out["nll"] = [(r[system]["nll_sum"], r[system]["tokens"]) for r in scores]
    out["kl_topk"] = [(r[system]["kl_sum"], r[system]["tokens"]) for r in scores]
    if agreement is not None:
        out["nll_under_teacher"] = [
            (a["nll_under_teacher"][system]["nll_sum"], a["nll_under_teacher"][system]["tokens"]) for a in agreement
        ]
        out["action_in_teacher_samples"] = mean([a["in_teacher_samples"][system] for a in agreement])
    out["avg_turns"] = mean([len(e["turns"]) for e in episodes])
    return out


RATES = (
    "format_valid",
    "format_valid_all_turns",
    "final_valid",
    "same_action_type",
    "exact_action",
    "action_in_teacher_samples",
)
TOKEN_MEANS = ("nll", "kl_topk")


def system_figures(samples: dict[str, Samples]) -> dict[str, dict[str, Any]]:
    """The figures of one system from its per-input samples (rates with their Wilson intervals)."""
    figures = {m: _figure(v, rate=m in RATES) for m, v in samples.items()}
    for m in TOKEN_MEANS + ("nll_under_teacher",):
        if m in samples:
            figures[m]["tokens"] = int(sum(d for _, d in samples[m]))
    return figures


def per_turn_validity(spec: PromptSpec, episodes: list[dict], turns: int) -> list[dict[str, Any]]:
    """Action-format validity at each turn index, over the episodes that reached it."""
    return [
        metrics.mean_figure(
            [metrics.format_valid(spec.action_format, e["turns"][k]["agent"]) for e in episodes if len(e["turns"]) > k]
        )
        for k in range(turns)
    ]


def per_turn_retention(
    spec: PromptSpec, episodes: dict[str, list[dict]], turns: int, seed: int
) -> list[dict[str, Any]]:
    """The adapter's action-format validity ÷ the teacher's at each turn index (each over the episodes
    that reached it), with a 95% bootstrap interval over inputs and both counts."""
    fmt = spec.action_format

    def valid(episode: dict, k: int) -> bool | None:
        return metrics.format_valid(fmt, episode["turns"][k]["agent"]) if len(episode["turns"]) > k else None

    def kept(rows: list[tuple[bool | None, bool | None]]) -> float | None:
        rates = [[v for v in column if v is not None] for column in zip(*rows)]
        teacher, adapter = (sum(r) / len(r) if r else None for r in rates)
        return metrics.retention(adapter, teacher)

    out = []
    for k in range(turns):
        rows = [(valid(t, k), valid(a, k)) for t, a in zip(episodes["teacher"], episodes["adapter"])]
        interval = metrics.bootstrap_interval(rows, kept, seed=seed)
        out.append(
            {
                "turn": k + 1,
                "value": _round(kept(rows)),
                "interval": None if interval is None else [round(x, 4) for x in interval],
                "teacher_n": sum(t is not None for t, _ in rows),
                "adapter_n": sum(a is not None for _, a in rows),
            }
        )
    return out


def compare(values: dict[str, float | None], lower: bool) -> tuple[float | None, float | None]:
    """The adapter's retention and gap closed from the three systems' values of one metric.

    Lower is better: retention is teacher / adapter, undefined when the teacher's value is 0 (the
    KL of the teacher to itself), where gap closed still tells the story."""
    kept = (
        (metrics.retention(values["teacher"], values["adapter"]) if values["teacher"] else None)
        if lower
        else metrics.retention(values["adapter"], values["teacher"])
    )
    return kept, metrics.gap_closed(values["adapter"], values["base"], values["teacher"])


def _bootstrap(samples: dict[str, Samples], lower: bool, seed: int) -> dict[str, list[float] | None]:
    """95% percentile-bootstrap intervals of retention and gap closed, resampling inputs (all three
    systems' samples of an input move together)."""
    rows = list(zip(samples["teacher"], samples["base"], samples["adapter"]))

    def ratio(picked: list, k: int) -> float | None:
        den = sum(r[k][1] for r in picked)
        return sum(r[k][0] for r in picked) / den if den else None

    out = {}
    for i, kind in enumerate(("retention", "gap_closed")):
        interval = metrics.bootstrap_interval(
            rows,
            lambda picked, i=i: compare(
                {s: ratio(picked, k) for k, s in enumerate(("teacher", "base", "adapter"))}, lower
            )[i],
            seed=seed,
        )
        out[kind] = None if interval is None else [round(x, 4) for x in interval]
    return out


def summarize_set(
    spec: PromptSpec,
    episodes: dict[str, list[dict]],
    scores: list[dict],
    embed: Any = None,
    seed: int = 0,
    agreement: list[dict] | None = None,
) -> dict[str, Any]:
    """Figures of all three systems on one input set, and the adapter's retention and gap closed,
    each with a 95% bootstrap interval over the inputs (``seed`` fixes the resamples).
    ``agreement`` (per input, :meth:`Evaluation.agreement`) adds how the teacher judges each
    system's first reply."""
    teacher = episodes["teacher"]
    similarity: dict[str, list[float] | None] = {"teacher": None, "base": None, "adapter": None}
    if embed is not None:
        similarity = {
            s: embed.similarity([_first(e) for e in episodes[s]], [_first(t) for t in teacher])
            for s in episodes
            if s != "teacher"
        }
        similarity["teacher"] = [1.0] * len(teacher)  # the teacher's reply is its own reference
    samples = {s: system_samples(spec, episodes[s], teacher, scores, s, similarity[s], agreement) for s in episodes}
    systems = {s: system_figures(samples[s]) for s in episodes}
    longest = max((len(e["turns"]) for eps in episodes.values() for e in eps), default=0)
    per_turn = (
        {s: per_turn_validity(spec, episodes[s], longest) for s in episodes} if spec.action_format.has_actions else {}
    )
    turn_retention = per_turn_retention(spec, episodes, longest, seed) if per_turn else []
    comparison = {}
    for metric in systems["adapter"]:
        if metric == "avg_turns":
            continue
        values = {s: systems[s][metric]["value"] for s in systems}
        lower = metric in LOWER_IS_BETTER
        kept, closed = compare(values, lower)
        intervals = _bootstrap({s: samples[s][metric] for s in samples}, lower, seed)
        comparison[metric] = {
            **values,
            "n": systems["adapter"][metric]["n"],
            "lower_is_better": lower,
            "retention": _round(kept),
            "gap_closed": _round(closed),
            "retention_interval": intervals["retention"],
            "gap_closed_interval": intervals["gap_closed"],
        }
        for s in systems:
            if "interval" in systems[s][metric]:
                comparison[metric][f"{s}_interval"] = systems[s][metric]["interval"]
    return {
        "n": len(teacher),
        "systems": systems,
        "per_turn_format_valid": per_turn,
        "per_turn_format_retention": turn_retention,
        "comparison": comparison,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(metric: str, value: float | None, interval: list[float] | None = None) -> str:
    if metric in LOWER_IS_BETTER:
        return _num(value)
    return pct_interval(value, interval)


def pct_interval(value: float | None, interval: list[float] | None) -> str:
    """``"75% [41%, 93%]"``: a share and its 95% interval (the interval left out where there is none)."""
    return _pct(value) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]" if interval and value is not None else "")


def prompt_report_markdown(report: dict[str, Any]) -> str:
    """The per-prompt report for people."""
    gate = report["gate"]
    lines = [
        f"# Fidelity report: {report['prompt']}",
        "",
        f"Adapter `{report['adapter']}` (run {report['run_hash']}), episodes of up to "
        f"{report['max_turns']} agent turns, greedy.",
        "",
        f"**Gate: {'PASSED' if gate['passed'] else 'FAILED'}** ({gate['summary']})"
        + (f"; published as `{report['published']}`" if report.get("published") else ""),
        "",
    ]
    for set_name, figures in report["sets"].items():
        lines += [
            f"## {set_name} inputs (n = {figures['n']})",
            "",
            "Rates with their 95% Wilson interval; retention and gap closed with a 95% bootstrap interval "
            "over the inputs.",
            "",
            "| metric | teacher (prompt) | base (no prompt) | adapter (no prompt) | retention | gap closed | n |",
            "|---|---|---|---|---|---|---|",
        ]
        for metric, row in figures["comparison"].items():
            lines.append(
                f"| {TITLES.get(metric, metric)} | "
                + " | ".join(_cell(metric, row[s], row.get(f"{s}_interval")) for s in SYSTEMS)
                + f" | {pct_interval(row['retention'], row.get('retention_interval'))} | "
                f"{pct_interval(row['gap_closed'], row.get('gap_closed_interval'))} | {row['n']} |"
            )
        per_turn = figures.get("per_turn_format_valid") or {}
        if per_turn:
            width = max(len(v) for v in per_turn.values())
            lines += [
                "",
                "Action-format validity per turn (episodes that reached the turn):",
                "",
                "| system | " + " | ".join(f"turn {k + 1}" for k in range(width)) + " |",
                "|---|" + "---|" * width,
            ]
            for system, row in per_turn.items():
                cells = [f"{_pct(f['value'])} ({f['n']})" for f in row] + [""] * (width - len(row))
                lines.append(f"| {system} | " + " | ".join(cells) + " |")
            kept = figures.get("per_turn_format_retention") or []
            if kept:
                cells = [pct_interval(r["value"], r["interval"]) for r in kept] + [""] * (width - len(kept))
                lines.append("| adapter ÷ teacher | " + " | ".join(cells) + " |")
        lines.append("")
    eff = report.get("efficiency") or {}
    if eff:
        flops = eff["flops"]
        lines += [
            "## Efficiency per turn",
            "",
            f"Prompt tokens avoided per turn: {eff['prompt_tokens']}. Timed episode: {eff['turns']} turns "
            f"on {eff['device']} ({eff['threads']} threads).",
            "",
            "| turn | prefill FLOPs, prompt recomputed | prompt KV cache reused | adapter, no prompt | "
            "latency recomputed (s) | latency KV reused (s) | latency adapter (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in range(eff["turns"]):
            lines.append(
                f"| {t + 1} | {flops['per_turn']['recompute'][t]:.3g} | {flops['per_turn']['kv_reuse'][t]:.3g} | "
                f"{flops['per_turn']['adapter'][t]:.3g} | {eff['latency_s']['recompute'][t]:.3f} | "
                f"{eff['latency_s']['kv_reuse'][t]:.3f} | {eff['latency_s']['adapter'][t]:.3f} |"
            )
        lines += [
            "",
            f"Theoretical prefill saving of the adapter: {_pct(flops.get('theoretical_saving'))} vs the "
            f"reused prompt cache, {_pct(flops.get('theoretical_saving_vs_recompute'))} vs recomputing; "
            f"measured latency saving: {_pct(eff['measured_saving_vs_kv_reuse'])} vs the reused cache, "
            f"{_pct(eff['measured_saving_vs_recompute'])} vs recomputing.",
            "",
        ]
    return "\n".join(lines)


def batch_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per prompt: the gate metrics of the test set with their intervals, and the decision."""
    rows = []
    for r in reports:
        test = r["sets"].get("test", {})
        comparison = test.get("comparison", {})
        fv, nll = comparison.get("format_valid", {}), comparison.get("nll", {})
        sampled = comparison.get("action_in_teacher_samples", {})
        turns = test.get("per_turn_format_retention", [])
        rows.append(
            {
                "prompt": r["prompt"],
                "n": test.get("n", 0),
                **{f"{s}_format": fv.get(s) for s in SYSTEMS},
                **{f"{s}_format_interval": fv.get(f"{s}_interval") for s in SYSTEMS},
                "format_retention": fv.get("retention"),
                "format_retention_interval": fv.get("retention_interval"),
                "turn_retention": [t["value"] for t in turns],
                "turn_retention_interval": [t.get("interval") for t in turns],
                **{f"{s}_sampled_action": sampled.get(s) for s in ("teacher", "adapter")},
                **{f"{s}_sampled_action_interval": sampled.get(f"{s}_interval") for s in ("teacher", "adapter")},
                "sampled_action_retention": sampled.get("retention"),
                "sampled_action_retention_interval": sampled.get("retention_interval"),
                "nll_gap_closed_interval": nll.get("gap_closed_interval"),
                "nll_teacher": nll.get("teacher"),
                "nll_base": nll.get("base"),
                "nll_adapter": nll.get("adapter"),
                "nll_gap_closed": nll.get("gap_closed"),
                "prompt_tokens": (r.get("efficiency") or {}).get("prompt_tokens"),
                "passed": r["gate"]["passed"],
                "gate": r["gate"]["summary"],
                "published": r.get("published"),
            }
        )
    return rows


def batch_table(rows: list[dict[str, Any]]) -> str:
    """The batch table as Markdown (also what ``genpi report`` prints): every rate with its 95%
    Wilson interval over the ``n`` test inputs, every ratio with its bootstrap interval. Rows of
    batches written before the intervals were stored show the figures alone."""

    def share(r: dict[str, Any], figure: str) -> str:
        return pct_interval(r.get(figure), r.get(f"{figure}_interval"))

    def per_turn(r: dict[str, Any]) -> str:
        values = r.get("turn_retention") or []
        intervals = r.get("turn_retention_interval") or [None] * len(values)
        return " / ".join(pct_interval(v, i) for v, i in zip(values, intervals)) or "-"

    lines = [
        "| prompt | n | format, first turn: teacher | base | adapter | retention | per turn | "
        "first action in teacher samples: teacher | adapter | ratio | NLL: teacher | base | adapter | gap closed | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt']} | {r['n']} | {share(r, 'teacher_format')} | {share(r, 'base_format')} | "
            f"{share(r, 'adapter_format')} | {share(r, 'format_retention')} | {per_turn(r)} | "
            f"{share(r, 'teacher_sampled_action')} | {share(r, 'adapter_sampled_action')} | "
            f"{share(r, 'sampled_action_retention')} | "
            f"{_num(r['nll_teacher'])} | {_num(r['nll_base'])} | {_num(r['nll_adapter'])} | "
            f"{share(r, 'nll_gap_closed')} | "
            f"{'passed' if r['passed'] else 'FAILED: ' + r['gate']} |"
        )
    return "\n".join(lines)


def selection_table(selection: dict[str, Any]) -> str:
    """A prompt's sweep side by side on the validation split (mean ± std over seeds), the chosen run marked."""
    best = selection["runs"][selection["chosen"]]

    def cell(group: dict[str, Any], figure: str) -> str:
        std = group[f"{figure}_std"]
        return _pct(group[figure]) + (f" ± {std * 100:.0f}" if std is not None else "")

    lines = [
        f"### {selection['prompt']}: runs on the validation split",
        "",
        "| method | λ | seeds | format retention | NLL gap closed | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for g in selection["groups"]:
        mark = "yes" if (g["method"], g["pg_lambda"]) == (best["method"], best["pg_lambda"]) else ""
        lam = f"{g['pg_lambda']:.2f}" if g["method"] in PG_METHODS else "-"
        lines.append(
            f"| {g['method']} | {lam} | {g['seeds']} | {cell(g, 'format_retention')} | "
            f"{cell(g, 'nll_gap_closed')} | {mark} |"
        )
    return "\n".join(lines)
