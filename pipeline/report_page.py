"""The report's HTML page: one self-contained file (inline SVG bars, thumbnails as data:
URIs, no scripts), drawn from what report.py found."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import ImageError
from pipeline.pixels import DECODE_ERRORS, to_rgb
from pipeline.report import (HISTORY_SHOWN, THUMBNAILS_PER_LABEL, TOP_LABELS, Findings,
                             agreement_line, calibration_line, drift_lines, share)
from pipeline.storage import read_bytes
from pipeline.summary import count

THUMBNAIL_PX = 96


def thumbnail(path: str) -> str | None:
    """A small JPEG as a data: URI, or None if the image cannot be read now."""
    try:
        image = Image.open(io.BytesIO(read_bytes(path)))
        image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))
        image = to_rgb(ImageOps.exif_transpose(image))  # as displayed, like the crop labelled
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    except (ImageError, *DECODE_ERRORS):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bars(pairs: list[tuple[str, int]], css_class: str) -> str:
    """A horizontal bar chart as inline SVG (no scripts, no external files)."""
    if not pairs:
        return "<p>nothing to show</p>"
    top = max(n for _, n in pairs) or 1
    height = 22 * len(pairs)
    parts = [f'<svg class="{css_class}" width="640" height="{height}" role="img">']
    for i, (name, n) in enumerate(pairs):
        width = int(400 * n / top)
        y = 22 * i
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(str(name))[:40]}</text>'
                     f'<rect class="bar" x="200" y="{y + 3}" width="{width}" height="16">'
                     f'<title>{html.escape(str(name))}: {n}</title></rect>'
                     f'<text x="{205 + width}" y="{y + 15}">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _paired_bars(rows: list[tuple[str, float, float]], css_class: str,
                 names: tuple[str, str] = ("the night before", "tonight")) -> str:
    """Two bars a row (the first pale), as inline SVG: shares."""
    if not rows:
        return "<p>nothing to show</p>"
    top = max(max(a, b) for _, a, b in rows) or 1
    parts = [f'<svg class="{css_class}" width="640" height="{30 * len(rows)}" role="img">']
    for i, (name, before, after) in enumerate(rows):
        y = 30 * i
        for j, (value, bar) in enumerate(((before, "before"), (after, "bar"))):
            width = int(380 * value / top)
            parts.append(f'<rect class="{bar}" x="200" y="{y + 2 + 13 * j}" width="{width}" '
                         f'height="12"><title>{html.escape(str(name))}: {share(value)} '
                         f'({names[j]})</title></rect>')
        parts.append(f'<text x="0" y="{y + 17}">{html.escape(str(name))[:40]}</text>'
                     f'<text x="{585}" y="{y + 17}">{share(before)} &#8594; {share(after)}'
                     '</text>')
    parts.append("</svg>")
    return "".join(parts)


def _drift_section(figures: dict | None) -> str:
    if not figures:
        return ""
    esc = html.escape
    head = esc(drift_lines(figures)[0])
    shares = [(c["label"], c["share_before"], c["share_after"]) for c in figures["classes"]]
    before, after = (np.asarray(figures[k], np.float64) for k in ("histogram_before",
                                                                  "histogram_after"))
    scores = [(f"{i / 10:.1f}-{(i + 1) / 10:.1f}", b / max(before.sum(), 1),
               a / max(after.sum(), 1)) for i, (b, a) in enumerate(zip(before, after))]
    changed = "".join(f"<p>Classes {name}: {esc(', '.join(figures[name]))}</p>"
                      for name in ("appeared", "vanished") if figures[name])
    return (f'<h2>Since the night before</h2><p id="drift">{head}.</p>{changed}'
            f'<h3>Class shares that moved most</h3>{_paired_bars(shares, "drift-classes")}'
            f'<h3>Top-1 scores</h3>{_paired_bars(scores, "drift-scores")}')


def _caption(key: str) -> str:
    """A key as lines that break only after a '/', each folder or file name whole (cut with
    an ellipsis where it is wider than the thumbnail; the full key is the caption's title)."""
    parts = key.split("/")
    return "<wbr>".join(f'<span class="name">{html.escape(part)}{"/" * (i < len(parts) - 1)}'
                        "</span>" for i, part in enumerate(parts))


def render_html(found: Findings, title: str) -> str:
    esc = html.escape
    histogram = [(f"{i / 10:.1f}-{(i + 1) / 10:.1f}", n) for i, n in enumerate(found.histogram)]
    sheet = []
    for label, picks in found.samples.items():
        cells = []
        for key, path, score in picks:
            uri = thumbnail(path)
            image = (f'<img class="thumb" src="{uri}" alt="{esc(key)}">' if uri
                     else '<div class="missing">unreadable now</div>')
            cells.append(f'<figure>{image}<figcaption title="{esc(key)}">{_caption(key)}'
                         f'<br>{score:.2f}</figcaption></figure>')
        sheet.append(f'<section class="label-group"><h3>{esc(label)}</h3>{"".join(cells)}'
                     '</section>')
    review = "".join(f"<tr><td>{esc(k)}</td><td>{esc(label)}</td><td>{score:.3f}</td>"
                     f"<td>{esc(p)}</td></tr>" for k, p, label, score in found.review)
    errors = "".join(f"<tr><td>{esc(k)}</td><td>{esc(e or '')}</td><td>{esc(p)}</td></tr>"
                     for k, p, e in found.error_rows)
    confidence = ", ".join(f"{n} {esc(edge)}" for edge, n in found.confidence.items())
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in found.run.items())
    agreed = ""
    if found.agreement:
        rows = "".join(f"<tr><td>{esc(c['label'])}</td><td>{c['reviewed']}</td>"
                       f"<td>{share(c['top1_agreement'])}</td>"
                       f"<td>{share(c['top_k_agreement'])}</td></tr>"
                       for c in found.agreement["per_class"])
        agreed = (f"<h2>Agreement with people</h2><p>{esc(agreement_line(found.agreement))}."
                  f"</p><table id=\"agreement\"><tr><th>reviewers' label</th><th>reviewed</th>"
                  f"<th>top-1 agrees</th><th>top-k agrees</th></tr>{rows}</table>")
    if len(found.agreement_history) > 1:
        history = found.agreement_history[-HISTORY_SHOWN:]
        rows = "".join(f"<tr><td>{esc(e['at'])}</td><td>{esc(e['when'])}</td>"
                       f"<td>{esc(e['model'])}</td><td>{e['reviewed']}</td>"
                       f"<td>{share(e['top1_agreement'])}</td>"
                       f"<td>{share(e['top_k_agreement'])}</td></tr>" for e in history)
        agreed += ("<h3>Night by night</h3><p>The table against all answers so far, as each "
                   "night (or each reading of answers) left it.</p><table id=\"agreement-"
                   "history\"><tr><th>when</th><th></th><th>labelled by</th><th>reviewed</th>"
                   f"<th>top-1 agrees</th><th>top-k agrees</th></tr>{rows}</table>")
    if found.calibration:
        bins = [(f"{b['bin']} ({b['images']})", b["confidence"], b["accuracy"])
                for b in found.calibration["reliability_before"]]
        agreed += (f'<h3>How far the scores can be trusted</h3><p id="calibration">'
                   f'{esc(calibration_line(found.calibration))}.</p><p>Each score bin of the reviewed '
                   "images: its mean top-1 score (pale) and the share people agreed with "
                   f"(dark); equal bars are calibrated scores.</p>"
                   f'{_paired_bars(bins, "reliability", ("mean score", "agreed"))}')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
svg text {{ font: 12px system-ui, sans-serif; }} .bar {{ fill: #4a78b5; }}
.before {{ fill: #b9cbe4; }}
figure {{ display: inline-block; margin: 4px; width: {THUMBNAIL_PX + 8}px; font-size: 11px;
          vertical-align: top; }}
.name {{ display: inline-block; max-width: 100%; overflow: hidden; white-space: nowrap;
         text-overflow: ellipsis; vertical-align: bottom; }}
.missing {{ width: {THUMBNAIL_PX}px; height: {THUMBNAIL_PX}px; background: #eee; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
</style></head><body>
<h1>{esc(title)}</h1>
<table id="run">{facts}</table>
<p id="summary">{found.rows} images: {found.ok} ok, {count(found.errors, "error")}.
Top-1 confidence: {confidence}.</p>
{agreed}
{_drift_section(found.drift)}
<h2>Labels</h2>{_bars(found.labels[:TOP_LABELS], "label-histogram")}
<h2>Top-1 confidence</h2>{_bars(histogram, "confidence-histogram")}
<h2>Contact sheet</h2><p>Up to {THUMBNAILS_PER_LABEL} random images for each of the
{TOP_LABELS} most frequent labels.</p>{"".join(sheet)}
<h2>To review: lowest confidence</h2>
<table id="review"><tr><th>key</th><th>label</th><th>score</th><th>path</th></tr>{review}</table>
<h2>Errors</h2><p>{"; ".join(f"{esc(k)}: {n}" for k, n in found.error_kinds) or "none"}</p>
<table id="errors"><tr><th>key</th><th>error</th><th>path</th></tr>{errors}</table>
</body></html>
"""
