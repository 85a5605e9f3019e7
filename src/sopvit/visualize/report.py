"""One self-contained HTML report of a run: curves, prototypes, demo results and the config."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sopvit.visualize.prototypes import prototype_gallery

# (section title, HTML anchor, metric keys, one subplot per key (True) or one shared axis (False))
_CURVES: list[tuple[str, str, list[str], bool]] = [
    ("Losses", "losses", ["loss", "loss_cls", "loss_patch"], False),
    ("Schedules", "schedules", ["lr", "weight_decay", "momentum", "teacher_temp"], True),
    ("Prototype assignments", "assignments", ["proto_entropy", "teacher_entropy", "agreement"], True),
    ("Online k-NN", "knn", ["knn_top1"], False),
    ("Throughput", "throughput", ["images_per_s"], False),
]

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
img { max-width: 100%; } .note { color: #777; font-style: italic; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .3em .8em; text-align: left; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
"""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line cut short by a kill mid-write is skipped, not fatal."""
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def _png_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _plot(rows: Sequence[dict[str, Any]], title: str, keys: list[str], separate: bool) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, whatever the user's backend is
    import matplotlib.pyplot as plt

    series = {key: _series(rows, key) for key in keys}
    series = {key: xy for key, xy in series.items() if xy[0]}
    if not series:
        return None
    panels = len(series) if separate else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 3.4 * panels), 3.0), squeeze=False)
    for i, (key, (steps, values)) in enumerate(series.items()):
        ax = axes[0, i if separate else 0]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if separate:
            ax.set_title(key, fontsize=9)
    if not separate:
        axes[0, 0].set_title(title, fontsize=9)
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _curve_sections(rows: Sequence[dict[str, Any]]) -> list[str]:
    parts = []
    for title, anchor, keys, separate in _CURVES:
        png = _plot(rows, title, keys, separate)
        body = _png_tag(png, title) if png is not None else _note(f"no {', '.join(keys)} values logged")
        parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{body}')
    return parts


def _gallery_section(run_dir: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            png = prototype_gallery(run_dir, Path(tmp) / "gallery.png").read_bytes()
        # A report must still be written when prototypes cannot be drawn (run too short, data moved).
        except (ValueError, OSError, RuntimeError, KeyError) as err:
            body = _note(f"prototype gallery skipped: {err}")
        else:
            body = _png_tag(png, "prototype gallery")
    return f'<h2 id="prototypes">Prototype gallery</h2>\n{body}'


def _demo_section(run_dir: Path) -> str:
    results_path = run_dir / "demo_results.json"
    if not results_path.is_file():
        return ""
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return f'<h2 id="demo">Demo results</h2>\n{_note(f"{results_path} is unreadable: {err}")}'
    cells = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>"
        f"{f'{value:.2f}' if isinstance(value, float) else html.escape(str(value))}</td></tr>"
        for key, value in (results.items() if isinstance(results, dict) else [])
    )
    table = f"<table><tr><th>result</th><th>value</th></tr>{cells}</table>"
    figure = run_dir / "demo.png"
    image = _png_tag(figure.read_bytes(), "demo figure") if figure.is_file() else ""
    return f'<h2 id="demo">Demo results</h2>\n{table}\n{image}'


def write_report(run_dir: str | Path, out_html: str | Path | None = None) -> Path:
    """Write a single HTML file summarising ``run_dir`` (default ``run_dir/report.html``); returns it.

    Every image is an inline base64 PNG and the page has no scripts or external stylesheets, so the
    file can be mailed or archived on its own. Missing pieces (no metrics yet, no valid prototypes,
    no demo) become notes instead of errors.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = run_dir / "report.html" if out_html is None else Path(out_html)
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""

    last = rows[-1]["step"] if rows else "none"
    sections = [f"<h1>sopvit run report: {html.escape(run_dir.resolve().name)}</h1>"]
    sections.append(
        f"<p>Run directory <code>{html.escape(str(run_dir.resolve()))}</code>; "
        f"{len(rows)} logged rows; last logged step {html.escape(str(last))}.</p>"
    )
    if not rows:
        sections.append(_note(f"{metrics_path} is missing or empty: no curves to draw"))
    sections += _curve_sections(rows)
    sections.append(_gallery_section(run_dir))
    sections.append(_demo_section(run_dir))
    config_body = (
        f"<pre>{html.escape(config_text)}</pre>" if config_text else _note(f"{config_path} is missing")
    )
    sections.append(f'<h2 id="config">Resolved config</h2>\n{config_body}')

    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>sopvit report: {html.escape(run_dir.resolve().name)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body>\n</html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
