"""The results gallery: ``index.html`` (one card per notebook) and ``summary.csv``, built from the files alone.

A card shows the notebook's title, run status, profile, wall time, commit and device, the parameters the run
changed from the notebook's defaults (those of its profile), its verdicts, headline figure, measured-vs-paper table
and links to the full HTML report and ``metrics.json``. Notebooks whose last run failed (``run.json`` says so) get a
red card with the failing cell and error instead of stale numbers. The header gives the total wall time; a gallery
holding smoke-profile runs carries a banner saying that their verdicts only check the plumbing.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.core.notebook import SMOKE_NAME, same_value, notebook_defaults
from helpers.core.results import atomic_write_text
from helpers.core.runtime import REPO_ROOT

__all__ = ["collect", "build_gallery", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["notebook", "title", "status", "profile", "kind", "quantity", "measured", "paper", "note",
                   "wall_time_s", "git_commit", "device"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{padding:24px 32px;background:#1d2330;color:#fff}header h1{margin:0 0 6px;font-size:22px}
header p{margin:0;opacity:.8;font-size:14px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:20px;padding:24px 32px}
.card{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:18px 20px;overflow:hidden}
.card.failed{border-left:6px solid #c0392b}.card h2{font-size:17px;margin:0 0 4px}
.meta{font-size:12px;color:#5a6275;margin-bottom:10px}.badge{display:inline-block;padding:1px 8px;border-radius:9px;
font-size:11px;font-weight:600;margin-right:6px}.ok{background:#d4f3df;color:#17693a}.bad{background:#fbd9d5;color:#8e2418}
.card img{width:100%;border:1px solid #e3e6ec;border-radius:6px;background:#fff}
table{border-collapse:collapse;width:100%;font-size:12.5px;margin-top:10px}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eceef2;vertical-align:top}th{background:#f0f2f6}
.verdicts{list-style:none;padding:0;margin:6px 0 10px;font-size:13px}.verdicts li{margin:3px 0}
.verdict{display:inline-block;min-width:92px;padding:1px 7px;border-radius:9px;font-size:11px;font-weight:600;
margin-right:6px;text-align:center}.v-reproduced{background:#d4f3df;color:#17693a}
.v-partly{background:#fff1c7;color:#7a5a00}.v-not-reproduced{background:#fbd9d5;color:#8e2418}
.v-not-testable-here{background:#e6e8ee;color:#4a5163}.v-inconclusive{background:#e3ecfa;color:#27477a}.reason{color:#5a6275}
.params{font-size:12px;color:#4a5163;margin:0 0 8px;font-family:monospace}
.smoke-banner{background:#fff1c7;color:#5c4400;padding:10px 32px;font-size:14px;border-bottom:1px solid #e8d48a}
.links a{margin-right:14px;font-size:13px}.error{font-family:monospace;font-size:12px;color:#8e2418;white-space:pre-wrap}
"""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(out: Path) -> list[dict[str, Any]]:
    """One record per notebook folder under ``out`` holding a ``metrics.json`` or a ``run.json``."""
    records = []
    for folder in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        metrics = _read_json(folder / "metrics.json")
        run = _read_json(folder / "run.json")
        if metrics is None and run is None:
            continue
        status = (run or {}).get("status") or ("ok" if metrics else "failed")
        if metrics is None and status == "ok":
            status = "failed"  # the notebook ran but never reached Results.finalize()
        records.append({"folder": folder, "name": folder.name, "metrics": metrics or {}, "run": run or {},
                        "status": status})
    return records


def changed_parameters(metrics: dict[str, Any], notebook_dir: str | Path | None = None) -> dict[str, Any]:
    """The parameters of a run (``metrics["parameters"]``) whose value differs from the notebook's default for the
    run's profile (the parameters cell, with ``smoke_overrides`` applied for a smoke run). ``{}`` when the notebook
    cannot be found (a run of a notebook that is no longer in ``notebook_dir``, default ``notebooks/``)."""
    name, params = metrics.get("notebook"), metrics.get("parameters") or {}
    if not name or not params:
        return {}
    try:
        defaults = notebook_defaults(name, notebook_dir if notebook_dir is not None else REPO_ROOT / "notebooks")
    except (FileNotFoundError, ValueError, SyntaxError):
        return {}
    if metrics.get("profile") == "smoke":
        defaults = {**defaults, **(defaults.get(SMOKE_NAME) or {})}
    return {k: v for k, v in params.items()
            if k in defaults and k not in ("profile", SMOKE_NAME) and not same_value(v, defaults[k])}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _card(rec: dict[str, Any], notebook_dir: str | Path | None = None) -> str:
    m, run, name = rec["metrics"], rec["run"], rec["name"]
    esc = html.escape
    ok = rec["status"] == "ok"
    env = m.get("environment", {})
    wall = m.get("wall_time_s", run.get("wall_time_s"))
    commit = (m.get("git_commit") or "")[:12]
    meta = " &middot; ".join(x for x in [
        f"profile {esc(str(m.get('profile', run.get('profile', '?'))))}",
        f"{_fmt(wall)} s" if wall is not None else "",
        f"commit {esc(commit)}" if commit else "",
        esc(str(env.get("device", ""))) + (f" ({esc(env['gpu'])})" if env.get("gpu") else ""),
        esc(str(m.get("finished_at", ""))),
    ] if x)
    parts = [f'<section class="card{"" if ok else " failed"}" data-notebook="{esc(name)}">',
             f"<h2>{esc(m.get('title') or name)}</h2>",
             f'<div class="meta"><span class="badge {"ok" if ok else "bad"}">{"ok" if ok else "failed"}</span>'
             f"{esc(name)} &middot; {meta}</div>"]
    changed = changed_parameters(m, notebook_dir) if ok else {}
    if changed:
        parts.append('<div class="params">changed from the defaults: '
                     + esc(", ".join(f"{k} = {v!r}" for k, v in changed.items())) + "</div>")
    if not ok:
        cell = run.get("cell")
        parts.append(f'<div class="error">cell {cell if cell is not None else "?"}: '
                     f'{esc(str(run.get("error") or "no metrics.json written"))}</div>')
    elif m.get("headline_figure"):
        fig = f"{name}/{m['headline_figure']}"
        parts.append(f'<a href="{esc(fig)}"><img class="headline" src="{esc(fig)}" alt="{esc(name)} headline figure">'
                     "</a>")
    if ok and m.get("verdicts"):
        items = "".join(
            f'<li><span class="verdict v-{esc(v["verdict"].replace(" ", "-"))}">{esc(v["verdict"])}</span> '
            f'{esc(v["claim"])} <span class="reason">- {esc(v["reason"])}</span></li>' for v in m["verdicts"])
        parts.insert(4 if changed else 3, f'<ul class="verdicts">{items}</ul>')
    if ok and m.get("results"):
        rows = "".join(
            f"<tr><td>{esc(_fmt(r.get('quantity')))}</td><td>{esc(_fmt(r.get('measured')))}</td>"
            f"<td>{esc(_fmt(r.get('paper')))}</td><td>{esc(_fmt(r.get('note')))}</td></tr>"
            for r in m["results"])
        parts.append('<table class="results"><thead><tr><th>quantity</th><th>measured</th><th>paper / reference</th>'
                     f"<th>note</th></tr></thead><tbody>{rows}</tbody></table>")
    links = []
    if (rec["folder"] / "report.html").exists():
        links.append(f'<a href="{esc(name)}/report.html">full report</a>')
    if (rec["folder"] / "metrics.json").exists():
        links.append(f'<a href="{esc(name)}/metrics.json">metrics.json</a>')
    if (rec["folder"] / "run.log").exists() and not ok:
        links.append(f'<a href="{esc(name)}/run.log">run log</a>')
    parts.append(f'<p class="links">{"".join(links)}</p></section>')
    return "\n".join(parts)


SMOKE_BANNER = ("Smoke profile: tiny budgets, so these verdicts only check that each notebook runs end to end (the "
                "plumbing), not the papers' claims. The committed full-profile run is in results/.")


def build_gallery(out: str | Path, *, notebook_dir: str | Path | None = None) -> Path:
    """Write ``<out>/index.html`` and ``<out>/summary.csv`` from every notebook folder in ``out``.

    ``notebook_dir`` (default ``notebooks/``) holds the notebooks whose defaults the cards compare parameters with.
    """
    out = Path(out)
    records = collect(out)
    rows = []
    for rec in records:
        m = rec["metrics"]
        base = {"notebook": rec["name"], "title": m.get("title", ""), "status": rec["status"],
                "profile": m.get("profile", rec["run"].get("profile")), "wall_time_s": m.get("wall_time_s"),
                "git_commit": m.get("git_commit"), "device": m.get("environment", {}).get("device")}
        rows += [{**base, "kind": "verdict", "quantity": v.get("claim"), "measured": v.get("verdict"),
                  "note": v.get("reason")} for v in m.get("verdicts") or []]
        results = m.get("results") or [{}]
        rows += [{**base, "kind": "result", "quantity": r.get("quantity"), "measured": r.get("measured"),
                  "paper": r.get("paper"), "note": r.get("note")} for r in results]
    atomic_write_text(out / "summary.csv", pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(index=False))
    n_ok = sum(r["status"] == "ok" for r in records)
    cards = ("\n".join(_card(r, notebook_dir) for r in records)
             or "<p>No notebook results yet: run <code>make reports</code>.</p>")
    walls = [r["metrics"].get("wall_time_s", r["run"].get("wall_time_s")) for r in records]
    total_s = sum(w for w in walls if isinstance(w, (int, float)))
    smoke = any(r["metrics"].get("profile", r["run"].get("profile")) == "smoke" for r in records)
    banner = f'<div class="smoke-banner" role="note">{html.escape(SMOKE_BANNER)}</div>' if smoke else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>FP8-RL and M2DQN notebooks: results</title><style>{_CSS}</style></head>
<body><header><h1>FP8-RL and M2DQN reproduction notebooks</h1>
<p>{len(records)} notebook(s), {n_ok} ok, total wall time {total_s / 60:.0f} min. Each card: the verdict per claim (reproduced / partly / not reproduced / not testable
here), the notebook's headline figure, and its measured numbers beside the paper's. CPU figures come from CPU runs; GPU figures only from GPU runs (see each report's environment line).</p>
</header>{banner}<main>
{cards}
</main>
<script>
// Mark each figure as loaded or broken, so a headless browser test can check the page as a reader sees it.
window.addEventListener("load", () => document.querySelectorAll("img").forEach(
  img => img.dataset.loaded = String(img.complete && img.naturalWidth > 0)));
</script>
</body></html>
"""
    return atomic_write_text(out / "index.html", page)
